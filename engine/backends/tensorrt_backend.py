"""TensorRT runtime backend: engines chosen for this GPU, one shared device allocation for the
execution contexts, tensors bound by name, execute_async_v3 on a stream, optional CUDA graph replay
of the transformer at fixed shapes. numpy + cuda-python buffers; no torch.

UNVERIFIED: TensorRT cannot run on the machines this project is built on. The engine selection
(``select_engine``) is pure logic and tested; every call into tensorrt / cuda.bindings follows the
documented API (TensorRT 10.x Python API, cuda-python's runtime bindings) and has not executed.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..model.config import AuraFlowConfig
from ..model.spec import NUMPY_DTYPES, TEXT_ENCODER, TRANSFORMER, VAE_DECODER
from ..runtime.image import to_uint8
from ..runtime.manifest import Manifest
from ..runtime.modulation import ModulationTable
from ..runtime.positions import PositionTable
from ..runtime.stages import StageSet


def select_engine(manifest: Manifest, gpu: str, cc: tuple[int, int], trt_version: str) -> tuple[str, dict]:
    """The engine set built for this GPU and TensorRT, or one built hardware-compatible that this
    GPU can run; otherwise a clear refusal saying how to rebuild."""
    engines = manifest.get("engines", {})
    if not engines:
        raise UserError(
            f"{manifest.folder}: no TensorRT engines; build them with `auraflow-edge build ... --backend tensorrt`"
        )
    for key, e in engines.items():
        if e["gpu"] == gpu and tuple(e["compute_capability"]) == tuple(cc) and e["tensorrt"] == trt_version:
            return key, e
    for key, e in engines.items():
        if e["tensorrt"] != trt_version:
            continue
        hw = e.get("hardware_compat", "none")
        if hw == "ampere+" and tuple(cc) >= (8, 0):
            return key, e
        if hw == "same-cc" and tuple(e["compute_capability"]) == tuple(cc):
            return key, e
    built = "; ".join(
        f"{e['gpu']} sm_{e['compute_capability'][0]}{e['compute_capability'][1]} TensorRT {e['tensorrt']}"
        for e in engines.values()
    )
    cmd = manifest.get("command") or "auraflow-edge build MODEL -o DIR --backend tensorrt"
    raise UserError(
        f"{manifest.folder}: engines were built for {built}, not for this {gpu} (sm_{cc[0]}{cc[1]}) with TensorRT "
        f"{trt_version}; rebuild on this GPU into another folder (or this one with --force: a folder holds one "
        f"GPU's engines): {cmd}; or build with --hardware-compat ampere+"
    )


class _Cuda:  # pragma: no cover - needs a GPU
    """Thin cuda-python helpers (runtime API)."""

    def __init__(self):
        from cuda.bindings import runtime as cudart

        self.rt = cudart
        self.stream = self.check(cudart.cudaStreamCreate())

    def check(self, res):
        err, *out = res if isinstance(res, tuple) else (res,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {err}")
        return out[0] if len(out) == 1 else out

    def malloc(self, n: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(n, 1))))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr))

    def h2d(self, dst: int, arr: np.ndarray) -> None:
        self.check(
            self.rt.cudaMemcpyAsync(
                dst, arr.ctypes.data, arr.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
            )
        )

    def d2h(self, arr: np.ndarray, src: int) -> None:
        self.check(
            self.rt.cudaMemcpyAsync(
                arr.ctypes.data, src, arr.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream
            )
        )

    def sync(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream))


def numpy_dtype(trt, dtype) -> np.dtype:
    """The numpy dtype of a TensorRT tensor type: ``trt.nptype``, except bf16, which numpy lacks
    (``trt.nptype`` refuses it) and ml_dtypes provides, so a bf16 engine's output is read as bf16."""
    if dtype == trt.DataType.BF16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        raise UserError(f"TensorRT tensor type {dtype} has no numpy equivalent here") from None


