"""A fine-tune job: its options (the ones `ldm-app finetune-lora` has), checked before the job is accepted, and
the run itself, `finetune_lora` in the job's folder with the server's progress/cancel hook.

Restart safety is the trainer's: the run folder holds its checkpoints, and `finetune_lora(resume=True)` in the
same folder continues from the last one to the same weights, bit for bit, as a run that was never stopped.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ...atomic import atomic_folder
from ...finetune import finetune_lora
from ...lora import KOHYA_FILE, LORA_FILE

MAX_STEPS = 100_000
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# what a finished fine-tune publishes beside its LoRA, and what clients may download from its run folder
PUBLISHED = (LORA_FILE, KOHYA_FILE, "README.md", "before_after.png", "config.yaml")
SAMPLE = re.compile(r"samples/step-\d{7}\.png")


@dataclass
class FinetuneOptions:
    """A fine-tune as `ldm-app finetune-lora` takes it, plus the LoRA's name and the server's intervals."""

    name: str  # the LoRA's name in <lora:name:w>, the LoRA picker and GET /sdapi/v1/loras
    prompt: str | None = None  # caption of photos without their own
    steps: int = 400
    rank: int = 8
    alpha: float | None = None  # default: rank
    lr: float = 1e-3
    batch_size: int = 8
    resolution: int | None = None  # default: the model's
    train_text_encoder: bool = False
    class_prompts: list[str] = field(default_factory=list)  # prior preservation when not empty
    num_class_images: int = 16
    format: Literal["diffusers", "kohya"] = "diffusers"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    checkpoint_every: int | None = None  # steps between checkpoints (what a crash may cost); default: steps / 4
    sample_every: int | None = None  # steps between sample images; default: steps / 10, 0 = none

    def __post_init__(self) -> None:
        if not LORA_NAME.fullmatch(self.name or ""):
            raise ValueError(f"name={self.name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter "
                             "or digit (it becomes the LoRA's name in <lora:name:weight>).")
        checks = [("steps", self.steps, 1, MAX_STEPS), ("rank", self.rank, 1, 512), ("batch_size", self.batch_size, 1, 256),
                  ("num_class_images", self.num_class_images, 1, 1000), ("seed", self.seed, 0, 2**63 - 1),
                  ("checkpoint_every", self.checkpoint_every or 1, 1, MAX_STEPS),
                  ("sample_every", self.sample_every or 0, 0, MAX_STEPS),
                  ("resolution", self.resolution or 8, 8, 4096)]
        for key, value, low, high in checks:
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{key}={value!r}: use a whole number from {low} to {high}.")
        for key, value in (("lr", self.lr), ("alpha", self.alpha)):
            if value is not None and not (math.isfinite(value) and 0 < value <= 1e4):
                raise ValueError(f"{key}={value!r}: use a positive number (lr: e.g. 1e-3; alpha: e.g. the rank).")
        if self.format not in ("diffusers", "kohya"):
            raise ValueError(f"format={self.format!r}: use diffusers or kohya (kohya also writes an A1111 file).")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: use no, fp16 or bf16.")

    def to_params(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def every(self) -> tuple[int, int]:
        """(checkpoint_every, sample_every) with their defaults resolved."""
        checkpoint = self.checkpoint_every or max(1, self.steps // 4)
        sample = self.sample_every if self.sample_every is not None else max(1, self.steps // 10)
        return checkpoint, sample


def run_finetune(options: FinetuneOptions, photos: Path, run: Path, model: str,
                 on_step: Callable[[int, float], None], note: Callable[[str], None]) -> None:
    """Train (or resume) the job's LoRA in `run`; the trainer's exceptions, and `on_step`'s, propagate."""
    checkpoint_every, sample_every = options.every
    finetune_lora(photos, run, model=model, prompt=options.prompt, rank=options.rank, alpha=options.alpha,
                  steps=options.steps, learning_rate=options.lr, batch_size=options.batch_size,
                  resolution=options.resolution, train_text_encoder=options.train_text_encoder,
                  class_prompts=options.class_prompts, num_class_images=options.num_class_images,
                  kohya=options.format == "kohya", mixed_precision=options.mixed_precision, seed=options.seed,
                  resume=True, note=note, progress=False, checkpoint_every=checkpoint_every, sample_every=sample_every,
                  on_step=on_step)


def publish(run: Path, lora_dir: Path, name: str) -> Path:
    """Copy the finished LoRA (both formats where written), its card, grid and config to `lora_dir/name`, the
    folder the server lists LoRAs from; returns that folder."""
    target = lora_dir / name
    with atomic_folder(target) as tmp:
        for file in PUBLISHED:
            if (run / file).is_file():
                shutil.copy2(run / file, tmp / file)
    return target


def downloadable(run: Path, name: str) -> Path | None:
    """The file of the run folder a client may download under `name`, or None."""
    if name not in PUBLISHED and not SAMPLE.fullmatch(name):
        return None
    path = run / name
    return path if path.is_file() else None


def samples(run: Path) -> list[str]:
    """Sample images written so far, oldest first, as names `downloadable` serves."""
    return [f"samples/{p.name}" for p in sorted((run / "samples").glob("step-*.png"))]
