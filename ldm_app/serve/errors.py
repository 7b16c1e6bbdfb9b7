"""Every answer that is not a result: a 4xx that says what to fix, in the shape each API's clients parse, and a
503 while the queue is full or the server is shutting down. Never a traceback in a body; one log line per 4xx."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .queue import QueueFull, ShuttingDown
from .validation import ApiError

logger = logging.getLogger("ldm_app.serve")

STATUS_NAMES = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed",
                413: "PayloadTooLarge", 422: "UnprocessableEntity", 499: "ClientClosedRequest",
                503: "ServiceUnavailable"}


def error_response(request: Request, status: int, message: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape under /v1/ (and its 400 for invalid fields), A1111's (`error`, `detail`) elsewhere.
    A 4xx is the client's mistake: one log line (method, path, status, message), never a traceback."""
    if 400 <= status < 500:
        logger.warning("%s %s → %d: %s", request.method, request.url.path, status, message[:200])
    if request.url.path.startswith("/v1/"):
        status = 400 if status == 422 else status
        kind = "invalid_request_error" if status < 500 else "server_error"
        body: dict = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    else:
        body = {"error": STATUS_NAMES.get(status, "Error"), "detail": message}
        if param is not None:
            body["param"] = param
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """The app's exception → response table."""
    app.add_exception_handler(ApiError, lambda request, err: error_response(request, err.status, err.message,
                                                                            err.param))
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, lambda request, err: error_response(
        request, err.status_code, http_message(err), headers=getattr(err, "headers", None)))
    app.add_exception_handler(QueueFull, lambda request, err: error_response(
        request, 503, str(err), headers={"Retry-After": str(err.retry_after)}))
    app.add_exception_handler(ShuttingDown, lambda request, err: error_response(  # a QueueFull: Starlette picks the closest class
        request, 503, str(err), headers={"Retry-After": str(err.retry_after), "Connection": "close"}))
    app.add_exception_handler(Exception, internal_error)


def http_message(err: StarletteHTTPException) -> str:
    """Starlette's terse details ("Method Not Allowed") made into what to do."""
    allowed = (err.headers or {}).get("Allow")
    if err.status_code == 405 and allowed:
        return f"{err.detail}; this route takes {allowed}."
    return str(err.detail)


async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
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


async def internal_error(request: Request, err: Exception) -> JSONResponse:
    logger.exception("error while serving %s", request.url.path)
    return error_response(request, 500, f"Internal error ({type(err).__name__}); the server log has the details.")
