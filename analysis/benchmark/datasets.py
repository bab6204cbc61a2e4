"""Benchmark splits: one loader for the JSONL format of docs/definitions.md#splits.

A split is a JSONL file, one question a line, with the fields ``question_id, image, question, answer,
family`` (``image`` relative to the JSONL file). This module owns reading it into ``Sample`` records
and failing early, with a message that names the fix, when the folder, file or an image is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from analysis.paths import BUNDLED_BENCHMARK

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
                               f"{_restore_hint(self.image)}") from None
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


def _rows(path: Path):
    """(line number, record) of a JSONL file, or of a JSON list."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            yield from enumerate(json.loads(text), 1)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path} is not valid JSON ({e})") from None
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno} is not valid JSON ({e})") from None


def _answers_file(path: Path, answers: Path | None) -> dict[str, str]:
    """Ground truth of the LLaVA evaluation format, kept in a separate file keyed by question_id."""
    candidates = [answers] if answers else [path.with_name(path.stem + "_answers.jsonl"),
                                            path.with_name("answers.jsonl")]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            out = {}
            for _, row in _rows(candidate):
                value = row.get("answer", row.get("text", row.get("label")))
                out[str(row["question_id"])] = None if value is None else str(value)
            return out
    if answers:
        raise DatasetError(f"answers file {answers} not found")
    return {}


def _parse(row: dict, path: Path, lineno: int, image_root: Path, gold: dict) -> Sample:
    """One record in any of the three formats (docs/definitions.md#splits; LLaVA evaluation; POPE)."""
    if "question" in row and "answer" in row:            # docs/definitions.md#splits
        question, answer = row["question"], row["answer"]
        family = row.get("family", "unknown")
    elif "text" in row and "label" in row:               # POPE: {question_id, image, text, label}
        question, answer = row["text"], row["label"]
        family = row.get("category", "pope")
    elif "text" in row:                                   # LLaVA eval: answers in a separate file
        question, answer = row["text"], gold.get(str(row.get("question_id")))
        family = row.get("category", "unknown")
    else:
        raise DatasetError(f"{path}:{lineno} lacks the field(s) ['question', 'answer']; a split line needs "
                           f"{list(REQUIRED_FIELDS)} (docs/definitions.md#splits), or question_id/image/text (LLaVA "
                           "evaluation format) or question_id/image/text/label (POPE)")
    missing = [k for k in ("question_id", "image") if k not in row]
    if missing:
        raise DatasetError(f"{path}:{lineno} lacks the field(s) {missing}")
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{path}:{lineno}: question {row.get('question_id')!r} has no question text "
                           f"(got {question!r}); every line needs a non-empty string")
    known = {"question_id", "image", "question", "answer", "family", "text", "label", "category"}
    extra = {k: v for k, v in row.items() if k not in known}
    return Sample(str(row["question_id"]), image_root / row["image"], question,
                  None if answer is None else str(answer), family, extra)


def load_split(name_or_path: str | Path, limit: int | None = None, check_images: bool = True,
               image_folder: str | Path | None = None, answers: str | Path | None = None) -> list[Sample]:
    """Read a split; with ``check_images`` every referenced image must exist before anything runs.

    ``limit``: the first ``limit`` questions (0: none; None: all). Question ids must be unique and every
    question a non-empty string; anything else is a ``DatasetError`` naming the line.

    Accepts the JSONL of docs/definitions.md#splits, the LLaVA evaluation format (``question_id, image, text``;
    answers from ``answers`` or ``<name>_answers.jsonl`` / ``answers.jsonl`` beside it) and POPE's
    (``question_id, image, text, label``). Images are relative to ``image_folder`` (default: the
    file's folder).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None (the whole split) or an int >= 0, got {limit!r}")
    path = resolve_split(name_or_path)
    image_root = Path(image_folder) if image_folder else path.parent
    samples: list[Sample] = []
    gold: dict | None = None
    first_line: dict[str, int] = {}
    for lineno, row in _rows(path):
        if limit is not None and len(samples) >= limit:
            break
        if gold is None:
            gold = _answers_file(path, Path(answers) if answers else None) if (
                "text" in row and "label" not in row) else {}
        sample = _parse(row, path, lineno, image_root, gold)
        if sample.question_id in first_line:
            raise DatasetError(f"{path}:{lineno} repeats question_id {sample.question_id!r} (first on line "
                               f"{first_line[sample.question_id]}); question ids must be unique")
        first_line[sample.question_id] = lineno
        samples.append(sample)
    if check_images:
        absent = [s for s in samples if not s.image.is_file()]
        if absent:
            raise DatasetError(f"{len(absent)} image(s) of {path} are missing, first {absent[0].image}; "
                               f"{_restore_hint(absent[0].image)}")
    return samples


def _restore_hint(image: Path) -> str:
    """What to do about a missing image: regenerate the bundled benchmark, or fix one's own split."""
    if BUNDLED_BENCHMARK.resolve() in Path(image).resolve().parents:
        return "regenerate the bundled split with `python -m analysis.shapes`"
    return "check the split's image paths (relative to its file, or to image_folder=)"


def check_questions(samples: list[Sample], image_token: str) -> None:
    """Refuse questions that contain the model's image token: the processor would expand it into image
    features the sample does not have, or count the image twice."""
    for s in samples:
        if image_token and image_token in s.question:
            raise DatasetError(f"question {s.question_id} contains the image token {image_token!r}; the prompt "
                               "adds the image itself: remove it from the question text")


def verify_images(samples: list[Sample]) -> None:
    """Open every distinct image once, so a corrupt file fails before any model work starts."""
    for image in dict.fromkeys(s.image for s in samples):
        try:
            with Image.open(image) as im:
                im.verify()
        except (OSError, SyntaxError) as e:
            raise DatasetError(f"image {image} cannot be read ({e}); replace or remove it") from None
