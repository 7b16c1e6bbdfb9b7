"""`ldm-app generate PROMPT`: sample images with the pipeline and write them as PNGs carrying their parameters."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..loading import DEFAULT_MODEL
from ..samplers import SAMPLERS
from .common import (UserError, device_option, dtype_option, finite, model_option, notes,
                     quiet_option, utf8_text, variant_option)

if TYPE_CHECKING:
    from ..pipeline import LdmPipeline
    from ..png_metadata import GenerationParams

MAX_SIZE = 4096

GENERATE_EXAMPLES = """

\b
Examples:
  ldm-app generate "a cat"
  ldm-app generate "a red heart" -n 8 --grid -o hearts/
  ldm-app generate "a rocket" --sampler dpm++ --steps 15 --seed 42 -o rocket.png
  ldm-app generate --from rocket.png -o again.png
  ldm-app generate "a cat" --model ./my-run/pipeline --device cuda --dtype fp16
"""



def reuse_png(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--from: the PNG's parameters become the defaults of every other option (click's default_map), so that
    what is given on the command line still wins and each stored value is checked like typed input.

    A downloaded PNG must not choose what gets loaded: its model is reused only when it is the default model or a
    folder on this machine; a hub id or a missing folder is reported and the default model used instead."""
    if value is not None:
        stored = dataclasses.asdict(read_params_or_fail(value))
        model = stored.get("model")
        if not isinstance(model, str) or (model != DEFAULT_MODEL and not Path(model).expanduser().is_dir()):
            ctx.meta["untrusted_model"] = model
            stored.pop("model")
        ctx.default_map = {**(ctx.default_map or {}), **stored}
    return value


