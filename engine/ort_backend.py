"""ONNX Runtime backend: the three stages of an engine folder, no torch anywhere on this path.

Sessions are created per stage and dropped after it; the CPU arena is disabled so memory goes
back when a stage ends. Quantized weights stay packed (MatMulNBits) in the session.
"""

from __future__ import annotations

import numpy as np

from .errors import UserError
from .image import to_uint8
from .manifest import Manifest
from .model_config import AuraFlowConfig
from .modulation import ModulationTable
from .schedule import Schedule
from .stages import StageSet

_NP = {"fp32": np.float32, "fp16": np.float16}


def _run_options(device: str):
    """On the CUDA provider, shrink the device arena after every run so the next stage has the memory."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    if device.startswith("cuda"):
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "gpu:0")
    return ro


def _session(path, device: str, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False  # memory returns to the OS when the stage ends
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if threads:
        so.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(
                "--device cuda needs onnxruntime-gpu (pip install onnxruntime-gpu) and a CUDA GPU"
            )
        providers = [("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}), *providers]
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:
        raise UserError(
            f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); rebuild with --force"
        ) from None


class OrtTextEncoder:
    def __init__(self, path, device, threads):
        self.s, self.ro = _session(path, device, threads), _run_options(device)

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.s.run(None, {"input_ids": ids, "attention_mask": mask}, self.ro)[0].astype(np.float32)

    def close(self):
        self.s = None


class OrtTransformer:
    def __init__(self, path, comp: dict, table: ModulationTable, device, threads):
        self.s, self.ro = _session(path, device, threads), _run_options(device)
        self.dtype = _NP[comp["dtype"]]
        self.table = table
        self.mod: np.ndarray | None = None

    def prepare(self, schedule: Schedule) -> None:
        self.mod = self.table(schedule.timesteps).astype(self.dtype)

    def __call__(self, latents: np.ndarray, context: np.ndarray, step: int) -> np.ndarray:
        out = self.s.run(
            None,
            {
                "latents": latents.astype(self.dtype),
                "context": context.astype(self.dtype),
                "modulation": self.mod[step : step + 1],
            },
            self.ro,
        )[0]
        return out.astype(np.float32)

    def close(self):
        self.s = None


class OrtVAEDecoder:
    def __init__(self, path, comp: dict, device, threads):
        self.s, self.ro = _session(path, device, threads), _run_options(device)
        self.scaling = np.float32(comp["scaling_factor"])

    def decode_raw(self, z: np.ndarray) -> np.ndarray:
        return self.s.run(None, {"latents": np.ascontiguousarray(z, dtype=np.float32)}, self.ro)[0]

    def __call__(self, latents: np.ndarray, tiles: int = 1) -> np.ndarray:
        from .vae_tiling import decode_tiled

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
        **_ignored,
    ):
        super().__init__()
        self.m = Manifest.load(folder, verify=verify)
        if self.m["backend"] != "onnxruntime":
            raise UserError(f"{folder}: engine was built for {self.m['backend']}, not onnxruntime")
        self.device, self.threads, self.keep_resident = device, threads, keep_resident
        self.cfg = AuraFlowConfig(**self.m["transformer_config"])
        self.shift = float(self.m["scheduler"]["shift"])
        self.tokenizer_dir = self.m.path(self.m.component("tokenizer")["dir"])
        self.table = ModulationTable(self.cfg, self.m.path(self.m.component("modulation")["file"]))

    def check_shape(self, height: int, width: int) -> None:
        c = self.m.component("transformer")
        if (height, width) != (c["height"], c["width"]):
            raise UserError(
                f"engine {self.m.folder} was built for {c['width']}x{c['height']}; rebuild with "
                f"--height {height} --width {width} for this size"
            )

    def _open(self, name: str, **shape):
        if name == "text_encoder":
            c = self.m.component("text_encoder")
            return OrtTextEncoder(self.m.path(c["file"]), self.device, self.threads)
        if name == "transformer":
            c = self.m.component("transformer")
            return OrtTransformer(self.m.path(c["file"]), c, self.table, self.device, self.threads)
        c = self.m.component("vae_decoder")
        return OrtVAEDecoder(self.m.path(c["file"]), c, self.device, self.threads)

    def sizes(self):
        from .planner import sizes_from_manifest

        return sizes_from_manifest(self.m)

    def free_memory(self) -> tuple[int, int]:
        from .stages import available_ram, current_rss

        return available_ram() + current_rss(), current_rss()

    def describe(self) -> dict:
        return {"precision": self.m["precision"], "device": self.device, "engine": str(self.m.folder)}
