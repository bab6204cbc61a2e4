"""Hostile inputs to ``python -m analysis.compare``, as a table: each is refused before any work with one line
on stderr and exit status 2, and every file and folder is left exactly as it was (the whole temporary tree is
compared before and after; nothing is created, not even ``--out``). Add a row for every new way found to
break the command.

Each row builds its inputs in a fresh folder from a three-question copy of the bundled split and the
bundled model's files; no model is loaded (the command's ``load_model`` fails the test if it is reached).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from analysis import paths
from analysis.study import compare, runfolder

MODEL_FILES = ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "model.safetensors", "lvpruning/decision_modules.json",
               "lvpruning/decision_modules.safetensors")


def _rows(n=3) -> list[dict]:
    with (paths.BUNDLED_BENCHMARK / "test.jsonl").open() as f:
        return [json.loads(next(f)) for _ in range(n)]


def _split(root: Path, edit: Callable[[list[dict]], list] = lambda rows: rows, text: str | None = None) -> Path:
    """``root/data/split.jsonl`` (its rows passed through ``edit``, or ``text`` as it is) with its images."""
    data = root / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    rows = _rows()
    for r in rows:
        shutil.copy(paths.BUNDLED_BENCHMARK / r["image"], data / r["image"])
    split = data / "split.jsonl"
    split.write_text(text if text is not None else "".join(json.dumps(r) + "\n" for r in edit(rows)))
    return split


def _model(root: Path) -> Path:
    """A copy of the bundled model's files the command reads."""
    model = root / "model"
    for name in MODEL_FILES:
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(paths.BUNDLED_MODEL / name, model / name)
    return model


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        chunks.append((kind, data[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(body)) + kind + body +
                                         struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks)


def _rewrite_image(split: Path, rewrite: Callable[[list], list]) -> None:
    """The first question's image, its PNG chunks passed through ``rewrite`` (checksums recomputed)."""
    image = split.parent / _rows(1)[0]["image"]
    image.write_bytes(_png(rewrite(_png_chunks(image.read_bytes()))))


def _bomb(chunks):  # a header of 100,000 x 100,000 pixels: PIL refuses to decode it
    return [(k, struct.pack(">II", 100_000, 100_000) + b[8:] if k == b"IHDR" else b) for k, b in chunks]


def _undecodable(chunks):  # valid checksums (verify() passes), image data that is not a zlib stream
    return [(k, b"\x00" * len(b) if k == b"IDAT" else b) for k, b in chunks]


def _truncate(path: Path, keep: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _foreign_partial(t: Path) -> None:
    (t / "out.partial" / "shards").mkdir(parents=True)
    (t / "out.partial" / "shards" / "precious.txt").write_text("x")


def _finished_folder(t: Path, config: str) -> None:
    (t / "out").mkdir()
    (t / "out" / "config.json").write_text(config)
    (t / "out" / "report.html").write_text("<html></html>")


_HELD = []  # open lock files of the rows that hold one


def _held_lock(t: Path) -> None:
    work = t / "out.partial"
    work.mkdir()
    (work / runfolder.MARKER).write_text(runfolder.MARKER_TEXT)
    lock = (work / runfolder.LOCK).open("a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _HELD.append(lock)


def _unfinished_other_run(t: Path) -> None:
    """An unfinished run of this command with a finished baseline shard, at another seed."""
    work = t / "out.partial"
    (work / "shards").mkdir(parents=True)
    (work / runfolder.MARKER).write_text(runfolder.MARKER_TEXT)
    (work / "shards" / "baseline__1__samples.parquet").write_bytes(b"")
    config = {k: None for k in runfolder.REPORT_KEYS} | {"headline": {"layer": "last", "group": "all"}, "seed": 7}
    (work / "config.json").write_text(json.dumps(config))


@dataclass(frozen=True)
class Case:
    """``build(folder)`` makes the inputs and returns the options that override the working command's;
    ``message`` is part of the one line the command must print."""

    name: str
    build: Callable[[Path], list[str]]
    message: str


def _dataset(edit=lambda rows: rows, text=None):
    return lambda t: ["--dataset", str(_split(t, edit, text))]


CASES = [
    # --out and its work folder
    Case("foreign-partial-folder", lambda t: _foreign_partial(t) or [], "not an unfinished run of analysis.compare"),
    Case("partial-is-a-file", lambda t: (t / "out.partial").write_text("x") and [], "is a file"),
    Case("partial-is-a-symlink", lambda t: (t / "elsewhere").mkdir() or (t / "out.partial").symlink_to(t / "elsewhere")
         or [], "is a symbolic link"),
    Case("out-symlink-to-empty-folder", lambda t: (t / "empty").mkdir() or (t / "out").symlink_to(t / "empty") or [],
         "is a symbolic link"),
    Case("out-dangling-symlink", lambda t: (t / "out").symlink_to(t / "gone") or [], "which does not exist"),
    Case("junk-config-in-finished-out", lambda t: _finished_folder(t, "{not json") or [], "not a run configuration"),
    Case("list-config-in-finished-out", lambda t: _finished_folder(t, "[]") or [], "not a run configuration"),
    Case("lock-held-by-another-run", lambda t: _held_lock(t) or [], f"(pid {os.getpid()}) is writing"),
    Case("unfinished-run-of-another-seed", lambda t: _unfinished_other_run(t) or [], "differs in:"),
    Case("out-under-a-file", lambda t: (t / "notes").write_text("x") and ["--out", str(t / "notes" / "run")],
         "cannot be written"),
    # the split
    Case("non-object-row", _dataset(lambda rows: [[1, 2]] + rows[1:]), "is a JSON list, not an object"),
    Case("string-row", _dataset(lambda rows: rows[:1] + ["a question"]), "is a JSON str, not an object"),
    Case("non-string-image", _dataset(lambda rows: [{**rows[0], "image": 5}] + rows[1:]), "the image is int"),
    Case("non-string-answer", _dataset(lambda rows: [{**rows[0], "answer": 3}] + rows[1:]), "the answer is int"),
    Case("mixed-type-family", _dataset(lambda rows: rows[:2] + [{**rows[2], "family": 7}]), "the family is int"),
    Case("list-question-id", _dataset(lambda rows: [{**rows[0], "question_id": [1]}] + rows[1:]),
         "question_id is list"),
    Case("image-leaving-the-folder", _dataset(lambda rows: [{**rows[0], "image": "../model/config.json"}] + rows[1:]),
         "outside the split's folder"),
    Case("absolute-image-path", _dataset(lambda rows: [{**rows[0], "image": str(paths.BUNDLED_BENCHMARK /
                                                                                rows[0]["image"])}] + rows[1:]),
         "--allow-outside-images"),
    Case("image-link-out-of-the-folder",
         lambda t: (split := _split(t, lambda rows: [{**rows[0], "image": "images/link.png"}] + rows[1:])) and (
             split.parent / "images" / "link.png").symlink_to(paths.BUNDLED_BENCHMARK / _rows(1)[0]["image"]) or [
             "--dataset", str(split)], "outside the split's folder"),
    Case("decompression-bomb-png", lambda t: (split := _split(t)) and _rewrite_image(split, _bomb) or [
        "--dataset", str(split)], "too large to decode"),
    Case("png-that-verifies-but-does-not-decode", lambda t: (split := _split(t)) and _rewrite_image(
        split, _undecodable) or ["--dataset", str(split)], "cannot be read"),
    Case("split-not-utf8", lambda t: (split := _split(t)) and split.write_bytes(b"\xff\xfe\x00garbage") and [
        "--dataset", str(split)], "is not UTF-8 text"),
    Case("answers-row-without-question-id",
         lambda t: (split := _split(t, lambda rows: [{"question_id": r["question_id"], "image": r["image"],
                                                      "text": r["question"]} for r in rows])) and (
             split.with_name("split_answers.jsonl").write_text('{"answer": "yes"}\n')) and ["--dataset", str(split)],
         "lacks question_id"),
    Case("non-string-answer-in-answers-file",
         lambda t: (split := _split(t, lambda rows: [{"question_id": r["question_id"], "image": r["image"],
                                                      "text": r["question"]} for r in rows])) and (
             split.with_name("split_answers.jsonl").write_text('{"question_id": "x", "answer": 4}\n')) and [
             "--dataset", str(split)], "the answer is int"),
    Case("answers-file-missing-a-question",
         lambda t: (split := _split(t, lambda rows: [{"question_id": r["question_id"], "image": r["image"],
                                                      "text": r["question"]} for r in rows])) and (
             split.with_name("split_answers.jsonl").write_text(
                 json.dumps({"question_id": _rows(1)[0]["question_id"], "answer": "yes"}) + "\n")) and [
             "--dataset", str(split)], "has no answer for question_id"),
    # the model
    Case("truncated-model-safetensors", lambda t: _truncate((m := _model(t)) / "model.safetensors") or [
        "--model", str(m)], "is not a whole safetensors file"),
    Case("truncated-lvpruning-weights", lambda t: _truncate((m := _model(t)) / "lvpruning" /
                                                            "decision_modules.safetensors") or [
        "--model", str(m), "--methods", "lvpruning"], "is not a whole safetensors file"),
    Case("gpt2-model-folder", lambda t: (t / "gpt2").mkdir() or (t / "gpt2" / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})) and ["--model", str(t / "gpt2")],
         "is a 'gpt2' model, not a VLM lofi supports"),
    # options
    Case("seed-overflow", lambda t: ["--seed", str(2**70)], "--seed must be in [0, 4294967295]"),
    Case("negative-seed", lambda t: ["--seed", "-1"], "--seed must be in"),
    Case("unknown-option", lambda t: ["--limt", "3"], "unrecognized arguments: --limt"),
    Case("non-integer-batch-size", lambda t: ["--batch-size", "two"], "invalid int value: 'two'"),
    Case("repeated-method", lambda t: ["--methods", "fastv", "lofi", "fastv"], "--methods repeats fastv"),
    Case("repeated-keep", lambda t: ["--keep", "0.5", "0.25", "0.50"], "--keep repeats 0.5"),
    Case("keep-nan", lambda t: ["--keep", "nan"], "keep must be a fraction in (0, 1]"),
    Case("spectra-subset-zero", lambda t: ["--spectra-subset", "0"], "--spectra-subset must be auto, all or a share"),
    Case("spectra-subset-above-one", lambda t: ["--spectra-subset", "1.5"], "a share in (0, 1], got '1.5'"),
    Case("spectra-subset-word", lambda t: ["--spectra-subset", "half"], "a share in (0, 1], got 'half'"),
    Case("unknown-method", lambda t: ["--methods", "lofii"], "valid methods: cdpruner, divprune, fastv, lofi"),
]


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: its kind and content (sha256 of a file, target of a link, mode)."""
    out = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", path.stat().st_mode)
            else:
                out[rel] = ("file", path.stat().st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(compare, "load_model", lambda *a, **k: pytest.fail("reached the model"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_hostile_input_is_one_line_exit_2_and_touches_nothing(case, tmp_path, capfd, no_model_load):
    good = _split(tmp_path / "good")
    argv = ["--methods", "fastv", "--keep", "0.5", "--limit", "3", "--batch-size", "3", "--no-progress",
            "--dataset", str(good), "--out", str(tmp_path / "out"), *case.build(tmp_path)]
    before = _tree(tmp_path)
    try:
        status = compare.main(argv)
    finally:
        while _HELD:
            _HELD.pop().close()
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and case.message in err, err
    assert _tree(tmp_path) == before


def test_the_working_command_of_the_table_passes_validation(tmp_path, capfd, monkeypatch):
    """The table's rows fail because of what each changes: unchanged, the command reaches the model."""
    reached = []
    monkeypatch.setattr(compare, "load_model", lambda *a, **k: reached.append(1) or (_ for _ in ()).throw(
        KeyboardInterrupt))
    argv = ["--methods", "fastv", "--keep", "0.5", "--limit", "3", "--batch-size", "3", "--no-progress",
            "--dataset", str(_split(tmp_path)), "--out", str(tmp_path / "out"), "--model", str(_model(tmp_path))]
    assert compare.main(argv) == 130 and reached
    assert "rerun the same command to resume" in capfd.readouterr().err
