"""SCOPE's selection: greedy saliency-weighted coverage under a cosine facility-location function, batched.

Follows kinredon/SCOPE at 6bf73069e0d61307051cfda8e25925bc7b7afdd9, ``scope/clip_encoder.py`` (``SCOPE``, the
batched greedy, and ``CLIPVisionTower_SCOPE.forward``, which feeds it).
"""

from __future__ import annotations

from typing import Sequence

import torch

from lofi.selectors._batch import batch_sizes, cosine, kept_from_picks, masked_rows, row_of, step_active
from lofi.threads import single_threaded


def scope_select(features: torch.Tensor, valid: torch.Tensor, n_keep: int | Sequence[int] | torch.Tensor,
                 cls_attention: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """SCOPE: greedily keep the token of largest ``gain_j = a_j^alpha * sum_{i valid} max(0, S_ij - m_i)``.

    ``S_ij = cos(x_i, x_j)`` of ``features`` [B, P, d] (the reference: vision-tower layer -2 patch states);
    ``a`` = ``cls_attention`` [B, P] ([CLS] -> patch attention of tower layer -2, summed over heads in the
    reference; any positive per-sample scale selects the same tokens); ``m_i = max(0, max_{s picked} S_si)``
    is token i's current coverage (0 before the first pick). That is the marginal gain of the facility-location
    function ``f(A) = sum_i max(0, max_{s in A} S_is)`` times the saliency ``a_j^alpha`` (reference default
    ``alpha = 1``; ``COMBINED=multi``). Picked and padding tokens never compete; ties go to the lowest index.
    Returns ``kept`` [B, max(n_keep)] (sorted, -1 padded).
    """
    n_keep, _ = batch_sizes(valid, n_keep)
    similarity = cosine(features, valid)
    weight = masked_rows(cls_attention, valid, "cls_attention") ** alpha
    batch, p = valid.shape
    steps = int(n_keep.max())
    active = step_active(n_keep, steps, similarity.device)
    coverage = similarity.new_zeros(batch, p)
    closed = ~valid
    picks = torch.zeros(batch, steps, dtype=torch.long, device=similarity.device)
    with single_threaded(similarity.device):
        for t in range(steps):
            gains = (similarity - coverage[:, :, None]).clamp_min(0).sum(1) * weight
            j = gains.masked_fill(closed, float("-inf")).argmax(1)
            picks[:, t] = j
            closed = closed.scatter(1, j[:, None], True)
            coverage = torch.where(active[:, t:t + 1], torch.maximum(coverage, row_of(similarity, j)), coverage)
    return kept_from_picks(picks, active)
