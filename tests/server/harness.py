"""Start ``ithaca serve`` as a real process on loopback and talk to it.

A :class:`ServerProcess` runs the CLI exactly as a user would (uvicorn, torchrun
worker groups), waits (bounded) for ``/health`` to turn 200, and stops with SIGTERM,
killing the whole session if it does not exit in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from ithaca.testing.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = "tests.engine.doubles:make_pipeline"


class ServerProcess:
    def __init__(
        self, *args: str, state_dir: str, env: dict | None = None, port: int | None = None
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = state_dir
        self.log_path = os.path.join(state_dir, f"server-{self.port}-{time.time():.0f}.log")
        cmd = [
            sys.executable, "-m", "ithaca.cli", "serve", *args,
            "--host", "127.0.0.1", "--port", str(self.port), "--state-dir", state_dir,
        ]  # fmt: skip
        full_env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_healthy(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            try:
                r = self.client.get("/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy within {timeout} s:\n{self.log()[-3000:]}")

    def worker_pids(self) -> list[int]:
        groups = self.client.get("/health").json()["groups"]
        return [r["pid"] for g in groups for r in g["ranks"]]

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.client.close()
        self._log.close()
        return self.proc.returncode


def serving(*args: str, state_dir: str, timeout: float = 240.0):
    """A module fixture's body: yield a healthy :class:`ServerProcess`, stop it after."""
    server = ServerProcess(*args, state_dir=state_dir)
    try:
        server.wait_healthy(timeout)
        yield server
    finally:
        server.stop()


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` (with ``labels`` in the label set) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            if key.split("{")[0] == name and labels in key:
                total += float(value)
    return total
