"""Capture: statistics equal those of the model's own hidden states, pruned or not; hooks never leak;
memory does not grow with samples."""

import gc
import math
import threading
import warnings

import pytest
import torch
from _tiny import emitting, make_inputs, positions, prompt_ids, tiny_llava

import lofi
from analysis.measure import spectral
from analysis.measure.capture import Capture
from analysis.measure.host_spectra import HostSpectra, gram_statistics


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _stats(H):
    s = spectral.singular_values(H.float())
    return spectral.ipr(s).item(), spectral.effective_rank(s).item()


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@torch.no_grad()
def test_baseline_statistics_equal_the_models_hidden_states(model):
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8))])
    inputs["position_ids"] = positions(inputs["attention_mask"])
    with Capture(model) as capture:
        out = model(**inputs, output_hidden_states=True)
    rows = capture.take()
    layers = len(model.model.language_model.layers)
    assert {r.layer for r in rows} == set(range(layers + 1))
    visual = inputs["input_ids"] == 3
    valid = inputs["attention_mask"].bool()
    for r in rows:
        if r.layer == layers:
            continue  # HF applies the final norm to its last hidden state
        H = out.hidden_states[r.layer][r.row]
        H = H[visual[r.row]] if r.group == "visual" else H[valid[r.row]]
        ipr, erank = _stats(H)
        assert r.n_tokens == len(H)
        assert r.ipr == pytest.approx(ipr, rel=1e-4) and r.effective_rank == pytest.approx(erank, rel=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_inside_pruned_it_measures_the_tokens_each_layer_holds(model, layer):
    inputs = make_inputs(seed=5)
    with Capture(model) as capture:
        model(**inputs)
        base = {(r.layer, r.group): r for r in capture.take()}
        with lofi.pruned(model, "lofi", keep=0.25, layer=layer) as handle:
            out = model(**inputs, output_hidden_states=True)
        pruned = {(r.layer, r.group): r for r in capture.take()}
    for (at, group), r in pruned.items():
        if at < layer:
            assert r.ipr == base[at, group].ipr  # Delta IPR is exactly 0 before the pruning layer
        elif at < len(model.model.language_model.layers):
            expected = 4 if group == "visual" else base[at, group].n_tokens - 12
            assert r.n_tokens == expected
            H = out.hidden_states[at][0]
            index = handle.sequence_index(at)[0]
            if len(H) != len(index):  # HF records layer K's input before the pruning hook drops tokens
                H = H[index]
            if group == "visual":
                H = H[(inputs["input_ids"][0] == 3)[index]]
            assert r.ipr == pytest.approx(_stats(H)[0], rel=1e-4)


@torch.no_grad()
def test_a_padded_batch_gives_the_rows_of_its_samples(model):
    prompts = [prompt_ids(3), prompt_ids(3, (5, 6, 12), (7,))]
    batch = make_inputs(prompts=prompts, seed=2)
    batch["position_ids"] = positions(batch["attention_mask"])
    with Capture(model, leverage_layers=[2]) as capture:
        with lofi.pruned(model, "fastv", keep=0.5, layer=2):
            model(**batch)
            together = capture.take()
            for row, p in enumerate(prompts):
                model(input_ids=torch.tensor([p]), pixel_values=batch["pixel_values"][row:row + 1])
                alone = capture.take()
                mine = [r for r in together if r.row == row]
                assert [(r.layer, r.group, r.n_tokens) for r in mine] == [(r.layer, r.group, r.n_tokens) for r in alone]
                for a, b in zip(mine, alone):
                    assert a.ipr == pytest.approx(b.ipr, rel=1e-4, abs=1e-6)
                    if a.leverage is not None:
                        assert a.visual_index == b.visual_index
                        assert a.leverage == pytest.approx(b.leverage, abs=1e-4)
    lev = [r for r in together if r.leverage is not None]
    assert len(lev) == 2 and len(lev[0].leverage) == 8 and sum(lev[0].leverage) == pytest.approx(
        round(sum(lev[0].leverage)), abs=1e-3)


@torch.no_grad()
def test_generate_captures_the_prompt_once(model):
    """Also when a decoding step feeds back a generated image token id (a word to the model: no image comes)."""
    inputs = make_inputs()
    for options in ({}, emitting(model.config.image_token_id, inputs["input_ids"].shape[1])):
        with Capture(model) as capture:
            ids = model.generate(**inputs, max_new_tokens=4, do_sample=False, **options)
        rows = capture.take()
        assert {r.call for r in rows} == {1} and len(rows) == 2 * 5
    assert (ids[:, -3] == model.config.image_token_id).all()


def test_hooks_are_removed_also_after_an_exception(model):
    before = _hooks(model)
    with pytest.raises(ZeroDivisionError):
        with Capture(model):
            assert _hooks(model) > before
            1 / 0
    assert _hooks(model) == before


@torch.no_grad()
def test_memory_does_not_grow_with_samples(model):
    inputs = make_inputs()
    def tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on some torch.distributed objects warns
            warnings.simplefilter("ignore")
            return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    with Capture(model) as capture:
        model(**inputs)
        capture.take()
        start = tensors()
        for _ in range(10):
            model(**inputs)
            rows = capture.take()
        assert tensors() <= start
    assert all(isinstance(r.ipr, float) and isinstance(r.singular_values, list) for r in rows)


def test_unknown_group_names_the_valid_ones(model):
    with pytest.raises(ValueError, match="valid groups"):
        Capture(model, groups=("text",))


@torch.no_grad()
def test_spectrum_layers_decompose_only_there_with_the_same_ipr_and_pr(model):
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8))])
    with Capture(model) as full, Capture(model, spectrum_layers=()) as fast, \
            Capture(model, spectrum_layers=[1]) as one:
        model(**inputs)
    full_rows, one_rows = full.take(), one.take()
    for a, b, c in zip(full_rows, fast.take(), one_rows):
        assert (a.layer, a.group, a.row) == (b.layer, b.group, b.row) == (c.layer, c.group, c.row)
        assert b.ipr == pytest.approx(a.ipr, rel=1e-4) and b.pr == pytest.approx(a.pr, rel=1e-4)
        assert math.isnan(b.effective_rank) and b.singular_values == []
        if c.layer == 1:
            assert c.effective_rank == pytest.approx(a.effective_rank, rel=1e-5)
            assert c.singular_values == pytest.approx(a.singular_values, rel=1e-5)
        else:
            assert math.isnan(c.effective_rank) and c.singular_values == []
    assert {a.layer for a in full_rows} == {c.layer for c in one_rows}


