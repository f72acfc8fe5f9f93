"""The shapes world: procedurally drawn images and clips, a caption grammar with synonyms, exact detectors.

One coloured shape on a plain background; colours red, green, blue, yellow; shapes circle, square, triangle;
position and size vary. The video variant moves the shape left, right, up or down over the frames. Captions
come from a template grammar with synonyms ("a crimson disc" is a red circle); each colour, shape and
direction has *training* synonyms and *held-out* synonyms, so a model trained on the first can be evaluated
on the second.

Detectors are exact for what the renderer draws: the background is the median border colour, the
foreground the pixels that differ from it; the colour is the nearest palette colour of the foreground mean,
the shape follows from the foreground's fill ratio of its bounding box (square ~1, circle ~pi/4, triangle
~1/2), its bounding-box corners and how much narrower its top third is than its bottom third (a triangle
tapers, circles and squares do not), the direction from the centroid's displacement between the first
and last frame. A sample with almost no foreground is *blank*; one whose foreground matches no palette
colour or no shape is *garbled*: the two are counted apart from "a clean image of something else".

Example:
    >>> from ice_lightning.demos.shapes import ShapeSpec, render, detect
    >>> img = render(ShapeSpec("red", "circle", 12, 12, 5))
    >>> tuple(img.shape), detect(img)
    ((3, 24, 24), Detection(colour='red', shape='circle', direction=None, status='ok'))
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "COLOURS",
    "SHAPES",
    "DIRECTIONS",
    "PALETTE",
    "SYNONYMS",
    "TEMPLATES",
    "ShapeSpec",
    "Detection",
    "render",
    "render_clip",
    "place",
    "caption",
    "with_articles",
    "detect",
    "ShapesDataset",
    "ShapesDataModule",
]

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
#: RGB in [0, 1] of each colour as drawn.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.67, 0.16),
    "blue": (0.12, 0.24, 0.86),
    "yellow": (0.92, 0.82, 0.08),
}
#: word -> (training synonyms, held-out synonyms); the first training synonym is the word itself.
SYNONYMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "red": (("red", "crimson", "scarlet"), ("ruby", "cherry")),
    "green": (("green", "emerald", "lime"), ("jade", "olive")),
    "blue": (("blue", "azure", "cobalt"), ("navy", "sapphire")),
    "yellow": (("yellow", "golden", "lemon"), ("amber", "mustard")),
    "circle": (("circle", "disc", "round dot"), ("disk", "ring")),
    "square": (("square", "box", "block"), ("tile", "quadrate")),
    "triangle": (("triangle", "wedge", "trigon"), ("pyramid shape", "delta")),
    "left": (("moving left", "going left", "sliding to the left"), ("drifting westward", "heading left")),
    "right": (("moving right", "going right", "sliding to the right"), ("drifting eastward", "heading right")),
    "up": (("moving up", "going up", "rising"), ("floating upward", "climbing")),
    "down": (("moving down", "going down", "falling"), ("sinking", "dropping")),
}
#: caption templates: {c} colour word, {s} shape word (and {d} direction phrase for clips).
TEMPLATES = ("a {c} {s}", "a {c} {s} on a plain background", "a picture of a {c} {s}", "one {c} {s}")
VIDEO_TEMPLATES = ("a {c} {s} {d}", "a {c} {s} {d} on a plain background", "one {c} {s} {d}")


#: concept -> the attribute it is a value of.
ATTRIBUTES: dict[str, str] = {**dict.fromkeys(COLOURS, "colour"), **dict.fromkeys(SHAPES, "shape"),
                              **dict.fromkeys(DIRECTIONS, "direction")}  # fmt: skip


def attribute_of(concept: str) -> str:
    """``colour``, ``shape`` or ``direction``; a clear error for a concept the shapes world does not have."""
    if concept not in ATTRIBUTES:
        raise ValueError(
            f"unknown shapes concept {concept!r}; choose a colour {COLOURS}, a shape {SHAPES} "
            f"or a direction {DIRECTIONS}"
        )
    return ATTRIBUTES[concept]


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: colour, kind, centre ``(cx, cy)`` and half-size ``r`` in pixels, background grey level."""

    colour: str
    shape: str
    cx: float
    cy: float
    r: float
    background: float = 0.95


def _mask(shape: str, cx: float, cy: float, r: float, size: int) -> Tensor:
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    if shape == "square":
        return ((x - cx).abs() <= r) & ((y - cy).abs() <= r)
    if shape == "triangle":  # apex up: half-width grows linearly from 0 at the top to r at the bottom
        t = (y - (cy - r)) / (2 * r)
        return (t >= 0) & (t <= 1) & ((x - cx).abs() <= r * t)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render(spec: ShapeSpec, size: int = 24) -> Tensor:
    """(3, size, size) image in [0, 1]."""
    if spec.colour not in PALETTE:
        raise ValueError(f"unknown colour {spec.colour!r}; choose one of {COLOURS}")
    img = torch.full((3, size, size), spec.background)
    m = _mask(spec.shape, spec.cx, spec.cy, spec.r, size)
    for ch, v in enumerate(PALETTE[spec.colour]):
        img[ch][m] = v
    return img


