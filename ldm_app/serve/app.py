"""The FastAPI app: both APIs, /healthz, /metrics and the gradio UI over one queue and one model."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, ImageRequest
from .jobs import add_jobs, run_as_job
from .queue import Job, JobQueue, QueueFull
from .settings import Settings
from .validation import ApiError

logger = logging.getLogger(__name__)
SESSION_COOKIE = "ldm_app_session"
OPEN_PATHS = {"/healthz", "/login"}



def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison; on bytes, since `hmac.compare_digest` refuses non-ASCII strings (a 500)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))

def create_app(engine: Engine, settings: Settings | None = None) -> FastAPI:
    """The server around `engine`: its queue's worker starts now and stops with the app."""
    settings = settings or Settings()
    queue = JobQueue(engine, settings.max_queue, settings.max_batch)
    queue.start()
    app = FastAPI(title="ldm-app", version="0.1.0", on_shutdown=[queue.stop])
    app.state.engine, app.state.settings, app.state.queue = engine, settings, queue
    add_jobs(app, engine, queue, settings)  # ldm-app's jobs API, and the jobs a previous run left

    # 1. Errors: a 4xx that says what to fix, in the shape each API's clients parse; never a traceback
    app.add_exception_handler(ApiError, lambda request, err: error_response(request, err.status, err.message, err.param))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, lambda request, err: error_response(
        request, err.status_code, str(err.detail), headers=getattr(err, "headers", None)))
    app.add_exception_handler(QueueFull, lambda request, err: error_response(
        request, 503, str(err), headers={"Retry-After": str(err.retry_after)}))
    app.add_exception_handler(Exception, _internal_error)

    # 2. Routes
    from . import a1111, openai_api

    app.include_router(a1111.router)
    app.include_router(openai_api.router)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        # no key needed here, so nothing about the machine: the model's name, not its folder's path
        return {"status": "ok", "model": Path(engine.model_name).name, "queue_length": queue.snapshot()["queue_length"]}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        """Prometheus text format: queue length, images served, mean latency, ..."""
        lines = []
        for name, value in queue.snapshot().items():
            lines.append(f"ldm_app_{name} {value}")
        return "\n".join(lines) + "\n"

    if settings.api_key is not None:
        _add_login(app, settings.api_key)

    # 3. The UI at / (after the API routes, which take precedence)
    if settings.ui:
        from .ui import mount_ui

        mount_ui(app)

    # 4. Middleware, outermost last: the body limit, then the key check
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(RequireKey, api_key=settings.api_key)
    return app


async def run_job(request: Request, queue: JobQueue, image_request: ImageRequest | None = None,
                  task: Any = None) -> Any:
    """Queue the work and wait for it; if the client disconnects first its job is dropped (or its batch stops).
    Image requests run as jobs (/ldm/v1/jobs), so that they can be watched and cancelled by their ID."""
    if image_request is not None:
        return await run_as_job(request, image_request, "a1111" if request.url.path.startswith("/sdapi") else "openai")
    job = queue.submit(image_request, task)
    return await wait_for(job, queue, request)


async def wait_for(job: Job, queue: JobQueue, request: Request | None = None) -> Any:
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                return future.result()
            if request is not None and await request.is_disconnected():
                queue.cancel(job)
                raise ApiError(499, "The client disconnected.")
    except asyncio.CancelledError:
        queue.cancel(job)
        raise
    except ValueError as err:  # the library's own checks: bad input it caught first
        raise ApiError(422, str(err)) from None


# --------------------------------------------------------------------------------------------------------------
# Errors


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape under /v1/ (and its 400 for invalid fields), A1111's (`error`, `detail`) elsewhere."""
    if request.url.path.startswith("/v1/"):
        status = 400 if status == 422 else status
        kind = "invalid_request_error" if status < 500 else "server_error"
        body: dict = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    else:
        body = {"error": _STATUS_NAMES.get(status, "Error"), "detail": message}
        if param is not None:
            body["param"] = param
    return JSONResponse(body, status_code=status, headers=headers)