@click.command(epilog=GENERATE_EXAMPLES)
@click.argument("prompt", required=False, callback=utf8_text)
@model_option()
@variant_option
@click.option("--negative-prompt", default="", callback=utf8_text, help="What to steer away from (replaces the empty prompt in CFG).")
@click.option("--steps", type=click.IntRange(min=1), default=25, help="Denoising steps.")
@click.option("--guidance", type=click.FloatRange(min=0), default=5.0, callback=finite, help="Classifier-free guidance scale w (1 = off).")
@click.option("--eta", type=click.FloatRange(0, 1), default=0.0, help="DDIM η: 0 deterministic, 1 ≈ DDPM.")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), default="ddim", help="Reverse-process solver.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None, help="Seed of the first image (random if absent); image i uses seed + i.")
@click.option("-n", "--num-images", type=click.IntRange(min=1), default=1, help="Images to generate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, help="Images per forward pass.")
@click.option("--height", type=int, default=None, help="Image height (default: the model's native size).")
@click.option("--width", type=int, default=None, help="Image width (default: the model's native size).")
@click.option("-o", "--output", default=None, help="A .png file, or a folder for numbered files. [default: .]")
@click.option("--overwrite", is_flag=True, help="Replace existing files.")
@click.option("--grid", is_flag=True, help="Also write all images as one grid image.")
@device_option
@dtype_option
@click.option("--from", "from_png", type=click.Path(dir_okay=False), default=None, is_eager=True, expose_value=False,
              callback=reuse_png, help="Reuse every parameter stored in a PNG made by ldm-app (other options override it).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="LoRA file or folder, optionally with a scale (repeatable).")
@quiet_option("No progress bar or notes; only the written paths.")
def generate(prompt: str | None, model: str, variant: str | None, negative_prompt: str, steps: int, guidance: float,
             eta: float, sampler: str, seed: int | None, num_images: int, batch_size: int, height: int | None, width: int | None,
             output: str | None, overwrite: bool, grid: bool, device: str, dtype: str, loras: tuple[str, ...],
             quiet: bool) -> None:
    """Generate images for PROMPT and print the paths written."""
    import torch

    from ..loading import apply_loras, dtype_name, load_pipeline, model_record, pick_device, pick_dtype
    from ..png_metadata import GenerationParams, save_png
    from ..samplers import make_scheduler

    # 1. Parameters (--from has already filled in the defaults)
    if prompt is None:
        raise UserError("No PROMPT given; pass a prompt, e.g. ldm-app generate \"a cat\" (or --from image.png).")
    if seed is None:
        seed = random.randrange(2**31)
    note = notes(quiet)
    note(f"seed: {seed}")
    stored_model = click.get_current_context().meta.get("untrusted_model")
    if stored_model is not None and click.get_current_context().get_parameter_source("model").name == "DEFAULT":
        note(f"note: the PNG was made with {stored_model!r}, which is not a model folder on this machine; using "
             f"{model!r} (pass --model {stored_model} to load that one)")
    if not prompt.strip():
        note("note: empty prompt, drawing an unconditional sample")

    # 2. Model, sampler, sizes, output paths (all checked before any work); a run that stops early leaves no
    # empty claimed files behind
    with claimed_outputs(output, num_images, overwrite) as paths:
        grid_path = paths[0].with_name(paths[0].stem + "-grid.png") if grid else None
        if grid_path is not None and grid_path.exists() and not overwrite:
            raise UserError(f"{grid_path} already exists; pass --overwrite or choose another --output.")
        dev = pick_device(device)
        weights_dtype = pick_dtype(dtype, dev)
        dtype = dtype_name(weights_dtype)  # as resolved, for the PNG
        pipe = load_pipeline(model, dev, weights_dtype, variant)
        pipe.set_progress_bar_config(disable=quiet, leave=False)
        height = pipe.default_size if height is None else height
        width = pipe.default_size if width is None else width
        check_size("height", height, pipe.vae_scale_factor)
        check_size("width", width, pipe.vae_scale_factor)
        check_steps(steps, pipe)
        check_free_space(paths[0].parent, num_images + grid, width, height)
        pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
        apply_loras(pipe, loras)
        warn_if_truncated(pipe, prompt, note)

        # 3. Sample in batches. Image i has its own CPU generator seeded with seed + i, so its noise is the same
        # in any batch and on any device (the pixels can still differ in the last bit with batch size and hardware)
        images = []
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(count)]
            images += pipe([prompt] * count, negative_prompt=[negative_prompt] * count, height=height, width=width,
                           num_inference_steps=steps, guidance_scale=guidance, eta=eta, generator=generators).images

        # 4. Write PNGs with their parameters
        params = GenerationParams(prompt, negative_prompt, steps, guidance, eta, sampler, seed, width, height,
                                  model_record(model), dtype, list(loras))
        for i, (image, path) in enumerate(zip(images, paths)):
            save_png(image, path, dataclasses.replace(params, seed=seed + i))
            click.echo(str(path))
        if grid_path is not None:
            from diffusers.utils import make_image_grid

            cols = min(len(images), 8)
            rows = -(-len(images) // cols)
            blank = images[0].copy()
            blank.paste((255, 255, 255), (0, 0, *blank.size))
            save_png(make_image_grid(images + [blank] * (rows * cols - len(images)), rows=rows, cols=cols), grid_path,
                     params)
            click.echo(str(grid_path))


def check_steps(steps: int, pipe: LdmPipeline) -> None:
    from ..samplers import max_inference_steps

    limit = max_inference_steps(pipe.scheduler.config)
    if steps > limit:
        raise UserError(f"--steps {steps} is more than this model's noise schedule allows; use at most {limit} "
                        "(25–50 is typical).")


def check_size(name: str, value: int, factor: int) -> None:
    if value <= 0 or value % factor:
        raise UserError(f"--{name} {value} is not a positive multiple of the VAE factor {factor}; "
                        f"use e.g. {max(factor, value // factor * factor)}.")
    if value > MAX_SIZE:
        raise UserError(f"--{name} {value} is too large (max {MAX_SIZE}); this model's native size is smaller.")


def output_paths(output: str | None, count: int, overwrite: bool) -> list[Path]:
    """Where each image goes: a file (`x.png`, or x-0.png, x-1.png … for several) or new names in a folder.

    Each name is claimed at once by creating it empty with O_EXCL, so two runs writing into one folder never
    pick the same name; the images replace their empty files atomically (`release_unwritten` removes the rest)."""
    target = Path(output or ".").expanduser()
    if target.suffix.lower() in {".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}:
        raise UserError(f"--output {output}: images are written as PNG (which stores the generation parameters); "
                        f"use {target.with_suffix('.png').name} or a folder.")
    named = target.suffix.lower() == ".png"
    folder = target.parent if named else target
    if not named:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # reported below as not creatable
    if not folder.is_dir():
        raise UserError(f"Output folder {folder} does not exist or cannot be created; pick a writable --output.")
    if not os.access(folder, os.W_OK):
        raise UserError(f"Output folder {folder} is not writable; pick a writable --output.")
    if named:
        paths = [target] if count == 1 else [target.with_name(f"{target.stem}-{i}.png") for i in range(count)]
        if overwrite:
            return paths
        claimed = []
        for path in paths:
            if not claim(path):
                release_unwritten(claimed)
                raise UserError(f"{path} already exists; pass --overwrite or choose another --output.")
            claimed.append(path)
        return claimed
    paths, i = [], 0
    while len(paths) < count:  # the next free numbers; a name another run claims first is skipped
        path = folder / f"ldm-{i:05d}.png"
        if claim(path):
            paths.append(path)
        i += 1
    return paths


def claim(path: Path) -> bool:
    """Create `path` empty if no file has that name yet (atomically: O_EXCL); whether this call created it."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


@contextmanager
def claimed_outputs(output: str | None, count: int, overwrite: bool) -> Iterator[list[Path]]:
    """`output_paths`, released again where the block stops before an image was written."""
    paths = output_paths(output, count, overwrite)
    try:
        yield paths
    finally:
        release_unwritten(paths)


def release_unwritten(paths: list[Path]) -> None:
    """Remove the claimed names that are still empty (a run that stopped before writing them)."""
    for path in paths:
        if path.is_file() and path.stat().st_size == 0:
            path.unlink()


def check_free_space(folder: Path, count: int, width: int, height: int) -> None:
    """Refuse before sampling when the images cannot fit (a PNG is at most about 3 bytes a pixel)."""
    need = count * (3 * width * height + 65536)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"{folder} has {free // 2**20} MiB free but {count} images of {width}x{height} need up to "
                        f"{-(-need // 2**20)} MiB; free some space or choose another --output.")


def read_params_or_fail(path: str) -> GenerationParams:
    from ..png_metadata import read_params

    if not Path(path).is_file():
        raise UserError(f"--from {path}: no such file; pass a PNG written by ldm-app generate.")
    return read_params(path)


def warn_if_truncated(pipe: LdmPipeline, prompt: str, note: Callable[[str], None]) -> None:
    """Say once, before sampling, how many tokens the text encoder will not see (not once per batch)."""
    dropped = pipe.dropped_tokens(prompt)
    if dropped:
        logging.getLogger("ldm_app.pipeline").setLevel(logging.ERROR)  # silences the pipeline's per-call warning
        note(f"warning: the prompt's last {dropped} token(s) lie beyond the text encoder's limit of "
             f"{pipe.tokenizer.model_max_length} and are dropped")
