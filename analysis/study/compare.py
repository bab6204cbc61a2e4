"""``python -m analysis.compare``: compare pruning methods against the unpruned model, into a run folder.

    python -m analysis.compare --methods lofi lvpruning fastv [--keep 0.5 0.25 0.1] [--model PATH_OR_HUB_ID]
           [--dataset NAME_OR_PATH] [--limit N] [--out DIR] [--device auto|cpu|cuda] [--seed S]
    python -m analysis.compare --methods list

This module owns the command line (docs/definitions.md#cli): checking every input before any work (a bad
one: one line on stderr, exit status 2), building each (method, keep) condition once, running the
unpruned model and every condition (``analysis.study.runner``) in the run folder
(``analysis.study.runfolder``: resume, lock, atomic completion), and assembling the tables and the report.
An interruption exits with 130, an operating-system error (a full disk) with 1, each with one line, and
both leave the work folder to resume from.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

import lofi
from analysis import paths
from analysis.benchmark.datasets import DatasetError, check_questions, content_sha256, load_split, verify_images
from analysis.measure.capture import CaptureOptions
from analysis.study import runfolder, tables
from analysis.study.models import ModelError, check_model, check_weights, load_model, resolve
from analysis.study.records import RunConfig
from analysis.study.runner import run_condition

DEFAULT_LIMIT = 150
DEFAULT_KEEP = (0.5, 0.25, 0.1)
HEADLINE = {"layer": "last", "group": "all"}
LEVERAGE_LAYERS = (0, 2)
MAX_SEED = 2**32 - 1  # torch.manual_seed and numpy's generators take any seed in this range


class UsageError(Exception):
    """Bad input: one line naming the fix, exit status 2."""


@dataclass
class Plan:
    """A checked command: its questions (and their content fingerprint), model folder, configuration and
    processor, and its conditions, built once."""

    samples: list
    config: object
    processor: object
    model_folder: Path | None
    methods: list[lofi.PruningMethod]
    dataset_sha256: str


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line (``UsageError``), not the usage block."""

    def error(self, message):
        raise UsageError(f"{message} (see python -m analysis.compare --help)")


def _user_path(text: str) -> Path:
    return Path(text).expanduser()


def parse_args(argv):
    parser = _Parser(prog="python -m analysis.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", required=True, help="method names, or 'list'")
    parser.add_argument("--keep", nargs="+", type=float, default=list(DEFAULT_KEEP))
    parser.add_argument("--model", default=str(paths.BUNDLED_MODEL))
    parser.add_argument("--dataset", default="test",
                        help="test, val, or a JSONL/JSON split (docs/definitions.md#splits, LLaVA, POPE)")
    parser.add_argument("--allow-outside-images", action="store_true",
                        help="let the split's image paths leave its folder ('..', absolute paths, links out)")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="first N questions (0: all)")
    parser.add_argument("--out", type=_user_path)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0, help=f"in [0, {MAX_SEED}]")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--center", action="store_true", help="centre hidden states before spectra")
    parser.add_argument("--spectrum-layers", choices=["auto", "all", "headline"], default="auto",
                        help="layers whose full singular spectrum (effective rank, spectra figure) is "
                             "computed; IPR and PR are exact at every layer either way. 'headline' decomposes "
                             "one layer only; 'auto' (default): every layer on the CPU, the headline layer on "
                             "a GPU, where one eigendecomposition per layer and group costs more than the "
                             "forward pass (benchmarks/README.md)")
    parser.add_argument("--spectra-on", choices=["auto", "device", "host"], default="auto",
                        help="where those spectra are decomposed: 'device' (inline, float32; on a GPU through "
                             "LOFI_EIGH's route), 'host' (float64, on a background thread while the GPU decodes); "
                             "'auto' (default): the host when the model is on a GPU. Not part of the run's identity")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _repeated(values: list[str]) -> list[str]:
    return [v for v, n in Counter(values).items() if n > 1]


