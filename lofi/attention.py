"""FastV's ranking signal, rebuilt: the attention each token receives at a decoder layer.

The runtime keeps whatever attention kernel the model runs (SDPA, eager, a compiled layer), which does not
return attention weights. An attention-ranked method's rows are therefore recomputed from the hidden states
entering the layer, through that layer's own pre-attention norm, key (and the ranking rows') query
projections and rotary embedding, as the family adapter says its modeling file applies them.
"""

from __future__ import annotations

import torch

from lofi.families import Family


def attention_received(family: Family, layer: torch.nn.Module, hidden: torch.Tensor, rotary: tuple,
                       queries: str, index: torch.Tensor, valid: torch.Tensor, text: torch.Tensor,
                       dense: bool = False) -> torch.Tensor:
    """[batch, n]: the attention each token receives at ``layer``, mean over heads and the query rows.

    Args:
        family: the model's family adapter (norm, heads, rotary function).
        layer: the decoder layer; ``hidden`` [batch, n, d] enters it with rotary tables ``rotary`` (cos, sin).
        queries: ``"last"`` (each row's last real token: the only query projected) or ``"text"`` (every real
            text token's row, averaged).
        index: [batch, n] original sequence positions of the tokens (causal order is by these).
        valid: [batch, n] real tokens; text: [batch, n] real text tokens.
        dense: known on the host: no row holds padding or padding slots, so the last column is every row's last
            real token and it sees every key (the same result in fewer ops, as at batch 1).
    """
    attn = layer.self_attn
    x = family.attention_input(layer, hidden)
    k = family.attention_heads(attn, attn.k_proj(x), "k")
    batch, kv_heads, n, dim = k.shape
    cos, sin = (t.expand(batch, *t.shape[1:]) for t in rotary)
    if queries == "last" and dense:
        q = family.attention_heads(attn, attn.q_proj(x[:, -1:]), "q")
        group = q.shape[1] // kv_heads
        # the query's heads become rows of their key-value head after its keys, at the last position: one rotation
        # rotates both, and the scores need no repeated keys
        rows = torch.cat([k, q.reshape(batch, kv_heads, group, dim)], 2).float()
        cos, sin = (torch.cat([t, t[:, -1:].expand(-1, group, -1)], 1).float() for t in (cos, sin))
        rows = family.rotate(attn, rows, rows, cos, sin)[0]
        k, q = rows[:, :, :n], rows[:, :, n:]
        return torch.softmax((q @ k.transpose(-1, -2)) * attn.scaling, dim=-1).mean((1, 2))
    cos, sin = cos.float(), sin.float()
    if queries == "last":
        # the last real token of each row (the last column with left padding, earlier with right)
        last = (valid.long() * torch.arange(n, device=valid.device)).argmax(1, keepdim=True)
        pick = lambda t: t.gather(1, last[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        q = family.attention_heads(attn, attn.q_proj(pick(x)), "q").float()
        q = family.rotate(attn, q, q, pick(cos), pick(sin))[0]
        k = k.float()
        k = family.rotate(attn, k, k, cos, sin)[0]
        query_index, query_valid = index.gather(1, last), valid.gather(1, last)
    else:
        q = family.attention_heads(attn, attn.q_proj(x), "q")
        q, k = family.rotate(attn, q.float(), k.float(), cos, sin)
        query_index, query_valid = index, text
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    allowed = (index[:, None, :] <= query_index[:, :, None]) & valid[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(1)  # [B, queries, n]
    weights = query_valid.float()
    return (probs * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