_STATUS_NAMES = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed",
                 413: "PayloadTooLarge", 422: "UnprocessableEntity", 499: "ClientClosedRequest",
                 503: "ServiceUnavailable"}


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    """Pydantic's errors as one readable line per field: where, what was wrong, what was sent."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        sent = e.get("input")
        shown = "" if isinstance(sent, (dict, list)) or sent is None else f" (got {str(sent)[:40]!r})"
        if e.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'syntax error')}); "
                            "send a JSON object")
        elif tuple(e.get("loc", ())) == ("body",):
            problems.append("the body must be a JSON object of fields (sent with Content-Type: application/json)")
        else:
            problems.append(f"{where}: {e.get('msg', 'invalid')}{shown}")
    first = err.errors()[0] if err.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) if first.get("type") != "json_invalid" else None
    return error_response(request, 422, "; ".join(problems) + ".", param or None)


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    logger.exception("error while serving %s", request.url.path)
    return error_response(request, 500, f"Internal error ({type(err).__name__}); the server log has the details.")


# --------------------------------------------------------------------------------------------------------------
# Middleware (plain ASGI, so that streaming responses and the mounted UI pass through untouched)


class BodyLimit:
    """413 for bodies over the limit: declared by Content-Length, or counted while a chunked body arrives."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        if not too_big and declared is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            body, messages = 0, []
            while True:  # buffer a chunked body up to the limit, then replay it
                message = await receive()
                messages.append(message)
                body += len(message.get("body", b""))
                if body > self.max_bytes:
                    too_big = True
                    break
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
            if not too_big:
                pending = iter(messages)

                async def replay() -> dict:
                    return next(pending, None) or await receive()

                return await self.app(scope, replay, send)
        if too_big:
            message = (f"The request body is larger than {self.max_bytes} bytes (--max-body-mb); send smaller "
                       "images or fewer of them.")
            return await error_response(Request(scope), 413, message)(scope, receive, send)
        return await self.app(scope, receive, send)


class RequireKey:
    """Every request but /healthz needs the key: `Authorization: Bearer KEY` (APIs), HTTP Basic with the key as
    password (A1111 clients' --api-auth), or the session cookie that /login sets (the UI in a browser)."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.api_key = app, api_key
        self.session = session_token(api_key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS or self._allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        request = Request(scope)
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            return await RedirectResponse("/login", status_code=303)(scope, receive, send)
        response = error_response(request, 401, "Missing or wrong API key; send the header "
                                                "'Authorization: Bearer KEY' with the server's --api-key.",
                                  headers={"WWW-Authenticate": "Bearer"})
        return await response(scope, receive, send)

    def _allowed(self, scope: dict) -> bool:
        request = Request(scope)
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and same_secret(credentials.strip(), self.api_key):
            return True
        if scheme.lower() == "basic":
            try:
                password = base64.b64decode(credentials.strip()).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
            return same_secret(password, self.api_key)
        return same_secret(request.cookies.get(SESSION_COOKIE, ""), self.session)


def session_token(api_key: str) -> str:
    """The UI's cookie: derived from the key, so it is valid exactly as long as the key is."""
    return hmac.new(api_key.encode(), b"ldm-app ui session", hashlib.sha256).hexdigest()


LOGIN_PAGE = """<!doctype html><html><head><meta name="viewport" content="width=device-width, initial-scale=1">
<title>ldm-app: sign in</title></head><body style="font-family:sans-serif;max-width:26rem;margin:3rem auto;padding:1rem">
<h2>ldm-app</h2><form method="post" action="/login"><label>API key<br>
<input name="key" type="password" autofocus style="width:100%;font-size:1.1rem"></label>
<p>{message}</p><button type="submit" style="font-size:1.1rem">Sign in</button></form></body></html>"""


def _add_login(app: FastAPI, api_key: str) -> None:
    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page() -> str:
        return LOGIN_PAGE.format(message="")

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await request.form()
        if not same_secret(str(form.get("key", "")), api_key):
            return HTMLResponse(LOGIN_PAGE.format(message="Wrong key."), status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, session_token(api_key), httponly=True, samesite="strict")
        return response
