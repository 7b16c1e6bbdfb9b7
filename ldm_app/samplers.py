"""Named samplers: diffusers schedulers built from the pipeline's own noise schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # diffusers is imported when a scheduler is made: the CLI lists the names without it
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

SAMPLERS: dict[str, tuple[str, dict, str]] = {
    # name: (diffusers scheduler class, extra config, label written into PNG metadata)
    "ddim": ("DDIMScheduler", {}, "DDIM"),  # Song et al. 2021; η = 0 deterministic, η = 1 ≈ DDPM
    "ddpm": ("DDPMScheduler", {}, "DDPM"),  # ancestral sampling, Ho et al. 2020, Algorithm 2
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),  # Lu et al. 2022
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),  # Karras et al. 2022
}


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """The named sampler over the same β schedule (and prediction type) as `config`."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    import diffusers

    cls, extra, _ = SAMPLERS[name]
    return getattr(diffusers, cls).from_config({**config, **extra})


def max_inference_steps(config: dict) -> int:
    """The most steps `config`'s schedule can be split into. With SD's `leading` spacing and `steps_offset` 1,
    T steps would start at t = T, one past the schedule's end, so T - steps_offset is the limit."""
    return config["num_train_timesteps"] - config.get("steps_offset", 0)
