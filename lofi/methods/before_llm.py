"""What the methods that choose before the language model share (CDPruner, DivPrune, SCOPE, VisionZip, VisPruner).

Their reference code selects among the projector's outputs (or the vision tower's states) and hands the language
model a shorter sequence, numbered compactly: that is a stage at layer 0 with ``positions="compact"`` here. Both
stay options: ``layer=K`` chooses from the hidden states entering decoder layer K instead, and
``positions="original"`` keeps the kept tokens' original positions (gaps where tokens were dropped).
"""

from __future__ import annotations

from typing import ClassVar

from lofi.registry import POSITIONS, PruningMethod


class BeforeLanguageModel(PruningMethod):
    """Base: layer 0 and the reference implementations' positions by default.

    ``positions=None`` (the default) is the reference code's numbering for the model's family: compact on 1-D
    RoPE (LLaVA-1.5, LLaVA-NeXT, OneVision), the original M-RoPE positions on Qwen2-VL / Qwen2.5-VL (what the
    third-party Qwen ports of these methods keep: M-RoPE ids index-selected); ``PruningHandle.positions`` says
    which applied.
    """

    default_layer: ClassVar[int] = 0

    def __init__(self, keep: float = 0.5, layer: int | None = None, positions: str | None = None):
        super().__init__(keep, layer)
        if positions is not None and positions not in POSITIONS:
            raise ValueError(f"{self.name} positions must be one of {list(POSITIONS)} or None (the reference's), "
                             f"got {positions!r}")
        self.positions = positions

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keep={self.keep}, layer={self.layer}, positions={self.positions!r})"
