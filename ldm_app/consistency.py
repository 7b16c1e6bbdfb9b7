"""Latent consistency distillation (LCM, Luo et al. 2023): a student that maps any x_t on the teacher's
guided probability-flow ODE straight to its x_0, so that 2-8 steps of `LCMScheduler` sample what the teacher
needs 25+ DDIM steps with classifier-free guidance for.

One step (the paper's Algorithm 1, "skipping-step" variant):
  1. t_{n+k} from the N-step DDIM grid (k = T/N), x_{t_{n+k}} ~ q(x_t | x_0) from a data latent, ω+1 ~ U[g_min, g_max]
  2. the frozen teacher takes one DDIM step t_{n+k} → t_n of its CFG-guided ODE:  x̂_{t_n}
  3. the consistency function f(x, t) = c_skip(t) x + c_out(t) x̂_0(x, t) of the student at (x_{t_{n+k}}, t_{n+k})
     is pulled towards that of the target network θ⁻ (an EMA of the student) at (x̂_{t_n}, t_n)
The boundary conditions c_skip(0) = 1, c_out(0) = 0 make f the identity at t = 0 (σ_data = 0.5, t scaled by
`timestep_scaling` as in diffusers' `LCMScheduler`, which samples the result).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from diffusers import DDPMScheduler, LCMScheduler

from .config import DistillConfig, ObjectiveConfig

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from diffusers.training_utils import EMAModel

    from .batches import Batch

SIGMA_DATA = 0.5
LCM_STUDENT = "unet_lcm"  # a pipeline folder's distilled UNet, used with the `lcm` sampler (the default model's)


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance strength ω (= guidance_scale − 1), as diffusers'
    `LatentConsistencyModelPipeline.get_guidance_scale_embedding` makes `timestep_cond`: (B,) → (B, dim)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t) of f(x, t) = c_skip x + c_out x̂_0 (LCMScheduler's); (B,) each, c_skip(0) = 1."""
    scaled = timestep_scaling * timesteps.float()
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** 0.5
    return c_skip, c_out


def lcm_scheduler(objective: ObjectiveConfig, distill: DistillConfig) -> LCMScheduler:
    """The sampler of a student distilled with these settings (same β schedule, same DDIM grid)."""
    return LCMScheduler(num_train_timesteps=objective.num_train_timesteps, beta_schedule=objective.beta_schedule,
                        beta_start=objective.beta_start, beta_end=objective.beta_end,
                        prediction_type=objective.prediction_type,
                        rescale_betas_zero_snr=objective.zero_terminal_snr, clip_sample=False, set_alpha_to_one=True,
                        original_inference_steps=distill.num_ddim_timesteps,
                        timestep_scaling=distill.timestep_scaling)


class DDIMSolver:
    """The teacher's ODE solver on the skipping grid t_i = (i+1)·T/N − 1 (i = 0..N−1): one deterministic DDIM
    step from t_i to t_{i−1} (to t = 0's ᾱ from t_0)."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int):
        ratio = len(alphas_cumprod) // num_ddim_timesteps
        self.timesteps = (torch.arange(1, num_ddim_timesteps + 1) * ratio).round().long() - 1
        self.skip = ratio
        self.alpha = alphas_cumprod[self.timesteps]
        self.alpha_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a_prev = self.alpha_prev[index].to(x0)[:, None, None, None]
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def x0_and_eps(output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
               prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from a UNet output under its prediction type; `alpha` is ᾱ_t as (B, 1, 1, 1)."""
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        return (x_t - s * output) / a, output
    if prediction_type == "sample":
        return output, (x_t - a * output) / s
    if prediction_type == "v_prediction":
        return a * x_t - s * output, a * output + s * x_t
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; use epsilon, sample or v_prediction.")


def add_guidance_input(unet: torch.nn.Module, dim: int) -> None:
    """Give a UNet (LdmUNet or UNet2DConditionModel) the `timestep_cond` input of a guidance-conditioned LCM:
    `time_embedding.cond_proj`, zero-initialised so that it still computes what it did."""
    linear_1 = unet.time_embedding.linear_1
    unet.time_embedding.cond_proj = torch.nn.Linear(dim, linear_1.in_features, bias=False).to(linear_1.weight)
    torch.nn.init.zeros_(unet.time_embedding.cond_proj.weight)
    unet.register_to_config(time_cond_proj_dim=dim)


def lcm_student(pipe: DiffusionPipeline) -> torch.nn.Module | None:
    """The distilled UNet that `pipe`'s folder carries in `unet_lcm/` (the default model does), loaded once, in
    the dtype and on the device of the pipeline's own UNet; None when the folder has none."""
    if "_ldm_lcm_student" not in pipe.__dict__:
        folder = Path(pipe.name_or_path or "") / LCM_STUDENT
        base = pipe.__dict__.get("_ldm_base_unet", pipe.unet)
        pipe._ldm_lcm_student = (type(base).from_pretrained(folder, torch_dtype=base.dtype).to(base.device).eval()
                                 if (folder / "config.json").is_file() else None)
    return pipe._ldm_lcm_student


