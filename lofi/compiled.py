"""The opt-in compiled path: a VLM's decoder layers and vision blocks run through ``torch.compile``.

    with lofi.compiled(model), lofi.pruned(model, "lofi", keep=0.25):
        model(**inputs)                      # or generate(); the unpruned baseline: lofi.compiled alone

A batch-1 prefill on a GPU spends most of its time launching kernels (thousands per prefill), and
pruning does not reduce their number; compiling the layers fuses them. What compiles, and why so:

* Each layer's ``forward`` (norms, attention, MLP, its KV-cache update). The pruning runtime's hooks
  stay eager between the layers (so do ``analysis`` hooks); the tensor work of its pruning step runs
  compiled too (``lofi.stage``, same backend, never CUDA graphs). The runtime reads the device once per
  prompt, before the first layer, so nothing compiled waits on the host.
* One compiled function per layer, each with its own code object: torch.compile keeps its graphs per
  code object and specialises each on the layer's KV-cache index, so layers sharing one function would
  pass its recompile limit (8) and silently fall back to eager from the ninth layer on.
* ``dynamic=True`` by default: one graph per layer serves the unpruned length and every kept count, so
  a new keep fraction compiles nothing.
* No graph breaks. transformers keeps the outputs its hooks collect (``output_hidden_states``,
  ``output_attentions``) in a ``ContextVar``, which dynamo cannot read; hooks on a layer's submodules
  (LLaVA's vision tower, asked for hidden states, hooks its blocks' attention) would break every
  compiled block's graph in two. Inside the block compiled code reads a plain mirror of that variable
  instead (``_TraceableCollector``); like transformers' own compiled path this is not thread-safe while
  compiled code runs.

Compiled functions are kept per module and options and reused by later blocks. Leaving the block (also
after an exception) gives every module back its own ``forward``.
"""

from __future__ import annotations

import types
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from lofi.families import family_for

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class _TraceableCollector:
    """transformers' output collector (``output_capturing._active_collector``) with a plain mirror of the
    innermost value set: compiled code reads the mirror (dynamo traces an attribute, not
    ``ContextVar.get``), eager code the wrapped variable as before."""

    def __init__(self, inner):
        self.inner, self.value = inner, None

    def get(self):
        return self.value if torch.compiler.is_compiling() else self.inner.get()

    def set(self, value):
        token = (self.inner.set(value), self.value)
        self.value = value
        return token

    def reset(self, token):
        inner_token, self.value = token
        self.inner.reset(inner_token)


@contextmanager
def _traceable_output_collector() -> Iterator[None]:
    """Within the block transformers' output collector is a ``_TraceableCollector`` (nested blocks share the
    outermost one's); given back on leaving."""
    try:
        from transformers.utils import output_capturing
    except ImportError:  # a transformers without the collector has nothing to mirror
        yield
        return
    original = getattr(output_capturing, "_active_collector", None)
    if original is None or isinstance(original, _TraceableCollector):
        yield
        return
    output_capturing._active_collector = _TraceableCollector(original)
    try:
        yield
    finally:
        output_capturing._active_collector = original


def _own_function(function):
    """``function`` with a code object of its own (torch.compile caches per code object)."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


def _compiled_forward(module: nn.Module, options: dict):
    """A compiled replacement for ``module.forward``; cached when ``forward`` is the class's own."""
    if "forward" in vars(module):  # already wrapped on the instance (accelerate's device hooks): compile that
        forward = module.forward

        def call(*args, **kwargs):
            return forward(*args, **kwargs)
        return torch.compile(_own_function(call), **options)
    key = repr(sorted(options.items()))
    cached = _CACHE.setdefault(module, {})
    if key not in cached:
        function = type(module).forward

        def call(module, *args, **kwargs):
            return function(module, *args, **kwargs)
        cached[key] = torch.compile(_own_function(call), **options)
    compiled = cached[key]
    return types.MethodType(compiled, module)


def compiled_modules(model: nn.Module, vision: bool = True) -> list[nn.Module]:
    """The modules ``compiled`` compiles: the language model's decoder layers, and the vision encoder's
    blocks when ``vision``."""
    family = family_for(model)
    return [*family.layers(), *(family.vision_layers() if vision else [])]


@contextmanager
def compiled(model: nn.Module, vision: bool = True, **options) -> Iterator[list[nn.Module]]:
    """Run ``model``'s decoder layers (and vision blocks) compiled while the block is active.

    Args:
        model: a VLM of a supported family (``lofi.families.supported()``).
        vision: compile the vision encoder's blocks too (default True).
        **options: ``torch.compile`` options (default ``dynamic=True``); e.g. ``mode="reduce-overhead"``
            for CUDA graphs on a GPU, ``backend="eager"`` to check tracing alone.

    Yields:
        The compiled modules. The first call of each shape compiles (seconds per layer); later calls,
        and later blocks with the same options, reuse the graphs.
    """
    options = {"dynamic": True, **options}
    torch.compile(lambda: None, **options)  # a bad option fails here, in one line, not at the first forward
    modules = compiled_modules(model, vision)
    if id(model) in _ACTIVE:
        raise RuntimeError("this model is already inside lofi.compiled(...)")
    patched: list[tuple[nn.Module, object]] = []
    _ACTIVE[id(model)] = options
    try:
        for module in modules:
            patched.append((module, vars(module).get("forward", _MISSING)))
            module.forward = _compiled_forward(module, options)
        with _traceable_output_collector():
            yield modules
    finally:
        _ACTIVE.pop(id(model), None)
        for module, previous in reversed(patched):
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous


def options_of(model: nn.Module) -> dict | None:
    """The ``torch.compile`` options of the ``compiled`` block ``model`` is in, or None."""
    return _ACTIVE.get(id(model))


_ACTIVE: dict[int, dict] = {}
_MISSING = object()
