"""What a method sees of the vision tower: per prunable visual token of a stage, the tower's state at the patch
(or merged patches) it came from, a saliency and a key, in the stage's candidate order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class TowerReading:
    """What one image encoding left, ready to be laid on the language model's visual tokens.

    Attributes:
        per_token: returns (features [V, d_f], saliency [V], keys [V, d_k]) for the V visual tokens of the call
            in the order the model fills them (images in order; zero rows at LLaVA-NeXT's newline rows); computed
            only when a method asks.
        project: maps ``features`` rows [..., d_f] to the language model's input space (the model's projector).
        saliency: ``"cls"`` or ``"received"`` (``lofi.vision.attention``).
    """

    per_token: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    project: Callable[[torch.Tensor], torch.Tensor]
    saliency: str


@dataclass
class TowerView:
    """Tower data per prunable visual token a stage holds, in the order of ``StageInput.visual``.

    Attributes:
        features: [batch, P, d_f] the tower states the projector reads for each token: the block's output at its
            patch (LLaVA families), or the block's outputs at its 2 x 2 merged patches, concatenated (Qwen).
        attention: [batch, P] the token's saliency in the tower, zero at padding: the [CLS] query's attention to
            its patch (``saliency == "cls"``), or the mean attention its patch(es) receive (``"received"``);
            softmax over all keys, mean over heads.
        keys: [batch, P, d_k] the patch's key at that block, averaged over heads (and over merged patches).
        project: maps ``features`` rows to the language model's input space (the model's projector), for
            methods that merge tower states before projecting them.
        saliency: which saliency ``attention`` holds.
    """

    features: torch.Tensor
    attention: torch.Tensor
    keys: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor]
    saliency: str


def per_visual_token(per_token: torch.Tensor, is_visual: torch.Tensor) -> torch.Tensor:
    """[batch, T, ...] ``per_token`` [V, ...] laid on the visual positions of ``is_visual`` [batch, T], in the
    order the model fills them (row by row); zero elsewhere. The model itself checks that its image features
    fill its image tokens, and a reading holds one row per feature, so nothing is read back from the device."""
    out = per_token.new_zeros(*is_visual.shape, *per_token.shape[1:])
    mask = is_visual.reshape(*is_visual.shape, *([1] * (per_token.dim() - 1))).expand_as(out)
    return out.masked_scatter(mask, per_token)


def gather_rows(values: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values`` [batch, T, ...] read at ``index`` [batch, n]; zero where ``valid`` [batch, n] is false."""
    shaped = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    rows = values.gather(1, shaped)
    return rows * valid.reshape(*valid.shape, *([1] * (values.dim() - 2))).to(rows.dtype)


def tower_view(seq, current: torch.Tensor, order: torch.Tensor, visual_valid: torch.Tensor) -> TowerView:
    """The ``TowerView`` of a stage's candidates: ``seq`` (``lofi.sequence.Sequence``) holds the prompt's
    ``TowerReading`` and visual mask; ``current`` the original positions the stage holds, ``order`` the
    candidates' places among them, ``visual_valid`` which candidates are real."""
    reading: TowerReading = seq.tower
    original = current.gather(1, order).clamp_min(0)

    def read(per_token: torch.Tensor) -> torch.Tensor:
        return gather_rows(per_visual_token(per_token, seq.is_visual), original, visual_valid)

    features, saliency, keys = reading.per_token()
    return TowerView(read(features), read(saliency), read(keys), reading.project, reading.saliency)
