"""`ldm-app finetune-lora PHOTOS_DIR`: LoRA (optionally DreamBooth-style) fine-tuning through the one trainer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
import torch

from .atomic import atomic_folder, atomic_write
from .cli import DEFAULT_MODEL, UserError, app, load_pipeline, pick_device, pick_dtype
from .config import Config, DataConfig, LoraTrainConfig, ModelConfig, TrainConfig
from .images import IMAGE_EXTENSIONS, decode_image
from .objective import objective_of
from .lora import KOHYA_FILE, LORA_FILE
from .pipeline import DEFAULT_MODEL_DIR, LdmPipeline

FINETUNE_EXAMPLES = """

\b
Examples:
  ldm-app finetune-lora ./photos --prompt "a photo of sks cat" --steps 400
  ldm-app finetune-lora ./photos --prompt "sks style" --rank 16 --format kohya -o my-lora
  ldm-app finetune-lora ./photos --prompt "a sks cat" --train-text-encoder --lr 3e-4
  ldm-app finetune-lora ./photos --prompt "a sks dog" --prior-preservation --class-prompt "a dog"
  ldm-app generate "a sks dog" --lora my-lora:0.8
"""


def read_captions(photos: Path) -> dict[str, str]:
    """file name → caption from metadata.jsonl (the `datasets` imagefolder layout), if there is one."""
    path = photos / "metadata.jsonl"
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                captions[row["file_name"]] = row.get("text", "")
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path} line {number} is not a JSON object with a file_name; fix or remove "
                                "that line.") from None
    return captions


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8.") from None


def find_photos(photos: Path, prompt: str | None, note: Callable[[str], None]) -> list[tuple[Path, str]]:
    """Every decodable image with its caption: a same-named .txt file, else its `text` in metadata.jsonl, else
    `prompt`. Everything is checked here, before anything is written. Non-images and undecodable files are
    counted and reported."""
    metadata = read_captions(photos)
    files = sorted(p for p in photos.iterdir() if p.is_file())
    ignored = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS | {".txt", ".jsonl"}]
    found, broken = [], 0
    for path in (p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS):
        if decode_image({"path": str(path), "bytes": None}) is None:
            broken += 1
            continue
        sidecar = path.with_suffix(".txt")
        caption = read_text(sidecar).strip() if sidecar.is_file() else metadata.get(path.name) or prompt
        if not caption:
            raise UserError(f"{path.name} has no caption (.txt or metadata.jsonl); pass --prompt for such photos.")
        found.append((path, caption))
    if ignored or broken:
        note(f"skipped {len(ignored)} non-image file(s) and {broken} unreadable image(s)")
    return found


def stage_photos(photos: list[tuple[Path, str]], data_dir: Path, resolution: int,
                 note: Callable[[str], None]) -> None:
    """Copy each photo as an RGB PNG (EXIF applied) with a .txt caption into `data_dir`."""
    small = 0
    for i, (path, caption) in enumerate(photos):
        image = decode_image({"path": str(path), "bytes": None})
        small += min(image.size) < resolution
        image.save(data_dir / f"instance-{i:04d}.png")
        (data_dir / f"instance-{i:04d}.txt").write_text(caption, encoding="utf-8")
    if small:
        note(f"warning: {small} image(s) smaller than {resolution} px are upscaled")


def write_class_images(pipe: LdmPipeline, data_dir: Path, class_prompts: list[str], count: int, seed: int) -> None:
    """DreamBooth prior preservation: the base model's own images of the class (the class prompts in turn),
    trained on beside the photos so that the class keeps its look."""
    for i in range(count):
        prompt = class_prompts[i % len(class_prompts)]
        image = pipe(prompt, num_inference_steps=25, generator=torch.Generator().manual_seed(seed + i)).images[0]
        image.save(data_dir / f"class-{i:04d}.png")
        (data_dir / f"class-{i:04d}.txt").write_text(prompt, encoding="utf-8")


def before_after_grid(model: str, lora_dir: Path, prompt: str, path: Path, seeds=(0, 1, 2, 3)) -> None:
    """Row 1: the base model; row 2: with the new LoRA; same prompt and seeds."""
    from diffusers.utils import make_image_grid

    device = pick_device("auto")
    pipe = load_pipeline(model, device, pick_dtype("auto", device), quiet=True)
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    before = pipe([prompt] * len(seeds), num_inference_steps=25, generator=gens()).images
    pipe.load_lora_weights(lora_dir / LORA_FILE)
    after = pipe([prompt] * len(seeds), num_inference_steps=25, generator=gens()).images
    with atomic_write(path) as tmp:
        make_image_grid(before + after, rows=2, cols=len(seeds)).save(tmp)


@app.command("finetune-lora", epilog=FINETUNE_EXAMPLES)
@click.argument("photos_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", default=DEFAULT_MODEL, help="Base pipeline folder or hub id ('default' = the embedded model).")
@click.option("--prompt", default=None, help="Caption for photos without a .txt or metadata.jsonl caption.")
@click.option("--rank", type=click.IntRange(min=1), default=8, help="LoRA rank r.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None, help="LoRA α (default: rank).")
@click.option("--steps", type=click.IntRange(min=1), default=400, help="Optimizer steps.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, help="Learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8)
@click.option("--resolution", type=click.IntRange(min=8), default=None, help="Training size (default: the model's).")
@click.option("--train-text-encoder", is_flag=True,
              help="Also put LoRA on the text encoder's attention (q/k/v/out_proj): learns new words better.")
@click.option("--prior-preservation", is_flag=True, help="DreamBooth: also train on the base model's class images.")
@click.option("--class-prompt", "class_prompts", multiple=True,
              help="Prompt for the class images, e.g. 'a photo of a cat'; repeat it to use several in turn.")
@click.option("--num-class-images", type=click.IntRange(min=1), default=16)
@click.option("--format", "fmt", type=click.Choice(["diffusers", "kohya"]), default="diffusers",
              help="kohya: also write a kohya/A1111 file.")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no",
              help="Autocast while training (fp16 on CUDA GPUs, bf16 on recent ones); LoRA weights stay fp32.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("lora-output"))
@click.option("--seed", type=int, default=0)
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint.")
@click.option("-q", "--quiet", is_flag=True)
def finetune_lora(photos_dir: Path, model: str, prompt: str | None, rank: int, alpha: float | None, steps: int,
                  lr: float, batch_size: int, resolution: int | None, train_text_encoder: bool,
                  prior_preservation: bool, class_prompts: tuple[str, ...], num_class_images: int, fmt: str,
                  mixed_precision: str, output: Path, seed: int, resume: bool, quiet: bool) -> None:
    """Fine-tune LoRA adapters on the photos in PHOTOS_DIR; the base model on disk is never modified."""
    from .trainer import TrainingError, train

    note = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    # 1. Check inputs before any work
    if not photos_dir.is_dir():
        raise UserError(f"{photos_dir} is not a folder; pass a folder of photos.")
    if prior_preservation and not class_prompts:
        raise UserError("--prior-preservation needs --class-prompt, e.g. --class-prompt \"a photo of a cat\".")
    if output.exists() and any(output.iterdir()) and not resume:
        raise UserError(f"{output} already exists; pass --resume to continue it, or choose another --output.")
    device = pick_device("auto")
    base = load_pipeline(model, device, pick_dtype("auto", device), quiet=True)
    resolution = resolution or base.default_size
    if resolution % base.vae_scale_factor:
        raise UserError(f"--resolution {resolution} is not a multiple of the VAE factor {base.vae_scale_factor}.")
    try:
        objective = objective_of(base.scheduler.config, caption_dropout=0.0)  # the base's own noise schedule
    except ValueError as err:
        raise UserError(str(err)) from None

    # 2. Stage the photos (and class images) as captioned RGB PNGs in the run folder; the folder appears whole
    # or not at all, so an interrupted run never resumes on part of the photos
    data_dir = output / "data"
    if not (resume and data_dir.is_dir()):
        photos = find_photos(photos_dir, prompt, note)
        if not photos:
            raise UserError(f"No usable image in {photos_dir}; add jpg/png/webp/bmp photos.")
        with atomic_folder(data_dir) as staging:
            stage_photos(photos, staging, resolution, note)
            if prior_preservation:
                note(f"generating {num_class_images} class images for prior preservation")
                base.set_progress_bar_config(disable=True)
                write_class_images(base, staging, list(class_prompts), num_class_images, seed)
    del base

    # 3. Train LoRA adapters with the shared trainer
    model_path = str(DEFAULT_MODEL_DIR) if model == DEFAULT_MODEL else model
    # Built directly, not from "key=value" strings: a path such as "on" or "null" must stay a path.
    config = Config(
        data=DataConfig(path=str(data_dir), resolution=resolution),
        model=ModelConfig(vae=model_path, vae_subfolder="vae", text_encoder=model_path,
                          text_encoder_subfolder="text_encoder", tokenizer=model_path, tokenizer_subfolder="tokenizer",
                          pretrained_unet=model_path, pretrained_unet_subfolder="unet"),
        objective=objective,
        train=TrainConfig(output_dir=str(output), seed=seed, batch_size=batch_size, max_steps=steps,
                          mixed_precision=mixed_precision,
                          learning_rate=lr, lr_scheduler="constant", warmup_steps=min(50, steps // 10),
                          use_ema=False, validation_every=0, checkpoint_every=max(50, steps // 4),
                          keep_checkpoints=1),
        lora=LoraTrainConfig(rank=rank, alpha=alpha, kohya=fmt == "kohya", train_text_encoder=train_text_encoder),
    )
    try:
        lora_file = train(config)
    except (ValueError, TrainingError) as err:
        raise UserError(str(err)) from None

    # 4. Before/after grid for the trained prompt
    grid = output / "before_after.png"
    sample_prompt = prompt or (data_dir / "instance-0000.txt").read_text(encoding="utf-8")
    before_after_grid(model, output, sample_prompt, grid)
    for path in (lora_file, output / KOHYA_FILE if fmt == "kohya" else None, output / "config.yaml", grid):
        if path is not None:
            click.echo(str(path))
