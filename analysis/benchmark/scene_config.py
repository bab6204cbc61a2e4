"""The scene parameters of the shapes benchmark: ``SceneConfig``, its checks and its JSON form.

This module owns what a generated scene may hold (image size, object sizes, how many objects, the colour
and shape vocabularies, the question families) and the refusal of a config that cannot generate a valid
scene, in one ``ValueError`` line that names the fix. ``DEFAULT`` is the bundled benchmark's config
(``data/shapes/``, the bundled model); ``analysis.benchmark.shapes`` takes a config in every function
that depends on one. A written split (``<split>.scene.json``) and a trained model (``scene_config.json``)
record their config as a JSON object whose ``scene`` is ``to_dict``'s (``record_text`` / ``read_record``);
``difference`` names the fields in which two configs differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

# What ``shapes._draw`` can draw and which question makers ``shapes`` has: a config chooses among these.
DRAWABLE_SHAPES = ("circle", "square", "triangle", "cross")
QUESTION_FAMILIES = ("existence", "colour", "shape", "count", "spatial", "position")
# A config that names no families (and every record written before "position" existed) asks these.
FIRST_FAMILIES = QUESTION_FAMILIES[:5]
# patch_labels paints object k (1-based) into an 8-bit index image; 0 is the background.
MOST_OBJECTS = 255


def _default_sizes() -> dict[str, int]:
    return {"small": 11, "large": 19}


def _default_colours() -> dict[str, tuple[int, int, int]]:
    return {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30),
            "purple": (140, 60, 180), "orange": (245, 135, 25)}


def _default_shapes() -> dict[str, str]:
    return {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}


@dataclass(frozen=True, eq=False)
class SceneConfig:
    """The parameters of a shapes scene and its questions; every length is in pixels of the rendered image.

    Fields:

    * ``image_size`` -- side of the square RGB image (px).
    * ``sizes`` -- object size name -> side of the object's bounding box (px). An object's centre is drawn
      so that its box stays at least 1 px inside the image, so every size must be below
      ``image_size - 2``.
    * ``min_objects`` / ``max_objects`` -- the number of objects in a scene, drawn uniformly from this
      inclusive range; the objects have distinct (colour, shape) pairs, so ``max_objects`` is at most
      ``len(colours) * len(shapes)``.
    * ``min_separation`` -- the least distance (px) between two objects' centres along an axis for a
      spatial question ("left of", "above") about that axis to be asked.
    * ``object_gap`` -- placement margin (px): two objects' centres differ by more than their half sides
      plus this along x or along y, so their boxes do not touch.
    * ``grid`` -- 0: an object's centre may lie anywhere; N > 0: the image is cut into N x N square cells
      (``image_size`` divisible by N) and every object is drawn whole inside its own cell, centred on it.
      With a vision tower whose patches are those cells, each object is exactly one visual token: the
      tokens that carry an answer are known, and a pruning method that drops them loses it.
    * ``background`` -- RGB of the empty image (0-255 each).
    * ``colours`` -- colour word -> RGB (0-255 each), in label order (``shapes.patch_labels``).
    * ``shapes`` -- shape word -> its plural (the count question's word), in label order; shape words
      are among ``DRAWABLE_SHAPES``.
    * ``families`` -- the question families a split cycles through, among ``QUESTION_FAMILIES``.

    Equality and hashing follow ``to_dict`` including the order of ``sizes``, ``colours`` and
    ``shapes`` (the order numbers the labels). The mappings are copied on construction.
    """

    image_size: int = 72
    sizes: Mapping[str, int] = field(default_factory=_default_sizes)
    min_objects: int = 1
    max_objects: int = 6
    min_separation: int = 8
    object_gap: int = 2
    grid: int = 0
    background: tuple[int, int, int] = (235, 235, 235)
    colours: Mapping[str, tuple[int, int, int]] = field(default_factory=_default_colours)
    shapes: Mapping[str, str] = field(default_factory=_default_shapes)
    families: tuple[str, ...] = FIRST_FAMILIES

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "sizes", _mapping(self.sizes, "sizes"))
        set_(self, "colours", {name: _rgb(rgb, f"colour {name!r}")
                               for name, rgb in _mapping(self.colours, "colours").items()})
        set_(self, "shapes", _mapping(self.shapes, "shapes"))
        set_(self, "background", _rgb(self.background, "background"))
        if isinstance(self.families, str):
            raise ValueError(f"families must be a list of family names, got the string {self.families!r}")
        set_(self, "families", tuple(self.families))
        self._check()

    def _check(self) -> None:
        for name in ("image_size", "min_objects", "max_objects", "min_separation", "object_gap", "grid"):
            _integer(getattr(self, name), name)
        if not self.sizes:
            raise ValueError("a scene config needs at least one object size, e.g. sizes={'small': 11}")
        for name, side in self.sizes.items():
            _integer(side, f"object size {name!r}")
            if side < 1 or 2 * (side // 2) + 2 >= self.image_size:
                raise ValueError(f"object size {name!r} = {side} px does not fit a {self.image_size} px image "
                                 f"with a 1 px margin: give sizes from 1 to {self.image_size - 3} px, or a "
                                 "larger image_size")
        self._check_grid()
        _words(self.colours, "colour", "colours={'red': (220, 40, 40)}")
        _words(self.shapes, "shape", "shapes={'circle': 'circles'}")
        unknown = [s for s in self.shapes if s not in DRAWABLE_SHAPES]
        if unknown:
            raise ValueError(f"cannot draw shape(s) {unknown}; valid shapes: {list(DRAWABLE_SHAPES)}")
        for shape, plural in self.shapes.items():
            if not (isinstance(plural, str) and plural.isalpha() and plural.islower()):
                raise ValueError(f"the plural of {shape!r} must be one lower-case word, got {plural!r}")
        clash = sorted(set(self.colours) & ({*self.shapes, *self.shapes.values()}))
        if clash:
            raise ValueError(f"{clash} is both a colour and a shape word; give each word one meaning")
        if self.background in self.colours.values():
            raise ValueError(f"background {self.background} equals an object colour; objects of it would be "
                             "invisible: choose another background")
        pairs = len(self.colours) * len(self.shapes)
        most = min(pairs, MOST_OBJECTS, self.grid ** 2 or MOST_OBJECTS)
        if not 1 <= self.min_objects <= self.max_objects <= most:
            raise ValueError(f"object count range {self.min_objects}..{self.max_objects} is invalid: need 1 <= "
                             f"min_objects <= max_objects <= {most} (objects have distinct "
                             f"colour-shape pairs: {len(self.colours)} colours x {len(self.shapes)} shapes"
                             + (f"; one object per cell of the {self.grid} x {self.grid} grid)" if self.grid else ")"))
        if self.min_separation < 1 or self.object_gap < 0:
            raise ValueError(f"min_separation must be >= 1 px and object_gap >= 0 px, got {self.min_separation} "
                             f"and {self.object_gap}")
        bad = [f for f in self.families if f not in QUESTION_FAMILIES]
        if not self.families or bad or len(set(self.families)) != len(self.families):
            raise ValueError(f"question families {list(self.families)} are invalid: give distinct families of "
                             f"{list(QUESTION_FAMILIES)}")

    def _check_grid(self) -> None:
        if self.grid < 0 or (self.grid and self.image_size % self.grid):
            raise ValueError(f"grid {self.grid} does not cut a {self.image_size} px image into whole cells: give 0 "
                             f"(no grid) or a divisor of {self.image_size}")
        if self.grid:
            cell = self.cell
            too_big = {name: side for name, side in self.sizes.items() if 2 * (side // 2) + 1 > cell}
            if too_big:
                raise ValueError(f"object size(s) {too_big} do not fit a {cell} px grid cell: give sizes of at most "
                                 f"{cell - 1 if cell % 2 == 0 else cell} px, or a coarser grid")

    @property
    def cell(self) -> int:
        """Side (px) of a grid cell; the whole image when there is no grid."""
        return self.image_size // self.grid if self.grid else self.image_size

    @property
    def number_words(self) -> tuple[str, ...]:
        """Every answer a count question can have: an object count, or the objects of one shape (>= 1)."""
        return tuple(str(n) for n in range(1, self.max_objects + 1))

    def to_dict(self) -> dict:
        """The config as JSON-ready values (RGB triples as lists), mappings in their order."""
        return {"image_size": self.image_size, "sizes": dict(self.sizes), "min_objects": self.min_objects,
                "max_objects": self.max_objects, "min_separation": self.min_separation,
                "object_gap": self.object_gap, "grid": self.grid, "background": list(self.background),
                "colours": {k: list(v) for k, v in self.colours.items()}, "shapes": dict(self.shapes),
                "families": list(self.families)}

    @classmethod
    def from_dict(cls, data: Mapping) -> SceneConfig:
        """The config ``to_dict`` wrote; fields it does not name take their defaults, unknown ones are refused."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a scene config is a JSON object of fields, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown scene config field(s) {unknown}; valid fields: {known}")
        return cls(**data)

    def __eq__(self, other) -> bool:
        return isinstance(other, SceneConfig) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> str:
        return json.dumps(self.to_dict())


