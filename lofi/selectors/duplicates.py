"""VisPruner's selection: important tokens by [CLS] attention, then diverse ones by repeatedly removing the
remaining tokens that most duplicate another, batched.

Follows Theia-4869/VisPruner at aefa01adc7c7ce6334e880c88225e90cede760d1, ``llava/model/llava_arch.py``
``encode_images`` (with ``llava/model/multimodal_encoder/clip_encoder.py`` ``feature_select`` for its inputs).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from lofi.selectors._batch import batch_sizes, cosine, kept_from_mask, masked_rows
from lofi.threads import single_threaded

MAX_REMOVED_PER_ROUND = 8  # the reference's ``r = min(8, R - T_div)``


def important_count(n_keep: int, important_ratio: float) -> int:
    """The reference's ``T_imp = int(T * r)``: how many of ``n_keep`` tokens are chosen by attention alone."""
    return int(n_keep * important_ratio)


def duplicate_rounds(residual: int, diverse: int) -> list[int]:
    """How many tokens each duplicate-removal round drops, until ``residual`` tokens shrink to ``diverse``.

    The reference's loop: while ``diverse > 0``: ``r = min(8, R - diverse)``; stop if ``r <= 0``; ``R -= r``.
    A round drops only tokens of its first half ``a`` (``ceil(R / 2)`` of them), so ``r`` is also capped there;
    the reference fails with an indexing error in that case (and whenever ``R`` is odd), which only small
    budgets (about ``n_keep < 32`` at ``important_ratio = 0.5``) reach.
    """
    rounds = []
    while diverse > 0:
        removed = min(MAX_REMOVED_PER_ROUND, residual - diverse, (residual + 1) // 2)
        if removed <= 0:
            break
        rounds.append(removed)
        residual -= removed
    return rounds


def vispruner_select(features: torch.Tensor, valid: torch.Tensor, n_keep: int | Sequence[int] | torch.Tensor,
                     cls_attention: torch.Tensor, *, important_ratio: float = 0.5) -> torch.Tensor:
    """VisPruner: ``T_imp = int(n_keep * important_ratio)`` important tokens, then ``n_keep - T_imp`` diverse ones.

    Important: the ``T_imp`` valid tokens of largest ``cls_attention`` [B, P] ([CLS] -> patch attention of tower
    layer -2, averaged over heads; ties to the lowest index). The others, in that attention order, form the
    residual list ``R``. Each round (``duplicate_rounds``): split ``R`` into ``a = R[0::2]``, ``b = R[1::2]``;
    ``score(a_i) = max_j cos(x_{a_i}, x_{b_j})`` on ``features`` [B, P, d] (the reference: tower layer -2 patch
    states); drop the ``r`` entries of ``a`` with the largest scores and continue with
    ``R = [a sorted by decreasing score without its first r] + b`` (a stable sort: ties keep list order).
    The last ``R`` is kept with the important tokens. Returns ``kept`` [B, max(n_keep)] (sorted, -1 padded).

    The sizes alone fix every round's layout, so ``_RoundPlan`` lays the rounds out on the host first; a round
    then reads its ``a`` rows and ``b`` columns of the similarity matrix, takes their maxima, sorts them and
    forms the next list (through a planned index where the lists differ in length or in ``r``): six or seven
    kernels a round, no device read.
    """
    if not 0.0 <= important_ratio <= 1.0:
        raise ValueError(f"important_ratio must lie in [0, 1], got {important_ratio}")
    n_keep, counts = batch_sizes(valid, n_keep)
    batch, p = valid.shape
    important = torch.tensor([important_count(int(k), important_ratio) for k in n_keep])
    diverse = n_keep - important
    plan = _RoundPlan([duplicate_rounds(int(c - i), int(d)) for c, i, d in zip(counts, important, diverse)],
                      counts - important)
    similarity = cosine(features, valid)
    device = similarity.device
    score = masked_rows(cls_attention, valid, "cls_attention").masked_fill(~valid, float("-inf"))
    order = score.sort(dim=1, descending=True, stable=True).indices
    slots = torch.arange(p, device=device)
    first = important.to(device)[:, None]
    # The lists are the columns of ``residual`` [slot, sample], their entries rows of the [B * P, P] similarity
    # (b * P + token): one lookup reads every sample's rows of a slot side by side, [half_a, B * P], where
    # b's entries are the columns of their own sample.
    row_offset = (torch.arange(batch, device=device) * p)[:, None]
    residual = (order.gather(1, (first + slots[:plan.widths[0]]).clamp_max(p - 1)) + row_offset).T
    rows = similarity.view(batch * p, p)
    with single_threaded(device):
        for removed, next_list, b_past_end, a_past_end in plan.rounds(device):
            a, b = residual[0::2], residual[1::2]
            half_a = a.shape[0]
            sims = F.embedding(a, rows).view(half_a, -1).index_select(1, b.reshape(-1)).view(half_a, -1, batch)
            if b_past_end is not None:  # a list shorter than the round's width: its tail is in neither a nor b
                sims.masked_fill_(b_past_end, float("-inf"))
            dup = sims.amax(1)
            if a_past_end is not None:
                dup.masked_fill_(a_past_end, float("-inf"))
            by_score = dup.sort(dim=0, descending=True, stable=True).indices
            if next_list is None:  # every list is as long as the round's width and drops the same number
                residual = torch.cat([a.gather(0, by_score[removed:]), b])
            else:
                residual = torch.cat([a.gather(0, by_score), residual]).gather(0, next_list)
    residual = residual.T - row_offset
    in_rank = torch.empty_like(order).scatter_(1, order, slots.expand(batch, p)) < first
    chosen = torch.zeros(batch, p, dtype=torch.long, device=device)
    chosen = chosen.scatter_add(1, residual, (slots[:residual.shape[1]] < diverse.to(device)[:, None]).long())
    return kept_from_mask(in_rank | (chosen > 0), int(n_keep.max()))


class _RoundPlan:
    """Where every token of every list goes in each duplicate-removal round of a batch, from the sizes alone.

    Built on the host from ``plans[b]`` (sample b's ``duplicate_rounds``) and ``first_lengths`` [B] (the length
    of its first list). Round t works on the longest list of the round, ``widths[t]`` slots (``widths[-1]``: the
    longest list left after the last round). Where every list is that long and drops the same number ``r``
    (always at batch 1), the next list is ``a_sorted[r:]`` then ``b``. Otherwise ``next_list`` [widths[t + 1], B]
    gives the next list's slots in ``[a sorted by score; the round's list]``: ``a_sorted[r:ceil(len / 2)]`` then
    the list's odd slots, and slot 0 past the list's end (never read as part of a list). A sample whose rounds
    are over (``r = 0``) thus keeps the same tokens in another order, which no longer matters: its whole list is
    kept. Where some list is shorter than the round's width, masks mark the ``b`` slots ([1, width // 2, B])
    and ``a`` slots ([ceil(width / 2), B]) past each list's end.
    """

    def __init__(self, plans: list[list[int]], first_lengths: torch.Tensor):
        batch, n_rounds = len(plans), max(map(len, plans))
        removed = torch.tensor([plan + [0] * (n_rounds - len(plan)) for plan in plans],
                               dtype=torch.long).reshape(batch, n_rounds)
        lengths = first_lengths[:, None] - torch.cat([torch.zeros(batch, 1, dtype=torch.long), removed.cumsum(1)], 1)
        widths = lengths.amax(0)
        self.widths = widths.tolist()
        self.removed = removed[0].tolist()
        ragged = lengths[:, :-1] < widths[:-1]
        self.ragged = ragged.any(0).tolist()
        self.indexed = (ragged | (removed != removed[:1])).any(0).tolist()
        self._length, r = lengths[:, :-1].T[self.indexed, None, :], removed.T[self.indexed, None, :]
        if not self._length.numel():
            return
        slot = torch.arange(self.widths[0])[None, :, None]  # [1, slot, 1] against [round, 1, sample]
        half_a = (widths[:-1][self.indexed][:, None, None] + 1) // 2
        kept_a = (self._length + 1) // 2 - r
        shrunk = torch.where(slot < kept_a, r + slot, half_a + 2 * (slot - kept_a) + 1)
        next_list = torch.where(slot < self._length - r, shrunk, 0)
        self._next_widths = widths[1:][self.indexed].tolist()
        self._next_list = next_list[slot[..., 0] < widths[1:][self.indexed][:, None]]  # each round's first slots

    def rounds(self, device: torch.device) -> list[tuple[int, torch.Tensor | None, torch.Tensor | None,
                                                           torch.Tensor | None]]:
        """Per round on ``device``: (r at batch 1, the next list's index or None, the masks of b and a or None)."""
        indexed = iter(self._next_list.to(device).split(self._next_widths)) if any(self.indexed) else iter(())
        length = iter(self._length.to(device))
        rounds = []
        for width, removed, uses_index, ragged in zip(self.widths, self.removed, self.indexed, self.ragged):
            next_list, b_past_end, a_past_end, list_length = None, None, None, None
            if uses_index:
                next_list, list_length = next(indexed), next(length)
            if ragged:
                slot = torch.arange((width + 1) // 2, device=device)[:, None]
                b_past_end = (slot[:width // 2] >= list_length // 2)[None]
                a_past_end = slot >= (list_length + 1) // 2
            rounds.append((removed, next_list, b_past_end, a_past_end))
        return rounds
