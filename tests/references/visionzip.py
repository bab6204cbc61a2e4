"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant tokens plus merged contextual tokens.

Transcribed from dvlab-research/VisionZip at 3151f6df4fca36a4cd1c985e5956e725b1f9ad02,
visionzip/clip_encoder.py:42-85 (``CLIPVisionTower_VisionZip.forward``), on CLIP layer -2: its hidden states,
the [CLS] row of its attention summed over heads, and its key states averaged over heads (``metric``,
utils.py:89, kept for layer index 22 of 24 by ``apply_info``, utils.py:191):

- dominant: the [CLS] token plus the ``dominant - 1`` patches of largest [CLS] attention (lines 50-57); here
  ``n_keep`` counts the dominant PATCHES only (the reference's ``dominant - 1``), [CLS] is the caller's;
- the remaining R patches, in their original order (the mask at line 56), are split by a uniform stride
  step = max(1, R // n_contextual): targets are the remaining tokens at positions 0, step, 2 step, ... (the
  first n_contextual of them), the others are merged (lines 67-71);
- each merged token goes to the target whose unit-norm key is most similar to its own (dot product, lines
  64, 72-74);
- contextual token k = state of target k + mean of the states merged into it (0 if none) (lines 75-80);
- the output is [CLS], the dominant patches in original order, then the contextual tokens in target order
  (lines 57, 83).
"""

from typing import NamedTuple

import numpy as np

from ._common import checked_budget, float64, sorted_indices, unit_rows


class VisionZipReference(NamedTuple):
    """kept [n_keep]: dominant patch indices, sorted. contextual [n_contextual]: each merged slot's target
    token, increasing. merged [n_contextual, d]: the contextual states. assignment [P]: the slot each token
    went to (targets included), -1 for dominant tokens."""
    kept: np.ndarray
    merged: np.ndarray
    assignment: np.ndarray
    contextual: np.ndarray


def visionzip_reference(features, n_keep, cls_attention, keys, n_contextual) -> VisionZipReference:
    """VisionZip's dominant patches and contextual tokens for one image (tile).

    features [P, d]: the states kept and merged (tower layer -2 patch states). cls_attention [P]: [CLS] -> patch
    attention. keys [P, dk]: layer -2 keys averaged over heads. n_keep: dominant patches. n_contextual: merged
    tokens, at most P - n_keep.
    """
    x = float64(features, "features", 2)
    n_tokens = len(x)
    n_keep = checked_budget(n_keep, n_tokens)
    attention = float64(cls_attention, "cls_attention", 1)
    k = float64(keys, "keys", 2)
    if attention.shape != (n_tokens,) or len(k) != n_tokens:
        raise ValueError(f"cls_attention and keys must have one row per visual token ({n_tokens})")
    n_contextual = int(n_contextual)
    if not 0 <= n_contextual <= n_tokens - n_keep:
        raise ValueError(f"n_contextual must lie in [0, {n_tokens - n_keep}] (tokens left after n_keep dominant "
                         f"ones), got {n_contextual}")

    dominant = np.argsort(-attention, kind="stable")[:n_keep]
    assignment = np.full(n_tokens, -1, dtype=np.int64)
    if n_contextual == 0:
        return VisionZipReference(sorted_indices(dominant), np.zeros((0, x.shape[1])), assignment,
                                  np.zeros(0, dtype=np.int64))

    remaining = np.setdiff1d(np.arange(n_tokens), dominant)  # increasing, as the reference's mask keeps them
    step = max(1, len(remaining) // n_contextual)
    is_target = np.zeros(len(remaining), dtype=bool)
    is_target[np.arange(0, len(remaining), step)[:n_contextual]] = True
    targets, merged_away = remaining[is_target], remaining[~is_target]

    unit_keys = unit_rows(k)
    slot_of = np.argmax(unit_keys[merged_away] @ unit_keys[targets].T, axis=1)
    assignment[targets] = np.arange(n_contextual)
    assignment[merged_away] = slot_of
    merged = x[targets].copy()
    for slot in range(n_contextual):
        members = merged_away[slot_of == slot]
        if len(members):
            merged[slot] += x[members].mean(axis=0)
    return VisionZipReference(sorted_indices(dominant), merged, assignment, targets.astype(np.int64))
