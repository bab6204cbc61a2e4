"""The method registry and the errors bad arguments get."""

import pytest
import torch
from _tiny import make_inputs, tiny_llava

import lofi


def test_available_lists_the_built_in_methods():
    assert {"fastv", "lofi", "random"} <= set(lofi.available())
    assert lofi.available() == sorted(lofi.available())
    assert all(lofi.describe()[name] for name in lofi.available())


def test_unknown_method_lists_the_valid_ones():
    model = tiny_llava()
    with pytest.raises(ValueError, match="valid methods: .*fastv, lofi"):
        with lofi.pruned(model, "fastvv"):
            pass


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, "half", True])
def test_bad_keep(keep):
    with pytest.raises(ValueError, match=r"keep must be a fraction in \(0, 1\]"):
        with lofi.pruned(tiny_llava(), "lofi", keep=keep):
            pass


@pytest.mark.parametrize("method,layer", [("lofi", 4), ("lofi", -1), ("random", 1.5), ("fastv", 0)])
def test_bad_layer_names_the_valid_range(method, layer):
    with pytest.raises(ValueError, match=r"layer must be an int in \[[01], 3\]"):
        with lofi.pruned(tiny_llava(), method, keep=0.5, layer=layer):
            pass


def test_unknown_option_lists_the_methods_options():
    with pytest.raises(TypeError, match=r"lofi takes no option\(s\) \['tua'\]; its options: .*'tau'"):
        with lofi.pruned(tiny_llava(), "lofi", keep=0.5, tua=0.9):
            pass


def test_register_rejects_a_second_class_under_a_taken_name():
    class Impostor(lofi.PruningMethod):
        name = "lofi"
    with pytest.raises(ValueError, match="already registered"):
        lofi.register(Impostor)


def test_unsupported_attention_implementation_names_the_fix():
    model = tiny_llava()
    model.config.text_config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
            with lofi.pruned(model, "lofi"):
                pass
    finally:
        model.config.text_config._attn_implementation = "sdpa"


def test_inputs_embeds_without_ids_is_a_clear_error_when_pixels_come():
    model = tiny_llava()
    inputs = make_inputs()
    embeds = model.get_input_embeddings()(inputs["input_ids"].clamp_max(50))
    with pytest.raises(ValueError, match="needs input_ids"):
        with lofi.pruned(model, "lofi"):
            model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"])
    with torch.no_grad():  # text alone has no visual token to find: it runs as the unpruned model
        base = model(inputs_embeds=embeds).logits
        with lofi.pruned(model, "lofi"):
            assert torch.equal(model(inputs_embeds=embeds).logits, base)


def test_a_built_method_takes_no_settings_in_pruned():
    from _tiny import tiny_llava
    model = tiny_llava()
    with pytest.raises(TypeError, match=r"already built: pass \['keep'\]"):
        with lofi.pruned(model, lofi.build("lofi", keep=0.5), keep=0.1):
            pass
    with pytest.raises(TypeError, match=r"\['layer', 'tau'\]"):
        with lofi.pruned(model, lofi.build("lofi", keep=0.5), layer=3, tau=0.5):
            pass


def test_lvpruning_follows_the_paper_while_every_stage_keeps_tokens_and_the_schedule_shape_below():
    from lofi.methods.lvpruning import LVPruning
    assert LVPruning(keep=0.7).ratios() == pytest.approx([0.7, 0.5, 0.3])
    assert LVPruning(keep=0.5).ratios() == pytest.approx([0.5, 0.3, 0.1])
    assert LVPruning(keep=0.45).ratios() == pytest.approx([0.45, 0.25, 0.05])  # the paper's rule, not 0.45 x shape
    assert LVPruning(keep=0.41).ratios() == pytest.approx([0.41, 0.21, 0.01])
    assert LVPruning(keep=0.4).ratios() == pytest.approx([0.4, 0.24, 0.08])  # the paper's last stage would be empty
    assert LVPruning(keep=0.25).ratios() == pytest.approx([0.25, 0.15, 0.05])
    assert LVPruning(keep=0.3, offsets=(0, 0.1, 0.2)).ratios() == pytest.approx([0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="every stage must keep a positive fraction"):
        LVPruning(keep=0.6, offsets=(0, 0.3, 0.6))
