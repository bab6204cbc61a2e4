"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, merged patches, M-RoPE.

An image is cut into 14-pixel patches (``image_grid_thw`` = (frames, rows, cols) of patches, frames = 1
for an image); the vision tower runs over all of them and its merger turns each 2 x 2 block into one
language-model token, written at ``<|image_pad|>`` (``image_token_id``; videos at ``video_token_id``).
Every visual token is prunable.

Positions are M-RoPE: the model passes the language model 3 rows of position ids (temporal, height,
width), or 4 with a 1-D text row first (``generate``). Kept tokens keep their original rotary tables;
decoding continues from the last prompt token's M-RoPE position (all rows equal on text), which is
what ``rope_deltas`` encodes -- so a pruned cache never shifts the numbering.

Vision FLOPs: Qwen2-VL attends over each frame's patches in every block (LayerNorm, 2-matrix MLP);
Qwen2.5-VL attends within windows of ``window_size`` pixels except at ``fullatt_block_indexes``
(RMSNorm, gated 3-matrix MLP). ``image`` is the image's (frames, rows, cols) grid of patches, as a row of
``image_grid_thw``; by default a 336 x 336 image, (1, 24, 24).
"""

from __future__ import annotations

import torch

from lofi.families.base import Family, Tile
from lofi.vision import MergedPatchTap, received_attention_flops


class Qwen2VL(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    classes = ("Qwen2VLForConditionalGeneration",)
    multimodal_rope = True

    def vision_tower(self):
        return self.multimodal_model().visual

    def tower_tap(self) -> MergedPatchTap:
        """The tower's last block (what the merger reads), each visual token a 2 x 2 group of its patches."""
        return MergedPatchTap(self.vision_tower(), windowed=False)

    @classmethod
    def tower_view_flops(cls, config, image=None) -> float:
        """The last block's attention rebuilt over each frame's patches (``lofi.vision.attention``)."""
        vision = config.vision_config
        frames, rows, cols = image or cls.default_image(config)
        return frames * received_attention_flops(cls._width(vision), vision.num_heads, rows * cols)

    @classmethod
    def tower_widths(cls, config) -> tuple[int, int]:
        """A merge group's patch states side by side; keys of one head's width."""
        vision = config.vision_config
        width = cls._width(vision)
        return width * cls.merge(config) ** 2, width // vision.num_heads

    def text_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        # the last row is an M-RoPE row in both the 3- and the 4-row layout; on text tokens all rows agree
        return position_ids[-1] if position_ids.ndim == 3 else position_ids

    def decode_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[None].expand(3, *positions.shape)

    # ------------------------------------------------------------------------------- geometry
    @classmethod
    def image_of(cls, inputs, row: int):
        return tuple(int(v) for v in inputs["image_grid_thw"][row].tolist())

    @classmethod
    def default_image(cls, config):
        return (1, 24, 24)

    @classmethod
    def merge(cls, config) -> int:
        return config.vision_config.spatial_merge_size

    @classmethod
    def tiles(cls, config, image=None) -> list[Tile]:
        frames, rows, cols = image or cls.default_image(config)
        merge = cls.merge(config)
        per_frame = (rows // merge) * (cols // merge)
        return [Tile(t * per_frame, rows // merge, cols // merge, name=f"frame {t}" if frames > 1 else "image")
                for t in range(frames)]

    # ---------------------------------------------------------------------------------- FLOPs
    @classmethod
    def _width(cls, vision) -> int:
        return vision.embed_dim

    @classmethod
    def _mlp(cls, vision, n: int) -> float:
        d = vision.embed_dim
        return 2.0 * 2 * n * d * (d * vision.mlp_ratio)

    @classmethod
    def _windowed_pairs(cls, config, image) -> int | None:
        """Sum over attention windows of (patches)^2 in a windowed block; None: every block attends fully."""
        return None

    @classmethod
    def _full_attention_blocks(cls, config) -> set[int]:
        return set(range(config.vision_config.depth))

    @classmethod
    def vision_flops(cls, config, image=None) -> float:
        """Patch embedding, then per block: qkv and output projections (4 n d^2), attention (scores and
        weighted values, 2 x pairs x d, pairs = sum of squared segment lengths) and the MLP."""
        vision = config.vision_config
        frames, rows, cols = image = tuple(image or cls.default_image(config))
        n, d = frames * rows * cols, cls._width(vision)
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        full_pairs, windowed_pairs = frames * (rows * cols) ** 2, cls._windowed_pairs(config, image)
        total = 2.0 * n * patch * d
        for block in range(vision.depth):
            pairs = full_pairs if block in cls._full_attention_blocks(config) else windowed_pairs
            total += 2.0 * 4 * n * d * d + 2.0 * 2 * pairs * d + cls._mlp(vision, n)
        return total

    @classmethod
    def projector_flops(cls, config, image=None) -> float:
        vision = config.vision_config
        frames, rows, cols = image or cls.default_image(config)
        merged = frames * rows * cols // cls.merge(config) ** 2
        wide = cls._width(vision) * cls.merge(config) ** 2
        out = getattr(vision, "out_hidden_size", None) or vision.hidden_size
        return 2.0 * merged * (wide * wide + wide * out)


class Qwen2_5VL(Qwen2VL):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    classes = ("Qwen2_5_VLForConditionalGeneration",)

    def tower_tap(self) -> MergedPatchTap:
        """As Qwen2-VL's, in the window order the tower runs in, undone as the tower undoes it."""
        return MergedPatchTap(self.vision_tower(), windowed=True)

    @classmethod
    def tower_view_flops(cls, config, image=None) -> float:
        """The last block's attention rebuilt over each frame, or over each window where that block is windowed."""
        vision = config.vision_config
        if vision.depth - 1 in cls._full_attention_blocks(config):
            return super().tower_view_flops(config, image)
        image = tuple(image or cls.default_image(config))
        return sum(received_attention_flops(vision.hidden_size, vision.num_heads, size)
                   for size in cls.window_sizes(config, image))

    @classmethod
    def _width(cls, vision) -> int:
        return vision.hidden_size

    @classmethod
    def _mlp(cls, vision, n: int) -> float:
        return 2.0 * 3 * n * vision.hidden_size * vision.intermediate_size

    @classmethod
    def window_sizes(cls, config, image) -> list[int]:
        """Patches per attention window (transformers' own window split of the merged grid)."""
        from transformers.vision_utils import get_vision_window_index
        vision = config.vision_config
        _, bounds = get_vision_window_index(torch.tensor([list(image)]), vision.spatial_merge_size,
                                            vision.window_size, vision.patch_size)
        return bounds.diff().tolist()

    @classmethod
    def _windowed_pairs(cls, config, image) -> int:
        return sum(size * size for size in cls.window_sizes(config, image))

    @classmethod
    def _full_attention_blocks(cls, config) -> set[int]:
        return set(config.vision_config.fullatt_block_indexes)
