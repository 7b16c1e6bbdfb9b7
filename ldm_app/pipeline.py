"""LdmPipeline: latent diffusion with classifier-free guidance — text-to-image, image-to-image, inpainting.

Text → CLIP hidden states; noise x_T ~ N(0, I) in VAE latent space (or an input image's latents noised part-way,
SDEdit); the scheduler's reverse process (DDIM by default, any diffusers scheduler swaps in) denoises it with the
UNet in one loop (`LdmPipeline.denoise`, shared with inversion and editing); the VAE decodes x_0.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import FrozenDict
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor, is_valid_image_imagelist
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput, StableDiffusionMixin
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import deprecate, logging
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from .images import decode_image
from .pipeline_loaders import DEFAULT_MODEL_DIR, LdmLoadersMixin, cast_quietly  # noqa: F401 (re-exported)
from .ranges import check_guidance, check_size, check_steps
from .samplers import max_inference_steps
from .unet import LdmUNet

logger = logging.get_logger(__name__)

OutputType = Literal["pil", "np", "pt", "latent"]
StepCallback = Callable[["LdmPipeline", int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _quiet_import(module: str) -> Any:
    """Import a diffusers pipeline module without transformers' notice that torchvision is missing: the module's
    safety checker imports `CLIPImageProcessor`, and no image processor of transformers is ever used here."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return importlib.import_module(module)
    finally:
        transformers_logging.set_verbosity(verbosity)


