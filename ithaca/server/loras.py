"""``/v1/loras``: list, load and unload LoRA adapters at run time (behind the API key).

``POST /v1/loras {"name", "path", "scale"}`` loads a file (or PEFT folder) from inside
``--lora-dir`` only: a path that resolves outside it (``..``, an absolute path, a
symlink) is refused with 403, and without ``--lora-dir`` run-time loading is off (403).
The engine runs every command on every rank of every worker group, between batches.
With several served models, ``/v1/loras`` manages the first model's adapters (and
``--lora`` preloads into it).
:func:`check_request_loras` answers a request naming an unknown adapter with 400
``param: lora`` before it is queued.
"""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ithaca.engine.engine import Engine
from ithaca.engine.errors import GenerationFailedError
from ithaca.server.errors import APIError, invalid
from ithaca.server.state import ServerState, server_state
from ithaca.types import GenerationParams, LoraCommand

router = APIRouter()


class LoadLora(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    path: str = Field(min_length=1, max_length=4096)
    """Relative to ``--lora-dir``."""
    scale: float = Field(default=1.0, ge=-100, le=100)
    """The scale a request gets when it names the adapter without one."""


def _table(entries) -> dict:
    data = [{k: v for k, v in e.items() if k != "path"} for e in entries]
    return {"object": "list", "data": data}


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


async def _run(state: ServerState, command: LoraCommand) -> list[dict]:
    try:
        return await asyncio.to_thread(state.engine.manage_lora, command)
    except GenerationFailedError as exc:
        if exc.reason == "invalid_request":
            param = "name" if "name" in str(exc).split(":")[-1][:40] else "path"
            raise invalid(str(exc), param) from exc
        raise


@router.get("/v1/loras")
async def list_loras(request: Request):
    return _table(server_state(request).engine.loras.values())


@router.post("/v1/loras")
async def load_lora(request: Request, body: LoadLora):
    state = server_state(request)
    full = allowed_path(state.config.lora_dir, body.path)
    if body.name in state.engine.loras:
        raise APIError(409, f"a LoRA named {body.name!r} is already loaded", param="name",
                       code="conflict")  # fmt: skip
    if not os.path.exists(full):
        raise invalid(f"no LoRA file at {body.path!r} in the LoRA directory", "path")
    table = await _run(state, LoraCommand("load", body.name, full, body.scale))
    entry = next(e for e in table if e["name"] == body.name)
    return {k: v for k, v in entry.items() if k != "path"}


@router.delete("/v1/loras/{name}")
async def delete_lora(request: Request, name: str):
    state = server_state(request)
    if name not in state.engine.loras:
        raise APIError(404, f"no LoRA named {name!r}", param="name", code="not_found")
    await _run(state, LoraCommand("unload", name))
    return {"name": name, "object": "lora", "deleted": True}


def check_request_loras(engine: Engine, params: GenerationParams) -> None:
    """400 ``param: lora`` for an adapter the model's engine has not loaded."""
    for ref in params.lora:
        if ref.name not in engine.loras:
            known = ", ".join(sorted(engine.loras)) or "none loaded"
            raise invalid(f"unknown LoRA {ref.name!r} (known: {known})", "lora")
