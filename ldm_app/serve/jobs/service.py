"""The server's jobs: fine-tunes on a training thread, generations through the model's queue, every one a row in
the job store, so that a restart takes up what a crash interrupted.

Fairness (measured in benchmarks/serve_jobs.py): the training thread yields to generation at every step
boundary — while any generation request waits or runs, the next training step waits. A generation request
thus waits at most for the training step in progress, and training uses the machine whenever the model's
queue is idle. Under a steady stream of generation requests training pauses: people waiting for a picture
come first, a fine-tune is background work.

On start, a fine-tune found `running` resumes from its run folder's last checkpoint (queued ones follow in
order); generations found queued or running are re-run when they came through the jobs API (their images are
kept in the job's folder) and marked failed with the reason when their client's connection (A1111, OpenAI, UI)
died with the old process.
"""

from __future__ import annotations

import fcntl
import inspect
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import fields
from pathlib import Path
from typing import Any

from ...lora_tags import split_lora_spec
from ...request import GenerationRequest
from ..engine import Engine, LoadedLora
from ..queue import JobQueue, QueueFull, ShuttingDown
from ..settings import Limits
from ..validation import ApiError, image_request
from .store import JobRecord, JobStore
from .training import FinetuneOptions, publish, run_finetune, samples

logger = logging.getLogger(__name__)
FINETUNE, GENERATE = "finetune-lora", "generate"
RESTARTED = ("The server stopped before this request finished, and its client's connection ended with it; "
             "send the request again.")


class Stopped(Exception):
    """Raised at a training step boundary when the server shuts down: the job stays `running` and resumes."""


class Cancelled(Exception):
    """Raised at a training step boundary when the job was cancelled."""


class DataDirInUse(ValueError):
    pass


