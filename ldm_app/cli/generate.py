"""`ldm-app generate PROMPT`: sample images with the pipeline and write them as PNGs carrying their parameters."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..loading import trusted_model
from ..samplers import SAMPLERS
from .batch import BATCH_EXAMPLES, batch_options, run_batch
from .common import (UserError, device_option, dtype_option, finite, model_option, notes,
                     quiet_option, threads_option, utf8_text, variant_option)

if TYPE_CHECKING:
    import PIL.Image

    from ..pipeline import LdmPipeline
    from ..request import GenerationRequest

GENERATE_EXAMPLES = """

\b
Examples:
  ldm-app generate "a cat"
  ldm-app generate "a red heart" -n 8 --grid -o hearts/
  ldm-app generate "a rocket" --sampler dpm++ --steps 15 --seed 42 -o rocket.png
  ldm-app generate "a cat" --sampler lcm            (4 steps of the distilled UNet)
  ldm-app generate --from rocket.png -o again.png
  ldm-app generate "a cat" --model ./my-run/pipeline --device cuda --dtype fp16
""" + BATCH_EXAMPLES
# The options a PNG's parameters fill in for --from (its input files are checked separately)
RECORDED_OPTIONS = ("prompt", "negative_prompt", "steps", "guidance", "eta", "sampler", "seed", "width", "height",
                    "model", "dtype", "loras", "strength", "mask_feather")



def reuse_png(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--from: the PNG's parameters (ldm-app's or A1111's) become the defaults of every other option (click's
    default_map), so that what is given on the command line still wins and each stored value is checked like
    typed input.

    A downloaded PNG must not choose what gets loaded: its model is reused only when it is the default model or a
    folder on this machine; a hub id or a missing folder is reported and the default model used instead."""
    if value is None:
        return None
    stored, ignored = read_params_or_fail(value)
    defaults = {name: getattr(stored, name) for name in RECORDED_OPTIONS}
    if not trusted_model(stored.model):
        ctx.meta["untrusted_model"] = defaults.pop("model")
    # the recorded inputs are checked (there and unchanged) in the command, where --image/--mask may replace them
    ctx.meta["recorded_inputs"] = {"image_path": stored.image_sha256, "mask_path": stored.mask_sha256}
    defaults |= {"image_path": stored.image_path, "mask_path": stored.mask_path, "no_paste_back": not stored.paste_back}
    ctx.meta["ignored"], ctx.meta["from_png"] = ignored, value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def check_recorded_inputs(ctx: click.Context, png: str, note: Callable[[str], None]) -> None:
    """--from with an image-to-image or inpainting PNG: its input files must still be there, unchanged."""
    from ..images import file_sha256

    for name, digest in ctx.meta.get("recorded_inputs", {}).items():
        path, option = ctx.params[name], "--" + name.removesuffix("_path")
        if path is None or ctx.get_parameter_source(name).name != "DEFAULT_MAP":
            continue
        if not Path(path).is_file():
            raise UserError(f"{png} was made from {option} {path}, which is no longer there; pass {option} PATH.")
        if digest is not None and file_sha256(path, len(digest)) != digest:
            raise UserError(f"{png} was made from {option} {path}, which has changed since (sha256 {digest}…); pass "
                            f"{option} PATH to use it anyway.")
        note(f"note: reusing {option} {path} (unchanged)")


def resolve_lora_tags(prompt: str, loras: tuple[str, ...], lora_dir: str | None) -> tuple[str, tuple[str, ...]]:
    """A1111's `<lora:name:weight>` tags out of the prompt, found in --lora-dir, added to --lora."""
    from ..lora_tags import find_lora, split_lora_tags

    text, tags = split_lora_tags(prompt)
    if tags and lora_dir is None:
        raise UserError(f"The prompt names LoRAs in A1111's <lora:name:weight> syntax ({', '.join(n for n, _ in tags)})"
                        "; pass --lora-dir with the folder that holds them.")
    return text, (*loras, *(f"{find_lora(name, Path(lora_dir))}:{weight}" for name, weight in tags))


