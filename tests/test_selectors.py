"""The batched selection kernels (``lofi.selectors``): batching, padding, dtypes, hand-computed cases, FLOPs."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lofi.selectors import cdpruner_select, divprune_select, flops, scope_select, visionzip_select, vispruner_select

D, DK, C_TEXT, T_TEXT = 48, 8, 6, 3


def _inputs(batch: int, p: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(batch, p, D, generator=g), "cls_attention": torch.rand(batch, p, generator=g),
            "keys": torch.randn(batch, p, DK, generator=g),
            "relevance_embeds": torch.randn(batch, p, C_TEXT, generator=g),
            "instruction_embeds": torch.randn(batch, T_TEXT, C_TEXT, generator=g),
            "instruction_valid": torch.ones(batch, T_TEXT, dtype=torch.bool)}


def _run(method: str, t: dict, valid: torch.Tensor, n_keep, n_contextual=None):
    """Every kernel through one call shape; VisionZip's four outputs as a tuple, the others' ``kept``."""
    x = t["features"]
    if method == "cdpruner":
        return cdpruner_select(x, valid, n_keep, t["relevance_embeds"], t["instruction_embeds"],
                               t["instruction_valid"])
    if method == "scope":
        return scope_select(x, valid, n_keep, t["cls_attention"])
    if method == "divprune":
        return divprune_select(x, valid, n_keep)
    if method == "vispruner":
        return vispruner_select(x, valid, n_keep, t["cls_attention"])
    out = visionzip_select(x, valid, n_keep, t["cls_attention"], t["keys"],
                           [0] * valid.shape[0] if n_contextual is None else n_contextual)
    return tuple(out)


METHODS = ["cdpruner", "scope", "divprune", "visionzip", "vispruner"]
COUNTS = [40, 23, 31, 9]  # a ragged batch: sample b has COUNTS[b] real tokens, then padding
N_KEEP = [12, 5, 31, 2]
N_CONTEXTUAL = [7, 4, 0, 3]


def _ragged(seed: int = 0):
    t = _inputs(len(COUNTS), max(COUNTS), seed)
    valid = torch.arange(max(COUNTS))[None, :] < torch.tensor(COUNTS)[:, None]
    return t, valid


def _sample(t: dict, b: int, count: int) -> dict:
    return {k: v[b:b + 1, :count] if k not in ("instruction_embeds", "instruction_valid") else v[b:b + 1]
            for k, v in t.items()}


def _with_garbage(t: dict, valid: torch.Tensor, fill: float) -> dict:
    out = dict(t)
    for k in ("features", "cls_attention", "keys", "relevance_embeds"):
        pad = ~valid.reshape(*valid.shape, *([1] * (t[k].dim() - 2)))
        out[k] = t[k].masked_fill(pad, fill)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_ragged_batch_equals_each_sample_alone(method):
    t, valid = _ragged()
    batched = _run(method, t, valid, N_KEEP, N_CONTEXTUAL)
    for b, count in enumerate(COUNTS):
        alone = _run(method, _sample(t, b, count), torch.ones(1, count, dtype=torch.bool), [N_KEEP[b]],
                     [N_CONTEXTUAL[b]])
        if method != "visionzip":
            assert batched[b, :N_KEEP[b]].tolist() == alone[0].tolist()
            assert (batched[b, N_KEEP[b]:] == -1).all()
            continue
        kept, contextual, merged, assignment = batched
        c = N_CONTEXTUAL[b]
        assert kept[b, :N_KEEP[b]].tolist() == alone[0][0].tolist()
        assert contextual[b, :c].tolist() == alone[1][0].tolist()
        torch.testing.assert_close(merged[b, :c], alone[2][0], rtol=0, atol=1e-6)
        assert (merged[b, c:] == 0).all() and (contextual[b, c:] == -1).all()
        assert assignment[b, :count].tolist() == alone[3][0].tolist() and (assignment[b, count:] == -1).all()


@pytest.mark.parametrize("method", METHODS)
def test_kept_rows_are_sorted_unique_valid_and_padded_with_minus_one(method):
    t, valid = _ragged(seed=1)
    kept = _run(method, t, valid, N_KEEP, N_CONTEXTUAL)
    kept = kept[0] if method == "visionzip" else kept
    assert kept.dtype == torch.long and kept.shape == (len(COUNTS), max(N_KEEP))
    for b, (count, k) in enumerate(zip(COUNTS, N_KEEP)):
        row = kept[b, :k]
        assert (row[1:] > row[:-1]).all() and row.min() >= 0 and row.max() < count
        assert (kept[b, k:] == -1).all()


@pytest.mark.parametrize("method", METHODS)
def test_keeping_every_valid_token_returns_every_token(method):
    t, valid = _ragged(seed=2)
    kept = _run(method, t, valid, COUNTS)
    kept = kept[0] if method == "visionzip" else kept
    for b, count in enumerate(COUNTS):
        assert kept[b].tolist() == list(range(count)) + [-1] * (max(COUNTS) - count)


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("method", METHODS)
def test_padding_garbage_is_never_selected_and_changes_nothing(method, fill):
    t, valid = _ragged(seed=3)
    clean = _run(method, _with_garbage(t, valid, 0.0), valid, N_KEEP, N_CONTEXTUAL)
    dirty = _run(method, _with_garbage(t, valid, fill), valid, N_KEEP, N_CONTEXTUAL)
    if method == "visionzip":
        for a, b in zip(clean, dirty):
            assert torch.equal(a, b)
        kept = dirty[0]
    else:
        assert torch.equal(clean, dirty)
        kept = dirty
    assert (kept < torch.tensor(COUNTS)[:, None]).all()


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_inputs_select_as_their_float32_values(method):
    t, valid = _ragged(seed=4)
    low = {k: v.bfloat16() if v.is_floating_point() else v for k, v in t.items()}
    up = {k: v.float() if v.is_floating_point() else v for k, v in low.items()}
    got, want = _run(method, low, valid, N_KEEP, N_CONTEXTUAL), _run(method, up, valid, N_KEEP, N_CONTEXTUAL)
    if method == "visionzip":
        assert torch.equal(got[0], want[0]) and torch.equal(got[3], want[3])
        assert got[2].dtype == torch.bfloat16
        torch.testing.assert_close(got[2].float(), want[2], rtol=1e-2, atol=1e-2)
    else:
        assert torch.equal(got, want)


def _rows(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None]


def _all(p: int) -> torch.Tensor:
    return torch.ones(1, p, dtype=torch.bool)


def _relevance_case(q):
    """Relevance embeddings at cosine q_i with the one instruction row u = (1, 0): e_i = (q_i, sqrt(1 - q_i^2))."""
    e = _rows([[v, math.sqrt(1 - v * v)] for v in q])
    return e, _rows([[1.0, 0.0]]), torch.ones(1, 1, dtype=torch.bool)


def test_cdpruner_hand_computed_dpp_on_four_tokens():
    # q = (1, .9, .5, 0) -> r = q (min 0, max 1; the 1e-6 is negligible here). S_01 = .99, all other pairs 0.
    # d2 = r^2 = (1, .81, .25, 0): pick 0; e = r_j S_0j = (1, .891, 0, 0); d2_1 = .81 - .891^2 = .0161 < d2_2 = .25:
    # pick 2 (relevance alone would take 1); then d2_1 = .0161 > d2_3 = 0: pick 1.
    x = _rows([[1, 0, 0, 0], [0.99, math.sqrt(1 - 0.99 ** 2), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    e, u, uv = _relevance_case([1.0, 0.9, 0.5, 0.0])
    keep = lambda n, **kw: cdpruner_select(x, _all(4), [n], e, u, uv, negate_relevance=False, **kw)[0].tolist()  # noqa: E731
    assert keep(1) == [0] and keep(2) == [0, 2] and keep(3) == [0, 1, 2]
    # theta = .5: g = exp(.5 r) = (1.649, 1.568, 1.284, 1); d2_1 = 1.568^2 (1 - .99^2) = .049 < d2_3 = 1: pick 3.
    assert keep(3, theta=0.5) == [0, 2, 3]
    # The reference's sign: q -> -q gives r = (0, .1, .5, 1) (+1e-6): token 3 first, then 2.
    assert cdpruner_select(x, _all(4), [2], e, u, uv)[0].tolist() == [2, 3]


def test_scope_hand_computed_facility_location_on_four_points():
    # S_01 = .8, S_12 = .6, S_02 = 0, token 3 orthogonal. Column sums of max(0, S_ij): (1.8, 2.4, 1.6, 1): pick 1;
    # coverage m = (.8, 1, .6, 0); gains: token 0: .2, token 2: .4, token 3: 1 -> pick 3, then 2.
    x = _rows([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]])
    flat = torch.ones(1, 4)
    assert scope_select(x, _all(4), [1], flat)[0].tolist() == [1]
    assert scope_select(x, _all(4), [2], flat)[0].tolist() == [1, 3]
    assert scope_select(x, _all(4), [3], flat)[0].tolist() == [1, 2, 3]
    # Saliency .1 on token 3: its gain .1 < .4 of token 2; alpha = 0 ignores saliency again.
    salient = torch.tensor([[1.0, 1.0, 1.0, 0.1]])
    assert scope_select(x, _all(4), [2], salient)[0].tolist() == [1, 2]
    assert scope_select(x, _all(4), [2], salient, alpha=0.0)[0].tolist() == [1, 3]


def test_divprune_hand_computed_max_min_on_four_points():
    # D = 1 - S: D_01 = .2, D_12 = .4, every pair with 3 and D_02 are 1. Second smallest per column (self 0
    # included): (.2, .2, .4, 1) -> pick 3; min distance to {3}: (1, 1, 1) -> tie, lowest index 0;
    # min distance to {3, 0}: token 1 .2, token 2 1 -> pick 2.
    x = _rows([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]])
    assert divprune_select(x, _all(4), [1])[0].tolist() == [3]
    assert divprune_select(x, _all(4), [2])[0].tolist() == [0, 3]
    assert divprune_select(x, _all(4), [3])[0].tolist() == [0, 2, 3]


def test_visionzip_hand_computed_dominant_and_merged_tokens():
    # [CLS] attention ranks 1 and 3 first. Remaining (0, 2, 4, 5): R = 4, C = 2, step 2 -> targets ranks 0, 2 =
    # tokens 0, 4. Keys: k2 ~ k0, k5 ~ k4. Slot 0 = x0 + x2 = (4, 0); slot 1 = x4 + x5 = (0, 6).
    cls = torch.tensor([[0.1, 0.5, 0.2, 0.4, 0.05, 0.3]])
    keys = _rows([[1, 0], [0, 0.3], [1, 0.1], [0.5, 0.5], [0, 1], [0.1, 1]])
    x = _rows([[1, 0], [9, 9], [3, 0], [9, 9], [0, 1], [0, 5]])
    out = visionzip_select(x, _all(6), [2], cls, keys, [2])
    assert out.kept.tolist() == [[1, 3]] and out.contextual.tolist() == [[0, 4]]
    assert out.assignment.tolist() == [[0, -1, 0, -1, 1, 1]]
    assert out.merged.tolist() == [[[4.0, 0.0], [0.0, 6.0]]]


def test_vispruner_hand_computed_important_then_deduplicated_tokens():
    # n_keep 7, ratio .5: 3 important (attention decreases with the index: 0, 1, 2), 4 diverse from R = [3..8]:
    # r = min(8, 6 - 4) = 2; a = [3, 5, 7], b = [4, 6, 8]; x3 = x4 and x7 = x8 (max cos 1), x5 new (0):
    # drop 3 and 7 -> R = [5, 4, 6, 8]. Attention alone would keep 0..6.
    x = torch.eye(9)
    x[3], x[7] = x[4], x[8]
    cls = torch.linspace(0.9, 0.1, 9)[None]
    assert vispruner_select(x[None], _all(9), [7], cls)[0].tolist() == [0, 1, 2, 4, 5, 6, 8]
    assert vispruner_select(x[None], _all(9), [7], cls, important_ratio=1.0)[0].tolist() == list(range(7))


def test_duplicate_tokens_still_give_n_keep_distinct_tokens():
    # Tokens 0-2 share one direction, 3-5 another: the DPP kernel has rank 2 and every distance inside a group is 0.
    # DPP (relevance flat): picks 0 (residual 1, lowest index), then 3 (residual 1); every other residual is then 0:
    # the picks stand without an update (no NaN), lowest index first: 1. DivPrune never re-picks a kept token.
    x = _rows([[1, 0]] * 3 + [[0, 1]] * 3)
    no_text = torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.bool)
    assert cdpruner_select(x, _all(6), [3], x, *no_text)[0].tolist() == [0, 1, 3]
    assert divprune_select(x, _all(6), [4])[0].unique().numel() == 4


@pytest.mark.parametrize("method", METHODS)
def test_flops_match_the_matmuls_counted_by_torch(method):
    batch, p, n_keep, n_ctx = 2, 30, 9, 5
    t = _inputs(batch, p, seed=5)
    with FlopCounterMode(display=False) as counter:
        _run(method, t, torch.ones(batch, p, dtype=torch.bool), [n_keep] * batch, [n_ctx] * batch)
    hand = {"cdpruner": lambda: flops.cdpruner(p, D, n_keep, C_TEXT, T_TEXT),
            "scope": lambda: flops.scope(p, D, n_keep), "divprune": lambda: flops.divprune(p, D, n_keep),
            "visionzip": lambda: flops.visionzip(p, D, n_keep, DK, n_ctx),
            "vispruner": lambda: flops.vispruner(p, D, n_keep)}[method]()
    assert counter.get_total_flops() == batch * hand.matmul
    assert hand.total > hand.matmul


def test_flops_hand_counts_at_llava_shape():
    # 2 P^2 d for the similarity of 576 tokens of width 4096, plus CDPruner's greedy projections k (k - 1) P.
    assert flops.divprune(576, 4096, 144).matmul == 2 * 576 ** 2 * 4096
    assert flops.cdpruner(576, 4096, 144, 768, 1).matmul == 2 * 576 ** 2 * 4096 + 2 * 576 * 768 + 144 * 143 * 576
    assert flops.scope(576, 1024, 144).elementwise == 3 * 576 * 1024 + 576 + 144 * (3 * 576 ** 2 + 2 * 576)
    # VisPruner at 64 of 576: 32 important, R = 544 -> 32 in rounds of 8 = 64 rounds of 288 x 288 maxima.
    assert flops.vispruner(576, 1024, 64).elementwise == 3 * 576 * 1024 + 64 * 288 * 288


class _ScalarReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (``.item()``, ``bool(t)``, ``.tolist()``, nonzero)."""

    READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._schema.name in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", METHODS)
