"""Regression tests of issue 20 on the in-process app: each defect a tester found, with
the numbers that show it fixed (limits, bad input that used to be a 500, the poisoned
batch, admission by cost, leaks, state file modes, log forging, video job expiry)."""

import concurrent.futures as cf
import logging
import os
import stat
import struct
import time
import zlib

import pytest

from tests.server.harness import fake_app
from tests.server.test_errors import OK, assert_error
from tests.server.test_units import png_bytes

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """An app with every limit small enough to hit with small inputs."""
    client = fake_app(
        str(tmp_path_factory.mktemp("tight")),
        max_body_bytes=8192,
        max_input_pixels=64 * 64,
        max_output_pixels=64 * 64,
        max_steps=8,
        max_n=2,
        max_frames=9,
        batch_wait_ms=300,  # the concurrent requests below meet in one batch
    )
    try:
        yield client
    finally:
        client.close()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG whose header claims ``width x height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "patch, param",
    [
        ({"size": "128x64"}, "size"),  # 8192 pixels > 4096
        ({"num_inference_steps": 9}, "num_inference_steps"),
        ({"n": 3}, "n"),
    ],
)
def test_limits_are_400_naming_the_param(tight, patch, param):
    err = assert_error(tight.post(GEN, json={**OK, **patch}), 400, param=param)
    assert "limit" in err["message"]


def test_video_frame_limit(tight):
    body = {"prompt": "a cat", "size": "32x32", "num_frames": 13, "num_inference_steps": 2}
    assert_error(tight.post("/v1/videos", json=body), 400, param="num_frames")
    # seconds x fps beyond the limit names the same field
    body = {"prompt": "a cat", "size": "32x32", "seconds": "4", "fps": 8}
    assert_error(tight.post("/v1/videos", json=body), 400, param="num_frames")


def test_oversized_body_is_413_declared_or_chunked(tight):
    big = b'{"prompt": "' + b"a" * 10_000 + b'"}'
    r = tight.post(GEN, content=big, headers={"content-type": "application/json"})
    assert_error(r, 413, code="request_too_large")

    async def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = tight.post(GEN, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, code="request_too_large")


def test_too_many_pixels_are_refused_before_decoding(tight, app):
    form = {"prompt": "make it blue", "size": "32x32"}
    r = tight.post("/v1/images/edits", data=form, files={"image": png_bytes(size=(65, 64))})
    err = assert_error(r, 413, param="image", code="image_too_large")
    assert "65x64" in err["message"]
    # A 100000 x 100000 header (a decompression bomb) on the default limit: 413, not 500.
    r = app.post("/v1/images/edits", data=form, files={"image": ("b.png", bomb_png())})
    assert_error(r, 413, param="image", code="image_too_large")
    import base64

    url = "data:image/png;base64," + base64.b64encode(bomb_png()).decode()
    r = app.post("/v1/images/edits", json={**form, "images": [{"image_url": url}]})
    assert_error(r, 413, param="images[0].image_url", code="image_too_large")
    truncated = png_bytes(size=(32, 32))[:-30]
    r = app.post("/v1/images/edits", data=form, files={"image": ("t.png", truncated)})
    assert_error(r, 400, param="image", code="invalid_image")


def test_former_500s_are_400s(app):
    nested = b"[" * 100_000 + b"]" * 100_000
    r = app.post(GEN, content=nested, headers={"content-type": "application/json"})
    assert_error(r, 400, code="invalid_json")
    huge_seed = b'{"prompt": "a cat", "seed": ' + b"9" * 5000 + b"}"
    r = app.post(GEN, content=huge_seed, headers={"content-type": "application/json"})
    assert_error(r, 400, code="invalid_json")
    r = app.post("/v1/images/edits", data={"prompt": "x", "seed": "9" * 5000},
                 files={"image": png_bytes()})  # fmt: skip
    assert_error(r, 400, param="seed")
    assert_error(app.get("/outputs/%00"), 404, code="not_found")
    assert_error(app.get("/outputs/..%2f..%2fetc%2fpasswd"), 404)


def test_small_protocol_defects(app):
    for size in ["64x64\n", "６４x64", " 64x64", "64X64"]:
        assert_error(app.post(GEN, json={**OK, "size": size}), 400, param="size")
    for field in ["n", "num_inference_steps", "seed", "guidance_scale"]:
        assert_error(app.post(GEN, json={**OK, field: False}), 400, param=field)
    r = app.post(GEN, content=b'{"prompt": "a cat"}', headers={"content-type": "text/plain"})
    assert_error(r, 415, code="unsupported_media_type")
    r = app.request("TRACE", GEN)
    assert_error(r, 405, code="method_not_allowed")
    assert r.headers["allow"] == "POST"
    # a pipeline ValueError reads as the model wrote it, no "ValueError: " prefix
    err = assert_error(app.post(GEN, json={**OK, "size": "24x32"}), 400)
    assert err["message"] == "width (24) must be a multiple of 16"
    # a malformed multipart body names the file field and has a code
    r = app.post(
        "/v1/images/edits",
        content=b"--x\r\nbroken",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    err = assert_error(r, 400, param="image")
    assert err["code"] is not None


def test_one_bad_request_does_not_fail_its_batch(tight):
    pipeline = tight.app.state.ithaca.engine.executors[0].pipeline
    prompts = ["a cat", "a dog", "poison", "a bird"]

    def post(prompt):
        return tight.post(GEN, json={**OK, "prompt": prompt, "seed": 1})

    for _ in range(3):
        before = len(pipeline.calls)
        with cf.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(post, prompts))
        codes = [r.status_code for r in responses]
        assert codes == [200, 200, 400, 200], codes
        assert "poisoned" in responses[2].json()["error"]["message"]
        calls = pipeline.calls[before:]
        # batched with the poisoned one, then that batch's requests each alone
        assert max(calls) > 1 and calls.count(1) >= max(calls), calls


