"""One condition of a comparison (``analysis.runner``): what its per-sample measures mean."""

import pytest
import torch

import lofi
from analysis.benchmark.datasets import load_split
from analysis.measure.capture import CaptureOptions
from analysis.study.records import BaselineOutputs
from analysis.study.runner import _forced_logits, _prompt_inputs, run_condition

COMMON = dict(batch_size=3, capture=CaptureOptions(groups=("visual",)), progress=False)


@pytest.fixture(scope="module")
def one_token_baseline(bundled_model):
    model, processor = bundled_model
    samples = load_split("test", limit=6)
    baseline = run_condition(model, processor, samples, method=None, baseline=None, max_new_tokens=1,
                             **COMMON).baseline
    return model, processor, samples, baseline


@pytest.mark.parametrize("method", ["fastv", "lofi", "random", "lvpruning"])
def test_forced_kl_equals_kl_for_one_token_answers(one_token_baseline, method):
    """The forced pass replays the generation's kept tokens: for a one-token answer it scores the very
    distribution KL compares (pruning again on prompt + answer would rank by the answer token)."""
    model, processor, samples, baseline = one_token_baseline
    rows = run_condition(model, processor, samples, method=lofi.build(method, keep=0.25), baseline=baseline,
                         max_new_tokens=1, **COMMON).samples
    one = [r for r, n in zip(rows, baseline.answer_lengths) if n == 1]
    assert len(one) >= 4 and any(r.kl > 1e-4 for r in one)
    for r in one:
        assert r.forced_kl == r.kl, r.sample_id


@torch.no_grad()
@pytest.mark.parametrize("method", ["fastv", "random"])
def test_a_changed_answer_is_teacher_forced_under_the_generations_kept_tokens(bundled_model, method):
    model, processor = bundled_model
    samples = load_split("test", limit=3)
    inputs = _prompt_inputs(processor, samples, "cpu")
    with lofi.pruned(model, method, keep=0.25) as handle:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    answer = processor.tokenizer.convert_tokens_to_ids(["no", "red", "circle"])  # not what it generated
    valid = inputs["attention_mask"].bool()
    sequences = [inputs["input_ids"][b][valid[b]].tolist() + answer for b in range(3)]
    baseline = BaselineOutputs([""] * 3, None, sequences, [3] * 3)
    generated = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert all(generated[b, :2].tolist() != answer[:2] for b in range(3))
    step_logits = torch.stack(out.logits, 1).float()
    forced = _forced_logits(model, processor, samples, baseline, range(3), generated, step_logits, handle.replay())
    # reference: one forward pass over prompt + answer under the recorded kept tokens
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer] * 3)], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(3, 3, dtype=torch.long)], 1)
    with lofi.pruned(model, handle.replay()) as again:
        reference = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                          use_cache=False).logits[:, -4:-1]
    assert all(torch.equal(a, b) for a, b in zip(again.kept, handle.kept))
    for b in range(3):
        torch.testing.assert_close(forced[b], reference[b], atol=2e-4, rtol=0)
        assert torch.equal(forced[b][0], step_logits[b, 0])


@torch.no_grad()
def test_the_teacher_forced_pass_numbers_positions_as_generate_does(bundled_model):
    """A left-padded row is numbered from its first real token, as ``generate()`` numbers it: its forced KL
    then does not move with the padding its batch-mates bring."""
    from analysis.study.runner import _teacher_forced
    model, processor = bundled_model
    samples = load_split("test", limit=40)
    lengths = [int(_prompt_inputs(processor, [s], "cpu")["attention_mask"].sum()) for s in samples]
    pair = [samples[lengths.index(min(lengths))], samples[lengths.index(max(lengths))]]
    assert min(lengths) < max(lengths)  # the first row is left-padded
    inputs = _prompt_inputs(processor, pair, "cpu")
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True)
    try:
        with lofi.pruned(model, "fastv", keep=0.25) as handle:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        generated = seen[:]
        seen.clear()
        _teacher_forced(model, processor, pair, [[5, 6], [5, 6]], handle.replay())
    finally:
        hook.remove()
    assert torch.equal(seen[0], generated[0])  # the prompt
    first_step = generated[1]  # generate()'s first decoding step: the answer's first token
    assert torch.equal(seen[1], first_step + torch.arange(2))
