"""The randomized route to leverage scores agrees with the exact one where energy is concentrated, and
falls back to the exact one where it is not."""

import pytest
import torch

from benchmarks.lofi_solver import concentrated_states
from lofi.linalg import energy_rank, leverage_at_energy, leverage_at_energy_randomized, singular_values


@pytest.mark.parametrize("orthonormalize", ["householder", "cholesky"])
@pytest.mark.parametrize("rows,cols", [(576, 1024), (400, 160)])  # H H^T and, rows > cols, H^T H
def test_randomized_leverage_matches_the_exact_route_on_concentrated_energy(rows, cols, orthonormalize, monkeypatch):
    import lofi.linalg
    H = concentrated_states(3, rows, cols, rank=12, noise=0.01)
    exact, k_exact = leverage_at_energy(H.double(), 0.9)

    def no_fallback(*args):
        raise AssertionError("the randomized route fell back to the exact one")
    monkeypatch.setattr(lofi.linalg, "leverage_at_energy", no_fallback)
    fast, k_fast = leverage_at_energy_randomized(H.double(), 0.9, orthonormalize=orthonormalize)
    assert torch.equal(k_fast, k_exact) and (k_exact < 12).all()
    torch.testing.assert_close(fast, exact, atol=1e-6, rtol=1e-5)
    for keep in (0.5, 0.25, 0.1):
        n = int(keep * rows)
        same = [len(set(a.topk(n).indices.tolist()) & set(b.topk(n).indices.tolist())) / n
                for a, b in zip(fast, exact)]
        assert min(same) >= 0.99


def test_spread_energy_falls_back_to_the_exact_decomposition():
    H = torch.randn(2, 300, 512, generator=torch.Generator().manual_seed(1))  # energy in most directions
    assert (energy_rank(singular_values(H), 0.9) > 150).all()
    fast, k = leverage_at_energy_randomized(H, 0.9)
    exact, k_exact = leverage_at_energy(H, 0.9)
    assert torch.equal(k, k_exact)
    torch.testing.assert_close(fast, exact)


def test_zero_rows_and_zero_matrices_stay_defined():
    H = concentrated_states(2, 300, 256, rank=5, noise=0.0)
    H[0, 200:] = 0  # a ragged sample: zero padding rows get zero leverage
    H[1] = 0
    fast, k = leverage_at_energy_randomized(H, 0.9)
    assert torch.isfinite(fast).all() and (fast[0, 200:] == 0).all()
    assert k[1] == 0 and (fast[1] == 0).all()


def test_lofi_takes_a_solver_and_auto_is_exact_on_the_cpu():
    from lofi.methods.leverage import LoFi
    H = concentrated_states(2, 300, 512, rank=8, noise=0.01)
    exact = LoFi(solver="exact").leverage(H)
    torch.testing.assert_close(LoFi(solver="auto").leverage(H), exact, atol=0, rtol=0)
    torch.testing.assert_close(LoFi(solver="randomized").leverage(H), exact, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(LoFi(solver="products").leverage(H), exact, atol=1e-4, rtol=1e-3)
    for solver in ("products", "randomized"):  # a fixed rank: the rank projector
        torch.testing.assert_close(LoFi(solver=solver, k=4).leverage(H), LoFi(solver="exact", k=4).leverage(H),
                                   atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="valid: \\['auto', 'exact', 'products', 'randomized'\\]"):
        LoFi(solver="svd")


@pytest.mark.parametrize("rows,cols", [(40, 64), (64, 40)])
def test_low_precision_rows_are_decomposed_in_float32_as_their_cast(rows, cols):
    """A model's bfloat16 hidden states go into lofi.linalg as they are: the Gram matrix comes out in
    float32, equal bit for bit on the CPU to the product of the float32 cast, and so do the leverage
    scores and singular values (every route), whichever side is smaller."""
    from lofi.linalg import gram
    H = concentrated_states(2, rows, cols, rank=6, noise=0.1).to(torch.bfloat16)
    cast = H.float()
    assert gram(H).dtype == torch.float32 and gram(H.double()).dtype == torch.float64
    assert torch.equal(gram(H), cast @ cast.mT)
    for route in (leverage_at_energy, leverage_at_energy_randomized):
        for got, expected in zip(route(H, 0.9), route(cast, 0.9)):
            assert torch.equal(got, expected)
    assert torch.equal(singular_values(H), singular_values(cast))


def test_cholesky_orthonormalization_spans_the_columns_or_says_it_cannot():
    from lofi.linalg import orthonormal_columns
    Y = concentrated_states(3, 576, 48, rank=48, noise=0.0) @ torch.diag(torch.logspace(0, 3, 48))  # cond ~1e4-1e5
    Q, ok = orthonormal_columns(Y, "cholesky")
    reference, _ = orthonormal_columns(Y, "householder")
    assert ok.all() and Q.dtype == Y.dtype
    eye = torch.eye(48).expand(3, -1, -1)
    torch.testing.assert_close(Q.mT @ Q, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(Q @ Q.mT, reference @ reference.mT, atol=1e-4, rtol=0)  # the same span
    Y[1, :, 10] = Y[1, :, 3]  # a repeated column: rank-deficient
    Y[2] = 0
    _, ok = orthonormal_columns(Y, "cholesky")
    assert ok.tolist() == [True, False, False]
    with pytest.raises(ValueError, match="valid: \\['householder', 'cholesky'\\]"):
        orthonormal_columns(Y, "gram-schmidt")


def test_a_degenerate_block_takes_the_exact_route():
    """A sample with fewer real rows than the block is wide cannot be orthonormalized by Cholesky: the
    whole batch then takes the exact route, as when the energy is spread."""
    H = concentrated_states(2, 300, 512, rank=6, noise=0.01)
    H[1, 20:] = 0  # 20 real rows, a block of at least 48 columns
    exact, k_exact = leverage_at_energy(H, 0.9)
    fast, k = leverage_at_energy_randomized(H, 0.9, orthonormalize="cholesky")
    assert torch.equal(k, k_exact)
    torch.testing.assert_close(fast, exact, atol=0, rtol=0)
