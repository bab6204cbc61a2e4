"""A run folder's identity, its resume state, its lock and its completion (docs/definitions.md#run-folder).

Work happens in ``<out>.partial/``. This command creates it with a marker file (``MARKER``) and adopts an
existing one only if it carries that marker (or is empty): a folder anyone else made is never written
into, moved or emptied. It holds ``config.json``, then one set of shards per finished condition
(``shards/<method>__<keep>__{spectra,kept,samples}.parquet``; the unpruned outputs the others need in
``shards/baseline.safetensors``: tensors and JSON, nothing that unpickles). A condition is finished only
when all of its shards are on disk. While a run works it holds an exclusive lock (``fcntl.flock``) on
``<out>.partial/.lock``, which names its process id. ``complete`` renames the folder to ``<out>`` -- it
appears whole or not at all -- and only then drops the shards. A finished or unfinished run is reused only
under the same identity (``RunConfig.IDENTITY``); an unfinished one with no finished condition yet takes
the new identity (it holds nothing to keep).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from analysis.study.records import BASELINE, BaselineOutputs, Condition, ConditionResult, KeptTokens, RunConfig, columns

SHARDS = ("spectra", "kept", "samples")  # one parquet file each per finished condition
BASELINE_FILE = "baseline.safetensors"
MARKER, LOCK = ".analysis-compare", ".lock"
MARKER_TEXT = '{"written_by": "python -m analysis.compare"}\n'
FULL_HASH_LIMIT, HASH_EDGE = 64 << 20, 8 << 20  # larger files: size, first and last 8 MiB (7B: 13 GiB)
# the files of a model folder, besides its weights, that change what a run computes
MODEL_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
               "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
REPORT_KEYS = ("methods", "keep", "model", "dataset", "n_samples", "seed", "device", "center", "headline")


class RunFolderError(ValueError):
    """A folder that holds something else, another run, or a run another process is writing; the message
    names what differs and what to do."""


def file_sha256(file: Path) -> str:
    """sha256 of a file; files over ``FULL_HASH_LIMIT`` hash their size and first and last ``HASH_EDGE``
    bytes (retraining changes those too, and hashing a 13 GiB checkpoint whole would add a minute to
    every run)."""
    size, digest = file.stat().st_size, hashlib.sha256()
    with file.open("rb") as f:
        if size <= FULL_HASH_LIMIT:
            digest.update(f.read())
        else:
            digest.update(str(size).encode())
            digest.update(f.read(HASH_EDGE))
            f.seek(max(0, size - HASH_EDGE))
            digest.update(f.read())
    return digest.hexdigest()


def weights_fingerprint(folder: Path | None, files: list[Path]) -> dict[str, str]:
    """``file_sha256`` of every weights file a run reads (the model's safetensors in ``folder`` and
    ``files``, such as a method's trained modules), keyed by path relative to ``folder``; empty without a
    folder. After retraining, the same command must recompute, not return the finished run of the old
    weights."""
    if folder is None:
        return {}
    return {(file.relative_to(folder).as_posix() if file.is_relative_to(folder) else str(file)): file_sha256(file)
            for file in sorted(folder.glob("*.safetensors")) + list(files) if file.is_file()}


def model_files_fingerprint(folder: Path | None) -> dict[str, str]:
    """sha256 of each of ``MODEL_FILES`` the model folder has (configuration, tokenizer, processor, chat
    template): editing one of them changes what a run computes."""
    if folder is None:
        return {}
    return {name: file_sha256(folder / name) for name in MODEL_FILES if (folder / name).is_file()}


def partial(out: Path) -> Path:
    """The folder a run of ``out`` works in."""
    if not out.name:
        raise RunFolderError(f"--out {out} names no folder of its own; give a folder path")
    return out.with_name(out.name + ".partial")


def finished(out: Path) -> bool:
    return out.is_dir() and not out.is_symlink() and (out / "report.html").is_file()


def read_config(folder: Path) -> dict:
    """``folder``'s ``config.json``, refused (``RunFolderError``) unless it is a run configuration."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path} is not a run configuration of analysis.compare ({e}); this is not a "
                             "run folder: choose another --out") from None
    missing = [k for k in REPORT_KEYS if not isinstance(config, dict) or k not in config]
    if missing or not isinstance(config["headline"], dict) or not {"layer", "group"} <= set(config["headline"]):
        raise RunFolderError(f"{path} is not a run configuration of analysis.compare (a JSON "
                             f"{type(config).__name__}{f' without {missing}' if missing else ''}); this is not "
                             "a run folder: choose another --out")
    return config


