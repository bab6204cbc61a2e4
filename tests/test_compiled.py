"""The opt-in compiled path (``lofi.compiled``): pruning under compiled layers computes what it computes
eagerly (prefill and generate, every family), a new keep fraction compiles nothing, and the model is
given back exactly as it was. Dynamo's ``eager`` backend traces as the GPU path does but runs the traced
graphs with the same kernels, so its results must be bit-identical; inductor (slow lane) is held to
float tolerance."""

from contextlib import nullcontext

import pytest
import torch
from _families import FAMILIES, build, inputs
from _tiny import make_inputs, prompt_ids, tiny_llava
from torch._dynamo.utils import counters

import lofi
from lofi.compiled import compiled_modules
from lofi.methods.lvpruning import DecisionModules

METHODS = ["fastv", "lofi", "random", "lvpruning"]
_IMAGES = {"llava": [(16, 16)] * 2, "llava_next": [(16, 30), (30, 14)], "llava_onevision": [(40, 20), (16, 16)],
           "qwen2_vl": [(1, 4, 6), (1, 4, 8)], "qwen2_5_vl": [(1, 6, 8), (1, 4, 8)]}


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def batch():
    return make_inputs(prompts=[prompt_ids(3), prompt_ids(3, text_before=(5,))])  # left-padded


def method(name, model, keep=0.25):
    options = {"modules": DecisionModules.for_model(model)} if name == "lvpruning" else {}
    torch.manual_seed(0)
    return lofi.build(name, keep=keep, **options)


def _generate(model, batch):
    return model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


@torch.no_grad()
@pytest.mark.parametrize("name", METHODS)
def test_pruning_under_compiled_layers_computes_what_it_computes_eagerly(model, batch, name):
    pruning = method(name, model)
    with lofi.pruned(model, pruning) as handle:
        logits, generated = model(**batch).logits, _generate(model, batch)
        kept = handle.kept_lists()
    with lofi.compiled(model, backend="eager"), lofi.pruned(model, pruning) as handle:
        assert torch.equal(model(**batch).logits, logits)
        again = _generate(model, batch)
        assert handle.kept_lists() == kept
    assert torch.equal(again.sequences, generated.sequences)
    assert all(torch.equal(a, b) for a, b in zip(again.logits, generated.logits))


@torch.no_grad()
def test_keep_all_under_compiled_layers_is_the_compiled_unpruned_model(model, batch):
    with lofi.compiled(model, backend="eager"):
        unpruned = model(**batch).logits
        with lofi.pruned(model, "lofi", keep=1.0):
            assert torch.equal(model(**batch).logits, unpruned)


@torch.no_grad()
def test_a_new_keep_fraction_compiles_nothing(model, batch):
    """Dynamic shapes: one graph per layer serves every kept count."""
    with lofi.compiled(model, backend="eager"):
        with lofi.pruned(model, "random", keep=0.5):
            model(**batch)
        graphs = counters["stats"]["unique_graphs"]
        for keep in (0.25, 0.1):
            with lofi.pruned(model, "random", keep=keep):
                model(**batch)
        assert counters["stats"]["unique_graphs"] == graphs


@torch.no_grad()
def test_every_layer_gets_its_own_graph_past_the_recompile_limit():
    """Layers sharing one compiled function would pass torch's recompile limit (8) and run eagerly."""
    model = tiny_llava(layers=10)
    batch = make_inputs()
    before = counters["stats"]["unique_graphs"]
    with lofi.compiled(model, vision=False, backend="eager"):
        model(**batch)
    assert counters["stats"]["unique_graphs"] - before == 10


@torch.no_grad()
@pytest.mark.parametrize("name", [f for f in FAMILIES if f != "llava"])
def test_every_family_prunes_a_ragged_batch_under_compiled_layers(name):
    model = build(name)
    batch = inputs(model, _IMAGES[name], [((5, 6), (7, 8, 9, 10)), ((5,), (7, 8, 11, 12, 13))])
    with lofi.pruned(model, "fastv", keep=0.3) as handle:
        logits, kept = model(**batch).logits, handle.kept_lists()
    with lofi.compiled(model, backend="eager"), lofi.pruned(model, "fastv", keep=0.3) as handle:
        torch.testing.assert_close(model(**batch).logits, logits, atol=1e-6, rtol=0)
        assert handle.kept_lists() == kept


@torch.no_grad()
def test_compiled_layers_trace_whole_and_compile_once(batch):
    """No graph breaks, unpruned or pruned (the vision blocks' attention carries transformers' output-capturing
    hook, which reads a ContextVar), and nothing compiled again for a second call."""
    model = tiny_llava()  # compiled afresh
    counters.clear()
    with lofi.compiled(model, backend="eager"):
        model(**batch)
        graphs = counters["stats"]["unique_graphs"]
        model(**batch)
        assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
        with lofi.pruned(model, "fastv", keep=0.25):
            model(**batch)
    assert dict(counters["graph_break"]) == {}


