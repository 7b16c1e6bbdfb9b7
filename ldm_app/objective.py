"""The training objective: forward process q(x_t | x_0) and the ε / x0 / v views of the denoising loss.

q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), i.e. x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε  (DDPM, Ho et al. 2020, eq. 4).
The UNet predicts one of three equivalent targets:
  ε  (epsilon)       the noise; the score is ∇ log q(x_t) = −ε / √(1 − ᾱ_t)
  x0 (sample)        the clean latent
  v  (v_prediction)  √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr

from .config import BetaSchedule, ObjectiveConfig

if TYPE_CHECKING:
    from .batches import Batch


def noise_scheduler(cfg: ObjectiveConfig) -> DDPMScheduler:
    """The training noise schedule (β_t); the same betas are written into the exported sampler."""
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type=cfg.prediction_type,
                         rescale_betas_zero_snr=cfg.zero_terminal_snr, clip_sample=False)


def sampling_scheduler(cfg: ObjectiveConfig) -> DDIMScheduler:
    """DDIM over the training schedule; with zero terminal SNR it starts from the last timestep ("trailing")."""
    return DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type=cfg.prediction_type,
                         rescale_betas_zero_snr=cfg.zero_terminal_snr, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="trailing" if cfg.zero_terminal_snr else "leading")


def objective_of(scheduler_config: dict, **overrides) -> ObjectiveConfig:
    """The training objective a pipeline's scheduler implies (noise schedule, prediction type): what a LoRA
    fine-tune of that pipeline must keep learning."""
    schedule = scheduler_config.get("beta_schedule", "linear")
    if scheduler_config.get("trained_betas") is not None:
        schedule = "trained_betas"
    if schedule not in get_args(BetaSchedule):
        raise ValueError(f"The model's scheduler uses a noise schedule the trainer cannot reproduce ({schedule}); "
                         f"use a model with one of: {', '.join(get_args(BetaSchedule))}.")
    return ObjectiveConfig(prediction_type=scheduler_config.get("prediction_type", "epsilon"), beta_schedule=schedule,
                           beta_start=scheduler_config.get("beta_start", 0.0001),
                           beta_end=scheduler_config.get("beta_end", 0.02),
                           num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
                           zero_terminal_snr=scheduler_config.get("rescale_betas_zero_snr", False), **overrides)


def diffusion_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should output at x_t under the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    raise ValueError(f"Unknown prediction_type {kind!r}; use epsilon, sample or v_prediction.")


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), expressed for each prediction type.

    With SNR = ᾱ/(1−ᾱ), the ε-MSE equals SNR × the x0-MSE, so clamping the x0 weight at γ gives
    ε: min(SNR, γ)/SNR, x0: min(SNR, γ), v: min(SNR, γ)/(SNR + 1).
    """
    snr = compute_snr(scheduler, timesteps)
    clamped = torch.clamp(snr, max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return torch.where(snr > 0, clamped / snr.clamp(min=1e-20), torch.ones_like(snr))
    if kind == "v_prediction":
        return clamped / (snr + 1)
    return clamped


def diffusion_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, x0: torch.Tensor, context: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor, snr_gamma: float | None = None) -> torch.Tensor:
    """Mean (optionally min-SNR-weighted) squared error of the UNet's prediction at x_t ~ q(x_t | x_0)."""
    x_t = scheduler.add_noise(x0, noise, timesteps)  # forward process q(x_t | x_0)
    target = diffusion_target(scheduler, x0, noise, timesteps)
    pred = unet(x_t, timesteps, encoder_hidden_states=context).sample
    per_sample = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)
    return per_sample.mean()


@dataclass
class DenoisingLoss:
    """One training step's loss on a batch: z ~ q(z|x) from the VAE posterior, captions dropped to ∅ for
    classifier-free guidance, then `diffusion_loss` at random timesteps. All randomness comes from the
    generator passed in, so a step's loss is a function of (weights, batch, generator)."""

    scheduler: DDPMScheduler  # the forward process's β schedule and prediction type
    objective: ObjectiveConfig
    empty: torch.Tensor  # ∅: its hidden states (1, T, D), or its token ids (1, T) when the text encoder trains
    scaling: float  # the VAE's latent scaling factor
    device: torch.device = torch.device("cpu")  # where the UNet runs (batches and draws are made on the CPU)

    def __call__(self, unet: torch.nn.Module, batch: Batch, generator: torch.Generator,
                 text_encoder: torch.nn.Module | None = None) -> torch.Tensor:
        """With a trained `text_encoder` the captions (token ids) are encoded here, inside the graph, so that
        gradients reach its adapters."""
        obj, device = self.objective, self.device
        b = batch.mean.shape[0]
        eps_z = torch.randn(batch.mean.shape, generator=generator)
        noise = torch.randn(batch.mean.shape, generator=generator)
        timesteps = torch.randint(0, obj.num_train_timesteps, (b,), generator=generator)
        drop = torch.rand(b, generator=generator) < obj.caption_dropout
        if obj.noise_offset:
            noise = noise + obj.noise_offset * torch.randn((b, noise.shape[1], 1, 1), generator=generator)
        x0 = (batch.mean + batch.std * eps_z) * self.scaling  # z ~ q(z|x), reparameterised
        if text_encoder is None:
            context = torch.where(drop[:, None, None], self.empty, batch.context)
        else:
            context = text_encoder(torch.where(drop[:, None], self.empty, batch.input_ids).to(device))[0]
        return diffusion_loss(unet, self.scheduler, x0.to(device), context.to(device), noise.to(device),
                              timesteps.to(device), obj.snr_gamma)
