"""The vision stage on every family: the tower's states, saliency and keys a method sees per visual token, checked
against an independent route, and SCOPE / VisionZip / VisPruner on every family where they are defined.

The independent route never uses the taps: the tower runs again with eager attention and hands out its
attention probabilities (``output_attentions`` for CLIP / SigLIP; the eager attention function's weights and
keys for Qwen's ViT); each prunable visual token is then matched to the tower patch (or 2 x 2 merge group)
whose projector output *is* that token's language-model input. So the map from patches to tokens (crops,
unpadding, newline rows, merge groups, Qwen2.5-VL's window order) comes from the model's own outputs.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from _families import (
    DEFAULT_IMAGES,
    FAMILIES,
    OTHER_IMAGES,
    TowerProbe,
    assert_batch_generates_as_alone,
    assert_keep_one_generates_as_unpruned,
    build,
    inputs,
)
from references import scope_reference, visionzip_reference, vispruner_reference

import lofi

QWEN = ("qwen2_vl", "qwen2_5_vl")
CLS_FAMILIES = ("llava", "llava_next")
TOWER_METHODS = ("scope", "visionzip", "vispruner")
DEFINED = [(f, m) for f in FAMILIES for m in TOWER_METHODS if m != "scope" or f in CLS_FAMILIES]


def _batch(family: str):
    model = build(family)
    return model, inputs(model, [DEFAULT_IMAGES[family], OTHER_IMAGES[family]], seed=1)


def _captured(model, batch):
    """(the language model's inputs_embeds, the vision tower's call arguments) of an unpruned forward."""
    seen = {}
    tower = model.model.visual if model.config.model_type in QWEN else model.model.vision_tower

    def embeds(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    def pixels(module, args, kwargs):
        seen.setdefault("tower", (args, kwargs))

    hooks = [model.model.language_model.register_forward_pre_hook(embeds, with_kwargs=True),
             tower.register_forward_pre_hook(pixels, with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["embeds"], seen["tower"]


@torch.no_grad()
def _patch_table(model, tower_call):
    """Per tower patch (or merge group): (projected [N, d_text], features [N, d_f], saliency [N], keys [N, d_k])."""
    args, kwargs = tower_call
    if model.config.model_type in QWEN:
        return _merged_table(model, args, kwargs)
    tower = model.model.vision_tower
    before, tower.config._attn_implementation = tower.config._attn_implementation, "eager"
    try:
        out = tower(args[0], output_hidden_states=True, output_attentions=True)
    finally:
        tower.config._attn_implementation = before
    layer = model.config.vision_feature_layer
    blocks = lofi.families.family_for(model).vision_layers()
    block = len(blocks) + layer if layer < 0 else layer - 1
    attn, entering = blocks[block].self_attn, out.hidden_states[block]
    keys = attn.k_proj(blocks[block].layer_norm1(entering)).view(*entering.shape[:2], attn.num_heads, -1).mean(2)
    weights = out.attentions[block]  # [crops, heads, tokens, tokens]
    if "clip" in model.config.vision_config.model_type:
        features, saliency, keys = out.hidden_states[layer][:, 1:], weights[:, :, 0, 1:].mean(1), keys[:, 1:]
    else:
        features, saliency = out.hidden_states[layer], weights.mean(1).mean(1)
    flat = [t.reshape(-1, *t.shape[2:]) for t in (features, saliency, keys)]
    return (model.model.multi_modal_projector(flat[0]), *flat)


def _merged_table(model, args, kwargs):
    visual = model.model.visual
    module = sys.modules[type(visual.blocks[-1].attn).__module__]
    original, calls = module.eager_attention_forward, []

    def recording(attention, query, key, *rest, **options):
        output, weights = original(attention, query, key, *rest, **options)
        if attention is visual.blocks[-1].attn:
            calls.append((weights[0], key[0]))  # [heads, q, k], [heads, k, head_dim]
        return output, weights

    out = {}
    hook = visual.blocks[-1].register_forward_hook(lambda m, a, o: out.setdefault("states", o))
    before, visual.config._attn_implementation = visual.config._attn_implementation, "eager"
    module.eager_attention_forward = recording
    try:
        visual(*args, **kwargs)
    finally:
        module.eager_attention_forward = original
        visual.config._attn_implementation = before
        hook.remove()
    unit = visual.config.spatial_merge_size ** 2
    saliency = torch.cat([w.mean(0).mean(0) for w, _ in calls]).view(-1, unit).mean(1)
    keys = torch.cat([k.mean(0) for _, k in calls]).view(-1, unit, calls[0][1].shape[-1]).mean(1)
    states = out["states"]
    features = states.reshape(-1, unit * states.shape[-1])
    return visual.merger(states), features, saliency, keys


def independent_tower(model, batch):
    """Per sample: (features, saliency, keys) of its prunable visual tokens in order, by the independent route."""
    embeds, tower_call = _captured(model, batch)
    projected, features, saliency, keys = _patch_table(model, tower_call)
    family = lofi.families.family_for(model)
    prunable = family.prunable_mask(family.visual_mask(batch["input_ids"]), embeds)
    rows = []
    for row in range(len(embeds)):
        tokens = embeds[row][prunable[row]]
        distance = torch.cdist(tokens.double(), projected.double())
        nearest = distance.argmin(1)
        assert distance.gather(1, nearest[:, None]).max() < 1e-5, "a visual token matches no tower patch"
        rows.append((features[nearest], saliency[nearest], keys[nearest]))
    return rows


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_shows_a_method_the_tower_data_of_each_visual_token(family):
    model, batch = _batch(family)
    probe = TowerProbe(keep=0.5)
    with lofi.pruned(model, probe):
        model(**batch)
    view, state = probe.view, probe.state
    assert view.saliency == ("cls" if family in CLS_FAMILIES else "received")
    for row, (features, saliency, keys) in enumerate(independent_tower(model, batch)):
        real = state.visual_valid[row]
        assert int(real.sum()) == len(features)
        torch.testing.assert_close(view.features[row][real], features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(view.attention[row][real], saliency, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(view.keys[row][real], keys, atol=1e-5, rtol=1e-5)
        assert not view.attention[row][~real].any()


def _reference_kept(method, features, saliency, keys, n_keep):
    arrays = [t.double().numpy() for t in (features, saliency, keys)]
    if method == "scope":
        return scope_reference(arrays[0], n_keep, arrays[1])
    if method == "vispruner":
        return vispruner_reference(arrays[0], n_keep, arrays[1])
    contextual = min(round(n_keep * 10 / 64), n_keep - 1)
    ref = visionzip_reference(arrays[0], n_keep - contextual, arrays[1], arrays[2], contextual)
    return np.sort(np.concatenate([ref.kept, ref.contextual]))


def _prunable_ranks(model, batch):
    """Per sample: each prunable visual token's index among its visual tokens (what ``kept_lists`` reports)."""
    embeds = _captured(model, batch)[0]
    family = lofi.families.family_for(model)
    visual = family.visual_mask(batch["input_ids"])
    prunable = family.prunable_mask(visual, embeds)
    return [(torch.cumsum(visual[row].long(), 0) - 1)[prunable[row]] for row in range(len(visual))]


