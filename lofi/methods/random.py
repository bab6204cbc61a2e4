"""The control every pruning study needs: keep a uniformly random subset of the visual tokens."""

from __future__ import annotations

import torch

from lofi.registry import PruningMethod, StageInput, register


@register
class Random(PruningMethod):
    """Random: keep a uniform random subset of the visual tokens at layer K (seeded, the control).

    Options:
        keep: fraction kept.  layer: K (default 2).  seed: the run's seed (default 0).

    Each sample's subset is drawn from a generator seeded by ``seed`` and the sample itself (its
    tokens and pixels), so a sample keeps the same tokens whether it runs alone or in any batch.
    """

    name = "random"
    default_layer = 2

    def __init__(self, keep: float = 0.5, layer: int | None = None, seed: int = 0):
        super().__init__(keep, layer)
        self.seed = int(seed)

    def select(self, state: StageInput) -> torch.Tensor:
        n_present = state.visual.shape[1]
        rows = [torch.randperm(n_present, generator=state.generator(b, self.seed), device=state.visual.device)
                [:state.n_keep] for b in range(state.visual.shape[0])]
        return torch.stack(rows)
