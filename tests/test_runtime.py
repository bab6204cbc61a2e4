"""Exactness of the pruning runtime: keep=1 is the identity, dropping equals masking, the KV cache,
batching, GQA and other image-token ids, and a model left exactly as it was."""

from contextlib import contextmanager, nullcontext

import pytest
import torch
from _tiny import N_VISUAL, emitting, make_inputs, positions, prompt_ids, tiny_llava

import lofi
from lofi.calls import CallTracker
from lofi.families import family_for
from lofi.sequence import Phase

METHODS = ["fastv", "lofi", "random"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@contextmanager
def masked_reference(model, layer, dropped, valid):
    """Unpruned sequence; from ``layer`` on no query may attend to a ``dropped`` token."""
    length = dropped.shape[1]
    idx = torch.arange(length)
    allowed = ((idx[None, :] <= idx[:, None])[None] & valid[:, None, :].bool() & ~dropped[:, None, :])[:, None]
    if model.config.text_config._attn_implementation == "eager":  # eager adds its mask to the scores
        allowed = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)

    def hook(module, args, kwargs):
        kwargs["attention_mask"] = allowed
        return args, kwargs

    layers = model.model.language_model.layers
    handles = [layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in range(layer, len(layers))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def kept_positions(inputs, kept, image_token=3):
    """Original sequence positions kept after pruning, [batch, n_kept_sequence]."""
    ids = inputs["input_ids"]
    is_visual = ids == image_token
    keep = ~is_visual
    visual_pos = is_visual.nonzero()[:, 1].view(len(ids), -1)
    keep.scatter_(1, visual_pos.gather(1, kept), True)
    return keep.nonzero()[:, 1].view(len(ids), -1), is_visual & ~keep


def with_positions(inputs):
    return {**inputs, "position_ids": positions(inputs["attention_mask"])}


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_reproduces_the_unpruned_model(model, method):
    inputs = make_inputs()
    base = model(**inputs).logits
    base_ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with lofi.pruned(model, method, keep=1.0, layer=2) as handle:
        out = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape == base.shape
    assert torch.equal(out, base)
    assert torch.equal(ids, base_ids)
    assert torch.equal(handle.kept[0], torch.arange(N_VISUAL)[None])


class _TwoStages(lofi.PruningMethod):
    """Random draws at layers 1 and 3, keeping every token at the first stage; counts its ``scores`` calls."""

    name = "two-stages"
    draws = True

    def __init__(self, keep):
        super().__init__(keep, 1)
        self.calls = 0

    def stages(self, num_layers):
        return [1, 3]

    def n_keep(self, stage, n_visual, n_present):
        return n_present if stage == 0 else super().n_keep(stage, n_visual, n_present)

    def scores(self, state):
        self.calls += 1
        return state.uniform(7)


@torch.no_grad()
@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_a_stage_that_keeps_everything_runs_nothing_and_equals_the_full_step(model, monkeypatch, keep):
    """A stage whose rows keep all they hold skips the method and the step (keep 0.25: the first stage; keep 1:
    both, and the prompt runs as the unpruned model), and a method that draws hashes nothing until a stage needs
    it; forcing the full steps gives the same logits, tokens and kept sets."""
    import lofi.seeding

    hashed, fingerprints = [], lofi.seeding.fingerprints
    monkeypatch.setattr(lofi.seeding, "fingerprints", lambda *a: hashed.append(1) or fingerprints(*a))
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8, 9))])
    runs = []
    for full_step in (False, True):
        if full_step:
            monkeypatch.setattr(lofi.stage, "keeps_everything", lambda *a: False)
        method, hashed[:] = _TwoStages(keep), []
        with lofi.pruned(model, method) as handle:
            logits = model(**inputs).logits
            kept, calls, hashes = [k.clone() for k in handle.kept], method.calls, len(hashed)
            ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        runs.append((logits, kept, ids, calls, hashes))
    (logits, kept, ids, calls, hashes), (full_logits, full_kept, full_ids, full_calls, full_hashes) = runs
    assert torch.equal(logits, full_logits) and torch.equal(ids, full_ids)
    assert len(kept) == len(full_kept) == 2 and all(torch.equal(a, b) for a, b in zip(kept, full_kept))
    assert torch.equal(kept[0], torch.arange(N_VISUAL).expand(2, -1))
    assert (calls, hashes, full_calls, full_hashes) == ((0, 0, 2, 1) if keep == 1 else (1, 1, 2, 1))