@torch.no_grad()
@pytest.mark.parametrize(("family", "method"), DEFINED)
def test_tower_methods_keep_what_their_reference_keeps_on_every_family(family, method):
    model, batch = _batch(family)
    with lofi.pruned(model, method, keep=0.4) as handle:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert handle.positions == ("original" if family in QWEN else "compact")
    ranks = _prunable_ranks(model, batch)
    for row, tower in enumerate(independent_tower(model, batch)):
        expected = _reference_kept(method, *tower, handle.method.n_keep_of(len(tower[0])))
        assert handle.kept_lists()[row] == ranks[row][torch.from_numpy(expected)].tolist(), f"sample {row}"


@torch.no_grad()
@pytest.mark.parametrize(("family", "method"), [("llava_next", "scope"), ("llava_onevision", "visionzip"),
                                                ("qwen2_5_vl", "vispruner"), ("qwen2_vl", "visionzip")])
def test_a_ragged_batch_generates_what_each_sample_generates_alone(family, method):
    model, batch = _batch(family)
    assert_batch_generates_as_alone(model, batch, method, keep=0.4, new_tokens=3)


@torch.no_grad()
@pytest.mark.parametrize(("family", "method"), [("llava_next", "scope"), ("llava_onevision", "vispruner"),
                                                ("qwen2_5_vl", "visionzip")])
