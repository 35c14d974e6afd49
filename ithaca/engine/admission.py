"""Admission by cost: how long and how much memory a request will take, before it runs.

A request's work per denoising step is counted in *units*:

    tokens = ceil(H / 16) * ceil(W / 16) * latent_frames      # one image's sequence
    units  = images * branches * (tokens + tokens**2 / QUADRATIC_TOKENS)

(``branches`` is 2 with classifier-free guidance; the quadratic term is attention, which
overtakes the linear layers at a few thousand tokens). Each worker group *measures*
itself: seconds per unit from the gaps between its step events, decode seconds per output
pixel from the gap between the last step and the result, and peak bytes per output pixel
from the peak memory its ranks report per batch. So the estimates hold for any model,
layout and device without a table, and the first batch on a fresh group runs unestimated
(the fixed ``step_timeout_s`` guards it).

The same numbers give the hang timeouts: a step is overdue after twice its expected time
(``/health`` turns 503) and the group is declared hung after ``factor`` times it, never
sooner than ``floor_s``. A slow-but-alive 72 s step is never killed by a 300 s constant,
and a stopped rank on a 50 ms step is found in seconds.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from ithaca.engine.errors import AdmissionError
from ithaca.types import GenerationParams

QUADRATIC_TOKENS = 16384
PATCH = 16
EMA = 0.3


@dataclass(frozen=True)
class Cost:
    """The shape of one request (or batch) after the model filled in its defaults."""

    width: int
    height: int
    steps: int
    images: int = 1
    frames: int = 1
    branches: int = 1

    @property
    def tokens(self) -> int:
        latent_frames = (self.frames - 1) // 4 + 1 if self.frames > 1 else 1
        return math.ceil(self.height / PATCH) * math.ceil(self.width / PATCH) * latent_frames

    @property
    def units(self) -> float:
        """Work of one denoising step of this request."""
        t = self.tokens
        return self.images * self.branches * (t + t * t / QUADRATIC_TOKENS)

    @property
    def pixels(self) -> int:
        """Output pixels the decode produces."""
        return self.images * self.frames * self.width * self.height


def cost_of(params: GenerationParams, resolved: dict | None = None) -> Cost:
    """The cost of one request; ``resolved`` holds the model's defaults when known."""
    r = resolved or {}
    return Cost(
        width=int(r.get("width") or params.width or 1024),
        height=int(r.get("height") or params.height or 1024),
        steps=int(r.get("steps") or params.num_inference_steps or 50),
        images=max(1, params.num_images) * max(1, params.layers or 1),
        frames=int(r.get("frames") or params.num_frames or 1),
        branches=2 if r.get("do_cfg") else 1,
    )


def batch_cost(costs: list[Cost]) -> Cost:
    """Requests of one batch share size and steps; their images add up."""
    head = costs[0]
    images = sum(c.images for c in costs)
    return Cost(head.width, head.height, head.steps, images, head.frames, head.branches)


@dataclass(frozen=True)
class Deadlines:
    """How long one batch may go without progress before it is overdue / hung."""

    step_s: float
    decode_s: float
    overdue_step_s: float
    overdue_decode_s: float
    expected_decode_s: float | None = None
    """The measured estimate of the whole decode (None before a measurement)."""
    factor: float = 10.0
    floor_s: float = 10.0

    def decode_limits(self, chunks: int) -> tuple[float, float]:
        """(overdue, hung) seconds without progress during a decode that reports
        ``chunks`` chunks: each chunk gets ``expected_decode_s / chunks`` (overdue after
        twice that, hung after ``factor`` times, never sooner than ``floor_s``), so a long
        decode that keeps reporting is alive and one that stops is found per chunk.
        Without chunks or a measurement: the whole decode's limits."""
        if chunks < 1 or self.expected_decode_s is None:
            return self.overdue_decode_s, self.decode_s
        per_chunk = self.expected_decode_s / chunks
        hung = max(self.floor_s, self.factor * per_chunk)
        return min(2 * per_chunk + 1.0, hung), hung