def _validate(args) -> Plan:
    """Every check that can fail, before any file is written or weights are loaded."""
    valid = lofi.available()
    unknown = [m for m in args.methods if m not in valid]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; valid methods: {', '.join(valid)} "
                         "(see --methods list)")
    for flag, values in (("--methods", args.methods), ("--keep", [f"{k:g}" for k in args.keep])):
        if _repeated(values):
            raise UsageError(f"{flag} repeats {', '.join(_repeated(values))}; give each value once")
    bad = [k for k in args.keep if not 0 < k <= 1]
    if bad:
        raise UsageError(f"--keep values must be in (0, 1], got {bad}")
    for flag, value, minimum, meaning in (("--limit", args.limit, 0, "0 means the whole split"),
                                          ("--batch-size", args.batch_size, 1, "questions per forward pass"),
                                          ("--max-new-tokens", args.max_new_tokens, 1, "the answer's length")):
        if value < minimum:
            raise UsageError(f"{flag} must be >= {minimum} ({meaning}), got {value}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available; use --device cpu or auto")
    try:
        methods = [lofi.build(name, shared={"seed": args.seed}, keep=keep) for name in args.methods
                   for keep in args.keep]
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    try:
        config, processor = check_model(args.model)
        folder = resolve(args.model)
    except ModelError as e:
        raise UsageError(str(e)) from None
    for method in methods:
        for file in method.weight_files(folder):
            if not file.is_file():
                raise UsageError(f"{method.name} needs its trained weights {file}; {method.weights_hint}"
                                 f" (or leave {method.name} out)")
    try:
        check_weights(sorted(folder.glob("*.safetensors")) + [f for m in methods for f in m.weight_files(folder)])
        samples = load_split(args.dataset, limit=args.limit or None, allow_outside_images=args.allow_outside_images)
        digests = verify_images(samples)
        check_questions(samples, getattr(processor, "image_token", None) or "<image>")
    except (ModelError, DatasetError) as e:
        raise UsageError(str(e)) from None
    if not samples:
        raise UsageError(f"dataset {args.dataset} has no questions")
    return Plan(samples, config, processor, folder, methods, content_sha256(samples, digests))


def _check_out(out: Path) -> None:
    """``--out`` must be new, an empty folder, or a run folder of this command, in a writable place (and
    its work folder absent or this command's: ``runfolder.check_out``); nothing that is there is ever
    deleted."""
    try:
        runfolder.check_out(out)
    except runfolder.RunFolderError as e:
        raise UsageError(str(e)) from None
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    try:  # a real probe: permissions alone say nothing for root or on read-only mounts
        os.rmdir(tempfile.mkdtemp(prefix=".lofi-probe-", dir=existing))
    except OSError as e:
        raise UsageError(f"--out {out} cannot be written ({existing}: {e.strerror or e}); "
                         "choose another --out") from None


def _config(args, plan: Plan, device: str) -> RunConfig:
    # torchvision, when installed, gives transformers' image processors their torchvision backend (other
    # resampling, so other pixels for images that are resized); None when it is not
    packages = {p: _version(p) for p in ("torch", "torchvision", "transformers", "numpy", "pandas", "lofi-vtp")}
    first = {}
    for method in plan.methods:
        first.setdefault(method.name, repr(method))
    weight_files = sorted({f for m in plan.methods for f in m.weight_files(plan.model_folder)})
    template = getattr(plan.processor, "chat_template", None)
    return RunConfig(
        methods=args.methods, keep=args.keep, model=str(args.model), dataset=str(args.dataset), limit=args.limit,
        n_samples=len(plan.samples), seed=args.seed, device=device, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, center=args.center, spectrum_layers=args.spectrum_layers,
        method_defaults=first, weights=runfolder.weights_fingerprint(plan.model_folder, weight_files),
        model_files=runfolder.model_files_fingerprint(plan.model_folder),
        chat_template_sha256=hashlib.sha256(str(template).encode()).hexdigest() if template else None,
        dataset_sha256=plan.dataset_sha256, headline=HEADLINE, packages=packages, python=platform.python_version(),
        git_commit=_git_commit())


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def default_out(args, n_samples: int) -> Path:
    """reports/<model>_<methods>_<dataset>_n<N>_seed<S>: one folder name, whatever the dataset path."""
    dataset = Path(str(args.dataset)).stem if str(args.dataset) not in ("test", "val") else str(args.dataset)
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset)[:40] or "data"
    return paths.REPORTS / (
        f"{Path(str(args.model)).name}_{'-'.join(args.methods)}_{dataset}_n{n_samples}_seed{args.seed}")


