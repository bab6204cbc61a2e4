"""The configurations of the 7B checkpoints the field studies, written out (no download).

    lofi.configs.config("qwen2.5-vl-7b")                      # Qwen/Qwen2.5-VL-7B-Instruct's shapes
    lofi.configs.config("llava-next-7b", text_layers=2)      # fewer layers: the same widths, less memory

They give a random-weight model of the checkpoint's true widths, heads, token counts and vision towers
(``from_config``), for FLOPs, benchmarks and shape tests; ``CHECKPOINTS`` names the hub id each one
reproduces. Values are those of the checkpoints' ``config.json``.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen2VLConfig,
    SiglipVisionConfig,
)

CHECKPOINTS = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-next-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-onevision-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
}

_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
_QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6)
_QWEN_VL_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                       vision_end_token_id=151653)
_MROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}


def config(name: str, text_layers: int | None = None, vision_layers: int | None = None):
    """The configuration of checkpoint ``name`` (a key of ``CHECKPOINTS``), optionally with fewer
    language-model and vision layers (every other value unchanged)."""
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint shape {name!r}; valid: {', '.join(CHECKPOINTS)}")
    text = lambda base: {**base, **({} if text_layers is None else {"num_hidden_layers": text_layers})}  # noqa: E731
    vision = lambda base, key="num_hidden_layers": {**base, **({} if vision_layers is None else  # noqa: E731
                                                               {key: vision_layers})}
    if name == "llava-1.5-7b":
        return LlavaConfig(vision_config=CLIPVisionConfig(**vision(_CLIP_L_336)), text_config=LlamaConfig(
            **text(_VICUNA_7B), pad_token_id=32001), image_token_index=32000, vision_feature_layer=-2,
            vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=32001)
    if name == "llava-next-7b":
        return LlavaNextConfig(
            vision_config=CLIPVisionConfig(**vision(_CLIP_L_336)), text_config=LlamaConfig(**text(_VICUNA_7B),
                                                                                        pad_token_id=0),
            image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], pad_token_id=0)
    if name == "llava-onevision-7b":
        siglip = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                      image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision(siglip)),
            text_config=Qwen2Config(**text(_QWEN2_7B), vocab_size=152128, rope_parameters={
                "rope_type": "default", "rope_theta": 1000000.0}),
            image_token_index=151646, video_token_index=151647, vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    text_config = dict(**text(_QWEN2_7B), vocab_size=152064, rope_parameters=_MROPE)
    if name == "qwen2-vl-7b":
        return Qwen2VLConfig(text_config=text_config, **_QWEN_VL_TOKENS, vision_config=vision(dict(
            depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, in_channels=3, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2), key="depth"))
    full = [7, 15, 23, 31] if vision_layers is None else [i for i in (7, 15, 23, 31) if i < vision_layers] or [
        vision_layers - 1]
    return Qwen2_5_VLConfig(text_config=text_config, **_QWEN_VL_TOKENS, vision_config=vision(dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, in_channels=3,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2,
        fullatt_block_indexes=full), key="depth"))


BENCHMARK_IMAGES = {"llava-1.5-7b": None, "llava-next-7b": (672, 672), "llava-onevision-7b": (768, 768),
                    "qwen2-vl-7b": (1, 48, 48), "qwen2.5-vl-7b": (1, 48, 48)}  # 672 x 672 pixels for Qwen


def synthetic_inputs(config, image=None, n_text: int = 30, batch: int = 1, device="cpu", seed: int = 0) -> dict:
    """Model inputs of ``batch`` copies of one prompt as the family's processor lays it out: ``n_text`` text
    tokens around the visual tokens of one random ``image`` (the family's description, see
    ``lofi.count_flops``), with the pixel tensors and extra inputs the family's forward takes."""
    from lofi.families import family_class
    family = family_class(config)
    image = image or family.default_image(config)
    tiles = family.tiles(config, image)
    n_visual = tiles[0].start + sum(t.tokens for t in tiles)
    image_token = getattr(config, "image_token_id", None) or config.image_token_index
    generator = torch.Generator().manual_seed(seed)
    before = list(range(400, 405))
    after = list(range(405, 400 + n_text))
    vision = config.vision_config
    extra: dict = {}
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        image_span = [config.vision_start_token_id] + [image_token] * n_visual + [config.vision_end_token_id]
        ids = before[:-1] + image_span + after[1:]
        frames, rows, cols = image
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.randn(batch * frames * rows * cols, patch, generator=generator)
        extra = {"image_grid_thw": torch.tensor([list(image)] * batch)}
    else:
        ids = before + [image_token] * n_visual + after
        size = vision.image_size
        if config.model_type == "llava":
            pixels = torch.randn(batch, 3, size, size, generator=generator)
        else:
            pixels = torch.randn(batch, family.crops(config, image), 3, size, size, generator=generator)
            extra = {"image_sizes": torch.tensor([list(image)] * batch)}
    input_ids = torch.tensor([ids] * batch)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels, **extra}
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        out["mm_token_type_ids"] = (input_ids == image_token).int()
    return {k: v.to(device) for k, v in out.items()}
