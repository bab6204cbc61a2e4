"""CDPruner, DivPrune, SCOPE, VisionZip and VisPruner inside the runtime, against independent references.

Each method's kept set is checked against its per-sample reference (``tests/references/``) fed with tensors this
file takes from the model by other routes (the language model's inputs captured by a hook; the vision tower's
hidden states and attention probabilities from an eager-attention copy of it). The pruned model's logits are
checked against the unpruned language model run on the shorter sequence the reference implementations build
(kept tokens only, merged states in place, positions renumbered 0..n-1), so true dropping, merging and compact
positions are checked together.
"""

import numpy as np
import pytest
import torch
from _families import IMAGE_TOKEN, assert_batch_generates_as_alone, assert_keep_one_generates_as_unpruned, build, inputs
from references import (
    cdpruner_reference,
    divprune_reference,
    scope_reference,
    visionzip_reference,
    vispruner_reference,
)

import lofi

TOWER_METHODS = ("scope", "visionzip", "vispruner")
METHODS = ("divprune", "cdpruner", *TOWER_METHODS)
TEXTS = [((5, 6), (7, 8, 9, 10)), ((5,), (7, 8, 9, 10, 11, 12, 13)), ((5, 6, 7, 8), (9,))]


@pytest.fixture(scope="module")
def llava():
    model = build("llava")
    batch = inputs(model, [(16, 16)] * 3, TEXTS, seed=3)
    return model, batch


@torch.no_grad()
def _language_model_inputs(model, batch) -> torch.Tensor:
    """The inputs_embeds the language model receives from the unpruned model."""
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        model(**batch)
    finally:
        hook.remove()
    return seen["embeds"]


@torch.no_grad()
def _tower(model, pixels):
    """(patch states the projector reads [images, P, d], [CLS] attention summed over heads [images, P], keys
    averaged over heads [images, P, dk]) from an eager copy of the tower's attention probabilities."""
    vision = model.model.vision_tower
    before = vision.config._attn_implementation
    vision.config._attn_implementation = "eager"
    try:
        out = vision(pixels, output_hidden_states=True, output_attentions=True)
    finally:
        vision.config._attn_implementation = before
    layer = model.config.vision_feature_layer
    blocks = vision.encoder.layers
    block = len(blocks) + layer if layer < 0 else layer - 1
    attention = out.attentions[block][:, :, 0, 1:].sum(1)
    entering = out.hidden_states[block]
    attn = blocks[block].self_attn
    keys = attn.k_proj(blocks[block].layer_norm1(entering)).view(*entering.shape[:2], attn.num_heads, -1).mean(2)
    return out.hidden_states[layer][:, 1:], attention, keys[:, 1:]


def _reference_choice(method, model, batch, row, n_keep):
    """(kept visual indices, {visual index: merged LLM input state}) of sample ``row`` by the reference."""
    embeds = _language_model_inputs(model, batch)[row]
    ids = batch["input_ids"][row]
    visual = ids == IMAGE_TOKEN
    positions = visual.nonzero()[:, 0]
    projected = embeds[visual].double().numpy()
    if method == "divprune":
        return divprune_reference(projected, n_keep), {}
    if method == "cdpruner":
        real = batch["attention_mask"][row].bool()
        instruction = real & ~visual & (torch.arange(len(ids)) > positions[-1])
        return cdpruner_reference(projected, n_keep, projected, embeds[instruction].double().numpy(),
                                  negate_relevance=False), {}
    states, attention, keys = (t[row].double().numpy() for t in _tower(model, batch["pixel_values"]))
    if method == "scope":
        return scope_reference(states, n_keep, attention), {}
    if method == "vispruner":
        return vispruner_reference(states, n_keep, attention / model.config.vision_config.num_attention_heads), {}
    contextual = min(round(n_keep * 10 / 64), n_keep - 1)
    ref = visionzip_reference(states, n_keep - contextual, attention, keys, contextual)
    merged = model.model.multi_modal_projector(torch.from_numpy(ref.merged).float())
    return np.sort(np.concatenate([ref.kept, ref.contextual])), dict(zip(ref.contextual.tolist(), merged))


