"""The subset of AUTOMATIC1111's `/sdapi/v1` API that clients call, in the request and response shapes of its
modules/api/models.py: txt2img, img2img (with mask), samplers, sd-models, options, progress, png-info.

Fields this server has no use for (styles, restore_faces, ...) are accepted and ignored, as A1111's own models
accept them; ones that would change the result and cannot be honoured (hires fix, tiling, scripts) get a 422.
Unset fields take ldm-app's defaults (the model's native size, 25 steps, CFG 5), not SD's 512 px and 50 steps.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import PIL.Image
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..request import GenerationRequest
from .engine import read_png_text
from .jobs import run_job
from .validation import ApiError, a1111_mask, decode_base64, decode_base64_image, image_request

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])


class Txt2ImgRequest(BaseModel):
    """StableDiffusionProcessingTxt2Img's fields that change the picture; others are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1 = random; image i of the request uses seed + i")
    sampler_name: str | None = Field(None, description="A1111 label (DDIM, Euler, DPM++ 2M, ...) or ours")
    sampler_index: str | None = Field(None, description="deprecated alias of sampler_name")
    scheduler: str | None = Field(None, description="A1111's schedule type: Karras, or automatic")
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None  # None: the sampler's default (25; LCM: 4)
    cfg_scale: float | None = None  # None: the sampler's default (5; LCM: 1)
    eta: float | None = None
    width: int | None = None
    height: int | None = None
    send_images: bool = True
    enable_hr: bool = False
    tiling: bool = False
    script_name: str | None = None
    loras: dict[str, float] | None = Field(None, description="ldm-app extension: LoRA name → scale "
                                                               "(or A1111's <lora:name:weight> in the prompt)")


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(..., description="base64 images; the first is used")
    denoising_strength: float = 0.75
    mask: str | None = Field(None, description="base64 mask, white = repaint")
    inpainting_mask_invert: int = Field(0, description="1: black = repaint")


def _request(http: Request, body: Txt2ImgRequest, image: PIL.Image.Image | None = None,
             mask: PIL.Image.Image | None = None, strength: float = 0.75) -> GenerationRequest:
    if body.enable_hr:
        raise ApiError(422, "enable_hr (hires fix) is not supported; send enable_hr=false and the size you want.",
                       "enable_hr")
    if body.tiling:
        raise ApiError(422, "tiling (seamless textures) is not supported; send tiling=false.", "tiling")
    if body.script_name:
        raise ApiError(422, f"script_name={body.script_name!r}: this server runs no scripts; leave it out.",
                       "script_name")
    if body.batch_size < 1 or body.n_iter < 1:
        raise ApiError(422, f"batch_size={body.batch_size}, n_iter={body.n_iter}; both must be at least 1.",
                       "batch_size")
    engine, limits = http.app.state.engine, http.app.state.settings.limits
    try:
        sampler = engine.resolve_sampler(body.sampler_name or body.sampler_index or "ddim", body.scheduler)
    except ValueError as err:
        raise ApiError(422, str(err), "sampler_name") from None
    return image_request(engine, limits, prompt=body.prompt, negative_prompt=body.negative_prompt,
                         steps=body.steps, guidance=body.cfg_scale, eta=0.0 if body.eta is None else body.eta,
                         sampler=sampler, seed=body.seed,
                         width=body.width, height=body.height, n=body.batch_size * body.n_iter, loras=body.loras,
                         image=image, mask=mask, strength=strength)


async def _respond(http: Request, body: Txt2ImgRequest, request: GenerationRequest) -> dict[str, Any]:
    engine = http.app.state.engine
    images = await run_job(http, request)
    params = [engine.params(request, seed) for seed in request.seeds]
    encoded = [base64.b64encode(engine.png(image, p)).decode() for image, p in zip(images, params)]
    return {"images": encoded if body.send_images else [],
            "parameters": body.model_dump(exclude={"init_images", "mask"}),
            "info": json.dumps(_info(http, request, params, body))}


def _info(http: Request, request: GenerationRequest, params: list, body: Txt2ImgRequest) -> dict[str, Any]:
    """What A1111's `Processed.js()` returns, as far as it applies here."""
    engine = http.app.state.engine
    label = engine.sampler_labels()[request.sampler]
    infotexts = [engine.infotext(p) for p in params]
    return {
        "prompt": request.prompt, "all_prompts": [request.prompt] * request.n,
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * request.n,
        "seed": request.seed, "all_seeds": request.seeds, "subseed": -1, "all_subseeds": [-1] * request.n,
        "subseed_strength": 0, "width": request.width, "height": request.height, "sampler_name": label,
        "cfg_scale": request.guidance, "steps": request.steps, "batch_size": body.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": engine.model_name,
        "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": request.strength if request.image is not None else None,
        "extra_generation_params": {"Eta": request.eta} if request.eta else {},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": f"ldm-app {__version__}",
    }


