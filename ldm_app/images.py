"""Reading images as the model sees them: decode (EXIF orientation, any mode → RGB on white), then resize and
crop to a square tensor in [-1, 1]. Training, inference, inversion and the CLI all read images through here."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def decode_image(value: Any) -> PIL.Image.Image | None:
    """An RGB image (EXIF orientation applied, transparency composited on white), or None if undecodable.

    `value` is a PIL image, or a `datasets` image dict ({"bytes": ..., "path": ...})."""
    try:
        if isinstance(value, PIL.Image.Image):
            image = value
        elif value.get("bytes") is not None:
            image = PIL.Image.open(io.BytesIO(value["bytes"]))
        else:
            image = PIL.Image.open(value["path"])
        image.load()
        return to_rgb(PIL.ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError):
        return None


def read_image(path: str | Path) -> PIL.Image.Image:
    """The image file at `path` as RGB (see `decode_image`); a ValueError that says what to pass otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass an image file (PNG, JPEG, WebP, ...).")
    image = decode_image({"path": str(path), "bytes": None})
    if image is None:
        raise ValueError(f"{path} cannot be read as an image; pass a PNG, JPEG, WebP, ... file.")
    return image


def file_sha256(path: str | Path, digits: int = 16) -> str:
    """The start of a file's SHA-256: names an input image in PNG metadata, so a later run can tell it changed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:digits]


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any mode (RGBA, LA, P, L, I;16, CMYK, ...) → RGB; transparent pixels become white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = PIL.Image.fromarray((np.asarray(image, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: PIL.Image.Image, resolution: int, center_crop: bool = True, flip: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Resize the shorter side to `resolution`, crop a square, optionally flip → (3, R, R) in [-1, 1]."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         PIL.Image.Resampling.BICUBIC)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return x.flip(-1) if flip else x
