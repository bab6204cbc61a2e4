"""Shared plumbing of the selection kernels: input checks, masking of padding, and the ``kept`` layout.

Every kernel takes a padded batch (``features`` [B, P, d], ``valid`` [B, P] bool, ``n_keep`` [B] on the host)
and returns ``kept`` [B, max(n_keep)]: each row's kept token indices in increasing order, -1 after the last.
Padding rows may hold anything (NaN included): they are replaced by zeros before any arithmetic.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def batch_sizes(valid: torch.Tensor, n_keep: int | Sequence[int] | torch.Tensor,
                name: str = "n_keep") -> tuple[torch.Tensor, torch.Tensor]:
    """(n_keep, counts) as CPU long tensors [B], checked: 1 <= n_keep[b] <= counts[b] = valid[b].sum().

    One device read (the valid counts), made before any selection loop starts.
    """
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a [B, P] bool tensor, got {tuple(valid.shape)} {valid.dtype}")
    batch = valid.shape[0]
    keep = torch.as_tensor(n_keep, dtype=torch.long).cpu().reshape(-1)
    if keep.numel() == 1 and batch != 1:
        keep = keep.expand(batch).clone()
    if keep.numel() != batch:
        raise ValueError(f"{name} has {keep.numel()} entries for a batch of {batch}: give one per sample")
    counts = valid.sum(1).cpu()
    bad = (keep < 1) | (keep > counts)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{b}] = {int(keep[b])} is outside 1..{int(counts[b])} (the sample's valid tokens)")
    return keep, counts


def masked_rows(x: torch.Tensor, valid: torch.Tensor, name: str = "features") -> torch.Tensor:
    """``x`` [B, P, ...] in float32 with the rows of padding tokens set to 0 (garbage never propagates)."""
    if valid.dtype != torch.bool:
        raise ValueError(f"the mask of {name} must be a bool tensor, got {valid.dtype}")
    if x.shape[:2] != valid.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; its first two dims must be valid's {tuple(valid.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    mask = valid.reshape(*valid.shape, *([1] * (x.dim() - 2)))
    return torch.where(mask, x.float(), 0.0)


def unit_rows(x: torch.Tensor, valid: torch.Tensor, name: str = "features") -> torch.Tensor:
    """Rows of ``x`` [B, P, d] scaled to unit L2 norm (float32); padding rows are 0."""
    return F.normalize(masked_rows(x, valid, name), dim=-1)


def cosine(x: torch.Tensor, valid: torch.Tensor, name: str = "features") -> torch.Tensor:
    """Cosine similarity of every pair of tokens, [B, P, P] float32: S_ij = x_i.x_j / (|x_i| |x_j|); 0 on padding."""
    u = unit_rows(x, valid, name)
    return u @ u.transpose(1, 2)


def kept_from_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] long: the indices where ``mask`` [B, P] is True, increasing, then -1."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    sentinel = mask.shape[1]
    ordered = torch.where(mask, positions, sentinel).sort(dim=1).values[:, :width]
    return ordered.masked_fill(ordered == sentinel, -1)


def kept_from_picks(picks: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``picks`` [B, K] in selection order with ``active`` [B, K] marking real picks -> sorted ``kept`` [B, K]."""
    sentinel = torch.iinfo(torch.long).max
    ordered = torch.where(active, picks, sentinel).sort(dim=1).values
    return ordered.masked_fill(ordered == sentinel, -1)


def step_active(n_keep: torch.Tensor, steps: int, device: torch.device) -> torch.Tensor:
    """[B, steps] bool: greedy step t is a real pick of sample b (t < n_keep[b])."""
    return torch.arange(steps, device=device)[None, :] < n_keep.to(device)[:, None]


def row_of(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``matrix[b, index[b], :]`` for every b: [B, P, Q] x [B] -> [B, Q]."""
    return matrix.gather(1, index[:, None, None].expand(-1, 1, matrix.shape[2])).squeeze(1)