@pytest.mark.parametrize("identity", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_the_uniform_form_of_the_step_gives_the_general_forms_results(identity, seed):
    """Rows that hold and keep as many prunable tokens (batch 1, a batch of one prompt) take the step's shorter
    form (lofi.stage, uniform=True): the same candidates, index, kept tokens and rows, bit for bit."""
    from lofi import stage

    g = torch.Generator().manual_seed(seed)
    batch, width, most, keep, d = 3, 12, 6, 4, 5
    prunable = torch.zeros(batch, width, dtype=torch.bool)
    for row in prunable:  # each row's 6 prunable tokens anywhere, some visual tokens not prunable
        row[torch.randperm(width, generator=g)[:most]] = True
    is_visual = prunable | (torch.rand(batch, width, generator=g) < 0.3)
    rank = torch.where(is_visual, is_visual.cumsum(1) - 1, -1)
    current = torch.arange(width).expand(batch, width) if identity else \
        torch.sort(torch.randperm(40, generator=g)[:width]).values.expand(batch, width)
    hidden = torch.randn(batch, width, d, generator=g)
    chosen = torch.stack([torch.randperm(most, generator=g)[:keep] for _ in range(batch)])
    new_width = width - most + keep
    results = []
    for uniform in (False, True):
        order, valid, index = stage.candidates(prunable, rank, most, uniform)
        results.append([order, valid, index, *stage.apply_choice(current, prunable, order, chosen, index, hidden,
                                                                 new_width, uniform, identity and uniform)])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    everything = prunable & is_visual  # every visual token prunable: the ranks need not be read
    assert torch.equal(stage.candidates(everything, None, most, True)[2],
                       stage.candidates(everything, torch.where(everything, everything.cumsum(1) - 1, -1), most)[2])


@torch.no_grad()
@pytest.mark.parametrize("method,layer", [(m, k) for m in METHODS for k in (0, 1, 2, 3) if (m, k) != ("fastv", 0)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dropping_equals_the_masked_reference(method, layer, attn):
    model = tiny_llava(attn=attn)
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8, 9, 11, 12))])
    inputs = with_positions(inputs)
    with lofi.pruned(model, method, keep=0.3, layer=layer) as handle:
        out = model(**inputs, use_cache=False).logits
    n_keep = handle.kept[0].shape[1]
    assert n_keep == 5  # ceil(0.3 * 16)
    keep_pos, dropped = kept_positions(inputs, handle.kept[0])
    assert out.shape[1] == inputs["input_ids"].shape[1] - N_VISUAL + n_keep
    with masked_reference(model, layer, dropped, inputs["attention_mask"]):
        ref = model(**inputs, use_cache=False).logits
    ref = ref.gather(1, keep_pos[..., None].expand(-1, -1, ref.shape[-1]))
    valid = inputs["attention_mask"].bool().gather(1, keep_pos)
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_generate_equals_repeated_forward_passes_with_the_same_kept_set(model, layer):
    inputs = make_inputs(seed=3)
    with lofi.pruned(model, "lofi", keep=0.25, layer=layer) as handle:
        gen = model.generate(**inputs, max_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    kept = handle.kept[0]
    ids = inputs["input_ids"]
    for step, step_logits in enumerate(gen.logits):
        with lofi.pruned(model, lofi.Replay([layer], [kept])):
            full = model(input_ids=ids, pixel_values=inputs["pixel_values"], use_cache=False).logits[:, -1]
        torch.testing.assert_close(step_logits, full, atol=ATOL, rtol=0)
        ids = torch.cat([ids, full.argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen.sequences, ids)


@torch.no_grad()
def test_kv_cache_holds_exactly_the_tokens_each_layer_saw(model):
    inputs = make_inputs()
    length = inputs["input_ids"].shape[1]
    with lofi.pruned(model, "fastv", keep=0.25, layer=2):
        out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    seen = [cache.layers[i].keys.shape[-2] for i in range(len(cache.layers))]
    assert seen == [length, length, length - 12, length - 12]


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_a_padded_batch_equals_its_samples_one_by_one(model, method):
    prompts = [prompt_ids(3), prompt_ids(3, (5, 6, 12, 13), (7,)), prompt_ids(3, (), (7, 8, 9, 10, 11, 14))]
    batch = make_inputs(prompts=prompts, seed=1)
    with lofi.pruned(model, method, keep=0.5, layer=2) as handle:
        logits = model(**with_positions(batch)).logits
        generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
        kept = handle.kept[0]
    for row in range(len(prompts)):
        single = {"input_ids": torch.tensor([prompts[row]]), "pixel_values": batch["pixel_values"][row:row + 1],
                  "attention_mask": torch.ones(1, len(prompts[row]), dtype=torch.long)}
        with lofi.pruned(model, method, keep=0.5, layer=2) as handle:
            alone = model(**single).logits
            alone_ids = model.generate(**single, max_new_tokens=5, do_sample=False)
        assert torch.equal(handle.kept[0][0], kept[row])
        torch.testing.assert_close(logits[row, -alone.shape[1]:], alone[0], atol=ATOL, rtol=0)
        assert torch.equal(generated[row, -5:], alone_ids[0, -5:])


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_gqa_and_another_image_token_id(method):
    model = tiny_llava(kv_heads=2, image_token=57)
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads
    inputs = with_positions(make_inputs(image_token=57, prompts=[prompt_ids(57), prompt_ids(57, (5,), (7,))]))
    base = model(**inputs).logits
    with lofi.pruned(model, method, keep=1.0, layer=1):
        torch.testing.assert_close(model(**inputs).logits, base, atol=ATOL, rtol=0)
    layer = 1
    with lofi.pruned(model, method, keep=0.25, layer=layer) as handle:
        out = model(**inputs, use_cache=False).logits
    keep_pos, dropped = kept_positions(inputs, handle.kept[0], image_token=57)
    with masked_reference(model, layer, dropped, inputs["attention_mask"]):
        ref = model(**inputs, use_cache=False).logits.gather(1, keep_pos[..., None].expand(-1, -1, base.shape[-1]))
    valid = inputs["attention_mask"].bool().gather(1, keep_pos)
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=0)


@torch.no_grad()
def test_kept_indices_are_sorted_and_in_range(model):
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7,))])
    for method in METHODS:
        with lofi.pruned(model, method, keep=0.4, layer=2) as handle:
            model(**inputs)
        kept = handle.kept[0]
        assert kept.shape == (2, 7) and kept.dtype == torch.long
        assert bool((kept.diff(dim=1) > 0).all()) and kept.min() >= 0 and kept.max() < N_VISUAL


