"""One generation request — what to draw, how, and how it was recorded — and the one place its values are checked.

Every door builds a `GenerationRequest`: the CLI from its options, `png_metadata` from a PNG's chunks (and writes
one back), the server from a JSON body or form, training from its validation prompts. `checked()` holds the rules
that need no model (types and ranges, the same messages on every door); `resolved(pipe)` fills in the model's
defaults (native size, the strength of image-to-image) and checks what depends on the model (size factor, schedule
length). `ldm_app.generation.generate_images` turns resolved requests into images.

The ranges that also bound the pipeline's own arguments (size, steps, guidance) are in `ldm_app.ranges`, so that
the pipeline's module, which every portable export ships (`ldm_app.hub.make_portable`), does not carry this one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .ranges import check_size, check_steps
from .samplers import SAMPLERS, max_inference_steps, sampler_defaults
from .sizes import plan_size

if TYPE_CHECKING:
    import PIL.Image

    from .pipeline import LdmPipeline

MAX_SEED = 2**63 - 1  # seeds are CPU generator seeds: 0 … 2^63 − 1
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # names users type → torch dtype names
DTYPE_NAMES = ("auto", *DTYPES)  # what a request may record (`auto`: fp16 on CUDA, fp32 elsewhere)
SIZE = re.compile(r"(\d+)x(\d+)")  # "WIDTHxHEIGHT", as A1111 writes sizes


@dataclass
class GenerationRequest:
    """`n` images of one prompt with one set of settings; image i is drawn from seed + i (A1111's rule)."""

    prompt: str  # the text prompt, without <lora:…> tags for the LoRAs in `loras`
    negative_prompt: str = ""  # what classifier-free guidance steers away from ("" = the unconditional ∅)
    # denoising steps of the whole schedule (image-to-image runs the last steps · strength); None: the sampler's
    # default (25; lcm: 4)
    steps: int | None = None
    guidance: float | None = None  # classifier-free guidance scale w (1 = off); None: the sampler's (5; lcm: 1)
    eta: float = 0.0  # DDIM's η (other samplers ignore it): 0 deterministic, 1 ≈ DDPM
    sampler: str | None = "ddim"  # a key of SAMPLERS; None keeps the pipeline's own scheduler (training grids)
    seed: int = 0  # the first image's seed
    width: int | None = None  # the images' size; None: the model's native size (filled in by `resolved`)
    height: int | None = None
    drawn_at: str | None = None  # "WxH" the model draws at when width × height is far above its native size, then
    # resizes up (`sizes.plan_size`); made again by `resolved`, never taken from outside
    n: int = 1  # images, seeds seed … seed + n − 1
    loras: list[str] = field(default_factory=list)  # "PATH[:SCALE]", as --lora takes them
    strength: float | None = None  # with an image: the fraction of the schedule that redraws it (None: 0.8, 1 inpainting)
    image: PIL.Image.Image | None = None  # image-to-image / inpainting input
    mask: PIL.Image.Image | None = None  # inpainting mask, white = repaint
    paste_back: bool = True  # inpainting: the input's pixels pasted back outside the mask
    mask_feather: int | None = None  # inpainting: the paste-back's feather in pixels (None: the VAE factor)
    # How the images were made, as a PNG records it for `ldm-app generate --from`
    model: str = "default"  # "default", a pipeline folder, a single file or a hub id
    dtype: str = "auto"  # the weights' dtype, one of DTYPE_NAMES
    image_path: str | None = None  # the input image's file (absolute path), and the start of its SHA-256
    image_sha256: str | None = None
    mask_path: str | None = None  # the mask's file (absolute path), and the start of its SHA-256
    mask_sha256: str | None = None

    def __post_init__(self) -> None:
        self.steps, self.guidance = sampler_defaults(self.sampler, self.steps, self.guidance)

    @property
    def draw_size(self) -> tuple[int | None, int | None]:
        """(width, height) the model draws at."""
        if self.drawn_at is None:
            return self.width, self.height
        width, height = self.drawn_at.split("x")
        return int(width), int(height)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    def for_image(self, seed: int) -> "GenerationRequest":
        """The request of one of its images (the seed it was drawn from): what that image's PNG records."""
        return dataclasses.replace(self, seed=seed, n=1)

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share one pipeline call (each image has its own prompt and seed); requests
        with an input image run alone."""
        if self.image is not None:
            return None
        return (self.draw_size, self.steps, self.sampler, self.guidance, self.eta, tuple(self.loras))

    def checked(self, names: dict[str, str] | None = None) -> "GenerationRequest":
        """This request if every value has the right type and range; else a ValueError naming the first bad one
        ("steps is 0, expected a whole number ≥ 1"). `names` renames fields in the message (a door's own names)."""
        for name, ok, expected in _field_rules(self):
            if not ok:
                value = repr(getattr(self, name))
                value = value if len(value) <= 40 else value[:37] + "..."
                raise ValueError(f"{(names or {}).get(name, name)} is {value}, expected {expected}")
        return self

    def resolved(self, pipe: LdmPipeline, max_steps: int | None = None) -> "GenerationRequest":
        """This request checked against the model that will run it, its defaults filled in: width and height (the
        model's native size), the size drawn at (`sizes.plan_size`), strength (0.8 for image-to-image, 1 for
        inpainting). `max_steps` lowers the schedule's own limit (a server's)."""
        self.checked()
        width = pipe.default_size if self.width is None else self.width
        height = pipe.default_size if self.height is None else self.height
        for name, size in (("width", width), ("height", height)):
            check_size(name, size, pipe.vae_scale_factor, pipe.default_size)
        limit = max_inference_steps(pipe.scheduler.config)
        if max_steps is not None and max_steps < limit:
            check_steps("steps", self.steps, max_steps, f"this server allows at most {max_steps} (--max-steps)")
        check_steps("steps", self.steps, limit)
        strength = pipe.check_image_inputs(self.image, self.mask, self.strength, self.mask_feather)
        drawn_at = plan_size(width, height, pipe.default_size, pipe.vae_scale_factor).drawn_at
        return dataclasses.replace(self, width=width, height=height, drawn_at=drawn_at, strength=strength)


def _field_rules(r: GenerationRequest) -> list[tuple[str, bool, str]]:
    """(field, whether its value is valid, what is expected) for every field of `r`."""
    return [
        ("prompt", _text(r.prompt), "a string of UTF-8 text"),
        ("negative_prompt", _text(r.negative_prompt), "a string of UTF-8 text"),
        ("steps", _integer(r.steps, 1), "a whole number ≥ 1"),
        ("guidance", _number(r.guidance) and r.guidance >= 0, "a number ≥ 0"),
        ("eta", _number(r.eta) and 0 <= r.eta <= 1, "a number from 0 to 1"),
        ("sampler", r.sampler is None or (isinstance(r.sampler, str) and r.sampler in SAMPLERS),
         f"one of {', '.join(SAMPLERS)}"),
        ("n", _integer(r.n, 1), "a whole number ≥ 1"),
        ("seed", _integer(r.seed, 0, MAX_SEED - (r.n - 1 if _integer(r.n, 1) else 0)),
         f"a whole number from 0 to {MAX_SEED - (r.n - 1 if _integer(r.n, 1) else 0)}"),
        ("width", r.width is None or _integer(r.width, 1), "a whole number ≥ 1"),
        ("height", r.height is None or _integer(r.height, 1), "a whole number ≥ 1"),
        ("drawn_at", r.drawn_at is None or (isinstance(r.drawn_at, str) and SIZE.fullmatch(r.drawn_at) is not None),
         "WIDTHxHEIGHT"),
        ("loras", isinstance(r.loras, list) and all(isinstance(s, str) for s in r.loras), "a list of LoRA paths"),
        ("strength", r.strength is None or (_number(r.strength) and 0 <= r.strength <= 1), "a number from 0 to 1"),
        ("paste_back", isinstance(r.paste_back, bool), "true or false"),
        ("mask_feather", r.mask_feather is None or _integer(r.mask_feather, 0), "a whole number ≥ 0"),
        ("model", isinstance(r.model, str) and r.model != "", "a model folder, hub id or 'default'"),
        ("dtype", isinstance(r.dtype, str) and r.dtype in DTYPE_NAMES, f"one of {', '.join(DTYPE_NAMES)}"),
        ("image_path", r.image_path is None or isinstance(r.image_path, str), "the input image's path"),
        ("image_sha256", r.image_sha256 is None or isinstance(r.image_sha256, str), "a hex digest"),
        ("mask_path", r.mask_path is None or isinstance(r.mask_path, str), "the mask's path"),
        ("mask_sha256", r.mask_sha256 is None or isinstance(r.mask_sha256, str), "a hex digest"),
    ]


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _text(x: Any) -> bool:
    """A string without lone surrogates (JSON's "\\ud800"): text a tokenizer and a PNG can take."""
    return isinstance(x, str) and x.encode("utf-8", "ignore").decode("utf-8") == x


def _integer(x: Any, low: int, high: int | None = None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and low <= x and (high is None or x <= high)
