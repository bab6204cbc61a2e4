"""lofi.threads: how many intra-op threads small CPU work gets, restored after the block whatever happens."""

import pytest
import torch

from lofi import linalg
from lofi.threads import SINGLE_THREAD_UP_TO, decomposition_threads, single_threaded, threads


@pytest.fixture
def two_threads():
    with threads(2):
        yield


def test_single_threaded_restores_the_count_after_an_exception(two_threads):
    with pytest.raises(KeyError):
        with single_threaded("cpu"):
            assert torch.get_num_threads() == 1
            raise KeyError("boom")
    assert torch.get_num_threads() == 2


def test_gpu_work_keeps_the_threads(two_threads):
    with single_threaded(torch.device("meta")):
        assert torch.get_num_threads() == 2


def test_decompositions_take_one_thread_up_to_the_bound_and_torchs_setting_above(two_threads, monkeypatch):
    monkeypatch.delenv("LOFI_DECOMPOSITION_THREADS", raising=False)
    with decomposition_threads(SINGLE_THREAD_UP_TO, "cpu"):
        assert torch.get_num_threads() == 1
    with decomposition_threads(SINGLE_THREAD_UP_TO + 1, "cpu"):
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value, inside", [("0", 2), ("3", 3), ("1", 1)])
def test_the_environment_sets_the_threads_at_every_size(two_threads, monkeypatch, value, inside):
    monkeypatch.setenv("LOFI_DECOMPOSITION_THREADS", value)
    for rows in (8, SINGLE_THREAD_UP_TO + 1):
        with decomposition_threads(rows, "cpu"):
            assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == 2


def test_a_bad_setting_names_the_fix(monkeypatch):
    monkeypatch.setenv("LOFI_DECOMPOSITION_THREADS", "two")
    with pytest.raises(ValueError, match="LOFI_DECOMPOSITION_THREADS must be a whole number"):
        with decomposition_threads(8, "cpu"):
            pass


def test_the_library_decomposes_small_matrices_on_one_thread(two_threads, monkeypatch):
    monkeypatch.delenv("LOFI_DECOMPOSITION_THREADS", raising=False)
    seen = []
    eigh, svdvals, qr = torch.linalg.eigh, torch.linalg.svdvals, torch.linalg.qr

    def spy(function):
        def call(*args, **kwargs):
            seen.append((function.__name__, torch.get_num_threads()))
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(torch.linalg, "eigh", spy(eigh))
    monkeypatch.setattr(torch.linalg, "svdvals", spy(svdvals))
    monkeypatch.setattr(torch.linalg, "qr", spy(qr))
    H = torch.randn(2, 12, 20, generator=torch.Generator().manual_seed(0))
    linalg.leverage_at_energy(H, 0.9)
    linalg.singular_values(H.mT)
    linalg.orthonormal_columns(H.mT, "householder")
    assert sorted(seen) == [("linalg_eigh", 1), ("linalg_qr", 1), ("linalg_svdvals", 1)]
    assert torch.get_num_threads() == 2
