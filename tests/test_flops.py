"""FLOPs accounting against the formula of docs/definitions.md#flops and LVPruning's Table 1."""

import pytest
from _tiny import tiny_llava

import lofi
from benchmarks.shapes import checkpoint_config


def test_llava_15_7b_whole_model_matches_lvpruning_table_1():
    flops = lofi.count_flops(checkpoint_config("llava-1.5-7b"), n_text=30, n_visual=576)
    assert flops.total == pytest.approx(8.38e12, rel=0.03)
    d, m, n = 4096, 11008, 606
    assert flops.llm == 32 * 2 * (4 * n * d**2 + 2 * n**2 * d + 3 * n * d * m)
    assert flops.lm_head == 2 * d * 32064


def test_stages_reduce_only_the_layers_after_them():
    config = checkpoint_config("llava-1.5-7b")
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


# ---------------------------------------------------------------------------------- every family, by hand
from lofi.families import family_class  # noqa: E402


def _vit_layer(n, d, m, mlp=2):
    return 2 * (4 * n * d * d + 2 * n * n * d + mlp * n * d * m)


def _visual_tokens(name, image):
    config = checkpoint_config(name)
    tiles = family_class(config).tiles(config, image)
    return tiles[0].start + sum(t.tokens for t in tiles)


@pytest.mark.parametrize("name,image,tokens", [
    ("llava-next-7b", (672, 672), 576 + 48 * 49),        # 2 x 2 crops, 48 rows each ending in a newline
    ("llava-next-7b", (336, 672), 576 + 24 * 49),        # 1 x 2 crops
    ("llava-next-7b", (500, 300), 576 + 40 * 25),        # 2 x 1 crops (672 x 336), unpadded to 40 x 24 (+ newlines)
    ("llava-onevision-7b", (384, 384), 729 + 27 * 28),    # 1 x 1 crop, no downsampling
    ("llava-onevision-7b", (2304, 2304), 729 + 81 * 82),  # 6 x 6 crops: 162 x 162 downsampled by 2 (anyres_max_9)
    ("qwen2-vl-7b", (1, 36, 36), 18 * 18),                # 504 x 504 pixels, 2 x 2 patches per token
    ("qwen2.5-vl-7b", (1, 24, 40), 12 * 20),
])
def test_visual_token_counts_of_the_7b_checkpoints(name, image, tokens):
    assert _visual_tokens(name, image) == tokens


def test_llava_next_vision_and_projector_flops_count_every_crop():
    config = checkpoint_config("llava-next-7b")
    flops = lofi.count_flops(config, 30, 2928, image=(672, 672))
    crops, n, d = 5, 577, 1024
    embed = 2 * 576 * (3 * 14 * 14) * d
    assert flops.vision == pytest.approx(crops * (embed + 24 * _vit_layer(n, d, 4096)), rel=1e-12)
    assert flops.projector == pytest.approx(crops * 576 * 2 * (1024 * 4096 + 4096 * 4096), rel=1e-12)


def test_llava_onevision_flops_have_no_cls_token():
    config = checkpoint_config("llava-onevision-7b")
    flops = lofi.count_flops(config, 30, 7371, image=(2304, 2304))
    crops, n, d = 37, 729, 1152
    embed = 2 * 729 * (3 * 14 * 14) * d
    assert flops.vision == pytest.approx(crops * (embed + 26 * _vit_layer(n, d, 4304)), rel=1e-12)
    assert flops.projector == pytest.approx(crops * 729 * 2 * (1152 * 3584 + 3584 * 3584), rel=1e-12)
    d, m, kv = 3584, 18944, 4 * 128  # Qwen2-7B: GQA with 4 key-value heads of 128
    n = 30 + 7371
    assert flops.llm == pytest.approx(28 * 2 * (2 * n * d * d + 2 * n * d * kv + 2 * n * n * d + 3 * n * d * m))


def test_qwen2_vl_attends_over_the_whole_image_in_every_block():
    config = checkpoint_config("qwen2-vl-7b")
    flops = lofi.count_flops(config, 30, 324, image=(1, 36, 36))
    n, d = 1296, 1280
    block = 2 * 4 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * (4 * d)
    assert flops.vision == pytest.approx(2 * n * 1176 * d + 32 * block, rel=1e-12)
    assert flops.projector == pytest.approx(324 * 2 * (5120 * 5120 + 5120 * 3584), rel=1e-12)


