"""The control every pruning study needs: keep a uniformly random subset of the visual tokens."""

from __future__ import annotations

import torch

from lofi.registry import PruningMethod, StageInput, register


@register
class Random(PruningMethod):
    """Random: keep a uniform random subset of the visual tokens at layer K (seeded, the control).

    Options:
        keep: fraction kept.  layer: K (default 2).  seed: the run's seed (default 0).

    Each sample keeps the ``n_keep`` tokens with the largest of its uniform draws (``StageInput.uniform``:
    a function of ``seed``, the sample's tokens and visual features, and the token), so a sample keeps
    the same tokens whether it runs alone or in any batch, under ``model(...)`` or ``generate()``, and
    two images with the same question keep different subsets. Computed on the device, no host sync.
    """

    name = "random"
    draws = True
    default_layer = 2

    def __init__(self, keep: float = 0.5, layer: int | None = None, seed: int = 0):
        super().__init__(keep, layer)
        self.seed = int(seed)

    def scores(self, state: StageInput) -> torch.Tensor:
        return state.uniform(self.seed)
