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
                       queries: str, index: torch.Tensor, valid: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[batch, n]: the attention each token receives at ``layer``, mean over heads and the query rows.

    Args:
        family: the model's family adapter (norm, heads, rotary function).
        layer: the decoder layer; ``hidden`` [batch, n, d] enters it with rotary tables ``rotary`` (cos, sin).
        queries: ``"last"`` (each row's last real token: the only query projected) or ``"text"`` (every real
            text token's row, averaged).
        index: [batch, n] original sequence positions of the tokens (causal order is by these).
        valid: [batch, n] real tokens; text: [batch, n] real text tokens.
    """
    attn = layer.self_attn
    x = family.attention_input(layer, hidden)
    k = family.attention_heads(attn, attn.k_proj(x), "k").float()
    batch, n = k.shape[0], k.shape[2]
    cos, sin = (t.float().expand(batch, *t.shape[1:]) for t in rotary)
    if queries == "last":
        # the last real token of each row (the last column with left padding, earlier with right)
        last = (valid.long() * torch.arange(n, device=valid.device)).argmax(1, keepdim=True)
        pick = lambda t: t.gather(1, last[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        q = family.attention_heads(attn, attn.q_proj(pick(x)), "q").float()
        q = family.rotate(attn, q, pick(cos), pick(sin))
        query_index, query_valid = index.gather(1, last), valid.gather(1, last)
    else:
        q = family.attention_heads(attn, attn.q_proj(x), "q").float()
        q = family.rotate(attn, q, cos, sin)
        query_index, query_valid = index, text
    k = family.rotate(attn, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    allowed = (index[:, None, :] <= query_index[:, :, None]) & valid[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(1)  # [B, queries, n]
    weights = query_valid.float()
    return (probs * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
