"""Deterministic per-sample uniform draws, computed on the model's device without a host sync.

Stochastic methods (``random``, LVPruning's ``selection="sample"``) must draw the same tokens for a sample
whether it runs alone or in any batch, under ``model(**inputs)`` and under ``generate()`` (which passes no
pixel values to the model). Both see the same two things: the sample's token ids and the visual features
written into its input embeddings. ``fingerprints`` hashes them per sample -- positions counted from the
sample's first real token, so padding does not matter -- and ``uniform`` turns (fingerprint, salt,
visual-token index) into a number in (0, 1). All arithmetic is int64 modulo the prime P = 2^31 - 1 with
factors below 2^31, so no product overflows and CPU and GPU agree bit for bit.

Of the features only the signs of the first ``FEATURES_HASHED`` dimensions of each visual token enter:
a vision tower's features differ in their last bits between batch sizes (9e-9 on a tiny CLIP on the
CPU), which would change a hash of their bits, while a sign flips only for a value within that noise of
zero (about 1e-4 of the samples at float32 noise). In bfloat16 on a GPU the noise is far larger, and a
sample's draw can differ between batch sizes there.
"""

from __future__ import annotations

import torch

P = 2**31 - 1
_FACTORS = (1_103_515_245 % P, 747_796_405, 1_664_525, 2_147_483_629 % P)
FEATURES_HASHED = 64  # leading feature dimensions per visual token that enter the fingerprint


def mix(x: torch.Tensor) -> torch.Tensor:
    """A non-linear scramble of int64 values in [0, P): multiplications mod P interleaved with xor-shifts."""
    x = x % P
    for factor in _FACTORS:
        x = x ^ (x >> 13)
        x = (x * factor) % P
        x = x ^ (x >> 16)
    return x


def mix_int(x: int) -> int:
    """``mix`` of one Python int (the same arithmetic, on the host: no device op for a constant)."""
    x %= P
    for factor in _FACTORS:
        x ^= x >> 13
        x = (x * factor) % P
        x ^= x >> 16
    return x


def fingerprints(input_ids: torch.Tensor, inputs_embeds: torch.Tensor, valid: torch.Tensor,
                 is_visual: torch.Tensor) -> torch.Tensor:
    """[batch] int64 in [0, P): a hash of each sample's token ids and visual features."""
    order = (valid.long().cumsum(1) - 1).clamp_min(0)                    # position from the first real token
    text = torch.where(valid & ~is_visual, input_ids.long() + 1, 0)
    signs = (inputs_embeds[..., :FEATURES_HASHED] > 0).long() + 1
    features = torch.where((valid & is_visual)[..., None], signs, 0)
    slot = order[..., None] * FEATURES_HASHED + torch.arange(features.shape[-1], device=features.device)
    # the token and feature positions' mixes in one call: each mix is some twenty elementwise kernels
    keys = mix(torch.cat([(order * 2 + 1).reshape(-1), (slot * 2 + 2).reshape(-1)]))
    token_part = (text % P * keys[:order.numel()].view(order.shape)) % P
    feature_part = (features * keys[order.numel():].view(slot.shape)) % P
    total = token_part.sum(1) % P + feature_part.sum((1, 2)) % P
    return mix(total)


def uniform(fingerprint: torch.Tensor, salt: int, index: torch.Tensor) -> torch.Tensor:
    """[batch, n] float64 in (0, 1): the draw of visual token ``index`` [batch, n] of each sample for ``salt``."""
    seed = mix(fingerprint + mix_int(salt % P + 7))
    value = mix(seed[:, None] + mix(index.long().clamp_min(0) + 11))
    return (value.double() + 0.5) / P
