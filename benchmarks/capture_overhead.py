"""Time of ``analysis.capture.Capture`` (hooks + spectra) as a fraction of the forward pass it observes.

    python -m benchmarks.capture_overhead                      # the bundled model on CPU
    python -m benchmarks.capture_overhead --shape llava-7b --device cuda --dtype bfloat16
    python -m benchmarks.capture_overhead --shape llava-7b --text-layers 4 --batch 1   # 7B widths, CPU

Blocks of ``--block`` plain and of ``--block`` captured forward passes alternate, on the same batch, and
the medians of the time per pass are compared: overhead = captured / plain - 1. Within a captured block
each pass takes the records that are ready (``take(wait=False)``) and the block ends by taking the rest,
so spectra decomposed on the host overlap the next pass but are all paid for. Both groups (visual, all)
at every layer are measured, as ``analysis.compare`` does; the rows < cols case takes the Gram-matrix
route. Modes (``--modes`` picks some): the full singular spectrum at every layer, at the last layer only
(inline on the device, or on the host), at none (IPR and PR stay exact everywhere: they need no
decomposition), and spectra on a seeded share of the samples (``--spectra-share``, default
``analysis.compare``'s on a GPU): the last layer's on the host, every layer's on the device, and what
``analysis.compare`` captures on a GPU by default (the last layer's on the host, leverage scores at its
leverage layers inline). Each captured pass's rows get new sample ids, so over a run the share of samples
decomposed is the share asked for, while one batch may hold more or fewer; the line says how many were.
On a GPU the device modes decompose through ``LOFI_EIGH``'s route (``lofi.linalg``). Each line also gives
the aten ops one captured pass dispatches beyond the plain pass (``capture_ops``; in the subset modes, a
pass with one sample decomposed), and those that are not views (on a GPU, about the kernels it launches).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from analysis.measure.capture import Capture, in_subset
from analysis.study.compare import LEVERAGE_LAYERS
from analysis.study.request import GPU_SPECTRA_SHARE
from benchmarks.shapes import SHAPES, shape_model
from lofi.linalg import current_eigh_route


@dataclass(frozen=True)
class Mode:
    """What a mode's ``Capture`` decomposes: ``spectrum`` "all", "last" or () layers, ``spectra_on`` where;
    ``subset``: only a share of the samples; ``leverage``: leverage scores at ``LEVERAGE_LAYERS`` too."""

    label: str
    spectrum: str | tuple
    spectra_on: str
    subset: bool = False
    leverage: bool = False

    def options(self, layers: int, share: float) -> dict:
        return dict(spectrum_layers=[layers - 1] if self.spectrum == "last" else self.spectrum,
                    spectra_on=self.spectra_on, spectra_share=share if self.subset else 1.0,
                    leverage_layers=LEVERAGE_LAYERS if self.leverage else ())


MODES = {"every-layer": Mode("full spectrum, every layer", "all", "device"),
         "last-layer": Mode("full spectrum, last layer only", "last", "device"),
         "last-layer-host": Mode("full spectrum, last layer, on the host", "last", "host"),
         "ipr-pr": Mode("IPR/PR only (no decomposition)", (), "device"),
         "last-layer-subset": Mode("last layer's spectrum on the host, a share of samples", "last", "host",
                                   subset=True),
         "every-layer-subset": Mode("every layer's spectrum, a share of samples", "all", "device", subset=True),
         "compare-gpu": Mode("analysis.compare's GPU default (+ leverage), a share", "last", "host", subset=True,
                             leverage=True)}


class DispatchCounter(TorchDispatchMode):
    """Counts the aten ops dispatched on this thread inside the block: ``ops`` all of them, ``kernels`` those
    that are not views (a view only relabels memory; every other op launches at least one kernel on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


def one_in_subset(batch: int, share: float, seed: int = 0) -> list[int]:
    """``batch`` sample ids of which exactly the first is in the spectra subset of ``share``."""
    inside = next(i for i in itertools.count() if in_subset(i, share, seed))
    return [inside, *itertools.islice((i for i in itertools.count() if not in_subset(i, share, seed)), batch - 1)]


def dispatched(model, inputs, options: dict | None) -> tuple[int, int]:
    """(ops, kernels) one forward pass dispatches, with ``Capture(model, **options)`` active unless None
    (spectra decomposed on the host thread are not counted: they never reach the device). With a spectra
    share below 1, for a batch that holds exactly one sample of the subset."""
    with torch.inference_mode(), Capture(model, **options) if options is not None else contextlib.nullcontext() \
            as capture:
        share = (options or {}).get("spectra_share", 1.0)
        if capture is not None and share < 1:
            capture.identify(one_in_subset(len(inputs["input_ids"]), share))
        with DispatchCounter() as counter:
            model(**inputs, logits_to_keep=1)
            if capture is not None:
                capture.take()
    return counter.ops, counter.kernels


def capture_ops(model, inputs, options: dict, plain: tuple[int, int] | None = None) -> tuple[int, int]:
    """(ops, kernels) one captured forward pass dispatches beyond the plain one: the capture's hooks and its
    end-of-pass work. ``plain``: the plain pass's ``dispatched`` counts, when already taken after a warm
    pass (else a warm pass and that count first)."""
    if plain is None:
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)  # warm: the model's lazily built state is not counted
        plain = dispatched(model, inputs, None)
    ops, kernels = dispatched(model, inputs, options)
    return ops - plain[0], kernels - plain[1]