class TrtEngine:  # pragma: no cover - needs TensorRT and a GPU
    """One deserialized engine with a user-managed execution context."""

    def __init__(
        self, trt, runtime, path, cuda: _Cuda, streaming_budget: int | None = None, cuda_graph: bool = False
    ):
        self.trt, self.cuda = trt, cuda
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{path}: TensorRT could not deserialize it; rebuild with --force")
        if streaming_budget is not None and streaming_budget >= 0 and self.engine.streamable_weights_size > 0:
            self.engine.weight_streaming_budget_v2 = streaming_budget
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.ctx = self.engine.create_execution_context(strategy)
        self.mem_size = 0
        self.mem = 0
        self.buffers: dict[str, tuple[int, int]] = {}
        self.cuda_graph, self.graph_exec = cuda_graph, None

    def _ensure(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr = self.cuda.malloc(nbytes)
            self.buffers[name] = (ptr, nbytes)
            self.graph_exec = None
        return ptr

    def __call__(self, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        for name, arr in inputs.items():
            self.ctx.set_input_shape(name, arr.shape)
        need = self.ctx.update_device_memory_size_for_shapes()
        if need > self.mem_size:  # one allocation for the context's scratch, grown on demand
            if self.mem:
                self.cuda.free(self.mem)
            self.mem, self.mem_size = self.cuda.malloc(need), need
            self.ctx.set_device_memory(self.mem, need)
            self.graph_exec = None
        for name, arr in inputs.items():
            arr = np.ascontiguousarray(arr)
            ptr = self._ensure(name, arr.nbytes)
            self.cuda.h2d(ptr, arr)
            self.ctx.set_tensor_address(name, ptr)
        shape = tuple(self.ctx.get_tensor_shape(output))
        out = np.empty(shape, numpy_dtype(self.trt, self.engine.get_tensor_dtype(output)))
        optr = self._ensure(output, out.nbytes)
        self.ctx.set_tensor_address(output, optr)
        if self.cuda_graph:
            self._launch_graph()
        elif not self.ctx.execute_async_v3(self.cuda.stream):
            raise RuntimeError("TensorRT execution failed")
        self.cuda.d2h(out, optr)
        self.cuda.sync()
        return out

    def _launch_graph(self) -> None:
        rt = self.cuda.rt
        if self.graph_exec is None:
            # capture once per shape set (the first call after a shape change runs eagerly inside the capture)
            self.ctx.execute_async_v3(self.cuda.stream)
            self.cuda.check(
                rt.cudaStreamBeginCapture(
                    self.cuda.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
                )
            )
            self.ctx.execute_async_v3(self.cuda.stream)
            graph = self.cuda.check(rt.cudaStreamEndCapture(self.cuda.stream))
            self.graph_exec = self.cuda.check(rt.cudaGraphInstantiate(graph, 0))
            return
        self.cuda.check(rt.cudaGraphLaunch(self.graph_exec, self.cuda.stream))

    def close(self) -> None:
        for ptr, _ in self.buffers.values():
            self.cuda.free(ptr)
        if self.mem:
            self.cuda.free(self.mem)
        self.buffers, self.mem, self.ctx, self.engine = {}, 0, None, None


class TensorRTStages(StageSet):  # pragma: no cover - needs TensorRT and a GPU
    def __init__(
        self,
        folder,
        vram_budget: str | None = None,
        cuda_graph: bool = True,
        keep_resident: bool = False,
    ):
        super().__init__()
        try:
            import tensorrt as trt
        except ImportError:
            raise UserError(
                'the tensorrt backend needs TensorRT: pip install "auraflow-edge[tensorrt]" on a GPU machine'
            ) from None
        from .gpu import gpu_identity

        self.trt = trt
        self.m = Manifest.load(folder)
        gpu, cc = gpu_identity()
        self.key, self.entry = select_engine(self.m, gpu, cc, trt.__version__)
        self.cfg = AuraFlowConfig(**self.m["transformer_config"])
        self.shift = float(self.m["scheduler"]["shift"])
        self.tokenizer_dir = self.m.path(self.m.component("tokenizer")["dir"])
        self.table = ModulationTable(self.cfg, self.m.path(self.m.component("modulation")["file"]))
        self.positions = PositionTable(self.cfg, self.m.path(self.m.component("positions")["file"]))
        self.cuda = _Cuda()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.vram_budget, self.cuda_graph, self.keep_resident = vram_budget, cuda_graph, keep_resident

    def _engine(self, name: str, **kw) -> TrtEngine:
        comp = self.entry["components"][name]
        return TrtEngine(self.trt, self.runtime, self.m.path(comp["file"]), self.cuda, **kw)

    def _open(self, name: str, **shape):
        if name == "text_encoder":
            eng = self._engine("text_encoder")
            return _Callable(
                lambda ids, mask: eng(TEXT_ENCODER.feed(ids, mask), TEXT_ENCODER.outputs[0]).astype(
                    np.float32
                ),
                eng,
            )
        if name == "transformer":
            budget = self.entry["components"]["transformer"].get("streaming_budget", -1)
            if self.vram_budget is not None and budget >= 0:
                from ..runtime.planner import parse_bytes

                budget = min(budget, parse_bytes(self.vram_budget))
            eng = self._engine("transformer", streaming_budget=budget, cuda_graph=self.cuda_graph)
            return _TrtTransformer(eng, self.table, self.positions, self.m.component("transformer")["dtype"])
        eng = self._engine("vae_decoder")
        scaling = np.float32(self.m.component("vae_decoder")["scaling_factor"])

        def decode(latents, tiles: int = 1):
            from ..runtime.vae_tiling import decode_tiled

            return to_uint8(
                decode_tiled(
                    lambda z: eng(VAE_DECODER.feed(z.astype(np.float32)), VAE_DECODER.outputs[0]),
                    latents / scaling,
                    tiles,
                )
            )

        return _Callable(decode, eng)

    def default_size(self) -> tuple[int, int]:
        return tuple(self.m.get("default_size") or self.entry["shapes"][0])

    def describe(self) -> dict:
        return {"precision": self.m["precision"], "engine": str(self.m.folder), "engine_key": self.key}

    def sizes(self):
        from dataclasses import replace

        from ..runtime.planner import TORCH_STAGE_OVERHEAD, sizes_from_manifest

        return replace(sizes_from_manifest(self.m), fused_attention=True, overhead=TORCH_STAGE_OVERHEAD)

    def free_memory(self) -> tuple[int, int]:
        free, _total = self.cuda.check(self.cuda.rt.cudaMemGetInfo())
        return int(free), 0


class _Callable:
    def __init__(self, fn, engine):
        self.fn, self.engine = fn, engine

    def __call__(self, *a, **k):
        return self.fn(*a, **k)

    def close(self):
        self.engine.close()


class _TrtTransformer:  # pragma: no cover - needs TensorRT and a GPU
    def __init__(self, engine, table, positions, dtype: str):
        self.engine, self.table, self.positions = engine, table, positions
        self.dtype = NUMPY_DTYPES[dtype]
        self.mod = None

    def prepare(self, schedule) -> None:
        self.mod = self.table(schedule.timesteps).astype(self.dtype)

    def __call__(self, latents, context, step):
        out = self.engine(
            TRANSFORMER.feed(
                latents.astype(self.dtype),
                context.astype(self.dtype),
                self.mod[step : step + 1],
                self.positions(*latents.shape[2:]).astype(self.dtype),
            ),
            TRANSFORMER.outputs[0],
        )
        return out.astype(np.float32)

    def close(self):
        self.engine.close()
