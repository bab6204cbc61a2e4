"""Benchmark splits: one loader for the JSONL format of docs/definitions.md#splits.

A split is a JSONL file, one question a line, with the fields ``question_id, image, question, answer,
family`` (``image`` relative to the JSONL file, and inside its folder). This module owns reading it into
``Sample`` records, failing early with a message that names the fix (a missing folder, file or image, a
field of the wrong type, an image that does not decode or leaves the split's folder), the split's
content fingerprint (``content_sha256``: what a run's identity holds of its data), and the scene config a
generated split records (``scene_config``).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from analysis.benchmark.shapes import SceneConfig, read_split_config
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
    """(line number, record) of a JSONL file, or of a JSON list; every record a JSON object."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not UTF-8 text; a split is JSONL (one JSON object a line) or a JSON "
                           "list") from None
    except OSError as e:
        raise DatasetError(f"{path} cannot be read ({e.strerror or e})") from None
    for lineno, row in _records(path, text):
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{lineno} is a JSON {type(row).__name__}, not an object; every record is "
                               "one question as an object with named fields (docs/definitions.md#splits)")
        yield lineno, row


def _records(path: Path, text: str):
    """(line number, parsed value) of a JSON list (numbered by item) or, lazily, of JSONL lines (also
    when the first line is itself a list)."""
    if text.lstrip().startswith("["):
        try:
            yield from enumerate(json.loads(text), 1)
            return
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise DatasetError(f"{path} is not valid JSON ({e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno} is not valid JSON ({e})") from None


def _text(value, what: str, where: str, optional: bool = False) -> str | None:
    """``value`` if it is a string (or None where ``optional``); anything else names the field and fix."""
    if isinstance(value, str) or (optional and value is None):
        return value
    kind = "null" if value is None else type(value).__name__
    raise DatasetError(f"{where}: {what} is {kind} {json.dumps(value)[:40]}, not a string; write it as a "
                       f"JSON string{' (or null: no ground truth)' if optional else ''}")


