"""The aten ops and host syncs of one prefill: the model's own, the pruning runtime's, and where each sync falls.

    python -m benchmarks.op_counts --shape overhead                              # CPU
    python -m benchmarks.op_counts --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1

At batch 1 a GPU prefill is launch-bound: the host dispatches each aten op (about one kernel launch each) more
slowly than the GPU runs it, so an op the runtime adds costs host time that a shorter sequence does not give
back. ``OpCounter`` (a ``TorchDispatchMode``) counts every op one prefill dispatches and gives it to the
runtime when ``lofi/`` code issued it (``lofi/compiled.py``, which only calls a layer's forward, excepted) and
to the model otherwise, on any device. ``kernels`` leaves out views and allocations, which launch nothing;
``host`` counts the runtime's ops on tensors already copied to the host (its sizes: ``HOST_SIDE`` functions),
which a GPU run does not launch either.

A sync is a call that makes the host wait for the device (``.item()``, ``bool()``, ``.cpu()``, ``.tolist()``,
``nonzero``, ``torch.equal``, a boolean-mask index); each is listed with who made it, the function, and where
in the prefill it fell: before the vision tower (the queue holds nothing yet, so the wait is short), in or
after it (the wait drains whatever the vision tower queued), or in a decoder layer.

For each method and keep the script prints the model's ops (the same in every run: pruning shortens tensors,
not the op sequence), the runtime's ops by file, and the syncs.
"""

from __future__ import annotations

import argparse
import collections
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lofi
from benchmarks.host_syncs import HOST_SIDE
from benchmarks.shapes import add_shape_arguments, shape_model, shared_settings
from lofi.families import family_for

OURS, NOT_OURS = "/lofi/", "/lofi/compiled.py"
_aten = torch.ops.aten
# ops that allocate or describe memory without a kernel
NO_KERNEL = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.detach.default, _aten.lift_fresh.default,
             _aten._unsafe_view.default}
# ops whose result the host must wait for (on a GPU)
SYNC_OPS = {_aten._local_scalar_dense.default: "item", _aten.item.default: "item", _aten.is_nonzero.default: "bool",
            _aten.nonzero.default: "nonzero",
            _aten.masked_select.default: "masked_select", _aten.equal.default: "equal"}
COPIES = ("cpu", "tolist", "numpy")  # device-to-host copies, counted where the Python call is made


def _caller(frame) -> tuple[str | None, bool]:
    """(``file:function`` of the innermost ``lofi/`` frame above ``frame``, or None for the model's own code;
    whether that code only reads host tensors)."""
    host = False
    while frame is not None:
        code = frame.f_code
        name = code.co_filename
        if OURS in name and not name.endswith(NOT_OURS):
            host = host or bool(set(getattr(code, "co_qualname", code.co_name).split(".")) & set(HOST_SIDE))
            return f"{name.split(OURS)[-1]}:{code.co_name}", host
        host = host or code.co_name in HOST_SIDE
        frame = frame.f_back
    return None, False


@dataclass
class Counts:
    """What one prefill dispatched."""

    model: int = 0                  # the model's own ops
    model_kernels: int = 0
    runtime: int = 0                # the runtime's ops (lofi/)
    runtime_kernels: int = 0
    runtime_host: int = 0           # of those, ops on host tensors (its sizes): no launch on a GPU
    by_file: collections.Counter = field(default_factory=collections.Counter)
    model_by_part: collections.Counter = field(default_factory=collections.Counter)  # vision tower, layers, other
    syncs: list = field(default_factory=list)  # (who, call, function, where)

    def runtime_syncs(self) -> list:
        return [s for s in self.syncs if s[0] == "runtime"]


class OpCounter(TorchDispatchMode):
    """Counts the ops and syncs of the code it runs (see the module docstring); ``where`` names the part of the
    prefill running now (``markers``)."""

    def __init__(self):
        super().__init__()
        self.counts = Counts()
        self.where = "before the vision tower"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller, host = _caller(sys._getframe(1))
        call = SYNC_OPS.get(func)
        if call is None and func is _aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            call = "boolean-mask index"
        if call is not None and not host:
            self.sync(caller, call)
        out = func(*args, **kwargs)
        # aten.to aliases its input where nothing changes and copies (a kernel) where the dtype or device does
        kernel = out is not args[0] if func.overloadpacket is _aten.to else not (func.is_view or func in NO_KERNEL)
        counts = self.counts
        if caller is None:
            counts.model += 1
            counts.model_kernels += kernel
            part = self.where
            counts.model_by_part["decoder layers" if part.startswith("in decoder layer") else
                                 "vision tower" if part == "in the vision tower" else "other"] += kernel
        else:
            counts.runtime += 1
            counts.runtime_kernels += kernel and not host
            counts.runtime_host += host
            counts.by_file[caller.split(":")[0]] += 1
        return out

    def sync(self, caller: str | None, call: str) -> None:
        function = caller or _model_function(sys._getframe(2))
        self.counts.syncs.append(("runtime" if caller else "model", call, function, self.where))


