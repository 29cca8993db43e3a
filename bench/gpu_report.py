"""What the GPU benchmarks share: the machine they ran on, and a JSON report saved after every stage.

A device call may die late (the fp8 stage, a VAE out of memory, its timeout): every stage rewrites
the whole report, so what was measured before survives. No CUDA call happens at import.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import traceback
from pathlib import Path

import torch


def nvidia_smi() -> dict:
    """GPU name, driver and memory as nvidia-smi reports them ({} where it is missing or fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    q = "name,driver_version,memory.total,memory.used"
    try:
        r = subprocess.run(
            [exe, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    line = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
    fields = [f.strip() for f in line.split(",")]
    return dict(zip(q.split(","), fields)) if len(fields) == 4 else {}


def machine_info() -> dict:
    """Versions and the device; the CUDA fields only when torch sees a GPU."""
    import triton

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "nvidia_smi": nvidia_smi(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            device=p.name,
            capability=list(torch.cuda.get_device_capability(0)),
            multiprocessors=p.multi_processor_count,
            total_memory=p.total_memory,
        )
    return info


class Report(dict):
    """A dict written to ``path`` (atomically) by every ``save()``."""

    def __init__(self, path: str | Path, **fields):
        super().__init__(**fields)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def error_text(e: BaseException) -> str:
    """One line for the report; the traceback goes to the log. Holds no reference to the frames, so
    the tensors of a failed stage are freed before the next one starts."""
    print(traceback.format_exc(), flush=True)
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
