"""Does the choice of visual tokens matter on a model? Every method against random, with paired intervals.

    python -m benchmarks.token_choice [--model DIR] [--dataset test] [--limit 0] [--keep 0.5 0.25 0.1]
                                      [--random-seeds 3] [--out reports/token-choice]

One ``analysis.compare`` run of every method that applies to the model (``lvpruning`` only where the
model folder has trained decision modules) at each keep, on the same questions, and ``random`` again
with seeds 1 .. N-1. Per (method, keep) it writes ``<out>/token_choice.csv`` and prints: accuracy, the
flip rate with its 95% interval, and the paired difference of the method's flip rate minus random's
(seed 0) on the same questions with its 95% interval (``analysis.measure.paired``: a percentile
bootstrap over questions). A method "flips fewer answers than random" where that interval lies below
0. ``random`` rows also give the flip rate's range over the seeds. Spectra are captured at the headline
layer only (they are not read here).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

import lofi
from analysis import paths
from analysis.measure.paired import mean_interval, paired_difference
from analysis.study import compare

NEEDS_MODULES = {"lvpruning"}  # methods that need weights trained for the model


def methods_for(model: Path) -> list[str]:
    """Every registered method, ``lvpruning`` only when ``model`` has its decision modules."""
    from lofi.methods.lvpruning import WEIGHTS
    have_modules = (Path(model) / "lvpruning" / WEIGHTS).is_file()
    return [m for m in lofi.available() if m not in NEEDS_MODULES or have_modules]


def run(arguments: list[str]) -> None:
    if compare.main(arguments) != 0:
        raise SystemExit(f"analysis.compare {' '.join(arguments)} failed")


def table(samples: pd.DataFrame, seeds: pd.DataFrame | None = None, seed: int = 0) -> pd.DataFrame:
    """Per (method, keep) of ``samples`` (``samples.parquet`` rows): accuracy, flip rate with its interval,
    and the paired difference against ``random`` at the same keep; ``seeds``: random's rows of other seeds
    (a ``seed`` column), summarised as the flip rate's range."""
    rows = []
    for (method, keep), frame in samples.groupby(["method", "keep"], sort=False):
        frame = frame.set_index("sample_id")
        flips = mean_interval(frame["flip"].astype(float), seed=seed)
        row = {"method": method, "keep": keep, "n": flips.n, "accuracy": frame["correct"].mean(),
               "baseline_accuracy": frame["baseline_correct"].mean(), "flip_rate": flips.estimate,
               "flip_low": flips.low, "flip_high": flips.high}
        random = samples[samples["method"].eq("random") & (samples["keep"] == keep)].set_index("sample_id")
        if method != "random" and len(random):
            ours = frame["flip"].astype(float)
            theirs = random["flip"].astype(float).reindex(ours.index)
            d = paired_difference(ours.to_numpy(), theirs.to_numpy(), seed=seed)
            row.update(minus_random=d.estimate, minus_random_low=d.low, minus_random_high=d.high,
                       fewer_than_random=d.high < 0)
        if method == "random" and seeds is not None and len(seeds):
            rates = [frame["flip"].mean(), *seeds[seeds["keep"] == keep].groupby("seed")["flip"].mean()]
            row.update(random_seeds=len(rates), random_min=min(rates), random_max=max(rates))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["keep", "flip_rate"], ascending=[False, True], ignore_index=True)


def markdown(frame: pd.DataFrame) -> str:
    shown = frame.copy()
    percent = [c for c in shown.columns if c in {"accuracy", "baseline_accuracy", "flip_rate", "flip_low",
                                                 "flip_high", "minus_random", "minus_random_low",
                                                 "minus_random_high", "random_min", "random_max"}]
    shown[percent] = shown[percent] * 100
    shown["flips % [95% CI]"] = [f"{r.flip_rate:.1f} [{r.flip_low:.1f}, {r.flip_high:.1f}]" for r in shown.itertuples()]
    if "minus_random" in shown:
        shown["minus random, points [95% CI]"] = [
            "" if pd.isna(r.minus_random)
            else f"{r.minus_random:+.1f} [{r.minus_random_low:+.1f}, {r.minus_random_high:+.1f}]"
            for r in shown.itertuples()]
    columns = ["keep", "method", "accuracy", "flips % [95% CI]"] + [c for c in ("minus random, points [95% CI]",)
                                                                  if c in shown]
    return shown[columns].to_markdown(index=False, floatfmt=".1f")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=paths.BUNDLED_MODEL)
    parser.add_argument("--dataset", default="test")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    parser.add_argument("--random-seeds", type=int, default=3, help="random with seeds 0 .. N-1")
    parser.add_argument("--out", type=Path, default=paths.REPORTS / "token-choice")
    args = parser.parse_args(argv)
    common = ["--model", str(args.model), "--dataset", args.dataset, "--limit", str(args.limit),
              "--keep", *map(str, args.keep), "--no-progress", "--spectrum-layers", "headline"]
    run(["--methods", *methods_for(args.model), "--out", str(args.out / "methods"), *common])
    samples = pd.read_parquet(args.out / "methods" / "samples.parquet")
    seeds = []
    for seed in range(1, args.random_seeds):
        folder = args.out / f"random-seed{seed}"
        run(["--methods", "random", "--seed", str(seed), "--out", str(folder), *common])
        seeds.append(pd.read_parquet(folder / "samples.parquet").assign(seed=seed))
    result = table(samples, pd.concat(seeds, ignore_index=True) if seeds else None)
    result.to_csv(args.out / "token_choice.csv", index=False)
    print(markdown(result))


if __name__ == "__main__":
    main()
