"""The model shapes the benchmarks run, with random weights (no download).

    shapes.checkpoint_config("qwen2.5-vl-7b")                 # Qwen/Qwen2.5-VL-7B-Instruct's shapes
    shapes.checkpoint_config("llava-next-7b", text_layers=2)  # fewer layers: the same widths, less memory
    config, model, inputs = shapes.shape_model("mid", batch=1, device="cpu", dtype=torch.float32)

It owns the 7B checkpoints' configurations written out (``CHECKPOINTS`` names the hub id each one reproduces;
values are those of the checkpoints' ``config.json``), two small shapes (``mid``: most of the time in the
decoder, as in LLaVA-1.5-7B; ``overhead``: tiny widths at 7B depth, the time is per-op overhead), the
benchmark image of each shape, synthetic inputs laid out as the family's processor lays them out, and the
command-line options every prefill-shaped benchmark shares. Tests use the checkpoint configurations too.
"""

from __future__ import annotations

import argparse

import torch
import transformers
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

import lofi
from lofi.families import family_class
from lofi.methods.lvpruning import DecisionModules

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


def checkpoint_config(name: str, text_layers: int | None = None, vision_layers: int | None = None):
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


MID = dict(text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16),
           vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4),
           image_size=336)
# LLaVA-1.5-7B's depth (32 text, 24 vision layers) at width 64, 64 visual tokens: every op is tiny, so the time
# is the per-op overhead (Python, dispatch) that dominates a batch-1 prefill on a GPU
OVERHEAD = dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=2),
                vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=2),
                image_size=112)
SMALL = {"mid": MID, "overhead": OVERHEAD}
SHAPES = [*SMALL, *CHECKPOINTS]
ALIASES = {"llava-7b": "llava-1.5-7b"}
N_TEXT = 30  # LVPruning's Table 1 setting: 576 visual + 30 text tokens


def add_shape_arguments(parser: argparse.ArgumentParser, default_shape: str) -> None:
    """The options every prefill-shaped benchmark shares: the model's shape and depth, the device, dtype and
    batch (read back by ``shape_model``)."""
    parser.add_argument("--shape", choices=SHAPES + sorted(ALIASES), default=default_shape)
    parser.add_argument("--text-layers", type=int, help="fewer language-model layers (default: the shape's)")
    parser.add_argument("--vision-layers", type=int, help="fewer vision layers (default: the shape's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1)


def shape_config(shape: str, text_layers: int | None = None, vision_layers: int | None = None):
    """``mid``, ``overhead`` or a 7B checkpoint's configuration (``llava-7b`` is LLaVA-1.5-7B), optionally
    with fewer layers."""
    shape = ALIASES.get(shape, shape)
    if shape not in SMALL:
        return checkpoint_config(shape, text_layers, vision_layers)
    small = SMALL[shape]
    text = {**small["text"], **({} if text_layers is None else {"num_hidden_layers": text_layers})}
    vision = {**small["vision"], **({} if vision_layers is None else {"num_hidden_layers": vision_layers})}
    return LlavaConfig(vision_config=CLIPVisionConfig(image_size=small["image_size"], patch_size=14, **vision),
                       text_config=LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **text),
                       image_token_index=32000, vision_feature_layer=-2)


def build_model(config, device: str, dtype: torch.dtype):
    """A random-weight model of ``config`` (seed 0, SDPA attention) in eval mode."""
    model_class = getattr(transformers, family_class(config).classes[0])
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def benchmark_image(shape: str):
    """The image a shape's prompts carry (``BENCHMARK_IMAGES``; None: the family's default)."""
    return BENCHMARK_IMAGES.get(ALIASES.get(shape, shape))


def shape_model(shape: str, batch: int, device: str, dtype: torch.dtype, text_layers: int | None = None,
                vision_layers: int | None = None):
    """(config, random-weight model, inputs) of a benchmark shape: its benchmark image and ``N_TEXT`` text
    tokens per sample, pixels in ``dtype``."""
    config = shape_config(shape, text_layers, vision_layers)
    inputs = synthetic_inputs(config, benchmark_image(shape), N_TEXT, batch, device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return config, build_model(config, device, dtype), inputs


def shared_settings(model, methods: list[str], layer: int | None) -> dict:
    """The run-wide settings ``lofi.build`` hands the methods that take them: K (None: each method's own
    default, 2 for fastv / lofi / random, 0 for the methods that choose before the language model), and for
    LVPruning random decision modules on the model's device and dtype (their cost, not their choices, is what
    is timed)."""
    shared = {} if layer is None else {"layer": layer}
    if any("modules" in lofi.options(method) for method in methods):
        parameter = next(model.parameters())
        shared["modules"] = DecisionModules.for_model(model).to(parameter.device, parameter.dtype)
    return shared