@torch.no_grad()
def test_outputs_collected_by_transformers_hooks_are_the_eager_ones_under_compiled_layers(model, batch):
    from transformers.utils import output_capturing

    collector = output_capturing._active_collector
    eager = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    with lofi.compiled(model, backend="eager"):
        assert output_capturing._active_collector is not collector
        traced = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    assert output_capturing._active_collector is collector
    assert len(traced.hidden_states) == len(eager.hidden_states) > 1
    assert all(torch.equal(a, b) for a, b in zip(traced.hidden_states, eager.hidden_states))
    assert len(traced.attentions) == len(eager.attentions)


@torch.no_grad()
def test_the_model_is_given_back_exactly_after_an_error(model, batch):
    from transformers.utils import output_capturing

    collector = output_capturing._active_collector
    before = model(**batch).logits
    modules = compiled_modules(model)
    with pytest.raises(ValueError, match="inside"):
        with lofi.compiled(model, backend="eager"):
            assert all("forward" in vars(m) for m in modules)
            with pytest.raises(RuntimeError, match="already inside lofi.compiled"):
                with lofi.compiled(model):
                    pass
            raise ValueError("inside")
    assert not any("forward" in vars(m) for m in modules)
    assert output_capturing._active_collector is collector
    assert torch.equal(model(**batch).logits, before)
    with lofi.compiled(model, backend="eager"):  # usable again after the error
        assert torch.equal(model(**batch).logits, before)


@pytest.mark.parametrize("options, message", [({"mode": "fastest"}, "Unrecognized mode"),
                                              ({"backend": "nope"}, "Invalid backend"),
                                              ({"fuse": True}, "unexpected keyword")])
def test_a_bad_compile_option_fails_at_the_block_not_at_the_first_forward(model, options, message):
    with pytest.raises(Exception, match=message):
        with lofi.compiled(model, **options):
            pass
    assert not any("forward" in vars(m) for m in compiled_modules(model))


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("name", ["fastv", "lofi"])
def test_inductor_prunes_within_float_tolerance(model, batch, name):
    pruning = method(name, model)
    with lofi.pruned(model, pruning) as handle:
        logits, kept = model(**batch).logits, handle.kept_lists()
    with lofi.compiled(model), lofi.pruned(model, pruning) as handle:
        torch.testing.assert_close(model(**batch).logits, logits, atol=1e-5, rtol=1e-5)
        assert handle.kept_lists() == kept


@torch.no_grad()
def test_inside_compiled_the_pruning_step_runs_compiled_too(model, batch):
    from lofi import stage

    calls = []
    steps = stage.compiled_steps("eager")
    stage._COMPILED["eager"] = stage.Steps(*(lambda *a, f=f: calls.append(f) or f(*a) for f in steps))
    try:
        with lofi.pruned(model, "random", keep=0.25):
            model(**batch)
        assert not calls  # eager outside the block
        with lofi.compiled(model, backend="eager"), lofi.pruned(model, "random", keep=0.25):
            model(**batch)
        assert calls == list(steps)
    finally:
        stage._COMPILED["eager"] = steps


@pytest.mark.slow
def test_the_inductor_compiled_pruning_step_is_exact():
    """Index arithmetic and gathers only: compiled, the step gives the same integers and rows bit for bit,
    padding slots included."""
    from lofi import stage

    g = torch.Generator().manual_seed(0)
    current = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [-1, -1, 0, 1, 2, 3, 4, 5, 6, 7]])
    prunable = torch.zeros(2, 10, dtype=torch.bool)
    prunable[0, 2:8], prunable[1, 3:7] = True, True
    rank = torch.where(prunable, prunable.long().cumsum(1) - 1, -1)
    hidden = torch.randn(2, 10, 8, generator=g)
    chosen = torch.tensor([[4, 0, 2], [1, 3, -1]])
    compiled = stage.compiled_steps("inductor")
    results = []
    for steps in (stage.EAGER, compiled):
        order, valid, index = steps.candidates(prunable, rank, 6)
        results.append([order, valid, index, *steps.apply_choice(current, prunable, order, chosen, index, hidden, 7)])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert torch.equal(results[0][4], torch.tensor([[0, 2, 4], [1, 3, -1]]))  # kept visual indices
    # the uniform form (every row holds and keeps as many: batch 1), on the prompt as it came
    uniform = []
    for steps in (stage.EAGER, compiled):
        order, valid, index = steps.candidates(prunable[:1], None, 6, True)
        uniform.append([order, valid, index, *steps.apply_choice(current[:1], prunable[:1], order, chosen[:1], index,
                                                                 hidden[:1], 7, True, True)])
    assert all(torch.equal(a, b) for a, b in zip(*uniform))
    assert torch.equal(uniform[0][3], torch.tensor([[0, 1, 2, 4, 6, 8, 9]]))  # the kept positions


@torch.no_grad()
def test_capture_measures_the_same_under_compiled_layers(model, batch):
    """analysis' hooks stay eager around compiled layers: the same statistics, pruned or not."""
    from analysis.measure.capture import Capture

    def records(compile_backend):
        with Capture(model, spectra_on="device", leverage_layers=[2]) as capture, \
                (lofi.compiled(model, backend=compile_backend) if compile_backend else nullcontext()), \
                lofi.pruned(model, "lofi", keep=0.25):
            model(**batch)
        return [(r.layer, r.group, r.row, r.n_tokens, r.ipr, r.singular_values, r.leverage) for r in capture.take()]

    assert records("eager") == records(None)
