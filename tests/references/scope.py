"""SCOPE (Deng et al., NeurIPS 2025, arXiv 2510.24214): saliency-weighted greedy coverage.

Transcribed from kinredon/SCOPE at 6bf73069e0d61307051cfda8e25925bc7b7afdd9, scope/clip_encoder.py:140-199
(``SCOPE``), called from ``CLIPVisionTower_SCOPE.forward`` (lines 101-138) on the CLIP layer -2 patch states
and the [CLS] row of layer -2's attention summed over heads:

- S = cos(x_i, x_j) over the patch states (lines 152-153);
- coverage of a selected set Y: f(Y) = sum_i max(0, max_{s in Y} S_is) (``cur_max`` starts at 0, line 162);
- each step picks argmax_j over unselected j of
  gain_j = sum_i max(0, S_ij - m_i) * a_j ** alpha, with m_i = max_{s in Y} S_is (0 while Y is empty) and a the
  [CLS] attention (lines 171-197, ``COMBINED='multi'``, the default; ``alpha`` from ``ALPHA``, 1.0 in the
  repository's run scripts);
- the kept tokens are used in their original order (the boolean mask at line 133).
"""

import numpy as np

from ._common import checked_budget, cosine_matrix, float64, sorted_indices


def scope_reference(features, n_keep, cls_attention, *, alpha=1.0) -> np.ndarray:
    """Sorted indices of the n_keep visual tokens SCOPE keeps.

    features [P, d]: vision-tower layer -2 patch states. cls_attention [P]: [CLS] -> patch attention (> 0).
    """
    x = float64(features, "features", 2)
    n_keep = checked_budget(n_keep, len(x))
    saliency = float64(cls_attention, "cls_attention", 1)
    if saliency.shape != (len(x),) or (saliency < 0).any():
        raise ValueError(f"cls_attention must hold {len(x)} non-negative values, one per visual token")
    similarity = cosine_matrix(x, x)
    weight = saliency ** alpha

    covered = np.zeros(len(x))  # m_i: how well token i is already represented
    picked: list[int] = []
    for _ in range(n_keep):
        gain = np.maximum(0.0, similarity - covered[:, None]).sum(axis=0) * weight
        gain[picked] = -np.inf
        best = int(np.argmax(gain))
        picked.append(best)
        covered = np.maximum(covered, similarity[:, best])
    return sorted_indices(picked)