@torch.no_grad()
def test_random_is_seeded_and_fastv_ranks_by_attention(model):
    inputs = make_inputs()
    runs = []
    for seed in (0, 0, 1):
        with lofi.pruned(model, "random", keep=0.5, seed=seed) as handle:
            model(**inputs)
        runs.append(handle.kept[0])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with lofi.pruned(model, "random", keep=0.5, seed=0) as handle:  # the same prompt with another image
        model(**make_inputs(seed=5))
    assert not torch.equal(handle.kept[0], runs[0])
    # FastV's ranking equals the attention weights the eager kernel returns at layer K-1
    eager = tiny_llava(attn="eager")
    out = eager(**inputs, output_attentions=True)
    received = out.attentions[1][0, :, -1].mean(0)  # layer 1, last query, mean over heads
    visual = (inputs["input_ids"][0] == 3).nonzero()[:, 0]
    expected = received[visual].topk(8).indices.sort().values
    with lofi.pruned(eager, "fastv", keep=0.5, layer=2) as handle:
        eager(**inputs)
    assert torch.equal(handle.kept[0][0], expected)
    assert model.config.text_config._attn_implementation == "sdpa"


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_replay_keeps_the_recorded_tokens_when_the_prompt_grows(model, method):
    """A pass over prompt + answer re-pruned would rank by the answer (fastv) or draw again (random);
    ``handle.replay()`` applies the prompt's own choice."""
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8))], seed=2)
    with lofi.pruned(model, method, keep=0.25, layer=2) as handle:
        prompt_logits = model(**with_positions(inputs)).logits
    grown = {"input_ids": torch.cat([inputs["input_ids"], torch.tensor([[40, 41], [42, 43]])], 1),
             "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1),
             "pixel_values": inputs["pixel_values"]}
    with lofi.pruned(model, handle.replay()) as again:
        logits = model(**with_positions(grown)).logits
    assert all(torch.equal(a, b) for a, b in zip(again.kept, handle.kept))
    torch.testing.assert_close(logits[:, :-2], prompt_logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="batch of 2"):
        with lofi.pruned(model, handle.replay()):
            model(**make_inputs())
    with pytest.raises(ValueError, match="not present"):
        with lofi.pruned(model, lofi.Replay([2], [torch.tensor([[0, N_VISUAL + 3]])])):  # no such token
            model(**make_inputs())
    with pytest.raises(RuntimeError, match="nothing to replay"):
        with lofi.pruned(model, "random", keep=0.5) as empty:
            empty.replay()


