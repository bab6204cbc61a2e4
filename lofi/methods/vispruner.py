"""VisPruner (Zhang et al., ICCV 2025): [CLS]-important tokens, then diverse ones by removing near duplicates."""

from __future__ import annotations

import torch

from lofi.families import family_class
from lofi.methods.before_llm import BeforeLanguageModel
from lofi.registry import StageInput, register
from lofi.selectors import flops as kernel_flops
from lofi.selectors import vispruner_select


@register
class VisPruner(BeforeLanguageModel):
    """VisPruner: keep the tokens of largest [CLS] attention, then diverse ones by removing near duplicates.

    Options:
        keep: fraction kept.  important_ratio: share of the kept tokens chosen by [CLS] attention (default 0.5,
            the reference; 1.0 is FasterVLM).  positions: ``"compact"`` (default, the reference) or ``"original"``.

    Follows Theia-4869/VisPruner (``llava/model/llava_arch.py``, ``encode_images``): [CLS] attention at the tower
    layer the projector reads, averaged over heads; the rest by rounds of bipartite duplicate removal over the
    tower's patch states (``lofi.selectors.vispruner_select``; where the reference fails on an odd residual,
    the round takes ceil(R/2) candidates). On towers without [CLS] (OneVision's SigLIP, Qwen2-VL / Qwen2.5-VL)
    importance is the mean attention a patch receives, as the authors do there (VisPruner's
    ``siglip_encoder.py``, at the last tower block; for Qwen averaged over each 2 x 2 merge group, the authors'
    answer on the repository); on Qwen the duplicates are judged on a group's four tower states side by side
    (LightCompress's port uses the merger's outputs). On LLaVA-NeXT and OneVision one budget spans the image's
    crops, where the reference gives each crop its own.
    """

    name = "vispruner"
    reads_tower = True

    def __init__(self, keep: float = 0.5, positions: str | None = None, important_ratio: float = 0.5):
        super().__init__(keep, 0, positions)
        if not 0 <= important_ratio <= 1:
            raise ValueError(f"vispruner important_ratio must lie in [0, 1], got {important_ratio!r}")
        self.important_ratio = float(important_ratio)

    def select(self, state: StageInput) -> torch.Tensor:
        tower = state.tower()
        return vispruner_select(tower.features, state.visual_valid, state.n_keep_host, tower.attention,
                                important_ratio=self.important_ratio)

    def decision_flops(self, config, n_text: int, n_visual_per_stage: list[int]) -> float:
        n = n_visual_per_stage[0]
        return kernel_flops.vispruner(n, family_class(config).tower_widths(config)[0], self.n_keep_of(n),
                                      self.important_ratio).total
