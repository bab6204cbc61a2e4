"""Time of ``analysis.capture.Capture`` (hooks + spectra) as a fraction of the forward pass it observes.

    python -m benchmarks.capture_overhead                      # the bundled model on CPU
    python -m benchmarks.capture_overhead --shape llava-7b --device cuda --dtype bfloat16
    python -m benchmarks.capture_overhead --shape llava-7b --text-layers 4 --batch 1   # 7B widths, CPU

Blocks of ``--block`` plain and of ``--block`` captured forward passes alternate, on the same batch, and
the medians of the time per pass are compared: overhead = captured / plain - 1. Within a captured block
each pass takes the records that are ready (``take(wait=False)``) and the block ends by taking the rest,
so spectra decomposed on the host overlap the next pass but are all paid for. Both groups (visual, all)
at every layer are measured, as ``analysis.compare`` does; the rows < cols case takes the Gram-matrix
route. Four modes: the full singular spectrum at every layer, at the last layer only (inline on the
device, or on the host), and at none (IPR and PR stay exact everywhere: they need no decomposition);
``--modes`` picks some. On a GPU the device modes decompose through ``LOFI_EIGH``'s route (``lofi.linalg``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from analysis.measure.capture import Capture
from benchmarks.shapes import SHAPES, shape_model
from lofi.linalg import current_eigh_route

MODES = {"every-layer": ("full spectrum, every layer", "all", "device"),
         "last-layer": ("full spectrum, last layer only", "last", "device"),
         "last-layer-host": ("full spectrum, last layer, on the host", "last", "host"),
         "ipr-pr": ("IPR/PR only (no decomposition)", (), "device")}


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


def capture_ops(model, inputs, options: dict) -> tuple[int, int]:
    """(ops, kernels) one captured forward pass dispatches beyond the plain one: the capture's hooks and
    its end-of-pass work (spectra decomposed on the host thread are not counted: they never reach the
    device)."""
    counts = []
    with torch.inference_mode():
        model(**inputs, logits_to_keep=1)  # warm: the model's lazily built state is not counted
        for capturing in (False, True):
            with Capture(model, **options) if capturing else contextlib.nullcontext() as capture:
                if capture is not None and capture.options.spectra_share < 1:
                    capture.identify(range(len(inputs["input_ids"])))
                with DispatchCounter() as counter:
                    model(**inputs, logits_to_keep=1)
                    if capture is not None:
                        capture.take()
            counts.append((counter.ops, counter.kernels))
    return counts[1][0] - counts[0][0], counts[1][1] - counts[0][1]


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
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.shape == "bundled":
        model, inputs = bundled_inputs(args.batch, args.model)
        model, inputs = model.to(args.device), inputs.to(args.device)
    else:
        _, model, inputs = shape_model(args.shape, args.batch, args.device, getattr(torch, args.dtype),
                                       args.text_layers)

    def timed(capture: Capture | None, passes: int):
        """Seconds per pass of ``passes`` consecutive forward passes, each taking the records ready by then."""
        sync()
        start = time.perf_counter()
        for _ in range(passes):
            model(**inputs, logits_to_keep=1)
            if capture is not None:
                capture.take(wait=False)
        if capture is not None:
            capture.take()
        sync()
        return (time.perf_counter() - start) / passes

    layers = model.config.text_config.num_hidden_layers + 1
    print(f"shape={args.shape} device={args.device} batch={args.batch} layers measured={layers} x 2 groups, "
          f"threads={torch.get_num_threads()}, blocks of {args.block} passes, eigh={current_eigh_route()}")
    for mode, spectrum_layers, spectra_on in (MODES[name] for name in args.modes):
        spectrum_layers = [layers - 1] if spectrum_layers == "last" else spectrum_layers
        plain, captured = [], []
        with torch.inference_mode():
            timed(None, 1)
            with Capture(model, spectrum_layers=spectrum_layers, spectra_on=spectra_on) as capture:
                timed(capture, 1)
            for _ in range(args.repeats):
                plain.append(timed(None, args.block))
                with Capture(model, spectrum_layers=spectrum_layers, spectra_on=spectra_on) as capture:
                    captured.append(timed(capture, args.block))
        p, c = statistics.median(plain), statistics.median(captured)
        ops, kernels = capture_ops(model, inputs, dict(spectrum_layers=spectrum_layers, spectra_on=spectra_on))
        print(f"{mode:<34} forward {1000 * p:.1f} ms, with capture {1000 * c:.1f} ms: "
              f"overhead {100 * (c / p - 1):.1f}%; capture ops per pass {ops} ({kernels} not views), "
              f"{ops / layers:.1f} ({kernels / layers:.1f}) per layer point")


if __name__ == "__main__":
    main()
