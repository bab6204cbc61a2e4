"""How many intra-op threads small CPU work gets: greedy selection loops and dense decompositions.

On a CPU with other work running, an OpenMP parallel region waits for its slowest thread, and a thread
that the scheduler has set aside makes every region of a call wait a time slice. Work made of many short
regions then slows by far more than the cores it shares: on a 2-core machine (torch 2.13 with MKL) beside
one other process running torch, ``torch.linalg.eigh`` of a 1,536 x 1,536 Gram matrix took 7.6 s with 2
threads and 1.4 s with 1; SCOPE's greedy loop at 576 tokens 7.0 s against 0.19 s (``benchmarks/README.md``).
On an idle machine a second thread makes such calls at most about 1.5x faster, so one thread costs little
there and bounds the loss on a busy one.

``single_threaded(device)``: one thread inside the block on the CPU, whatever happens in it (restored on
exit, also after an exception; GPU work is untouched). ``decomposition_threads(n, device)``: the same for
a decomposition of n x n matrices up to ``LOFI_DECOMPOSITION_THREADS``'s rule: by default one thread up
to ``SINGLE_THREAD_UP_TO`` rows, torch's setting above; ``LOFI_DECOMPOSITION_THREADS=<k>`` in the
environment uses k threads at every size (``0``: torch's own setting everywhere).

The setting is the calling thread's (torch sets OpenMP's and MKL's thread-local counts), so a background
thread that decomposes spectra does not change the threads of the model's forward pass.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

import torch

SINGLE_THREAD_UP_TO = 2048  # rows; larger decompositions take long enough for the threads to pay off


@contextmanager
def threads(count: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """``count`` intra-op threads inside the block for CPU work (restored after, whatever happens)."""
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu" or before == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded(device: torch.device | str = "cpu") -> ContextManager[None]:
    """One intra-op thread inside the block on the CPU (see the module docstring for why)."""
    return threads(1, device)


def _configured() -> int | None:
    value = os.environ.get("LOFI_DECOMPOSITION_THREADS")
    if value is None:
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"LOFI_DECOMPOSITION_THREADS must be a whole number >= 0 (0: torch's own setting), "
                         f"got {value!r}")
    return count


def decomposition_threads(rows: int, device: torch.device | str = "cpu") -> ContextManager[None]:
    """The threads a dense decomposition of ``rows`` x ``rows`` matrices gets on the CPU (module docstring)."""
    configured = _configured()
    if configured == 0 or (configured is None and rows > SINGLE_THREAD_UP_TO):
        return nullcontext()
    return threads(1 if configured is None else configured, device)
