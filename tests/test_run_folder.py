"""A run folder over its life on a tiny trained LLaVA: what a rerun reuses (only the same run, judged by
content), what it never touches, how an interruption or a full disk ends, and a report rendered from the
folder alone."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import torch

from analysis import paths
from analysis.study import compare, report, request, runfolder, runner
from analysis.study.records import BASELINE, Condition


def _split(folder: Path, n: int = 3, llava_format: bool = False) -> Path:
    """A copy of the first ``n`` bundled test questions and their images (``llava_format``: the LLaVA
    evaluation format, with no answers file)."""
    with (paths.BUNDLED_BENCHMARK / "test.jsonl").open() as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for r in rows:
        shutil.copy(paths.BUNDLED_BENCHMARK / r["image"], folder / r["image"])
    if llava_format:
        rows = [{"question_id": r["question_id"], "image": r["image"], "text": r["question"]} for r in rows]
    split = folder / "split.jsonl"
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return split


def _args(model, out, dataset, *extra):
    return ["--methods", "fastv", "--keep", "0.5", "--model", str(model), "--dataset", str(dataset),
            "--limit", "3", "--batch-size", "3", "--out", str(out), "--no-progress", *extra]


def _counting(monkeypatch, stop_at: int | None = None) -> list:
    """The conditions the command computes, in order; with ``stop_at``, an interruption (as from Ctrl-C)
    when that many have been asked for."""
    calls, real = [], runner.run_condition

    def counted(*args, **kwargs):
        calls.append(Condition.of(kwargs["method"]))
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "run_condition", counted)
    return calls


def _interrupted(argv) -> None:
    """The command, interrupted by ``_counting``'s stop (however it reports the interruption)."""
    with contextlib.suppress(KeyboardInterrupt):
        compare.main(argv)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_an_interruption_exits_130_with_one_line_and_resumes(tiny_model, tmp_path, monkeypatch, capsys):
    out, split = tmp_path / "run", _split(tmp_path / "data")
    _counting(monkeypatch, stop_at=2)
    assert compare.main(_args(tiny_model, out, split, "--keep", "0.5", "0.25")) == 130
    assert "interrupted; what is finished stays in" in _error(capsys)
    assert not out.exists() and runfolder.condition_done(tmp_path / "run.partial", BASELINE)
    calls = _counting(monkeypatch)
    assert compare.main(_args(tiny_model, out, split, "--keep", "0.5", "0.25")) == 0
    assert calls == [Condition("fastv", 0.5), Condition("fastv", 0.25)]  # the baseline is read back


def test_resuming_never_unpickles_what_the_work_folder_holds(tiny_model, tmp_path, monkeypatch, capsys):
    """A file that runs code when unpickled, where the unpruned outputs were once kept, is never loaded,
    even where torch is told to allow full unpickling."""
    out, split = tmp_path / "run", _split(tmp_path / "data")
    _counting(monkeypatch, stop_at=2)
    _interrupted(_args(tiny_model, out, split))
    ran = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return open, (str(ran), "w")

    torch.save(Payload(), tmp_path / "run.partial" / "shards" / "baseline.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    calls = _counting(monkeypatch)
    assert compare.main(_args(tiny_model, out, split)) == 0
    assert not ran.exists() and calls == [Condition("fastv", 0.5)]


def test_a_full_disk_is_one_line_and_the_run_resumes(tiny_model, tmp_path, monkeypatch, capsys):
    out, split = tmp_path / "run", _split(tmp_path / "data")
    written, write = [], runfolder._write_parquet

    def filling(frame, path):
        written.append(path)
        if len(written) == 4:  # the first shard of the first pruned condition
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(frame, path)

    monkeypatch.setattr(runfolder, "_write_parquet", filling)
    assert compare.main(_args(tiny_model, out, split)) == 1
    assert "No space left on device" in _error(capsys) and not out.exists()
    monkeypatch.setattr(runfolder, "_write_parquet", write)
    calls = _counting(monkeypatch)
    assert compare.main(_args(tiny_model, out, split)) == 0 and calls == [Condition("fastv", 0.5)]


def test_a_dataset_edited_in_place_is_another_run(tiny_model, tmp_path, capsys):
    out, split = tmp_path / "run", _split(tmp_path / "data")
    assert compare.main(_args(tiny_model, out, split)) == 0
    rows = [json.loads(line) for line in split.read_text().splitlines()]
    split.write_text("".join(json.dumps({**r, "answer": "no such answer"}) + "\n" for r in rows))
    assert compare.main(_args(tiny_model, out, split)) == 2
    assert "differs in: dataset_sha256" in _error(capsys)
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    image = split.parent / rows[0]["image"]
    shutil.copy(paths.BUNDLED_BENCHMARK / "images" / "test_00009.png", image)  # same name, other pixels
    assert compare.main(_args(tiny_model, out, split)) == 2
    assert "differs in: dataset_sha256" in _error(capsys)


def test_a_changed_chat_template_or_batch_size_is_another_run(tiny_model, tmp_path, monkeypatch, capsys):
    model, split = tmp_path / "model", _split(tmp_path / "data")
    shutil.copytree(tiny_model, model)
    _counting(monkeypatch, stop_at=2)
    _interrupted(_args(model, tmp_path / "run", split))
    capsys.readouterr()
    assert compare.main(_args(model, tmp_path / "run", split, "--batch-size", "2")) == 2
    assert "differs in: batch_size" in _error(capsys)
    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("ASSISTANT:", "ANSWER:"))
    assert compare.main(_args(model, tmp_path / "run", split)) == 2
    assert "chat_template_sha256" in _error(capsys)


