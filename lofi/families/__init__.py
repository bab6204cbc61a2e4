"""Model families the runtime supports, chosen by ``config.model_type``.

    lofi.families.family_for(model)          # the adapter instance for a loaded model
    lofi.families.family_class(config)       # its class, for FLOPs and layouts from a config alone
    lofi.families.supported()                # {"llava": "LlavaForConditionalGeneration", ...}

Adding a family is one module here: a ``Family`` subclass (see ``lofi.families.base``) listed in
``FAMILIES``.
"""

from __future__ import annotations

from lofi.families.base import Family, Tile
from lofi.families.llava import Llava
from lofi.families.llava_next import LlavaNext
from lofi.families.llava_onevision import LlavaOnevision
from lofi.families.qwen2_vl import Qwen2_5VL, Qwen2VL

FAMILIES: tuple[type[Family], ...] = (Llava, LlavaNext, LlavaOnevision, Qwen2VL, Qwen2_5VL)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


class UnsupportedModelError(TypeError):
    """A model (or config) of a family the runtime does not know; the message lists the supported ones."""


def supported() -> dict[str, str]:
    """``config.model_type`` -> model class, for every supported family."""
    return {t: f.classes[0] for f in FAMILIES for t in f.model_types}


def family_class(config) -> type[Family]:
    """The family of a transformers config (``UnsupportedModelError`` naming the supported ones)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_TYPE:
        classes = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        names = ", ".join(f"{cls} ({t})" for t, cls in supported().items())
        raise UnsupportedModelError(f"this is a {model_type!r} model ({classes}); lofi supports {names}")
    return _BY_TYPE[model_type]


def family_for(model) -> Family:
    """The family adapter of a loaded model."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no transformers config; lofi supports "
                                    + ", ".join(supported().values()))
    return family_class(config)(model)


__all__ = ["Family", "Tile", "FAMILIES", "UnsupportedModelError", "supported", "family_class", "family_for"]
