"""Turning what a client sent into a `GenerationRequest`, or into a 4xx that says what to fix.

Both APIs and the UI come through here. The request's own ranges are checked where every door checks them
(`GenerationRequest.checked` and `.resolved`, with the CLI's messages); this module adds the server's limits
(--max-* flags), the names it offers (LoRAs, samplers) and the decoding of uploaded images.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import re

import PIL.Image

from ..images import to_rgb
from ..inversion import METHODS
from ..request import GenerationRequest
from .engine import Engine
from .settings import Limits

API_NAMES = {"guidance": "guidance/cfg_scale", "strength": "denoising_strength"}  # the field names clients send
MAX_GUIDANCE = 100  # far past any useful scale; keeps a typo from reaching the model


class ApiError(Exception):
    """A request the server will not run: HTTP `status`, a message that says how to fix it, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def parse_size(size: str | None, default: int) -> tuple[int, int]:
    """OpenAI's "WIDTHxHEIGHT" (or "auto"/None for the model's native size) → (width, height)."""
    if size in (None, "", "auto"):
        return default, default
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ApiError(422, f"size={size!r} is not WIDTHxHEIGHT; send e.g. \"{default}x{default}\" or \"auto\".",
                       "size") from None
    return width, height


def image_request(engine: Engine, limits: Limits, *, prompt: str, negative_prompt: str = "",
                  steps: int | None = None, guidance: float | None = None, eta: float = 0.0, sampler: str = "ddim", seed: int | None = None,
                  width: int | None = None, height: int | None = None, n: int = 1,
                  loras: dict[str, float] | None = None, image: PIL.Image.Image | None = None,
                  mask: PIL.Image.Image | None = None, strength: float = 0.75) -> GenerationRequest:
    """Check every field against the model and the server's limits; input images are resized to the size drawn
    (`sizes.plan_size`: width × height, or the native size for sizes far above it)."""
    # 1. Text
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not is_utf8(text):
            raise ApiError(422, f"{name} holds a lone surrogate (such as \"\\ud800\"), which is not text; send "
                                "UTF-8 text (a JSON \\u escape must pair a high and a low surrogate).", name)
        if len(text) > limits.max_prompt_chars:
            raise ApiError(422, f"{name} has {len(text)} characters; the server accepts at most "
                                f"{limits.max_prompt_chars} (--max-prompt-chars).", name)
    try:
        prompt, lora_specs = engine.resolve_loras(prompt, loras)
    except ValueError as err:
        raise ApiError(422, str(err), "loras") from None
    try:
        sampler = engine.resolve_sampler(sampler)
    except ValueError as err:
        raise ApiError(422, str(err), "sampler") from None

    # 2. The server's limits
    if isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance > MAX_GUIDANCE:
        raise ApiError(422, f"guidance/cfg_scale={guidance}; use a number from 0 to {MAX_GUIDANCE} (1 = off, 5 is "
                            "typical).", "cfg_scale")
    if not 1 <= n <= limits.max_images:
        raise ApiError(422, f"{n} images requested; use 1 to {limits.max_images} per request (--max-images).", "n")
    if seed is None or seed == -1:
        seed = engine.random_seed()
    if mask is not None and image is None:
        raise ApiError(422, "a mask was sent without an image; send the image to inpaint too.", "mask")

    # 3. The request's own ranges and the model's (the size drawn at: `sizes.plan_size`), as on every door
    request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                eta=eta, sampler=sampler, seed=seed, width=width, height=height, n=n,
                                loras=lora_specs, strength=strength if image is not None else None, image=image,
                                mask=mask)
    try:
        request = request.checked(API_NAMES)
        width = engine.default_size if width is None else width
        height = engine.default_size if height is None else height
        if width * height > limits.max_pixels:
            raise ApiError(422, f"{width}x{height} is {width * height} pixels; the server allows at most "
                                f"{limits.max_pixels} per image (--max-pixels).", "width")
        request = request.resolved(engine.pipe, max_steps=limits.max_steps)
    except ValueError as err:
        field = re.match(r"[\w/]+", str(err))
        raise ApiError(422, f"{str(err).rstrip('.')}.", field.group(0) if field else None) from None

    # 4. Input image and mask, at the size drawn
    draw_size = request.draw_size
    if image is not None:
        image = image.resize(draw_size, PIL.Image.Resampling.LANCZOS)
    if mask is not None:
        mask = mask.convert("L").resize(draw_size, PIL.Image.Resampling.NEAREST)
        if mask.getextrema()[1] < 128:
            raise ApiError(422, "the mask is all black, so there is nothing to repaint; paint the area to change "
                                "white.", "mask")
    return dataclasses.replace(request, image=image, mask=mask)


