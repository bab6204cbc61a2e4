"""LoFi as specified by this project: keep the visual tokens of highest rank-k leverage at layer K.

Provenance: the LoFi paper's body (its layer, rank rule and budgets) was not available to us; only its
abstract and a summary were. The rule below -- leverage scores of the visual-token hidden states
entering layer K, with k the rank that holds a fraction tau of the spectral energy -- is this project's
specification (``docs/definitions.md#pruning``), not a reproduction of the paper's exact procedure.
"""

from __future__ import annotations

import torch

from lofi.linalg import (
    gram,
    leverage_at_energy,
    leverage_at_energy_products,
    leverage_at_energy_randomized,
    leverage_scores,
)
from lofi.projector import rank_projector
from lofi.registry import PruningMethod, StageInput, register


@register
class LoFi(PruningMethod):
    """LoFi (training-free): keep the visual tokens with the largest SVD leverage scores at layer K.

    For each sample, H_v [n_visual, d] holds the hidden states of the visual tokens entering layer K
    (uncentred unless ``center``; decomposed in float32). With H_v = U S V^T and k the energy rank at ``tau``
    (smallest k with sum_{i<=k} s_i^2 >= tau * sum s^2) or the fixed ``k``, the score of token i is
    l_i = sum_{j<=k} U_ij^2. Tokens with high leverage span directions the rest cannot represent.

    Options:
        keep: fraction of visual tokens kept.  layer: K (default 2; 0 = projector outputs).
        tau: energy threshold for k (default 0.9).  k: a fixed rank instead of tau.
        center: subtract the mean visual row before the SVD (default False).
        solver: ``"exact"`` (an eigendecomposition of H_v H_v^T), ``"products"`` (the diagonal of the
            projector on its top-k eigenvectors, reached by batched matrix products alone,
            ``lofi.linalg.leverage_at_energy_products``), ``"randomized"`` (subspace iteration on a thin
            block, then products on the block: few products where the energy sits in few directions,
            ``lofi.linalg.leverage_at_energy_randomized``; where it does not, the products route on a GPU
            up to ``lofi.linalg.PRODUCTS_UP_TO`` tokens and the exact one otherwise), or
            ``"auto"`` (default): randomized on a GPU from ``RANDOMIZED_FROM`` visual tokens on (there
            torch decomposes a batch of matrices one at a time: 94 ms for 16 of 576 x 576 on an H200, while
            a batched product of them takes about 0.1 ms), exact elsewhere, so that CPU runs keep the exact
            route's values (on 2 CPU cores a product of 576 x 576 matrices costs about what their
            eigendecomposition does). All three keep the same tokens on the bundled model's states, on
            7B-size states with a flat spectrum and on 7B-size states with concentrated energy
            (``benchmarks/lofi_solver.py``). With a fixed ``k``, ``"products"`` and ``"randomized"`` use
            ``lofi.projector.rank_projector``.
    """

    RANDOMIZED_FROM = 256
    SOLVERS = ("auto", "exact", "products", "randomized")

    name = "lofi"
    default_layer = 2

    def __init__(self, keep: float = 0.5, layer: int | None = None, tau: float = 0.9,
                 k: int | None = None, center: bool = False, solver: str = "auto"):
        super().__init__(keep, layer)
        if solver not in self.SOLVERS:
            raise ValueError(f"unknown lofi solver {solver!r}; valid: {list(self.SOLVERS)}")
        self.solver = solver
        if not 0 < tau <= 1:
            raise ValueError(f"lofi tau must be in (0, 1], got {tau}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"lofi k must be a positive int, got {k!r}")
        self.tau, self.k, self.center = tau, k, center

    def leverage(self, visual_hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, n] leverage scores of the visual hidden states [batch, n, d]; ``rows`` [batch, n] marks
        each sample's real rows (the others must be zero: zero rows change no singular vector)."""
        H = visual_hidden  # in the model's dtype: lofi.linalg.gram forms H H^T in float32 from it
        if self.center:
            H = H.float()
            real = torch.ones(H.shape[:2], dtype=torch.bool, device=H.device) if rows is None else rows
            weight = real[..., None].to(H.dtype)
            H = (H - (H * weight).sum(-2, keepdim=True) / weight.sum(-2, keepdim=True).clamp_min(1)) * weight
        solver = self.solver
        if solver == "auto":
            solver = "randomized" if H.is_cuda and H.shape[-2] >= self.RANDOMIZED_FROM else "exact"
        if self.k is not None:
            k = min(self.k, *H.shape[-2:])
            if solver == "exact":
                return leverage_scores(H, torch.full(H.shape[:-2], k, device=H.device))
            found = rank_projector(gram(H), k)
            scores = found.diagonal()
            if not bool(found.ok.all()):  # not converged in float32: those samples take the exact route
                redo = ~found.ok
                scores[redo] = leverage_scores(H[redo], k)
            return scores
        route = {"exact": leverage_at_energy, "products": leverage_at_energy_products,
                 "randomized": leverage_at_energy_randomized}[solver]
        return route(H, self.tau)[0]

    def scores(self, state: StageInput) -> torch.Tensor:
        return self.leverage(state.visual_hidden(), state.visual_valid)