def test_a_request_invalid_alone_never_joins_a_batch(tight):
    pipeline = tight.app.state.ithaca.engine.executors[0].pipeline
    before = len(pipeline.calls)
    bodies = [{**OK, "seed": i} for i in range(3)] + [{**OK, "size": "24x32"}]
    with cf.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda b: tight.post(GEN, json=b), bodies))
    assert [r.status_code for r in responses] == [200, 200, 200, 400]
    assert sum(pipeline.calls[before:]) == 3  # the invalid one never reached generate()


def test_internal_failures_leak_nothing(app, caplog):
    caplog.set_level(logging.INFO)
    r = app.post(GEN, json={**OK, "prompt": "crash"}, headers={"x-request-id": "rid-crash-1"})
    err = assert_error(r, 500)
    assert "/srv" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    assert "/srv/secret" in caplog.text and "rid-crash-1" in caplog.text  # the log has it
    health = app.get("/health").json()
    assert set(health["groups"][0]) == {"model", "name", "alive", "status", "ranks"}
    assert err["type"] == "server_error"


def test_log_lines_escape_client_text(app, caplog):
    caplog.set_level(logging.INFO, logger="ithaca.server")
    r = app.post(GEN, json={**OK, "x\nINFO forged line": 1}, headers={"x-request-id": "a\tb"})
    assert r.status_code == 200
    line = next(m for m in caplog.messages if "ignoring unknown fields" in m)
    assert "\n" not in line and "\\n" in line
    assert r.headers["x-request-id"] != "a\tb"  # an unsafe id is replaced


def test_state_files_are_private(app):
    state = app.app.state.ithaca
    r = app.post(GEN, json={**OK, "response_format": "url"})
    name = r.json()["data"][0]["url"].rsplit("/", 1)[1]
    root = os.path.dirname(state.outputs.directory)

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(root) == mode(state.outputs.directory) == mode(state.videos.files) == 0o700
    assert mode(os.path.join(state.outputs.directory, name)) == 0o600
    assert mode(os.path.join(root, "videos.sqlite3")) == 0o600


def test_admission_refuses_what_would_take_too_long(tmp_path):
    client = fake_app(str(tmp_path), step_s=0.02, max_request_seconds=1.0)
    try:
        body = {**OK, "num_inference_steps": 100}
        assert client.post(GEN, json=body).status_code == 200  # nothing measured yet: runs
        err = assert_error(client.post(GEN, json=body), 400, param="size")
        assert err["code"] == "request_too_large" and "about 2 s" in err["message"]
        assert client.post(GEN, json={**OK, "num_inference_steps": 10}).status_code == 200
    finally:
        client.close()


def test_video_job_errors_and_expiry(app):
    import base64

    ref = {"image_url": "data:image/png;base64," + base64.b64encode(png_bytes()).decode()}
    body = {"prompt": "a cat", "size": "32x32", "num_frames": 1, "num_inference_steps": 2}
    r = app.post("/v1/videos", json={**body, "input_reference": ref})
    assert_error(r, 400)  # refused at once, not a job that fails later
    job = app.post("/v1/videos", json=body).json()
    deadline = time.monotonic() + 30
    while (done := app.get(f"/v1/videos/{job['id']}").json())["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ttl = app.app.state.ithaca.config.video_ttl_s
    assert done["expires_at"] - done["completed_at"] == int(ttl)
    failed = app.post("/v1/videos", json={**body, "prompt": "crash"}).json()
    while (got := app.get(f"/v1/videos/{failed['id']}").json())["status"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert got["progress"] == 0 and got["expires_at"] is not None
    assert "/srv" not in str(got["error"])
    store = app.app.state.ithaca.videos
    store.update(job["id"], expires_at=int(time.time()) - 1)
    path = store.video_path(job["id"])
    assert store.sweep() >= 1 and not os.path.exists(path)
    assert_error(app.get(f"/v1/videos/{job['id']}"), 404, param="video_id")


def test_health_is_503_while_a_step_is_overdue(app, monkeypatch):
    executor = app.app.state.ithaca.engine.executors[0]
    monkeypatch.setattr(executor, "overdue", lambda: True)
    err = assert_error_with_groups(app.get("/health"), 503)
    assert err["code"] == "step_overdue"
    monkeypatch.undo()
    assert app.get("/health").status_code == 200


def assert_error_with_groups(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "groups"}
    return body["error"]
