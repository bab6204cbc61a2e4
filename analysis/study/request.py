"""``python -m analysis.compare``'s command line as values: parsed once into a ``Request``, checked into a
``Plan`` (docs/definitions.md#cli).

``parse`` turns the arguments into a frozen ``Request`` (argparse's own errors become one ``UsageError``
line). ``plan`` checks every input before any file is written or weights are loaded -- methods and keeps
(each named once), limits, the seed, the device, the model and its weights files, the split and every
image, the split's scene config against the model's (``models.evaluation_scene``), ``--out`` and its
work folder -- and returns a frozen ``Plan``: the questions and their content
fingerprint, the model's configuration and processor, each condition's method built once and keyed by its
``Condition`` (the one key of shards, records and tables), the run folder, and what ``auto`` resolved to.
Nothing here changes the request.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import torch

import lofi
from analysis import paths
from analysis.benchmark.datasets import DatasetError, Sample, check_questions, content_sha256, load_split, verify_images
from analysis.study import runfolder
from analysis.study.models import ModelError, check_model, check_weights, evaluation_scene, resolve
from analysis.study.records import BASELINE, Condition

DEFAULT_LIMIT = 150
DEFAULT_KEEP = (0.5, 0.25, 0.1)
GPU_SPECTRA_SHARE = 0.1  # --spectra-subset auto on a GPU: spectra of one sample in ten
MAX_SEED = 2**32 - 1  # torch.manual_seed and numpy's generators take any seed in this range


class UsageError(Exception):
    """Bad input: one line naming the fix, exit status 2."""


@dataclass(frozen=True)
class Request:
    """What the command was asked, as given (``model`` and ``dataset`` exactly as typed; ``out`` with
    ``~`` expanded, None for the default folder; ``auto`` values not yet resolved)."""

    methods: tuple[str, ...]
    keeps: tuple[float, ...]
    model: str
    dataset: str
    allow_outside_images: bool
    limit: int
    out: Path | None
    device: str
    seed: int
    batch_size: int
    max_new_tokens: int
    center: bool
    spectrum_layers: str
    spectra_on: str
    spectra_subset: str
    progress: bool

    @property
    def lists_methods(self) -> bool:
        return self.methods == ("list",)


@dataclass(frozen=True)
class Plan:
    """A checked request: its questions (``dataset_sha256``: their content fingerprint), the model's folder,
    configuration and processor, each condition's method built once (``methods``, in the request's order),
    the run folder ``out``, and the ``device``, ``spectrum_layers`` and ``spectra_share`` (of
    ``--spectra-subset``) that ``auto`` resolved to."""

    request: Request
    samples: tuple[Sample, ...]
    model_config: object
    processor: object
    model_folder: Path
    methods: Mapping[Condition, lofi.PruningMethod]
    dataset_sha256: str
    out: Path
    device: str
    spectrum_layers: str
    spectra_share: float

    @property
    def conditions(self) -> tuple[Condition, ...]:
        """The unpruned model first, then every pruned condition."""
        return (BASELINE, *self.methods)


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line (``UsageError``), not the usage block."""

    def error(self, message):
        raise UsageError(f"{message} (see python -m analysis.compare --help)")


def parse(argv: list[str] | None) -> Request:
    parser = _Parser(prog="python -m analysis.compare",
                     description="compare pruning methods against the unpruned model, into a run folder")
    parser.add_argument("--methods", nargs="+", required=True, help="method names, or 'list'")
    parser.add_argument("--keep", nargs="+", type=float, default=list(DEFAULT_KEEP))
    parser.add_argument("--model", default=str(paths.BUNDLED_MODEL),
                        help="a local model folder or a hub id in the local cache (default: the bundled model)")
    parser.add_argument("--dataset", default="test",
                        help="test, val, or a JSONL/JSON split (docs/definitions.md#splits, LLaVA, POPE)")
    parser.add_argument("--allow-outside-images", action="store_true",
                        help="let the split's image paths leave its folder ('..', absolute paths, links out)")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="first N questions (0: all)")
    parser.add_argument("--out", type=lambda text: Path(text).expanduser())
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
    parser.add_argument("--spectra-subset", default="auto", metavar="auto|all|SHARE",
                        help="the samples whose spectra (and leverage scores) are decomposed: 'all', or a share in "
                             "(0, 1]: each sample is in when a hash of --seed and its question id falls below it, "
                             "so the same samples in every condition, batch and order (docs/definitions.md#spectral)"
                             "; spectra.parquet's has_spectrum says which. IPR and PR are exact on every sample "
                             f"either way. 'auto' (default): all on the CPU, {GPU_SPECTRA_SHARE:g} on a GPU")
    parser.add_argument("--no-progress", action="store_true")
    a = parser.parse_args(argv)
    return Request(methods=tuple(a.methods), keeps=tuple(a.keep), model=a.model, dataset=a.dataset,
                   allow_outside_images=a.allow_outside_images, limit=a.limit, out=a.out, device=a.device,
                   seed=a.seed, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, center=a.center,
                   spectrum_layers=a.spectrum_layers, spectra_on=a.spectra_on, spectra_subset=a.spectra_subset,
                   progress=not a.no_progress)


