"""LoFi's routes to leverage scores: the kept sets they agree on, and what each costs.

    python -m benchmarks.lofi_solver                         # bundled model (real hidden states) + 7B shape
    python -m benchmarks.lofi_solver --device cuda --batch 16 --large-tokens 3699

For the visual hidden states entering layer K = 2, several routes give leverage scores: the exact one
(an eigendecomposition of H_v H_v^T through ``torch.linalg.eigh``); the products one (trace-correcting
purification, ``lofi.linalg.leverage_at_energy_products``: batched matrix products only); the randomized
one (subspace iteration on a thin block, then products on the block,
``lofi.linalg.leverage_at_energy_randomized``; where the energy is spread it hands over to the products
route on a GPU and to the exact one on the CPU), once with torch's QR and once with CholeskyQR3 (its GPU
default); and, on a GPU only, the exact one with its eigendecompositions in one batched cuSOLVER call
(``lofi.linalg.eigh_route("cusolver-batched")``; a route that cannot run there is reported and skipped).
For each route the script reports the energy rank k it reads at tau = 0.9, the share of kept tokens it
chooses alike with the exact route at keep 0.5 / 0.25 / 0.1 (|kept_exact & kept_route| / n_keep, mean and
worst sample), its median time on the batch, and what it dispatches once (``OpCount``): aten ops (each a
kernel launch or a library call on a GPU), matrix products among them, decompositions (one call for a
whole batch, although torch's CUDA eigh then decomposes its matrices one at a time) and host reads. On a
GPU it also compares the two routes to a Gram matrix of bfloat16 rows (``lofi.linalg.gram``: one
tensor-core GEMM with float32 output, against the float32 cast's product) at the 7B shape: their largest
difference relative to the largest entry, and their times. Sources of hidden states:
- the bundled model on the first ``--batch`` test questions (real states, its visual tokens);
- a random-weight LLaVA-1.5-7B shape (576 visual tokens, ``--text-layers`` decoder layers) on synthetic
  inputs, whose energy is spread;
- synthetic states of that size with their energy in 12 directions, the regime real states are in;
- with ``--large-tokens N``: Gaussian (spread) and concentrated states of N x 3,584, LLaVA-OneVision-7B's
  width (N = 3,699: its visual tokens at the largest tiling), at half the batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from functools import partial

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from analysis.benchmark.datasets import load_split
from analysis.study.models import batch_inputs, load_model
from benchmarks.shapes import shape_model
from lofi.cusolver import CusolverError
from lofi.families import family_for
from lofi.linalg import eigh_route, gram, leverage_at_energy, leverage_at_energy_products, leverage_at_energy_randomized

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


def median_ms(fn, sync, repeats: int) -> float:
    spent = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        spent.append(time.perf_counter() - start)
    return 1000 * statistics.median(spent[1:])


def routes(device: str) -> dict:
    """Route name -> a function of (H, tau) giving (leverage, k)."""
    def batched(route):
        def run(H, tau):
            with eigh_route("cusolver-batched"):
                return route(H, tau)
        return run
    found = {"exact": leverage_at_energy, "products": leverage_at_energy_products}
    for method in ("householder", "cholesky"):  # the randomized route's default: cholesky on a GPU only
        found[f"randomized, {method}"] = partial(leverage_at_energy_randomized, orthonormalize=method)
    if device.startswith("cuda"):  # and the eigendecompositions in one call
        found["exact, cusolver-batched"] = batched(leverage_at_energy)
    return found


def concentrated_states(batch: int, rows: int, cols: int, device: str = "cpu", rank: int = 12,
                        noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    """[batch, rows, cols] synthetic states whose energy sits in ``rank`` directions (singular values
    decaying 10 -> 1 over them, plus ``noise``), as real hidden states' does (k = 7-8 on the bundled
    model): at a checkpoint's size, where the randomized route is meant to run (and in its tests)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, rows, rank, generator=g) * torch.logspace(1, 0, rank)
    H = A @ torch.randn(batch, rank, cols, generator=g) + noise * torch.randn(batch, rows, cols, generator=g)
    return H.to(device)


