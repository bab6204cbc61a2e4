"""CDPruner's selection: a conditional determinantal point process (DPP) over the visual tokens, MAP by greedy
fast inference, batched.

Follows Theia-4869/CDPruner at 9541616c40fcd5625de1cdb8ea6c33c129eb7864, ``llava/model/llava_arch.py``
``encode_images`` (the relevance, the kernel and the greedy loop).
"""

from __future__ import annotations

from typing import Sequence

import torch

from lofi.selectors._batch import batch_sizes, cosine, kept_from_picks, row_of, step_active, unit_rows
from lofi.threads import single_threaded

RELEVANCE_EPS = 1e-6  # the reference's additive constant in the min-max normalisation of the relevance


def instruction_relevance(relevance_embeds: torch.Tensor, valid: torch.Tensor, instruction_embeds: torch.Tensor,
                          instruction_valid: torch.Tensor, negate: bool = True) -> torch.Tensor:
    """Per-token relevance to the instruction, min-max normalised over each sample's valid tokens, [B, P] float32.

    ``q_i = s * mean_{t valid} cos(e_i, u_t)`` with ``s = -1`` if ``negate`` else ``+1``, then
    ``r_i = (q_i - min_j q_j + 1e-6) / (max_j q_j - min_j q_j)`` (min, max over the sample's valid tokens);
    a sample whose ``q`` is constant (including one without instruction rows) gets ``r = 1`` everywhere.
    Padding tokens get 0.
    """
    if instruction_embeds.shape[:2] != instruction_valid.shape:
        raise ValueError(f"instruction_embeds {tuple(instruction_embeds.shape)} and instruction_valid "
                         f"{tuple(instruction_valid.shape)} disagree on [B, T]")
    e = unit_rows(relevance_embeds, valid, "relevance_embeds")
    u = unit_rows(instruction_embeds, instruction_valid, "instruction_embeds")
    rows = instruction_valid.sum(1, keepdim=True).clamp_min(1).float()
    q = (e @ u.transpose(1, 2)).sum(2) / rows
    if negate:
        q = -q
    low = q.masked_fill(~valid, float("inf")).amin(1, keepdim=True)
    high = q.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
    span = high - low
    flat = span == 0
    r = (q - low + RELEVANCE_EPS) / torch.where(flat, 1.0, span)
    r = torch.where(flat, 1.0, r)
    return torch.where(valid, r, 0.0)


def conditional_kernel(features: torch.Tensor, valid: torch.Tensor, relevance: torch.Tensor,
                       theta: float | None = None) -> torch.Tensor:
    """``L_ij = g(r_i) S_ij g(r_j)``, [B, P, P] float32, with ``S`` the cosine similarity of ``features``.

    ``g(r) = r`` when ``theta`` is None, else ``g(r) = exp(alpha r)`` with ``alpha = theta / (2 (1 - theta))``.
    Rows and columns of padding tokens are 0.
    """
    if theta is not None:
        if not 0.0 < theta < 1.0:
            raise ValueError(f"theta must lie in (0, 1) (or be None for the linear relevance), got {theta}")
        relevance = torch.where(valid, torch.exp(theta / (2.0 * (1.0 - theta)) * relevance), 0.0)
    return relevance[:, :, None] * cosine(features, valid) * relevance[:, None, :]


