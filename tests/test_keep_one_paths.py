"""keep = 1 runs the unpruned model's own code path, not only its numbers: during ``generate()`` every module
of the model (multimodal model, language model, each decoder layer and its attention, ``lm_head``, vision tower
and projector) receives and returns what it does unpruned, down to strides, storage offsets, dtypes and the
masks the model skips, and the model dispatches the same aten ops on the same layouts. On every family, for
methods of each kind, unpadded (the benchmarks' batches) and left-padded. An argument that could steer another
device to another kernel (a materialised mask instead of SDPA's causal path, a strided copy) shows here as a
difference, even where the CPU computes the same numbers with it."""

from contextlib import nullcontext

import pytest
import torch
from _families import DEFAULT_IMAGES, FAMILIES, OTHER_IMAGES, build, inputs
from _recording import ModelOps, differences, module_calls

import lofi

# ranked by attention (a hook at K - 1), spectral, drawing, before the language model reading the vision tower
METHODS = ["fastv", "lofi", "random", "visionzip"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models' ops take microseconds: on a loaded machine two threads' barriers cost 100 times more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(model, name, padded: bool) -> dict:
    """Two copies of one prompt (as the benchmarks batch them), or a left-padded ragged batch: another image, and
    the first prompt with 4 fewer text tokens."""
    long, short = ((5, 6), (7, 8, 9, 10)), ((5,), (7,))
    if not padded:
        return inputs(model, [DEFAULT_IMAGES[name]] * 2, [long, long])
    return inputs(model, [DEFAULT_IMAGES[name], OTHER_IMAGES[name], DEFAULT_IMAGES[name]], [long, long, short])


@torch.no_grad()
def _recorded_generate(model, batch, method=None, perturb=None):
    """(module calls, the model's aten ops, generate's output) of one greedy ``generate()``; ``perturb``: a
    pre-hook put on decoder layer 1 for the run."""
    calls, ops = [], ModelOps()
    layer = model.model.language_model.layers[1]
    handle = layer.register_forward_pre_hook(perturb, with_kwargs=True) if perturb else None
    try:
        with (lofi.pruned(model, method, keep=1.0) if method else nullcontext()), module_calls(model, calls), ops:
            out = model.generate(**batch, max_new_tokens=2, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        if handle is not None:
            handle.remove()
    return calls, ops.ops, out


_MODELS: dict = {}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", FAMILIES)
def test_keep_one_generates_through_the_unpruned_models_calls_and_kernels(name, padded):
    if name not in _MODELS:
        _MODELS[name] = build(name)
    model = _MODELS[name]
    batch = _batch(model, name, padded)
    assert bool((batch["attention_mask"] == 0).any()) is padded
    base_calls, base_ops, base = _recorded_generate(model, batch)
    modules = {call[0] for call in base_calls}
    assert {"model.language_model.layers.3.self_attn", "lm_head", "model.multi_modal_projector"
            if not name.startswith("qwen") else "model.visual.merger"} <= modules
    assert sum(call[:2] == ("model.language_model", "call") for call in base_calls) == 2  # prefill, one step
    for method in METHODS:
        calls, ops, out = _recorded_generate(model, batch, method)
        assert differences(base_calls, calls) == [], method
        assert differences(base_ops, ops) == [], method
        assert torch.equal(out.sequences, base.sequences)


def test_the_records_tell_a_materialised_mask_and_a_strided_copy_from_the_models_own():
    """The records above can fail: a layer given SDPA's causal mask as a tensor (where the model passes None and
    SDPA takes its causal path), or its input as a strided copy of the same values, is told apart."""
    model = build("llava")
    batch = _batch(model, "llava", padded=False)
    base_calls, base_ops, _ = _recorded_generate(model, batch)

    def materialised_mask(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if kwargs.get("attention_mask") is None and hidden.shape[1] > 1:
            length = hidden.shape[1]
            kwargs["attention_mask"] = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        return args, kwargs

    def strided_copy(module, args, kwargs):
        if args:
            return (args[0].transpose(0, 1).contiguous().transpose(0, 1), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"].transpose(0, 1).contiguous().transpose(0, 1)
        return args, kwargs

    calls, ops, _ = _recorded_generate(model, batch, perturb=materialised_mask)
    found = differences(base_calls, calls)
    assert found and "model.language_model.layers.1" in found[0] and "attention_mask" in found[0]
    assert "None against tensor" in found[0]
    assert differences(base_ops, ops)
    calls, ops, _ = _recorded_generate(model, batch, perturb=strided_copy)
    found = differences(base_calls, calls)
    assert found and "model.language_model.layers.1" in found[0] and "strides" in found[0]
    assert differences(base_ops, ops)
