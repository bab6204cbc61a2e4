"""Tiny random LLaVA models and inputs for the engine tests (no downloads)."""

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LogitsProcessorList

IMAGE_SIZE, PATCH = 16, 4
N_VISUAL = (IMAGE_SIZE // PATCH) ** 2  # 16


def tiny_llava(kv_heads=4, image_token=3, attn="sdpa", layers=4, seed=0):
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=kv_heads, vocab_size=60, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         vision_feature_layer=-1, pad_token_id=0)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


def prompt_ids(image_token, text_before=(5, 6), text_after=(7, 8, 9, 10)):
    return [1, *text_before, *([image_token] * N_VISUAL), *text_after]


def make_inputs(image_token=3, seed=0, prompts=None):
    """A left-padded batch; ``prompts`` are lists of ids (default: one sample)."""
    g = torch.Generator().manual_seed(seed)
    prompts = prompts or [prompt_ids(image_token)]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    pixels = torch.randn(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def emitting(token_id: int, prompt_length: int) -> dict:
    """``generate()`` options under which greedy decoding emits ``token_id`` as its second new token (the
    logits it returns stay the model's own)."""
    def emit(input_ids, scores):
        if input_ids.shape[1] == prompt_length + 1:
            scores = torch.full_like(scores, -torch.inf)
            scores[:, token_id] = 0
        return scores
    return {"logits_processor": LogitsProcessorList([emit])}
