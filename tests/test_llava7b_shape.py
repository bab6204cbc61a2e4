"""LLaVA-1.5-7B at its true widths, heads and 576 visual tokens (random weights, fewer layers so the
weights fit a 2-core CI machine): the same code path a real checkpoint takes."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import lofi
from _llava7b import llava_15_7b_config


@pytest.fixture(scope="module")
def llava7b():
    torch.manual_seed(0)
    config = llava_15_7b_config(text_layers=3, vision_layers=2)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def _inputs():
    # "USER: <image>\n{question} ASSISTANT:" as llava-hf's processor lays it out: 5 tokens, 576 image tokens
    ids = [1, 3148, 1001, 29901, 29871] + [32000] * 576 + [29871, 13, 5618, 338, 297, 278, 1967, 29973,
                                                           319, 1799, 9047, 13566, 29901]
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.tensor([ids, ids]), "attention_mask": torch.ones(2, len(ids), dtype=torch.long),
            "pixel_values": torch.randn(2, 3, 336, 336, generator=g)}


@pytest.mark.slow
@torch.no_grad()
def test_llava_15_7b_shapes_through_the_engine(llava7b):
    inputs = _inputs()
    base = llava7b(**inputs, logits_to_keep=1).logits
    with lofi.pruned(llava7b, "lofi", keep=1.0, layer=1):
        same = llava7b(**inputs, logits_to_keep=1).logits
    torch.testing.assert_close(same, base, atol=1e-4, rtol=1e-5)
    for method in ("fastv", "lofi", "random"):
        with lofi.pruned(llava7b, method, keep=0.25, layer=2) as handle:
            out = llava7b(**inputs, use_cache=True, logits_to_keep=1)
        assert handle.kept[0].shape == (2, 144) and handle.n_visual.tolist() == [576, 576]
        assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [594, 594, 162]
    with lofi.pruned(llava7b, "fastv", keep=0.25, layer=2):
        ids = llava7b.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert ids.shape == (2, 596)
