"""VisionZip (Yang et al., CVPR 2025): dominant tokens by [CLS] attention plus merged contextual tokens."""

from __future__ import annotations

import torch

from lofi.families import family_class
from lofi.methods.before_llm import BeforeLanguageModel
from lofi.registry import Choice, StageInput, register
from lofi.selectors import flops as kernel_flops
from lofi.selectors import visionzip_select
from lofi.selectors._batch import kept_from_mask

CONTEXTUAL_SHARE = 10 / 64  # the reference budgets: 54 + 10, 108 + 20, 162 + 30 tokens


@register
class VisionZip(BeforeLanguageModel):
    """VisionZip: keep the tokens of largest [CLS] attention and merge the others into a few contextual tokens.

    Options:
        keep: fraction of visual tokens left (dominant + contextual).
        contextual_share: share of them that are merged contextual tokens (default 10/64, the reference budgets).
        positions: ``"compact"`` (default, the reference) or ``"original"``.

    Follows dvlab-research/VisionZip (``visionzip/clip_encoder.py``): dominant tokens by the [CLS] query's
    attention (summed over heads) at the tower layer the projector reads; the others, in index order, are
    assigned to evenly spaced targets by the cosine of their keys (averaged over heads), and each contextual
    token is the target's tower state plus the mean of its members', through the model's projector
    (``lofi.selectors.visionzip_select``). Deviations: a contextual token sits at its target's place in the
    sequence (the reference appends the contextual tokens after the dominant ones), and llava-hf drops the
    [CLS] state the reference also keeps, so every budgeted token is a patch. On towers without [CLS]
    (OneVision's SigLIP, Qwen2-VL / Qwen2.5-VL) dominance is the mean attention a patch receives at the last
    tower block, averaged over each 2 x 2 merge group on Qwen, as the authors' Qwen code does; there keys are
    averaged over the group too, and a contextual token merges groups' tower states before the merger. On
    LLaVA-NeXT and OneVision one budget spans the image's crops, where the reference gives each crop its own.
    """

    name = "visionzip"
    reads_tower = True

    def __init__(self, keep: float = 0.5, positions: str | None = None, contextual_share: float = CONTEXTUAL_SHARE):
        super().__init__(keep, 0, positions)
        if not 0 <= contextual_share < 1:
            raise ValueError(f"visionzip contextual_share must lie in [0, 1), got {contextual_share!r}")
        self.contextual_share = float(contextual_share)

    def split(self, n_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dominant, contextual) counts for ``n_keep`` tokens left, on the host: round(share x n) contextual."""
        contextual = torch.round(n_keep.double() * self.contextual_share).long().clamp(max=n_keep - 1)
        return n_keep - contextual, contextual

    def select(self, state: StageInput) -> Choice:
        tower = state.tower()
        dominant, contextual = self.split(state.n_keep_host)
        chosen = visionzip_select(tower.features, state.visual_valid, dominant, tower.attention, tower.keys,
                                  contextual)
        picks = torch.cat([chosen.kept, chosen.contextual], 1)
        keep = torch.zeros(picks.shape[0], state.visual_valid.shape[1] + 1, dtype=torch.bool, device=picks.device)
        keep = keep.scatter(1, torch.where(picks >= 0, picks, keep.shape[1] - 1), True)[:, :-1]  # -1: a spare column
        kept = kept_from_mask(keep, int(state.n_keep_host.max()))
        states = state.visual_hidden().gather(1, kept.clamp_min(0)[..., None].expand(-1, -1, state.hidden.shape[-1]))
        if chosen.merged.shape[1]:
            merged = tower.project(chosen.merged).to(states.dtype)  # [B, C, d]
            slot = (kept[:, :, None] == chosen.contextual[:, None, :]) & (chosen.contextual[:, None, :] >= 0)
            states = torch.where(slot.any(2, keepdim=True), torch.einsum("bwc,bcd->bwd", slot.to(merged.dtype),
                                                                         merged), states)
        if chosen.contextual.shape[1]:
            slot = chosen.assignment.clamp_min(0)
            sources = torch.where(chosen.assignment >= 0, chosen.contextual.gather(1, slot), -1)  # the targets
        else:  # no contextual token in the batch: nothing merged
            sources = torch.full_like(chosen.assignment, -1)
        return Choice(kept, states, sources)

    def decision_flops(self, config, n_text: int, n_visual_per_stage: list[int]) -> float:
        n = n_visual_per_stage[0]
        dominant, contextual = (int(x) for x in self.split(torch.tensor([self.n_keep_of(n)])))
        width, head_dim = family_class(config).tower_widths(config)
        return kernel_flops.visionzip(n, width, dominant, head_dim, contextual).total
