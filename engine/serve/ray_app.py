"""The same application on Ray Serve: one deployment, N replicas, each with its own loaded pipeline
and request queue, behind Ray Serve's HTTP proxy.

Two ways in:
- ``auraflow-edge serve MODEL --ray --replicas N [--ray-address ADDR]`` (``run_on_ray``);
- Ray's own CLI with the application builder:
  ``serve run auraflow_edge.engine.serve.ray_app:build_app model=PATH replicas=2``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UserError
from .config import load_pipeline, missing_extra, serve_options
from .requests import Limits

APP_NAME = "auraflow"


def _serve():
    """Ray Serve, imported when first needed (run_on_ray sets Ray's environment before that)."""
    try:
        from ray import serve
    except ImportError as e:
        raise missing_extra("ray", e) from None
    return serve


def _deployment_class():
    serve = _serve()

    @serve.deployment(name="AuraFlowEdge")
    @serve.ingress()
    class AuraFlowEdge:
        """One replica: loads the pipeline once, then serves the FastAPI app of ``create_app``."""

        def __init__(self, config: dict):
            ctx = serve.get_replica_context()
            self.replica = f"{ctx.replica_id.unique_id}@{socket.gethostname()}:{os.getpid()}"
            self.config = config
            self.pipe = load_pipeline(config, progress=False)
            self.images = SharedImages(ctx.app_name, config["keep_images"])

        def __serve_build_asgi_app__(self):
            from .app import create_app

            options = serve_options(self.config, replica=self.replica)
            options.image_store = self.images
            return create_app(self.pipe, options)

    return AuraFlowEdge


class SharedImages:
    """``response_format=url`` images in one named actor, so that any replica serves the file."""

    def __init__(self, app_name: str, keep: int):
        import ray

        from .app import ImageStore

        cls = ray.remote(num_cpus=0)(ImageStore)
        self.keep = keep
        # detached: it outlives the replica that happened to create it (run_on_ray removes it)
        self.actor = cls.options(
            name=f"{app_name}-images", namespace="serve", get_if_exists=True, lifetime="detached"
        ).remote(keep)

    async def put(self, png: bytes) -> str:
        return await self.actor.put.remote(png)

    async def get(self, key: str) -> bytes | None:
        return await self.actor.get.remote(key)


def application(config: dict, replicas: int, gpus_per_replica: float = 0):
    """The bound Ray Serve application for ``serve.run``."""
    if replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {replicas}")
    actor = {"num_cpus": 1, "num_gpus": gpus_per_replica}
    return (
        _deployment_class()
        .options(
            num_replicas=replicas,
            ray_actor_options=actor,
            # a request waits in our own queue (it batches there), so let the proxy hand many over
            max_ongoing_requests=max(8, config["limits"]["max_queue"]),
            health_check_period_s=2,
        )
        .bind(config)
    )


def _absolute_paths(config: dict) -> dict:
    """Replicas run in another working folder (and, on a cluster, another machine): local paths
    are made absolute; hub ids stay as they are."""
    out = dict(config)
    for key in ("model", "components"):
        v = out.get(key)
        if v and Path(v).exists():
            out[key] = str(Path(v).resolve())
    out["lora"] = [_abs_lora(x) for x in out.get("lora", [])]
    return out


def _abs_lora(arg: str) -> str:
    path, sep, scale = arg.rpartition(":") if ":" in arg and not Path(arg).exists() else (arg, "", "")
    return str(Path(path).resolve()) + sep + scale if Path(path).exists() else arg


def _gpus(config: dict) -> float:
    import ray

    if config["device"] == "cpu":
        return 0
    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_on_ray(
    config: dict, replicas: int, address: str | None, host: str, port: int, quiet: bool = False
) -> int:
    """Start (or join) a Ray cluster, deploy ``replicas`` replicas, serve until interrupted."""
    if not address and host in ("127.0.0.1", "localhost"):
        # A cluster for this machine alone: Ray's single-machine mode takes 127.0.0.1 as the node
        # address (its _node_ip_address turns loopback into the machine's own address). Read when
        # ray is first imported, so set before that.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    serve = _serve()
    import ray

    config = _absolute_paths(config)
    # Workers get the driver's working folder on sys.path; from a source checkout that would put
    # the repo's `kernels/` folder in front of Hugging Face's `kernels` package. An empty working
    # folder for the job keeps it off.
    workdir = tempfile.mkdtemp(prefix="auraflow-serve-ray-")
    init = {"runtime_env": {"working_dir": workdir}, "logging_level": "WARNING", "log_to_driver": not quiet}
    if address:
        try:
            ray.init(address=address, **init)
        except ConnectionError as e:
            raise UserError(
                f"cannot join the Ray cluster at {address} ({e}); a cluster started by `ray start` "
                "uses token authentication: join it with RAY_AUTH_MODE=token and its token "
                "(~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from None
    else:
        # "local": always a new cluster of our own; with no address Ray would join the one named in
        # /tmp/ray/ray_current_cluster, which a killed earlier run leaves behind pointing at nothing
        ray.init(address="local", include_dashboard=False, **init)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl-C does: Serve shut down cleanly
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            application(config, replicas, _gpus(config)), name=APP_NAME, route_prefix="/", blocking=False
        )
        if not quiet:
            print(
                f"serving {config['model_name']} on http://{host}:{port}/ ({replicas} Ray replicas)",
                file=sys.stderr,
            )
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            if address:
                serve.delete(APP_NAME)  # the cluster and its Serve instance are someone else's
                try:
                    ray.kill(ray.get_actor(f"{APP_NAME}-images", namespace="serve"))
                except ValueError:  # no url image was ever stored
                    pass
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def build_app(args: dict):
    """Application builder for ``serve run auraflow_edge.engine.serve.ray_app:build_app key=value ...``.

    Keys: ``model`` (required), ``replicas``, ``model_name``, ``backend``, ``precision``,
    ``device``, ``components``, ``revision``, ``lora`` (comma-separated), ``swap_stages``,
    ``batching``, ``keep_images``, ``vram_budget``, ``vae_tiles``, ``gpus_per_replica`` (default 0;
    1 puts each replica on its own GPU) and every limit of
    ``Limits`` (``max_images``, ``max_side``, ...)."""
    from .config import default_model_name

    args = dict(args)
    if "model" not in args:
        raise UserError("build_app needs model=PATH_OR_HUB_ID")

    def flag(key, default):
        return str(args.pop(key, default)).lower() in ("1", "true", "yes", "on")

    model = args.pop("model")
    limits = {}
    for k, default in vars(Limits()).items():
        limits[k] = int(args.pop(k, default))
    gen = {k: args.pop(k) for k in ("vram_budget",) if k in args}
    if "vae_tiles" in args:
        gen["vae_tiles"] = int(args.pop("vae_tiles"))
    config = {
        "model": model,
        "model_name": args.pop("model_name", None) or default_model_name(model),
        "backend": args.pop("backend", "auto"),
        "precision": args.pop("precision", "auto"),
        "device": args.pop("device", "auto"),
        "components": args.pop("components", None),
        "revision": args.pop("revision", None),
        "lora": [x for x in str(args.pop("lora", "")).split(",") if x],
        "keep_resident": not flag("swap_stages", False),
        "generate_options": gen,
        "limits": limits,
        "batching": flag("batching", True),
        "keep_images": int(args.pop("keep_images", 64)),
    }
    replicas = int(args.pop("replicas", 1))
    gpus = float(args.pop("gpus_per_replica", 0))
    if args:
        raise UserError(f"build_app: unknown argument(s) {', '.join(sorted(args))}")
    return application(_absolute_paths(config), replicas, gpus)
