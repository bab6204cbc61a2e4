"""VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818): important tokens, then diverse ones.

Transcribed from Theia-4869/VisPruner at aefa01adc7c7ce6334e880c88225e90cede760d1, llava/model/llava_arch.py:141-186
(``encode_images``), on CLIP layer -2 patch states and the [CLS] row of layer -2's attention averaged over heads
(clip_encoder.py:36-52, llava_arch.py:154):

- n_important = int(n_keep * important_ratio), n_diverse = n_keep - n_important (lines 148-151);
- the tokens in decreasing [CLS] attention; the first n_important are kept, the rest form the residual list,
  in that order (lines 154-157);
- while the residual list is longer than n_diverse: r = min(8, R - n_diverse); split the list by position
  into a = even positions, b = odd positions; score each a token by its largest cosine similarity to any b
  token; drop the r highest-scoring a tokens; the new list is the surviving a tokens in decreasing score,
  then b in its order (lines 161-176);
- important and residual tokens are kept in their original order (the mask at lines 182-183).

The reference indexes with shapes that only hold when R is even and r <= R // 2: an odd R, which
int(n_keep * important_ratio) can give, raises a shape error there. Here a holds the ceil(R / 2) even positions
and loses min(r, len(a)) tokens, the rule the reference follows wherever it runs.
"""

import numpy as np

from ._common import checked_budget, float64, sorted_indices, unit_rows

DROPS_PER_ROUND = 8  # the reference's ``r = min(8, R - diverse_token_num)``


def vispruner_reference(features, n_keep, cls_attention, *, important_ratio=0.5) -> np.ndarray:
    """Sorted indices of the n_keep visual tokens VisPruner keeps.

    features [P, d]: tower layer -2 patch states. cls_attention [P]: [CLS] -> patch attention.
    important_ratio: share of n_keep taken by attention (0.5 in the reference's evaluation scripts).
    """
    x = float64(features, "features", 2)
    n_keep = checked_budget(n_keep, len(x))
    attention = float64(cls_attention, "cls_attention", 1)
    if attention.shape != (len(x),):
        raise ValueError(f"cls_attention must hold one value per visual token ({len(x)})")
    if not 0 <= important_ratio <= 1:
        raise ValueError(f"important_ratio must lie in [0, 1], got {important_ratio}")
    n_important = int(n_keep * important_ratio)
    n_diverse = n_keep - n_important

    by_attention = np.argsort(-attention, kind="stable")
    important, residual = by_attention[:n_important], by_attention[n_important:]
    unit = unit_rows(x)
    while n_diverse > 0 and len(residual) > n_diverse:
        drop = min(DROPS_PER_ROUND, len(residual) - n_diverse)
        a, b = residual[0::2], residual[1::2]
        duplication = (unit[a] @ unit[b].T).max(axis=1)
        residual = np.concatenate([a[np.argsort(-duplication, kind="stable")[drop:]], b])
    return sorted_indices(np.concatenate([important, residual]) if n_diverse > 0 else important)
