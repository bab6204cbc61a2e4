"""Which samples have their spectra decomposed when only a share of them does (docs/definitions.md#spectral).

A sample is in the subset when u < share, u in [0, 1) read from the first 8 bytes of
sha256("<seed>:<sample id>"). Membership depends on the seed and the sample's id alone -- not on the batch
it falls in, its position, or which other samples a run holds -- so every condition of a run, a resumed
run and a run on other hardware decompose the same samples. Each sample is in with probability ``share``
independently: N samples give share * N of them on average, within a few sqrt(share (1 - share) N).
"""

from __future__ import annotations

import hashlib
from typing import Iterable


def check_share(share: float) -> float:
    """``share`` itself, or a ValueError naming the valid range."""
    if not 0 < share <= 1:
        raise ValueError(f"the share of samples with spectra must be in (0, 1] (1: every sample), got {share}")
    return share


def in_subset(sample_id, share: float, seed: int) -> bool:
    """Whether the sample ``sample_id`` (its id as a string) is in the seeded subset of ``share``."""
    if share >= 1:
        return True
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2 ** 64


def subset_rows(sample_ids: Iterable, share: float, seed: int) -> list[int]:
    """The positions in ``sample_ids`` of the samples in the subset, in order."""
    return [row for row, sample_id in enumerate(sample_ids) if in_subset(sample_id, share, seed)]
