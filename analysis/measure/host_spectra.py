"""Spectra decomposed on the host, off the model's critical path.

On a GPU, torch's ``eigvalsh`` of a batch of Gram matrices runs one matrix at a time (unless
``LOFI_EIGH=cusolver-batched``, ``lofi.linalg``), and inside a forward pass
it holds the pass up: the headline layer's spectra alone doubled a batch-8 forward at LLaVA-1.5-7B shape
(measured on an H200). ``HostSpectra`` takes Gram matrices that ``Capture`` has already moved to the host (with
the rest of a forward pass's statistics, in its one transfer) and decomposes them in float64 on a
background thread while the model goes on (decoding, the next batch); ``Capture.take`` waits for them.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from analysis.measure import spectral


def spectrum_statistics(s: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """What ``Capture`` records of a spectrum s [..., r] (descending): IPR, PR, effective rank and the top
    ``top_k`` singular values."""
    return {"ipr": spectral.ipr(s), "pr": spectral.participation_ratio(s),
            "effective_rank": spectral.effective_rank(s), "singular_values": s[..., :top_k]}


def gram_statistics(gram: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """``spectrum_statistics`` of the matrices whose Gram matrices (H H^T, [..., n, n]) are ``gram``:
    s = sqrt(eigenvalues), in float64 (the singular values kept in float32)."""
    statistics = spectrum_statistics(spectral.singular_values_from_gram(gram.double()), top_k)
    statistics["singular_values"] = statistics["singular_values"].float()
    return statistics


class HostSpectra:
    """A background thread that turns host Gram matrices into ``gram_statistics``, in submission order."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="capture-spectra")

    def submit(self, gram: torch.Tensor, top_k: int) -> Future:
        return self._pool.submit(gram_statistics, gram, top_k)

    def close(self) -> None:
        """Finish what was submitted (its records stay takeable) and stop the thread."""
        self._pool.shutdown(wait=True)
