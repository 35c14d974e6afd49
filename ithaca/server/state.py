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
from ithaca.engine.scheduler import EngineRequest
from ithaca.server.errors import APIError, invalid
from ithaca.server.outputs import OutputStore
from ithaca.server.video_store import VideoStore

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


async def read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return body


def log_ignored(request: Request, fields: list[str]) -> None:
    if fields:
        log.info("[%s] ignoring unknown fields %s", request_id(request), ", ".join(fields))


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