def test_keep_one_runs_as_the_unpruned_model(family, method):
    model, batch = _batch(family)
    assert_keep_one_generates_as_unpruned(model, batch, method, new_tokens=3)


@torch.no_grad()
def test_onevision_downsampled_grids_are_laid_out_by_the_models_own_interpolation():
    """A large OneVision image's high-resolution tokens are bilinearly downsampled; the tower data follows."""
    model = build("llava_onevision")
    batch = inputs(model, [(32, 48)], seed=2)
    probe = TowerProbe(keep=0.5)
    with lofi.pruned(model, probe) as handle:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    n = int(probe.state.visual_valid.sum())
    assert handle.n_prunable.tolist() == [n] and probe.view.features.shape[1] == n
    assert torch.isfinite(probe.view.attention).all() and (probe.view.attention[probe.state.visual_valid] > 0).all()


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_scope_refuses_a_tower_without_cls_in_one_line(family):
    model = build(family)
    with pytest.raises(ValueError, match="\\[CLS\\] token") as error:
        with lofi.pruned(model, "scope", keep=0.3):
            pass
    assert "\n" not in str(error.value)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_a_prompt_that_ran_the_tower_twice_is_refused_and_the_model_is_left_as_it_was(family):
    model, batch = _batch(family)
    expected = model(**batch).logits
    tower = model.model.visual if family in QWEN else model.model.vision_tower
    args, kwargs = _captured(model, batch)[1]
    hooks = _hooks(model)
    with pytest.raises(ValueError, match="more than once") as error:
        with lofi.pruned(model, "visionzip", keep=0.5):
            tower(*args, **kwargs)  # an encoding of its own, before the prompt's
            model(**batch)
    assert "\n" not in str(error.value)
    assert "pack_image_features" not in vars(model.model)
    assert _hooks(model) == hooks
    assert torch.equal(model(**batch).logits, expected)


def _hooks(model):
    """Every module's forward hooks (transformers installs output-capturing hooks of its own on first use)."""
    return {name: (list(module._forward_hooks.values()), list(module._forward_pre_hooks.values()))
            for name, module in model.named_modules()}


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_tower_methods_count_the_attention_their_family_rebuilds(family):
    config = build(family).config
    family_class = lofi.families.family_class(config)
    image = DEFAULT_IMAGES[family]
    vision = config.vision_config
    if family == "llava_next":
        d, h, n = vision.hidden_size, vision.num_attention_heads, (vision.image_size // vision.patch_size) ** 2 + 1
        per_image = family_class.crops(config, image) * (2 * n * d * d + 2 * d * d + 2 * n * d + 3 * n * h)
    else:
        frames, rows, cols = image
        d, h, n = (vision.embed_dim if family == "qwen2_vl" else vision.hidden_size), vision.num_heads, rows * cols
        per_image = frames * (4 * n * d * d + 2 * n * n * d + 4 * n * n * h)
    assert family_class.tower_view_flops(config, image) == per_image
    method = lofi.build("vispruner", keep=0.25)
    n_visual = 40
    own = method.decision_flops(config, 9, [n_visual])
    assert lofi.method_flops(config, method, 9, n_visual, image=image).decision == own + per_image
