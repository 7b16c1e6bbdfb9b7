"""The server's only door into the library: loading, one batched pipeline call, PNG bytes with metadata.

Everything the server needs from `LdmPipeline`, the samplers, LoRA loading and the PNG metadata goes through this
module, so that changes in the library touch one file here. Only the queue's worker thread calls `generate`.
"""

from __future__ import annotations

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

from ..lora import split_lora_spec, split_lora_tags
from ..pipeline import LdmPipeline
from ..png_metadata import A1111_KEY, GenerationParams, a1111_text, png_info, split_infotext
from ..png_metadata import lora_name as png_lora_name
from ..samplers import SAMPLERS, make_scheduler, max_inference_steps, sampler_from_a1111


class Interrupted(Exception):
    """Raised inside the denoising loop when every request of the running batch has gone away."""


@dataclass
class ImageRequest:
    """One request for `n` images with the same settings; seeds are `seed`, `seed + 1`, ... (A1111's rule)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 5.0
    eta: float = 0.0
    sampler: str = "ddim"
    seed: int = 0
    width: int = 64  # the images' size
    height: int = 64
    drawn: tuple[int, int] | None = None  # (width, height) the model draws at when smaller (sizes.py), resized up
    n: int = 1
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, scale) for every loaded LoRA, in load order
    image: PIL.Image.Image | None = None  # img2img / inpainting input, already at width × height
    mask: PIL.Image.Image | None = None  # white = repaint
    strength: float = 0.75  # SDEdit's fraction of the schedule that is re-noised

    def batch_key(self) -> tuple | None:
        """Requests with equal keys share one pipeline call; image requests run alone (each has its own input)."""
        if self.image is not None:
            return None
        return (self.draw_size, self.steps, self.sampler, self.guidance, self.eta, self.loras)

    @property
    def draw_size(self) -> tuple[int, int]:
        return self.drawn or (self.width, self.height)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]


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
        self._schedulers: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def load(cls, model: str, loras: list[str], lora_dir: str | None, device: str, dtype: str,
             variant: str | None = None) -> "Engine":
        """The model and LoRAs the server offers; requests choose among these and can name no other file."""
        from ..loading import dtype_name, load_pipeline, model_record, pick_device, pick_dtype

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

    def resolve_loras(self, prompt: str, requested: dict[str, float] | None) -> tuple[str, tuple]:
        """The prompt without A1111's `<lora:name:weight>` tags, and the scale of every loaded LoRA.

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
            scales = tuple((name, float(chosen.get(name, 0.0))) for name in self.loras)
        else:
            scales = tuple((name, lora.scale) for name, lora in self.loras.items())
        return prompt, scales

    @staticmethod
    def random_seed() -> int:
        return random.randrange(2**31)

    # ------------------------------------------------------------------------------------------------------
    # Running

    def generate(self, requests: list[ImageRequest], max_batch: int,
                 on_step: Callable[[int, int], None] | None = None) -> list[list[PIL.Image.Image]]:
        """All images of `requests` (which share one `batch_key`, or are a single image request), in pipeline
        calls of at most `max_batch` images. Image j of a request is drawn with its own CPU generator seeded
        `seed + j`, so it is the same picture whichever batch it lands in."""
        first = requests[0]
        self._configure(first)
        items = [(r, s) for r in requests for s in r.seeds]
        chunks = [items[i:i + max_batch] for i in range(0, len(items), max_batch)]
        steps = max(1, int(first.steps * first.strength)) if first.image is not None else first.steps
        total = steps * len(chunks)
        images: list[PIL.Image.Image] = []
        width, height = first.draw_size
        for c, chunk in enumerate(chunks):
            def callback(pipe: LdmPipeline, i: int, t: Any, tensors: dict, c: int = c) -> dict:
                if on_step is not None:
                    on_step(min(total, c * steps + i + 1), total)
                return {}

            kwargs: dict[str, Any] = {}
            if first.image is not None:
                kwargs = {"image": [first.image] * len(chunk), "strength": first.strength}
                if first.mask is not None:
                    kwargs["mask_image"] = [first.mask] * len(chunk)
            images += self.pipe(
                [r.prompt for r, _ in chunk], negative_prompt=[r.negative_prompt for r, _ in chunk],
                height=height, width=width, num_inference_steps=first.steps,
                guidance_scale=first.guidance, eta=first.eta, callback_on_step_end=callback,
                generator=[torch.Generator().manual_seed(s) for _, s in chunk], **kwargs).images
        out, start = [], 0
        for r in requests:  # each to its own size (requests drawn at one size may ask for different ones)
            out.append([image.resize((r.width, r.height), PIL.Image.Resampling.LANCZOS) if r.drawn else image
                        for image in images[start:start + r.n]])
            start += r.n
        return out

    def invert_and_edit(self, image: PIL.Image.Image, source_prompt: str, target_prompt: str, method: str,
                        steps: int, guidance: float, cross_attention_steps: float) -> list[PIL.Image.Image]:
        """Invert a real image with its prompt, then regenerate it with the target prompt (Prompt-to-Prompt):
        [reconstruction, edit]. The image is resized and center-cropped to the model's size."""
        from ..inversion import edit, invert, reconstruct

        self.pipe.scheduler = make_scheduler("ddim", self._base_scheduler_config)  # inversion is DDIM's
        if self.loras:
            self.pipe.set_adapters(list(self.loras), [lora.scale for lora in self.loras.values()])
        inversion = invert(self.pipe, image, source_prompt, method, steps, guidance,
                           generator=torch.Generator().manual_seed(0))
        edited = edit(self.pipe, inversion, target_prompt, cross_attention_steps=cross_attention_steps)
        recon = inversion.reconstruction if inversion.reconstruction is not None else reconstruct(self.pipe, inversion)[0]
        return [recon, edited[0]]

    def _configure(self, request: ImageRequest) -> None:
        """The request's sampler and LoRA scales on the shared pipeline (the worker thread owns it)."""
        if request.sampler not in self._schedulers:
            self._schedulers[request.sampler] = make_scheduler(request.sampler, self._base_scheduler_config)
        self.pipe.scheduler = self._schedulers[request.sampler]
        if self.loras:  # only the LoRAs in use: peft runs every active adapter's branch, even at scale 0
            active = [(name, scale) for name, scale in request.loras if scale]
            if active:
                self.pipe.enable_lora()
                self.pipe.set_adapters([name for name, _ in active], [scale for _, scale in active])
            else:
                self.pipe.disable_lora()

    # ------------------------------------------------------------------------------------------------------
    # Outputs

    def params(self, request: ImageRequest, seed: int) -> GenerationParams:
        """What the PNG records, so that `ldm-app generate --from` can redo it."""
        loras = [f"{self.loras[name].path}:{scale:g}" for name, scale in request.loras if scale]
        return GenerationParams(prompt=request.prompt, negative_prompt=request.negative_prompt, steps=request.steps,
                                guidance=request.guidance, eta=request.eta, sampler=request.sampler, seed=seed,
                                width=request.width, height=request.height, model=self.model_name, dtype=self.dtype,
                                loras=loras, strength=request.strength if request.image is not None else None,
                                drawn_at="{}x{}".format(*request.drawn) if request.drawn else None)

    def png(self, image: PIL.Image.Image, params: GenerationParams) -> bytes:
        """PNG bytes with the same two metadata chunks `ldm-app generate` writes."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=png_info(params))
        return buffer.getvalue()

    def infotext(self, params: GenerationParams) -> str:
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
