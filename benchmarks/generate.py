"""``generate()`` wall time of baseline vs each pruning method: the prefill and every decoding step, one run.

    python -m benchmarks.generate --shape overhead --keep 1 0.5 0.25    # batch 1: the runtime's cost per step
    python -m benchmarks.generate --shape mid --text-layers 4 --batch 8  # a KV cache worth pruning (CPU)
    python -m benchmarks.generate --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 16
    python -m benchmarks.generate --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 16 --deterministic

Shapes and inputs are ``benchmarks.shapes``'s, as in ``benchmarks.prefill``. For every (method, keep) the
script runs greedy ``model.generate(**inputs, max_new_tokens=N, min_new_tokens=N)``, interleaving baseline
and pruned runs so that drifts in machine speed hit both; both take the very same inputs and settings. A
stopping criterion stamps the time after every step (on a GPU after synchronising, where ``generate`` reads
the device for its own stopping check anyway), which splits a run into its prefill (with the first token)
and its ``N - 1`` decoding steps. Per (method, keep) it prints the medians of both, their speedups and the
KV cache held at the end (exact bytes of the cache tensors).

What the runs generate is compared twice (``agreement``): each pruned run against the baseline run of its
pair, and, as a control, each baseline run against the baseline run before it (the previous pair's), which
differ in nothing but the run. Per comparison: the share of generated tokens that are equal, whether every
step's logits are bit-identical, and the largest difference of the first step's logits (the prefill's). With
random weights only keep = 1 says anything about answers: there the pruned run takes the unpruned model's
code path (``tests/test_keep_one_paths.py``), so it must agree with its baseline as well as the control does.
A control below 100% or with differing logits is run-to-run numerics (kernels that sum in another order from
run to run, which near-tied logits of a random-weight model turn into other tokens; ``top2_gap_min_base`` is
the baseline's smallest gap between its two largest logits); ``--deterministic`` asks for deterministic
kernels (``deterministic``) to take them out.

A pruned decoding step attends over fewer cached keys, and otherwise costs what an unpruned one costs plus
the runtime's work: two pre-hooks and, in an unpadded batch, two aten ops (``benchmarks/step_ops.py`` counts
them). Where the cache is a small part of a step's memory traffic (batch 1 at 7B: 0.3 GB of keys and values
against 13.5 GB of weights) a pruned step can only match an unpruned one; the ratio ``step_speedup`` shows
what the runtime costs there, and what a smaller cache gains at larger batches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import lofi
from benchmarks.prefill import kv_bytes
from benchmarks.shapes import add_shape_arguments, shape_model, shared_settings

DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")  # the workspace settings under which cuBLAS is deterministic


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


@contextmanager
def deterministic(cuda: bool) -> Iterator[None]:
    """Deterministic kernels while active, the previous settings restored after: ``torch.use_deterministic_algorithms``
    (warn only: an op without a deterministic kernel warns, naming itself, and runs), cuDNN's deterministic
    algorithms without benchmarking, and on CUDA ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS reads when
    CUDA starts in the process: so it must be entered before the model is on the GPU."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if cuda and config not in DETERMINISTIC_CUBLAS and torch.cuda.is_initialized():
        raise RuntimeError("deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts: enter "
                           "deterministic() before moving anything to the GPU, or export it before starting Python")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if cuda and config not in DETERMINISTIC_CUBLAS:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS[0]
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]
        if cuda and config not in DETERMINISTIC_CUBLAS:
            if config is None:
                os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
            else:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = config


def agreement(reference, other, prompt_length: int) -> tuple[float, bool, float]:
    """How two greedy ``generate()`` outputs of the same inputs agree: (share of generated tokens that are equal,
    whether every step's logits are bit-identical, largest |difference| of the first step's logits)."""
    new = slice(prompt_length, None)
    same = (reference.sequences[:, new] == other.sequences[:, new]).double().mean().item()
    identical = torch.equal(reference.sequences, other.sequences) and all(
        torch.equal(a, b) for a, b in zip(reference.logits, other.logits, strict=True))
    first = (reference.logits[0] - other.logits[0]).abs().max().item()
    return same, identical, first


