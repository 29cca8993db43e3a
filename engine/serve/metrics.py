"""Server metrics in the Prometheus text format (version 0.0.4), kept per server, not global."""

from __future__ import annotations

import threading
from collections import Counter as _Counts


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self._values: _Counts = _Counts()
        self._lock = threading.Lock()

    def inc(self, amount: float = 1, **labels) -> None:
        key = tuple(str(labels[k]) for k in self.labels)
        with self._lock:
            self._values[key] += amount

    def value(self, **labels) -> float:
        return self._values[tuple(str(labels[k]) for k in self.labels)]

    def lines(self, kind: str = "counter") -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {kind}"]
        with self._lock:
            items = sorted(self._values.items()) or ([((), 0)] if not self.labels else [])
        for key, v in items:
            lab = ",".join(f'{k}="{_escape(x)}"' for k, x in zip(self.labels, key))
            out.append(f"{self.name}{{{lab}}} {v:g}" if lab else f"{self.name} {v:g}")
        return out


class Gauge(Counter):
    def set(self, value: float) -> None:
        with self._lock:
            self._values[()] = value

    def lines(self, kind: str = "gauge") -> list[str]:
        return super().lines(kind)


class Summary:
    """Sum and count (Prometheus derives the mean rate from these)."""

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.sum = self.count = 0.0
        self._lock = threading.Lock()

    def observe(self, total: float, count: float = 1) -> None:
        with self._lock:
            self.sum += total
            self.count += count

    def lines(self) -> list[str]:
        with self._lock:
            s, c = self.sum, self.count
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} summary",
            f"{self.name}_sum {s:g}",
            f"{self.name}_count {c:g}",
        ]


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        p = "auraflow"
        self.requests = Counter(f"{p}_requests_total", "HTTP requests answered", ("api", "status"))
        self.images = Counter(f"{p}_images_total", "images generated and sent")
        self.errors = Counter(f"{p}_errors_total", "requests answered with an error", ("api", "status"))
        self.cancelled = Counter(f"{p}_cancelled_total", "queued requests whose client went away")
        self.abandoned = Counter(f"{p}_abandoned_batches_total", "running batches stopped: every client left")
        self.queue_requests = Gauge(f"{p}_queue_requests", "requests waiting for the pipeline")
        self.queue_images = Gauge(f"{p}_queue_images", "images waiting for the pipeline")
        self.batch_images = Summary(f"{p}_batch_images", "images per generate_many call")
        self.batch_seconds = Summary(f"{p}_batch_seconds", "seconds per generate_many call")
        self.step_seconds = Summary(
            f"{p}_step_seconds", "batch seconds per image sampling step (text encoder and VAE included)"
        )

    def set_queue(self, requests: int, images: int) -> None:
        self.queue_requests.set(requests)
        self.queue_images.set(images)

    def observe_batch(self, images: int, seconds: float, steps: int) -> None:
        self.batch_images.observe(images)
        self.batch_seconds.observe(seconds)
        if steps:
            self.step_seconds.observe(seconds, steps)

    def render(self) -> str:
        parts = [
            self.requests,
            self.images,
            self.errors,
            self.cancelled,
            self.abandoned,
            self.queue_requests,
            self.queue_images,
            self.batch_images,
            self.batch_seconds,
            self.step_seconds,
        ]
        return "\n".join(line for m in parts for line in m.lines()) + "\n"
