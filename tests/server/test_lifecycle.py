"""Process lifecycle of ``ithaca serve``: CLI parsing, SIGTERM drain (ending in the
documented 503 JSON), ``--on-worker-failure exit`` ending the server non-zero, and one
keep-alive connection surviving every kind of error. The data-parallel test and the
SIGTERM drain share one server (the drain ends it, so it runs last)."""

import concurrent.futures as cf
import http.client
import os
import signal
import time

import httpx
import pytest

from ithaca.cli import build_parser, main
from tests.server.harness import FAKE, ServerProcess


def test_cli_accepts_the_reference_command_line_and_rejects_bad_configs(capsys):
    args = build_parser().parse_args(
        ["serve", "Qwen/Qwen-Image", "--omni", "--usp", "2", "--ring", "2", "--port", "9000",
         "--cache-backend", "tea_cache", "--cache-config", '{"rel_l1_thresh": 0.2}']
    )  # fmt: skip
    assert (args.models, args.ulysses_degree, args.ring_degree, args.port) == (
        ["Qwen/Qwen-Image"], 2, 2, 9000,
    )  # fmt: skip
    assert build_parser().parse_args(["serve"]).models == []  # the embedded default models
    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "max_batch_size (0) must be a positive integer" in capsys.readouterr().err
    assert main(["serve", "--cache-config", "{oops"]) == 2
    assert main(["generate", "--prompt", "x", "--output", "out.gif"]) == 2


def test_on_worker_failure_exit_ends_the_server_non_zero(tmp_path):
    # The plain command line (exec, not forked from the preloaded interpreter): its exit code.
    server = ServerProcess(FAKE, "--usp", "2", "--on-worker-failure", "exit",
                           state_dir=str(tmp_path), fork=False)  # fmt: skip
    try:
        server.wait_healthy(120)
        os.kill(server.worker_pids()[1], signal.SIGKILL)
        assert server.proc.wait(timeout=30) == 1
        assert "fatal" in server.log()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    """Two 1-rank data-parallel groups of the pipeline double (50 ms a step), one request a
    batch, a 3 s drain: first served and half-killed, then drained by SIGTERM (one server
    start for both; the test that ends it runs last)."""
    server = ServerProcess(FAKE, "--data-parallel-size", "2", "--max-batch-size", "1",
                           "--drain-timeout", "3", state_dir=str(tmp_path_factory.mktemp("dp")),
                           env={"ITHACA_FAKE_STEP_S": "0.05"})  # fmt: skip
    try:
        server.wait_healthy(120)
        yield server
    finally:
        server.stop()


def test_data_parallel_groups_serve_in_parallel_and_fail_alone(dp_server):
    server = dp_server
    groups = server.wait_healthy(120)["groups"]
    assert [len(g["ranks"]) for g in groups] == [1, 1]

    def post(size, steps):
        body = {"prompt": "x", "size": f"{size}x{size}", "num_inference_steps": steps}
        return server.client.post("/v1/images/generations", json=body)

    with cf.ThreadPoolExecutor(2) as pool:
        t0 = time.monotonic()
        done = list(pool.map(post, (32, 48), (30, 30)))  # 1.5 s each, not batchable
        elapsed = time.monotonic() - t0
    assert [r.status_code for r in done] == [200, 200] and elapsed < 2.8

    with cf.ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(post, 32, 60), pool.submit(post, 48, 60)  # 3 s each
        time.sleep(1.0)
        os.kill(groups[0]["ranks"][0]["pid"], signal.SIGKILL)  # group-0 runs one of them
        codes = sorted([a.result(30).status_code, b.result(30).status_code])
    assert codes == [200, 503]  # the other group's request is unaffected
    server.wait_healthy(120)
    assert post(32, 2).status_code == 200


def test_keep_alive_survives_every_error(fake_server):
    conn = http.client.HTTPConnection("127.0.0.1", fake_server.port, timeout=30)
    key = {"Authorization": fake_server.client.headers["Authorization"]}
    json_h = {**key, "content-type": "application/json"}
    cases = [
        ("POST", "/v1/images/generations", b"[" * 100_000, json_h, 400),
        (
            "POST",
            "/v1/images/generations",
            b'{"prompt":"x","seed":' + b"9" * 5000 + b"}",
            json_h,
            400,
        ),
        ("GET", "/outputs/%00", None, key, 404),
        ("POST", "/v1/images/generations", b'{"prompt": "crash", "size": "32x32"}', json_h, 500),
        ("TRACE", "/v1/models", None, key, 405),
        # checked alone by rank 0's resolve() (before any batch), and a batch-only failure
        ("POST", "/v1/images/generations", b'{"prompt": "x", "size": "24x32"}', json_h, 400),
        ("POST", "/v1/images/generations", b'{"prompt": "poison", "size": "32x32"}', json_h, 400),
        ("POST", "/v1/images/generations", b'{"prompt": "x", "size": "32x32"}', json_h, 200),
    ]
    conn.connect()
    sock = conn.sock
    for method, path, body, headers, status in cases:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        payload = r.read()
        assert r.status == status, (path, payload[:200])
        assert r.getheader("connection") != "close"
        assert conn.sock is sock  # the same TCP connection all along
    conn.close()


def test_sigterm_drains_running_requests(dp_server):
    server = dp_server  # ended here: this test runs after the other one of dp_server
    try:
        server.wait_healthy(120)
        short = {"prompt": "x", "size": "32x32", "num_inference_steps": 30}  # ~1.5 s
        long = {"prompt": "x", "size": "48x48", "num_inference_steps": 200}  # ~10 s
        with cf.ThreadPoolExecutor(2) as pool:
            running = pool.submit(server.client.post, "/v1/images/generations", json=short)
            time.sleep(0.1)
            cut = pool.submit(server.client.post, "/v1/images/generations", json=long)
            time.sleep(0.6)
            server.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            time.sleep(0.2)
            with pytest.raises(httpx.TransportError):  # no new connections while draining
                httpx.post(server.url + "/v1/images/generations", json=short, timeout=5)
            assert running.result(30).status_code == 200  # the running one finished
            r = cut.result(30)  # the one the drain could not wait for: documented 503 JSON
            assert time.monotonic() - t0 < 3 + 2
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "server_shutting_down"
        server.proc.wait(timeout=30)
        assert server.proc.returncode in (0, -signal.SIGTERM)
    finally:
        server.stop()