@torch.no_grad()
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fastvs_shorter_form_for_unpadded_rows_gives_the_masked_forms_attention(kv_heads):
    """attention_received's dense form (no padding: the last column is every row's last token and sees every key;
    one rotation; query heads grouped by key-value head) gives the general form's attention, GQA included."""
    from lofi.attention import attention_received

    model = tiny_llava(kv_heads=kv_heads)
    family, layer = family_for(model), model.model.language_model.layers[1]
    g = torch.Generator().manual_seed(kv_heads)
    batch, n = 2, 11
    hidden = torch.randn(batch, n, 64, generator=g)
    positions = torch.arange(3, 3 + n).expand(batch, n)
    rotary = model.model.language_model.rotary_emb(hidden, positions)
    index, valid = positions, torch.ones(batch, n, dtype=torch.bool)
    text = torch.rand(batch, n, generator=g) < 0.5
    general = attention_received(family, layer, hidden, rotary, "last", index, valid, text)
    dense = attention_received(family, layer, hidden, rotary, "last", index, valid, text, dense=True)
    torch.testing.assert_close(dense, general, atol=1e-6, rtol=1e-5)
    assert dense.shape == (batch, n) and torch.allclose(dense.sum(1), torch.ones(batch))


def test_pruned_refuses_a_missing_model_and_a_static_cache(model):
    with pytest.raises(TypeError, match="needs the model"):
        with lofi.pruned(None, "lofi", keep=0.5):
            pass
    from transformers import StaticCache
    inputs = make_inputs()
    cache = StaticCache(config=model.config.text_config, max_cache_len=64)
    with pytest.raises(ValueError, match="dynamic KV cache"):
        with lofi.pruned(model, "lofi", keep=0.5), torch.no_grad():
            model(**inputs, past_key_values=cache, use_cache=True)


@torch.no_grad()
def test_the_layer_hooks_leave_plain_decoding_steps_and_come_back_for_the_next_prompt(model):
    """One new token of an unpadded batch needs nothing of the layers' hooks, so they are removed for it; a padded
    batch keeps them (its masks differ per layer), and a prompt that keeps every token needs none at all; none
    stay after the block, also when a decoding step fails."""
    layers = model.model.language_model.layers
    hooked = lambda: sum(len(layer._forward_pre_hooks) for layer in layers)  # noqa: E731
    before, counts, armed = hooked(), [], len(layers) - 2
    with lofi.pruned(model, "lofi", keep=0.5, layer=2):
        probe = layers[0].register_forward_pre_hook(lambda *a: counts.append(hooked() - before - 1))
        try:
            model.generate(**make_inputs(), max_new_tokens=3, do_sample=False)
            model.generate(**make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7,))]), max_new_tokens=3,
                           do_sample=False)
        finally:
            probe.remove()
    assert counts == [armed, 0, 0, armed, armed, armed] and hooked() == before
    counts.clear()
    with lofi.pruned(model, "lofi", keep=1.0, layer=2):  # nothing dropped: the model runs as it is, throughout
        probe = layers[0].register_forward_pre_hook(lambda *a: counts.append(hooked() - before - 1))
        try:
            model.generate(**make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7,))]), max_new_tokens=3,
                           do_sample=False)
        finally:
            probe.remove()
    assert counts == [0, 0, 0] and hooked() == before

    def fail_when_decoding(module, args):
        if args[0].shape[1] == 1:
            raise RuntimeError("boom")

    for prompts in ([prompt_ids(3)], [prompt_ids(3), prompt_ids(3, (5,), (7,))]):  # hooks off, hooks on
        failing = layers[-1].register_forward_pre_hook(fail_when_decoding)
        try:
            with pytest.raises(RuntimeError, match="boom"), lofi.pruned(model, "lofi", keep=0.5, layer=2):
                model.generate(**make_inputs(prompts=prompts), max_new_tokens=3, do_sample=False)
        finally:
            failing.remove()
        assert hooked() == before