def bundled_inputs(batch: int, path=None):
    from analysis.benchmark.datasets import load_split
    from analysis.study.evaluate import batch_inputs, load_model
    model, processor = load_model(path) if path else load_model()
    return model, batch_inputs(processor, load_split("test", limit=batch))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["bundled", *SHAPES, "llava-7b"], default="bundled")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block", type=int, default=3, help="consecutive passes per timed block")
    parser.add_argument("--model", help="a local LLaVA folder (default: the bundled model)")
    parser.add_argument("--text-layers", type=int, help="a checkpoint shape's decoder layers (default: all)")
    parser.add_argument("--vision-layers", type=int, help="a checkpoint shape's vision layers (default: all)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--spectra-share", type=float, default=GPU_SPECTRA_SHARE,
                        help="the subset modes' share of samples decomposed (default: analysis.compare's on a GPU)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.shape == "bundled":
        model, inputs = bundled_inputs(args.batch, args.model)
        model, inputs = model.to(args.device), inputs.to(args.device)
    else:
        _, model, inputs = shape_model(args.shape, args.batch, args.device, getattr(torch, args.dtype),
                                       args.text_layers, args.vision_layers)

    ids = itertools.count()
    layers = model.config.text_config.num_hidden_layers + 1

    def timed(capture: Capture | None, passes: int, decomposed: list):
        """Seconds per pass of ``passes`` consecutive forward passes, each taking the records ready by then;
        ``decomposed`` gets, per pass, (samples with a spectrum at the last layer, samples)."""
        sync()
        start = time.perf_counter()
        records = []
        for _ in range(passes):
            if capture is not None:
                capture.identify([next(ids) for _ in range(len(inputs["input_ids"]))])
            model(**inputs, logits_to_keep=1)
            if capture is not None:
                records += capture.take(wait=False)
        if capture is not None:
            records += capture.take()
        sync()
        seconds = (time.perf_counter() - start) / passes
        last = [r for r in records if r.layer == layers - 1 and r.group == "all"]
        decomposed.append((sum(r.has_spectrum for r in last), len(last)))
        return seconds

    print(f"shape={args.shape} device={args.device} batch={args.batch} layers measured={layers} x 2 groups, "
          f"threads={torch.get_num_threads()}, blocks of {args.block} passes, eigh={current_eigh_route()}")
    plain_ops = None
    for name in args.modes:
        mode = MODES[name]
        options = mode.options(layers, args.spectra_share)
        plain, captured, decomposed = [], [], []
        with torch.inference_mode():
            timed(None, 1, [])
            with Capture(model, **options) as capture:
                timed(capture, 1, [])
            for _ in range(args.repeats):
                plain.append(timed(None, args.block, []))
                with Capture(model, **options) as capture:
                    captured.append(timed(capture, args.block, decomposed))
        p, c = statistics.median(plain), statistics.median(captured)
        plain_ops = plain_ops or dispatched(model, inputs, None)  # after the first mode's passes: warm
        ops, kernels = capture_ops(model, inputs, options, plain_ops)
        with_spectra, samples = map(sum, zip(*decomposed))
        share = f", spectra on {with_spectra} of {samples} samples" if mode.subset else ""
        print(f"{name:<19} {mode.label:<55} forward {1000 * p:.1f} ms, with capture {1000 * c:.1f} ms: "
              f"overhead {100 * (c / p - 1):.1f}%{share}; capture ops per pass {ops} ({kernels} not views), "
              f"{ops / layers:.1f} ({kernels / layers:.1f}) per layer point")


if __name__ == "__main__":
    main()
