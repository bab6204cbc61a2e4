"""SCOPE (Deng et al., NeurIPS 2025): saliency-weighted coverage of the vision tower's patch states."""

from __future__ import annotations

import torch

from lofi.families import family_class
from lofi.methods.before_llm import BeforeLanguageModel
from lofi.registry import StageInput, register
from lofi.selectors import flops as kernel_flops
from lofi.selectors import scope_select


@register
class Scope(BeforeLanguageModel):
    """SCOPE: greedily keep the visual token of largest coverage gain x [CLS] attention^alpha (vision tower).

    Options:
        keep: fraction kept.  alpha: the saliency's exponent (default 1.0, the reference; 0: coverage only).
        positions: ``"compact"`` (default, the reference) or ``"original"``.

    Follows kinredon/SCOPE (``scope/clip_encoder.py``, ``SCOPE``): cosine facility-location over the tower's
    patch states at the layer the projector reads (LLaVA's ``vision_feature_layer``, -2), each gain weighted by
    the [CLS] query's attention to the patch at that layer (``lofi.vision``, ``lofi.selectors.scope_select``).
    Needs a tower with a [CLS] token: LLaVA-1.5, and LLaVA-NeXT (each crop's [CLS] scores its patches; one
    budget over the whole image, where the reference divides it evenly among the crops). Towers without [CLS]
    (OneVision's SigLIP, Qwen's ViT) are refused: SCOPE's authors give no substitute there.
    """

    name = "scope"
    reads_tower = True
    tower_saliencies = ("cls",)

    def __init__(self, keep: float = 0.5, positions: str | None = None, alpha: float = 1.0):
        super().__init__(keep, 0, positions)
        if not alpha >= 0:
            raise ValueError(f"scope alpha must be >= 0, got {alpha!r}")
        self.alpha = float(alpha)

    def select(self, state: StageInput) -> torch.Tensor:
        tower = state.tower()
        return scope_select(tower.features, state.visual_valid, state.n_keep_host, tower.attention,
                            alpha=self.alpha)

    def decision_flops(self, config, n_text: int, n_visual_per_stage: list[int]) -> float:
        """The greedy over tower states (the tower's attention, rebuilt once, is counted by ``lofi.method_flops``)."""
        n = n_visual_per_stage[0]
        return kernel_flops.scope(n, family_class(config).tower_widths(config)[0], self.n_keep_of(n)).total
