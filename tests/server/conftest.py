"""The server tests' fixtures: the in-process app and the shared smoke server (the one
real-server factory, ``serve``, is in tests/conftest.py: tests/models use it too).

Pyramid for tests/server: media/protocol/store units without processes
(test_units.py); route logic (every error class, limits, admission, video jobs,
streaming, the schema fuzzer) on ``app`` - the real app on the in-process executor with
the pipeline double, through ``httpx.ASGITransport`` (no subprocess, no port); the
routes of real tiny checkpoints the same way on ``model_server`` (test_layered.py); a few
smoke tests of a real ``ithaca serve`` (torchrun --usp 2, uvicorn, signals, restarts) on
``fake_server``, forked from a preloaded interpreter (tests/server/preload.py; the exec'd
command line itself in test_multinode.py and the ``--on-worker-failure exit`` test);
the tiny checkpoints driven by the official openai SDK (test_openai_sdk.py on a real
server; test_edits.py, test_layered.py, test_video_wan.py in process).
"""

import pytest

from tests.server.harness import FAKE, fake_app, model_app, serving

API_KEY = "sk-test-key"
APP_CONFIG = dict(api_key=API_KEY, max_queue_size=2, max_batch_size=4, batch_wait_ms=20)


@pytest.fixture(scope="session")
def app(tmp_path_factory):
    """The app in process: pipeline double at 20 ms per step, queue of 2, batches of 4."""
    client = fake_app(str(tmp_path_factory.mktemp("app")), **APP_CONFIG)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    """``model_server(model, name=None, **server_config)``: a real checkpoint served in this
    process (in-process executor, ASGI transport; see ``harness.model_app``) for tests of
    routes, not of processes; every app it built shuts down when the module ends."""
    apps = []

    def start(model: str, name: str | None = None, **config):
        apps.append(model_app(str(tmp_path_factory.mktemp("model_app")), model, name, **config))
        return apps[-1]

    yield start
    for app in apps:
        app.close()


@pytest.fixture(scope="session")
def fake_server(tmp_path_factory):
    """The pipeline double on a 2-rank torchrun group behind ``ithaca serve``; 50 ms/step
    (session-wide: the smoke tests of several modules share it)."""
    args = (FAKE, "--usp", "2", "--max-queue-size", "2", "--max-batch-size", "4",
            "--batch-wait-ms", "20", "--max-steps", "1000")  # fmt: skip
    state = str(tmp_path_factory.mktemp("fake"))
    env = {"ITHACA_FAKE_STEP_S": "0.05"}
    yield from serving(*args, state_dir=state, env=env, api_key=API_KEY)