def refuse_another_run(folder: Path, config: RunConfig, state: str, fix: str) -> None:
    """A ``RunFolderError`` naming the identity fields on which ``folder``'s run differs from ``config``."""
    if not (folder / "config.json").is_file():
        return
    done = read_config(folder)
    defaults = {"spectrum_layers": "all", "spectra_share": 1.0}  # configs written before these options existed
    mine = config.as_dict()
    differ = [k for k in RunConfig.IDENTITY if done.get(k, defaults.get(k)) != mine.get(k, defaults.get(k))]
    if differ:
        raise RunFolderError(f"{folder} holds {state} run with another configuration (differs in: "
                             f"{', '.join(differ)}); {fix}")


def check_out(out: Path) -> None:
    """``out`` must be new, an empty folder or a folder with a ``config.json`` (a run folder: its identity
    is checked next), never a symbolic link or a file; ``<out>.partial`` must be absent, empty, or an
    unfinished run of this command (``MARKER``). Nothing is written."""
    for path, name in ((out, "--out"), (partial(out), "the work folder")):
        if path.is_symlink():
            target = os.readlink(path)
            state = "" if path.exists() else ", which does not exist"
            raise RunFolderError(f"{name} {path} is a symbolic link (to {target}{state}); give a real folder path "
                                 "(nothing was touched)")
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{name} {path} is a file; move it away or choose another --out (nothing was "
                                 "touched)")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise RunFolderError(f"--out {out} is a folder with other files in it, not a run folder of "
                             "analysis.compare; choose a new or empty folder (nothing was deleted)")
    work = partial(out)
    if work.is_dir() and not (work / MARKER).is_file() and any(work.iterdir()):
        raise RunFolderError(f"{work} exists and is not an unfinished run of analysis.compare (it has no {MARKER} "
                             "marker); move it away or choose another --out (nothing was touched)")


def holds_results(work: Path) -> bool:
    """Whether ``work`` holds a shard of any condition (then its identity is kept, not replaced)."""
    shards = work / "shards"
    return shards.is_dir() and any(p.suffix == ".parquet" or p.name == BASELINE_FILE for p in shards.iterdir())


