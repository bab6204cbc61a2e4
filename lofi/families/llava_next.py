"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "LLaVA-1.6"): any-resolution tiles and newline rows.

An image of size (height, width) becomes a base tile (the whole image at the tower's resolution) and a
high-resolution grid of tiles (``image_grid_pinpoints``), unpadded to the image's aspect ratio. After
the base tile's tokens, the high-resolution tokens follow row by row, each row ended by the learnt
``image_newline`` vector under the same image token id. Newline rows are visual but never pruned: they
are found as the image-token rows whose features equal ``image_newline`` (the model writes exactly that
vector there), so the rule holds under ``generate()``, which passes no image sizes to the model.

``image`` (for FLOPs and tiles) is the image's (height, width) in pixels, as the processor's
``image_sizes`` holds it; by default a square image of the tower's input size.
"""

from __future__ import annotations

import torch

from lofi.families.base import Family, Tile, clip_vit_flops, mlp_projector_flops, patch_tap, patch_view_flops


class LlavaNext(Family):
    name = "llava_next"
    model_types = ("llava_next",)
    classes = ("LlavaNextForConditionalGeneration",)

    def prunable_mask(self, is_visual: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        newline = getattr(self.multimodal_model(), "image_newline", None)
        if newline is None:
            return is_visual
        is_newline = (inputs_embeds == newline.to(inputs_embeds.dtype)).all(-1)
        return is_visual & ~is_newline

    def tower_tap(self):
        """The projector's block, its crops laid out by the model's own ``pack_image_features``."""
        return patch_tap(self, packer=self.multimodal_model())

    @classmethod
    def tower_view_flops(cls, config, image=None) -> float:
        return patch_view_flops(config, cls.crops(config, image))

    # ------------------------------------------------------------------------------- geometry
    @classmethod
    def grid(cls, config) -> int:
        return config.vision_config.image_size // config.vision_config.patch_size

    @classmethod
    def image_of(cls, inputs, row: int):
        return tuple(int(v) for v in inputs["image_sizes"][row].tolist())

    @classmethod
    def default_image(cls, config):
        size = config.vision_config.image_size
        return (size, size)

    @classmethod
    def tile_grid(cls, config, image) -> tuple[int, int]:
        """(rows, cols) of high-resolution tiles for an image of (height, width)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
        return get_anyres_image_grid_shape(list(image), config.image_grid_pinpoints, config.vision_config.image_size)

    @classmethod
    def high_res_shape(cls, config, image) -> tuple[int, int]:
        """(rows, cols) of high-resolution tokens after unpadding to the image's aspect ratio."""
        from transformers.models.llava_next.modeling_llava_next import unpad_image
        rows, cols = cls.tile_grid(config, image)
        grid = cls.grid(config)
        return tuple(unpad_image(torch.empty(1, rows * grid, cols * grid), list(image)).shape[1:])

    @classmethod
    def crops(cls, config, image) -> int:
        """Crops the vision tower sees: the base tile and every high-resolution tile."""
        rows, cols = cls.tile_grid(config, image or cls.default_image(config))
        return 1 + rows * cols

    @classmethod
    def tiles(cls, config, image=None) -> list[Tile]:
        image = image or cls.default_image(config)
        grid = cls.grid(config)
        rows, cols = cls.high_res_shape(config, image)
        return [Tile(0, grid, grid, name="base"), Tile(grid * grid, rows, cols, newline=True, name="high-res")]

    # ---------------------------------------------------------------------------------- FLOPs
    @classmethod
    def vision_flops(cls, config, image=None) -> float:
        return clip_vit_flops(config.vision_config, tiles=cls.crops(config, image))

    @classmethod
    def projector_flops(cls, config, image=None) -> float:
        # the projector runs on every crop's features, before unpadding
        return mlp_projector_flops(config, cls.crops(config, image) * cls.grid(config) ** 2)
