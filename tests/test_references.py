"""The independent per-sample references of tests/references/ on cases small enough to derive by hand.

Vectors are written as unit vectors at angles or as sums of basis vectors e_k, so that every cosine in a
derivation is exact or a one-line computation.
"""

import itertools

import numpy as np
import pytest
from references import (
    cdpruner_reference,
    divprune_reference,
    scope_reference,
    visionzip_reference,
    vispruner_reference,
)
from references.cdpruner import cdpruner_relevance


def at_angles(*degrees):
    """Unit vectors in the plane at the given angles."""
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def basis(width, *weighted):
    """A vector of `width` from (index, weight) pairs."""
    out = np.zeros(width)
    for index, weight in weighted:
        out[index] = weight
    return out


# --- DivPrune ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_keep,expected", [(1, [3]), (2, [0, 3]), (3, [0, 2, 3]), (4, [0, 1, 2, 3])])
def test_divprune_reference_starts_from_the_most_isolated_token_then_maximises_the_minimum_distance(n_keep,
                                                                                                    expected):
    """Tokens at 0, 10, 90 and 180 degrees; D = 1 - cos.

    Nearest-neighbour distances: t0 and t1 1 - cos 10 = 0.015, t2 min(1, 1 - cos 80 = 0.83, 1) = 0.83,
    t3 min(2, 1 - cos 170 = 1.98, 1) = 1: the first pick is t3. Distances to {t3}: t0 2, t1 1.98, t2 1: t0.
    Minimum distances to {t3, t0}: t1 min(1.98, 0.015) = 0.015, t2 min(1, 1) = 1: t2. t1 comes last."""
    assert divprune_reference(at_angles(0, 10, 90, 180), n_keep).tolist() == expected


def test_divprune_reference_keeps_distinct_tokens_when_only_duplicates_are_left():
    """t0 and t1 are the same vector, t2 is orthogonal. First pick: t2 (its nearest neighbour is at 1, the
    others' at 0). Then t0 (distance 1 from t2, tied with t1: lowest index). The last pick must be t1 although
    its score min(D[t2, t1], D[t0, t1]) = 0 equals the picked tokens' own D_ss = 0."""
    assert divprune_reference(at_angles(0, 0, 90), 3).tolist() == [0, 1, 2]
    assert divprune_reference(at_angles(0, 0, 90), 2).tolist() == [0, 2]


def test_divprune_reference_depends_on_directions_only():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 8))
    scaled = features * rng.uniform(0.1, 10.0, size=(30, 1))
    assert divprune_reference(scaled, 9).tolist() == divprune_reference(features, 9).tolist()


# --- SCOPE ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,n_keep,expected", [(1.0, 1, [2]), (1.0, 2, [1, 2]), (0.0, 1, [1]), (0.0, 2, [0, 1])])
def test_scope_reference_weights_the_coverage_gain_by_the_cls_attention(alpha, n_keep, expected):
    """Tokens at 0, 60 and 90 degrees: S01 = 0.5, S02 = 0, S12 = cos 30 = 0.866; [CLS] attention 0.1, 0.2, 0.7.

    Empty set: coverage gains sum_i max(0, S_ij) are 1.5, 2.366, 1.866.
    alpha = 0: pick t1; coverage m = S[:, 1] = (0.5, 1, 0.866); gains t0 0.5 + 0 + 0 = 0.5,
    t2 0 + 0 + 0.134 = 0.134: pick t0.
    alpha = 1: gains x attention = 0.15, 0.473, 1.306: pick t2; m = S[:, 2] = (0, 0.866, 1); gains
    t0 1 x 0.1 = 0.1, t1 (0.5 + 0.134) x 0.2 = 0.127: pick t1."""
    chosen = scope_reference(at_angles(0, 60, 90), n_keep, np.array([0.1, 0.2, 0.7]), alpha=alpha)
    assert chosen.tolist() == expected


