"""``/v1/loras``: list, load and unload LoRA adapters at run time (behind the API key).

``POST /v1/loras {"name", "path", "scale", "model"}`` loads a file (or PEFT folder) from
inside ``--lora-dir`` only: a path that resolves outside it (``..``, an absolute path, a
symlink) is refused with 403, and without ``--lora-dir`` run-time loading is off (403).
The engine runs every command on every rank of every worker group of the model, between
batches (a group that restarts gets the table replayed before it serves).
Each served model has its own adapters: ``model`` (in the body; a query parameter of
``GET`` and ``DELETE``) names it, default the first model (``DELETE``: the one that has
the adapter); an unknown model is 400 ``param: model``; ``GET`` without it lists every
model's adapters, each entry naming its model.
:func:`check_request_loras` answers a request naming an unknown adapter with 400
``param: lora`` before it is queued, and fills in each adapter's default scale, so what
a response (or a video job) reports is what the workers apply.
"""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ithaca.engine.engine import Engine
from ithaca.engine.errors import GenerationFailedError
from ithaca.server.errors import APIError, invalid
from ithaca.server.state import ServedModel, ServerState, server_state
from ithaca.types import GenerationParams, LoraCommand, LoraRef

router = APIRouter()


class LoadLora(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    path: str = Field(min_length=1, max_length=4096)
    """Relative to ``--lora-dir``."""
    scale: float = Field(default=1.0, ge=-100, le=100)
    """The scale a request gets when it names the adapter without one."""
    model: str | None = Field(default=None, max_length=4096)
    """The served model to load it into; default: the first."""


def _entry(served: ServedModel, entry: dict) -> dict:
    return {**{k: v for k, v in entry.items() if k != "path"}, "model": served.name}


def _model(state: ServerState, name: str | None) -> ServedModel:
    """The served model ``name`` (default: the first); 400 ``param: model`` if unknown."""
    if name is None:
        return state.models[0]
    for served in state.models:
        if name in (served.name, served.root):
            return served
    names = ", ".join(f"'{m.name}'" for m in state.models)
    raise invalid(f"the model '{name}' is not served here (models: {names})", "model")


def allowed_path(lora_dir: str | None, path: str) -> str:
    """``path`` resolved inside ``lora_dir`` (symlinks followed), else 403."""
    if lora_dir is None:
        raise APIError(403, "loading LoRA adapters at run time is off (start with --lora-dir)",
                       param="path", code="forbidden", type="permission_error")  # fmt: skip
    root = os.path.realpath(lora_dir)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise APIError(403, f"path {path!r} is outside the LoRA directory", param="path",
                       code="forbidden", type="permission_error")  # fmt: skip
    return full


async def _run(engine: Engine, command: LoraCommand) -> list[dict]:
    try:
        return await asyncio.to_thread(engine.manage_lora, command)
    except GenerationFailedError as exc:
        if exc.reason == "invalid_request":  # a file that does not fit: the path's fault
            raise invalid(str(exc), exc.param or "path") from exc
        raise


@router.get("/v1/loras")
async def list_loras(request: Request, model: str | None = None):
    state = server_state(request)
    models = state.models if model is None else [_model(state, model)]
    data = [_entry(m, e) for m in models for e in m.engine.loras.values()]
    return {"object": "list", "data": data}


@router.post("/v1/loras")
async def load_lora(request: Request, body: LoadLora):
    state = server_state(request)
    served = _model(state, body.model)
    full = allowed_path(state.config.lora_dir, body.path)
    if body.name in served.engine.loras:
        raise APIError(409, f"a LoRA named {body.name!r} is already loaded into "
                       f"'{served.name}'", param="name", code="conflict")  # fmt: skip
    if not os.path.exists(full):
        raise invalid(f"no LoRA file at {body.path!r} in the LoRA directory", "path")
    table = await _run(served.engine, LoraCommand("load", body.name, full, body.scale))
    return _entry(served, next(e for e in table if e["name"] == body.name))


@router.delete("/v1/loras/{name}")
async def delete_lora(request: Request, name: str, model: str | None = None):
    state = server_state(request)
    if model is not None:
        holders = [_model(state, model)]
    else:
        holders = [m for m in state.models if name in m.engine.loras] or [state.models[0]]
    if len(holders) > 1:
        names = ", ".join(f"'{m.name}'" for m in holders)
        raise invalid(f"LoRA {name!r} is loaded into {names}: name one as ?model=", "model")
    served = holders[0]
    if name not in served.engine.loras:
        raise APIError(404, f"no LoRA named {name!r} in '{served.name}'", param="name",
                       code="not_found")  # fmt: skip
    await _run(served.engine, LoraCommand("unload", name))
    return {"name": name, "object": "lora", "deleted": True, "model": served.name}


def check_request_loras(engine: Engine, params: GenerationParams) -> None:
    """400 ``param: lora`` for an adapter the model's engine has not loaded; a missing
    scale becomes the adapter's (``params.lora`` is what the workers apply)."""
    refs = []
    for ref in params.lora:
        entry = engine.loras.get(ref.name)
        if entry is None:
            known = ", ".join(sorted(engine.loras)) or "none loaded"
            raise invalid(f"unknown LoRA {ref.name!r} (known: {known})", "lora")
        scale = entry["scale"] if ref.scale is None else ref.scale
        refs.append(LoraRef(ref.name, scale, ref.expert))
    params.lora = tuple(refs)
