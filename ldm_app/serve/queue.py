"""One model, one device: a bounded FIFO of requests and the single worker thread that owns the pipeline.

The worker takes the oldest request and every queued request that can share its pipeline call (same size,
steps, sampler, guidance, η, LoRAs) up to `max_batch` images, so concurrent clients cost one batched UNet call
per step instead of one each. A full queue refuses at once (503 + Retry-After) rather than letting clients hang.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..request import GenerationRequest
from .engine import Engine, Interrupted


class QueueFull(Exception):
    """No room in the queue; `retry_after` is an estimate in whole seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"The server is busy ({retry_after} s estimated); retry later.")
        self.retry_after = retry_after


class ShuttingDown(QueueFull):
    """The server is stopping: new requests are refused with this, and waiting and running ones end with it
    (a 503 that says so). A kind of QueueFull, so that every door that handles a full queue handles it too."""

    def __init__(self) -> None:
        Exception.__init__(self, "The server is shutting down; retry in a moment, or on another server.")
        self.retry_after = 5


@dataclass(eq=False)
class Job:
    """A queued request: images (`request`) or a one-off task on the pipeline (`task`, never batched)."""

    request: GenerationRequest | None = None
    task: Callable[[Engine], Any] | None = None
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    step: int = 0  # progress of the pipeline call this job is in
    total: int = 0

    @property
    def images(self) -> int:
        return self.request.n if self.request is not None else 1


@dataclass
class Metrics:
    """Counters for /metrics; updated under the queue's lock."""

    requests: int = 0  # accepted into the queue
    images: int = 0
    rejected: int = 0
    cancelled: int = 0
    failed: int = 0
    completed: int = 0  # requests answered with their images
    batches: int = 0
    batched_images: int = 0
    latency_sum_s: float = 0.0
    busy_s: float = 0.0


class JobQueue:
    """Bounded FIFO + batching worker over one `Engine`."""

    def __init__(self, engine: Engine, max_queue: int = 32, max_batch: int = 16):
        self.engine, self.max_queue, self.max_batch = engine, max_queue, max_batch
        self.metrics = Metrics()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._batch_started = 0.0
        self._lock = threading.Condition()
        self._stop = False
        self._closing = False  # shutting down: no new jobs, the running batch stops at its next step
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------------
    # Clients

    def submit(self, request: GenerationRequest | None = None, task: Callable[[Engine], Any] | None = None) -> Job:
        """Queue a request (or a task); raises `QueueFull` instead of waiting when `max_queue` jobs wait."""
        job = Job(request=request, task=task)
        with self._lock:
            if self._closing:
                raise ShuttingDown()
            if len(self._waiting) >= self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(self._retry_after())
            self._waiting.append(job)
            self.metrics.requests += 1
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it still waits, or let its batch stop at the next step if it
        was the batch's only live job."""
        with self._lock:
            if job.future.done() or job.cancelled:
                return
            job.cancelled = True
            self.metrics.cancelled += 1
            if job in self._waiting:
                self._waiting.remove(job)
                job.future.cancel()

    def snapshot(self) -> dict[str, Any]:
        """Queue length, the running batch's progress and the counters, for /metrics and /progress."""
        with self._lock:
            running = [j for j in self._running if not j.cancelled]
            m = self.metrics
            return {
                "queue_length": len(self._waiting),
                "running_jobs": len(running),
                "step": running[0].step if running else 0,
                "total_steps": running[0].total if running else 0,
                "running_seconds": time.monotonic() - self._batch_started if running else 0.0,
                "requests_total": m.requests,
                "images_total": m.images,
                "rejected_total": m.rejected,
                "cancelled_total": m.cancelled,
                "failed_total": m.failed,
                "batches_total": m.batches,
                "mean_batch_images": m.batched_images / m.batches if m.batches else 0.0,
                "completed_total": m.completed,
                "mean_latency_seconds": m.latency_sum_s / m.completed if m.completed else 0.0,
            }

    def progress(self, job: Job) -> tuple[int, int]:
        with self._lock:
            return job.step, job.total

    # ------------------------------------------------------------------------------------------------------
    # Worker

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="ldm-app-model", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """The server is shutting down: refuse new jobs, answer waiting ones `ShuttingDown` now, and stop the
        running batch at its next step (its clients get `ShuttingDown` too)."""
        with self._lock:
            self._closing = True
            while self._waiting:
                self._waiting.popleft().future.set_exception(ShuttingDown())
            self._lock.notify_all()

    def stop(self) -> None:
        """`close`, then end the worker."""
        self.close()
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _next_batch(self) -> list[Job]:
        """The oldest job and the queued jobs that can share its pipeline call, up to `max_batch` images."""
        head = self._waiting.popleft()
        batch = [head]
        key = head.request.batch_key() if head.request is not None else None
        if key is None:
            return batch
        count = head.images
        for job in list(self._waiting):
            if job.request is not None and job.request.batch_key() == key and count + job.images <= self.max_batch:
                self._waiting.remove(job)
                batch.append(job)
                count += job.images
        return batch

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                batch = self._next_batch()
                self._running = batch
                self._batch_started = started = time.monotonic()
            try:
                if batch[0].task is not None:
                    results = [batch[0].task(self.engine)]
                else:
                    results = self.engine.generate([j.request for j in batch], self.max_batch,
                                                   lambda i, n: self._on_step(batch, i, n))
            except Exception as err:  # reported to each waiting client; the worker keeps serving
                with self._lock:
                    self._running = []
                    if not isinstance(err, (Interrupted, ShuttingDown)):
                        self.metrics.failed += len(batch)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            finished = time.monotonic()
            with self._lock:
                self._running = []
                self.metrics.batches += 1
                self.metrics.batched_images += sum(j.images for j in batch)
                self.metrics.busy_s += finished - started
                for job, result in zip(batch, results):
                    if job.cancelled:
                        continue
                    self.metrics.images += job.images
                    self.metrics.completed += 1
                    self.metrics.latency_sum_s += finished - job.enqueued_at
                    job.future.set_result(result)

    def _on_step(self, batch: list[Job], step: int, total: int) -> None:
        with self._lock:
            for job in batch:
                job.step, job.total = step, total
            if self._closing:
                raise ShuttingDown()
            if all(job.cancelled for job in batch):
                raise Interrupted("every client of this batch has disconnected")

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free (the worker takes the next batch when the running one ends): the
        running batch's images at the measured seconds per image."""
        m = self.metrics
        per_image = m.busy_s / m.batched_images if m.batched_images else 1.0
        return max(1, math.ceil(per_image * sum(j.images for j in self._running)))
