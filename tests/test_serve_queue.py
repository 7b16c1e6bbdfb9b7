"""The serving queue: FIFO, batching of compatible requests, bounded size, cancellation, seeds per image."""

import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")

from ldm_app.request import GenerationRequest  # noqa: E402
from ldm_app.serve.engine import Engine  # noqa: E402
from ldm_app.serve.queue import JobQueue, QueueFull  # noqa: E402
from ldm_app.testing import tiny_pipeline  # noqa: E402


class GatedEngine:
    """Records each batch; blocks in the first denoising step until `gate` is set, so tests can fill the queue."""

    def __init__(self):
        self.gate, self.entered = threading.Event(), threading.Event()
        self.batches: list[list[str]] = []

    def generate(self, requests, max_batch, on_step=None):
        self.batches.append([r.prompt for r in requests])
        self.entered.set()
        for i in range(2):
            self.gate.wait(5)
            if on_step is not None:
                on_step(i + 1, 2)
        return [[r.prompt] * r.n for r in requests]


def req(prompt: str, n: int = 1, steps: int = 2) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, steps=steps, n=n)


@pytest.fixture
def gated():
    engine = GatedEngine()
    queue = JobQueue(engine, max_queue=3, max_batch=4)
    queue.start()
    yield engine, queue
    engine.gate.set()
    queue.stop()


def test_compatible_requests_share_a_call_in_fifo_order(gated):
    engine, queue = gated
    first = queue.submit(req("a"))
    assert engine.entered.wait(5)  # "a" runs alone; the next ones wait behind it
    jobs = [queue.submit(req("b", n=2)), queue.submit(req("c", steps=3)), queue.submit(req("d"))]
    engine.gate.set()
    assert first.future.result(5) == ["a"]
    assert [j.future.result(5) for j in jobs] == [["b", "b"], ["c"], ["d"]]
    assert engine.batches == [["a"], ["b", "d"], ["c"]]  # c has other steps: not batched with b and d
    snap = queue.snapshot()
    assert snap["batches_total"] == 3 and snap["images_total"] == 5 and snap["completed_total"] == 4


def test_full_queue_refuses_at_once_with_a_retry_estimate(gated):
    engine, queue = gated
    queue.submit(req("running"))
    assert engine.entered.wait(5)
    for i in range(3):
        queue.submit(req(f"w{i}"))
    started = time.monotonic()
    with pytest.raises(QueueFull) as err:
        queue.submit(req("one too many"))
    assert time.monotonic() - started < 0.5 and err.value.retry_after >= 1
    assert queue.snapshot()["rejected_total"] == 1


def test_cancel_frees_the_slot_and_stops_a_batch_nobody_waits_for(gated):
    engine, queue = gated
    running = queue.submit(req("running"))
    assert engine.entered.wait(5)
    waiting = [queue.submit(req(f"w{i}", steps=9)) for i in range(3)]
    queue.cancel(waiting[0])  # a waiting job leaves the queue: there is room again
    assert waiting[0].future.cancelled() and queue.snapshot()["queue_length"] == 2
    queue.submit(req("fits now", steps=9))
    queue.cancel(running)  # the running batch's only client is gone: it stops at the next step
    engine.gate.set()
    with pytest.raises(Exception, match="disconnected"):
        running.future.result(5)
    assert waiting[1].future.result(5) == ["w1"]
    assert queue.snapshot()["cancelled_total"] == 2


def test_each_image_is_the_same_alone_or_batched_with_others():
    """Image j of a request is drawn from its own generator seeded seed + j: batching does not change it."""
    engine = Engine(tiny_pipeline(), "tiny")
    a = GenerationRequest(prompt="a red cat", seed=7, n=2, steps=3, width=32, height=32, sampler="ddim", eta=1.0)
    b = GenerationRequest(prompt="a blue dog", seed=100, n=1, steps=3, width=32, height=32, sampler="ddim", eta=1.0)
    alone = engine.generate([a], max_batch=16)[0]
    together = engine.generate([b, a], max_batch=2)  # a's images land in two different pipeline calls
    for x, y in zip(alone, together[1]):
        np.testing.assert_allclose(np.asarray(x, dtype=float), np.asarray(y, dtype=float), atol=2)
    assert np.abs(np.asarray(alone[0], dtype=float) - np.asarray(alone[1], dtype=float)).mean() > 1
