"""AUTOMATIC1111 / Forge web UI API: ``/sdapi/v1/txt2img``, ``/sdapi/v1/sd-models``, ``/sdapi/v1/progress``.

A1111 clients send many fields this engine has no use for (sampler, hires fix, ...): they are
ignored, as A1111 ignores what it does not know, and listed in ``info["ignored"]``.
"""

from __future__ import annotations

import base64
import json
import time

from fastapi import APIRouter, Request

from . import requests as rq

USED = {"prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "seed", "batch_size", "n_iter"}


def parse(server, body: dict) -> tuple[rq.Job, dict]:
    lim = server.limits
    prompt = rq.text(body, "prompt", lim, required=True)
    negative = rq.text(body, "negative_prompt", lim)
    steps = rq.integer(body, "steps", min(50, lim.max_steps), 1, lim.max_steps)
    cfg = rq.number(body, "cfg_scale", 3.5)
    dh, dw = server.pipe.default_size()
    width = rq.integer(body, "width", dw, 16, lim.max_side)
    height = rq.integer(body, "height", dh, 16, lim.max_side)
    rq.check_shape(server.pipe, lim, height, width, "width")
    seed = rq.seed(body, "seed", -1)
    batch = rq.integer(body, "batch_size", 1, 1, lim.max_images)
    n_iter = rq.integer(body, "n_iter", 1, 1, lim.max_images)
    if batch * n_iter > lim.max_images:
        raise rq.BadRequest(
            f"batch_size * n_iter = {batch * n_iter} images; this server makes at most {lim.max_images} per request",
            "batch_size",
        )
    # A1111 numbers seeds over the batch as seed, seed + 1, ...: the same as one job of n images.
    job = rq.make_job(server.pipe, lim, prompt, negative, steps, cfg, height, width, seed, batch * n_iter)
    params = {
        "prompt": prompt,
        "negative_prompt": negative,
        "steps": steps,
        "cfg_scale": cfg,
        "width": width,
        "height": height,
        "seed": seed,
        "batch_size": batch,
        "n_iter": n_iter,
    }
    return job, params


def add_routes(router: APIRouter, server) -> None:
    @router.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        body = await server.read_json(request)
        job, params = parse(server, body)
        images = await server.run(request, job)
        info = {
            "prompt": params["prompt"],
            "all_prompts": [params["prompt"]] * len(images),
            "negative_prompt": params["negative_prompt"],
            "seed": job.seeds[0],
            "all_seeds": job.seeds,
            "width": params["width"],
            "height": params["height"],
            "steps": params["steps"],
            "cfg_scale": params["cfg_scale"],
            "sd_model_name": server.model_name,
            "infotexts": [json.dumps(im.parameters, sort_keys=True) for im in images],
            "ignored": sorted(set(body) - USED),
        }
        return {
            "images": [base64.b64encode(im.png).decode() for im in images],
            "parameters": params,
            "info": json.dumps(info),
        }

    @router.get("/sdapi/v1/sd-models")
    async def sd_models():
        name = server.model_name
        return [
            {
                "title": name,
                "model_name": name,
                "hash": None,
                "sha256": None,
                "filename": name,
                "config": None,
            }
        ]

    @router.get("/sdapi/v1/progress")
    async def progress():
        p = server.batcher.progress()
        frac = p.step / p.steps if p.steps else 0.0
        elapsed = time.time() - p.started if p.running else 0.0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        return {
            "progress": frac,
            "eta_relative": eta,
            "state": {
                "skipped": False,
                "interrupted": False,
                "job": "txt2img" if p.running else "",
                "job_count": p.images if p.running else 0,
                "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(p.started))
                if p.running
                else "0",
                "job_no": 0,
                "sampling_step": p.step,
                "sampling_steps": p.steps,
                "queued_images": p.queued_images,
            },
            "current_image": None,
            "textinfo": None,
        }
