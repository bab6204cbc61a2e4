"""Write (and with --execute, run) the three notebooks from the cell sources below.

    python notebooks/build.py --execute      # regenerate notebooks/*.ipynb with their outputs

Keeping the sources here makes them reviewable as plain Python; the .ipynb files are committed with
outputs. Each notebook reads its settings from the environment so the test suite can run it small:
``RUN_DIR`` (an existing run folder; none: the notebook runs a small comparison itself) and
``NOTEBOOK_LIMIT`` (questions for that comparison).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

SETUP = '''import os, tempfile
from pathlib import Path
import pandas as pd
import matplotlib.pyplot as plt
from analysis import compare, plots

RUN_DIR = os.environ.get("RUN_DIR")          # an existing run folder, or None
LIMIT = int(os.environ.get("NOTEBOOK_LIMIT", "20"))
if RUN_DIR is None:
    RUN_DIR = Path(tempfile.mkdtemp()) / "run"
    compare.main(["--methods", "lofi", "lvpruning", "fastv", "random", "--keep", "0.5", "0.25", "0.1",
                  "--limit", str(LIMIT), "--out", str(RUN_DIR), "--no-progress"])
RUN_DIR = Path(RUN_DIR)
summary = pd.read_csv(RUN_DIR / "summary.csv")
correlation = pd.read_csv(RUN_DIR / "correlation.csv")
spectra = pd.read_parquet(RUN_DIR / "spectra.parquet")
print(RUN_DIR, len(summary), "conditions")'''

NOTEBOOKS = {
    "ipr_vs_consistency.ipynb": [
        ("markdown", "# Delta IPR against consistency\n\nEach point is one condition (method, keep). "
                     "x: the mean change of the inverse participation ratio of the hidden states against the "
                     "unpruned model on the same samples; y: how far the answers moved (flip rate, KL). "
                     "Runs a small comparison on the bundled model when `RUN_DIR` is not set."),
        ("code", SETUP),
        ("code", '''layer, group = int(spectra.layer.max()), "all"
plots.consistency_panels(summary, correlation, layer, group)
plt.show()'''),
        ("markdown", "Correlations at every layer after pruning starts (condition level): Pearson r, its 95% "
                     "bootstrap interval over questions, and the permutation p-value across conditions."),
        ("code", '''table = correlation[(correlation.level == "condition") & (correlation.measure.isin(["flip", "kl"]))]
table.pivot_table(index=["group", "layer"], columns="measure",
                  values=["pearson", "pearson_low", "pearson_high", "pearson_p"]).round(3)'''),
        ("code", '''plots.ipr_panels(spectra)
plt.show()'''),
    ],
    "leverage_and_kept_tokens.ipynb": [
        ("markdown", "# Leverage scores and kept tokens\n\nLeverage scores of the visual tokens' hidden "
                     "states (what `lofi` ranks by) on the image grid, and which patches each method keeps."),
        ("code", '''import os, torch
import matplotlib.pyplot as plt
import lofi
from analysis import plots
from analysis.capture import Capture
from analysis.datasets import load_split
from analysis.evaluate import batch_inputs, load_model

model, processor = load_model()
samples = load_split("test", limit=int(os.environ.get("NOTEBOOK_SAMPLES", "4")))[::1]
inputs = batch_inputs(processor, samples)
grid = int(model.config.vision_config.image_size // model.config.vision_config.patch_size)
with torch.no_grad(), Capture(model, leverage_layers=[0, 2]) as capture:
    model(**inputs)
    rows = [r for r in capture.take() if r.leverage is not None]
print(len(rows), "leverage maps")'''),
        ("code", '''fig, axes = plt.subplots(len(samples), 2, figsize=(5, 2.6 * len(samples)), squeeze=False)
for r in rows:
    col = 0 if r.layer == 0 else 1
    plots.kept_token_map(samples[r.row].load_image(), None, grid, r.leverage,
                         title=f"{samples[r.row].question}\\nleverage, layer {r.layer}", ax=axes[r.row, col])
fig.tight_layout(); plt.show()'''),
        ("code", '''methods = ["lofi", "fastv", "random"] + (["lvpruning"] if "lvpruning" in lofi.available() else [])
fig, axes = plt.subplots(len(samples), len(methods), figsize=(2.4 * len(methods), 2.6 * len(samples)), squeeze=False)
for c, method in enumerate(methods):
    with torch.no_grad(), lofi.pruned(model, method, keep=0.25) as handle:
        model(**inputs)
    for r in range(len(samples)):
        plots.kept_token_map(samples[r].load_image(), handle.kept[-1][r].tolist(), grid,
                             title=f"{method} keep=0.25", ax=axes[r, c])
fig.tight_layout(); plt.show()'''),
    ],
    "method_comparison.ipynb": [
        ("markdown", "# Methods compared\n\nAccuracy, flip rate and KL against the fraction of visual "
                     "tokens kept and against relative FLOPs (`lofi.count_flops`, decision modules included)."),
        ("code", SETUP),
        ("code", '''plots.metric_panels(summary)
plt.show()'''),
        ("code", '''summary[["method", "keep", "rel_flops", "accuracy", "baseline_accuracy", "flip_rate", "dutta_flips",
         "c_to_i", "i_to_c", "mean_kl"]].round(3)'''),
    ],
}


def build(execute: bool, env: dict | None = None) -> list[Path]:
    paths = []
    for name, cells in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
                    for kind, src in cells]
        path = HERE / name
        if execute:
            run(nb, env)
        nbformat.write(nb, path)
        paths.append(path)
    return paths


def run(nb, env: dict | None = None, timeout: int = 900):
    """Execute a notebook in place with the repository root as working directory."""
    import os

    from nbclient import NotebookClient
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(HERE.parent)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--execute", action="store_true")
    args = parser.parse_args()
    for p in build(args.execute):
        print("wrote", p)
