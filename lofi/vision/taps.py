"""Taps on a vision tower: hooks (and, for LLaVA-NeXT / OneVision, one patched method) that keep what the latest
image encoding left, from which a ``TowerReading`` lays the tower's data on the language model's visual tokens.

A tap lives only while ``lofi.pruned`` is active: ``attach`` registers, ``detach`` removes (the runtime calls it
in ``finally``). The family adapter builds its tap (``Family.tower_tap``), because only it knows the map from
tower patches to visual tokens:

* ``PatchTap`` (LLaVA-1.5, LLaVA-NeXT, OneVision): one patch per visual token. The tapped block is the one whose
  output the projector reads. LLaVA-NeXT and OneVision lay crops out with the model's own
  ``pack_image_features`` (base crop, unpadded high-resolution grid, newline rows, OneVision's bilinear
  downsampling of large grids): the tap records its arguments and replays it on the tower's data, so the map
  is the model's by construction.
* ``MergedPatchTap`` (Qwen2-VL, Qwen2.5-VL): the merger turns each group of 2 x 2 patches into one visual token;
  Qwen2.5-VL's tower runs in window order and restores the image order after the merger, as the tap does.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from functools import partial

import torch
from torch import nn

from lofi.vision.attention import (
    cls_attention_and_keys,
    merged_patch_attention_and_keys,
    received_attention_and_keys,
)
from lofi.vision.view import TowerReading


class TowerTap(ABC):
    """Base: the hooks of one tap, and the rule that each prompt reads exactly one image encoding."""

    def __init__(self, saliency: str, project):
        self.saliency, self.project = saliency, project
        self._hooks: list = []
        self._encodings = 0

    @abstractmethod
    def attach(self) -> None:
        """Register the tap's hooks (and patches)."""

    def detach(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()
        self._clear()

    def _clear(self) -> None:
        self._encodings = 0

    def _one_encoding(self) -> None:
        if self._encodings == 0:
            raise RuntimeError("the vision tower did not run for this prompt: pass pixel_values (a method that reads "
                               "the tower cannot run on cached image features)")
        if self._encodings > 1:
            self._clear()
            raise ValueError("a method that reads the vision tower needs one image encoding per prompt; this prompt "
                             "ran the tower more than once (images with videos, or videos through a separate "
                             "encoder), which such methods do not support")

    @abstractmethod
    def take(self) -> TowerReading:
        """The latest encoding's reading; cleared, so a later prompt cannot read it."""


class PatchTap(TowerTap):
    """A CLIP / SigLIP ``block`` whose output [images, (1 +) patches, d] is what the projector reads.

    ``saliency``: ``"cls"`` (token 0 is [CLS], dropped from the features) or ``"received"`` (no [CLS]).
    ``packer``: the multimodal model whose ``pack_image_features`` lays crops out (LLaVA-NeXT, OneVision), or
    None (one image, patches in order: LLaVA-1.5).
    """

    def __init__(self, block: nn.Module, saliency: str, project, packer: nn.Module | None = None):
        super().__init__(saliency, project)
        self.block, self.packer = block, packer
        self._inputs = self._outputs = self._pack = None
        self._patched, self._previous = False, None

    def attach(self) -> None:
        def before(module, args, kwargs):
            self._encodings += 1
            self._inputs = args[0] if args else kwargs["hidden_states"]

        def after(module, args, kwargs, output):
            self._outputs = output[0] if isinstance(output, tuple) else output

        self._hooks = [self.block.register_forward_pre_hook(before, with_kwargs=True),
                       self.block.register_forward_hook(after, with_kwargs=True)]
        if self.packer is not None:
            self._previous = self.packer.__dict__.get("pack_image_features")  # someone else's patch, if any
            original = self.packer.pack_image_features

            def pack_image_features(image_features, *args, **kwargs):
                self._pack = (original, [len(f) for f in image_features], args, kwargs)
                return original(image_features, *args, **kwargs)

            self.packer.pack_image_features = pack_image_features  # an instance attribute, deleted by detach
            self._patched = True

    def detach(self) -> None:
        if self._patched:
            del self.packer.pack_image_features
            if self._previous is not None:
                self.packer.pack_image_features = self._previous
            self._patched = False
        super().detach()

    def _clear(self) -> None:
        super()._clear()
        self._inputs = self._outputs = self._pack = None

    def take(self) -> TowerReading:
        self._one_encoding()
        if self.packer is not None and self._pack is None:
            self._clear()
            raise ValueError("a method that reads the vision tower found no image layout for this encoding "
                             "(videos are not supported by such methods)")
        inputs, outputs, pack = self._inputs, self._outputs, self._pack
        self._clear()
        return TowerReading(partial(self._per_token, inputs, outputs, pack), self.project, self.saliency)

    def _per_token(self, inputs: torch.Tensor, outputs: torch.Tensor, pack):
        if self.saliency == "cls":
            attention, keys = cls_attention_and_keys(self.block, inputs)
            features = outputs[:, 1:]
        else:
            attention, keys = received_attention_and_keys(self.block, inputs)
            features = outputs
        lay = partial(_replay_pack, pack) if pack is not None else (lambda x: x.reshape(-1, *x.shape[2:]))
        return lay(features), lay(attention[..., None])[:, 0], lay(keys)


def _replay_pack(pack, per_patch: torch.Tensor) -> torch.Tensor:
    """``per_patch`` [crops, patches, c] laid out as the model laid its image features out: its own
    ``pack_image_features`` with the recorded arguments, a zero vector in place of the newline."""
    original, sizes, args, kwargs = pack
    bound = inspect.signature(original).bind(list(per_patch.split(sizes)), *args, **kwargs)
    bound.arguments["image_newline"] = per_patch.new_zeros(per_patch.shape[-1])
    packed = original(*bound.args, **bound.kwargs)[0]
    return torch.cat(list(packed))


class MergedPatchTap(TowerTap):
    """Qwen2-VL / Qwen2.5-VL: ``visual`` (the tower: ``blocks``, ``merger``), its last block read; each visual
    token is a group of ``merge x merge`` consecutive patches (what the merger concatenates). ``windowed``:
    the tower runs in window order (Qwen2.5-VL), undone by ``argsort(window_index)`` as the tower does."""

    def __init__(self, visual: nn.Module, windowed: bool):
        config = visual.config
        self.visual, self.block, self.windowed = visual, visual.blocks[-1], windowed
        self.unit = config.spatial_merge_size ** 2
        merger = visual.merger

        def project(features: torch.Tensor) -> torch.Tensor:
            width = features.shape[-1] // self.unit
            return merger(features.reshape(-1, width)).view(*features.shape[:-1], -1)

        super().__init__("received", project)
        self._grid = self._inputs = self._outputs = self._arguments = None

    def attach(self) -> None:
        def encoding(module, args, kwargs):
            self._encodings += 1
            self._grid = args[1] if len(args) > 1 else kwargs["grid_thw"]

        def before(module, args, kwargs):
            self._inputs = args[0] if args else kwargs["hidden_states"]
            self._arguments = (kwargs["cu_seqlens"], kwargs["position_embeddings"])

        def after(module, args, kwargs, output):
            self._outputs = output[0] if isinstance(output, tuple) else output

        self._hooks = [self.visual.register_forward_pre_hook(encoding, with_kwargs=True),
                       self.block.register_forward_pre_hook(before, with_kwargs=True),
                       self.block.register_forward_hook(after, with_kwargs=True)]

    def _clear(self) -> None:
        super()._clear()
        self._grid = self._inputs = self._outputs = self._arguments = None

    def take(self) -> TowerReading:
        self._one_encoding()
        captured = (self._grid, self._inputs, self._outputs, self._arguments)
        self._clear()
        return TowerReading(partial(self._per_token, *captured), self.project, self.saliency)

    def _per_token(self, grid: torch.Tensor, inputs: torch.Tensor, outputs: torch.Tensor, arguments):
        segments, position_embeddings = arguments
        attention, keys = merged_patch_attention_and_keys(self.block, inputs, segments, position_embeddings)
        unit = self.unit
        features = outputs.reshape(-1, unit * outputs.shape[-1])
        attention, keys = attention.view(-1, unit).mean(1), keys.view(-1, unit, keys.shape[-1]).mean(1)
        if self.windowed:
            from transformers.vision_utils import get_vision_window_index
            config = self.visual.config
            window_index, _ = get_vision_window_index(grid, config.spatial_merge_size, config.window_size,
                                                      config.patch_size)
            order = torch.argsort(window_index.to(features.device))
            features, attention, keys = features[order], attention[order], keys[order]
        return features, attention, keys
