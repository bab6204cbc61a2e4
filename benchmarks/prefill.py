"""Prefill wall time and memory of baseline vs each pruning method, measured in one run.

    python -m benchmarks.prefill                        # mid-size random LLaVA on CPU (16 x 1024)
    python -m benchmarks.prefill --shape llava-1.5-7b --device cuda --dtype bfloat16
    python -m benchmarks.prefill --shape qwen2.5-vl-7b --text-layers 4 --vision-layers 1   # fewer layers
    python -m benchmarks.prefill --shape llava-7b --device cuda --dtype bfloat16 --compile reduce-overhead

``--shape`` is ``mid``, ``overhead`` (7B depth at width 64: per-op overhead, as at batch 1 on a GPU) or a
checkpoint of ``benchmarks.shapes`` (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL at 7B;
random weights of the true widths), with the benchmark image of ``benchmarks.shapes.BENCHMARK_IMAGES``
(672 x 672 for LLaVA-NeXT and Qwen, 768 x 768 for OneVision) and 30 text tokens. For every (method, keep)
the script times ``model(**inputs, logits_to_keep=1)`` (the prefill that ``generate`` runs first),
interleaving the baseline with the pruned runs so that drifts in machine speed hit both, and prints the
measured speedup beside the speedup the FLOPs predict (``lofi.count_flops``; the whole-model ratio, since
the whole forward pass is timed). It also times the method's own selection (``select``) as a share of the
pruned prefill, beside the share its FLOPs set (``select_flops_share``: the FLOPs of a method's decision
work, ``decision_flops``, over the pruned prefill's; LVPruning's decision modules, FastV's rebuilt keys;
LoFi's decomposition is not counted), times the vision tower inside each prefill (``vision_ms``) to give the
ratio without it (``rest_measured/predicted``: what pruning gains where it acts, apart from how well the
unpruned vision tower runs), and reports the KV cache held after prefill (exact bytes of the cache tensors)
and the peak memory of the forward pass: on CUDA the allocator's peak, on Linux CPUs the growth of the
process's peak RSS (VmHWM, reset before each run).
``--compile [MODE]`` runs baseline and pruned prefills through ``lofi.compiled`` (the compiled path), and
says at the end what happened to CUDA graphs over the run (``benchmarks.cudagraphs``: skips and their reasons,
graphs recorded; ``benchmarks.profile_prefill`` tells them apart per kind).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext
from typing import Iterator

import pandas as pd
import torch

import lofi
from benchmarks.cudagraphs import evidence
from benchmarks.shapes import add_shape_arguments, benchmark_image, shape_model, shared_settings
from lofi.families import family_class
from lofi.linalg import current_eigh_route

COMPILE_MODES = ["default", "reduce-overhead", "max-autotune-no-cudagraphs"]


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def reset_cpu_peak() -> int | None:
    """Reset the process's peak RSS (Linux: clear_refs 5) and return the current RSS in KiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _rss_kb("VmRSS")


def cpu_peak_mb(rss_before_kb: int | None) -> float | None:
    """Peak RSS growth since ``reset_cpu_peak`` in MiB (activations, KV cache, workspace)."""
    peak = _rss_kb("VmHWM")
    return None if rss_before_kb is None or peak is None else (peak - rss_before_kb) / 1024


def kv_bytes(cache) -> int:
    """Exact bytes of a KV cache's key and value tensors."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


class Stopwatch:
    """The summed time of spans marked with ``start`` / ``stop``: wall time on the CPU, CUDA events on a GPU
    (no synchronisation inside the prefill, which would drain the queue and slow the run it measures)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.reset()

    def reset(self) -> None:
        self._seconds, self._events, self._open, self.spans = 0.0, [], None, 0

    def start(self) -> None:
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._open = time.perf_counter()

    def stop(self) -> None:
        self.spans += 1
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._open, end))
        else:
            self._seconds += time.perf_counter() - self._open

    @property
    def seconds(self) -> float:
        """Time in the spans since ``reset`` (read after the prefill has synchronised)."""
        return self._seconds + sum(start.elapsed_time(end) for start, end in self._events) / 1000


