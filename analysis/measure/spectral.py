"""Spectral quantities of hidden-state matrices (docs/definitions.md#spectral), as pure torch functions.

H has rows = tokens of one group and columns = hidden dimensions; every function also works batched
over leading dimensions. With singular values s_1 >= ... >= s_r (r = min(rows, cols)) the energy
fractions are p_i = s_i^2 / sum_j s_j^2.

The all-zero matrix has no energy to distribute: by this module's convention its IPR, participation
ratio, effective rank and energy rank are all 0, and its leverage scores are 0 (never NaN).
``gram``, ``singular_values`` (``singular_values_from_gram``), ``energy_rank`` and ``leverage_scores`` are
the implementations ``lofi`` uses to prune, re-exported so the study measures exactly what the method computes.

IPR and PR need no decomposition: with G = H H^T, sum_i s_i^2 = tr(G) and sum_i s_i^4 = ||G||_F^2.
``gram_moments`` / ``group_moments`` give those two numbers for several token groups of a batch of
matrices at once (a few batched products, whatever the number of groups and matrices), and
``ipr_from_moments`` turns any stack of them into IPRs in one pass.
"""

from __future__ import annotations

import torch

from lofi.linalg import energy_rank, gram, leverage_scores, singular_values, singular_values_from_gram

__all__ = ["gram", "singular_values", "singular_values_from_gram", "energy_fractions", "ipr", "participation_ratio",
           "effective_rank", "energy_rank", "leverage_scores", "ipr_from_matrix", "ipr_from_gram", "gram_moments",
           "group_moments", "ipr_from_moments", "pr_from_ipr"]


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


def gram_moments(G: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[..., g, 2]: (tr, squared Frobenius norm) of each group's block of the Gram matrices G [..., n, n].

    ``masks`` [..., g, n] is 1 where row i belongs to group g, else 0; group g's block is G on its rows and
    columns, the Gram matrix of H's rows in g. Its trace is m^T diag(G) and its squared Frobenius norm
    m^T (G o G) m, so every group of every matrix costs the same few batched products (no gather, no
    per-group or per-matrix loop). Rows outside every group may hold anything finite. Float32 products
    of a float32 G (as torch's default, without TF32) or float64 ones of a float64 G.
    """
    M = masks.to(G.dtype)
    trace = (M @ G.diagonal(dim1=-2, dim2=-1)[..., None])[..., 0]
    frob = (M @ G.square() @ M.mT).diagonal(dim1=-2, dim2=-1)
    return torch.stack((trace, frob), -1)


def group_moments(H: torch.Tensor, masks: torch.Tensor, center: bool = False) -> torch.Tensor:
    """``gram_moments`` of each group's own matrix H_g (the rows of H [..., n, d] in group g; with
    ``center``, minus their mean row), from the smaller side.

    Uncentred with n <= d it is ``gram_moments(gram(H), masks)``: one Gram matrix for every group. Otherwise
    each group's rows are formed ([..., g, n, d], float32 or float64) and its n x n or d x d Gram matrix
    taken (tr and ||.||_F of H_g H_g^T and H_g^T H_g are equal).
    """
    rows, cols = H.shape[-2:]
    if not center and rows <= cols:
        return gram_moments(gram(H), masks)
    X = H if H.dtype in (torch.float32, torch.float64) else H.float()
    weight = masks.to(X.dtype)[..., None]  # [..., g, n, 1]
    Hg = X[..., None, :, :] * weight
    if center:
        mean = Hg.sum(-2, keepdim=True) / weight.sum(-2, keepdim=True).clamp_min(1)
        Hg = (Hg - mean) * weight
    C = gram(Hg) if rows <= cols else Hg.mT @ Hg
    return torch.stack((C.diagonal(dim1=-2, dim2=-1).sum(-1), C.square().sum((-2, -1))), -1)


def ipr_from_moments(moments: torch.Tensor) -> torch.Tensor:
    """IPR = ||G||_F^2 / tr(G)^2 from moments [..., 2] (``gram_moments``); 0 where tr(G) = 0."""
    trace, frob = moments[..., 0], moments[..., 1]
    value = frob / trace.square().clamp_min(torch.finfo(moments.dtype).tiny)
    return torch.where(trace > 0, value, torch.zeros_like(value))


def pr_from_ipr(ipr_value: torch.Tensor) -> torch.Tensor:
    """PR = 1 / IPR (0 where IPR = 0: no energy)."""
    return torch.where(ipr_value > 0, 1 / ipr_value.clamp_min(torch.finfo(ipr_value.dtype).tiny),
                       torch.zeros_like(ipr_value))
