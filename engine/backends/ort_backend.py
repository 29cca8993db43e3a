"""ONNX Runtime backend: the three stages of an engine folder, no torch anywhere on this path.

Sessions are created per stage and dropped after it, and their memory arenas with them. Quantized
weights stay packed (MatMulNBits) in the session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from ..model.config import AuraFlowConfig
from ..model.spec import NUMPY_DTYPES, TEXT_ENCODER, TRANSFORMER, VAE_DECODER
from ..runtime.image import to_uint8
from ..runtime.manifest import Manifest
from ..runtime.modulation import ModulationTable
from ..runtime.positions import PositionTable
from ..runtime.schedule import Schedule
from ..runtime.stages import StageSet
from .ort_int8 import ENCODINGS, int8_encoding, reencode_u8


def _run_options(device: str):
    """On the CUDA provider, shrink the device arena after every run so the next stage has the memory."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    if device.startswith("cuda"):
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "gpu:0")
    return ro


def session_options(threads: int | None = None):
    """The session options of every stage (benchmarks profile with the same ones)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # The arena lives as long as the session (memory returns when the stage ends). Without it every
    # large activation is a fresh mmap, page-faulted in and unmapped each call (the attention scores
    # are 40 MB per block at 512x512); without the memory pattern, which plans one block for the
    # largest shapes, the peak stays lower. Mid-size int8 at 512x512 on an AMX Xeon: 0.857 -> 0.763 s
    # per transformer call, peak RSS 472 -> 406 MB.
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if threads:
        so.intra_op_num_threads = threads
    return so


def _session(path, device: str, threads: int | None, int8_weights: str = "s8"):
    """``int8_weights``: "u8" re-encodes int8 DynamicQuantizeMatMul weights for CPUs whose MLAS
    kernel would saturate on s8 (see ort_int8)."""
    import onnxruntime as ort

    so = session_options(threads)
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(
                "--device cuda needs onnxruntime-gpu (pip install onnxruntime-gpu) and a CUDA GPU"
            )
        providers = [("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}), *providers]
    try:
        recoded = reencode_u8(Path(path)) if int8_weights == "u8" else None
        if recoded is None:
            return ort.InferenceSession(str(path), so, providers=providers)
        graph, arrays = recoded
        so.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(Path(path).parent)
        )
        keep = []  # the session reads these buffers in place: they live as long as it does
        for name, a in arrays.items():
            keep.append(ort.OrtValue.ortvalue_from_numpy(a))
            so.add_initializer(name, keep[-1])
        sess = ort.InferenceSession(graph, so, providers=providers)
        sess._afe_buffers = (keep, arrays)
        return sess
    except Exception as e:
        raise UserError(
            f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); rebuild with --force"
        ) from None


class OrtTextEncoder:
    def __init__(self, path, device, threads, int8_weights="s8"):
        self.s, self.ro = _session(path, device, threads, int8_weights), _run_options(device)

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.s.run(None, TEXT_ENCODER.feed(ids, mask), self.ro)[0].astype(np.float32)

    def close(self):
        self.s = None


class OrtTransformer:
    def __init__(
        self, path, comp: dict, table: ModulationTable, positions, device, threads, int8_weights="s8"
    ):
        self.s, self.ro = _session(path, device, threads, int8_weights), _run_options(device)
        self.dtype = NUMPY_DTYPES[comp["dtype"]]
        self.table = table
        self.positions = positions
        self.mod: np.ndarray | None = None

    def prepare(self, schedule: Schedule) -> None:
        self.mod = self.table(schedule.timesteps).astype(self.dtype)

    def __call__(self, latents: np.ndarray, context: np.ndarray, step: int) -> np.ndarray:
        feed = TRANSFORMER.feed(
            latents.astype(self.dtype),
            context.astype(self.dtype),
            self.mod[step : step + 1],
            self.positions(*latents.shape[2:]).astype(self.dtype),
        )
        return self.s.run(None, feed, self.ro)[0].astype(np.float32)

    def close(self):
        self.s = None


class OrtVAEDecoder:
    def __init__(self, path, comp: dict, device, threads):
        self.s, self.ro = _session(path, device, threads), _run_options(device)
        self.scaling = np.float32(comp["scaling_factor"])

    def decode_raw(self, z: np.ndarray) -> np.ndarray:
        return self.s.run(None, VAE_DECODER.feed(np.ascontiguousarray(z, dtype=np.float32)), self.ro)[0]

    def __call__(self, latents: np.ndarray, tiles: int = 1) -> np.ndarray:
        from ..runtime.vae_tiling import decode_tiled

        return to_uint8(decode_tiled(self.decode_raw, latents / self.scaling, tiles))

    def close(self):
        self.s = None


class OrtStages(StageSet):
    def __init__(
        self,
        folder,
        device: str = "cpu",
        threads: int | None = None,
        verify: bool = False,
        keep_resident: bool = False,
        int8_weights: str = "auto",
        vram_budget=None,  # the memory plan takes it per call (Pipeline.generate_many)
    ):
        super().__init__()
        if int8_weights not in ENCODINGS:
            raise UserError(f"int8 weight encoding {int8_weights!r}: choose from {', '.join(ENCODINGS)}")
        # resolved once for this CPU; engines store s8, see ort_int8 for why and where u8 is needed
        self.int8_weights = int8_encoding() if int8_weights == "auto" else int8_weights
        self.m = Manifest.load(folder, verify=verify)
        if self.m["backend"] != "onnxruntime":
            raise UserError(f"{folder}: engine was built for {self.m['backend']}, not onnxruntime")
        if device == "auto":  # the CUDA provider where onnxruntime-gpu has it, else the CPU
            import onnxruntime as ort

            device = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        self.device, self.threads, self.keep_resident = device, threads, keep_resident
        self.cfg = AuraFlowConfig(**self.m["transformer_config"])
        self.shift = float(self.m["scheduler"]["shift"])
        self.tokenizer_dir = self.m.path(self.m.component("tokenizer")["dir"])
        self.table = ModulationTable(self.cfg, self.m.path(self.m.component("modulation")["file"]))
        self.positions = PositionTable(self.cfg, self.m.path(self.m.component("positions")["file"]))

    def default_size(self) -> tuple[int, int]:
        c = self.m.component("transformer")
        return tuple(self.m.get("default_size") or (c.get("height", 1024), c.get("width", 1024)))

    def _open(self, name: str, **shape):
        if name == "text_encoder":
            c = self.m.component("text_encoder")
            return OrtTextEncoder(self.m.path(c["file"]), self.device, self.threads, self.int8_weights)
        if name == "transformer":
            c = self.m.component("transformer")
            return OrtTransformer(
                self.m.path(c["file"]),
                c,
                self.table,
                self.positions,
                self.device,
                self.threads,
                self.int8_weights,
            )
        c = self.m.component("vae_decoder")
        return OrtVAEDecoder(self.m.path(c["file"]), c, self.device, self.threads)

    def sizes(self):
        from ..runtime.planner import sizes_from_manifest

        return sizes_from_manifest(self.m)

    def free_memory(self) -> tuple[int, int]:
        from ..runtime.stages import available_ram, current_rss

        return available_ram() + current_rss(), current_rss()

    def describe(self) -> dict:
        d = {"precision": self.m["precision"], "device": self.device, "engine": str(self.m.folder)}
        if self.m["precision"] == "int8":
            d["int8_weights"] = self.int8_weights
        return d
