"""SCOPE (Deng et al., NeurIPS 2025): saliency-weighted coverage of the vision tower's patch states."""

from __future__ import annotations

import torch

from lofi.methods.before_llm import BeforeLanguageModel
from lofi.registry import StageInput, register
from lofi.selectors import flops as kernel_flops
from lofi.selectors import scope_select
from lofi.vision import cls_attention_flops


@register
class Scope(BeforeLanguageModel):
    """SCOPE: greedily keep the visual token of largest coverage gain x [CLS] attention^alpha (vision tower).

    Options:
        keep: fraction kept.  alpha: the saliency's exponent (default 1.0, the reference; 0: coverage only).
        positions: ``"compact"`` (default, the reference) or ``"original"``.

    Follows kinredon/SCOPE (``scope/clip_encoder.py``, ``SCOPE``): cosine facility-location over the tower's
    patch states at the layer the projector reads (LLaVA's ``vision_feature_layer``, -2), each gain weighted by
    the [CLS] query's attention to the patch at that layer (``lofi.vision``, ``lofi.selectors.scope_select``).
    Needs a tower with a [CLS] token and one patch per visual token (LLaVA-1.5): other families refuse.
    """

    name = "scope"
    reads_tower = True

    def __init__(self, keep: float = 0.5, positions: str | None = None, alpha: float = 1.0):
        super().__init__(keep, 0, positions)
        if not alpha >= 0:
            raise ValueError(f"scope alpha must be >= 0, got {alpha!r}")
        self.alpha = float(alpha)

    def select(self, state: StageInput) -> torch.Tensor:
        tower = state.tower()
        return scope_select(tower.features, state.visual_valid, state.n_keep_host, tower.cls_attention,
                            alpha=self.alpha)

    def decision_flops(self, config, n_text: int, n_visual_per_stage: list[int]) -> float:
        """The greedy over tower states plus the [CLS] attention row rebuilt at the tower layer."""
        n = n_visual_per_stage[0]
        return kernel_flops.scope(n, config.vision_config.hidden_size, self.n_keep_of(n)).total + \
            cls_attention_flops(config, n)
