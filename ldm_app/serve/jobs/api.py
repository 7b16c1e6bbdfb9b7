"""ldm-app's own jobs API, beside the A1111 and OpenAI ones: submit work and get an ID at once, then watch,
list, cancel and collect it.

    POST   /ldm/v1/jobs/finetune-lora   multipart: photos (files or .zip), name, prompt, finetune-lora's options
    POST   /ldm/v1/jobs/generate        JSON: a generation request                      → 202 {"id": ...}
    GET    /ldm/v1/jobs                 the caller's jobs, newest first
    GET    /ldm/v1/jobs/{id}            {"id", "kind", "state", "progress": {"step", "total"}, "result", "error"}
    GET    /ldm/v1/jobs/{id}/events     the same, as server-sent events, until the job ends
    GET    /ldm/v1/jobs/{id}/files/...  its images, or its LoRA files, card, grid and samples
    DELETE /ldm/v1/jobs/{id}            cancel

With --api-key, a job belongs to the key that made it: other keys get 404 for it, and lists hold only their own.
A1111 and OpenAI generation requests are jobs too (their ID comes back in the `X-Job-Id` response header, or the
client chooses it by sending that header), so they can be watched and cancelled here while they wait.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from ...request import GenerationRequest
from ..engine import Engine
from ..validation import ApiError, image_request, parse_size
from .photos import stage_uploads
from .service import GENERATE, Jobs
from .store import JobRecord
from .training import FinetuneOptions, downloadable

router = APIRouter(prefix="/ldm/v1/jobs", tags=["ldm-app jobs"])
JOB_ID_HEADER = "X-Job-Id"
JOB_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
IMAGE_FILE = re.compile(r"image-\d+\.png")


def jobs_of(http: Request) -> Jobs:
    return http.app.state.jobs


def owner_of(http: Request) -> str | None:
    """Whose job this is: the API key the request was let in with (the key check has run by now)."""
    return owner_for_key(http.app.state.settings.api_key)


def owner_for_key(key: str | None) -> str | None:
    """A job's owner: a hash of its key (only the hash is stored), or None on a server without a key."""
    return None if key is None else hashlib.sha256(f"ldm-app job owner\0{key}".encode()).hexdigest()[:32]


def owned(http: Request, job_id: str) -> JobRecord:
    """The caller's job `job_id`, or a 404 (also for another key's job: its existence is not revealed)."""
    record = jobs_of(http).store.get(job_id)
    if record is None or record.owner != owner_of(http):
        raise ApiError(404, f"No job {job_id!r}; GET /ldm/v1/jobs lists yours.", "id")
    return record


# --------------------------------------------------------------------------------------------------------------
# Submitting


class GenerateJob(BaseModel):
    """A text-to-image request: the fields of OpenAI's images API with ldm-app's own (as in /v1/images)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str = ""
    n: int = 1
    size: str | None = Field(None, description='"WIDTHxHEIGHT" or "auto" (the model\'s native size)')
    width: int | None = None
    height: int | None = None
    steps: int | None = Field(None, description="None: the sampler's (25; lcm: 4)")
    guidance: float | None = Field(None, description="None: the sampler's (5; lcm: 1)")
    eta: float = 0.0
    sampler: str = "ddim"
    seed: int | None = Field(None, description="None or -1: random; image i uses seed + i")
    loras: dict[str, float] | None = Field(None, description="LoRA name → scale (or <lora:name:w> in the prompt)")


@router.post("/generate", status_code=202)
def submit_generate(body: GenerateJob, http: Request) -> dict[str, str]:
    """Queue a generation and answer at once; the images are collected from the job's `result.images`."""
    engine, limits = http.app.state.engine, http.app.state.settings.limits
    width, height = parse_size(body.size, engine.default_size)
    request = image_request(engine, limits, prompt=body.prompt, negative_prompt=body.negative_prompt,
                            steps=body.steps, guidance=body.guidance, eta=body.eta, sampler=body.sampler,
                            seed=body.seed, width=body.width or width, height=body.height or height, n=body.n,
                            loras=body.loras)
    record, _ = jobs_of(http).submit_generation(request, owner_of(http), "jobs", client_job_id(http))
    return {"id": record.id}


FLAGS = {"train_text_encoder", "prior_preservation"}
NUMBERS = {"steps": int, "rank": int, "alpha": float, "lr": float, "batch_size": int, "resolution": int,
           "num_class_images": int, "seed": int, "checkpoint_every": int, "sample_every": int}
TEXTS = {"name", "prompt", "format", "mixed_precision"}


