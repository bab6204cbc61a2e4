"""FLOPs of the methods that choose before the language model: a stage at layer 0 plus each method's own work,
counted by hand from its kernel's shapes."""

import pytest
from _families import build

import lofi
from lofi.selectors import flops as kernel_flops


@pytest.fixture(scope="module")
def config():
    return build("llava").config


def _text_layer(config, n):
    text = config.text_config
    d, m, kv = text.hidden_size, text.intermediate_size, text.num_key_value_heads * (text.hidden_size //
                                                                                     text.num_attention_heads)
    return 2 * (2 * n * d * d + 2 * n * d * kv + 2 * n * n * d + 3 * n * d * m)


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_divprune_and_cdpruner_prune_every_layer_and_count_their_greedy(config, keep):
    n_text, n_visual = 9, 16
    n_keep = {0.25: 4, 0.5: 8}[keep]
    d = config.text_config.hidden_size
    for name, own in (("divprune", kernel_flops.divprune(16, d, n_keep).total),
                      ("cdpruner", kernel_flops.cdpruner(16, d, n_keep, d, n_text).total)):
        method = lofi.build(name, keep=keep)
        flops = lofi.method_flops(config, method, n_text, n_visual)
        assert method.schedule(4, n_visual) == [(0, n_keep)]
        assert flops.llm == 4 * _text_layer(config, n_text + n_keep)
        assert flops.decision == own


def test_tower_methods_count_the_rebuilt_cls_attention(config):
    vision = config.vision_config
    d, h = vision.hidden_size, vision.num_attention_heads
    rebuilt = 2 * 17 * d * d + 2 * d * d + 2 * 17 * d + 3 * 17 * h  # keys of 16 patches + [CLS], one query, scores
    scope = lofi.build("scope", keep=0.25)
    assert lofi.method_flops(config, scope, 9, 16).decision == kernel_flops.scope(16, d, 4).total + rebuilt
    zip_ = lofi.build("visionzip", keep=0.5)  # 8 kept: round(8 x 10/64) = 1 contextual, 7 dominant
    assert lofi.method_flops(config, zip_, 9, 16).decision == \
        kernel_flops.visionzip(16, d, 7, d // h, 1).total + rebuilt


def test_keep_one_spends_no_decision_work(config):
    for name in ("cdpruner", "divprune", "scope", "visionzip", "vispruner"):
        assert lofi.method_flops(config, lofi.build(name, keep=1.0), 9, 16).decision == 0
