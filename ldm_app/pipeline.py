"""LdmPipeline: latent diffusion with classifier-free guidance — text-to-image, image-to-image, inpainting.

Text → CLIP hidden states; noise x_T ~ N(0, I) in VAE latent space (or an input image's latents noised part-way,
SDEdit); the scheduler's reverse process (DDIM by default, any diffusers scheduler swaps in) denoises it with the
UNet in one loop (`LdmPipeline.denoise`, shared with inversion and editing); the VAE decodes x_0.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from .images import decode_image
from .pipeline_loaders import DEFAULT_MODEL_DIR, LdmLoadersMixin, cast_quietly  # noqa: F401 (re-exported)
from .ranges import check_guidance, check_size, check_steps
from .samplers import max_inference_steps
from .unet import LdmUNet

logger = logging.get_logger(__name__)

OutputType = Literal["pil", "np", "pt", "latent"]
ImageInput = PIL.Image.Image | list[PIL.Image.Image]
StepCallback = Callable[["LdmPipeline", int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class LdmPipelineOutput(ImagePipelineOutput):
    """The images, and what a caller needs to record how they were made (PNG metadata, `--from`)."""

    strength: float | None = None  # from an image: the strength used, its default filled in; None for text-to-image
    denoising_steps: int | None = None  # from an image: the steps actually run, int(num_inference_steps · strength)
    input_size: tuple[int, int] | None = None  # from an image: the (first) input's (W, H) before it was fitted


def classifier_free_guidance(noise_uncond: torch.Tensor, noise_text: torch.Tensor,
                             guidance_scale: float) -> torch.Tensor:
    """ε̂ = ε(x_t, ∅) + w · (ε(x_t, c) − ε(x_t, ∅)) (Ho & Salimans 2022); the one place the formula is written."""
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


class LdmPipeline(LdmLoadersMixin, DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """VAE + CLIP text encoder + UNet (`LdmUNet` or `UNet2DConditionModel`) + scheduler.

    `pipe("a cat").images[0]` samples an image; `pipe("a cat", image=photo, strength=0.6)` redraws a picture
    (SDEdit); `pipe("a cat", image=photo, mask_image=mask)` repaints the mask's white region. `guidance_scale` > 1
    turns on classifier-free guidance, both halves in one batched UNet call (`denoise`).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: LdmUNet | UNet2DConditionModel,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # bicubic, as `ldm_app.images.preprocess` resizes training and inversion inputs
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic",
                                                do_normalize=False, do_binarize=True, do_convert_grayscale=True)

    # ------------------------------------------------------------------------------------------------------
    # Stages

    @property
    def default_size(self) -> int:
        """Native image size: the UNet's latent size times the VAE's down-sampling factor."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def check_inputs(self, prompt: str | list[str], negative_prompt: str | list[str] | None, height: int,
                     width: int, num_inference_steps: int, guidance_scale: float) -> None:
        """Reject bad arguments with a message that says how to fix them."""
        if not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}.")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt is an empty list; pass at least one prompt.")
        if isinstance(negative_prompt, list) and len(negative_prompt) != (len(prompt) if isinstance(prompt, list) else 1):
            n = len(prompt) if isinstance(prompt, list) else 1
            raise ValueError(f"{len(negative_prompt)} negative prompts for {n} prompts; pass one negative prompt per "
                             "prompt, or a single string for all.")
        for name, size in (("height", height), ("width", width)):
            check_size(name, size, self.vae_scale_factor, self.default_size)
        check_steps("num_inference_steps", num_inference_steps, max_inference_steps(self.scheduler.config))
        check_guidance("guidance_scale", guidance_scale)

    @property
    def is_inpainting_unet(self) -> bool:
        """Whether the UNet takes the mask and the masked image's latents next to the latents (SD-inpainting's 9)."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    def check_image_inputs(self, image: ImageInput | None, mask_image: ImageInput | None, strength: float | None,
                           mask_feather: int | None) -> float | None:
        """Reject image-to-image and inpainting arguments that cannot work; return the strength to use (diffusers'
        defaults: 0.8 for image-to-image, 1 for inpainting), or None for text-to-image."""
        in_channels, inpainting_unet = self.unet.config.in_channels, self.is_inpainting_unet
        if image is None:
            if mask_image is not None or strength is not None:
                raise ValueError(f"{'mask_image' if mask_image is not None else 'strength'} needs an input image; "
                                 "pass image= as well, or leave it out for text-to-image.")
            if inpainting_unet:
                raise ValueError(f"This UNet takes {in_channels} input channels: it is an inpainting model; pass "
                                 "image= and mask_image=.")
            return None
        if mask_image is None and inpainting_unet:
            raise ValueError("This UNet is an inpainting model; pass mask_image= (white = repaint; all white to "
                             "redraw everything).")
        if mask_image is not None and not inpainting_unet and in_channels != self.vae.config.latent_channels:
            raise ValueError(f"This UNet takes {in_channels} input channels; inpainting needs an ordinary UNet "
                             f"({self.vae.config.latent_channels}) or an inpainting one "
                             f"({2 * self.vae.config.latent_channels + 1}).")
        strength = (0.8 if mask_image is None else 1.0) if strength is None else strength
        if not 0 <= strength <= 1:
            raise ValueError(f"strength={strength}; use a value in [0, 1]: the fraction of the schedule that redraws "
                             "the input (0 keeps it, 1 ignores it, 0.5–0.8 is typical).")
        if mask_feather is not None and mask_feather < 0:
            raise ValueError(f"mask_feather={mask_feather}; use 0 (a hard edge) or more pixels.")
        return strength

    def dropped_tokens(self, prompt: str) -> int:
        """How many of the prompt's tokens lie beyond the text encoder's limit (the model never sees them)."""
        return max(0, len(self.tokenizer(prompt, verbose=False).input_ids) - self.tokenizer.model_max_length)

    def _embed(self, texts: list[str], device: torch.device) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        dropped = max(self.dropped_tokens(text) for text in texts)
        if dropped > 0:
            logger.warning(f"Prompt truncated: {dropped} token(s) beyond the text encoder's limit of "
                           f"{self.tokenizer.model_max_length} were dropped.")
        mask = tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]  # (B, T, D)
        return hidden.to(dtype=self.text_encoder.dtype, device=device)

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text encoder hidden states for the prompts, each repeated `num_images_per_prompt` times, and for
        the negative prompts (empty prompt = the unconditional ∅ of classifier-free guidance)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompt_embeds = self._embed(prompts, device).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
        negative_embeds = self._embed(negatives, device).repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_embeds

    def prepare_noise(
        self,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ε ~ N(0, I) at latent resolution (or the given `latents`, checked); one generator per image gives
        per-image reproducibility. Scaled by σ_init it is x_T; added to an image's latents, SDEdit's start."""
        shape = (batch_size, self.vae.config.latent_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for {batch_size} images; pass one generator per image "
                             "(prompts × num_images_per_prompt) or a single generator.")
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if latents.shape != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for this size and batch.")
        return latents.to(device=device, dtype=dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode of latents in the UNet's (scaled) space → images in [-1, 1], (B, 3, H, W)."""
        latents = latents / self.vae.config.scaling_factor
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    def encode_image(self, images: torch.Tensor, generator: torch.Generator | None = None,
                     sample: bool = False) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents (posterior mode, or a sample from q(z|x) if `sample`)."""
        posterior = self.vae.encode(images.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.vae.config.scaling_factor

    def _step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None, eta: float) -> dict[str, Any]:
        """η (DDIM's stochasticity) and the generator, for schedulers whose `step` accepts them."""
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    # ------------------------------------------------------------------------------------------------------
    # Starting from an image (SDEdit) and inpainting

    def get_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The tail of the schedule that SDEdit runs: its last int(num_inference_steps · strength) steps (Meng et
        al. 2022: noise the input to t_0 = strength · T, then denoise). Call after `scheduler.set_timesteps`."""
        t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        begin = t_start * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):  # schedulers that track their step index start mid-way
            self.scheduler.set_begin_index(begin)
        return self.scheduler.timesteps[begin:]

    def preprocess_images(self, image: ImageInput, mask_image: ImageInput | None, height: int,
                          width: int) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Input image(s) → (N, 3, H, W) in [-1, 1]; mask(s) → (N, 1, H, W), 1 = repaint; the first input's (W, H).

        EXIF orientation is applied and an image's transparency composited on white (`ldm_app.images.decode_image`);
        a mask's alpha channel is ignored. An input of another size or shape is resized to cover height × width and
        center-cropped, its mask the same way.
        """
        images = self._as_images(image, "image")
        pixels = self.image_processor.preprocess(images, height, width, resize_mode="crop")
        if mask_image is None:
            return pixels, None, images[0].size
        masks = self._as_images(mask_image, "mask_image")
        if len(masks) != len(images):
            raise ValueError(f"{len(masks)} masks for {len(images)} images; pass one mask per image.")
        for img, msk in zip(images, masks):
            if msk.size != img.size:
                raise ValueError(f"mask_image is {msk.size[0]}x{msk.size[1]} but the image is {img.size[0]}x"
                                 f"{img.size[1]}; pass a mask of the image's size (white = repaint).")
        mask = self.mask_processor.preprocess(masks, height, width, resize_mode="crop")
        if not mask.flatten(1).any(1).all():
            raise ValueError(f"mask_image is black everywhere (at {width}x{height}): nothing to repaint. Paint the "
                             "region to regenerate white, or leave mask_image out for image-to-image.")
        return pixels, mask, images[0].size

    @staticmethod
    def _as_images(value: Any, name: str) -> list[PIL.Image.Image]:
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, PIL.Image.Image) for v in values):
            kind = type(value).__name__ if not isinstance(value, (list, tuple)) else "a list of " + ", ".join(
                sorted({type(v).__name__ for v in values}) or ["nothing"])
            raise ValueError(f"{name} must be a PIL image or a list of them, got {kind}; read a file with "
                             "ldm_app.images.read_image.")
        if name == "mask_image":  # a mask's alpha is ignored, as diffusers and A1111 do: strokes on transparent black
            values = [v.convert("RGBA").convert("RGB") if _has_alpha(v) else v for v in values]
        images = [decode_image(v) for v in values]
        if any(im is None for im in images):
            raise ValueError(f"{name} cannot be decoded; pass a readable image (PNG, JPEG, WebP, ...).")
        return images

    def prepare_image_latents(self, pixels: torch.Tensor, batch_size: int, num_images_per_prompt: int,
                              generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        """Scaled latents of the input images, one per output: a sample of q(z|x) drawn with `generator`, as
        diffusers' image pipelines draw it (with a list, each output's own generator draws its sample)."""
        total = batch_size * num_images_per_prompt
        if pixels.shape[0] not in (1, batch_size):
            raise ValueError(f"{pixels.shape[0]} images for {batch_size} prompts; pass one image, or one per prompt.")
        pixels = pixels.to(device=self._execution_device)
        if isinstance(generator, list):
            pixels = _per_output(pixels, total, num_images_per_prompt)
            return self.encode_image(pixels, generator, sample=True)
        return _per_output(self.encode_image(pixels, generator, sample=True), total, num_images_per_prompt)

    # ------------------------------------------------------------------------------------------------------
    # Sampling

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
        scheduler: SchedulerMixin | None = None,
        step_kwargs: dict[str, Any] | None = None,
        extra_channels: torch.Tensor | None = None,
        callbacks: Sequence[StepCallback] = (),
    ) -> torch.Tensor:
        """The guided reverse process, the one loop that sampling, image-to-image, inpainting, inversion and editing
        all run: for each timestep, one batched UNet call on [∅; c] (CFG when `guidance_scale` > 1), one scheduler
        step, then the per-step hooks.

        latents (B, C, h, w) are x at `timesteps[0]`; prompt_embeds and negative_prompt_embeds (B, L, D). `scheduler`
        defaults to the pipeline's (inversion passes DDIM's inverse); `extra_channels` (B, c, h, w) are appended to
        the UNet input (an inpainting UNet's mask and masked image). Each callback `(pipe, i, t, tensors) → dict` sees
        `latents`, `prompt_embeds`, `negative_prompt_embeds` after step i and may return replacements for any of
        them (diffusers' `callback_on_step_end` convention), so per-step ∅_t or attention edits need no loop of their
        own. Returns the latents after the last step.
        """
        scheduler = self.scheduler if scheduler is None else scheduler
        do_cfg = guidance_scale > 1.0
        if do_cfg and negative_prompt_embeds is None:
            raise ValueError(f"guidance_scale={guidance_scale} guides against negative_prompt_embeds; pass them (the "
                             "empty prompt's for plain classifier-free guidance), or use guidance_scale=1.")
        if do_cfg and extra_channels is not None:
            extra_channels = torch.cat([extra_channels] * 2)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_cfg else latents  # (2B, C, h, w) under CFG
                model_input = scheduler.scale_model_input(model_input, t)
                if extra_channels is not None:
                    model_input = torch.cat([model_input, extra_channels], dim=1)
                embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
                noise_pred = self.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
                if do_cfg:
                    noise_pred = classifier_free_guidance(*noise_pred.chunk(2), guidance_scale)
                latents = scheduler.step(noise_pred, t, latents, **(step_kwargs or {}), return_dict=False)[0]
                for callback in callbacks:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                               "negative_prompt_embeds": negative_prompt_embeds}
                    replaced = callback(self, i, t, tensors)
                    latents = replaced.get("latents", latents)
                    prompt_embeds = replaced.get("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = replaced.get("negative_prompt_embeds", negative_prompt_embeds)
                progress.update()
        return latents

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        strength: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        paste_back: bool = True,
        mask_feather: int | None = None,
        output_type: OutputType = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> LdmPipelineOutput | tuple[list[PIL.Image.Image] | np.ndarray | torch.Tensor]:
        """Generate images for `prompt`: from noise, from `image` (SDEdit), or inside `mask_image` (inpainting).

        `guidance_scale` ≤ 1 samples from the conditional model alone; `eta` is DDIM's η (0 = deterministic
        DDIM, 1 ≈ DDPM ancestral sampling). `callback_on_step_end(pipe, step, t, tensors)` may return
        replacement tensors (e.g. `{"latents": ...}`). `output_type="latent"` skips the VAE decode. `latents`, if
        given, is the starting noise ε (x_T = σ_init · ε, or the noise added to the input image).

        Image-to-image: `image` is noised to `strength` · T and denoised from there (the last
        int(num_inference_steps · strength) steps): 0 returns the input's VAE round trip, 1 ignores the input
        (the text-to-image result for the same seed); default 0.8. As diffusers' `StableDiffusionImg2ImgPipeline`.
        Inpainting: `mask_image` white = repaint (default strength 1). With an ordinary UNet, the latents outside
        the mask are replaced after every step by the input's, noised to the next timestep, as diffusers'
        `StableDiffusionInpaintPipeline` does; an inpainting UNet (9 input channels) gets the mask and the masked
        image as extra channels instead. Then, with `paste_back`, the input's pixels are pasted back outside the
        mask, feathered `mask_feather` pixels inwards (default: the VAE factor), so unmasked pixels stay exact.
        Inputs of another size are resized to cover height × width (default: the model's size) and center-cropped.
        """
        # 1. Check inputs
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale)
        strength = self.check_image_inputs(image, mask_image, strength, mask_feather)
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not offered; choose from "
                             f"{self._callback_tensor_inputs}.")
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
        total = batch_size * num_images_per_prompt
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        pixels = mask = input_size = None
        if image is not None:
            pixels, mask, input_size = self.preprocess_images(image, mask_image, height, width)

        # 2. Encode the prompts; CFG batches [negative; positive] so both go through the UNet at once
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, do_cfg, negative_prompt)

        # 3. Timesteps: all of them, or SDEdit's tail from t_0 = strength · T
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps if image is None else self.get_timesteps(num_inference_steps, strength)

        # 4. Starting latents: x_T ~ N(0, σ²_init I), or the input's latents noised to t_0 (diffusers' draw order:
        #    the posterior sample first, then the noise)
        from_image = image is not None and strength < 1.0
        needs_image_latents = from_image or (mask is not None and not self.is_inpainting_unet)
        image_latents = (self.prepare_image_latents(pixels, batch_size, num_images_per_prompt, generator)
                         if needs_image_latents else None)
        noise = self.prepare_noise(total, height, width, prompt_embeds.dtype, device, generator, latents)
        if from_image and len(timesteps) == 0:  # strength ≈ 0: nothing to redraw, the input's VAE round trip
            latents = image_latents.to(noise.dtype)
        elif from_image:
            latents = self.scheduler.add_noise(image_latents.to(noise.dtype), noise, timesteps[:1].repeat(total))
        else:
            latents = noise * self.scheduler.init_noise_sigma

        # 5. Inpainting: blend the known region every step (ordinary UNet) or condition on it (inpainting UNet)
        callbacks: list[StepCallback] = []
        extra_channels = None
        if mask is not None:
            mask_latents = F.interpolate(mask.to(device), size=latents.shape[-2:])  # nearest, as diffusers
            mask_latents = _per_output(mask_latents, total, num_images_per_prompt).to(latents.dtype)
            if not self.is_inpainting_unet:
                callbacks.append(LatentBlend(image_latents.to(latents.dtype), noise, mask_latents, timesteps,
                                             self.scheduler))
            else:
                masked = self.prepare_image_latents(pixels * (mask < 0.5), batch_size, num_images_per_prompt,
                                                    generator)
                extra_channels = torch.cat([mask_latents, masked.to(latents.dtype)], dim=1)  # (B, 1 + C, h, w)
        if callback_on_step_end is not None:
            names = tuple(callback_on_step_end_tensor_inputs)
            callbacks.append(functools.partial(_selected, callback_on_step_end, names))

        # 6. Denoising loop
        latents = self.denoise(latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale,
                               step_kwargs=self._step_kwargs(generator, eta), extra_channels=extra_channels,
                               callbacks=callbacks)

        # 7. Decode x_0 with the VAE; paste the input back outside the mask
        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_latents(latents)  # (B, 3, H, W) in about [-1, 1]
            if mask is not None and paste_back:
                soft = feathered_mask(mask, self.vae_scale_factor if mask_feather is None else mask_feather)
                soft = _per_output(soft.to(device), total, num_images_per_prompt).to(decoded.dtype)
                original = _per_output(pixels.to(device), total, num_images_per_prompt).to(decoded.dtype)
                decoded = original + soft * (decoded.clamp(-1, 1) - original)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return LdmPipelineOutput(images=images, strength=strength,
                                 denoising_steps=None if image is None else len(timesteps) // self.scheduler.order,
                                 input_size=input_size)


