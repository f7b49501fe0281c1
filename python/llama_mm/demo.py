"""The built-in model's synthetic task: images of simple coloured shapes and their true captions.

Two caption styles share one picture language:

* relation captions (what the built-in model is trained on), from `random_spec`: two shapes, one above the
  other or side by side, answered to `PROMPT`: "a red circle above a blue square", "a green triangle left of a
  green diamond". Shapes are named in reading order (the top one, or the left one, first), so every image has
  exactly one true caption. (Naming shapes in colour order with all four of above / below / left of / right of
  was tried first and is far slower for a tiny model to learn: it must bind colours to positions to compare.)
* count captions (the LoRA experiment; the base model never sees them), from `random_count_spec`: one to
  three shapes of any colours in the cells of a 2x2 grid, answered to `COUNT_PROMPT`:
  "3 shapes: 2 red, 1 blue" (colours in `COLOURS` order, only those present).

A `Spec` holds everything `draw` needs (colours, kinds, centres, sizes as fractions of the image side), so the
same spec always gives the same pixels, and the same seed always gives the same spec. Only PIL and numpy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"  # the built-in model's files
IMAGE_SIZE = 112  # default side of `draw`, and the built-in model's tile size
BACKGROUND = (255, 255, 255)
COLOURS = {  # name -> RGB; count captions list colours in this order
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
}
KINDS = ("circle", "square", "triangle", "diamond")
RELATIONS = ("above", "left of")  # of shapes[0] to shapes[1]: reading order
PROMPT = "Describe the shapes."
COUNT_PROMPT = "Count the shapes by colour."
MAX_SHAPES = 3

# Layout of relation specs (fractions of the image side): along the relation's axis the first shape's centre
# is near 0.27 and the second's near 0.73, across it both stay near the middle, so the axis offset (>= 0.38)
# always dominates the cross offset (<= 0.2) and shapes never touch (sizes <= 0.34).
_NEAR = (0.23, 0.31)
_FAR = (0.69, 0.77)
_ACROSS = (0.4, 0.6)
_SIZE = (0.24, 0.34)
# Layout of count specs: shapes sit in distinct cells of a 2x2 grid, centres jittered by up to 0.04.
_CELLS = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))
_CELL_JITTER = 0.04
_COUNT_SIZE = (0.2, 0.28)


@dataclass(frozen=True)
class Shape:
    """One shape: its colour and kind, its centre (x right, y down) and its side, as fractions of the image."""

    colour: str
    kind: str
    x: float
    y: float
    size: float

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"Shape.colour {self.colour!r} is not one of {list(COLOURS)}")
        if self.kind not in KINDS:
            raise ValueError(f"Shape.kind {self.kind!r} is not one of {list(KINDS)}")
        for name in ("x", "y"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Shape.{name} = {getattr(self, name)} is outside [0, 1]")
        if not 0.0 < self.size <= 1.0:
            raise ValueError(f"Shape.size = {self.size} is outside (0, 1]")


@dataclass(frozen=True)
class Spec:
    """A picture: 1..MAX_SHAPES shapes, and for relation specs the relation of shapes[0] to shapes[1].

    `dataclasses.asdict(spec)` is JSON-serialisable; `Spec.from_dict` reads it back.
    """

    shapes: tuple[Shape, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))
        if not all(isinstance(s, Shape) for s in self.shapes):
            raise ValueError(f"Spec.shapes must hold Shape objects, got {[type(s).__name__ for s in self.shapes]}")
        if not 1 <= len(self.shapes) <= MAX_SHAPES:
            raise ValueError(f"Spec.shapes has {len(self.shapes)} shapes; expected 1 to {MAX_SHAPES}")
        if self.relation is None:
            return
        if self.relation not in RELATIONS:
            raise ValueError(f"Spec.relation {self.relation!r} is not one of {list(RELATIONS)} or None")
        if len(self.shapes) != 2:
            raise ValueError(f"Spec.relation needs exactly 2 shapes, got {len(self.shapes)}")
        a, b = self.shapes
        dx, dy = b.x - a.x, b.y - a.y  # from the named shape to the other one
        along, across = (dy, dx) if self.relation == "above" else (dx, dy)
        if not (along > 0 and abs(along) > abs(across)):
            raise ValueError(f"Spec.shapes centres ({a.x}, {a.y}), ({b.x}, {b.y}) do not show {self.relation!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "Spec":
        """Inverse of `dataclasses.asdict` (also after a JSON round trip)."""
        try:
            shapes = tuple(Shape(**s) for s in data["shapes"])
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"malformed spec dict ({e!r}); expected {{'shapes': [{{colour, kind, x, y, size}}, ...], 'relation'}}"
            ) from e
        return cls(shapes=shapes, relation=data.get("relation"))


def _check_rng(rng) -> None:
    if not isinstance(rng, (random.Random, np.random.Generator)):
        raise TypeError(f"rng must be random.Random or numpy.random.Generator, got {type(rng).__name__}")


def _index(rng, n: int) -> int:
    return rng.randrange(n) if isinstance(rng, random.Random) else int(rng.integers(n))


def _uniform(rng, bounds: tuple[float, float]) -> float:
    return round(float(rng.uniform(*bounds)), 3)  # 3 decimals: sub-pixel at any sensible size, short JSON


def random_spec(rng: random.Random | np.random.Generator) -> Spec:
    """A random relation spec: two shapes (any colours and kinds), one above the other or side by side."""
    _check_rng(rng)
    colours = [list(COLOURS)[_index(rng, len(COLOURS))] for _ in range(2)]
    kinds = [KINDS[_index(rng, len(KINDS))] for _ in range(2)]
    relation = RELATIONS[_index(rng, len(RELATIONS))]
    along = [_uniform(rng, _NEAR), _uniform(rng, _FAR)]
    across = [_uniform(rng, _ACROSS), _uniform(rng, _ACROSS)]
    xy = zip(across, along) if relation == "above" else zip(along, across)
    shapes = tuple(
        Shape(colour=c, kind=k, x=x, y=y, size=_uniform(rng, _SIZE)) for c, k, (x, y) in zip(colours, kinds, xy)
    )
    return Spec(shapes=shapes, relation=relation)


def random_count_spec(rng: random.Random | np.random.Generator) -> Spec:
    """A random count spec: 1 to MAX_SHAPES shapes of any colours and kinds in distinct grid cells."""
    _check_rng(rng)
    n = 1 + _index(rng, MAX_SHAPES)
    cells = list(range(len(_CELLS)))
    shapes = []
    for _ in range(n):
        cx, cy = _CELLS[cells.pop(_index(rng, len(cells)))]
        jitter = (-_CELL_JITTER, _CELL_JITTER)
        shapes.append(
            Shape(
                colour=list(COLOURS)[_index(rng, len(COLOURS))],
                kind=KINDS[_index(rng, len(KINDS))],
                x=round(cx + _uniform(rng, jitter), 3),
                y=round(cy + _uniform(rng, jitter), 3),
                size=_uniform(rng, _COUNT_SIZE),
            )
        )
    return Spec(shapes=tuple(shapes))


def caption(spec: Spec) -> str:
    """The relation caption, e.g. "a red circle above a blue square"."""
    if spec.relation is None:
        raise ValueError("caption() needs a relation spec (from random_spec); this spec has relation None")
    a, b = spec.shapes
    return f"a {a.colour} {a.kind} {spec.relation} a {b.colour} {b.kind}"


def count_caption(spec: Spec) -> str:
    """The count caption, e.g. "3 shapes: 2 red, 1 blue" (colours in COLOURS order)."""
    n = len(spec.shapes)
    counts = [(sum(s.colour == c for s in spec.shapes), c) for c in COLOURS]
    parts = ", ".join(f"{k} {c}" for k, c in counts if k)
    return f"{n} shape{'s' if n > 1 else ''}: {parts}"


def draw(spec: Spec, size: int = IMAGE_SIZE) -> Image.Image:
    """Render `spec` as a size x size RGB image: flat colours on white, no anti-aliasing."""
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"draw size must be an int >= 32, got {size!r}")
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for s in spec.shapes:
        cx, cy, h = s.x * size, s.y * size, s.size * size / 2  # centre and half-side in pixels
        box = [round(cx - h), round(cy - h), round(cx + h), round(cy + h)]
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif s.kind == "square":
            pen.rectangle(box, fill=fill)
        elif s.kind == "triangle":  # apex up, base on the box's bottom edge
            pen.polygon([(box[0], box[3]), (box[2], box[3]), (round(cx), box[1])], fill=fill)
        else:  # diamond: the box's edge midpoints
            mx, my = round(cx), round(cy)
            pen.polygon([(mx, box[1]), (box[2], my), (mx, box[3]), (box[0], my)], fill=fill)
    return image
