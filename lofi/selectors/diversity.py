"""DivPrune's selection: greedy max-min diversity (farthest-point sampling under cosine distance), batched.

Follows vbdi/divprune at 799e2d950aa01ba7860907f5a6d86061f885dca6, ``LLaVA/llava/model/llava_arch.py``
(``pairwise_cosine_similarity`` and ``DivPrune``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from lofi.selectors._batch import batch_sizes, cosine, kept_from_picks, row_of, step_active
from lofi.threads import single_threaded


def divprune_select(features: torch.Tensor, valid: torch.Tensor,
                    n_keep: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """DivPrune: the greedy solution of the max-min diversity problem under ``D_ij = 1 - cos(x_i, x_j)``.

    ``features`` [B, P, d]: the reference's projector outputs (the LLM's input embeddings of the visual tokens).
    First pick ``argmax_j`` of the second smallest ``D_ij`` over valid i (self included, so for distinct tokens
    the distance to the nearest other token); then, while fewer than ``n_keep[b]`` are picked,
    ``argmax_j min_{s picked} D_sj`` over unpicked valid j. Ties go to the lowest index.
    Returns ``kept`` [B, max(n_keep)] (sorted, -1 padded).
    """
    n_keep, _ = batch_sizes(valid, n_keep)
    distance = 1.0 - cosine(features, valid)
    batch, p = valid.shape
    steps = int(n_keep.max())
    active = step_active(n_keep, steps, distance.device)
    padded = distance.masked_fill(~valid[:, :, None], float("inf"))
    nearest = padded.topk(min(2, p), dim=1, largest=False).values[:, -1, :]
    closed = ~valid
    picks = torch.zeros(batch, steps, dtype=torch.long, device=distance.device)
    picks[:, 0] = nearest.masked_fill(closed, float("-inf")).argmax(1)
    closed = closed.scatter(1, picks[:, :1], True)
    spread = row_of(distance, picks[:, 0])
    with single_threaded(distance.device):
        for t in range(1, steps):
            j = spread.masked_fill(closed, float("-inf")).argmax(1)
            picks[:, t] = j
            closed = closed.scatter(1, j[:, None], True)
            spread = torch.minimum(spread, row_of(distance, j))
    return kept_from_picks(picks, active)
