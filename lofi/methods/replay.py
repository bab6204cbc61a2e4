"""Replay: keep exactly the visual tokens an earlier pass over the same prompt kept.

A later pass over the same prompt -- teacher-forcing an answer, scoring another continuation -- must
see the tokens the answer was generated with. Pruning again would choose anew from different inputs:
FastV would rank by an answer token's attention, ``random`` would draw again, LVPruning's modules would
read the answer. ``handle.replay()`` (or ``Replay(handle.stages, handle.kept)``) records the choice;
passing it to ``lofi.pruned`` applies it, stage by stage, to a batch of the same samples in the same order.
"""

from __future__ import annotations

import torch

from lofi.registry import Choice, PruningMethod, StageInput


class Replay(PruningMethod):
    """Replay: the kept visual tokens of an earlier pass, per stage and sample (not a scoring method).

    Args:
        stages: the decoder layers at which the recorded pass dropped tokens.
        kept: per stage, [batch, max n_kept] original visual-token indices, -1 padded (``PruningHandle.kept``).
        merged: per stage, None or the states a merging method gave the kept tokens (``PruningHandle.merged``).
        positions: the recorded pass's numbering (``PruningHandle.positions``).
    """

    name = "replay"

    def __init__(self, stages: list[int], kept: list[torch.Tensor], merged: list[torch.Tensor | None] | None = None,
                 positions: str = "original"):
        if not kept or len(kept) != len(stages):
            raise ValueError(f"replay needs one kept set per stage: {len(stages)} stage(s), {len(kept)} "
                             "kept set(s); record them with handle.replay() after a pruned prompt")
        super().__init__(1.0, stages[0])
        self.recorded_stages = list(stages)
        self.kept = [k.detach().clone() for k in kept]
        self.merged = [None if m is None else m.detach().clone() for m in (merged or [None] * len(kept))]
        self.positions = positions
        self._counts = [(k >= 0).sum(1).cpu() for k in self.kept]  # on the host: the runtime sizes stages there

    def subset(self, rows) -> "Replay":
        """The recorded selection of some samples of the batch, in the order of ``rows``."""
        rows = torch.as_tensor(list(rows), dtype=torch.long)
        return Replay(self.recorded_stages, [k[rows.to(k.device)] for k in self.kept],
                      [None if m is None else m[rows.to(m.device)] for m in self.merged], self.positions)

    def stages(self, num_layers: int) -> list[int]:
        if max(self.recorded_stages) >= num_layers:
            raise ValueError(f"the recorded stages {self.recorded_stages} do not fit a {num_layers}-layer model")
        return list(self.recorded_stages)

    def n_keep(self, stage: int, n_visual: torch.Tensor, n_present: torch.Tensor) -> torch.Tensor:
        kept = self.kept[stage]
        if kept.shape[0] != n_visual.shape[0]:
            raise ValueError(f"the recorded selection is of a batch of {kept.shape[0]}, this pass has "
                             f"{n_visual.shape[0]} samples; replay it on the same samples, in order")
        return self._counts[stage].to(n_present.device)

    def select(self, state: StageInput) -> torch.Tensor:
        kept = self.kept[state.stage].to(state.visual_index.device)
        ordered = torch.where(state.visual_valid, state.visual_index, torch.iinfo(torch.long).max)
        chosen = torch.searchsorted(ordered, kept.clamp_min(0)).clamp_max(ordered.shape[1] - 1)
        picked = kept >= 0
        if not torch.equal(torch.where(picked, ordered.gather(1, chosen), -1), kept):
            raise ValueError("the recorded kept tokens are not present in this pass: replay a selection on "
                             "the prompt it was recorded on")
        chosen = torch.where(picked, chosen, -1)
        merged = self.merged[state.stage]
        return chosen if merged is None else Choice(chosen, merged.to(state.hidden.device))

    def __repr__(self) -> str:
        return f"Replay(stages={self.recorded_stages}, kept={[tuple(k.shape) for k in self.kept]})"
