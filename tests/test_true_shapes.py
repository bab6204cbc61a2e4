"""Every family at its 7B checkpoint's true widths, heads, vision tower and visual-token count (random
weights, 2 language-model layers and 1 vision layer so the weights fit a 2-core CI machine): the code
path a real checkpoint takes, as transformers' own tests check true shapes."""

import math

import pytest
import torch
import transformers
from _families import TowerProbe

import lofi
from benchmarks import shapes
from lofi.families import family_class

IMAGES = {"llava-1.5-7b": None, "llava-next-7b": (336, 672), "llava-onevision-7b": (384, 384),
          "qwen2-vl-7b": (1, 24, 36), "qwen2.5-vl-7b": (1, 24, 36)}
VISUAL = {"llava-1.5-7b": 576, "llava-next-7b": 576 + 24 * 49, "llava-onevision-7b": 729 + 27 * 28,
          "qwen2-vl-7b": 216, "qwen2.5-vl-7b": 216}
NEWLINES = {"llava-next-7b": 24, "llava-onevision-7b": 27}


def _model(name):
    # two tower layers, so that LLaVA's vision_feature_layer -2 names a block (the tower view reads it)
    config = shapes.checkpoint_config(name, text_layers=2, vision_layers=2)
    model_class = getattr(transformers, family_class(config).classes[0])
    torch.manual_seed(0)
    return model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("name", list(shapes.CHECKPOINTS))
def test_the_7b_shape_runs_through_the_engine(name):
    """keep = 1 is the unpruned model, LoFi drops tokens from the cache, FLOPs fall, and the tower data a method
    sees projects to each visual token's language-model input at the true layout (crops, unpadding, newline
    rows, 2 x 2 merge groups, window order)."""
    model = _model(name)
    inputs = shapes.synthetic_inputs(model.config, IMAGES[name], n_text=30)
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        base = model(**inputs, logits_to_keep=1).logits
    finally:
        hook.remove()
    assert torch.isfinite(base).all()
    with lofi.pruned(model, "fastv", keep=1.0, layer=1) as handle:
        same = model(**inputs, logits_to_keep=1).logits
    torch.testing.assert_close(same, base, atol=1e-4, rtol=1e-5)
    assert handle.n_visual.tolist() == [VISUAL[name]]
    prunable = VISUAL[name] - NEWLINES.get(name, 0)
    assert handle.n_prunable.tolist() == [prunable]
    with lofi.pruned(model, "lofi", keep=0.25, layer=1) as handle:
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    kept = math.ceil(0.25 * prunable)
    assert handle.kept[0].shape == (1, kept)
    length = inputs["input_ids"].shape[1]
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [length, length - prunable + kept]
    n_text = length - VISUAL[name]
    flops = lofi.count_flops(model.config, n_text, VISUAL[name], [(1, kept + NEWLINES.get(name, 0))],
                             image=IMAGES[name])
    assert flops.llm < lofi.count_flops(model.config, n_text, VISUAL[name], image=IMAGES[name]).llm

    probe = TowerProbe(keep=0.25)
    with lofi.pruned(model, probe):
        model(**inputs, logits_to_keep=1)
    state, view = probe.state, probe.view
    real = state.visual_valid[0]
    assert int(real.sum()) == prunable
    torch.testing.assert_close(view.project(view.features[0][real]), seen["embeds"][0, state.visual[0][real]],
                               atol=1e-4, rtol=1e-4)
    assert view.saliency == ("cls" if name.startswith(("llava-1.5", "llava-next")) else "received")
