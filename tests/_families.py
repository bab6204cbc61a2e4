"""Tiny random models of every supported family and their inputs, built by hand (no downloads).

``build(name)`` returns a model in eval mode; ``inputs(model, images, texts)`` lays out a left-padded
batch the way each family's processor does: text before, the image's visual tokens (as many as the
model's own image features hold), text after. Image descriptions are per family: (height, width) in
pixels for the LLaVA families, (frames, rows, cols) of patches for Qwen2-VL / Qwen2.5-VL.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3Config,
    SiglipVisionConfig,
)

from lofi.registry import PruningMethod

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 70, 71, 72, 73
VOCAB = 80
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LANGUAGE_MODELS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
            patch_size=4)


def _text(kind: str = "llama", **extra):
    return LANGUAGE_MODELS[kind](**TEXT, **extra)


def config(name: str, language_model: str = "llama"):
    """The tiny config of family ``name`` (LLaVA takes any of ``LANGUAGE_MODELS``)."""
    if name == "llava":
        return LlavaConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=_text(language_model),
                           image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, pad_token_id=0)
    if name == "llava_next":
        return LlavaNextConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=_text(language_model),
                               image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, pad_token_id=0,
                               image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
    if name == "llava_onevision":
        vision = SiglipVisionConfig(**{**CLIP, "num_hidden_layers": 1})
        return LlavaOnevisionConfig(vision_config=vision, text_config=_text("qwen2"), image_token_index=IMAGE_TOKEN,
                                    video_token_index=VIDEO_TOKEN, vision_feature_layer=-1, pad_token_id=0,
                                    image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32], [32, 48]],
                                    vision_aspect_ratio="anyres_max_2")
    text = dict(**TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    tokens = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                  vision_end_token_id=VISION_END)
    if name == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    if name == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=4, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16,
                      fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    raise ValueError(name)


MODEL_CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
                 "llava_onevision": LlavaOnevisionForConditionalGeneration,
                 "qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
DEFAULT_IMAGES = {"llava": (16, 16), "llava_next": (16, 30), "llava_onevision": (40, 20),
                  "qwen2_vl": (1, 4, 6), "qwen2_5_vl": (1, 6, 8)}
OTHER_IMAGES = {"llava": (16, 16), "llava_next": (30, 14), "llava_onevision": (16, 16),
                "qwen2_vl": (1, 4, 8), "qwen2_5_vl": (1, 4, 8)}


def build(name: str, language_model: str = "llama", attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    model = MODEL_CLASSES[name]._from_config(config(name, language_model), attn_implementation=attn,
                                             dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


def _pixels(model, image, generator):
    """(pixel tensor of one image, its extra inputs, its number of visual tokens)."""
    config = model.config
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        vision = config.vision_config
        frames, rows, cols = image
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.randn(frames * rows * cols, patch, generator=generator)
        return pixels, {"image_grid_thw": torch.tensor([image])}, frames * rows * cols // vision.spatial_merge_size ** 2
    size = config.vision_config.image_size
    if config.model_type == "llava":
        return torch.randn(1, 3, size, size, generator=generator), {}, None
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    crops = image_size_to_num_patches(list(image), config.image_grid_pinpoints, size)
    return torch.randn(1, crops, 3, size, size, generator=generator), {"image_sizes": torch.tensor([image])}, None


@torch.no_grad()
def count_visual_tokens(model, pixels, extra) -> int:
    """How many visual tokens the model writes for one image (its own image features)."""
    features = model.model.get_image_features(pixels, **{k: v for k, v in extra.items()})
    pooled = features.pooler_output if hasattr(features, "pooler_output") else features
    return sum(f.shape[0] for f in pooled)


def inputs(model, images, texts=None, seed: int = 0) -> dict:
    """A left-padded batch: per sample ``texts[b] = (before, after)`` token ids around its image."""
    generator = torch.Generator().manual_seed(seed)
    texts = texts or [((5, 6), (7, 8, 9, 10))] * len(images)
    qwen = model.config.model_type in ("qwen2_vl", "qwen2_5_vl")
    rows, pixels, extras = [], [], []
    for image, (before, after) in zip(images, texts):
        pixel, extra, n = _pixels(model, image, generator)
        n = n or count_visual_tokens(model, pixel, extra)
        visual = [IMAGE_TOKEN] * n
        rows.append([1, *before, *([VISION_START, *visual, VISION_END] if qwen else visual), *after])
        pixels.append(pixel)
        extras.append(extra)
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if qwen:
        batch |= {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat([e["image_grid_thw"] for e in extras]),
                  "mm_token_type_ids": (ids == IMAGE_TOKEN).int()}
    elif model.config.model_type == "llava":
        batch["pixel_values"] = torch.cat(pixels)
    else:
        crops = max(p.shape[1] for p in pixels)
        padded = [torch.cat([p, p.new_zeros(1, crops - p.shape[1], *p.shape[2:])], 1) for p in pixels]
        batch |= {"pixel_values": torch.cat(padded), "image_sizes": torch.cat([e["image_sizes"] for e in extras])}
    return batch


def sample(batch: dict, row: int) -> dict:
    """Sample ``row`` of a batch from ``inputs``, alone and unpadded."""
    keep = batch["attention_mask"][row].bool()
    out = {"input_ids": batch["input_ids"][row:row + 1, keep],
           "attention_mask": batch["attention_mask"][row:row + 1, keep]}
    if "image_grid_thw" in batch:
        grids = batch["image_grid_thw"]
        sizes = grids.prod(1).tolist()
        start = sum(sizes[:row])
        out |= {"pixel_values": batch["pixel_values"][start:start + sizes[row]], "image_grid_thw": grids[row:row + 1],
                "mm_token_type_ids": batch["mm_token_type_ids"][row:row + 1, keep]}
    else:
        out["pixel_values"] = batch["pixel_values"][row:row + 1]
        if "image_sizes" in batch:
            out["image_sizes"] = batch["image_sizes"][row:row + 1]
    return out


QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|>"
    "<|vision_end|>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def save_folder(name: str, folder, seed: int = 0):
    """A tiny model of family ``name`` with a processor that reads the bundled benchmark, saved as a
    Hugging Face folder (``from_pretrained`` and ``AutoProcessor`` load it offline)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor, Qwen2VLImageProcessorPil

    from analysis.bundled import recipe as bundled
    tokenizer = bundled.build_tokenizer()
    if name.startswith("qwen"):
        tokenizer.add_special_tokens({"additional_special_tokens": QWEN_TOKENS})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["<image>", *QWEN_TOKENS]}
    model_config = config(name)
    model_config.text_config.vocab_size = len(tokenizer)
    model_config.text_config.pad_token_id = tokenizer.pad_token_id
    if name.startswith("qwen"):
        model_config.image_token_id, model_config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
        model_config.vision_start_token_id = ids["<|vision_start|>"]
        model_config.vision_end_token_id = ids["<|vision_end|>"]
        image_processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                   size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
        processor = None  # Qwen2VLProcessor needs a video processor, which needs torchvision: saved in parts
    else:
        model_config.image_token_index = ids["<image>"]
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
            image_grid_pinpoints=model_config.image_grid_pinpoints, image_mean=bundled.IMAGE_MEAN,
            image_std=bundled.IMAGE_STD)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=bundled.CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = MODEL_CLASSES[name]._from_config(model_config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    else:
        tokenizer.save_pretrained(folder)
        image_processor.save_pretrained(folder)
        (Path(folder) / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    return folder


@torch.no_grad()
def assert_batch_generates_as_alone(model, batch: dict, method: str, keep: float, new_tokens: int) -> None:
    """``generate()`` pruned by ``method`` on ``batch`` gives each sample the kept set, tokens and logits (within
    2e-5) it gets alone and unpadded."""
    import lofi
    with lofi.pruned(model, method, keep=keep) as handle:
        together = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
        kept = handle.kept_lists()
    width = batch["input_ids"].shape[1]
    for row in range(batch["input_ids"].shape[0]):
        alone_batch = sample(batch, row)
        with lofi.pruned(model, method, keep=keep) as handle:
            alone = model.generate(**alone_batch, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        assert handle.kept_lists()[0] == kept[row], f"sample {row}"
        start = alone_batch["input_ids"].shape[1]
        assert together.sequences[row, width:].tolist() == alone.sequences[0, start:].tolist()
        for a, b in zip(together.logits, alone.logits):
            torch.testing.assert_close(a[row], b[0], atol=2e-5, rtol=0)


@torch.no_grad()
def assert_keep_one_generates_as_unpruned(model, batch: dict, method: str, new_tokens: int) -> None:
    """``generate()`` under ``method`` at keep = 1 gives the unpruned model's tokens and logits, bit for bit."""
    import lofi
    expected = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    with lofi.pruned(model, method, keep=1.0):
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, expected.logits))


class TowerProbe(PruningMethod):
    """Keeps the ``TowerView`` and ``StageInput`` it was shown; keeps the tokens of largest saliency."""

    name = "tower-probe"
    reads_tower = True
    default_layer = 0

    def scores(self, state):
        self.view, self.state = state.tower(), state
        return self.view.attention
