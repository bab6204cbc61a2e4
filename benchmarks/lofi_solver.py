"""LoFi's two routes to leverage scores: the kept sets they agree on, and what each costs.

    python benchmarks/lofi_solver.py                         # bundled model (real hidden states) + 7B shape
    python benchmarks/lofi_solver.py --device cuda --batch 16

For the visual hidden states entering layer K = 2, the exact route (an eigendecomposition of
H_v H_v^T) and the randomized one (subspace iteration, ``lofi.linalg.leverage_at_energy_randomized``)
give leverage scores; the script reports the energy rank k each reads at tau = 0.9, the share of kept
tokens the two choose alike at keep 0.5 / 0.25 / 0.1 (|kept_exact & kept_randomized| / n_keep, mean and
worst sample), and the median time of each route on the batch. Two sources of hidden states: the
bundled model on the first ``--batch`` test questions (real states, 144 visual tokens), and a random-weight
LLaVA-1.5-7B shape (576 visual tokens, ``--text-layers`` decoder layers) on synthetic inputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
import torch

from analysis.benchmark.datasets import load_split
from analysis.study.models import batch_inputs, load_model
from benchmarks.prefill import shape_model
from lofi.families import family_for
from lofi.linalg import leverage_at_energy, leverage_at_energy_randomized

LAYER, TAU = 2, 0.9


@torch.no_grad()
def visual_states(model, inputs) -> torch.Tensor:
    """[batch, n_visual, d] float32 hidden states of the visual tokens entering decoder layer ``LAYER``."""
    family = family_for(model)
    seen = []
    hook = family.layers()[LAYER].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    hidden, visual = seen[0].float(), family.visual_mask(inputs["input_ids"])
    return hidden[visual].view(len(hidden), -1, hidden.shape[-1])


def compare(name: str, H: torch.Tensor, sync, repeats: int) -> list[dict]:
    exact, k_exact = leverage_at_energy(H, TAU)
    fast, k_fast = leverage_at_energy_randomized(H, TAU)
    times = {}
    for route, fn in (("exact", leverage_at_energy), ("randomized", leverage_at_energy_randomized)):
        spent = []
        for _ in range(repeats + 1):
            sync()
            start = time.perf_counter()
            fn(H, TAU)
            sync()
            spent.append(time.perf_counter() - start)
        times[route] = statistics.median(spent[1:])
    rows = []
    for keep in (0.5, 0.25, 0.1):
        n = max(1, round(keep * H.shape[1]))
        alike = [len(set(a.topk(n).indices.tolist()) & set(b.topk(n).indices.tolist())) / n
                 for a, b in zip(exact.cpu(), fast.cpu())]
        rows.append({"states": name, "tokens": H.shape[1], "width": H.shape[2], "batch": len(H),
                     "k_exact": f"{int(k_exact.min())}-{int(k_exact.max())}",
                     "k_randomized": f"{int(k_fast.min())}-{int(k_fast.max())}", "keep": keep,
                     "kept_alike_mean": sum(alike) / len(alike), "kept_alike_min": min(alike),
                     "exact_ms": 1000 * times["exact"], "randomized_ms": 1000 * times["randomized"]})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text-layers", type=int, default=3, help="decoder layers of the 7B shape")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model, processor = load_model(device=args.device)
    inputs = batch_inputs(processor, load_split("test", limit=args.batch)).to(args.device)
    rows = compare("bundled model, layer 2", visual_states(model, inputs), sync, args.repeats)
    _, model, inputs = shape_model("llava-1.5-7b", args.batch, args.device, torch.float32, args.text_layers, 1)
    rows += compare("llava-1.5-7b shape (random weights), layer 2", visual_states(model, inputs), sync, args.repeats)
    print(f"device={args.device} threads={torch.get_num_threads()} tau={TAU}")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
