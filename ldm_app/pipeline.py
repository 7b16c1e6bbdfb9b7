"""LdmPipeline: text-to-image latent diffusion with classifier-free guidance.

Text → CLIP hidden states; noise x_T ~ N(0, I) in VAE latent space; the scheduler's reverse process
(DDIM by default, any diffusers scheduler swaps in) denoises it with the UNet; the VAE decodes x_0.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.peft_utils import get_adapter_name
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from .lora import from_kohya, is_kohya, load_text_encoder_lora, quiet_lora_loading, read_lora_file
from .samplers import max_inference_steps
from .unet import LdmUNet

logger = logging.get_logger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only")
OutputType = Literal["pil", "np", "pt", "latent"]


class LdmPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """VAE + CLIP text encoder + UNet (`LdmUNet` or `UNet2DConditionModel`) + scheduler.

    `pipe("a cat").images[0]` samples an image; `guidance_scale` > 1 turns on classifier-free guidance
    (Ho & Salimans 2022): ε̂ = ε(x_t, ∅) + w · (ε(x_t, c) − ε(x_t, ∅)), both halves in one batched UNet call.
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
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "LdmPipeline":
        """Load a pipeline folder (model_index.json + component subfolders) or hub id.

        A Stable-Diffusion-1.x folder loads too: its extra components (safety checker, feature extractor)
        are skipped.
        """
        path = Path(pretrained_model_name_or_path)
        if path.exists() and not (path / "model_index.json").is_file():
            raise ValueError(
                f"{path} is not a pipeline folder (no model_index.json); point to a folder written by "
                "LdmPipeline.save_pretrained, a training run's 'pipeline' folder, or a hub id."
            )
        index = cls.load_config(pretrained_model_name_or_path, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        for unused in set(index) - set(inspect.signature(cls.__init__).parameters):
            if not unused.startswith("_"):
                kwargs.setdefault(unused, None)  # a Stable Diffusion folder's safety checker, feature extractor, ...
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            # diffusers loads its models in fp32 unless told otherwise, transformers 5 in the stored dtype: match
            pipe.text_encoder.to(torch.float32)
        return pipe

    @classmethod
    def from_default(cls, **kwargs: Any) -> "LdmPipeline":
        """The embedded default model that ships inside the package: offline, CPU-sized."""
        if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
            raise ValueError(f"The embedded default model is missing from {DEFAULT_MODEL_DIR}; reinstall ldm-app "
                             "or pass a model folder or hub id.")
        return cls.from_pretrained(DEFAULT_MODEL_DIR, **kwargs)  # shipped in fp16, loaded in fp32 unless told

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
                          adapter_name: str | None = None, **kwargs: Any) -> None:
        """diffusers' LoRA loading, plus local folders with pytorch_lora_weights.safetensors and kohya/A1111
        files (`lora_unet_*` keys), which are matched against this pipeline's own module names. Text-encoder
        adapters in local files and dicts are attached with peft directly (see `lora.attach`)."""
        source = pretrained_model_name_or_path_or_dict
        if not isinstance(source, dict) and Path(source).expanduser().exists():
            source = read_lora_file(source)
        if isinstance(source, dict) and is_kohya(source):
            modules = {"unet": [n for n, _ in self.unet.named_modules()],
                       "text_encoder": [n for n, _ in self.text_encoder.named_modules()]}
            source = from_kohya(source, modules)
        adapter_name = adapter_name or get_adapter_name(self.unet)
        if isinstance(source, dict) and any(k.startswith("text_encoder.") for k in source):
            prefix = "text_encoder."
            load_text_encoder_lora(self.text_encoder, {k[len(prefix):]: v for k, v in source.items()
                                                       if k.startswith(prefix)}, adapter_name)
            source = {k: v for k, v in source.items() if not k.startswith(prefix)}
            if not source:
                return
        with quiet_lora_loading(isinstance(source, dict)):  # a dict's text-encoder part was applied above
            super().load_lora_weights(source, adapter_name=adapter_name, **kwargs)

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
            if size <= 0 or size % self.vae_scale_factor:
                raise ValueError(f"{name}={size} is not a positive multiple of the VAE factor {self.vae_scale_factor}; "
                                 f"use e.g. {max(self.vae_scale_factor, size // self.vae_scale_factor * self.vae_scale_factor)}.")
        limit = max_inference_steps(self.scheduler.config)
        if not 1 <= num_inference_steps <= limit:
            raise ValueError(f"num_inference_steps={num_inference_steps}; use 1 to {limit} steps (25–50 is typical).")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale} is negative; use 0 or more (1 = no guidance, 5 is typical).")

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

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_T ~ N(0, σ_init² I) at latent resolution; one generator per image gives per-image reproducibility."""
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for {batch_size} images; pass one generator per image "
                             "(prompts × num_images_per_prompt) or a single generator.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif latents.shape != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for this size and batch.")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

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
    # Sampling

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: OutputType = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[["LdmPipeline", int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple[list[PIL.Image.Image] | np.ndarray | torch.Tensor]:
        """Generate images for `prompt`.

        `guidance_scale` ≤ 1 samples from the conditional model alone; `eta` is DDIM's η (0 = deterministic
        DDIM, 1 ≈ DDPM ancestral sampling). `callback_on_step_end(pipe, step, t, tensors)` may return
        replacement tensors (e.g. `{"latents": ...}`). `output_type="latent"` skips the VAE decode.
        """
        # 1. Check inputs
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale)
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

        # 2. Encode the prompts; CFG batches [negative; positive] so both go through the UNet at once
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, do_cfg, negative_prompt)
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds

        # 3. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 4. Initial noise x_T
        latents = self.prepare_latents(batch_size * num_images_per_prompt, self.unet.config.in_channels,
                                       height, width, prompt_embeds.dtype, device, generator, latents)
        step_kwargs = self._step_kwargs(generator, eta)

        # 5. Denoising loop: ε̂ from the UNet, then one reverse step x_t → x_{t-1}
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
                if do_cfg:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                               "negative_prompt_embeds": negative_prompt_embeds}
                    tensors = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    latents = callback_on_step_end(self, i, t, tensors).get("latents", latents)
                progress.update()

        # 6. Decode x_0 with the VAE
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def cast_quietly(pipe: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
    """`pipe.to(dtype)` without diffusers' warning that every cast gets (none of our modules need fp32)."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return pipe.to(dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
