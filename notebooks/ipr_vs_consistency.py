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
import matplotlib.pyplot as plt
import pandas as pd

from analysis.study import compare, plots

RUN_DIR = compare.example_run(RUN_DIR, LIMIT)
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
