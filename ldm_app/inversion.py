"""Real images into the model's noise space, and text-guided editing from there.

- DDIM inversion (Song et al. 2021, eq. 12 run backwards; Dhariwal & Nichol 2021): the deterministic map
  x_{t-1} → x_t with ε(x_{t-1}, t) ≈ ε(x_t, t). Exact enough at w = 1, but classifier-free guidance (w > 1)
  amplifies that approximation error, so sampling back at w > 1 drifts from the image.
- Null-text inversion (Mokady et al. 2022): keep the w = 1 trajectory as a pivot and optimise, per step, the
  unconditional embedding ∅_t so that guided sampling retraces it.
- Negative-prompt inversion (Miyake et al. 2023): use the source prompt's embedding as the unconditional one,
  so ε̂ = ε(x_t, c) + w · (ε(x_t, c) − ε(x_t, c)) = ε(x_t, c) retraces the w = 1 trajectory, no optimisation.
- Editing: sample from x_T with a target prompt, optionally with Prompt-to-Prompt attention injection
  (see `attention_control`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler, DDIMScheduler
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_write
from .attention_control import PromptToPromptProcessor, attention_processor, token_alignment
from .images import decode_image, preprocess
from .pipeline import LdmPipeline, OutputType, classifier_free_guidance
from .samplers import max_inference_steps

Method = Literal["ddim", "null-text", "negative-prompt"]
METHODS: tuple[str, ...] = get_args(Method)
METADATA_KEY = "ldm_app.inversion"


@dataclass
class Inversion:
    """A real image inverted into x_T, with what is needed to sample it back (and to edit it)."""

    latents: torch.Tensor  # (T+1, 1, C, h, w): the DDIM inversion trajectory x_0 (the image's latent) … x_T
    prompt: str  # the source prompt c the trajectory was computed with
    num_inference_steps: int  # T, DDIM steps
    guidance_scale: float  # w that reconstruction and editing sample with
    method: Method
    null_embeds: torch.Tensor | None = None  # (T, 1, L, D): null-text's optimised ∅_t, in sampling order
    model: str = ""  # the model it was made with, for the record (the CLI reuses it)
    original_size: tuple[int, int] | None = None  # (W, H) of the input, if it was resized to the model's size
    reconstruction: PIL.Image.Image | None = dataclasses.field(default=None, repr=False)  # not saved

    @property
    def x_T(self) -> torch.Tensor:
        return self.latents[-1]

    def save(self, path: str | os.PathLike) -> None:
        """Write safetensors (latents, null embeddings) with the rest as JSON metadata, atomically."""
        path = Path(path)
        tensors = {"latents": self.latents.detach().float().cpu().contiguous()}
        if self.null_embeds is not None:
            tensors["null_embeds"] = self.null_embeds.detach().float().cpu().contiguous()
        meta = {"prompt": self.prompt, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "method": self.method, "model": self.model,
                "original_size": self.original_size}
        with atomic_write(path) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Inversion":
        """Read a file written by `save` (safetensors only: nothing is unpickled)."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get(METADATA_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for truncated or foreign files
            raise ValueError(f"Cannot read {path} as safetensors ({err}); pass a file written by ldm-app "
                             "invert.") from None
        if meta is None:
            raise ValueError(f"{path} holds no inversion metadata; pass a file written by ldm-app invert.")
        try:
            meta = json.loads(meta)
            size = meta.pop("original_size", None)
            return cls(latents=tensors["latents"], null_embeds=tensors.get("null_embeds"),
                       original_size=tuple(size) if size else None, **meta)
        except (ValueError, TypeError, KeyError) as err:  # damaged JSON, missing or unknown fields
            raise ValueError(f"{path} has damaged inversion metadata ({type(err).__name__}: {err}); invert the "
                             "image again with ldm-app invert.") from None


# ----------------------------------------------------------------------------------------------------------
# Images


def prepare_image(pipe: LdmPipeline, image: PIL.Image.Image) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """Any PIL image → (1, 3, S, S) in [-1, 1] at the model's native size S (EXIF orientation applied, RGB,
    shorter side resized, center-cropped), and its original (W, H) if that changed it."""
    rgb = decode_image(image)
    if rgb is None:
        raise ValueError("The image cannot be decoded; pass a readable PIL image (PNG, JPEG, WebP, ...).")
    size = pipe.default_size
    pixels = preprocess(rgb, size)[None]
    return pixels, (None if rgb.size == (size, size) else rgb.size)


@torch.no_grad()
def vae_round_trip(pipe: LdmPipeline, pixels: torch.Tensor) -> torch.Tensor:
    """Decode(encode(x)) at the posterior mode: the best any inversion can reconstruct. [-1, 1] in and out."""
    return pipe.decode_latents(pipe.encode_image(pixels)).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------
# Inversion