@router.post("/finetune-lora", status_code=202)
async def submit_finetune(http: Request) -> dict[str, str]:
    """Queue a LoRA fine-tune on the uploaded photos; when it ends, the LoRA is offered under `name`."""
    limits = http.app.state.settings.limits
    try:
        form = await http.form(max_files=2000, max_fields=2000)
    except Exception:  # noqa: BLE001  (python-multipart's parse errors have no common base class)
        raise ApiError(422, "the body is not multipart/form-data; send the photos as files named 'photos' and "
                            "the options as form fields.") from None
    unknown = sorted(set(form) - FLAGS - set(NUMBERS) - TEXTS - {"photos", "class_prompt", "captions"})
    if unknown:
        raise ApiError(422, f"unknown field {unknown[0]!r}; the fields are photos, captions, class_prompt, "
                            f"{', '.join(sorted(FLAGS | set(NUMBERS) | TEXTS))}.", unknown[0])
    values: dict[str, Any] = {}
    for name in TEXTS:
        values[name] = text_field(form, name)
    for name, kind in NUMBERS.items():
        raw = text_field(form, name)
        if raw not in (None, ""):
            try:
                values[name] = kind(raw)
            except ValueError:
                raise ApiError(422, f"{name}={raw!r} is not {'a whole number' if kind is int else 'a number'}.",
                               name) from None
    for name in FLAGS:
        raw = (text_field(form, name) or "false").strip().lower()
        if raw not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
            raise ApiError(422, f"{name}={raw!r}: send true or false.", name)
        values[name] = raw in ("true", "1", "on", "yes")
    class_prompts = [p for p in form.getlist("class_prompt") if isinstance(p, str) and p.strip()]
    if values.pop("prior_preservation") and not class_prompts:
        raise ApiError(422, "prior_preservation needs class_prompt, e.g. 'a photo of a cat'.", "class_prompt")
    if values["name"] is None:
        raise ApiError(422, "name is missing; send the LoRA's name (e.g. my-cat) as a form field.", "name")
    values = {k: v for k, v in values.items() if v is not None}
    try:
        options = FinetuneOptions(**values, class_prompts=class_prompts)
    except ValueError as err:
        raise ApiError(422, str(err), str(err).partition("=")[0]) from None
    for name, text in (("prompt", options.prompt), ("class_prompt", max(class_prompts, key=len, default=None))):
        if text is not None and len(text) > limits.max_prompt_chars:
            raise ApiError(422, f"{name} has {len(text)} characters; the server accepts at most "
                                f"{limits.max_prompt_chars} (--max-prompt-chars).", name)
    captions = parse_captions(text_field(form, "captions"))
    uploads = []
    for item in form.getlist("photos"):
        if not isinstance(item, UploadFile):
            raise ApiError(422, "photos must be file uploads; send each photo as a file field named 'photos'.",
                           "photos")
        uploads.append((item.filename or "photo", await item.read()))

    def stage(folder: Any) -> None:
        stage_uploads(uploads, captions, options.prompt, folder, limits)

    record = await asyncio.to_thread(jobs_of(http).submit_finetune, options, stage, owner_of(http))
    return {"id": record.id}


