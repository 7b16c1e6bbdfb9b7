"""The ASGI layers around the routes (plain ASGI, so that streaming responses and the mounted UI pass through
untouched): requests in progress capped, bodies capped, and the API routes' own 405 where the UI's catch-all
mount would answer 404."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from .errors import error_response

UNCAPPED_PATHS = {"/healthz"}  # answered at once from memory: a health check must work when the server is full


class InFlightLimit:
    """503 + Retry-After for a request beyond `max_requests` in progress. Counts requests, not sockets: an idle
    connection costs nothing here (`connections.py` closes those)."""

    def __init__(self, app: Any, max_requests: int):
        self.app, self.max_requests, self.in_flight = app, max_requests, 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in UNCAPPED_PATHS:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_requests:
            message = (f"The server has {self.in_flight} requests in progress, its limit (--max-queue + --max-batch "
                       "+ 16); retry in a moment.")
            return await error_response(Request(scope), 503, message, headers={"Retry-After": "1"})(
                scope, receive, send)
        self.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


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
            message = (f"The request body is too large: over {self.max_bytes} bytes (--max-body-mb); send smaller "
                       "images or fewer of them.")
            return await error_response(Request(scope), 413, message)(scope, receive, send)
        return await self.app(scope, receive, send)


class ApiMethods:
    """405 (with `Allow`) for an API path called with a method it does not take: without this the UI, mounted
    at /, would take the request and answer 404."""

    def __init__(self, app: Any, methods: dict[str, set[str]]):
        self.app, self.methods = app, methods

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        allowed = self.methods.get(scope["path"]) if scope["type"] == "http" else None
        if allowed is None or scope["method"] in allowed or (scope["method"] == "HEAD" and "GET" in allowed):
            return await self.app(scope, receive, send)
        allow = ", ".join(sorted(allowed))
        return await error_response(Request(scope), 405, f"{scope['method']} is not allowed here; this route takes "
                                                          f"{allow}.", headers={"Allow": allow})(scope, receive, send)