class TimedSelect(Stopwatch):
    """Wraps a method instance's ``select`` and accumulates its time."""

    def __init__(self, method: lofi.PruningMethod, cuda: bool):
        super().__init__(cuda)
        self.method = method
        original = method.select

        def select(state):
            self.start()
            try:
                return original(state)
            finally:
                self.stop()

        method.select = select


@contextmanager
def timed_module(module: torch.nn.Module, watch: Stopwatch) -> Iterator[Stopwatch]:
    """Within the block, ``watch`` accumulates the time of every call of ``module`` (hooks, removed after)."""
    hooks = [module.register_forward_pre_hook(lambda *args: watch.start()),
             module.register_forward_hook(lambda *args: watch.stop())]
    try:
        yield watch
    finally:
        for hook in hooks:
            hook.remove()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser, "mid")
    parser.add_argument("--methods", nargs="+", default=["fastv", "lofi", "random", "lvpruning"])
    parser.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", type=int, default=None,
                        help="K for every method that takes one (default: each method's own)")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                        help="baseline and pruned prefills both through lofi.compiled (torch.compile mode; "
                             "default: 'default'); the first pair, which compiles, is not timed")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1 (timed pairs, after one pair that warms up)")
    return args


class PrefillTimer:
    """Times one prefill (``model(**inputs, logits_to_keep=1)``, what ``generate`` runs first) of a model,
    unpruned or under a method instance, with its vision tower, peak memory and KV cache."""

    def __init__(self, model, inputs: dict, compiled: bool):
        self.model, self.inputs, self.compiled = model, inputs, compiled
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.family = lofi.families.family_for(model)
        self.vision = Stopwatch(self.cuda)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def prefill(self):
        """(seconds, output) of one prefill."""
        self._sync()
        if self.compiled:  # a new step for CUDA graphs: the previous prefill's outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        start = time.perf_counter()
        out = self.model(**self.inputs, logits_to_keep=1)
        self._sync()
        return time.perf_counter() - start, out

    def measure(self, instance: lofi.PruningMethod | None):
        """(seconds, vision-tower seconds, peak MiB, KV bytes, handle) of one prefill, unpruned when
        ``instance`` is None."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        rss = reset_cpu_peak()
        self.vision.reset()
        with (lofi.pruned(self.model, instance) if instance is not None else nullcontext()) as handle, \
                timed_module(self.family.vision_tower(), self.vision):
            seconds, out = self.prefill()
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else cpu_peak_mb(rss)
        return seconds, self.vision.seconds, peak, kv_bytes(out.past_key_values), handle


def time_pairs(timer: PrefillTimer, instance: lofi.PruningMethod, repeats: int) -> dict:
    """Medians over ``repeats`` interleaved (baseline, pruned) pairs, after one pair that warms up: seconds of
    each and of their vision towers, the method's ``select`` seconds, the last pair's peaks and KV bytes, and
    the pruned run's handle."""
    select = TimedSelect(instance, timer.cuda)
    times: dict[str, list[float]] = {k: [] for k in ("base", "pruned", "base_vision", "pruned_vision", "select")}
    for repeat in range(repeats + 1):  # the first pair warms up
        base_t, base_v, base_peak, base_kv, _ = timer.measure(None)
        select.reset()
        pruned_t, pruned_v, pruned_peak, pruned_kv, handle = timer.measure(instance)
        if repeat:
            for key, value in zip(times, (base_t, pruned_t, base_v, pruned_v, select.seconds)):
                times[key].append(value)
    return {**{k: statistics.median(v) for k, v in times.items()}, "base_peak": base_peak,
            "pruned_peak": pruned_peak, "base_kv": base_kv, "pruned_kv": pruned_kv, "handle": handle}


