"""The call tracker: one reader of each call for the pruning runtime and Capture alike, in either nesting
order, gone when its last user leaves."""

import pytest
import torch
from _tiny import make_inputs, prompt_ids, tiny_llava

import lofi
from analysis.measure.capture import Capture
from lofi.calls import CallTracker
from lofi.families import Family, family_for


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _pre_hooks(module):
    return len(module._forward_pre_hooks)


@torch.no_grad()
def test_the_runtime_and_capture_read_each_call_from_one_tracker(model, monkeypatch):
    """The visual positions are worked out once per call for every reader; decoding steps read no ids; a
    language model call of its own reads nothing; the block's handle is on the tracker while it lasts."""
    mm, lm = model.model, model.model.language_model
    before = _pre_hooks(mm), _pre_hooks(lm)
    reads = []
    original = Family.call_visual_mask
    monkeypatch.setattr(Family, "call_visual_mask", lambda self, *a: reads.append(a[2]) or original(self, *a))
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7,))])
    calls = []
    with Capture(model) as capture, lofi.pruned(model, "lofi", keep=0.5, layer=2) as handle:
        tracker = CallTracker.attached(family_for(model))
        assert tracker.pruning is handle and lofi.active(model) is handle
        assert (_pre_hooks(mm), _pre_hooks(lm)) == (before[0] + 1, before[1] + 2)  # the tracker's, and Capture's
        probe = lm.register_forward_pre_hook(lambda *a: calls.append(tracker.call))
        try:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            lm(inputs_embeds=torch.zeros(1, 2, model.config.text_config.hidden_size))
        finally:
            probe.remove()
        assert len({r.call for r in capture.take()}) == 1
    assert lofi.active(model) is None and CallTracker.attached(family_for(model)) is None
    assert (_pre_hooks(mm), _pre_hooks(lm)) == before
    length = inputs["input_ids"].shape[1]
    prompt, *steps, direct = calls
    assert torch.equal(prompt.input_ids, inputs["input_ids"]) and torch.equal(prompt.attention_mask,
                                                                             inputs["attention_mask"])
    assert prompt.brings_visual and prompt.past == 0 and torch.equal(prompt.is_visual, inputs["input_ids"] == 3)
    assert [(s.brings_visual, s.past, s.is_visual) for s in steps] == [(False, length, None), (False, length + 1, None)]
    assert direct.input_ids is None and direct.is_visual is None
    assert reads == [0, length, length + 1, 0]  # once per call, though two read each


@torch.no_grad()
def test_capture_inside_or_outside_the_pruned_block_measures_the_same(model):
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7,))], seed=3)
    results = {}
    for order in ("outside", "inside"):
        if order == "outside":
            with Capture(model) as capture, lofi.pruned(model, "fastv", keep=0.25, layer=2):
                model(**inputs)
        else:
            with lofi.pruned(model, "fastv", keep=0.25, layer=2), Capture(model) as capture:
                model(**inputs)
        results[order] = [(r.layer, r.group, r.row, r.n_tokens, r.ipr) for r in capture.take()]
    assert results["outside"] == results["inside"]
    assert {n for layer, group, _, n, _ in results["inside"] if layer >= 2 and group == "visual"} == {4}


@torch.no_grad()
def test_users_leave_in_any_order_and_a_refused_call_leaves_the_tracker_working(model):
    mm = model.model
    before = _pre_hooks(mm)
    inputs = make_inputs()
    capture = Capture(model).__enter__()
    block = lofi.pruned(model, "lofi", keep=0.5, layer=2)
    handle = block.__enter__()
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]), pixel_values=inputs["pixel_values"])
    model(**inputs)
    capture.__exit__(None, None, None)  # before the pruned block it entered
    assert _pre_hooks(mm) == before + 1 and lofi.active(model) is handle
    model(**make_inputs(seed=1))
    block.__exit__(None, None, None)
    assert _pre_hooks(mm) == before and lofi.active(model) is None
    assert [len(row) for row in handle.kept_lists()] == [8]
    assert [(r.layer, r.n_tokens) for r in capture.take() if r.group == "visual"] == [
        (0, 16), (1, 16), (2, 8), (3, 8), (4, 8)]  # the one call it followed