class CostModel:
    """Per worker group: measured rates and the estimates and deadlines drawn from them."""

    def __init__(self, factor: float = 10.0, floor_s: float = 10.0, fallback_s: float = 300.0):
        self.factor = factor
        self.floor_s = floor_s
        self.fallback_s = fallback_s
        self.s_per_unit: float | None = None
        self.decode_s_per_pixel: float | None = None
        self.bytes_per_pixel: float | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _blend(old: float | None, new: float) -> float:
        return new if old is None else (1 - EMA) * old + EMA * new

    def observe_step(self, cost: Cost, seconds: float) -> None:
        if seconds > 0 and cost.units > 0:
            with self._lock:
                self.s_per_unit = self._blend(self.s_per_unit, seconds / cost.units)

    def observe_decode(self, cost: Cost, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self.decode_s_per_pixel = self._blend(
                    self.decode_s_per_pixel, seconds / cost.pixels
                )

    def observe_memory(self, cost: Cost, peak_bytes: float) -> None:
        if peak_bytes > 0:
            with self._lock:
                self.bytes_per_pixel = self._blend(self.bytes_per_pixel, peak_bytes / cost.pixels)

    def step_seconds(self, cost: Cost) -> float | None:
        return None if self.s_per_unit is None else self.s_per_unit * cost.units

    def decode_seconds(self, cost: Cost) -> float | None:
        rate = self.decode_s_per_pixel
        return None if rate is None else rate * cost.pixels

    def seconds(self, cost: Cost) -> float | None:
        """Estimated run time of ``cost`` (steps plus decode), None before a measurement."""
        step = self.step_seconds(cost)
        if step is None:
            return None
        return step * cost.steps + (self.decode_seconds(cost) or 0.0)

    def memory_bytes(self, cost: Cost) -> float | None:
        return None if self.bytes_per_pixel is None else self.bytes_per_pixel * cost.pixels

    def deadlines(self, cost: Cost) -> Deadlines:
        step, decode = self.step_seconds(cost), self.decode_seconds(cost)
        # Unmeasured phases keep the fixed fallback; measured ones scale with their estimate.
        step_s = self.fallback_s if step is None else max(self.floor_s, self.factor * step)
        decode_s = step_s if decode is None else max(self.floor_s, self.factor * decode)
        overdue = 2 * step + 1.0 if step is not None else step_s
        overdue_decode = 2 * decode + 1.0 if decode is not None else decode_s
        return Deadlines(
            step_s,
            decode_s,
            min(overdue, step_s),
            min(overdue_decode, decode_s),
            decode,
            self.factor,
            self.floor_s,
        )


def admit(
    models: list[CostModel], cost: Cost, max_seconds: float | None, max_bytes: float | None
) -> None:
    """Raise :class:`AdmissionError` (400) when the fastest measured group estimates
    ``cost`` above ``max_seconds`` or above the memory budget (``max_bytes``, else what the
    machine has free). Before the first measurement everything is admitted."""
    measured = [m for m in models if m.s_per_unit is not None] or models
    model = min(measured, key=lambda m: m.s_per_unit or 0.0)
    seconds = model.seconds(cost)
    if max_seconds is not None and seconds is not None and seconds > max_seconds:
        raise AdmissionError(
            f"this request would take about {seconds:.0f} s ({cost.steps} steps of "
            f"{cost.width}x{cost.height}, {cost.images} image(s)), more than the server "
            f"allows ({max_seconds:.0f} s); ask for a smaller size, fewer steps or fewer images",
            "size",
        )
    memory = model.memory_bytes(cost)
    budget = max_bytes or available_memory()
    if memory is not None and budget and memory > budget:
        raise AdmissionError(
            f"this request would need about {memory / 2**30:.1f} GiB per rank "
            f"({cost.width}x{cost.height}, {cost.images} image(s), {cost.frames} frame(s)), "
            f"more than the {budget / 2**30:.1f} GiB available; ask for a smaller size "
            "or fewer images",
            "size",
        )


def available_memory() -> float | None:
    """Bytes one more request may use: the machine's MemAvailable (the front cannot see
    how ranks share it, so this is an upper bound; set ``--max-request-memory-gb`` on GPUs)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