@torch.no_grad()
def _shorter_sequence_logits(model, batch, row, kept, merged) -> torch.Tensor:
    """Last-position logits of the unpruned language model on sample ``row``'s kept tokens, merged states in
    place, numbered 0..n-1: the sequence the reference implementations hand the language model."""
    embeds = _language_model_inputs(model, batch)[row]
    ids, real = batch["input_ids"][row], batch["attention_mask"][row].bool()
    rows, rank = [], 0
    for position in range(len(ids)):
        if not real[position]:
            continue
        if ids[position] == IMAGE_TOKEN:
            if rank in kept:
                rows.append(merged.get(rank, embeds[position]))
            rank += 1
        else:
            rows.append(embeds[position])
    shorter = torch.stack(rows)[None]
    positions = torch.arange(len(rows))[None]
    hidden = model.model.language_model(inputs_embeds=shorter, position_ids=positions).last_hidden_state
    return model.lm_head(hidden[:, -1])[0]


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_each_method_keeps_what_its_reference_keeps_and_the_model_sees_the_shorter_sequence(llava, method, keep):
    model, batch = llava
    with lofi.pruned(model, method, keep=keep) as handle:
        logits = model(**batch).logits[:, -1]
    n_visual = int((batch["input_ids"][0] == IMAGE_TOKEN).sum())
    n_keep = handle.method.n_keep_of(n_visual)
    for row in range(batch["input_ids"].shape[0]):
        kept, merged = _reference_choice(method, model, batch, row, n_keep)
        assert handle.kept_lists()[row] == kept.tolist(), f"{method}, sample {row}"
        expected = _shorter_sequence_logits(model, batch, row, set(kept.tolist()), merged)
        torch.testing.assert_close(logits[row], expected, atol=2e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_cdpruner_without_relevance_keeps_the_dpp_of_the_similarity_kernel_alone(llava, keep):
    model, batch = llava
    with lofi.pruned(model, "cdpruner", keep=keep) as conditioned:
        model(**batch)
    with lofi.pruned(model, "cdpruner", keep=keep, relevance="none") as plain:
        logits = model(**batch).logits[:, -1]
    n_visual = int((batch["input_ids"][0] == IMAGE_TOKEN).sum())
    n_keep = plain.method.n_keep_of(n_visual)
    embeds = _language_model_inputs(model, batch)
    for row in range(batch["input_ids"].shape[0]):
        kept = cdpruner_reference(embeds[row][batch["input_ids"][row] == IMAGE_TOKEN].double().numpy(), n_keep)
        assert plain.kept_lists()[row] == kept.tolist(), f"sample {row}"
        expected = _shorter_sequence_logits(model, batch, row, set(kept.tolist()), {})
        torch.testing.assert_close(logits[row], expected, atol=2e-5, rtol=0)
    assert plain.kept_lists() != conditioned.kept_lists()  # the relevance moves the choice on these samples


@pytest.mark.parametrize("options,message", [({"relevance": "clip"}, "relevance must be one of"),
                                             ({"relevance": "none", "theta": 0.5}, "leave them at None"),
                                             ({"relevance": "none", "negate_relevance": True}, "leave them at None")])
def test_cdpruner_refuses_a_relevance_it_cannot_apply_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as error:
        lofi.build("cdpruner", **options)
    assert "\n" not in str(error.value)


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_keep_one_runs_as_the_unpruned_model(llava, method):
    model, batch = llava
    assert_keep_one_generates_as_unpruned(model, batch, method, new_tokens=4)


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_a_ragged_batch_generates_what_each_sample_generates_alone(llava, method):
    model, batch = llava
    assert_batch_generates_as_alone(model, batch, method, keep=0.3, new_tokens=4)


@torch.no_grad()
@pytest.mark.parametrize("method", ["divprune", "cdpruner"])
@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_methods_on_the_language_models_inputs_run_on_other_families(family, method):
    """Qwen2-VL keeps original M-RoPE positions (the third-party Qwen ports' rule); LLaVA-NeXT's newline rows
    stay. The kept set is the reference's over the sample's prunable visual tokens."""
    model = build(family)
    images = [(1, 4, 4), (1, 4, 6)] if family == "qwen2_vl" else [(16, 16), (32, 16)]
    batch = inputs(model, images, seed=1)
    with lofi.pruned(model, method, keep=0.3) as handle:
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert handle.positions == ("original" if family == "qwen2_vl" else "compact")
    embeds = _language_model_inputs(model, batch)
    prunable = handle.family.prunable_mask(handle.family.visual_mask(batch["input_ids"]), embeds)
    for row in range(2):
        visual = handle.family.visual_mask(batch["input_ids"][row:row + 1])[0]
        features = embeds[row][prunable[row]].double().numpy()
        n_keep = handle.method.n_keep_of(len(features))
        if method == "divprune":
            expected = divprune_reference(features, n_keep)
        else:
            real = batch["attention_mask"][row].bool()
            after = torch.arange(len(visual)) > visual.nonzero()[-1, 0]
            instruction = embeds[row][real & after & ~visual].double().numpy()
            expected = cdpruner_reference(features, n_keep, features, instruction, negate_relevance=False)
        ranks = torch.cumsum(visual.long(), 0)[prunable[row]] - 1  # visual index of each prunable token
        assert handle.kept_lists()[row] == ranks[torch.from_numpy(expected)].tolist()


def test_compact_positions_are_refused_on_multimodal_rope():
    model = build("qwen2_vl")
    with pytest.raises(ValueError, match="compact") as error:
        with lofi.pruned(model, "divprune", keep=0.3, positions="compact"):
            pass
    assert "\n" not in str(error.value)


@torch.no_grad()
@pytest.mark.parametrize("method", ["visionzip", "divprune"])
def test_replay_applies_the_merged_states_and_the_numbering_again(llava, method):
    model, batch = llava
    with lofi.pruned(model, method, keep=0.3) as handle:
        first = model(**batch).logits
    assert (handle.merged[0] is not None) == (method == "visionzip")
    with lofi.pruned(model, handle.replay()) as again:
        second = model(**batch).logits
    assert again.positions == "compact"
    assert torch.equal(again.kept[0], handle.kept[0])
    assert torch.equal(second, first)
