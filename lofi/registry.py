"""The method registry and the base class every pruning method derives from.

A method only *chooses* which visual tokens to keep (``select``) and at which layers (``stages``);
``lofi.runtime`` applies the choice. ``@register`` adds a class under its ``name``; ``build`` makes
an instance and turns every bad argument into one error that says what is valid.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, NamedTuple

import torch

from lofi.seeding import uniform

if TYPE_CHECKING:
    from lofi.vision import TowerView

_METHODS: dict[str, type["PruningMethod"]] = {}

POSITIONS = ("original", "compact")  # how kept tokens are numbered for the rotary embedding (PruningMethod.positions)


class Choice(NamedTuple):
    """A method's choice that also gives the kept tokens new states (merging, aggregation).

    Attributes:
        kept: [batch, max n_keep] indices into ``StageInput.visual`` (as ``select`` returns them), -1 padding.
        states: [batch, max n_keep, d] the hidden state each kept token carries on from this stage, in the order
            of ``kept`` (a method that merges writes the merged state at the slot of the token it merged into).
        sources: None, or [batch, P]: for each token of ``StageInput.visual``, the index (into ``visual`` too) of
            the kept token whose state it was merged into, -1 if it was not (what kept-token maps show).
    """

    kept: torch.Tensor
    states: torch.Tensor
    sources: torch.Tensor | None = None


@dataclass
class StageInput:
    """What a method sees when it chooses, at the input of decoder layer ``layer``.

    A batch may be ragged: samples may hold different numbers of visual tokens. Per-sample rows are
    then padded; ``visual_valid`` marks the real entries.

    Attributes:
        layer: index of the first decoder layer that will see only the kept tokens.
        stage: 0-based index of this pruning stage.
        hidden: [batch, n, d] hidden states entering ``layer`` (the sequence as it is now).
        visual: [batch, P] positions, within ``hidden``'s sequence, of the prunable visual tokens present
            (padded with position 0).
        visual_valid: [batch, P] bool, true at real entries of ``visual``.
        visual_index: [batch, P] their original visual-token indices (increasing; -1 at padding).
        text: [batch, n] bool, true at real (non-padding, non-visual) text tokens.
        valid: [batch, n] bool, true at real (non-padding) tokens.
        n_keep: [batch] long: how many of its present visual tokens each sample keeps.
        attention: callable returning [batch, n] attention each token receives at layer ``layer - 1``
            (averaged over heads and the method's query tokens); only for methods that ask for it.
        fingerprint: [batch] int64, a hash of each sample's tokens and visual features (``lofi.seeding``);
            None unless the method ``draws``.
        model: the model being pruned.
        keep_width: the largest ``n_keep`` of the batch, already on the host (the width ``select`` returns).
        text_width: the largest number of real text tokens of a sample, already on the host.
        n_keep_host: ``n_keep`` on the host (CPU), for methods whose own sizes follow from it.
        instruction: callable returning [batch, n] bool, true at the instruction's tokens: the real text tokens
            after the sample's
            last visual token (the question and what the chat template adds after it).
        tower: callable returning a ``lofi.vision.TowerView`` of the prunable visual tokens present: the vision
            tower's states, saliency ([CLS] attention, or mean attention received) and keys at the block the
            projector reads; only for methods whose ``reads_tower`` is true.
        visual_width: the most visual tokens a sample's prompt holds, on the host (no ``visual_index`` reaches it).
        full: known on the host: every row holds P real candidates (``visual_valid`` is all true) and keeps
            ``keep_width`` of them, as at batch 1; a method may then skip its masking and padding.
    """

    layer: int
    stage: int
    hidden: torch.Tensor
    visual: torch.Tensor
    visual_valid: torch.Tensor
    visual_index: torch.Tensor
    text: torch.Tensor
    valid: torch.Tensor
    n_keep: torch.Tensor
    attention: Callable[[], torch.Tensor] | None
    fingerprint: torch.Tensor | None
    model: torch.nn.Module | None = None
    keep_width: int | None = None
    text_width: int | None = None
    n_keep_host: torch.Tensor | None = None
    instruction: Callable[[], torch.Tensor] | None = None
    tower: Callable[[], "TowerView"] | None = None
    visual_width: int | None = None
    full: bool = False

    def uniform(self, salt: int) -> torch.Tensor:
        """[batch, P] draws in (0, 1), one per visual token present, a function of the sample (its tokens
        and visual features), ``salt`` and the token's original index only: the same alone or in any batch,
        under ``model(...)`` or ``generate()``. Only for methods whose ``draws`` is true."""
        if self.fingerprint is None:
            raise TypeError("StageInput.uniform needs the samples' fingerprints, which the runtime computes only "
                            "for methods that draw: set `draws = True` on the method's class")
        return uniform(self.fingerprint, salt, self.visual_index, self.visual_width)

    def instruction_hidden(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([batch, text_width, d] hidden states of each sample's instruction tokens in order, zero after them;
        [batch, text_width] bool, true at real entries)."""
        instruction = self.instruction()
        width = self.text_width if self.text_width is not None else int(instruction.sum(1).max())
        order = torch.sort(instruction, dim=1, descending=True, stable=True).indices[:, :width]
        present = instruction.gather(1, order)
        rows = self.hidden.gather(1, order[..., None].expand(-1, -1, self.hidden.shape[-1]))
        return rows * present[..., None].to(rows.dtype), present

    def visual_hidden(self) -> torch.Tensor:
        """[batch, P, d] hidden states of the visual tokens present (zero rows at padding)."""
        rows = self.hidden.gather(1, self.visual[..., None].expand(-1, -1, self.hidden.shape[-1]))
        return rows if self.full else rows * self.visual_valid[..., None].to(rows.dtype)  # full: no padding to zero


class PruningMethod(ABC):
    """Base class: validated ``keep`` and ``layer``; subclasses implement ``scores`` (or ``select``).

    Class attributes:
        name: the registry name.
        attention_queries: ``None``, or which queries' attention at layer K-1 the method ranks by
            (``"last"``: the last prompt token; ``"text"``: every text token).
        default_layer: K when the caller gives none.
        min_layer: the smallest valid K.
        draws: the method calls ``StageInput.uniform`` (the runtime hashes each sample only for such methods).
        reads_tower: the method calls ``StageInput.tower`` (the runtime taps the vision tower only for such methods).
        tower_saliencies: the tower saliencies the method can rank by (``lofi.vision.TowerView.saliency``); a
            model whose tower gives another is refused when pruning starts.

    Attributes:
        positions: ``"original"`` (the default: kept tokens keep their positions, with gaps where tokens were
            dropped) or ``"compact"`` (kept tokens are renumbered 0, 1, ... after each stage, as a shorter prompt
            would be, and decoding continues from there; 1-D RoPE families only).
    """

    name: ClassVar[str] = ""
    attention_queries: ClassVar[str | None] = None
    default_layer: ClassVar[int] = 2
    min_layer: ClassVar[int] = 0
    draws: ClassVar[bool] = False
    reads_tower: ClassVar[bool] = False
    tower_saliencies: ClassVar[tuple[str, ...]] = ("cls", "received")
    positions: str = "original"

    def __init__(self, keep: float = 0.5, layer: int | None = None):
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ValueError(f"keep must be a fraction in (0, 1] of the visual tokens to keep, got {keep!r}")
        self.keep = float(keep)
        self.layer = self.default_layer if layer is None else layer

    def bind(self, model) -> None:
        """Called once when ``pruned`` starts: load whatever the method needs for ``model``."""

    def stages(self, num_layers: int) -> list[int]:
        """The decoder layers at which tokens are dropped, increasing."""
        layer = self.layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not self.min_layer <= layer < num_layers:
            raise ValueError(f"layer must be an int in [{self.min_layer}, {num_layers - 1}] for {self.name} "
                             f"on this {num_layers}-layer model, got {layer!r}")
        return [layer]

    def n_keep(self, stage: int, n_visual: torch.Tensor, n_present: torch.Tensor) -> torch.Tensor:
        """[batch] visual tokens each sample keeps after ``stage``: ceil(keep x its n_visual), at least 1 and at
        most the ``n_present`` it holds (``n_visual``: its prunable visual tokens before any stage)."""
        # in Python on the rows' numbers (the same float64 arithmetic as torch's): a handful of tensor ops on
        # two-element tensors cost more than the arithmetic, once per stage of every prompt
        kept = [min(max(math.ceil(self.keep * n - 1e-9), 1), present)
                for n, present in zip(n_visual.tolist(), n_present.tolist())]
        return torch.tensor(kept, dtype=torch.long, device=n_present.device)

    def n_keep_of(self, n_visual: int) -> int:
        """Tokens a sample of ``n_visual`` prunable visual tokens keeps at the first stage (``n_keep``'s rule)."""
        return int(self.n_keep(0, torch.tensor([n_visual]), torch.tensor([n_visual]))[0])

    def schedule(self, num_layers: int, n_visual: int, always_kept: int = 0) -> list[tuple[int, int]]:
        """``(layer, visual tokens left)`` per stage for one sample of ``n_visual`` prunable visual tokens and
        ``always_kept`` others (LLaVA-NeXT's newline rows), the form ``lofi.count_flops`` takes."""
        present, out = torch.tensor([n_visual]), []
        for stage, layer in enumerate(self.stages(num_layers)):
            present = self.n_keep(stage, torch.tensor([n_visual]), present)
            out.append((layer, int(present[0]) + always_kept))
        return out

    def scores(self, state: StageInput) -> torch.Tensor:
        """[batch, P] how much to keep each visual token of ``state.visual`` (higher: kept first)."""
        raise TypeError(f"{type(self).__name__} must implement scores() (or select())")

    def select(self, state: StageInput) -> torch.Tensor | Choice:
        """[batch, max n_keep] indices into ``state.visual`` of the tokens to keep, any order; a sample that
        keeps fewer than the widest row pads its row with -1. A method that merges returns a ``Choice`` (the
        indices and the kept tokens' new states). Default: each sample's top ``n_keep`` by ``scores`` among its
        real entries."""
        scores = self.scores(state).double()
        if state.full:  # nothing to mask, no row keeps fewer
            return scores.topk(state.keep_width, dim=1).indices
        scores = scores.masked_fill(~state.visual_valid, float("-inf"))
        width = state.keep_width if state.keep_width is not None else int(state.n_keep.max())
        top = scores.topk(width, dim=1).indices
        return torch.where(torch.arange(width, device=top.device) < state.n_keep[:, None], top, -1)

    def weight_files(self, model_folder: Path) -> list[Path]:
        """Files of trained weights the method reads for the model in ``model_folder`` (none by default):
        they are part of a run's identity, and must exist before a run starts."""
        return []

    weights_hint: ClassVar[str] = ""  # how to produce missing weight files

    def decision_flops(self, config, n_text: int, n_visual_per_stage: list[int]) -> float:
        """FLOPs of the method's own decision work at stages holding ``n_visual_per_stage`` prunable visual
        tokens: a sum of one term per stage (0 for training-free methods)."""
        return 0.0

    def spent_decision_flops(self, config, n_text: int, present: list[int], kept: list[int]) -> float:
        """The decision FLOPs the runtime spends on a prompt whose stages hold ``present`` prunable tokens and
        keep ``kept`` of them: ``decision_flops`` of the stages that drop something. A stage that keeps all it
        holds runs no decision work (``lofi.selection``), so keep = 1 spends none."""
        return sum(self.decision_flops(config, n_text, [n]) for n, k in zip(present, kept) if k < n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keep={self.keep}, layer={self.layer})"


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator adding a method under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name`")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_METHODS[cls.name].__name__})")
    _METHODS[cls.name] = cls
    return cls


def available() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_METHODS)


def describe() -> dict[str, str]:
    """Each method's one-line description (the first line of its docstring)."""
    return {name: (inspect.getdoc(_METHODS[name]) or "").split("\n")[0] for name in available()}


def options(method: str) -> list[str]:
    """The options the method called ``method`` takes (its constructor's arguments)."""
    if method not in _METHODS:
        raise ValueError(f"unknown pruning method {method!r}; valid methods: {', '.join(available())}")
    return sorted(set(inspect.signature(_METHODS[method].__init__).parameters) - {"self"})


def build(method: str | PruningMethod, shared: dict | None = None, **arguments) -> PruningMethod:
    """An instance of the method called ``method`` (or ``method`` itself, when no arguments are given).

    ``shared`` holds settings of a whole run (a seed, ...) that each method receives only if it takes
    them; ``arguments`` must all be the method's own options.
    """
    if isinstance(method, PruningMethod):
        if arguments or shared:
            raise TypeError("pass options to the method's constructor, or pass its name with options")
        return method
    accepted = options(method)
    unknown = sorted(set(arguments) - set(accepted))
    if unknown:
        raise TypeError(f"{method} takes no option(s) {unknown}; its options: {accepted}")
    return _METHODS[method](**{k: v for k, v in (shared or {}).items() if k in accepted}, **arguments)
