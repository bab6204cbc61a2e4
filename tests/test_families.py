"""Exactness on tiny random models of every family (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL) and of LLaVA with each language model (Llama, Mistral, Qwen2 with GQA, Qwen3 with q/k norms):
keep = 1 is the identity, true dropping equals an independent masked reference in prefill and
generate, a ragged batch equals its samples one by one, FastV ranks by the model's own eager attention,
newline rows stay, and the model is exactly as before after an exception."""

from contextlib import contextmanager

import pytest
import torch
from _families import (
    DEFAULT_IMAGES,
    FAMILIES,
    IMAGE_TOKEN,
    OTHER_IMAGES,
    VIDEO_TOKEN,
    _pixels,
    build,
    count_visual_tokens,
    inputs,
    sample,
)
from _tiny import emitting

import lofi
from lofi.families import family_class, family_for
from lofi.methods.lvpruning import DecisionModules

ATOL = 1e-5
METHODS = ["fastv", "lofi", "random"]
VARIANTS = [(f, "llama") for f in FAMILIES] + [("llava", lm) for lm in ("mistral", "qwen2", "qwen3")]
RAGGED = ["llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
_MODELS: dict = {}


def model_of(name, language_model="llama", attn="sdpa"):
    key = (name, language_model, attn)
    if key not in _MODELS:
        _MODELS[key] = build(name, language_model, attn)
    return _MODELS[key]


def batch_of(model, name, ragged=True, seed=0):
    images = [DEFAULT_IMAGES[name], OTHER_IMAGES[name] if ragged else DEFAULT_IMAGES[name]]
    return inputs(model, images, [((5, 6), (7, 8, 9, 10)), ((5,), (7, 8, 11, 12, 13))], seed=seed)


def newline_positions(model, batch) -> torch.Tensor:
    """[B, T] bool: newline rows, from the family's token layout of each image (not from the runtime)."""
    ids = batch["input_ids"]
    out = torch.zeros_like(ids, dtype=torch.bool)
    sizes = batch.get("image_sizes")
    for b in range(len(ids)):
        visual = torch.isin(ids[b], torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN])).nonzero()[:, 0]
        if sizes is None:
            continue
        tiles = family_class(model.config).tiles(model.config, tuple(sizes[b].tolist()))
        for tile in tiles:
            for i in range(tile.start, tile.start + tile.tokens):
                if tile.cell(i) is None:
                    out[b, visual[i]] = True
    return out


def dropped_positions(model, batch, kept) -> torch.Tensor:
    """[B, T] bool: visual positions neither kept nor newline rows."""
    ids = batch["input_ids"]
    visual = torch.isin(ids, torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN]))
    dropped = visual & ~newline_positions(model, batch)
    for b in range(len(ids)):
        positions = visual[b].nonzero()[:, 0]
        dropped[b, positions[[i for i in kept[b].tolist() if i >= 0]]] = False
    return dropped


@contextmanager
def masked_reference(model, layer, dropped, valid):
    """The unpruned model; from ``layer`` on no query attends to a ``dropped`` prompt token (any call:
    prefill or decoding)."""
    eager = model.config.text_config._attn_implementation == "eager"

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        queries = hidden.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0
        total = past + queries
        grow = total - valid.shape[1]
        key_valid = torch.cat([valid.bool(), torch.ones(len(valid), max(grow, 0), dtype=torch.bool)], 1)[:, :total]
        key_dropped = torch.cat([dropped, torch.zeros(len(valid), max(grow, 0), dtype=torch.bool)], 1)[:, :total]
        keys, rows = torch.arange(total), past + torch.arange(queries)
        allowed = (keys[None, None] <= rows[None, :, None]) & (key_valid & ~key_dropped)[:, None, :]
        allowed = allowed[:, None]
        if eager:
            allowed = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        kwargs["attention_mask"] = allowed
        return args, kwargs

    layers = family_for(model).layers()
    handles = [layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in range(layer, len(layers))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _generate(model, batch, steps=4, **options):
    out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **options)
    return out.sequences, torch.stack(out.logits, 1)


