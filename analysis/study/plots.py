"""Every figure of the toolkit. Each function takes ``ax=None`` and returns the figure; none shows it.

Compute modules never import this one (nor matplotlib); it is imported only where figures are made.
"""

from __future__ import annotations

import sys
from typing import Sequence

import matplotlib

if "ipykernel" not in sys.modules:  # files everywhere; inside a notebook keep its inline backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _axes(ax, figsize=(6, 4)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def loss_curve(log: Sequence[dict], ax=None):
    """Training loss per step (and val accuracy on a second axis when logged)."""
    fig, ax = _axes(ax)
    steps = [r["step"] for r in log]
    losses = [r["loss"] for r in log]
    ax.plot(steps, losses, lw=0.6, alpha=0.4, color="tab:blue", label="loss (per step)")
    window = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    ax.plot(steps, smooth, color="tab:blue", label=f"loss (mean of {window})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on answer tokens")
    for before, after in zip(log, log[1:]):
        if after.get("stage", 1) != before.get("stage", 1):  # a run continued from a checkpoint
            ax.axvline(after["step"], color="grey", ls=":", lw=1)
            ax.annotate(f"stage {after['stage']}", (after["step"], 0), xycoords=("data", "axes fraction"),
                        xytext=(3, 4), textcoords="offset points", color="grey", fontsize=8)
    evals = [(r["step"], r["val_accuracy"]) for r in log if "val_accuracy" in r]
    if evals:
        twin = ax.twinx()
        twin.plot(*zip(*evals), "o-", color="tab:orange", label="val accuracy")
        twin.set_ylabel("val accuracy (%)")
        twin.set_ylim(0, 100)
        twin.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("Bundled shapes-LLaVA training")
    return fig


