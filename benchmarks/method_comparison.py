"""Every method on the bundled model: at the same keep fractions, and at matched FLOPs.

    python -m benchmarks.method_comparison [--limit 150] [--keep 0.5 0.25 0.1] [--random-seeds 3]
                                           [--out reports/method-comparison]

Run 1 (``<out>/keeps``): one ``analysis.compare`` run of every registered method at each keep. Run 2
(``<out>/matched-<method>``): every other method at the keep that costs the whole-model relative FLOPs of
``fastv`` (layer 2) at each keep, found by bisection with ``lofi.count_flops`` (a method's own work included);
a method that cannot get that cheap (LVPruning's first stage is at layer 1 of few) is left out of that level.
The methods that choose before the language model then keep more tokens than fastv for the same FLOPs.
Prints and writes ``<out>/comparison.csv``: per level and method, the keep, relative FLOPs, accuracy, flip
rate with its 95% interval (seeded bootstrap over questions), C->I, I->C, mean KL and mean Delta IPR
(headline layer and group); ``<out>/versus_random.csv``: per keep and method, its flip rate minus
``random``'s at the same keep on the same questions with the paired bootstrap's 95% interval
(``analysis.measure.paired``; a method flips fewer answers than random where the whole interval lies below
0), and random's flip-rate range over ``--random-seeds`` seeds; and
``<out>/paired.csv``: per matched level, each method's flips against ``random``'s (layer 2, same FLOPs) on the
same questions, with the exact McNemar p-value. ``<out>/positions.csv``: the methods that choose before the
language model with their reference's compact numbering and with original positions, beside ``random`` at
layer 0, by the first answer token's KL and flips against the unpruned model (one forward pass per batch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoConfig

import lofi
from analysis import paths
from analysis.measure.paired import mean_interval, paired_difference
from analysis.study.tables import relative_flops
from benchmarks.lvpruning_matched import matched_keep, mcnemar, run

REFERENCE = "fastv"  # the FLOPs every level is matched to
BEFORE = ("cdpruner", "divprune", "scope", "visionzip", "vispruner")  # choose before the language model
COLUMNS = ["level", "method", "keep", "rel_flops", "tokens_kept", "accuracy", "flip_rate", "flip_low", "flip_high",
           "c_to_i", "i_to_c", "mean_kl", "mean_delta_ipr"]


def in_percent(summary: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with accuracy, flip rate and its 95% interval (``summary.csv``'s seeded bootstrap) in %."""
    out = summary.copy()
    out[["accuracy", "flip_rate", "flip_low", "flip_high"]] *= 100
    return out


def versus_random(samples: pd.DataFrame, seeds: pd.DataFrame | None = None, seed: int = 0) -> pd.DataFrame:
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
    shown["keep"] = [f"{k:g}" for k in shown["keep"]]
    shown["flips % [95% CI]"] = [f"{r.flip_rate:.1f} [{r.flip_low:.1f}, {r.flip_high:.1f}]" for r in shown.itertuples()]
    if "minus_random" in shown:
        shown["minus random, points [95% CI]"] = [
            "" if pd.isna(r.minus_random)
            else f"{r.minus_random:+.1f} [{r.minus_random_low:+.1f}, {r.minus_random_high:+.1f}]"
            for r in shown.itertuples()]
    columns = ["keep", "method", "accuracy", "flips % [95% CI]"] + [c for c in ("minus random, points [95% CI]",)
                                                                  if c in shown]
    return shown[columns].to_markdown(index=False, floatfmt=".1f")


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--out", type=Path, default=paths.REPORTS / "method-comparison")
    parser.add_argument("--n-text", type=int, default=12, help="typical text tokens of a bundled prompt")
    parser.add_argument("--random-seeds", type=int, default=3,
                        help="random at the same keeps with seeds 0 .. N-1 (its flip rate's range)")
    args = parser.parse_args(argv)
    config = AutoConfig.from_pretrained(paths.BUNDLED_MODEL)
    n_visual = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    common = ["--limit", str(args.limit), "--no-progress", "--spectrum-layers", "headline"]
    args.out.mkdir(parents=True, exist_ok=True)
    run(["--methods", *lofi.available(), "--keep", *map(str, args.keep), "--out", str(args.out / "keeps"), *common])
    keeps = in_percent(pd.read_csv(args.out / "keeps" / "summary.csv"))
    keeps["level"] = [f"keep {k:g}" for k in keeps["keep"]]
    frames, samples = [keeps], {"keeps": pd.read_parquet(args.out / "keeps" / "samples.parquet")}
    seeds = []
    for seed in range(1, args.random_seeds):
        folder = args.out / f"random-seed{seed}"
        run(["--methods", "random", "--keep", *map(str, args.keep), "--seed", str(seed), "--out", str(folder), *common])
        seeds.append(pd.read_parquet(folder / "samples.parquet").assign(seed=seed))
    same_keep = versus_random(samples["keeps"], pd.concat(seeds, ignore_index=True) if seeds else None)
    print(markdown(same_keep))
    same_keep.to_csv(args.out / "versus_random.csv", index=False)
    targets = {keep: relative_flops(config, lofi.build(REFERENCE, keep=keep), args.n_text, n_visual)[0]
               for keep in args.keep}
    for method in lofi.available():
        if method == REFERENCE:
            continue
        matched = {matched_keep(config, method, target, args.n_text, n_visual): keep
                   for keep, target in targets.items()}
        matched = {k: level for k, level in matched.items() if k == k}  # NaN: cannot get that cheap
        if not matched:
            continue
        folder = args.out / f"matched-{method}"
        run(["--methods", method, "--keep", *map(str, matched), "--out", str(folder), *common])
        summary = in_percent(pd.read_csv(folder / "summary.csv"))
        summary["level"] = [f"FLOPs of {REFERENCE} at keep {matched[k]:g}" for k in summary["keep"]]
        frames.append(summary)
        samples[method] = pd.read_parquet(folder / "samples.parquet").assign(level=lambda f: f["keep"].map(matched))
    table = pd.concat(frames, ignore_index=True)[COLUMNS]
    print(table.to_markdown(index=False, floatfmt=".3g"))
    table.to_csv(args.out / "comparison.csv", index=False)
    paired = paired_flips(samples, args.keep)
    print(paired.to_markdown(index=False, floatfmt=".3g"))
    paired.to_csv(args.out / "paired.csv", index=False)
    positions = positions_table(args.limit or 1000, args.keep)
    print(positions.to_markdown(index=False, floatfmt=".3g"))
    positions.to_csv(args.out / "positions.csv", index=False)
    return table


