"""``/v1/videos``: queued jobs, polling with real progress, MP4 content, cursor list, delete."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile

from ithaca.engine.errors import EngineError
from ithaca.engine.scheduler import EngineRequest
from ithaca.server import media
from ithaca.server.errors import APIError, invalid
from ithaca.server.loras import check_request_loras
from ithaca.server.protocol import VideoRequest
from ithaca.server.state import ServerState, log_ignored, read_json, request_id, server_state

router = APIRouter()
log = logging.getLogger("ithaca.server.videos")
POLL_AFTER_MS = "500"


def _not_found(video_id: str) -> APIError:
    return APIError(404, f"no video with id '{video_id}'", param="video_id", code="not_found")


@router.post("/v1/videos")
async def create(request: Request):
    state = server_state(request)
    images = []
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=2)
        fields = {}
        for k, v in form.multi_items():
            if isinstance(v, UploadFile):
                if k != "input_reference":
                    raise invalid(f"{k} must be a plain form field, not a file", k)
                images.append(media.decode_image(await v.read(), "input_reference"))
            else:
                fields[k] = None if v == "null" else v
        body = VideoRequest.model_validate(fields)
    else:
        raw = await read_json(request)
        ref = raw.pop("input_reference", None)
        body = VideoRequest.model_validate(raw)
        if isinstance(ref, dict) and ref.get("image_url"):
            images.append(media.decode_data_url(ref["image_url"], "input_reference.image_url"))
        elif ref is not None:
            raise invalid(
                "input_reference must be {'image_url': 'data:...'} in JSON", "input_reference"
            )
    log_ignored(request, body.extra_fields())
    served = state.resolve_model(body.model, "video")
    model = served.name
    declared = served.info.defaults  # what the checkpoint was trained at, if it says
    params = body.to_params(default_fps=declared.get("fps", 16))
    if body.num_frames is None and body.seconds is None and "num_frames" in declared:
        params.num_frames = declared["num_frames"]
    check_request_loras(served.engine, params)
    warnings = served.warnings(params.prompt)
    for warning in warnings:
        log.warning("[%s] %s", request_id(request), warning)
    params.images = [img.convert("RGB") for img in images]
    seconds = body.seconds or f"{params.num_frames / params.fps:g}"
    size = body.size or "auto"
    job_id = f"video_{uuid.uuid4().hex}"
    job = state.videos.create(job_id, model, body.prompt, seconds, size)
    try:
        req = _submit(state, served.engine, job_id, params)
    except EngineError:
        state.videos.delete(job_id)
        raise
    task = asyncio.create_task(_finish(state, job_id, req))
    state.video_jobs[job_id] = (req, task)
    out = job.to_openai()
    if warnings:  # extension: words of the prompt the model never learned
        out["warnings"] = warnings
    return JSONResponse(out)


def _submit(state: ServerState, engine, job_id: str, params) -> EngineRequest:
    last = [-1]

    def on_progress(step: int, total: int, previews) -> None:
        progress = min(99, int(100 * step / max(1, total)))
        if progress != last[0]:
            last[0] = progress
            state.videos.update(job_id, status="in_progress", progress=progress)

    return engine.submit(params, on_progress)


async def _finish(state: ServerState, job_id: str, req: EngineRequest) -> None:
    try:
        result = await asyncio.wrap_future(req.future)
        if result.frames is None:
            raise RuntimeError("the model returned no video frames (is it an image model?)")
        frames = result.frames
        blob = await asyncio.to_thread(media.encode_mp4, frames, result.fps or 16)
        path = state.videos.video_path(job_id)
        await asyncio.to_thread(_write, path, blob)
        if state.videos.get(job_id) is None:  # deleted meanwhile
            await asyncio.to_thread(_remove, path)
            return
        state.videos.update(
            job_id,
            status="completed",
            progress=100,
            path=path,
            size=f"{frames.shape[2]}x{frames.shape[1]}",
            completed_at=int(time.time()),
        )
    except asyncio.CancelledError:
        state.videos.fail(job_id, "server_shutdown", "the server shut down while this job ran")
        raise
    except EngineError as exc:
        state.videos.fail(job_id, exc.code, str(exc))
    except Exception as exc:
        log.exception("video job %s failed", job_id)
        state.videos.fail(job_id, "internal_error", f"{type(exc).__name__}: {exc}")
    finally:
        state.video_jobs.pop(job_id, None)


def _write(path: str, blob: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(blob)
    import os

    os.replace(path + ".tmp", path)


def _remove(path: str) -> None:
    import os

    with contextlib.suppress(OSError):
        os.remove(path)


@router.get("/v1/videos")
async def list_videos(
    request: Request, after: str | None = None, limit: int = 20, order: str = "desc"
):
    if not 1 <= limit <= 100:
        raise invalid(f"limit ({limit}) must be in 1..100", "limit")
    if order not in ("asc", "desc"):
        raise invalid(f"order ({order!r}) must be 'asc' or 'desc'", "order")
    try:
        jobs, more = server_state(request).videos.list(after, limit, order)
    except KeyError:
        raise invalid(f"after ({after!r}) is not a known video id", "after") from None
    data = [j.to_openai() for j in jobs]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


@router.get("/v1/videos/{video_id}")
async def retrieve(request: Request, video_id: str):
    job = server_state(request).videos.get(video_id)
    if job is None:
        raise _not_found(video_id)
    headers = (
        {} if job.status in ("completed", "failed") else {"openai-poll-after-ms": POLL_AFTER_MS}
    )
    return JSONResponse(job.to_openai(), headers=headers)


@router.get("/v1/videos/{video_id}/content")
async def content(request: Request, video_id: str, variant: str = "video"):
    job = server_state(request).videos.get(video_id)
    if job is None:
        raise _not_found(video_id)
    if variant != "video":
        raise invalid(f"variant ({variant!r}) is not available; only 'video'", "variant")
    if job.status != "completed" or not job.path:
        raise APIError(
            409, f"video '{video_id}' is {job.status}, not completed", code="video_not_ready"
        )
    return FileResponse(job.path, media_type="video/mp4")


@router.delete("/v1/videos/{video_id}")
async def delete(request: Request, video_id: str):
    state = server_state(request)
    running = state.video_jobs.get(video_id)
    if running is not None:
        state.cancel(running[0])
    if not state.videos.delete(video_id):
        raise _not_found(video_id)
    return {"id": video_id, "object": "video.deleted", "deleted": True}