def _model_function(frame) -> str:
    """``module:function`` of the innermost frame outside torch (the model code that asked for a value)."""
    while frame is not None and ("/torch/" in frame.f_code.co_filename or "op_counts" in frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"


@contextmanager
def markers(model: torch.nn.Module, counter: OpCounter):
    """Within the block, ``counter.where`` follows the prefill: the vision tower, the gap before the language model,
    each decoder layer (hooks registered after the runtime's, so a sync in the runtime's pre-hooks falls before)."""
    family = family_for(model)

    def at(label):
        def hook(*_):
            counter.where = label
        return hook

    hooks = [family.vision_tower().register_forward_pre_hook(at("in the vision tower")),
             family.vision_tower().register_forward_hook(at("after the vision tower, before the language model")),
             *[layer.register_forward_pre_hook(at(f"in decoder layer {i}")) for i, layer in enumerate(family.layers())],
             family.language_model().register_forward_hook(at("after the language model"))]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def counting(model: torch.nn.Module) -> Iterator[Counts]:
    """Count the ops and syncs dispatched inside the block (see the module docstring); yields the ``Counts``."""
    counter = OpCounter()
    originals = {name: getattr(torch.Tensor, name) for name in COPIES}

    def copy(name, original):
        def counted(self, *args, **kwargs):
            caller, host = _caller(sys._getframe(1))
            if self.device.type != "cpu" or not host:  # a copy of a host tensor does not wait
                counter.sync(caller, name)
            return original(self, *args, **kwargs)
        return counted

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, copy(name, original))
        with markers(model, counter), counter:
            yield counter.counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def describe(label: str, counts: Counts, base: Counts | None) -> str:
    """One block of the report: ops (and kernels) of the model and the runtime, the runtime's by file, the syncs."""
    lines = [f"{label:<22} model {counts.model} ops ({counts.model_kernels} kernels: "
             + ", ".join(f"{part} {n}" for part, n in counts.model_by_part.most_common()) + ")"]
    if counts.runtime:
        share = f" = {100 * counts.runtime_kernels / counts.model_kernels:.1f}% of the model's kernels"
        lines[0] += (f", runtime {counts.runtime} ops ({counts.runtime_kernels} kernels, {counts.runtime_host} on "
                     f"host tensors){share}")
        lines.append("    runtime ops by file: " + ", ".join(f"{f} {n}" for f, n in counts.by_file.most_common()))
    if base is not None and counts.model != base.model:
        lines.append(f"    the model's own ops differ from the unpruned run's ({base.model})")
    for who, call, function, where in counts.syncs:
        lines.append(f"    sync ({who}): {call} in {function}, {where}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser, "overhead")
    parser.add_argument("--methods", nargs="+", default=["fastv", "random", "lofi", "lvpruning"])
    parser.add_argument("--keep", nargs="+", type=float, default=[1.0, 0.25])
    parser.add_argument("--layer", type=int, default=None,
                        help="K for every method that takes one (default: each method's own)")
    args = parser.parse_args(argv)
    _, model, inputs = shape_model(args.shape, args.batch, args.device, getattr(torch, args.dtype),
                                   args.text_layers, args.vision_layers)
    shared = shared_settings(model, args.methods, args.layer)
    print(f"shape={args.shape} batch={args.batch} device={args.device} dtype={args.dtype}; ops dispatched by one "
          f"prefill (model(**inputs, logits_to_keep=1)) after a warm-up")
    results = {}
    with torch.inference_mode():
        base = None
        for method, keep in [(None, None), *[(m, k) for m in args.methods for k in args.keep]]:
            instance = lofi.build(method, shared=shared, keep=keep) if method else None
            with lofi.pruned(model, instance) if instance else nullcontext():
                model(**inputs, logits_to_keep=1)  # warm-up: one-off work (lazy hooks, loading) is not counted
                with counting(model) as counts:
                    model(**inputs, logits_to_keep=1)
            label = f"{method} keep={keep}" if method else "unpruned"
            print(describe(label, counts, base), flush=True)
            results[label] = counts
            base = base or counts
    return results


if __name__ == "__main__":
    main()
