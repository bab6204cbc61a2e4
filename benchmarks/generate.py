"""``generate()`` wall time of baseline vs each pruning method: the prefill and every decoding step, one run.

    python -m benchmarks.generate --shape overhead --keep 1 0.5 0.25    # batch 1: the runtime's cost per step
    python -m benchmarks.generate --shape mid --text-layers 4 --batch 8  # a KV cache worth pruning (CPU)
    python -m benchmarks.generate --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 16

Shapes and inputs are ``benchmarks.shapes``'s, as in ``benchmarks.prefill``. For every (method, keep) the
script runs greedy ``model.generate(**inputs, max_new_tokens=N, min_new_tokens=N)``, interleaving baseline
and pruned runs so that drifts in machine speed hit both. A stopping criterion stamps the time after every
step (on a GPU after synchronising, where ``generate`` reads the device for its own stopping check anyway),
which splits a run into its prefill (with the first token) and its ``N - 1`` decoding steps. Per (method,
keep) it prints the medians of both, their speedups, the KV cache held at the end (exact bytes of the cache
tensors) and the share of generated tokens equal to the baseline's (random weights: only keep = 1, where it
must be 1, says anything about answers; the rest is the cost).

A pruned decoding step attends over fewer cached keys, and otherwise costs what an unpruned one costs plus
the runtime's work: its hooks and a handful of ops (``benchmarks/README.md``). Where the cache is a small
part of a step's memory traffic (batch 1 at 7B: 0.3 GB of keys and values against 13.5 GB of weights) a
pruned step can only match an unpruned one; the ratio ``step_speedup`` shows what the runtime costs there,
and what a smaller cache gains at larger batches.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import lofi
from benchmarks.prefill import kv_bytes
from benchmarks.shapes import add_shape_arguments, shape_model, shared_settings


class StepClock(StoppingCriteria):
    """A stopping criterion that never stops: it stamps the time after each step of ``generate``."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.stamps: list[float] = []

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps = [time.perf_counter()]

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def split(self) -> tuple[float, float]:
        """(seconds to the first token: prefill and its sampling, mean seconds per later step)."""
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        if len(steps) < 2:
            raise ValueError("generate ran fewer than two steps: ask for at least two new tokens")
        return steps[0], statistics.fmean(steps[1:])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser, "overhead")
    parser.add_argument("--methods", nargs="+", default=["fastv", "lofi", "random"])
    parser.add_argument("--keep", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", type=int, default=None,
                        help="K for every method that takes one (default: each method's own)")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first token comes with the prefill)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1 (timed pairs, after one pair that warms up)")
    cuda = args.device.startswith("cuda")
    _, model, inputs = shape_model(args.shape, args.batch, args.device, getattr(torch, args.dtype),
                                   args.text_layers, args.vision_layers)
    clock = StepClock(cuda)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    stopping_criteria=StoppingCriteriaList([clock]), return_dict_in_generate=True,
                    pad_token_id=0)

    def run(method):
        with lofi.pruned(model, method) if method is not None else nullcontext():
            clock.start()
            out = model.generate(**inputs, **settings)
        first, step = clock.split()
        return first, step, clock.stamps[-1] - clock.stamps[0], kv_bytes(out.past_key_values), out.sequences

    print(f"shape={args.shape} device={args.device} dtype={args.dtype} batch={args.batch} new tokens="
          f"{args.new_tokens} layer K={'default' if args.layer is None else args.layer} repeats={args.repeats} "
          f"threads={torch.get_num_threads()}",
          flush=True)
    shared = shared_settings(model, args.methods, args.layer)
    rows = []
    with torch.inference_mode():
        run(None)  # warm-up
        for name in args.methods:
            for keep in args.keep:
                method = lofi.build(name, shared=shared, keep=keep)
                times = {"base": [], "pruned": []}
                for repeat in range(args.repeats + 1):  # the first pair warms up
                    base, pruned = run(None), run(method)
                    if repeat:
                        times["base"].append(base)
                        times["pruned"].append(pruned)
                median = {kind: [statistics.median(r[i] for r in runs) for i in range(3)]
                          for kind, runs in times.items()}
                (first_b, step_b, total_b), (first_p, step_p, total_p) = median["base"], median["pruned"]
                new = slice(inputs["input_ids"].shape[1], None)
                same = (base[4][:, new] == pruned[4][:, new]).double().mean().item()
                rows.append({
                    "method": name, "keep": keep, "first_token_ms_base": 1000 * first_b,
                    "first_token_ms_pruned": 1000 * first_p, "step_ms_base": 1000 * step_b,
                    "step_ms_pruned": 1000 * step_p, "step_speedup": step_b / step_p,
                    "total_ms_base": 1000 * total_b, "total_ms_pruned": 1000 * total_p,
                    "total_speedup": total_b / total_p, "kv_mb_base": base[3] / 2**20,
                    "kv_mb_pruned": pruned[3] / 2**20, "same_tokens": same,
                })
                print(f"{name:>9} keep={keep:<5} first token {1000 * first_b:8.1f} -> {1000 * first_p:8.1f} ms  "
                      f"step {1000 * step_b:7.2f} -> {1000 * step_p:7.2f} ms ({step_b / step_p:4.2f}x)  "
                      f"total {total_b / total_p:4.2f}x  same tokens {same:.0%}", flush=True)
    import pandas as pd
    print()
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))
    return rows


if __name__ == "__main__":
    main()
