"""The batched cuSOLVER eigh route, on the CPU: a stand-in library with the same C prototypes decomposes
column-major memory at the pointers it is given, reading only the triangle it is told to, as the
documented ``cusolverDnXsyevBatched`` does. What this checks is everything on our side of the call
(pointers, layout, triangle, workspace, batch, info); the real library is checked against
``torch.linalg.eigh`` at first use (``agreement_check``) and by ``benchmarks/lofi_solver.py --eigh`` on a GPU.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from lofi import cusolver, linalg

DEVICE_BYTES, HOST_BYTES = 96, 24
# The library's documented enum values, written out rather than read from lofi.cusolver.
CUDA_R_32F, CUDA_R_64F, EIG_MODE_NOVECTOR, EIG_MODE_VECTOR, FILL_MODE_LOWER, FILL_MODE_UPPER = 0, 1, 0, 1, 0, 1


class StandIn:
    """Functions of ``cusolver.PROTOTYPES`` over host memory; ``calls`` records what each received."""

    def __init__(self, fail: set[int] = frozenset(), transpose_vectors: bool = False):
        self.calls: list[tuple] = []
        self.fail, self.transpose_vectors = fail, transpose_vectors
        for name, argtypes in cusolver.PROTOTYPES.items():
            prototype = ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)
            setattr(self, name, prototype(getattr(self, "_" + name)))

    def _cusolverDnCreate(self, handle):
        handle[0] = 1001
        return 0

    def _cusolverDnCreateParams(self, params):
        params[0] = 2002
        return 0

    def _cusolverDnSetStream(self, handle, stream):
        self.calls.append(("stream", handle, stream))
        return 0

    def _cusolverDnXsyevBatched_bufferSize(self, handle, params, jobz, uplo, n, type_a, a, lda, type_w, w,
                                           compute, device_bytes, host_bytes, batch):
        self.calls.append(("bufferSize", handle, params, jobz, uplo, n, type_a, lda, type_w, compute, batch))
        device_bytes[0], host_bytes[0] = DEVICE_BYTES, HOST_BYTES
        return 0

    def _cusolverDnXsyevBatched(self, handle, params, jobz, uplo, n, type_a, a, lda, type_w, w, compute,
                                device_work, device_bytes, host_work, host_bytes, info, batch):
        self.calls.append(("syev", handle, params, jobz, uplo, n, type_a, lda, type_w, compute,
                           bool(device_work), device_bytes, bool(host_work), host_bytes, batch))
        scalar = {CUDA_R_32F: ctypes.c_float, CUDA_R_64F: ctypes.c_double}[type_a]
        memory = np.ctypeslib.as_array((scalar * (batch * n * lda)).from_address(a)).reshape(batch, n, lda)
        matrices = memory[:, :, :n].transpose(0, 2, 1).astype(np.float64)  # column-major: [b, i, j] = A_b(i, j)
        triangle = {FILL_MODE_UPPER: np.triu, FILL_MODE_LOWER: np.tril}[uplo](matrices)
        symmetric = triangle + triangle.transpose(0, 2, 1) - np.eye(n) * matrices
        values, vectors = np.linalg.eigh(symmetric)
        status = np.ctypeslib.as_array((ctypes.c_int * batch).from_address(info))
        status[:] = [1 if b in self.fail else 0 for b in range(batch)]
        np.ctypeslib.as_array((scalar * (batch * n)).from_address(w))[:] = values.ravel()
        if jobz == EIG_MODE_VECTOR:
            memory[:, :, :n] = vectors if self.transpose_vectors else vectors.transpose(0, 2, 1)
        return 0


def stand_in_solver(**kwargs) -> tuple[cusolver.BatchedEigh, StandIn]:
    library = StandIn(**kwargs)
    return cusolver.BatchedEigh(cusolver.bind(library), stream=lambda device: 0), library


def gram(*shape, dtype=torch.float64, seed=0):
    """Symmetric positive definite matrices [*shape, n, n], n = shape[-1]."""
    X = torch.randn(*shape, shape[-1] + 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (X @ X.mT).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_batched_route_gives_torchs_decomposition(dtype):
    solver, library = stand_in_solver()
    A = gram(2, 3, 37, dtype=dtype)
    values, vectors = solver(A)
    expected_values, expected_vectors = torch.linalg.eigh(A)
    tolerance = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else {}
    torch.testing.assert_close(values, expected_values, **tolerance)
    torch.testing.assert_close(vectors @ torch.diag_embed(values) @ vectors.mT, A, **tolerance)
    torch.testing.assert_close(vectors.abs(), expected_vectors.abs(), **tolerance)  # same vectors up to sign
    (_, *buffer), (_, *syev) = library.calls[1:]
    code = CUDA_R_32F if dtype == torch.float32 else CUDA_R_64F
    assert buffer == [1001, 2002, EIG_MODE_VECTOR, FILL_MODE_UPPER, 37, code, 37, code, code, 6]
    assert syev == buffer[:-1] + [True, DEVICE_BYTES, True, HOST_BYTES, 6]


def test_eigenvalues_alone_skip_the_vectors():
    solver, library = stand_in_solver()
    A = gram(4, 33)
    values, vectors = solver(A, vectors=False)
    assert vectors is None
    torch.testing.assert_close(values, torch.linalg.eigvalsh(A))
    assert library.calls[-1][3] == EIG_MODE_NOVECTOR


def test_it_reads_the_lower_triangle_as_torch_does():
    solver, _ = stand_in_solver()
    A = gram(3, 40) + torch.triu(torch.randn(3, 40, 40, dtype=torch.float64), 1) * 5  # upper triangle off
    torch.testing.assert_close(solver(A)[0], torch.linalg.eigh(A)[0])


def test_a_matrix_cusolver_could_not_decompose_reads_nan_and_the_others_do_not():
    solver, _ = stand_in_solver(fail={1})
    values, _ = solver(gram(3, 34))
    assert values[1].isnan().all() and not values[[0, 2]].isnan().any()


def test_leverage_and_spectra_through_the_batched_route_match_torchs(monkeypatch):
    H = torch.randn(4, 50, 80, generator=torch.Generator().manual_seed(3))
    H[..., :3] *= 20  # a few strong directions, as in real hidden states
    expected = linalg.leverage_at_energy(H, 0.9), linalg.singular_values(H)
    solver, library = stand_in_solver()
    monkeypatch.setattr(linalg, "_device_solver", lambda G: solver)  # as if H were on a GPU
    linalg.leverage_at_energy(H, 0.9)
    assert not library.calls  # torch's route unless asked
    with linalg.eigh_route("cusolver-batched"):
        (leverage, k), s = linalg.leverage_at_energy(H, 0.9), linalg.singular_values(H)
    assert [call[0] for call in library.calls].count("syev") == 2
    assert torch.equal(k, expected[0][1])
    torch.testing.assert_close(leverage, expected[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, expected[1], rtol=1e-4, atol=1e-4)


def test_a_gradient_takes_torchs_route(monkeypatch):
    solver, library = stand_in_solver()
    monkeypatch.setattr(linalg, "_device_solver", lambda G: solver)
    A = gram(2, 40).requires_grad_()
    with linalg.eigh_route("cusolver-batched"):
        values, _ = linalg.symmetric_eigh(A)
        assert values.grad_fn is not None and not library.calls
        with torch.no_grad():
            linalg.symmetric_eigh(A)
    assert [call[0] for call in library.calls] == ["stream", "bufferSize", "syev"]


def test_the_agreement_check_catches_vectors_read_in_the_wrong_order():
    cusolver.agreement_check(stand_in_solver()[0], torch.device("cpu"), torch.float64)
    with pytest.raises(cusolver.CusolverError, match="disagrees with torch.linalg.eigh.*LOFI_EIGH=torch"):
        cusolver.agreement_check(stand_in_solver(transpose_vectors=True)[0], torch.device("cpu"), torch.float64)


def test_a_library_without_the_batched_call_names_the_version_it_needs():
    class Old:
        cusolverDnCreate = cusolverDnSetStream = cusolverDnCreateParams = StandIn().cusolverDnCreate
    with pytest.raises(cusolver.CusolverError, match="cuSOLVER >= 11.7.1.*LOFI_EIGH=torch"):
        cusolver.bind(Old())


def test_routes_are_chosen_by_block_or_environment_and_checked(monkeypatch):
    assert linalg.current_eigh_route() == "torch"
    with linalg.eigh_route("cusolver-batched"):
        assert linalg.current_eigh_route() == "cusolver-batched"
        A = gram(2, 40)  # a CPU tensor takes torch's route whatever the choice
        torch.testing.assert_close(linalg.symmetric_eigh(A)[0], torch.linalg.eigvalsh(A))
    assert linalg.current_eigh_route() == "torch"
    monkeypatch.setenv("LOFI_EIGH", "cusolver-batched")
    assert linalg.current_eigh_route() == "cusolver-batched"
    with linalg.eigh_route("torch"):
        assert linalg.current_eigh_route() == "torch"
    monkeypatch.setenv("LOFI_EIGH", "magma")
    with pytest.raises(ValueError, match=r"unknown eigh route 'magma' \(LOFI_EIGH\); valid: \['torch', "):
        linalg.current_eigh_route()
    with pytest.raises(ValueError, match="unknown eigh route"), linalg.eigh_route("jacobi"):
        pass


def test_the_batched_route_refuses_a_cpu_device_with_the_way_back():
    with pytest.raises(cusolver.CusolverError, match="needs a CUDA tensor"):
        cusolver.solver_for(torch.device("cpu"), torch.float32)
