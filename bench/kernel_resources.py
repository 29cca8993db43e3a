"""Registers, spills and shared memory of every kernel variant, compiled for sm_86 / sm_89 / sm_90
with no GPU present (Triton compiles for a target; cuobjdump reads the resources of its cubin).
Each variant is compiled with the launch-time specialization (``kernels/aot.py``: aligned pointers
and strides, unit inner strides), so the shared memory is what the kernel needs when launched.

    python bench/kernel_resources.py [--json bench/results/kernel_resources.json] [--arch 86,89,90]

Fails (exit 1) if any variant spills or needs more shared memory than a block may use on its target.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SMEM_LIMIT = {86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _cuobjdump() -> str:
    import shutil

    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(p) if p.exists() else (shutil.which("cuobjdump") or "cuobjdump")


def compile_one(v, arch: int) -> dict:
    """Resources of the cubin Triton actually produced (cuobjdump -res-usage): registers, stack
    frame (where spills go: any stack means spilling for these kernels), shared memory, and
    whether the PTX pipelines its loads with cp.async."""
    from auraflow_edge.kernels.aot import compile_variant

    k = compile_variant(v.kernel, v.sig, v.const, arch, v.warps, v.stages, v.unit, v.aligned)
    with tempfile.TemporaryDirectory() as d:
        cub = Path(d) / "k.cubin"
        cub.write_bytes(k.asm["cubin"])
        r = subprocess.run([_cuobjdump(), "-res-usage", str(cub)], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r.stdout)
    if not m:
        raise RuntimeError(f"cuobjdump gave no resource line: {r.stdout[-300:]} {r.stderr[-300:]}")
    regs, stack, _, local = (int(x) for x in m.groups())
    return {
        "arch": f"sm_{arch}",
        "registers": regs,
        "spill_bytes": stack + local,
        "shared_bytes": int(k.metadata.shared),
        "cp_async": "cp.async" in k.asm["ptx"],
        "num_warps": v.warps,
        "num_stages": v.stages,
    }


def main() -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "kernel_resources.json"))
    ap.add_argument("--arch", default="86,89,90")
    ap.add_argument("--only", default="", help="substring filter on the variant label")
    args = ap.parse_args()
    archs = [int(a) for a in args.arch.split(",")]
    rows, bad = [], []
    print(f"{'kernel':<40} {'arch':<6} {'regs':>4} {'spill B':>7} {'smem KiB':>8} cp.async")
    from auraflow_edge.kernels.aot import variants

    for v in variants():
        if args.only not in v.label:
            continue
        for arch in archs:
            if arch not in v.archs:
                continue
            r = {"kernel": v.label, **compile_one(v, arch)}
            rows.append(r)
            flag = ""
            if r["spill_bytes"] or r["shared_bytes"] > SMEM_LIMIT[arch]:
                bad.append(r)
                flag = "  <-- FAIL"
            print(
                f"{v.label:<40} {r['arch']:<6} {r['registers']:>4} {r['spill_bytes']:>7} "
                f"{r['shared_bytes'] / 1024:>8.1f} {'yes' if r['cp_async'] else 'no':>8}{flag}",
                flush=True,
            )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "compiled_on": "CPU machine, no GPU (triton.compile for a target with the launch-time "
                "specialization + cuobjdump -res-usage of its cubin)",
                "triton": __import__("triton").__version__,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"{len(rows)} compilations, {len(bad)} failing; wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
