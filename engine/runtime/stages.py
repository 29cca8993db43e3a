"""The interface between the pipeline and a backend, and stage lifetime: load one component, run
it, release it, and record its peak memory.

A backend is a ``StageSet``: the pipeline calls only what is declared here. The stage objects it
opens follow the ``TextEncoderStage`` / ``TransformerStage`` / ``VaeStage`` protocols, so the
sampler never branches on the backend.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import UserError


class TextEncoderStage(Protocol):
    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(1, TEXT_LENGTH) ids and mask -> (1, TEXT_LENGTH, joint_dim) float32, pad positions zeroed."""

    def close(self) -> None: ...


class TransformerStage(Protocol):
    def prepare(self, schedule) -> None:
        """Called once per schedule before the first step (the folded modulation table)."""

    def __call__(self, latents: np.ndarray, context: np.ndarray, step: int) -> np.ndarray:
        """(B, 4, h, w) latents, (B, TEXT_LENGTH, joint_dim) context, step index -> velocity float32."""

    def close(self) -> None: ...


class VaeStage(Protocol):
    def __call__(self, latents: np.ndarray, tiles: int = 1) -> np.ndarray:
        """(1, 4, h, w) latents (not yet divided by the scaling factor) -> (1, H, W, 3) uint8."""

    def close(self) -> None: ...


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
    """What a backend gives the pipeline. Subclasses set ``cfg`` (AuraFlowConfig), ``shift`` (the
    scheduler's) and ``tokenizer_dir``, and implement ``_open(name, **shape)`` (returning a stage
    of the protocols above), ``default_size``, ``sizes`` and ``free_memory``."""

    keep_resident = False
    last_peak: int | None = None
    cfg = None
    shift: float
    tokenizer_dir: Path

    def __init__(self):
        self._resident: dict[str, object] = {}

    def _open(self, name: str, **shape):
        raise NotImplementedError

    def default_size(self) -> tuple[int, int]:
        """The checkpoint's own image size, as diffusers picks it (height, width)."""
        raise NotImplementedError

    def check_shape(self, height: int, width: int) -> None:
        """Refuse a size this backend cannot run; by default every size the positional grid covers
        runs (the pipeline has checked that already)."""

    def set_loras(self, loras) -> None:
        raise UserError("LoRAs switch at run time on the torch backend only; engines merge them at build")

    def sizes(self):
        """The planner's ModelSizes for this model and precision."""
        raise NotImplementedError

    def free_memory(self) -> tuple[int, int]:
        """(memory a stage may use in all, what this process holds already) in bytes."""
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
