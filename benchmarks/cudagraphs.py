"""What a run under CUDA graphs (``lofi.compiled(model, mode="reduce-overhead")``) says about their capture.

Inductor hands each compiled graph to a cudagraph tree, which runs a new shape once to warm up, records it on
the next run and replays it after. A graph it cannot capture (mutated inputs, CPU tensors, an incompatible op,
too many re-recordings) runs without, counted in ``torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]``
and named in a 'skipping cudagraphs due to ...' warning on the ``cudagraphs`` log. ``evidence`` gathers, over
a block: that counter, those messages, and the graphs the tree recorded and re-recorded; ``launch_counts``
splits a profile's launches into graph replays (``cudaGraphLaunch``) and kernels launched one by one. A prefill
whose compiled graphs are all captured shows no skip, one graph launch per compiled graph it runs, and kernel
launches only from the eager code between them.

Where no GPU is at hand, ``static_checks`` (``python -m benchmarks.cudagraphs``, CPU) compiles a model under
``mode="reduce-overhead"`` and evaluates, for every graph inductor compiles, the checks it would make before
handing it to a cudagraph tree on a GPU (everything but the device: the run's own device stands for the GPU):
mutated or storage-mutated inputs, inputs that are not tensors or sizes, incompatible ops, graphs skipped for
dynamic shapes. What it cannot see are the tree's run-time decisions (re-recordings, inputs that moved).

    python -m benchmarks.cudagraphs --shape overhead --text-layers 4 --vision-layers 1 --method fastv --keep 0.25
"""

from __future__ import annotations

import argparse
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import torch

KERNEL_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")


@dataclass
class Evidence:
    """What happened to CUDA graphs inside one ``evidence`` block."""

    skips: int = 0                  # inductor's cudagraph_skips counter, its growth in the block
    messages: list = field(default_factory=list)  # the skip warnings, in order
    recorded: int = 0               # graphs the cudagraph tree recorded in the block
    rerecorded: int = 0             # of those, recordings of a graph already recorded (its inputs moved)
    tree: bool = True               # the tree's state was readable (CUDA, and this torch's internals)
    breaks: dict = field(default_factory=dict)  # graph breaks dynamo met while compiling in the block, by reason

    def summary(self) -> str:
        tree = (f"{self.recorded} graphs recorded ({self.rerecorded} re-recorded)" if self.tree else
                "no cudagraph tree on this device")
        lines = [f"cudagraphs: {self.skips} skipped, {tree}", *(f"    skip: {m}" for m in self.messages)]
        lines += [f"    graph break x{n} while compiling: {reason}" for reason, n in self.breaks.items()]
        return "\n".join(lines)


def _tree_counts() -> tuple[int, int] | None:
    """(graphs recorded, re-recordings) in this thread's cudagraph tree of the current device; None where there is
    none to read."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch._inductor import cudagraph_trees
        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        if manager is None:
            return 0, 0
        nodes, recorded = [n for roots in manager.roots.values() for n in roots], 0
        while nodes:
            node = nodes.pop()
            recorded += 1
            nodes.extend(child for children in node.children.values() for child in children)
        return recorded, sum(sum(per_node.values()) for per_node in manager.num_rerecord.values())
    except (AttributeError, ImportError, RuntimeError):  # the tree's internals differ in this torch
        return None


class _Collect(logging.Handler):
    def __init__(self, messages: list):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().split("\n")[0])


@contextmanager
def evidence() -> Iterator[Evidence]:
    """Within the block, collect inductor's cudagraph skips and the cudagraph tree's recordings (``Evidence``)."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_utils

    found = Evidence()
    skips, tree, breaks = counters["inductor"]["cudagraph_skips"], _tree_counts(), dict(counters["graph_break"])
    handler = _Collect(found.messages)
    log = cudagraph_utils.cudagraphs_log
    log.addHandler(handler)
    try:
        yield found
    finally:
        log.removeHandler(handler)
        found.skips = counters["inductor"]["cudagraph_skips"] - skips
        for reason, n in counters["graph_break"].items():
            if n > breaks.get(reason, 0):
                found.breaks[" ".join(reason.split())[:160]] = n - breaks.get(reason, 0)
        after = _tree_counts()
        found.tree = tree is not None and after is not None
        if found.tree:
            found.recorded, found.rerecorded = after[0] - tree[0], after[1] - tree[1]


