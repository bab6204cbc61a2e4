"""``python -m analysis.report DIR``: figures and ``report.html`` of a run folder, from its tables alone.

This module owns presentation: it never loads a model and never reads outside the run folder. It reads
``config.json``, ``summary.csv``, ``correlation.csv``, ``spectra.parquet``, ``kept.parquet``,
``leverage.parquet`` and ``thumbnails/`` (the few images the kept-token figure draws on, which
``save_thumbnails`` copies into the run folder while the run still reads its split), writes
``figures/*.png`` and one self-contained ``report.html`` (the ``templates/report.html.j2`` page, figures
embedded as data URIs) with the tables, the definitions of their columns and a short reading of the
results written from the numbers -- which claims a relation only where the permutation test across
conditions can support one.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup, escape
from PIL import Image

from analysis.measure.correlation import smallest_p
from analysis.study import plots
from analysis.study.runfolder import RunFolderError, read_config, write_atomically
from analysis.study.tables import headline

MIN_CONDITIONS = 5  # fewer: even a perfect correlation has permutation p >= 2/5! = 0.017 (4: 0.083)
THUMBNAILS, MAP_SAMPLES, THUMBNAIL_SIDE = "thumbnails", 3, 512  # the kept-token figure's images, longest side


@dataclass(frozen=True)
class Figure:
    """One figure of the report: its file stem, heading and caption."""

    name: str
    title: str
    caption: str


FIGURES = (
    Figure("delta_ipr_vs_consistency", "Delta IPR against consistency",
           "One point per condition (label: keep; larger points keep more). x: the mean change of the "
           "inverse participation ratio of the hidden states against the unpruned model, same questions; y: "
           "how far the answers moved. Dashed: least-squares fit, with Pearson r and its bootstrap interval."),
    Figure("ipr_per_layer", "IPR per layer",
           "Mean IPR of the hidden states entering each layer (the last point: the last layer's output), "
           "unpruned (black) and under each condition (colour: method; line style: keep)."),
    Figure("singular_spectra", "Singular spectra at the headline layer",
           "Mean normalised singular values s_i / s_1 of the hidden states (top 32), unpruned against each "
           "method, one panel per keep level."),
    Figure("accuracy_flips_kl", "Accuracy, flip rate and KL against keep and FLOPs",
           "Top row against the fraction of visual tokens kept, bottom row against the whole model's FLOPs "
           "relative to the unpruned model (the fair axis: methods spend FLOPs differently)."),
    Figure("kept_token_maps", "Kept visual tokens",
           "First column: each visual token's leverage score in the unpruned model at layer 2 (what lofi ranks "
           "by), over the image. Other columns: the tokens each method keeps at the middle keep level, "
           "dropped patches dimmed (half as much where a merging method folded them into a kept token)."),
)

SUMMARY_COLUMNS = {  # column: (header, format, definition)
    "method": ("method", "text", "the pruning method (python -m analysis.compare --methods list)"),
    "keep": ("keep", "{:g}", "fraction of the visual tokens kept (LVPruning: rho, its first stage's fraction)"),
    "n": ("n", "{:d}", "questions compared"),
    "accuracy": ("accuracy (%)", "percent", "pruned answers equal to the ground truth, after normalisation"),
    "baseline_accuracy": ("unpruned accuracy (%)", "percent", "the unpruned model's accuracy on the same questions"),
    "flip_rate": ("flip rate (%)", "percent", "answers that differ from the unpruned model's (AllFlips)"),
    "flip_low": ("flip 95% CI low (%)", "percent", "lower bound of the flip rate's 95% interval (percentile "
                 "bootstrap over questions, 2,000 resamples, seeded)"),
    "flip_high": ("flip 95% CI high (%)", "percent", "upper bound of that interval"),
    "dutta_flips": ("Flips (%)", "percent", "(C\u2192I + I\u2192C) / n (Dutta et al. 2024): changes of correctness"),
    "c_to_i": ("C\u2192I", "{:d}", "questions the unpruned model answered correctly and the pruned one does not"),
    "i_to_c": ("I\u2192C", "{:d}", "questions the unpruned model answered wrongly and the pruned one correctly"),
    "mean_kl": ("KL (nats)", "{:.3f}", "mean KL(P_unpruned || P_pruned) of the first answer token's distribution "
                "(natural log)"),
    "mean_js": ("JS (nats)", "{:.3f}", "mean Jensen-Shannon divergence of the same two distributions, in [0, ln 2]"),
    "mean_forced_kl": ("forced KL (nats)", "{:.3f}", "mean over the unpruned answer's tokens of the KL, the pruned "
                       "model reading that answer with the tokens it kept"),
    "mean_delta_ipr": ("Delta IPR", "{:+.3f}", "mean IPR(pruned) - IPR(unpruned) of the hidden states at the "
                       "headline layer and group (IPR = sum of squared energy fractions, in [1/r, 1])"),
    "rel_flops": ("FLOPs (%)", "percent", "whole-model FLOPs (vision tower, projector, language model, LM head, "
                  "decision modules) relative to the unpruned model"),
    "rel_flops_llm": ("LLM FLOPs (%)", "percent", "the language model's decoder layers alone, relative"),
    "tokens_kept": ("visual tokens kept", "{:.4g}", "mean number of visual tokens left after the last stage"),
}
MEASURE_NAMES = {"flip": "flip rate", "kl": "KL", "js": "JS", "forced_kl": "forced KL",
                 "changed_correctness": "Flips (changed correctness)", "kl (|delta ipr|)": "KL vs |Delta IPR|"}
CORRELATION_GLOSSARY = (
    ("level", "condition: one point per (method, keep), means over questions; sample: every (question, "
              "condition) pooled, |Delta IPR| against that question's KL"),
    ("n", "points correlated: conditions, or pooled (question, condition) pairs"),
    ("r, rho", "Pearson and Spearman correlation of mean Delta IPR with the measure"),
    ("[95% CI]", "percentile bootstrap over questions (1,000 resamples, seeded): how much the value moves "
                 "with the questions asked, not with the choice of conditions"),
    ("p", "two-sided permutation p-value across the conditions (every re-pairing up to 7 conditions, 9,999 "
          "seeded random ones above); with "
          "k conditions it cannot be below about 2/k!, so a few conditions never show a relation. Not given "
          "at the sample level, whose pooled rows are not independent"),
)


def render(folder: str | Path) -> Path:
    folder = Path(folder)
    missing = [n for n in ("config.json", "summary.csv", "correlation.csv", "spectra.parquet")
               if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a finished run folder (missing {missing}); "
                                "create one with `python -m analysis.compare`")
    config = read_config(folder)
    summary = pd.read_csv(folder / "summary.csv")
    correlation = pd.read_csv(folder / "correlation.csv")
    spectra = pd.read_parquet(folder / "spectra.parquet")
    layer, group = headline(spectra, config)
    (folder / "figures").mkdir(exist_ok=True)
    drawn = {
        "delta_ipr_vs_consistency": plots.consistency_panels(summary, correlation, layer, group),
        "ipr_per_layer": plots.ipr_panels(spectra),
        "singular_spectra": plots.spectra_panels(spectra, layer, group, sorted(summary["keep"].unique(), reverse=True)),
        "accuracy_flips_kl": plots.metric_panels(summary),
        "kept_token_maps": _maps_figure(folder, summary),
    }
    for name, fig in drawn.items():
        if fig is not None:
            fig.savefig(folder / "figures" / f"{name}.png", dpi=110, bbox_inches="tight")
            plots.plt.close(fig)
    page = page_html(folder, config, summary, correlation, layer, group)
    tmp = folder / "report.html.tmp"
    tmp.write_text(page)
    tmp.replace(folder / "report.html")
    return folder / "report.html"


def _map_keep(summary: pd.DataFrame) -> float:
    """The keep level the kept-token figure shows: the middle one."""
    keeps = sorted(summary["keep"].unique())
    return keeps[len(keeps) // 2]


def _last_stage(kept: pd.DataFrame, keep: float) -> pd.DataFrame:
    """Each (sample, method)'s kept tokens after its last stage at ``keep``."""
    return kept[kept.keep == keep].sort_values("stage").groupby(["sample_id", "method"]).last().reset_index()


