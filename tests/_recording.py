"""Records of what a model runs, to tell two runs' code paths apart: every module call's arguments and results
(``module_calls``) and every aten op the model's own code dispatches (``ModelOps``).

A tensor is recorded with everything that can steer a kernel's choice, not only its values: shape, strides,
storage offset, contiguity, dtype, device, ``requires_grad`` and its bytes. ``None`` stays ``None`` (a mask
the model skips is not a materialised one), flags stay their values, a KV cache is recorded layer by layer
as it is at the call. ``differences`` lists where two records part, by module, call and argument path.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import lofi

LOFI = str(Path(lofi.__file__).parent) + "/"
TRANSFORMERS = str(Path(transformers.__file__).parent) + "/"


def _tensor(t: torch.Tensor, values: bool) -> tuple:
    layout = ("tensor", tuple(t.shape), t.stride(), t.storage_offset(), t.is_contiguous(), t.dtype, str(t.device),
              t.requires_grad)
    if not values:
        return layout
    data = t.detach().cpu().contiguous().reshape(-1)
    return (*layout, data.view(torch.uint8) if data.dtype != torch.bool else data)


def flatten(obj, path: str = "", values: bool = True) -> list[tuple[str, object]]:
    """``obj`` as (path, leaf) pairs: tensors as ``_tensor`` tuples, containers and caches opened up, any other
    object as its type's name (its identity is not the model's numerics)."""
    if isinstance(obj, torch.Tensor):
        return [(path, _tensor(obj, values))]
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device, torch.layout,
                                        torch.memory_format)):
        return [(path, obj)]
    if isinstance(obj, dict):  # ModelOutput is a dict
        return [(path, f"{type(obj).__name__} {list(obj)}")] + [
            pair for key, value in obj.items() for pair in flatten(value, f"{path}[{key!r}]", values)]
    if isinstance(obj, (tuple, list)):
        return [(path, f"{type(obj).__name__} of {len(obj)}")] + [
            pair for i, value in enumerate(obj) for pair in flatten(value, f"{path}[{i}]", values)]
    if hasattr(obj, "layers") and hasattr(obj, "get_seq_length"):  # a KV cache, as it is now
        return [(path, f"{type(obj).__name__} of {len(obj.layers)}")] + [
            pair for i, layer in enumerate(obj.layers) for name in ("keys", "values")
            for pair in flatten(getattr(layer, name, None), f"{path}.layers[{i}].{name}", values)]
    return [(path, type(obj).__name__)]


@contextmanager
def module_calls(model: torch.nn.Module, record: list):
    """Append to ``record`` every module call of ``model`` while active: (module name, "call", its positional
    and keyword arguments flattened) when it starts, after every pre-hook registered before this one (what the
    module really receives), and (module name, "return", its output flattened) when it ends."""
    def called(name, module, args, kwargs):
        with _disable_current_modes():  # the record's own copies are not the model's ops (``ModelOps``)
            record.append((name, "call", flatten(args, "args") + flatten(kwargs, "kwargs")))

    def returned(name, module, args, kwargs, output):
        with _disable_current_modes():
            record.append((name, "return", flatten(output, "output")))

    handles = []
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, name=name: called(name, m, a, k), with_kwargs=True))
            handles.append(module.register_forward_hook(
                lambda m, a, k, o, name=name: returned(name, m, a, k, o), with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _from_lofi() -> bool:
    """Whether the op being dispatched comes from ``lofi``: the nearest frame of either package is lofi's (model
    code a tap wraps stays the model's; torch functions lofi calls are lofi's)."""
    frame = sys._getframe(2)
    while frame is not None:
        file = frame.f_code.co_filename
        if file.startswith(LOFI):
            return True
        if file.startswith(TRANSFORMERS):
            return False
        frame = frame.f_back
    return False


class ModelOps(TorchDispatchMode):
    """Every aten op dispatched while active, as (op, "op", its arguments' and output's layouts flattened: not
    their values), except the ops ``lofi``'s own code runs (``_from_lofi``): the model's kernels in ``ops``, the
    names of lofi's in ``runtime``."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.runtime: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _from_lofi():
            self.runtime.append(str(func))
        else:
            self.ops.append((str(func), "op", flatten((args, kwargs or {}), "in", values=False)
                             + flatten(out, "out", values=False)))
        return out


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple) and a[:1] == b[:1] == ("tensor",):
        if a[:8] != b[:8] or len(a) != len(b):
            return False
        return len(a) == 8 or torch.equal(a[8], b[8])
    return type(a) is type(b) and (a == b or a != a and b != b)  # NaN: the same flag


def differences(expected: list[tuple], got: list[tuple], most: int = 5) -> list[str]:
    """Where two records (of ``module_calls`` or ``ModelOps``) part: up to ``most`` readable lines, empty when
    identical."""
    found = []
    if len(expected) != len(got):
        found.append(f"{len(expected)} entries against {len(got)}")
    for i, (a, b) in enumerate(zip(expected, got)):
        if a[:-1] != b[:-1]:
            found.append(f"#{i}: {a[:-1]} against {b[:-1]}")
            break  # the two runs no longer follow each other
        pairs_a, pairs_b = a[-1], b[-1]
        if [p for p, _ in pairs_a] != [p for p, _ in pairs_b]:
            found.append(f"#{i} {a[:-1]}: arguments {[p for p, _ in pairs_a]} against {[p for p, _ in pairs_b]}")
            continue
        for (path, x), (_, y) in zip(pairs_a, pairs_b):
            if not _same(x, y):
                found.append(f"#{i} {a[:-1]} {path}: {_show(x)} against {_show(y)}")
        if len(found) >= most:
            break
    return found[:most]


def _show(leaf) -> str:
    if isinstance(leaf, tuple) and leaf[:1] == ("tensor",):
        text = f"tensor{list(leaf[1])} strides {leaf[2]} offset {leaf[3]} {leaf[5]} {leaf[6]}"
        return text + (" (values)" if len(leaf) == 9 else "")
    return repr(leaf)
