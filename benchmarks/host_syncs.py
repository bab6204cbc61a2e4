"""Count the calls that would make a GPU wait for the host, per prefill, on any device.

    python -m benchmarks.host_syncs                 # bundled model, batch 16, CPU

A CUDA device synchronises with the host whenever a value must leave it: ``.item()``, ``.tolist()``,
``.cpu()``/``.numpy()``, ``bool()``/``int()``/``float()`` of a tensor, ``nonzero()`` (its size),
``torch.equal``. On the CPU nothing waits, but the calls are the same, so counting them where the
project's own code (``lofi/``, ``analysis/``) makes them measures the syncs a GPU run would pay,
without a GPU (reads of tensors already on the host -- ``Capture._flush``, the runtime's
``HostSizes.from_counts``, ``plan_stages``, ``keeps_everything`` and a method's ``n_keep`` -- are not
counted). The script counts them during one
prefill under ``lofi.pruned`` for each method, and during one prefill with ``Capture`` (IPR/PR at every
layer) active, then during the decoding step that follows each.
"""

from __future__ import annotations

import argparse
import collections
import sys
from contextlib import contextmanager, nullcontext

import torch

import lofi

WATCHED = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero")
OURS = ("/lofi/", "/analysis/")
# read tensors already moved to the host in one transfer (Capture's flush, the runtime's sizes and what a method's
# n_keep makes of them): no device waits
HOST_SIDE = ("_flush", "_Deferred", "_Base", "from_counts", "plan_stages", "n_keep", "keeps_everything")


def _ours(frame) -> bool:
    """Whether ``frame`` runs the project's code, outside the functions that read only host tensors."""
    code = frame.f_code
    scope = getattr(code, "co_qualname", code.co_name).split(".")  # comprehensions: f.<locals>.<listcomp>
    return any(part in code.co_filename for part in OURS) and not set(scope) & set(HOST_SIDE)


@contextmanager
def counting():
    """Count WATCHED tensor calls (and ``torch.equal``) made from the project's own files."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in WATCHED}
    equal = torch.equal

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if _ours(sys._getframe(1)):
                counts[name] += 1
            return original(self, *args, **kwargs)
        return counted

    def counted_equal(*args, **kwargs):
        if _ours(sys._getframe(1)):  # (inside a generator expression the frame would be the expression's)
            counts["equal"] += 1
        return equal(*args, **kwargs)

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        torch.equal = counted_equal
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.equal = equal


def decoding_step(inputs: dict, out) -> dict:
    """The arguments of the decoding step after a prefill's output ``out``: its greedy tokens, one more
    attention column, the cache; no image, as ``generate()`` passes it."""
    mask = inputs["attention_mask"]
    return {"input_ids": out.logits[:, -1].argmax(-1, keepdim=True), "past_key_values": out.past_key_values,
            "attention_mask": torch.cat([mask, mask.new_ones(len(mask), 1)], 1), "use_cache": True,
            "logits_to_keep": 1}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=["fastv", "lofi", "random", "lvpruning"])
    args = parser.parse_args(argv)
    try:
        from analysis.benchmark.datasets import load_split
        from analysis.measure.capture import Capture
        from analysis.study.models import batch_inputs, load_model
    except ImportError:  # the layout before analysis/ had subpackages
        from analysis.capture import Capture
        from analysis.datasets import load_split

        from analysis.evaluate import batch_inputs, load_model
    model, processor = load_model()
    inputs = batch_inputs(processor, load_split("test", limit=args.batch))
    print(f"bundled model, batch {args.batch}, {model.config.text_config.num_hidden_layers} layers; calls from "
          "lofi/ and analysis/ during one prefill and one decoding step")
    with torch.no_grad():
        # LoFi's GPU default from 256 visual tokens is its randomized route: counted here on the bundled model's fewer
        randomized = ("lofi keep=0.5, solver=randomized", lofi.build("lofi", keep=0.5, solver="randomized"), False)
        for label, method, capture in [("unpruned + Capture (IPR/PR, every layer)", None, True),
                                       *[(f"{m} keep=0.5", m, False) for m in args.methods],
                                       *([randomized] if "lofi" in args.methods else [])]:
            model(**inputs, logits_to_keep=1)  # warm-up: one-off loading (LVPruning's modules) is not counted
            with (Capture(model, spectrum_layers=()) if capture else nullcontext()) as capturing, \
                    (lofi.pruned(model, method, **({"keep": 0.5} if isinstance(method, str) else {}))
                     if method else nullcontext()):
                if method:
                    model(**inputs, logits_to_keep=1)
                with counting() as counts:
                    out = model(**inputs, logits_to_keep=1, use_cache=True)
                with counting() as step_counts:
                    model(**decoding_step(inputs, out))
                if capturing is not None:
                    capturing.take()
            print(f"{label:<42} {sum(counts.values()):4d}  {dict(counts)}; a decoding step: "
                  f"{sum(step_counts.values())} {dict(step_counts)}")


if __name__ == "__main__":
    main()
