"""The routes' way to the model: put the work on the app's queue (`request.app.state.queue`) and wait for it
without blocking the event loop, dropping it when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import Request

from ..request import GenerationRequest
from .engine import Engine
from .validation import ApiError


async def run_job(request: Request, image_request: GenerationRequest | None = None,
                  task: Callable[[Engine], Any] | None = None) -> Any:
    """Queue the work and wait for it; if the client disconnects first its job is dropped (or its batch stops).
    A full queue raises `QueueFull`, a stopping server `ShuttingDown` (both a 503)."""
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