class LatentBlend:
    """Inpainting with an ordinary UNet, as a `denoise` hook: after step i the latents outside the mask become the
    input's latents noised to the next timestep (after the last step: the clean ones), so the UNet only invents
    the masked region, always in the context of the known one. As diffusers' `StableDiffusionInpaintPipeline`
    does for 4-channel UNets (RePaint-style known-region replacement, without resampling)."""

    def __init__(self, image_latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, timesteps: torch.Tensor,
                 scheduler: SchedulerMixin):
        self.image_latents = image_latents  # (B, C, h, w): x_0 of the input
        self.noise = noise  # (B, C, h, w): the ε that also noised the start, so the known region stays coherent
        self.mask = mask  # (B, 1, h, w): 1 = generate
        self.timesteps = timesteps
        self.scheduler = scheduler

    def __call__(self, pipe: "LdmPipeline", i: int, t: torch.Tensor, tensors: dict) -> dict[str, torch.Tensor]:
        known = self.image_latents
        if i < len(self.timesteps) - 1:
            known = self.scheduler.add_noise(known, self.noise, self.timesteps[i + 1:i + 2])  # q(x_{t-1} | x_0)
        return {"latents": (1 - self.mask) * known + self.mask * tensors["latents"]}


def feathered_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A binary mask (B, 1, H, W) softened inwards: 0 wherever it is 0, min(depth, radius) / radius inside, where
    depth counts pixels to the nearest unmasked one (1 on the edge). Pasting the input back with it blends over
    `radius` pixels inside the repainted region and leaves every unmasked pixel exactly as it was."""
    # erosion by a (2k+1)² square is 1 where all pixels within k are masked (max-pool pads with -inf, so past the
    # border counts as masked); the mean over k = 0 … radius-1 is the ramp
    eroded = [-F.max_pool2d(-mask, 2 * k + 1, stride=1, padding=k) for k in range(radius)]
    return torch.stack(eroded).mean(0) if eroded else mask


def _has_alpha(image: PIL.Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _per_output(x: torch.Tensor, total: int, num_images_per_prompt: int) -> torch.Tensor:
    """One row per output image: a single row repeated, or one per prompt repeated for each of its images."""
    if x.shape[0] == total:
        return x
    if x.shape[0] == 1:
        return x.expand(total, *x.shape[1:])
    return x.repeat_interleave(num_images_per_prompt, dim=0)


def _selected(callback: StepCallback, names: tuple[str, ...], pipe: "LdmPipeline", i: int, t: torch.Tensor,
              tensors: dict) -> dict[str, torch.Tensor]:
    """Call a user's step callback with only the tensors it asked for (`callback_on_step_end_tensor_inputs`)."""
    return callback(pipe, i, t, {k: tensors[k] for k in names})
