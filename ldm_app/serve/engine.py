"""The server's only door into the library: loading, one batched pipeline call, PNG bytes with metadata.

Everything the server needs from `LdmPipeline`, the samplers, LoRA loading and the PNG metadata goes through this
module, so that changes in the library touch one file here. Only the queue's worker thread calls `generate`.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from ..generation import activate_loras, generate_images, use_sampler
from ..inversion import edit, invert, reconstruct
from ..loading import dtype_name, load_pipeline, model_record, pick_device, pick_dtype
from ..lora_tags import split_lora_spec, split_lora_tags
from ..pipeline import LdmPipeline
from ..png_metadata import A1111_KEY, a1111_text, png_info, split_infotext
from ..png_metadata import lora_name as png_lora_name
from ..request import GenerationRequest
from ..samplers import SAMPLERS, max_inference_steps, sampler_from_a1111


class Interrupted(Exception):
    """Raised inside the denoising loop when every request of the running batch has gone away."""


@dataclass
class LoadedLora:
    path: str
    scale: float  # applied when a request names no LoRA


@dataclass
class Engine:
    """A loaded pipeline plus what the server announces about it (model name, LoRAs, samplers)."""

    pipe: LdmPipeline
    model_name: str = "default"
    dtype: str = "fp32"
    loras: dict[str, LoadedLora] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._base_scheduler_config = dict(self.pipe.scheduler.config)

    @property
    def adapters(self) -> dict[str, str]:
        """LoRA path (as requests name it) → its adapter on the pipeline."""
        return {lora.path: name for name, lora in self.loras.items()}

    # ------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def load(cls, model: str, loras: list[str], lora_dir: str | None, device: str, dtype: str,
             variant: str | None = None) -> "Engine":
        """The model and LoRAs the server offers; requests choose among these and can name no other file."""
        dev = pick_device(device)
        torch_dtype = pick_dtype(dtype, dev)
        pipe = load_pipeline(model, dev, torch_dtype, variant)
        pipe.set_progress_bar_config(disable=True)
        specs = [split_lora_spec(spec) for spec in loras]
        if lora_dir is not None:
            folder = Path(lora_dir).expanduser()
            if not folder.is_dir():
                raise ValueError(f"--lora-dir {lora_dir} is not a folder; pass a folder of LoRA .safetensors files.")
            specs += [(str(p), 0.0) for p in sorted(folder.glob("*.safetensors"))]
            specs += [(str(p.parent), 0.0) for p in sorted(folder.glob("*/pytorch_lora_weights.safetensors"))]
        loaded: dict[str, LoadedLora] = {}
        for path, scale in specs:
            name = lora_name(path, loaded)
            try:
                pipe.load_lora_weights(str(Path(path).expanduser()), adapter_name=name)
            except (ValueError, OSError, RuntimeError) as err:
                raise ValueError(f"Cannot load LoRA {path}: {str(err).strip().splitlines()[0][:300]}") from None
            local = Path(path).expanduser()  # recorded as --from needs it: an absolute folder, or the hub id as given
            loaded[name] = LoadedLora(str(local.resolve()) if local.exists() else path, scale)
        return cls(pipe, model_record(model), dtype_name(torch_dtype), loaded)  # as --from will need it: absolute folders

    # ------------------------------------------------------------------------------------------------------
    # What requests may ask for

    @property
    def default_size(self) -> int:
        return self.pipe.default_size

    @property
    def size_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def max_steps(self) -> int:
        return max_inference_steps(self._base_scheduler_config)

    @staticmethod
    def sampler_labels() -> dict[str, str]:
        """Our sampler name → the name A1111 gives it ("DPM++ 2M Karras": A1111's spelling before 1.9)."""
        return {name: entry[2] + (" Karras" if getattr(entry, "karras", False) else "")
                for name, entry in SAMPLERS.items()}

    def resolve_sampler(self, name: str, schedule_type: str | None = None) -> str:
        """Our name, or A1111's (any case; "Karras" as a suffix or as `schedule_type`) → our name; unknown names
        get a ValueError that lists the valid ones. Where two of ours share an A1111 name the first wins."""
        ours = name if name in SAMPLERS else sampler_from_a1111(name, schedule_type)
        if ours is None:
            valid = ", ".join(dict.fromkeys([*self.sampler_labels().values(), *SAMPLERS]))
            raise ValueError(f"Unknown sampler {name!r}; use one of: {valid}.")
        return ours

    def resolve_loras(self, prompt: str, requested: dict[str, float] | None) -> tuple[str, list[str]]:
        """The prompt without A1111's `<lora:name:weight>` tags, and the LoRAs to use ("PATH:SCALE", scale ≠ 0).

        Tags and `requested` name LoRAs loaded at start; naming none keeps the start-up scales.
        """
        prompt, tags = split_lora_tags(prompt)
        chosen = dict(tags) | (requested or {})
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in chosen.values()):
            raise ValueError("A LoRA scale is not a finite number; send numbers such as 0.8.")
        unknown = [name for name in chosen if name not in self.loras]
        if unknown:
            offered = ", ".join(self.loras) or "none (start the server with --lora or --lora-dir)"
            raise ValueError(f"Unknown LoRA {unknown[0]!r}; this server offers: {offered}.")
        if tags or requested is not None:
            scales = [(name, float(chosen.get(name, 0.0))) for name in self.loras]
        else:
            scales = [(name, lora.scale) for name, lora in self.loras.items()]
        return prompt, [f"{self.loras[name].path}:{scale:g}" for name, scale in scales if scale]

    @staticmethod
    def random_seed() -> int:
        return random.randrange(2**31)

    # ------------------------------------------------------------------------------------------------------
    # Running

    def generate(self, requests: list[GenerationRequest], max_batch: int,
                 on_step: Callable[[int, int], None] | None = None) -> list[list[PIL.Image.Image]]:
        """All images of `requests` (which share one `batch_key`, or are a single image request), in pipeline
        calls of at most `max_batch` images (`ldm_app.generation.generate_images`)."""
        return generate_images(self.pipe, requests, max_batch, self.adapters, on_step)

    def invert_and_edit(self, image: PIL.Image.Image, source_prompt: str, target_prompt: str, method: str,
                        steps: int, guidance: float, cross_attention_steps: float) -> list[PIL.Image.Image]:
        """Invert a real image with its prompt, then regenerate it with the target prompt (Prompt-to-Prompt):
        [reconstruction, edit]. The image is resized and center-cropped to the model's size."""
        use_sampler(self.pipe, "ddim")  # inversion is DDIM's
        if self.loras:
            activate_loras(self.pipe, self.resolve_loras("", None)[1], self.adapters)
        inversion = invert(self.pipe, image, source_prompt, method, steps, guidance,
                           generator=torch.Generator().manual_seed(0))
        edited = edit(self.pipe, inversion, target_prompt, cross_attention_steps=cross_attention_steps)
        recon = inversion.reconstruction if inversion.reconstruction is not None else reconstruct(self.pipe, inversion)[0]
        return [recon, edited[0]]

    # ------------------------------------------------------------------------------------------------------
    # Outputs

    def params(self, request: GenerationRequest, seed: int) -> GenerationRequest:
        """What the PNG of the image drawn from `seed` records, so that `ldm-app generate --from` can redo it."""
        return dataclasses.replace(request.for_image(seed), model=self.model_name, dtype=self.dtype)

    def png(self, image: PIL.Image.Image, params: GenerationRequest) -> bytes:
        """PNG bytes with the same two metadata chunks `ldm-app generate` writes."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=png_info(params))
        return buffer.getvalue()

    def infotext(self, params: GenerationRequest) -> str:
        return a1111_text(params)


def lora_name(path: str, taken: dict) -> str:
    """A LoRA's public name: the name its PNGs' `<lora:name:…>` tags use, made unique (and without the characters
    that end a tag); requests use it, never the path."""
    stem = re.sub(r"[:<>]", "_", png_lora_name(path.rstrip("/"))) or "lora"
    name, i = stem, 1
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    return name


def read_png_text(raw: bytes) -> tuple[str, dict[str, str], dict[str, Any]]:
    """A PNG's A1111 `parameters` text, its other text chunks, and the text parsed into fields the way A1111's
    png-info answers (`Prompt`, `Negative prompt`, `Steps`, ..., `Size-1`, `Size-2`)."""
    with PIL.Image.open(io.BytesIO(raw)) as image:
        chunks = {k: v for k, v in image.info.items() if isinstance(v, str)}
    text = chunks.pop(A1111_KEY, "")
    return text, chunks, parse_infotext(text) if text else {}


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's infotext as A1111's /png-info returns it: `Prompt`, `Negative prompt`, every `Key: value`, and the
    size split into `Size-1`/`Size-2`."""
    prompt, negative, fields = split_infotext(text)
    parsed: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative, **fields}
    if "x" in fields.get("Size", ""):
        parsed["Size-1"], parsed["Size-2"] = fields["Size"].split("x", 1)
    return parsed
