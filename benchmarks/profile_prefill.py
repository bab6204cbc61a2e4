"""Where a prefill's time goes, unpruned and pruned: launches, device busy time, the costliest ops.

    python -m benchmarks.profile_prefill --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1
    python -m benchmarks.profile_prefill --shape overhead --method fastv --keep 0.25 [--compile]   # CPU
    python -m benchmarks.profile_prefill --shape llava-1.5-7b --device cuda --dtype bfloat16 --compile reduce-overhead

One profiled prefill (``model(**inputs, logits_to_keep=1)``) of each kind after warm-ups, under
``torch.profiler``. Per kind it prints the wall time, the operator calls dispatched (``aten::`` ops), the
kernel launches, the CUDA graph launches and the device's busy time (the sum of its kernel durations; on a
GPU the rest of the wall time is the host's: Python, dispatch, launches), then the ops that took the most
self time on the device (or on the host, on a CPU). Under ``--compile`` it also says, per kind, what happened
to CUDA graphs over its warm-ups and profiled prefill (``benchmarks.cudagraphs``: inductor's skips and their
reasons, the graphs recorded): a kind whose prefill is captured shows no skip and graph launches. This is the
profile behind "where the time goes" when a measured speedup falls short of the FLOPs-predicted one
(``benchmarks/prefill.py``).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

import lofi
from benchmarks.cudagraphs import evidence, launch_counts
from benchmarks.prefill import COMPILE_MODES
from benchmarks.shapes import add_shape_arguments, shape_model, shared_settings


def summarize(events, cuda: bool) -> dict:
    """Counts and times of one profiled prefill from ``profile().key_averages()``."""
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) \
        if cuda else 0.0
    return {"aten op calls (nested included)": ops, **launch_counts(events), "device busy ms": device_us / 1000}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser, "overhead")
    parser.add_argument("--method", default="fastv", choices=lofi.available())
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--layer", type=int, default=None,
                        help="K for every method that takes one (default: each method's own)")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES)
    parser.add_argument("--rows", type=int, default=12, help="ops listed per kind")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    _, model, inputs = shape_model(args.shape, args.batch, args.device, getattr(torch, args.dtype),
                                   args.text_layers, args.vision_layers)
    method = lofi.build(args.method, shared=shared_settings(model, [args.method], args.layer), keep=args.keep)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def prefill():
        if args.compile:
            torch.compiler.cudagraph_mark_step_begin()
        model(**inputs, logits_to_keep=1)

    print(f"shape={args.shape} batch={args.batch} device={args.device} dtype={args.dtype} "
          f"method={args.method} keep={args.keep} compile={args.compile or 'no'}")
    with (lofi.compiled(model, mode=args.compile) if args.compile else nullcontext()), torch.inference_mode():
        for label, pruning in (("unpruned", None), (f"{args.method} keep={args.keep}", method)):
            with lofi.pruned(model, pruning) if pruning is not None else nullcontext(), evidence() as graphs:
                for _ in range(3):  # warm-up (and compilation)
                    prefill()
                sync()
                with profile(activities=activities) as prof:
                    start = time.perf_counter()
                    prefill()
                    sync()
                    wall = time.perf_counter() - start
            events = prof.key_averages()
            summary = summarize(events, cuda)
            print(f"\n== {label}: wall {1000 * wall:.1f} ms (under the profiler), "
                  + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
            if args.compile:
                print(graphs.summary())
            print(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                               row_limit=args.rows))


if __name__ == "__main__":
    main()