@click.command(epilog=GENERATE_EXAMPLES)
@click.argument("prompt", required=False, callback=utf8_text)
@model_option()
@variant_option
@click.option("--negative-prompt", default="", callback=utf8_text, help="What to steer away from (replaces the empty prompt in CFG).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Denoising steps.  [default: 25; lcm: 4]")
@click.option("--guidance", type=click.FloatRange(min=0), default=None, callback=finite,
              help="Classifier-free guidance scale w (1 = off).  [default: 5; lcm: 1]")
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
              callback=reuse_png, help="Reuse the parameters stored in a PNG made by ldm-app or A1111 (options given override "
              "them).")
@click.option("--image", "image_path", type=click.Path(dir_okay=False), default=None,
              help="Start from this image (image-to-image, SDEdit); resized to cover --height × --width and "
                   "center-cropped.")
@click.option("--strength", type=click.FloatRange(0, 1), default=None,
              help="With --image: the fraction of the schedule that redraws it (0 keeps it, 1 ignores it).  "
                   "[default: 0.8, 1 with --mask]")
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False), default=None,
              help="With --image: inpaint where this mask is white; elsewhere the input is kept exactly.")
@click.option("--no-paste-back", is_flag=True,
              help="With --mask: keep the decoded pixels outside the mask instead of the input's own.")
@click.option("--mask-feather", type=click.IntRange(min=0), default=None,
              help="With --mask: pixels over which the paste-back fades in, inside the mask.  [default: the VAE factor]")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="LoRA file or folder, optionally with a scale (repeatable).")
@click.option("--lora-dir", type=click.Path(file_okay=False), default=None,
              help="Folder in which <lora:NAME:WEIGHT> tags in the prompt find NAME.safetensors (A1111's syntax).")
@threads_option
@batch_options
@quiet_option("No progress bar or notes; only the written paths.")
def generate(prompt: str | None, model: str, variant: str | None, negative_prompt: str, steps: int | None,
             guidance: float | None, eta: float, sampler: str, seed: int | None, num_images: int, batch_size: int, height: int | None, width: int | None,
             output: str | None, overwrite: bool, grid: bool, device: str, dtype: str, image_path: str | None,
             strength: float | None, mask_path: str | None, no_paste_back: bool, mask_feather: int | None,
             loras: tuple[str, ...], lora_dir: str | None, threads: int | None, prompts_source: str | None,
             prompt_column: str, split: str, engine: str, push_to_hub: str | None, quiet: bool) -> None:
    """Generate images for PROMPT and print the paths written (or, with --prompts, a data set)."""
    if prompts_source is not None:
        return run_batch(locals(), prompts_source, prompt_column, split, engine, push_to_hub)
    from ..consistency import lcm_student
    from ..generation import generate_images
    from ..images import file_sha256
    from ..loading import dtype_name, load_loras, load_pipeline, model_record, pick_device, pick_dtype
    from ..outputs import claimed_outputs, image_grid, png_bytes, require_free_space
    from ..png_metadata import save_png
    from ..request import GenerationRequest
    from ..sizes import plan_size
    from ..threads import use_threads

    # 1. The request (--from has already filled in the defaults) and its inputs, all checked before any work
    ctx, note = click.get_current_context(), notes(quiet)
    if prompt is None:
        raise UserError("No PROMPT given; pass a prompt, e.g. ldm-app generate \"a cat\" (or --from image.png).")
    if image_path is None and (mask_path or strength is not None):
        raise UserError(f"{'--mask' if mask_path else '--strength'} needs --image; pass the image to start from.")
    if seed is None:
        seed = random.randrange(2**31)
    note(f"seed: {seed}")
    stored_model = ctx.meta.get("untrusted_model")
    if stored_model is not None and ctx.get_parameter_source("model").name == "DEFAULT":
        note(f"note: the PNG was made with {stored_model!r}, which is not a model folder on this machine; using "
             f"{model!r} (pass --model {stored_model} to load that one)")
    if ctx.meta.get("ignored"):
        note(f"note: not used from the PNG: {'; '.join(ctx.meta['ignored'])}")
    check_recorded_inputs(ctx, ctx.meta.get("from_png"), note)
    prompt, loras = resolve_lora_tags(prompt, loras, lora_dir)
    if not prompt.strip():
        note("note: empty prompt, drawing an unconditional sample")
    request = GenerationRequest(
        prompt, negative_prompt, steps=steps, guidance=guidance, eta=eta, sampler=sampler, seed=seed, width=width,
        height=height, n=num_images, loras=list(loras), strength=strength,
        image=read_input("--image", image_path) if image_path else None,
        mask=read_input("--mask", mask_path) if mask_path else None, paste_back=not no_paste_back,
        mask_feather=mask_feather, model=model_record(model),
        # the input files, recorded in the PNG for --from
        image_path=str(Path(image_path).resolve()) if image_path else None,
        image_sha256=file_sha256(image_path) if image_path else None,
        mask_path=str(Path(mask_path).resolve()) if mask_path else None,
        mask_sha256=file_sha256(mask_path) if mask_path else None).checked()

    # 2. Model, LoRAs, sizes, output paths (all checked before any work); a run that stops early leaves no
    # empty claimed files behind
    with claimed_outputs(output, num_images, overwrite) as paths:
        grid_path = paths[0].with_name(paths[0].stem + "-grid.png") if grid else None
        if grid_path is not None and grid_path.exists() and not overwrite:
            raise UserError(f"{grid_path} already exists; pass --overwrite or choose another --output.")
        use_threads(threads)
        dev = pick_device(device)
        weights_dtype = pick_dtype(dtype, dev)
        pipe = load_pipeline(model, dev, weights_dtype, variant)
        pipe.set_progress_bar_config(disable=quiet, leave=False)
        if sampler == "lcm" and not loras and lcm_student(pipe) is not None:
            note("note: using the model's distilled LCM UNet (unet_lcm/)")
        elif sampler == "lcm" and not loras:
            note("warning: --sampler lcm needs a consistency-distilled model (ldm-app distill) or an LCM-LoRA "
                 "(--lora); this model has neither, so expect poor images")
        request = dataclasses.replace(request.resolved(pipe), dtype=dtype_name(weights_dtype))  # as resolved
        w, h = request.width, request.height
        if request.drawn_at is not None:
            note(f"warning: {plan_size(w, h, pipe.default_size, pipe.vae_scale_factor).note(pipe.default_size)}")
        require_free_space(paths[0].parent, png_bytes(num_images + grid, w, h), f"{num_images + grid} images of "
                           f"{w}x{h}", "free some space or choose another --output")
        adapters = load_loras(pipe, loras)
        warn_if_truncated(pipe, prompt, note)

        # 3. Sample (image i from seed + i, in batches)
        images = generate_images(pipe, [request], batch_size, adapters)[0]
        if request.image is not None and request.image.size != request.draw_size:
            note(f"note: the {request.image.width}x{request.image.height} input was resized and center-cropped to "
                 "{}x{}".format(*request.draw_size))

        # 4. Write PNGs with their parameters
        for image, path, image_seed in zip(images, paths, request.seeds):
            save_png(image, path, request.for_image(image_seed))
            click.echo(str(path))
        if grid_path is not None:
            save_png(image_grid(images), grid_path, request.for_image(request.seed))
            click.echo(str(grid_path))


