"""Start ``ithaca serve`` as a real process on loopback and talk to it.

A :class:`ServerProcess` runs the CLI exactly as a user would (uvicorn, torchrun
worker groups), waits (bounded) for ``/health`` to turn 200, and stops with SIGTERM,
killing the whole session if it does not exit in time. :func:`fake_app` is its
in-process twin for route logic: the same app on the in-process executor, driven
through ``httpx.ASGITransport``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx

from ithaca.testing.distributed import free_port
from tests.server.preload import Zygote

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = "tests.engine.doubles:make_pipeline"


class ServerProcess:
    """``fork=False``: exec ``python -m ithaca.cli serve`` itself (kept by a few tests: the
    plain command line); by default the server is forked from the preloaded interpreter
    of :mod:`tests.server.preload` (the same ``main(argv)``, without the import cost)."""

    def __init__(
        self,
        *args: str,
        state_dir: str,
        env: dict | None = None,
        port: int | None = None,
        fork: bool = True,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = state_dir
        self.log_path = os.path.join(state_dir, f"server-{self.port}-{time.time():.0f}.log")
        cmd = [
            sys.executable, "-m", "ithaca.cli", "serve", *args,
            "--host", "127.0.0.1", "--port", str(self.port), "--state-dir", state_dir,
        ]  # fmt: skip
        base_env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
        full_env = {**base_env, **(env or {})}
        self._log = None
        if fork:
            self.proc = Zygote.get(base_env).spawn(cmd[3:], full_env, self.log_path)
        else:
            self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
            self.proc = subprocess.Popen(
                cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
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
        if self._log is not None:
            self._log.close()
        return self.proc.returncode


def serving(
    *args: str,
    state_dir: str,
    env: dict | None = None,
    api_key: str | None = None,
    timeout: float = 240.0,
):
    """A fixture's body: yield a healthy :class:`ServerProcess` of ``ithaca serve ARGS``
    (with ``--api-key`` and the client's header when given), stop it after."""
    if api_key is not None:
        args = (*args, "--api-key", api_key)
    server = ServerProcess(*args, state_dir=state_dir, env=env)
    try:
        server.wait_healthy(timeout)
        if api_key is not None:
            server.client.headers["Authorization"] = f"Bearer {api_key}"
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


class AppClient:
    """Sync facade over ``httpx.AsyncClient(transport=ASGITransport(app))``: the app runs on
    its own event-loop thread (lifespan included), tests call it like ``httpx.Client``
    (thread-safe, so concurrent requests come from a thread pool)."""

    def __init__(self, app, headers: dict | None = None):
        import asyncio
        import threading

        self.app = app
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.headers = dict(headers or {})
        self._lifespan = app.router.lifespan_context(app)
        self._run(self._lifespan.__aenter__())
        self._client = self.client_with(self.headers)

    def client_with(self, headers: dict) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)
        return httpx.AsyncClient(
            transport=transport, base_url="http://ithaca.test", headers=headers, timeout=60
        )

    def _run(self, coro, timeout: float = 120.0):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(self, method: str, url: str, *, client=None, **kw) -> httpx.Response:
        return self._run((client or self._client).request(method, url, **kw))

    def get(self, url: str, **kw) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw) -> httpx.Response:
        return self.request("POST", url, **kw)

    def delete(self, url: str, **kw) -> httpx.Response:
        return self.request("DELETE", url, **kw)

    def openai(self, **kw):
        """The official openai SDK's sync client, its requests sent into this app."""
        import openai

        http = httpx.Client(transport=_SyncBridge(self), base_url="http://ithaca.test")
        return openai.OpenAI(base_url="http://ithaca.test/v1", http_client=http, **kw)

    @contextlib.contextmanager
    def stream(self, method: str, url: str, **kw):
        """The whole response, read (ASGITransport buffers streamed bodies anyway)."""
        yield self.request(method, url, **kw)

    def close(self) -> None:
        try:
            self._run(self._client.aclose())
            self._run(self._lifespan.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


class _SyncBridge(httpx.BaseTransport):
    """A sync httpx transport into an :class:`AppClient`'s app (for sync clients such as the
    openai SDK): each request runs through ``httpx.ASGITransport`` on the app's loop."""

    def __init__(self, app: AppClient):
        self.app = app

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def call():
            inner = httpx.Request(request.method, request.url, headers=request.headers,
                                  content=body)  # fmt: skip
            response = await httpx.ASGITransport(app=self.app.app).handle_async_request(inner)
            raw = b"".join([chunk async for chunk in response.stream])  # still encoded
            return response.status_code, response.headers, raw

        status, headers, raw = self.app._run(call())
        return httpx.Response(status, headers=headers, content=raw, request=request)


def model_app(state_dir: str, model: str, name: str | None = None, **config) -> AppClient:
    """``ithaca serve MODEL --executor inprocess`` without the process: the models built as
    ``serve`` builds them (:func:`ithaca.server.serve.build_models`), the pipeline loaded in
    this process, the app driven through ``httpx.ASGITransport``."""
    from ithaca.config import ParallelConfig, ServerConfig
    from ithaca.server.app import create_app
    from ithaca.server.serve import ModelEntry, build_models

    server = ServerConfig(model=model, served_model_name=name, executor="inprocess",
                          state_dir=state_dir, **config)  # fmt: skip
    served = build_models(server, None, [ModelEntry(model, name, ParallelConfig())])
    for entry in served:
        entry.engine.start(wait=True, timeout=300)
    app = create_app(served[0].engine, server, models=served, start_engine=False)
    return AppClient(app)


def fake_app(state_dir: str, step_s: float = 0.02, **config) -> AppClient:
    """The app on the in-process executor with the pipeline double (no subprocess)."""
    from ithaca.config import ParallelConfig, ServerConfig
    from ithaca.engine.engine import build_engine
    from ithaca.server.app import create_app

    os.environ["ITHACA_FAKE_STEP_S"] = str(step_s)  # read by the double when it loads
    try:
        server = ServerConfig(model=FAKE, executor="inprocess", state_dir=state_dir, **config)
        engine = build_engine(server, ParallelConfig())
        engine.start(wait=True, timeout=60)
    finally:
        os.environ.pop("ITHACA_FAKE_STEP_S", None)
    api_key = config.get("api_key")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return AppClient(create_app(engine, server, start_engine=False), headers)