def plan(request: Request) -> Plan:
    """Every check that can fail, before any file is written or weights are loaded (``UsageError``)."""
    _check_options(request)
    methods = _build(request)
    config, processor, folder = _check_model(request.model, methods.values())
    samples, fingerprint = _read_split(request, processor)
    _check_scene(request)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if request.device == "auto" else request.device
    spectrum_layers = request.spectrum_layers
    if spectrum_layers == "auto":
        spectrum_layers = "headline" if device.startswith("cuda") else "all"
    share = spectra_share(request.spectra_subset, device)
    out = request.out or default_out(request, len(samples))
    if out.name in ("", ".."):  # "." or "..": the folder they name
        out = Path(os.path.abspath(out))
    _check_out(out)
    return Plan(request, samples, config, processor, folder, methods, fingerprint, out, device, spectrum_layers,
                share)


def spectra_share(value: str, device: str) -> float:
    """The share of samples whose spectra a run decomposes: ``--spectra-subset`` (``auto``, ``all`` or a number
    in (0, 1]) on ``device``; anything else is a ``UsageError``."""
    if value == "auto":
        return GPU_SPECTRA_SHARE if device.startswith("cuda") else 1.0
    if value == "all":
        return 1.0
    try:
        share = float(value)
    except ValueError:
        share = float("nan")
    if not 0 < share <= 1:
        raise UsageError(f"--spectra-subset must be auto, all or a share in (0, 1], got {value!r}")
    return share


def _check_options(request: Request) -> None:
    valid = lofi.available()
    unknown = [m for m in request.methods if m not in valid]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; valid methods: {', '.join(valid)} (see --methods list)")
    for flag, values in (("--methods", request.methods), ("--keep", [f"{k:g}" for k in request.keeps])):
        repeated = [v for v, n in Counter(values).items() if n > 1]
        if repeated:
            raise UsageError(f"{flag} repeats {', '.join(repeated)}; give each value once")
    for flag, value, minimum, meaning in (("--limit", request.limit, 0, "0 means the whole split"),
                                          ("--batch-size", request.batch_size, 1, "questions per forward pass"),
                                          ("--max-new-tokens", request.max_new_tokens, 1, "the answer's length")):
        if value < minimum:
            raise UsageError(f"{flag} must be >= {minimum} ({meaning}), got {value}")
    spectra_share(request.spectra_subset, request.device)
    if not 0 <= request.seed <= MAX_SEED:
        raise UsageError(f"--seed must be in [0, {MAX_SEED}], got {request.seed}")
    if request.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available; use --device cpu or auto")


def _build(request: Request) -> Mapping[Condition, lofi.PruningMethod]:
    """Each (method, keep) built once; the methods check their own keep (lofi.PruningMethod)."""
    try:
        built = [lofi.build(name, shared={"seed": request.seed}, keep=keep) for name in request.methods
                 for keep in request.keeps]
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    return MappingProxyType({Condition.of(m): m for m in built})


def _check_model(model: str, methods) -> tuple[object, object, Path]:
    """(config, processor, folder) of a supported model whose weights files, and the methods', are whole."""
    try:
        config, processor = check_model(model)
        folder = resolve(model)
        for method in methods:
            for file in method.weight_files(folder):
                if not file.is_file():
                    raise UsageError(f"{method.name} needs its trained weights {file}; {method.weights_hint}"
                                     f" (or leave {method.name} out)")
        check_weights(sorted(folder.glob("*.safetensors")) + [f for m in methods for f in m.weight_files(folder)])
    except ModelError as e:
        raise UsageError(str(e)) from None
    return config, processor, folder


def _read_split(request: Request, processor) -> tuple[tuple[Sample, ...], str]:
    """The questions, every image decoded, and their content fingerprint."""
    try:
        samples = load_split(request.dataset, limit=request.limit or None,
                             allow_outside_images=request.allow_outside_images)
        digests = verify_images(samples)
        check_questions(samples, getattr(processor, "image_token", None) or "<image>")
    except DatasetError as e:
        raise UsageError(str(e)) from None
    if not samples:
        raise UsageError(f"dataset {request.dataset} has no questions")
    return tuple(samples), content_sha256(samples, digests)


def _check_scene(request: Request) -> None:
    """A shapes split generated with another scene config than the model was trained on is refused (when
    both record theirs): its pictures are not the ones the model learnt to read."""
    try:
        evaluation_scene(request.model, request.dataset)
    except (ModelError, DatasetError) as e:
        raise UsageError(str(e)) from None


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


def default_out(request: Request, n_samples: int) -> Path:
    """reports/<model>_<methods>_<dataset>_n<N>_seed<S>: one folder name, whatever the dataset path."""
    dataset = Path(request.dataset).stem if request.dataset not in ("test", "val") else request.dataset
    dataset = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset)[:40] or "data"
    return paths.REPORTS / (
        f"{Path(request.model).name}_{'-'.join(request.methods)}_{dataset}_n{n_samples}_seed{request.seed}")
