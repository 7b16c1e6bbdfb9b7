"""The FastAPI app assembled: both APIs, /healthz, /metrics and the gradio UI over one queue and one model, with
the error answers (`errors.py`), the key check (`auth.py`) and the request limits (`middleware.py`) around them.
Routes reach the engine, the queue and the settings through `request.app.state`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute

from . import a1111, openai_api
from .auth import RequireKey, Sessions, add_login
from .engine import Engine
from .errors import install_error_handlers
from .jobs import add_jobs
from .middleware import ApiMethods, BodyLimit, InFlightLimit
from .queue import JobQueue
from .settings import Settings


def create_app(engine: Engine, settings: Settings | None = None) -> FastAPI:
    """The server around `engine`: its queue's worker starts now and stops with the app."""
    settings = settings or Settings()
    queue = JobQueue(engine, settings.max_queue, settings.max_batch)
    queue.start()
    app = FastAPI(title="ldm-app", version="0.1.0", on_shutdown=[queue.stop])
    app.state.engine, app.state.settings, app.state.queue = engine, settings, queue
    add_jobs(app, engine, queue, settings)  # ldm-app's jobs API, and the jobs a previous run left

    # 1. Errors: a 4xx that says what to fix, in the shape each API's clients parse; never a traceback
    install_error_handlers(app)

    # 2. Routes
    app.include_router(a1111.router)
    app.include_router(openai_api.router)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        # no key needed here, so nothing about the machine: the model's name, not its folder's path
        return {"status": "ok", "model": Path(engine.model_name).name, "queue_length": queue.snapshot()["queue_length"]}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        """Prometheus text format: queue length, images served, mean latency, ..."""
        return "".join(f"ldm_app_{name} {value}\n" for name, value in queue.snapshot().items())

    if settings.api_key is not None:
        sessions = Sessions(settings.api_key)
        add_login(app, settings.api_key, sessions)
    api_methods = api_route_methods(app)

    # 3. The UI at / (after the API routes, which take precedence)
    if settings.ui:
        from .ui import mount_ui  # gradio: only when the UI is served

        mount_ui(app)

    # 4. Middleware, outermost last: wrong methods, the body limit, the key check, then the cap on requests
    app.add_middleware(ApiMethods, methods=api_methods)
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(RequireKey, api_key=settings.api_key, sessions=sessions)
    app.add_middleware(InFlightLimit, max_requests=settings.max_requests)
    return app


def api_route_methods(app: FastAPI) -> dict[str, set[str]]:
    """Every API path and the methods it takes (before the UI's mount, which would catch the rest)."""
    methods: dict[str, set[str]] = {}
    for route in app.routes:
        if isinstance(route, APIRoute):
            methods.setdefault(route.path, set()).update(route.methods)
    return methods
