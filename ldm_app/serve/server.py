"""Running the app: the process set up (threads, a private temp folder, no calls home), the model loaded, and
uvicorn started with connection deadlines and a shutdown that answers waiting requests before it waits for them.

    SIGTERM/Ctrl-C → new connections refused; waiting requests answered 503 "shutting down" at once; the running
    batch stops at its next denoising step (its clients get the same 503); then uvicorn closes the connections
    (at most `GRACEFUL_SHUTDOWN` s) and the app's shutdown removes the temp folder.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import uvicorn

from .connections import deadline_protocol
from .queue import JobQueue
from .settings import Settings
from .tempfiles import UploadSweeper, private_temp_folder

GRACEFUL_SHUTDOWN = 5  # s uvicorn waits for responses in flight after SIGTERM before it cancels them


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown first tells the queue (so waiting requests end now, with a 503)."""

    def __init__(self, config: uvicorn.Config, queue: JobQueue):
        super().__init__(config)
        self.queue = queue

    async def shutdown(self, sockets: Any = None) -> None:
        self.queue.close()
        await super().shutdown(sockets)


def keep_to_this_machine(telemetry: bool) -> None:
    """No calls home unless asked: gradio's version check and analytics (one switch in gradio 6:
    GRADIO_ANALYTICS_ENABLED) and huggingface_hub's telemetry. Set before gradio is imported."""
    value = "True" if telemetry else "False"
    os.environ["GRADIO_ANALYTICS_ENABLED"] = value
    if not telemetry:
        os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def serve(model: str, loras: list[str], host: str, port: int, settings: Settings, device: str, dtype: str,
          lora_dir: str | None, variant: str | None, threads: int | None) -> None:
    """`ldm_app.serve.run_server` once its checks have passed: set up, load, serve until SIGTERM/Ctrl-C."""
    # 1. The process: threads, temp files, privacy (before gradio is imported)
    from ..threads import use_threads

    used_threads = use_threads(threads)
    temp = private_temp_folder()
    keep_to_this_machine(settings.telemetry)

    # 2. The model and the app
    from .app import create_app
    from .engine import Engine

    try:
        engine = Engine.load(model, list(loras), lora_dir, device, dtype, variant)
        app = create_app(engine, settings)
    except BaseException:  # a model that cannot be loaded, Ctrl-C while loading: no folder left behind
        shutil.rmtree(temp, ignore_errors=True)
        raise
    sweeper = UploadSweeper(temp)
    app.router.on_startup.append(sweeper.start)
    app.router.on_shutdown.append(sweeper.stop)
    app.router.on_shutdown.append(lambda: shutil.rmtree(temp, ignore_errors=True))

    # 3. HTTP: uvicorn's h11 protocol with deadlines; the cap on requests is the app's (middleware.InFlightLimit)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", http=deadline_protocol(settings),
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN)
    print(f"ldm-app serve: http://{host}:{port}/ (UI), /sdapi/v1 (A1111), /v1/images (OpenAI); "
          f"{used_threads} CPU threads", flush=True)
    Server(config, app.state.queue).run()