def condition_row(method: str, keep: float, timed: dict, flops: lofi.Flops, base_flops: lofi.Flops) -> dict:
    """One table row: the measured speedup beside the FLOPs-predicted one (whole model, and without the vision
    tower, which no method prunes; decision work included), the method's share, KV cache and peaks."""
    base_t, pruned_t = timed["base"], timed["pruned"]
    measured, predicted = base_t / pruned_t, base_flops.total / flops.total
    rest_measured = (base_t - timed["base_vision"]) / (pruned_t - timed["pruned_vision"])
    rest_predicted = (base_flops.total - base_flops.vision) / (flops.total - flops.vision)
    return {
        "method": method, "keep": keep, "kept": int((timed["handle"].kept[-1][0] >= 0).sum()),
        "baseline_ms": 1000 * base_t, "pruned_ms": 1000 * pruned_t,
        "measured_speedup": measured, "flops_speedup": predicted,
        "llm_flops_speedup": base_flops.llm / flops.llm,
        "measured/predicted": measured / predicted,
        "vision_ms": 1000 * timed["base_vision"], "rest_measured/predicted": rest_measured / rest_predicted,
        "select_ms": 1000 * timed["select"], "select_share": timed["select"] / pruned_t,
        "select_flops_share": flops.decision / flops.total,
        "kv_mb_base": timed["base_kv"] / 2**20, "kv_mb_pruned": timed["pruned_kv"] / 2**20,
        "peak_mb_base": timed["base_peak"], "peak_mb_pruned": timed["pruned_peak"],
    }


def time_conditions(args: argparse.Namespace) -> list[dict]:
    """Every (method, keep) of ``args`` timed against the unpruned prefill of the shape's model; a line per
    row as it is measured."""
    dtype = getattr(torch, args.dtype)
    config, model, inputs = shape_model(args.shape, args.batch, args.device, dtype, args.text_layers,
                                        args.vision_layers)
    image = benchmark_image(args.shape)
    timer = PrefillTimer(model, inputs, compiled=bool(args.compile))
    n_visual = int(timer.family.visual_mask(inputs["input_ids"][:1]).sum())
    n_text = inputs["input_ids"].shape[1] - n_visual
    base_flops = lofi.count_flops(config, n_text, n_visual, image=image)
    print(f"shape={args.shape} ({config.text_config.num_hidden_layers} text layers, {family_class(config).name}) "
          f"image={image} visual tokens={n_visual} text tokens={n_text} device={args.device} dtype={args.dtype} "
          f"batch={args.batch} threads={torch.get_num_threads()} "
          f"layer K={'default' if args.layer is None else args.layer} repeats={args.repeats} "
          f"compile={args.compile or 'no'} eigh={current_eigh_route()}", flush=True)
    shared = shared_settings(model, args.methods, args.layer)
    rows = []
    compiling = lofi.compiled(model, mode=args.compile) if args.compile else nullcontext()
    with compiling, torch.inference_mode(), evidence() as graphs:
        timer.prefill()  # warm-up
        for method in args.methods:
            for keep in args.keep:
                instance = lofi.build(method, shared=shared, keep=keep)
                timed = time_pairs(timer, instance, args.repeats)
                n_prunable = int(timed["handle"].n_prunable[0])
                flops = lofi.method_flops(config, instance, n_text, n_visual, n_prunable, image)
                r = condition_row(method, keep, timed, flops, base_flops)
                rows.append(r)
                print(f"{method:>9} keep={keep:<5} {r['baseline_ms']:8.1f} ms -> {r['pruned_ms']:8.1f} ms  "
                      f"speedup {r['measured_speedup']:5.2f} (FLOPs {r['flops_speedup']:5.2f}, "
                      f"ratio {r['measured/predicted']:4.2f})  select {r['select_ms']:6.2f} ms = "
                      f"{100 * r['select_share']:4.1f}% (its FLOPs {100 * r['select_flops_share']:4.1f}%)", flush=True)
    if args.compile:
        print(graphs.summary())
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, three significant digits."""
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g")


def main(argv: list[str] | None = None) -> list[dict]:
    rows = time_conditions(parse_args(argv))
    print()
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