def _mapping(value, what: str) -> dict:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a mapping of names (a dict / JSON object), got {value!r}")
    return dict(value)


def _integer(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer number of pixels or objects, got {value!r}")


def _rgb(value, what: str) -> tuple[int, int, int]:
    try:
        rgb = tuple(value)
    except TypeError:
        rgb = ()
    if len(rgb) != 3 or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in rgb):
        raise ValueError(f"{what} must be an RGB triple of integers 0-255, got {value!r}")
    return rgb  # type: ignore[return-value]


def _words(vocabulary: Mapping, kind: str, example: str) -> None:
    if not vocabulary:
        raise ValueError(f"the {kind} vocabulary is empty; give at least one {kind}, e.g. {example}")
    bad = [w for w in vocabulary if not (isinstance(w, str) and w.isalpha() and w.islower())]
    if bad:
        raise ValueError(f"{kind} names must be single lower-case words (the tokenizer reads words), got {bad}")


def record_text(config: SceneConfig, **facts) -> str:
    """A record file's text: ``facts`` (JSON values) then ``scene``, the config's ``to_dict``."""
    return json.dumps({**facts, "scene": config.to_dict()}, indent=1) + "\n"


def read_record(path: Path, fix: str) -> SceneConfig:
    """The config a record file holds (``record_text``'s, or any JSON object with a ``scene`` field), refused
    in one ``ValueError`` line that ends with ``fix`` when the file is not one."""
    try:
        return SceneConfig.from_dict(json.loads(Path(path).read_text(encoding="utf-8"))["scene"])
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ValueError(f"{path} is not a scene config record ({reason}); {fix}") from None


def difference(a: SceneConfig, b: SceneConfig) -> str:
    """The fields in which ``a`` and ``b`` differ, as ``field a vs b`` (JSON values), ``; ``-separated."""
    left, right = a.to_dict(), b.to_dict()
    return "; ".join(f"{k} {json.dumps(left[k])} vs {json.dumps(right[k])}" for k in left if left[k] != right[k])


# The first bundled benchmark: SceneConfig() (72 px, objects anywhere over 2-9 patches, the relative "spatial"
# family). On it any quarter of the visual tokens carried every answer, so the choice of tokens hardly mattered.
FIRST = SceneConfig()
# The bundled benchmark: one 7 px object per 8 px cell of a 64 px image, so one visual token per object for
# a vision tower with 8 px patches; "position" (which half an object lies in) as the spatial family.
DEFAULT = SceneConfig(image_size=64, grid=8, sizes={"small": 7}, min_objects=1, max_objects=8, min_separation=16,
                      families=("existence", "colour", "shape", "count", "position"))
