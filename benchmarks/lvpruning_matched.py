"""LVPruning at rho = 0.6 / 0.5 / 0.45 beside random and fastv at matched relative FLOPs.

    python -m benchmarks.lvpruning_matched [--limit 0] [--out reports/lvpruning-matched] [--random-seeds 1]

For each rho the whole-model relative FLOPs of LVPruning (its decision modules included) are computed
with ``lofi.count_flops``; for random and fastv the keep fraction with the same relative FLOPs is found
by bisection. Two ``analysis.compare`` runs measure accuracy and flips against the baseline's answers:
LVPruning at every rho, then random and fastv at every matched keep (one baseline pass each; the
deterministic baseline answers are the same in both, which the script checks). Prints one markdown
table of the matched rows and writes it to ``<out>/matched.csv``.

Two more tables put the comparison in scale. ``<out>/flops_share.csv`` (arithmetic only): the decision
modules' share of the unpruned model's FLOPs, on the bundled model and at LLaVA-1.5-7B's shape (576
visual, 30 text tokens), and the keep that buys ``random`` at matched FLOPs with and without it.
``--random-seeds N`` reruns ``random`` at the matched keeps with seeds 1 .. N-1 (``<out>/random-seed<s>``)
and writes ``<out>/random_seeds.csv``: its flip rate per seed, and per rho a paired exact (McNemar)
test of LVPruning's flips against random's (seed 0) on the same questions.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd
from scipy.stats import binomtest

import lofi
from analysis import paths
from analysis.study import compare
from analysis.study.tables import pruned_flops, relative_flops


def matched_keep(config, method: str, target: float, n_text: int, n_visual: int) -> float:
    """The keep at which ``method`` costs ``target`` relative FLOPs (bisection); NaN where even one token
    costs more."""
    low, high = 1.0 / n_visual, 1.0
    if relative_flops(config, lofi.build(method, keep=low), n_text, n_visual)[0] > target:
        return float("nan")
    for _ in range(40):
        mid = (low + high) / 2
        if relative_flops(config, lofi.build(method, keep=mid), n_text, n_visual)[0] < target:
            low = mid
        else:
            high = mid
    return round((low + high) / 2, 4)


def lvpruning_method(rho: float, modules: Path | None = None):
    """LVPruning at ``rho``, with the decision modules in ``modules`` when given (their block count sets their
    FLOPs; without them the paper's 2 blocks are counted)."""
    method = lofi.build("lvpruning", keep=rho)
    if modules is not None:
        from lofi.methods.lvpruning import DecisionModules
        method.modules = DecisionModules.load(modules)
    return method


def flops_share(config, name: str, rhos: list[float], n_text: int, n_visual: int, modules: Path | None = None
                ) -> list[dict]:
    """Per rho: the decision modules' share of the unpruned FLOPs and what keep it buys ``random``."""
    rows = []
    for rho in rhos:
        pruned, base = pruned_flops(config, lvpruning_method(rho, modules), n_text, n_visual)
        rel, share = pruned.total / base.total, pruned.decision / base.total
        keep, keep_free = (matched_keep(config, "random", target, n_text, n_visual)
                           for target in (rel, rel - share))
        rows.append({"model": name, "rho": rho, "decision_share": share, "rel_flops": rel,
                     "random_keep": keep, "random_tokens": keep * n_visual,
                     "random_keep_if_free": keep_free, "random_tokens_if_free": keep_free * n_visual})
    return rows


def mcnemar(a: pd.Series, b: pd.Series) -> float:
    """Two-sided exact McNemar p-value of paired 0/1 outcomes: a binomial test of the discordant pairs."""
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b).pvalue


