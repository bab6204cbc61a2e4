"""The shapes benchmark: determinism, schema, ground truth, and train/test disjointness."""

import hashlib
import json

import numpy as np
import pytest

from analysis.benchmark import shapes
from analysis.benchmark.datasets import load_split
from analysis.benchmark.scene_config import FIRST
from analysis.bundled import recipe as bundled


def test_scene_is_a_pure_function_of_split_and_index():
    a, rng_a = shapes.scene("test", 17)
    b, rng_b = shapes.scene("test", 17)
    assert a == b
    assert shapes.render(a).tobytes() == shapes.render(b).tobytes()
    assert shapes.scene_questions(a, rng_a, 3) == shapes.scene_questions(b, rng_b, 3)
    assert shapes.scene("test", 18)[0] != a


def test_committed_splits_equal_a_fresh_generation(tmp_path):
    for split in ("test", "val"):
        shapes.write_split(tmp_path, split)
    fresh = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(bundled.BUNDLED_BENCHMARK).as_posix()
                       for p in bundled.BUNDLED_BENCHMARK.rglob("*") if p.is_file())
    assert fresh == committed and len(fresh) == 504  # 500 PNGs, 2 JSONL, 2 scene config records
    for name in fresh:  # byte for byte: the JSONL, every PNG and the records
        assert (tmp_path / name).read_bytes() == (bundled.BUNDLED_BENCHMARK / name).read_bytes(), name


def test_split_sizes_and_schema():
    rows = [json.loads(line) for line in (bundled.BUNDLED_BENCHMARK / "test.jsonl").open()]
    assert len(rows) >= 1000 and len({r["image"] for r in rows}) >= 300
    assert len({r["question_id"] for r in rows}) == len(rows)
    vocab = set(shapes.vocabulary())
    for r in rows:
        assert {"question_id", "image", "question", "answer", "family"} <= set(r)
        assert r["family"] in shapes.DEFAULT.families
        assert r["answer"] in vocab
        assert (bundled.BUNDLED_BENCHMARK / r["image"]).is_file()
    families = {r["family"] for r in rows}
    assert families == set(shapes.DEFAULT.families)
    val = load_split("val")
    assert len(val) >= 200


def test_scenes_cover_the_object_vocabulary():
    config = shapes.DEFAULT
    objects = [o for i in range(400) for o in shapes.scene("test", i)[0]]
    assert {o.shape for o in objects} == set(config.shapes) and len(config.shapes) >= 4
    assert {o.colour for o in objects} == set(config.colours) and len(config.colours) >= 6
    assert {o.size for o in objects} == set(config.sizes)
    counts = {len(shapes.scene("test", i)[0]) for i in range(400)}
    assert counts == set(range(config.min_objects, config.max_objects + 1)) and config.max_objects >= 8
    xs = [o.x for o in objects]
    assert max(xs) - min(xs) > config.image_size * 0.6


