"""The words the default models know: colours, kinds, sizes, positions and their phrasings.

The scene generator and the tokenizer corpus (``tools/shapes``, ``tools/video``) draw
their prompts from these tables, and the server uses them to tell a user which words of
a prompt the default models have never seen (``_ithaca_vocabulary`` in their
``model_index.json``, read by ``ithaca.engine.catalog``). Runtime code, so it
lives in the package; everything that renders or trains lives in ``tools/``.
"""

from __future__ import annotations

import re

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "orange": (245, 130, 20),
    "purple": (130, 40, 180),
    "pink": (250, 140, 200),
    "cyan": (30, 210, 225),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
KINDS = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.22, "medium": 0.32, "large": 0.44}
"""Shape extent (diameter, side) as a fraction of the shorter image side."""

# 3x3 grid: (column, row) in {0, 1, 2}; centres at 1/4, 1/2 and 3/4 of the image.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "centre": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
GRID = (0.25, 0.5, 0.75)

# Wordings. Each position name maps to phrases that say it.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("at the top left", "in the top left corner", "in the upper left"),
    "top": ("at the top", "at the top centre", "near the top"),
    "top right": ("at the top right", "in the top right corner", "in the upper right"),
    "left": ("on the left", "at the left", "on the left side"),
    "centre": ("in the centre", "in the center", "in the middle"),
    "right": ("on the right", "at the right", "on the right side"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left"),
    "bottom": ("at the bottom", "at the bottom centre", "near the bottom"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("",), "large": ("large", "big")}
KIND_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",)}


SENTENCE_WORDS = ("a", "an", "on", "with", "and", "background", "against", "backdrop")
"""The glue words of the image prompts' sentence forms (``tools/shapes/scenes.describe``)."""

MOTION_WORDS = (
    "moving",
    "moves",
    "from",
    "to",
    "towards",
    "slides",
    "sliding",
    "growing",
    "grows",
    "turning",
    "turns",
    "into",
    "changing",
    "becoming",
    "then",
    "while",
    "it",
    "there",
    "stays",
    "staying",
    "still",
)
"""The extra words of the video prompts (``tools/video/clips.describe``)."""

_WORD = re.compile(r"[a-z]+")


def known_words(video: bool = False) -> frozenset[str]:
    """Every word a default model's prompts are made of (lower case)."""
    phrases = [*COLORS, *KINDS, *SIZES, *POSITIONS, *SENTENCE_WORDS]
    phrases += [p for ps in POSITION_PHRASES.values() for p in ps]
    phrases += [w for ws in (*SIZE_WORDS.values(), *KIND_WORDS.values()) for w in ws]
    if video:
        phrases += MOTION_WORDS
    return frozenset(w for p in phrases for w in _WORD.findall(p))
