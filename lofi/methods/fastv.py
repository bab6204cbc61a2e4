"""FastV (Chen et al., ECCV 2024): keep the visual tokens that receive the most attention at layer K-1."""

from __future__ import annotations

import torch

from lofi.flops import attention_widths
from lofi.registry import PruningMethod, StageInput, register


@register
class FastV(PruningMethod):
    """FastV: rank visual tokens by the attention they receive at layer K-1 (last prompt token, head mean).

    Options:
        keep: fraction of visual tokens kept (FastV's own R is the fraction *dropped*: keep = 1 - R).
        layer: K >= 1 (default 2); layers 0..K-1 see every token.
        queries: ``"last"`` (the official code: the last prompt token's row) or ``"text"`` (the mean
            over every text token's row, the paper's "average attention").

    The attention rows are rebuilt from the hidden states entering layer K-1, through that layer's own norm
    and key (and the ranking rows') query projections, so the model keeps its SDPA kernel or compiled layers
    (no switch to eager, no second run of layer K-1, no duplicate KV entries).
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

    def decision_flops(self, config, n_text: int, n_visual_per_stage: list[int]) -> float:
        """Rebuilding layer K-1's attention rows for n = n_text + n_visual tokens and r ranking rows (1 for
        ``"last"``, n_text for ``"text"``): keys 2 n d d_kv, queries 2 r d d_q, scores 2 r n d_q, with d_q =
        heads x head_dim and d_kv = kv heads x head_dim (newline rows, never pruned, are not in n_visual)."""
        text = config.get_text_config()
        d, (d_q, d_kv) = text.hidden_size, attention_widths(text)
        n, rows = n_text + n_visual_per_stage[0], 1 if self.queries == "last" else n_text
        return 2.0 * n * d * d_kv + 2.0 * rows * d * d_q + 2.0 * rows * n * d_q

    def scores(self, state: StageInput) -> torch.Tensor:
        return state.attention().gather(1, state.visual)
