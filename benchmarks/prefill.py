"""Prefill wall time and memory of baseline vs each pruning method, measured in one run.

    python benchmarks/prefill.py                        # mid-size random LLaVA on CPU (16 x 1024)
    python benchmarks/prefill.py --shape llava-7b --device cuda --dtype bfloat16

For every (method, keep) the script times ``model(**inputs, logits_to_keep=1)`` (the prefill that
``generate`` runs first), interleaving the baseline with the pruned runs so that drifts in machine
speed hit both, and prints the measured speedup beside the speedup the FLOPs predict
(``lofi.count_flops``; the whole-model ratio, since the whole forward pass is timed). It also times the
method's own selection (``select``) as a share of the pruned prefill, and reports the KV cache held
after prefill (exact bytes of the cache tensors) and the peak memory of the forward pass: on CUDA the
allocator's peak, on Linux CPUs the growth of the process's peak RSS (VmHWM, reset before each run).
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lofi  # noqa: E402

SHAPES = {
    # mid-size LLM, small vision tower: most of the time is in the decoder, as in LLaVA-1.5-7B
    "mid": dict(text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16),
                vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4)),
    "llava-7b": dict(text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32),
                     vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16)),
}
N_TEXT = 30  # LVPruning's Table 1 setting: 576 visual + 30 text tokens


def shape_config(shape: str) -> LlavaConfig:
    spec = SHAPES[shape]
    text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **spec["text"])
    vision = CLIPVisionConfig(image_size=336, patch_size=14, **spec["vision"])
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2)


def build_model(shape: str, device: str, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    config = shape_config(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def make_inputs(batch: int, device: str) -> dict:
    ids = [1, 3148, 1001, 29901, 29871] + [32000] * 576 + list(range(400, 400 + N_TEXT - 5))
    return {"input_ids": torch.tensor([ids] * batch, device=device),
            "attention_mask": torch.ones(batch, len(ids), dtype=torch.long, device=device),
            "pixel_values": torch.randn(batch, 3, 336, 336, device=device)}


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


class TimedSelect:
    """Wraps a method instance's ``select`` and accumulates its wall time."""

    def __init__(self, method: lofi.PruningMethod, sync):
        self.method, self.sync, self.seconds = method, sync, 0.0
        original = method.select

        def select(state):
            sync()
            start = time.perf_counter()
            out = original(state)
            sync()
            self.seconds += time.perf_counter() - start
            return out

        method.select = select


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--methods", nargs="+", default=["fastv", "lofi", "random", "lvpruning"])
    parser.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", type=int, default=2)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build_model(args.shape, args.device, dtype)
    inputs = make_inputs(args.batch, args.device)
    config = model.config
    base_flops = lofi.count_flops(config, N_TEXT, 576)

    def prefill():
        sync()
        start = time.perf_counter()
        out = model(**inputs, logits_to_keep=1)
        sync()
        return time.perf_counter() - start, out

    def kv_bytes(out) -> int:
        return sum(t.numel() * t.element_size() for layer in out.past_key_values.layers
                   for t in (layer.keys, layer.values))

    def measure(instance):
        """(seconds, peak MiB, KV bytes, handle) of one prefill, unpruned when ``instance`` is None."""
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rss = reset_cpu_peak()
        with (lofi.pruned(model, instance) if instance is not None else nullcontext()) as handle:
            seconds, out = prefill()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else cpu_peak_mb(rss)
        return seconds, peak, kv_bytes(out), handle

    print(f"shape={args.shape} device={args.device} dtype={args.dtype} batch={args.batch} "
          f"threads={torch.get_num_threads()} layer K={args.layer} repeats={args.repeats}", flush=True)
    rows = []
    with torch.inference_mode():
        prefill()  # warm-up
        for method in args.methods:
            for keep in args.keep:
                if method == "lvpruning":  # random decision modules: their cost is what is timed here
                    from lofi.methods.lvpruning import DecisionModules
                    instance = lofi.build(method, keep=keep)
                    instance.modules = DecisionModules.for_model(model).to(args.device, dtype)
                else:
                    instance = lofi.build(method, keep=keep, layer=args.layer)
                timer = TimedSelect(instance, sync)
                base_times, pruned_times = [], []
                for repeat in range(args.repeats + 1):  # the first pair warms up
                    base_t, base_peak, base_kv, _ = measure(None)
                    timer.seconds = 0.0
                    pruned_t, pruned_peak, pruned_kv, handle = measure(instance)
                    if repeat:
                        base_times.append(base_t)
                        pruned_times.append(pruned_t)
                        select_seconds = timer.seconds
                schedule = instance.schedule(config.text_config.num_hidden_layers, 576)
                present = [576] + [n for _, n in schedule[:-1]]
                flops = lofi.count_flops(config, N_TEXT, 576, schedule,
                                         decision=instance.decision_flops(config, N_TEXT, present))
                base_t, pruned_t = statistics.median(base_times), statistics.median(pruned_times)
                measured, predicted = base_t / pruned_t, base_flops.total / flops.total
                rows.append({
                    "method": method, "keep": keep, "kept": handle.kept[0].shape[1],
                    "baseline_ms": 1000 * base_t, "pruned_ms": 1000 * pruned_t,
                    "measured_speedup": measured, "flops_speedup": predicted,
                    "llm_flops_speedup": base_flops.llm / flops.llm,
                    "measured/predicted": measured / predicted,
                    "select_ms": 1000 * select_seconds, "select_share": select_seconds / pruned_t,
                    "kv_mb_base": base_kv / 2**20, "kv_mb_pruned": pruned_kv / 2**20,
                    "peak_mb_base": base_peak, "peak_mb_pruned": pruned_peak,
                })
                r = rows[-1]
                print(f"{method:>7} keep={keep:<5} {r['baseline_ms']:8.1f} ms -> {r['pruned_ms']:8.1f} ms  "
                      f"speedup {measured:5.2f} (FLOPs {predicted:5.2f}, ratio {measured / predicted:4.2f})  "
                      f"select {r['select_ms']:6.2f} ms = {100 * r['select_share']:4.1f}%", flush=True)
    import pandas as pd
    frame = pd.DataFrame(rows)
    print()
    print(frame.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
