"""The one runtime that drops visual tokens inside a Hugging Face VLM's language model.

``pruned(model, method, keep=..., layer=..., **options)`` registers forward pre-hooks (nothing else:
no weights, classes or forward methods change) and removes them on exit, also after an exception.
While it is active, every forward pass and ``generate()`` call runs like this:

* The multimodal model's pre-hook reads ``input_ids``; the model's family adapter
  (``lofi.families``) says which positions are visual (image and video token ids, never fixed offsets)
  and which of those may be pruned (LLaVA-NeXT's newline rows may not). A call whose prompt holds visual
  tokens starts a new *sequence*; a call without them that continues a cache is a *decoding step*.
  After a cached prefix, ids are read only in a call that brings an image (``Family.call_visual_mask``):
  a generated image token id fed back is a word, as the model embeds it.
* At each stage layer K (``method.stages``) the method chooses which visual tokens to keep from the
  hidden states entering K; the pre-hook of layer K removes the others from ``hidden_states``, so
  layers K.. really compute on fewer tokens, and their KV cache holds exactly the tokens they saw.
* Every layer from the first stage on gets its own attention mask (causal by *original* sequence
  index, padding respected) and the rotary tables of the kept tokens' *original* positions (1-D RoPE or
  M-RoPE alike: positions are never renumbered; decoding continues the prompt's numbering).
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
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from lofi import seeding
from lofi import stage as stage_steps
from lofi.attention import attention_received
from lofi.compiled import options_of
from lofi.families import Family, family_for
from lofi.methods.replay import Replay
from lofi.registry import Choice, PruningMethod, StageInput, build
from lofi.vision import TowerTap, TowerView, cls_attention_and_keys, gather_rows, per_visual_token

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
        merged: per stage, None, or [batch, max n_kept, d] the states a merging method gave its kept tokens, in
            the order of ``kept``.
    """

    method: PruningMethod
    stages: list[int]
    family: Family | None = None
    positions: str = "original"
    kept: list[torch.Tensor] = field(default_factory=list)
    merged: list[torch.Tensor | None] = field(default_factory=list)
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
        return Replay(self.stages, self.kept, self.merged, self.positions)


@dataclass
class _Sequence:
    """Bookkeeping of one prompt (and its decoding steps), in original sequence indices."""

    valid: torch.Tensor           # [B, T] bool: real tokens of the prompt
    is_visual: torch.Tensor       # [B, T] bool: visual tokens (newline rows included)
    prunable: torch.Tensor        # [B, T] bool: visual tokens a method may drop
    visual_rank: torch.Tensor     # [B, T] long: 0..n_visual-1 at visual tokens, -1 elsewhere
    n_prunable: torch.Tensor      # [B]
    hash_inputs: tuple | None     # (input_ids, inputs_embeds) of the prompt, for methods that draw
    index: list[torch.Tensor]     # per stage 0..S: [B, n_s] original indices seen by that stage, -1: padding slot
    last_position: torch.Tensor   # [B] 1-D position of the last token so far
    host: stage_steps.HostSizes | None = None  # the prompt's counts on the host
    dense: bool = False           # SDPA and no padding: unpadded stages need no mask (causal order is kept)
    slotted: list[bool] = field(default_factory=list)  # per pruning stage: rows padded with slots
    plans: list[stage_steps.StagePlan] = field(default_factory=list)  # per pruning stage: its sizes
    whole: bool = False           # every stage keeps every token: the prompt runs as the unpruned model
    decoded: int = 0              # tokens appended after the prompt, before this call
    new_tokens: int = 0           # tokens of the current decoding call
    tail_valid: torch.Tensor | None = None  # [B, decoded + new] validity of appended tokens
    first_position: torch.Tensor | None = None  # [B] 1-D position of each row's first real token
    shift: list[torch.Tensor] = field(default_factory=list)  # per pruning stage, compact positions: [B] original
    #                                                        minus compact position of the last prompt token
    tower: tuple | None = None    # the tower block's (input, output) for methods that read the tower
    _fingerprint: torch.Tensor | None = None

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

    def instruction(self) -> torch.Tensor:
        """[B, T] bool: the real text tokens after each row's last visual token (the instruction)."""
        columns = torch.arange(self.length, device=self.valid.device)
        last_visual = torch.where(self.is_visual, columns, -1).amax(1, keepdim=True)
        return self.valid & ~self.is_visual & (columns > last_visual)

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


