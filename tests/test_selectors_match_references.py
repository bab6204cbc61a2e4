"""Each batched kernel of ``lofi.selectors`` keeps the same tokens (and VisionZip merges the same states) as the
independent per-sample reference of ``tests/references/``, on ragged padded batches of random inputs."""

import numpy as np
import pytest
import torch
from references import (
    cdpruner_reference,
    divprune_reference,
    scope_reference,
    visionzip_reference,
    vispruner_reference,
)

from lofi.selectors import cdpruner_select, divprune_select, scope_select, visionzip_select, vispruner_select

COUNTS = [48, 29, 37, 11]  # real tokens per sample of the batch (then padding)
D, DK, C, T = 64, 8, 16, 5  # feature width > every n_keep (the DPP's kernel rank), key and text widths


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    batch, p = len(COUNTS), max(COUNTS)
    valid = torch.arange(p)[None] < torch.tensor(COUNTS)[:, None]
    noise = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    t = {"features": noise(batch, p, D), "cls_attention": torch.rand(batch, p, generator=g, dtype=torch.float64),
         "keys": noise(batch, p, DK), "relevance_embeds": noise(batch, p, C), "instruction_embeds": noise(batch, T, C),
         "instruction_valid": torch.arange(T)[None] < torch.tensor([5, 3, 1, 4])[:, None]}
    garbage = ~valid[..., None]
    t["features"] = t["features"].masked_fill(garbage, float("nan"))  # padding never matters
    return t, valid


def _sample(t, b, name):
    return t[name][b, :COUNTS[b]].numpy()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep", [0.1, 0.3, 0.6])
def test_single_choice_kernels_keep_what_their_references_keep(seed, keep):
    t, valid = _batch(seed)
    n_keep = [max(1, round(keep * c)) for c in COUNTS]
    kernels = {
        "divprune": (divprune_select(t["features"], valid, n_keep),
                     lambda b: divprune_reference(_sample(t, b, "features"), n_keep[b])),
        "scope": (scope_select(t["features"], valid, n_keep, t["cls_attention"], alpha=1.0),
                  lambda b: scope_reference(_sample(t, b, "features"), n_keep[b], _sample(t, b, "cls_attention"))),
        "vispruner": (vispruner_select(t["features"], valid, n_keep, t["cls_attention"]),
                      lambda b: vispruner_reference(_sample(t, b, "features"), n_keep[b],
                                                    _sample(t, b, "cls_attention"))),
    }
    for negate in (False, True):
        for theta in (None, 0.5):
            kernels[f"cdpruner negate={negate} theta={theta}"] = (
                cdpruner_select(t["features"], valid, n_keep, t["relevance_embeds"], t["instruction_embeds"],
                                t["instruction_valid"], theta=theta, negate_relevance=negate),
                lambda b, negate=negate, theta=theta: cdpruner_reference(
                    _sample(t, b, "features"), n_keep[b], _sample(t, b, "relevance_embeds"),
                    t["instruction_embeds"][b, t["instruction_valid"][b]].numpy(), theta=theta,
                    negate_relevance=negate))
    for name, (kept, reference) in kernels.items():
        for b in range(len(COUNTS)):
            row = kept[b][kept[b] >= 0].numpy()
            np.testing.assert_array_equal(row, reference(b), err_msg=f"{name}, sample {b}")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep", [0.1, 0.3, 0.6])
def test_visionzip_keeps_and_merges_what_its_reference_does(seed, keep):
    t, valid = _batch(seed)
    n_total = [max(2, round(keep * c)) for c in COUNTS]
    n_contextual = [max(1, round(n * 10 / 64)) for n in n_total]
    n_dominant = [n - c for n, c in zip(n_total, n_contextual)]
    out = visionzip_select(t["features"], valid, n_dominant, t["cls_attention"], t["keys"], n_contextual)
    for b in range(len(COUNTS)):
        ref = visionzip_reference(_sample(t, b, "features"), n_dominant[b], _sample(t, b, "cls_attention"),
                                  _sample(t, b, "keys"), n_contextual[b])
        np.testing.assert_array_equal(out.kept[b][out.kept[b] >= 0].numpy(), ref.kept)
        np.testing.assert_array_equal(out.contextual[b][:n_contextual[b]].numpy(), ref.contextual)
        np.testing.assert_array_equal(out.assignment[b, :COUNTS[b]].numpy(), ref.assignment)
        np.testing.assert_allclose(out.merged[b, :n_contextual[b]].numpy(), ref.merged, rtol=0, atol=1e-5)
