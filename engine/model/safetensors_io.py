"""A streaming safetensors reader: one tensor at a time with plain reads (no mmap, no pickle).

mmap would make every touched page count in the process RSS until the whole file is unmapped;
plain reads keep peak memory at about one tensor, which is what streamed export relies on.
Returns numpy arrays (bf16 and fp8 through ml_dtypes), so the torch-free runtime can use it too.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import UserError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


def _check_entry(path: Path, key: str, e) -> None:
    """One header entry: a known dtype, a shape of non-negative ints, offsets that hold it exactly."""
    bad = f"{path}: tensor {key!r} has a malformed header entry"
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
        raise UserError(f"{bad} (needs dtype, shape, data_offsets)")
    if e["dtype"] not in DTYPES:
        raise UserError(f"{path}: tensor {key!r} has unsupported dtype {e['dtype']!r}")
    shape, offs = e["shape"], e["data_offsets"]
    ints = lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731
    if not ints(shape) or not ints(offs) or len(offs) != 2 or offs[0] > offs[1]:
        raise UserError(f"{bad} (shape {shape!r}, data_offsets {offs!r})")
    want = int(np.prod(shape, dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
    if offs[1] - offs[0] != want:
        raise UserError(f"{bad} (shape {shape} needs {want} bytes, offsets give {offs[1] - offs[0]})")


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8 or n > 100_000_000:
                    raise ValueError("header length out of range")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise UserError(f"{self.path}: file not found") from None
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise UserError(f"{self.path}: not a safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise UserError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self.base = 8 + n
        for key, e in header.items():
            _check_entry(self.path, key, e)
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.base + end > size:
            raise UserError(
                f"{self.path}: truncated ({size} bytes, header says {self.base + end}); re-download or re-save it"
            )

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return DTYPES[self.entries[key]["dtype"]]

    def nbytes(self, key: str) -> int:
        a, b = self.entries[key]["data_offsets"]
        return b - a

    def read(self, key: str) -> np.ndarray:
        e = self.entries[key]
        if e["dtype"] not in DTYPES:
            raise UserError(f"{self.path}: tensor {key} has unsupported dtype {e['dtype']}")
        a, b = e["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.base + a)
            buf = f.read(b - a)
        return np.frombuffer(buf, dtype=DTYPES[e["dtype"]]).reshape(e["shape"])


def save_file(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict | None = None) -> None:
    """Write numpy arrays (any dtype in DTYPES, bf16/fp8 included) as safetensors, atomically."""
    specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    save_streamed(specs, lambda k: tensors[k], path, metadata)


def save_streamed(specs, produce, path: str | Path, metadata: dict | None = None) -> int:
    """Write tensors one at a time: ``specs`` = [(name, shape, dtype)], ``produce(name)`` -> array.

    Only one tensor is in memory at a time (the header is computed from the specs first).
    Returns the number of data bytes written.
    """
    path = Path(path)
    header, off = {}, 0
    for k, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[k] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for k, shape, dtype in specs:
                v = np.require(produce(k), dtype=dtype, requirements="C")  # keeps 0-d arrays 0-d
                if tuple(v.shape) != tuple(shape):
                    raise ValueError(f"{k}: produced shape {v.shape}, declared {tuple(shape)}")
                f.write(v.tobytes())
                del v
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return off
