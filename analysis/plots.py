"""Every figure of the toolkit. Each function takes ``ax=None`` and returns the figure; none shows it.

Compute modules never import this one (nor matplotlib); it is imported only where figures are made.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib

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