@contextlib.contextmanager
def working(out: Path, config: RunConfig):
    """The locked work folder of ``out`` for ``config``'s run: created with its marker, or adopted (an
    unfinished run of this command under the same identity, or without any result yet), its
    ``config.json`` written. The lock (``LOCK``, naming this process) is held until the block ends."""
    check_out(out)
    work = partial(out)
    if holds_results(work):  # before anything is written; again below, under the lock
        refuse_another_run(work, config, "an unfinished", "delete it or use another --out")
    work.mkdir(parents=True, exist_ok=True)
    if not (work / MARKER).is_file():
        (work / MARKER).write_text(MARKER_TEXT)
    with (work / LOCK).open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise RunFolderError(f"another analysis.compare (pid {holder}) is writing {work}; wait for it to "
                                 "finish or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        if finished(out):
            raise RunFolderError(f"{out} was completed by another run while this one started; rerun the command "
                                 "to use it")
        if holds_results(work):
            refuse_another_run(work, config, "an unfinished", "delete it or use another --out")
        (work / "shards").mkdir(exist_ok=True)
        write_atomically(work / "config.json", json.dumps(config.as_dict(), indent=1))
        yield work


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def shard_path(work: Path, condition: Condition, kind: str) -> Path:
    """Where a condition's ``kind`` shard lives in a run's work folder."""
    return work / "shards" / f"{condition.stem}__{kind}.parquet"


def condition_done(work: Path, condition: Condition) -> bool:
    """A condition is finished only when every one of its shards is on disk."""
    return all(shard_path(work, condition, kind).is_file() for kind in SHARDS)


def read_shards(work: Path, kind: str) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted((work / "shards").glob(f"*__{kind}.parquet"))]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def missing_shards(work: Path, conditions) -> list[str]:
    return [p.name for c in conditions for kind in SHARDS for p in [shard_path(work, c, kind)] if not p.is_file()]


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def save_condition(work: Path, condition: Condition, result: ConditionResult) -> None:
    """The condition's shards (and the unpruned outputs, for the baseline), each written atomically."""
    if result.baseline is not None:
        _save_baseline(work / "shards" / BASELINE_FILE, result.baseline)
    spectra = pd.DataFrame([{k: v for k, v in vars(r).items() if k not in ("row", "call")} for r in result.spectra])
    _write_parquet(spectra.assign(method=condition.method, keep=condition.keep), shard_path(work, condition, "spectra"))
    _write_parquet(pd.DataFrame([asdict(k) for k in result.kept], columns=columns(KeptTokens)),
                   shard_path(work, condition, "kept"))
    _write_parquet(pd.DataFrame([asdict(s) for s in result.samples]), shard_path(work, condition, "samples"))


def _save_baseline(path: Path, baseline: BaselineOutputs) -> None:
    """The unpruned outputs as safetensors: ragged lists flattened with their lengths, answers as JSON."""
    from safetensors.torch import save_file
    vocab = baseline.first_logits.shape[-1]
    tensors = {
        "first_logits": baseline.first_logits.float().contiguous(),
        "answer_lengths": torch.tensor(baseline.answer_lengths, dtype=torch.long),
        "sequence_lengths": torch.tensor([len(s) for s in baseline.sequences], dtype=torch.long),
        "sequences": torch.tensor([t for s in baseline.sequences for t in s], dtype=torch.long),
        "forced_logits": (torch.cat(baseline.forced_logits) if baseline.forced_logits
                          else torch.zeros(0, vocab)).float().contiguous(),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"answers": json.dumps(baseline.answers)})
    tmp.replace(path)


def load_baseline(work: Path) -> BaselineOutputs | None:
    """The unpruned outputs of a finished baseline condition, or None (not finished, or a file that does
    not read back whole: the baseline is then computed again)."""
    from safetensors import SafetensorError, safe_open
    path = work / "shards" / BASELINE_FILE
    if not (path.is_file() and condition_done(work, BASELINE)):
        return None
    try:
        with safe_open(path, "pt") as f:
            answers = json.loads(f.metadata()["answers"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        lengths, sequence_lengths = t["answer_lengths"].tolist(), t["sequence_lengths"].tolist()
        sequences = [s.tolist() for s in t["sequences"].split(sequence_lengths)]
        forced = list(t["forced_logits"].split(lengths))
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError):
        return None
    if not len(answers) == len(lengths) == len(sequences) == len(t["first_logits"]):
        return None
    return BaselineOutputs(answers, t["first_logits"], sequences, lengths, forced)


def drop_resume_state(out: Path) -> None:
    """Shards and a lock left in a finished folder of this command (a run stopped between its rename and
    their removal); a folder without the marker is left as it is."""
    if (out / MARKER).is_file():
        shutil.rmtree(out / "shards", ignore_errors=True)
        (out / LOCK).unlink(missing_ok=True)


def complete(work: Path, out: Path) -> Path:
    """Give the finished ``work`` folder its name (``out`` may exist, empty), then drop the resume state."""
    try:
        if out.is_dir():
            out.rmdir()
        work.rename(out)
    except OSError as e:
        raise RunFolderError(f"cannot rename {work} to {out} ({e.strerror or e}); the finished run stays in "
                             f"{work}") from None
    drop_resume_state(out)
    return out
