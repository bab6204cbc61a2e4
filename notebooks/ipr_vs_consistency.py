# %% [markdown]
# # Delta IPR against consistency
#
# Each point is one condition (method, keep). x: the mean change of the inverse participation ratio of the
# hidden states against the unpruned model on the same samples; y: how far the answers moved (flip rate,
# KL). Reads the run folder `RUN_DIR` (default: the committed `reports/default`); with `RUN_DIR = None` it
# runs a small comparison of `LIMIT` questions on the bundled model first.

# %% tags=["parameters"]
RUN_DIR = "reports/default"
LIMIT = 20

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from analysis.study import compare, plots

if RUN_DIR is None:
    RUN_DIR = Path(tempfile.mkdtemp()) / "run"
    compare.main(["--methods", "lofi", "lvpruning", "fastv", "random", "--keep", "0.5", "0.25", "0.1",
                  "--limit", str(LIMIT), "--out", str(RUN_DIR), "--no-progress"])
RUN_DIR = Path(RUN_DIR)
summary = pd.read_csv(RUN_DIR / "summary.csv")
correlation = pd.read_csv(RUN_DIR / "correlation.csv")
spectra = pd.read_parquet(RUN_DIR / "spectra.parquet")
print(RUN_DIR, len(summary), "conditions")

# %%
layer, group = int(spectra.layer.max()), "all"
plots.consistency_panels(summary, correlation, layer, group)
plt.show()

# %% [markdown]
# Correlations at every layer after pruning starts (condition level): Pearson r, its 95% bootstrap interval
# over questions, and the permutation p-value across conditions (docs/definitions.md#correlation).

# %%
table = correlation[(correlation.level == "condition") & (correlation.measure.isin(["flip", "kl"]))]
table.pivot_table(index=["group", "layer"], columns="measure",
                  values=["pearson", "pearson_low", "pearson_high", "pearson_p"]).round(3)

# %%
plots.ipr_panels(spectra)
plt.show()
