"""Every figure of the toolkit. Each function takes ``ax=None`` and returns the figure; none shows it.

Compute modules never import this one (nor matplotlib); it is imported only where figures are made.
"""

from __future__ import annotations

from typing import Sequence

import sys

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

MEASURE_LABELS = {"flip_rate": "flip rate (AllFlips)", "mean_kl": "mean KL(base || pruned)",
                  "dutta_flips": "Flips (C->I + I->C) / N", "mean_js": "mean JS", "accuracy": "accuracy"}


def _palette(methods):
    return dict(zip(sorted(methods), sns.color_palette("deep", len(methods))))


def delta_ipr_vs_consistency(summary: pd.DataFrame, correlation: pd.DataFrame, measure: str,
                             layer: int, group: str, ax=None):
    """One point per condition: mean Delta IPR against a consistency measure, a fit line, r and its CI."""
    fig, ax = _axes(ax, (5, 4))
    palette = _palette(summary["method"].unique())
    for method, part in summary.groupby("method"):
        ax.scatter(part["mean_delta_ipr"], part[measure], color=palette[method], s=30 + 120 * part["keep"],
                   label=method, edgecolor="black", linewidth=0.5, zorder=3)
        for _, r in part.iterrows():
            ax.annotate(f"{r['keep']:g}", (r["mean_delta_ipr"], r[measure]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    x, y = summary["mean_delta_ipr"].to_numpy(float), summary[measure].to_numpy(float)
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
    ax.set_xlabel(f"mean Delta IPR (layer {layer}, {group} tokens)")
    ax.set_ylabel(MEASURE_LABELS.get(measure, measure))
    ax.legend(fontsize=7)
    return fig


def _measure_column(summary_column: str) -> str:
    return {"flip_rate": "flip", "mean_kl": "kl", "dutta_flips": "changed_correctness", "mean_js": "js",
            "mean_forced_kl": "forced_kl"}.get(summary_column, summary_column)


def ipr_per_layer(spectra: pd.DataFrame, group: str, ax=None):
    """Mean IPR per layer: the baseline (black) and every condition (colour = method, style = keep)."""
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
    ax.legend(fontsize=6, ncol=2)
    return fig


def singular_spectra(spectra: pd.DataFrame, layer: int, group: str, keep: float, ax=None):
    """Mean normalised singular values s_i / s_1 at one layer: baseline against each method at ``keep``."""
    fig, ax = _axes(ax, (5, 4))
    part = spectra[(spectra.layer == layer) & (spectra.group == group) &
                   ((spectra.method == "baseline") | (spectra.keep == keep))]
    palette = _palette([m for m in part["method"].unique() if m != "baseline"])
    for method, frame in part.groupby("method"):
        values = [np.asarray(v, float) for v in frame["singular_values"]]
        width = min(len(v) for v in values)
        curve = np.mean([v[:width] / max(v[0], 1e-12) for v in values], axis=0)
        ax.plot(np.arange(1, width + 1), curve, color="black" if method == "baseline" else palette[method],
                lw=2 if method == "baseline" else 1.2, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("s_i / s_1 (mean over samples)")
    ax.set_title(f"layer {layer}, {group} tokens, keep={keep:g}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def metric_against(summary: pd.DataFrame, metric: str, x: str, baseline: float | None = None, ax=None):
    """A summary metric against ``keep`` or ``rel_flops``, one line per method."""
    fig, ax = _axes(ax, (4.5, 3.5))
    palette = _palette(summary["method"].unique())
    for method, frame in summary.groupby("method"):
        frame = frame.sort_values(x)
        ax.plot(frame[x], frame[metric], "o-", color=palette[method], label=method)
    if baseline is not None:
        ax.axhline(baseline, color="black", lw=1, ls="--", label="baseline")
    ax.set_xlabel({"keep": "keep (fraction of visual tokens)", "rel_flops": "relative FLOPs (whole model)"}[x])
    ax.set_ylabel(MEASURE_LABELS.get(metric, metric))
    ax.legend(fontsize=7)
    return fig


def kept_token_map(image, kept: list[int] | None, grid: int, values: list[float] | None = None,
                   title: str = "", ax=None):
    """The image with its patch grid: dropped patches dimmed, or a heat map of ``values`` per patch."""
    fig, ax = _axes(ax, (2.2, 2.2))
    array = np.asarray(image.convert("RGB"), dtype=float) / 255
    ax.imshow(array, extent=(0, grid, grid, 0), interpolation="nearest")
    if values is not None:
        heat = np.asarray(values, float).reshape(grid, grid)
        ax.imshow(heat, extent=(0, grid, grid, 0), cmap="magma", alpha=0.6, interpolation="nearest")
    if kept is not None:
        mask = np.ones(grid * grid, bool)
        mask[np.asarray(kept, int)] = False
        shade = np.zeros((grid, grid, 4))
        shade[..., 3] = mask.reshape(grid, grid) * 0.75
        ax.imshow(shade, extent=(0, grid, grid, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)
    return fig
