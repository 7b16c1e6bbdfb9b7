"""Named samplers: diffusers schedulers built from the pipeline's own noise schedule, and their A1111 names.

| ours           | A1111 `Sampler` (+ `Schedule type`)   | diffusers                                                 |
|----------------|---------------------------------------|-----------------------------------------------------------|
| `ddim`         | DDIM                                  | DDIMScheduler                                             |
| `ddpm`         | DDIM, written with `Eta DDIM: 1`      | DDPMScheduler                                             |
| `euler`        | Euler                                 | EulerDiscreteScheduler                                    |
| `euler-karras` | Euler + Karras                        | EulerDiscreteScheduler(use_karras_sigmas=True)            |
| `euler-a`      | Euler a                               | EulerAncestralDiscreteScheduler                           |
| `heun`         | Heun                                  | HeunDiscreteScheduler                                     |
| `heun-karras`  | Heun + Karras                         | HeunDiscreteScheduler(use_karras_sigmas=True)             |
| `lms`          | LMS                                   | LMSDiscreteScheduler                                      |
| `lms-karras`   | LMS + Karras ("LMS Karras")           | LMSDiscreteScheduler(use_karras_sigmas=True)              |
| `dpm++`        | DPM++ 2M                              | DPMSolverMultistepScheduler(algorithm_type="dpmsolver++") |
| `dpm++-karras` | DPM++ 2M + Karras ("DPM++ 2M Karras") | the same with use_karras_sigmas=True                      |
| `unipc`        | UniPC                                 | UniPCMultistepScheduler                                   |
| `lcm`          | LCM                                   | LCMScheduler                                              |

`lcm` samples latent consistency models only (a distilled UNet, or a base model with an LCM-LoRA): it has its
own defaults, 4 steps at guidance 1 (no CFG: the guidance was distilled in), which callers take from
`sampler_defaults` where the user gave none.

Old A1111 (before 1.9) wrote Karras into the name ("DPM++ 2M Karras"); both spellings read.

A1111 has no DDPM sampler. DDIM at η = 1 is DDPM's ancestral sampler (Song et al. 2021, §4.1: the
generative process becomes Markovian with DDPM's posterior variance), so `ddpm` is written as DDIM with
`Eta DDIM: 1`; the two differ only in the last step (DDPM steps to ᾱ = 1, DDIM to ᾱ_0 with SD's
`set_alpha_to_one=False`). Reading that back gives `ddim` at η = 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # diffusers is imported when a scheduler is made: the CLI lists the names without it
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

KARRAS = {"use_karras_sigmas": True}  # σ_i spaced as in Karras et al. 2022, eq. 5 (ρ = 7)


class Sampler(NamedTuple):
    scheduler: str  # the name of the diffusers class that runs it
    config: dict  # overrides of the pipeline's scheduler config
    a1111: str  # A1111's `Sampler` name
    karras: bool = False  # A1111's `Schedule type: Karras`
    steps: int | None = None  # its own default number of steps (None: the caller's usual default)
    guidance: float | None = None  # its own default guidance scale (None: the caller's usual default)


SAMPLERS: dict[str, Sampler] = {  # keyed by the CLI's names
    "ddim": Sampler("DDIMScheduler", {}, "DDIM"),  # Song et al. 2021; η = 0 deterministic
    "ddpm": Sampler("DDPMScheduler", {}, "DDIM"),  # Ho et al. 2020, Algorithm 2 (= DDIM at η = 1, see above)
    "euler": Sampler("EulerDiscreteScheduler", {}, "Euler"),  # Karras et al. 2022, Algorithm 1 without step 2
    "euler-karras": Sampler("EulerDiscreteScheduler", KARRAS, "Euler", karras=True),
    "euler-a": Sampler("EulerAncestralDiscreteScheduler", {}, "Euler a"),  # Euler plus fresh noise each step
    "heun": Sampler("HeunDiscreteScheduler", {}, "Heun"),  # Karras et al. 2022, Algorithm 1 (2 UNet calls a step)
    "heun-karras": Sampler("HeunDiscreteScheduler", KARRAS, "Heun", karras=True),
    "lms": Sampler("LMSDiscreteScheduler", {}, "LMS"),  # linear multistep on σ (k-diffusion's sample_lms)
    "lms-karras": Sampler("LMSDiscreteScheduler", KARRAS, "LMS", karras=True),
    "dpm++": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),  # Lu et al. 2022
    "dpm++-karras": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", **KARRAS}, "DPM++ 2M",
                            karras=True),
    "unipc": Sampler("UniPCMultistepScheduler", {}, "UniPC"),  # Zhao et al. 2023, predictor-corrector
    "lcm": Sampler("LCMScheduler", {}, "LCM", steps=4, guidance=1.0),  # Luo et al. 2023, consistency models only
}


def sampler_defaults(name: str, steps: int | None, guidance: float | None, default_steps: int = 25,
                     default_guidance: float = 5.0) -> tuple[int, float]:
    """Steps and guidance for sampler `name`: those given, else the sampler's own, else the caller's defaults."""
    sampler = SAMPLERS.get(name)
    own_steps, own_guidance = (sampler.steps, sampler.guidance) if sampler else (None, None)
    return (steps if steps is not None else own_steps if own_steps is not None else default_steps,
            guidance if guidance is not None else own_guidance if own_guidance is not None else default_guidance)


def _a1111_names() -> dict[tuple[str, bool], str]:
    """(A1111 sampler name in lower case, Karras?) → ours; the first entry wins, so DDIM reads back as `ddim`."""
    names: dict[tuple[str, bool], str] = {}
    for name, sampler in SAMPLERS.items():
        names.setdefault((sampler.a1111.lower(), sampler.karras), name)
    return names


A1111_NAMES = _a1111_names()


def sampler_from_a1111(name: str, schedule_type: str | None = None) -> str | None:
    """Our sampler for A1111's `Sampler` (and `Schedule type`), or None when there is none.

    Both spellings A1111 has used work: "DPM++ 2M Karras" (before 1.9) and "DPM++ 2M" + "Karras" (since).
    """
    label = name.strip().lower()
    karras = (schedule_type or "").strip().lower() == "karras"
    if label.endswith(" karras"):
        label, karras = label.removesuffix(" karras"), True
    return A1111_NAMES.get((label, karras))


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """The named sampler over the same β schedule (and prediction type) as `config`."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    import diffusers

    sampler = SAMPLERS[name]
    return getattr(diffusers, sampler.scheduler).from_config({**config, **sampler.config})


def max_inference_steps(config: dict) -> int:
    """The most steps `config`'s schedule can be split into. With SD's `leading` spacing and `steps_offset` 1,
    T steps would start at t = T, one past the schedule's end, so T - steps_offset is the limit."""
    return config["num_train_timesteps"] - config.get("steps_offset", 0)