class Stopped(Exception):
    """A run that stopped after it started writing: one line, and the exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def run(args) -> Path:
    plan = _validate(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.spectrum_layers == "auto":  # resolved before it enters the run's identity
        args.spectrum_layers = "headline" if device.startswith("cuda") else "all"
    out = args.out or default_out(args, len(plan.samples))
    if out.name in ("", ".."):  # "." or "..": the folder they name
        out = Path(os.path.abspath(out))
    _check_out(out)
    config = _config(args, plan, device)
    try:
        if runfolder.finished(out):
            runfolder.refuse_another_run(out, config, "a finished", "choose another --out or delete it")
            runfolder.drop_resume_state(out)
            print(f"{out} is complete; nothing to recompute (re-render with `python -m analysis.report {out}`)")
            return out
        if out.is_dir() and any(out.iterdir()):
            raise UsageError(f"--out {out} holds an unfinished or damaged run (no report.html); delete it or "
                             "choose another --out")
        with runfolder.working(out, config) as work:
            return _work(args, plan, device, out, work)
    except runfolder.RunFolderError as e:
        raise UsageError(str(e)) from None


def _work(args, plan: Plan, device: str, out: Path, work: Path) -> Path:
    """Everything after the checks, in the locked work folder: an interruption or an operating-system error
    (a full disk) stops with one line and leaves ``work`` to resume from."""
    resume = f"what is finished stays in {work}: rerun the same command to resume"
    try:
        print(f"compare: {len(plan.samples)} questions from {args.dataset} (--limit {args.limit}), model "
              f"{args.model}, methods {args.methods}, keep {args.keep}, device {device}, seed {args.seed} -> {out}",
              flush=True)
        try:
            model, processor = load_model(args.model, device, checked=(plan.config, plan.processor),
                                          progress=not args.no_progress)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"{args.model} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        _measure(args, plan, model, processor, work)
        tables.assemble(work, model.config, plan.methods)
        from analysis.study import report
        report.save_thumbnails(work, plan.samples)
        report.render(work)
        return runfolder.complete(work, out)
    except KeyboardInterrupt:
        raise Stopped(f"interrupted; {resume}", 130) from None
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise Stopped(f"{e.strerror or e}{where}; {resume}", 1) from None


def _measure(args, plan: Plan, model, processor, work: Path) -> None:
    """The unpruned model and every condition not finished yet, each saved as soon as it is done."""
    torch.manual_seed(args.seed)
    spectrum = "all"
    if args.spectrum_layers == "headline":
        spectrum = (tables.headline_layer(HEADLINE["layer"], model.config.text_config.num_hidden_layers),)
    common = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                  capture=CaptureOptions(center=args.center, leverage_layers=LEVERAGE_LAYERS, spectrum_layers=spectrum,
                                         spectra_on=args.spectra_on))
    started = time.time()
    baseline = runfolder.load_baseline(work)
    if baseline is None:
        result = run_condition(model, processor, plan.samples, method=None, baseline=None, desc="baseline", **common)
        runfolder.save_condition(work, "baseline", 1.0, result)
        baseline = result.baseline
    for method in plan.methods:
        if not runfolder.condition_done(work, method.name, method.keep):
            result = run_condition(model, processor, plan.samples, method=method, baseline=baseline,
                                   desc=f"{method.name} keep={method.keep:g}", **common)
            runfolder.save_condition(work, method.name, method.keep, result)
    print(f"measured in {time.time() - started:.0f} s; writing tables and report", flush=True)


def example_run(run_dir: str | Path | None, limit: int = 20) -> Path:
    """``run_dir`` as a path, or, for ``None``, a new run of every method at keeps 0.5 / 0.25 / 0.1 on the
    first ``limit`` bundled test questions, in a temporary folder: the run a notebook reads."""
    if run_dir is not None:
        return Path(run_dir)
    out = Path(tempfile.mkdtemp()) / "run"
    run(parse_args(["--methods", *lofi.available(), "--keep", "0.5", "0.25", "0.1", "--limit", str(limit),
                    "--out", str(out), "--no-progress"]))
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.methods == ["list"]:
            for name, line in lofi.describe().items():
                print(f"{name:<10} {line}")
            return 0
        out = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("interrupted before any file was written", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
