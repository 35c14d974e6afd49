"""What every route shares: the engine, the config and the stores (one per app)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from fastapi import Request

from ithaca.config import ServerConfig
from ithaca.engine.engine import Engine
from ithaca.engine.errors import EngineError
from ithaca.engine.scheduler import EngineRequest
from ithaca.server.errors import APIError, invalid
from ithaca.server.outputs import OutputStore
from ithaca.server.video_store import VideoStore
from ithaca.types import GenerationParams

log = logging.getLogger("ithaca.server")


@dataclass
class ServerState:
    engine: Engine
    config: ServerConfig
    outputs: OutputStore
    videos: VideoStore
    created: int = field(default_factory=lambda: int(time.time()))
    video_jobs: dict[str, tuple[EngineRequest, asyncio.Task]] = field(default_factory=dict)

    def resolve_model(self, name: str | None) -> str:
        """The served model's name; 404 for any other model."""
        served = self.config.model_name
        if name is None or name in (served, self.config.model):
            return served
        raise APIError(
            404,
            f"The model '{name}' does not exist; this server serves '{served}'",
            param="model",
            code="model_not_found",
        )


def server_state(request: Request) -> ServerState:
    return request.app.state.ithaca


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


_JSON_TYPES = ("application/json", "")


async def read_json(request: Request) -> dict:
    """The body as a JSON object; 415 for another declared content type, 400 for anything
    that is not a JSON object (deep nesting and over-long integers included)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in _JSON_TYPES and not ctype.endswith("+json"):
        raise APIError(
            415,
            f"the request body must be application/json (got {ctype[:64]!r})",
            code="unsupported_media_type",
        )
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except RecursionError:
        raise invalid("the request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return body


def escape(text: object) -> str:
    """Client text made safe for one log line (newlines and control characters escaped)."""
    return str(text).encode("unicode_escape").decode("ascii")[:200]


def log_ignored(request: Request, fields: list[str]) -> None:
    if fields:
        names = ", ".join(escape(f) for f in fields[:20])
        log.info("[%s] ignoring unknown fields %s", request_id(request), names)


def check_limits(config: ServerConfig, params: GenerationParams) -> None:
    """The server's limits on one request (400 naming the param)."""
    if params.width is not None and params.height is not None:
        pixels = params.width * params.height
        if pixels > config.max_output_pixels:
            raise invalid(
                f"size ({params.width}x{params.height} = {pixels} pixels) exceeds this server's "
                f"limit of {config.max_output_pixels} pixels",
                "size",
            )
    steps = params.num_inference_steps
    if steps is not None and steps > config.max_steps:
        raise invalid(
            f"num_inference_steps ({steps}) exceeds this server's limit of {config.max_steps}",
            "num_inference_steps",
        )
    if params.num_images > config.max_n:
        raise invalid(f"n ({params.num_images}) exceeds this server's limit of {config.max_n}", "n")
    frames = params.num_frames
    if frames is not None and frames > config.max_frames:
        raise invalid(
            f"num_frames ({frames}, from seconds x fps when not given) exceeds this server's "
            f"limit of {config.max_frames}",
            "num_frames",
        )


async def admit(state: ServerState, request: Request, params: GenerationParams) -> dict:
    """Limits, then the model's own check of this request alone and admission by cost
    (off the event loop); returns the resolved shape for :meth:`Engine.submit`."""
    check_limits(state.config, params)
    try:
        return await asyncio.to_thread(state.engine.validate, params)
    except EngineError as exc:
        if exc.status >= 500:
            raise
        log.info("[%s] refused: %s", request_id(request), escape(exc))
        raise


async def wait_result(engine: Engine, req: EngineRequest, request: Request | None):
    """Await the engine's future; a client that disconnects cancels its request."""
    fut = asyncio.wrap_future(req.future)
    try:
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.2)
            if done:
                return fut.result()
            if request is not None and await request.is_disconnected():
                log.info("[%s] client disconnected; cancelling", request_id(request))
                engine.cancel(req)
                raise APIError(499, "the client closed the request", code="client_disconnected")
    except asyncio.CancelledError:
        engine.cancel(req)
        raise
