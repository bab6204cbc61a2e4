"""CDPruner (Zhang et al., NeurIPS 2025): keep the visual tokens of a DPP conditioned on the instruction."""

from __future__ import annotations

import torch

from lofi.methods.before_llm import BeforeLanguageModel
from lofi.registry import StageInput, register
from lofi.selectors import cdpruner_select
from lofi.selectors import flops as kernel_flops

RELEVANCE = ("instruction", "none")  # CDPruner's relevance term, or none (the ablation: the similarity kernel alone)


@register
class CDPruner(BeforeLanguageModel):
    """CDPruner: keep a diverse, instruction-relevant subset (greedy MAP of a conditional DPP, before the LLM).

    Options:
        keep: fraction kept.  layer: K (default 0: the projector's outputs, as the reference).
        positions: ``"compact"`` (default, the reference) or ``"original"``.
        theta: None (default, the reference code: kernel ``diag(r) S diag(r)``) or a float in (0, 1): relevance
            weighted ``exp(theta / (2 (1 - theta)) r)`` (the paper's trade-off; OpenVINO's ``relevance_weight``).
        negate_relevance: False (default: the paper's formula, ``r = cos``) or True (the reference code's
            ``-cos``, which its authors keep for CLIP's space only).
        relevance: ``"instruction"`` (default, the method) or ``"none"``: no relevance (``r = 1``), the DPP on the
            similarity kernel ``L = S`` alone, which never reads the instruction (the ablation of the relevance
            term; ``theta`` and ``negate_relevance`` must stay at their defaults).

    Follows Theia-4869/CDPruner (``llava/model/llava_arch.py``, ``encode_images``): similarity ``S`` = cosine of
    the projector's outputs; relevance ``r_i`` = min-max normalised mean cosine between visual token i and the
    instruction; greedy MAP inference (Chen et al. 2018), batched (``lofi.selectors.cdpruner_select``).
    Where the reference embeds the instruction with CLIP's text tower and the patches with CLIP's visual
    projection (llava-hf checkpoints ship neither), both sides are the language model's input embeddings: the
    projector's outputs and the embeddings of the instruction's tokens (the text after the sample's last visual
    token), as OpenVINO GenAI's CDPruner does; with that substitute the reference's sign flip has no ground, hence
    ``negate_relevance=False`` by default.
    """

    name = "cdpruner"

    def __init__(self, keep: float = 0.5, layer: int | None = None, positions: str | None = None,
                 theta: float | None = None, negate_relevance: bool = False, relevance: str = "instruction"):
        super().__init__(keep, layer, positions)
        if theta is not None and not 0 < theta < 1:
            raise ValueError(f"cdpruner theta must be None or in (0, 1), got {theta!r}")
        if relevance not in RELEVANCE:
            raise ValueError(f"cdpruner relevance must be one of {list(RELEVANCE)}, got {relevance!r}")
        if relevance == "none" and (theta is not None or negate_relevance):
            raise ValueError("cdpruner theta and negate_relevance shape the instruction's relevance: with "
                             "relevance='none' leave them at None and False")
        self.theta, self.negate_relevance, self.relevance = theta, bool(negate_relevance), relevance

    def select(self, state: StageInput) -> torch.Tensor:
        visual = state.visual_hidden()
        if self.relevance == "none":
            return cdpruner_select(visual, state.visual_valid, state.n_keep_host, None, None, None)
        instruction, instruction_valid = state.instruction_hidden()
        return cdpruner_select(visual, state.visual_valid, state.n_keep_host, visual, instruction,
                               instruction_valid, theta=self.theta, negate_relevance=self.negate_relevance)

    def decision_flops(self, config, n_text: int, n_visual_per_stage: list[int]) -> float:
        """The DPP's similarity, relevance and greedy steps (``lofi.selectors.flops.cdpruner``), with the
        instruction bounded by the prompt's text tokens (none with ``relevance="none"``)."""
        n, d = n_visual_per_stage[0], config.get_text_config().hidden_size
        c, t = (0, 0) if self.relevance == "none" else (d, n_text)
        return kernel_flops.cdpruner(n, d, self.n_keep_of(n), c, t).total
