"""A prompt's bookkeeping in original sequence indices, from its prefill through its decoding steps.

``Sequence.start`` (a prompt's prefill) records which of its tokens are real, visual and prunable, each
visual token's original index, and every stage's sizes (``lofi.stage.plan_stages``); each pruning stage
then appends to ``index`` the original positions it keeps. ``Sequence.step`` (a decoding step) appends
the call's tokens and continues the prompt's position numbering. ``Phase`` names what the runtime's
layer hooks do during a call. Nothing here touches a model: ``lofi.runtime`` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from lofi import seeding
from lofi import stage as stage_steps
from lofi.families import Family
from lofi.vision import TowerReading


class Phase(Enum):
    """What the layers' hooks do during the language model's current call."""

    IDLE = "idle"        # nothing: no prompt with visual tokens, or one that runs as the unpruned model
    PREFILL = "prefill"  # a prompt: the stage layers drop tokens; later layers get their masks and rotary tables
    DECODE = "decode"    # a decoding step after a pruned prompt: the layers from the first stage get their masks


@dataclass
class Sequence:
    """Bookkeeping of one prompt (and its decoding steps), in original sequence indices. Tensors that only some
    prompts need (visual ranks, first and last positions) are made when first read: at batch 1 on a GPU every op
    is a launch the pruned layers do not give back."""

    valid: torch.Tensor           # [B, T] bool: real tokens of the prompt
    is_visual: torch.Tensor       # [B, T] bool: visual tokens (newline rows included)
    prunable: torch.Tensor        # [B, T] bool: visual tokens a method may drop
    n_prunable: torch.Tensor      # [B]
    hash_inputs: tuple | None     # (input_ids, inputs_embeds) of the prompt, for methods that draw
    index: list[torch.Tensor]     # per stage 0..S: [B, n_s] original indices seen by that stage, -1: padding slot
    host: stage_steps.HostSizes | None = None  # the prompt's counts on the host
    dense: bool = False           # SDPA and no padding: unpadded stages need no mask (causal order is kept)
    slotted: list[bool] = field(default_factory=list)  # per pruning stage: rows padded with slots
    plans: list[stage_steps.StagePlan] = field(default_factory=list)  # per pruning stage: its sizes
    whole: bool = False           # every stage keeps every token: the prompt runs as the unpruned model
    decoded: int = 0              # tokens appended after the prompt, before this call
    new_tokens: int = 0           # tokens of the current decoding call
    tail_mask: torch.Tensor | None = None  # the current decoding call's 2-D mask of the whole sequence, or None
    shift: list[torch.Tensor] = field(default_factory=list)  # compact positions, per pruning stage: [B] original
    #                                                        minus compact position of the prompt's last token
    tower: TowerReading | None = None  # the prompt's image encoding, for methods that read the tower
    family: Family | None = field(default=None, repr=False)
    position_ids: torch.Tensor | None = field(default=None, repr=False)  # the prompt's, None: 0..T-1
    _fingerprint: torch.Tensor | None = None
    _visual_rank: torch.Tensor | None = None
    _text: torch.Tensor | None = None
    _first_position: torch.Tensor | None = None
    _last_position: torch.Tensor | None = None
    _tail_valid: torch.Tensor | None = None

    @classmethod
    def start(cls, family: Family, is_visual: torch.Tensor, prunable: torch.Tensor, valid: torch.Tensor,
              position_ids: torch.Tensor | None, sizes: stage_steps.HostSizes, plans: list[stage_steps.StagePlan],
              hash_inputs: tuple | None, sdpa: bool) -> Sequence:
        """A prompt's prefill: its [B, T] masks (visual, prunable, real), the position ids it was given (None:
        0..T-1), its counts on the host and its stages' sizes; ``hash_inputs`` for methods that draw."""
        batch, length = is_visual.shape
        index = torch.arange(length, device=is_visual.device).expand(batch, length)
        counts = sizes.on_device  # per row: prunable, text, visual, real tokens (stage.host_sizes)
        whole = all(stage_steps.keeps_everything(plan, []) for plan in plans)
        seq = cls(valid, is_visual, prunable, counts[:, 0], None if whole else hash_inputs, [index], host=sizes,
                  plans=plans, whole=whole, dense=sizes.unpadded and sdpa, family=family, position_ids=position_ids)
        if not whole:  # made with the prompt, so that a decoding step adds only its own positions' two ops
            seq._last_position = seq._prompt_last_position()
        return seq

    @property
    def all_prunable(self) -> bool:
        """Every visual token may be dropped (no newline rows): the k-th prunable token is visual token k."""
        return self.prunable is self.is_visual

    @property
    def visual_rank(self) -> torch.Tensor:
        """[B, T] long: 0..n_visual-1 at visual tokens, -1 elsewhere."""
        if self._visual_rank is None:
            self._visual_rank = torch.where(self.is_visual, self.is_visual.cumsum(1) - 1, -1)
        return self._visual_rank

    @property
    def text(self) -> torch.Tensor:
        """[B, T] bool: real text tokens."""
        if self._text is None:
            self._text = self.valid & ~self.is_visual
        return self._text

    @property
    def first_position(self) -> torch.Tensor:
        """[B] 1-D position of each row's first real token."""
        if self._first_position is None:
            first_real = self.valid.long().argmax(1, keepdim=True)
            if self.position_ids is None:
                self._first_position = first_real[:, 0]
            else:
                positions = self.family.text_positions(self.position_ids).expand(self.valid.shape[0], -1)
                self._first_position = positions.gather(1, first_real)[:, 0]
        return self._first_position

    @property
    def last_position(self) -> torch.Tensor:
        """[B] 1-D position of the last token so far."""
        if self._last_position is None:
            self._last_position = self._prompt_last_position()
        return self._last_position

    def _prompt_last_position(self) -> torch.Tensor:
        if self.position_ids is None:
            return torch.full((self.valid.shape[0],), self.length - 1, device=self.valid.device)
        return self.family.text_positions(self.position_ids).expand(self.valid.shape[0], -1)[..., -1].clone()

    def keep_whole(self, steps: stage_steps.Steps) -> torch.Tensor:
        """Every stage holds the prompt as it came (keep = 1): the index of each, and the kept visual tokens
        ([B, max n_prunable], as a stage records them)."""
        plan = self.plans[0]
        kept = steps.candidates(self.prunable, None if self.all_prunable else self.visual_rank, plan.most,
                                plan.uniform)[2]
        self.index.extend(self.index[0] for _ in self.plans)
        return kept

    def compact_shift(self, index: torch.Tensor) -> torch.Tensor:
        """[B] how far compact numbering of the tokens ``index`` holds moves the prompt's last token back: its
        original position minus its compact one (for decoding in that stage's layers)."""
        return self.last_position - self.first_position - self.at(index, self.valid).sum(1) + 1

    def compact_positions(self, stage: int, phase: Phase) -> torch.Tensor:
        """[B, n] compact positions of the tokens stage ``stage`` (1-based) holds in the current call: the prompt's
        kept tokens renumbered from each row's first real position, or a decoding call's tokens after them."""
        if phase is Phase.DECODE:
            device = self.last_position.device
            new = self.last_position[:, None] - self.new_tokens + 1 + torch.arange(self.new_tokens, device=device)
            return new - self.shift[stage - 1][:, None]
        real = self.at(self.index[stage], self.valid)
        return torch.where(real, self.first_position[:, None] + real.long().cumsum(1) - 1, 0)

    def instruction(self) -> torch.Tensor:
        """[B, T] bool: the real text tokens after each row's last visual token (the instruction)."""
        columns = torch.arange(self.length, device=self.valid.device)
        last_visual = torch.where(self.is_visual, columns, -1).amax(1, keepdim=True)
        return self.valid & ~self.is_visual & (columns > last_visual)

    def step(self, new_tokens: int, mask2d: torch.Tensor | None) -> torch.Tensor:
        """A decoding call of ``new_tokens`` tokens (``mask2d``: the 2-D mask of the whole sequence, or None):
        recorded, and the 1-D positions [B, new_tokens] that continue the prompt's numbering."""
        self.decoded += self.new_tokens
        self.new_tokens = new_tokens
        total = self.length + self.decoded + new_tokens
        if mask2d is not None and mask2d.shape[1] != total:
            raise ValueError(f"attention_mask covers {mask2d.shape[1]} tokens, the pruned sequence so far has "
                             f"{total}; pass the mask of the whole sequence as generate() does")
        self.tail_mask, self._tail_valid = mask2d, None
        # the model's own count would read a pruned cache's length; a greedy step's one token costs one kernel
        last = self.last_position + new_tokens
        positions = last[:, None] if new_tokens == 1 else last[:, None] - torch.arange(
            new_tokens - 1, -1, -1, device=last.device)
        self._last_position = last
        return positions

    @property
    def tail_valid(self) -> torch.Tensor:
        """[B, decoded + new] validity of the tokens appended after the prompt, made when a mask is first built
        in the current call (a step that sees every key builds none)."""
        if self._tail_valid is None:
            batch, appended = self.valid.shape[0], self.decoded + self.new_tokens
            self._tail_valid = (self.tail_mask[:, self.length:].bool() if self.tail_mask is not None else
                                torch.ones(batch, appended, dtype=torch.bool, device=self.valid.device))
        return self._tail_valid

    def sees_every_key(self) -> bool:
        """Whether the current decoding call is one token of an unpadded SDPA batch without padding slots: in
        every layer it attends to every cached key, with no mask."""
        return self.dense and self.new_tokens == 1 and not any(self.slotted)

    def fingerprint(self) -> torch.Tensor | None:
        """[B] int64 (lofi.seeding) for methods that draw, else None; hashed when a stage first needs it, so
        a prompt whose stages all keep everything hashes nothing."""
        if self._fingerprint is None and self.hash_inputs is not None:
            self._fingerprint = seeding.fingerprints(*self.hash_inputs, self.valid, self.is_visual)
            self.hash_inputs = None
        return self._fingerprint

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def at(self, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``values`` [B, T] read at ``index`` [B, n]; False / -1 / 0 at padding slots."""
        stage = next((s for s, seen in enumerate(self.index) if seen is index), None)
        if stage == 0:  # the prompt as it came: nothing to read (each kernel saved is a launch at batch 1)
            return values
        if stage is not None and not self.slotted[stage - 1]:  # rows without padding slots
            return values.gather(1, index)
        read = values.gather(1, index.clamp_min(0))
        return torch.where(index >= 0, read, torch.zeros((), dtype=read.dtype) if read.dtype == torch.bool
                           else torch.full((), -1 if read.dtype == torch.long else 0, dtype=read.dtype))
