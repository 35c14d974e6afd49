"""Step checkpoints: a long request (a video job) resumes from its last saved step.

A request whose ``params.checkpoint`` names a file runs alone. Every
``params.checkpoint_every`` steps the returning rank saves, to that file (0600, written
whole then renamed into place):

- ``step``: steps done;
- ``latents``: the loop's latents after them;
- ``seed``: the seed the first run drew (the metadata of the resumed run reports it);
- ``scheduler``: the scheduler's plain state (step index, and a multistep solver's
  history: UniPC's ``model_outputs``, ``last_sample``, ``lower_order_nums`` ...), so the
  next step is the very step the uninterrupted run would have taken.

At the start of such a request the returning rank reads the file, if there is one,
and broadcasts it to the replica (every rank must agree to resume and from where);
:meth:`DenoisingPipeline.denoise` then runs ``ResumeState(step, latents)``. The file
belongs to whoever set the path (the server removes a video job's when the job ends).
Saving copies the latents to the host every ``checkpoint_every`` steps (a device sync
that often, never per step).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from ithaca.parallel import comm

logger = logging.getLogger(__name__)

_PLAIN = (torch.Tensor, int, float, bool, list, tuple, type(None))


def _scheduler_state(scheduler) -> dict:
    """The scheduler's own mutable fields (tensors, numbers, lists), not its config."""
    state = {}
    for name, value in vars(scheduler).items():
        if name in ("config", "_internal_dict") or not isinstance(value, _PLAIN):
            continue
        state[name] = _to(value, "cpu")
    return state


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device) for v in value)
    return value


@dataclass
class ResumeState:
    """Where an interrupted loop stands: ``latents`` after ``step`` steps.

    ``denoise(job, resume=ResumeState(k, latents_k))`` runs steps ``k..N-1`` and ends
    with the same latents as an uninterrupted run (the scheduler starts at index ``k``).
    """

    step: int
    latents: torch.Tensor


class StepCheckpoint:
    """Save and restore one request's loop state (see the module docstring)."""

    def __init__(self, pipeline, path: str, every: int):
        if every < 1:
            raise ValueError(f"checkpoint_every ({every}) must be >= 1")
        self.pipeline = pipeline
        self.path = path
        self.every = every

    @classmethod
    def of(cls, pipeline, requests) -> StepCheckpoint | None:
        """The checkpoint of a group of one request that asks for one, else None."""
        if len(requests) != 1 or not requests[0].params.checkpoint:
            return None
        params = requests[0].params
        return cls(pipeline, params.checkpoint, params.checkpoint_every)

    def load(self, job) -> tuple[int, torch.Tensor, int] | None:
        """``(step, latents, seed)`` to resume from, the scheduler restored; None to start
        afresh. Collective over the replica (one broadcast)."""
        pipeline = self.pipeline
        saved = None
        if pipeline.is_returning_rank and os.path.exists(self.path):
            try:
                saved = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception:  # a torn or foreign file: start afresh rather than fail
                logger.exception("step checkpoint %s unreadable; starting from step 0", self.path)
        if pipeline.state.replica.size > 1:
            # Every rank of the replica reaches this broadcast once per checkpointed request.
            saved = comm.broadcast_object(saved, pipeline.state.replica)
        if saved is None or saved["total"] != len(job.timesteps):
            return None
        for name, value in saved["scheduler"].items():
            setattr(job.scheduler, name, _to(value, pipeline.device))
        latents = saved["latents"].to(job.latents.device, job.latents.dtype)
        return saved["step"], latents, saved["seed"]

    def after_step(self, done: int, job) -> None:
        """Save after ``done`` steps when due (returning rank; not after the last step)."""
        total = len(job.timesteps)
        if not self.pipeline.is_returning_rank or done % self.every or done >= total:
            return
        state = {
            "step": done,
            "total": total,
            "seed": job.seeds[0],
            "latents": job.latents.detach().cpu(),
            "scheduler": _scheduler_state(job.scheduler),
        }
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.remove(self.path)
