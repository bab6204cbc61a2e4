"""What a run under CUDA graphs (``lofi.compiled(model, mode="reduce-overhead")``) says about their capture.

Inductor hands each compiled graph to a cudagraph tree, which runs a new shape once to warm up, records it on
the next run and replays it after. A graph it cannot capture (mutated inputs, CPU tensors, an incompatible op,
too many re-recordings) runs without, counted in ``torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]``
and named in a 'skipping cudagraphs due to ...' warning on the ``cudagraphs`` log. ``evidence`` gathers, over
a block: that counter, those messages, and the graphs the tree recorded and re-recorded; ``launch_counts``
splits a profile's launches into graph replays (``cudaGraphLaunch``) and kernels launched one by one. A prefill
whose compiled graphs are all captured shows no skip, one graph launch per compiled graph it runs, and kernel
launches only from the eager code between them.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
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
