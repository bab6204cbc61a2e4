"""FLOPs accounting against the formula of SPEC section 5 and LVPruning's Table 1."""

import pytest

import lofi
from _llava7b import llava_15_7b_config
from _tiny import tiny_llava


def test_llava_15_7b_whole_model_matches_lvpruning_table_1():
    flops = lofi.count_flops(llava_15_7b_config(), n_text=30, n_visual=576)
    assert flops.total == pytest.approx(8.38e12, rel=0.03)
    d, m, n = 4096, 11008, 606
    assert flops.llm == 32 * 2 * (4 * n * d**2 + 2 * n**2 * d + 3 * n * d * m)
    assert flops.lm_head == 2 * d * 32064


def test_stages_reduce_only_the_layers_after_them():
    config = llava_15_7b_config()
    base = lofi.count_flops(config, 30, 576)
    pruned = lofi.count_flops(config, 30, 576, stages=[(2, 288)])
    per_layer = lambda n: 2 * (4 * n * 4096**2 + 2 * n**2 * 4096 + 3 * n * 4096 * 11008)  # noqa: E731
    assert pruned.llm == 2 * per_layer(606) + 30 * per_layer(318)
    assert pruned.vision == base.vision and pruned.projector == base.projector
    assert 0.5 < pruned.llm / base.llm < 0.6  # FastV K=2 R=50%: ~55% (methods.md C3)
    progressive = lofi.count_flops(config, 30, 576, stages=[(16, 100), (2, 288)])
    assert progressive.llm < pruned.llm


def test_method_schedules_feed_count_flops():
    model = tiny_llava()
    method = lofi.build("fastv", keep=0.25, layer=2)
    assert method.schedule(4, 16) == [(2, 4)]
    flops = lofi.count_flops(model.config, 6, 16, method.schedule(4, 16))
    assert flops.llm < lofi.count_flops(model.config, 6, 16).llm


def test_gqa_narrows_only_the_key_value_projections():
    gqa = tiny_llava(kv_heads=2).config
    mha = tiny_llava(kv_heads=4).config
    difference = lofi.count_flops(mha, 6, 16).llm - lofi.count_flops(gqa, 6, 16).llm
    n, d, layers = 22, 64, 4
    assert difference == layers * 2 * (2 * n * d * (d - d // 2))