def lvpruning_curve(log: Sequence[dict], targets: Sequence[float], ax=None):
    """LVPruning training: causal and ratio losses, and the realised keep ratio per stage."""
    if ax is None:
        fig, (ax, right) = plt.subplots(1, 2, figsize=(11, 4))
    else:
        fig, right = ax.figure, ax.twinx()
    steps = [r["step"] for r in log]
    ax.plot(steps, [r["causal"] for r in log], label="causal loss", lw=0.8)
    ax.plot(steps, [r["ratio"] for r in log], label="ratio loss", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    ax.set_title("LVPruning decision modules: losses")
    for stage, target in enumerate(targets):
        line, = right.plot(steps, [r["kept"][stage] for r in log], lw=0.8, label=f"stage {stage + 1}")
        right.axhline(target, color=line.get_color(), ls="--", lw=0.8)
    right.set_ylim(0, 1)
    right.set_xlabel("step")
    right.set_ylabel("realised keep ratio (dashed: target)")
    right.legend()
    right.set_title("Realised keep ratio per stage")
    return fig


# ------------------------------------------------------------------------------------- run figures
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

MEASURE_LABELS = {"flip_rate": "flip rate (%)", "mean_kl": "mean KL(unpruned || pruned), nats",
                  "dutta_flips": "Flips: (C->I + I->C) / N (%)", "mean_js": "mean JS, nats", "accuracy": "accuracy (%)",
                  "mean_forced_kl": "mean forced KL, nats"}
PERCENT = {"flip_rate", "dutta_flips", "accuracy", "baseline_accuracy"}  # fractions shown in percent


def _shown(metric: str, values):
    """Values as plotted: fractions in percent (as the report's tables print them)."""
    return 100 * np.asarray(values, float) if metric in PERCENT else np.asarray(values, float)


def _palette(methods):
    return dict(zip(sorted(methods), sns.color_palette("deep", len(methods))))


def delta_ipr_vs_consistency(summary: pd.DataFrame, correlation: pd.DataFrame, measure: str,
                             layer: int, group: str, ax=None):
    """One point per condition: mean Delta IPR against a consistency measure, a fit line, r and its CI."""
    fig, ax = _axes(ax, (5, 4))
    palette = _palette(summary["method"].unique())
    for method, part in summary.groupby("method"):
        ys = _shown(measure, part[measure])
        ax.scatter(part["mean_delta_ipr"], ys, color=palette[method], s=30 + 120 * part["keep"],
                   label=method, edgecolor="black", linewidth=0.5, zorder=3)
        for keep, x, y in zip(part["keep"], part["mean_delta_ipr"], ys):
            ax.annotate(f"{keep:g}", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    x, y = summary["mean_delta_ipr"].to_numpy(float), _shown(measure, summary[measure])
    ok = np.isfinite(x) & np.isfinite(y)
    row = correlation[(correlation.level == "condition") & (correlation.layer == layer) &
                      (correlation.group == group) & (correlation.measure == _measure_column(measure))]
    if ok.sum() >= 2 and np.ptp(x[ok]) > 0:
        slope, intercept = np.polyfit(x[ok], y[ok], 1)
        grid = np.linspace(x[ok].min(), x[ok].max(), 50)
        label = "least-squares fit"
        if len(row):
            r = row.iloc[0]
            label = f"fit: r = {r.pearson:.2f} [{r.pearson_low:.2f}, {r.pearson_high:.2f}]"
        ax.plot(grid, slope * grid + intercept, color="gray", ls="--", label=label, zorder=2)
    ax.axvline(0, color="lightgray", lw=0.8, zorder=1)
    ax.set_xlabel(f"mean \u0394IPR (layer {layer}, {group} tokens)")
    ax.set_ylabel(MEASURE_LABELS.get(measure, measure))
    ax.legend(fontsize=7)
    return fig


def consistency_panels(summary: pd.DataFrame, correlation: pd.DataFrame, layer: int, group: str):
    """``delta_ipr_vs_consistency`` for flip rate, mean KL and Flips, side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    for ax, measure in zip(axes, ("flip_rate", "mean_kl", "dutta_flips")):
        delta_ipr_vs_consistency(summary, correlation, measure, layer, group, ax=ax)
    return fig


def _measure_column(summary_column: str) -> str:
    return {"flip_rate": "flip", "mean_kl": "kl", "dutta_flips": "changed_correctness", "mean_js": "js",
            "mean_forced_kl": "forced_kl"}.get(summary_column, summary_column)


def ipr_per_layer(spectra: pd.DataFrame, group: str, ax=None, legend: bool = True):
    """Mean IPR per layer: the baseline (black) and every condition (colour = method, style = keep); the
    legend, if drawn, sits outside the axes, where it hides no line."""
    fig, ax = _axes(ax, (6, 4))
    part = spectra[spectra.group == group]
    means = part.groupby(["method", "keep", "layer"])["ipr"].mean().reset_index()
    palette = _palette([m for m in means["method"].unique() if m != "baseline"])
    styles = dict(zip(sorted(means["keep"].unique(), reverse=True), ["-", "--", ":", "-."] * 3))
    for (method, keep), frame in means.groupby(["method", "keep"]):
        if method == "baseline":
            ax.plot(frame["layer"], frame["ipr"], color="black", lw=2.2, label="baseline", zorder=3)
        else:
            ax.plot(frame["layer"], frame["ipr"], color=palette[method], ls=styles[keep], lw=1.2,
                    label=f"{method} keep={keep:g}")
    ax.set_xlabel("layer (0 = input embeddings)")
    ax.set_ylabel(f"mean IPR ({group} tokens)")
    if legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    return fig


def ipr_panels(spectra: pd.DataFrame):
    """``ipr_per_layer`` for the visual and all-token groups, with one legend beside both."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.4), layout="constrained")
    for ax, group in zip(axes, ("visual", "all")):
        ipr_per_layer(spectra, group, ax=ax, legend=False)
        ax.set_title(f"{group} tokens", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, frameon=False)
    return fig


def singular_spectra(spectra: pd.DataFrame, layer: int, group: str, keep: float, ax=None):
    """Mean normalised singular values s_i / s_1 at one layer: baseline against each method at ``keep``, over
    the samples whose spectra were decomposed (all, or a run's ``--spectra-subset``; the title gives their
    number when some have none)."""
    fig, ax = _axes(ax, (5, 4))
    part = spectra[(spectra.layer == layer) & (spectra.group == group) &
                   ((spectra.method == "baseline") | (spectra.keep == keep))]
    decomposed = part[[len(v) > 0 for v in part["singular_values"]]]
    palette = _palette([m for m in part["method"].unique() if m != "baseline"])
    for method, frame in decomposed.groupby("method"):
        values = [np.asarray(v, float) for v in frame["singular_values"]]
        width = min(len(v) for v in values)
        curve = np.mean([v[:width] / max(v[0], 1e-12) for v in values], axis=0)
        ax.plot(np.arange(1, width + 1), curve, color="black" if method == "baseline" else palette[method],
                lw=2 if method == "baseline" else 1.2, label=method)
    title = f"layer {layer}, {group} tokens, keep={keep:g}"
    if len(decomposed) < len(part):
        title += f"\nspectra of {decomposed['sample_id'].nunique()} of {part['sample_id'].nunique()} samples"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("index i")
    if not len(decomposed):
        ax.text(0.5, 0.5, "no sample has its spectrum decomposed here", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
        return fig
    ax.set_yscale("log")
    ax.set_ylabel("s_i / s_1 (mean over samples)")
    ax.legend(fontsize=7)
    return fig


def spectra_panels(spectra: pd.DataFrame, layer: int, group: str, keeps):
    """``singular_spectra`` at one layer, one panel per keep level."""
    fig, axes = plt.subplots(1, len(keeps), figsize=(4.8 * len(keeps), 4), squeeze=False, layout="constrained")
    for ax, keep in zip(axes[0], keeps):
        singular_spectra(spectra, layer, group, keep, ax=ax)
    return fig


def metric_against(summary: pd.DataFrame, metric: str, x: str, baseline: float | None = None, ax=None):
    """A summary metric against ``keep`` or ``rel_flops``, one line per method."""
    fig, ax = _axes(ax, (4.5, 3.5))
    palette = _palette(summary["method"].unique())
    for method, frame in summary.groupby("method"):
        frame = frame.sort_values(x)
        ax.plot(_shown(x, frame[x]), _shown(metric, frame[metric]), "o-", color=palette[method], label=method)
    if baseline is not None:
        ax.axhline(float(_shown(metric, baseline)), color="black", lw=1, ls="--", label="unpruned")
    ax.set_xlabel({"keep": "keep (fraction of visual tokens)", "rel_flops": "relative FLOPs (whole model)"}[x])
    ax.set_ylabel(MEASURE_LABELS.get(metric, metric))
    ax.legend(fontsize=7)
    return fig


def metric_panels(summary: pd.DataFrame):
    """Accuracy, flip rate and mean KL (columns) against keep and relative FLOPs (rows)."""
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), layout="constrained")
    baseline_accuracy = summary["baseline_accuracy"].iloc[0] if len(summary) else None
    for col, metric in enumerate(("accuracy", "flip_rate", "mean_kl")):
        for row, x in enumerate(("keep", "rel_flops")):
            metric_against(summary, metric, x, baseline_accuracy if metric == "accuracy" else None, ax=axes[row, col])
    return fig


def _cells(layout, indices, values=None):
    """(rows, cols, box, [rows, cols] array): ``values`` (or 1) at the cells of visual-token ``indices`` of
    one ``layout`` -- an int n (n x n tokens over the whole image) or a tile (``lofi.families.Tile`` or its
    dict: ``start, rows, cols, newline, box``); NaN elsewhere."""
    if isinstance(layout, int):
        layout = {"start": 0, "rows": layout, "cols": layout, "newline": False, "box": (0.0, 0.0, 1.0, 1.0)}
    elif not isinstance(layout, dict):
        layout = {k: getattr(layout, k) for k in ("start", "rows", "cols", "newline", "box")}
    rows, cols, width = layout["rows"], layout["cols"], layout["cols"] + bool(layout["newline"])
    grid = np.full((rows, cols), np.nan)
    for j, index in enumerate(indices):
        local = int(index) - layout["start"]
        if 0 <= local < rows * width and local % width < cols:
            grid[local // width, local % width] = 1.0 if values is None else values[j]
    return rows, cols, tuple(layout["box"]), grid


def kept_token_map(image, kept: list[int] | None, layout, values: list[float] | None = None,
                   title: str = "", ax=None, colorbar_label: str = "leverage score", value_index=None,
                   merged: list[int] | None = None):
    """The image with one tile's token grid over it (``layout``: an int n for an n x n grid, or a tile of
    ``lofi.families.tiles``, any rows x cols): dropped tokens dimmed (those ``merged`` into a kept token, by a
    merging method, half as much), or a heat map of ``values`` (given for the visual-token indices
    ``value_index``, default 0, 1, ...) with its colour scale."""
    fig, ax = _axes(ax, (2.2, 2.2))
    array = np.asarray(image.convert("RGB"), dtype=float) / 255
    height, width = array.shape[:2]
    ax.imshow(array, extent=(0, width, height, 0), interpolation="nearest")
    rows, cols, (left, top, right, bottom), _ = _cells(layout, [])
    extent = (left * width, right * width, bottom * height, top * height)
    if values is not None:
        index = range(len(values)) if value_index is None else value_index
        heat = _cells(layout, index, values)[3]
        shown = ax.imshow(np.ma.masked_invalid(heat), extent=extent, cmap="magma", alpha=0.6,
                          interpolation="nearest")
        bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
        bar.set_label(colorbar_label, fontsize=7)
        bar.ax.tick_params(labelsize=6)
    if kept is not None:
        present = _cells(layout, kept)[3]
        folded = _cells(layout, list(merged if merged is not None else []))[3]
        shade = np.zeros((rows, cols, 4))
        shade[..., 3] = np.isnan(present) * np.where(np.isnan(folded), 0.75, 0.35)
        ax.imshow(shade, extent=extent, interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)
    return fig
