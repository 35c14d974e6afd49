"""Step checkpoints: a video request stopped after its last saved step resumes from it
and ends with exactly the frames (and MP4 bytes) of an uninterrupted run.

Tiny Wan2.2 TI2V (UniPC: a multistep scheduler whose history must be restored too),
48x48, 9 frames, 5 steps, saved every 2 steps; the first run is stopped at step 3, so
the resumed run starts from step 2 with the seed the first run drew.
"""

import os
import stat

import numpy as np
import pytest

from ithaca.config import ParallelConfig
from ithaca.models.registry import load_pipeline
from ithaca.parallel import ParallelState
from ithaca.server.media import encode_mp4
from ithaca.types import GenerationParams

REQUEST = dict(prompt="a red cat walks", negative_prompt="blurry", num_frames=9, width=48,
               height=48, num_inference_steps=5, guidance_scale=4.0)  # fmt: skip


@pytest.fixture(scope="module")
def pipe(tiny_wan):
    return load_pipeline(tiny_wan["ti2v_5b"], ParallelState.single(ParallelConfig()))


def test_resumed_video_equals_uninterrupted_run(pipe, tmp_path):
    path = str(tmp_path / "job.ckpt")
    params = dict(REQUEST, checkpoint=path, checkpoint_every=2)  # seed None: drawn
    steps = []

    def stop_at_3(event):
        steps.append(event.step)
        return event.step == 3

    first = pipe.generate([GenerationParams(**params)], stop_at_3)[0]
    assert first.metadata["cancelled"] and first.frames is None
    assert steps == [1, 2, 3]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # the saved step 2

    steps.clear()
    resumed = pipe.generate([GenerationParams(**params)], lambda e: steps.append(e.step))[0]
    assert steps == [3, 4, 5]  # steps 1-2 came from the checkpoint
    seed = resumed.metadata["seed"]
    assert seed == first.metadata["seed"]

    whole = pipe.generate([GenerationParams(**REQUEST, seed=seed)])[0]
    np.testing.assert_array_equal(resumed.frames, whole.frames)
    assert encode_mp4(resumed.frames, 16) == encode_mp4(whole.frames, 16)


def test_a_checkpoint_of_another_schedule_is_ignored(pipe, tmp_path):
    path = str(tmp_path / "job.ckpt")
    params = dict(REQUEST, checkpoint=path, checkpoint_every=1, num_inference_steps=3)
    pipe.generate([GenerationParams(**params, seed=1)], lambda e: e.step == 1)
    steps = []
    changed = dict(params, num_inference_steps=4)  # 4 steps: the saved 3-step state is stale
    pipe.generate([GenerationParams(**changed, seed=1)], lambda e: steps.append(e.step))
    assert steps == [1, 2, 3, 4]
