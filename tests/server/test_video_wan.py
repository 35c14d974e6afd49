"""The official SDK's video flow on a real (tiny, random-weight) Wan2.2 T2V checkpoint,
served in this process through an ASGI transport: create, poll with real progress,
download an MP4 whose frame count and size are the requested ones. (Video jobs through a
real ``ithaca serve`` and its torchrun group: tests/server/test_videos.py on the pipeline
double at --usp 2, tests/server/test_loras_models.py on tiny Wan; Wan's 2-rank layouts
against one rank: tests/models/test_wan*.py.)"""

import io
import time

import av
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture(scope="module")
def server(model_server, tiny_wan):
    return model_server(tiny_wan["t2v_a14b"], "tiny-wan")


def test_sdk_video_on_wan(server):
    client = server.openai(api_key="x", max_retries=0, timeout=120)
    video = client.videos.create(
        model="tiny-wan", prompt="a cat walks on the beach", size="64x48", seconds="1",
        extra_body={"num_frames": 5, "fps": 8, "num_inference_steps": 3, "seed": 0},
    )  # fmt: skip
    assert video.status == "queued"
    deadline = time.monotonic() + 180
    progress = []
    while video.status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
        video = client.videos.retrieve(video.id)
        progress.append(video.progress)
    assert video.status == "completed", video.error
    assert video.size == "64x48" and progress[-1] == 100
    blob = client.videos.download_content(video.id).read()
    with av.open(io.BytesIO(blob)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3)
