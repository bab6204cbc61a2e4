"""Scene configs of the shapes benchmark: a non-default config generates, renders, labels, words and records
its scenes within its own bounds; a config that cannot generate a valid scene is refused in one line."""

import json
from dataclasses import replace

import numpy as np
import pytest

from analysis import paths
from analysis.benchmark import datasets, shapes
from analysis.benchmark.scene_config import DEFAULT, FIRST, FIRST_FAMILIES, QUESTION_FAMILIES, SceneConfig
from analysis.bundled import recipe as bundled

# a harder benchmark than the bundled one: a larger image, smaller objects and more of them
DENSE = SceneConfig(image_size=96, sizes={"small": 7, "large": 11}, min_objects=4, max_objects=10)


def test_the_default_config_is_the_bundled_benchmarks():
    assert (DEFAULT.image_size, DEFAULT.grid, DEFAULT.cell, DEFAULT.sizes) == (64, 8, 8, {"small": 7})
    assert (DEFAULT.min_objects, DEFAULT.max_objects, DEFAULT.min_separation) == (1, 8, 16)
    assert DEFAULT.families == ("existence", "colour", "shape", "count", "position")
    assert set(QUESTION_FAMILIES) == set(shapes._MAKERS)
    # the first bundled benchmark: the dataclass defaults, what a record without the newer fields reads as
    assert FIRST == SceneConfig() and hash(FIRST) == hash(SceneConfig()) and FIRST != DEFAULT
    assert (FIRST.image_size, FIRST.grid, FIRST.sizes, FIRST.max_objects) == (72, 0, {"small": 11, "large": 19}, 6)
    assert FIRST.families == FIRST_FAMILIES == QUESTION_FAMILIES[:5]
    assert datasets.scene_config("test") == datasets.scene_config("val") == DEFAULT


def test_a_dense_config_generates_scenes_within_its_bounds():
    counts = set()
    for index in range(300):
        objects, _ = shapes.scene("test", index, DENSE)
        counts.add(len(objects))
        assert len({(o.colour, o.shape) for o in objects}) == len(objects)
        for o in objects:
            half = DENSE.sizes[o.size] // 2
            assert half + 1 <= o.x < DENSE.image_size - half - 1 and half + 1 <= o.y < DENSE.image_size - half - 1
        for a in objects:  # no two boxes touch
            for b in objects:
                reach = DENSE.sizes[a.size] // 2 + DENSE.sizes[b.size] // 2 + DENSE.object_gap
                assert a is b or abs(a.x - b.x) > reach or abs(a.y - b.y) > reach
    assert counts == set(range(4, 11))
    assert {o.size for i in range(50) for o in shapes.scene("test", i, DENSE)[0]} == {"small", "large"}


