"""The ranges a model puts on image size, steps and guidance: checked by `GenerationRequest.resolved` for every
door and by `LdmPipeline.check_inputs` for direct calls, with the same messages. Kept to the standard library:
the pipeline imports it, and what the pipeline imports ships in every portable export."""

from __future__ import annotations

import math

MAX_SIZE = 4096  # pixels per side: far past any SD-1.x model, and still a bounded amount of memory


def check_size(name: str, size: int, factor: int, native: int) -> None:
    """An image side must be a positive multiple of the VAE's down-sampling factor, and at most MAX_SIZE."""
    if size <= 0 or size % factor:
        raise ValueError(f"{name}={size} is not a positive multiple of the VAE factor {factor}; use a multiple of "
                         f"{factor} such as {max(factor, size // factor * factor)} (this model's native size is "
                         f"{native}).")
    if size > MAX_SIZE:
        raise ValueError(f"{name}={size} is too large (max {MAX_SIZE}); this model's native size is {native}.")


def check_steps(name: str, steps: int, limit: int, why: str | None = None) -> None:
    """1 to `limit` denoising steps; `why` says where the limit comes from (default: the noise schedule)."""
    if not 1 <= steps <= limit:
        why = why or f"this model's noise schedule has no more, so use at most {limit}"
        raise ValueError(f"{name}={steps}; use 1 to {limit} steps: {why} (25–50 is typical).")


def check_guidance(name: str, guidance: float) -> None:
    """A finite classifier-free guidance scale ≥ 0."""
    if not math.isfinite(guidance):
        raise ValueError(f"{name}={guidance} is not a finite number; use e.g. 5 (1 = no guidance).")
    if guidance < 0:
        raise ValueError(f"{name}={guidance} is negative; use 0 or more (1 = no guidance, 5 is typical).")

