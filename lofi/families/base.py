"""What the runtime asks of a model family, with the answers most families share.

A family adapter is the one place that knows, for one kind of Hugging Face VLM:

* where its multimodal model (the module that receives ``input_ids``), its language model and the
  decoder layers are;
* which token positions are visual (image and video token ids) and which of those may be pruned;
* its position scheme: 1-D RoPE, or M-RoPE (Qwen2-VL: 3 rows of position ids, or 4 with the text row
  first), and how decoding continues the prompt's numbering;
* how to rebuild layer K-1's queries and keys for FastV (per-head q/k norms, the rotary function);
* the FLOPs of its vision tower and projector for one image, and where each visual token lies on the
  image (``tiles``, for kept-token maps);
* which tower block the projector reads and how its patches map to visual tokens (``tower_tap``, for the
  methods that read the vision tower: ``lofi.vision``).

The runtime (``lofi.runtime`` and the modules beside it) keeps only what every family shares: reading a
call (``lofi.calls``), index bookkeeping, stages, masks, KV cache.
Families are chosen by ``config.model_type`` (``lofi.families.family_for``).
"""

from __future__ import annotations

import inspect
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lofi.vision import PatchTap, TowerTap, cls_attention_flops, received_attention_flops


@dataclass(frozen=True)
class Tile:
    """A rectangle of visual tokens laid over the image, row by row.

    Attributes:
        start: index of its first token among the sample's visual tokens (0-based).
        rows, cols: the token grid.
        newline: each row is followed by one newline token (never pruned): a row spans cols + 1 tokens.
        box: (left, top, right, bottom) of the image it covers, as fractions of the width and height.
        name: what the tile is ("image", "base", "high-res", ...).
    """

    start: int
    rows: int
    cols: int
    newline: bool = False
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    name: str = "image"

    @property
    def tokens(self) -> int:
        return self.rows * (self.cols + self.newline)

    def cell(self, index: int) -> tuple[int, int] | None:
        """(row, col) of visual token ``index`` in this tile; None outside it or on a newline."""
        local = index - self.start
        width = self.cols + self.newline
        if not 0 <= local < self.tokens or local % width == self.cols:
            return None
        return local // width, local % width