def test_a_dense_config_renders_and_labels_at_its_size():
    objects, _ = shapes.scene("test", 3, DENSE)
    image = np.asarray(shapes.render(objects, DENSE))
    assert image.shape == (96, 96, 3)
    for o in objects:  # every object's centre shows its colour
        assert tuple(image[o.y, o.x]) == DENSE.colours[o.colour]
    assert np.asarray(shapes.blank_image(DENSE)).shape == (96, 96, 3)
    for grid in (12, 16):
        labels = shapes.patch_labels(objects, grid, DENSE)
        assert all(v.shape == (grid * grid,) for v in labels.values())
        cell = 96 // grid
        assert labels["centre"].sum() == len({(o.y // cell, o.x // cell) for o in objects})
        assert (labels["count"] == len(objects) - 1).all() and labels["col"].max() == grid - 1
        assert set(labels["colour"][labels["colour"] > 0]) <= {1 + list(DENSE.colours).index(o.colour)
                                                               for o in objects}
    with pytest.raises(ValueError, match="divides 96"):
        shapes.patch_labels(objects, 10, DENSE)


def test_a_dense_config_words_its_questions_and_tokenizer():
    vocab = set(shapes.vocabulary(DENSE))
    assert {*DENSE.colours, *DENSE.shapes, *DENSE.shapes.values(), "10"} <= vocab
    answers = set()
    for index in range(200):
        objects, rng = shapes.scene("val", index, DENSE)
        for q in shapes.scene_questions(objects, rng, 5, first_family=index % 5, config=DENSE):
            assert q.answer in vocab and set(q.question.lower().rstrip("?").split()) <= vocab
            answers.add(q.answer)
    assert "10" in answers  # ten objects: a count answer the default vocabulary lacks
    assert "10" not in shapes.vocabulary()
    tokenizer = bundled.build_tokenizer(DENSE)
    assert tokenizer.unk_token_id not in tokenizer("how many objects are there ? 10")["input_ids"]


def test_a_dense_config_feeds_the_training_batches_and_heads():
    from analysis.bundled.batches import ConversationBatches, curriculum_max_objects
    from analysis.bundled.train import PatchHeads
    processor = bundled.build_processor(patch_size=8, normalisation="background", scene=DENSE)
    batches = ConversationBatches(processor, 144, batch_size=3, turns=2, patch_targets=True, scene=DENSE)
    batch = next(batches)
    assert batch["pixel_values"].shape == (3, 3, 96, 96)
    assert batch["patch_targets"]["colour"].shape == (3, 144)
    assert 3 <= int(batch["patch_targets"]["count"].min()) and int(batch["patch_targets"]["count"].max()) <= 9
    blank = processor.image_processor([shapes.blank_image(DENSE)], return_tensors="pt")["pixel_values"]
    assert blank.abs().max() < 1e-5  # centred on this config's background
    assert curriculum_max_objects(0, 100, config=DENSE) == 4 and curriculum_max_objects(100, 100, config=DENSE) == 10
    heads = PatchHeads(32, 12, nearest=True, scene=DENSE)
    assert heads.heads["count"].out_features == 10 and heads.heads["pair"].out_features == 24


def test_a_split_records_its_config_and_reads_it_back(tmp_path):
    path = shapes.write_split(tmp_path, "val", n_images=6, config=DENSE)
    record = json.loads(shapes.config_record_path(path).read_text())
    assert record["images"] == 6 and record["questions_per_image"] == shapes.QUESTIONS_PER_IMAGE
    assert shapes.read_split_config(path) == DENSE and datasets.scene_config(path) == DENSE
    samples = datasets.load_split(path)
    assert len(samples) == 18 and samples[0].load_image().size == (96, 96)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "val.jsonl", "val.scene.json"]  # no .tmp left


def test_a_split_without_a_record_has_no_config_and_a_broken_record_is_named(tmp_path):
    path = shapes.write_split(tmp_path, "val", n_images=1)
    shapes.config_record_path(path).unlink()
    assert datasets.scene_config(path) is None
    shapes.config_record_path(path).write_text('{"scene": {"image_size": 72, "colour": {}}}')
    with pytest.raises(datasets.DatasetError, match=r"val\.scene\.json is not a scene config record .*'colour'"):
        datasets.scene_config(path)


def test_a_config_survives_json_and_its_order_counts():
    assert SceneConfig.from_dict(json.loads(json.dumps(DENSE.to_dict()))) == DENSE
    reordered = SceneConfig(colours=dict(reversed(list(DEFAULT.colours.items()))))
    assert reordered != DEFAULT  # the order numbers the colour labels
    asking = SceneConfig(families=("count", "spatial"))
    objects, rng = shapes.scene("test", 5, asking)
    assert {q.family for q in shapes.scene_questions(objects, rng, 2, config=asking)} <= {"count", "spatial"}
    with pytest.raises(ValueError, match=r"valid families: \['count', 'spatial'\]"):
        shapes.make_question(objects, "existence", rng, asking)


@pytest.mark.parametrize("settings, fix", [
    ({"min_objects": 7, "max_objects": 3}, r"need 1 <= min_objects <= max_objects <= 24"),
    ({"max_objects": 25}, r"max_objects <= 24 \(objects have distinct colour-shape pairs"),
    ({"sizes": {"small": 11, "huge": 80}}, r"object size 'huge' = 80 px does not fit a 72 px image.*1 to 69 px"),
    ({"image_size": 20}, r"object size 'large' = 19 px does not fit a 20 px image"),
    ({"sizes": {}}, r"at least one object size"),
    ({"colours": {}}, r"colour vocabulary is empty; give at least one colour"),
    ({"shapes": {}}, r"shape vocabulary is empty; give at least one shape"),
    ({"shapes": {"star": "stars"}}, r"cannot draw shape\(s\) \['star'\]; valid shapes: \['circle'"),
    ({"colours": {"Dark red": (1, 2, 3)}}, r"single lower-case words"),
    ({"colours": {"red": (300, 0, 0)}}, r"RGB triple of integers 0-255"),
    ({"background": (220, 40, 40)}, r"equals an object colour"),
    ({"families": ("existence", "size")}, r"give distinct families of \['existence'"),
    ({"families": ()}, r"give distinct families"),
    ({"min_separation": 0}, r"min_separation must be >= 1 px"),
    ({"image_size": 72.0}, r"image_size must be an integer"),
])
def test_a_bad_config_is_refused_in_one_line(settings, fix):
    with pytest.raises(ValueError, match=fix) as error:
        SceneConfig(**settings)
    assert "\n" not in str(error.value)


def test_unknown_fields_and_a_crowded_config_are_refused():
    with pytest.raises(ValueError, match=r"unknown scene config field\(s\) \['colour'\]; valid fields: \['image_size'"):
        SceneConfig.from_dict({"colour": {}})
    crowded = SceneConfig(image_size=24, sizes={"large": 19}, min_objects=3, max_objects=3)
    with pytest.raises(ValueError, match="only 1 of 3 objects found a free place in a 24 px image"):
        shapes.scene("test", 0, crowded)


def test_the_command_writes_a_split_of_its_options_and_refuses_a_bad_one(tmp_path, capsys):
    assert shapes._parser().parse_args([]).out == paths.BUNDLED_BENCHMARK
    assert shapes.main(["--out", str(tmp_path / "dense"), "--splits", "val", "--image-size", "96",
                        "--sizes", "small=7,large=11", "--min-objects", "4", "--max-objects", "10"]) == 0
    # the options change the default config's fields (its grid, families and separation stay)
    assert datasets.scene_config(tmp_path / "dense" / "val.jsonl") == replace(
        DEFAULT, image_size=96, sizes=DENSE.sizes, min_objects=4, max_objects=10)
    assert shapes.main(["--out", str(tmp_path / "bad"), "--min-objects", "7", "--max-objects", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: object count range 7..3 is invalid")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as exit_:
        shapes.main(["--sizes", "small=eleven"])
    assert exit_.value.code == 2 and "write name=pixels" in capsys.readouterr().err


GRID = SceneConfig(image_size=96, grid=12, sizes={"small": 7}, min_objects=2, max_objects=8, min_separation=16)


def test_on_a_grid_every_object_is_centred_in_its_own_cell_and_covers_exactly_that_patch():
    counts = set()
    for index in range(200):
        objects, _ = shapes.scene("test", index, GRID)
        counts.add(len(objects))
        cells = {(o.x // 8, o.y // 8) for o in objects}
        assert len(cells) == len(objects) and all(o.x % 8 == 4 and o.y % 8 == 4 for o in objects)
        labels = shapes.patch_labels(objects, 12, GRID)
        # one patch per object: the object's own cell, with the object's colour and shape, and no other
        assert (labels["colour"] > 0).sum() == len(objects) == labels["centre"].sum()
        for o in objects:
            patch = (o.y // 8) * 12 + o.x // 8
            assert labels["colour"][patch] == 1 + list(GRID.colours).index(o.colour)
            assert labels["shape"][patch] == 1 + list(GRID.shapes).index(o.shape)
    assert counts == set(range(2, 9))
    image = np.asarray(shapes.render(shapes.scene("test", 0, GRID)[0], GRID))
    background = (image == GRID.background).all(-1)
    assert background[::8].all() and background[:, ::8].all()  # every cell's first row and column stay empty


def test_a_grid_config_round_trips_and_an_older_record_reads_as_no_grid():
    assert SceneConfig.from_dict(GRID.to_dict()) == GRID and GRID.cell == 8
    assert GRID != replace(GRID, grid=0)
    older = DEFAULT.to_dict()
    older.pop("grid")
    assert SceneConfig.from_dict(older).grid == 0


@pytest.mark.parametrize("settings, fix", [
    ({"grid": 10}, r"grid 10 does not cut a 96 px image into whole cells: give 0 \(no grid\) or a divisor of 96"),
    ({"grid": 12, "sizes": {"small": 9}}, r"object size\(s\) \{'small': 9\} do not fit a 8 px grid cell"),
    ({"grid": 2, "sizes": {"small": 7}, "max_objects": 5}, r"max_objects <= 4 .*one object per cell of the 2 x 2 grid"),
    ({"grid": -1}, r"grid -1 does not cut"),
])
def test_a_bad_grid_is_refused_in_one_line(settings, fix):
    with pytest.raises(ValueError, match=fix) as error:
        SceneConfig(**{"image_size": 96, **settings})
    assert "\n" not in str(error.value)


def test_position_questions_ask_which_half_an_object_lies_in_away_from_the_middle():
    config = replace(GRID, families=("existence", "position"))
    assert {"on", "or", "at", "top", "bottom"} <= set(shapes.vocabulary(config))
    assert "top" not in shapes.vocabulary(GRID)  # only configs that ask them have their words
    asked = set()
    for index in range(150):
        objects, rng = shapes.scene("test", index, config)
        question = shapes.make_question(objects, "position", rng, config)
        if question is None:
            assert all(abs(o.x - 48) < 8 and abs(o.y - 48) < 8 for o in objects)
            continue
        o = next(o for o in objects if f"the {o.name} " in question.question)
        if question.subtype == "horizontal":
            assert question.question == f"Is the {o.name} on the left or on the right?"
            assert abs(o.x - 48) >= 8 and question.answer == ("left" if o.x < 48 else "right")
        else:
            assert question.question == f"Is the {o.name} at the top or at the bottom?"
            assert abs(o.y - 48) >= 8 and question.answer == ("top" if o.y < 48 else "bottom")
        asked.add(question.answer)
    assert asked == {"left", "right", "top", "bottom"}


def test_describe_lists_a_grid_scene_in_reading_order_and_other_scenes_left_to_right():
    objects = [shapes.ShapeObject("circle", "red", "small", 84, 4),
               shapes.ShapeObject("square", "blue", "small", 4, 12),
               shapes.ShapeObject("cross", "green", "small", 12, 4)]
    assert shapes.describe(objects, GRID).answer == "green cross red circle blue square"
    assert shapes.describe(objects, FIRST).answer == "blue square green cross red circle"
