"""The FastAPI application: both APIs, the page, /health and /metrics around one request queue.

``create_app(pipe, options)`` builds it over an already loaded ``Pipeline``; the CLI runs it with
uvicorn, ``ray_app`` wraps the same app in a Ray Serve deployment (one per replica).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from ..errors import UserError
from . import a1111_api, openai_api
from .batcher import Batcher, QueueFull
from .metrics import Metrics
from .requests import BadRequest, Limits

REPLICA_HEADER = "x-auraflow-replica"


@dataclass
class ServeOptions:
    model_name: str
    limits: Limits = field(default_factory=Limits)
    batching: bool = True  # stage-major batching of compatible requests
    replica: str = ""  # the x-auraflow-replica header; default host:pid
    keep_images: int = 64  # response_format=url: the last N images stay downloadable
    generate_options: dict = field(default_factory=dict)  # vram_budget, vae_tiles
    disconnect_poll: float = 0.2  # seconds between checks that a waiting client is still there
    image_store: object = None  # default: ImageStore(keep_images) in this process (Ray: one shared actor)


class ImageStore:
    """The last ``keep`` PNGs, for ``response_format=url`` (bounded: memory stays steady)."""

    def __init__(self, keep: int):
        self.keep = keep
        self._items: OrderedDict[str, bytes] = OrderedDict()

    async def put(self, png: bytes) -> str:
        key = uuid.uuid4().hex
        self._items[key] = png
        while len(self._items) > self.keep:
            self._items.popitem(last=False)
        return key

    async def get(self, key: str) -> bytes | None:
        return self._items.get(key)


class ClientGone(Exception):
    pass


class Server:
    """State shared by the routes of one app: the pipeline, its queue, metrics and limits."""

    def __init__(self, pipe, options: ServeOptions):
        self.pipe, self.options = pipe, options
        self.model_name, self.limits = options.model_name, options.limits
        self.replica = options.replica or f"{socket.gethostname()}:{os.getpid()}"
        self.started = int(time.time())
        self.metrics = Metrics()
        self.images = options.image_store or ImageStore(options.keep_images)
        self.batcher = Batcher(
            pipe,
            self.metrics,
            options.limits.max_queue,
            options.limits.max_batch,
            options.batching,
            options.generate_options,
        )

    async def read_json(self, request: Request) -> dict:
        body = await request.body()  # the size limit is enforced while it arrives (Guard)
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise BadRequest(f"the request body must be a JSON object, got {type(data).__name__}")
        return data

    async def run(self, request: Request, job):
        """Queue the job and wait for its images; a client that goes away gives its place up."""
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise BadRequest(str(e), status=503, code="queue_full") from None
        fut = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=self.options.disconnect_poll)
                if done:
                    break
                if await request.is_disconnected():
                    self.batcher.cancel(job)
                    raise ClientGone
        except asyncio.CancelledError:  # Ray Serve cancels the handler when its client leaves
            self.batcher.cancel(job)
            raise
        try:
            images = fut.result()
        except UserError as e:
            raise BadRequest(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a one-line 500 to the client and the log, not a crash
            print(f"auraflow-edge serve: generation failed: {type(e).__name__}: {e}", file=sys.stderr)
            raise BadRequest(
                f"generation failed: {type(e).__name__}: {e}", status=500, code="internal_error"
            ) from None
        self.metrics.images.inc(len(images))
        return images


def _api(path: str) -> str:
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/sdapi/"):
        return "a1111"
    return "other"


def error_response(path: str, status: int, message: str, param=None, code=None) -> JSONResponse:
    """OpenAI's error shape under /v1, A1111's under /sdapi, FastAPI's ``detail`` elsewhere."""
    api = _api(path)
    if api == "openai":
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    elif api == "a1111":
        body = {"error": code or "BadRequest", "detail": message, "body": None, "errors": message}
    else:
        body = {"detail": message}
    headers = {"retry-after": "5"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """Pure ASGI middleware (it must not buffer or hide disconnects): the body size limit, the
    replica header, and request counts by API and status."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, limit, metrics = scope["path"], self.server.limits.max_body, self.server.metrics
        status = {"code": 0}

        async def send_marked(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
                msg["headers"] = [
                    *msg.get("headers", []),
                    (REPLICA_HEADER.encode(), self.server.replica.encode()),
                ]
            await send(msg)

        too_big = f"the request body is larger than this server's limit of {limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await error_response(path, 413, too_big, code="body_too_large")(scope, receive, send_marked)
        else:
            seen = 0

            async def receive_limited():
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > limit:
                        raise BadRequest(too_big, status=413, code="body_too_large")
                return msg

            try:
                await self.app(scope, receive_limited, send_marked)
            except ClientGone:
                status["code"] = 499  # nginx's "client closed request"; nobody reads the answer
        api = _api(path)
        metrics.requests.inc(api=api, status=status["code"])
        if status["code"] >= 400:
            metrics.errors.inc(api=api, status=status["code"])


def create_app(pipe, options: ServeOptions) -> FastAPI:
    server = Server(pipe, options)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.batcher.close()  # the worker stops; waiting requests are cancelled

    app = FastAPI(title="AuraFlow Edge", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest):
        return error_response(request.url.path, e.status, e.message, e.param, e.code)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}"}.get(
            e.status_code, str(e.detail)
        )
        return error_response(request.url.path, e.status_code, msg)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        return error_response(
            request.url.path, 500, f"generation failed: {type(e).__name__}: {e}", code="internal_error"
        )

    router = APIRouter()
    openai_api.add_routes(router, server)
    a1111_api.add_routes(router, server)

    @router.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "replica": server.replica, **_info(pipe)}

    @router.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @router.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_page(server))

    app.include_router(router)
    app.add_middleware(Guard, server=server)
    return app


def _info(pipe) -> dict:
    h, w = pipe.default_size()
    return {"default_size": f"{w}x{h}", **{k: v for k, v in pipe.info.items() if k != "auto"}}


def _page(server: Server) -> str:
    h, w = server.pipe.default_size()
    lim = server.limits
    defaults = {
        "model": server.model_name,
        "width": w,
        "height": h,
        "steps": min(50, lim.max_steps),
        "guidance": 3.5,
        "max_side": lim.max_side,
        "max_steps": lim.max_steps,
        "max_images": lim.max_images,
    }
    html = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    return html.replace("/*DEFAULTS*/{}", json.dumps(defaults))
