"""The per-sample hash: its fused form gives the values of the definition written out term by term."""

import torch

from lofi.seeding import FEATURES_HASHED, P, fingerprints, mix, mix_int, uniform


def _reference_fingerprints(input_ids, inputs_embeds, valid, is_visual):
    """The definition, one mix per term (the form before token and feature keys shared one call)."""
    order = (valid.long().cumsum(1) - 1).clamp_min(0)
    text = torch.where(valid & ~is_visual, input_ids.long() + 1, 0)
    token_part = (text % P * mix(order * 2 + 1)) % P
    signs = (inputs_embeds[..., :FEATURES_HASHED] > 0).long() + 1
    features = torch.where((valid & is_visual)[..., None], signs, 0)
    slot = order[..., None] * FEATURES_HASHED + torch.arange(features.shape[-1])
    feature_part = (features * mix(slot * 2 + 2)) % P
    return mix(token_part.sum(1) % P + feature_part.sum((1, 2)) % P)


def test_fingerprints_and_draws_follow_their_definition():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 20), generator=g)
    embeds = torch.randn(3, 20, 96, generator=g)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    is_visual = torch.zeros(3, 20, dtype=torch.bool)
    is_visual[:, 6:14] = True
    fingerprint = fingerprints(ids, embeds, valid, is_visual)
    assert torch.equal(fingerprint, _reference_fingerprints(ids, embeds, valid, is_visual))
    index = torch.arange(8).expand(3, 8)
    for salt in (0, 7, 2**40 + 3):
        expected = mix(fingerprint + mix(torch.tensor(salt % P) + 7))
        expected = (mix(expected[:, None] + mix(index + 11)).double() + 0.5) / P
        assert torch.equal(uniform(fingerprint, salt, index), expected)


def test_the_key_tables_give_the_keys_mixed_in_place_for_any_length_and_width():
    """fingerprints and uniform read position keys from tables kept per device and grown on demand: prompts longer
    than any before, and features narrower than FEATURES_HASHED, hash as the definition does."""
    import lofi.seeding

    g = torch.Generator().manual_seed(1)
    lofi.seeding._TABLES.clear()
    for length, width in [(5, 96), (300, 32), (40, 64)]:
        ids = torch.randint(0, 1000, (2, length), generator=g)
        embeds = torch.randn(2, length, width, generator=g)
        valid = torch.ones(2, length, dtype=torch.bool)
        valid[0, : length // 3] = False
        is_visual = torch.rand(2, length, generator=g) < 0.5
        fingerprint = fingerprints(ids, embeds, valid, is_visual)
        assert torch.equal(fingerprint, _reference_fingerprints(ids, embeds, valid, is_visual))
        index = torch.where(torch.rand(2, length, generator=g) < 0.2, -1, torch.randint(0, length, (2, length)))
        assert torch.equal(uniform(fingerprint, 3, index, bound=length), uniform(fingerprint, 3, index))


def test_mix_int_is_mix_of_one_value():
    values = [0, 1, 12345, P - 1, P, 2**62]
    assert [mix_int(v) for v in values] == mix(torch.tensor(values)).tolist()
