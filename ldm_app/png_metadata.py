"""Generation parameters carried inside each PNG: an A1111-style `parameters` text chunk (read by most
image tools) and a JSON chunk (`ldm-app`) that `ldm-app generate --from` reads back exactly."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import PIL.PngImagePlugin

from .atomic import atomic_write
from .samplers import SAMPLERS

JSON_KEY = "ldm-app"


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    eta: float
    sampler: str
    seed: int
    width: int
    height: int
    model: str
    dtype: str = "auto"
    loras: list[str] = dataclasses.field(default_factory=list)


def a1111_text(p: GenerationParams) -> str:
    """The `parameters` text A1111's web UI writes: prompt, negative prompt, then `Key: value` pairs."""
    label = SAMPLERS[p.sampler][2] if p.sampler in SAMPLERS else p.sampler
    fields = [f"Steps: {p.steps}", f"Sampler: {label}", f"CFG scale: {p.guidance}", f"Seed: {p.seed}",
              f"Size: {p.width}x{p.height}", f"Model: {p.model}", f"Eta: {p.eta}"]
    if p.loras:
        fields.append(f"Lora: {', '.join(p.loras)}")
    return f"{p.prompt}\nNegative prompt: {p.negative_prompt}\n{', '.join(fields)}"


def save_png(image: PIL.Image.Image, path: Path, params: GenerationParams) -> None:
    """Write the PNG with both metadata chunks, atomically (a temp file in the same folder, then rename)."""
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_text(params))
    info.add_text(JSON_KEY, json.dumps(dataclasses.asdict(params)))
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_params(path: str | os.PathLike) -> GenerationParams:
    """The parameters an ldm-app PNG was made with."""
    try:
        with PIL.Image.open(path) as image:
            raw = image.info.get(JSON_KEY)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read {path} as an image ({err}); pass a PNG written by ldm-app generate.") from None
    if raw is None:
        raise ValueError(f"{path} carries no ldm-app parameters; pass a PNG written by ldm-app generate.")
    try:
        stored = json.loads(raw)
    except json.JSONDecodeError:
        stored = None
    fields = dataclasses.fields(GenerationParams)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if not isinstance(stored, dict) or name not in stored]
    if missing:
        raise ValueError(f"{path}'s ldm-app parameters are damaged (missing {', '.join(missing)}); "
                         "pass a PNG written by ldm-app generate.")
    return GenerationParams(**{f.name: stored[f.name] for f in fields if f.name in stored})