def _lvpruning_path(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lvp") / "modules"
    torch.manual_seed(0)
    DecisionModules.for_model(model).save(folder)
    return folder


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS + ["lvpruning"])
@pytest.mark.parametrize("name,language_model", VARIANTS)
def test_keep_all_reproduces_the_unpruned_model(name, language_model, method, tmp_path_factory):
    """Bit for bit: a padded ragged batch, and one sample alone (whose decoding steps run without the layers'
    hooks)."""
    model = model_of(name, language_model)
    options = {"layer": 2} if method != "lvpruning" else {
        "path": _lvpruning_path(model, tmp_path_factory), "offsets": (0, 0, 0)}
    for batch in (batch_of(model, name), sample(batch_of(model, name), 0)):
        base = model(**batch).logits
        base_ids, base_steps = _generate(model, batch)
        with lofi.pruned(model, method, keep=1.0, **options) as handle:
            out = model(**batch).logits
            ids, steps = _generate(model, batch)
        assert torch.equal(out, base) and torch.equal(steps, base_steps) and torch.equal(ids, base_ids)
        assert torch.equal((handle.kept[0] >= 0).sum(1), handle.n_prunable)


@torch.no_grad()
@pytest.mark.parametrize("method,layer", [("fastv", 1), ("fastv", 3), ("lofi", 0), ("lofi", 2), ("random", 2)])
@pytest.mark.parametrize("name,language_model", VARIANTS)
def test_dropping_equals_the_masked_reference_in_prefill_and_generate(name, language_model, method, layer):
    model = model_of(name, language_model)
    batch = batch_of(model, name)
    with lofi.pruned(model, method, keep=0.3, layer=layer) as handle:
        out = model(**batch, use_cache=False).logits
        index = handle.sequence_index(len(family_for(model).layers()))
        kept = handle.kept[0]
        ids, steps = _generate(model, batch)
    assert torch.equal(handle.kept[0], kept)  # generate's prefill chose the same tokens
    expected = torch.ceil(0.3 * handle.n_prunable - 1e-9).long()
    assert torch.equal((kept >= 0).sum(1), expected)
    dropped = dropped_positions(model, batch, kept)
    assert torch.equal(dropped.sum(1), handle.n_prunable - expected)
    with masked_reference(model, layer, dropped, batch["attention_mask"]):
        reference = model(**batch, use_cache=False).logits
        ref_ids, ref_steps = _generate(model, batch)
    real = index >= 0
    valid = real & batch["attention_mask"].bool().gather(1, index.clamp_min(0))
    reference = reference.gather(1, index.clamp_min(0)[..., None].expand(-1, -1, reference.shape[-1]))
    torch.testing.assert_close(out[valid], reference[valid], atol=ATOL, rtol=0)
    torch.testing.assert_close(steps, ref_steps, atol=ATOL, rtol=0)
    assert torch.equal(ids, ref_ids)


