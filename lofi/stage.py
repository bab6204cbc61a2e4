"""One pruning stage: its sizes, worked out on the host, and its device work, as pure functions.

``host_sizes`` copies a prompt's per-sample counts to the host (the runtime's one host sync per prompt)
and ``plan_stages`` derives every stage's widths from them there. ``candidates`` (what the method is
shown) and ``apply_choice`` (what its choice does to the sequence) do the tensor work around the
method's choice; ``lofi.sequence`` keeps the bookkeeping (which original tokens each stage holds),
``lofi.selection`` makes the method's call. Every size comes from the host and nothing reads the device,
so the two tensor steps compile whole: inside ``lofi.compiled`` the runtime runs compiled copies of them
(``compiled_steps``), a few fused kernels instead of some forty small ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

if TYPE_CHECKING:
    from lofi.registry import PruningMethod

_NONE = torch.iinfo(torch.long).max


@dataclass
class HostSizes:
    """A prompt's per-row counts, copied to the host once when it starts. Every shape of the pruning stages
    follows from them (a stage keeps exactly ``n_keep`` of the prunable tokens present), so no stage waits
    for the device to say how wide its rows are."""

    has_visual: bool
    unpadded: bool               # no padding in the batch
    n_prunable: torch.Tensor     # [B] CPU long: prunable visual tokens of the prompt
    n_fixed: torch.Tensor        # [B] CPU long: tokens never dropped (text, padding, newline rows)
    text_width: int              # the most real text tokens of a row
    visual_width: int            # the most visual tokens of a row
    on_device: torch.Tensor      # [B, 4] the counts where they were made (``from_counts``), for device work

    @classmethod
    def from_counts(cls, per_row: torch.Tensor, length: int, on_device: torch.Tensor) -> "HostSizes":
        """From ``[B, 4]`` counts per row, already on the host: prunable visual tokens, real text tokens,
        visual tokens, real tokens (``on_device``: the same counts before the copy)."""
        rows = per_row.tolist()  # the flags and widths as Python numbers: no tensor op per field
        n_prunable = per_row[:, 0]
        return cls(any(row[2] for row in rows), all(row[3] == length for row in rows), n_prunable,
                   length - n_prunable, max(row[1] for row in rows), max(row[2] for row in rows), on_device)


def host_sizes(is_visual: torch.Tensor, prunable: torch.Tensor, valid: torch.Tensor) -> HostSizes:
    """The counts of a call's tokens ([B, T] masks: visual, prunable, real), in one device-to-host copy (the
    runtime's one host sync per prompt)."""
    length = is_visual.shape[1]
    per_row = torch.stack([prunable, valid & ~is_visual, is_visual, valid], 1).sum(2)  # one reduction, one copy
    return HostSizes.from_counts(per_row.cpu(), length, per_row)


class StagePlan(NamedTuple):
    """One stage's sizes, on the host: per row the prunable tokens it holds and the ones it keeps; the widths its
    tensors take (prunable tokens present, widest n_keep, widest and narrowest row after it); ``uniform``: every
    row holds as many prunable tokens as the others and keeps as many, at this stage and every one before (no
    row is shorter than another, so no padding slots, and every candidate is real and every row keeps
    ``widest``: the steps then take their shorter form, as at batch 1); ``keeps_all``: every row keeps all the
    prunable tokens it holds."""

    n_present: torch.Tensor
    n_keep: torch.Tensor
    most: int
    widest: int
    new_width: int
    narrowest: int
    uniform: bool = False
    keeps_all: bool = False


def plan_stages(method: "PruningMethod", n_stages: int, host: HostSizes) -> list[StagePlan]:
    """On the host, when a prompt starts: every stage's sizes, from the prompt's counts and ``method.n_keep``
    (a stage keeps exactly ``n_keep`` of the prunable tokens present, and the next stage holds those)."""
    plans, present = [], host.n_prunable
    fixed = host.n_fixed.tolist()
    present_rows = present.tolist()
    uniform = len(set(present_rows)) == 1
    for stage in range(n_stages):
        n_keep = method.n_keep(stage, host.n_prunable, present).cpu()
        keep = n_keep.tolist()
        after = [f + k for f, k in zip(fixed, keep)]
        uniform = uniform and len(set(keep)) == 1
        plans.append(StagePlan(present, n_keep, max(present_rows), max(keep), max(after), min(after), uniform,
                               keep == present_rows))
        present, present_rows = n_keep, keep
    return plans


