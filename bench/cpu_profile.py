"""Where an ONNX Runtime transformer call spends its time on this CPU, per operator type:

    python -m auraflow_edge.bench.cpu_profile --json bench/results/cpu_op_breakdown_int8.json [--precision int8]

Mid-size random model (hidden 768, 2 joint + 6 single blocks), 512x512, CFG batch 2, 256 text
tokens: the configuration of the CPU benchmarks. ONNX Runtime's own profiler records every node of
``--runs`` calls after a warm-up; the profile file is read, summarised and deleted (never kept).
Per op type: share of the node time, calls, and the achieved rate: GFLOP/s for the matrix products
(2 M K N from the recorded shapes), GB/s of inputs + outputs for everything else.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from auraflow_edge.bench.int8_encodings import SIDE, transformer_inputs
from auraflow_edge.engine.backends.cpu import describe_cpu
from auraflow_edge.engine.backends.ort_backend import session_options
from auraflow_edge.engine.backends.ort_int8 import int8_encoding
from auraflow_edge.engine.runtime.manifest import Manifest
from auraflow_edge.engine.tiny.random_model import make_tiny_pipeline

_ITEMSIZE = {
    "float": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "uint8": 1,
    "int64": 8,
    "int32": 4,
    "bool": 1,
}
MATMULS = ("MatMul", "DynamicQuantizeMatMul", "MatMulNBits", "MatMulInteger", "FusedMatMul", "Gemm")


def _shapes(entries) -> list[tuple[str, list[int]]]:
    return [(t, s) for e in entries or [] for t, s in e.items()]


def matmul_flops(op: str, inputs) -> float:
    """2 M K N for a recorded matrix product (batch dims of A multiplied in)."""
    (_, a), *rest = inputs
    if op == "MatMulNBits":  # B is packed: N and K are attributes, not shapes
        n = rest[0][1][0]
        return 2.0 * float(np.prod(a)) * n
    b = rest[0][1]
    return 2.0 * float(np.prod(a)) * b[-1]


def summarise(events: list[dict], runs: int) -> dict:
    by_op: dict[str, dict] = defaultdict(lambda: {"us": 0.0, "calls": 0, "flops": 0.0, "bytes": 0.0})
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        row = by_op[op]
        row["us"] += e["dur"]
        row["calls"] += 1
        ins, outs = _shapes(args.get("input_type_shape")), _shapes(args.get("output_type_shape"))
        if op in MATMULS and len(ins) >= 2:
            row["flops"] += matmul_flops(op, ins)
        row["bytes"] += sum(_ITEMSIZE.get(t, 4) * float(np.prod(s)) for t, s in ins + outs)
    total = sum(r["us"] for r in by_op.values())
    out = {}
    for op, r in sorted(by_op.items(), key=lambda kv: -kv[1]["us"]):
        sec = r["us"] / 1e6
        row = {"share": r["us"] / total, "seconds_per_call": sec / runs, "nodes_per_call": r["calls"] // runs}
        if r["flops"]:
            row["gflop_per_s"] = r["flops"] / sec / 1e9
        row["gb_per_s"] = r["bytes"] / sec / 1e9
        out[op] = row
    return {"node_seconds_per_call": total / 1e6 / runs, "ops": out}


def profile(path: Path, feed: dict, runs: int, threads: int | None) -> dict:
    """Profile ``runs`` calls after one warm-up, as the runtime creates its sessions."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="afe-profile-") as tmp:
        so = session_options(threads)  # as the runtime creates its sessions
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, feed)  # warm-up, dropped below
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    # the warm-up's nodes come first: keep the last `runs` calls only
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    n_warm = len(nodes) // (runs + 1)
    return summarise(nodes[n_warm:], runs)


def main() -> None:
    from auraflow_edge.export.build import build_engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    if int8_encoding() != "s8" and args.precision == "int8":
        print("note: this CPU re-encodes int8 weights as u8 at load; profiling the stored s8 graph")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="afe-profile-"))
    model = make_tiny_pipeline(work / "mid", size="mid")
    eng = build_engine(
        str(model),
        work / f"engine-{args.precision}",
        precision=args.precision,
        height=SIDE,
        width=SIDE,
        quiet=True,
        force=True,  # the model above is written anew: its fingerprint changes every run
    )
    m = Manifest.load(eng)
    load_before = os.getloadavg()[0]
    res = {
        "machine": f"{describe_cpu()}, {os.cpu_count()} cores",
        "model": "mid (hidden 768, 2 joint + 6 single blocks)",
        "size": f"{SIDE}x{SIDE}, CFG batch 2, 256 text tokens",
        "precision": args.precision,
        "runs": args.runs,
        **profile(m.path("transformer.onnx"), transformer_inputs(m), args.runs, args.threads),
        # other work on the machine inflates every time; the shares hold better than the seconds
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{'op':<24} {'share':>6} {'s/call':>8} {'GFLOP/s':>9} {'GB/s':>7}")
    for op, r in res["ops"].items():
        gf = f"{r['gflop_per_s']:9.1f}" if "gflop_per_s" in r else f"{'-':>9}"
        print(f"{op:<24} {r['share']:6.1%} {r['seconds_per_call']:8.3f} {gf} {r['gb_per_s']:7.1f}")


if __name__ == "__main__":
    main()
