"""How far CDPruner's relevance term moves its choice and the answers, on the bundled model.

    python -m benchmarks.cdpruner_relevance [--limit 300] [--keep 0.5 0.25 0.1] [--out cdpruner-relevance.csv]

CDPruner's reference weights its DPP kernel by each visual token's relevance to the instruction, computed with
CLIP's text tower and visual projection; llava-hf checkpoints ship neither, so ``lofi`` computes it from the
language model's input embeddings on both sides. What can be measured without CLIP is how much that term moves
the choice at all: each variant runs over the bundled test questions at each keep, beside CDPruner with its
defaults (``default``: ``r = cos``, kernel ``diag(r) S diag(r)``) and the unpruned model:

* ``none``: ``relevance="none"``, the DPP on the similarity kernel alone (``r = 1``);
* ``negated``: ``negate_relevance=True``, the reference code's sign (``r = -cos``);
* ``theta=0.5``: ``g(r) = exp(0.5 r)`` instead of ``r`` (a milder weighting);
* ``negated theta=0.5``: both (OpenVINO GenAI's defaults).

Columns, per (variant, keep): ``tokens`` kept of the visual tokens; ``jaccard``: mean over questions of
``|A & B| / |A | B|`` between the variant's kept set A and the default's B; ``chance_jaccard``: its expectation
for two independent uniform sets of that size (the floor of "unrelated"); ``identical``: % of questions whose
kept sets are equal; ``changed_vs_default``: % of greedy answers that differ from the default's;
``flips``: % that differ from the unpruned model's; ``accuracy``: % correct. Answers are normalised
(``analysis.measure.consistency.normalize_answer``). All variants keep the tokens' original positions unless
``--positions`` says otherwise: the bundled model was trained on one layout of its visual tokens, so the
reference's compact renumbering moves their positions and dominates its answer changes (see "Every method on
the bundled model" in benchmarks/README.md); the kept sets do not depend on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import hypergeom
from tqdm.auto import tqdm

import lofi
from analysis import paths
from analysis.benchmark.datasets import load_split
from analysis.measure.consistency import normalize_answer
from analysis.study.evaluate import greedy_answers
from analysis.study.models import batch_inputs, load_model

VARIANTS = {
    "default": {},
    "none": {"relevance": "none"},
    "negated": {"negate_relevance": True},
    "theta=0.5": {"theta": 0.5},
    "negated theta=0.5": {"negate_relevance": True, "theta": 0.5},
}
COLUMNS = ["variant", "keep", "tokens", "jaccard", "chance_jaccard", "identical", "changed_vs_default", "flips",
           "accuracy"]


def jaccard(a, b) -> float:
    """``|A & B| / |A | B|`` of two sets of token indices (1 for two empty sets)."""
    a, b = set(a), set(b)
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def chance_jaccard(n: int, k: int) -> float:
    """Expected Jaccard index of two independent uniformly drawn ``k``-subsets of ``n`` tokens:
    ``sum_i P(I = i) i / (2k - i)`` with ``I ~ Hypergeometric(n, k, k)`` the size of their intersection."""
    i = np.arange(max(0, 2 * k - n), k + 1)
    return float((hypergeom.pmf(i, n, k, k) * i / (2 * k - i)).sum())


@torch.no_grad()
def answers_and_kept(model, processor, samples, methods: dict, batch_size: int, progress: bool):
    """({name: normalised greedy answers}, {name: per-question kept visual indices}) for the unpruned model
    (``"unpruned"``, no kept sets) and each method, one batch's inputs built once for all of them."""
    answers = {"unpruned": [], **{name: [] for name in methods}}
    kept = {name: [] for name in methods}
    for start in tqdm(range(0, len(samples), batch_size), desc="batches", disable=not progress):
        inputs = batch_inputs(processor, samples[start:start + batch_size])
        answers["unpruned"] += [normalize_answer(a) for a in greedy_answers(model, processor, inputs)]
        for name, method in methods.items():
            with lofi.pruned(model, method) as handle:
                given = greedy_answers(model, processor, inputs)
            answers[name] += [normalize_answer(a) for a in given]
            kept[name] += handle.kept_lists()
    return answers, kept


