"""LoRA fine-tuning on a folder of photos (optionally DreamBooth-style), through the one trainer.

`finetune_lora(photos, output)` stages the photos as captioned PNGs in the run folder, optionally adds the base
model's own class images (prior preservation), derives the training objective from the base model's scheduler,
trains LoRA adapters and draws a before/after grid. The base model on disk is never modified.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from .atomic import atomic_folder, atomic_write
from .config import Config, DataConfig, LoraTrainConfig, ModelConfig, TrainConfig, validate_config
from .extras import require_extra
from .generation import generate_images
from .hub import share_export
from .images import IMAGE_EXTENSIONS, decode_image
from .loading import DEFAULT_MODEL, load_pipeline, pick_device, pick_dtype
from .lora import KOHYA_FILE, LORA_FILE
from .objective import objective_of
from .pipeline import DEFAULT_MODEL_DIR, LdmPipeline
from .request import GenerationRequest

Note = Callable[[str], None]


@dataclass
class FinetuneResult:
    lora_file: Path  # pytorch_lora_weights.safetensors (diffusers layout)
    kohya_file: Path | None  # the kohya/A1111 file, when asked for
    config_file: Path  # the resolved training config
    grid: Path  # base model (row 1) vs with the LoRA (row 2), same prompt and seeds


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; save it as UTF-8.") from None


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
                raise ValueError(f"{path} line {number} is not a JSON object with a file_name; fix or remove "
                                 "that line.") from None
    return captions


def find_photos(photos: Path, prompt: str | None, note: Note) -> list[tuple[Path, str]]:
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
            raise ValueError(f"{path.name} has no caption (.txt or metadata.jsonl); pass --prompt for such photos.")
        found.append((path, caption))
    if ignored or broken:
        note(f"skipped {len(ignored)} non-image file(s) and {broken} unreadable image(s)")
    return found


def stage_photos(photos: list[tuple[Path, str]], data_dir: Path, resolution: int, note: Note) -> None:
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
    requests = [GenerationRequest(class_prompts[i % len(class_prompts)], sampler=None, seed=seed + i)
                for i in range(count)]
    for i, (request, (image,)) in enumerate(zip(requests, generate_images(pipe, requests))):
        image.save(data_dir / f"class-{i:04d}.png")
        (data_dir / f"class-{i:04d}.txt").write_text(request.prompt, encoding="utf-8")


def before_after_grid(model: str, lora_dir: Path, prompt: str, path: Path, images: int = 4) -> None:
    """Row 1: the base model; row 2: with the new LoRA; same prompt and seeds (0, 1, …); rows labelled on the left."""
    from diffusers.utils import make_image_grid

    device = pick_device("auto")
    pipe = load_pipeline(model, device, pick_dtype("auto", device))
    pipe.set_progress_bar_config(disable=True)
    request = GenerationRequest(prompt, sampler=None, seed=0, n=images)
    [before] = generate_images(pipe, [request])
    pipe.load_lora_weights(lora_dir / LORA_FILE)
    [after] = generate_images(pipe, [request])
    with atomic_write(path) as tmp:
        label_rows(make_image_grid(before + after, rows=2, cols=images), ["before", "after"]).save(tmp)


def remove_paths(paths: list[Path]) -> None:
    """Remove the files and folders a failed start created."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def label_rows(grid: PIL.Image.Image, labels: list[str]) -> PIL.Image.Image:
    """`grid` (rows of equal height) with a white strip on its left naming each row."""
    import PIL.ImageDraw
    import PIL.ImageFont

    font = PIL.ImageFont.load_default()  # no font file needed (a bitmap font before Pillow 10.1)
    boxes = [font.getbbox(label) for label in labels]  # (left, top, right, bottom)
    margin, row = 4, grid.height // len(labels)
    strip = max(box[2] for box in boxes) + 2 * margin
    out = PIL.Image.new("RGB", (strip + grid.width, grid.height), "white")
    out.paste(grid, (strip, 0))
    draw = PIL.ImageDraw.Draw(out)
    for i, (label, box) in enumerate(zip(labels, boxes)):
        draw.text((margin, i * row + (row - box[3] - box[1]) // 2), label, fill="black", font=font)
    return out


def finetune_lora(photos_dir: str | Path, output: str | Path, model: str = DEFAULT_MODEL, prompt: str | None = None,
                  rank: int = 8, alpha: float | None = None, steps: int = 400, learning_rate: float = 1e-3,
                  batch_size: int = 8, resolution: int | None = None, train_text_encoder: bool = False,
                  class_prompts: list[str] | tuple[str, ...] = (), num_class_images: int = 16, kohya: bool = False,
                  mixed_precision: str = "no", seed: int = 0, resume: bool = False, push_to_hub: str | None = None,
                  private: bool = False, note: Note = lambda msg: None, progress: bool = True,
                  checkpoint_every: int | None = None, sample_every: int = 0,
                  on_step: Callable[[int, float], None] | None = None) -> FinetuneResult:
    """Fine-tune LoRA adapters on the photos in `photos_dir` into the run folder `output`.

    Captions come from same-named .txt files, metadata.jsonl, or `prompt`. `class_prompts` turn on DreamBooth
    prior preservation with `num_class_images` images of the base model. `resume` continues a run in `output`.
    The folder gets a model card; `push_to_hub` (owner/name) uploads the LoRA files, card and grid.
    `progress=False` (--quiet) hides the progress bars. `checkpoint_every` (default: a quarter of the steps, at
    least 50) bounds the steps a crash costs; `sample_every` > 0 draws the trained prompt into `samples/` at that
    interval; `on_step(step, loss)` is the trainer's progress hook (an exception it raises stops the run at that
    step; `resume` continues it).
    """
    require_extra("train")
    from .checkpoints import CHECKPOINTS, checkpoints
    from .trainer import TrainingError, train

    photos_dir, output = Path(photos_dir), Path(output)
    # 1. Check inputs before any work
    if not photos_dir.is_dir():
        raise ValueError(f"{photos_dir} is not a folder; pass a folder of photos.")
    if output.exists() and any(output.iterdir()) and not resume:
        raise ValueError(f"{output} already exists; pass --resume to continue it, or choose another --output.")
    device = pick_device("auto")
    base = load_pipeline(model, device, pick_dtype("auto", device))
    base.set_progress_bar_config(disable=True)
    resolution = resolution or base.default_size
    multiple = math.lcm(8, base.vae_scale_factor)
    if resolution % multiple:
        raise ValueError(f"--resolution {resolution} is not a multiple of {multiple}; use e.g. "
                         f"{max(multiple, resolution // multiple * multiple)}.")
    objective = objective_of(base.scheduler.config, caption_dropout=0.0)  # the base's own noise schedule
    data_dir = output / "data"
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
                          learning_rate=learning_rate, lr_scheduler="constant", warmup_steps=min(50, steps // 10),
                          use_ema=False, validation_every=sample_every,
                          checkpoint_every=checkpoint_every or max(50, steps // 4),
                          keep_checkpoints=1),
        lora=LoraTrainConfig(rank=rank, alpha=alpha, kohya=kohya, train_text_encoder=train_text_encoder),
    )
    validate_config(config)  # every setting checked before photos are staged
    if push_to_hub is not None and push_to_hub.count("/") != 1:
        raise ValueError(f"--push-to-hub {push_to_hub}: name the repo as owner/name.")

    # 2. Stage the photos (and class images) as captioned RGB PNGs in the run folder; the folder appears whole
    # or not at all, so an interrupted run never resumes on part of the photos. A run that fails before its
    # first checkpoint leaves nothing behind: there is nothing to resume.
    existed, fresh = output.exists(), not output.exists() or not any(output.iterdir())
    try:
        if not (resume and data_dir.is_dir()):
            photos = find_photos(photos_dir, prompt, note)
            if not photos:
                raise ValueError(f"No usable image in {photos_dir}; add jpg/png/webp/bmp photos.")
            with atomic_folder(data_dir) as staging:
                stage_photos(photos, staging, resolution, note)
                if class_prompts:
                    note(f"generating {num_class_images} class images for prior preservation")
                    write_class_images(base, staging, list(class_prompts), num_class_images, seed)
        del base  # the trainer loads its own copy

        # 3. Train LoRA adapters with the shared trainer (samples, when asked for, of the trained prompt)
        sample_prompt = prompt or (data_dir / "instance-0000.txt").read_text(encoding="utf-8")
        config.train.validation_prompts = [sample_prompt]
        try:
            lora_file = train(config, progress=progress, on_step=on_step)
        except TrainingError as err:
            raise ValueError(str(err)) from None
    except BaseException:
        if fresh and not checkpoints(output / CHECKPOINTS):
            remove_paths(list(output.iterdir()) if existed else [output])
        raise

    # 4. Before/after grid for the trained prompt
    grid = output / "before_after.png"
    before_after_grid(model, output, sample_prompt, grid)
    share_export(output, "lora", model, [sample_prompt], grid, dataclasses.asdict(config), push_to=push_to_hub,
                 private=private, allow_patterns=[LORA_FILE, KOHYA_FILE])
    return FinetuneResult(lora_file, output / KOHYA_FILE if kohya else None, output / "config.yaml", grid)