def save_thumbnails(folder: str | Path, samples) -> None:
    """The images of the first ``MAP_SAMPLES`` samples the kept-token figure shows (of ``samples``, the run's
    ``Sample`` records; those with leverage scores first), at most ``THUMBNAIL_SIDE`` pixels a side, into
    ``folder/thumbnails/`` as ``0.png, 1.png, ...`` with ``index.json`` (their sample ids and questions, in
    that order): the report is then rendered from the run folder alone."""
    folder = Path(folder)
    kept = pd.read_parquet(folder / "kept.parquet")
    if not len(kept):
        return
    last = _last_stage(kept, _map_keep(pd.read_csv(folder / "summary.csv")))
    by_id = {s.question_id: s for s in samples}
    shown = [by_id[i] for i in dict.fromkeys(last["sample_id"]) if i in by_id]
    leverage = folder / "leverage.parquet"
    if leverage.is_file():  # samples with leverage maps first (a run's --spectra-subset decomposes only some)
        mapped = set(pd.read_parquet(leverage, columns=["sample_id"])["sample_id"])
        shown.sort(key=lambda s: s.question_id not in mapped)
    chosen = shown[:MAP_SAMPLES]
    (folder / THUMBNAILS).mkdir(exist_ok=True)
    for n, sample in enumerate(chosen):
        image = sample.load_image()
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        image.save(folder / THUMBNAILS / f"{n}.png")
    write_atomically(folder / THUMBNAILS / "index.json",
                     json.dumps([{"sample_id": s.question_id, "question": s.question} for s in chosen], indent=1))


