"""A run folder's identity, its resume state and its completion (docs/definitions.md#run-folder).

Work happens in ``<out>.partial/``: ``config.json``, then one set of shards per finished condition
(``shards/<method>__<keep>__{spectra,kept,samples}.parquet``; the unpruned outputs the others need in
``shards/baseline.pt``). A condition is finished only when all of its shards are on disk. ``complete``
renames the folder to ``<out>`` -- it appears whole or not at all -- and only then drops the shards.
A finished or unfinished run is reused only under the same identity (``RunConfig.IDENTITY``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from analysis.study.records import BaselineOutputs, ConditionResult, KeptTokens, RunConfig, columns

SHARDS = ("spectra", "kept", "samples")  # one parquet file each per finished condition
FULL_HASH_LIMIT, HASH_EDGE = 64 << 20, 8 << 20  # larger files: size, first and last 8 MiB (7B: 13 GiB)


class RunFolderError(ValueError):
    """A folder that holds another run; the message names what differs and what to do."""


def weights_fingerprint(folder: Path | None, files: list[Path]) -> dict[str, str]:
    """sha256 of every weights file a run reads (the model's safetensors in ``folder`` and ``files``, such
    as a method's trained modules), keyed by path relative to ``folder``; empty without a folder. Part of a
    run's identity: after retraining, the same command must recompute, not return the finished run of the
    old weights. Files over ``FULL_HASH_LIMIT`` hash their size and first and last ``HASH_EDGE`` bytes:
    retraining changes those too, and hashing a 13 GiB checkpoint whole would add a minute to every run."""
    if folder is None:
        return {}
    out = {}
    for file in sorted(folder.glob("*.safetensors")) + list(files):
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
            key = file.relative_to(folder).as_posix() if file.is_relative_to(folder) else str(file)
            out[key] = digest.hexdigest()
    return out


def refuse_another_run(folder: Path, config: RunConfig, state: str, fix: str) -> None:
    """A ``RunFolderError`` naming the identity fields on which ``folder``'s run differs from ``config``."""
    if not (folder / "config.json").is_file():
        return
    done = json.loads((folder / "config.json").read_text())
    defaults = {"spectrum_layers": "all"}  # configs written before the option existed
    mine = config.as_dict()
    differ = [k for k in RunConfig.IDENTITY if done.get(k, defaults.get(k)) != mine.get(k, defaults.get(k))]
    if differ:
        raise RunFolderError(f"{folder} holds {state} run with another configuration (differs in: "
                             f"{', '.join(differ)}); {fix}")


def shard_path(work: Path, method: str, keep: float, kind: str) -> Path:
    """Where a condition's ``kind`` shard lives in a run's work folder."""
    return work / "shards" / f"{method}__{keep:g}__{kind}.parquet"


def condition_done(work: Path, method: str, keep: float) -> bool:
    """A condition is finished only when every one of its shards is on disk."""
    return all(shard_path(work, method, keep, kind).is_file() for kind in SHARDS)


def read_shards(work: Path, kind: str) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted((work / "shards").glob(f"*__{kind}.parquet"))]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def missing_shards(work: Path, conditions: list[tuple[str, float]]) -> list[str]:
    return [p.name for m, k in conditions for kind in SHARDS for p in [shard_path(work, m, k, kind)]
            if not p.is_file()]


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def save_condition(work: Path, method: str, keep: float, result: ConditionResult) -> None:
    """The condition's shards (and the unpruned outputs, for the baseline), each written atomically."""
    if result.baseline is not None:
        target = work / "shards" / "baseline.pt"
        torch.save(asdict(result.baseline), target.with_suffix(".tmp"))
        target.with_suffix(".tmp").replace(target)
    spectra = pd.DataFrame([{k: v for k, v in vars(r).items() if k not in ("row", "call")} for r in result.spectra])
    _write_parquet(spectra.assign(method=method, keep=keep), shard_path(work, method, keep, "spectra"))
    _write_parquet(pd.DataFrame([asdict(k) for k in result.kept], columns=columns(KeptTokens)),
                   shard_path(work, method, keep, "kept"))
    _write_parquet(pd.DataFrame([asdict(s) for s in result.samples]), shard_path(work, method, keep, "samples"))


def load_baseline(work: Path) -> BaselineOutputs | None:
    """The unpruned outputs of a finished baseline condition, or None."""
    path = work / "shards" / "baseline.pt"
    if path.is_file() and condition_done(work, "baseline", 1.0):
        return BaselineOutputs(**torch.load(path))
    return None


def drop_resume_state(out: Path) -> None:
    """Shards left in a finished folder (a run stopped between its rename and their removal)."""
    shutil.rmtree(out / "shards", ignore_errors=True)


def complete(work: Path, out: Path) -> Path:
    """Give the finished ``work`` folder its name (``out`` may exist, empty), then drop the resume state."""
    if out.is_dir():
        out.rmdir()
    work.rename(out)
    drop_resume_state(out)
    return out
