"""Stage lifetime: load one component, run it, release it, and record its peak memory."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss() -> int:
    """This process's peak RSS (VmHWM) in bytes. Unlike ru_maxrss it is not inherited across
    fork+exec, so a worker started by a large parent reports only its own peak."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_ram() -> int:
    """MemAvailable from /proc/meminfo, in bytes (a large number where unavailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


class RssSampler:
    """Peak RSS over a block, sampled every few milliseconds in a background thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = current_rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, current_rss())


class StageSet:
    """Subclasses implement ``_open(name, **shape) -> stage`` (a callable with ``close()``)."""

    keep_resident = False
    last_peak: int | None = None

    def __init__(self):
        self._resident: dict[str, object] = {}

    def _open(self, name: str, **shape):
        raise NotImplementedError

    def _device_peak_reset(self) -> None:  # overridden by GPU backends
        pass

    def _device_peak(self) -> int | None:
        return None

    @contextmanager
    def stage(self, name: str, **shape):
        self._device_peak_reset()
        with RssSampler() as rss:
            obj = self._resident.get(name) or self._open(name, **shape)
            try:
                yield obj
            finally:
                if self.keep_resident:
                    self._resident[name] = obj
                else:
                    obj.close()
        dev = self._device_peak()
        self.last_peak = dev if dev is not None else rss.peak

    def describe(self) -> dict:
        return {}
