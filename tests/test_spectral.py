"""Spectral quantities against numpy float64 SVD, on the matrices that break naive code."""

import numpy as np
import pytest
import torch

from analysis.measure import spectral


def _cases():
    g = torch.Generator().manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    low_rank = randn(40, 3) @ randn(3, 25)
    deficient = torch.cat([randn(10, 30), randn(10, 30)[:5].repeat(2, 1)])  # rank 15 of 20 rows
    return {"random": randn(30, 20), "rows<cols": randn(12, 50), "rows>cols": randn(60, 16),
            "low_rank": low_rank, "rank_deficient": deficient, "one_row": randn(1, 8)}


def _reference(H: np.ndarray, k: int | None = None, tau: float = 0.9):
    U, s, _ = np.linalg.svd(H, full_matrices=False)
    p = s**2 / (s**2).sum()
    q = s / s.sum()
    q = q[q > 0]
    ref = {"s": s, "ipr": (p**2).sum(), "pr": 1 / (p**2).sum(), "erank": np.exp(-(q * np.log(q)).sum()),
           "energy_rank": int(np.searchsorted(np.cumsum(p), tau - 1e-12) + 1)}
    k = ref["energy_rank"] if k is None else k
    ref["leverage"] = (U[:, :k] ** 2).sum(1)
    return ref


@pytest.mark.parametrize("name", list(_cases()))
def test_against_numpy_svd(name):
    H = _cases()[name]
    ref = _reference(H.numpy())
    s = spectral.singular_values(H)
    # the Gram route (rows < cols) resolves singular values down to about sqrt(eps) * s_1
    np.testing.assert_allclose(s.numpy(), ref["s"], atol=1e-7 * ref["s"][0], rtol=1e-7)
    np.testing.assert_allclose(spectral.ipr(s).item(), ref["ipr"], rtol=1e-9)
    np.testing.assert_allclose(spectral.participation_ratio(s).item(), ref["pr"], rtol=1e-9)
    np.testing.assert_allclose(spectral.effective_rank(s).item(), ref["erank"], rtol=1e-6)  # linear in s
    assert spectral.energy_rank(s, 0.9).item() == ref["energy_rank"]
    k = ref["energy_rank"]
    lev = spectral.leverage_scores(H, k)
    np.testing.assert_allclose(lev.numpy(), ref["leverage"], atol=1e-8)
    assert lev.sum().item() == pytest.approx(k) and lev.min() >= -1e-12 and lev.max() <= 1 + 1e-9


def test_float32_matches_float64_closely():
    H = _cases()["rows<cols"]
    s32 = spectral.singular_values(H.float())
    np.testing.assert_allclose(s32.numpy(), _reference(H.numpy())["s"], rtol=2e-4, atol=1e-4)


def test_batched_over_leading_dimensions():
    g = torch.Generator().manual_seed(1)
    H = torch.randn(3, 2, 10, 24, generator=g, dtype=torch.float64)
    s = spectral.singular_values(H)
    assert s.shape == (3, 2, 10)
    for i in range(3):
        for j in range(2):
            ref = _reference(H[i, j].numpy())
            np.testing.assert_allclose(s[i, j].numpy(), ref["s"], atol=1e-9)
            assert spectral.ipr(s)[i, j].item() == pytest.approx(ref["ipr"])
    ranks = spectral.energy_rank(s, 0.8)
    lev = spectral.leverage_scores(H, ranks)
    assert lev.shape == (3, 2, 10)
    torch.testing.assert_close(lev.sum(-1), ranks.double())


def test_all_zero_matrix_is_defined_and_never_nan():
    H = torch.zeros(7, 5, dtype=torch.float64)
    s = spectral.singular_values(H)
    for value in (spectral.ipr(s), spectral.participation_ratio(s), spectral.effective_rank(s)):
        assert value.item() == 0
    assert spectral.energy_rank(s, 0.9).item() == 0
    assert torch.equal(spectral.leverage_scores(H, 0), torch.zeros(7, dtype=torch.float64))


def test_analytic_cases():
    assert spectral.ipr(torch.tensor([3.0, 0, 0])).item() == 1
    s = torch.ones(8, dtype=torch.float64)
    assert spectral.ipr(s).item() == pytest.approx(1 / 8)
    assert spectral.participation_ratio(s).item() == pytest.approx(8)
    assert spectral.effective_rank(s).item() == pytest.approx(8)
    H = torch.eye(6, dtype=torch.float64)[:, :4] * 2  # 4 equal directions
    assert spectral.participation_ratio(spectral.singular_values(H)).item() == pytest.approx(4)


