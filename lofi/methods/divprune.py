"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse visual tokens (max-min diversity)."""

from __future__ import annotations

import torch

from lofi.methods.before_llm import BeforeLanguageModel
from lofi.registry import StageInput, register
from lofi.selectors import divprune_select
from lofi.selectors import flops as kernel_flops


@register
class DivPrune(BeforeLanguageModel):
    """DivPrune: keep the visual tokens of a greedy max-min cosine diversity subset (before the language model).

    Options:
        keep: fraction kept.  layer: K (default 0: the projector's outputs, as the reference).
        positions: ``"compact"`` (default, the reference: the shorter sequence is renumbered) or ``"original"``.

    Follows vbdi/divprune (``LLaVA/llava/model/llava_arch.py``, ``LAYER_INDEX=0``): distances ``1 - cos`` between
    the projector's outputs of one image's visual tokens; the first pick is the token whose smallest distance to
    the others is largest, then each pick maximises its smallest distance to the picks so far
    (``lofi.selectors.divprune_select``). Batched, any number of images and tokens per sample.
    """

    name = "divprune"

    def select(self, state: StageInput) -> torch.Tensor:
        return divprune_select(state.visual_hidden(), state.visual_valid, state.n_keep_host)

    def decision_flops(self, config, n_text: int, n_visual_per_stage: list[int]) -> float:
        """The greedy's cosine matrix and min-updates (``lofi.selectors.flops.divprune``)."""
        n = n_visual_per_stage[0]
        return kernel_flops.divprune(n, config.get_text_config().hidden_size, self.n_keep_of(n)).total
