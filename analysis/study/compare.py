"""``python -m analysis.compare``: compare pruning methods against the unpruned model, into a run folder.

    python -m analysis.compare --methods lofi lvpruning fastv [--keep 0.5 0.25 0.1] [--model PATH]
           [--dataset NAME_OR_PATH] [--limit N] [--out DIR] [--device auto|cpu|cuda] [--seed S]
    python -m analysis.compare --methods list

This module owns the command line and the run folder (docs/definitions.md#run-folder): checking every input before any
work, running the baseline once and each (method, keep) condition (``analysis.runner``), keeping each
finished condition as a shard so an interrupted run resumes without recomputing, and assembling the
tables. Work happens in ``<out>.partial/``; the folder appears under its name only when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

import lofi
from analysis import paths
from analysis.study import tables
from analysis.benchmark.datasets import DatasetError, check_questions, load_split, verify_images
from analysis.study.models import ModelError, check_model, load_model, resolve
from analysis.study.runner import BaselineOutputs, run_condition

DEFAULT_LIMIT = 150
DEFAULT_KEEP = (0.5, 0.25, 0.1)
HEADLINE = {"layer": "last", "group": "all"}


class UsageError(Exception):
    """Bad input: one line naming the fix, exit status 2."""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", required=True, help="method names, or 'list'")
    parser.add_argument("--keep", nargs="+", type=float, default=list(DEFAULT_KEEP))
    parser.add_argument("--model", default=str(paths.BUNDLED_MODEL))
    parser.add_argument("--dataset", default="test", help="test, val, or a JSONL/JSON split (docs/definitions.md#splits, LLaVA, POPE)")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="first N questions (0: all)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--center", action="store_true", help="centre hidden states before spectra")
    parser.add_argument("--spectrum-layers", choices=["all", "headline"], default="all",
                        help="layers whose full singular spectrum (effective rank, spectra figure) is "
                             "computed; IPR and PR are exact at every layer either way. 'headline' is "
                             "much faster on small models, where a decomposition costs about a layer")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _validate(args):
    """Every check that can fail, before any file is written or weights are read: (samples, processor)."""
    valid = lofi.available()
    unknown = [m for m in args.methods if m not in valid]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; valid methods: {', '.join(valid)} "
                         "(see --methods list)")
    bad = [k for k in args.keep if not 0 < k <= 1]
    if bad:
        raise UsageError(f"--keep values must be in (0, 1], got {bad}")
    for flag, value, minimum, meaning in (("--limit", args.limit, 0, "0 means the whole split"),
                                          ("--batch-size", args.batch_size, 1, "questions per forward pass"),
                                          ("--max-new-tokens", args.max_new_tokens, 1, "the answer's length")):
        if value < minimum:
            raise UsageError(f"{flag} must be >= {minimum} ({meaning}), got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available; use --device cpu or auto")
    try:
        _, processor = check_model(args.model)
    except ModelError as e:
        raise UsageError(str(e)) from None
    if "lvpruning" in args.methods:
        from lofi.methods.lvpruning import DEFAULT_FOLDER, WEIGHTS
        modules = resolve(args.model) / DEFAULT_FOLDER / WEIGHTS
        if not modules.is_file():
            raise UsageError(f"lvpruning needs trained decision modules at {modules}; train them with "
                             f"`python -m analysis.train_lvpruning --model {args.model}` or leave lvpruning out")
    try:
        samples = load_split(args.dataset, limit=args.limit or None)
        verify_images(samples)
        check_questions(samples, getattr(processor, "image_token", None) or "<image>")
    except DatasetError as e:
        raise UsageError(str(e)) from None
    if not samples:
        raise UsageError(f"dataset {args.dataset} has no questions")
    return samples, processor


def _check_out(out: Path) -> None:
    """``--out`` must be new, an empty folder, or a run folder of this command, in a writable place;
    nothing that is there is ever deleted."""
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise UsageError(f"--out {out} is a folder with other files in it, not a run folder of "
                         "analysis.compare; choose a new or empty folder (nothing was deleted)")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    try:  # a real probe: permissions alone say nothing for root or on read-only mounts
        os.rmdir(tempfile.mkdtemp(prefix=".lofi-probe-", dir=existing))
    except OSError as e:
        raise UsageError(f"--out {out} cannot be written ({existing}: {e.strerror or e}); "
                         "choose another --out") from None


def _config(args, samples, device) -> dict:
    packages = {p: _version(p) for p in ("torch", "transformers", "numpy", "pandas", "lofi-vtp")}
    return {"methods": args.methods, "keep": args.keep, "model": str(args.model), "dataset": str(args.dataset),
            "limit": args.limit, "n_samples": len(samples), "seed": args.seed, "device": device,
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "center": args.center,
            "spectrum_layers": args.spectrum_layers,
            "method_defaults": {m: repr(lofi.build(m, keep=args.keep[0], **({"path": None} if m == "lvpruning"
                                                                                else {}))) for m in args.methods},
            "weights": weights_fingerprint(args.model, args.methods),
            "headline": HEADLINE, "packages": packages, "python": platform.python_version(),
            "git_commit": _git_commit()}


FULL_HASH_LIMIT, HASH_EDGE = 64 << 20, 8 << 20  # larger files: size, first and last 8 MiB (7B: 13 GiB)


def weights_fingerprint(model: str | Path, methods) -> dict[str, str]:
    """sha256 of every weights file the run reads (the model's safetensors, LVPruning's modules), keyed by
    path relative to the model folder; empty for a hub id. Part of a run's identity: after retraining,
    the same command must recompute, not return the finished run of the old weights. Files over
    ``FULL_HASH_LIMIT`` hash their size and first and last ``HASH_EDGE`` bytes: retraining changes
    those too, and hashing a 13 GiB checkpoint whole would add a minute to every run."""
    from lofi.methods.lvpruning import DEFAULT_FOLDER, WEIGHTS
    try:
        folder = resolve(model)
    except ModelError:
        return {}
    files = sorted(folder.glob("*.safetensors"))
    if "lvpruning" in methods:
        files.append(folder / DEFAULT_FOLDER / WEIGHTS)
    out = {}
    for file in files:
        if file.is_file():
            size, digest = file.stat().st_size, hashlib.sha256()
            with file.open("rb") as f:
                if size <= FULL_HASH_LIMIT:
                    digest.update(f.read())
                else:
                    digest.update(str(size).encode())
                    digest.update(f.read(HASH_EDGE))
                    f.seek(max(0, size - HASH_EDGE))
                    digest.update(f.read())
            out[file.relative_to(folder).as_posix()] = digest.hexdigest()
    return out


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


RUN_IDENTITY = ("methods", "keep", "model", "weights", "dataset", "limit", "seed", "center", "max_new_tokens",
                "spectrum_layers")


def _refuse_another_run(folder: Path, config: dict, state: str, fix: str) -> None:
    """A ``UsageError`` naming the ``RUN_IDENTITY`` keys on which ``folder``'s run differs from ``config``."""
    if not (folder / "config.json").is_file():
        return
    done = json.loads((folder / "config.json").read_text())
    defaults = {"spectrum_layers": "all"}  # configs written before the option existed
    differ = [k for k in RUN_IDENTITY if done.get(k, defaults.get(k)) != config.get(k, defaults.get(k))]
    if differ:
        raise UsageError(f"{folder} holds {state} run with another configuration (differs in: "
                         f"{', '.join(differ)}); {fix}")


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def default_out(args, n_samples: int) -> Path:
    """reports/<model>_<methods>_<dataset>_n<N>_seed<S>: one folder name, whatever the dataset path."""
    dataset = Path(str(args.dataset)).stem if str(args.dataset) not in ("test", "val") else str(args.dataset)
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset)[:40] or "data"
    return paths.REPORTS / (
        f"{Path(str(args.model)).name}_{'-'.join(args.methods)}_{dataset}_n{n_samples}_seed{args.seed}")