class _Runtime:
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
        self.positions = self._positions(method)
        self.handle = PruningHandle(method, list(self.stage_layers), self.family, self.positions)
        self._tower = TowerTap(self.family.tower_block()) if method.reads_tower else None
        # the inherited select (top n_keep of masked scores) keeps the contract by construction; a method's
        # own select is checked on every stage (one host sync)
        self._check_selection = type(method).select is not PruningMethod.select
        self._hooks: list = []
        self._layer_hooks: list = []  # the layers' hooks, while the current call needs them
        self._input_ids: torch.Tensor | None = None
        self._brings_visual = False  # whether the multimodal model's call carries images (Family.brings_visual)
        self._seq: _Sequence | None = None
        self._phase: str | None = None
        self._stage_kwargs: dict[int, dict] = {}
        self._captured: dict[str, torch.Tensor] = {}

    def _positions(self, method: PruningMethod) -> str:
        """The method's ``positions`` for this family: None (a method's reference default) is compact numbering
        on 1-D RoPE and the original M-RoPE positions (as the reference code's Qwen ports keep them)."""
        positions = getattr(method, "positions", "original")
        if positions is None:
            return "original" if self.family.multimodal_rope else "compact"
        if positions == "compact" and self.family.multimodal_rope:
            raise ValueError(f"{method.name} positions='compact' renumbers 1-D positions; {self.family.name} numbers "
                             "its tokens with M-RoPE (3 rows of positions): use positions='original'")
        return positions

    # ------------------------------------------------------------------ attaching and detaching
    def attach(self) -> None:
        try:
            if self._tower is not None:
                self._tower.attach()
            mm, lm = self.family.multimodal_model(), self.family.language_model()
            # prepend: whatever else observes these modules (analysis.capture) sees the pruned inputs
            self._hooks.append(mm.register_forward_pre_hook(self._on_multimodal, with_kwargs=True, prepend=True))
            self._hooks.append(lm.register_forward_pre_hook(self._on_language_model, with_kwargs=True,
                                                            prepend=True))
            first = self.stage_layers[0] - (1 if self.method.attention_queries else 0)
            self._layer_hook_functions = {i: self._layer_hook(i) for i in range(first, len(self.layers))}
            self._arm_layers(True)
        except BaseException:
            self.detach()
            raise

    def _arm_layers(self, armed: bool) -> None:
        """Register the layers' hooks (prepended, as at the start: whatever else observes the layers sees the
        pruned inputs), or remove them for a call in which every one of them would change nothing."""
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
        while self._hooks:
            self._hooks.pop().remove()
        self._seq = None
        self._captured.clear()
        self._stage_kwargs.clear()

    # ------------------------------------------------------------------ per-call hooks
    def _on_multimodal(self, module, args, kwargs):
        kwargs = self.family.call_arguments(args, kwargs)
        self._brings_visual = self.family.brings_visual(kwargs)
        input_ids = kwargs.get("input_ids")
        if input_ids is None and self._brings_visual:
            raise ValueError("lofi.pruned needs input_ids to find the visual tokens (their token ids); "
                             "pass input_ids, not inputs_embeds")
        self._input_ids = input_ids

    def _on_language_model(self, module, args, kwargs):
        input_ids, self._input_ids = self._input_ids, None
        brings_visual, self._brings_visual = self._brings_visual, False
        self._stage_kwargs = {}
        self._captured.clear()
        embeds = kwargs.get("inputs_embeds")
        length = embeds.shape[1]
        cache = kwargs.get("past_key_values")
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError("lofi.pruned needs a dynamic KV cache (layers hold different token counts); "
                             "do not pass a static cache or cache_implementation='static'")
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and mask2d.ndim != 2:
            raise ValueError("lofi.pruned builds the attention masks itself: pass a 2D attention_mask "
                             "(or none), not a 4D one")
        past = cache.get_seq_length() if cache is not None else 0
        # a decoding step brings no image, so its ids are not read: it reads nothing from the device
        is_visual = self.family.call_visual_mask(input_ids, brings_visual, past)
        if past and is_visual is not None and bool(is_visual.any()):
            raise ValueError("lofi.pruned prunes a prompt that starts a sequence; visual tokens after a cached "
                             "prefix are not supported")
        if past and self._seq is not None:  # a decoding step
            if self._seq.whole:
                self._phase = None
                self._arm_layers(False)
                return None
            self._continue(length, mask2d)
            self._phase = "decode"
            # continue the prompt's numbering: the model's own count would read a pruned cache's length
            positions = self._seq.last_position[:, None] + 1 + torch.arange(length, device=embeds.device)
            kwargs["position_ids"] = self.family.decode_position_ids(positions)
            self._seq.last_position = positions[:, -1]
            # one new token of an unpadded SDPA batch without padding slots sees every cached key in every
            # layer: no mask, and nothing for the layers' hooks to change (at batch 1 their calls are most of
            # what the runtime adds to a step)
            plain = self._seq.dense and length == 1 and not any(self._seq.slotted) and self.positions != "compact"
            if plain:
                kwargs["attention_mask"] = None
            self._arm_layers(not plain)
        else:
            if is_visual is None:
                self._seq, self._phase = None, None
                return None
            prunable = self.family.prunable_mask(is_visual, embeds)
            valid = torch.ones_like(is_visual) if mask2d is None else mask2d[:, -length:].bool()
            sizes = stage_steps.host_sizes(is_visual, prunable, valid)
            if not sizes.has_visual:
                self._seq, self._phase = None, None
                return None
            self._start(input_ids, embeds, is_visual, prunable, valid, kwargs.get("position_ids"), sizes)
            self._seq.plans = stage_steps.plan_stages(self.method, len(self.stage_layers), sizes)
            if all(stage_steps.keeps_everything(plan.n_keep, plan.n_present, []) for plan in self._seq.plans):
                self._record_whole_prompt()
                return None
            self._seq.dense = sizes.unpadded and self.attention_kind == "sdpa"
            self._phase = "prefill"
            self._arm_layers(True)
        if self.stage_layers[0] == 0 and self._phase == "decode":
            kwargs["attention_mask"] = None  # every layer gets its own mask; the model's would mismatch
        return args, kwargs

    def _start(self, input_ids, embeds, is_visual, prunable, valid, position_ids,
               sizes: stage_steps.HostSizes) -> None:
        batch, length = is_visual.shape
        device = is_visual.device
        rank = torch.where(is_visual, is_visual.long().cumsum(1) - 1, -1)
        if position_ids is None:
            last = torch.full((batch,), length - 1, device=device)
            first = valid.long().argmax(1)
        else:
            text_positions = self.family.text_positions(position_ids).expand(batch, -1)
            last = text_positions[..., -1].clone()
            first = text_positions.gather(1, valid.long().argmax(1, keepdim=True))[:, 0]
        index = torch.arange(length, device=device).expand(batch, length)
        hash_inputs = (input_ids, embeds) if self.method.draws else None
        counts = sizes.on_device  # per row: prunable, text, visual, real tokens (stage.host_sizes)
        self._seq = _Sequence(valid, is_visual, prunable, rank, counts[:, 0], hash_inputs, [index], last,
                              host=sizes, first_position=first)
        if self._tower is not None:
            self._seq.tower = self._tower.take()
        self.handle.kept, self.handle.merged = [], []
        self.handle._index = self._seq.index  # the same list: stages append to it as they prune
        self.handle.n_visual, self.handle.n_prunable = counts[:, 2], self._seq.n_prunable

    def _record_whole_prompt(self) -> None:
        """Every stage keeps every token it holds (keep = 1): the prompt and its decoding steps run as the
        unpruned model, with no layer hook and no argument of ours; only the handle's records are made."""
        seq = self._seq
        seq.whole, seq.hash_inputs, self._phase = True, None, None
        kept = self._steps().candidates(seq.prunable, seq.visual_rank, seq.plans[0].most)[2]
        for _ in seq.plans:
            seq.index.append(seq.index[0])
            self.handle.kept.append(kept)
            self.handle.merged.append(None)
            seq.shift.append(torch.zeros_like(seq.last_position))
        self._arm_layers(False)

    def _continue(self, new_tokens: int, mask2d) -> None:
        seq = self._seq
        seq.decoded += seq.new_tokens
        seq.new_tokens = new_tokens
        total = seq.length + seq.decoded + new_tokens
        if mask2d is not None and mask2d.shape[1] != total:
            raise ValueError(f"attention_mask covers {mask2d.shape[1]} tokens, the pruned sequence so far has "
                             f"{total}; pass the mask of the whole sequence as generate() does")
        batch = seq.valid.shape[0]
        seq.tail_valid = (mask2d[:, seq.length:].bool() if mask2d is not None else
                          torch.ones(batch, total - seq.length, dtype=torch.bool, device=seq.valid.device))

    def _layer_hook(self, layer: int):
        stage = sum(layer >= k for k in self.stage_layers)  # 0: before the first pruning layer
        ranks_next = self.method.attention_queries and layer + 1 in self.stage_layers

        def hook(module, args, kwargs):
            if self._phase is None:
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if stage:
                if self._phase == "prefill" and layer == self.stage_layers[stage - 1]:
                    hidden = self._prune(stage, hidden)
                if stage not in self._stage_kwargs:
                    self._stage_kwargs[stage] = self._stage_arguments(stage, kwargs, hidden)
                kwargs.update(self._stage_kwargs[stage])
            if ranks_next and self._phase == "prefill":  # what layer K-1 computes its queries and keys from
                self._captured["hidden"] = hidden
                self._captured["rotary"] = kwargs["position_embeddings"]
            return (hidden, *args[1:]), kwargs

        return hook

    # ------------------------------------------------------------------ the pruning step
    def _prune(self, stage: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` after stage ``stage`` (1-based) has dropped what its method chose, recorded."""
        index, kept, hidden, merged = self._apply_stage(stage, hidden)
        self._seq.index.append(index)
        self.handle.kept.append(kept)
        self.handle.merged.append(merged)
        if self.positions == "compact":
            real = self._seq.at(index, self._seq.valid)
            self._seq.shift.append(self._seq.last_position - self._seq.first_position - real.sum(1) + 1)
        if stage == len(self.stage_layers):
            self._seq.hash_inputs = self._seq.tower = None  # not held through decoding
        return hidden

    def _apply_stage(self, stage: int, hidden: torch.Tensor):
        seq, layer = self._seq, self.stage_layers[stage - 1]
        current = seq.index[stage - 1]
        valid, prunable = seq.at(current, seq.valid), seq.at(current, seq.prunable)
        present, n_keep, most, widest, new_width, narrowest = seq.plans[stage - 1]
        seq.slotted.append(narrowest < new_width)  # rows of different lengths: padding slots from here on
        steps = self._steps()
        order, visual_valid, visual_index = steps.candidates(prunable, seq.at(current, seq.visual_rank), most)
        if stage_steps.keeps_everything(n_keep, present, seq.slotted):
            # neither the method nor the step runs: at batch 1 their kernels are most of the runtime's cost
            return current, visual_index, hidden, None
        n_keep_host, n_keep = n_keep, n_keep.to(current.device, non_blocking=True)
        text = valid & ~seq.at(current, seq.is_visual)
        state = StageInput(
            layer=layer, stage=stage - 1, hidden=hidden, visual=order, visual_valid=visual_valid,
            visual_index=visual_index, text=text, valid=valid, n_keep=n_keep,
            attention=(lambda: attention_received(self.family, self.layers[layer - 1], self._captured["hidden"],
                                                  self._captured["rotary"], self.method.attention_queries,
                                                  current, valid, text))
            if self.method.attention_queries else None,
            fingerprint=seq.fingerprint(), model=self.model, keep_width=widest,
            text_width=seq.host.text_width, n_keep_host=n_keep_host,
            instruction=text & seq.at(current, seq.instruction()),
            tower=(lambda: self._tower_view(current, order, visual_valid)) if self._tower is not None else None)
        chosen = self.method.select(state)
        states = None
        if isinstance(chosen, Choice):
            chosen, states = chosen
        if self._check_selection:
            chosen = self._checked(chosen, state)
        chosen = chosen.to(torch.long)
        if states is not None:
            hidden = stage_steps.write_states(hidden, order, chosen, states)
        index, kept, hidden = steps.apply_choice(current, prunable, order, chosen, visual_index, hidden, new_width)
        return index, kept, hidden, None if states is None else stage_steps.in_kept_order(chosen, visual_index, states)

    def _tower_view(self, current: torch.Tensor, order: torch.Tensor, visual_valid: torch.Tensor) -> TowerView:
        """The tower's data at the prunable visual tokens a stage holds (``order``: their positions in it)."""
        seq = self._seq
        inputs, outputs = seq.tower
        attention, keys = cls_attention_and_keys(self._tower.block, inputs)
        original = current.gather(1, order).clamp_min(0)  # the candidates' original positions

        def read(per_patch: torch.Tensor) -> torch.Tensor:
            return gather_rows(per_visual_token(per_patch, seq.is_visual), original, visual_valid)

        return TowerView(read(outputs[:, 1:]), read(attention), read(keys), self.family.project)

    def _compact_positions(self, stage: int, index: torch.Tensor) -> torch.Tensor:
        """[B, n] positions of the tokens stage ``stage`` holds, renumbered as a prompt of just those tokens (from
        each row's first real position), or of the decoding call's tokens after such a prompt."""
        seq = self._seq
        if self._phase == "decode":
            new = seq.last_position[:, None] - seq.new_tokens + 1 + torch.arange(seq.new_tokens, device=index.device)
            return new - seq.shift[stage - 1][:, None]
        real = seq.at(index, seq.valid)
        return torch.where(real, seq.first_position[:, None] + real.long().cumsum(1) - 1, 0)

    def _steps(self) -> stage_steps.Steps:
        """The stage's tensor work: compiled inside ``lofi.compiled`` (with its backend), eager otherwise."""
        options = options_of(self.model)
        return stage_steps.EAGER if options is None else stage_steps.compiled_steps(options.get("backend", "inductor"))

    def _checked(self, chosen: torch.Tensor, state: StageInput) -> torch.Tensor:
        """The method's choice, or one error that says how it breaks the ``select`` contract (one host
        sync when it holds)."""
        name = self.method.name
        batch, most = state.visual.shape
        if chosen.ndim != 2 or chosen.shape[0] != batch:
            raise RuntimeError(f"{name}.select returned shape {tuple(chosen.shape)}, expected ({batch}, max n_keep)")
        chosen = chosen.to(device=state.visual.device, dtype=torch.long)
        picked = chosen >= 0
        real = state.visual_valid.gather(1, chosen.clamp(0, max(most - 1, 0)))
        marks = torch.zeros_like(state.visual).scatter_add(1, chosen.clamp(0, max(most - 1, 0)), picked.long())
        holds = torch.stack([(chosen < most).all(), (picked.sum(1) == state.n_keep).all(), (real | ~picked).all(),
                             (marks <= 1).all()])
        if bool(holds.all()):
            return chosen
        if not bool(holds[3]) and bool(holds[:3].all()):
            raise RuntimeError(f"{name}.select chose the same token twice")
        raise RuntimeError(f"{name}.select must return, per sample, n_keep = {state.n_keep.tolist()} distinct "
                           f"indices of its real visual tokens (-1 padding after them)")

    def _stage_arguments(self, stage: int, kwargs: dict, hidden: torch.Tensor) -> dict:
        """Mask, rotary tables and position ids of the tokens that stage ``stage`` sees."""
        seq = self._seq
        index = seq.index[stage]
        batch = index.shape[0]
        dtype = hidden.dtype
        arguments = {}  # nothing dropped yet (the prompt's own index): the layer's own rotary tables serve
        if self.positions == "compact" and index is not seq.index[0]:
            positions = self._compact_positions(stage, index)
            arguments["position_embeddings"] = self.family.language_model().rotary_emb(hidden, positions)
            arguments["position_ids"] = positions
        elif self._phase == "prefill" and index is not seq.index[0]:
            safe = index.clamp_min(0)
            cos, sin = kwargs["position_embeddings"]
            gather = lambda t: t.expand(batch, *t.shape[1:]).gather(  # noqa: E731
                1, safe[..., None].expand(-1, -1, t.shape[-1]))
            arguments["position_embeddings"] = (gather(cos), gather(sin))
            if kwargs.get("position_ids") is not None:
                arguments["position_ids"] = kwargs["position_ids"].expand(batch, -1).gather(1, safe)
        if seq.dense and not any(seq.slotted[:stage]) and (self._phase == "prefill" or seq.new_tokens == 1):
            # kept tokens stay in their original order, so "causal by original index" is plain causal
            # order: SDPA's own causal path (prefill) or no mask at all (one new token sees every key)
            arguments["attention_mask"] = None
            return arguments
        keys, key_valid = index, seq.at(index, seq.valid)
        if self._phase == "decode":
            appended = seq.length + torch.arange(seq.decoded + seq.new_tokens, device=index.device)
            keys = torch.cat([index, appended.expand(batch, -1)], 1)
            key_valid = torch.cat([key_valid, seq.tail_valid], 1)
        queries = keys[:, -seq.new_tokens:] if self._phase == "decode" else keys
        allowed = (keys[:, None, :] <= queries[:, :, None]) & key_valid[:, None, :]
        allowed = allowed[:, None]
        if self.attention_kind == "eager":  # eager adds its mask to the scores
            allowed = torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device),
                                  torch.finfo(dtype).min)
        arguments["attention_mask"] = allowed
        return arguments


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
    if id(model) in _ACTIVE:
        raise RuntimeError("this model is already inside lofi.pruned(...); nest methods as one "
                           "multi-stage method instead")
    runtime = _Runtime(model, instance)
    runtime.attach()
    _ACTIVE[id(model)] = runtime.handle
    try:
        yield runtime.handle
    finally:
        _ACTIVE.pop(id(model), None)
        runtime.detach()


_ACTIVE: dict[int, PruningHandle] = {}


def active(model: torch.nn.Module) -> PruningHandle | None:
    """The handle of the ``pruned`` block ``model`` is in, or None."""
    return _ACTIVE.get(id(model))