def launch_counts(events) -> dict:
    """Graph launches and kernel launches (outside graphs) of a profile's ``key_averages()``."""
    return {"graph launches": sum(e.count for e in events if e.key in GRAPH_LAUNCHES),
            "kernel launches": sum(e.count for e in events if e.key in KERNEL_LAUNCHES)}


@contextmanager
def static_checks() -> Iterator[list]:
    """Within the block, every graph inductor compiles (with cudagraphs on: ``mode="reduce-overhead"``) is checked
    as for a cudagraph tree, the run's device standing for the GPU, and not captured; yields a list of
    ``(graph, reasons)``, reasons empty where the graph passes. Patches inductor's device check and its handing
    over to cudagraph trees (restored on exit) and turns its FX graph cache off (a cached graph is not checked)."""
    from torch._inductor import config, cudagraph_utils, output_code

    found: list = []
    device_check = cudagraph_utils.check_lowering_disable_cudagraph
    posts = {name: getattr(output_code, name)
             for name in ("cudagraph_post_compile", "cudagraph_partition_post_compile")}
    post_compile = output_code.CompiledFxGraph.post_compile

    def other_devices(mapping):
        mapping = {d: n for d, n in mapping.items() if d.type != "cpu"}
        return device_check(mapping) if mapping else None

    def record(example_inputs, compiled, cudagraphs, *rest):
        reasons = list(compiled.cudagraph_info.cudagraph_fail_reasons)
        static = set(compiled.fx_kwargs["static_input_idxs"] or ())
        moved = [i for i in compiled.mutated_input_idxs if i not in static]
        if moved:  # a cudagraph tree runs such a graph without CUDA graphs unless those inputs are its own outputs
            reasons.append(f"mutates {len(moved)} non-static inputs")
        found.append((f"graph {len(found)} ({len(example_inputs)} inputs)", reasons))
        cudagraphs.value = False

    def checked_post_compile(self, example_inputs, constants, graph_kwargs):
        if self.disabled_cudagraphs_reason and graph_kwargs.get("cudagraphs"):
            found.append((f"graph {len(found)} ({len(example_inputs)} inputs)",
                          [self.disabled_cudagraphs_reason.split("\n")[0]]))
        return post_compile(self, example_inputs, constants, graph_kwargs)

    try:
        cudagraph_utils.check_lowering_disable_cudagraph = other_devices
        for name in posts:
            setattr(output_code, name, record)
        output_code.CompiledFxGraph.post_compile = checked_post_compile
        with config.patch(fx_graph_cache=False):
            yield found
    finally:
        cudagraph_utils.check_lowering_disable_cudagraph = device_check
        for name, function in posts.items():
            setattr(output_code, name, function)
        output_code.CompiledFxGraph.post_compile = post_compile


def main(argv: list[str] | None = None) -> list:
    import lofi
    from benchmarks.shapes import add_shape_arguments, shape_model, shared_settings

    parser = argparse.ArgumentParser(description="inductor's cudagraph checks on the graphs of a compiled prefill")
    add_shape_arguments(parser, "overhead")
    parser.add_argument("--method", default="fastv", choices=lofi.available())
    parser.add_argument("--keep", type=float, default=0.25)
    args = parser.parse_args(argv)
    _, model, inputs = shape_model(args.shape, args.batch, args.device, getattr(torch, args.dtype),
                                   args.text_layers, args.vision_layers)
    method = lofi.build(args.method, shared=shared_settings(model, [args.method], None), keep=args.keep)
    print(f"shape={args.shape} device={args.device}: the graphs lofi.compiled(mode='reduce-overhead') compiles, "
          "checked as inductor checks them before CUDA graphs")
    results = []
    with lofi.compiled(model, mode="reduce-overhead"), torch.inference_mode():
        for label, pruning in (("unpruned", None), (f"{args.method} keep={args.keep}", method)):
            with static_checks() as found, lofi.pruned(model, pruning) if pruning else nullcontext():
                for _ in range(2):
                    torch.compiler.cudagraph_mark_step_begin()
                    model(**inputs, logits_to_keep=1)
            passed = sum(not reasons for _, reasons in found)
            print(f"{label}: {len(found)} graphs compiled, {passed} pass every check"
                  + ("" if found else " (none new: the graphs compiled before serve it)"))
            for graph, reasons in found:
                for reason in reasons:
                    print(f"    {graph}: {reason}")
            results.append((label, found))
    return results


if __name__ == "__main__":
    main()
