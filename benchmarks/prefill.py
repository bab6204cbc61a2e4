"""Prefill wall time and memory of baseline vs each pruning method, measured in one run.

    python benchmarks/prefill.py                        # mid-size random LLaVA on CPU (16 x 1024)
    python benchmarks/prefill.py --shape llava-1.5-7b --device cuda --dtype bfloat16
    python benchmarks/prefill.py --shape qwen2.5-vl-7b --text-layers 4 --vision-layers 1   # fewer layers
    python benchmarks/prefill.py --shape llava-7b --device cuda --dtype bfloat16 --compile reduce-overhead

``--shape`` is ``mid``, ``overhead`` (7B depth at width 64: per-op overhead, as at batch 1 on a GPU) or a
checkpoint of ``lofi.configs`` (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL at 7B; random
weights of the true widths), with the benchmark image of
``lofi.configs.BENCHMARK_IMAGES`` (672 x 672 for LLaVA-NeXT and Qwen, 768 x 768 for OneVision) and 30
text tokens. For every (method, keep) the script times ``model(**inputs, logits_to_keep=1)`` (the
prefill that ``generate`` runs first), interleaving the baseline with the pruned runs so that drifts in
machine speed hit both, and prints the measured speedup beside the speedup the FLOPs predict
(``lofi.count_flops``; the whole-model ratio, since the whole forward pass is timed). It also times the
method's own selection (``select``) as a share of the pruned prefill, beside the share its FLOPs set
(``select_flops_share``: the FLOPs of a method's decision work, ``decision_flops``, over the pruned
prefill's; LVPruning's decision modules, FastV's rebuilt keys; LoFi's decomposition is not counted), times
the vision tower inside each prefill (``vision_ms``) to give the ratio without it
(``rest_measured/predicted``: what pruning gains where it acts, apart from how well the unpruned vision
tower runs), and reports the KV cache held after prefill (exact bytes of the cache tensors) and the peak memory of the
forward pass: on CUDA the allocator's peak, on Linux CPUs the growth of the process's peak RSS (VmHWM,
reset before each run).
``--compile [MODE]`` runs baseline and pruned prefills through ``lofi.compiled`` (the compiled path).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

import lofi
from lofi import configs
from lofi.families import family_class
from lofi.linalg import current_eigh_route
from lofi.methods.lvpruning import DecisionModules

MID = dict(text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16),
           vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4),
           image_size=336)
# LLaVA-1.5-7B's depth (32 text, 24 vision layers) at width 64, 64 visual tokens: every op is tiny, so the time
# is the per-op overhead (Python, dispatch) that dominates a batch-1 prefill on a GPU
OVERHEAD = dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=2),
                vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=2),
                image_size=112)
SMALL = {"mid": MID, "overhead": OVERHEAD}
SHAPES = [*SMALL, *configs.CHECKPOINTS]
ALIASES = {"llava-7b": "llava-1.5-7b"}
N_TEXT = 30  # LVPruning's Table 1 setting: 576 visual + 30 text tokens
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune-no-cudagraphs"]


def add_shape_arguments(parser: argparse.ArgumentParser, default_shape: str) -> None:
    """The options every prefill-shaped benchmark shares: the model's shape and depth, the device, dtype and
    batch (read back by ``shape_model``)."""
    parser.add_argument("--shape", choices=SHAPES + sorted(ALIASES), default=default_shape)
    parser.add_argument("--text-layers", type=int, help="fewer language-model layers (default: the shape's)")
    parser.add_argument("--vision-layers", type=int, help="fewer vision layers (default: the shape's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1)


def shape_config(shape: str, text_layers: int | None = None, vision_layers: int | None = None):
    """``mid`` (a mid-size LLM, small vision tower: most of the time is in the decoder, as in LLaVA-1.5-7B),
    ``overhead`` (tiny widths at 7B depth: the time is per-op overhead), or a 7B checkpoint's configuration,
    optionally with fewer layers."""
    shape = ALIASES.get(shape, shape)
    if shape not in SMALL:
        return configs.config(shape, text_layers, vision_layers)
    small = SMALL[shape]
    text = {**small["text"], **({} if text_layers is None else {"num_hidden_layers": text_layers})}
    vision = {**small["vision"], **({} if vision_layers is None else {"num_hidden_layers": vision_layers})}
    return LlavaConfig(vision_config=CLIPVisionConfig(image_size=small["image_size"], patch_size=14, **vision),
                       text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **text),
                       image_token_index=32000, vision_feature_layer=-2)


def build_model(config, device: str, dtype: torch.dtype):
    model_class = getattr(transformers, family_class(config).classes[0])
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def benchmark_image(shape: str):
    return configs.BENCHMARK_IMAGES.get(ALIASES.get(shape, shape))


def shape_model(shape: str, batch: int, device: str, dtype: torch.dtype, text_layers: int | None = None,
                vision_layers: int | None = None):
    """(config, random-weight model, inputs) of a benchmark shape: its benchmark image and ``N_TEXT`` text
    tokens per sample, pixels in ``dtype``."""
    config = shape_config(shape, text_layers, vision_layers)
    inputs = configs.synthetic_inputs(config, benchmark_image(shape), N_TEXT, batch, device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return config, build_model(config, device, dtype), inputs


def shared_settings(model, methods: list[str], layer: int) -> dict:
    """The run-wide settings ``lofi.build`` hands the methods that take them: K, and for LVPruning random
    decision modules on the model's device and dtype (their cost, not their choices, is what is timed)."""
    shared = {"layer": layer}
    if any("modules" in lofi.options(method) for method in methods):
        parameter = next(model.parameters())
        shared["modules"] = DecisionModules.for_model(model).to(parameter.device, parameter.dtype)
    return shared


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser, "mid")
    parser.add_argument("--methods", nargs="+", default=["fastv", "lofi", "random", "lvpruning"])
    parser.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                        help="baseline and pruned prefills both through lofi.compiled (torch.compile mode; "
                             "default: 'default'); the first pair, which compiles, is not timed")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1 (timed pairs, after one pair that warms up)")
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    config, model, inputs = shape_model(args.shape, args.batch, args.device, dtype, args.text_layers,
                                        args.vision_layers)
    image = benchmark_image(args.shape)
    family = lofi.families.family_for(model)
    is_visual = family.visual_mask(inputs["input_ids"][:1])
    n_visual = int(is_visual.sum())
    n_text = inputs["input_ids"].shape[1] - n_visual
    base_flops = lofi.count_flops(config, n_text, n_visual, image=image)
    layers = config.text_config.num_hidden_layers

    def prefill():
        sync()
        if args.compile:  # a new step for CUDA graphs: the previous prefill's outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        start = time.perf_counter()
        out = model(**inputs, logits_to_keep=1)
        sync()
        return time.perf_counter() - start, out

    vision = Stopwatch(cuda)

    def measure(instance):
        """(seconds, vision-tower seconds, peak MiB, KV bytes, handle) of one prefill, unpruned when
        ``instance`` is None."""
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rss = reset_cpu_peak()
        vision.reset()
        with (lofi.pruned(model, instance) if instance is not None else nullcontext()) as handle, \
                timed_module(family.vision_tower(), vision):
            seconds, out = prefill()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else cpu_peak_mb(rss)
        return seconds, vision.seconds, peak, kv_bytes(out.past_key_values), handle

    print(f"shape={args.shape} ({layers} text layers, {family_class(config).name}) image={image} "
          f"visual tokens={n_visual} text tokens={n_text} device={args.device} dtype={args.dtype} batch={args.batch} "
          f"threads={torch.get_num_threads()} layer K={args.layer} repeats={args.repeats} "
          f"compile={args.compile or 'no'} eigh={current_eigh_route()}", flush=True)
    shared = shared_settings(model, args.methods, args.layer)
    rows = []
    compiling = lofi.compiled(model, mode=args.compile) if args.compile else nullcontext()
    with compiling, torch.inference_mode():
        prefill()  # warm-up
        for method in args.methods:
            for keep in args.keep:
                instance = lofi.build(method, shared=shared, keep=keep)
                timer = TimedSelect(instance, cuda)
                base_times, pruned_times, base_vision, pruned_vision, select_times = [], [], [], [], []
                for repeat in range(args.repeats + 1):  # the first pair warms up
                    base_t, base_v, base_peak, base_kv, _ = measure(None)
                    timer.reset()
                    pruned_t, pruned_v, pruned_peak, pruned_kv, handle = measure(instance)
                    if repeat:
                        base_times.append(base_t)
                        pruned_times.append(pruned_t)
                        base_vision.append(base_v)
                        pruned_vision.append(pruned_v)
                        select_times.append(timer.seconds)
                n_prunable = int(handle.n_prunable[0])
                flops = lofi.method_flops(config, instance, n_text, n_visual, n_prunable, image)
                base_t, pruned_t = statistics.median(base_times), statistics.median(pruned_times)
                select_seconds = statistics.median(select_times)
                base_v, pruned_v = statistics.median(base_vision), statistics.median(pruned_vision)
                measured, predicted = base_t / pruned_t, base_flops.total / flops.total
                # everything but the vision tower, which no method prunes (decision work included)
                rest_measured = (base_t - base_v) / (pruned_t - pruned_v)
                rest_predicted = (base_flops.total - base_flops.vision) / (flops.total - flops.vision)
                rows.append({
                    "method": method, "keep": keep, "kept": int((handle.kept[-1][0] >= 0).sum()),
                    "baseline_ms": 1000 * base_t, "pruned_ms": 1000 * pruned_t,
                    "measured_speedup": measured, "flops_speedup": predicted,
                    "llm_flops_speedup": base_flops.llm / flops.llm,
                    "measured/predicted": measured / predicted,
                    "vision_ms": 1000 * base_v, "rest_measured/predicted": rest_measured / rest_predicted,
                    "select_ms": 1000 * select_seconds, "select_share": select_seconds / pruned_t,
                    "select_flops_share": flops.decision / flops.total,
                    "kv_mb_base": base_kv / 2**20, "kv_mb_pruned": pruned_kv / 2**20,
                    "peak_mb_base": base_peak, "peak_mb_pruned": pruned_peak,
                })
                r = rows[-1]
                print(f"{method:>9} keep={keep:<5} {r['baseline_ms']:8.1f} ms -> {r['pruned_ms']:8.1f} ms  "
                      f"speedup {measured:5.2f} (FLOPs {predicted:5.2f}, ratio {measured / predicted:4.2f})  "
                      f"select {r['select_ms']:6.2f} ms = {100 * r['select_share']:4.1f}% "
                      f"(its FLOPs {100 * r['select_flops_share']:4.1f}%)", flush=True)
    import pandas as pd
    frame = pd.DataFrame(rows)
    print()
    print(frame.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
