"""Loss curves as a PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

PANEL_W, PANEL_H, MARGIN = 480, 300, 48
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44))


def _smooth(values: list[float], k: int = 9) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def _panel(draw: ImageDraw.ImageDraw, x0: int, title: str, series: dict) -> None:
    """One log-scale panel at horizontal offset ``x0``; ``series``: name -> (steps, values)."""
    points = [(s, v) for steps, vals in series.values() for s, v in zip(steps, vals, strict=True)]
    points = [(s, v) for s, v in points if v > 0]
    if not points:
        return
    smax = max(s for s, _ in points) or 1
    lo = math.log10(min(v for _, v in points))
    hi = math.log10(max(v for _, v in points))
    hi = hi if hi > lo else lo + 1
    left, top = x0 + MARGIN, MARGIN // 2
    w, h = PANEL_W - MARGIN - 12, PANEL_H - MARGIN - 12
    draw.rectangle((left, top, left + w, top + h), outline=(0, 0, 0))
    draw.text((left, 4), title, fill=(0, 0, 0))
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = math.log10(m) + e
            if lo <= v <= hi:
                y = top + h - (v - lo) / (hi - lo) * h
                draw.line((left - 4, y, left, y), fill=(0, 0, 0))
                draw.text((x0 + 2, y - 6), f"{m * 10.0**e:.0e}", fill=(0, 0, 0))
    draw.text((left, top + h + 4), "0", fill=(0, 0, 0))
    draw.text((left + w - 30, top + h + 4), f"{smax}", fill=(0, 0, 0))
    draw.text((left + w // 2 - 10, top + h + 4), "step", fill=(0, 0, 0))
    for i, (name, (steps, vals)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        xy = [
            (left + s / smax * w, top + h - (math.log10(v) - lo) / (hi - lo) * h)
            for s, v in zip(steps, vals, strict=True)
            if v > 0
        ]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        draw.text((left + w - 150, top + 6 + 14 * i), name, fill=color)


def plot_log(log_path: str | Path, png_path: str | Path) -> None:
    """VAE reconstruction and transformer flow-matching loss (train smoothed, held-out)."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]

    def series(stage: str, key: str = "loss", smooth: bool = True):
        rows = [r for r in records if r.get("stage") == stage and key in r]
        vals = [r[key] for r in rows]
        return [r["step"] for r in rows], _smooth(vals) if smooth else vals

    img = Image.new("RGB", (2 * PANEL_W, PANEL_H), "white")
    draw = ImageDraw.Draw(img)
    _panel(
        draw,
        0,
        "VAE (log scale)",
        {"decoder L1+MSE": series("vae_decoder"), "encoder MSE": series("vae_encoder")},
    )
    _panel(
        draw,
        PANEL_W,
        "transformer flow matching (log scale)",
        {
            "train (smoothed)": series("transformer"),
            "held-out": series("transformer_val", smooth=False),
        },
    )
    img.save(png_path)