def test_the_same_split_by_a_relative_or_absolute_path_is_the_same_run(tiny_model, tmp_path, monkeypatch, capsys):
    out, split = tmp_path / "run", _split(tmp_path / "data")
    assert compare.main(_args(tiny_model, out, split.absolute())) == 0
    monkeypatch.chdir(tmp_path)
    calls = _counting(monkeypatch)
    assert compare.main(_args(tiny_model, out, Path("data") / "split.jsonl")) == 0
    assert calls == [] and "is complete; nothing to recompute" in capsys.readouterr().out


def test_a_finished_folder_without_the_marker_keeps_its_files(tiny_model, tmp_path):
    out, split = tmp_path / "run", _split(tmp_path / "data")
    assert compare.main(_args(tiny_model, out, split)) == 0
    (out / ".analysis-compare").unlink(missing_ok=True)  # runfolder.MARKER
    (out / "shards").mkdir()
    (out / "shards" / "notes.txt").write_text("mine")
    assert compare.main(_args(tiny_model, out, split)) == 0
    assert (out / "shards" / "notes.txt").read_text() == "mine"


def test_a_work_folder_without_results_takes_the_next_runs_identity(tiny_model, tmp_path, monkeypatch, capsys):
    """A model that failed to load leaves no state that refuses the repaired model (or any other run)."""
    out, split = tmp_path / "run", _split(tmp_path / "data")
    real = compare.load_model
    monkeypatch.setattr(compare, "load_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad\ntensor")))
    assert compare.main(_args(tiny_model, out, split)) == 2
    assert "cannot be loaded (RuntimeError: bad)" in _error(capsys)
    monkeypatch.setattr(compare, "load_model", real)
    assert compare.main(_args(tiny_model, out, split, "--seed", "3")) == 0


def test_the_report_is_rendered_from_the_run_folder_alone(tiny_model, tmp_path):
    out, split = tmp_path / "run", _split(tmp_path / "data")
    assert compare.main(_args(tiny_model, out, split)) == 0
    drawn = (out / "figures" / "kept_token_maps.png").read_bytes()
    index = json.loads((out / "thumbnails" / "index.json").read_text())
    assert [entry["sample_id"] for entry in index] == ["test-00000-0", "test-00000-1", "test-00000-2"]
    shutil.rmtree(tmp_path / "data")  # the split is gone; config.json still names it
    other = _split(tmp_path / "data", n=9)  # another split at the same path: never read
    shutil.copy(paths.BUNDLED_BENCHMARK / "images" / "test_00009.png", other.parent / "images" / "test_00000.png")
    shutil.rmtree(out / "figures")
    assert report.main([str(out)]) == 0
    assert (out / "figures" / "kept_token_maps.png").read_bytes() == drawn


def test_a_split_without_ground_truth_is_compared_without_accuracy(tiny_model, tmp_path):
    out, split = tmp_path / "run", _split(tmp_path / "data", llava_format=True)
    assert compare.main(_args(tiny_model, out, split)) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["accuracy"].isna().all() and summary["flip_rate"].notna().all()
    assert "no ground truth, so accuracy is not measured" in (out / "report.html").read_text()


def test_report_refuses_a_folder_whose_config_is_not_a_run_configuration(tmp_path, capsys):
    for name in ("summary.csv", "correlation.csv", "spectra.parquet"):
        (tmp_path / name).write_text("")
    (tmp_path / "config.json").write_text("[]")
    assert report.main([str(tmp_path)]) == 2
    assert "is not a run configuration" in _error(capsys)


def test_out_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert request.parse(["--methods", "fastv", "--out", "~/run"]).out == tmp_path / "run"


def test_out_dot_is_the_folder_it_names(tiny_model, tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setattr(compare, "load_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert compare.main(_args(tiny_model, ".", _split(tmp_path / "data"))) == 130
    assert (tmp_path / "here.partial" / runfolder.MARKER).is_file()