def _thumbnails(folder: Path) -> list[tuple[str, str, Image.Image]]:
    """(sample id, question, image) of each thumbnail the run folder holds (none for a folder without)."""
    try:
        index = json.loads((folder / THUMBNAILS / "index.json").read_text())
        out = []
        for n, entry in enumerate(index):
            with Image.open(folder / THUMBNAILS / f"{n}.png") as image:
                out.append((str(entry["sample_id"]), str(entry["question"]), image.convert("RGB")))
        return out
    except (OSError, ValueError, TypeError, KeyError, Image.DecompressionBombError):
        return []


def _maps_figure(folder, summary):
    """Per sample and tile of its visual tokens: the baseline's leverage at layer 2, then each method's kept
    tokens at the middle keep level; drawn on the run folder's thumbnails."""
    kept_file, leverage_file = folder / "kept.parquet", folder / "leverage.parquet"
    if not kept_file.is_file():
        return None
    kept = pd.read_parquet(kept_file)
    keep = _map_keep(summary)
    last = _last_stage(kept, keep)
    thumbnails = [t for t in _thumbnails(folder) if (last.sample_id == t[0]).any()]
    if not thumbnails:
        return None
    methods = sorted(last["method"].unique())
    leverage = pd.read_parquet(leverage_file) if leverage_file.is_file() else pd.DataFrame()
    layouts = {i: _tiles(last[last.sample_id == i].iloc[0]) for i, _, _ in thumbnails}
    panels = [(i, question, image, tile) for i, question, image in thumbnails for tile in layouts[i]]
    columns = 1 + len(methods)
    fig, axes = plots.plt.subplots(len(panels), columns, figsize=(2.5 * columns, 2.6 * len(panels)), squeeze=False,
                                   layout="constrained")
    for r, (sample_id, question, image, tile) in enumerate(panels):
        where = f", {tile['name']} tokens" if len(layouts[sample_id]) > 1 else ""
        lev = leverage[(leverage.sample_id == sample_id) & (leverage.layer == 2)] if len(leverage) else leverage
        if len(lev):
            plots.kept_token_map(image, None, tile, np.asarray(lev.iloc[0]["leverage"]),
                                 title=f"{question}\nleverage, layer 2{where}", ax=axes[r, 0],
                                 value_index=np.asarray(lev.iloc[0]["visual_index"], int))
        else:
            plots.kept_token_map(image, None, tile, title=question, ax=axes[r, 0])
        for c, method in enumerate(methods, 1):
            row = last[(last.sample_id == sample_id) & (last.method == method)]
            merged = row.iloc[0]["merged_from"] if len(row) and "merged_from" in row else None
            plots.kept_token_map(image, row.iloc[0]["kept"] if len(row) else [], tile,
                                 title=f"{method}, keep={keep:g}{where}", ax=axes[r, c], merged=merged)
    return fig


