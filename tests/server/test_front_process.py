"""The front process (HTTP server + engine, queueing requests to torchrun worker groups)
never imports torch: seconds of CPU per server start, and memory, for nothing it uses.
It reads checkpoints' indexes, launches groups and counts GPUs without it. (The leader's
front in test_multinode.py serves a real request with no libtorch mapped.)"""

import json
import os
import subprocess
import sys

import pytest

from ithaca.engine.engine import _visible_devices, local_gpus
from tests.server.harness import REPO

FRONT = """
import json, sys
from ithaca.cli import build_parser
from ithaca.config import ParallelConfig, ServerConfig
from ithaca.server.app import create_app
from ithaca.server.serve import build_models, default_entries

build_parser()
served = build_models(ServerConfig(), None, default_entries(ParallelConfig(ulysses_degree=2)))
create_app(served[0].engine, ServerConfig(), models=served)
print(json.dumps({
    "tasks": [list(m.info.tasks) for m in served],
    "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
}))
"""


def test_the_front_builds_the_default_models_without_torch():
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run(
        [sys.executable, "-c", FRONT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen["tasks"] == [["image"], ["video"]]  # the default image and video models
    assert seen["torch"] == []


def _driver(tmp_path, gpus: int) -> str:
    for i in range(gpus):
        (tmp_path / f"0000:{i:02x}:00.0").mkdir()
    return str(tmp_path)


@pytest.mark.parametrize(
    ("visible", "expected"),
    [(None, ["0", "1", "2", "3"]), ("2,3", ["2", "3"]), ("1,-1,2", ["1"]), ("", [])],
)
def test_local_gpus_follow_the_driver_and_cuda_visible_devices(
    tmp_path, monkeypatch, visible, expected
):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert local_gpus(_driver(tmp_path, 4)) == expected
    assert local_gpus(str(tmp_path / "no-driver")) == []


def test_each_data_parallel_group_owns_its_gpus(tmp_path, monkeypatch):
    import ithaca.engine.engine as engine

    driver = _driver(tmp_path, 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(engine, "local_gpus", lambda: local_gpus(driver))
    assert [_visible_devices(i, 2) for i in range(2)] == ["0,1", "2,3"]
    assert _visible_devices(0, 1, offset=3) == "3"  # after a first model's three GPUs
    with pytest.raises(ValueError, match=r"needs GPUs 4..5 but only 4 are visible"):
        _visible_devices(2, 2)
    monkeypatch.setattr(engine, "local_gpus", lambda: [])
    assert _visible_devices(0, 2) is None  # CPU: the groups use gloo, no device to assign