def keeps_everything(plan: StagePlan, slotted: list[bool]) -> bool:
    """On the host: whether a stage is the identity, whatever its method would choose. It is when every row
    keeps all the prunable tokens it holds (keep = 1) and no row holds padding slots: applying the choice would
    then rebuild the very index and hidden states it was given."""
    return plan.keeps_all and not any(slotted)


def candidates(prunable: torch.Tensor, visual_rank: torch.Tensor | None, most: int, uniform: bool = False):
    """The prunable visual tokens a stage holds, as ``StageInput`` shows them to the method.

    Args:
        prunable: [B, n] bool, prunable visual tokens among the n the stage holds.
        visual_rank: [B, n] each token's original visual-token index (-1 where not visual); None where the stage
            holds the prompt as it came and every visual token is prunable (the k-th candidate is visual token k).
        most: the most prunable tokens a row holds (on the host).
        uniform: every row holds ``most`` of them (``StagePlan.uniform``): no row is padded.

    Returns:
        (visual [B, most] their positions in order, visual_valid [B, most], visual_index [B, most]: their
        original indices, -1 at padding).
    """
    # a stable sort puts each row's prunable tokens first, in sequence order
    order = torch.sort(prunable, dim=1, descending=True, stable=True).indices[:, :most]
    if uniform:
        visual_valid = torch.ones_like(order, dtype=torch.bool)
        if visual_rank is None:
            return order, visual_valid, torch.arange(most, device=order.device).expand(order.shape)
        return order, visual_valid, visual_rank.gather(1, order)
    visual_valid = torch.arange(most, device=order.device) < prunable.sum(1)[:, None]
    ranks = torch.arange(most, device=order.device).expand(order.shape) if visual_rank is None else \
        visual_rank.gather(1, order)
    return order, visual_valid, torch.where(visual_valid, ranks, -1)


def apply_choice(current: torch.Tensor, prunable: torch.Tensor, order: torch.Tensor, chosen: torch.Tensor,
                 visual_index: torch.Tensor, hidden: torch.Tensor, new_width: int, uniform: bool = False,
                 identity: bool = False):
    """Keep the chosen visual tokens and every token that is not prunable, in sequence order.

    Args:
        current: [B, n] original positions of the tokens the stage holds (-1: padding slot).
        prunable, order, visual_index: as for ``candidates``.
        chosen: [B, max n_keep] indices into ``order`` (-1 padding), the method's choice.
        hidden: [B, n, d] hidden states entering the stage.
        new_width: the longest row after the stage (on the host).
        uniform: ``StagePlan.uniform``: every row keeps as many tokens (``chosen`` holds no -1) and ``current``
            holds no padding slot; the same result in fewer ops.
        identity: ``current`` is 0 .. n-1 in every row (the prompt as it came).

    Returns:
        (index [B, new_width] original positions kept, shorter rows padded in front with -1 slots;
        kept [B, max n_keep] the kept original visual-token indices, increasing, -1 padded;
        hidden [B, new_width, d] their hidden states).
    """
    if uniform:
        keep = (~prunable).scatter(1, order.gather(1, chosen), True)
        # every row keeps new_width tokens: a stable sort lists them first, in sequence order
        source = torch.sort(keep, dim=1, descending=True, stable=True).indices[:, :new_width]
        index = source if identity else current.gather(1, source)
        kept = visual_index.gather(1, chosen).sort(dim=1).values
        return index, kept, hidden.gather(1, source[..., None].expand(-1, -1, hidden.shape[-1]))
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


def write_states(hidden: torch.Tensor, order: torch.Tensor, chosen: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``hidden`` [B, n, d] with the chosen tokens' rows replaced by ``states`` [B, max n_keep, d] (a merging
    method's choice; ``order``, ``chosen`` as for ``apply_choice``)."""
    batch, width, d = hidden.shape
    rows = torch.where(chosen >= 0, order.gather(1, chosen.clamp_min(0)), width)  # -1: a spare row, dropped
    spare = torch.cat([hidden, hidden.new_zeros(batch, 1, d)], 1)
    return spare.scatter(1, rows[..., None].expand(-1, -1, d), states.to(hidden.dtype))[:, :width]


def in_kept_order(chosen: torch.Tensor, visual_index: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``states`` [B, max n_keep, d] (in the order of ``chosen``) reordered as ``apply_choice``'s ``kept``: by
    increasing original visual-token index, padding last."""
    ranks = torch.where(chosen >= 0, visual_index.gather(1, chosen.clamp_min(0)), _NONE)
    order = ranks.argsort(dim=1, stable=True)
    return states.gather(1, order[..., None].expand(-1, -1, states.shape[-1]))


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