def test_spectrum_layers_rejects_a_misspelt_mode(model):
    with pytest.raises(ValueError, match="spectrum_layers"):
        Capture(model, spectrum_layers="first")


@torch.no_grad()
@pytest.mark.parametrize("spectrum_layers", ["all", [4]])
def test_spectra_decomposed_on_the_host_equal_the_inline_ones(model, spectrum_layers):
    """The host route (float64, a background thread, what a GPU run uses) gives the inline route's records,
    in the same order, inside a pruned ragged batch, with leverage layers still decomposed inline."""
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8))])
    options = dict(spectrum_layers=spectrum_layers, leverage_layers=[2])
    with Capture(model, spectra_on="device", **options) as inline, \
            Capture(model, spectra_on="host", **options) as host, lofi.pruned(model, "lofi", keep=0.5):
        assert host._spectra is not None and inline._spectra is None
        model(**inputs)
        model(**inputs)
    expected, got = inline.take(), host.take()
    assert len(got) == len(expected) == 2 * 2 * 2 * 5
    for a, b in zip(expected, got):
        assert (a.call, a.layer, a.group, a.row, a.n_tokens) == (b.call, b.layer, b.group, b.row, b.n_tokens)
        assert b.ipr == pytest.approx(a.ipr, rel=1e-4) and b.pr == pytest.approx(a.pr, rel=1e-4)
        assert b.singular_values == pytest.approx(a.singular_values, rel=1e-3, abs=1e-4)
        if a.singular_values:
            assert b.effective_rank == pytest.approx(a.effective_rank, rel=1e-4)
        else:
            assert math.isnan(b.effective_rank)
        assert b.leverage == a.leverage


@torch.no_grad()
def test_spectra_stacked_into_one_decomposition_equal_the_per_layer_ones(model, monkeypatch):
    """On a GPU with the batched eigh route, the device route decomposes a pass's Gram matrices at its end,
    all of one size in one call: the same records, in the same order, inside a pruned ragged batch."""
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8))])
    options = dict(spectra_on="device", leverage_layers=[2])
    with Capture(model, **options) as per_layer, lofi.pruned(model, "lofi", keep=0.5):
        model(**inputs)
    calls = []
    decompose = spectral.singular_values_from_gram
    monkeypatch.setattr(spectral, "singular_values_from_gram", lambda G: calls.append(G.shape) or decompose(G))
    monkeypatch.setattr(Capture, "_stacks", staticmethod(lambda gram: True))  # as on a GPU, cusolver-batched
    with Capture(model, **options) as stacked, lofi.pruned(model, "lofi", keep=0.5):
        model(**inputs)
    expected, got = per_layer.take(), stacked.take()
    assert len(got) == len(expected) == 2 * 2 * 5
    # 2 groups x 5 layer points: 10 calls one by one; stacked, one a matrix size, and the leverage layer's
    # own (it decomposes inline), for the same 20 matrices
    assert len(calls) <= len({shape[-1] for shape in calls}) + 1 < 10
    assert sum(shape[0] for shape in calls) == 2 * 2 * 5
    for a, b in zip(expected, got):
        assert (a.call, a.layer, a.group, a.row, a.n_tokens, a.leverage) == \
               (b.call, b.layer, b.group, b.row, b.n_tokens, b.leverage)
        assert b.ipr == pytest.approx(a.ipr, rel=1e-5) and b.effective_rank == pytest.approx(a.effective_rank, rel=1e-5)
        assert b.singular_values == pytest.approx(a.singular_values, rel=1e-4, abs=1e-5)


