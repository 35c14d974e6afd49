"""An out-of-memory error on one rank fails that request, not the worker group.

A real torchrun group (--usp 2, gloo) runs a pipeline double whose rank 1 raises
``torch.OutOfMemoryError`` in the middle of a request, while rank 0 waits in that
step's all-reduce. The request must fail with the out-of-memory message naming rank 1,
quickly (not after the step timeout), and the same processes must serve the next
request with the right result.
"""

import time

import numpy as np
import pytest
import torch

from ithaca.config import ParallelConfig
from ithaca.engine.engine import Engine
from ithaca.engine.errors import GenerationFailedError
from ithaca.engine.executor import InProcessExecutor, PipelineSpec
from ithaca.engine.group import WorkerGroupExecutor
from ithaca.parallel.comm import all_reduce
from ithaca.types import GenerationParams
from tests.engine.doubles import FakePipeline
from tests.server.harness import FAKE, REPO

OOM_PROMPT = "too large"
BUG_PROMPT = "a bug"


class OomOnRank1(FakePipeline):
    """The fake pipeline; on ``OOM_PROMPT`` rank 1 runs out of memory after one step."""

    def generate(self, batch, callback=None, on_decode=None):
        prompt = batch[0].prompt
        if self.state.rank == 1 and prompt in (OOM_PROMPT, BUG_PROMPT):
            lat = self._latents(batch[0], 0, batch[0].height, batch[0].width)
            all_reduce(lat, self.state.replica)  # step 1 with its peer, then the failure
            if prompt == BUG_PROMPT:
                raise RuntimeError("index 7 is out of bounds (injected by the test)")
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)"
            )
        return super().generate(batch, callback, on_decode)


def make(state, **kwargs):
    return OomOnRank1(state, **kwargs)


def P(prompt="a cat", seed=0):
    return GenerationParams(prompt, width=32, height=32, num_inference_steps=3, seed=seed)


def test_an_oom_on_one_rank_fails_the_request_and_the_group_serves_the_next():
    group = WorkerGroupExecutor(
        PipelineSpec(
            "tests.engine.test_worker_oom:make",
            parallel=ParallelConfig(ulysses_degree=2, collective_timeout_s=20.0),
        ),
        env={"PYTHONPATH": REPO},
    )
    engine = Engine([group], max_batch_size=1)
    engine.start(timeout=120)
    try:
        pids = group.pids()
        start = time.monotonic()
        with pytest.raises(GenerationFailedError) as info:
            engine.generate(P(OOM_PROMPT), timeout=60)
        took = time.monotonic() - start
        assert info.value.kind == "out_of_memory"
        message = str(info.value)
        assert message.startswith("rank 1: out of device memory (CUDA out of memory.")
        assert "lower the resolution" in message
        # Rank 0 was released by rank 1 closing its groups, not by a timeout.
        assert took < 20.0, took
        # Any other error: the failing rank is named, not the peer its exit released.
        with pytest.raises(GenerationFailedError, match=r"^rank 1: RuntimeError: index 7"):
            engine.generate(P(BUG_PROMPT), timeout=60)
        # Same processes, fresh groups: the next request is served, and right.
        out = engine.generate(P(seed=7), timeout=60)
        assert group.pids() == pids and engine.alive
        twin = InProcessExecutor(PipelineSpec(FAKE))
        twin.start()
        ref = twin.execute([P(seed=7)], lambda e: False)[0]
        assert np.array_equal(np.asarray(out.images[0]), np.asarray(ref.images[0]))
    finally:
        engine.shutdown()
