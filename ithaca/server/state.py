"""What every route shares: the engine, the config and the stores (one per app)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from fastapi import Request

from ithaca.config import ServerConfig
from ithaca.engine.catalog import TASKS, ModelInfo
from ithaca.engine.engine import Engine
from ithaca.engine.errors import EngineError
from ithaca.engine.scheduler import EngineRequest
from ithaca.server.errors import APIError, invalid
from ithaca.server.outputs import OutputStore
from ithaca.server.video_store import VideoStore
from ithaca.types import GenerationParams

log = logging.getLogger("ithaca.server")


@dataclass
class ServedModel:
    """One model of the server: its name, its engine (worker groups) and what it can do."""

    name: str
    engine: Engine
    info: ModelInfo
    root: str | None = None
    """The checkpoint as given (``/v1/models`` ``root``; also accepted as a name)."""

    def warnings(self, prompt: str | None) -> list[str]:
        """Honest prompts: a warning naming the words this model never learned."""
        unknown = self.info.unknown_words(prompt)
        if not unknown:
            return []
        return [
            f"unknown words for model '{self.name}': {', '.join(unknown)} (ignored by the "
            f"model; GET /v1/models/{self.name} lists the words it knows)"
        ]


@dataclass
class ServerState:
    engine: Engine
    """The first model's engine (single-model callers)."""
    config: ServerConfig
    outputs: OutputStore
    videos: VideoStore
    created: int = field(default_factory=lambda: int(time.time()))
    video_jobs: dict[str, tuple[EngineRequest, asyncio.Task]] = field(default_factory=dict)
    models: list[ServedModel] = field(default_factory=list)
    """Every served model in order; empty means the one ``engine`` (any task)."""

    def __post_init__(self) -> None:
        if not self.models:
            info = ModelInfo(self.config.model, None, TASKS)
            name, root = self.config.model_name, self.config.model
            self.models = [ServedModel(name, self.engine, info, root)]

    def find_model(self, name: str) -> ServedModel:
        for served in self.models:
            if name in (served.name, served.root):
                return served
        names = ", ".join(f"'{m.name}'" for m in self.models)
        raise APIError(
            404,
            f"The model '{name}' does not exist; this server serves {names}",
            param="model",
            code="model_not_found",
        )

    def resolve_model(self, name: str | None, task: str | None = None) -> ServedModel:
        """The model a request names (default: the first that can do ``task``); 404 for
        an unknown model, 400 naming ``model`` for one that cannot do ``task``."""
        if name is None:
            for served in self.models:
                if task is None or task in served.info.tasks:
                    return served
            raise invalid(f"no model of this server can do {task} generation", "model")
        served = self.find_model(name)
        if task is not None and task not in served.info.tasks:
            others = [f"'{m.name}'" for m in self.models if task in m.info.tasks]
            hint = f"; use {', '.join(others)}" if others else ""
            raise invalid(
                f"model '{served.name}' generates {' and '.join(served.info.tasks)}, not "
                f"{task}s{hint}",
                "model",
                code="model_not_supported",
            )
        return served

    def cancel(self, req: EngineRequest) -> None:
        """Cancel ``req`` on whichever engine holds it (a no-op on the others)."""
        for served in self.models:
            served.engine.cancel(req)


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


async def admit(
    state: ServerState, engine: Engine, request: Request, params: GenerationParams
) -> dict:
    """Limits, then the model's own check of this request alone and admission by cost
    (off the event loop) on the ``engine`` that will run it; returns the resolved shape
    for :meth:`Engine.submit`."""
    check_limits(state.config, params)
    try:
        return await asyncio.to_thread(engine.validate, params)
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
