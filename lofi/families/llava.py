"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one square image, a CLIP-style tower, a 2-layer projector.

Any language model transformers pairs with LLaVA works (Llama, Mistral, Qwen2, Qwen3, ...): one row of
``image_token_id`` per image feature, 1-D RoPE, every visual token prunable.
"""

from __future__ import annotations

from lofi.families.base import Family, Tile, clip_vit_flops, mlp_projector_flops


class Llava(Family):
    name = "llava"
    model_types = ("llava",)
    classes = ("LlavaForConditionalGeneration",)

    @classmethod
    def grid(cls, config) -> int:
        return config.vision_config.image_size // config.vision_config.patch_size

    @classmethod
    def has_cls(cls, config) -> bool:
        return "clip" in getattr(config.vision_config, "model_type", "clip")

    @classmethod
    def features(cls, config) -> int:
        """Visual tokens per image: the patch grid, plus the CLS token with the "full" feature strategy."""
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        return cls.grid(config) ** 2 + (full and cls.has_cls(config))

    def tower_block(self):
        """The CLIP block whose output is ``hidden_states[vision_feature_layer]``: one patch per visual token
        under the "default" feature strategy (the [CLS] state dropped), the [CLS] query at token 0."""
        config = self.config
        layer = config.vision_feature_layer
        if not self.has_cls(config) or isinstance(layer, (list, tuple)) or \
                getattr(config, "vision_feature_select_strategy", "default") != "default":
            return super().tower_block()
        blocks = self.vision_layers()
        index = layer - 1 if layer > 0 else len(blocks) + layer  # hidden_states[i] is block i - 1's output
        if not 0 <= index < len(blocks):
            raise ValueError(f"vision_feature_layer {layer} names no block of the {len(blocks)}-block tower")
        return blocks[index]

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