def invert(pipe: LdmPipeline, image: PIL.Image.Image, prompt: str, method: Method = "ddim",
           num_inference_steps: int = 50, guidance_scale: float | None = None,
           generator: torch.Generator | None = None, **kwargs: Any) -> Inversion:
    """Invert `image` with the named method; `guidance_scale` defaults to 1 for DDIM and 5 otherwise.

    Extra keyword arguments go to `null_text_invert` (num_inner_steps, early_stop_epsilon, learning_rate).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown inversion method {method!r}; choose one of {', '.join(METHODS)}.")
    if kwargs and method != "null-text":
        raise ValueError(f"{', '.join(kwargs)} only apply to method='null-text'; leave them out for {method!r}.")
    limit = max_inference_steps(pipe.scheduler.config)
    if not 1 <= num_inference_steps <= limit:
        raise ValueError(f"{num_inference_steps} inversion steps; use 1 to {limit} (50 is typical).")
    w = guidance_scale if guidance_scale is not None else (1.0 if method == "ddim" else 5.0)
    fn = {"ddim": ddim_invert, "null-text": null_text_invert, "negative-prompt": negative_prompt_invert}[method]
    return fn(pipe, image, prompt, num_inference_steps, w, generator=generator, **kwargs)


@torch.no_grad()
def ddim_invert(pipe: LdmPipeline, image: PIL.Image.Image, prompt: str, num_inference_steps: int = 50,
                guidance_scale: float = 1.0, generator: torch.Generator | None = None) -> Inversion:
    """DDIM inversion at guidance w, and the reconstruction sampled back from x_T at the same w.

    `generator` given: x_0 is a sample of the VAE posterior q(z|x) drawn with it; else its mode.
    """
    x_0, original_size = _image_latents(pipe, image, generator)
    cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, True, "")
    latents = _ddim_trajectory(pipe, x_0, cond, uncond, num_inference_steps, guidance_scale)
    inversion = Inversion(latents, prompt, num_inference_steps, guidance_scale, "ddim", original_size=original_size)
    inversion.reconstruction = reconstruct(pipe, inversion)[0]
    return inversion


@torch.no_grad()
def negative_prompt_invert(pipe: LdmPipeline, image: PIL.Image.Image, prompt: str, num_inference_steps: int = 50,
                           guidance_scale: float = 5.0, generator: torch.Generator | None = None) -> Inversion:
    """Negative-prompt inversion: the w = 1 DDIM trajectory, sampled back at w with ∅ := c (no optimisation)."""
    x_0, original_size = _image_latents(pipe, image, generator)
    cond, _ = pipe.encode_prompt(prompt, pipe.device, 1, False)
    latents = _ddim_trajectory(pipe, x_0, cond, None, num_inference_steps, 1.0)
    inversion = Inversion(latents, prompt, num_inference_steps, guidance_scale, "negative-prompt",
                          original_size=original_size)
    inversion.reconstruction = reconstruct(pipe, inversion)[0]
    return inversion


def null_text_invert(pipe: LdmPipeline, image: PIL.Image.Image, prompt: str, num_inference_steps: int = 50,
                     guidance_scale: float = 5.0, num_inner_steps: int = 10, early_stop_epsilon: float = 1e-5,
                     learning_rate: float = 1e-2, generator: torch.Generator | None = None) -> Inversion:
    """Null-text inversion (Mokady et al. 2022, Algorithm 1): the w = 1 DDIM trajectory x*_0 … x*_T is the pivot;
    at each sampling step t, Adam tunes ∅_t so that the guided DDIM step from x̄_t lands on x*_{t-1}.

    A step's inner loop stops early once the loss is below `early_stop_epsilon`, relaxed linearly with the step
    as in the authors' code (0 turns early stopping off). Returns x_T, the per-step ∅_t and the reconstruction.
    """
    if guidance_scale <= 1:
        raise ValueError(f"guidance_scale={guidance_scale}: null-text inversion is for w > 1; at w ≤ 1 the null "
                         "embedding has no effect, so invert with the 'ddim' method.")
    if num_inner_steps < 1:
        raise ValueError(f"num_inner_steps={num_inner_steps}; use at least 1 (10 is the paper's).")
    unet, w = pipe.unet, guidance_scale
    with torch.no_grad():
        x_0, original_size = _image_latents(pipe, image, generator)
        cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, True, "")
        pivot = _ddim_trajectory(pipe, x_0, cond, None, num_inference_steps, 1.0)  # x*_0 … x*_T at w = 1
    scheduler = _sampler(pipe, num_inference_steps)
    null = uncond.float()  # ∅, optimised in fp32 even for an fp16 UNet
    x_t = pivot[-1]
    null_embeds = []
    with pipe.progress_bar(total=num_inference_steps * num_inner_steps) as progress:
        for i, t in enumerate(scheduler.timesteps):
            x_prev_target = pivot[-2 - i]  # x*_{t-1}
            with torch.no_grad():
                eps_cond = unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]
            null = null.detach().requires_grad_(True)
            # the authors' learning rate, 1e-2 · (1 − i/100) over 50 steps, decays linearly to half
            optimizer = torch.optim.Adam([null], lr=learning_rate * (1 - i / (2 * num_inference_steps)))
            for j in range(num_inner_steps):
                eps_uncond = unet(x_t, t, encoder_hidden_states=null.to(cond.dtype), return_dict=False)[0]
                eps = classifier_free_guidance(eps_uncond, eps_cond, w)
                x_prev = scheduler.step(eps, t, x_t, return_dict=False)[0]  # DDIM eq. 12 at η = 0, differentiable
                loss = F.mse_loss(x_prev.float(), x_prev_target.float())
                (null.grad,) = torch.autograd.grad(loss, [null])  # grads for ∅ only, none for the UNet weights
                optimizer.step()
                progress.update()
                if loss.item() < early_stop_epsilon * (1 + 2 * i):  # the authors' ε + 2e-5·i for ε = 1e-5
                    break
            progress.update(num_inner_steps - 1 - j)
            null = null.detach()
            null_embeds.append(null.to(cond.dtype, copy=True))  # a copy: the next step's Adam updates `null` in place
            with torch.no_grad():  # the guided step with the tuned ∅_t gives the next x̄_t
                eps_uncond = unet(x_t, t, encoder_hidden_states=null.to(cond.dtype), return_dict=False)[0]
                x_t = scheduler.step(classifier_free_guidance(eps_uncond, eps_cond, w), t, x_t, return_dict=False)[0]
    inversion = Inversion(pivot, prompt, num_inference_steps, guidance_scale, "null-text",
                          null_embeds=torch.stack(null_embeds), original_size=original_size)
    with torch.no_grad():
        inversion.reconstruction = pipe.image_processor.postprocess(pipe.decode_latents(x_t))[0]
    return inversion


# ----------------------------------------------------------------------------------------------------------
# Sampling back: reconstruction and editing


@torch.no_grad()
def reconstruct(pipe: LdmPipeline, inversion: Inversion, output_type: OutputType = "pil") -> Any:
    """Sample x_0 back from the inversion's x_T with its prompt, guidance and null embeddings (DDIM, η = 0).

    Returns what `LdmPipeline(...).images` would for `output_type` (a batch of one).
    """
    cond, _ = pipe.encode_prompt(inversion.prompt, pipe.device, 1, False)
    return _output(pipe, _sample(pipe, inversion, cond), output_type)


@torch.no_grad()
def edit(pipe: LdmPipeline, inversion: Inversion, target_prompt: str, cross_attention_steps: float = 0.8,
         self_attention_steps: float = 0.0, output_type: OutputType = "pil") -> Any:
    """Regenerate the inverted image with `target_prompt` in place of the source prompt.

    For the first `cross_attention_steps` fraction of steps the edited branch uses the source branch's
    cross-attention maps (Prompt-to-Prompt), and for the first `self_attention_steps` its self-attention maps;
    0 and 0 is a plain prompt swap. Returns what `LdmPipeline(...).images` would for `output_type`.
    """
    for name, value in (("cross_attention_steps", cross_attention_steps),
                        ("self_attention_steps", self_attention_steps)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name}={value} is a fraction of the steps; use a value in [0, 1] (e.g. 0.8).")
    cross_steps = int(cross_attention_steps * inversion.num_inference_steps)
    self_steps = int(self_attention_steps * inversion.num_inference_steps)
    if cross_steps == 0 and self_steps == 0:
        cond, _ = pipe.encode_prompt(target_prompt, pipe.device, 1, False)
        return _output(pipe, _sample(pipe, inversion, cond), output_type)
    # Both branches from x_T in one batch: [source, target]; the source branch feeds its maps to the target
    cond, _ = pipe.encode_prompt([inversion.prompt, target_prompt], pipe.device, 1, False)
    ids = pipe.tokenizer([inversion.prompt, target_prompt], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length).input_ids
    pairs = [(2, 3)] if inversion.guidance_scale > 1 else [(0, 1)]  # under CFG: edit the conditional half only
    processor = PromptToPromptProcessor(pairs, token_alignment(ids[0], ids[1]), cross_steps, self_steps)
    with attention_processor(pipe.unet, processor):
        latents = _sample(pipe, inversion, cond, processor)
    return _output(pipe, latents[1:], output_type)


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _image_latents(pipe: LdmPipeline, image: PIL.Image.Image,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """x_0: the VAE latent of the prepared image (posterior mode, or a sample when a generator is given)."""
    pixels, original_size = prepare_image(pipe, image)
    x_0 = pipe.encode_image(pixels, generator, sample=generator is not None)
    return x_0.to(pipe.unet.dtype), original_size


def _sampler(pipe: LdmPipeline, num_inference_steps: int) -> DDIMScheduler:
    """DDIM over the pipeline's noise schedule, whatever scheduler the pipeline samples with otherwise."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps}; use at least 1 step (50 is typical).")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=pipe.device)
    return scheduler


