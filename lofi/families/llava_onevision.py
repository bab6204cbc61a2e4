"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's layout with a SigLIP tower.

As LLaVA-NeXT (base tile, unpadded high-resolution tokens, newline rows never pruned), except: the
tower has no CLS token (27 x 27 = 729 features per 384-pixel crop), and when the high-resolution
tokens exceed ``vision_aspect_ratio`` (``anyres_max_9``: 9 crops' worth) by more than 10% they are
bilinearly downsampled by the ratio. Video tokens (``video_token_index``) are visual and prunable.
"""

from __future__ import annotations

import math

from lofi.families.base import clip_vit_flops
from lofi.families.llava_next import LlavaNext


class LlavaOnevision(LlavaNext):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    classes = ("LlavaOnevisionForConditionalGeneration",)

    @classmethod
    def high_res_shape(cls, config, image) -> tuple[int, int]:
        rows, cols = super().high_res_shape(config, image)
        max_crops = int(getattr(config, "vision_aspect_ratio", "anyres_max_9").strip("anyres_max_"))
        ratio = math.sqrt(rows * cols / (max_crops * cls.grid(config) ** 2))
        if ratio > 1.1:  # as pack_image_features: interpolate to these sizes
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    @classmethod
    def vision_flops(cls, config, image=None) -> float:
        return clip_vit_flops(config.vision_config, tiles=cls.crops(config, image), cls_token=False)