def _tiles(row) -> list[dict]:
    """The tiles of a kept-token row (runs before tiles were recorded: one square grid)."""
    if "tiles" in row and isinstance(row["tiles"], str):
        return json.loads(row["tiles"])
    grid = int(round(np.sqrt(int(row["n_visual"]))))
    return [{"start": 0, "rows": grid, "cols": grid, "newline": False, "box": (0, 0, 1, 1), "name": "image"}]


# --------------------------------------------------------------------------------------------- page

def reading(summary: pd.DataFrame, correlation: pd.DataFrame, layer: int, group: str) -> list[Markup]:
    """A few sentences written from the numbers: the most consistent method at matched FLOPs, the largest
    change, and what the correlation across conditions can and cannot say."""
    lines = []
    if len(summary):
        target = float(np.median(summary["rel_flops"]))
        at_target = {}
        for method, frame in summary.groupby("method"):
            frame = frame.sort_values("rel_flops")
            x, y = frame["rel_flops"].to_numpy(), frame["flip_rate"].to_numpy()
            if x.min() <= target <= x.max():
                at_target[method] = float(np.interp(target, x, y))
        if at_target:
            ranked = sorted(at_target.items(), key=lambda kv: kv[1])
            best = ranked[0]
            others = ", ".join(f"{m} {100 * v:.1f}%" for m, v in ranked[1:])
            lines.append(Markup("At matched cost (about {:.0f}% of the unpruned model's FLOPs, interpolated along "
                                "each method's keep levels), <b>{}</b> changes the fewest answers: a flip rate of "
                                "{:.1f}%{}").format(100 * target, best[0], 100 * best[1],
                                                    f" against {others}." if others else "."))
        worst = summary.sort_values("flip_rate").iloc[-1]
        change = f"The largest change is {worst['method']} at keep={worst['keep']:g}: {100 * worst['flip_rate']:.1f}% "
        if np.isfinite(worst["baseline_accuracy"]):
            lines.append(escape(
                f"{change}of answers flip while accuracy moves from {100 * worst['baseline_accuracy']:.1f}% to "
                f"{100 * worst['accuracy']:.1f}% (C\u2192I {int(worst['c_to_i'])}, I\u2192C {int(worst['i_to_c'])}): "
                "accuracy hides part of the change."))
        else:
            lines.append(escape(f"{change}of answers flip. The questions have no ground truth, so accuracy is not "
                                "measured: flips, KL and JS compare with the unpruned model only."))
    head = correlation[(correlation.level == "condition") & (correlation.layer == layer) &
                       (correlation.group == group)]
    for measure, label in (("flip", "flip rate"), ("kl", "mean KL")):
        row = head[head.measure == measure]
        if len(row):
            lines.append(escape(_correlation_sentence(row.iloc[0], label, layer, group)))
    return lines


def _correlation_sentence(r, label: str, layer: int, group: str) -> str:
    n = int(r.n)
    where = f"mean Delta IPR at layer {layer} ({group} tokens)"
    if n < MIN_CONDITIONS or not np.isfinite(r.pearson):
        return (f"This run has {n} conditions: even a perfect correlation across them would have a permutation "
                f"p-value of {smallest_p(n):.2g}, so it cannot show whether {where} tracks {label} (Pearson r = "
                f"{r.pearson:.2f}, for the record). Add keep levels or methods.")
    verdict = ("unlikely to be chance (p < 0.05)" if r.pearson_p < 0.05 else
               "not distinguishable from chance at this number of conditions (p >= 0.05)")
    return (f"Across {n} conditions, {where} correlates with {label} at Pearson r = {r.pearson:.2f} (permutation "
            f"p = {r.pearson_p:.2g}) and Spearman rho = {r.spearman:.2f} (p = {r.spearman_p:.2g}): {verdict}. "
            f"Resampling the questions moves r within [{r.pearson_low:.2f}, {r.pearson_high:.2f}] (95%), which "
            "reflects the questions asked, not the choice of conditions.")


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if fmt == "text":
        return str(value)
    if fmt == "percent":
        return f"{100 * float(value):.1f}"
    if fmt == "{:d}":
        return f"{int(value):d}"
    return fmt.format(float(value))


