"""A model trained on a non-default scene config: training takes the config (options or a record), the model
folder records it, evaluation uses its blank image and refuses a split of another config, continuing refuses
another config, and the card states it."""

import json
import re
import shlex
from dataclasses import replace

import pytest

from analysis.benchmark import datasets, shapes
from analysis.benchmark.scene_config import DEFAULT, FIRST, SceneConfig
from analysis.bundled import train as train_bundled
from analysis.study import evaluate, models
from analysis.study.request import UsageError, parse, plan

# smaller images than the bundled benchmark's, with their own object sizes, more objects and another background
SMALL = SceneConfig(image_size=48, sizes={"small": 7, "large": 11}, max_objects=8, background=(250, 245, 230))
TINY_OPTIONS = ["--steps", "2", "--batch-size", "2", "--turns", "2", "--vision-warmup", "0", "--curriculum", "0",
                "--text-width", "32", "--text-heads", "2", "--text-layers", "2", "--no-progress"]


TINY = {"text_layers": 2, "text_width": 32, "text_heads": 2, "text_kv_heads": 2, "vision_layers": 1, "vision_width": 32}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(model folder, split of SMALL): a tiny model, two training steps on SMALL's scenes, val accuracy
    measured at step 2."""
    root = tmp_path_factory.mktemp("small")
    split = shapes.write_split(root / "shapes", "val", n_images=4, config=SMALL)
    out = root / "model"
    train_bundled.train(out, steps=2, batch_size=2, turns=2, eval_every=2, curriculum=0, config_overrides=TINY,
                        scene=SMALL, image_norm="background", progress=False)
    return out, split


def test_a_run_on_another_scene_config_records_it_and_answers_a_split_of_it(small):
    out, split = small
    assert models.scene_config(out) == SMALL
    assert json.loads((out / models.SCENE_RECORD).read_text())["scene"] == SMALL.to_dict()
    summary = train_bundled.TrainingSummary.from_dict(json.loads((out / "training_summary.json").read_text()))
    assert summary.scene_config() == SMALL and summary.curriculum_start == SMALL.min_objects
    log = [json.loads(line) for line in (out / "training_log.jsonl").open()]
    assert set(log[-1]["val_families"]) == set(SMALL.families)  # measured on a val split of SMALL
    model, processor = evaluate.load_model(out)
    assert model.config.vision_config.image_size == 48
    assert list(processor.image_processor.image_mean) == [c / 255 for c in SMALL.background]
    assert processor.tokenizer.convert_tokens_to_ids("8") != processor.tokenizer.unk_token_id
    samples = datasets.load_split(split)
    assert evaluate.evaluation_scene(out, split) == SMALL
    assert len(evaluate.answer(model, processor, samples, progress=False, scene=SMALL)) == len(samples) == 12


def test_evaluation_and_the_card_use_the_blank_image_of_the_models_scene_config(small, monkeypatch, capsys):
    from analysis.bundled import card
    out, split = small
    seen = []

    def spy(processor, samples, blank=False, scene=DEFAULT):
        inputs = models.batch_inputs(processor, samples, blank, scene)
        seen.append((blank, inputs["pixel_values"]))
        return inputs

    monkeypatch.setattr(evaluate, "batch_inputs", spy)
    assert evaluate.main(["--model", str(out), "--dataset", str(split), "--limit", "3"]) == 0
    text = card.write_card(out, split).read_text()
    blanks = [pixels for blank, pixels in seen if blank]
    assert len(blanks) == 2 and len(seen) == 4
    for pixels in blanks:  # SMALL's background, normalised around itself: zeros, at SMALL's size
        assert pixels.shape[-2:] == (48, 48) and pixels.abs().max() < 1e-5
    assert "48x48 px images on an RGB (250, 245, 230) background, 1 to 8 objects per scene" in text
    assert "bounding boxes small 7 px, large 11 px" in text and "This is not the default config" in text
    assert "--scene-config data/shapes-llava/scene_config.json" in text


def test_a_split_of_another_scene_config_is_refused_in_one_line(small, tmp_path, capsys):
    from analysis.study import compare
    out, split = small
    with pytest.raises(UsageError) as error:
        plan(parse(["--methods", "fastv", "--model", str(out), "--dataset", "test", "--out", str(tmp_path / "r")]))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"dataset test was generated with another scene config than "
                                                      f"model {out} was trained on (image_size 64 vs 48; sizes")
    assert f"python -m analysis.shapes --scene-config {out / models.SCENE_RECORD} --out FOLDER" in message
    assert compare.main(["--methods", "fastv", "--model", str(out), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == f"error: {message}\n" and not (tmp_path / "r").exists()
    assert evaluate.main(["--model", str(out), "--dataset", "val"]) == 2
    assert capsys.readouterr().err.startswith("error: dataset val was generated with another scene config")
    # only where both record theirs: a model without a record predates it, and was trained on the first config
    (tmp_path / "unrecorded-model").mkdir()
    assert evaluate.evaluation_scene(tmp_path / "unrecorded-model", split) == FIRST
    assert evaluate.evaluation_scene(models.paths.BUNDLED_MODEL, "test") == DEFAULT
    unrecorded = shapes.write_split(tmp_path / "plain", "test", n_images=1)
    shapes.config_record_path(unrecorded).unlink()
    assert evaluate.evaluation_scene(out, unrecorded) == SMALL


def test_a_continued_run_refuses_another_scene_config(small, tmp_path, capsys):
    out, _ = small
    with pytest.raises(train_bundled.TrainingConfigError) as error:
        train_bundled.train(tmp_path / "b", steps=1, batch_size=2, turns=1, eval_every=0, init_from=out,
                            progress=False)
    assert "\n" not in str(error.value) and str(error.value).startswith(
        f"--init-from {out} was trained on another scene config (image_size 48 vs 64; sizes")
    assert train_bundled.main(["--out", str(tmp_path / "b"), "--init-from", str(out), *TINY_OPTIONS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--scene-config {out / models.SCENE_RECORD}" in err
    assert not any(tmp_path.iterdir())  # refused before anything was written
    again = train_bundled.train(tmp_path / "c", steps=1, batch_size=2, turns=1, eval_every=0, init_from=out,
                                scene=SMALL, progress=False)
    assert again.scene_config() == SMALL and models.scene_config(tmp_path / "c") == SMALL


def test_a_vision_size_or_curriculum_that_does_not_fit_the_scene_is_refused(tmp_path):
    for settings, fix in (
            ({"config_overrides": {"image_size": 24}},
             "the vision tower's image_size 24 px differs from the scene config's 64 px images; leave image_size out"),
            ({"config_overrides": {"patch_size": 7}}, "the scene config's 64 px images are not a whole number of 7 px"),
            ({"curriculum_start": 9}, "--curriculum-start 9 is outside the scene config's object range 1..8")):
        with pytest.raises(train_bundled.TrainingConfigError, match="^" + re.escape(fix)):
            train_bundled.train(tmp_path / "x", steps=1, progress=False, **settings)
    assert not any(tmp_path.iterdir())


def test_the_scene_options_are_the_benchmark_commands_and_the_card_command_reads_back(monkeypatch, tmp_path,
                                                                                      capsys):
    from analysis.bundled import card
    captured = {}
    done = train_bundled.TrainingSummary(steps=1, batch_size=1, turns=1, lr=1e-3, seed=0)
    monkeypatch.setattr(train_bundled, "train", lambda out, config, **kwargs: captured.update(vars(config)) or done)
    options = ["--image-size", "48", "--sizes", "small=7,large=11", "--max-objects", "6", "--grid", "0"]
    train_bundled.main(options)
    expected = replace(DEFAULT, image_size=48, sizes={"small": 7, "large": 11}, max_objects=6, grid=0)
    assert captured["scene"] == expected and captured["curriculum_start"] is None
    assert shapes.scene_arguments(expected) == ["--image-size 48", "--sizes small=7,large=11", "--max-objects 6",
                                                "--grid 0"]
    summary = train_bundled.TrainingSummary(steps=2, batch_size=2, turns=2, lr=1e-3, seed=0, scene=expected.to_dict())
    captured.clear()
    train_bundled.main(shlex.split(card.command(summary))[3:])
    assert captured["scene"] == expected and captured["steps"] == 2
    assert train_bundled.main(["--scene-config", str(tmp_path / "x.json"), "--image-size", "48"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--image-size both set the scene: give the record or the options" in err
    shapes.main(["--out", str(tmp_path / "small"), "--splits", "val", *options])  # the same options, the same config
    assert shapes.read_split_config(tmp_path / "small" / "val.jsonl") == expected
    record = shapes.config_record_path(tmp_path / "small" / "val.jsonl")
    captured.clear()
    train_bundled.main(["--scene-config", str(record)])
    assert captured["scene"] == expected
    assert train_bundled.main(["--scene-config", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'missing.json'} is not a scene config record")
