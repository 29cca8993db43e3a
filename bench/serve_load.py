"""Load on `auraflow-edge serve` with the tiny model: requests/s and p50/p95 latency for 1, 4 and 8
concurrent clients, on one process and on 2 Ray replicas, and the throughput gain of stage-major
batching (the same server with --no-batching), with the stages resident and with --swap-stages.

    python bench/serve_load.py --json bench/results/cpu_serve_load.json

Each client sends its requests one after another (OpenAI Images API, b64_json, a different prompt
and seed each); a warm-up round per server runs first and is not counted. The machine's load average is
recorded before and after, since these CPUs may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, extra: list[str], workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "auraflow-edge")
    cmd = [exe, "--quiet", "serve", str(model), "--port", str(port), "--device", "cpu", "--precision", "fp32"]
    cmd += ["--max-queue", "256", *extra]
    proc = subprocess.Popen(
        cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not healthy after 300 s: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_seconds(pids) -> float:
    """user + system CPU seconds of these processes (all their threads), from /proc."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def load(url: str, clients: int, per_client: int, body: dict, seed0: int, pids) -> dict:
    lat, errors, replicas = [], [], set()
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as h:
            for k in range(per_client):
                t0 = time.perf_counter()
                seed = seed0 + c * 1000 + k  # a prompt of its own too: no text encoding is shared
                r = h.post(
                    f"{url}/v1/images/generations",
                    json=body | {"seed": seed, "prompt": f"{body['prompt']} {seed}"},
                )
                dt = time.perf_counter() - t0
                with lock:
                    (lat if r.status_code == 200 else errors).append(
                        dt if r.status_code == 200 else r.status_code
                    )
                    replicas.add(r.headers.get("x-auraflow-replica"))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    cpu0 = cpu_seconds(pids())
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pids()) - cpu0
    lat.sort()
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) > 1 else [lat[0]] * 19
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": errors,
        "requests_per_s": len(lat) / wall,
        "p50_s": statistics.median(lat),
        "p95_s": q[18],
        "replicas_seen": len(replicas),
        # contention-proof: what the server (or the replicas) spent on the CPU per request
        "server_cpu_s_per_request": cpu / max(1, len(lat)),
    }


def seen_replicas(url: str, tries: int = 20) -> set[str]:
    return {httpx.get(f"{url}/health", timeout=10).headers["x-auraflow-replica"] for _ in range(tries)}


def metrics_batches(url: str) -> dict:
    text = httpx.get(f"{url}/metrics").text
    vals = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("auraflow_batch_images"))
    return {k: float(v) for k, v in vals.items()}


def run_server(name, model, extra, workdir, clients, per_client, body, results):
    proc, url = start(model, extra, workdir)
    if "--ray" in extra:  # the replicas' processes, named by the x-auraflow-replica header (...:pid)

        def pids():
            return {int(h.rsplit(":", 1)[1]) for h in seen_replicas(url)}
    else:

        def pids():
            return {proc.pid}

    try:
        load(url, 2, 2, body, 10**6, pids)  # warm-up: first calls, allocator pools
        rows = []
        for c in clients:
            row = load(url, c, per_client, body, 10**5 * c, pids)
            rows.append(row)
            print(
                f"{name:<28} {c} clients: {row['requests_per_s']:6.2f} req/s  p50 {row['p50_s']:6.2f} s  "
                f"p95 {row['p95_s']:6.2f} s  server CPU {row['server_cpu_s_per_request']:5.2f} s/request  "
                f"replicas {row['replicas_seen']}  errors {len(row['errors'])}",
                flush=True,
            )
        results[name] = {"flags": extra, "rows": rows, "batches": metrics_batches(url)}
    finally:
        stop(proc)


