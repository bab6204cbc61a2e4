"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): greedy max-min diversity.

Transcribed from vbdi/divprune at 799e2d950aa01ba7860907f5a6d86061f885dca6, LLaVA/llava/model/llava_arch.py:152-171
(``DivPrune``), applied at lines 365-385 to the projector outputs of the visual tokens:

- D = 1 - cos(x_i, x_j) (line 155);
- first pick: argmax_j of the second smallest value of column j of D, the smallest being D_jj ~ 0, i.e. the
  token farthest from its nearest neighbour (line 165);
- each later pick: argmax_j min_{s in Y} D_sj (lines 162, 167, 169);
- the picks are sorted back into their original order (line 379).

One deviation: the reference does not exclude already picked tokens from the later argmax. A picked token
scores D_ss ~ 0, so it can win again only when every unpicked token is an exact duplicate of a picked one;
here picked tokens are excluded, so the result always holds n_keep distinct tokens.
"""

import numpy as np

from ._common import checked_budget, cosine_matrix, float64, sorted_indices


def divprune_reference(features, n_keep) -> np.ndarray:
    """Sorted indices of the n_keep visual tokens DivPrune keeps. features [P, d]: projector outputs."""
    x = float64(features, "features", 2)
    n_keep = checked_budget(n_keep, len(x))
    distance = 1.0 - cosine_matrix(x, x)
    if len(x) == 1:
        return sorted_indices([0])

    picked = [int(np.argmax(np.sort(distance, axis=0)[1]))]
    while len(picked) < n_keep:
        score = distance[picked].min(axis=0)
        score[picked] = -np.inf
        picked.append(int(np.argmax(score)))
    return sorted_indices(picked)