def read_input(option: str, path: str) -> PIL.Image.Image:
    """An input image for --image, or the mask file as it is for --mask (the pipeline ignores a mask's alpha
    rather than compositing it on white); one line naming the option when it cannot be read."""
    import PIL.Image

    from ..images import read_image

    try:
        if option != "--mask":
            return read_image(path)
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such file; pass an image file (PNG, JPEG, WebP, ...).")
        try:
            mask = PIL.Image.open(path)
            mask.load()
            return mask
        except (OSError, SyntaxError, PIL.Image.DecompressionBombError):
            raise ValueError(f"{path} cannot be read as an image; pass a PNG, JPEG, WebP, ... file.") from None
    except ValueError as err:
        raise UserError(f"{option} {err}") from None


def read_params_or_fail(path: str) -> tuple[GenerationRequest, list[str]]:
    from ..png_metadata import read_png

    if not Path(path).is_file():
        raise UserError(f"--from {path}: no such file; pass a PNG written by ldm-app generate or A1111.")
    return read_png(path)


def warn_if_truncated(pipe: LdmPipeline, prompt: str, note: Callable[[str], None]) -> None:
    """Say once, before sampling, how many tokens the text encoder will not see (not once per batch)."""
    dropped = pipe.dropped_tokens(prompt)
    if dropped:
        logging.getLogger("ldm_app.pipeline").setLevel(logging.ERROR)  # silences the pipeline's per-call warning
        note(f"warning: the prompt's last {dropped} token(s) lie beyond the text encoder's limit of "
             f"{pipe.tokenizer.model_max_length} and are dropped")
