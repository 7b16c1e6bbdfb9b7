"""Jobs: the routes' way to the model (`run_job`), and LoRA fine-tunes and generations submitted for later, kept
in the server's data folder so that a restart takes them up again; ldm-app's own API at /ldm/v1/jobs. `add_jobs`
puts them on the server's app."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from .api import JobIdHeader, router, run_as_job, run_job
from .service import Jobs

__all__ = ["Jobs", "add_jobs", "run_as_job", "run_job"]


def add_jobs(app: Any, engine: Any, queue: Any, settings: Any) -> Jobs:
    """Open the data folder (a temporary one, removed at shutdown, when `settings.data_dir` is None), take up
    the jobs a previous run left, and serve the jobs API; stops before the queue does."""
    data_dir = settings.data_dir
    temporary = data_dir is None
    if temporary:
        data_dir = tempfile.mkdtemp(prefix="ldm-app-data-")
    lora_dir = Path(settings.lora_dir) if settings.lora_dir else Path(data_dir) / "loras"
    jobs = Jobs(Path(data_dir).expanduser(), engine, queue, settings.limits, lora_dir.expanduser())
    jobs.start()

    def close() -> None:
        jobs.close()
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)

    app.router.on_shutdown.insert(0, jobs.stop)  # before the queue: a LoRA being published still needs it
    app.router.on_shutdown.append(close)  # after it: what the queue drops while stopping is recorded
    app.state.jobs = jobs
    app.include_router(router)
    app.add_middleware(JobIdHeader)
    return jobs
