"""Procedural clips from the shapes world: one shape moving, changing colour, growing.

A :class:`Clip` is the ground truth of a short video: a background colour and one
shape with a kind, a start and an end colour, a start and an end size and a start and
an end cell of the 3x3 grid. :func:`render_clip` draws its frames (the shape's centre,
size and colour interpolated linearly from the first frame to the last) and
:func:`describe` writes a prompt for it, e.g. "a red circle moving from the left to the
right on a blue background". ``split="train"`` never returns a *held-out* clip (a fixed
10% of all clip layouts by a hash of :meth:`Clip.key`), so the evaluator measures
prompts the model never saw.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np

from tools.shapes import scenes
from tools.shapes.vocabulary import COLORS, KIND_WORDS, KINDS, POSITIONS, SIZE_WORDS

FRAMES = 17
"""Frames per clip: 4k+1 for the Wan VAE (5 latent frames)."""

# "the <position>" after "from" / "to"; the centre has three names as in the image prompts.
_PLACE = {p: (f"the {p}",) for p in POSITIONS}
_PLACE["centre"] = ("the centre", "the center", "the middle")
_STILL_PROB = 0.1
_RECOLOR_PROB = 0.25
_GROW_PROB = 0.25


@dataclass(frozen=True)
class Clip:
    background: str
    kind: str
    color: str
    end_color: str
    size: str
    end_size: str
    start: str
    end: str

    def key(self) -> str:
        """Canonical description (wording-independent): used for the held-out split."""
        fields = (self.color, self.end_color, self.size, self.end_size, self.start, self.end)
        return "|".join((self.background, self.kind, *fields))

    def held_out(self) -> bool:
        return hashlib.sha256(self.key().encode()).digest()[0] % 10 == 0

    def frame_scene(self, last: bool) -> scenes.Scene:
        """The first (or last) frame as an image scene, for the image checker."""
        if last:
            color, size, pos = self.end_color, self.end_size, self.end
        else:
            color, size, pos = self.color, self.size, self.start
        return scenes.Scene(self.background, (scenes.Shape(self.kind, color, size, pos),))


def _random_clip(rng: random.Random) -> Clip:
    names = list(COLORS)
    background = rng.choice(names)
    color = rng.choice([c for c in names if c != background])
    end_color = color
    if rng.random() < _RECOLOR_PROB:
        end_color = rng.choice([c for c in names if c not in (background, color)])
    size = end_size = rng.choice(("small", "medium", "large"))
    if rng.random() < _GROW_PROB:
        size, end_size = "small", "large"
    start = rng.choice(list(POSITIONS))
    end = start
    if rng.random() >= _STILL_PROB:
        end = rng.choice([p for p in POSITIONS if p != start])
    return Clip(background, rng.choice(KINDS), color, end_color, size, end_size, start, end)


def sample_clip(rng: random.Random, split: str = "train") -> Clip:
    """A random clip; ``split`` is "train" (never held out), "heldout" or "any"."""
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split ({split!r}) must be 'train', 'heldout' or 'any'")
    while True:
        clip = _random_clip(rng)
        if split == "any" or clip.held_out() == (split == "heldout"):
            return clip


def describe(clip: Clip, rng: random.Random) -> str:
    """One prompt for ``clip``, wording drawn from ``rng``."""
    growing = clip.size != clip.end_size
    size = "" if growing else rng.choice(SIZE_WORDS[clip.size])
    if growing:
        size = rng.choice(SIZE_WORDS["small"])
    words = " ".join(w for w in (size, clip.color, rng.choice(KIND_WORDS[clip.kind])) if w)
    subject = f"{'an' if words[0] in 'aeiou' else 'a'} {words}"
    if clip.start == clip.end:
        action = rng.choice(scenes.POSITION_PHRASES[clip.start])
    else:
        verb = rng.choice(("moving", "moving", "sliding"))
        action = f"{verb} from {rng.choice(_PLACE[clip.start])} to {rng.choice(_PLACE[clip.end])}"
    changes = []
    if clip.end_color != clip.color:
        changes.append(f"turning {clip.end_color}")
    if growing:
        changes.append("growing")
    if changes:
        action += " and " + " and ".join(changes)
    bg, a_bg = clip.background, scenes.with_article(clip.background)
    forms = (
        f"{subject} {action} on {a_bg} background",
        f"on {a_bg} background, {subject} {action}",
        f"{subject} {action}, {bg} background",
    )
    return forms[rng.randrange(len(forms))]


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], u: float) -> tuple[int, ...]:
    return tuple(round(x + (y - x) * u) for x, y in zip(a, b, strict=True))


def render_clip(
    clip: Clip, width: int = 64, height: int = 64, frames: int = FRAMES, only=None
) -> np.ndarray:
    """(F, H, W, 3) uint8 frames; centre, extent and colour move linearly in time.
    ``only``: the indices of the frames to draw (default: all)."""
    from PIL import Image, ImageDraw

    s = 4  # supersampling, as the image scenes are drawn
    first, last = (
        scenes.shape_box(clip.frame_scene(end).shapes[0], width, height) for end in (False, True)
    )
    indices = range(frames) if only is None else only
    out = np.empty((len(indices), height, width, 3), dtype=np.uint8)
    for n, i in enumerate(indices):
        u = i / max(1, frames - 1)
        cx, cy, extent = (s * (a + (b - a) * u) for a, b in zip(first, last, strict=True))
        img = Image.new("RGB", (width * s, height * s), COLORS[clip.background])
        draw = ImageDraw.Draw(img)
        r, fill = extent / 2, _mix(COLORS[clip.color], COLORS[clip.end_color], u)
        if clip.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif clip.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(((cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)), fill=fill)
        out[n] = np.asarray(img.resize((width, height), Image.Resampling.BOX))
    return out


def to_video_tensor(frames: list[np.ndarray]) -> np.ndarray:
    """Clips (F, H, W, 3) uint8 -> (B, 3, F, H, W) float32 in [-1, 1], the VAE's layout."""
    arr = np.stack(frames).astype(np.float32) / 127.5 - 1.0  # (B, F, H, W, 3)
    return arr.transpose(0, 4, 1, 2, 3)
