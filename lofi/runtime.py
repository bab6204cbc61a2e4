"""The one runtime that drops visual tokens inside a Hugging Face LLaVA language model.

``pruned(model, method, keep=..., layer=..., **options)`` registers forward pre-hooks (nothing else:
no weights, classes or forward methods change) and removes them on exit, also after an exception.
While it is active, every forward pass and ``generate()`` call runs like this:

* The multimodal model's pre-hook reads ``input_ids`` and finds the visual tokens as
  ``input_ids == image_token_id`` (never fixed offsets). A call whose prompt holds image tokens
  starts a new *sequence*; a call without them that continues a cache is a *decoding step*.
* At each stage layer K (``method.stages``) the method chooses which visual tokens to keep from the
  hidden states entering K; the pre-hook of layer K removes the others from ``hidden_states``, so
  layers K.. really compute on fewer tokens, and their KV cache holds exactly the tokens they saw.
* Every layer from the first stage on gets its own attention mask (causal by *original* sequence
  index, padding respected), and the rotary tables of the kept tokens' *original* positions
  (positions are never renumbered; new tokens continue the original numbering).
* Methods that rank by attention (FastV) get the attention rows they need from layer K-1's own
  query and key projections, captured by hooks: any attention kernel (SDPA, eager) keeps running.

Batches may be padded (left or right); each sample gets its own selection, the same count per sample.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from lofi import architecture as arch
from lofi.methods.replay import Replay
from lofi.registry import PruningMethod, StageInput, build


@dataclass
class PruningHandle:
    """What ``pruned`` yields.

    Attributes:
        method: the method instance in use.
        stages: decoder layers at which tokens are dropped.
        kept: per stage, a LongTensor [batch, n_kept] of the kept visual-token indices
            (0 .. n_visual-1, increasing) of the latest prompt the model saw.
        n_visual: visual tokens per sample in that prompt.
    """

    method: PruningMethod
    stages: list[int]
    kept: list[torch.Tensor] = field(default_factory=list)
    n_visual: int = 0
    _index: list[torch.Tensor] = field(default_factory=list, repr=False)

    def sequence_index(self, layer: int) -> torch.Tensor | None:
        """[batch, n] original sequence positions of the prompt tokens decoder layer ``layer`` computes
        on, in the latest prompt (``layer`` = number of layers: the output of the last one); None
        before any prompt."""
        if not self._index:
            return None
        return self._index[min(len(self._index) - 1, sum(layer >= k for k in self.stages))]

    def replay(self) -> "Replay":
        """A method that keeps exactly the tokens of the latest prompt's ``kept``, for later passes over
        the same samples (``lofi.pruned(model, handle.replay())``: teacher forcing, rescoring)."""
        if not self.kept:
            raise RuntimeError("nothing to replay: no prompt with image tokens has run inside this block")
        return Replay(self.stages, self.kept)


@dataclass
class _Sequence:
    """Bookkeeping of one prompt (and its decoding steps), in original sequence indices."""

    valid: torch.Tensor           # [B, T] bool: real tokens of the prompt
    is_visual: torch.Tensor       # [B, T] bool
    visual_rank: torch.Tensor     # [B, T] long: 0..n_visual-1 at visual tokens, -1 elsewhere
    index: list[torch.Tensor]     # per stage 0..S: [B, n_s] original indices seen by that stage
    last_position: torch.Tensor   # [B] position id of the last token so far
    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    decoded: int = 0              # tokens appended after the prompt, before this call
    new_tokens: int = 0           # tokens of the current decoding call
    tail_valid: torch.Tensor | None = None  # [B, decoded + new] validity of appended tokens

    @property
    def length(self) -> int:
        return self.valid.shape[1]


class _Runtime:
    def __init__(self, model: torch.nn.Module, method: PruningMethod):
        impl = arch.attention_implementation(model)
        if impl not in arch.SUPPORTED_ATTENTION:
            raise ValueError(f"lofi.pruned supports attn_implementation {arch.SUPPORTED_ATTENTION}, "
                             f"the model uses {impl!r}; load it with attn_implementation='sdpa'")
        self.model, self.method = model, method
        self.attention_kind = impl
        self.layers = arch.decoder_layers(model)
        method.bind(model)
        self.stage_layers = method.stages(len(self.layers))
        if any(b <= a for a, b in zip(self.stage_layers, self.stage_layers[1:])):
            raise ValueError(f"{method.name}: stage layers must increase, got {self.stage_layers}")
        if method.attention_queries and self.stage_layers[0] < 1:
            raise ValueError(f"{method.name} ranks tokens by the attention of layer K-1, so layer must be >= 1")
        self.image_token_id = arch.image_token_id(model)
        self.handle = PruningHandle(method, list(self.stage_layers))
        self._hooks: list = []
        self._call_inputs: tuple | None = None
        self._seq: _Sequence | None = None
        self._phase: str | None = None
        self._stage_kwargs: dict[int, dict] = {}
        self._captured: dict[str, torch.Tensor] = {}
        self._previous_rotary: tuple | None = None

    # ------------------------------------------------------------------ attaching and detaching
    def attach(self) -> None:
        try:
            mm, lm = arch.multimodal_model(self.model), arch.language_model(self.model)
            # prepend: whatever else observes these modules (analysis.capture) sees the pruned inputs
            self._hooks.append(mm.register_forward_pre_hook(self._on_multimodal, with_kwargs=True, prepend=True))
            self._hooks.append(lm.register_forward_pre_hook(self._on_language_model, with_kwargs=True,
                                                            prepend=True))
            first = self.stage_layers[0] - (1 if self.method.attention_queries else 0)
            for i in range(first, len(self.layers)):
                self._hooks.append(self.layers[i].register_forward_pre_hook(
                    self._layer_hook(i), with_kwargs=True, prepend=True))
            if self.method.attention_queries:
                for layer in self.stage_layers:
                    attn = self.layers[layer - 1].self_attn
                    self._hooks.append(attn.q_proj.register_forward_hook(self._capture("q", layer - 1)))
                    self._hooks.append(attn.k_proj.register_forward_hook(self._capture("k", layer - 1)))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()
        self._seq = None
        self._captured.clear()
        self._stage_kwargs.clear()

    # ------------------------------------------------------------------ per-call hooks
    def _on_multimodal(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("lofi.pruned needs input_ids to find the image tokens "
                             "(input_ids == image_token_id); pass input_ids, not inputs_embeds")
        self._call_inputs = (input_ids, kwargs.get("pixel_values"))

    def _on_language_model(self, module, args, kwargs):
        input_ids, pixel_values = self._call_inputs or (None, None)
        self._call_inputs = None
        self._stage_kwargs = {}
        self._captured.clear()
        embeds = kwargs.get("inputs_embeds")
        batch, length = embeds.shape[:2]
        cache = kwargs.get("past_key_values")
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError("lofi.pruned needs a dynamic KV cache (layers hold different token counts); "
                             "do not pass a static cache or cache_implementation='static'")
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and mask2d.ndim != 2:
            raise ValueError("lofi.pruned builds the attention masks itself: pass a 2D attention_mask "
                             "(or none), not a 4D one")
        past = cache.get_seq_length() if cache is not None else 0
        is_visual = None if input_ids is None else input_ids == self.image_token_id
        if is_visual is not None and is_visual.any():
            if past:
                raise ValueError("lofi.pruned prunes a prompt that starts a sequence; image tokens after a "
                                 "cached prefix are not supported")
            self._start(is_visual, mask2d, kwargs.get("position_ids"), input_ids, pixel_values)
            self._phase = "prefill"
        elif self._seq is not None and past:
            self._continue(length, mask2d)
            self._phase = "decode"
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = (self._seq.last_position[:, None] + 1
                                          + torch.arange(length, device=embeds.device))
            self._seq.last_position = kwargs["position_ids"][:, -1].expand(batch).clone()
        else:
            self._seq, self._phase = None, None
            return None
        if self.stage_layers[0] == 0 and self._phase == "decode":
            kwargs["attention_mask"] = None  # every layer gets its own mask; the model's would mismatch
        return args, kwargs

    def _start(self, is_visual, mask2d, position_ids, input_ids, pixel_values) -> None:
        counts = is_visual.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"every sample of a batch needs the same number of image tokens, got {counts.tolist()}")
        batch, length = is_visual.shape
        device = is_visual.device
        valid = torch.ones_like(is_visual) if mask2d is None else mask2d.bool()
        rank = torch.where(is_visual, is_visual.long().cumsum(1) - 1, -1)
        if position_ids is None:
            last = torch.full((batch,), length - 1, device=device)
        else:
            last = position_ids[:, -1].expand(batch).clone()
        index = torch.arange(length, device=device).expand(batch, length)
        self._seq = _Sequence(valid, is_visual, rank, [index], last, input_ids, pixel_values)
        self.handle.kept = []
        self.handle._index = self._seq.index  # the same list: stages append to it as they prune
        self.handle.n_visual = int(counts[0])

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

        def hook(module, args, kwargs):
            if self._phase is None:
                return None
            if self.method.attention_queries and layer + 1 in self.stage_layers and self._phase == "prefill":
                self._previous_rotary = kwargs["position_embeddings"]
            if stage == 0:
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if self._phase == "prefill" and layer == self.stage_layers[stage - 1]:
                hidden = self._prune(stage, hidden)
            if stage not in self._stage_kwargs:
                self._stage_kwargs[stage] = self._stage_arguments(stage, kwargs, hidden)
            kwargs.update(self._stage_kwargs[stage])
            return (hidden, *args[1:]), kwargs

        return hook

    def _capture(self, name: str, layer: int):
        def hook(module, args, output):
            if self._phase == "prefill":
                self._captured[name] = output
        return hook

    # ------------------------------------------------------------------ the pruning step
    def _prune(self, stage: int, hidden: torch.Tensor) -> torch.Tensor:
        seq, layer = self._seq, self.stage_layers[stage - 1]
        current = seq.index[stage - 1]
        is_visual = seq.is_visual.gather(1, current)
        valid = seq.valid.gather(1, current)
        n_present = int(is_visual[0].sum())
        visual = is_visual.nonzero()[:, 1].view(len(current), n_present)
        n_keep = self.method.n_keep(stage - 1, self.handle.n_visual, n_present)
        visual_index = seq.visual_rank.gather(1, current).gather(1, visual)
        state = StageInput(
            layer=layer, stage=stage - 1, hidden=hidden, visual=visual, text=valid & ~is_visual,
            valid=valid, n_keep=n_keep, generator=self._generator, model=self.model, visual_index=visual_index,
            attention=(lambda: self._attention_received(layer - 1, current, valid))
            if self.method.attention_queries else None)
        chosen = self.method.select(state)
        if chosen.shape != (len(current), n_keep):
            raise RuntimeError(f"{self.method.name}.select returned shape {tuple(chosen.shape)}, "
                               f"expected {(len(current), n_keep)}")
        keep = ~is_visual
        keep.scatter_(1, visual.gather(1, chosen.to(visual.device)), True)
        local = keep.nonzero()[:, 1].view(len(current), -1)
        if local.shape[1] != current.shape[1] - n_present + n_keep:
            raise RuntimeError(f"{self.method.name}.select chose the same token twice")
        new_index = current.gather(1, local)
        seq.index.append(new_index)
        rank = seq.visual_rank.gather(1, new_index)
        self.handle.kept.append(rank[rank >= 0].view(len(current), n_keep))
        return hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))

    def _stage_arguments(self, stage: int, kwargs: dict, hidden: torch.Tensor) -> dict:
        """Mask, rotary tables and position ids of the tokens that stage ``stage`` sees."""
        seq = self._seq
        index = seq.index[stage]
        batch = index.shape[0]
        if self._phase == "prefill":
            cos, sin = kwargs["position_embeddings"]
            gather = lambda t: t.expand(batch, *t.shape[1:]).gather(  # noqa: E731
                1, index[..., None].expand(-1, -1, t.shape[-1]))
            arguments = {"position_embeddings": (gather(cos), gather(sin))}
            if kwargs.get("position_ids") is not None:
                arguments["position_ids"] = kwargs["position_ids"].expand(batch, -1).gather(1, index)
            keys, key_valid, queries = index, seq.valid.gather(1, index), index
        else:
            appended = seq.length + torch.arange(seq.decoded + seq.new_tokens, device=index.device)
            keys = torch.cat([index, appended.expand(batch, -1)], 1)
            key_valid = torch.cat([seq.valid.gather(1, index), seq.tail_valid], 1)
            queries = keys[:, -seq.new_tokens:]
            arguments = {}
        allowed = (keys[:, None, :] <= queries[:, :, None]) & key_valid[:, None, :]
        allowed = allowed[:, None]
        if self.attention_kind == "eager":
            zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
            allowed = torch.where(allowed, zero, torch.finfo(hidden.dtype).min)
        arguments["attention_mask"] = allowed
        return arguments

    def _attention_received(self, layer: int, current: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[batch, n]: attention each token gets at ``layer``, mean over heads and the query tokens."""
        attn = self.layers[layer].self_attn
        rotate = arch.rotary_helper(self.layers[layer])
        q, k = self._captured["q"].float(), self._captured["k"].float()
        head_dim = attn.head_dim
        batch, n = k.shape[:2]
        q = q.view(batch, q.shape[1], -1, head_dim).transpose(1, 2)
        k = k.view(batch, n, -1, head_dim).transpose(1, 2)
        cos, sin = (t.float().expand(batch, *t.shape[1:]) for t in self._previous_rotary)
        if self.method.attention_queries == "last":
            # the last real token of each row (the last column with left padding, earlier with right)
            last = (valid.long() * torch.arange(n, device=valid.device)).argmax(1, keepdim=True)
            pick = lambda t: t.gather(2, last[:, None, :, None].expand(-1, t.shape[1], 1, t.shape[-1]))  # noqa: E731
            q = pick(q)
            q, _ = rotate(q, q, cos.gather(1, last[..., None].expand(-1, -1, head_dim)),
                          sin.gather(1, last[..., None].expand(-1, -1, head_dim)))
            query_index, query_valid = current.gather(1, last), valid.gather(1, last)
        else:
            q, _ = rotate(q, q, cos, sin)
            query_index = current
            query_valid = valid & ~self._seq.is_visual.gather(1, current)
        k, _ = rotate(k, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        allowed = (current[:, None, :] <= query_index[:, :, None]) & valid[:, None, :]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(1)  # [B, queries, n]
        weights = query_valid.float()
        return (probs * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)

    def _generator(self, row: int, seed: int = 0) -> torch.Generator:
        """A generator seeded from the sample itself, so a selection does not depend on batching."""
        seq = self._seq
        tokens = seq.input_ids[row][seq.valid[row]]
        digest = hashlib.sha256(str(seed).encode())
        digest.update(tokens.cpu().numpy().tobytes())
        if seq.pixel_values is not None and seq.pixel_values.shape[0] == seq.valid.shape[0]:
            digest.update(seq.pixel_values[row].float().cpu().numpy().tobytes())
        generator = torch.Generator(device=seq.valid.device)
        generator.manual_seed(int.from_bytes(digest.digest()[:8], "little"))
        return generator


@contextmanager
def pruned(model: torch.nn.Module, method: str | PruningMethod, keep: float = 0.5,
           layer: int | None = None, **options) -> Iterator[PruningHandle]:
    """Run ``model`` with visual tokens dropped inside its language model while the block is active.

    Args:
        model: any ``LlavaForConditionalGeneration`` (SDPA or eager attention).
        method: a name from ``lofi.available()``, or a ``PruningMethod`` instance.
        keep: fraction of the visual tokens kept (for ``lvpruning``: rho).
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
        instance = build(method, **options)
    else:
        instance = build(method, keep=keep, **({} if layer is None else {"layer": layer}), **options)
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
