"""VisPruner's selection: important tokens by [CLS] attention, then diverse ones by repeatedly removing the
remaining tokens that most duplicate another, batched.

Follows Theia-4869/VisPruner at aefa01adc7c7ce6334e880c88225e90cede760d1, ``llava/model/llava_arch.py``
``encode_images`` (with ``llava/model/multimodal_encoder/clip_encoder.py`` ``feature_select`` for its inputs).
"""

from __future__ import annotations

from typing import Sequence

import torch

from lofi.selectors._batch import batch_sizes, cosine, kept_from_mask, masked_rows

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
    """
    if not 0.0 <= important_ratio <= 1.0:
        raise ValueError(f"important_ratio must lie in [0, 1], got {important_ratio}")
    n_keep, counts = batch_sizes(valid, n_keep)
    batch, p = valid.shape
    important = torch.tensor([important_count(int(k), important_ratio) for k in n_keep])
    diverse = n_keep - important
    plans = [duplicate_rounds(int(c - i), int(d)) for c, i, d in zip(counts, important, diverse)]
    n_rounds = max(map(len, plans))
    removed = torch.tensor([plan + [0] * (n_rounds - len(plan)) for plan in plans], dtype=torch.long).reshape(batch, -1)
    lengths = (counts - important)[:, None] - torch.cat([torch.zeros(batch, 1, dtype=torch.long),
                                                         removed.cumsum(1)[:, :-1]], 1)
    widths = lengths.amax(0).tolist()[:n_rounds]  # per round, the longest residual list: the width its work needs
    similarity = cosine(features, valid)
    device = similarity.device
    removed, lengths = removed.to(device), lengths.to(device)
    score = masked_rows(cls_attention, valid, "cls_attention").masked_fill(~valid, float("-inf"))
    order = score.sort(dim=1, descending=True, stable=True).indices
    slots = torch.arange(p, device=device)
    first = important.to(device)[:, None]
    residual = order.gather(1, (first + slots).clamp_max(p - 1))
    flat = similarity.flatten(1)
    for t, width in enumerate(widths):
        r, length = removed[:, t:t + 1], lengths[:, t:t + 1]
        half_a, half_b = (width + 1) // 2, width // 2
        here = slots[:width]
        a, b = residual[:, 0:width:2], residual[:, 1:width:2]
        pairs = (a[:, :, None] * p + b[:, None, :]).flatten(1)
        sims = flat.gather(1, pairs).view(batch, half_a, half_b)
        sims = sims.masked_fill(slots[None, None, :half_b] >= length[:, :, None] // 2, float("-inf"))
        dup = sims.amax(2).masked_fill(slots[None, :half_a] >= (length + 1) // 2, float("-inf"))
        a_sorted = a.gather(1, dup.sort(dim=1, descending=True, stable=True).indices)
        kept_a = (length + 1) // 2 - r
        from_a = a_sorted.gather(1, (r + here).clamp_max(half_a - 1))
        from_b = b.gather(1, (here - kept_a).clamp(0, max(half_b - 1, 0)))
        shrunk = torch.where(here < kept_a, from_a, from_b)
        residual = torch.cat([torch.where(r > 0, shrunk, residual[:, :width]), residual[:, width:]], 1)
    in_rank = torch.empty_like(order).scatter_(1, order, slots.expand(batch, p)) < first
    chosen = torch.zeros(batch, p, dtype=torch.long, device=device)
    chosen = chosen.scatter_add(1, residual, (slots < diverse.to(device)[:, None]).long())
    return kept_from_mask(in_rank | (chosen > 0), int(n_keep.max()))