def relevance_table(samples, answers: dict, kept: dict, keeps, variants, n_visual: int) -> pd.DataFrame:
    """One row per (variant, keep), the columns of this module's docstring; ``answers``/``kept`` keyed by
    ``(variant, keep)`` (``answers["unpruned"]``: the unpruned model's)."""
    gold = [normalize_answer(s.answer) for s in samples]
    unpruned = answers["unpruned"]
    rows = []
    for keep in keeps:
        reference_kept, reference_answers = kept[("default", keep)], answers[("default", keep)]
        for variant in variants:
            chosen, given = kept[(variant, keep)], answers[(variant, keep)]
            tokens = len(chosen[0])
            rows.append({
                "variant": variant, "keep": keep, "tokens": tokens,
                "jaccard": np.mean([jaccard(a, b) for a, b in zip(chosen, reference_kept)]),
                "chance_jaccard": chance_jaccard(n_visual, tokens),
                "identical": 100 * np.mean([a == b for a, b in zip(chosen, reference_kept)]),
                "changed_vs_default": 100 * np.mean([a != b for a, b in zip(given, reference_answers)]),
                "flips": 100 * np.mean([a != b for a, b in zip(given, unpruned)]),
                "accuracy": 100 * np.mean([a == g for a, g in zip(given, gold)]),
            })
    return pd.DataFrame(rows, columns=COLUMNS)


def write_table(table: pd.DataFrame, out: Path) -> None:
    """``table`` to ``out`` (.csv or .parquet), written whole or not at all."""
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".parquet":
        table.to_parquet(tmp, index=False)
    else:
        table.to_csv(tmp, index=False)
    tmp.replace(out)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT",
                        help=f"among: {', '.join(VARIANTS)} (default: all; 'default' always runs)")
    parser.add_argument("--limit", type=int, default=300, help="first N test questions (0: all 1,200)")
    parser.add_argument("--positions", default="original", choices=["original", "compact", "reference"],
                        help="numbering of the kept tokens ('reference': the method's default, compact here)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, help="also write the table here (.csv or .parquet)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; valid variants: {', '.join(VARIANTS)}")
    if any(not 0 < k <= 1 for k in args.keep):
        parser.error(f"--keep takes fractions in (0, 1], got {args.keep}")
    if args.out is not None and args.out.suffix not in (".csv", ".parquet"):
        parser.error(f"--out must end in .csv or .parquet, got {args.out}")
    variants = ["default", *[v for v in dict.fromkeys(args.variants) if v != "default"]]
    positions = None if args.positions == "reference" else args.positions
    model, processor = load_model(paths.BUNDLED_MODEL, progress=False)
    samples = load_split("test", limit=args.limit or None)
    vision = model.config.vision_config
    n_visual = (vision.image_size // vision.patch_size) ** 2
    methods = {(variant, keep): lofi.build("cdpruner", keep=keep, positions=positions, **VARIANTS[variant])
               for keep in args.keep for variant in variants}
    answers, kept = answers_and_kept(model, processor, samples, methods, args.batch_size, not args.no_progress)
    table = relevance_table(samples, answers, kept, args.keep, variants, n_visual)
    correct = [a == normalize_answer(s.answer) for a, s in zip(answers["unpruned"], samples)]
    print(f"{len(samples)} test questions, {n_visual} visual tokens, positions {args.positions}; "
          f"unpruned accuracy {100 * np.mean(correct):.1f}%")
    print(table.to_markdown(index=False, floatfmt=".3g"))
    if args.out is not None:
        write_table(table, args.out)
    return table


if __name__ == "__main__":
    main()
