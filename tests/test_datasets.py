"""Loading splits, and the errors a user sees when data is missing or broken."""

import json
import shutil

import pytest

from analysis.benchmark import datasets
from analysis.benchmark.datasets import DatasetError, load_split


def _copy_split(tmp_path, n=6):
    src = datasets.BUNDLED_BENCHMARK
    rows = [json.loads(line) for line in (src / "test.jsonl").open()][:n]
    (tmp_path / "images").mkdir()
    for r in rows:
        shutil.copy(src / r["image"], tmp_path / r["image"])
    path = tmp_path / "split.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_bundled_split_loads_with_families():
    samples = load_split("test", limit=10)
    assert len(samples) == 10
    assert samples[0].question_id == "test-00000-0"
    assert samples[0].load_image().size == (64, 64)


def test_a_path_to_a_jsonl_split_loads(tmp_path):
    path, rows = _copy_split(tmp_path)
    samples = load_split(path)
    assert [s.question_id for s in samples] == [r["question_id"] for r in rows]


def test_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="bundled split"):
        load_split(tmp_path / "nope.jsonl")


def test_missing_data_folder_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "BUNDLED_BENCHMARK", tmp_path / "gone")
    with pytest.raises(DatasetError, match="data/ from git"):
        load_split("test")


def test_missing_image_is_reported_before_anything_runs(tmp_path):
    path, rows = _copy_split(tmp_path)
    (tmp_path / rows[2]["image"]).unlink()
    with pytest.raises(DatasetError, match="missing"):
        load_split(path)


def test_corrupt_image_names_the_file(tmp_path):
    path, rows = _copy_split(tmp_path)
    (tmp_path / rows[0]["image"]).write_bytes(b"not a png")
    sample = load_split(path)[0]
    with pytest.raises(DatasetError, match="cannot be read"):
        sample.load_image()


def test_line_without_required_fields(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question_id": 1, "image": "x.png"}) + "\n")
    with pytest.raises(DatasetError, match=r"lacks the field\(s\) \['question', 'answer'\]"):
        load_split(path)


def test_llava_evaluation_format_with_answers_beside_it(tmp_path):
    path, rows = _copy_split(tmp_path, n=3)
    llava = tmp_path / "questions.jsonl"
    llava.write_text("".join(json.dumps({"question_id": r["question_id"], "image": r["image"],
                                         "text": r["question"], "category": r["family"]}) + "\n" for r in rows))
    (tmp_path / "questions_answers.jsonl").write_text(
        "".join(json.dumps({"question_id": r["question_id"], "answer": r["answer"]}) + "\n" for r in rows))
    samples = load_split(llava)
    assert [(s.question, s.answer, s.family) for s in samples] == [(r["question"], r["answer"], r["family"])
                                                                    for r in rows]


def test_pope_format(tmp_path):
    path, rows = _copy_split(tmp_path, n=3)
    pope = tmp_path / "pope.json"
    pope.write_text(json.dumps([{"question_id": i, "image": r["image"], "text": r["question"], "label": "no"}
                                for i, r in enumerate(rows)]))
    samples = load_split(pope)
    assert [s.answer for s in samples] == ["no"] * 3 and samples[1].question_id == "1"


def test_verify_images_catches_corruption_up_front(tmp_path):
    path, rows = _copy_split(tmp_path)
    (tmp_path / rows[3]["image"]).write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match="cannot be read"):
        datasets.verify_images(load_split(path))


@pytest.mark.parametrize("edit,message", [
    (lambda r: [1, 2], "is a JSON list, not an object"),
    (lambda r: {**r, "image": 5}, "the image is int 5, not a string"),
    (lambda r: {**r, "answer": 3}, "the answer is int 3, not a string"),
    (lambda r: {**r, "family": ["a"]}, "the family is list"),
    (lambda r: {**r, "question_id": True}, "question_id is bool"),
    (lambda r: {**r, "image": "../outside.png"}, "outside the split's folder"),
])
def test_a_field_of_the_wrong_type_names_the_line_and_the_fix(tmp_path, edit, message):
    path, rows = _copy_split(tmp_path, n=2)
    path.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], edit(rows[1])]))
    with pytest.raises(DatasetError) as error:
        load_split(path)
    assert f"{path}:2" in str(error.value) and message in str(error.value)


def test_images_outside_the_split_load_only_when_allowed(tmp_path):
    (tmp_path / "split").mkdir()
    path, rows = _copy_split(tmp_path / "split", n=1)
    shutil.copy(tmp_path / "split" / rows[0]["image"], tmp_path / "shared.png")
    path.write_text(json.dumps({**rows[0], "image": "../shared.png"}) + "\n")
    with pytest.raises(DatasetError, match="--allow-outside-images"):
        load_split(path)
    assert load_split(path, allow_outside_images=True)[0].image.resolve() == (tmp_path / "shared.png").resolve()


def test_verify_images_decodes_every_pixel(tmp_path):
    """A PNG whose checksums hold (verify() passes) but whose pixel data is no zlib stream."""
    import struct
    import zlib
    path, rows = _copy_split(tmp_path, n=1)
    image = tmp_path / rows[0]["image"]
    data, out, at = image.read_bytes(), [], 8
    while at < len(data):
        (length,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        body = b"\0" * length if kind == b"IDAT" else data[at + 8:at + 8 + length]
        out.append(struct.pack(">I", length) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
        at += 12 + length
    image.write_bytes(data[:8] + b"".join(out))
    with pytest.raises(DatasetError, match="cannot be read"):
        datasets.verify_images(load_split(path))


def test_the_content_fingerprint_follows_content_not_paths(tmp_path, monkeypatch):
    path, rows = _copy_split(tmp_path, n=3)
    samples = load_split(path)
    first = datasets.content_sha256(samples, datasets.verify_images(samples))
    monkeypatch.chdir(tmp_path)
    relative = load_split("split.jsonl")
    assert datasets.content_sha256(relative, datasets.verify_images(relative)) == first
    shutil.copy(datasets.BUNDLED_BENCHMARK / "images" / "test_00009.png", tmp_path / rows[0]["image"])
    assert datasets.content_sha256(samples, datasets.verify_images(samples)) != first