@torch.no_grad()
def test_a_greedy_step_after_a_pruned_prompt_runs_the_unpruned_steps_kernels_and_two_runtime_ops(model):
    """A decoding step of an unpadded batch after a pruned prompt dispatches the unpruned step's aten ops in the
    same order (only the attention's key count differs) and, of its own, the positions that continue the
    prompt's numbering: one add and one view."""
    from _recording import ModelOps
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cut(StoppingCriteria):  # ends each step's share of the record
        def __init__(self, ops):
            self.ops, self.steps = ops, []

        def __call__(self, input_ids, scores, **kwargs):
            self.steps.append(([op[0] for op in self.ops.ops], list(self.ops.runtime)))
            self.ops.ops, self.ops.runtime = [], []
            return torch.zeros(len(input_ids), dtype=torch.bool)

    inputs = make_inputs(prompts=[prompt_ids(3)] * 2)
    runs = []
    for method in (None, "fastv", "lofi"):
        ops = ModelOps()
        cut = Cut(ops)
        with lofi.pruned(model, method, keep=0.25) if method else nullcontext(), ops:
            model.generate(**inputs, max_new_tokens=3, do_sample=False, stopping_criteria=StoppingCriteriaList([cut]))
        runs.append(cut.steps)
    unpruned = runs[0]
    assert len(unpruned) == 3 and all(not runtime for _, runtime in unpruned) and len(unpruned[1][0]) > 100
    for steps in runs[1:]:
        assert steps[0][1]  # the prefill pruned
        for (model_ops, runtime), (expected, _) in zip(steps[1:], unpruned[1:]):
            assert model_ops == expected
            assert runtime == ["aten.add.Tensor", "aten.unsqueeze.default"]


@torch.no_grad()
def test_each_call_sets_the_phase_the_layer_hooks_follow(model):
    """A prompt with visual tokens prefills and its cached continuations are decoding steps; a text-only prompt
    forgets the pruned sequence, so it and its steps leave the layers idle, as does a prompt kept whole
    (keep = 1) throughout; the next image prompt prefills again."""
    text_only = {"input_ids": torch.tensor([[1, 5, 6]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    padded = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7,))])
    prefill, decode, idle = Phase.PREFILL, Phase.DECODE, Phase.IDLE
    for keep, expected in ((0.5, [prefill, decode, decode, idle, idle, prefill]), (1.0, [idle] * 6)):
        phases = []
        with lofi.pruned(model, "lofi", keep=keep, layer=2):
            runtime = CallTracker.attached(family_for(model)).pruner
            probe = model.model.language_model.register_forward_pre_hook(lambda *a: phases.append(runtime.phase))
            try:
                model.generate(**padded, max_new_tokens=3, do_sample=False)
                model.generate(**text_only, max_new_tokens=2, do_sample=False)
                model(**make_inputs(seed=1))
            finally:
                probe.remove()
        assert phases == expected