def _ddim_trajectory(pipe: LdmPipeline, x_0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                     num_inference_steps: int, guidance_scale: float) -> torch.Tensor:
    """x_0 … x_T by the inverse DDIM update; ε̂ is guided with `uncond` when w > 1. Returns (T+1, 1, C, h, w)."""
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(num_inference_steps, device=pipe.device)
    if not torch.equal(inverse.timesteps.flip(0), _sampler(pipe, num_inference_steps).timesteps):
        raise ValueError(f"timestep_spacing={pipe.scheduler.config.timestep_spacing!r} gives inverse timesteps that "
                         "DDIM sampling does not retrace; use a scheduler config with 'leading' or 'trailing' spacing.")
    # ascending timesteps: ε is evaluated at the next (noisier) timestep, ε(x_{t-1}, t), and the inverse step
    # solves DDIM's eq. 12 for x_t
    trajectory = _Trajectory(x_0)
    pipe.denoise(x_0, inverse.timesteps, cond, uncond, guidance_scale, scheduler=inverse, callbacks=[trajectory])
    return torch.stack(trajectory.latents)


class _Trajectory:
    """A `denoise` hook that keeps the latents after every step, after the starting ones."""

    def __init__(self, start: torch.Tensor):
        self.latents = [start]

    def __call__(self, pipe: LdmPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        self.latents.append(tensors["latents"])
        return {}


class _StepConditioning:
    """A `denoise` hook for sampling an inversion back: after step i, the unconditional embedding of step i + 1
    (null-text's per-step ∅_t) and Prompt-to-Prompt's step counter."""

    def __init__(self, unconds: torch.Tensor, batch: int, processor: PromptToPromptProcessor | None):
        self.unconds = unconds  # (T, 1, L, D), in sampling order
        self.batch = batch
        self.processor = processor

    def __call__(self, pipe: LdmPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        if self.processor is not None:
            self.processor.step = i + 1
        if i + 1 < len(self.unconds):
            return {"negative_prompt_embeds": self.unconds[i + 1].expand(self.batch, -1, -1)}
        return {}


def _sample(pipe: LdmPipeline, inversion: Inversion, cond: torch.Tensor,
            processor: PromptToPromptProcessor | None = None) -> torch.Tensor:
    """Guided DDIM (η = 0) from x_T for each prompt embedding in `cond` (B, L, D), with the inversion's
    unconditional embedding at every step. Returns x_0 (B, C, h, w)."""
    scheduler = _sampler(pipe, inversion.num_inference_steps)
    if inversion.latents.shape[0] != inversion.num_inference_steps + 1:
        raise ValueError(f"The inversion holds {inversion.latents.shape[0]} latents for "
                         f"{inversion.num_inference_steps} steps; it is corrupt, invert the image again.")
    size = pipe.unet.config.sample_size
    expected = (pipe.unet.config.in_channels, size, size)
    if tuple(inversion.x_T.shape[1:]) != expected:
        raise ValueError(f"The inversion's latents are {tuple(inversion.x_T.shape[1:])} but this model's are "
                         f"{expected}; use the model it was made with ({inversion.model or 'not recorded'}).")
    w, b = inversion.guidance_scale, cond.shape[0]
    if inversion.method == "null-text":
        if inversion.null_embeds is None or len(inversion.null_embeds) != inversion.num_inference_steps:
            raise ValueError("A null-text inversion needs one null embedding per step; invert the image again.")
        unconds = inversion.null_embeds.to(device=pipe.device, dtype=cond.dtype)
    else:  # Miyake et al.: ∅ := the source prompt's embedding; plain DDIM: the empty prompt's
        text = inversion.prompt if inversion.method == "negative-prompt" else ""
        unconds = pipe.encode_prompt(text, pipe.device, 1, False)[0].expand(len(scheduler.timesteps), -1, -1, -1)
    x_t = inversion.x_T.to(device=pipe.device, dtype=cond.dtype).expand(b, -1, -1, -1)
    if processor is not None:
        processor.step = 0
    hook = _StepConditioning(unconds, b, processor)
    return pipe.denoise(x_t, scheduler.timesteps, cond, unconds[0].expand(b, -1, -1), w, scheduler=scheduler,
                        callbacks=[hook])


def _output(pipe: LdmPipeline, latents: torch.Tensor, output_type: OutputType) -> Any:
    if output_type == "latent":
        return latents
    return pipe.image_processor.postprocess(pipe.decode_latents(latents), output_type=output_type)
