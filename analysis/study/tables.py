"""The tables of a run folder, assembled from its per-condition shards (docs/definitions.md#run-folder
lists every file and column).

``samples.parquet`` holds the ``SampleResult`` records of every pruned condition plus the columns derived
here (``DERIVED``: relative FLOPs per sample and family, visual tokens left after the last stage);
``spectra.parquet`` the per-layer statistics with Delta IPR (``has_spectrum``: which rows were
decomposed); ``summary.csv`` one row per condition; ``correlation.csv`` Delta IPR against every
consistency measure, per layer and group; ``kept.parquet`` the ``KeptTokens`` records;
``leverage.parquet`` the unpruned leverage scores at the leverage layers (of the decomposed samples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

import lofi
from analysis.measure.consistency import flips
from analysis.measure.correlation import condition_correlation, sample_correlation
from analysis.measure.paired import mean_interval
from analysis.study import runfolder
from analysis.study.records import BASELINE, Condition, SampleResult, columns

MEASURES = ("flip", "kl", "js", "forced_kl", "changed_correctness")
DERIVED = ("rel_flops", "rel_flops_llm", "n_visual_kept")  # computed here from the shards
SAMPLE_COLUMNS = [*columns(SampleResult), *DERIVED]  # samples.parquet


def headline_layer(setting, last_layer: int) -> int:
    """The headline layer a run's ``headline["layer"]`` setting names: ``"last"`` or a number."""
    return last_layer if setting == "last" else int(setting)


def headline(spectra: pd.DataFrame, config: dict) -> tuple[int, str]:
    """The (layer, group) of the headline figure: the last layer's output, all tokens."""
    return headline_layer(config["headline"]["layer"], int(spectra["layer"].max())), config["headline"]["group"]


def pruned_flops(model_config, method: lofi.PruningMethod, n_text: int, n_visual: int,
                 n_prunable: int | None = None, image=None):
    """(pruned, unpruned) ``lofi.Flops`` of one prompt of ``n_visual`` visual tokens, ``n_prunable`` of them
    prunable (default all; LLaVA-NeXT's newline rows are not), for the family's ``image``; the pruned count
    includes the decision work the method spends (none at stages that keep every token)."""
    base = lofi.count_flops(model_config, n_text, n_visual, image=image)
    return lofi.method_flops(model_config, method, n_text, n_visual, n_prunable, image), base


def relative_flops(model_config, method: lofi.PruningMethod, n_text: int, n_visual: int,
                   n_prunable: int | None = None, image=None) -> tuple[float, float]:
    """(whole-model, LLM-only) FLOPs of the condition relative to the unpruned model."""
    pruned, base = pruned_flops(model_config, method, n_text, n_visual, n_prunable, image)
    return pruned.total / base.total, pruned.llm / base.llm


def assemble(work: Path, model_config, methods: Mapping[Condition, lofi.PruningMethod]) -> None:
    """The run folder's tables from its shards; ``methods``: the run's pruned conditions' built methods
    (for their FLOPs)."""
    config = json.loads((work / "config.json").read_text())
    missing = runfolder.missing_shards(work, [BASELINE, *methods])
    if missing:
        raise RuntimeError(f"{work} lacks the shard(s) {missing}: those conditions are not finished; "
                           "rerun the same command to compute them")
    rows = runfolder.read_shards(work, "samples")
    spectra = runfolder.read_shards(work, "spectra")
    kept = runfolder.read_shards(work, "kept")
    flops_cache: dict = {}

    def rel(row):
        if row.method == BASELINE.method:
            return 1.0, 1.0
        key = (row.method, row.keep, row.n_text, row.n_visual, row.n_prunable, row.image)
        if key not in flops_cache:
            image = json.loads(row.image)
            flops_cache[key] = relative_flops(model_config, methods[Condition(row.method, row.keep)], int(row.n_text),
                                              int(row.n_visual), int(row.n_prunable), tuple(image) if image else None)
        return flops_cache[key]

    flops = [rel(row) for row in rows.itertuples()]
    rows["rel_flops"] = [f[0] for f in flops]
    rows["rel_flops_llm"] = [f[1] for f in flops]
    last_stage = kept.sort_values("stage").groupby(["sample_id", "method", "keep"])["kept"].last()
    always_kept = rows["n_visual"] - rows["n_prunable"]  # newline rows: never pruned
    rows["n_visual_kept"] = [len(last_stage.get((s, m, k), [])) + fixed if m != "baseline" else n
                             for s, m, k, fixed, n in zip(rows["sample_id"], rows["method"], rows["keep"],
                                                          always_kept, rows["n_visual"])]

    if "has_spectrum" not in spectra:  # shards written before the column: decomposed rows have an effective rank
        spectra["has_spectrum"] = spectra["effective_rank"].notna()
    base_ipr = spectra[spectra.method == "baseline"].set_index(["sample_id", "layer", "group"])["ipr"]
    spectra["delta_ipr"] = spectra["ipr"].to_numpy() - base_ipr.reindex(
        pd.MultiIndex.from_frame(spectra[["sample_id", "layer", "group"]])).to_numpy()
    leverage = spectra[spectra.leverage.notna() & (spectra.method == "baseline")][
        ["sample_id", "layer", "leverage", "visual_index"]]
    spectra = spectra[["sample_id", "method", "keep", "layer", "group", "n_tokens", "ipr", "pr",
                       "effective_rank", "delta_ipr", "singular_values", "has_spectrum"]]

    pruned = rows[rows.method != "baseline"].copy()
    pruned["changed_correctness"] = (pruned["correct"] != pruned["baseline_correct"]).astype(float)
    pruned[SAMPLE_COLUMNS].to_parquet(work / "samples.parquet", index=False)
    spectra.to_parquet(work / "spectra.parquet", index=False)
    kept.to_parquet(work / "kept.parquet", index=False)
    leverage.to_parquet(work / "leverage.parquet", index=False)
    layer, group = headline(spectra, config)
    summary_frame(pruned, spectra, layer, group, seed=config["seed"]).to_csv(work / "summary.csv", index=False)
    correlation_frame(pruned, spectra, seed=config["seed"]).to_csv(work / "correlation.csv", index=False)


