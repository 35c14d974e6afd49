"""CFG-parallel: the two guidance branches on the two halves of the cfg axis.

With ``cfg_parallel_size=2`` cfg rank 0 runs the positive (conditional) branch and cfg
rank 1 the negative one, each possibly sequence-parallel inside. The two noise
predictions are all-gathered so every rank holds both, bit for bit, and every rank
runs the same guidance and scheduler step: no latents are broadcast afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ithaca.parallel import comm
from ithaca.parallel.state import ParallelState

POSITIVE, NEGATIVE = 0, 1


def predict_branches(
    state: ParallelState,
    predict: Callable[[int], torch.Tensor],
    do_cfg: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``predict(POSITIVE)`` and, with ``do_cfg``, ``predict(NEGATIVE)``.

    Serial on one cfg rank; split across the cfg axis on two. Returns ``(positive,
    negative or None)``, the same on every rank. Collective over the cfg axis.
    """
    cfg = state.cfg
    if not do_cfg:
        return predict(POSITIVE), None
    if cfg.size == 1:
        return predict(POSITIVE), predict(NEGATIVE)
    mine = predict(cfg.rank)  # cfg rank 0 -> positive, 1 -> negative
    # (1, ...) from each cfg rank -> (2, ...) in cfg-rank order
    both = comm.all_gather(mine.unsqueeze(0), cfg, dim=0)
    return both[POSITIVE], both[NEGATIVE]


def idle_branch_warning(state: ParallelState, do_cfg: bool) -> str | None:
    """What to tell the user when CFG-parallel ranks have no negative branch to run."""
    if state.cfg.size == 1 or do_cfg:
        return None
    return (
        f"cfg_parallel_size={state.cfg.size} but this request runs no true CFG (no negative "
        f"branch: it needs true_cfg_scale > 1 and a negative_prompt, an empty one counts), "
        f"so the second cfg rank group idles; pass a negative_prompt or serve with "
        f"cfg_parallel_size=1"
    )


def apply_guidance(
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    scale: float,
    rescale_to_positive_norm: bool = False,
) -> torch.Tensor:
    """``negative + scale * (positive - negative)``.

    ``rescale_to_positive_norm`` rescales the result to the norm of the positive
    prediction over the last dimension, as Qwen-Image's pipeline does.
    """
    if negative is None:
        return positive
    combined = negative + scale * (positive - negative)
    if rescale_to_positive_norm:
        cond_norm = torch.norm(positive, dim=-1, keepdim=True)
        comb_norm = torch.norm(combined, dim=-1, keepdim=True)
        combined = combined * (cond_norm / comb_norm)
    return combined