def dpp_map(kernel: torch.Tensor, valid: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """Greedy MAP of a DPP with kernel ``L`` [B, P, P] (Chen, Zhang & Zhou 2018, fast greedy inference).

    Keeps ``c_j`` (the Cholesky rows of the picks, [B, K, P]) and the residuals ``d2_j`` (init ``L_jj``).
    Step t: ``j = argmax d2`` over unpicked valid tokens (ties: lowest index);
    ``e = (L_j - sum_{s<t} c_s[j] c_s) / sqrt(d2_j)``; ``c_t = e``; ``d2 <- d2 - e^2``.
    When ``d2_j <= 0`` (the kernel's rank is spent) the pick stands and nothing is updated (the reference divides
    by ``sqrt(d2_j)`` and propagates NaN). Runs ``max(n_keep)`` steps; sample b uses its first ``n_keep[b]``.
    """
    batch, p = valid.shape
    steps = int(n_keep.max())
    device = kernel.device
    active = step_active(n_keep, steps, device)
    residual = torch.diagonal(kernel, dim1=1, dim2=2).masked_fill(~valid, float("-inf"))
    chol = kernel.new_zeros(batch, steps, p)
    picks = torch.zeros(batch, steps, dtype=torch.long, device=device)
    with single_threaded(device):
        for t in range(steps):
            j = residual.argmax(1)
            picks[:, t] = j
            d2 = residual.gather(1, j[:, None])
            update = active[:, t:t + 1] & (d2 > 0)
            coeff = chol[:, :t, :].gather(2, j[:, None, None].expand(-1, t, 1))
            e = row_of(kernel, j) - (coeff.transpose(1, 2) @ chol[:, :t, :]).squeeze(1)
            e = torch.where(update, e / d2.clamp_min(torch.finfo(torch.float32).tiny).sqrt(), 0.0)
            chol[:, t, :] = e
            residual = residual - e * e
            residual = residual.scatter(1, j[:, None], torch.where(active[:, t:t + 1], float("-inf"), d2))
    return kept_from_picks(picks, active)


def cdpruner_select(features: torch.Tensor, valid: torch.Tensor, n_keep: int | Sequence[int] | torch.Tensor,
                    relevance_embeds: torch.Tensor | None, instruction_embeds: torch.Tensor | None,
                    instruction_valid: torch.Tensor | None, *, theta: float | None = None,
                    negate_relevance: bool = True) -> torch.Tensor:
    """CDPruner: the ``n_keep`` visual tokens of the greedy MAP of the conditional DPP ``L = diag(g(r)) S diag(g(r))``.

    ``S_ij = cos(x_i, x_j)`` of ``features`` [B, P, d] (the reference: LLaVA's projector outputs);
    ``r`` = ``instruction_relevance(relevance_embeds, ..., negate=negate_relevance)`` from ``relevance_embeds``
    [B, P, c] (the visual tokens in the instruction's embedding space; the reference: CLIP patch states of layer
    -2 through ``post_layernorm`` and ``visual_projection``) and ``instruction_embeds`` [B, T, c] with
    ``instruction_valid`` [B, T] (the reference: CLIP text-tower ``text_embeds``, one per 77-token segment).
    ``negate_relevance=True`` is the reference code's ``(-relevance)``, which its authors keep for CLIP on purpose
    (CDPruner issues #9, #14, #22); ``theta`` None is the reference's linear ``g(r) = r``, a float in (0, 1) the
    exponential ``g(r) = exp(theta / (2 (1 - theta)) r)`` the reference leaves commented out.
    ``relevance_embeds``, ``instruction_embeds`` and ``instruction_valid`` all None: no relevance, ``r = 1`` (the
    DPP on the similarity kernel ``L = S`` alone, with ``S_jj = 1`` exactly, so the first pick is the lowest index;
    ``theta`` and ``negate_relevance`` then change nothing).
    Greedy MAP: ``dpp_map``. Returns ``kept`` [B, max(n_keep)] (sorted, -1 padded).
    """
    n_keep, _ = batch_sizes(valid, n_keep)
    given = [x is not None for x in (relevance_embeds, instruction_embeds, instruction_valid)]
    if any(given) and not all(given):
        raise ValueError("relevance_embeds, instruction_embeds and instruction_valid go together: give all three "
                         "(instruction relevance) or none (the similarity kernel alone)")
    if not any(given):
        # Every L_jj = cos(x_j, x_j) = 1, so the first pick is a tie: the lowest index, not the rounding of |u_j|^2.
        similarity = cosine(features, valid)
        diagonal = torch.diagonal(similarity, dim1=1, dim2=2)
        diagonal.copy_(torch.where(diagonal > 0, 1.0, 0.0))
        return dpp_map(similarity, valid, n_keep)
    relevance = instruction_relevance(relevance_embeds, valid, instruction_embeds, instruction_valid,
                                      negate_relevance)
    kernel = conditional_kernel(features, valid, relevance, theta)
    return dpp_map(kernel, valid, n_keep)
