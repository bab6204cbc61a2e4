"""Singular values, energy ranks and leverage scores of token matrices (rows = tokens).

Owned here because the ``lofi`` method needs them and ``lofi`` never imports ``analysis``;
``analysis.spectral`` re-exports them with the rest of the spectral quantities. Every function
works on float32/float64 tensors batched over leading dimensions, and on bfloat16/float16 rows (a
model's hidden states), which it decomposes in float32 (``gram``). When rows < cols the Gram matrix
H H^T (rows x rows) gives the same singular values and left singular vectors more cheaply.

Every symmetric eigendecomposition goes through ``symmetric_eigh``, which takes one of two routes on a
GPU (``EIGH_ROUTES``; CPU tensors always take torch's): ``"torch"`` (default), ``torch.linalg.eigh``,
which decomposes a batch of matrices larger than 32 x 32 one at a time; ``"cusolver-batched"``, one
cuSOLVER call for the whole batch (``lofi.cusolver``). Choose with ``LOFI_EIGH=cusolver-batched`` in the
environment or ``with lofi.linalg.eigh_route("cusolver-batched"):``. On the CPU each decomposition runs
on the threads ``lofi.threads.decomposition_threads`` gives it (one, up to 2,048 rows), so that a busy
machine cannot make it many times slower.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch

from lofi.projector import energy_projector
from lofi.threads import decomposition_threads

EIGH_ROUTES = ("torch", "cusolver-batched")
_ROUTE: ContextVar[str | None] = ContextVar("lofi_eigh_route", default=None)


def _checked_route(route: str, source: str) -> str:
    if route not in EIGH_ROUTES:
        raise ValueError(f"unknown eigh route {route!r} ({source}); valid: {list(EIGH_ROUTES)}")
    return route


def current_eigh_route() -> str:
    """The route ``symmetric_eigh`` takes on a GPU: the innermost ``eigh_route`` block's, else
    ``LOFI_EIGH``'s, else ``"torch"``."""
    route = _ROUTE.get()
    return route if route is not None else _checked_route(os.environ.get("LOFI_EIGH", "torch"), "LOFI_EIGH")


@contextmanager
def eigh_route(route: str) -> Iterator[None]:
    """Within the block, ``symmetric_eigh`` takes ``route`` (one of ``EIGH_ROUTES``) on a GPU."""
    token = _ROUTE.set(_checked_route(route, "eigh_route"))
    try:
        yield
    finally:
        _ROUTE.reset(token)


def _batched_solver(G: torch.Tensor):
    """cuSOLVER's batched solver where the route asks for it and ``G`` is on a GPU, else None (also where
    a gradient is wanted: the batched call has no backward)."""
    if current_eigh_route() != "cusolver-batched" or (G.requires_grad and torch.is_grad_enabled()):
        return None
    return _device_solver(G)


def _device_solver(G: torch.Tensor):
    if not G.is_cuda:
        return None
    from lofi import cusolver
    return cusolver.solver_for(G.device, G.dtype)


