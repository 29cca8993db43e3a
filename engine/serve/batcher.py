"""The request queue in front of the one loaded pipeline.

Requests wait in arrival order. The worker thread takes the oldest and, with it, every waiting
request that shares its sampling settings (negative prompt, steps, guidance, size), up to
``max_batch`` images, and runs them as one stage-major ``Pipeline.generate_many`` call: the text
encoder once for all prompts, the transformer over every latent, then the VAE. A request whose
client went away leaves the queue before it runs; a running batch whose clients all left stops at
the next step.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import UserError
from ..runtime.image import png_bytes
from .metrics import Metrics


@dataclass(frozen=True)
class Settings:
    """What must be equal for requests to share one ``generate_many`` call."""

    negative_prompt: str
    steps: int
    guidance: float
    height: int
    width: int


@dataclass
class Job:
    prompt: str
    seeds: list[int]
    settings: Settings
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def images(self) -> int:
        return len(self.seeds)


@dataclass
class Image:
    png: bytes
    parameters: dict


class QueueFull(Exception):
    """More images waiting than the server takes; the client should retry later."""


class _Abandoned(Exception):
    """Every client of the running batch went away."""


@dataclass
class Progress:
    """What /sdapi/v1/progress reports: the running batch and how far it is."""

    running: bool = False
    step: int = 0
    steps: int = 0
    images: int = 0
    started: float = 0.0
    queued_images: int = 0


class Batcher:
    def __init__(
        self,
        pipe,
        metrics: Metrics,
        max_queue: int = 64,
        max_batch: int = 8,
        batching: bool = True,
        generate_options: dict | None = None,
    ):
        """``generate_options``: passed to every ``generate_many`` call (``vram_budget``, ``vae_tiles``)."""
        self.pipe, self.metrics = pipe, metrics
        self.generate_options = dict(generate_options or {})
        self.max_queue, self.max_batch, self.batching = max_queue, max_batch, batching
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: list[Job] = []
        self._progress = Progress()
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="auraflow-serve-worker", daemon=True)
        self._thread.start()

    # -- called from the HTTP side -------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cond:
            waiting = sum(j.images for j in self._queue)
            if waiting + job.images > self.max_queue:
                raise QueueFull(
                    f"the server is busy: {waiting} images are queued and this request adds "
                    f"{job.images} (limit {self.max_queue}); retry later"
                )
            self._queue.append(job)
            self.metrics.set_queue(len(self._queue), waiting + job.images)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: leave the queue, or let the running batch stop when all left."""
        with self._cond:
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.cancelled.inc()
                self._publish_queue()
        if not job.future.done():
            job.future.cancel()

    def progress(self) -> Progress:
        with self._cond:
            p = Progress(**vars(self._progress))
            p.queued_images = sum(j.images for j in self._queue)
        return p

    def close(self) -> None:
        with self._cond:
            self._stop = True
            for j in self._queue:
                j.future.cancel()
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # -- the worker thread ---------------------------------------------------------------------
    def _publish_queue(self) -> None:
        self.metrics.set_queue(len(self._queue), sum(j.images for j in self._queue))

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            first = self._queue.popleft()
            batch, size = [first], first.images
            if self.batching:
                for j in list(self._queue):
                    if j.settings == first.settings and size + j.images <= self.max_batch:
                        self._queue.remove(j)
                        batch.append(j)
                        size += j.images
            self._publish_queue()
            s = first.settings
            self._running = batch
            self._progress = Progress(True, 0, s.steps * size, size, time.time())
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._running = []
                    self._progress = Progress()

    def _run(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        try:
            results = self._generate(batch)
        except _Abandoned:
            self.metrics.abandoned.inc()
            return
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the server
            if len(batch) > 1 and isinstance(e, UserError):
                for j in batch:  # one bad request must not fail the others: run each alone
                    self._run([j])
                return
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        elapsed = time.perf_counter() - t0
        s = batch[0].settings
        n = sum(j.images for j in batch)
        self.metrics.observe_batch(n, elapsed, n * s.steps)
        k = 0
        for j in batch:
            out = [Image(png_bytes(r.image, r.parameters), r.parameters) for r in results[k : k + j.images]]
            k += j.images
            if not j.future.done():  # a cancelled client's future is already done
                j.future.set_result(out)

    def _generate(self, batch: list[Job]):
        s = batch[0].settings
        prompts = [j.prompt for j in batch for _ in j.seeds]
        seeds = [x for j in batch for x in j.seeds]
        total = s.steps * len(prompts)

        def progress(done: int, _total: int) -> None:
            if all(j.cancelled for j in batch):
                raise _Abandoned
            with self._cond:
                self._progress.step = done

        return self.pipe.generate_many(
            prompts,
            negative_prompt=s.negative_prompt,
            steps=s.steps,
            guidance=s.guidance,
            height=s.height,
            width=s.width,
            seeds=seeds,
            progress=progress if total else False,
            **self.generate_options,
        )
