"""Procedural scenes: a background colour, one or two flat shapes, and a prompt in words.

A :class:`Scene` is the ground truth (colours, kinds, sizes and positions in a 3x3 grid);
:func:`render` draws it at any size and :func:`describe` writes a prompt for it in one
of many wordings. :func:`sample_scene` draws scenes from an RNG; ``split="train"`` never
returns a *held-out* scene (a fixed 10% of all scene layouts, picked by a hash of the
canonical description), so the evaluator can measure prompts the model never saw.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tools.shapes.vocabulary import (
    COLORS,
    GRID,
    KIND_WORDS,
    KINDS,
    POSITION_PHRASES,
    POSITIONS,
    SIZE_WORDS,
    SIZES,
)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def key(self) -> str:
        """Canonical description (wording-independent): used for the held-out split."""
        parts = [self.background] + [
            f"{s.size}-{s.color}-{s.kind}-{s.position}" for s in self.shapes
        ]
        return "|".join(parts)

    def held_out(self) -> bool:
        digest = hashlib.sha256(self.key().encode()).digest()
        return digest[0] % 10 == 0


# Two shapes must not overlap: their grid cells differ by two in at least one axis.
def _far_apart(a: str, b: str) -> bool:
    (ca, ra), (cb, rb) = POSITIONS[a], POSITIONS[b]
    return abs(ca - cb) == 2 or abs(ra - rb) == 2


def _random_scene(rng: random.Random, two_shape_prob: float) -> Scene:
    names = list(COLORS)
    background = rng.choice(names)
    if rng.random() < two_shape_prob:
        c1, c2 = rng.sample([c for c in names if c != background], 2)
        p1 = rng.choice([p for p in POSITIONS if p != "centre"])  # centre has no far cell
        p2 = rng.choice([p for p in POSITIONS if _far_apart(p1, p)])
        shapes = tuple(
            Shape(rng.choice(KINDS), c, rng.choice(("small", "medium")), p)
            for c, p in ((c1, p1), (c2, p2))
        )
    else:
        color = rng.choice([c for c in names if c != background])
        shapes = (
            Shape(rng.choice(KINDS), color, rng.choice(list(SIZES)), rng.choice(list(POSITIONS))),
        )
    return Scene(background, shapes)


def sample_scene(rng: random.Random, split: str = "train", two_shape_prob: float = 0.4) -> Scene:
    """A random scene; ``split`` is "train" (never held out), "heldout" (only held out)
    or "any"."""
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split ({split!r}) must be 'train', 'heldout' or 'any'")
    while True:
        scene = _random_scene(rng, two_shape_prob)
        if split == "any" or scene.held_out() == (split == "heldout"):
            return scene


def _shape_phrase(rng: random.Random, shape: Shape) -> str:
    size = rng.choice(SIZE_WORDS[shape.size])
    kind = rng.choice(KIND_WORDS[shape.kind])
    words = " ".join(w for w in (size, shape.color, kind) if w)
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words} {rng.choice(POSITION_PHRASES[shape.position])}"


def describe(scene: Scene, rng: random.Random) -> str:
    """One natural-language prompt for ``scene``, wording drawn from ``rng``."""
    shapes = " and ".join(_shape_phrase(rng, s) for s in scene.shapes)
    bg, a_bg = scene.background, with_article(scene.background)
    forms = (f"{shapes} on {a_bg} background", f"{a_bg} background with {shapes}",
             f"{shapes}, {bg} background", f"on {a_bg} background, {shapes}",
             f"{shapes} against {a_bg} backdrop")  # fmt: skip
    return forms[rng.randrange(len(forms))]


def with_article(word: str) -> str:
    """``"an orange"``, ``"a red"``."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def shape_box(shape: Shape, width: int, height: int) -> tuple[float, float, float]:
    """(centre x, centre y, extent) in pixels."""
    col, row = POSITIONS[shape.position]
    extent = SIZES[shape.size] * min(width, height)
    return GRID[col] * width, GRID[row] * height, extent


def render(scene: Scene, width: int = 128, height: int = 128, supersample: int = 4) -> Image.Image:
    """Draw ``scene`` as an RGB image (anti-aliased by drawing ``supersample`` times larger)."""
    s = supersample
    img = Image.new("RGB", (width * s, height * s), COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    for shape in scene.shapes:
        cx, cy, extent = (v * s for v in shape_box(shape, width, height))
        r = extent / 2
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:  # equilateral-looking triangle, apex up, filling the same box
            draw.polygon(((cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)), fill=fill)
    return img.resize((width, height), Image.Resampling.BOX)


def to_tensor_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1], the VAE's pixel range."""
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