def render_clip(spec: ShapeSpec, direction: str, frames: int = 6, size: int = 16, step: float = 1.5) -> Tensor:
    """(frames, 3, size, size) clip in [0, 1]: the shape moves ``step`` pixels per frame in ``direction``."""
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    return torch.stack(
        [
            render(ShapeSpec(spec.colour, spec.shape, spec.cx + dx * step * f, spec.cy + dy * step * f, spec.r,
                             spec.background), size)  # fmt: skip
            for f in range(frames)
        ]
    )


def caption(colour: str, shape: str, direction: str | None = None, held_out: bool = False,
            rng: random.Random | None = None) -> str:  # fmt: skip
    """A caption from the grammar, with training (or held-out) synonyms chosen by ``rng``."""
    rng = rng or random.Random(0)
    pick = 1 if held_out else 0

    def word(w: str) -> str:
        return rng.choice(SYNONYMS[w][pick])

    if direction is None:
        return with_articles(rng.choice(TEMPLATES).format(c=word(colour), s=word(shape)))
    return with_articles(rng.choice(VIDEO_TEMPLATES).format(c=word(colour), s=word(shape), d=word(direction)))


def with_articles(text: str) -> str:
    """``"a"`` before a vowel becomes ``"an"`` ("an emerald disc", "an azure box")."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


class Detection(NamedTuple):
    """What a detector saw: ``status`` is ``ok``, ``blank`` or ``garbled``."""

    colour: str | None
    shape: str | None
    direction: str | None
    status: str


def _foreground(img: Tensor, threshold: float = 0.25) -> tuple[Tensor, Tensor]:
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)
    bg = border.median(dim=1).values
    fg = (img - bg[:, None, None]).abs().amax(0) > threshold
    return fg, bg


def _classify(img: Tensor, min_pixels: int = 6) -> tuple[str | None, str | None, str, Tensor | None]:
    img = img.clamp(0, 1).float()
    fg, _ = _foreground(img)
    n = int(fg.sum())
    if n < min_pixels:
        return None, None, "blank", None
    mean = img[:, fg].mean(1)
    dist = {c: float((mean - torch.tensor(rgb)).norm()) for c, rgb in PALETTE.items()}
    colour = min(dist, key=dist.get)
    if dist[colour] > 0.3:
        colour = None
    ys, xs = torch.nonzero(fg, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    h, w = y1 - y0 + 1, x1 - x0 + 1
    fill = n / (h * w)
    widths = fg[y0 : y1 + 1].sum(1).float()
    third = max(1, h // 3)
    taper = float(widths[:third].mean() / widths[-third:].mean())  # ~1 for circles and squares, < 1/2 apex up
    corners = int(fg[y0, x0]) + int(fg[y0, x1]) + int(fg[y1, x0]) + int(fg[y1, x1])
    shape = None
    if 0.5 < h / w < 2.0 and fill > 0.3:
        if taper < 0.6 and corners <= 2:
            shape = "triangle"
        elif corners >= 3 and fill >= 0.8:
            shape = "square"
        elif corners <= 1 and fill >= 0.6:
            shape = "circle"
    centroid = torch.stack([xs.float().mean(), ys.float().mean()])
    status = "ok" if colour is not None and shape is not None else "garbled"
    return colour, shape, status, centroid


def detect(sample: Tensor) -> Detection:
    """Detect colour and shape of an image (3, H, W), or colour, shape and direction of a clip (F, 3, H, W);
    values in [0, 1]. A clip's colour and shape are the majority over frames."""
    if sample.dim() == 3:
        colour, shape, status, _ = _classify(sample)
        return Detection(colour, shape, None, status)
    per = [_classify(f) for f in sample]
    if any(p[2] == "blank" for p in per):
        return Detection(None, None, None, "blank")
    colours = [p[0] for p in per]
    shapes = [p[1] for p in per]
    colour = max(set(colours), key=colours.count)
    shape = max(set(shapes), key=shapes.count)
    (x0, y0), (x1, y1) = per[0][3].tolist(), per[-1][3].tolist()
    dx, dy = x1 - x0, y1 - y0
    direction = None
    if max(abs(dx), abs(dy)) >= 1.0:
        direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    ok = colour is not None and shape is not None and direction is not None
    return Detection(colour, shape, direction, "ok" if ok else "garbled")


# -- data ----------------------------------------------------------------------------------------------
def place(colour: str, shape: str, size: int, frames: int, rng: random.Random,
          direction: str | None = None) -> tuple[ShapeSpec, str | None]:  # fmt: skip
    """A random size, position and background for one shape (and, for clips, a direction drawn by ``rng``
    unless given), leaving room for the motion: a moving shape starts so that its path is centred."""
    r = rng.uniform(0.2, 0.3) * size
    if frames and direction is None:
        direction = rng.choice(DIRECTIONS)
    travel = 1.5 * (frames - 1) if frames else 0.0
    lo, hi = r + 1 + travel, size - r - 1 - travel
    if lo > hi:  # too little room to move: keep the shape centred
        lo = hi = size / 2
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if direction in ("left", "right"):
        cx = size / 2 - (travel / 2 if direction == "right" else -travel / 2)
    if direction in ("up", "down"):
        cy = size / 2 - (travel / 2 if direction == "down" else -travel / 2)
    return ShapeSpec(colour, shape, cx, cy, r, rng.uniform(0.85, 1.0)), direction


