"""``python -m analysis.compare`` end to end on a tiny trained LLaVA: the run folder, errors, resuming,
determinism, and re-rendering the report from the tables alone."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.study import compare, report, request, runfolder, runner
from analysis.study.evaluate import load_model
from analysis.study.records import BASELINE, Condition
from lofi.methods.lvpruning import DecisionModules


def _args(model, out, *extra):
    return ["--methods", "lofi", "lvpruning", "fastv", "--keep", "0.5", "0.25", "--model", str(model),
            "--limit", "6", "--batch-size", "3", "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def run_folder(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert compare.main(_args(tiny_model, out)) == 0
    return out


def test_the_run_folder_holds_every_table_and_figure(run_folder):
    for name in ("config.json", "samples.parquet", "spectra.parquet", "summary.csv", "correlation.csv",
                 "report.html", "kept.parquet", "leverage.parquet"):
        assert (run_folder / name).is_file(), name
    for figure in report.FIGURES:
        assert (run_folder / "figures" / f"{figure.name}.png").is_file(), figure.name
    samples = pd.read_parquet(run_folder / "samples.parquet")
    assert {"sample_id", "method", "keep", "answer", "baseline_answer", "correct", "baseline_correct", "flip",
            "kl", "forced_kl", "js", "rel_flops"} <= set(samples.columns)
    assert len(samples) == 6 * 3 * 2
    spectra = pd.read_parquet(run_folder / "spectra.parquet")
    assert {"sample_id", "method", "keep", "layer", "group", "n_tokens", "ipr", "pr", "effective_rank",
            "delta_ipr"} <= set(spectra.columns)
    assert (spectra[spectra.method == "baseline"].delta_ipr == 0).all()
    before = spectra[(spectra.method == "lofi") & (spectra.layer < 2)]
    assert (before.delta_ipr == 0).all()  # nothing is pruned before layer 2
    summary = pd.read_csv(run_folder / "summary.csv")
    assert len(summary) == 6 and (summary.rel_flops < 1.1).all()
    config = json.loads((run_folder / "config.json").read_text())
    assert config["seed"] == 0 and config["n_samples"] == 6
    assert {"transformers", "torchvision"} <= set(config["packages"])
    assert config["spectrum_layers"] == "all"  # "auto" on the CPU: every layer
    assert not (run_folder / "shards").exists() and not run_folder.with_name("run.partial").exists()
    page = (run_folder / "report.html").read_text()
    assert page.count("data:image/png;base64") == len(report.FIGURES) and "<h2>Reading</h2>" in page


def test_methods_list(capsys):
    assert compare.main(["--methods", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fastv", "lofi", "lvpruning", "random"))


@pytest.mark.parametrize("extra,message", [
    (["--methods", "lofii"], "valid methods: cdpruner, divprune, fastv, lofi"),
    (["--keep", "1.5"], "keep must be a fraction in (0, 1]"),
    (["--model", "/nonexistent/model"], "no model at /nonexistent/model"),
    (["--dataset", "/nonexistent.jsonl"], "not found"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--limit", "-1"], "--limit must be >= 0"),
])
def test_bad_input_is_one_clear_line_and_no_folder(tiny_model, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert compare.main(_args(tiny_model, out, *extra)) == 2  # argparse: the last occurrence wins
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists() and not tmp_path.joinpath("bad.partial").exists()


def test_corrupt_image_fails_before_any_work(tiny_model, tmp_path, capsys):
    from analysis.benchmark.datasets import BUNDLED_BENCHMARK
    rows = [json.loads(line) for line in (BUNDLED_BENCHMARK / "test.jsonl").open()][:3]
    (tmp_path / "images").mkdir()
    for r in rows:
        shutil.copy(BUNDLED_BENCHMARK / r["image"], tmp_path / r["image"])
    (tmp_path / rows[0]["image"]).write_bytes(b"garbage")
    split = tmp_path / "split.jsonl"
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert compare.main(_args(tiny_model, out, "--dataset", str(split))) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert not out.exists() and not tmp_path.joinpath("run.partial").exists()


def test_an_interrupted_run_resumes_without_recomputing(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real = runner.run_condition

    def counting(*args, **kwargs):
        calls.append(Condition.of(kwargs["method"]))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "run_condition", counting)
    assert compare.main(_args(tiny_model, out)) == 130
    assert not out.exists() and (tmp_path / "run.partial").is_dir()
    first = list(calls)
    calls.clear()
    monkeypatch.setattr(compare, "run_condition", lambda *a, **k: (calls.append(Condition.of(k["method"])),
                                                                    real(*a, **k))[1])
    assert compare.main(_args(tiny_model, out)) == 0
    assert first[:3] == [BASELINE, Condition("lofi", 0.5), Condition("lofi", 0.25)]
    assert calls == [Condition(m, k) for m in ("lvpruning", "fastv") for k in (0.5, 0.25)]
    calls.clear()
    assert compare.main(_args(tiny_model, out)) == 0 and calls == []  # complete: nothing recomputed


def test_retrained_weights_are_not_mistaken_for_the_finished_run(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "run"
    arguments = ["--methods", "lvpruning", "--keep", "0.5", "--model", str(model), "--limit", "3",
                 "--out", str(out), "--no-progress"]
    assert compare.main(arguments) == 0
    assert set(json.loads((out / "config.json").read_text())["weights"]) == {
        "model.safetensors", "lvpruning/decision_modules.safetensors"}
    assert compare.main(arguments) == 0  # unchanged weights: the finished run
    torch.manual_seed(1)
    loaded, _ = load_model(model)
    DecisionModules.for_model(loaded).save(model / "lvpruning")
    capsys.readouterr()
    assert compare.main(arguments) == 2
    assert "differs in: weights" in capsys.readouterr().err


def test_large_weights_are_fingerprinted_by_size_and_edges(tmp_path, monkeypatch):
    monkeypatch.setattr(runfolder, "FULL_HASH_LIMIT", 1024)
    monkeypatch.setattr(runfolder, "HASH_EDGE", 4096)
    weights = tmp_path / "model.safetensors"
    data = bytearray(range(256)) * 256  # 64 KiB
    weights.write_bytes(data)
    first = runfolder.weights_fingerprint(tmp_path, [])
    assert set(first) == {"model.safetensors"}
    data[len(data) // 2] ^= 1  # the middle is not read
    weights.write_bytes(data)
    assert runfolder.weights_fingerprint(tmp_path, []) == first
    data[-1] ^= 1
    weights.write_bytes(data)
    assert runfolder.weights_fingerprint(tmp_path, []) != first
    assert runfolder.weights_fingerprint(None, []) == {}  # a hub id that is not in the local cache


def test_the_same_seed_gives_identical_tables(tiny_model, run_folder, tmp_path):
    again = tmp_path / "again"
    assert compare.main(_args(tiny_model, again)) == 0
    for name in ("samples.parquet", "spectra.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(run_folder / name), pd.read_parquet(again / name))
    pd.testing.assert_frame_equal(pd.read_csv(run_folder / "summary.csv"), pd.read_csv(again / "summary.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(run_folder / "correlation.csv"),
                                  pd.read_csv(again / "correlation.csv"))


def test_report_rerenders_from_the_tables_alone(run_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_folder, copy)
    shutil.rmtree(copy / "figures")
    (copy / "report.html").unlink()
    assert report.main([str(copy)]) == 0
    assert (copy / "report.html").is_file() and (copy / "figures" / "ipr_per_layer.png").is_file()
    assert report.main([str(tmp_path / "nothing")]) == 2


def test_spectrum_layers_headline_decomposes_only_the_headline_layer(tiny_model, tmp_path):
    out = tmp_path / "headline"
    args = ["--methods", "fastv", "--keep", "0.5", "--model", str(tiny_model), "--limit", "3",
            "--batch-size", "3", "--out", str(out), "--no-progress", "--spectrum-layers", "headline"]
    assert compare.main(args) == 0
    spectra = pd.read_parquet(out / "spectra.parquet")
    last = spectra.layer.max()
    assert spectra[spectra.layer == last].effective_rank.notna().all()
    leverage = (spectra.group == "visual") & spectra.layer.isin([0, 2])  # decomposed for leverage maps
    assert spectra[(spectra.layer < last) & ~leverage].effective_rank.isna().all()
    assert spectra.ipr.notna().all() and (spectra.ipr > 0).all()
    assert json.loads((out / "config.json").read_text())["spectrum_layers"] == "headline"
    assert (out / "figures" / "singular_spectra.png").is_file()


def test_spectra_on_the_host_match_the_inline_run_and_keep_its_identity(tiny_model, run_folder, tmp_path,
                                                                         monkeypatch):
    from analysis.measure.host_spectra import HostSpectra
    submitted, submit = [], HostSpectra.submit
    monkeypatch.setattr(HostSpectra, "submit", lambda self, *a: submitted.append(1) or submit(self, *a))
    host = tmp_path / "host"
    assert compare.main(_args(tiny_model, host, "--spectra-on", "host")) == 0  # float64 on a thread
    assert submitted  # the spectra did go to the host
    pd.testing.assert_frame_equal(pd.read_parquet(run_folder / "samples.parquet"),
                                  pd.read_parquet(host / "samples.parquet"))
    inline, hosted = pd.read_parquet(run_folder / "spectra.parquet"), pd.read_parquet(host / "spectra.parquet")
    numeric, spectrum = ["ipr", "pr", "effective_rank", "delta_ipr"], ["singular_values"]
    pd.testing.assert_frame_equal(hosted.drop(columns=numeric + spectrum), inline.drop(columns=numeric + spectrum))
    exact = ["ipr", "pr", "delta_ipr"]  # need no decomposition; the entropy of a float32 spectrum moves more
    pd.testing.assert_frame_equal(hosted[exact], inline[exact], rtol=1e-4, atol=1e-6)
    # exp(entropy) of the normalised spectrum: float32 singular values near its noise floor move it by up to
    # ~0.2% against float64 (1.8798 vs 1.8774 measured on the tiny model's 16-token groups)
    pd.testing.assert_frame_equal(hosted[["effective_rank"]], inline[["effective_rank"]], rtol=3e-3)
    for a, b in zip(hosted.singular_values, inline.singular_values):
        assert len(a) == len(b) and np.allclose(a, b, rtol=1e-4, atol=1e-3 * max(b[0], 1))
    assert compare.main(_args(tiny_model, run_folder, "--spectra-on", "host")) == 0  # the finished run, as it is


def _split(tmp_path, edit, n=3):
    """A copy of the first ``n`` bundled test questions, passed through ``edit(rows)``."""
    from analysis.benchmark.datasets import BUNDLED_BENCHMARK
    rows = [json.loads(line) for line in (BUNDLED_BENCHMARK / "test.jsonl").open()][:n]
    (tmp_path / "images").mkdir(exist_ok=True)
    for r in rows:
        shutil.copy(BUNDLED_BENCHMARK / r["image"], tmp_path / r["image"])
    rows = edit(rows)
    split = tmp_path / "split.jsonl"
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return split


def _one_line_error(capsys, message):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("edit,message", [
    (lambda rows: rows + [rows[0]], "repeats question_id"),
    (lambda rows: [{**rows[0], "question": None}] + rows[1:], "has no question text"),
    (lambda rows: [{**rows[0], "question": "<image> " + rows[0]["question"]}] + rows[1:],
     "contains the image token '<image>'"),
])
def test_a_bad_question_fails_before_any_work(tiny_model, tmp_path, capsys, monkeypatch, edit, message):
    monkeypatch.setattr(compare, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "run"
    assert compare.main(_args(tiny_model, out, "--dataset", str(_split(tmp_path, edit)))) == 2
    _one_line_error(capsys, message)
    assert not out.exists() and not tmp_path.joinpath("run.partial").exists()


def test_a_missing_image_of_ones_own_split_names_its_paths_not_the_bundled_generator(tiny_model, tmp_path, capsys):
    split = _split(tmp_path, lambda rows: [{**rows[0], "image": "images/absent.png"}] + rows[1:])
    assert compare.main(_args(tiny_model, tmp_path / "run", "--dataset", str(split))) == 2
    err = _one_line_error(capsys, "absent.png")
    assert "analysis.shapes" not in err and "image paths" in err


def test_an_existing_folder_is_never_emptied(tiny_model, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    (thesis / "figs").mkdir(parents=True)
    (thesis / "chapter1.tex").write_text("\\chapter{One}")
    assert compare.main(_args(tiny_model, thesis)) == 2
    _one_line_error(capsys, "nothing was deleted")
    assert (thesis / "chapter1.tex").read_text() == "\\chapter{One}" and (thesis / "figs").is_dir()
    assert not tmp_path.joinpath("thesis.partial").exists()


@pytest.mark.parametrize("where,message", [("file", "is a file"), ("under-file", "cannot be written"),
                                           ("proc", "cannot be written")])
def test_an_unusable_out_fails_before_any_work(tiny_model, tmp_path, capsys, monkeypatch, where, message):
    monkeypatch.setattr(compare, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "notes.txt").write_text("keep me")
    out = {"file": tmp_path / "notes.txt", "under-file": tmp_path / "notes.txt" / "run",
           "proc": Path("/proc/lofi-run")}[where]
    assert compare.main(_args(tiny_model, out)) == 2
    _one_line_error(capsys, message)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob("*.partial"))


def test_a_model_that_is_not_a_supported_vlm_is_refused_before_loading(tmp_path, capsys):
    from transformers import GPT2Config
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt2)
    assert compare.main(_args(gpt2, tmp_path / "run")) == 2
    err = _one_line_error(capsys, "'gpt2' model, not a VLM lofi supports")
    assert "llava_next" in err and len(err) < 120 + len(str(gpt2))  # one line on a terminal, besides the path
    assert not list(tmp_path.glob("run*"))


def test_a_model_folder_without_a_processor_is_refused(tiny_model, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model / "config.json", bare / "config.json")
    assert compare.main(_args(bare, tmp_path / "run")) == 2
    _one_line_error(capsys, "has no usable processor")


def test_a_condition_missing_a_shard_is_recomputed(tiny_model, tmp_path, monkeypatch):
    """Only a condition with all of its shards is finished; the tables never hold a half condition."""
    out = tmp_path / "run"
    from analysis.study import report as report_module
    monkeypatch.setattr(report_module, "render", lambda folder: (_ for _ in ()).throw(KeyboardInterrupt))
    assert compare.main(_args(tiny_model, out)) == 130
    work = tmp_path / "run.partial"
    assert not out.exists() and len(list((work / "shards").glob("*.parquet"))) == 3 * 7  # nothing deleted
    for kind in ("spectra", "kept"):
        (work / "shards" / f"lofi__0.5__{kind}.parquet").unlink()
    monkeypatch.undo()
    calls = []
    real = runner.run_condition
    monkeypatch.setattr(compare, "run_condition", lambda *a, **k: (calls.append(Condition.of(k["method"])),
                                                                    real(*a, **k))[1])
    assert compare.main(_args(tiny_model, out)) == 0
    assert calls == [Condition("lofi", 0.5)]
    spectra = pd.read_parquet(out / "spectra.parquet")
    assert spectra.delta_ipr.notna().all()
    summary = pd.read_csv(out / "summary.csv")
    assert (summary.tokens_kept > 0).all()


def test_the_default_run_folder_is_one_folder_whatever_the_dataset_path(tmp_path):
    parsed = request.parse(["--methods", "lofi", "--dataset", str(tmp_path / "a" / "b" / "pope.json")])
    out = request.default_out(parsed, 10)
    assert out.parent.name == "reports" and "pope" in out.name and "/" not in out.name


def test_load_split_limit_zero_is_no_question():
    from analysis.benchmark.datasets import load_split
    assert load_split("test", limit=0) == [] and len(load_split("test", limit=2)) == 2


def test_the_plan_resolves_auto_and_the_config_holds_no_machine_path(tmp_path):
    """The request stays as parsed (``auto`` is resolved in the plan); the bundled model and split are
    recorded relative to the project, so a committed run folder names no folder of the machine it ran on."""
    from analysis import paths
    parsed = request.parse(["--methods", "fastv", "--keep", "0.5", "--limit", "2", "--out", str(tmp_path / "run"),
                            "--dataset", str(paths.BUNDLED_BENCHMARK / "test.jsonl")])
    checked = request.plan(parsed)
    assert parsed.spectrum_layers == "auto" and checked.spectrum_layers == "all" and checked.device == "cpu"
    assert checked.conditions == (BASELINE, Condition("fastv", 0.5))
    config = compare.run_config(checked)
    assert (config.model, config.dataset) == ("data/shapes-llava", "data/shapes/test.jsonl")
    assert str(paths.REPO_ROOT) not in json.dumps(config.as_dict())
    assert not (tmp_path / "run").exists()


def test_spectra_subset_auto_is_every_sample_on_the_cpu_and_a_tenth_on_a_gpu():
    assert request.spectra_share("auto", "cpu") == 1.0 and request.spectra_share("auto", "cuda") == 0.1
    assert request.spectra_share("all", "cuda") == 1.0 and request.spectra_share("0.25", "cpu") == 0.25
    assert request.parse(["--methods", "fastv"]).spectra_subset == "auto"


def test_a_spectra_subset_run_decomposes_the_same_samples_in_every_condition(tiny_model, run_folder, tmp_path):
    """--spectra-subset 0.25: the samples chosen by seed and id have the full run's spectra and leverage in every
    condition, the others none (has_spectrum False, effective rank NaN); IPR, PR and Delta IPR are every
    sample's, as in the full run; the report draws from the samples with spectra, and says so."""
    from analysis.measure.capture import in_subset
    out = tmp_path / "subset"
    args = ["--methods", "fastv", "--keep", "0.5", "--model", str(tiny_model), "--limit", "3", "--batch-size", "3",
            "--out", str(out), "--no-progress", "--spectra-subset", "0.25"]  # the full run's first batch
    assert compare.main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["spectra_share"] == 0.25 and json.loads((run_folder / "config.json").read_text())[
        "spectra_share"] == 1.0
    spectra = pd.read_parquet(out / "spectra.parquet")
    chosen = {i for i in spectra.sample_id.unique() if in_subset(i, 0.25, config["seed"])}
    assert 0 < len(chosen) < 3  # the ids split: both kinds of sample are checked
    assert (spectra.has_spectrum == spectra.sample_id.isin(chosen)).all()  # every layer (CPU), every condition
    assert spectra[~spectra.has_spectrum].effective_rank.isna().all()
    assert spectra[spectra.has_spectrum].effective_rank.notna().all()
    assert set(pd.read_parquet(out / "leverage.parquet").sample_id) == chosen
    keys = ["sample_id", "method", "keep", "layer", "group"]
    full = pd.read_parquet(run_folder / "spectra.parquet")
    assert full.has_spectrum.all()
    both = spectra.merge(full, on=keys, suffixes=("", "_full"))
    assert len(both) == len(spectra) and (both.n_tokens == both.n_tokens_full).all()
    for column in ("ipr", "pr"):  # from the spectrum in the full run, from the Gram matrix's norms here
        np.testing.assert_allclose(both[column], both[f"{column}_full"], rtol=1e-5)
    # a difference of two IPRs (<= 1) each within 1e-5 relative
    np.testing.assert_allclose(both.delta_ipr, both.delta_ipr_full, rtol=0, atol=2e-5)
    decomposed = both[both.has_spectrum]
    np.testing.assert_allclose(decomposed.effective_rank, decomposed.effective_rank_full, rtol=1e-3)
    page = (out / "report.html").read_text()
    assert "seeded 25% of the samples" in page and page.count("data:image/png;base64") == len(report.FIGURES)
    shown = json.loads((out / "thumbnails" / "index.json").read_text())
    assert shown and all(s["sample_id"] in chosen for s in shown[:len(chosen)])
    assert "differs in: spectra_share" in _refused(args[:-1] + ["all"])


def _refused(args) -> str:
    """The error line a run of ``args`` stops with."""
    with pytest.raises(request.UsageError) as refused:
        compare.run(request.parse(args))
    return str(refused.value)