def use_lcm_student(pipe: DiffusionPipeline, on: bool = True) -> bool:
    """Make the model's distilled UNet `pipe.unet`, with `LCMScheduler` (on), or give the pipeline its own UNet
    back (off; its scheduler is left to the caller). Returns whether the student is in use."""
    student = lcm_student(pipe) if on else None
    if student is None:
        if "_ldm_base_unet" in pipe.__dict__:
            pipe.unet = pipe._ldm_base_unet
        return False
    if pipe.unet is not student:
        pipe._ldm_base_unet = pipe.unet
        pipe.unet = student
    if not isinstance(pipe.scheduler, LCMScheduler):
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return True


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An independent, gradient-free copy in eval mode (the teacher; the target network's body)."""
    return copy.deepcopy(model).requires_grad_(False).eval()


@dataclass
class ConsistencyLoss:
    """One distillation step's loss on a batch; all randomness from the generator passed in (so, like
    `DenoisingLoss`, a step's loss is a function of weights, batch and generator, and resumes exactly).

    The target network θ⁻ is `target` with the EMA's weights copied in before each step (`ema` None: the student
    itself without gradients, μ = 0, as LCM-LoRA trains)."""

    scheduler: DDPMScheduler  # the teacher's forward process (β schedule, prediction type)
    distill: DistillConfig
    teacher: torch.nn.Module
    target: torch.nn.Module | None  # a copy of the student, trainable flags intact; its trained ones come from `ema`
    ema: EMAModel | None
    empty: torch.Tensor  # ∅'s hidden states (1, T, D): the teacher's unconditional branch
    scaling: float  # the VAE's latent scaling factor
    device: torch.device = torch.device("cpu")
    solver: DDIMSolver = field(init=False)

    def __post_init__(self) -> None:
        self.solver = DDIMSolver(self.scheduler.alphas_cumprod, self.distill.num_ddim_timesteps)
        # the target's parameters that mirror the student's trained ones, in EMAModel's order
        self._target_params = ([p for p in self.target.parameters() if p.requires_grad] if self.target is not None
                               else [])
        if self.target is not None:
            self.target.requires_grad_(False)

    def __call__(self, unet: torch.nn.Module, batch: Batch, generator: torch.Generator,
                 text_encoder: torch.nn.Module | None = None) -> torch.Tensor:
        d, kind, device = self.distill, self.scheduler.config.prediction_type, self.device
        b = batch.mean.shape[0]
        eps_z = torch.randn(batch.mean.shape, generator=generator)
        noise = torch.randn(batch.mean.shape, generator=generator)
        index = torch.randint(0, d.num_ddim_timesteps, (b,), generator=generator)
        w = d.guidance_min - 1 + (d.guidance_max - d.guidance_min) * torch.rand(b, generator=generator)  # ω
        x0 = ((batch.mean + batch.std * eps_z) * self.scaling).to(device)  # z ~ q(z|x)
        context, noise, w = batch.context.to(device), noise.to(device), w.to(device)
        t_start = self.solver.timesteps[index].to(device)
        t_end = (t_start - self.solver.skip).clamp(min=0)
        x_t = self.scheduler.add_noise(x0, noise, t_start)
        alpha_t = self.scheduler.alphas_cumprod.to(device)[t_start][:, None, None, None]
        w_cond = self._timestep_cond(unet, w)

        # student: f_θ(x_{t_{n+k}}, t_{n+k}, ω, c)
        c_skip, c_out = (c[:, None, None, None] for c in boundary_scalings(t_start, d.timestep_scaling))
        out = unet(x_t, t_start, encoder_hidden_states=context, timestep_cond=w_cond).sample
        prediction = c_skip * x_t + c_out * x0_and_eps(out.float(), x_t, alpha_t, kind)[0]

        with torch.no_grad():
            # teacher: one guided DDIM step to t_n (∅ and c in one batch)
            both = self.teacher(torch.cat([x_t, x_t]), torch.cat([t_start, t_start]),
                                encoder_hidden_states=torch.cat([self.empty.to(context).expand_as(context), context]))
            uncond, cond = (x0_and_eps(o.float(), x_t, alpha_t, kind) for o in both.sample.chunk(2))
            ww = w[:, None, None, None]
            x0_g, eps_g = (c + ww * (c - u) for c, u in zip(cond, uncond))
            x_prev = self.solver.step(x0_g, eps_g, index.to(device))

            # target: f_θ⁻(x̂_{t_n}, t_n, ω, c)
            target_net = self._target(unet)
            alpha_prev = self.solver.alpha_prev.to(device)[index.to(device)][:, None, None, None]
            out_prev = target_net(x_prev, t_end, encoder_hidden_states=context,
                                  timestep_cond=self._timestep_cond(target_net, w)).sample
            c_skip_e, c_out_e = (c[:, None, None, None] for c in boundary_scalings(t_end, d.timestep_scaling))
            target = c_skip_e * x_prev + c_out_e * x0_and_eps(out_prev.float(), x_prev, alpha_prev, kind)[0]

        if d.loss == "l2":
            return (prediction - target).square().mean()
        return ((prediction - target).square() + d.huber_c ** 2).sqrt().sub(d.huber_c).mean()

    def _target(self, unet: torch.nn.Module) -> torch.nn.Module:
        if self.ema is None or self.target is None:
            return unet
        self.ema.copy_to(self._target_params)
        return self.target

    @staticmethod
    def _timestep_cond(unet: torch.nn.Module, w: torch.Tensor) -> torch.Tensor | None:
        dim = getattr(getattr(unet, "module", unet).config, "time_cond_proj_dim", None)
        return guidance_scale_embedding(w, dim) if dim else None
