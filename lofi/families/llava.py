"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one square image, a CLIP-style tower, a 2-layer projector.

Any language model transformers pairs with LLaVA works (Llama, Mistral, Qwen2, Qwen3, ...): one row of
``image_token_id`` per image feature, 1-D RoPE, every visual token prunable.
"""

from __future__ import annotations

from lofi.families.base import (
    Family,
    Tile,
    clip_vit_flops,
    mlp_projector_flops,
    patch_tap,
    patch_view_flops,
    tower_has_cls,
)


class Llava(Family):
    name = "llava"
    model_types = ("llava",)
    classes = ("LlavaForConditionalGeneration",)

    @classmethod
    def grid(cls, config) -> int:
        return config.vision_config.image_size // config.vision_config.patch_size

    @classmethod
    def has_cls(cls, config) -> bool:
        return tower_has_cls(config.vision_config)

    @classmethod
    def features(cls, config) -> int:
        """Visual tokens per image: the patch grid, plus the CLS token with the "full" feature strategy."""
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        return cls.grid(config) ** 2 + (full and cls.has_cls(config))

    def tower_tap(self):
        """The block whose output is ``hidden_states[vision_feature_layer]``, one patch per visual token."""
        return patch_tap(self)

    @classmethod
    def tower_view_flops(cls, config, image=None) -> float:
        return patch_view_flops(config)

    @classmethod
    def vision_flops(cls, config, image=None) -> float:
        return clip_vit_flops(config.vision_config, cls_token=cls.has_cls(config))

    @classmethod
    def projector_flops(cls, config, image=None) -> float:
        return mlp_projector_flops(config, cls.features(config))

    @classmethod
    def tiles(cls, config, image=None) -> list[Tile]:
        grid = cls.grid(config)
        return [Tile(cls.features(config) - grid * grid, grid, grid)]  # after the CLS token, if any
