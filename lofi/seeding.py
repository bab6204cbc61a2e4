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


_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def _table(kind: str, length: int, device: torch.device) -> torch.Tensor:
    """The first ``length`` rows of a table of mixed keys for positions 0, 1, ... (``kind``: ``"token"`` [n],
    ``"feature"`` [n, FEATURES_HASHED], ``"index"`` [n]), kept per device and grown when a longer prompt comes.
    Their keys depend on positions only: a prompt reads them where each mix would be some twenty elementwise
    kernels, launches that a batch-1 prefill pays on the host."""
    key = (kind, str(device))
    table = _TABLES.get(key)
    if table is None or table.shape[0] < length:
        n = torch.arange(max(length, 2 * (0 if table is None else table.shape[0]), 64), device=device)
        if kind == "token":
            table = mix(n * 2 + 1)
        elif kind == "feature":
            table = mix((n[:, None] * FEATURES_HASHED + torch.arange(FEATURES_HASHED, device=device)) * 2 + 2)
        else:
            table = mix(n + 11)
        _TABLES[key] = table
    return table[:length]


def fingerprints(input_ids: torch.Tensor, inputs_embeds: torch.Tensor, valid: torch.Tensor,
                 is_visual: torch.Tensor) -> torch.Tensor:
    """[batch] int64 in [0, P): a hash of each sample's token ids and visual features."""
    order = (valid.cumsum(1) - 1).clamp_min(0)                           # position from the first real token
    text = torch.where(valid & ~is_visual, input_ids.long() + 1, 0)
    signs = (inputs_embeds[..., :FEATURES_HASHED] > 0).long() + 1
    features = torch.where((valid & is_visual)[..., None], signs, 0)
    # each position's keys, mix(2 order + 1) and mix(2 (order x FEATURES_HASHED + feature) + 2), from the tables
    length = order.shape[1]
    token_keys = _table("token", length, order.device)[order]
    feature_keys = _table("feature", length, order.device)[order][..., :features.shape[-1]]
    token_part = (text % P * token_keys) % P
    feature_part = (features * feature_keys) % P
    total = token_part.sum(1) % P + feature_part.sum((1, 2)) % P
    return mix(total)


def uniform(fingerprint: torch.Tensor, salt: int, index: torch.Tensor, bound: int | None = None) -> torch.Tensor:
    """[batch, n] float64 in (0, 1): the draw of visual token ``index`` [batch, n] of each sample for ``salt``
    (``bound``: a number no index reaches, known on the host, which lets the index keys come from a table)."""
    seed = mix(fingerprint + mix_int(salt % P + 7))
    index = index.long().clamp_min(0)
    keys = mix(index + 11) if bound is None else _table("index", bound, index.device)[index]
    return (mix(seed[:, None] + keys).double() + 0.5) / P
