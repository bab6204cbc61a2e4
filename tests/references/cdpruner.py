"""CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967): greedy MAP inference of a conditional DPP.

Transcribed from Theia-4869/CDPruner at 9541616c40fcd5625de1cdb8ea6c33c129eb7864,
llava/model/llava_arch.py:140-187 (``encode_images``):

- similarity  S_ij = cos(x_i, x_j) over the projector outputs x (lines 150-153);
- relevance   r_i = mean_t(-cos(v_i, t_t)) over the instruction embeddings t (the CLIP text tower's
  ``text_embeds``, one per 77-token segment) and the visual tokens v in the same space (CLIP layer -2 patch
  states -> post_layernorm -> visual_projection, clip_encoder.py:93-95), then
  r <- (r - min r + 1e-6) / (max r - min r) over the sample's tokens (lines 155-160). The minus sign is the
  reference code's (its repository's issues #14, #19 and #22 ask about it; the authors answer that they observed
  the inversion only with CLIP); ``negate_relevance=False`` drops it;
- optional trade-off (commented out in the reference, lines 163-166): r <- exp(theta / (2 (1 - theta)) r);
- kernel      L = diag(r) S diag(r) (line 167);
- greedy MAP  (lines 169-183, Chen et al. 2018's fast greedy algorithm): pick the token with the largest
  conditional variance d_j^2 = L_jj - L_{j,Y} L_{Y,Y}^{-1} L_{Y,j} given the picked set Y, n_keep times, then
  sort the picks.

Here d_j^2 is computed from its definition rather than by the reference's incremental Cholesky rows, so that
the reference checks that algorithm instead of repeating it. Since L = diag(r) S diag(r),
d_j^2 = r_j^2 (S_jj - S_{j,Y} S_{Y,Y}^{-1} S_{Y,j}): the solve runs on S, whose conditioning does not suffer
from relevances near the 1e-6 floor.
"""

import numpy as np

from ._common import checked_budget, cosine_matrix, float64, sorted_indices

# A token whose similarity-space conditional variance (1 for a token orthogonal to the picks, 0 for one in their
# span) is below this is in the picks' span up to rounding: the kernel's rank (at most the feature width) is
# exhausted and the greedy order is no longer defined (the reference code divides by sqrt of a value <= 0).
RANK_EXHAUSTED = 1e-10


def cdpruner_relevance(relevance_embeds: np.ndarray, instruction_embeds: np.ndarray,
                       negate_relevance: bool = True) -> np.ndarray:
    """Min-max normalised instruction relevance of each visual token, [P] (before the optional exp)."""
    sign = -1.0 if negate_relevance else 1.0
    relevance = (sign * cosine_matrix(relevance_embeds, instruction_embeds)).mean(axis=1)
    spread = relevance.max() - relevance.min()
    if spread == 0:
        raise ValueError("the relevance is the same for every visual token: the reference's min-max divides by 0")
    return (relevance - relevance.min() + 1e-6) / spread


def cdpruner_reference(features, n_keep, relevance_embeds=None, instruction_embeds=None, *, theta=None,
                       negate_relevance=True) -> np.ndarray:
    """Sorted indices of the n_keep visual tokens CDPruner keeps.

    features [P, d]: the states the similarity is computed on (reference: projector outputs).
    relevance_embeds [P, c]: the visual tokens in the instruction's embedding space.
    instruction_embeds [T, c]: the instruction's embeddings (only real rows; relevance averages over them).
    theta: None for the reference default (L = diag(r) S diag(r)); in (0, 1) for r <- exp(theta/(2(1-theta)) r).
    relevance_embeds and instruction_embeds both None: no relevance term (r = 1, L = S; not in the reference,
    the ablation of its relevance).
    """
    x = float64(features, "features", 2)
    n_tokens = len(x)
    n_keep = checked_budget(n_keep, n_tokens)
    if (relevance_embeds is None) != (instruction_embeds is None):
        raise ValueError("give relevance_embeds and instruction_embeds together, or neither (no relevance)")
    if relevance_embeds is None:
        relevance = np.ones(n_tokens)
    else:
        v = float64(relevance_embeds, "relevance_embeds", 2)
        t = float64(instruction_embeds, "instruction_embeds", 2)
        if len(v) != n_tokens:
            raise ValueError(f"relevance_embeds has {len(v)} rows, features {n_tokens}: one row per visual token")
        relevance = cdpruner_relevance(v, t, negate_relevance)
    if theta is not None:
        if not 0 < theta < 1:
            raise ValueError(f"theta must lie in (0, 1) or be None, got {theta}")
        relevance = np.exp(theta / (2 * (1 - theta)) * relevance)
    similarity = cosine_matrix(x, x)
    if relevance_embeds is None:
        # every L_jj = 1: the first pick is a tie, to go to the lowest index rather than to the rounding of |x_j|^2
        np.fill_diagonal(similarity, 1.0)

    picked: list[int] = []
    for _ in range(n_keep):
        if picked:
            cross = similarity[picked]  # S_{Y, all}
            explained = (cross * np.linalg.solve(similarity[np.ix_(picked, picked)], cross)).sum(axis=0)
            novelty = np.diag(similarity) - explained
        else:
            novelty = np.diag(similarity).copy()
        variance = relevance ** 2 * novelty  # d_j^2 = L_jj - L_{j,Y} L_{Y,Y}^{-1} L_{Y,j}
        variance[picked] = -np.inf
        best = int(np.argmax(variance))
        if novelty[best] <= RANK_EXHAUSTED:
            raise ValueError(f"the kernel's rank is exhausted after {len(picked)} picks (n_keep={n_keep}): "
                             "use features with more independent directions than n_keep")
        picked.append(best)
    return sorted_indices(picked)
