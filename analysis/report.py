"""``python -m analysis.report DIR``: figures and ``report.html`` of a run folder, from its tables alone.

This module owns presentation: it never loads a model. It reads ``config.json``, ``summary.csv``,
``correlation.csv``, ``spectra.parquet``, ``kept.parquet`` and ``leverage.parquet``, writes
``figures/*.png`` and one self-contained ``report.html`` (figures embedded as data URIs) with the
tables and a short reading of the results written from the numbers.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots
from analysis.datasets import load_split
from analysis.tables import headline

FIGURES = ("delta_ipr_vs_consistency", "ipr_per_layer", "singular_spectra", "accuracy_flips_kl",
           "kept_token_maps")


def render(folder: str | Path) -> Path:
    folder = Path(folder)
    missing = [n for n in ("config.json", "summary.csv", "correlation.csv", "spectra.parquet")
               if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a finished run folder (missing {missing}); "
                                "create one with `python -m analysis.compare`")
    config = json.loads((folder / "config.json").read_text())
    summary = pd.read_csv(folder / "summary.csv")
    correlation = pd.read_csv(folder / "correlation.csv")
    spectra = pd.read_parquet(folder / "spectra.parquet")
    layer, group = headline(spectra, config)
    (folder / "figures").mkdir(exist_ok=True)
    figures = {
        "delta_ipr_vs_consistency": _consistency_figure(summary, correlation, layer, group),
        "ipr_per_layer": _ipr_figure(spectra),
        "singular_spectra": _spectra_figure(spectra, layer, group, sorted(summary["keep"].unique(), reverse=True)),
        "accuracy_flips_kl": _metrics_figure(summary),
        "kept_token_maps": _maps_figure(folder, config, summary),
    }
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(folder / "figures" / f"{name}.png", dpi=110, bbox_inches="tight")
            plots.plt.close(fig)
    page = _html(folder, config, summary, correlation, layer, group)
    tmp = folder / "report.html.tmp"
    tmp.write_text(page)
    tmp.replace(folder / "report.html")
    return folder / "report.html"


# ------------------------------------------------------------------------------------------ figures

def _consistency_figure(summary, correlation, layer, group):
    fig, axes = plots.plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, measure in zip(axes, ("flip_rate", "mean_kl", "dutta_flips")):
        plots.delta_ipr_vs_consistency(summary, correlation, measure, layer, group, ax=ax)
    fig.suptitle("Delta IPR against consistency with the unpruned model (one point per condition; label = keep)")
    return fig


def _ipr_figure(spectra):
    fig, axes = plots.plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, group in zip(axes, ("visual", "all")):
        plots.ipr_per_layer(spectra, group, ax=ax)
        ax.set_title(f"{group} tokens")
    return fig


def _spectra_figure(spectra, layer, group, keeps):
    fig, axes = plots.plt.subplots(1, len(keeps), figsize=(4.6 * len(keeps), 4), squeeze=False)
    for ax, keep in zip(axes[0], keeps):
        plots.singular_spectra(spectra, layer, group, keep, ax=ax)
    return fig


def _metrics_figure(summary):
    fig, axes = plots.plt.subplots(2, 3, figsize=(14, 7.5))
    baseline_accuracy = summary["baseline_accuracy"].iloc[0] if len(summary) else None
    for col, metric in enumerate(("accuracy", "flip_rate", "mean_kl")):
        for row, x in enumerate(("keep", "rel_flops")):
            plots.metric_against(summary, metric, x, baseline_accuracy if metric == "accuracy" else None,
                                 ax=axes[row, col])
    fig.tight_layout()
    return fig


def _maps_figure(folder, config, summary, n_samples: int = 3):
    kept_file, leverage_file = folder / "kept.parquet", folder / "leverage.parquet"
    if not kept_file.is_file():
        return None
    kept = pd.read_parquet(kept_file)
    if not len(kept):
        return None
    try:
        samples = {s.question_id: s for s in load_split(config["dataset"], limit=config["limit"] or None)}
    except Exception:  # the images are not available here: the report still renders without maps
        return None
    keeps = sorted(summary["keep"].unique())
    keep = keeps[len(keeps) // 2]
    last = kept[kept.keep == keep].sort_values("stage").groupby(["sample_id", "method"]).last().reset_index()
    ids = [i for i in dict.fromkeys(last["sample_id"]) if i in samples][:n_samples]
    methods = sorted(last["method"].unique())
    leverage = pd.read_parquet(leverage_file) if leverage_file.is_file() else pd.DataFrame()
    n_visual = int(kept["n_visual"].iloc[0])
    grid = int(round(np.sqrt(n_visual)))
    if grid * grid != n_visual:
        return None
    columns = 1 + len(methods)
    fig, axes = plots.plt.subplots(len(ids), columns, figsize=(2.3 * columns, 2.5 * len(ids)), squeeze=False)
    for r, sample_id in enumerate(ids):
        image = samples[sample_id].load_image()
        lev = leverage[(leverage.sample_id == sample_id) & (leverage.layer == 2)] if len(leverage) else leverage
        values = None
        if len(lev):
            values = np.zeros(n_visual)
            values[np.asarray(lev.iloc[0]["visual_index"], int)] = lev.iloc[0]["leverage"]
        plots.kept_token_map(image, None, grid, values, title=f"{samples[sample_id].question}\nleverage, layer 2",
                             ax=axes[r, 0])
        for c, method in enumerate(methods, 1):
            row = last[(last.sample_id == sample_id) & (last.method == method)]
            plots.kept_token_map(image, row.iloc[0]["kept"] if len(row) else [], grid,
                                 title=f"{method}, keep={keep:g}", ax=axes[r, c])
    fig.suptitle("Kept visual tokens (dropped patches dimmed) and baseline leverage scores", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- page

def reading(summary: pd.DataFrame, correlation: pd.DataFrame, layer: int, group: str) -> list[str]:
    """A few sentences written from the numbers: most consistent method at matched FLOPs, correlation."""
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
            lines.append(f"At matched cost (about {100 * target:.0f}% of the unpruned model's FLOPs, interpolated "
                         f"along each method's keep levels), <b>{html.escape(best[0])}</b> changes the fewest "
                         f"answers: a flip rate of {100 * best[1]:.1f}%" + (f" against {others}." if others else "."))
        worst = summary.sort_values("flip_rate").iloc[-1]
        lines.append(f"The largest change is {worst['method']} at keep={worst['keep']:g}: "
                     f"{100 * worst['flip_rate']:.1f}% of answers flip while accuracy moves from "
                     f"{100 * worst['baseline_accuracy']:.1f}% to {100 * worst['accuracy']:.1f}% "
                     f"(C->I {int(worst['c_to_i'])}, I->C {int(worst['i_to_c'])}): accuracy hides part of the change.")
    head = correlation[(correlation.level == "condition") & (correlation.layer == layer) &
                       (correlation.group == group)]
    for measure, label in (("flip", "flip rate"), ("kl", "mean KL")):
        row = head[head.measure == measure]
        if len(row):
            r = row.iloc[0]
            sign = "excludes" if (r.pearson_low > 0 or r.pearson_high < 0) else "includes"
            lines.append(f"Across {int(r.n)} conditions, mean Delta IPR at layer {layer} ({group} tokens) "
                         f"correlates with {label} at Pearson r = {r.pearson:.2f} (95% bootstrap CI "
                         f"[{r.pearson_low:.2f}, {r.pearson_high:.2f}], which {sign} 0) and Spearman rho = "
                         f"{r.spearman:.2f} [{r.spearman_low:.2f}, {r.spearman_high:.2f}].")
    return lines


def _image_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _html(folder, config, summary, correlation, layer, group) -> str:
    fmt = {c: "{:.3f}".format for c in summary.columns if summary[c].dtype.kind == "f"}
    head = correlation[(correlation.layer == layer) & (correlation.group == group)]
    sections = [f"<p>{line}</p>" for line in reading(summary, correlation, layer, group)]
    figures = "".join(f"<h3>{name.replace('_', ' ')}</h3>{_image_tag(folder / 'figures' / (name + '.png'))}"
                      for name in FIGURES if (folder / "figures" / f"{name}.png").is_file())
    settings = html.escape(", ".join(f"{k}={config[k]}" for k in ("model", "dataset", "n_samples", "methods",
                                                                  "keep", "seed", "device", "center")))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Pruning consistency report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1250px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:12px;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
th{{background:#f3f3f3}}img{{max-width:100%;border:1px solid #eee;margin:.5em 0}}code{{background:#f5f5f5}}
.reading p{{background:#f7f9fc;border-left:4px solid #4a7bd0;padding:.5em 1em}}</style></head><body>
<h1>Visual-token pruning: what changes</h1>
<p><small>{settings}; commit <code>{html.escape(str(config.get('git_commit')))}</code>.
Headline: layer {layer} (0 = input embeddings), {group} tokens.</small></p>
<h2>Reading</h2><div class="reading">{''.join(sections)}</div>
<h2>Summary (one row per condition)</h2>{summary.to_html(index=False, formatters=fmt, na_rep="-")}
<h2>Correlation of Delta IPR with consistency (headline layer and group)</h2>
{head.to_html(index=False, float_format="{:.3f}".format, na_rep="-")}
<p>All layers and groups are in <code>correlation.csv</code>.</p>
<h2>Figures</h2>{figures}
</body></html>"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        path = render(args.folder)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
