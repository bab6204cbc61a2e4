"""``python -m analysis.compare`` on other families: a LLaVA-NeXT folder (any-resolution tiles, newline
rows), the same model as a hub id in a local Hugging Face cache (offline), and Qwen2-VL through the
runner (its processor needs transformers' video processor, hence torchvision, for ``AutoProcessor``)."""

import json
import shutil

import pandas as pd
import pytest
import torch
from _families import save_folder

import lofi
from analysis.benchmark.datasets import load_split
from analysis.measure.capture import CaptureOptions
from analysis.study import compare, report
from analysis.study.runner import run_condition

ARGS = ["--methods", "lofi", "fastv", "random", "--keep", "0.5", "0.25", "--limit", "4", "--batch-size", "2",
        "--no-progress", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def next_folder(tmp_path_factory):
    return save_folder("llava_next", tmp_path_factory.mktemp("next") / "tiny-llava-next")


@pytest.fixture(scope="module")
def next_run(next_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "next"
    assert compare.main([*ARGS, "--model", str(next_folder), "--out", str(out)]) == 0
    return out


def test_a_llava_next_run_has_every_table_with_its_tiles(next_run):
    samples = pd.read_parquet(next_run / "samples.parquet")
    assert len(samples) == 4 * 6 and (samples.rel_flops < 1).all()
    kept = pd.read_parquet(next_run / "kept.parquet")
    tiles = json.loads(kept.tiles.iloc[0])
    assert [t["name"] for t in tiles] == ["base", "high-res"] and tiles[1]["newline"]
    newlines = tiles[1]["rows"]
    n_visual = int(kept.n_visual.iloc[0])
    prunable = n_visual - newlines
    half = samples[(samples.method == "lofi") & (samples.keep == 0.5)]
    assert (half.n_visual_kept == -(-prunable // 2) + newlines).all()  # newline rows stay
    spectra = pd.read_parquet(next_run / "spectra.parquet")
    assert spectra.ipr.notna().all() and (spectra[spectra.method == "baseline"].delta_ipr == 0).all()
    page = (next_run / "report.html").read_text()
    assert page.count("data:image/png;base64") == len(report.FIGURES)


def test_a_hub_id_in_the_local_cache_runs_offline(next_folder, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--lofi-test--tiny-next" / "snapshots" / "0123abcd"
    shutil.copytree(next_folder, snapshot)
    (cache / "models--lofi-test--tiny-next" / "refs").mkdir()
    (cache / "models--lofi-test--tiny-next" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    out = tmp_path / "run"
    assert compare.main([*ARGS[:2], "--keep", "0.5", "--limit", "2", "--no-progress", "--max-new-tokens",
                         "1", "--model", "lofi-test/tiny-next", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "lofi-test/tiny-next" and "model.safetensors" in config["weights"]


def test_a_hub_id_that_is_not_cached_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    assert compare.main([*ARGS, "--model", "nobody/absent-model", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not in the local Hugging Face cache" in err and len(err.splitlines()) == 1


def _qwen_processor(folder):
    """The saved Qwen2-VL processor without a video processor (transformers needs torchvision for one)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor
    processor = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    processor.tokenizer = AutoTokenizer.from_pretrained(folder)
    processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    processor.video_processor = None
    processor.chat_template = (folder / "chat_template.jinja").read_text()
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    processor.video_token_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    return processor


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_the_runner_measures_a_qwen_model(name, tmp_path):
    import transformers
    folder = save_folder(name, tmp_path / name)
    model_class = getattr(transformers, {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                                         "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[name])
    model = model_class.from_pretrained(folder, dtype=torch.float32).eval()
    processor = _qwen_processor(folder)
    samples = load_split("test", limit=3)
    common = dict(batch_size=3, max_new_tokens=2, capture=CaptureOptions(leverage_layers=(0, 2)), progress=False)
    unpruned = run_condition(model, processor, samples, method=None, baseline=None, **common)
    assert len(unpruned.spectra) == 3 * 5 * 2 and all(r.ipr > 0 for r in unpruned.spectra)
    pruned = run_condition(model, processor, samples, method=lofi.build("lofi", keep=0.5), baseline=unpruned.baseline,
                           **common)
    rows, kept = pruned.samples, pruned.kept
    grid = json.loads(rows[0].image)
    assert len(grid) == 3 and rows[0].n_visual == grid[0] * grid[1] * grid[2] // 4
    assert all(len(k.kept) == -(-r.n_visual // 2) for k, r in zip(kept, rows))
    assert all(r.kl >= 0 and r.forced_kl >= 0 for r in rows)
