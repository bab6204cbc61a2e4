"""``python -m analysis.compare``: compare pruning methods against the unpruned model, into a run folder.

    python -m analysis.compare --methods lofi lvpruning fastv [--keep 0.5 0.25 0.1] [--model PATH_OR_HUB_ID]
           [--dataset NAME_OR_PATH] [--limit N] [--out DIR] [--device auto|cpu|cuda] [--seed S]
    python -m analysis.compare --methods list

This module owns the command's run (docs/definitions.md#cli): the arguments are parsed once into a
``Request`` and checked into a ``Plan`` before any work (``analysis.study.request``: a bad input is one
line on stderr, exit status 2); then the unpruned model and every condition not yet finished
(``analysis.study.runner``) run in the locked work folder (``analysis.study.runfolder``: resume, lock,
atomic completion), and the tables and the report are assembled. An interruption exits with 130, an
operating-system error (a full disk) with 1, each with one line, and both leave the work folder to resume
from.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

import lofi
from analysis import paths
from analysis.measure.capture import CaptureOptions
from analysis.study import runfolder, tables
from analysis.study.models import load_model
from analysis.study.records import BASELINE, RunConfig
from analysis.study.request import Plan, Request, UsageError, parse, plan
from analysis.study.runner import run_condition

HEADLINE = {"layer": "last", "group": "all"}
LEVERAGE_LAYERS = (0, 2)


class Stopped(Exception):
    """A run that stopped after it started writing: one line, and the exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def run_config(checked: Plan) -> RunConfig:
    """``config.json`` of the plan's run: the model and dataset as given, or relative to the project when
    they lie inside it (``paths.portable``), never the machine's absolute folder of the project."""
    request = checked.request
    # torchvision, when installed, gives transformers' image processors their torchvision backend (other
    # resampling, so other pixels for images that are resized); None when it is not
    packages = {p: _version(p) for p in ("torch", "torchvision", "transformers", "numpy", "pandas", "lofi-vtp")}
    first = {}
    for method in checked.methods.values():
        first.setdefault(method.name, repr(method))
    weight_files = sorted({f for m in checked.methods.values() for f in m.weight_files(checked.model_folder)})
    template = getattr(checked.processor, "chat_template", None)
    return RunConfig(
        methods=list(request.methods), keep=list(request.keeps), model=paths.portable(request.model),
        dataset=paths.portable(request.dataset), limit=request.limit, n_samples=len(checked.samples),
        seed=request.seed, device=checked.device, batch_size=request.batch_size,
        max_new_tokens=request.max_new_tokens, center=request.center, spectrum_layers=checked.spectrum_layers,
        spectra_share=checked.spectra_share, method_defaults=first,
        weights=runfolder.weights_fingerprint(checked.model_folder, weight_files),
        model_files=runfolder.model_files_fingerprint(checked.model_folder),
        chat_template_sha256=hashlib.sha256(str(template).encode()).hexdigest() if template else None,
        dataset_sha256=checked.dataset_sha256, headline=HEADLINE, packages=packages,
        python=platform.python_version(), git_commit=_git_commit())


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


def run(request: Request) -> Path:
    """The run folder of ``request``: returned as it is when finished under the same identity, else
    computed (resuming its work folder)."""
    checked = plan(request)
    config, out = run_config(checked), checked.out
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
            return _work(checked, work)
    except runfolder.RunFolderError as e:
        raise UsageError(str(e)) from None


def _work(checked: Plan, work: Path) -> Path:
    """Everything after the checks, in the locked work folder: an interruption or an operating-system error
    (a full disk) stops with one line and leaves ``work`` to resume from."""
    request = checked.request
    resume = f"what is finished stays in {work}: rerun the same command to resume"
    try:
        print(f"compare: {len(checked.samples)} questions from {request.dataset} (--limit {request.limit}), model "
              f"{request.model}, methods {list(request.methods)}, keep {list(request.keeps)}, device "
              f"{checked.device}, seed {request.seed} -> {checked.out}", flush=True)
        try:
            model, processor = load_model(request.model, checked.device, checked=(checked.model_config,
                                                                                  checked.processor),
                                          progress=request.progress)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"{request.model} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})"
                             ) from None
        _measure(checked, model, processor, work)
        tables.assemble(work, model.config, checked.methods)
        from analysis.study import report
        report.save_thumbnails(work, checked.samples)
        report.render(work)
        return runfolder.complete(work, checked.out)
    except KeyboardInterrupt:
        raise Stopped(f"interrupted; {resume}", 130) from None
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise Stopped(f"{e.strerror or e}{where}; {resume}", 1) from None


def _measure(checked: Plan, model, processor, work: Path) -> None:
    """The unpruned model and every condition not finished yet, each saved as soon as it is done."""
    request = checked.request
    torch.manual_seed(request.seed)
    spectrum = "all"
    if checked.spectrum_layers == "headline":
        spectrum = (tables.headline_layer(HEADLINE["layer"], model.config.text_config.num_hidden_layers),)
    common = dict(batch_size=request.batch_size, max_new_tokens=request.max_new_tokens, progress=request.progress,
                  capture=CaptureOptions(center=request.center, leverage_layers=LEVERAGE_LAYERS,
                                         spectrum_layers=spectrum, spectra_on=request.spectra_on,
                                         spectra_share=checked.spectra_share, spectra_seed=request.seed))
    started = time.time()
    samples = list(checked.samples)
    baseline = runfolder.load_baseline(work)
    if baseline is None:
        result = run_condition(model, processor, samples, method=None, baseline=None, desc=str(BASELINE), **common)
        runfolder.save_condition(work, BASELINE, result)
        baseline = result.baseline
    for condition, method in checked.methods.items():
        if not runfolder.condition_done(work, condition):
            result = run_condition(model, processor, samples, method=method, baseline=baseline, desc=str(condition),
                                   **common)
            runfolder.save_condition(work, condition, result)
    print(f"measured in {time.time() - started:.0f} s; writing tables and report", flush=True)


def example_run(run_dir: str | Path | None, limit: int = 20) -> Path:
    """``run_dir`` as a path, or, for ``None``, a new run of every method at keeps 0.5 / 0.25 / 0.1 on the
    first ``limit`` bundled test questions, in a temporary folder: the run a notebook reads."""
    if run_dir is not None:
        return Path(run_dir)
    out = Path(tempfile.mkdtemp()) / "run"
    run(parse(["--methods", *lofi.available(), "--keep", "0.5", "0.25", "0.1", "--limit", str(limit),
               "--out", str(out), "--no-progress"]))
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        request = parse(argv)
        if request.lists_methods:
            for name, line in lofi.describe().items():
                print(f"{name:<10} {line}")
            return 0
        out = run(request)
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