@torch.no_grad()
def test_visual_tokens_after_a_cached_prefix_are_refused(model):
    """Whether a pruned prompt (a decoding step that brings an image) or an unpruned one filled the cache."""
    inputs = make_inputs()
    text_only = {"input_ids": torch.tensor([[1, 5, 6]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    for prefix in (inputs, text_only):
        with lofi.pruned(model, "lofi", keep=0.5):
            cache = model(**prefix, use_cache=True).past_key_values
            with pytest.raises(ValueError, match="visual tokens after a cached prefix are not supported"):
                model(**inputs, past_key_values=cache, use_cache=True)


class _Chooses(lofi.PruningMethod):
    """A method whose own ``select`` returns a fixed (possibly contract-breaking) choice."""

    name = "chooses"

    def __init__(self, chosen):
        super().__init__(0.25, 2)
        self.chosen = chosen

    def select(self, state):
        return self.chosen(state)


@pytest.mark.parametrize("chosen, message", [
    (lambda s: torch.zeros(s.visual.shape[0], 4, dtype=torch.long), "the same token twice"),
    (lambda s: torch.arange(3).expand(s.visual.shape[0], 3), "n_keep = \\[4\\] distinct"),
    (lambda s: torch.arange(4).expand(s.visual.shape[0], 4) + N_VISUAL, "n_keep = \\[4\\] distinct"),
    (lambda s: torch.arange(4), "expected \\(1, max n_keep\\)"),
])
def test_a_methods_own_select_is_checked_against_the_contract(model, chosen, message):
    with pytest.raises(RuntimeError, match=f"chooses.select {'returned shape' if 'expected' in message else ''}"
                       f".*{message}"), torch.no_grad(), lofi.pruned(model, _Chooses(chosen)):
        model(**make_inputs())


def test_the_inherited_select_keeps_the_contract_whatever_the_scores(model):
    class Unruly(lofi.PruningMethod):
        name = "unruly"

        def scores(self, state):  # NaN and ties everywhere: top-k of the masked scores still keeps n_keep tokens
            return torch.full(state.visual.shape, float("nan")).masked_fill(state.visual_index % 3 == 0, 1.0)

    batch = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, text_before=(5,))])
    with torch.no_grad(), lofi.pruned(model, Unruly(keep=0.25)) as handle:
        model(**batch)
    kept = handle.kept_lists()
    assert [len(row) for row in kept] == [4, 4] and all(len(set(row)) == 4 for row in kept)
    assert all(0 <= i < N_VISUAL for row in kept for i in row)


@pytest.mark.parametrize("method", METHODS + ["lvpruning"])
def test_a_pruned_prefill_reads_the_device_once(model, method):
    """Every stage's shapes come from the prompt's counts, copied to the host once: no other call that
    makes a GPU wait (.cpu(), .tolist(), int(), ...) happens in lofi/ during a pruned prefill."""
    from benchmarks.host_syncs import counting
    from lofi.methods.lvpruning import DecisionModules

    batch = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, text_before=(5,))])
    options = {"modules": DecisionModules.for_model(model)} if method == "lvpruning" else {}
    with torch.no_grad(), lofi.pruned(model, method, keep=0.25, **options) as handle:
        model(**batch)
        with counting() as counts:
            model(**batch)
    assert dict(counts) == {"cpu": 1}
    # a replay checks its recording (torch.equal) and its own select is checked, per stage: the counter sees both
    with torch.no_grad(), lofi.pruned(model, handle.replay()):
        with counting() as counts:
            model(**batch)
    stages = len(handle.stages)
    assert dict(counts) == {"cpu": 1, "equal": stages, "__bool__": stages}


def test_a_method_that_draws_without_saying_so_is_told_how_to_fix_it(model):
    class Undeclared(lofi.PruningMethod):
        name = "undeclared"

        def scores(self, state):
            return state.uniform(0)

    with pytest.raises(TypeError, match="set `draws = True`"), torch.no_grad(), lofi.pruned(model, Undeclared()):
        model(**make_inputs())
    Undeclared.draws = True
    with torch.no_grad(), lofi.pruned(model, Undeclared(keep=0.25)) as handle:
        model(**make_inputs())
    assert len(handle.kept_lists()[0]) == 4


@torch.no_grad()
def test_a_generated_image_token_after_a_text_prompt_is_text(model):
    """A text-only prompt leaves no pruned sequence: its decoding steps, one of which feeds back a generated image
    token id, run as the unpruned model's (they were refused as visual tokens after a cached prefix)."""
    text_only = {"input_ids": torch.tensor([[1, 5, 6]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    options = {"max_new_tokens": 3, "do_sample": False, **emitting(model.config.image_token_id, 3)}
    base = model.generate(**text_only, **options)
    assert base[0, 4] == model.config.image_token_id
    with lofi.pruned(model, "lofi", keep=0.5):
        assert torch.equal(model.generate(**text_only, **options), base)
