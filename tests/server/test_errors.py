"""Every error class of the HTTP API, with its status and body shape, on a real server."""

import concurrent.futures as cf
import logging
import re
import time

import httpx
import pytest

from tests.server.conftest import API_KEY
from tests.server.harness import metric

OK = {"prompt": "a cat", "size": "32x32", "num_inference_steps": 2}


def assert_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body  # never FastAPI's {"detail": ...}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize(
    "patch, param",
    [
        ({"n": 11}, "n"),
        ({"n": 0}, "n"),
        ({"size": "huge"}, "size"),
        ({"size": "8x8"}, "size"),
        ({"partial_images": 4}, "partial_images"),
        ({"output_format": "gif"}, "output_format"),
        ({"response_format": "xml"}, "response_format"),
        ({"output_compression": 101}, "output_compression"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": None}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"seed": -1}, "seed"),
        ({"cache_backend": "fast_cache"}, "cache_backend"),
        ({"cache_backend": "tea_cache", "cache_config": {"thresh": 1}}, "cache_config"),
        ({"cache_config": {"rel_l1_thresh": 0.1}}, "cache_config"),
        ({"cache_backend": "tea_cache", "cache_config": "{not json"}, "cache_config"),
    ],
)
def test_validation_errors_are_400_with_param(app, patch, param):
    r = app.post("/v1/images/generations", json={**OK, **patch})
    err = assert_error(r, 400, param=param)
    assert err["type"] == "invalid_request_error"


def test_missing_prompt_and_bad_json(app):
    c = app
    assert_error(c.post("/v1/images/generations", json={"n": 1}), 400, param="prompt")
    assert_error(c.post("/v1/images/generations", content=b"{nope"), 400, code="invalid_json")
    assert_error(c.post("/v1/images/generations", json=[1, 2]), 400, code="invalid_json")


def test_pipeline_value_error_is_400(app):
    r = app.post("/v1/images/generations", json={**OK, "size": "24x32"})
    err = assert_error(r, 400)
    assert "multiple of 16" in err["message"]


def test_null_for_every_optional_field_and_unknown_fields_are_ignored(app, caplog):
    caplog.set_level(logging.INFO, logger="ithaca.server")
    nulls = {
        k: None
        for k in [
            "model",
            "n",
            "size",
            "quality",
            "response_format",
            "output_format",
            "output_compression",
            "background",
            "user",
            "stream",
            "partial_images",
            "moderation",
            "negative_prompt",
            "guidance_scale",
            "true_cfg_scale",
            "seed",
        ]
    }
    body = {**nulls, "prompt": "a cat", "num_inference_steps": 2, "frobnicate": 3}
    r = app.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1 and r.json()["size"] == "64x64"  # double's default
    queue, engine = (float(r.headers[f"x-ithaca-{k}-seconds"]) for k in ("queue", "engine"))
    assert 0 <= queue <= engine < 30
    assert "ignoring unknown fields frobnicate" in caplog.text


def test_unknown_model_is_404(app):
    c = app
    assert_error(
        c.post("/v1/images/generations", json={**OK, "model": "dall-e-9"}),
        404,
        param="model",
        code="model_not_found",
    )
    assert_error(c.get("/v1/models/dall-e-9"), 404, param="model", code="model_not_found")
    served = c.get("/v1/models").json()["data"][0]["id"]
    assert c.get(f"/v1/models/{served}").json()["id"] == served


def test_unknown_route_and_method_keep_the_error_shape(app):
    assert_error(app.get("/v1/nothing-here"), 404, code="not_found")
    assert_error(app.get("/v1/images/generations"), 405)


def test_api_key_guards_v1_only(app):
    anon = app.client_with({})

    def get(url, **kw):
        return app.get(url, client=anon, **kw)

    assert_error(get("/v1/models"), 401, code="invalid_api_key")
    wrong = {"Authorization": "Bearer sk-wrong"}
    assert_error(get("/v1/models", headers=wrong), 401, code="invalid_api_key")
    right = {"Authorization": f"Bearer {API_KEY}"}
    assert get("/v1/models", headers=right).status_code == 200
    assert get("/health").status_code == 200
    assert get("/ready").status_code == 200
    assert get("/metrics").status_code == 200


def test_request_id_is_echoed_or_generated(app):
    c = app
    r = c.get("/v1/models", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = c.post("/v1/images/generations", json={"n": 20, "prompt": "x"})
    assert r.status_code == 400 and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_queue_full_is_429_with_retry_after(app):
    # Six requests of different sizes (no batching), 1 s each: one runs, two wait
    # (--max-queue-size 2), the rest are refused at once.
    sizes = [32, 48, 64, 80, 96, 112]

    def post(size):
        body = {"prompt": "a cat", "size": f"{size}x{size}", "num_inference_steps": 20}
        return app.post("/v1/images/generations", json=body)

    with cf.ThreadPoolExecutor(6) as pool:
        futures = []
        for s in sizes:
            futures.append(pool.submit(post, s))
            time.sleep(0.05)  # keep arrival order
        responses = [f.result(60) for f in futures]
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 3 and codes.count(429) == 3, codes
    for r in responses:
        if r.status_code == 429:
            assert_error(r, 429, code="rate_limit_exceeded")
            assert int(r.headers["Retry-After"]) >= 1


def test_edit_input_errors(app):
    c = app
    form = {"prompt": "make it blue", "size": "32x32"}
    assert_error(c.post("/v1/images/edits", data=form, files={"x": ("a", b"1")}), 400, "image")
    r = c.post("/v1/images/edits", data=form, files={"image": ("a.png", b"not an image")})
    assert_error(r, 400, "image", code="invalid_image_format")
    from tests.server.test_units import png_bytes

    many = [("image[]", (f"{i}.png", png_bytes(), "image/png")) for i in range(17)]
    assert_error(c.post("/v1/images/edits", data=form, files=many), 400, "image")
    r = c.post("/v1/images/edits", data={**form, "n": "eleven"}, files={"image": png_bytes()})
    assert_error(r, 400, "n")
    body = {**OK, "images": [{"file_id": "file-123"}]}
    assert_error(c.post("/v1/images/edits", json=body), 400, "images[0]")
    assert_error(c.post("/v1/images/edits", json={**OK, "images": []}), 400, "images")


def test_client_disconnect_cancels_between_steps(fake_server):
    before = metric(fake_server.client.get("/metrics").text, "ithaca_request_failures_total",
                    'reason="cancelled"')  # fmt: skip
    body = {"prompt": "a cat", "size": "32x32", "num_inference_steps": 400}  # 20 s if not cancelled
    with pytest.raises(httpx.ReadTimeout):
        fake_server.client.post("/v1/images/generations", json=body, timeout=1.0)
    deadline = time.monotonic() + 5
    while True:
        text = fake_server.client.get("/metrics").text
        if metric(text, "ithaca_request_failures_total", 'reason="cancelled"') == before + 1:
            break
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.1)
    t0 = time.monotonic()
    assert fake_server.client.post("/v1/images/generations", json=OK).status_code == 200
    assert time.monotonic() - t0 < 5  # the worker is free again
