"""``/v1/videos``: queued jobs, polling with real progress, MP4 content, cursor list, delete."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import secrets
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile

from ithaca.engine.errors import DrainingError, EngineError, QueueFullError, client_message
from ithaca.engine.scheduler import EngineRequest
from ithaca.server import media
from ithaca.server.errors import APIError, invalid
from ithaca.server.images import decode_upload, read_form
from ithaca.server.loras import check_request_loras
from ithaca.server.outputs import write_private
from ithaca.server.protocol import VideoRequest
from ithaca.server.state import (
    ServerState,
    admit,
    escape,
    log_ignored,
    read_json,
    request_id,
    server_state,
)
from ithaca.types import GenerationParams, LoraRef

router = APIRouter()
log = logging.getLogger("ithaca.server.videos")
POLL_AFTER_MS = "500"


def _not_found(video_id: str) -> APIError:
    return APIError(404, f"no video with id '{video_id}'", param="video_id", code="not_found")


@router.post("/v1/videos")
async def create(request: Request):
    state = server_state(request)
    images = []
    limit = state.config.max_input_pixels
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await read_form(request, 2, "input_reference")
        fields = {}
        for k, v in form.multi_items():
            if isinstance(v, UploadFile):
                if k != "input_reference":
                    raise invalid(f"{k} must be a plain form field, not a file", k)
                images.append(await decode_upload(v, "input_reference", limit))
            else:
                fields[k] = None if v == "null" else v
        body = VideoRequest.model_validate(fields)
    else:
        raw = await read_json(request)
        ref = raw.pop("input_reference", None)
        body = VideoRequest.model_validate(raw)
        if isinstance(ref, dict) and isinstance(ref.get("image_url"), str):
            url = ref["image_url"]
            param = "input_reference.image_url"
            images.append(await asyncio.to_thread(media.decode_data_url, url, param, limit))
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
        log.warning("[%s] %s", request_id(request), escape(warning))
    params.images = await asyncio.to_thread(lambda: [img.convert("RGB") for img in images])
    resolved = await admit(state, served.engine, request, params)  # t2v + input image: 400
    if params.seed is None:  # fixed now, so a rerun after a restart makes the same video
        params.seed = secrets.randbelow(2**31)
    seconds = body.seconds or f"{params.num_frames / params.fps:g}"
    size = body.size or "auto"
    job_id = f"video_{uuid.uuid4().hex}"
    if params.images:
        await asyncio.to_thread(_save_input, state, job_id, params.images[0])
    job = state.videos.create(job_id, model, body.prompt, seconds, size, params_to_json(params))
    try:
        req = _submit(state, served.engine, job_id, params, resolved, request_id(request))
    except EngineError:
        state.videos.delete(job_id)
        raise
    task = asyncio.create_task(_finish(state, job_id, req))
    state.video_jobs[job_id] = (req, task)
    out = job.to_openai()
    if warnings:  # extension: words of the prompt the model never learned
        out["warnings"] = warnings
    return JSONResponse(out)


def params_to_json(params: GenerationParams) -> str:
    plain = {
        f.name: getattr(params, f.name)
        for f in dataclasses.fields(params)
        if f.name not in ("images", "request_id")
    }
    plain["lora"] = [dataclasses.asdict(ref) for ref in params.lora]
    return json.dumps(plain)


def _save_input(state: ServerState, job_id: str, image) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_private(state.videos.input_path(job_id), buf.getvalue())


def _load_params(state: ServerState, job) -> GenerationParams:
    params = GenerationParams(**json.loads(job.params))
    params.lora = tuple(LoraRef(**ref) for ref in params.lora)
    path = state.videos.input_path(job.id)
    if os.path.exists(path):
        with Image.open(path) as image:
            params.images = [image.convert("RGB")]
    return params


async def resume_jobs(state: ServerState, poll_s: float = 0.2) -> None:
    """After a restart: run the jobs the previous process left queued or running, in
    their creation order, once the engine is ready (a full queue is retried)."""
    jobs = await asyncio.to_thread(state.videos.unfinished)
    if not jobs:
        return
    log.warning("running %d video job(s) left unfinished by a previous run", len(jobs))
    for job in jobs:
        if job.id in state.video_jobs or state.videos.get(job.id) is None:
            continue
        try:
            engine = state.resolve_model(job.model, "video").engine
        except APIError as exc:  # the model is no longer served here
            state.videos.fail(job.id, exc.code or "model_not_found", exc.message)
            continue
        while not engine.ready:
            if engine.fatal_reason:
                return
            await asyncio.sleep(poll_s)
        params = await asyncio.to_thread(_load_params, state, job)
        while True:
            try:
                resolved = await asyncio.to_thread(engine.validate, params)
                req = _submit(state, engine, job.id, params, resolved, job.id)
                break
            except QueueFullError:
                await asyncio.sleep(1.0)
            except EngineError as exc:
                if exc.status >= 500:
                    return  # shutting down or dead: they stay queued for the next start
                state.videos.fail(job.id, exc.code, client_message(exc))
                req = None
                break
        if req is not None:
            state.video_jobs[job.id] = (req, asyncio.create_task(_finish(state, job.id, req)))


def _submit(
    state: ServerState, engine, job_id: str, params, resolved=None, label="-"
) -> EngineRequest:
    last = [-1]
    # Every few steps the loop saves its state here; after a restart the job resumes
    # from it (ithaca.runtime.checkpoint). Removed when the job ends.
    params.checkpoint = state.videos.checkpoint_path(job_id)
    params.checkpoint_every = state.config.checkpoint_every

    def on_progress(step: int, total: int, previews) -> None:
        progress = min(99, int(100 * step / max(1, total)))
        if progress != last[0]:
            last[0] = progress
            state.videos.update(job_id, status="in_progress", progress=progress)

    return engine.submit(params, on_progress, label=label, resolved=resolved)


async def _finish(state: ServerState, job_id: str, req: EngineRequest) -> None:
    ended = True  # False: requeued, its saved step kept for the next start
    try:
        result = await asyncio.wrap_future(req.future)
        if result.frames is None:
            raise RuntimeError("the model returned no video frames (is it an image model?)")
        frames = result.frames
        blob = await asyncio.to_thread(media.encode_mp4, frames, result.fps or 16)
        path = state.videos.video_path(job_id)
        await asyncio.to_thread(write_private, path, blob)
        if state.videos.get(job_id) is None:  # deleted meanwhile
            await asyncio.to_thread(_remove, path)
            return
        state.videos.complete(job_id, path, f"{frames.shape[2]}x{frames.shape[1]}")
    except asyncio.CancelledError:
        ended = False
        _requeue(state, job_id)  # the server shuts down: the next start runs it again
        raise
    except DrainingError:
        ended = False
        _requeue(state, job_id)
    except EngineError as exc:
        state.videos.fail(job_id, exc.code, client_message(exc))
    except Exception:
        log.exception("video job %s failed", job_id)
        state.videos.fail(job_id, "internal_error", "the job failed with an internal error")
    finally:
        state.video_jobs.pop(job_id, None)
        if ended:
            await asyncio.to_thread(_remove, state.videos.checkpoint_path(job_id))


def _requeue(state: ServerState, job_id: str) -> None:
    job = state.videos.get(job_id)
    if job is None or job.status in ("completed", "failed"):
        return
    if job.params:
        state.videos.update(job_id, status="queued", progress=0)
    else:
        state.videos.fail(job_id, "server_shutdown", "the server shut down while this job ran")


def _remove(path: str) -> None:
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
