"""Spectral projectors of symmetric positive semi-definite matrices from matrix products alone.

LoFi's leverage scores are the diagonal of P_k, the orthogonal projector on the top-k eigenvectors of the
Gram matrix G = H H^T, with k the energy rank (the smallest k whose eigenvalues hold a fraction tau of
tr(G)). An eigendecomposition gives P_k, but on a GPU torch decomposes a batch of matrices larger than
32 x 32 one at a time (about 6 ms each at 576 x 576 on an H200), while a batched product of the same
matrices costs about a tenth of a millisecond. This module reaches P_k through products only, in a fixed
number of batched steps that never read the device.

Trace-correcting purification (SP2: Niklasson, Phys. Rev. B 66, 155115, 2002). With G scaled so that its
spectrum lies in [0, 1], each step replaces X by X^2 or by 2X - X^2. Both maps are increasing on [0, 1] and
fix 0 and 1, so X stays a function of G, and their composition pushes every eigenvalue above a threshold
to 1 and every one below it to 0; each step's choice moves the threshold (X^2 raises it, 2X - X^2 lowers
it), so choosing by a trace is a bisection that converges on where the trace asks. Two phases:

1. ``energy`` steps choose X^2 while the energy it keeps, tr(G X^2), still reaches tau tr(G): the
   threshold settles at the k-th eigenvalue, whose direction is left partly in X (the target lies
   between the energies of k - 1 and k directions), so ceil(tr X - 1e-3) estimates k.
2. ``count`` steps target a trace, the classic SP2 rule: whichever of X^2 and 2X - X^2 has the trace
   closer to it. They run side by side (one product of a 3x batch) for the estimate and its two
   neighbours; k is the smallest of them whose projector holds the target energy, and the candidate below
   it must converge short of it, so an estimate off by one still gives the exact k, and a wrong one is
   caught. On the hidden states of a random-weight LLaVA-1.5-7B (576 tokens, energy rank 367-371 of 576,
   a flat spectrum) 48 and 12 steps give the eigendecomposition's k and kept tokens on every sample;
   with 40 energy steps and the estimate alone, k was one too large on 5 samples of 8.

Every step is one batched product and a few elementwise ops, for every matrix at once; each matrix makes
its own choices (``torch.where``), so the steps never read the device. A matrix that did not converge
(two eigenvalues too close at the threshold for float32, or too few steps) is flagged by ``ok``: no
candidate converged to a projector (idempotency defect tr(X - X^2) at most ``DEFECT_TOLERANCE``) that holds
the energy, or the one below the chosen rank did not converge. Callers take another route for those.

Products run in float32 at full precision: inside these functions CUDA's TF32 matmuls are switched off,
since a 10-bit mantissa cannot separate the eigenvalues of a flat spectrum.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

ENERGY_STEPS, COUNT_STEPS = 48, 12
DEFECT_TOLERANCE = 1e-2  # tr(X - X^2): the summed distance of X's eigenvalues from {0, 1}


@dataclass
class Projector:
    """P [..., n, n] (a projector where ``ok``), its rank k [...] (long) and ok [...] (bool)."""

    P: torch.Tensor
    k: torch.Tensor
    ok: torch.Tensor

    def diagonal(self) -> torch.Tensor:
        """P's diagonal [..., n] clamped to [0, 1]: the leverage scores of the rows P projects."""
        return self.P.diagonal(dim1=-2, dim2=-1).clamp(0, 1)


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """float32 products at float32 precision on CUDA inside the block (TF32 off, restored after)."""
    if device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32:
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True


def _trace(X: torch.Tensor) -> torch.Tensor:
    return X.diagonal(dim1=-2, dim2=-1).sum(-1)


def _step(X: torch.Tensor, X2: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """X^2 where ``lower`` is False, 2X - X^2 where it is True (one fused op: X^2 + 2 lower (X - X^2))."""
    return torch.lerp(X2, X, (2 * lower.to(X.dtype))[..., None, None])


def _scaled(G: torch.Tensor) -> torch.Tensor:
    """G / b with b = ||G^2||_F^(1/2) >= lambda_max (so the spectrum lies in [0, 1]); zero matrices stay 0."""
    bound = (G @ G).pow(2).sum((-2, -1)).pow(0.25)
    return G / bound.clamp_min(torch.finfo(G.dtype).tiny)[..., None, None]


def _count_steps(X: torch.Tensor, k: torch.Tensor, steps: int) -> torch.Tensor:
    target = k.to(X.dtype)
    for _ in range(steps):
        X2 = X @ X
        trace, trace2 = _trace(X), _trace(X2)
        X = _step(X, X2, (2 * trace - trace2 - target).abs() < (trace2 - target).abs())
    return X


def energy_projector(G: torch.Tensor, tau: float, total: torch.Tensor | None = None,
                     energy_steps: int = ENERGY_STEPS, count_steps: int = COUNT_STEPS) -> Projector:
    """The projector on the top-k eigenvectors of each PSD matrix in G [..., n, n] (float32 or float64),
    k the smallest rank whose eigenvalues sum to tau * ``total`` (default tr(G); a larger total, such as
    the trace of the matrix G was projected from, asks for more energy than G may hold: ``ok`` then says
    False). A zero matrix gives P = 0, k = 0."""
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    trace, n = _trace(G), G.shape[-1]
    total = trace if total is None else total
    target = (tau - 1e-6 * max(tau, 1e-3)) * total
    with full_precision(G.device):
        X = _scaled(G)
        for _ in range(energy_steps):
            X2 = X @ X
            X = _step(X, X2, (G * X2).sum((-2, -1)) < target)
        # rank candidates around the estimate, purified side by side: the smallest one whose projector
        # holds the target energy, checked against the candidate below it
        estimate = torch.ceil(_trace(X) - 1e-3).long()
        candidates = (estimate + torch.arange(-1, 2, device=G.device).view(-1, *[1] * estimate.dim())).clamp(0, n)
        P = _count_steps(X.expand(3, *X.shape), candidates, count_steps)
        converged = _trace(P - P @ P).abs() <= DEFECT_TOLERANCE
    reached = converged & ((G * P).sum((-2, -1)) >= target)
    first = (~reached).long().cumprod(0).sum(0)  # index of the first candidate that reaches the target (3: none)
    chosen = first.clamp_max(2)
    below_short = torch.where(chosen > 0, converged.gather(0, (chosen - 1).clamp_min(0)[None])[0], False)
    ok = (first > 0) & (first < 3) & below_short
    ok = torch.where(trace > 0, ok, True)
    pick = chosen.view(1, *chosen.shape, 1, 1).expand(1, *P.shape[1:])
    P = P.gather(0, pick)[0]
    k = torch.where(trace > 0, candidates.gather(0, chosen[None])[0], 0)
    return Projector(torch.where((trace > 0)[..., None, None], P, 0.0), k, ok)


def rank_projector(G: torch.Tensor, k: int | torch.Tensor, steps: int = ENERGY_STEPS + COUNT_STEPS) -> Projector:
    """The projector on the top-k eigenvectors of each PSD matrix in G [..., n, n], k fixed (an int or a
    tensor broadcast over the leading dimensions), by ``steps`` count steps."""
    k = torch.as_tensor(k, device=G.device).expand(G.shape[:-2]).long()
    with full_precision(G.device):
        X = _count_steps(_scaled(G), k, steps)
        defect = _trace(X - X @ X)
    return Projector(X, k, defect.abs() <= DEFECT_TOLERANCE)