def _question_id(value, where: str) -> str:
    """Question ids are strings or integers (the LLaVA and POPE files number them)."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise DatasetError(f"{where}: question_id is {type(value).__name__} {json.dumps(value)[:40]}; give a string "
                       "or an integer")


def _answers_file(path: Path, answers: Path | None) -> dict[str, str]:
    """Ground truth of the LLaVA evaluation format, kept in a separate file keyed by question_id."""
    candidates = [answers] if answers else [path.with_name(path.stem + "_answers.jsonl"),
                                            path.with_name("answers.jsonl")]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            out = {}
            for lineno, row in _rows(candidate):
                where = f"{candidate}:{lineno}"
                if "question_id" not in row:
                    raise DatasetError(f"{where} lacks question_id; every line of an answers file is "
                                       '{"question_id": ..., "answer": "..."}')
                value = row.get("answer", row.get("text", row.get("label")))
                out[_question_id(row["question_id"], where)] = _text(value, "the answer", where, optional=True)
            return out
    if answers:
        raise DatasetError(f"answers file {answers} not found")
    return {}


def _parse(row: dict, path: Path, lineno: int, image_root: Path, gold: dict, allow_outside: bool) -> Sample:
    """One record in any of the three formats (docs/definitions.md#splits; LLaVA evaluation; POPE), every
    field of its type; its image inside ``image_root`` unless ``allow_outside``."""
    if "question" in row and "answer" in row:            # docs/definitions.md#splits
        question, answer = row["question"], row["answer"]
        family = row.get("family", "unknown")
    elif "text" in row and "label" in row:               # POPE: {question_id, image, text, label}
        question, answer = row["text"], row["label"]
        family = row.get("category", "pope")
    elif "text" in row:                                   # LLaVA eval: answers in a separate file
        if gold and str(row.get("question_id")) not in gold:
            raise DatasetError(f"{path}:{lineno}: the answers file beside it has no answer for question_id "
                               f"{row.get('question_id')!r}; give every question an answer (or null), or none")
        question, answer = row["text"], gold.get(str(row.get("question_id")))
        family = row.get("category", "unknown")
    else:
        raise DatasetError(f"{path}:{lineno} lacks the field(s) ['question', 'answer']; a split line needs "
                           f"{list(REQUIRED_FIELDS)} (docs/definitions.md#splits), or question_id/image/text (LLaVA "
                           "evaluation format) or question_id/image/text/label (POPE)")
    missing = [k for k in ("question_id", "image") if k not in row]
    if missing:
        raise DatasetError(f"{path}:{lineno} lacks the field(s) {missing}")
    where = f"{path}:{lineno}"
    question_id = _question_id(row["question_id"], where)
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: question {row.get('question_id')!r} has no question text "
                           f"(got {question!r}); every line needs a non-empty string")
    answer = _text(answer, "the answer", where, optional=True)
    family = _text(family, "the family", where)
    image = _text(row["image"], "the image", where)
    known = {"question_id", "image", "question", "answer", "family", "text", "label", "category"}
    extra = {k: v for k, v in row.items() if k not in known}
    return Sample(question_id, _image_path(image_root, image, where, allow_outside), question, answer, family, extra)


def _image_path(root: Path, image: str, where: str, allow_outside: bool) -> Path:
    """``root / image``; it must stay inside ``root`` (``..``, an absolute path or a symbolic link out of
    it is refused) unless ``allow_outside``: a split names its own images, not any file on the machine."""
    path = root / image
    if not allow_outside and not path.resolve().is_relative_to(root.resolve()):
        raise DatasetError(f"{where}: image {image!r} lies outside the split's folder {root}; move it inside, "
                           "or pass --allow-outside-images (load_split(allow_outside_images=True))")
    return path


def scene_config(name_or_path: str | Path) -> SceneConfig | None:
    """The ``SceneConfig`` a shapes split was generated with (its ``<split>.scene.json``), or None for a
    split without that record (any other benchmark); a bundled split name or a JSONL path."""
    path = resolve_split(name_or_path)
    try:
        return read_split_config(path)
    except ValueError as e:
        raise DatasetError(str(e)) from None


def load_split(name_or_path: str | Path, limit: int | None = None, check_images: bool = True,
               image_folder: str | Path | None = None, answers: str | Path | None = None,
               allow_outside_images: bool = False) -> list[Sample]:
    """Read a split; with ``check_images`` every referenced image must exist before anything runs.

    ``limit``: the first ``limit`` questions (0: none; None: all). Question ids must be unique and every
    question a non-empty string; anything else is a ``DatasetError`` naming the line.

    Accepts the JSONL of docs/definitions.md#splits, the LLaVA evaluation format (``question_id, image, text``;
    answers from ``answers`` or ``<name>_answers.jsonl`` / ``answers.jsonl`` beside it) and POPE's
    (``question_id, image, text, label``). Images are relative to ``image_folder`` (default: the
    file's folder) and must lie inside it unless ``allow_outside_images``. Ids are strings or integers;
    questions, answers (or null), families and images are strings.
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
        sample = _parse(row, path, lineno, image_root, gold, allow_outside_images)
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


def verify_images(samples: list[Sample]) -> dict[Path, str]:
    """Decode every distinct image once, so a corrupt file (or one PIL refuses as a decompression bomb)
    fails before any model work starts; returns each image's sha256."""
    digests = {}
    for image in dict.fromkeys(s.image for s in samples):
        try:
            data = image.read_bytes()
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()  # chunk checksums; then decode every pixel, which verify() does not
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DatasetError(f"image {image} is too large to decode safely ({e}); replace it with a "
                               "smaller image") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise DatasetError(f"image {image} cannot be read ({e}); replace or remove it") from None
        digests[image] = hashlib.sha256(data).hexdigest()
    return digests


def content_sha256(samples: list[Sample], image_digests: dict[Path, str]) -> str:
    """sha256 of what a comparison reads of a split, in order: each question's id, text, answer and family
    and its image's bytes (``image_digests``: ``verify_images``'s). Independent of where the split lies or
    how its path is written, and of the fields nothing reads."""
    content = [[s.question_id, s.question, s.answer, s.family, image_digests[s.image]] for s in samples]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()
