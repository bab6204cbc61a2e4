"""Spectral projectors from products (lofi.projector) against eigendecompositions: the energy rank, the
leverage scores and the kept tokens, on spread, decaying and concentrated spectra; flagged where they
cannot converge; and the products route's fixed shape: products only, one host read."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.lofi_solver import concentrated_states
from lofi.linalg import gram, leverage_at_energy, leverage_at_energy_products, leverage_scores
from lofi.projector import COUNT_STEPS, ENERGY_STEPS, energy_projector, rank_projector


def states(kind: str, batch: int = 3, rows: int = 96, cols: int = 160) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    if kind == "spread":
        return torch.randn(batch, rows, cols, generator=generator)
    if kind == "decaying":  # singular values e^{-i/8}: the threshold falls among close eigenvalues
        U = torch.linalg.qr(torch.randn(batch, rows, rows, generator=generator, dtype=torch.float64)).Q
        s = torch.exp(-torch.arange(rows, dtype=torch.float64) / 8)
        return ((U * s) @ torch.randn(batch, rows, cols, generator=generator, dtype=torch.float64)).float()
    return concentrated_states(batch, rows, cols, rank=6, noise=0.05)


def eigen_reference(H: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(leverage [batch, rows], k [batch]) from numpy-free float64 eigendecompositions of H H^T."""
    G = H.double() @ H.double().mT
    values, vectors = torch.linalg.eigh(G)
    values, vectors = values.flip(-1), vectors.flip(-1)
    cumulative = values.cumsum(-1) / values.sum(-1, keepdim=True)
    k = (cumulative < tau - 1e-9).sum(-1) + 1
    take = torch.arange(H.shape[-2]) < k[:, None]
    return (vectors.pow(2) * take[:, None, :]).sum(-1), k


@pytest.mark.parametrize("kind", ["spread", "decaying", "concentrated"])
@pytest.mark.parametrize("tau", [0.5, 0.9])
def test_the_energy_projector_is_the_eigendecomposition_s(kind, tau):
    H = states(kind)
    expected, k_expected = eigen_reference(H, tau)
    found = energy_projector(gram(H), tau)
    assert found.ok.all()
    assert torch.equal(found.k, k_expected)
    torch.testing.assert_close(found.diagonal().double(), expected, atol=2e-5, rtol=0)
    P = found.P.double()
    torch.testing.assert_close(P @ P, P, atol=1e-4, rtol=0)  # a projector, of rank k
    torch.testing.assert_close(P.diagonal(dim1=-2, dim2=-1).sum(-1), k_expected.double(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["spread", "decaying", "concentrated"])
def test_the_products_route_keeps_the_exact_route_s_tokens(kind):
    H = states(kind, batch=4, rows=128, cols=200)
    exact, k_exact = leverage_at_energy(H, 0.9)
    fast, k = leverage_at_energy_products(H, 0.9)
    assert torch.equal(k, k_exact)
    for keep in (0.5, 0.25, 0.1):
        n = int(keep * H.shape[1])
        alike = [len(set(a.topk(n).indices.tolist()) & set(b.topk(n).indices.tolist())) / n
                 for a, b in zip(fast, exact)]
        assert min(alike) >= 0.99, (keep, alike)


def test_a_fixed_rank_projector_matches_leverage_scores():
    H = states("decaying")
    for k in (1, 5, 20):
        found = rank_projector(gram(H), k)
        assert found.ok.all() and (found.k == k).all()
        torch.testing.assert_close(found.diagonal(), leverage_scores(H, k), atol=2e-5, rtol=0)


def test_tied_eigenvalues_at_the_threshold_are_flagged():
    """With eigenvalues 4, 2, 2, 1, ... a projector of rank 2 would have to split the tied pair: no product
    route can, and the result says so instead of returning a non-projector."""
    Q = torch.linalg.qr(torch.randn(40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    values = torch.cat([torch.tensor([4.0, 2.0, 2.0]), torch.full((37,), 0.01)]).double()
    G = ((Q * values) @ Q.T).float()
    assert not rank_projector(G, 2).ok
    assert rank_projector(G, 3).ok


def test_matrices_the_purification_flags_take_the_exact_route(monkeypatch):
    import lofi.linalg
    H = states("spread", batch=3)
    real = lofi.linalg.energy_projector

    def one_unconverged(G, tau):
        found = real(G, tau)
        found.ok[1] = False
        found.P[1] = torch.nan  # whatever it holds must not be read
        return found
    monkeypatch.setattr(lofi.linalg, "energy_projector", one_unconverged)
    leverage, k = leverage_at_energy_products(H, 0.9)
    exact, k_exact = leverage_at_energy(H, 0.9)
    assert torch.equal(k, k_exact)
    assert torch.equal(leverage[1], exact[1])
    torch.testing.assert_close(leverage, exact, atol=2e-5, rtol=0)


def test_zero_matrices_and_padding_rows():
    H = states("concentrated")
    H[0, 60:] = 0  # a ragged sample's padding rows
    H[1] = 0
    leverage, k = leverage_at_energy_products(H, 0.9)
    assert k[1] == 0 and (leverage[1] == 0).all()
    assert (leverage[0, 60:].abs() < 1e-6).all()
    exact, k_exact = leverage_at_energy(H[[0, 2]], 0.9)
    assert torch.equal(k[[0, 2]], k_exact)


VIEWS = ("view", "_unsafe_view", "expand", "unsqueeze", "diagonal", "transpose")  # no kernel on a GPU


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_products_route_is_batched_products_and_one_host_read():
    """Whatever the batch: one Gram product, one for the scale, one per step, one for the final check;
    no decomposition; one host read (whether every matrix converged)."""
    for batch in (1, 5):
        H = states("spread", batch=batch)
        with _Ops() as ops:
            leverage_at_energy_products(H, 0.9)
        products = sum(name in ("mm", "bmm") for name in ops.names)
        assert products == 1 + 1 + ENERGY_STEPS + COUNT_STEPS + 1
        assert not [name for name in ops.names if name.startswith(("linalg", "_linalg"))]
        assert ops.names.count("_local_scalar_dense") == 1
        kernels = [name for name in ops.names if name not in VIEWS]
        assert len(kernels) <= 12 * (ENERGY_STEPS + COUNT_STEPS)  # a few elementwise ops per step


def test_tau_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="tau must be in"):
        energy_projector(torch.eye(3), 1.5)
