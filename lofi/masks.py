"""The attention mask, rotary tables and position ids of the tokens a pruned layer holds, as pure functions.

Kept tokens keep their *original* positions (their rotary tables are the prompt's, read at their original
indices) or, for a method whose ``positions`` is compact, are renumbered as a prompt of just those tokens
would be. A query may attend to a key when the key's original index is not after its own and the key is a
real token (padding and a ragged batch's padding slots are not). ``stage_arguments`` gives a decoder
layer of a pruning stage the arguments that replace the model's own for the tokens that stage holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lofi.registry import PruningMethod
from lofi.sequence import Phase, Sequence

if TYPE_CHECKING:
    from lofi.families import Family


def resolve_positions(method: PruningMethod, family: Family) -> str:
    """The method's ``positions`` on ``family``: None (a method's reference default) is compact numbering on 1-D
    RoPE and the original M-RoPE positions (as the reference code's Qwen ports keep them)."""
    positions = getattr(method, "positions", "original")
    if positions is None:
        return "original" if family.multimodal_rope else "compact"
    if positions == "compact" and family.multimodal_rope:
        raise ValueError(f"{method.name} positions='compact' renumbers 1-D positions; {family.name} numbers its "
                         "tokens with M-RoPE (3 rows of positions): use positions='original'")
    return positions


def kept_rotary(position_embeddings: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, slots: bool = True
                ) -> tuple:
    """The layer's (cos, sin) [1 or B, T, dim] of the prompt, read at ``index`` [B, n] (-1: a padding
    slot, which reads position 0 and is masked; ``slots``: False where ``index`` holds none)."""
    safe = index.clamp_min(0) if slots else index
    batch = index.shape[0]
    return tuple(t.expand(batch, *t.shape[1:]).gather(1, safe[..., None].expand(-1, -1, t.shape[-1]))
                 for t in position_embeddings)


def kept_position_ids(position_ids: torch.Tensor, index: torch.Tensor, slots: bool = True) -> torch.Tensor:
    """The prompt's ``position_ids`` [1 or B, T] read at ``index`` [B, n] (-1: a padding slot)."""
    return position_ids.expand(index.shape[0], -1).gather(1, index.clamp_min(0) if slots else index)


def causal_mask(keys: torch.Tensor, key_valid: torch.Tensor, queries: torch.Tensor, attention: str,
                dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, queries, keys]: query i may see key j where keys[j] <= queries[i] (original indices) and key j
    is real (``key_valid``); bool for SDPA, 0 / the dtype's minimum for eager attention (added to the scores)."""
    allowed = ((keys[:, None, :] <= queries[:, :, None]) & key_valid[:, None, :])[:, None]
    if attention == "eager":
        allowed = torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), torch.finfo(dtype).min)
    return allowed


def stage_arguments(seq: Sequence, stage: int, phase: Phase, kwargs: dict, dtype: torch.dtype,
                    attention: str, rotary=None) -> dict:
    """Mask, rotary tables and position ids of the tokens stage ``stage`` (1-based) holds, for a layer of
    that stage in the current call (``kwargs``: the layer's own arguments, ``attention``: "sdpa" or "eager";
    ``rotary``: for compact positions, a function of [B, n] positions returning the layer's (cos, sin))."""
    index = seq.index[stage]
    arguments = {}  # nothing dropped yet (the prompt's own index): the layer's own rotary tables serve
    if rotary is not None and index is not seq.index[0]:
        positions = seq.compact_positions(stage, phase)
        arguments["position_embeddings"] = rotary(positions)
        arguments["position_ids"] = positions
    elif phase is Phase.PREFILL and index is not seq.index[0]:
        slots = any(seq.slotted[:stage])
        arguments["position_embeddings"] = kept_rotary(kwargs["position_embeddings"], index, slots)
        if kwargs.get("position_ids") is not None:
            arguments["position_ids"] = kept_position_ids(kwargs["position_ids"], index, slots)
    if seq.dense and not any(seq.slotted[:stage]) and (phase is Phase.PREFILL or seq.new_tokens == 1):
        # kept tokens stay in their original order, so "causal by original index" is plain causal
        # order: SDPA's own causal path (prefill) or no mask at all (one new token sees every key)
        arguments["attention_mask"] = None
        return arguments
    keys, key_valid = index, seq.at(index, seq.valid)
    if phase is Phase.DECODE:
        appended = seq.length + torch.arange(seq.decoded + seq.new_tokens, device=index.device)
        keys = torch.cat([index, appended.expand(index.shape[0], -1)], 1)
        key_valid = torch.cat([key_valid, seq.tail_valid], 1)
    queries = keys[:, -seq.new_tokens:] if phase is Phase.DECODE else keys
    arguments["attention_mask"] = causal_mask(keys, key_valid, queries, attention, dtype)
    return arguments