# diffusers' SD pipeline helpers, used as they are so the call contract stays theirs
_SD = _quiet_import("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
retrieve_timesteps = _SD.retrieve_timesteps  # custom `timesteps=` / `sigmas=` schedules
_SD_IMG2IMG = _quiet_import("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img")
retrieve_latents = _SD_IMG2IMG.retrieve_latents  # latents of any VAE: a posterior's sample or mode, TAESD's own


@dataclass
class LdmPipelineOutput(ImagePipelineOutput):
    """The images, and what a caller needs to record how they were made (PNG metadata, `--from`)."""

    strength: float | None = None  # from an image: the strength used, its default filled in; None for text-to-image
    denoising_steps: int | None = None  # from an image: the steps actually run, int(num_inference_steps · strength)
    input_size: tuple[int, int] | None = None  # from an image: the (first) input's (W, H) before it was fitted
    nsfw_content_detected: list[bool] | None = None  # always None (no safety checker): StableDiffusionPipelineOutput's


def classifier_free_guidance(noise_uncond: torch.Tensor, noise_text: torch.Tensor,
                             guidance_scale: float) -> torch.Tensor:
    """ε̂ = ε(x_t, ∅) + w · (ε(x_t, c) − ε(x_t, ∅)) (Ho & Salimans 2022); the one place the formula is written."""
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


class LdmPipeline(LdmLoadersMixin, DiffusionPipeline, StableDiffusionMixin, TextualInversionLoaderMixin,
                  StableDiffusionLoraLoaderMixin):
    """VAE + CLIP text encoder + UNet (`LdmUNet` or `UNet2DConditionModel`) + scheduler.

    `pipe("a cat").images[0]` samples an image; `pipe("a cat", image=photo, strength=0.6)` redraws a picture
    (SDEdit); `pipe("a cat", image=photo, mask_image=mask)` repaints the mask's white region. `guidance_scale` > 1
    turns on classifier-free guidance, both halves in one batched UNet call (`denoise`). The call takes the
    arguments of diffusers' `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` and
    `StableDiffusionInpaintPipeline` (docs/: "diffusers contract" lists what is covered and what is not).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL | AutoencoderTiny | None,
        text_encoder: CLIPTextModel | None,
        tokenizer: CLIPTokenizer | None,
        # ModelMixin too: a portable folder's unet/unet.py defines its own LdmUNet class, which plain diffusers
        # would otherwise warn about ("Expected types for unet") although it works
        unet: LdmUNet | UNet2DConditionModel | ModelMixin | None,
        scheduler: SchedulerMixin | None,
    ):
        super().__init__()
        if scheduler is not None and getattr(scheduler.config, "steps_offset", 1) != 1:
            # as diffusers' SD pipelines: SD-1.x schedules start one step later than an offset-0 config says
            deprecate("steps_offset!=1", "1.0.0", f"The configuration file of this scheduler: {scheduler} is outdated. "
                      f"`steps_offset` should be set to 1 instead of {scheduler.config.steps_offset}; it is set to 1 "
                      "for this pipeline.", standard_warn=False)
            scheduler._internal_dict = FrozenDict({**scheduler.config, "steps_offset": 1})
        if scheduler is not None and getattr(scheduler.config, "clip_sample", False) is True:
            deprecate("clip_sample not set", "1.0.0", f"The configuration file of this scheduler: {scheduler} sets "
                      "`clip_sample`; it should be False for latent diffusion, and is set to False for this pipeline.",
                      standard_warn=False)
            scheduler._internal_dict = FrozenDict({**scheduler.config, "clip_sample": False})
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        # a pipeline of text encoder + tokenizer alone (for `encode_prompt`) gets SD's factor, as diffusers does
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8
        latent_channels = self.vae.config.latent_channels if self.vae is not None else 4
        # bicubic, as `ldm_app.images.preprocess` resizes training and inversion inputs
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic",
                                                 vae_latent_channels=latent_channels)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic",
                                                do_normalize=False, do_binarize=True, do_convert_grayscale=True)

    # ------------------------------------------------------------------------------------------------------
    # Pipeline state, read by step callbacks as diffusers' SD pipelines expose it

    @property
    def guidance_scale(self) -> float:
        """The CFG weight w of the running call; a step callback may set `_guidance_scale` (0 ends guidance)."""
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self) -> bool:
        """CFG runs when w > 1, except for UNets distilled with the guidance as an input (LCM's
        `time_cond_proj_dim`): they get w as `timestep_cond` and one UNet call per step."""
        return self._guidance_scale > 1 and getattr(self.unet.config, "time_cond_proj_dim", None) is None

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `_interrupt` from a step callback to skip the remaining steps (the latents so far are decoded)."""
        return self._interrupt

    # diffusers' sinusoidal embedding of w − 1 (VDM), the `timestep_cond` of guidance-distilled (LCM) UNets
    get_guidance_scale_embedding = _SD.StableDiffusionPipeline.get_guidance_scale_embedding

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al. 2023) on a `UNet2DConditionModel`, as diffusers' SD pipelines offer it."""
        if not hasattr(self.unet, "enable_freeu"):
            raise ValueError(f"FreeU needs diffusers' UNet2DConditionModel; this pipeline's UNet is "
                             f"{type(self.unet).__name__}, which has no FreeU. Leave enable_freeu out.")
        super().enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """Fused q/k/v projections (one matmul), as diffusers' SD pipelines offer them."""
        if unet and not hasattr(self.unet, "fuse_qkv_projections"):
            raise ValueError(f"Fusing QKV projections needs diffusers' UNet2DConditionModel; this pipeline's UNet is "
                             f"{type(self.unet).__name__}. Pass unet=False to fuse the VAE's only.")
        super().fuse_qkv_projections(unet=unet, vae=vae)

    # ------------------------------------------------------------------------------------------------------
    # Stages

    @property
    def default_size(self) -> int:
        """Native image size: the UNet's latent size times the VAE's down-sampling factor."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def check_inputs(self, prompt: str | list[str] | None, negative_prompt: str | list[str] | None, height: int,
                     width: int, num_inference_steps: int, guidance_scale: float,
                     prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                     callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
                     custom_schedule: bool = False) -> None:
        """Reject bad arguments with a message that says how to fix them (diffusers' checks, and ranges)."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either prompt or prompt_embeds, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass a prompt (or prompt_embeds from encode_prompt).")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either negative_prompt or negative_prompt_embeds, not both.")
        if (prompt_embeds is not None and negative_prompt_embeds is not None
                and prompt_embeds.shape != negative_prompt_embeds.shape):
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape; encode both with "
                             "encode_prompt.")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}.")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt is an empty list; pass at least one prompt.")
        n = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, list) and len(negative_prompt) != n:
            raise ValueError(f"{len(negative_prompt)} negative prompts for {n} prompts; pass one negative prompt per "
                             "prompt, or a single string for all.")
        unknown = set(callback_on_step_end_tensor_inputs or ()) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not offered; choose from "
                             f"{self._callback_tensor_inputs}.")
        for name, size in (("height", height), ("width", width)):
            check_size(name, size, self.vae_scale_factor, self.default_size)
        if not custom_schedule:  # `timesteps=` / `sigmas=` set the schedule instead
            check_steps("num_inference_steps", num_inference_steps, max_inference_steps(self.scheduler.config))
        check_guidance("guidance_scale", guidance_scale)

    @property
    def is_inpainting_unet(self) -> bool:
        """Whether the UNet takes the mask and the masked image's latents next to the latents (SD-inpainting's 9)."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1

    def check_image_inputs(self, image: PipelineImageInput | None, mask_image: PipelineImageInput | None,
                           strength: float | None, mask_feather: int | None,
                           masked_image_latents: torch.Tensor | None = None) -> float | None:
        """Reject image-to-image and inpainting arguments that cannot work; return the strength to use (diffusers'
        defaults: 0.8 for image-to-image, 1 for inpainting), or None for text-to-image."""
        in_channels, inpainting_unet = self.unet.config.in_channels, self.is_inpainting_unet
        if image is None:
            if mask_image is not None or strength is not None or masked_image_latents is not None:
                name = ("mask_image" if mask_image is not None else "strength" if strength is not None
                        else "masked_image_latents")
                raise ValueError(f"{name} needs an input image; pass image= as well, or leave it out for "
                                 "text-to-image.")
            if inpainting_unet:
                raise ValueError(f"This UNet takes {in_channels} input channels: it is an inpainting model; pass "
                                 "image= and mask_image=.")
            return None
        if mask_image is None and inpainting_unet:
            raise ValueError("This UNet is an inpainting model; pass mask_image= (white = repaint; all white to "
                             "redraw everything).")
        if masked_image_latents is not None and mask_image is None:
            raise ValueError("masked_image_latents needs mask_image= as well (the mask they were made with).")
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

    def default_height_width(self, image: PipelineImageInput | None, mask_image: PipelineImageInput | None,
                             height: int | None, width: int | None) -> tuple[int, int]:
        """The output size when none is given: image-to-image keeps the input's size rounded down to the VAE factor
        (as `StableDiffusionImg2ImgPipeline`); text-to-image and inpainting use the model's native size."""
        native = (self.default_size if height is None else height, self.default_size if width is None else width)
        if image is None or mask_image is not None or (height is not None and width is not None):
            return native
        first = image[0] if isinstance(image, (list, tuple)) and image else image
        if isinstance(first, np.ndarray):  # (H, W, C) or (B, H, W, C), as VaeImageProcessor reads numpy
            first = torch.from_numpy(first if first.ndim == 4 else first[None]).permute(0, 3, 1, 2)
        if isinstance(first, torch.Tensor):
            first = first if first.ndim == 4 else first[None]
            if first.shape[1] == self.vae.config.latent_channels:  # latents: the size they decode to
                return (first.shape[2] * self.vae_scale_factor if height is None else height,
                        first.shape[3] * self.vae_scale_factor if width is None else width)
        if not isinstance(first, (PIL.Image.Image, torch.Tensor)):
            return native  # preprocess_images names the problem
        return self.image_processor.get_default_height_width(first, height, width)

    def dropped_tokens(self, prompt: str) -> int:
        """How many of the prompt's tokens lie beyond the text encoder's limit (the model never sees them)."""
        return max(0, len(self.tokenizer(prompt, verbose=False).input_ids) - self.tokenizer.model_max_length)

    def _embed(self, texts: list[str], device: torch.device, clip_skip: int | None = None) -> torch.Tensor:
        texts = self.maybe_convert_prompt(texts, self.tokenizer)  # textual-inversion tokens of several vectors
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        dropped = max(self.dropped_tokens(text) for text in texts)
        if dropped > 0:
            logger.warning(f"Prompt truncated: {dropped} token(s) beyond the text encoder's limit of "
                           f"{self.tokenizer.model_max_length} were dropped.")
        mask = tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        if clip_skip is None:
            return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]  # (B, T, D)
        # A1111's "Clip skip": the hidden states `clip_skip` layers before the last, through the final layer norm
        # (transformers 5's CLIPTextModel holds it itself, 4's in .text_model)
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        final_layer_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_layer_norm(hidden.hidden_states[-(clip_skip + 1)])

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text encoder hidden states for the prompts, each repeated `num_images_per_prompt` times, and for
        the negative prompts (empty prompt = the unconditional ∅ of classifier-free guidance).

        As diffusers' `StableDiffusionPipeline.encode_prompt`: given embeddings pass through (repeated);
        `lora_scale` scales the text encoder's LoRA layers for this call; `clip_skip` takes the hidden states that
        many layers before the last, for the prompt only (as diffusers does; the negative prompt keeps the last
        layer). Needs only the tokenizer and text encoder, so a pipeline built from those two can serve it.
        """
        if lora_scale is not None:
            self._lora_scale = lora_scale
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            if prompt_embeds is None:
                prompts = [prompt] if isinstance(prompt, str) else list(prompt)
                prompt_embeds = self._embed(prompts, device, clip_skip)
            n = prompt_embeds.shape[0]
            dtype = (self.text_encoder.dtype if self.text_encoder is not None else
                     self.unet.dtype if self.unet is not None else prompt_embeds.dtype)
            prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, 0)
            if not do_classifier_free_guidance:
                return prompt_embeds, negative_prompt_embeds
            if negative_prompt_embeds is None:
                negatives = ([""] * n if negative_prompt is None else [negative_prompt] * n
                             if isinstance(negative_prompt, str) else list(negative_prompt))
                negative_prompt_embeds = self._embed(negatives, device)
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            return prompt_embeds, negative_prompt_embeds.repeat_interleave(num_images_per_prompt, 0)
        finally:
            if lora_scale is not None:
                unscale_lora_layers(self.text_encoder, lora_scale)

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
        """Images in [-1, 1] → scaled latents (posterior mode, or a sample from q(z|x) if `sample`); a VAE without
        a posterior (`AutoencoderTiny`) gives its latents either way (diffusers' `retrieve_latents`)."""
        encoded = self.vae.encode(images.to(device=self.vae.device, dtype=self.vae.dtype))
        z = retrieve_latents(encoded, generator, sample_mode="sample" if sample else "argmax")
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

    def prepare_timesteps(self, num_inference_steps: int, timesteps: list[int] | None, sigmas: list[float] | None,
                          strength: float | None, device: torch.device) -> torch.Tensor:
        """The schedule to run: the scheduler's for `num_inference_steps`, or custom `timesteps` / `sigmas`
        (diffusers' `retrieve_timesteps`); from an image, only its tail from t_0 = strength · T (`get_timesteps`)."""
        schedule, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps,
                                                           sigmas)
        return schedule if strength is None else self.get_timesteps(num_inference_steps, strength)

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

    def preprocess_images(self, image: PipelineImageInput | None, mask_image: PipelineImageInput | None, height: int,
                          width: int) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[int, int] | None]:
        """Input image(s) → (N, 3, H, W) in [-1, 1]; mask(s) → (N, 1, H, W), 1 = repaint; the first input's (W, H).

        PIL images: EXIF orientation is applied and transparency composited on white (`ldm_app.images.decode_image`);
        a mask's alpha channel is ignored; an input of another size or shape is resized to cover height × width and
        center-cropped, its mask the same way. numpy arrays and torch tensors (single or lists, [0, 1], or [-1, 1]
        tensors) are read by diffusers' `VaeImageProcessor` as diffusers' pipelines read them (resized to height ×
        width); a tensor with the VAE's latent channels is taken as latents of the image. No image: all None.
        """
        if image is None:
            return None, None, None
        images = self._as_images(image, "image")
        if isinstance(images, list) and isinstance(images[0], PIL.Image.Image):
            pixels = self.image_processor.preprocess(images, height, width, resize_mode="crop")
            input_size = images[0].size
        else:
            pixels = self.image_processor.preprocess(images, height, width)
            first = images[0] if isinstance(images, list) else images
            input_size = (first.shape[-1], first.shape[-2]) if isinstance(first, torch.Tensor) else \
                (first.shape[-2], first.shape[-3])
        if mask_image is None:
            return pixels, None, input_size
        if pixels.shape[1] == self.vae.config.latent_channels:
            raise ValueError("Inpainting needs the image as pixels (its latents cannot be pasted back); pass the "
                             "image, and its masked latents as masked_image_latents= if you have them.")
        masks = self._as_images(mask_image, "mask_image")
        if isinstance(masks, list) and isinstance(masks[0], PIL.Image.Image):
            if len(masks) != len(images):
                raise ValueError(f"{len(masks)} masks for {len(images)} images; pass one mask per image.")
            for img, msk in zip(images, masks):
                if isinstance(img, PIL.Image.Image) and msk.size != img.size:
                    raise ValueError(f"mask_image is {msk.size[0]}x{msk.size[1]} but the image is {img.size[0]}x"
                                     f"{img.size[1]}; pass a mask of the image's size (white = repaint).")
            mask = self.mask_processor.preprocess(masks, height, width, resize_mode="crop")
        else:
            mask = self.mask_processor.preprocess(masks, height, width)
        if not mask.flatten(1).any(1).all():
            raise ValueError(f"mask_image is black everywhere (at {width}x{height}): nothing to repaint. Paint the "
                             "region to regenerate white, or leave mask_image out for image-to-image.")
        return pixels, mask, input_size

    @staticmethod
    def _as_images(value: Any, name: str) -> list[PIL.Image.Image] | PipelineImageInput:
        """A list of PIL images (decoded as ldm_app decodes files), or numpy arrays / tensors as given."""
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        kinds = {type(v) for v in values}
        if values and len(kinds) == 1 and issubclass(kinds.pop(), (np.ndarray, torch.Tensor)):
            if is_valid_image_imagelist(value):
                return value
        if not values or not all(isinstance(v, PIL.Image.Image) for v in values):
            kind = type(value).__name__ if not isinstance(value, (list, tuple)) else "a list of " + ", ".join(
                sorted({type(v).__name__ for v in values}) or ["nothing"])
            raise ValueError(f"{name} must be a PIL image, a numpy array or a torch tensor (or a list of one kind), "
                             f"got {kind}; read a file with ldm_app.images.read_image.")
        if name == "mask_image":  # a mask's alpha is ignored, as diffusers and A1111 do: strokes on transparent black
            values = [v.convert("RGBA").convert("RGB") if _has_alpha(v) else v for v in values]
        images = [decode_image(v) for v in values]
        if any(im is None for im in images):
            raise ValueError(f"{name} cannot be decoded; pass a readable image (PNG, JPEG, WebP, ...).")
        return images

    def prepare_image_latents(self, pixels: torch.Tensor, batch_size: int, num_images_per_prompt: int,
                              generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        """Scaled latents of the input images, one per output: a sample of q(z|x) drawn with `generator`, as
        diffusers' image pipelines draw it (with a list, each output's own generator draws its sample). Images
        given as latents (the VAE's latent channels) are used as they are, as diffusers does."""
        total = batch_size * num_images_per_prompt
        if pixels.shape[0] not in (1, batch_size, total):
            raise ValueError(f"{pixels.shape[0]} images for {batch_size} prompts; pass one image, or one per prompt.")
        pixels = pixels.to(device=self._execution_device)
        if pixels.shape[1] == self.vae.config.latent_channels:
            return _per_output(pixels, total, num_images_per_prompt)
        if isinstance(generator, list):
            pixels = _per_output(pixels, total, num_images_per_prompt)
            return self.encode_image(pixels, generator, sample=True)
        return _per_output(self.encode_image(pixels, generator, sample=True), total, num_images_per_prompt)

    def prepare_start_latents(self, pixels: torch.Tensor | None, mask: torch.Tensor | None, timesteps: torch.Tensor,
                              strength: float | None, batch_size: int, num_images_per_prompt: int, height: int,
                              width: int, dtype: torch.dtype, generator: torch.Generator | list[torch.Generator] | None,
                              latents: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x at `timesteps[0]`, the noise ε it holds, and the input's latents where later stages need them.

        Text-to-image (or strength 1): x_T = σ_init · ε. From an image: its latents noised to t_0 (diffusers' draw
        order: the posterior sample first, then the noise); strength that leaves no step: the input's latents.
        """
        total = batch_size * num_images_per_prompt
        from_image = pixels is not None and strength < 1.0
        needs_image_latents = from_image or (mask is not None and not self.is_inpainting_unet)
        image_latents = (self.prepare_image_latents(pixels, batch_size, num_images_per_prompt, generator).to(dtype)
                         if needs_image_latents else None)
        noise = self.prepare_noise(total, height, width, dtype, self._execution_device, generator, latents)
        if from_image and len(timesteps) == 0:
            return image_latents, noise, image_latents
        if from_image:
            return self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(total)), noise, image_latents
        return noise * self.scheduler.init_noise_sigma, noise, image_latents

    def prepare_inpainting(self, pixels: torch.Tensor | None, mask: torch.Tensor | None,
                           masked_image_latents: torch.Tensor | None, image_latents: torch.Tensor | None,
                           noise: torch.Tensor, timesteps: torch.Tensor, batch_size: int, num_images_per_prompt: int,
                           generator: torch.Generator | list[torch.Generator] | None,
                           ) -> tuple[torch.Tensor | None, list[StepCallback]]:
        """What the loop needs to inpaint: an inpainting UNet's extra channels (B, 1 + C, h, w) — the mask and the
        masked image's latents (or the given `masked_image_latents`) — or, for an ordinary UNet, the `LatentBlend`
        hook that keeps the known region. Nothing for text-to-image and image-to-image."""
        if mask is None:
            return None, []
        total = batch_size * num_images_per_prompt
        dtype = noise.dtype
        mask_latents = F.interpolate(mask.to(noise.device), size=noise.shape[-2:])  # nearest, as diffusers
        mask_latents = _per_output(mask_latents, total, num_images_per_prompt).to(dtype)
        if masked_image_latents is None:
            masked_image_latents = pixels * (mask < 0.5)
        masked_is_latents = masked_image_latents.shape[1] == self.vae.config.latent_channels
        if not self.is_inpainting_unet:
            if not masked_is_latents and "generator" in inspect.signature(self.scheduler.step).parameters:
                # diffusers samples the masked image's latents for every UNet: a stochastic sampler's later draws
                # from the same generator then match only if this sample is drawn too (it is not used)
                self.prepare_image_latents(masked_image_latents, batch_size, num_images_per_prompt, generator)
            return None, [LatentBlend(image_latents, noise, mask_latents, timesteps, self.scheduler)]
        masked = self.prepare_image_latents(masked_image_latents, batch_size, num_images_per_prompt, generator)
        return torch.cat([mask_latents, masked.to(dtype)], dim=1), []

    def paste_back(self, decoded: torch.Tensor, pixels: torch.Tensor | None, mask: torch.Tensor | None,
                   mask_feather: int | None, num_images_per_prompt: int) -> torch.Tensor:
        """The input's pixels outside the mask, feathered `mask_feather` pixels inwards (default: the VAE factor),
        so unmasked pixels stay exact; decoded images (B, 3, H, W) in [-1, 1] pass unchanged without a mask."""
        if mask is None:
            return decoded
        total = decoded.shape[0]
        soft = feathered_mask(mask, self.vae_scale_factor if mask_feather is None else mask_feather)
        soft = _per_output(soft.to(decoded.device), total, num_images_per_prompt).to(decoded.dtype)
        original = _per_output(pixels.to(decoded.device), total, num_images_per_prompt).to(decoded.dtype)
        return original + soft * (decoded.clamp(-1, 1) - original)

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
        guidance_rescale: float = 0.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The guided reverse process, the one loop that sampling, image-to-image, inpainting, inversion and editing
        all run: for each timestep, one batched UNet call on [∅; c] (CFG when `guidance_scale` > 1), one scheduler
        step, then the per-step hooks.

        latents (B, C, h, w) are x at `timesteps[0]`; prompt_embeds and negative_prompt_embeds (B, L, D). `scheduler`
        defaults to the pipeline's (inversion passes DDIM's inverse); `extra_channels` (B, c, h, w) are appended to
        the UNet input (an inpainting UNet's mask and masked image). Each callback `(pipe, i, t, tensors) → dict` sees
        `latents`, `prompt_embeds`, `negative_prompt_embeds` after step i and may return replacements for any of
        them (diffusers' `callback_on_step_end` convention), so per-step ∅_t or attention edits need no loop of their
        own; it may also set `pipe._guidance_scale` (read every step) or `pipe._interrupt` (skip the rest).
        `guidance_rescale` is diffusers' φ (Lin et al. 2023, §3.4); `cross_attention_kwargs` go to the UNet, their
        `scale` weighting its LoRA layers. A guidance-distilled UNet (`time_cond_proj_dim`) gets w as
        `timestep_cond` and no CFG batch. Returns the latents after the last step.
        """
        scheduler = self.scheduler if scheduler is None else scheduler
        self._guidance_scale, self._guidance_rescale = guidance_scale, guidance_rescale
        self._num_timesteps, self._interrupt = len(timesteps), False
        if self.do_classifier_free_guidance and negative_prompt_embeds is None:
            raise ValueError(f"guidance_scale={guidance_scale} guides against negative_prompt_embeds; pass them (the "
                             "empty prompt's for plain classifier-free guidance), or use guidance_scale=1.")
        timestep_cond = self.guidance_embedding(guidance_scale, latents)
        attention_kwargs = dict(cross_attention_kwargs or {})
        lora_scale = attention_kwargs.pop("scale", None)  # applied here, so LdmUNet's LoRA layers get it too
        if lora_scale is not None:
            scale_lora_layers(self.unet, lora_scale)
        try:
            with self.progress_bar(total=len(timesteps)) as progress:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    do_cfg = self.do_classifier_free_guidance  # a callback may have turned guidance off
                    model_input = torch.cat([latents] * 2) if do_cfg else latents  # (2B, C, h, w) under CFG
                    model_input = scheduler.scale_model_input(model_input, t)
                    if extra_channels is not None:
                        model_input = torch.cat([model_input, torch.cat([extra_channels] * 2) if do_cfg
                                                 else extra_channels], dim=1)
                    embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
                    noise_pred = self.unet(model_input, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond,
                                           cross_attention_kwargs=attention_kwargs or None, return_dict=False)[0]
                    if do_cfg:
                        noise_uncond, noise_text = noise_pred.chunk(2)
                        noise_pred = classifier_free_guidance(noise_uncond, noise_text, self._guidance_scale)
                        if self._guidance_rescale > 0:
                            noise_pred = rescale_noise_cfg(noise_pred, noise_text, self._guidance_rescale)
                    latents = scheduler.step(noise_pred, t, latents, **(step_kwargs or {}), return_dict=False)[0]
                    for callback in callbacks:
                        tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                                   "negative_prompt_embeds": negative_prompt_embeds}
                        replaced = callback(self, i, t, tensors)
                        latents = replaced.get("latents", latents)
                        prompt_embeds = replaced.get("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = replaced.get("negative_prompt_embeds", negative_prompt_embeds)
                    progress.update()
        finally:
            if lora_scale is not None:
                unscale_lora_layers(self.unet, lora_scale)
        return latents

    def guidance_embedding(self, guidance_scale: float, latents: torch.Tensor) -> torch.Tensor | None:
        """`timestep_cond` (B, time_cond_proj_dim) for a guidance-distilled UNet: w − 1 embedded as diffusers' SD
        pipelines embed it; None for other UNets."""
        dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        if dim is None:
            return None
        w = torch.tensor(guidance_scale - 1).repeat(latents.shape[0])
        return self.get_guidance_scale_embedding(w, embedding_dim=dim).to(device=latents.device, dtype=latents.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        image: PipelineImageInput | None = None,
        mask_image: PipelineImageInput | None = None,
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
        callback_on_step_end: StepCallback | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        masked_image_latents: torch.Tensor | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_rescale: float = 0.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
    ) -> LdmPipelineOutput | tuple:
        """Generate images for `prompt`: from noise, from `image` (SDEdit), or inside `mask_image` (inpainting).

        `guidance_scale` ≤ 1 samples from the conditional model alone; `eta` is DDIM's η (0 = deterministic
        DDIM, 1 ≈ DDPM ancestral sampling). `callback_on_step_end(pipe, step, t, tensors)` may return
        replacement tensors (e.g. `{"latents": ...}`), set `pipe._guidance_scale` or `pipe._interrupt`.
        `output_type="latent"` skips the VAE decode. `latents`, if given, is the starting noise ε (x_T = σ_init · ε,
        or the noise added to the input image). The keyword-only arguments are diffusers' SD pipelines' own:
        embeddings instead of prompts, a custom schedule (`timesteps` or `sigmas`), `guidance_rescale`,
        `cross_attention_kwargs` (`{"scale": s}` weights loaded LoRAs), `clip_skip`, `masked_image_latents`.

        Image-to-image: `image` (PIL, numpy or torch, single or a list; diffusers' `PipelineImageInput`) is noised to
        `strength` · T and denoised from there (the last int(num_inference_steps · strength) steps): 0 — or any
        strength that leaves no step — returns the input's VAE round trip (where diffusers would run no step and
        inpainting would stop with an error), 1 ignores the input (the text-to-image result for the same seed);
        default 0.8. The output keeps the input's size rounded down to the VAE factor unless height/width are
        given. As diffusers' `StableDiffusionImg2ImgPipeline`.
        Inpainting: `mask_image` white = repaint (default strength 1). With an ordinary UNet, the latents outside
        the mask are replaced after every step by the input's, noised to the next timestep, as diffusers'
        `StableDiffusionInpaintPipeline` does; an inpainting UNet (9 input channels) gets the mask and the masked
        image as extra channels instead. Then, with `paste_back`, the input's pixels are pasted back outside the
        mask, feathered `mask_feather` pixels inwards (default: the VAE factor), so unmasked pixels stay exact.
        PIL inputs of another size are resized to cover height × width (default: the model's size) and
        center-cropped; arrays and tensors are resized to it, as diffusers does.
        """
        # 1. Check inputs
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height, width = self.default_height_width(image, mask_image, height, width)
        self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, prompt_embeds,
                          negative_prompt_embeds, callback_on_step_end_tensor_inputs,
                          custom_schedule=timesteps is not None or sigmas is not None)
        strength = self.check_image_inputs(image, mask_image, strength, mask_feather, masked_image_latents)
        self._guidance_scale, self._guidance_rescale, self._clip_skip = guidance_scale, guidance_rescale, clip_skip
        self._cross_attention_kwargs, self._interrupt = cross_attention_kwargs, False
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device

        # 2. The input image and mask as tensors: (N, 3, H, W) in [-1, 1] and (N, 1, H, W), 1 = repaint
        pixels, mask, input_size = self.preprocess_images(image, mask_image, height, width)

        # 3. Encode the prompts (CFG's [negative; positive] batch is made per step, in `denoise`)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=clip_skip)

        # 4. Timesteps: all of them, or SDEdit's tail from t_0 = strength · T
        timesteps = self.prepare_timesteps(num_inference_steps, timesteps, sigmas, strength, device)

        # 5. Starting latents: x_T ~ N(0, σ²_init I), or the input's latents noised to t_0
        latents, noise, image_latents = self.prepare_start_latents(
            pixels, mask, timesteps, strength, batch_size, num_images_per_prompt, height, width, prompt_embeds.dtype,
            generator, latents)

        # 6. Inpainting: blend the known region every step (ordinary UNet) or condition on it (inpainting UNet)
        extra_channels, hooks = self.prepare_inpainting(pixels, mask, masked_image_latents, image_latents, noise,
                                                        timesteps, batch_size, num_images_per_prompt, generator)

        # 7. Denoising loop
        if callback_on_step_end is not None:
            hooks.append(functools.partial(_selected, callback_on_step_end, tuple(callback_on_step_end_tensor_inputs)))
        latents = self.denoise(latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale,
                               step_kwargs=self._step_kwargs(generator, eta), extra_channels=extra_channels,
                               callbacks=hooks, guidance_rescale=guidance_rescale,
                               cross_attention_kwargs=cross_attention_kwargs)

        # 8. Decode x_0 with the VAE, then 9. paste the input back outside the mask
        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_latents(latents)  # (B, 3, H, W) in about [-1, 1]
            decoded = self.paste_back(decoded, pixels, mask if paste_back else None, mask_feather,
                                      num_images_per_prompt)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, None  # StableDiffusionPipeline's (images, nsfw_content_detected)
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
