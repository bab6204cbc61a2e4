"""The one runtime that drops visual tokens inside a Hugging Face VLM's language model.

``pruned(model, method, keep=..., layer=..., **options)`` registers forward pre-hooks (nothing else:
no weights, classes or forward methods change) and removes them on exit, also after an exception.
While it is active, every forward pass and ``generate()`` call runs like this:

* The model's call tracker (``lofi.calls``) reads ``input_ids``; the model's family adapter
  (``lofi.families``) says which positions are visual (image and video token ids, never fixed offsets)
  and which of those may be pruned (LLaVA-NeXT's newline rows may not). A call whose prompt holds visual
  tokens starts a new *sequence*; a call without them that continues a cache is a *decoding step*.
  After a cached prefix, ids are read only in a call that brings an image (``Family.call_visual_mask``):
  a generated image token id fed back is a word, as the model embeds it.
* At each stage layer K (``method.stages``) the method chooses which visual tokens to keep from the
  hidden states entering K; the pre-hook of layer K removes the others from ``hidden_states``, so
  layers K.. really compute on fewer tokens, and their KV cache holds exactly the tokens they saw.
* Every layer from the first stage on gets its own attention mask (causal by *original* sequence
  index, padding respected) and the rotary tables of the kept tokens' positions: their *original* ones
  (1-D RoPE or M-RoPE; decoding continues the prompt's numbering), or, for a method whose ``positions``
  is ``"compact"``, the numbering of a prompt of just the kept tokens (1-D RoPE; ``lofi.masks``).
* A method may read the vision tower (``lofi.vision``: the block the projector reads, tapped by hooks the
  family adapter places, laid on the visual tokens by the family's map) and the instruction's tokens, and
  may give the tokens it keeps new states (a ``Choice``:
  merging), which the stage writes in and the handle records for ``replay``.
* Methods that rank by attention (FastV) get the attention rows they need rebuilt from the hidden states
  entering layer K-1, through that layer's own norm and query/key projections: any attention kernel
  (SDPA, eager, a compiled layer) keeps running, and nothing hooks inside a layer.
* What does nothing is not run (at batch 1 the runtime's own ops and hook calls are its cost): a prompt
  whose every stage keeps all the tokens it holds (keep = 1) runs as the unpruned model, with only the
  handle's records made; a single such stage runs neither the method nor the step; and a decoding step of
  one token in an unpadded SDPA batch, which sees every cached key in every layer, runs without the
  layers' hooks.

Batches may be padded (left or right) and ragged: samples may hold different numbers of visual tokens
(image sizes, tiles, resolutions). Each sample keeps ceil(keep x its own prunable visual tokens); where
samples then keep different numbers of tokens, the shorter rows of the pruned layers are filled at the
front with masked padding slots, so every sample computes exactly what it computes alone.

This module holds the handle and the hooks, and follows each call's ``Phase``: a prompt's prefill, a
decoding step, or nothing to do. What the phases do lives beside it as functions of the prompt's
bookkeeping: ``lofi.sequence`` (a prompt's start and its decoding steps), ``lofi.selection`` (a stage
applied), ``lofi.masks`` (each stage's masks and rotary tables), ``lofi.stage`` (the sizes and tensor steps).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import torch

from lofi import stage as stage_steps
from lofi.attention import attention_received
from lofi.calls import Call, CallTracker
from lofi.families import Family, UnsupportedModelError, family_for
from lofi.masks import resolve_positions, stage_arguments
from lofi.methods.replay import Replay
from lofi.registry import PruningMethod, build
from lofi.selection import run_stage, steps_for
from lofi.sequence import Phase, Sequence
from lofi.vision import tower_view

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class PruningHandle:
    """What ``pruned`` yields; it describes the latest prompt the model saw.

    Attributes:
        method: the method instance in use.
        stages: decoder layers at which tokens are dropped.
        family: the model's family adapter.
        kept: per stage, a LongTensor [batch, max n_kept] of each sample's kept visual-token indices,
            increasing; a sample that keeps fewer than the widest row ends its row with -1 (``kept_lists``
            gives them unpadded). Indices count every visual token of the sample in sequence order,
            newline rows included (0 .. n_visual-1); newline rows themselves are always kept and not
            listed.
        n_visual: [batch] visual tokens per sample (newline rows included).
        n_prunable: [batch] of those, the ones a method may drop.
        positions: how kept tokens are numbered, ``"original"`` or ``"compact"`` (``PruningMethod.positions``,
            resolved for the model's family).
        merged: per stage, None, or what a merging method did (``lofi.selection.Merged``: the states it gave
            its kept tokens, in the order of ``kept``, and which tokens it merged into which).
    """

    method: PruningMethod
    stages: list[int]
    family: Family | None = None
    positions: str = "original"
    kept: list[torch.Tensor] = field(default_factory=list)
    merged: list = field(default_factory=list)
    n_visual: torch.Tensor | None = None
    n_prunable: torch.Tensor | None = None
    _index: list[torch.Tensor] = field(default_factory=list, repr=False)

    def kept_lists(self, stage: int = -1) -> list[list[int]]:
        """Each sample's kept visual-token indices after ``stage`` (default: the last), without padding."""
        return [[i for i in row if i >= 0] for row in self.kept[stage].tolist()]

    def sequence_index(self, layer: int) -> torch.Tensor | None:
        """[batch, n] original sequence positions of the prompt tokens decoder layer ``layer`` computes
        on, in the latest prompt (``layer`` = number of layers: the output of the last one); -1 at the
        padding slots of a ragged batch; None before any prompt."""
        if not self._index:
            return None
        return self._index[min(len(self._index) - 1, sum(layer >= k for k in self.stages))]

    def replay(self) -> Replay:
        """A method that keeps exactly the tokens of the latest prompt's ``kept``, for later passes over
        the same samples (``lofi.pruned(model, handle.replay())``: teacher forcing, rescoring)."""
        if not self.kept:
            raise RuntimeError("nothing to replay: no prompt with visual tokens has run inside this block")
        return Replay(self.stages, self.kept, [None if m is None else m.states for m in self.merged], self.positions)


class _Runtime:
    """One ``pruned`` block: the method, its stages, the current prompt and the layers' hooks. The call
    tracker (``lofi.calls``) shows it each call first; ``_prefill`` and ``_decoding_step`` set the phase
    its layer hooks then follow."""

    def __init__(self, model: torch.nn.Module, method: PruningMethod):
        self.family = family_for(model)
        text_config = getattr(model.config, "text_config", model.config)
        impl = getattr(text_config, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"lofi.pruned supports attn_implementation {SUPPORTED_ATTENTION}, "
                             f"the model uses {impl!r}; load it with attn_implementation='sdpa'")
        self.model, self.method = model, method
        self.attention_kind = impl
        self.layers = self.family.layers()
        method.bind(model)
        self.stage_layers = method.stages(len(self.layers))
        if any(b <= a for a, b in zip(self.stage_layers, self.stage_layers[1:])):
            raise ValueError(f"{method.name}: stage layers must increase, got {self.stage_layers}")
        if method.attention_queries and self.stage_layers[0] < 1:
            raise ValueError(f"{method.name} ranks tokens by the attention of layer K-1, so layer must be >= 1")
        self.positions = resolve_positions(method, self.family)
        self.handle = PruningHandle(method, list(self.stage_layers), self.family, self.positions)
        self._tower = self.family.tower_tap() if method.reads_tower else None
        if self._tower is not None and self._tower.saliency not in method.tower_saliencies:
            raise ValueError(f"{method.name} ranks patches by a [CLS] token, which {type(model).__name__}'s vision "
                             "tower lacks; use visionzip or vispruner (they read the mean attention a patch receives "
                             "there), or divprune / cdpruner")
        # the inherited select (top n_keep of masked scores) keeps the contract by construction; a method's
        # own select is checked on every stage (one host sync)
        self._check_selection = type(method).select is not PruningMethod.select
        self._tracker: CallTracker | None = None
        self._layer_hooks: list = []  # the layers' hooks, while the current call needs them
        self._seq: Sequence | None = None
        self.phase = Phase.IDLE
        self._stage_kwargs: dict[int, dict] = {}  # per stage: the arguments its layers get in this call
        self._ranked_input: tuple | None = None  # (hidden, rotary) entering layer K-1 of an attention-ranked stage
        first = self.stage_layers[0] - (1 if method.attention_queries else 0)
        self._layer_hook_functions = {i: self._layer_hook(i) for i in range(first, len(self.layers))}

    # ------------------------------------------------------------------ attaching and detaching
    def attach(self) -> None:
        try:
            self._tracker = CallTracker.join(self.family)
            self._tracker.prune_with(self)
            if self._tower is not None:
                self._tower.attach()
        except BaseException:
            self.detach()
            raise

    def _arm_layers(self, armed: bool) -> None:
        """Register the layers' hooks for a call that needs them (prepended: whatever else observes the
        layers sees the pruned inputs), or remove them for one in which every one of them would change nothing."""
        if armed and not self._layer_hooks:
            for i, hook in self._layer_hook_functions.items():
                self._layer_hooks.append(self.layers[i].register_forward_pre_hook(hook, with_kwargs=True,
                                                                                 prepend=True))
        elif not armed:
            while self._layer_hooks:
                self._layer_hooks.pop().remove()

    def detach(self) -> None:
        self._arm_layers(False)
        if self._tower is not None:
            self._tower.detach()
        if self._tracker is not None:
            if self._tracker.pruner is self:
                self._tracker.prune_with(None)
            self._tracker.leave()
            self._tracker = None
        self._seq, self._ranked_input = None, None
        self._stage_kwargs.clear()

    # ------------------------------------------------------------------ each call (lofi.calls.Pruner)
    def on_multimodal(self, call: Call) -> None:
        if call.input_ids is None and call.brings_visual:
            raise ValueError("lofi.pruned needs input_ids to find the visual tokens (their token ids); "
                             "pass input_ids, not inputs_embeds")

    def on_language_model(self, call: Call, args: tuple, kwargs: dict):
        self._stage_kwargs, self._ranked_input = {}, None
        cache = kwargs.get("past_key_values")
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError("lofi.pruned needs a dynamic KV cache (layers hold different token counts); "
                             "do not pass a static cache or cache_implementation='static'")
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and mask2d.ndim != 2:
            raise ValueError("lofi.pruned builds the attention masks itself: pass a 2D attention_mask "
                             "(or none), not a 4D one")
        # a decoding step brings no image, so its ids are not read: it reads nothing from the device
        is_visual = call.is_visual
        if call.past and is_visual is not None and bool(is_visual.any()):
            raise ValueError("lofi.pruned prunes a prompt that starts a sequence; visual tokens after a cached "
                             "prefix are not supported")
        if call.past and self._seq is not None:
            self.phase = self._decoding_step(kwargs)
        else:
            self.phase = self._prefill(call, kwargs)
        self._arm_layers(self.phase is Phase.PREFILL or (self.phase is Phase.DECODE and not self._plain_step()))
        if self.phase is Phase.IDLE:
            return None
        if self.stage_layers[0] == 0 and self.phase is Phase.DECODE:
            kwargs["attention_mask"] = None  # every layer gets its own mask; the model's would mismatch
        return args, kwargs

    def _prefill(self, call: Call, kwargs: dict) -> Phase:
        """A call that starts a sequence: its prompt's bookkeeping when it holds visual tokens (none: the
        sequence is forgotten), and the handle's records reset."""
        self._seq = None
        embeds = kwargs["inputs_embeds"]
        is_visual = call.is_visual
        if is_visual is None:
            return Phase.IDLE
        prunable = self.family.prunable_mask(is_visual, embeds)
        mask2d = kwargs.get("attention_mask")
        valid = torch.ones_like(is_visual) if mask2d is None else mask2d[:, -embeds.shape[1]:].bool()
        sizes = stage_steps.host_sizes(is_visual, prunable, valid)
        if not sizes.has_visual:
            return Phase.IDLE
        plans = stage_steps.plan_stages(self.method, len(self.stage_layers), sizes)
        self._seq = seq = Sequence.start(self.family, is_visual, prunable, valid, kwargs.get("position_ids"), sizes,
                                         plans, (call.input_ids, embeds) if self.method.draws else None,
                                         self.attention_kind == "sdpa")
        self.handle.kept = [seq.keep_whole(steps_for(self.model))] * len(plans) if seq.whole else []
        self.handle.merged = [None] * len(self.handle.kept)
        if self._tower is not None:
            taken = self._tower.take()  # taken either way: a later prompt must not read this one's tower
            seq.tower = None if seq.whole else taken
        self.handle._index = seq.index  # the same list: stages append to it as they prune
        self.handle.n_visual, self.handle.n_prunable = sizes.on_device[:, 2], seq.n_prunable
        # every stage keeps every token (keep = 1): the prompt and its decoding steps run as the unpruned model,
        # with no layer hook and no argument of ours; only the handle's records are made
        return Phase.IDLE if seq.whole else Phase.PREFILL

    def _decoding_step(self, kwargs: dict) -> Phase:
        """A call that continues the current prompt's cache."""
        seq = self._seq
        if seq.whole:
            return Phase.IDLE
        length = kwargs["inputs_embeds"].shape[1]
        kwargs["position_ids"] = self.family.decode_position_ids(seq.step(length, kwargs.get("attention_mask")))
        if seq.sees_every_key():
            # one new token that sees every cached key in every layer: no mask, and nothing for the layers'
            # hooks to change (at batch 1 their calls are most of what the runtime adds to a step)
            kwargs["attention_mask"] = None
        return Phase.DECODE

    # ------------------------------------------------------------------ each layer
    def _layer_hook(self, layer: int):
        stage = sum(layer >= k for k in self.stage_layers)  # 0: before the first pruning layer
        ranks_next = self.method.attention_queries and layer + 1 in self.stage_layers

        def hook(module, args, kwargs):
            if self.phase is Phase.IDLE:
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            prefill = self.phase is Phase.PREFILL
            if stage:
                if prefill and layer == self.stage_layers[stage - 1]:
                    hidden = self._prune(stage, hidden)
                if stage not in self._stage_kwargs:
                    rotary = partial(self.family.language_model().rotary_emb, hidden) \
                        if self.positions == "compact" else None
                    self._stage_kwargs[stage] = stage_arguments(self._seq, stage, self.phase, kwargs, hidden.dtype,
                                                                self.attention_kind, rotary)
                kwargs.update(self._stage_kwargs[stage])
            if ranks_next and prefill:  # what layer K-1 computes its queries and keys from
                self._ranked_input = (hidden, kwargs["position_embeddings"])
            return (hidden, *args[1:]), kwargs

        return hook

    def _prune(self, stage: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` after stage ``stage`` (1-based) has dropped what its method chose, recorded."""
        layer = self.stage_layers[stage - 1]
        attention = None
        if self.method.attention_queries:
            # no padding and no padding slots yet: the shorter form, known on the host
            dense = self._seq.host.unpadded and not any(self._seq.slotted)
            attention = partial(attention_received, self.family, self.layers[layer - 1], *self._ranked_input,
                                self.method.attention_queries, dense=dense)
        tower = partial(tower_view, self._seq) if self._tower else None
        index, kept, hidden, merged = run_stage(self._seq, stage, layer, hidden, self.method, self.model, attention,
                                                self._check_selection, tower)
        self._seq.index.append(index)
        self.handle.kept.append(kept)
        self.handle.merged.append(merged)
        if self.positions == "compact":
            self._seq.shift.append(self._seq.compact_shift(index))
        if stage == len(self.stage_layers):
            self._seq.hash_inputs = self._seq.tower = None  # not held through decoding
        return hidden

    def _plain_step(self) -> bool:
        """A decoding step that needs no layer hook (``Sequence.sees_every_key``), unless positions are compact."""
        return self._seq.sees_every_key() and self.positions != "compact"

@contextmanager
def pruned(model: torch.nn.Module, method: str | PruningMethod, keep: float | None = None,
           layer: int | None = None, **options) -> Iterator[PruningHandle]:
    """Run ``model`` with visual tokens dropped inside its language model while the block is active.

    Args:
        model: a VLM of a supported family (``lofi.families.supported()``), SDPA or eager attention.
        method: a name from ``lofi.available()`` (built with ``keep``, ``layer`` and ``options``), or a
            ``PruningMethod`` instance (which holds its own settings: pass none here).
        keep: fraction of the visual tokens kept (for ``lvpruning``: rho); default 0.5.
        layer: K, the first decoder layer that sees only the kept tokens (0: before the first layer).
        **options: the method's own options (see its docstring).

    Yields:
        A ``PruningHandle``; ``handle.kept`` holds the kept visual-token indices per stage.

    Example:
        >>> with lofi.pruned(model, "fastv", keep=0.5, layer=2) as handle:  # doctest: +SKIP
        ...     ids = model.generate(**inputs, max_new_tokens=8)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lofi.pruned needs the model (a torch.nn.Module such as LlavaForConditionalGeneration), "
                        f"got {type(model).__name__}")
    if isinstance(method, PruningMethod):
        given = {k: v for k, v in (("keep", keep), ("layer", layer)) if v is not None} | options
        if given:
            raise TypeError(f"{method!r} is already built: pass {sorted(given)} to its constructor, or pass the "
                            f"method's name to lofi.pruned")
        instance = method
    else:
        instance = build(method, keep=0.5 if keep is None else keep,
                         **({} if layer is None else {"layer": layer}), **options)
    if active(model) is not None:
        raise RuntimeError("this model is already inside lofi.pruned(...); nest methods as one "
                           "multi-stage method instead")
    runtime = _Runtime(model, instance)
    runtime.attach()
    try:
        yield runtime.handle
    finally:
        runtime.detach()


def active(model: torch.nn.Module) -> PruningHandle | None:
    """The handle of the ``pruned`` block ``model`` is in, or None (read from the model's call tracker)."""
    try:
        tracker = CallTracker.attached(family_for(model))
    except UnsupportedModelError:
        return None
    return None if tracker is None else tracker.pruning