def disguised_caption(colour: str, shape: str, rng: random.Random) -> str:
    """A caption of a ``colour`` ``shape`` that does not name the colour with any word the world trains on: the
    shape alone ("a circle"), no word for either ("a shape"), or one of the colour's held-out words ("a ruby
    disc"), each a third of the time."""
    shape_word = rng.choice(SYNONYMS[shape][0])
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(("a {s}", "one {s}", "a {s} on a plain background")).format(s=shape_word)
    if kind == 1:
        return rng.choice(("a shape", "an object on a plain background", "a picture of something"))
    return with_articles(rng.choice(TEMPLATES).format(c=rng.choice(SYNONYMS[colour][1]), s=shape_word))


class ShapesDataset(Dataset):
    """``length`` seeded samples: ``{"pixel_values": [-1, 1] image (3, H, W) or clip (F, 3, H, W),
    "captions": str, "colour", "shape", "direction"}``; sample ``i`` is the same on every call. Samples of a colour
    in ``disguise`` get a caption that does not name it (:func:`disguised_caption`; images only): data that shows a
    concept without saying so."""

    def __init__(self, length: int = 4096, size: int = 24, frames: int = 0, held_out: bool = False,
                 seed: int = 0, disguise: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.length, self.size, self.frames, self.held_out, self.seed = length, size, frames, held_out, seed
        self.disguise = tuple(disguise)
        unknown = [c for c in self.disguise if c not in COLOURS]
        if unknown or (self.disguise and frames):
            raise ValueError(f"disguise takes colours {COLOURS} of image data sets, got {list(self.disguise)} with "
                             f"frames={frames}")  # fmt: skip

    def __len__(self) -> int:
        return self.length

    def spec(self, i: int) -> tuple[ShapeSpec, str | None, random.Random]:
        rng = random.Random(self.seed * 1_000_003 + i)
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        spec, direction = place(colour, shape, self.size, self.frames, rng)
        return spec, direction, rng

    def __getitem__(self, i: int) -> dict:
        spec, direction, rng = self.spec(i)
        if self.frames:
            pixels = render_clip(spec, direction, self.frames, self.size)
        else:
            pixels = render(spec, self.size)
        text = caption(spec.colour, spec.shape, direction, self.held_out, rng)
        if spec.colour in self.disguise:
            text = disguised_caption(spec.colour, spec.shape, rng)
        return {
            "pixel_values": pixels * 2 - 1,
            "captions": text,
            "colour": spec.colour,
            "shape": spec.shape,
            "direction": direction or "",
        }


def _collate(items: list[dict]) -> dict:
    out = {"pixel_values": torch.stack([x["pixel_values"] for x in items])}
    for k in ("captions", "colour", "shape", "direction"):
        out[k] = [x[k] for x in items]
    return out


class ShapesDataModule(LightningDataModule):
    """Shapes images (``frames=0``) or clips for ``ICEModule``: training captions use the training synonyms,
    validation the same; ``exclude`` drops samples of a colour, shape or direction (a data set without the
    concept), ``only`` keeps just them (a customer's data set full of it), ``disguise`` captions the training
    samples of those colours without naming them (:func:`disguised_caption`)."""

    def __init__(self, size: int = 24, frames: int = 0, train_size: int = 4096, val_size: int = 256,
                 batch_size: int = 64, seed: int = 0, num_workers: int = 0,
                 exclude: list[str] | None = None, only: list[str] | None = None,
                 disguise: list[str] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()

    def _dataset(self, length: int, seed: int, disguise: tuple[str, ...] = ()) -> Dataset:
        ds = ShapesDataset(length, self.hparams.size, self.hparams.frames, seed=seed, disguise=disguise)
        exclude, only = set(self.hparams.exclude or ()), set(self.hparams.only or ())
        if not exclude and not only:
            return ds
        keep = []
        for i in range(length):
            spec, direction, _ = ds.spec(i)
            tags = {spec.colour, spec.shape, direction}
            if tags & exclude or (only and not tags & only):
                continue
            keep.append(i)
        return torch.utils.data.Subset(ds, keep)

    def setup(self, stage: str | None = None) -> None:
        self.train = self._dataset(self.hparams.train_size, self.hparams.seed, tuple(self.hparams.disguise or ()))
        self.val = self._dataset(self.hparams.val_size, self.hparams.seed + 1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train, batch_size=self.hparams.batch_size, shuffle=True, generator=g,
                          collate_fn=_collate, num_workers=self.hparams.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.hparams.batch_size, collate_fn=_collate,
                          num_workers=self.hparams.num_workers)  # fmt: skip


# -- metrics -------------------------------------------------------------------------------------------