@torch.no_grad()
def positions_table(limit: int, keeps: list[float], batch_size: int = 32) -> pd.DataFrame:
    """Per method that chooses before the language model, numbering and keep: mean KL of the first answer token's
    distribution and its flip rate against the unpruned model, on the first ``limit`` bundled test questions."""
    from analysis.benchmark.datasets import load_split
    from analysis.study.models import batch_inputs, load_model
    model, processor = load_model(str(paths.BUNDLED_MODEL), "cpu", progress=False)
    samples = load_split("test", limit=limit)
    batches = [batch_inputs(processor, samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]
    base = [model(**b).logits[:, -1].log_softmax(-1) for b in batches]
    variants = [(m, p) for m in BEFORE for p in ("compact", "original")] + [("random", "original")]
    rows = []
    for keep in keeps:
        for name, positions in variants:
            method = lofi.build(name, keep=keep, layer=0) if name == "random" else \
                lofi.build(name, keep=keep, positions=positions)
            kl, flips = [], []
            for b, reference in zip(batches, base):
                with lofi.pruned(model, method):
                    pruned = model(**b).logits[:, -1].log_softmax(-1)
                kl.append((reference.exp() * (reference - pruned)).sum(-1))
                flips.append(pruned.argmax(-1) != reference.argmax(-1))
            rows.append({"keep": keep, "method": name, "positions": positions, "mean_kl": torch.cat(kl).mean().item(),
                         "flip_rate": 100 * torch.cat(flips).float().mean().item()})
    return pd.DataFrame(rows)


def paired_flips(samples: dict[str, pd.DataFrame], keeps: list[float]) -> pd.DataFrame:
    """Per matched level (fastv's keep) and method: its flips against random's at the same FLOPs, same questions."""
    keeps_run = samples["keeps"]
    reference = keeps_run[keeps_run["method"] == REFERENCE].rename(columns={"keep": "level"})
    frames = {REFERENCE: reference, **{m: f for m, f in samples.items() if m != "keeps"}}
    rows = []
    for level in keeps:
        if "random" not in frames:
            break
        control = frames["random"]
        control = control[control["level"] == level].set_index("sample_id")["flip"].astype(bool)
        for method, frame in frames.items():
            flips = frame[frame["level"] == level].set_index("sample_id")["flip"].astype(bool)
            if method == "random" or flips.empty:
                continue
            flips = flips.loc[control.index]
            rows.append({"level": level, "method": method, "flip_rate": 100 * flips.mean(),
                         "random_flip_rate": 100 * control.mean(), "fewer": int((~flips & control).sum()),
                         "more": int((flips & ~control).sum()), "mcnemar_p": mcnemar(flips, control)})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