def _table(frame: pd.DataFrame, columns: dict) -> Markup:
    """An HTML table of ``frame``'s ``columns`` ({column: (header, format)}), text left, numbers right."""
    cls = lambda fmt: ' class="text"' if fmt == "text" else ""  # noqa: E731
    head = "".join(f"<th{cls(fmt)}>{escape(header)}</th>" for header, fmt in columns.values())
    body = "".join("<tr>" + "".join(f"<td{cls(fmt)}>{escape(_cell(row[c], fmt))}</td>"
                                    for c, (_, fmt) in columns.items()) + "</tr>" for _, row in frame.iterrows())
    return Markup(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def correlation_table(correlation: pd.DataFrame) -> pd.DataFrame:
    """The headline correlation rows as the report shows them: value [95% CI] and p per statistic."""
    def ci(value, low, high):
        return "-" if not np.isfinite(value) else f"{value:.2f} [{low:.2f}, {high:.2f}]"
    p = correlation.get("pearson_p", pd.Series(np.nan, index=correlation.index))
    sp = correlation.get("spearman_p", pd.Series(np.nan, index=correlation.index))
    return pd.DataFrame({
        "level": correlation["level"], "measure": correlation["measure"].map(lambda m: MEASURE_NAMES.get(m, m)),
        "n": correlation["n"],
        "pearson": [ci(*v) for v in correlation[["pearson", "pearson_low", "pearson_high"]].to_numpy()],
        "pearson_p": p,
        "spearman": [ci(*v) for v in correlation[["spearman", "spearman_low", "spearman_high"]].to_numpy()],
        "spearman_p": sp})


CORRELATION_COLUMNS = {"level": ("level", "text"), "measure": ("measure", "text"), "n": ("n", "{:d}"),
                       "pearson": ("Pearson r [95% CI]", "text"), "pearson_p": ("p", "{:.2g}"),
                       "spearman": ("Spearman rho [95% CI]", "text"), "spearman_p": ("p", "{:.2g}")}


def page_html(folder, config, summary, correlation, layer, group) -> str:
    """The report page (``templates/report.html.j2``) with every figure already in ``folder/figures``."""
    environment = jinja2.Environment(loader=jinja2.PackageLoader("analysis.study", "templates"), autoescape=True,
                                     undefined=jinja2.StrictUndefined)
    head = correlation[(correlation.layer == layer) & (correlation.group == group)]
    summary_columns = {c: spec for c, spec in SUMMARY_COLUMNS.items() if c in summary.columns}
    figures = [{"title": f.title, "caption": f.caption,
                "data": base64.b64encode((folder / "figures" / f"{f.name}.png").read_bytes()).decode()}
               for f in FIGURES if (folder / "figures" / f"{f.name}.png").is_file()]
    settings = ", ".join(f"{k}={config[k]}" for k in ("model", "dataset", "n_samples", "methods", "keep", "seed",
                                                      "device", "center"))
    share = config.get("spectra_share", 1.0)
    if share < 1:
        settings += (f"; spectra and leverage scores of a seeded {share:.0%} of the samples (spectra.parquet: "
                     "has_spectrum), IPR and PR of every sample")
    return environment.get_template("report.html.j2").render(
        run_name=Path(folder).name.removesuffix(".partial"), settings=settings,
        commit=str(config.get("git_commit")), layer=layer, group=group,
        reading=reading(summary, correlation, layer, group),
        summary_table=_table(summary, {c: (h, f) for c, (h, f, _) in summary_columns.items()}),
        summary_glossary=[(h, d) for h, _, d in summary_columns.values()],
        correlation_table=_table(correlation_table(head), CORRELATION_COLUMNS),
        correlation_glossary=CORRELATION_GLOSSARY, figures=figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        path = render(args.folder)
    except (FileNotFoundError, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
