"""Benchmark splits: one loader for the JSONL format of SPEC section 7.

A split is a JSONL file, one question a line, with the fields ``question_id, image, question, answer,
family`` (``image`` relative to the JSONL file). This module owns reading it into ``Sample`` records
and failing early, with a message that names the fix, when the folder, file or an image is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from analysis.bundled import BUNDLED_BENCHMARK

REQUIRED_FIELDS = ("question_id", "image", "question", "answer")


class DatasetError(ValueError):
    """A benchmark split that cannot be read; the message says what to do."""


@dataclass(frozen=True)
class Sample:
    question_id: str
    image: Path
    question: str
    answer: str | None
    family: str = "unknown"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def load_image(self) -> Image.Image:
        try:
            with Image.open(self.image) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise DatasetError(f"image {self.image} of question {self.question_id} is missing; "
                               f"regenerate the bundled split with `python -m analysis.shapes`") from None
        except OSError as e:
            raise DatasetError(f"image {self.image} of question {self.question_id} cannot be read "
                               f"({e}); replace or remove it") from None


def resolve_split(name_or_path: str | Path) -> Path:
    """``test`` / ``val`` name the bundled splits; anything else is a path to a JSONL file."""
    if str(name_or_path) in ("test", "val", "shapes", "shapes-test", "shapes-val"):
        split = {"shapes": "test", "shapes-test": "test", "shapes-val": "val"}.get(str(name_or_path),
                                                                                  str(name_or_path))
        path = BUNDLED_BENCHMARK / f"{split}.jsonl"
        if not BUNDLED_BENCHMARK.is_dir():
            raise DatasetError(f"the bundled benchmark folder {BUNDLED_BENCHMARK} is missing; "
                               "restore data/ from git or run `python -m analysis.shapes`")
    else:
        path = Path(name_or_path)
    if not path.is_file():
        raise DatasetError(f"dataset {str(name_or_path)!r} not found: give a bundled split "
                           "(test, val) or the path of a JSONL split")
    return path


def load_split(name_or_path: str | Path, limit: int | None = None, check_images: bool = True
               ) -> list[Sample]:
    """Read a split; with ``check_images`` every referenced image must exist before anything runs."""
    path = resolve_split(name_or_path)
    samples: list[Sample] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno} is not valid JSON ({e})") from None
            missing = [k for k in REQUIRED_FIELDS if k not in row]
            if missing:
                raise DatasetError(f"{path}:{lineno} lacks the field(s) {missing}; a split line needs "
                                   f"{list(REQUIRED_FIELDS)} (SPEC section 7)")
            rest = {k: v for k, v in row.items() if k not in (*REQUIRED_FIELDS, "family")}
            samples.append(Sample(str(row["question_id"]), path.parent / row["image"], row["question"],
                                  None if row["answer"] is None else str(row["answer"]),
                                  row.get("family", "unknown"), rest))
            if limit is not None and len(samples) >= limit:
                break
    if check_images:
        absent = [s for s in samples if not s.image.is_file()]
        if absent:
            raise DatasetError(f"{len(absent)} image(s) of {path} are missing, first {absent[0].image}; "
                               "regenerate the bundled split with `python -m analysis.shapes`")
    return samples
