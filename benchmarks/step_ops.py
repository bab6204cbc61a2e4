"""What one ``generate()`` decoding step dispatches, unpruned and pruned: its aten ops, the runtime's among them,
and on a GPU the device's busy time beside the step's wall time.

    python -m benchmarks.step_ops --shape overhead --batch 16 --keep 0.25       # op counts, CPU
    python -m benchmarks.step_ops --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 16 --keep 0.25

Per condition (unpruned, then each method at ``--keep``) one greedy ``generate()`` of ``--new-tokens`` tokens
runs under a ``TorchDispatchMode`` that counts each step's aten ops (a stopping criterion closes each step's
count), split into the runtime's (dispatched where the nearest frame of ``lofi`` or ``transformers`` on the
stack is lofi's) and the rest (the model's and ``generate``'s own); the runtime's ops of a decoding step are
listed with the line that dispatched them. Then it times the decoding steps (``benchmarks.generate.StepClock``,
median of ``--repeats`` runs) and, on a GPU, profiles a run of ``--new-tokens`` tokens and one of a single
token under ``torch.profiler``: their difference, over the ``--new-tokens - 1`` decoding steps, is a step's
kernel launches and the device's busy time (the sum of its kernel durations). A step whose wall time is
several times its busy time waits on the host (Python, dispatch, launches): a smaller KV cache, which shortens
only the attention kernels, cannot shorten such a step.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import StoppingCriteria, StoppingCriteriaList

import lofi
from benchmarks.generate import StepClock
from benchmarks.profile_prefill import summarize
from benchmarks.shapes import add_shape_arguments, shape_model, shared_settings

LOFI = str(Path(lofi.__file__).parent) + "/"
TRANSFORMERS = str(Path(transformers.__file__).parent) + "/"


def runtime_line(frame) -> str | None:
    """``file:line function`` of the lofi code that dispatched the op being run from ``frame``, or None where
    the nearest frame of lofi or transformers is transformers' (the model's, or ``generate``'s, op)."""
    while frame is not None:
        file = frame.f_code.co_filename
        if file.startswith(LOFI):
            return f"lofi/{file[len(LOFI):]}:{frame.f_lineno} {frame.f_code.co_name}"
        if file.startswith(TRANSFORMERS):
            return None
        frame = frame.f_back
    return None


class StepOps(TorchDispatchMode):
    """Counts the aten ops of each ``generate()`` step: ``steps[i]`` is (the model's and generate's ops, a Counter
    of the runtime's by (op, line)); ``cut``, a stopping criterion, closes a step."""

    def __init__(self):
        super().__init__()
        self.steps: list[tuple[list[int], collections.Counter]] = [([0], collections.Counter())]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        line = runtime_line(sys._getframe(1))
        model, runtime = self.steps[-1]
        if line is None:
            model[0] += 1
        else:
            runtime[(str(func), line)] += 1
        return func(*args, **(kwargs or {}))

    def cut(self) -> StoppingCriteria:
        steps = self.steps

        class Cut(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                steps.append(([0], collections.Counter()))
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        return Cut()

    def decoding_steps(self) -> list[tuple[int, collections.Counter]]:
        """(model ops, runtime ops by (op, line)) of each decoding step: not the prefill's step (the first), nor
        what ``generate`` runs after its last step."""
        return [(model[0], runtime) for model, runtime in self.steps[1:-1]]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser, "overhead")
    parser.set_defaults(batch=16)
    parser.add_argument("--methods", nargs="+", default=["fastv", "lofi"])
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--layer", type=int, default=None,
                        help="K for every method that takes one (default: each method's own)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per condition, after one warm-up")
    args = parser.parse_args(argv)
    if args.new_tokens < 3:
        parser.error("--new-tokens must be at least 3 (the prefill's token, then at least two decoding steps)")
    cuda = args.device.startswith("cuda")
    _, model, inputs = shape_model(args.shape, args.batch, args.device, getattr(torch, args.dtype),
                                   args.text_layers, args.vision_layers)
    shared = shared_settings(model, args.methods, args.layer)
    conditions = [("unpruned", None)] + [(f"{name} keep={args.keep}", lofi.build(name, shared=shared, keep=args.keep))
                                         for name in args.methods]

    def generate(method, new_tokens: int, criterion=None):
        stopping = StoppingCriteriaList([criterion] if criterion is not None else [])
        with lofi.pruned(model, method) if method is not None else nullcontext():
            return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0, stopping_criteria=stopping)

    print(f"shape={args.shape} device={args.device} dtype={args.dtype} batch={args.batch} new tokens="
          f"{args.new_tokens} threads={torch.get_num_threads()}", flush=True)
    rows = []
    with torch.inference_mode():
        for label, method in conditions:
            generate(method, args.new_tokens)  # warm-up
            ops = StepOps()
            with ops:
                generate(method, args.new_tokens, ops.cut())
            steps = ops.decoding_steps()
            model_ops = [m for m, _ in steps]
            runtime_ops = [sum(r.values()) for _, r in steps]
            clock, step_s = StepClock(cuda), []
            for _ in range(args.repeats):
                clock.start()
                generate(method, args.new_tokens, clock)
                step_s.append(clock.split()[1])
            row = {"condition": label, "model_ops_per_step": statistics.fmean(model_ops),
                   "runtime_ops_per_step": statistics.fmean(runtime_ops), "step_ms": 1000 * statistics.median(step_s)}
            if cuda:
                row |= device_per_step(lambda n: generate(method, n), args.new_tokens)
            rows.append(row)
            spread = "" if len(set(model_ops)) == 1 else f" ({min(model_ops)}-{max(model_ops)})"
            print(f"{label:>18}: a decoding step dispatches {row['model_ops_per_step']:.0f}{spread} ops of the model "
                  f"and generate, {row['runtime_ops_per_step']:.0f} of the runtime; {row['step_ms']:.2f} ms"
                  + (f", {row['launches_per_step']:.0f} kernel launches, device busy {row['device_ms_per_step']:.2f} ms"
                     if cuda else ""), flush=True)
            for (op, line), count in sorted(steps[-1][1].items(), key=lambda item: item[0][1]):
                print(f"{'':>20}{count} x {op}  ({line})")
    import pandas as pd
    print()
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g"))
    return rows


def device_per_step(generate, new_tokens: int) -> dict:
    """Kernel launches and device busy ms of one decoding step on a GPU: a profiled ``generate(new_tokens)`` less a
    profiled ``generate(1)``, over the ``new_tokens - 1`` steps between them."""
    totals = []
    for n in (new_tokens, 1):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate(n)
            torch.cuda.synchronize()
        totals.append(summarize(prof.key_averages(), cuda=True))
    long, short = totals
    steps = new_tokens - 1
    return {"launches_per_step": (long["kernel launches"] - short["kernel launches"]) / steps,
            "device_ms_per_step": (long["device busy ms"] - short["device busy ms"]) / steps}


if __name__ == "__main__":
    main()
