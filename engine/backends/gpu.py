"""Which GPU this process sees: the identity TensorRT engines are built for and selected by."""

from __future__ import annotations

from ..errors import UserError


def gpu_identity() -> tuple[str, tuple[int, int]]:  # pragma: no cover - needs a GPU
    from cuda.bindings import runtime as cudart

    err, props = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        raise UserError("no CUDA GPU visible; TensorRT engines are built on the GPU they run on")
    return props.name.decode().rstrip("\0"), (props.major, props.minor)


def driver_version() -> int:  # pragma: no cover - needs a GPU
    """cuDriverGetVersion: the CUDA version the NVIDIA driver supports, e.g. 12080."""
    from cuda.bindings import runtime as cudart

    err, v = cudart.cudaDriverGetVersion()
    if err != cudart.cudaError_t.cudaSuccess:
        raise UserError("cannot read the NVIDIA driver version (cudaDriverGetVersion failed)")
    return int(v)
