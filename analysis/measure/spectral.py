"""Spectral quantities of hidden-state matrices (docs/definitions.md#spectral), as pure torch functions.

H has rows = tokens of one group and columns = hidden dimensions; every function also works batched
over leading dimensions. With singular values s_1 >= ... >= s_r (r = min(rows, cols)) the energy
fractions are p_i = s_i^2 / sum_j s_j^2.

The all-zero matrix has no energy to distribute: by this module's convention its IPR, participation
ratio, effective rank and energy rank are all 0, and its leverage scores are 0 (never NaN).
``gram``, ``singular_values`` (``singular_values_from_gram``), ``energy_rank`` and ``leverage_scores`` are
the implementations ``lofi`` uses to prune, re-exported so the study measures exactly what the method computes.
"""

from __future__ import annotations

import torch

from lofi.linalg import energy_rank, gram, leverage_scores, singular_values, singular_values_from_gram

__all__ = ["gram", "singular_values", "singular_values_from_gram", "energy_fractions", "ipr", "participation_ratio",
           "effective_rank", "energy_rank", "leverage_scores", "ipr_from_matrix", "ipr_from_gram"]


def energy_fractions(s: torch.Tensor) -> torch.Tensor:
    """p_i = s_i^2 / sum_j s_j^2 over the last dimension (all zeros for an all-zero s)."""
    energy = s.pow(2)
    return energy / energy.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


def ipr(s: torch.Tensor) -> torch.Tensor:
    """Inverse participation ratio IPR = sum_i p_i^2, in [1/r, 1]; 1 = all energy in one direction.

    0 for an all-zero s (no energy), by convention.
    """
    return energy_fractions(s).pow(2).sum(-1)


def participation_ratio(s: torch.Tensor) -> torch.Tensor:
    """PR = 1 / IPR = (sum_i s_i^2)^2 / sum_i s_i^4: the effective number of directions (0 for zero s)."""
    value = ipr(s)
    return torch.where(value > 0, 1 / value.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(value))


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli (2007): exp(-sum_i q_i log q_i), q_i = s_i / sum_j s_j (0 log 0 = 0; 0 for zero s)."""
    total = s.sum(-1, keepdim=True)
    q = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -torch.where(q > 0, q * q.clamp_min(torch.finfo(s.dtype).tiny).log(), torch.zeros_like(q)).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


def ipr_from_matrix(H: torch.Tensor) -> torch.Tensor:
    """IPR of H without a decomposition: sum_i s_i^4 / (sum_i s_i^2)^2 = ||H H^T||_F^2 / ||H||_F^4.

    Exact (the singular values of H H^T are s_i^2); uses the smaller of H H^T and H^T H. 0 for zero H.
    """
    rows, cols = H.shape[-2:]
    return ipr_from_gram(gram(H) if rows <= cols else H.transpose(-1, -2) @ H)


def ipr_from_gram(G: torch.Tensor) -> torch.Tensor:
    """IPR from a Gram matrix G = H H^T (or H^T H): ||G||_F^2 / tr(G)^2 (0 for G = 0)."""
    total = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    value = G.pow(2).sum((-2, -1)) / total.pow(2).clamp_min(torch.finfo(G.dtype).tiny)
    return torch.where(total > 0, value, torch.zeros_like(value))