class OpCount(TorchDispatchMode):
    """Counts the aten ops a route dispatches (on a GPU each is a kernel launch or a library call):
    matrix products, decompositions (eigh, QR, Cholesky, triangular solves) and host reads."""

    PRODUCTS = ("mm", "bmm", "addmm", "baddbmm")
    DECOMPOSITIONS = ("linalg_eigh", "_linalg_eigh", "linalg_eigvalsh", "linalg_qr", "linalg_cholesky_ex",
                      "linalg_solve_triangular", "linalg_svd", "_linalg_svd")

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        products = sum(self.ops[name] for name in self.PRODUCTS)
        decompositions = sum(self.ops[name] for name in self.DECOMPOSITIONS)
        return {"ops": sum(self.ops.values()), "products": products, "decompositions": decompositions,
                "host_reads": self.ops["_local_scalar_dense"]}


def compare(name: str, H: torch.Tensor, sync, repeats: int) -> list[dict]:
    results, times, counts = {}, {}, {}
    for route, fn in routes(str(H.device)).items():
        try:
            results[route] = fn(H, TAU)
        except CusolverError as e:  # the batched route cannot run on this machine: say so, time the others
            print(f"{name}: route {route!r} skipped: {e}", flush=True)
            continue
        times[route] = median_ms(lambda: fn(H, TAU), sync, repeats)
        with OpCount() as counter:
            fn(H, TAU)
        counts[route] = counter.summary()
    exact = results["exact"][0].cpu()
    rows = []
    for route, (leverage, k) in results.items():
        for keep in (0.5, 0.25, 0.1):
            n = max(1, round(keep * H.shape[1]))
            alike = [len(set(a.topk(n).indices.tolist()) & set(b.topk(n).indices.tolist())) / n
                     for a, b in zip(exact, leverage.cpu())]
            rows.append({"states": name, "tokens": H.shape[1], "width": H.shape[2], "batch": len(H),
                         "route": route, "k": f"{int(k.min())}-{int(k.max())}", "keep": keep,
                         "kept_alike_mean": sum(alike) / len(alike), "kept_alike_min": min(alike),
                         "ms": times[route], **counts[route]})
    return rows


def gram_routes(H: torch.Tensor, sync, repeats: int) -> str:
    """The bfloat16 rows' Gram matrix by both routes: relative difference and times."""
    rows = H.to(torch.bfloat16)
    cast = rows.float()
    fast, reference = gram(rows), cast @ cast.mT
    difference = float((fast - reference).abs().max() / reference.abs().max())
    fast_ms, cast_ms = median_ms(lambda: gram(rows), sync, repeats), median_ms(lambda: cast @ cast.mT, sync, repeats)
    return (f"Gram of {tuple(rows.shape)} bfloat16 rows: tensor-core route {fast_ms:.2f} ms, float32 cast "
            f"{cast_ms:.2f} ms, largest difference {difference:.1e} of the largest entry")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text-layers", type=int, default=3, help="decoder layers of the 7B shape")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large-tokens", type=int, default=0,
                        help="also states of this many tokens x 3,584 (LLaVA-OneVision-7B: 3699), batch // 2")
    args = parser.parse_args(argv)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model, processor = load_model(device=args.device)
    inputs = batch_inputs(processor, load_split("test", limit=args.batch)).to(args.device)
    rows = compare("bundled model, layer 2", visual_states(model, inputs), sync, args.repeats)
    _, model, inputs = shape_model("llava-1.5-7b", args.batch, args.device, torch.float32, args.text_layers, 1)
    states = visual_states(model, inputs)
    rows += compare("llava-1.5-7b shape (random weights), layer 2", states, sync, args.repeats)
    rows += compare("llava-1.5-7b size, concentrated spectrum (synthetic)",
                    concentrated_states(args.batch, *states.shape[1:], args.device), sync, args.repeats)
    if args.large_tokens:
        batch = max(1, args.batch // 2)
        generator = torch.Generator().manual_seed(0)
        spread = torch.randn(batch, args.large_tokens, 3584, generator=generator).to(args.device)
        rows += compare(f"{args.large_tokens} x 3584, spread spectrum (Gaussian)", spread, sync, args.repeats)
        rows += compare(f"{args.large_tokens} x 3584, concentrated spectrum (synthetic)",
                        concentrated_states(batch, args.large_tokens, 3584, args.device), sync, args.repeats)
    print(f"device={args.device} threads={torch.get_num_threads()} tau={TAU}")
    if states.is_cuda:
        print(gram_routes(states, sync, args.repeats))
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