def test_qwen2_5_vl_attends_within_windows_except_four_blocks():
    config = checkpoint_config("qwen2.5-vl-7b")
    flops = lofi.count_flops(config, 30, 324, image=(1, 36, 36))
    n, d, m = 1296, 1280, 3420
    # 18 x 18 merged tokens in windows of 4 x 4: sides 4, 4, 4, 4, 2; a window of a x b tokens holds 4ab patches
    windowed = sum((4 * a * b) ** 2 for a in (4, 4, 4, 4, 2) for b in (4, 4, 4, 4, 2))
    assert windowed == 16 * 68 ** 2
    common = 2 * 4 * n * d * d + 2 * 3 * n * d * m
    expected = 2 * n * 1176 * d + 28 * (common + 2 * 2 * windowed * d) + 4 * (common + 2 * 2 * n * n * d)
    assert flops.vision == pytest.approx(expected, rel=1e-12)
    assert flops.vision < lofi.count_flops(checkpoint_config("qwen2-vl-7b"), 30, 324, image=(1, 36, 36)).vision


def test_the_7b_configs_hold_the_checkpoints_shapes():
    assert checkpoint_config("qwen2-vl-7b").text_config.num_key_value_heads == 4
    assert checkpoint_config("llava-next-7b", text_layers=2).text_config.num_hidden_layers == 2
    assert checkpoint_config("qwen2.5-vl-7b", vision_layers=9).vision_config.fullatt_block_indexes == [7]
    with pytest.raises(ValueError, match="valid: llava-1.5-7b"):
        checkpoint_config("llava-13b")


def test_fastv_counts_the_attention_rows_it_rebuilds():
    """Keys of every token, the ranking rows' queries and their scores at layer K-1, by hand."""
    config = tiny_llava(kv_heads=2).config  # d 64, 4 heads of 16, 2 key-value heads
    n_text, n_visual, d, d_kv = 6, 16, 64, 32
    n = n_text + n_visual
    last = lofi.build("fastv", keep=0.25).decision_flops(config, n_text, [n_visual])
    assert last == 2 * n * d * d_kv + 2 * 1 * d * d + 2 * 1 * n * d
    text = lofi.build("fastv", keep=0.25, queries="text").decision_flops(config, n_text, [n_visual])
    assert text == 2 * n * d * d_kv + 2 * n_text * d * d + 2 * n_text * n * d


def test_a_stage_that_keeps_every_token_spends_no_decision_flops():
    """The runtime runs no decision work at a stage that keeps all it holds (keep = 1), so the count has none."""
    from analysis.study.tables import relative_flops

    config = tiny_llava().config
    n_text = 6
    fastv = lofi.build("fastv", keep=1.0)
    assert fastv.decision_flops(config, n_text, [16]) > 0
    assert fastv.spent_decision_flops(config, n_text, [16], [16]) == 0
    assert relative_flops(config, fastv, n_text, 16) == (1.0, 1.0)
    pruning = lofi.build("fastv", keep=0.25)
    assert pruning.spent_decision_flops(config, n_text, [16], [4]) == pruning.decision_flops(config, n_text, [16])
    assert lofi.method_flops(config, pruning, n_text, 16).decision == pruning.decision_flops(config, n_text, [16])
    assert lofi.method_flops(config, fastv, n_text, 16) == lofi.count_flops(config, n_text, 16)
    lvpruning = lofi.build("lvpruning", keep=1.0)  # rho = 1: its first stage keeps every token, the others drop
    spent = lvpruning.spent_decision_flops(config, n_text, [16, 16, 13], [16, 13, 10])
    assert spent == lvpruning.decision_flops(config, n_text, [16, 13]) > 0


def test_lvpruning_at_rho_045_prunes_on_the_papers_schedule_at_llava_15_7b_shape():
    """rho = 0.45 keeps [0.45, 0.25, 0.05] of 576 tokens (ceil: 260, 144, 29) at layers 1, 8, 16 of 32."""
    from lofi.methods.lvpruning import LVPruning
    config = checkpoint_config("llava-1.5-7b")
    schedule = LVPruning(keep=0.45).schedule(32, 576)
    assert schedule == [(1, 260), (8, 144), (16, 29)]
    per_layer = lambda n: 2 * (4 * n * 4096**2 + 2 * n**2 * 4096 + 3 * n * 4096 * 11008)  # noqa: E731
    expected = per_layer(606) + 7 * per_layer(290) + 8 * per_layer(174) + 16 * per_layer(59)
    assert lofi.count_flops(config, 30, 576, schedule).llm == expected
