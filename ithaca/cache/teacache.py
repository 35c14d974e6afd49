"""TeaCache: skip the whole block stack when the timestep-modulated input barely moved.

At each forward the first block's modulated input is compared with the previous
step's (relative L1 over all valid tokens, all ranks). A per-model polynomial rescales
that change into an estimate of the output's change; the estimates accumulate, and
while the sum stays under ``rel_l1_thresh`` the step reuses the residual
``blocks_out - blocks_in`` of the last computed step instead of running the blocks.
The first and last steps always compute. ``rel_l1_thresh=0`` never skips.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from ithaca.cache.base import StepCache

logger = logging.getLogger(__name__)

FLUX_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
"""TeaCache's published FLUX.1-dev fit (ali-vilab/TeaCache, ``TeaCache4FLUX``), highest
power first: the default of every image family without a fit of its own (docs/caching.md)."""


def checkpoint_coefficients(model_dir: str | None, default: tuple[float, ...] = ()) -> tuple:
    """The coefficients fitted for a checkpoint (``teacache_coefficients`` in its
    ``ithaca.json``, written by ``ithaca calibrate-teacache --write``), else ``default``."""
    path = os.path.join(model_dir or "", "ithaca.json")
    if model_dir is None or not os.path.isfile(path):
        return tuple(default)
    with open(path) as f:
        return tuple(json.load(f).get("teacache_coefficients", default))


class TeaCache(StepCache):
    name = "tea_cache"

    def __init__(self, *args, rel_l1_thresh: float = 0.2, coefficients=None, **kwargs):
        super().__init__(*args, **kwargs)
        if not rel_l1_thresh >= 0:
            raise ValueError(f"rel_l1_thresh ({rel_l1_thresh!r}) must be >= 0")
        if self.adapter.modulated_input is None:
            raise ValueError(f"{type(self.transformer).__name__} has no TeaCache indicator")
        coefficients = coefficients or self.adapter.teacache_coefficients
        if not coefficients:
            logger.warning(
                "no TeaCache coefficients for %s: using the raw relative L1 change "
                "(run `ithaca calibrate-teacache` to fit them)",
                type(self.transformer).__name__,
            )
            coefficients = (1.0, 0.0)
        self.thresh = float(rel_l1_thresh)
        self.coefficients = tuple(float(c) for c in coefficients)

    def new_branch_state(self) -> dict:
        # accumulated: a float64 0-dim tensor on the rank's device once a distance was
        # added (read back only as the agreed decision), 0.0 after a computed step
        return {"previous": None, "accumulated": 0.0, "residual": None}

    def rescale(self, change: torch.Tensor) -> torch.Tensor:
        """The coefficients' polynomial at ``change``, on its device (Horner, highest
        power first: the same float64 operations as ``numpy.polyval``)."""
        out = torch.zeros_like(change)
        for c in self.coefficients:
            out = out * change + c
        return out

    def decide(self, indicator) -> list[bool]:
        """Per request of the call: whether it reuses its cached residual (each decision
        agreed by every rank; a request that must compute takes no part)."""
        candidates = []
        for m in self.members:
            st = m.state
            previous, st["previous"] = st["previous"], indicator[m.rows]
            first_or_last = m.step == 0 or m.step >= m.num_steps - 1
            if previous is None or st["residual"] is None or first_or_last or self.thresh == 0:
                st["accumulated"] = 0.0
            else:
                candidates.append((m, previous))
        skips = {}
        if candidates:  # the same requests on every rank: their states are agreed
            changes = self.rel_l1_each([(m.state["previous"], p) for m, p in candidates])
            for (m, _), change in zip(candidates, changes.unbind(), strict=True):
                m.state["accumulated"] = m.state["accumulated"] + self.rescale(change)
            wants = [m.state["accumulated"] < self.thresh for m, _ in candidates]
            for (m, _), skip in zip(candidates, self.agree_each(wants), strict=True):
                skips[id(m)] = skip
                if not skip:
                    m.state["accumulated"] = 0.0
        return [skips.get(id(m), False) for m in self.members]

    def run_block(self, index, call, hidden, context, bound):
        if index == 0:
            indicator = self.adapter.modulated_input(self.blocks[0], bound.arguments)
            self.settle(self.decide(indicator))
            self.blocks_in = hidden
        output = self.run_skippable(call, bound, hidden, context)
        if index < self.num_blocks - 1:
            return output
        # The last block: a skipping request adds its residual, one that computed keeps it.
        out_hidden, out_context = self.unpack(output)
        pieces = []
        for m, skip in zip(self.members, self.skips, strict=True):
            if skip:
                pieces.append(out_hidden[m.rows] + m.state["residual"])
            else:
                m.state["residual"] = out_hidden[m.rows] - self.blocks_in[m.rows]
                pieces.append(out_hidden[m.rows])
        self.blocks_in = None
        if not any(self.skips):
            return output
        return self.pack(pieces[0] if len(pieces) == 1 else torch.cat(pieces), out_context)


def fit_coefficients(input_changes, output_changes, degree: int = 4) -> list[float]:
    """Least-squares polynomial from indicator changes to output changes (calibration)."""
    x, y = np.asarray(input_changes, dtype=np.float64), np.asarray(output_changes, np.float64)
    if len(x) <= degree:
        raise ValueError(f"need more than {degree} calibration points, got {len(x)}")
    return [float(c) for c in np.polyfit(x, y, degree)]