@pytest.mark.parametrize("angle,attention,expected", [(180, 0.2, 0), (120, 0.2 / 0.35 * 0.5, 1)])
def test_scope_reference_counts_coverage_from_zero_and_ignores_negative_similarity(angle, attention, expected):
    """t0 at 0 degrees, t1 and t2 both at `angle`; [CLS] attention (0.5, a, a), alpha = 1. Gains
    sum_i max(0, S_ij - 0): t0 1 (its negative cosines to t1 and t2 count 0), t1 and t2 2.

    180 degrees, a = 0.2: 0.5 vs 0.4: t0. Counting the negative cosines, t0's gain would be 1 - 1 - 1 = -1: t1.
    120 degrees, a = 0.286: 0.5 vs 0.571: t1. With the coverage starting at -1 instead of 0, the gains would be
    t0 2 + 0.5 + 0.5 = 3 and t1 0.5 + 2 + 2 = 4.5: 1.5 vs 1.29: t0."""
    chosen = scope_reference(at_angles(0, angle, angle), 1, np.array([0.5, attention, attention]))
    assert chosen.tolist() == [expected]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_scope_reference_picks_the_largest_increase_of_the_covered_similarity(alpha):
    """The greedy gain equals f(Y + j) - f(Y) for f(Y) = sum_i max(0, max_{s in Y} cos(x_i, x_s)), times a_j^alpha,
    computed here from the set function itself."""
    rng = np.random.default_rng(1)
    features, attention = rng.normal(size=(16, 5)), rng.uniform(0.01, 1.0, size=16)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = unit @ unit.T

    def coverage(chosen):
        return np.maximum(0.0, similarity[:, chosen].max(axis=1)).sum() if chosen else 0.0

    chosen = []
    for _ in range(6):
        gains = [(coverage(chosen + [j]) - coverage(chosen)) * attention[j] ** alpha if j not in chosen else -np.inf
                 for j in range(16)]
        chosen.append(int(np.argmax(gains)))
    assert scope_reference(features, 6, attention, alpha=alpha).tolist() == sorted(chosen)


# --- CDPruner ---------------------------------------------------------------------------------------------------

# Projector outputs at 0, 90 and 45 degrees: S01 = 0, S02 = S12 = 0.7071. Instruction (1, 0); the visual tokens
# in its space at cosines 0, 0.5 and -0.5 to it.
CD_FEATURES = at_angles(0, 90, 45)
CD_RELEVANCE_EMBEDS = at_angles(90, 60, 120)
CD_INSTRUCTION = at_angles(0)


def test_cdpruner_relevance_is_the_min_max_normalised_negative_cosine():
    """-cos = (0, -0.5, 0.5): min -0.5, max 0.5, so r = (r + 0.5 + 1e-6) / 1 = (0.5, 0, 1) + 1e-6."""
    relevance = cdpruner_relevance(CD_RELEVANCE_EMBEDS, CD_INSTRUCTION)
    np.testing.assert_allclose(relevance, [0.5 + 1e-6, 1e-6, 1 + 1e-6], atol=1e-12)
    flipped = cdpruner_relevance(CD_RELEVANCE_EMBEDS, CD_INSTRUCTION, negate_relevance=False)
    np.testing.assert_allclose(flipped, [0.5 + 1e-6, 1 + 1e-6, 1e-6], atol=1e-12)


@pytest.mark.parametrize("negate_relevance,theta,n_keep,expected", [
    (True, None, 1, [2]), (True, None, 2, [0, 2]), (False, None, 1, [1]), (False, None, 2, [0, 1]),
    (True, 0.5, 2, [0, 2])])