@router.post("/txt2img")
async def txt2img(body: Txt2ImgRequest, http: Request) -> dict[str, Any]:
    """Text to image: base64 PNGs (with their parameters inside), the request, and `info` as a JSON string."""
    return await _respond(http, body, _request(http, body))


@router.post("/img2img")
async def img2img(body: Img2ImgRequest, http: Request) -> dict[str, Any]:
    """Image to image (SDEdit at `denoising_strength`), inpainting when a `mask` is sent (white = repaint)."""
    limits = http.app.state.settings.limits
    if not body.init_images:
        raise ApiError(422, "init_images is empty; send the input image base64-encoded.", "init_images")
    image = decode_base64_image(body.init_images[0], "init_images[0]", limits)
    mask = None
    if body.mask:
        mask = a1111_mask(decode_base64_image(body.mask, "mask", limits, keep_alpha=True))
        if body.inpainting_mask_invert:
            mask = PIL.Image.eval(mask, lambda v: 255 - v)
    return await _respond(http, body, _request(http, body, image, mask, body.denoising_strength))


@router.get("/samplers")
def samplers(http: Request) -> list[dict[str, Any]]:
    aliases: dict[str, list[str]] = {}
    for name, label in http.app.state.engine.sampler_labels().items():
        aliases.setdefault(label, []).append(name)
    return [{"name": label, "aliases": names, "options": {}} for label, names in aliases.items()]


@router.get("/sd-models")
def sd_models(http: Request) -> list[dict[str, Any]]:
    """The one model this server was started with (models are chosen at start-up, never by a request)."""
    name = http.app.state.engine.model_name
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}]


@router.get("/loras")
def loras(http: Request) -> list[dict[str, Any]]:
    """LoRAs loaded at start-up (the names `<lora:name:weight>` and `loras` accept); as A1111's Lora extension."""
    return [{"name": name, "alias": name, "metadata": {}, "default_scale": lora.scale}
            for name, lora in http.app.state.engine.loras.items()]


@router.get("/options")
def options(http: Request) -> dict[str, Any]:
    engine = http.app.state.engine
    return {"sd_model_checkpoint": engine.model_name, "samples_format": "png", "eta_ddim": 0.0,
            "CLIP_stop_at_last_layers": 1, "sd_checkpoint_hash": None}


@router.get("/progress")
def progress(http: Request) -> dict[str, Any]:
    """Progress of the running batch, per denoising step; `eta_relative` (s) from the time per step so far."""
    snap = http.app.state.queue.snapshot()
    step, total = snap["step"], snap["total_steps"]
    fraction = step / total if total else 0.0
    eta = snap["running_seconds"] * (1 - fraction) / fraction if fraction else 0.0
    return {"progress": fraction, "eta_relative": eta,
            "state": {"skipped": False, "interrupted": False, "job": "txt2img" if total else "",
                      "job_count": snap["running_jobs"] + snap["queue_length"], "job_timestamp": "",
                      "job_no": 0, "sampling_step": step, "sampling_steps": total},
            "current_image": None, "textinfo": None}


class PngInfoRequest(BaseModel):
    image: str = Field(..., description="a base64 PNG")


@router.post("/png-info")
def png_info(body: PngInfoRequest, http: Request) -> dict[str, Any]:
    """The parameters text a PNG carries (ldm-app's or A1111's), its other text chunks, and the parsed fields."""
    raw = decode_base64(body.image, "image")
    try:
        text, items, parameters = read_png_text(raw)
    except PIL.Image.DecompressionBombError:
        raise ApiError(413, "image is too large: it declares more pixels than PIL's safety limit (a decompression "
                            "bomb); send the PNG as A1111 or ldm-app wrote it.", "image") from None
    except (OSError, SyntaxError):
        raise ApiError(422, "image is not a PNG PIL can read; send a base64-encoded PNG.", "image") from None
    except ValueError as err:  # a damaged chunk, or a parameters text too long to be A1111's
        raise ApiError(422, f"image: {str(err).rstrip('.')}.", "image") from None
    return {"info": text, "items": items, "parameters": parameters}
