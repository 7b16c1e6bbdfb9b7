"""`distill_lcm(model, data, output)`: latent consistency distillation of a pipeline on a captioned image folder,
through the one trainer (see `ldm_app.consistency` for the method). The result samples in 2-8 steps with the
`lcm` sampler: an LCM-LoRA for the base model (`lora=True`), or a whole student pipeline.
"""

from __future__ import annotations

from pathlib import Path

from .config import Config, DataConfig, DistillConfig, LoraTrainConfig, ModelConfig, TrainConfig, validate_config
from .extras import require_extra
from .loading import DEFAULT_MODEL, load_pipeline, looks_local, pick_device, pick_dtype
from .objective import objective_of
from .pipeline import DEFAULT_MODEL_DIR

def lcm_config(model: str, data: str, output: str | Path, *, lora: bool = False, rank: int = 64,
               steps: int = 1000, batch_size: int = 16, learning_rate: float | None = None,
               guidance: tuple[float, float] = (3.0, 7.0), seed: int = 0, mixed_precision: str = "no") -> Config:
    """The training config that distils `model` (a pipeline folder, or "default") on the images in `data`.

    Whole students keep an EMA with decay 0.95 as the target network θ⁻ (and export it); LoRA students use the
    student itself as θ⁻ (μ = 0), as LCM-LoRA does, so the adapters stay one small file."""
    device = pick_device("auto")
    base = load_pipeline(model, device, pick_dtype("auto", device))
    model_path = str(DEFAULT_MODEL_DIR) if model == DEFAULT_MODEL else model
    resolution, scheduler_config = base.default_size, base.scheduler.config
    del base  # the trainer loads its own copy
    config = Config(
        data=DataConfig(path=str(data), resolution=resolution),
        model=ModelConfig(vae=model_path, vae_subfolder="vae", text_encoder=model_path,
                          text_encoder_subfolder="text_encoder", tokenizer=model_path, tokenizer_subfolder="tokenizer",
                          pretrained_unet=model_path, pretrained_unet_subfolder="unet"),
        objective=objective_of(scheduler_config, caption_dropout=0.0),
        train=TrainConfig(output_dir=str(output), seed=seed, batch_size=batch_size, max_steps=steps,
                          mixed_precision=mixed_precision,
                          learning_rate=learning_rate or (1e-4 if lora else 5e-5), lr_scheduler="constant",
                          warmup_steps=min(50, steps // 10), use_ema=not lora, ema_decay=0.95, validation_every=0,
                          checkpoint_every=max(25, steps // 10), keep_checkpoints=1),
        lora=LoraTrainConfig(rank=rank if lora else 0),
        distill=DistillConfig(method="lcm", guidance_min=guidance[0], guidance_max=guidance[1]),
    )
    validate_config(config)
    return config


def distill_lcm(model: str, data: str, output: str | Path, **options) -> Path:
    """Distil `model` into `output` (re-running the same call resumes); returns the exported pipeline folder, or
    the LoRA file with `lora=True`. `options` are `lcm_config`'s."""
    require_extra("train")
    from .trainer import TrainingError, train

    if looks_local(data) and not Path(data).expanduser().exists():
        raise ValueError(f"{data} does not exist; pass a folder of captioned images (metadata.jsonl or .txt files).")
    config = lcm_config(model, data, output, **options)
    try:
        return train(config)
    except TrainingError as err:
        raise ValueError(str(err)) from None