def batching_in_process(model: Path, size: str, steps: int, images: int, repeats: int) -> dict:
    """The batching gain without HTTP: ``images`` requests (distinct prompts and seeds) as one
    ``generate_many`` call vs one call each, interleaved ``repeats`` times, medians; with the
    stages resident (the server's default) and swapped per call (--swap-stages)."""
    from auraflow_edge.engine.runtime.pipeline import Pipeline

    w, h = (int(x) for x in size.split("x"))
    out = {}
    for resident in (True, False):
        pipe = Pipeline.load(model, device="cpu", precision="fp32", progress=False, keep_resident=resident)
        kw = dict(steps=steps, height=h, width=w)
        pipe.generate("warm-up", **kw)
        alone, together = [], []
        for r in range(repeats):
            prompts = [f"a photo of a cat sitting on a red sofa {r} {i}" for i in range(images)]
            t0 = time.perf_counter()
            for i, prompt in enumerate(prompts):
                pipe.generate(prompt, seed=i, **kw)
            t1 = time.perf_counter()
            pipe.generate_many(prompts, seeds=list(range(images)), **kw)
            t2 = time.perf_counter()
            alone.append(t1 - t0)
            together.append(t2 - t1)
        a, t = statistics.median(alone), statistics.median(together)
        name = "resident" if resident else "swap-stages"
        out[name] = {
            "one_call_each_s": a,
            "one_generate_many_s": t,
            "gain": a / t,
            "all_s": [alone, together],
        }
        print(
            f"in process, {images} images, {name:<11}: one call each {a:6.2f} s, one batch {t:6.2f} s, x{a / t:.2f}"
        )
    return out


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--model", help="a model folder (default: the tiny random model, made in a temp folder)")
    ap.add_argument("--size", default="128x128", help="WxH of each image")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=6, help="requests each client sends")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--no-ray", action="store_true", help="skip the 2-replica Ray runs")
    ap.add_argument("--repeats", type=int, default=3, help="in-process batching comparison: repeats")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    body = {"prompt": "a photo of a cat sitting on a red sofa", "size": args.size, "steps": args.steps}
    workdir = Path(tempfile.mkdtemp(prefix="auraflow-serve-bench-"))  # not the repo root (Ray workers)
    if args.model:
        model = Path(args.model).resolve()
    else:
        from auraflow_edge.engine.tiny.random_model import make_tiny_pipeline

        model = make_tiny_pipeline(workdir / "tiny")
    before = loadavg()
    in_process = batching_in_process(model, args.size, args.steps, 4, args.repeats)
    results: dict = {}
    runs = [
        ("single, batching", []),
        ("single, no batching", ["--no-batching"]),
        ("single swap, batching", ["--swap-stages"]),
        ("single swap, no batching", ["--swap-stages", "--no-batching"]),
    ]
    if not args.no_ray:
        runs.append(("ray 2 replicas, batching", ["--ray", "--replicas", "2"]))
    for name, extra in runs:
        run_server(name, model, extra, workdir, clients, args.per_client, body, results)
    gain = {}
    for mode in ("single", "single swap"):
        on, off = results[f"{mode}, batching"]["rows"], results[f"{mode}, no batching"]["rows"]
        gain[mode] = {
            str(a["clients"]): {
                "wall": a["requests_per_s"] / b["requests_per_s"],
                "cpu": b["server_cpu_s_per_request"] / a["server_cpu_s_per_request"],
            }
            for a, b in zip(on, off)
        }
        print(
            f"batching gain ({mode}): "
            + ", ".join(
                f"{c} clients x{g['wall']:.2f} wall, x{g['cpu']:.2f} CPU" for c, g in gain[mode].items()
            )
        )
    out = {
        "what": "auraflow-edge serve, tiny random model, CPU, OpenAI Images API (b64_json)",
        "image": {"size": args.size, "steps": args.steps, "guidance": 3.5},
        "per_client_requests": args.per_client,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_before": before,
            "loadavg_after": loadavg(),
        },
        "results": results,
        "batching_gain_requests_per_s": gain,
        "batching_gain_in_process_4_images": in_process,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
