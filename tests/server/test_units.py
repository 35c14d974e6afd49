"""Media, protocol and store units: no processes."""

import io
import time

import av
import numpy as np
import pytest
from PIL import Image

from ithaca.server import media
from ithaca.server.errors import APIError
from ithaca.server.outputs import OutputStore
from ithaca.server.protocol import ImageRequest, VideoRequest, parse_size
from ithaca.server.video_store import VideoStore


def png_bytes(size=(16, 16), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_and_sniff_round_trip(fmt):
    img = Image.new("RGB", (24, 16), (10, 200, 30))
    data = media.encode_image(img, fmt, 20)
    assert media.sniff_image(data) == fmt
    back = media.decode_image(data, "image")
    assert back.size == (24, 16)
    assert np.abs(np.asarray(back.convert("RGB"), int) - [10, 200, 30]).max() <= 8


def test_decode_rejects_non_images_and_reads_data_urls():
    with pytest.raises(APIError) as info:
        media.decode_image(b"GIF89a-but-truncated", "image")
    assert info.value.status == 400 and info.value.param == "image"
    url = "data:image/png;base64," + media.b64(png_bytes((8, 4)))
    assert media.decode_data_url(url, "images[0].image_url").size == (8, 4)
    with pytest.raises(APIError):
        media.decode_data_url("https://example.com/cat.png", "images[0].image_url")


def test_mp4_is_h264_yuv420p_with_every_frame():
    frames = np.random.default_rng(0).integers(0, 255, (9, 32, 48, 3), dtype=np.uint8)
    data = media.encode_mp4(frames, fps=8)
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.format.name == "yuv420p"
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    assert len(decoded) == 9 and decoded[0].shape == (32, 48, 3)


def test_protocol_sizes_and_params():
    assert parse_size("auto") == (None, None) and parse_size("64x32") == (64, 32)
    p = ImageRequest.model_validate({"prompt": "x", "n": "2", "size": "64x32", "stream": "true",
                                     "partial_images": "2", "seed": "5"}).to_params()  # fmt: skip
    assert (p.num_images, p.width, p.height, p.partial_images, p.seed) == (2, 64, 32, 2, 5)
    assert (
        ImageRequest.model_validate({"prompt": "x", "partial_images": 2}).to_params().partial_images
        == 0
    )
    v = VideoRequest.model_validate({"prompt": "x", "seconds": "4", "fps": 4}).to_params()
    assert v.num_frames == 17 and (v.num_frames - 1) % 4 == 0


def test_output_store_expires(tmp_path):
    store = OutputStore(str(tmp_path), ttl_s=0.2)
    name, _ = store.put(b"abc", "png")
    with open(store.path(name), "rb") as f:
        assert f.read() == b"abc"
    assert store.path("../etc/passwd") is None
    time.sleep(0.3)
    assert store.path(name) is None and store.sweep() == 0
    assert not list(tmp_path.iterdir())


def test_video_store_survives_reopen_requeues_what_can_rerun(tmp_path):
    store = VideoStore(str(tmp_path), ttl_s=60)
    for i in range(3):
        store.create(f"video_{i}", "m", "p", "4", "32x32")  # no parameters (older database)
    store.create("video_3", "m", "p", "4", "32x32", params='{"prompt": "p", "seed": 3}')
    store.update("video_0", status="completed", progress=100, path="/x.mp4")
    store.update("video_1", status="in_progress", progress=40)
    store.update("video_3", status="in_progress", progress=70)
    page, more = store.list(None, 2, "desc")
    assert [j.id for j in page] == ["video_3", "video_2"] and more
    page, more = store.list("video_1", 2, "desc")
    assert [j.id for j in page] == ["video_0"] and not more
    store.close()
    store = VideoStore(str(tmp_path), ttl_s=60)
    assert (store.requeued, store.failed_on_open) == (1, 2)
    assert store.get("video_0").status == "completed"
    for vid in ("video_1", "video_2"):
        job = store.get(vid).to_openai()
        assert job["status"] == "failed" and job["error"]["code"] == "server_restarted"
        assert job["progress"] == 0 and job["expires_at"] - job["completed_at"] == 60
    assert [(j.id, j.status, j.progress) for j in store.unfinished()] == [("video_3", "queued", 0)]