def is_utf8(text: str) -> bool:
    """False for strings with lone surrogates: JSON's "\\ud800" decodes to one, and neither the tokenizer nor
    the PNG writer can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_image_bytes(raw: bytes, field: str, limits: Limits, keep_alpha: bool = False) -> PIL.Image.Image:
    """An uploaded image as RGB (or RGBA with `keep_alpha`); a 4xx for non-images and oversized images."""
    try:
        image = PIL.Image.open(io.BytesIO(raw))
        w, h = image.size
        if w * h > 4 * limits.max_pixels:  # checked before decoding: a small file can expand to gigabytes
            raise ApiError(413, f"{field} is too large ({w}x{h}); send an image of at most {4 * limits.max_pixels} pixels.",
                           field)
        image.load()
    except ApiError:
        raise
    except PIL.Image.DecompressionBombError:
        raise ApiError(413, f"{field} is too large: it declares more pixels than PIL's safety limit; send an image "
                            f"of at most {4 * limits.max_pixels} pixels.", field) from None
    except (OSError, ValueError, SyntaxError):
        raise ApiError(422, f"{field} is not an image PIL can read; send a PNG, JPEG or WebP.", field) from None
    if keep_alpha and "A" in image.getbands():
        return image.convert("RGBA")
    return to_rgb(image)


def decode_base64(value: str, field: str) -> bytes:
    """Base64 with or without a `data:image/...;base64,` prefix (A1111 accepts both)."""
    if not isinstance(value, str) or not value:
        raise ApiError(422, f"{field} is empty; send a base64-encoded PNG or JPEG.", field)
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field} is not valid base64; send the image file's bytes base64-encoded.",
                       field) from None


def decode_base64_image(value: str, field: str, limits: Limits, keep_alpha: bool = False) -> PIL.Image.Image:
    return decode_image_bytes(decode_base64(value, field), field, limits, keep_alpha)


def a1111_mask(image: PIL.Image.Image) -> PIL.Image.Image:
    """A mask as A1111 reads one (`create_binary_mask`): its alpha channel where it has transparent pixels (strokes
    on a transparent layer), else its brightness. White = repaint."""
    if "A" in image.getbands() and image.getextrema()[-1] != (255, 255):
        return image.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    return image.convert("L")


def check_edit(engine: Engine, limits: Limits, *, source: str, target: str, method: str, steps: int,
               guidance: float, cross_attention: float) -> None:
    """Invert & edit's fields (the UI's fifth door), checked against the same limits as `image_request`."""
    for name, text in (("source prompt", source), ("target prompt", target)):
        if not isinstance(text, str) or not text.strip():
            raise ApiError(422, "Describe the image (source prompt) and what it should become (target prompt).", name)
        if len(text) > limits.max_prompt_chars:
            raise ApiError(422, f"The {name} has {len(text)} characters; the server accepts at most "
                                f"{limits.max_prompt_chars} (--max-prompt-chars).", name)
    if method not in METHODS:
        raise ApiError(422, f"inversion={method!r}; use one of {', '.join(METHODS)}.", "method")
    max_steps = min(limits.max_steps, engine.max_steps)
    if not 2 <= steps <= max_steps:
        raise ApiError(422, f"steps={steps}; use 2 to {max_steps} (25 is typical).", "steps")
    if not math.isfinite(guidance) or not 0 <= guidance <= 100:
        raise ApiError(422, f"guidance={guidance}; use a number from 0 to 100 (5 is typical).", "guidance")
    if not math.isfinite(cross_attention) or not 0 <= cross_attention <= 1:
        raise ApiError(422, f"cross-attention injection={cross_attention}; use a number from 0 to 1.", "cross")