def test_invariant_under_row_permutation():
    H = _cases()["random"]
    perm = torch.randperm(H.shape[0], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(spectral.singular_values(H[perm]), spectral.singular_values(H))
    torch.testing.assert_close(spectral.leverage_scores(H[perm], 5), spectral.leverage_scores(H, 5)[perm])


def test_leverage_at_energy_equals_the_two_step_route():
    from lofi.linalg import leverage_at_energy
    for H in _cases().values():
        lev, k = leverage_at_energy(H, 0.9)
        assert k.item() == spectral.energy_rank(spectral.singular_values(H), 0.9).item()
        torch.testing.assert_close(lev, spectral.leverage_scores(H, k))


def test_ipr_from_matrix_needs_no_decomposition():
    for H in list(_cases().values()) + [torch.zeros(4, 6, dtype=torch.float64)]:
        torch.testing.assert_close(spectral.ipr_from_matrix(H), spectral.ipr(spectral.singular_values(H)))


def test_tall_float32_leverage_matches_float64_svd():
    # more tokens than channels (LLaVA-OneVision-7B: 3,699 x 3,584) goes through H^T H's eigenvectors
    g = torch.Generator().manual_seed(4)
    H = torch.randn(300, 64, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 64, dtype=torch.float64)
    ref = _reference(H.numpy())
    lev, k = spectral.leverage_scores(H.float(), ref["energy_rank"]), ref["energy_rank"]
    np.testing.assert_allclose(lev.numpy(), ref["leverage"], atol=2e-5)
    assert lev.sum().item() == pytest.approx(k, rel=1e-5)


def _group_reference(H: np.ndarray, masks: np.ndarray, center: bool) -> np.ndarray:
    """[batch, groups] IPR of each group's own rows (minus their mean row with ``center``), numpy float64 SVD."""
    out = np.zeros(masks.shape[:2])
    for b in range(masks.shape[0]):
        for g in range(masks.shape[1]):
            rows = H[b][masks[b, g] > 0].astype(np.float64)
            rows = rows - rows.mean(0) if center and len(rows) else rows
            energy = np.linalg.svd(rows, compute_uv=False) ** 2 if len(rows) else np.zeros(1)
            out[b, g] = (energy ** 2).sum() / energy.sum() ** 2 if energy.sum() > 0 else 0.0
    return out


def _grouped_batch(rows: int, cols: int, dtype=torch.float32):
    """3 matrices with rows of very different norms (a few carry most of the energy) and 2 groups each; the
    last matrix's second group is empty."""
    g = torch.Generator().manual_seed(5)
    scale = torch.logspace(-1, 2, rows, dtype=torch.float64)[torch.randperm(rows, generator=g)]
    H = (torch.randn(3, rows, cols, generator=g, dtype=torch.float64) * scale[:, None]).to(dtype)
    masks = torch.rand(3, 2, rows, generator=g) < 0.6
    masks[2, 1] = False
    return H, masks


@pytest.mark.parametrize("rows, cols", [(14, 40), (50, 12)])
@pytest.mark.parametrize("center", [False, True])
def test_group_moments_give_every_groups_ipr_of_a_float64_svd(rows, cols, center):
    """Float32 rows, both sides (rows <= cols through the one n x n Gram matrix, rows > cols through H_g^T H_g),
    centred or not: within 1e-5 relative of numpy's float64 SVD of each group's rows; an empty group is 0."""
    H, masks = _grouped_batch(rows, cols)
    ipr = spectral.ipr_from_moments(spectral.group_moments(H, masks, center))
    expected = _group_reference(H.numpy(), masks.numpy(), center)
    np.testing.assert_allclose(ipr.numpy(), expected, rtol=1e-5, atol=0)
    assert ipr[2, 1].item() == 0 and spectral.pr_from_ipr(ipr)[2, 1].item() == 0
    np.testing.assert_allclose(spectral.pr_from_ipr(ipr).numpy()[expected > 0], 1 / expected[expected > 0],
                               rtol=1e-5)


def test_gram_moments_ignore_rows_outside_the_groups_and_take_bfloat16_rows():
    """A bfloat16 batch (a model's hidden states; its Gram matrix formed in float32) whose rows outside both
    groups hold large values (padding): the IPRs of float64 SVDs of the same bfloat16 numbers, to 1e-5."""
    H, masks = _grouped_batch(20, 64, torch.bfloat16)
    masks[:, :, :3] = False
    H[:, :3] = 1e3
    ipr = spectral.ipr_from_moments(spectral.gram_moments(spectral.gram(H), masks))
    expected = _group_reference(H.double().numpy(), masks.numpy(), center=False)
    np.testing.assert_allclose(ipr.numpy(), expected, rtol=1e-5, atol=0)


def test_ipr_from_moments_equals_the_spectrum_route_in_float64():
    for H in _cases().values():
        moments = spectral.group_moments(H[None], torch.ones(1, 1, H.shape[0]))
        torch.testing.assert_close(spectral.ipr_from_moments(moments)[0, 0], spectral.ipr(spectral.singular_values(H)),
                                   rtol=1e-12, atol=0)
