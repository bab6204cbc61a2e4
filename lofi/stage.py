"""The device work of one pruning stage, as two pure functions of tensors and sizes known on the host.

``lofi.runtime`` keeps the bookkeeping (which original tokens each stage holds, what the handle records,
the method's call); these functions do the tensor work around the method's choice: ``candidates`` (what
the method is shown) and ``apply_choice`` (what its choice does to the sequence). Every size comes from
the host, nothing reads the device, so they compile whole: inside ``lofi.compiled`` the runtime runs
compiled copies of them (``compiled_steps``), a few fused kernels instead of some forty small ones.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

_NONE = torch.iinfo(torch.long).max


def candidates(prunable: torch.Tensor, visual_rank: torch.Tensor, most: int):
    """The prunable visual tokens a stage holds, as ``StageInput`` shows them to the method.

    Args:
        prunable: [B, n] bool, prunable visual tokens among the n the stage holds.
        visual_rank: [B, n] each token's original visual-token index (-1 where not visual).
        most: the most prunable tokens a row holds (on the host).

    Returns:
        (visual [B, most] their positions in order, visual_valid [B, most], visual_index [B, most]: their
        original indices, -1 at padding).
    """
    order = torch.sort((~prunable).to(torch.int8), dim=1, stable=True).indices[:, :most]
    visual_valid = torch.arange(most, device=order.device) < prunable.sum(1)[:, None]
    return order, visual_valid, torch.where(visual_valid, visual_rank.gather(1, order), -1)


def apply_choice(current: torch.Tensor, prunable: torch.Tensor, order: torch.Tensor, chosen: torch.Tensor,
                 visual_index: torch.Tensor, hidden: torch.Tensor, new_width: int):
    """Keep the chosen visual tokens and every token that is not prunable, in sequence order.

    Args:
        current: [B, n] original positions of the tokens the stage holds (-1: padding slot).
        prunable, order, visual_index: as for ``candidates``.
        chosen: [B, max n_keep] indices into ``order`` (-1 padding), the method's choice.
        hidden: [B, n, d] hidden states entering the stage.
        new_width: the longest row after the stage (on the host).

    Returns:
        (index [B, new_width] original positions kept, shorter rows padded in front with -1 slots;
        kept [B, max n_keep] the kept original visual-token indices, increasing, -1 padded;
        hidden [B, new_width, d] their hidden states).
    """
    batch, width = current.shape
    picked = chosen >= 0
    marks = torch.zeros_like(current).scatter_add(1, order.gather(1, chosen.clamp_min(0)), picked.long())
    keep = ((current >= 0) & ~prunable) | (marks > 0)
    # kept columns in order, each row ending at the last column; padding slots in front
    destination = torch.where(keep, keep.long().cumsum(1) - 1 + (new_width - keep.sum(1))[:, None], new_width)
    index = torch.full((batch, new_width + 1), -1, device=current.device).scatter(
        1, destination, current)[:, :new_width]
    source = torch.zeros((batch, new_width + 1), dtype=torch.long, device=current.device).scatter(
        1, destination, torch.arange(width, device=current.device).expand(batch, width))[:, :new_width]
    ranks = torch.where(picked, visual_index.gather(1, chosen.clamp_min(0)), _NONE).sort(1).values
    kept = torch.where(ranks == _NONE, -1, ranks)
    return index, kept, hidden.gather(1, source[..., None].expand(-1, -1, hidden.shape[-1]))


class Steps(NamedTuple):
    candidates: Callable
    apply_choice: Callable


EAGER = Steps(candidates, apply_choice)
_COMPILED: dict[str, Steps] = {}


def compiled_steps(backend: str = "inductor") -> Steps:
    """The two steps through ``torch.compile`` (dynamic shapes, no CUDA graphs: their outputs live on
    in the runtime's bookkeeping and the handle), one pair per backend."""
    if backend not in _COMPILED:
        _COMPILED[backend] = Steps(*(torch.compile(f, dynamic=True, backend=backend)
                                     for f in (candidates, apply_choice)))
    return _COMPILED[backend]
