"""Where things are in a Hugging Face LLaVA model: the one place that knows module paths.

Everything else in ``lofi`` asks these functions for the language model, its decoder layers, the
module that receives ``input_ids`` and the image token id, so a transformers refactor or another
LLaVA-family class is absorbed here.
"""

from __future__ import annotations

from torch import nn

SUPPORTED_ATTENTION = ("sdpa", "eager")
SUPPORTED_MODELS = {"llava": "LlavaForConditionalGeneration"}  # config.model_type -> model class


class UnsupportedModelError(TypeError):
    """A model (or config) of a family the runtime does not know; the message lists the supported ones."""


def check_supported(config) -> None:
    """Raise ``UnsupportedModelError`` unless ``config`` (a transformers config) is of a supported family."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODELS:
        classes = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        supported = ", ".join(f"{cls} (model_type {t!r})" for t, cls in SUPPORTED_MODELS.items())
        raise UnsupportedModelError(f"this is a {model_type!r} model ({classes}); lofi supports {supported}")


def multimodal_model(model: nn.Module) -> nn.Module:
    """The module whose forward receives ``input_ids`` and ``pixel_values`` (``LlavaModel``)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        return inner
    if hasattr(model, "language_model") and hasattr(model, "vision_tower"):
        return model
    raise TypeError(f"{type(model).__name__} is not a LLaVA-style model: expected "
                    "`model.model.language_model` (LlavaForConditionalGeneration)")


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel`` for LLaVA-1.5)."""
    lm = multimodal_model(model).language_model
    if not hasattr(lm, "layers"):
        raise TypeError(f"the language model {type(lm).__name__} has no `.layers`; lofi needs a decoder stack")
    return lm


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return language_model(model).layers


def image_token_id(model: nn.Module) -> int:
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise TypeError("the model config names no image token (image_token_id / image_token_index)")


def attention_implementation(model: nn.Module) -> str:
    text_config = getattr(model.config, "text_config", model.config)
    return getattr(text_config, "_attn_implementation", None) or "eager"


def rotary_helper(layer: nn.Module):
    """The ``apply_rotary_pos_emb`` of the layer's own modeling module (Llama, Mistral, Qwen2, ...)."""
    import sys
    module = sys.modules[type(layer.self_attn).__module__]
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(f"{type(layer.self_attn).__name__} has no apply_rotary_pos_emb in its module; "
                        "attention-ranked methods (fastv) cannot rebuild its attention")
    return fn