def text_field(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(422, f"{name} must be a text field, not a file.", name)
    return value


def parse_captions(raw: str | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        captions = json.loads(raw)
    except ValueError:
        captions = None
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise ApiError(422, "captions must be a JSON object of photo file name → caption, e.g. "
                            "{\"cat1.jpg\": \"a photo of sks cat\"}.", "captions")
    return captions


def client_job_id(http: Request) -> str | None:
    """The ID a client chose for its request (the X-Job-Id header), so that it can watch the request's progress
    while it waits for the answer."""
    value = http.headers.get(JOB_ID_HEADER)
    if value is None:
        return None
    if not JOB_ID.fullmatch(value):
        raise ApiError(422, f"{JOB_ID_HEADER} must be 8-64 letters, digits, '-' or '_' (e.g. a UUID without "
                            "braces); leave it out to get one.", JOB_ID_HEADER)
    return value


# --------------------------------------------------------------------------------------------------------------
# Watching, cancelling, collecting


@router.get("")
def list_jobs(http: Request, limit: int = 100) -> dict[str, list[dict[str, Any]]]:
    """The caller's newest jobs (at most `limit`, 1 to 1000)."""
    if not 1 <= limit <= 1000:
        raise ApiError(422, f"limit={limit}; use 1 to 1000.", "limit")
    jobs = jobs_of(http)
    return {"jobs": [jobs.view(r) for r in jobs.store.list(owner_of(http), limit)]}


@router.get("/{job_id}")
def get_job(job_id: str, http: Request) -> dict[str, Any]:
    return jobs_of(http).view(owned(http, job_id))


@router.delete("/{job_id}")
def cancel_job(job_id: str, http: Request) -> JSONResponse:
    """Cancel: a queued job at once (200), a running one at its next step (202; watch it turn `cancelled`)."""
    record = owned(http, job_id)
    if record.final:
        raise ApiError(409, f"Job {job_id} is {record.state} already; there is nothing to cancel.", "id")
    jobs = jobs_of(http)
    record = jobs.cancel(job_id)
    return JSONResponse(jobs.view(record), status_code=200 if record.final else 202)


@router.get("/{job_id}/events")
async def job_events(job_id: str, http: Request) -> StreamingResponse:
    """Server-sent events: `progress` with the job's view whenever it changes, `end` with its final view."""
    owned(http, job_id)
    jobs = jobs_of(http)

    async def events() -> AsyncIterator[str]:
        last, idle = None, 0.0
        while True:
            record = jobs.store.get(job_id)
            view = jobs.view(record)
            final = record.final
            if view != last:
                yield f"event: {'end' if final else 'progress'}\ndata: {json.dumps(view)}\n\n"
                last, idle = view, 0.0
            if final:
                return
            if idle >= 15:
                yield ": keep-alive\n\n"
                idle = 0.0
            if await http.is_disconnected():
                return
            await asyncio.sleep(0.2)
            idle += 0.2

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/files/{name:path}")
def job_file(job_id: str, name: str, http: Request) -> FileResponse:
    """A generation's PNGs; a fine-tune's LoRA (diffusers and kohya files), card, grid, config and samples."""
    record = owned(http, job_id)
    jobs = jobs_of(http)
    if record.kind == GENERATE:
        path = jobs.folder / job_id / name if IMAGE_FILE.fullmatch(name) else None
        path = path if path is not None and path.is_file() else None
    else:
        path = downloadable(jobs.run_dir(job_id), name)
    if path is None:
        raise ApiError(404, f"Job {job_id} has no file {name!r}; its result lists its files.", "name")
    return FileResponse(path, filename=path.name)


# --------------------------------------------------------------------------------------------------------------
# The routes' way to the model: A1111 and OpenAI requests as jobs


async def run_job(request: Request, image_request: GenerationRequest | None = None,
                  task: Callable[[Engine], Any] | None = None) -> Any:
    """Queue the work and wait for it; if the client disconnects first its job is dropped (or its batch stops).
    Image requests run as jobs (`run_as_job`); a full queue raises `QueueFull`, a stopping server `ShuttingDown`
    (both a 503)."""
    if image_request is not None:
        return await run_as_job(request, image_request, "a1111" if request.url.path.startswith("/sdapi") else "openai")
    queue = request.app.state.queue
    job = queue.submit(image_request, task)
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                return future.result()
            if await request.is_disconnected():
                queue.cancel(job)
                raise ApiError(499, "The client disconnected.")
    except asyncio.CancelledError:
        queue.cancel(job)
        raise
    except ValueError as err:  # the library's own checks: bad input it caught first
        raise ApiError(422, str(err)) from None


async def run_as_job(http: Request, request: GenerationRequest, source: str) -> Any:
    """Run a blocking API's generation as a job: its ID goes into the X-Job-Id response header; the client may
    have chosen it (same header on the request) to watch and cancel the request while it waits."""
    jobs = jobs_of(http)
    record, queued = jobs.submit_generation(request, owner_of(http), source, client_job_id(http))
    http.state.job_id = record.id
    cancelled = ApiError(409, f"Job {record.id} was cancelled (DELETE /ldm/v1/jobs/{record.id}).")
    future = asyncio.wrap_future(queued.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if jobs.store.get(record.id).state == "cancelled" or future.cancelled():
                raise cancelled
            if done:
                return future.result()
            if await http.is_disconnected():
                jobs.cancel(record.id)
                raise ApiError(499, "The client disconnected.")
    except asyncio.CancelledError:  # the server is stopping this request
        jobs.cancel(record.id)
        raise
    except ValueError as err:  # the library's own checks: bad input it caught first
        raise ApiError(422, str(err)) from None


class JobIdHeader:
    """Adds the X-Job-Id response header for requests that ran as a job (plain ASGI: the route sets
    `request.state.job_id`, which lives in the scope this middleware shares)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start" and state.get("job_id"):
                message = {**message, "headers": [*message.get("headers", []),
                                                  (JOB_ID_HEADER.lower().encode(), state["job_id"].encode())]}
            await send(message)

        return await self.app(scope, receive, send_with_id)