def test_cdpruner_reference_picks_by_conditional_variance(negate_relevance, theta, n_keep, expected):
    """L_ij = r_i S_ij r_j. The first pick maximises L_jj = r_j^2; the next maximises L_jj - L_jy^2 / L_yy.

    Reference sign, r ~ (0.5, 0, 1): pick t2; then t0 0.25 - (0.5 x 0.7071)^2 = 0.125, t1 ~ 0: t0.
    Sign dropped, r ~ (0.5, 1, 0): pick t1; then t0 0.25 - 0 = 0.25 (S01 = 0), t2 ~ 0: t0.
    theta = 0.5 (exponent 0.5): r = exp(0.5 x (0.5, 0, 1)) = (1.284, 1, 1.649); L_jj = (1.649, 1, 2.718):
    pick t2; then t0 1.649 - (1.284 x 1.649 x 0.7071)^2 / 2.718 = 0.824, t1 1 - (1.649 x 0.7071)^2 / 2.718 = 0.5:
    t0."""
    chosen = cdpruner_reference(CD_FEATURES, n_keep, CD_RELEVANCE_EMBEDS, CD_INSTRUCTION, theta=theta,
                                negate_relevance=negate_relevance)
    assert chosen.tolist() == expected


@pytest.mark.parametrize("n_keep,expected", [(1, [0]), (2, [0, 1])])
def test_cdpruner_reference_without_relevance_picks_on_the_similarity_kernel_alone(n_keep, expected):
    """r = 1, L = S: every L_jj = 1, the first pick is the lowest index t0 (the relevance picks t2 or t1 above);
    then t1 1 - 0^2 = 1 (S01 = 0), t2 1 - 0.7071^2 = 0.5: t1."""
    assert cdpruner_reference(CD_FEATURES, n_keep).tolist() == expected


def test_cdpruner_reference_refuses_more_picks_than_the_kernel_rank():
    """Three tokens in the plane span a rank-2 kernel: a third pick has zero conditional variance."""
    with pytest.raises(ValueError, match="rank is exhausted after 2 picks"):
        cdpruner_reference(CD_FEATURES, 3, CD_RELEVANCE_EMBEDS, CD_INSTRUCTION)


def test_cdpruner_reference_keeps_the_least_relevant_token_when_the_budget_needs_it():
    """Eight tokens in 16 dimensions span a rank-8 kernel, so all eight can be picked, including the least relevant
    one, whose normalised relevance is the floor 1e-6 / (max - min) (kernel diagonal ~1e-12): small, yet not rank
    exhaustion."""
    rng = np.random.default_rng(4)
    embeds, instruction = rng.normal(size=(8, 4)), rng.normal(size=(1, 4))
    assert cdpruner_relevance(embeds, instruction).min() < 1e-6
    assert cdpruner_reference(rng.normal(size=(8, 16)), 8, embeds, instruction).tolist() == list(range(8))


@pytest.mark.parametrize("theta", [None, 0.3, 0.8])
def test_cdpruner_reference_each_pick_maximises_the_determinant_of_the_picked_kernel(theta):
    """Greedy MAP of a DPP: each step adds the token j maximising det(L[Y + j, Y + j]), recomputed here with
    determinants over the kernel the reference builds (two instruction rows, averaged)."""
    rng = np.random.default_rng(2)
    features, embeds, instruction = rng.normal(size=(12, 8)), rng.normal(size=(12, 4)), rng.normal(size=(2, 4))
    relevance = cdpruner_relevance(embeds, instruction)
    if theta is not None:
        relevance = np.exp(theta / (2 * (1 - theta)) * relevance)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    chosen = []
    for _ in range(6):
        volumes = [np.linalg.det(kernel[np.ix_(chosen + [j], chosen + [j])]) if j not in chosen else -np.inf
                   for j in range(12)]
        chosen.append(int(np.argmax(volumes)))
    assert cdpruner_reference(features, 6, embeds, instruction, theta=theta).tolist() == sorted(chosen)


# --- VisionZip --------------------------------------------------------------------------------------------------