def symmetric_eigh(G: torch.Tensor, vectors: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(eigenvalues ascending [..., n], eigenvectors [..., n, n] or None) of the symmetric G [..., n, n],
    read from its lower triangle, as ``torch.linalg.eigh`` / ``eigvalsh``; on a GPU through the current
    route (``current_eigh_route``)."""
    solver = _batched_solver(G)
    if solver is not None:
        return solver(G, vectors)
    with decomposition_threads(G.shape[-1], G.device):
        return tuple(torch.linalg.eigh(G)) if vectors else (torch.linalg.eigvalsh(G), None)


_LOW_PRECISION = (torch.bfloat16, torch.float16)
_HAS_OUT_DTYPE = [True]  # False once bmm's out_dtype has been refused (torch before 2.8, or no such kernel)


def gram(M: torch.Tensor) -> torch.Tensor:
    """M M^T [..., rows, rows]: float32, or float64 for float64 M.

    On CUDA, bfloat16 / float16 rows (a model's hidden states) go through one tensor-core GEMM with a
    float32 output (``torch.bmm(..., out_dtype=torch.float32)``). Every product of two such numbers is
    exact in float32 and the sums run in float32, as they do when the rows are cast to float32 first, but
    the cast route multiplies on the GPU's float32 units. At LLaVA-1.5-7B shape those run about 15x
    slower (H200 peaks: 67 against 989 TFLOPS), and the capture computes a batch-8 Gram matrix of 606 x 4096
    rows at each of 33 layers: 0.8 TFLOP a forward pass. Elsewhere the rows are cast to float32 first.
    """
    if M.is_cuda and M.dtype in _LOW_PRECISION and _HAS_OUT_DTYPE[0]:
        flat = M.reshape(-1, *M.shape[-2:])
        try:
            return torch.bmm(flat, flat.mT, out_dtype=torch.float32).reshape(*M.shape[:-1], M.shape[-2])
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # a torch before bmm's out_dtype (2.8), or a GPU without the kernel
            _HAS_OUT_DTYPE[0] = False
    M = _floating(M)
    return M @ M.transpose(-1, -2)


def _floating(H: torch.Tensor) -> torch.Tensor:
    return H if H.dtype in (torch.float32, torch.float64) else H.float()


def _left_factors(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, U) of H = U S V^T: s [..., r] descending, U [..., rows, r], r = min(rows, cols).

    Both routes decompose the smaller Gram matrix (an SVD of a tall H costs 2.7x the eigendecomposition
    of H^T H on 2 CPU cores at 3,699 x 3,584, LLaVA-OneVision-7B's visual tokens). Rows < cols: the
    eigenvectors of H H^T are U. Rows > cols: those of H^T H are V, and u_j = H v_j / ||H v_j||; directions
    beyond the numerical rank are then as arbitrary as an SVD's null-space basis (see ``leverage_scores``).
    """
    rows, cols = H.shape[-2:]
    if rows <= cols:
        # eigh of the Gram matrix: eigenvalues are s^2 (ascending), eigenvectors are U.
        evals, evecs = symmetric_eigh(gram(H))
        return evals.flip(-1).clamp_min(0).sqrt(), evecs.flip(-1)
    H = _floating(H)
    evals, V = symmetric_eigh(H.transpose(-1, -2) @ H)
    U = H @ V.flip(-1)
    return evals.flip(-1).clamp_min(0).sqrt(), U / U.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(H.dtype).tiny)


def singular_values(H: torch.Tensor) -> torch.Tensor:
    """s_1 >= ... >= s_r of H [..., rows, cols], r = min(rows, cols).

    When rows < cols they come from the eigenvalues of H H^T, which squares the condition number:
    singular values below about sqrt(eps) * s_1 (1e-8 s_1 in float64, 3e-4 s_1 in float32) read as
    that noise level instead of their true value. Energy-based quantities (IPR, PR, energy rank) are
    unaffected, since such directions carry a fraction eps of the energy.
    """
    rows, cols = H.shape[-2:]
    if rows < cols:
        return singular_values_from_gram(gram(H))
    with decomposition_threads(cols, H.device):
        return torch.linalg.svdvals(_floating(H))


def singular_values_from_gram(G: torch.Tensor) -> torch.Tensor:
    """s_1 >= ... >= s_n of H from its Gram matrix G = H H^T [..., n, n]: s_i = sqrt(max(lambda_i, 0))."""
    return symmetric_eigh(G, vectors=False)[0].flip(-1).clamp_min(0).sqrt()


def energy_rank(s: torch.Tensor, tau: float) -> torch.Tensor:
    """Smallest k with sum_{i<=k} p_i >= tau, p_i = s_i^2 / sum_j s_j^2 (0 for an all-zero s).

    A tiny relative tolerance keeps tau = 1 from asking for directions that hold only rounding error.
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    energy = s.pow(2)
    total = energy.sum(-1, keepdim=True)
    cumulative = energy.cumsum(-1) / total.clamp_min(torch.finfo(s.dtype).tiny)
    reached = cumulative >= tau - 1e-6 * max(tau, 1e-3)
    k = (~reached).sum(-1) + 1
    return torch.where(total.squeeze(-1) > 0, k.clamp_max(s.shape[-1]), torch.zeros_like(k))


def leverage_scores(H: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """l_i = sum_{j<=k} U_ij^2 for each row i of H = U S V^T; sum_i l_i = k, 0 <= l_i <= 1.

    ``k`` is an int or a tensor of per-matrix ranks broadcast over the leading dimensions, at most
    r = min(rows, cols). Beyond the numerical rank the singular vectors are an arbitrary basis of the
    null space, so callers should choose k within it (``energy_rank`` always does); k = 0 gives zeros.
    """
    _, U = _left_factors(H)
    r = U.shape[-1]
    k = torch.as_tensor(k, device=H.device)
    columns = torch.arange(r, device=H.device)
    take = (columns < k[..., None]).to(U.dtype)  # [..., r]
    return (U.pow(2) * take[..., None, :]).sum(-1)


def leverage_at_energy(H: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(leverage scores [..., rows], rank k [...]) with k = ``energy_rank(s, tau)``, from ONE decomposition.

    Equal to ``leverage_scores(H, energy_rank(singular_values(H), tau))`` at half the cost: the
    eigen-decomposition that gives the vectors also gives the singular values.
    """
    s, U = _left_factors(H)
    k = energy_rank(s, tau)
    take = (torch.arange(U.shape[-1], device=H.device) < k[..., None]).to(U.dtype)
    return (U.pow(2) * take[..., None, :]).sum(-1), k


ORTHONORMALIZATIONS = ("auto", "householder", "cholesky")


def orthonormal_columns(Y: torch.Tensor, method: str = "householder") -> tuple[torch.Tensor, torch.Tensor]:
    """(Q [..., n, w] with orthonormal columns spanning those of Y [..., n, w], ok [...]).

    ``"householder"``: ``torch.linalg.qr`` (``ok`` everywhere). On a GPU torch runs it once per matrix for
    matrices of more than 256 rows, a pair of cuSOLVER calls each (geqrf, orgqr).
    ``"cholesky"``: shifted CholeskyQR3 in float64 (Fukaya et al. 2020). Each pass is one Cholesky factor
    (batched cuSOLVER on a GPU) and one triangular solve (batched cuBLAS from 9 matrices on). The first
    pass factors Y^T Y + s I with s = 11 (n w + w (w + 1)) u ||Y||_F^2, which keeps it stable up to
    cond(Y) ~ 1/u; two plain passes (Q = Q R^-1, R = chol(Q^T Q)) then make Q orthonormal to working
    precision. A randomized block on a concentrated spectrum needs that range: its trailing columns are
    noise, cond(Y) ~ 1e8 on 12-rank test matrices. ``ok`` is False where a factor failed or Q^T Q is more
    than 1e-6 from the identity (Y numerically rank-deficient), so a caller can fall back.
    """
    if method == "householder":
        with decomposition_threads(Y.shape[-1], Y.device):
            Q = torch.linalg.qr(Y).Q
        return Q, torch.ones(Y.shape[:-2], dtype=torch.bool, device=Y.device)
    if method != "cholesky":
        raise ValueError(f"unknown orthonormalization {method!r}; valid: {list(ORTHONORMALIZATIONS[1:])}")
    Q = Y.double()
    rows, width = Q.shape[-2:]
    ok = torch.ones(Y.shape[:-2], dtype=torch.bool, device=Y.device)
    identity = torch.eye(width, dtype=Q.dtype, device=Q.device)
    unit = torch.finfo(Q.dtype).eps / 2
    shift = 11 * (rows * width + width * (width + 1)) * unit * Q.pow(2).sum((-2, -1))
    for step in range(3):
        gram_q = Q.transpose(-1, -2) @ Q
        if step == 0:
            gram_q = gram_q + shift[..., None, None] * identity
        R, info = torch.linalg.cholesky_ex(gram_q, upper=True)
        ok = ok & (info == 0)
        R = torch.where(ok[..., None, None], R, identity)  # a failed factor: anything finite; ok says so
        Q = torch.linalg.solve_triangular(R, Q, upper=True, left=False)
    ok = ok & ((Q.transpose(-1, -2) @ Q - identity).abs().amax((-2, -1)) <= 1e-6)
    return Q.to(Y.dtype), ok


# Rows up to which the products route is preferred on a GPU. Its products (63 calls, the work of 89 n x n
# products: 178 n^3 flops a matrix) take at an H200's FP32 peak (67 TFLOPS) at least 0.5 ms at n = 576,
# where torch's eigh took about 6 ms a matrix (94 ms for 16), but at least 134 ms at n = 3,699
# (LLaVA-OneVision's visual tokens), where eigh took about 92 ms (734 ms for 8).
PRODUCTS_UP_TO = 2048


def leverage_at_energy_products(H: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``leverage_at_energy`` from batched matrix products: the diagonal of the projector on G = H H^T's
    top-k eigenvectors, reached by trace-correcting purification (``lofi.projector``: 63 batched products,
    the work of 89 products of n x n matrices, and no eigendecomposition). Matrices the purification flags
    take the exact route (it did not converge in float32: two eigenvalues too close at the threshold, or the
    k-th eigenvalue is needed almost whole, so that rank k - 1 converges too slowly to be checked); that
    check is the one host read. Rows > cols: G is still H H^T (rows x rows), whose extra eigenvalues are 0."""
    G = gram(H)
    found = energy_projector(G, tau)
    leverage, k = found.diagonal(), found.k
    if not bool(found.ok.all()):
        redo = ~found.ok
        leverage[redo], k[redo] = leverage_at_energy(H[redo], tau)
    return leverage, k


def leverage_at_energy_randomized(H: torch.Tensor, tau: float, block: int = 32, oversample: int = 16,
                                  iterations: int = 2, seed: int = 0, orthonormalize: str = "auto",
                                  fallback=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``leverage_at_energy`` from a few matrix products on a thin block, where the energy sits in few
    directions; ``fallback`` where it does not.

    Randomized subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4) on the Gram matrix
    G = H H^T: Q spans G^q Omega for a seeded Gaussian Omega of ``width + oversample`` columns,
    re-orthonormalised after every product. On the Rayleigh matrix B = Q^T G Q, trace-correcting
    purification (``lofi.projector``) finds the projector P_B on B's top eigenvectors that hold ``tau`` of
    tr(G); the leverage scores are the diagonal of Q P_B Q^T. Ritz values never exceed the eigenvalues
    they approximate, so the rank read from them is >= the true k. ``width`` is twice the participation
    ratio tr(G)^2 / ||G||_F^2 (the effective number of directions, read without a decomposition), at
    least ``block``. One attempt: if its projector holds ``tau`` of tr(G) in every sample, its leverage
    scores are returned; otherwise, or when the block would cover half the rows, ``fallback`` (default:
    ``leverage_at_energy_products`` on a GPU up to ``PRODUCTS_UP_TO`` rows, ``leverage_at_energy``
    elsewhere; the width and this check are two host syncs). On the bundled model's layer-2 states
    (k = 7-8) it agrees with the exact route on every kept token (``benchmarks/lofi_solver.py``).
    ``orthonormalize``: how (``orthonormal_columns``); ``"auto"``: ``"cholesky"`` on a GPU, where torch's
    QR of the 576-row blocks runs per matrix, ``"householder"`` elsewhere. A sample whose block is
    degenerate takes the fallback too.
    """
    if orthonormalize not in ORTHONORMALIZATIONS:
        raise ValueError(f"unknown orthonormalization {orthonormalize!r}; valid: {list(ORTHONORMALIZATIONS)}")
    if fallback is None:
        products = H.is_cuda and H.shape[-2] <= PRODUCTS_UP_TO
        fallback = leverage_at_energy_products if products else leverage_at_energy
    G = gram(H)
    n = G.shape[-1]
    total = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    ratio = (total.pow(2) / G.pow(2).sum((-2, -1)).clamp_min(torch.finfo(G.dtype).tiny)).max()
    width = max(block, int(2 * float(ratio))) + oversample
    if width >= n // 2:
        return fallback(H, tau)
    method = orthonormalize if orthonormalize != "auto" else ("cholesky" if G.is_cuda else "householder")
    omega = torch.randn(n, width, generator=torch.Generator(device=H.device).manual_seed(seed), device=H.device,
                        dtype=G.dtype)
    Q, ok = orthonormal_columns(G @ omega, method)
    for _ in range(iterations):
        Q, ok_here = orthonormal_columns(G @ Q, method)
        ok = ok & ok_here
    found = energy_projector(Q.transpose(-1, -2) @ G @ Q, tau, total=total)
    if not bool((found.ok & ok).all()):
        return fallback(H, tau)  # the energy is spread (or the block degenerate)
    return ((Q @ found.P) * Q).sum(-1).clamp(0, 1), found.k