def run(args) -> Path:
    samples, processor = _validate(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = args.out or default_out(args, len(samples))
    _check_out(out)
    config = _config(args, samples, device)
    if (out / "report.html").is_file():
        _refuse_another_run(out, config, "a finished", "choose another --out or delete it")
        shutil.rmtree(out / "shards", ignore_errors=True)  # left only if a run stopped right after its rename
        print(f"{out} is complete; nothing to recompute (re-render with `python -m analysis.report {out}`)")
        return out
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} holds an unfinished or damaged run (no report.html); delete it or "
                         "choose another --out")
    work = out.with_name(out.name + ".partial")
    _refuse_another_run(work, config, "an unfinished", "delete it or use another --out")
    (work / "shards").mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(config, indent=1))
    print(f"compare: {len(samples)} questions from {args.dataset} (--limit {args.limit}), model {args.model}, "
          f"methods {args.methods}, keep {args.keep}, device {device}, seed {args.seed} -> {out}", flush=True)

    model, processor = load_model(args.model, device)
    torch.manual_seed(args.seed)
    capture = {"center": args.center, "leverage_layers": [0, 2], "spectrum_layers": "all"}
    if args.spectrum_layers == "headline":
        capture["spectrum_layers"] = [tables.headline_layer(HEADLINE["layer"],
                                                            model.config.text_config.num_hidden_layers)]
    common = dict(seed=args.seed, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                  capture_options=capture, progress=not args.no_progress)
    started = time.time()
    baseline_file = work / "shards" / "baseline.pt"
    if baseline_file.is_file() and _condition_done(work, "baseline", 1.0):
        baseline = BaselineOutputs(**torch.load(baseline_file))
    else:
        rows, spectra, _, baseline = run_condition(model, processor, samples, method=None, keep=1.0,
                                                   baseline=None, desc="baseline", **common)
        tmp = baseline_file.with_suffix(".tmp")
        torch.save(vars(baseline), tmp)
        tmp.replace(baseline_file)
        _save_condition(work, "baseline", 1.0, rows, spectra, [])
    for method in args.methods:
        for keep in args.keep:
            if _condition_done(work, method, keep):
                continue
            rows, spectra, kept, _ = run_condition(model, processor, samples, method=method, keep=keep,
                                                   baseline=baseline, desc=f"{method} keep={keep}", **common)
            _save_condition(work, method, keep, rows, spectra, kept)
    print(f"measured in {time.time() - started:.0f} s; writing tables and report", flush=True)
    tables.assemble(work, model.config)
    from analysis.study import report
    report.render(work)
    if out.is_dir():
        out.rmdir()  # empty (checked above): the finished folder takes its place
    work.rename(out)  # the run folder appears complete, or not at all
    shutil.rmtree(out / "shards")  # the resume state; the tables now hold everything
    return out


def _condition_done(work: Path, method: str, keep: float) -> bool:
    """A condition is finished only when every one of its shards is on disk."""
    return all(tables.shard_path(work, method, keep, kind).is_file() for kind in tables.SHARDS)


def _save_condition(work, method, keep, rows, spectra, kept) -> None:
    spectra_frame = pd.DataFrame([{k: v for k, v in vars(r).items() if k not in ("row", "call")}
                                  for r in spectra]).assign(method=method, keep=keep)
    _write_parquet(spectra_frame, tables.shard_path(work, method, keep, "spectra"))
    _write_parquet(pd.DataFrame(kept, columns=["sample_id", "method", "keep", "stage", "layer", "kept",
                                               "n_visual", "tiles"]), tables.shard_path(work, method, keep, "kept"))
    _write_parquet(pd.DataFrame(rows), tables.shard_path(work, method, keep, "samples"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.methods == ["list"]:
        for name, line in lofi.describe().items():
            print(f"{name:<10} {line}")
        return 0
    try:
        out = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
