# %% [markdown]
# # Methods compared
#
# Accuracy, flip rate and KL against the fraction of visual tokens kept and against relative FLOPs
# (`lofi.count_flops`, decision modules included), from the run folder `RUN_DIR` (default: the committed
# `reports/default`; `None` runs a small comparison of `LIMIT` questions first).

# %% tags=["parameters"]
RUN_DIR = "reports/default"
LIMIT = 20

# %%
import matplotlib.pyplot as plt
import pandas as pd

from analysis.study import compare, plots

RUN_DIR = compare.example_run(RUN_DIR, LIMIT)
summary = pd.read_csv(RUN_DIR / "summary.csv")
print(RUN_DIR, len(summary), "conditions")

# %%
plots.metric_panels(summary)
plt.show()

# %%
summary[["method", "keep", "rel_flops", "accuracy", "baseline_accuracy", "flip_rate", "dutta_flips",
         "c_to_i", "i_to_c", "mean_kl"]].round(3)
