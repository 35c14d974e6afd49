"""The FastAPI application: edge middleware, model/health/metrics routes, lifespan.

``create_app(engine, config)`` wires one engine into one app (nothing global, so
tests can run several). The lifespan starts the engine without waiting (``/health``
and ``/ready`` answer 503 while weights load) and on shutdown drains it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ithaca.config import ServerConfig
from ithaca.engine.engine import Engine
from ithaca.server import errors, images, loras, openapi, videos
from ithaca.server.errors import APIError
from ithaca.server.outputs import OutputStore, private_dir
from ithaca.server.state import ServedModel, ServerState, server_state
from ithaca.server.video_store import VideoStore
from ithaca.server.videos import resume_jobs

log = logging.getLogger("ithaca.server")
_ID = re.compile(r"/(video_[0-9a-f]+|[A-Za-z0-9_-]{20,}\.\w+)")


def _route_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return _ID.sub("/{id}", path)


_RID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(
            413,
            f"the request body is larger than this server accepts ({limit} bytes)",
            code="request_too_large",
        )


class EdgeMiddleware:
    """Pure ASGI (streaming- and disconnect-safe): ``x-request-id`` in and out,
    ``--api-key`` on ``/v1/*`` in constant time, the body size limit, HTTP latency, and
    the last line of defence: an unexpected exception becomes a 500 JSON body (logged with
    the request id) without tearing down the keep-alive connection."""

    def __init__(self, app, api_key: str | None, metrics, max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id", "")
        if not _RID.fullmatch(rid):  # ids are echoed and logged: only a safe alphabet
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = []

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                started.append(True)
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", rid.encode("latin-1")),
                ]
            await send(message)

        path = scope["path"]
        if self.api_key is not None and path.startswith("/v1/"):
            auth = headers.get("authorization", "")
            given = auth[7:].encode() if auth.startswith("Bearer ") else b""
            if not hmac.compare_digest(given, self.api_key):
                response = APIError(
                    401, "Incorrect or missing API key", code="invalid_api_key"
                ).response()
                return await response(scope, receive, send_with_id)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await BodyTooLarge(self.max_body_bytes).response()(scope, receive, send_with_id)
        seen = [0]

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body_bytes:  # chunked bodies have no content-length
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        start = time.monotonic()
        try:
            await self.app(scope, receive_limited, send_with_id)
        except BodyTooLarge as exc:
            if started:
                raise
            await exc.response()(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # The server's graceful-shutdown timeout cancelled this request.
            if not started:
                await APIError(
                    503, "the server shut down while this request ran", code="server_shutting_down"
                ).response()(scope, receive, send_with_id)
            raise
        except Exception:
            log.exception("[%s] unhandled error on %s %s", rid, scope["method"], _escape(path))
            if started:
                raise  # the response is half sent: only closing the connection is honest
            body = APIError(500, f"internal server error (request id {rid})", code="internal_error")
            await body.response()(scope, receive, send_with_id)
        finally:
            self.metrics.http_latency.labels(_route_label(path)).observe(time.monotonic() - start)


def _escape(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")


def create_app(
    engine: Engine,
    config: ServerConfig,
    *,
    start_engine: bool = True,
    state_dir: str | None = None,
    models: list[ServedModel] | None = None,
) -> FastAPI:
    """``models``: every served model (``engine`` is the first's); default: ``engine``
    alone, named ``config.model_name``, for any task."""
    state_dir = state_dir or config.state_dir or os.path.expanduser("~/.cache/ithaca")
    private_dir(state_dir)
    state = ServerState(
        engine=engine,
        config=config,
        outputs=OutputStore(os.path.join(state_dir, "outputs"), config.output_ttl_s),
        videos=VideoStore(state_dir, config.video_ttl_s),
        models=list(models or []),
    )
    engines = [m.engine for m in state.models]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        starter = None
        if start_engine and config.executor == "inprocess" and len(engines) > 1:
            # In-process pipelines load in this process's threads, and diffusers'
            # empty-weights loading is not thread-safe: one model after the other.
            starter = asyncio.create_task(_start_in_turn(engines))
        elif start_engine:
            for e in engines:
                e.start(wait=False)
        background = [asyncio.create_task(_sweep(state)), asyncio.create_task(resume_jobs(state))]
        if starter is not None:
            background.append(starter)
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(
                *(asyncio.to_thread(e.shutdown, config.drain_timeout_s) for e in engines)
            )
            for _, task in list(state.video_jobs.values()):
                task.cancel()
            await asyncio.gather(*(t for _, t in state.video_jobs.values()), return_exceptions=True)
            state.videos.close()

    app = FastAPI(title="ithaca", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ithaca = state
    errors.install(app)
    openapi.install(app)
    app.add_middleware(
        EdgeMiddleware,
        api_key=config.api_key,
        metrics=engine.metrics,
        max_body_bytes=config.max_body_bytes,
    )
    app.include_router(images.router)
    app.include_router(videos.router)
    app.include_router(loras.router)

    def model_card(served: ServedModel, detail: bool = False) -> dict:
        card = {
            "id": served.name,
            "object": "model",
            "created": state.created,
            "owned_by": "ithaca",
            "root": served.root,
            "tasks": list(served.info.tasks),  # extension: image and / or video
        }
        if detail:  # extension: what the model can draw (vocabulary, trained defaults)
            card.update(served.info.card())
        return card

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in state.models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str):
        return model_card(server_state(request).find_model(model_id), detail=True)

    @app.get("/health")
    async def health():
        groups = [{"model": m.name, **g} for m in state.models for g in m.engine.describe()]
        if all(e.alive and not e.overdue for e in engines):
            return {"status": "ok", "groups": groups}
        if all(e.alive for e in engines):
            error = APIError(503, "a denoising step is overdue", code="step_overdue")
        else:
            error = APIError(503, "not every rank is alive", code="engine_unavailable")
        return JSONResponse({**error.body(), "groups": groups}, status_code=503)

    @app.get("/ready")
    async def ready():
        if all(e.ready for e in engines):
            return {"status": "ready"}
        alive = all(e.alive for e in engines)
        reason = "draining" if alive else "weights loading or a worker group is down"
        return APIError(503, f"not ready: {reason}", code="not_ready").response()

    @app.get("/metrics")
    async def metrics():
        for e in engines:
            e.metrics.waiting.set(len(e.scheduler))
            e.metrics.observe_ranks(e.describe())
        # Each engine has its own registry; one exposition may not repeat a metric, so the
        # first model's engine (and the HTTP metrics) are shown.
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _start_in_turn(engines: list[Engine]) -> None:
    for engine in engines:
        engine.start(wait=False)
        while not engine.ready and engine.fatal_reason is None:
            await asyncio.sleep(0.1)


async def _sweep(state: ServerState) -> None:
    while True:
        await asyncio.sleep(min(60.0, state.config.output_ttl_s))
        await asyncio.to_thread(state.outputs.sweep)
        await asyncio.to_thread(state.videos.sweep)
