"""Servers shared by the server tests: real ``ithaca serve`` processes on loopback.

Pyramid for tests/server: media/protocol/store units without processes
(test_units.py); a server on the pipeline double at --usp 2 for the error classes,
video jobs and restarts (test_errors.py, test_videos.py); servers on the tiny
Qwen-Image checkpoints at --usp 2 driven by the official openai SDK
(test_openai_sdk.py, test_edits.py).
"""

import pytest

from tests.server.harness import FAKE, ServerProcess

API_KEY = "sk-test-key"


@pytest.fixture(scope="session")
def fake_server(tmp_path_factory):
    """The pipeline double on a 2-rank torchrun group; 50 ms per step."""
    server = ServerProcess(
        FAKE, "--usp", "2", "--api-key", API_KEY, "--max-queue-size", "2",
        "--max-batch-size", "4", "--batch-wait-ms", "20",
        state_dir=str(tmp_path_factory.mktemp("fake")),
        env={"ITHACA_FAKE_STEP_S": "0.05"},
    )  # fmt: skip
    try:
        server.wait_healthy(120)
        server.client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield server
    finally:
        server.stop()