def smallest_top2_gap(out) -> float:
    """The smallest gap, over every step and sample of a greedy ``generate()`` output, between the two largest
    logits: how small a change of the logits can change a greedy token."""
    return min((top[..., 0] - top[..., 1]).min().item() for top in (step.topk(2).values for step in out.logits))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser, "overhead")
    parser.add_argument("--methods", nargs="+", default=["fastv", "lofi", "random"])
    parser.add_argument("--keep", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", type=int, default=None,
                        help="K for every method that takes one (default: each method's own)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels (torch.use_deterministic_algorithms, cuDNN, cuBLAS workspace): "
                             "whether keep = 1 equals the baseline once kernels sum in a fixed order; slower, so "
                             "its times are not the default run's")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first token comes with the prefill)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1 (timed pairs, after one pair that warms up)")
    cuda = args.device.startswith("cuda")
    with deterministic(cuda) if args.deterministic else nullcontext():
        return _measure(args, cuda)


def _measure(args, cuda: bool) -> list[dict]:
    _, model, inputs = shape_model(args.shape, args.batch, args.device, getattr(torch, args.dtype),
                                   args.text_layers, args.vision_layers)
    clock = StepClock(cuda)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    stopping_criteria=StoppingCriteriaList([clock]), return_dict_in_generate=True,
                    output_logits=True, pad_token_id=0)
    prompt_length = inputs["input_ids"].shape[1]

    def run(method):
        with lofi.pruned(model, method) if method is not None else nullcontext():
            clock.start()
            out = model.generate(**inputs, **settings)
        first, step = clock.split()
        return (first, step, clock.stamps[-1] - clock.stamps[0]), kv_bytes(out.past_key_values), out

    print(f"shape={args.shape} device={args.device} dtype={args.dtype} batch={args.batch} new tokens="
          f"{args.new_tokens} layer K={'default' if args.layer is None else args.layer} repeats={args.repeats} "
          f"threads={torch.get_num_threads()} deterministic={'yes' if args.deterministic else 'no'}",
          flush=True)
    shared = shared_settings(model, args.methods, args.layer)
    rows = []
    with torch.inference_mode():
        previous = run(None)[2]  # warm-up
        for name in args.methods:
            for keep in args.keep:
                method = lofi.build(name, shared=shared, keep=keep)
                times, pruned_vs_base, control = {"base": [], "pruned": []}, [], []
                for repeat in range(args.repeats + 1):  # the first pair warms up
                    base, pruned = run(None), run(method)
                    if repeat:
                        times["base"].append(base[0])
                        times["pruned"].append(pruned[0])
                        pruned_vs_base.append(agreement(base[2], pruned[2], prompt_length))
                        control.append(agreement(previous, base[2], prompt_length))
                    previous = base[2]
                median = {kind: [statistics.median(r[i] for r in runs) for i in range(3)]
                          for kind, runs in times.items()}
                (first_b, step_b, total_b), (first_p, step_p, total_p) = median["base"], median["pruned"]
                row = {
                    "method": name, "keep": keep, "first_token_ms_base": 1000 * first_b,
                    "first_token_ms_pruned": 1000 * first_p, "step_ms_base": 1000 * step_b,
                    "step_ms_pruned": 1000 * step_p, "step_speedup": step_b / step_p,
                    "total_ms_base": 1000 * total_b, "total_ms_pruned": 1000 * total_p,
                    "total_speedup": total_b / total_p, "kv_mb_base": base[1] / 2**20,
                    "kv_mb_pruned": pruned[1] / 2**20, "top2_gap_min_base": smallest_top2_gap(base[2])}
                for suffix, pairs in (("", pruned_vs_base), ("_control", control)):
                    row[f"same_tokens{suffix}"] = statistics.fmean(p[0] for p in pairs)
                    row[f"identical_logits{suffix}"] = all(p[1] for p in pairs)
                    row[f"first_logits_max_diff{suffix}"] = max(p[2] for p in pairs)
                rows.append(row)
                print(f"{name:>9} keep={keep:<5} first token {1000 * first_b:8.1f} -> {1000 * first_p:8.1f} ms  "
                      f"step {1000 * step_b:7.2f} -> {1000 * step_p:7.2f} ms ({step_b / step_p:4.2f}x)  "
                      f"total {total_b / total_p:4.2f}x  same tokens {row['same_tokens']:.0%} (control "
                      f"{row['same_tokens_control']:.0%}), identical logits {_yes(row['identical_logits'])} "
                      f"(control {_yes(row['identical_logits_control'])}), first-step logits max |diff| "
                      f"{row['first_logits_max_diff']:.3g} (control {row['first_logits_max_diff_control']:.3g})",
                      flush=True)
    import pandas as pd
    print()
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))
    return rows


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


if __name__ == "__main__":
    main()