def test_no_host_read_per_greedy_step(method):
    t = _inputs(2, 40, seed=6)
    valid = torch.ones(2, 40, dtype=torch.bool)
    counts = []
    for n_keep in (4, 24):
        with _ScalarReads() as reads:
            _run(method, t, valid, [n_keep, n_keep - 1], [3, 3])
        counts.append(reads.count)
    assert counts[0] == counts[1]


def test_bad_budgets_name_the_fix():
    t, valid = _ragged()
    with pytest.raises(ValueError, match=r"n_keep\[1\] = 24 is outside 1..23"):
        divprune_select(t["features"], valid, [1, 24, 1, 1])
    with pytest.raises(ValueError, match="one per sample"):
        scope_select(t["features"], valid, [1, 2], t["cls_attention"])
    with pytest.raises(ValueError, match="n_contextual"):
        visionzip_select(t["features"], valid, N_KEEP, t["cls_attention"], t["keys"], [30, 1, 0, 1])
    with pytest.raises(ValueError, match="important_ratio"):
        vispruner_select(t["features"], valid, N_KEEP, t["cls_attention"], important_ratio=1.5)
    with pytest.raises(ValueError, match="theta"):
        cdpruner_select(t["features"], valid, N_KEEP, t["relevance_embeds"], t["instruction_embeds"],
                        t["instruction_valid"], theta=1.0)
    with pytest.raises(ValueError, match="give all three"):
        cdpruner_select(t["features"], valid, N_KEEP, t["relevance_embeds"], None, None)


