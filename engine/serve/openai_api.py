"""OpenAI Images API: ``POST /v1/images/generations``, ``GET /v1/models``, and the ``url`` files.

Our sampling settings ride in the same body (the ``openai`` client's ``extra_body``):
``negative_prompt``, ``steps``, ``guidance``, ``seed`` (image i uses ``seed + i``).
"""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from . import requests as rq

# Fields of OpenAI's request that change nothing here; anything else unknown is refused, as OpenAI does.
IGNORED = {"quality", "style", "user", "moderation", "background"}
KNOWN = {"model", "prompt", "n", "size", "response_format", "output_format"} | IGNORED
EXTRAS = {"negative_prompt", "steps", "guidance", "seed"}


def parse(server, body: dict) -> tuple[rq.Job, str]:
    lim = server.limits
    unknown = sorted(set(body) - KNOWN - EXTRAS)
    if unknown:
        raise rq.BadRequest(
            f"unrecognized request argument: {unknown[0]} (ours: {', '.join(sorted(EXTRAS))})",
            unknown[0],
            code="unknown_parameter",
        )
    model = body.get("model")
    if model is not None and model != server.model_name:
        raise rq.BadRequest(
            f"the model {model!r} does not exist here; this server has {server.model_name!r} (GET /v1/models)",
            "model",
            404,
            "model_not_found",
        )
    prompt = rq.text(body, "prompt", lim, required=True)
    n = rq.integer(body, "n", 1, 1, lim.max_images, " on this server")
    fmt = body.get("response_format") or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise rq.BadRequest(f"response_format must be 'b64_json' or 'url', got {fmt!r}", "response_format")
    if body.get("output_format") not in (None, "png"):
        raise rq.BadRequest("output_format: this server writes PNG only", "output_format")
    height, width = size(server, body.get("size"))
    job = rq.make_job(
        server.pipe,
        lim,
        prompt,
        rq.text(body, "negative_prompt", lim),
        rq.integer(body, "steps", min(50, lim.max_steps), 1, lim.max_steps),
        rq.number(body, "guidance", 3.5),
        height,
        width,
        rq.seed(body, "seed"),
        n,
    )
    return job, fmt


def size(server, value) -> tuple[int, int]:
    """ "WxH" (or "auto"/absent: the model's own size) -> (height, width), checked."""
    if value is None or value == "auto":
        h, w = server.pipe.default_size()
    else:
        if not isinstance(value, str):
            raise rq.BadRequest(f"size must be a string 'WIDTHxHEIGHT', got {rq._type(value)}", "size")
        w_s, sep, h_s = value.lower().partition("x")
        if not sep or not w_s.isdigit() or not h_s.isdigit():
            raise rq.BadRequest(f"size must be 'WIDTHxHEIGHT' (e.g. '256x256'), got {value!r}", "size")
        w, h = int(w_s), int(h_s)
    rq.check_shape(server.pipe, server.limits, h, w, "size")
    return h, w


def add_routes(router: APIRouter, server) -> None:
    @router.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": server.model_name,
                    "object": "model",
                    "created": server.started,
                    "owned_by": "auraflow-edge",
                }
            ],
        }

    @router.post("/v1/images/generations")
    async def generations(request: Request):
        job, fmt = parse(server, await server.read_json(request))
        images = await server.run(request, job)
        if fmt == "url":
            base = str(request.base_url).rstrip("/")
            data = [{"url": f"{base}/v1/images/files/{await server.images.put(im.png)}.png"} for im in images]
        else:
            data = [{"b64_json": base64.b64encode(im.png).decode()} for im in images]
        return JSONResponse({"created": int(time.time()), "data": data})

    @router.get("/v1/images/files/{name}")
    async def image_file(name: str):
        png = await server.images.get(name.removesuffix(".png"))
        if png is None:
            raise rq.BadRequest(
                f"image {name} is not here (this server keeps the last {server.images.keep} images)",
                status=404,
                code="not_found",
            )
        return Response(png, media_type="image/png")
