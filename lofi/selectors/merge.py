"""VisionZip's selection: dominant tokens by [CLS] attention, the rest merged into evenly spaced contextual tokens
by key similarity, batched.

Follows dvlab-research/VisionZip at 3151f6df4fca36a4cd1c985e5956e725b1f9ad02, ``visionzip/clip_encoder.py``
(``CLIPVisionTower_VisionZip.forward``) and ``visionzip/utils.py`` (``metric``: the layer's keys averaged
over heads).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from lofi.selectors._batch import batch_sizes, kept_from_mask, masked_rows, unit_rows


class VisionZipSelection(NamedTuple):
    """What VisionZip keeps and what it merges.

    Attributes:
        kept: [B, max(n_keep)] long: the dominant tokens, increasing, -1 padded.
        contextual: [B, max(n_contextual)] long: each merged slot's target token (slot order = increasing
            index), -1 for a slot a sample does not use.
        merged: [B, max(n_contextual), d] in the features' dtype: each slot's state (zeros in unused slots).
        assignment: [B, P] long: the slot a token was merged into (its target included), -1 for dominant and
            padding tokens.
    """

    kept: torch.Tensor
    contextual: torch.Tensor
    merged: torch.Tensor
    assignment: torch.Tensor


def visionzip_select(features: torch.Tensor, valid: torch.Tensor, n_keep: int | Sequence[int] | torch.Tensor,
                     cls_attention: torch.Tensor, keys: torch.Tensor,
                     n_contextual: int | Sequence[int] | torch.Tensor) -> VisionZipSelection:
    """VisionZip: ``n_keep`` dominant tokens plus ``n_contextual`` merged ones.

    Dominant: the ``n_keep[b]`` valid tokens of largest ``cls_attention`` [B, P] ([CLS] -> patch attention of
    tower layer -2 summed over heads; ties to the lowest index). The reference also keeps [CLS] itself
    (``dominant = n_keep + 1``): [CLS] is not a patch, a caller that wants it adds it.
    Contextual: the R remaining tokens in index order, ranked ``0..R-1``; with ``step = max(1, R // C)``
    (``C = n_contextual[b]``) the targets are ranks ``0, step, ..., (C-1) step``, slot ``s`` holding rank
    ``s step``. Every other remaining token ``i`` joins slot ``argmax_s cos(k_i, k_target(s))`` of the ``keys``
    [B, P, dk] (layer -2 keys averaged over heads; ties to the lowest slot), and
    ``merged_s = x_target(s) + mean_{i in slot s, i not target} x_i`` (``+ 0`` for an empty slot) over the
    ``features`` [B, P, d] (the reference: tower layer -2 hidden states, merged before the projector).
    Returns a ``VisionZipSelection``.
    """
    n_keep, counts = batch_sizes(valid, n_keep)
    batch, p = valid.shape
    n_ctx = torch.as_tensor(n_contextual, dtype=torch.long).cpu().reshape(-1)
    if n_ctx.numel() == 1 and batch != 1:
        n_ctx = n_ctx.expand(batch).clone()
    remaining = counts - n_keep
    if n_ctx.numel() != batch or bool(((n_ctx < 0) | (n_ctx > remaining)).any()):
        raise ValueError(f"n_contextual must give one count per sample in 0..valid - n_keep = {remaining.tolist()}, "
                         f"got {n_ctx.tolist()}")
    x = masked_rows(features, valid)
    device = x.device
    score = masked_rows(cls_attention, valid, "cls_attention").masked_fill(~valid, float("-inf"))
    order = score.sort(dim=1, descending=True, stable=True).indices
    positions = torch.arange(p, device=device)
    rank = torch.empty_like(order).scatter_(1, order, positions.expand(batch, p))
    dominant = rank < n_keep.to(device)[:, None]
    rest = valid & ~dominant
    pos = rest.long().cumsum(1) - 1
    step = torch.where(n_ctx > 0, (remaining // n_ctx.clamp_min(1)).clamp_min(1), 1).to(device)[:, None]
    slot = pos // step
    target = rest & (pos % step == 0) & (slot < n_ctx.to(device)[:, None])
    slots = int(n_ctx.max())
    contextual = kept_from_mask(target, slots)
    assignment = torch.full((batch, p), -1, dtype=torch.long, device=device)
    kept = kept_from_mask(dominant, int(n_keep.max()))
    if slots == 0:
        return VisionZipSelection(kept, contextual, features.new_zeros(batch, 0, features.shape[2]), assignment)
    unit = unit_rows(keys, valid, "keys")
    anchor = contextual.clamp_min(0)
    target_keys = unit.gather(1, anchor[:, :, None].expand(-1, -1, unit.shape[2]))
    slot_used = torch.arange(slots, device=device)[None, :] < n_ctx.to(device)[:, None]
    choice = (unit @ target_keys.transpose(1, 2)).masked_fill(~slot_used[:, None, :], float("-inf")).argmax(2)
    merging = rest & ~target
    assignment = torch.where(target, slot, torch.where(merging, choice, assignment))
    members = ((choice[:, :, None] == torch.arange(slots, device=device)) & merging[:, :, None]).float()
    sums = members.transpose(1, 2) @ x
    sizes = members.sum(1).clamp_min(1)[:, :, None]
    anchors = x.gather(1, anchor[:, :, None].expand(-1, -1, x.shape[2]))
    merged = torch.where(slot_used[:, :, None], anchors + sums / sizes, 0.0)
    return VisionZipSelection(kept, contextual, merged.to(features.dtype), assignment)