def run(arguments: list[str]) -> None:
    if compare.main(arguments) != 0:
        raise SystemExit(f"analysis.compare {' '.join(arguments)} failed")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rho", nargs="+", type=float, default=[0.6, 0.5, 0.45])
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--out", type=Path, default=paths.REPORTS / "lvpruning-matched")
    parser.add_argument("--n-text", type=int, default=12, help="typical text tokens of a bundled prompt")
    parser.add_argument("--random-seeds", type=int, default=1,
                        help="run random at the matched keeps with this many seeds (0 .. N-1)")
    args = parser.parse_args(argv)
    from transformers import AutoConfig

    from benchmarks.shapes import N_TEXT as N_TEXT_7B
    from benchmarks.shapes import shape_config
    config = AutoConfig.from_pretrained(paths.BUNDLED_MODEL)
    n_visual = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    args.out.mkdir(parents=True, exist_ok=True)
    modules = paths.BUNDLED_MODEL / "lvpruning"
    share = pd.DataFrame(flops_share(config, "bundled", args.rho, args.n_text, n_visual, modules)
                         + flops_share(shape_config("llava-7b"), "llava-1.5-7b shape", args.rho, N_TEXT_7B, 576))
    print(share.round({"random_tokens": 0, "random_tokens_if_free": 0}).to_markdown(index=False, floatfmt=".3g"))
    share.to_csv(args.out / "flops_share.csv", index=False)
    common = ["--limit", str(args.limit), "--no-progress", "--spectrum-layers", "headline"]
    run(["--methods", "lvpruning", "--keep", *map(str, args.rho),
         "--out", str(args.out / "lvpruning"), *common])
    lvpruning = pd.read_csv(args.out / "lvpruning" / "summary.csv").assign(rho=lambda f: f["keep"])
    matched = {}  # (method, keep) -> rho
    for rho in args.rho:
        target = relative_flops(config, lvpruning_method(rho, modules), args.n_text, n_visual)[0]
        for method in ("random", "fastv"):
            keep = matched_keep(config, method, target, args.n_text, n_visual)
            if math.isnan(keep):
                raise SystemExit(f"{method} at one visual token already costs more than lvpruning at rho {rho}")
            matched[method, keep] = rho
    keeps = sorted({keep for _, keep in matched}, reverse=True)
    run(["--methods", "random", "fastv", "--keep", *map(str, keeps),
         "--out", str(args.out / "baselines"), *common])
    others = pd.read_csv(args.out / "baselines" / "summary.csv")
    if not (others["baseline_accuracy"] == lvpruning["baseline_accuracy"].iloc[0]).all():
        raise RuntimeError("the two runs' baselines disagree; the matched rows would not be comparable")
    others["rho"] = [matched.get((m, k)) for m, k in zip(others["method"], others["keep"])]
    frames = [lvpruning, others.dropna(subset=["rho"])]
    table = pd.concat(frames, ignore_index=True)
    table = table[["rho", "method", "keep", "rel_flops", "tokens_kept", "baseline_accuracy", "accuracy",
                   "flip_rate", "c_to_i", "i_to_c", "mean_kl"]].sort_values(["rho", "method"], ascending=[False, True])
    table[["baseline_accuracy", "accuracy", "flip_rate"]] *= 100
    print(table.to_markdown(index=False, floatfmt=".3g"))
    table.to_csv(args.out / "matched.csv", index=False)
    if args.random_seeds > 1:
        seeds(args, matched, common)


def seeds(args, matched: dict, common: list[str]) -> None:
    """Random's flip rate per seed at the matched keeps, and LVPruning's flips against seed 0's."""
    keeps = sorted({keep for (method, keep) in matched if method == "random"}, reverse=True)
    frames = [pd.read_parquet(args.out / "baselines" / "samples.parquet").assign(seed=0)]
    for seed in range(1, args.random_seeds):
        folder = args.out / f"random-seed{seed}"
        run(["--methods", "random", "--keep", *map(str, keeps), "--seed", str(seed), "--out", str(folder), *common])
        frames.append(pd.read_parquet(folder / "samples.parquet").assign(seed=seed))
    samples = pd.concat(frames, ignore_index=True)
    random = samples[samples["method"].eq("random") & samples["keep"].isin(keeps)]
    lvpruning = pd.read_parquet(args.out / "lvpruning" / "samples.parquet")
    rows = []
    for keep in keeps:
        rho = matched["random", keep]
        ours = lvpruning[lvpruning["method"].eq("lvpruning") & (lvpruning["keep"] == rho)].set_index("sample_id")
        rates = random[random["keep"] == keep].groupby("seed")["flip"].mean() * 100
        first = random[(random["keep"] == keep) & (random["seed"] == 0)].set_index("sample_id")["flip"]
        rows.append({"rho": rho, "random_keep": keep, "lvpruning_flip_rate": ours["flip"].mean() * 100,
                     **{f"random_seed{s}": r for s, r in rates.items()},
                     "random_mean": rates.mean(), "random_min": rates.min(), "random_max": rates.max(),
                     "mcnemar_p": mcnemar(ours["flip"].astype(bool), first.loc[ours.index].astype(bool))})
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=".3g"))
    table.to_csv(args.out / "random_seeds.csv", index=False)


if __name__ == "__main__":
    main()