@torch.no_grad()
@pytest.mark.parametrize("name,language_model", VARIANTS)
def test_a_generated_image_token_is_text_as_in_the_unpruned_model(name, language_model):
    """A decoding step that feeds back a generated image token id brings no pixels, and the model embeds it as
    text: pruned generation runs on, bit for bit the unpruned model at keep = 1 and the masked reference at
    keep 0.3 (it was refused as visual tokens after a cached prefix)."""
    model = model_of(name, language_model)
    batch = batch_of(model, name)
    emits = emitting(IMAGE_TOKEN, batch["input_ids"].shape[1])
    base_ids, base_steps = _generate(model, batch, **emits)
    assert (base_ids[:, -3] == IMAGE_TOKEN).all()
    with lofi.pruned(model, "fastv", keep=1.0, layer=1):
        ids, steps = _generate(model, batch, **emits)
    assert torch.equal(ids, base_ids) and torch.equal(steps, base_steps)
    with lofi.pruned(model, "fastv", keep=0.3, layer=1) as handle:
        ids, steps = _generate(model, batch, **emits)
    with masked_reference(model, 1, dropped_positions(model, batch, handle.kept[0]), batch["attention_mask"]):
        ref_ids, ref_steps = _generate(model, batch, **emits)
    torch.testing.assert_close(steps, ref_steps, atol=ATOL, rtol=0)
    assert torch.equal(ids, ref_ids) and (ids[:, -3] == IMAGE_TOKEN).all()


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS + ["lvpruning"])
@pytest.mark.parametrize("name", RAGGED)
def test_a_ragged_batch_equals_its_samples_one_by_one(name, method, tmp_path_factory):
    model = model_of(name)
    batch = batch_of(model, name)
    options = {"layer": 2} if method != "lvpruning" else {"path": _lvpruning_path(model, tmp_path_factory)}
    keep = 0.3 if method != "lvpruning" else 0.6
    with lofi.pruned(model, method, keep=keep, **options) as handle:
        logits = model(**batch).logits
        ids, _ = _generate(model, batch)
        kept = [handle.kept_lists(s) for s in range(len(handle.kept))]
        n_visual = handle.n_visual.tolist()
    assert n_visual[0] != n_visual[1]  # a ragged batch
    for row in range(2):
        alone = sample(batch, row)
        with lofi.pruned(model, method, keep=keep, **options) as handle:
            single = model(**alone).logits
            single_ids, _ = _generate(model, alone)
        assert [handle.kept_lists(s)[0] for s in range(len(kept))] == [k[row] for k in kept]
        torch.testing.assert_close(logits[row, -single.shape[1]:], single[0], atol=ATOL, rtol=0)
        assert torch.equal(ids[row, -4:], single_ids[0, -4:])


@torch.no_grad()
@pytest.mark.parametrize("name,language_model", [("llava", "llama"), ("llava", "qwen2"), ("llava", "qwen3"),
                                                 ("qwen2_vl", "llama"), ("llava_next", "llama")])
def test_fastv_ranks_by_the_models_own_eager_attention(name, language_model):
    """FastV's attention, rebuilt from layer K-1's projections (q/k norms and M-RoPE included), equals
    the attention weights the eager kernel returns."""
    model = model_of(name, language_model, attn="eager")
    batch = batch_of(model, name, ragged=False)
    out = model(**batch, output_attentions=True)
    received = out.attentions[1][:, :, -1].mean(1)  # layer 1 = K-1, last query, mean over heads
    with lofi.pruned(model, "fastv", keep=0.5, layer=2) as handle:
        model(**batch)
    ids = batch["input_ids"]
    visual = torch.isin(ids, torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN])) & ~newline_positions(model, batch)
    for b in range(len(ids)):
        ranks = torch.isin(ids[b], torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN])).long().cumsum(0) - 1
        positions = visual[b].nonzero()[:, 0]
        k = int((handle.kept[0][b] >= 0).sum())
        expected = ranks[positions[received[b, positions].topk(k).indices]].sort().values
        assert torch.equal(handle.kept[0][b][:k], expected)


@torch.no_grad()
@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_newline_rows_are_visual_but_never_pruned(name):
    model = model_of(name)
    batch = batch_of(model, name)
    newline = newline_positions(model, batch)
    assert newline.sum(1).tolist() == [t.rows for t in (
        family_class(model.config).tiles(model.config, tuple(s.tolist()))[1] for s in batch["image_sizes"])]
    with lofi.pruned(model, "lofi", keep=0.05, layer=1) as handle:
        model(**batch)
    index = handle.sequence_index(1)
    for b in range(2):
        assert set(newline[b].nonzero()[:, 0].tolist()) <= set(index[b].tolist())
    assert torch.equal(handle.n_visual - handle.n_prunable, newline.sum(1))


@pytest.mark.parametrize("name", FAMILIES)
def test_the_layout_matches_the_models_own_token_count(name):
    model = model_of(name)
    family = family_class(model.config)
    generator = torch.Generator().manual_seed(0)
    images = {"llava": [(16, 16)], "qwen2_vl": [(1, 4, 6), (1, 8, 2), (2, 4, 4)], "qwen2_5_vl": [(1, 6, 8), (1, 10, 4)]}
    for image in images.get(name, [(16, 16), (16, 30), (30, 14), (40, 20), (20, 48), (48, 48)]):
        pixels, extra, n = _pixels(model, image, generator)
        n = n if n is not None else count_visual_tokens(model, pixels, extra)
        tiles = family.tiles(model.config, image)
        assert tiles[0].start + sum(t.tokens for t in tiles) == n


