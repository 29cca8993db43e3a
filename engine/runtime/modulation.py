"""The folded modulation: AuraFlow's timestep-only adaLN vectors, evaluated in numpy on the CPU.

The linears (2.29 B parameters for v0.3, a third of the model) never reach the accelerator: for a
schedule of S steps each weight is read once and applied to all S timesteps in one matmul.
"""

from __future__ import annotations

import math

import numpy as np

from ..model.config import AuraFlowConfig
from ..model.safetensors_io import SafetensorsFile, save_streamed


def modulation_names(cfg: AuraFlowConfig) -> list[str]:
    """Weight names in table-row order (6 rows each; the final linear gives 2: scale, shift)."""
    names = []
    for i in range(cfg.num_mmdit_layers):
        names += [
            f"joint_transformer_blocks.{i}.norm1.linear.weight",
            f"joint_transformer_blocks.{i}.norm1_context.linear.weight",
        ]
    names += [f"single_transformer_blocks.{i}.norm1.linear.weight" for i in range(cfg.num_single_dit_layers)]
    return names + ["norm_out.linear.weight"]


TIME_NAMES = [
    "time_step_proj.linear_1.weight",
    "time_step_proj.linear_1.bias",
    "time_step_proj.linear_2.weight",
    "time_step_proj.linear_2.bias",
]


SCALE = ".scale"  # per-output-channel scale of a quantized modulation linear: NAME + SCALE


def modulation_format(weight_format: str) -> str:
    """How an engine of a weight format stores its modulation linears: int8 per output channel for
    every 8- and 4-bit engine, else the checkpoint's dtype. They run once per schedule on the CPU, so
    only their size matters, and int8 keeps 7x less error than fp8 e4m3 at the same size (tiny model
    table: 0.37% vs 2.5% rel L2)."""
    return "int8" if weight_format in ("int8", "int4", "fp8") else "float"


def write_modulation_weights(cfg: AuraFlowConfig, source, path, fmt: str = "float") -> int:
    """Copy the timestep MLP and modulation linears into one safetensors file, one tensor at a time
    (they are 2.29 B parameters for v0.3). ``source`` is a WeightSource. ``fmt`` "int8" / "fp8":
    the linears as symmetric per-output-channel values plus NAME.scale (float32); "float": as stored."""
    from ..model import quant as qz

    quant = {"int8": (np.int8, qz.quantize_int8), "fp8": (qz.FP8, qz.quantize_fp8)}.get(fmt)
    specs, parts = [], {}
    for n in TIME_NAMES + modulation_names(cfg):
        if quant is None or n in TIME_NAMES:
            specs.append((n, source.shape(n), source.dtype(n)))
            continue
        specs += [(n, source.shape(n), quant[0]), (n + SCALE, source.shape(n)[:1], np.float32)]

    def produce(name: str) -> np.ndarray:
        if quant is None or name in TIME_NAMES:
            return source.read(name)
        if name.endswith(SCALE):
            return parts.pop(name)
        q, scale = quant[1](source.read(name))
        parts[name + SCALE] = scale  # written right after its values
        return q

    return save_streamed(specs, produce, path)


def read_dequantized(sf: SafetensorsFile):
    """``read(name)`` over a modulation file, float32, whichever way the linears were stored."""
    keys = set(sf.keys())

    def read(name: str) -> np.ndarray:
        w = sf.read(name).astype(np.float32)
        return w * sf.read(name + SCALE)[:, None] if name + SCALE in keys else w

    return read


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def sinusoid(t: np.ndarray, channels: int = 256) -> np.ndarray:
    """Same float32 arithmetic as diffusers' get_timestep_embedding (cos first, scale 1000)."""
    half = channels // 2
    exponent = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32) / np.float32(half)
    emb = t.astype(np.float32)[:, None] * np.exp(exponent)[None, :]
    emb = np.float32(1000) * emb
    return np.concatenate([np.cos(emb), np.sin(emb)], axis=-1).astype(np.float32)


class ModulationTable:
    """Evaluates (and caches per schedule) the (steps, rows, hidden) modulation table."""

    def __init__(self, cfg: AuraFlowConfig, path=None, read=None):
        """From the engine's modulation.safetensors (``path``) or any ``read(name)`` (a checkpoint)."""
        self.cfg = cfg
        self.read = read if read is not None else read_dequantized(SafetensorsFile(path))
        self._cache: dict[bytes, np.ndarray] = {}

    def reset(self, read, clear: bool = True) -> None:
        """Read the weights through ``read`` from now on (e.g. with a LoRA merged in); ``clear``
        drops the cached tables, which were evaluated from the previous weights."""
        self.read = read
        if clear:
            self._cache.clear()

    def _w(self, name: str) -> np.ndarray:
        return self.read(name).astype(np.float32)

    def __call__(self, timesteps: np.ndarray) -> np.ndarray:
        """timesteps (S,) in [0, 1] -> float32 (S, num_modulations, hidden)."""
        key = np.asarray(timesteps, np.float32).tobytes()
        if key not in self._cache:
            self._cache[key] = self._compute(np.asarray(timesteps, np.float32))
        return self._cache[key]

    def _compute(self, t: np.ndarray) -> np.ndarray:
        d = self.cfg.hidden
        x = sinusoid(t, self.cfg.timestep_channels)
        x = x @ self._w(TIME_NAMES[0]).T + self._w(TIME_NAMES[1])
        x = _silu(x) @ self._w(TIME_NAMES[2]).T + self._w(TIME_NAMES[3])
        s = _silu(x).astype(np.float32)
        rows = [(s @ self._w(n).T).reshape(len(t), -1, d) for n in modulation_names(self.cfg)]
        return np.concatenate(rows, axis=1).astype(np.float32)
