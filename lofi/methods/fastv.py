"""FastV (Chen et al., ECCV 2024): keep the visual tokens that receive the most attention at layer K-1."""

from __future__ import annotations

import torch

from lofi.registry import PruningMethod, StageInput, register


@register
class FastV(PruningMethod):
    """FastV: rank visual tokens by the attention they receive at layer K-1 (last prompt token, head mean).

    Options:
        keep: fraction of visual tokens kept (FastV's own R is the fraction *dropped*: keep = 1 - R).
        layer: K >= 1 (default 2); layers 0..K-1 see every token.
        queries: ``"last"`` (the official code: the last prompt token's row) or ``"text"`` (the mean
            over every text token's row, the paper's "average attention").

    The attention rows are rebuilt from layer K-1's own query and key projections, so the model keeps
    its SDPA kernel (no switch to eager, no second run of layer K-1, no duplicate KV entries).
    """

    name = "fastv"
    default_layer = 2
    min_layer = 1

    def __init__(self, keep: float = 0.5, layer: int | None = None, queries: str = "last"):
        super().__init__(keep, layer)
        if queries not in ("last", "text"):
            raise ValueError(f"fastv queries must be 'last' or 'text', got {queries!r}")
        self.queries = queries

    @property
    def attention_queries(self) -> str:  # type: ignore[override]
        return self.queries

    def scores(self, state: StageInput) -> torch.Tensor:
        return state.attention().gather(1, state.visual)