def _truth(objects, q: shapes.Question) -> str:
    """An independent reading of the answer from the scene description."""
    words = q.question.rstrip("?").lower().split()
    named = lambda c, s: [o for o in objects if o.colour == c and o.shape == s]  # noqa: E731
    if q.family == "existence":
        return "yes" if named(words[3], words[4]) else "no"
    if q.family == "colour":
        return next(o.colour for o in objects if o.shape == words[-1])
    if q.family == "shape":
        return next(o.shape for o in objects if o.colour == words[4])
    if q.family == "count":
        if words[2] == "objects":
            return str(len(objects))
        return str(sum(shapes.DEFAULT.shapes[o.shape] == words[2] for o in objects))
    if q.family == "position":  # "is the red circle on the left or on the right"
        o, middle = named(words[2], words[3])[0], shapes.DEFAULT.image_size / 2
        if words[-1] == "right":
            return "left" if o.x < middle else "right"
        return "top" if o.y < middle else "bottom"
    a, b = named(words[2], words[3])[0], named(words[-2], words[-1])[0]
    relation = " ".join(words[4:-3])
    holds = {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[relation]
    return "yes" if holds else "no"


def test_answers_are_the_ground_truth_of_the_scene():
    for r in load_split("test"):
        objects = [shapes.ShapeObject(**o) for o in r.extra["objects"]]
        q = shapes.Question(r.question, r.answer, r.family, r.extra["subtype"])
        assert _truth(objects, q) == r.answer, r


def test_pope_negatives_follow_their_definitions():
    rows = [r for r in load_split("test") if r.family == "existence" and r.answer == "no"]
    kinds = {r.extra["subtype"] for r in rows}
    assert kinds == {"random", "popular", "adversarial"}
    for r in rows:
        objects = r.extra["objects"]
        colour, shape = r.question.rstrip("?").lower().split()[3:5]
        if r.extra["subtype"] in ("popular", "adversarial"):
            assert shape in {o["shape"] for o in objects}
        if r.extra["subtype"] == "adversarial":
            assert colour in {o["colour"] for o in objects}


def test_two_way_answers_are_balanced():
    rows = load_split("test")
    for family, answer, other in (("existence", "yes", "no"), ("position", "left", "right"),
                                  ("position", "top", "bottom")):
        answers = [r.answer for r in rows if r.family == family and r.answer in (answer, other)]
        assert len(answers) > 100 and 0.4 < answers.count(answer) / len(answers) < 0.6


def test_no_test_image_of_two_or_more_objects_appears_in_the_training_stream():
    """One-object scenes are left out: there are only 64 cells x 24 (colour, shape) pairs = 1,536 of them,
    so the training stream draws every one again and again (as any training set of such scenes would)."""
    def digests(split, n):
        scenes = (shapes.scene(split, i)[0] for i in range(n))
        return {hashlib.sha1(shapes.render(o).tobytes()).hexdigest() for o in scenes if len(o) >= 2}
    test, val, train = digests("test", shapes.SPLIT_SIZES["test"]), digests("val", shapes.SPLIT_SIZES["val"]), \
        digests("train", 3000)
    assert len(train) > 2500
    assert not train & test and not train & val and not test & val
    # and the seed ranges themselves can never meet for any split size the generator allows
    seeds = sorted(shapes.SPLIT_SEEDS.values())
    assert all(b - a >= 1_000_000 for a, b in zip(seeds, seeds[1:]))


def test_unknown_split_and_family_name_the_valid_ones():
    with pytest.raises(ValueError, match="valid splits"):
        shapes.scene("training", 0)
    with pytest.raises(ValueError, match="valid families"):
        shapes.make_question([], "size", np.random.default_rng(0))


def test_patch_labels_of_a_hand_made_scene():
    red_circle = shapes.ShapeObject("circle", "red", "large", x=15, y=15)
    blue_squares = [shapes.ShapeObject("square", "blue", "small", x=60, y=60),
                    shapes.ShapeObject("square", "green", "small", x=60, y=12)]
    labels = shapes.patch_labels([red_circle, *blue_squares], grid=12, config=FIRST)  # 6 px cells of the first config
    cell = lambda x, y: (y // 6) * 12 + x // 6  # noqa: E731
    colours, shapes_ = list(FIRST.colours), list(FIRST.shapes)
    pair = lambda o: colours.index(o.colour) * len(shapes_) + shapes_.index(o.shape)  # noqa: E731
    assert labels["colour"][cell(15, 15)] == 1 + colours.index("red")
    assert labels["shape"][cell(15, 15)] == 1 + shapes_.index("circle")
    assert labels["colour"][cell(40, 40)] == 0 and labels["shape"][cell(40, 40)] == 0  # background
    assert labels["centre"].sum() == 3 and labels["centre"][cell(60, 60)] == 1
    # background patches are labelled with the object nearest to them
    assert labels["pair"][cell(3, 3)] == pair(red_circle)
    assert labels["pair"][cell(69, 69)] == pair(blue_squares[0])
    assert labels["near_row"][cell(69, 69)] == 10 and labels["near_col"][cell(69, 69)] == 10
    assert labels["shape_count"][cell(69, 69)] == 1 and labels["shape_count"][cell(3, 3)] == 0
    assert (labels["count"] == 2).all()
    assert labels["row"][cell(69, 3)] == 0 and labels["col"][cell(69, 3)] == 11
