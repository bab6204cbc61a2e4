"""The seeded subset of samples whose spectra are decomposed: chosen by seed and sample id alone, its share
kept, and on its samples the records of a run that decomposes every sample."""

import math

import pytest
import torch
from _tiny import make_inputs, prompt_ids, tiny_llava

import lofi
from analysis.measure.capture import Capture, check_share, in_subset, subset_rows

IDS = [f"q{i}" for i in range(6)]


def test_the_subset_depends_on_the_seed_and_the_id_only():
    chosen = {i for i in IDS if in_subset(i, 0.5, seed=3)}
    reordered = IDS[::-1] + ["other", "ids"]
    assert {reordered[r] for r in subset_rows(reordered, 0.5, seed=3)} & set(IDS) == chosen  # not on order or company
    assert [IDS[r] for r in subset_rows(IDS[:3], 0.5, 3)] == [i for i in IDS[:3] if i in chosen]  # nor batches
    ids = [f"s{i}" for i in range(200)]
    assert subset_rows(ids, 0.5, seed=3) == subset_rows(ids, 0.5, seed=3)
    assert subset_rows(ids, 0.5, seed=3) != subset_rows(ids, 0.5, seed=4)
    assert subset_rows(ids, 1.0, seed=3) == list(range(200))


@pytest.mark.parametrize("share", [0.05, 0.1, 0.5])
def test_the_subset_keeps_its_share(share):
    n = 20_000
    taken = len(subset_rows(range(n), share, seed=0)) / n
    assert abs(taken - share) < 4 * math.sqrt(share * (1 - share) / n)
    smaller = set(subset_rows(range(n), share / 2, seed=0))
    assert smaller <= set(subset_rows(range(n), share, seed=0))  # a smaller share takes fewer of the same


@pytest.mark.parametrize("share", [0, -0.1, 1.5, float("nan")])
def test_a_share_outside_0_1_is_refused(share):
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        check_share(share)


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _batch(order):
    """The same six samples (prompt and image) in ``order``, and their ids."""
    prompts = [prompt_ids(3), prompt_ids(3, (5,), (7, 8)), prompt_ids(3, (5, 6, 12), (7,)), prompt_ids(3, (6,)),
               prompt_ids(3, (12, 13)), prompt_ids(3, (5, 5, 5, 5))]
    inputs = make_inputs(prompts=prompts, seed=1)
    order = list(order)
    return {name: value[order] for name, value in inputs.items()}, [IDS[i] for i in order]


def _by_key(records):
    return {(r.sample_id, r.layer, r.group): r for r in records}


@torch.no_grad()
@pytest.mark.parametrize("spectra_on", ["device", "host"])
def test_spectra_on_the_subset_equal_those_of_a_full_run(model, spectra_on):
    """Share 0.5 of a pruned, padded batch: the subset's samples carry the full run's spectra, IPR, PR and
    leverage, in whatever order the batch comes; the others carry exact IPR and PR and no spectrum."""
    share, seed = 0.5, 0
    chosen = {i for i in IDS if in_subset(i, share, seed)}
    assert 0 < len(chosen) < len(IDS)  # the ids split: the test sees both kinds of row
    options = dict(leverage_layers=[2], spectra_on=spectra_on)
    with Capture(model, **options) as full, lofi.pruned(model, "fastv", keep=0.5):
        inputs, ids = _batch(range(6))
        full.identify(ids)
        model(**inputs)
    expected = _by_key(full.take())
    for order in (range(6), [5, 2, 0, 4, 1, 3]):
        with Capture(model, spectra_share=share, spectra_seed=seed, **options) as part, \
                lofi.pruned(model, "fastv", keep=0.5):
            inputs, ids = _batch(order)
            part.identify(ids)
            model(**inputs)
        got = part.take()
        assert len(got) == len(expected)
        for r in got:
            e = expected[r.sample_id, r.layer, r.group]
            assert r.n_tokens == e.n_tokens and r.has_spectrum == (r.sample_id in chosen)
            assert r.ipr == pytest.approx(e.ipr, rel=1e-5) and r.pr == pytest.approx(e.pr, rel=1e-5)
            if r.has_spectrum:
                # torch's CPU eigvalsh is not batch-invariant: a batch of 3 and one of 6 of the same 25 x 25
                # float32 matrices differ by ~1e-8 in eigenvalues, which moves singular values at the noise
                # floor (sqrt(eps) s_1, 3.5e-4 s_1) and effective rank (by up to 8e-5 measured)
                assert r.effective_rank == pytest.approx(e.effective_rank, rel=1e-3)
                assert r.singular_values == pytest.approx(e.singular_values, rel=1e-5,
                                                          abs=1e-3 * e.singular_values[0])
                assert (r.leverage is None) == (e.leverage is None) and r.visual_index == e.visual_index
                if r.leverage is not None:
                    assert r.leverage == pytest.approx(e.leverage, abs=1e-5)
            else:
                assert math.isnan(r.effective_rank) and r.singular_values == [] and r.leverage is None


@torch.no_grad()
def test_a_subset_without_sample_ids_names_the_fix(model):
    inputs, ids = _batch(range(3))
    with Capture(model, spectra_share=0.5) as capture:
        with pytest.raises(ValueError, match=r"capture.identify\(sample_ids\)"):
            model(**inputs)
        capture.identify(ids[:2])
        with pytest.raises(ValueError, match="one id per row"):
            model(**inputs)
        capture.identify(ids)
        model(**inputs)  # each identify serves one pass
        assert {r.sample_id for r in capture.take()} == set(ids)
        with pytest.raises(ValueError, match="identify"):
            model(**inputs)
