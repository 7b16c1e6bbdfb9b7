"""OpenAI's images API: `POST /v1/images/generations` (JSON) and `POST /v1/images/edits` (multipart image + mask →
inpainting), so the official `openai` client works with `base_url="http://HOST:PORT/v1"`.

Only `response_format="b64_json"` is served (a URL would mean storing images). Besides OpenAI's fields, requests
may carry ldm-app's own (`negative_prompt`, `steps`, `guidance`, `eta`, `sampler`, `seed`, `loras`, `strength`),
which the client sends through `extra_body`.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
import PIL.Image
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from ..request import GenerationRequest as ImageRequest  # OpenAI's body below is named GenerationRequest
from .jobs import run_job
from .validation import ApiError, decode_image_bytes, image_request, parse_size

router = APIRouter(prefix="/v1/images", tags=["OpenAI"])


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # model, quality, style, user, ...: one model serves all

    prompt: str
    n: int = 1
    size: str | None = Field(None, description='"WIDTHxHEIGHT" or "auto" (the model\'s native size)')
    response_format: str = "b64_json"
    negative_prompt: str = ""
    steps: int | None = None  # None: the sampler's default (25; lcm: 4)
    guidance: float | None = None  # None: the sampler's default (5; lcm: 1)
    eta: float = 0.0
    sampler: str = "ddim"
    seed: int | None = None
    loras: dict[str, float] | None = None


def _check_format(response_format: str | None) -> None:
    if response_format not in (None, "b64_json"):
        raise ApiError(422, f"response_format={response_format!r}: this server returns images inline only; send "
                            "response_format=\"b64_json\".", "response_format")


async def _respond(http: Request, request: ImageRequest) -> dict[str, Any]:
    engine = http.app.state.engine
    images = await run_job(http, request)
    data = [{"b64_json": base64.b64encode(engine.png(image, engine.params(request, seed))).decode(),
             "revised_prompt": None} for image, seed in zip(images, request.seeds)]
    return {"created": int(time.time()), "data": data}


@router.post("/generations")
async def generations(body: GenerationRequest, http: Request) -> dict[str, Any]:
    """Text to image, `n` images of `size`; PNGs carry their parameters."""
    _check_format(body.response_format)
    engine, limits = http.app.state.engine, http.app.state.settings.limits
    width, height = parse_size(body.size, engine.default_size)
    request = image_request(engine, limits, prompt=body.prompt, negative_prompt=body.negative_prompt,
                            steps=body.steps, guidance=body.guidance, eta=body.eta, sampler=body.sampler,
                            seed=body.seed, width=width, height=height, n=body.n, loras=body.loras)
    return await _respond(http, request)


@router.post("/edits")
async def edits(http: Request) -> dict[str, Any]:
    """Inpainting: the mask's transparent pixels (OpenAI's convention) or, for a mask without alpha, its white
    pixels are repainted; without a mask, the image's own transparent pixels are. With neither, image to image."""
    limits = http.app.state.settings.limits
    try:
        form = await http.form(max_files=4, max_fields=64)  # image, mask and a dozen fields at most
    except (MultiPartException, HTTPException) as err:  # starlette's limits on parts (it raises them as a 400)
        detail = str(getattr(err, "detail", err))
        status = 413 if "maximum" in detail.lower() else 422
        raise ApiError(status, f"the multipart body was refused: {detail.rstrip('.')}; send the image, the mask "
                               "and the text fields only.") from None
    except Exception:  # noqa: BLE001  (python-multipart's parse errors have no common base class)
        raise ApiError(422, "the body is not multipart/form-data; send the image (and mask) as files.") from None
    image_file = form.get("image") or form.get("image[]")
    if not isinstance(image_file, UploadFile):
        raise ApiError(422, "image is missing; send it as a file field named 'image'.", "image")
    image = decode_image_bytes(await image_file.read(), "image", limits, keep_alpha=True)
    mask_file = form.get("mask")
    if mask_file is not None and not isinstance(mask_file, UploadFile):
        raise ApiError(422, "mask must be a file upload (a PNG); send it as a file field named 'mask'.", "mask")
    mask_source = decode_image_bytes(await mask_file.read(), "mask", limits, keep_alpha=True) if mask_file else image
    mask = repaint_mask(mask_source, explicit=mask_file is not None)
    if mask is not None and mask.size != image.size:
        raise ApiError(422, f"mask is {mask.size[0]}x{mask.size[1]} but image is {image.size[0]}x{image.size[1]}; "
                            "send a mask of the image's size.", "mask")
    _check_format(form.get("response_format"))
    engine = http.app.state.engine
    width, height = parse_size(_text(form, "size"), engine.default_size)
    prompt = _text(form, "prompt")
    if prompt is None:
        raise ApiError(422, "prompt is missing; send a form field 'prompt'.", "prompt")
    request = image_request(
        engine, limits, prompt=prompt, negative_prompt=_text(form, "negative_prompt") or "",
        steps=_number(form, "steps", int, None), guidance=_number(form, "guidance", float, None),
        eta=_number(form, "eta", float, 0.0), sampler=_text(form, "sampler") or "ddim",
        seed=_number(form, "seed", int, None), width=width, height=height, n=_number(form, "n", int, 1),
        image=image.convert("RGB") if image.mode == "RGBA" else image, mask=mask,
        strength=_number(form, "strength", float, 1.0 if mask is not None else 0.75))
    return await _respond(http, request)


def repaint_mask(source: PIL.Image.Image, explicit: bool) -> PIL.Image.Image | None:
    """White where to repaint: transparent pixels of an RGBA image; for an explicit mask without alpha, its
    white pixels (ldm-app's and A1111's convention). None: nothing marked (a plain image, no mask)."""
    if source.mode == "RGBA":
        alpha = np.asarray(source.getchannel("A"))
        if explicit or (alpha < 255).any():
            return PIL.Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))
    return source.convert("L") if explicit else None


def _text(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(422, f"{name} must be a text field, not a file.", name)
    return value


def _number(form: Any, name: str, kind: type, default: Any) -> Any:
    value = _text(form, name)
    if value in (None, ""):
        return default
    try:
        return kind(value)
    except ValueError:
        raise ApiError(422, f"{name}={value!r} is not {'an integer' if kind is int else 'a number'}.", name) from None
