"""The official openai SDK against ``ithaca serve`` on the embedded tiny Qwen-Image
checkpoint, worker group at --usp 2 (gloo): the client of record for the image API."""

import base64
import concurrent.futures as cf
import io
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from ithaca.server.media import sniff_image
from tests.server.harness import REPO, metric

SMALL = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(serve):
    # The image model alone (with no model the server also runs the default video model,
    # tested in tests/models/test_default_video.py): these tests count its ranks.
    from ithaca.engine.executor import default_model_path

    return serve(default_model_path(), "--served-model-name", "ithaca-default",
                 "--usp", "2", "--max-batch-size", "4", "--batch-wait-ms", "300",
                 "--max-queue-size", "32", "--max-steps", "1000")  # fmt: skip


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def gen(client, seed, **kw):
    kw.setdefault("size", "64x64")
    return client.images.generate(
        model="ithaca-default", prompt="a red cat", extra_body={**SMALL, "seed": seed}, **kw
    )


def test_generate_b64_png_two_images(client):
    res = gen(client, 3, n=2)
    assert len(res.data) == 2 and res.output_format == "png" and res.size == "64x64"
    images = [decode(d.b64_json) for d in res.data]
    assert all(im.format == "PNG" and im.size == (64, 64) for im in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # n draws n samples


def test_generate_url_webp(client, server):
    res = gen(client, 3, response_format="url", output_format="webp", size="96x64")
    url = res.data[0].url
    assert url.startswith(server.url + "/outputs/")
    blob = httpx.get(url, timeout=30).content
    assert sniff_image(blob) == "webp"
    assert Image.open(io.BytesIO(blob)).size == (96, 64)


def test_server_image_equals_offline_generate(client, tmp_path):
    res = gen(client, 11)
    served = np.asarray(decode(res.data[0].b64_json).convert("RGB"))
    out = tmp_path / "offline.png"
    cmd = [sys.executable, "-m", "ithaca.cli", "generate", "--prompt", "a red cat", "--seed", "11",
           "--width", "64", "--height", "64", "--num-inference-steps", "2", "--usp", "2",
           "--output", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, timeout=240, capture_output=True)
    offline = np.asarray(Image.open(out).convert("RGB"))
    # Exact by construction: same layout (--usp 2), thread count and code path, and a
    # request alone runs its own loop (fuse_batches off), so no kernel sees another shape.
    assert np.array_equal(served, offline)


def test_streaming_sends_real_partial_images(client):
    stream = client.images.generate(
        model="ithaca-default", prompt="a red cat", size="64x64", stream=True, partial_images=2,
        extra_body={"num_inference_steps": 4, "seed": 5},
    )  # fmt: skip
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        assert e.size == "64x64" and e.output_format == "png" and e.created_at > 0
        assert decode(e.b64_json).size == (64, 64)
    assert events[-1].usage.total_tokens == 0
    final = np.asarray(decode(events[-1].b64_json).convert("RGB"), dtype=int)
    previews = [np.asarray(decode(e.b64_json).convert("RGB"), dtype=int) for e in events[:2]]
    # Previews are decoded x0 estimates of earlier steps, not copies of the result: a
    # trained model's estimates converge early, so they differ from it in a few pixels.
    assert all(np.abs(p - final).max() > 0 for p in previews)
    assert np.abs(previews[0] - previews[1]).max() > 0


def test_sixteen_concurrent_requests_are_batched(client, server):
    before = server.client.get("/metrics").text
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda s: gen(client, 100 + s), range(16)))
    assert all(decode(r.data[0].b64_json).size == (64, 64) for r in results)
    after = server.client.get("/metrics").text
    batches = metric(after, "ithaca_batch_size_count") - metric(before, "ithaca_batch_size_count")
    requests = metric(after, "ithaca_batch_size_sum") - metric(before, "ithaca_batch_size_sum")
    assert requests == 16 and batches < 16, (batches, requests)
    # Each batched request against the same seed alone. The tiny model's CPU forward is
    # not batch-invariant (matmul blocking depends on the batch size): within 2/255.
    alone = gen(client, 100)
    a = np.asarray(decode(alone.data[0].b64_json).convert("RGB"), dtype=int)
    b = np.asarray(decode(results[0].data[0].b64_json).convert("RGB"), dtype=int)
    assert np.abs(a - b).max() <= 2