def summary_frame(pruned: pd.DataFrame, spectra: pd.DataFrame, layer: int, group: str, seed: int = 0
                  ) -> pd.DataFrame:
    """One row per (method, keep): ``report.SUMMARY_COLUMNS``; the flip rate's 95% interval is a seeded
    percentile bootstrap over questions (``analysis.measure.paired``)."""
    head = spectra[(spectra.layer == layer) & (spectra.group == group) & (spectra.method != "baseline")]
    delta = head.groupby(["method", "keep"])["delta_ipr"].mean()
    out = []
    for (method, keep), frame in pruned.groupby(["method", "keep"], sort=False):
        has_gold = frame["gold"].notna().all()
        f = flips(frame["baseline_answer"].tolist(), frame["answer"].tolist(),
                  frame["gold"].tolist() if has_gold else None)
        interval = mean_interval(frame["flip"].astype(float), seed=seed)  # the runner's per-sample flip
        out.append({"method": method, "keep": keep, "n": f.n,
                    "accuracy": frame["correct"].mean() if has_gold else np.nan,
                    "baseline_accuracy": frame["baseline_correct"].mean() if has_gold else np.nan,
                    "flip_rate": f.flip_rate, "flip_low": interval.low, "flip_high": interval.high,
                    "dutta_flips": f.dutta_flips, "c_to_i": f.c_to_i,
                    "i_to_c": f.i_to_c, "mean_kl": frame["kl"].mean(), "mean_js": frame["js"].mean(),
                    "mean_forced_kl": frame["forced_kl"].mean(), "mean_delta_ipr": delta.get((method, keep)),
                    "rel_flops": frame["rel_flops"].mean(), "rel_flops_llm": frame["rel_flops_llm"].mean(),
                    "tokens_kept": frame["n_visual_kept"].mean()})
    return pd.DataFrame(out)


def correlation_frame(pruned: pd.DataFrame, spectra: pd.DataFrame, seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """Delta IPR against every consistency measure, per layer and group (condition and sample level)."""
    spectra = spectra[spectra.method != "baseline"]
    out = []
    for (layer, group), part in spectra.groupby(["layer", "group"]):
        joined = pruned.merge(part[["sample_id", "method", "keep", "delta_ipr"]], on=["sample_id", "method", "keep"])
        if joined["delta_ipr"].abs().max() == 0:
            continue  # before the first pruning layer every Delta IPR is 0: nothing to correlate
        for measure in MEASURES:
            c = condition_correlation(joined.assign(**{measure: joined[measure].astype(float)}), "delta_ipr",
                                      measure, n_boot=n_boot, seed=seed)
            out.append({"level": "condition", "layer": layer, "group": group, "measure": measure, **c.as_dict()})
        c = sample_correlation(joined["delta_ipr"].abs(), joined["kl"], n_boot=n_boot, seed=seed)
        out.append({"level": "sample", "layer": layer, "group": group, "measure": "kl (|delta ipr|)", **c.as_dict()})
    return pd.DataFrame(out)
