"""The multi-node path on one machine: two "nodes" form one worker group.

Node 1 runs ``ithaca serve --nnodes 2 --node-rank 1`` (its torchrun ranks only, no HTTP);
node 0 runs the HTTP front and global rank 0. Together: 4 ranks at --usp 2 --ring 2
over loopback static rendezvous. A request through the leader's front returns the
1-rank image within 1/255 (ring attention sums in another order).
"""

import base64
import io
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ithaca.engine.executor import default_model_path
from ithaca.models.registry import load_pipeline
from ithaca.parallel import ParallelState
from ithaca.testing.distributed import free_port
from ithaca.types import GenerationParams
from tests.server.harness import REPO, ServerProcess

# Two servers, 4 ranks and a bounded start-up: alone, not beside an xdist worker.
pytestmark = pytest.mark.serial

LAYOUT = ["--usp", "2", "--ring", "2", "--nnodes", "2", "--master-addr", "127.0.0.1"]
REQUEST = dict(prompt="a red circle on a blue background", seed=7, num_inference_steps=3)


def test_two_nodes_serve_one_group(tmp_path):
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    worker_log = open(tmp_path / "node1.log", "wb")  # noqa: SIM115 (closed below)
    worker = subprocess.Popen(
        [sys.executable, "-m", "ithaca.cli", "serve", *LAYOUT, "--node-rank", "1",
         "--master-port", port],
        env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    server = ServerProcess(*LAYOUT, "--master-port", port, state_dir=str(tmp_path), fork=False)
    try:
        health = server.wait_healthy(240)
        ranks = [r for g in health["groups"] for r in g["ranks"]]
        assert sorted(r["rank"] for r in ranks) == [0, 1, 2, 3]
        res = server.client.post(
            "/v1/images/generations",
            json={**REQUEST, "size": "64x64", "response_format": "b64_json"},
            timeout=120,
        )
        assert res.status_code == 200, res.text
        served = Image.open(io.BytesIO(base64.b64decode(res.json()["data"][0]["b64_json"])))
        served = np.asarray(served.convert("RGB"), dtype=int)
        with open(f"/proc/{server.proc.pid}/maps") as f:  # the front served it without torch
            assert "libtorch" not in f.read()
    finally:
        server.stop()
        worker.wait(timeout=60) if worker.poll() is None else None
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        worker_log.close()
    # The worker node's ranks end with the group: nothing outlives the leader.
    assert worker.poll() is not None

    pipe = load_pipeline(default_model_path(), ParallelState.single())
    alone = pipe.generate([GenerationParams(**REQUEST, width=64, height=64)])[0].images[0]
    diff = np.abs(served - np.asarray(alone.convert("RGB"), dtype=int)).max()
    assert diff <= 1, f"4-rank two-node image differs from 1 rank by {diff}/255"
