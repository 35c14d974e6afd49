"""Does an image show a scene? Colour segmentation, regions of mass, shape descriptors.

Pixels are labelled with the nearest palette colour (or none, when every palette
colour is far). Then, for a :class:`~tools.shapes.scenes.Scene`:

- **background**: the majority label of a 3-pixel frame around the image;
- per requested shape, the largest 4-connected region of its colour:
  - **colour**: that region's area is between 0.3x the area of a small shape of the
    requested kind and 3x that of a large one (the size is judged on its own);
  - **position**: the region's centroid lies in the requested cell of a 3x3 grid;
  - **kind**: from the region's shape: a triangle (apex up) is much narrower at a
    quarter of its height than at three quarters; of the rest a square fills its
    bounding box (>= 0.87), a circle does not (pi/4);
  - **size** (reported, no target): the region's extent against small/medium/large.

Position, kind and size count as wrong when the colour is not found.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from tools.shapes import scenes

ATTRIBUTES = ("background", "color", "position", "kind", "size")
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
MAX_COLOR_DISTANCE = 100.0
"""RGB distance beyond which a pixel is no palette colour (nearest pairs are ~85 apart)."""

_NAMES = list(scenes.COLORS)
_PALETTE = np.array([scenes.COLORS[n] for n in _NAMES], dtype=np.float32)  # (K, 3)


def label_pixels(img: Image.Image) -> np.ndarray:
    """(H, W) int: palette index of the nearest colour, -1 when none is near."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, K)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > MAX_COLOR_DISTANCE] = -1
    return labels


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (same shape)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        region, queue = [], deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def classify_kind(region: np.ndarray) -> str:
    ys, xs = np.nonzero(region)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = bottom - top + 1, right - left + 1
    fill = len(ys) / (h * w)
    width_at = [region[top + int(f * (h - 1))].sum() for f in (0.25, 0.75)]
    if width_at[0] < 0.7 * width_at[1]:
        return "triangle"
    return "square" if fill >= 0.87 else "circle"


def classify_size(region: np.ndarray, width: int, height: int) -> str:
    ys, xs = np.nonzero(region)
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / min(width, height)
    return min(scenes.SIZES, key=lambda s: abs(scenes.SIZES[s] - extent))


def cell_of(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    return min(2, int(3 * x / width)), min(2, int(3 * y / height))


@dataclass
class Verdict:
    """Per-attribute outcomes for one image: background once, the others per shape."""

    background: bool
    shapes: list[dict[str, bool]] = field(default_factory=list)
    found: dict = field(default_factory=dict)
    """What was seen (predicted background, per-shape kind/size/cell), for reports."""

    def all_correct(self) -> bool:
        return self.background and all(all(s.values()) for s in self.shapes)


def check(img: Image.Image, scene: scenes.Scene) -> Verdict:
    width, height = img.size
    labels = label_pixels(img)
    frame = np.concatenate(
        [labels[:3].ravel(), labels[-3:].ravel(), labels[:, :3].ravel(), labels[:, -3:].ravel()]
    )
    known = frame[frame >= 0]
    bg = _NAMES[np.bincount(known).argmax()] if known.size else None
    verdict = Verdict(background=bg == scene.background, found={"background": bg})
    for i, shape in enumerate(scene.shapes):
        _, _, extent = scenes.shape_box(shape, width, height)
        expected = FILL[shape.kind] * extent**2
        side = min(width, height)
        smallest = FILL[shape.kind] * (min(scenes.SIZES.values()) * side) ** 2
        largest = FILL[shape.kind] * (max(scenes.SIZES.values()) * side) ** 2
        region = largest_region(labels == _NAMES.index(shape.color))
        area = int(region.sum())
        ok = {a: False for a in ATTRIBUTES[1:]}
        seen: dict = {"area": area, "expected_area": round(expected)}
        if 0.3 * smallest <= area <= 3 * largest:
            ok["color"] = True
            ys, xs = np.nonzero(region)
            cell = cell_of(xs.mean() + 0.5, ys.mean() + 0.5, width, height)
            kind = classify_kind(region)
            size = classify_size(region, width, height)
            ok["position"] = cell == scenes.POSITIONS[shape.position]
            ok["kind"] = kind == shape.kind
            ok["size"] = size == shape.size
            seen.update(cell=cell, kind=kind, size=size)
        verdict.shapes.append(ok)
        verdict.found[f"shape{i}"] = seen
    return verdict


def accuracy(verdicts: list[Verdict]) -> dict[str, float]:
    """Fraction correct per attribute: background per image, the rest per shape."""
    out = {"background": float(np.mean([v.background for v in verdicts]))}
    shapes = [s for v in verdicts for s in v.shapes]
    for attr in ATTRIBUTES[1:]:
        out[attr] = float(np.mean([s[attr] for s in shapes]))
    out["all"] = float(np.mean([v.all_correct() for v in verdicts]))
    return out