@pytest.mark.parametrize("kernel", ["scope", "divprune", "cdpruner", "vispruner"])
def test_greedy_loops_run_on_one_cpu_thread_and_restore_the_count(kernel, monkeypatch):
    """Under load two OpenMP threads made SCOPE's loop 40x slower; the loops take one thread, then give it back."""
    import lofi.selectors._batch as batch_module
    seen = []
    original = batch_module.row_of if kernel != "vispruner" else torch.Tensor.amax

    def spying(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    module = {"scope": "coverage", "divprune": "diversity", "cdpruner": "dpp"}.get(kernel)
    if module:
        monkeypatch.setattr(f"lofi.selectors.{module}.row_of", spying)
    else:
        monkeypatch.setattr(torch.Tensor, "amax", spying)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t = _inputs(2, 24)
        valid = torch.ones(2, 24, dtype=torch.bool)
        run = {"scope": lambda: scope_select(t["features"], valid, [5, 7], t["cls_attention"]),
               "divprune": lambda: divprune_select(t["features"], valid, [5, 7]),
               "cdpruner": lambda: cdpruner_select(t["features"], valid, [5, 7], None, None, None),
               "vispruner": lambda: vispruner_select(t["features"], valid, [5, 7], t["cls_attention"])}[kernel]
        run()
        assert seen.count(1) >= 3  # the loop's steps (a call before the loop may use both threads)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