def test_the_host_thread_stops_with_the_block_also_after_an_error(model):
    with pytest.raises(ZeroDivisionError):
        with Capture(model, spectra_on="host") as capture:
            with torch.no_grad():
                model(**make_inputs())
            spectra = capture._spectra
            1 / 0
    assert capture._spectra is None and spectra._pool._shutdown
    assert len(capture.take()) == 2 * 5  # what was submitted before the error is finished, not lost


def test_spectra_on_names_its_values(model):
    with pytest.raises(ValueError, match="'auto', 'device' or 'host'"):
        Capture(model, spectra_on="gpu")


class _Gated(HostSpectra):
    """Decomposes only once ``release`` is set."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def submit(self, gram, top_k):
        return self._pool.submit(lambda: self.release.wait() and gram_statistics(gram, top_k))


@torch.no_grad()
def test_take_without_waiting_returns_only_finished_records_in_order(model):
    with Capture(model, spectra_on="host", spectrum_layers=[4]) as capture:
        capture._spectra.close()
        capture._spectra = gated = _Gated()
        model(**make_inputs())
        early = capture.take(wait=False)
        assert [(r.layer, r.group) for r in early] == [(layer, g) for layer in range(4) for g in ("visual", "all")]
        gated.release.set()
        rest = capture.take()
    assert [(r.layer, r.group) for r in rest] == [(4, "visual"), (4, "all")] and rest[0].singular_values


@torch.no_grad()
def test_ipr_and_pr_without_a_decomposition_equal_float64_svds_of_the_hidden_states(model):
    """IPR/PR only (no spectrum layer), a padded batch: every layer's IPR and PR from the Gram matrix's trace
    and Frobenius norm are within 1e-5 relative of numpy float64 SVDs of the model's own hidden states."""
    import numpy as np
    inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8))])
    inputs["position_ids"] = positions(inputs["attention_mask"])
    with Capture(model, spectrum_layers=()) as capture:
        out = model(**inputs, output_hidden_states=True)
    rows = capture.take()
    layers = len(model.model.language_model.layers)
    visual, valid = inputs["input_ids"] == 3, inputs["attention_mask"].bool()
    checked = 0
    for r in rows:
        assert not r.has_spectrum and math.isnan(r.effective_rank) and r.singular_values == []
        if r.layer == layers:
            continue  # HF applies the final norm to its last hidden state
        H = out.hidden_states[r.layer][r.row]
        H = (H[visual[r.row]] if r.group == "visual" else H[valid[r.row]]).double().numpy()
        energy = np.linalg.svd(H, compute_uv=False) ** 2
        ipr = (energy ** 2).sum() / energy.sum() ** 2
        assert r.n_tokens == len(H)
        assert r.ipr == pytest.approx(ipr, rel=1e-5) and r.pr == pytest.approx(1 / ipr, rel=1e-5)
        checked += 1
    assert checked == 2 * 2 * layers


def _capture_ops(model, batch: int) -> int:
    """The non-view aten ops (kernel launches on a GPU) one captured prefill dispatches beyond the plain one,
    IPR/PR only."""
    from benchmarks.capture_overhead import capture_ops
    prompts = [prompt_ids(3), prompt_ids(3, (5,), (7, 8)), prompt_ids(3, (5, 6, 12), (7,))][:batch]
    return capture_ops(model, make_inputs(prompts=prompts), dict(spectrum_layers=()))[1]


def test_ipr_and_pr_take_a_few_batched_ops_per_layer_whatever_the_batch():
    """Both groups of every sample in one Gram matrix and three products per layer: the ops a captured pass
    adds do not grow with the batch, and each layer adds at most 8 that are not views (6 measured on the
    CPU, 2026-12-05)."""
    shallow, deep = tiny_llava(layers=2), tiny_llava(layers=6)
    three = _capture_ops(shallow, 3)
    assert _capture_ops(shallow, 1) == three
    per_layer = (_capture_ops(deep, 3) - three) / 4
    assert 0 < per_layer <= 8


@torch.no_grad()
def test_no_layer_reads_the_device():
    """IPR/PR only: the reads of device values a captured prefill makes (whether the call has images, then
    one transfer at its end) do not grow with the number of layers."""
    from benchmarks.host_syncs import counting
    reads = []
    for layers in (2, 6):
        tiny = tiny_llava(layers=layers)
        inputs = make_inputs(prompts=[prompt_ids(3), prompt_ids(3, (5,), (7, 8))])
        with Capture(tiny, spectrum_layers=()) as capture:
            with counting() as counts:
                tiny(**inputs)
            assert len(capture.take()) == 2 * 2 * (layers + 1)
        reads.append(sum(counts.values()))
    assert reads[0] == reads[1] <= 2