def hold_folder(folder: Path) -> Any:
    """An exclusive lock on the data folder for this server's life (the OS drops it when the process dies, so a
    killed server leaves none): two servers on one folder would both resume the same fine-tune."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / ".lock", "a+")  # noqa: SIM115  (held until Jobs.stop)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise DataDirInUse(f"--data-dir {folder} is in use by another server ({holder}); stop it or pass another "
                           "--data-dir.") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    return lock


class Jobs:
    """Jobs over one engine and its queue, kept in `data_dir` (jobs.sqlite, jobs/<id>/); finished LoRAs go to
    `lora_dir/<name>/` and are loaded into the engine under that name."""

    def __init__(self, data_dir: str | Path, engine: Engine, queue: JobQueue, limits: Limits, lora_dir: str | Path,
                 yield_to_generation: bool = True):
        self.data_dir, self.lora_dir = Path(data_dir), Path(lora_dir)
        self._lock_file = hold_folder(self.data_dir)
        self.store = JobStore(self.data_dir / "jobs.sqlite")
        self.folder = self.data_dir / "jobs"
        self.engine, self.queue, self.limits = engine, queue, limits
        self.yield_to_generation = yield_to_generation
        self._live: dict[str, Any] = {}  # generation job id → its queue job
        self._cancel: set[str] = set()  # running fine-tunes asked to stop
        self._lock = threading.Lock()  # state changes that race between the HTTP threads and the workers
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------------
    # Life

    def start(self) -> None:
        """Take up what the last run of the server left, then start the training thread."""
        for record in self.store.unfinished(GENERATE):
            self._recover_generation(record)
        self._thread = threading.Thread(target=self._train_forever, name="ldm-app-training", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the running fine-tune at its next step boundary: it stays `running` and resumes on the next
        start (as do generations the queue drops while it stops)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def close(self) -> None:
        """Release the database and the data folder (after the queue has stopped)."""
        with self._lock:
            self.store.close()
            self._lock_file.close()

    # ------------------------------------------------------------------------------------------------------
    # Submitting and cancelling

    def submit_finetune(self, options: FinetuneOptions, stage: Any, owner: str | None) -> JobRecord:
        """A queued fine-tune; `stage(folder)` writes its photos into `folder` first (and may raise ApiError)."""
        if options.name in self.engine.loras or (self.lora_dir / options.name).exists():
            raise ApiError(409, f"A LoRA named {options.name!r} exists already; choose another name.", "name")
        with self._lock:
            if any(r.params.get("name") == options.name for r in self.store.unfinished(FINETUNE)):
                raise ApiError(409, f"A fine-tune named {options.name!r} is already queued or running; choose "
                                    "another name.", "name")
            record = self.store.add(FINETUNE, options.to_params(), owner, total=options.steps, job_id=None)
        try:
            stage(self.folder / record.id / "photos")
        except BaseException:
            self.store.remove(record.id)
            raise
        self._wake.set()
        return record

    def submit_generation(self, request: GenerationRequest, owner: str | None, source: str = "jobs",
                          job_id: str | None = None) -> tuple[JobRecord, Any]:
        """A generation in the model's queue, recorded as a job; raises QueueFull like the queue."""
        params = request_params(request, self.engine) | {"source": source}
        if job_id is not None and self.store.get(job_id) is not None:
            raise ApiError(409, f"A job with id {job_id!r} exists already; send another id (or none).", "id")
        record = self.store.add(GENERATE, params, owner, total=request.steps, job_id=job_id)
        try:
            queued = self._enqueue(record.id, request, source)
        except QueueFull:
            self.store.remove(record.id)
            raise
        return record, queued

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job now, a running fine-tune at its next step, a running generation at its batch's
        next step (or drop it from the batch); finished jobs stay as they are."""
        queued = None
        with self._lock:
            record = self.store.get(job_id)
            if record is None or record.final:
                return record
            if record.kind == GENERATE:
                queued = self._live.pop(job_id, None)
                self.store.finish(job_id, "cancelled", error="Cancelled by its owner.")
            elif record.state == "queued":
                self.store.finish(job_id, "cancelled", error="Cancelled by its owner before it started.")
            else:
                self._cancel.add(job_id)
        if queued is not None:  # outside our lock: the queue may call _generation_done right here
            self.queue.cancel(queued)
        return self.store.get(job_id)

    # ------------------------------------------------------------------------------------------------------
    # Reading

    def view(self, record: JobRecord) -> dict[str, Any]:
        """What the API answers for a job: id, kind, state, progress, result, error (and the loss, samples)."""
        step, total, state = record.step, record.total, record.state
        queued = self._live.get(record.id)
        if queued is not None and not record.final:
            step, total = self.queue.progress(queued)
            state = "running" if total else state
        progress: dict[str, Any] = {"step": step, "total": total}
        if record.kind == FINETUNE:
            losses = self.store.losses(record.id)
            progress["loss"] = losses[-1][1] if losses else None
            progress["samples"] = [self.file_url(record.id, s) for s in samples(self.run_dir(record.id))]
        return {"id": record.id, "kind": record.kind, "state": state, "progress": progress,
                "result": record.result, "error": record.error, "created": record.created,
                "started": record.started, "finished": record.finished}

    def run_dir(self, job_id: str) -> Path:
        return self.folder / job_id / "run"

    @staticmethod
    def file_url(job_id: str, name: str) -> str:
        return f"/ldm/v1/jobs/{job_id}/files/{name}"

    # ------------------------------------------------------------------------------------------------------
    # Generations

    def _enqueue(self, job_id: str, request: GenerationRequest, source: str) -> Any:
        queued = self.queue.submit(request=request)
        with self._lock:
            self._live[job_id] = queued
        # the queue resolves futures under its own lock: record the outcome on another thread
        queued.future.add_done_callback(lambda f: threading.Thread(
            target=self._record_generation, args=(job_id, request, source, f), daemon=True).start())
        return queued

    def _record_generation(self, job_id: str, request: GenerationRequest, source: str, future: Future) -> None:
        try:
            self._generation_done(job_id, request, source, future)
        except sqlite3.ProgrammingError:  # the server closed the store meanwhile: the row is taken up at start
            pass

    def _generation_done(self, job_id: str, request: GenerationRequest, source: str, future: Future) -> None:
        with self._lock:
            self._live.pop(job_id, None)
            dropped = isinstance(future.exception(), ShuttingDown) if not future.cancelled() else self._stopping.is_set()
            if dropped and source == "jobs":
                return  # dropped by the stopping server: stays queued, to be taken up on the next start
            record = self.store.get(job_id)
            if record is None or record.final:
                return
            if future.cancelled():
                self.store.finish(job_id, "cancelled", error="Its client disconnected.")
                return
            err = future.exception()
            if err is not None:
                self.store.finish(job_id, "failed", error=str(err) or type(err).__name__)
                return
        result: dict[str, Any] = {"seeds": request.seeds}
        if source == "jobs":  # the client collects the images later: keep them in the job's folder
            folder = self.folder / job_id
            folder.mkdir(parents=True, exist_ok=True)
            urls = []
            for i, (image, seed) in enumerate(zip(future.result(), request.seeds)):
                (folder / f"image-{i}.png").write_bytes(self.engine.png(image, self.engine.params(request, seed)))
                urls.append(self.file_url(job_id, f"image-{i}.png"))
            result["images"] = urls
        self.store.update(job_id, step=request.steps, total=request.steps)
        self.store.finish(job_id, "done", result=result)

    def _recover_generation(self, record: JobRecord) -> None:
        params = dict(record.params)
        if params.pop("source", None) != "jobs":
            self.store.finish(record.id, "failed", error=RESTARTED)
            return
        try:
            request = image_request(self.engine, self.limits, **params)
            self._enqueue(record.id, request, "jobs")
            logger.info("re-running generation job %s, queued before the restart", record.id)
        except (ApiError, QueueFull, ValueError, TypeError) as err:
            self.store.finish(record.id, "failed", error=f"Could not be re-run after the server restarted: {err}")

    # ------------------------------------------------------------------------------------------------------
    # Fine-tunes, one at a time on the training thread

    def _train_forever(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                pending = self.store.unfinished(FINETUNE)
                record = pending[0] if pending else None
                if record is not None:
                    self.store.update(record.id, state="running", started=record.started or time.time())
            if record is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self._run(record)

    def _run(self, record: JobRecord) -> None:
        job_id, options = record.id, FinetuneOptions(**record.params)
        if record.state == "running":  # progress restarts from the checkpoint the trainer resumes from
            from ...checkpoints import CHECKPOINTS, checkpoints  # the train extra (accelerate): only when training

            done = checkpoints(self.run_dir(job_id) / CHECKPOINTS)
            self.store.update(job_id, step=int(done[-1].name.rpartition("-")[2]) if done else 0)

        def on_step(step: int, loss: float) -> None:
            self.store.record_loss(job_id, step, loss)
            self._step_boundary(job_id)

        try:
            run_finetune(options, self.folder / job_id / "photos", self.run_dir(job_id), self.engine.model_name,
                         on_step, lambda message: logger.info("job %s: %s", job_id, message))
            self._step_boundary(job_id)  # a cancel that came while the grid was drawn still counts
            folder = publish(self.run_dir(job_id), self.lora_dir, options.name)
            self._load_lora(folder, options.name)
        except Stopped:
            logger.info("fine-tune job %s stopped with the server; it resumes on the next start", job_id)
            return
        except Cancelled:
            step = self.store.get(job_id).step
            self.store.finish(job_id, "cancelled", error=f"Cancelled by its owner at step {step}.")
        except ValueError as err:  # the library's one-line errors: bad photos, settings, a full disk, ...
            self.store.finish(job_id, "failed", error=str(err))
        except Exception as err:  # noqa: BLE001  (the job fails, the server keeps serving)
            logger.exception("fine-tune job %s failed", job_id)
            self.store.finish(job_id, "failed", error=f"{type(err).__name__}: {err}")
        else:
            files = {name: self.file_url(job_id, name) for name in os.listdir(folder)}
            self.store.update(job_id, step=options.steps)
            self.store.finish(job_id, "done", result={"lora": options.name, "files": files})
        finally:
            self._cancel.discard(job_id)

    def _step_boundary(self, job_id: str) -> None:
        """Between two training steps: stop for shutdown or cancel, and let waiting generations go first."""
        while True:
            if self._stopping.is_set():
                raise Stopped()
            if job_id in self._cancel:
                raise Cancelled()
            if not (self.yield_to_generation and self._generation_busy()):
                return
            time.sleep(0.02)

    def _generation_busy(self) -> bool:
        snapshot = self.queue.snapshot()
        return bool(snapshot["queue_length"] or snapshot["running_jobs"])

    def _load_lora(self, folder: Path, name: str) -> None:
        """Load the new LoRA into the running engine (on the model's worker thread, which owns the pipeline),
        off by default like the --lora-dir ones; requests and the UI then choose it by name."""
        def load(engine: Engine) -> None:
            if name in engine.loras:  # loaded at start-up already: the server restarted while it was published
                engine.pipe.delete_adapters(name)
            engine.pipe.load_lora_weights(str(folder), adapter_name=name)
            engine.loras[name] = LoadedLora(str(folder.resolve()), 0.0)

        while True:
            try:
                task = self.queue.submit(task=load)
                break
            except QueueFull:
                self._step_boundary_sleep(0.5)
        while not task.future.done():
            self._step_boundary_sleep(0.1)
        task.future.result()

    def _step_boundary_sleep(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise Stopped()


def request_params(request: GenerationRequest, engine: Engine) -> dict[str, Any]:
    """What re-creates a (text-to-image) request after a restart: the fields `image_request` takes from a client
    (LoRAs by name → scale), as the checks resolved them (a random seed is stored as drawn)."""
    taken = set(inspect.signature(image_request).parameters) - {"engine", "limits", "image", "mask", "loras"}
    values = {f.name: getattr(request, f.name) for f in fields(request) if f.name in taken}
    names = {lora.path: name for name, lora in engine.loras.items()}
    loras = dict(split_lora_spec(spec) for spec in request.loras)
    return values | {"loras": {names.get(path, path): scale for path, scale in loras.items()}}
