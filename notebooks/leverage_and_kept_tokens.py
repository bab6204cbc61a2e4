# %% [markdown]
# # Leverage scores and kept tokens
#
# Leverage scores of the visual tokens' hidden states (what `lofi` ranks by) on the image grid, and which
# patches each method keeps, for the first `SAMPLES` test questions on the bundled model.

# %% tags=["parameters"]
SAMPLES = 4

# %%
import matplotlib.pyplot as plt
import torch

import lofi
from analysis.benchmark.datasets import load_split
from analysis.measure.capture import Capture
from analysis.study import plots
from analysis.study.models import batch_inputs, load_model

model, processor = load_model()
samples = load_split("test", limit=SAMPLES)
inputs = batch_inputs(processor, samples)
tile = lofi.families.family_class(model.config).tiles(model.config)[0]
with torch.no_grad(), Capture(model, leverage_layers=[0, 2]) as capture:
    model(**inputs)
    rows = [r for r in capture.take() if r.leverage is not None]
print(len(rows), "leverage maps")

# %%
fig, axes = plt.subplots(len(samples), 2, figsize=(5.4, 2.6 * len(samples)), squeeze=False, layout="constrained")
for r in rows:
    plots.kept_token_map(samples[r.row].load_image(), None, tile, r.leverage, value_index=r.visual_index,
                         title=f"{samples[r.row].question}\nleverage, layer {r.layer}",
                         ax=axes[r.row, 0 if r.layer == 0 else 1])
plt.show()

# %%
methods = ["lofi", "fastv", "random", "lvpruning"]
fig, axes = plt.subplots(len(samples), len(methods), figsize=(2.4 * len(methods), 2.6 * len(samples)),
                         squeeze=False, layout="constrained")
for c, method in enumerate(methods):
    with torch.no_grad(), lofi.pruned(model, method, keep=0.25) as handle:
        model(**inputs)
    for r, kept in enumerate(handle.kept_lists()):
        plots.kept_token_map(samples[r].load_image(), kept, tile, title=f"{method} keep=0.25", ax=axes[r, c])
plt.show()