def test_visionzip_reference_merges_each_remaining_token_into_its_most_similar_target():
    """Six patches, states (i, 10 i); [CLS] attention (0.1, 0.9, 0.05, 0.8, 0.2, 0.3); 2 dominant, 2 contextual.

    Dominant: t1 and t3. Remaining t0, t2, t4, t5 (R = 4), stride 4 // 2 = 2: targets t0 and t4.
    Keys: t0 (1, 0), t4 (0, 1), t2 (0.1, 1) -> closer to t4, t5 (1, 0.2) -> closer to t0.
    Contextual: slot 0 = t0 + t5 = (5, 50), slot 1 = t4 + t2 = (6, 60)."""
    states = np.array([[i, 10.0 * i] for i in range(6)])
    keys = np.array([[1, 0], [1, 1], [0.1, 1], [1, 1], [0, 1], [1, 0.2]])
    out = visionzip_reference(states, 2, np.array([0.1, 0.9, 0.05, 0.8, 0.2, 0.3]), keys, 2)
    assert out.kept.tolist() == [1, 3]
    assert out.contextual.tolist() == [0, 4]
    assert out.assignment.tolist() == [0, -1, 1, -1, 1, 0]
    np.testing.assert_array_equal(out.merged, [[5, 50], [6, 60]])


def test_visionzip_reference_adds_the_mean_of_the_merged_states_to_the_target():
    """Dominant t0; remaining t1..t4, one target at stride 4: t1. t2, t3, t4 all merge into it:
    (1, 10) + mean((2, 20), (3, 30), (4, 40)) = (4, 40)."""
    states = np.array([[i, 10.0 * i] for i in range(5)])
    out = visionzip_reference(states, 1, np.array([0.9, 0.1, 0.1, 0.1, 0.1]), np.ones((5, 3)), 1)
    assert out.kept.tolist() == [0] and out.contextual.tolist() == [1]
    assert out.assignment.tolist() == [-1, 0, 0, 0, 0]
    np.testing.assert_array_equal(out.merged, [[4, 40]])


def test_visionzip_reference_takes_targets_at_a_uniform_stride_over_the_remaining_tokens():
    """Nine patches, dominant t0 and t8: remaining t1..t7 (R = 7), stride 7 // 3 = 2: targets at positions
    0, 2, 4 of the remaining list, t1, t3, t5; t7 (position 6) is merged, not a target."""
    attention = np.array([0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.8])
    out = visionzip_reference(np.eye(9), 2, attention, np.eye(9), 3)
    assert out.kept.tolist() == [0, 8] and out.contextual.tolist() == [1, 3, 5]
    assert (out.assignment[[1, 3, 5]] == [0, 1, 2]).all() and out.assignment[7] >= 0


def test_visionzip_reference_without_contextual_tokens_keeps_the_dominant_ones_only():
    out = visionzip_reference(np.eye(4), 2, np.array([0.4, 0.1, 0.3, 0.2]), np.eye(4), 0)
    assert out.kept.tolist() == [0, 2] and out.merged.shape == (0, 4)
    assert out.assignment.tolist() == [-1, -1, -1, -1] and out.contextual.tolist() == []


# --- VisPruner --------------------------------------------------------------------------------------------------

def test_vispruner_reference_drops_the_even_position_tokens_that_duplicate_an_odd_one():
    """Ten patches in decreasing [CLS] attention t0..t9; n_keep 8, ratio 0.5: important t0..t3, 4 diverse.

    Residual t4..t9 (R = 6), r = min(8, 6 - 4) = 2; a = (t4, t6, t8), b = (t5, t7, t9). t4 = e1 + 0.1 e0 and
    t6 = e2 + 0.1 e0 nearly duplicate t5 = e1 and t7 = e2 (cos 0.995); t8 = e4 is orthogonal to b. Drop t4, t6."""
    features = np.stack([basis(6, (5, 1.0))] * 4 + [basis(6, (1, 1), (0, 0.1)), basis(6, (1, 1)),
                                                   basis(6, (2, 1), (0, 0.1)), basis(6, (2, 1)),
                                                   basis(6, (4, 1)), basis(6, (3, 1))])
    chosen = vispruner_reference(features, 8, np.arange(10, 0, -1.0), important_ratio=0.5)
    assert chosen.tolist() == [0, 1, 2, 3, 5, 7, 8, 9]