def test_killed_worker_fails_pending_requests_fast_and_the_group_restarts(client, server):
    old = server.worker_pids()
    with cf.ThreadPoolExecutor(3) as pool:
        slow = [
            pool.submit(
                server.client.post,
                "/v1/images/generations",
                json={"prompt": "a cat", "size": f"{s}x{s}", "num_inference_steps": 1000},
            )
            for s in (64, 96, 128)
        ]
        deadline = time.monotonic() + 30
        while True:  # one runs, two wait
            text = server.client.get("/metrics").text
            if (
                metric(text, "ithaca_requests_running"),
                metric(text, "ithaca_requests_waiting"),
            ) == (1, 2):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        t0 = time.monotonic()
        os.kill(old[1], signal.SIGKILL)
        responses = [f.result(30) for f in slow]
        elapsed = time.monotonic() - t0
    assert [r.status_code for r in responses] == [503, 503, 503], [r.text for r in responses]
    assert elapsed < 10
    assert responses[0].json()["error"]["code"] == "engine_unavailable"
    assert server.client.get("/health").status_code == 503  # restarting: loading takes seconds
    server.wait_healthy(120)
    assert set(server.worker_pids()).isdisjoint(old)
    res = gen(client, 3)
    assert decode(res.data[0].b64_json).size == (64, 64)
    text = server.client.get("/metrics").text
    assert metric(text, "ithaca_worker_group_restarts_total") == 1


def test_step_cache_per_request_reports_hits_in_body_and_metrics(server, client):
    cache = {"cache_backend": "tea_cache", "cache_config": {"rel_l1_thresh": 0.6}}
    res = client.images.generate(
        model="ithaca-default",
        prompt="a red cat",
        size="64x64",
        extra_body={"num_inference_steps": 6, "seed": 1, **cache},
    )
    stats = res.model_extra["cache"]
    assert stats["backend"] == "tea_cache"
    assert stats["computed_steps"] + stats["cached_steps"] == 6 and stats["cached_steps"] > 0
    text = server.client.get("/metrics").text
    assert metric(text, "ithaca_cache_steps_total", 'outcome="cached"') >= stats["cached_steps"]
    assert metric(text, "ithaca_cache_hit_ratio_count", 'backend="tea_cache"') >= 1


def test_every_rank_reports_its_memory_in_health_and_metrics(server, client):
    from ithaca.engine.executor import default_model_path
    from tools.memory_table import checkpoint_rank_parameter_bytes

    gen(client, 4)  # the ranks report with the batch's result
    (group,) = server.client.get("/health").json()["groups"]
    text = server.client.get("/metrics").text
    ranks = {r["rank"]: r for r in group["ranks"]}
    assert sorted(ranks) == [0, 1]
    # Counted from the checkpoint's config files alone (docs/memory.md's formula): rank 0
    # holds the transformer, the text encoder and the VAE; rank 1 the transformer. Exact.
    expected = checkpoint_rank_parameter_bytes(default_model_path(), dtype_bytes=4)
    assert ranks[0]["parameter_bytes"] == expected["rank0"]
    assert ranks[1]["parameter_bytes"] == expected["other"]
    for rank, r in ranks.items():
        labels = f'group="{group["name"]}",rank="{rank}"'
        assert metric(text, "ithaca_rank_parameter_bytes", labels) == r["parameter_bytes"]
        peak = metric(text, "ithaca_rank_peak_memory_bytes", labels)
        assert peak == r["peak_memory_bytes"] >= r["parameter_bytes"]  # RSS holds the weights
    samples = [ln for ln in text.splitlines() if ln.startswith("ithaca_rank_parameter_bytes{")]
    assert len(samples) == 2  # one sample per rank