class Family(ABC):
    """Defaults: a LLaVA-style model (``model.model`` holds ``language_model`` and ``layers``), 1-D RoPE,
    every visual token prunable, attention rebuilt as Llama / Mistral / Qwen2 / Qwen3 compute it."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    classes: ClassVar[tuple[str, ...]] = ()
    multimodal_rope: ClassVar[bool] = False
    # The multimodal model's arguments that carry images or videos (``generate`` encodes them first and hands
    # the features over as ``mm_encoder_outputs``); see ``call_visual_mask``.
    visual_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self._ids: list[int] | None = None

    # ----------------------------------------------------------------------------------- modules
    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives ``input_ids`` and the image inputs."""
        return self.model.model

    def language_model(self) -> nn.Module:
        return self.multimodal_model().language_model

    def layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def vision_tower(self) -> nn.Module:
        """The vision encoder."""
        return self.multimodal_model().vision_tower

    def vision_layers(self) -> nn.ModuleList:
        """The vision encoder's repeated blocks: its longest ``ModuleList`` (CLIP, SigLIP, Qwen2-VL's ViT)."""
        return max((m for m in self.vision_tower().modules() if isinstance(m, nn.ModuleList)), key=len)

    # ------------------------------------------------------------------------------------ tokens
    def visual_token_ids(self) -> list[int]:
        """Token ids that stand for visual features: the image token, and the video token if any."""
        ids = []
        for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
            value = getattr(self.config, name, None)
            if value is not None and int(value) not in ids:
                ids.append(int(value))
        if not ids:
            raise TypeError(f"{type(self.config).__name__} names no image token (image_token_id / image_token_index)")
        return ids

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, T] bool: positions holding visual features."""
        if self._ids is None:
            self._ids = self.visual_token_ids()
        # a comparison with each id (one or two): no id tensor to copy to the device for every new adapter
        mask = input_ids == self._ids[0]
        for token_id in self._ids[1:]:
            mask = mask | (input_ids == token_id)
        return mask

    def call_arguments(self, args: tuple, kwargs: dict) -> dict:
        """A multimodal model call's arguments by name (the model classes pass keywords; a user may not)."""
        if not args:
            return kwargs
        return {**inspect.signature(self.multimodal_model().forward).bind_partial(*args).arguments, **kwargs}

    def brings_visual(self, arguments: dict) -> bool:
        """Whether a multimodal model call (its ``call_arguments``) carries images or videos
        (``visual_inputs``; ``mm_encoder_outputs`` is a dict of modalities, empty for text)."""
        for name in self.visual_inputs:
            value = arguments.get(name)
            if value is not None and not (isinstance(value, dict) and all(v is None for v in value.values())):
                return True
        return False

    def call_visual_mask(self, input_ids: torch.Tensor | None, brings_visual: bool, past: int) -> torch.Tensor | None:
        """``visual_mask`` of a call's ids, or None where there is nothing to read: no ids, or a call after a
        cached prefix (``past`` > 0) that brings no image (``brings_visual``): a generated image token id fed
        back is a word, as the model embeds it."""
        if input_ids is None or (past and not brings_visual):
            return None
        return self.visual_mask(input_ids)

    def prunable_mask(self, is_visual: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """[batch, T] bool: the visual positions a method may drop (all of them by default)."""
        return is_visual

    # ------------------------------------------------------------------------------ vision stage
    def tower_tap(self) -> TowerTap:
        """The tap that lays the vision tower's states and attention on the language model's visual tokens
        (``lofi.vision``), for methods that read the tower; a family without one refuses with one line."""
        raise ValueError(f"{type(self.model).__name__} ({self.name}) has no map from its vision tower to the language "
                         "model's visual tokens, which scope, visionzip and vispruner read; use a method that "
                         "chooses from the language model's inputs (divprune, cdpruner, fastv, lofi, random)")

    @classmethod
    def tower_view_flops(cls, config, image=None) -> float:
        """FLOPs of rebuilding the tapped block's attention for one image (``lofi.vision.attention``)."""
        return 0.0

    @classmethod
    def tower_widths(cls, config) -> tuple[int, int]:
        """(width of a ``TowerView``'s features, width of its keys): the tower's width and head size."""
        vision = config.vision_config
        return vision.hidden_size, vision.hidden_size // vision.num_attention_heads

    def project(self, tower_states: torch.Tensor) -> torch.Tensor:
        """The model's projector applied to vision-tower states [..., d_tower] (what its tap's block outputs)."""
        return self.multimodal_model().multi_modal_projector(tower_states)

    # -------------------------------------------------------------------------------- positions
    def text_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[batch or 1, T]: the 1-D position of each token (the text row for M-RoPE)."""
        return position_ids

    def decode_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """The language model's ``position_ids`` for decoding tokens at 1-D ``positions`` [batch, n]."""
        return positions

    # -------------------------------------------------------------------------------- attention
    def attention_input(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What decoder layer ``layer``'s attention projects: its input ``hidden`` after the pre-attention norm."""
        return layer.input_layernorm(hidden)

    def attention_heads(self, attention: nn.Module, projected: torch.Tensor, which: str) -> torch.Tensor:
        """[batch, heads, T, head_dim] queries (``which="q"``) or keys from ``q_proj`` / ``k_proj`` outputs,
        after the per-head norm some models apply before RoPE (Qwen3's ``q_norm`` / ``k_norm``)."""
        batch, length = projected.shape[:2]
        heads = projected.view(batch, length, -1, attention.head_dim)
        norm = getattr(attention, f"{which}_norm", None)
        if norm is not None:
            heads = norm(heads)
        return heads.transpose(1, 2)

    def rotate(self, attention: nn.Module, queries: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on queries and keys at the same positions, as the attention module's own modeling file applies it
        (cos/sin as the layer receives them)."""
        module = sys.modules[type(attention).__module__]
        apply = getattr(module, "apply_rotary_pos_emb", None)
        if apply is None:
            raise TypeError(f"{type(attention).__name__} has no apply_rotary_pos_emb in its module; attention-"
                            "ranked methods (fastv) cannot rebuild its attention")
        return apply(queries, keys, cos, sin)

    # ------------------------------------------------------------------------ FLOPs and layout
    @classmethod
    def image_of(cls, inputs, row: int):
        """The image description of sample ``row`` of a processor's batch (for FLOPs and tiles; one image per
        sample), or None where the family has one fixed image size."""
        return None

    @classmethod
    def default_image(cls, config):
        """The image description ``vision_flops`` and ``tiles`` assume when none is given."""
        return None

    @classmethod
    @abstractmethod
    def vision_flops(cls, config, image=None) -> float:
        """FLOPs of the vision tower for one image (a multiply-add counts 2)."""

    @classmethod
    @abstractmethod
    def projector_flops(cls, config, image=None) -> float:
        """FLOPs of the projector (or merger) that turns vision features into language-model tokens."""

    @classmethod
    @abstractmethod
    def tiles(cls, config, image=None) -> list[Tile]:
        """Where the visual tokens of one image lie on it, in token order."""


def clip_vit_flops(vision_config, tiles: int = 1, cls_token: bool = True, mlp_matrices: int = 2) -> float:
    """A ViT over ``tiles`` square crops: patch embedding and every encoder layer (tokens = patches, plus a
    CLS token if the tower has one); per layer 2 x (4 n d^2 + 2 n^2 d + mlp_matrices n d m)."""
    d, m = vision_config.hidden_size, vision_config.intermediate_size
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    n = patches + cls_token
    embed = 2.0 * patches * (getattr(vision_config, "num_channels", 3) * vision_config.patch_size ** 2) * d
    layer = 2.0 * (4 * n * d * d + 2 * n * n * d + mlp_matrices * n * d * m)
    return tiles * (embed + vision_config.num_hidden_layers * layer)


def mlp_projector_flops(config, features: int) -> float:
    """LLaVA's projector (Linear, activation, Linear) over ``features`` vision features."""
    d = config.text_config.hidden_size
    width = config.vision_config.hidden_size
    layer_index = getattr(config, "vision_feature_layer", -1)
    if isinstance(layer_index, (list, tuple)):
        width *= len(layer_index)
    return 2.0 * features * (width * d + d * d)


def tower_has_cls(vision_config) -> bool:
    """Whether a LLaVA-style tower puts a [CLS] token first (CLIP does; SigLIP has none)."""
    return "clip" in getattr(vision_config, "model_type", "clip")


def patch_saliency(config) -> str:
    """The saliency a LLaVA-style model's tower gives its visual tokens: ``"cls"`` where the tower has a [CLS]
    token that the "default" feature strategy drops; ``"received"`` where it has none and every patch is a
    feature ("full"); anything else (a [CLS] state handed to the language model, several feature layers) has
    no one-patch-per-token map and is refused in one line."""
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    cls_token = tower_has_cls(config.vision_config)
    if isinstance(config.vision_feature_layer, (list, tuple)) or (strategy == "default") != cls_token:
        raise ValueError(f"{type(config).__name__} with vision_feature_select_strategy={strategy!r} and "
                         f"vision_feature_layer={config.vision_feature_layer!r} has no one-patch-per-token map from "
                         "its vision tower, which scope, visionzip and vispruner read; use divprune or cdpruner")
    return "cls" if cls_token else "received"


def projector_block(family: Family) -> nn.Module:
    """The tower block whose output is ``hidden_states[vision_feature_layer]`` (block i - 1 makes hidden state i)."""
    layer = family.config.vision_feature_layer
    blocks = family.vision_layers()
    index = layer - 1 if layer > 0 else len(blocks) + layer
    if not 0 <= index < len(blocks):
        raise ValueError(f"vision_feature_layer {layer} names no block of the {len(blocks)}-block tower")
    return blocks[index]


def patch_tap(family: Family, packer: nn.Module | None = None) -> PatchTap:
    """A LLaVA-style family's tap: the projector's block, its saliency, the model's projector."""
    return PatchTap(projector_block(family), patch_saliency(family.config), family.project, packer)


def patch_view_flops(config, crops: int = 1) -> float:
    """``crops`` crops' attention rebuilt at a LLaVA-style tower's projector block (``lofi.vision.attention``)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    d, h = vision.hidden_size, vision.num_attention_heads
    per_crop = cls_attention_flops(d, h, patches + 1) if tower_has_cls(vision) else \
        received_attention_flops(d, h, patches)
    return crops * per_crop