def test_vispruner_reference_puts_the_surviving_even_tokens_first_in_decreasing_score():
    """Twenty patches in decreasing attention, ratio 0 (all diverse), n_keep 10. Odd tokens t(2k+1) = e(2k+1);
    t(2k) = e(2k+1) + 0.1 e(2k) for k >= 2 (cos 0.995); t2 = 0.6 e1 + 0.8 e2; t0 = 0.5 e1 + 0.866 e0.

    Round 1: R = 20, r = 8, a = evens, scores 0.995 (t4..t18), 0.6 (t2), 0.5 (t0): t4..t18 drop and the
    survivors come first in decreasing score: (t2, t0, t1, t3, ..., t19), R = 12.
    Round 2: r = 2, a = (t2, t1, t5, t9, t13, t17), b = (t0, t3, t7, t11, t15, t19). Scores: t2 cos(t2, t0) = 0.3,
    t1 cos(t1, t0) = 0.5, the rest 0: t1 and t2 drop. Had the survivors kept index order (t0, t2), t0 and t1
    would have dropped instead."""
    features = np.stack([basis(20, (2 * k + 1, 1), (2 * k, 0.1)) if k >= 2 and parity == 0 else
                         basis(20, (2 * k + 1, 1)) if parity == 1 else
                         basis(20, (1, 0.6), (2, 0.8)) if k == 1 else basis(20, (1, 0.5), (0, np.sqrt(0.75)))
                         for k in range(10) for parity in (0, 1)])
    chosen = vispruner_reference(features, 10, np.arange(20, 0, -1.0), important_ratio=0.0)
    assert chosen.tolist() == [0, 3, 5, 7, 9, 11, 13, 15, 17, 19]


def test_vispruner_reference_handles_an_odd_residual_length():
    """Nine patches in decreasing attention, n_keep 4, ratio 0.5: important t0, t1; residual t2..t8 (R = 7),
    r = min(8, 5) = 5 but a = (t2, t4, t6, t8) holds 4: all of a drops, leaving (t3, t5, t7).
    Round 2: r = 1, a = (t3, t7), b = (t5); t5 = e0, t7 = e0 + 0.1 e1 (cos 0.995), t3 = e1 (cos 0): t7 drops."""
    features = np.stack([basis(3, (2, 1))] * 3 + [basis(3, (1, 1)), basis(3, (2, 1)), basis(3, (0, 1)),
                                                  basis(3, (2, 1)), basis(3, (0, 1), (1, 0.1)), basis(3, (2, 1))])
    assert vispruner_reference(features, 4, np.arange(9, 0, -1.0)).tolist() == [0, 1, 3, 5]


def test_vispruner_reference_with_ratio_one_keeps_the_top_cls_attention():
    rng = np.random.default_rng(3)
    attention = rng.permutation(12) + 1.0
    chosen = vispruner_reference(rng.normal(size=(12, 4)), 5, attention, important_ratio=1.0)
    assert chosen.tolist() == sorted(np.argsort(-attention)[:5].tolist())


@pytest.mark.parametrize("n_keep,ratio", itertools.product([1, 5, 17, 40], [0.0, 0.25, 0.5, 0.75]))
def test_vispruner_reference_keeps_exactly_n_keep_including_every_important_token(n_keep, ratio):
    rng = np.random.default_rng(n_keep)
    attention = rng.uniform(size=40)
    chosen = vispruner_reference(rng.normal(size=(40, 6)), n_keep, attention, important_ratio=ratio)
    important = np.argsort(-attention, kind="stable")[:int(n_keep * ratio)]
    assert len(chosen) == n_keep and set(important.tolist()) <= set(chosen.tolist())


# --- input checks -----------------------------------------------------------------------------------------------

def test_references_refuse_a_budget_outside_the_token_count():
    with pytest.raises(ValueError, match=r"n_keep must be an integer in \[1, 3\]"):
        divprune_reference(np.eye(3), 4)
    with pytest.raises(ValueError, match="n_contextual must lie in"):
        visionzip_reference(np.eye(3), 2, np.ones(3), np.eye(3), 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        scope_reference(np.full((3, 2), np.nan), 1, np.ones(3))
