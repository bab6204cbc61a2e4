"""The vision stage: what a method may read from the vision tower, aligned with the language model's visual tokens.

Methods such as SCOPE, VisionZip and VisPruner rank visual tokens by the vision tower's own states and attention
at the block whose output the projector reads. While ``lofi.pruned`` is active, a tap (``lofi.vision.taps``,
built by the family adapter: ``Family.tower_tap``) keeps that block's input and output from the latest image
encoding; the block's attention is rebuilt from its input (``lofi.vision.attention``), so the tower keeps its own
attention kernel. ``tower_view`` (``lofi.vision.view``) then hands a method, per prunable visual token, the tower
state(s) it came from, its saliency ([CLS] attention, or mean attention received on towers without [CLS]) and
its key.
"""

from lofi.vision.attention import cls_attention_flops, received_attention_flops
from lofi.vision.taps import MergedPatchTap, PatchTap, TowerTap
from lofi.vision.view import TowerReading, TowerView, gather_rows, per_visual_token, tower_view

__all__ = ["MergedPatchTap", "PatchTap", "TowerReading", "TowerTap", "TowerView", "cls_attention_flops",
           "gather_rows", "per_visual_token", "received_attention_flops", "tower_view"]