@torch.no_grad()
@pytest.mark.parametrize("name", FAMILIES)
def test_random_draws_the_same_under_forward_and_generate_and_differs_between_images(name):
    model = model_of(name)
    batch = inputs(model, [DEFAULT_IMAGES[name]] * 2, seed=3)  # two images, the same question
    with lofi.pruned(model, "random", keep=0.5, layer=2) as handle:
        model(**batch)
        forward = handle.kept[0].clone()
        model.generate(**batch, max_new_tokens=1, do_sample=False)
    assert torch.equal(handle.kept[0], forward)
    assert not torch.equal(forward[0], forward[1])


@torch.no_grad()
@pytest.mark.parametrize("name", FAMILIES)
def test_the_model_is_unchanged_after_an_exception(name):
    model = model_of(name)
    batch = batch_of(model, name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    base = model(**batch).logits

    class Broken(lofi.PruningMethod):
        name = "broken"

        def scores(self, state):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with lofi.pruned(model, Broken(keep=0.5, layer=2)):
            model(**batch)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(**batch).logits, base, atol=0, rtol=0)


def test_an_unknown_model_class_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    with pytest.raises(lofi.families.UnsupportedModelError, match="Qwen2VLForConditionalGeneration"):
        with lofi.pruned(gpt2, "lofi", keep=0.5):
            pass


@torch.no_grad()
@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_a_continuation_call_continues_the_prompts_numbering(name):
    """After a pruned prefill at K = 0 every layer's cache is shorter than the sequence; a call that
    continues the cache without position ids must still number its tokens after the prompt."""
    model = model_of(name)
    batch = batch_of(model, name, ragged=False)
    more = torch.tensor([[11, 12], [13, 14]])
    mask = torch.cat([batch["attention_mask"], torch.ones_like(more)], 1)
    with lofi.pruned(model, "lofi", keep=0.3, layer=0) as handle:
        prefill = model(**batch, use_cache=True)
        continued = model(input_ids=more, attention_mask=mask, past_key_values=prefill.past_key_values).logits
    kept = handle.kept[0]
    whole = {**batch, "input_ids": torch.cat([batch["input_ids"], more], 1), "attention_mask": mask}
    if "mm_token_type_ids" in batch:
        whole["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(more).int()], 1)
    with masked_reference(model, 0, torch.cat([dropped_positions(model, batch, kept),
                                               torch.zeros_like(more, dtype=torch.bool)], 1), mask):
        reference = model(**whole).logits[:, -2:]
    torch.testing.assert_close(continued, reference, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "llava_next"])
def test_an_unpadded_batch_uses_sdpas_causal_path_and_still_equals_the_masked_reference(name, layer):
    """Without padding the pruned layers pass no mask (kept tokens keep their causal order); the result
    is the masked reference's, in prefill and in generate."""
    model = model_of(name)
    batch = inputs(model, [DEFAULT_IMAGES[name]] * 2, [((5, 6), (7, 8, 9)), ((6, 5), (9, 8, 7))], seed=4)
    assert bool(batch["attention_mask"].bool().all())
    masks = []
    hook = family_for(model).layers()[-1].register_forward_pre_hook(
        lambda m, a, k: masks.append(k.get("attention_mask")), with_kwargs=True)
    try:
        with lofi.pruned(model, "lofi", keep=0.3, layer=layer) as handle:
            out = model(**batch, use_cache=False).logits
            ids, steps = _generate(model, batch)
    finally:
        hook.remove()
    assert all(m is None for m in masks)
    dropped = dropped_positions(model, batch, handle.kept[0])
    with masked_reference(model, layer, dropped, batch["attention_mask"]):
        reference = model(**batch, use_cache=False).logits
        ref_ids, ref_steps = _generate(model, batch)
    index = handle.sequence_index(len(family_for(model).layers()))
    torch.testing.assert_close(out, reference.gather(1, index[..., None].expand(-1, -1, reference.shape[-1])),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(steps, ref_steps, atol=ATOL, rtol=0)
    assert torch.equal(ids, ref_ids)
