"""What a vision tower's block attends to, rebuilt from the block's input (the tower keeps its own attention
kernel: nothing forces eager attention on it), and what that rebuild costs.

Two saliencies, as the methods' authors define them:

* ``"cls"``: the [CLS] query's attention to each patch (CLIP towers: LLaVA-1.5, LLaVA-NeXT), the score SCOPE,
  VisionZip and VisPruner were written for;
* ``"received"``: the mean attention each patch receives from the queries of its own image, for towers
  without a [CLS] token (SigLIP in OneVision, Qwen2-VL's ViT): the substitute VisPruner's and VisionZip's
  authors use there (VisPruner's ``siglip_encoder.py``; VisionZip's and VisPruner's Qwen answers).

Each function returns per patch (saliency, key averaged over heads); attention is averaged over heads.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _scores(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax over keys of ``query . key * scale``: [..., heads, q, k] from [..., q, heads, d], [..., k, heads, d]."""
    return (torch.einsum("...qhd,...khd->...hqk", query, keys) * scale).softmax(-1)


def clip_heads(block: nn.Module, hidden: torch.Tensor, queries: slice = slice(None)):
    """(queries, keys) [images, tokens, heads, head_dim] in float32 of a CLIP / SigLIP encoder ``block`` whose input
    is ``hidden`` [images, tokens, d]: the block's own ``layer_norm1`` and ``q_proj`` / ``k_proj`` (biases
    included); ``queries`` selects the query tokens to build."""
    attn = block.self_attn
    normed = block.layer_norm1(hidden)
    images, tokens, _ = hidden.shape
    keys = attn.k_proj(normed).view(images, tokens, attn.num_heads, attn.head_dim).float()
    chosen = normed[:, queries]
    query = attn.q_proj(chosen).view(images, chosen.shape[1], attn.num_heads, attn.head_dim).float()
    return query, keys


def cls_attention_and_keys(block: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([images, patches] attention of the [CLS] query (token 0) to each patch token, mean over heads;
    [images, patches, head_dim] the patches' keys, mean over heads) at a CLIP encoder ``block`` whose input is
    ``hidden`` [images, 1 + patches, d].

    attention = mean_h softmax_k(q_h,CLS . k_h,k / sqrt(head_dim))[patch columns]: what the block computes.
    """
    query, keys = clip_heads(block, hidden, slice(0, 1))
    attention = _scores(query, keys, block.self_attn.head_dim ** -0.5)[:, :, 0].mean(1)
    return attention[:, 1:], keys[:, 1:].mean(2)


def received_attention_and_keys(block: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([images, patches] mean attention each patch receives, over every query of its image and every head;
    [images, patches, head_dim] keys, mean over heads) at a CLIP / SigLIP encoder ``block`` without a [CLS] token,
    whose input is ``hidden`` [images, patches, d].

    received_k = mean_h mean_q softmax_k(q_h,q . k_h,k / sqrt(head_dim)); one head at a time, so the
    [images, patches, patches] probabilities are the largest thing held.
    """
    query, keys = clip_heads(block, hidden)
    scale = block.self_attn.head_dim ** -0.5
    received = sum(_scores(query[:, :, h:h + 1], keys[:, :, h:h + 1], scale)[:, 0].mean(1)
                   for h in range(keys.shape[2]))
    return received / keys.shape[2], keys.mean(2)


def merged_patch_attention_and_keys(block: nn.Module, hidden: torch.Tensor, segments: torch.Tensor,
                                    position_embeddings: tuple[torch.Tensor, torch.Tensor]
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """([patches] mean attention each patch receives within its segment, over queries and heads; [patches,
    head_dim] rotated keys, mean over heads) at a Qwen2-VL / Qwen2.5-VL vision ``block`` whose input is
    ``hidden`` [patches, d] and whose attention runs within ``segments`` (``cu_seqlens``: each frame, or each
    window of a windowed block), with the block's 2-D rotary ``position_embeddings`` (cos, sin).

    The queries and keys are the block's own: ``norm1``, ``attn.qkv``, the rotary function of its modeling
    file. The segments are read on the host (one read per prompt), as the tower itself does outside
    FlashAttention, and padded to the longest, so every segment is one batch row (one head at a time).
    """
    attn = block.attn
    n = hidden.shape[0]
    qkv = attn.qkv(block.norm1(hidden)).reshape(n, 3, attn.num_heads, -1)
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    query, keys = rotate(qkv[:, 0], qkv[:, 1], *position_embeddings)
    query, keys = query.float(), keys.float()
    scale = query.shape[-1] ** -0.5
    bounds = segments.tolist()
    lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])])
    slot = torch.arange(int(lengths.max()))
    valid = slot < lengths[:, None]  # [segments, longest], on the host
    index = (torch.tensor(bounds[:-1])[:, None] + slot).clamp_max(n - 1).to(hidden.device)
    present = valid.flatten().nonzero()[:, 0].to(hidden.device)  # the real slots, in patch order
    valid = valid.to(hidden.device)
    received = query.new_zeros(valid.shape)
    for h in range(attn.num_heads):
        logits = torch.einsum("sqd,skd->sqk", query[index, h], keys[index, h]) * scale
        weights = logits.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)  # padding is no key
        received += (weights * valid[:, :, None]).sum(1)  # nor a query
    received = received / (lengths.to(received.device)[:, None] * attn.num_heads)
    return received.flatten()[present], keys.mean(1)


def cls_attention_flops(width: int, heads: int, tokens: int) -> float:
    """Rebuilding the [CLS] query's attention and every key at one block of ``tokens`` tokens ([CLS] included)
    and ``width`` d: keys ``2 n d d``, the query ``2 d d``, scores ``2 n d``, softmax ``3 n h`` (the layer norm
    is the tower's own work)."""
    d, h, n = width, heads, tokens
    return 2.0 * n * d * d + 2.0 * d * d + 2.0 * n * d + 3.0 * n * h


def received_attention_flops(width: int, heads: int, tokens: int) -> float:
    """Rebuilding every query's attention at one block of ``tokens`` tokens attending to each other: queries and
    keys ``4 n d d``, scores ``2 n n d``, softmax ``3 n n h``, the mean over queries ``n n h``."""
    d, h, n = width, heads, tokens
    return 4.0 * n * d * d + 2.0 * n * n * d + 4.0 * n * n * h
