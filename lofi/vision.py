"""The vision stage: what a method may read from the vision tower, aligned with the LLM's visual tokens.

Methods such as SCOPE, VisionZip and VisPruner rank visual tokens by the vision tower's own states and its
[CLS] token's attention at the layer whose output the projector reads (LLaVA's ``vision_feature_layer``,
-2 for LLaVA-1.5). ``TowerTap`` hooks that one tower block while ``lofi.pruned`` is active: a forward
pre-hook keeps the block's input (its queries and keys are rebuilt from it, so the tower keeps its own
attention kernel: nothing forces eager attention) and a forward hook keeps its output (the states the
projector reads). ``TowerView`` then hands a method, per LLM visual token, the tower state of the patch it
came from, the [CLS] query's attention to that patch (softmax over every key, averaged over heads) and the
patch's key averaged over heads. The family adapter says how tower patches map to the LLM's visual tokens
(``Family.tower_patches``); families where that map is not one patch per token refuse with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TowerView:
    """Tower data per prunable visual token a stage holds, in the order of ``StageInput.visual``.

    Attributes:
        features: [batch, P, d_tower] the tower block's output at each token's patch (what the projector reads).
        cls_attention: [batch, P] the [CLS] query's attention to each patch at that block (softmax over all keys,
            [CLS] included; mean over heads); zero at padding.
        keys: [batch, P, head_dim] each patch's key at that block, averaged over heads.
        project: maps tower states [..., d_tower] to the LLM's input space (the model's projector), for methods
            that merge tower states before projecting them.
    """

    features: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor
    project: object


def cls_attention_and_keys(block: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([images, patches] attention of the [CLS] query (token 0) to each patch token, mean over heads;
    [images, patches, head_dim] the patches' keys, mean over heads) at a CLIP-style encoder ``block`` whose
    input is ``hidden`` [images, 1 + patches, d].

    attention = mean_h softmax_k(q_h,CLS . k_h,k / sqrt(head_dim))[patch columns], with q and k from the block's
    own ``layer_norm1`` and ``self_attn.q_proj`` / ``k_proj`` (biases included): what the block itself computes.
    """
    attn = block.self_attn
    normed = block.layer_norm1(hidden)
    heads, head_dim = attn.num_heads, attn.head_dim
    images, tokens, _ = hidden.shape
    keys = attn.k_proj(normed).view(images, tokens, heads, head_dim).float()
    query = attn.q_proj(normed[:, :1]).view(images, 1, heads, head_dim).float()
    scores = torch.einsum("bqhd,bkhd->bhqk", query, keys)[:, :, 0] * head_dim ** -0.5
    attention = scores.softmax(-1).mean(1)
    return attention[:, 1:], keys[:, 1:].mean(2)


class TowerTap:
    """Keeps the input and output of one vision-tower block from the latest image encoding (hooks registered by
    ``attach``, removed by ``detach``)."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.inputs: torch.Tensor | None = None
        self.outputs: torch.Tensor | None = None
        self._hooks: list = []

    def attach(self) -> None:
        def before(module, args, kwargs):
            self.inputs = args[0] if args else kwargs["hidden_states"]

        def after(module, args, kwargs, output):
            self.outputs = output[0] if isinstance(output, tuple) else output

        self._hooks = [self.block.register_forward_pre_hook(before, with_kwargs=True),
                       self.block.register_forward_hook(after, with_kwargs=True)]

    def detach(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()
        self.inputs = self.outputs = None

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The latest encoding's (input, output) of the block; cleared, so a later prompt cannot read it."""
        if self.inputs is None or self.outputs is None:
            raise RuntimeError("the vision tower did not run for this prompt: pass pixel_values (a method that reads "
                               "the tower cannot run on cached image features)")
        taken = (self.inputs, self.outputs)
        self.inputs = self.outputs = None
        return taken


def per_visual_token(per_patch: torch.Tensor, is_visual: torch.Tensor) -> torch.Tensor:
    """[batch, T, ...] ``per_patch`` [images, patches, ...] laid on the visual positions of ``is_visual`` [batch, T],
    in the order the model fills them (row by row, images in order, patches in order); zero elsewhere. The model
    itself checks that its image features fill its image tokens, and ``Family.tower_block`` is one patch per
    feature, so the counts agree and nothing is read back from the device here."""
    flat = per_patch.reshape(-1, *per_patch.shape[2:])
    out = flat.new_zeros(*is_visual.shape, *flat.shape[1:])
    mask = is_visual.reshape(*is_visual.shape, *([1] * (flat.dim() - 1))).expand_as(out)
    return out.masked_scatter(mask, flat)


def gather_rows(values: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values`` [batch, T, ...] read at ``index`` [batch, n]; zero where ``valid`` [batch, n] is false."""
    shaped = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    rows = values.gather(1, shaped)
    return rows * valid.reshape(*valid.shape, *([1] * (values.dim() - 2))).to(rows.dtype)


def tower_view(block: nn.Module, seq, project, current: torch.Tensor, order: torch.Tensor,
               visual_valid: torch.Tensor) -> TowerView:
    """The ``TowerView`` of a stage's candidates: ``seq`` (``lofi.sequence.Sequence``) holds the tapped block's
    (input, output) and the prompt's visual mask; ``current`` the original positions the stage holds, ``order``
    the candidates' places among them, ``visual_valid`` which candidates are real."""
    inputs, outputs = seq.tower
    attention, keys = cls_attention_and_keys(block, inputs)
    original = current.gather(1, order).clamp_min(0)

    def read(per_patch: torch.Tensor) -> torch.Tensor:
        return gather_rows(per_visual_token(per_patch, seq.is_visual), original, visual_valid)

    return TowerView(read(outputs[:, 1:]), read(attention), read(keys), project)


def cls_attention_flops(config, n_patches: int) -> float:
    """Rebuilding the [CLS] query's attention and every patch's key at one tower layer: the layer norm is the
    tower's own work; keys ``2 (n+1) d d``, the query ``2 d d``, scores ``2 (n+1) d``, softmax ``3 (n+1) h``."""
    vision = config.vision_config
    d, h, n = vision.hidden_size, vision.num_attention_heads, n_patches + 1
    return 2.0 * n * d * d + 2.0 * d * d + 2.0 * n * d + 3.0 * n * h
