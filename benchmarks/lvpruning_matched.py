"""LVPruning at rho = 0.6 / 0.5 / 0.45 beside random and fastv at matched relative FLOPs.

    python benchmarks/lvpruning_matched.py [--limit 0] [--out reports/lvpruning-matched]

For each rho the whole-model relative FLOPs of LVPruning (its decision modules included) are computed
with ``lofi.count_flops``; for random and fastv the keep fraction with the same relative FLOPs is found
by bisection. Two ``analysis.compare`` runs measure accuracy and flips against the baseline's answers:
LVPruning at every rho, then random and fastv at every matched keep (one baseline pass each; the
deterministic baseline answers are the same in both, which the script checks). Prints one markdown
table of the matched rows and writes it to ``<out>/matched.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis import bundled, compare  # noqa: E402
from analysis.tables import relative_flops  # noqa: E402


def matched_keep(config, method: str, target: float, n_text: int, n_visual: int) -> float:
    low, high = 1.0 / n_visual, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        if relative_flops(config, method, mid, n_text, n_visual)[0] < target:
            low = mid
        else:
            high = mid
    return round((low + high) / 2, 4)


def run(arguments: list[str]) -> None:
    if compare.main(arguments) != 0:
        raise SystemExit(f"analysis.compare {' '.join(arguments)} failed")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rho", nargs="+", type=float, default=[0.6, 0.5, 0.45])
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--out", type=Path, default=bundled.REPO_ROOT / "reports" / "lvpruning-matched")
    parser.add_argument("--n-text", type=int, default=12, help="typical text tokens of a bundled prompt")
    args = parser.parse_args(argv)
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(bundled.BUNDLED_MODEL)
    n_visual = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    common = ["--limit", str(args.limit), "--no-progress", "--spectrum-layers", "headline"]
    run(["--methods", "lvpruning", "--keep", *map(str, args.rho),
         "--out", str(args.out / "lvpruning"), *common])
    lvpruning = pd.read_csv(args.out / "lvpruning" / "summary.csv").assign(rho=lambda f: f["keep"])
    matched = {}  # (method, keep) -> rho
    for rho in args.rho:
        target = relative_flops(config, "lvpruning", rho, args.n_text, n_visual)[0]
        for method in ("random", "fastv"):
            matched[method, matched_keep(config, method, target, args.n_text, n_visual)] = rho
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


if __name__ == "__main__":
    main()
