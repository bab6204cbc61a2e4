"""CPU eigendecompositions on an idle and on a busy machine: torch's thread count against ``lofi.threads``.

    python -m benchmarks.eigh_threads                      # 576 and 1,536 rows, idle then busy
    python -m benchmarks.eigh_threads --sizes 576 3699 --repeats 5

For each load (``idle``; ``busy``: another Python process multiplying matrices with torch's default threads,
as a second job or a test suite would) and each size, the script times ``torch.linalg.eigh`` of two Gram
matrices H H^T (H with 1,024 columns: i.i.d. Gaussian, a flat spectrum; and six strong directions plus
noise, a concentrated one like a model's hidden states) with torch's thread count, and again through
``lofi.linalg.symmetric_eigh``, which takes the threads ``lofi.threads.decomposition_threads`` gives it. It
prints the median and the slowest of ``--repeats`` calls of each: on a busy machine the time varies from
call to call, and the slowest is what a run can meet.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from lofi.linalg import symmetric_eigh

COMPETITOR = """
import time, torch
a = torch.randn(256, 256)
end = time.time() + {seconds}
while time.time() < end:
    a = torch.tanh(a @ a * 0.01)
"""


def gram(rows: int, concentrated: bool, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if concentrated:
        H = 10 * torch.randn(rows, 6, generator=generator) @ torch.randn(6, 1024, generator=generator)
        H = H + 0.01 * torch.randn(rows, 1024, generator=generator)
    else:
        H = torch.randn(rows, 1024, generator=generator)
    return H @ H.T


def times_ms(function, G: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(median, slowest) of ``repeats`` calls after one warm-up, in ms: on a busy machine the slowest call
    is what a run can meet."""
    function(G)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(G)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), max(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[576, 1536])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--loads", nargs="+", choices=["idle", "busy"], default=["idle", "busy"])
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for load in args.loads:
        competitor = None
        if load == "busy":
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR.format(seconds=3600)])
            time.sleep(2)  # let it start multiplying
        try:
            for size in args.sizes:
                for kind in ("flat", "concentrated"):
                    G = gram(size, kind == "concentrated")
                    torch_ms, torch_worst = times_ms(torch.linalg.eigh, G, args.repeats)
                    lofi_ms, lofi_worst = times_ms(symmetric_eigh, G, args.repeats)
                    rows.append({"load": load, "rows": size, "spectrum": kind, "torch_median_ms": torch_ms,
                                 "torch_slowest_ms": torch_worst, "lofi_median_ms": lofi_ms,
                                 "lofi_slowest_ms": lofi_worst})
                    print(f"{load:>5} {size:5d} {kind:>12}: torch {torch_ms:9.1f} (slowest {torch_worst:9.1f}) ms  "
                          f"lofi {lofi_ms:9.1f} (slowest {lofi_worst:9.1f}) ms", flush=True)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    import pandas as pd
    print()
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))
    return rows


if __name__ == "__main__":
    main()
