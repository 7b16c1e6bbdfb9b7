"""`ldm-app invert IMAGE` and `ldm-app edit IMAGE`: real images into the model's noise, and prompt edits of them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..loading import trusted_model
from .common import (UserError, device_option, finite, model_option, notes,
                     quiet_option, utf8_text, variant_option)

if TYPE_CHECKING:
    import PIL.Image

    from ..inversion import Inversion
    from ..pipeline import LdmPipeline

METHODS = ["ddim", "null-text", "negative-prompt"]  # ldm_app.inversion.METHODS, without importing torch here

INVERT_EXAMPLES = """

\b
Examples:
  ldm-app invert heart.png --prompt "a red heart"
  ldm-app invert heart.png --prompt "a red heart" --method null-text --reconstruction recon.png
  ldm-app invert photo.jpg --prompt "a cat" --method ddim --guidance 1 -o cat.safetensors --model ./run/pipeline
"""

EDIT_EXAMPLES = """

\b
Examples:
  ldm-app edit heart.png --source-prompt "a red heart" --target-prompt "a blue heart" -o blue.png
  ldm-app edit heart.png --source-prompt "a red heart" --target-prompt "a red star" --method null-text
  ldm-app invert heart.png --prompt "a red heart" -o heart.safetensors
  ldm-app edit --inversion heart.safetensors --target-prompt "a green heart" -o green.png
"""

METHOD_HELP = ("ddim: plain DDIM inversion (exact only at guidance 1); null-text: Mokady et al. 2022, tunes the "
               "unconditional embedding per step (slow, best); negative-prompt: Miyake et al. 2023, the prompt as "
               "negative prompt (fast).")


def read_image(path: Path) -> PIL.Image.Image:
    """The image at `path` as RGB with EXIF orientation applied, or a one-line error."""
    from ..images import read_image as read

    try:
        return read(path)
    except ValueError as err:
        raise UserError(f"IMAGE {err}") from None


def check_output(path: Path | None, overwrite: bool) -> None:
    if path is None:
        return
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"Output folder {path.parent} does not exist or is not writable; pick another path for "
                        f"{path.name}.")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite or choose another output path.")


def write_png(image: PIL.Image.Image, path: Path) -> None:
    from ..atomic import atomic_write

    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def run_inversion(pipe: LdmPipeline, image: PIL.Image.Image, prompt: str, method: str, steps: int,
                  guidance: float | None, inner_steps: int, note: Callable[[str], None]) -> Inversion:
    """`inversion.invert`, with a note when the image was resized."""
    from ..inversion import invert

    extra = {"num_inner_steps": inner_steps} if method == "null-text" else {}
    inversion = invert(pipe, image, prompt, method, steps, guidance, **extra)
    if inversion.original_size is not None:
        w, h = inversion.original_size
        note(f"note: the {w}x{h} image was resized and center-cropped to the model's {pipe.default_size}x"
             f"{pipe.default_size}")
    return inversion


@click.command("invert", epilog=INVERT_EXAMPLES)
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--prompt", required=True, callback=utf8_text, help="A caption of the image: the source prompt it is inverted with.")
@click.option("--method", type=click.Choice(METHODS), default="negative-prompt", help=METHOD_HELP)
@click.option("--steps", type=click.IntRange(min=1), default=50, help="DDIM steps.")
@click.option("--guidance", type=click.FloatRange(min=0), default=None, callback=finite,
              help="Guidance scale w that reconstruction and edits sample with.  [default: 1 for ddim, 5 otherwise]")
@click.option("--inner-steps", type=click.IntRange(min=1), default=10, help="null-text: Adam steps per DDIM step.")
@model_option()
@variant_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("inversion.safetensors"),
              help="Where the inversion goes (for ldm-app edit --inversion).")
@click.option("--reconstruction", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the reconstruction sampled back from x_T as this PNG.")
@click.option("--overwrite", is_flag=True, help="Replace existing files.")
@device_option
@quiet_option()
def invert_command(image: Path, prompt: str, method: str, steps: int, guidance: float | None, inner_steps: int,
                   model: str, variant: str | None, output: Path, reconstruction: Path | None, overwrite: bool,
                   device: str, quiet: bool) -> None:
    """Invert IMAGE into the model's noise x_T, save it, and print how well it reconstructs (PSNR)."""
    import torch

    from ..evaluation import psnr, unit_tensor
    from ..inversion import prepare_image, vae_round_trip
    from ..loading import load_pipeline, model_record, pick_device

    note = notes(quiet)
    # 1. Inputs and outputs, all checked before any work
    picture = read_image(image)
    check_output(output, overwrite)
    check_output(reconstruction, overwrite)
    pipe = load_pipeline(model, pick_device(device), torch.float32, variant)  # fp32: inversion amplifies rounding
    pipe.set_progress_bar_config(disable=quiet, leave=False)

    # 2. Invert, then write the inversion and the reconstruction
    inversion = run_inversion(pipe, picture, prompt, method, steps, guidance, inner_steps, note)
    inversion.model = model_record(model)
    inversion.save(output)
    click.echo(f"wrote {output}")
    if reconstruction is not None:
        write_png(inversion.reconstruction, reconstruction)
        click.echo(f"wrote {reconstruction}")

    # 3. PSNR of the reconstruction against the input, and of the VAE alone (no inversion can do better)
    pixels, _ = prepare_image(pipe, picture)
    target, vae_only = pixels / 2 + 0.5, vae_round_trip(pipe, pixels).cpu() / 2 + 0.5
    recon = unit_tensor(inversion.reconstruction)
    click.echo(f"PSNR reconstruction vs input: {psnr(recon, target).item():.2f} dB")
    click.echo(f"PSNR reconstruction vs VAE round trip: {psnr(recon, vae_only).item():.2f} dB")
    click.echo(f"PSNR VAE round trip vs input (the ceiling): {psnr(vae_only, target).item():.2f} dB")


@click.command("edit", epilog=EDIT_EXAMPLES)
@click.argument("image", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--source-prompt", default=None, callback=utf8_text, help="A caption of IMAGE (with --inversion it comes from the file).")
@click.option("--target-prompt", required=True, callback=utf8_text, help="The edited caption, e.g. the source prompt with a word swapped.")
@click.option("--inversion", "inversion_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Edit from a file written by ldm-app invert instead of IMAGE.")
@click.option("--method", type=click.Choice(METHODS), default="negative-prompt", help=METHOD_HELP)
@click.option("--cross-attention-steps", type=click.FloatRange(0, 1), default=0.8,
              help="Prompt-to-Prompt: fraction of steps in which the edit reuses the source's cross-attention maps.")
@click.option("--self-attention-steps", type=click.FloatRange(0, 1), default=0.4,
              help="Prompt-to-Prompt: fraction of steps in which it reuses the source's self-attention maps.")
@click.option("--steps", type=click.IntRange(min=1), default=50, help="DDIM steps.")
@click.option("--guidance", type=click.FloatRange(min=0), default=None, callback=finite,
              help="Guidance scale w.  [default: 1 for ddim, 5 otherwise]")
@click.option("--inner-steps", type=click.IntRange(min=1), default=10, help="null-text: Adam steps per DDIM step.")
@model_option("Pipeline folder or hub id ('default' = the embedded model; with --inversion: the one it was made "
              "with).")
@variant_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("edited.png"),
              help="The edited image (PNG).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@device_option
@quiet_option()
@click.pass_context
def edit_command(ctx: click.Context, image: Path | None, source_prompt: str | None, target_prompt: str,
                 inversion_file: Path | None, method: str, cross_attention_steps: float, self_attention_steps: float,
                 steps: int, guidance: float | None, inner_steps: int, model: str, variant: str | None, output: Path,
                 overwrite: bool, device: str, quiet: bool) -> None:
    """Edit IMAGE (or a saved inversion) by regenerating it with --target-prompt, keeping its layout."""
    import torch

    from ..inversion import Inversion, edit
    from ..loading import load_pipeline, pick_device

    note = notes(quiet)
    # 1. Inputs: either IMAGE + --source-prompt, or --inversion (which fixes prompt, method, steps and guidance)
    given = {k for k in ctx.params if ctx.get_parameter_source(k).name == "COMMANDLINE"}
    if inversion_file is not None:
        if image is not None:
            raise UserError("Pass IMAGE or --inversion, not both.")
        clash = sorted(given & {"source_prompt", "method", "steps", "guidance", "inner_steps"})
        if clash:
            option = "--" + clash[0].replace("_", "-")
            raise UserError(f"{option} is stored in the inversion file; leave it out with --inversion.")
        if not inversion_file.is_file():
            raise UserError(f"--inversion {inversion_file}: no such file; pass a file written by ldm-app invert.")
        inversion = Inversion.load(inversion_file)
        if "model" not in given and inversion.model:  # a folder on this machine or the default, never a hub id
            if trusted_model(inversion.model):
                model = inversion.model
            else:
                note(f"note: the inversion was made with {inversion.model!r}, which is not a model folder on this "
                     f"machine; using {model!r} (pass --model {inversion.model} to load that one)")
    elif image is None:
        raise UserError("No IMAGE given; pass an image and --source-prompt, or --inversion FILE from ldm-app invert.")
    elif source_prompt is None:
        raise UserError("--source-prompt is missing; pass a caption of IMAGE, e.g. --source-prompt \"a red heart\".")
    else:
        picture = read_image(image)
    check_output(output, overwrite)
    pipe = load_pipeline(model, pick_device(device), torch.float32, variant)
    pipe.set_progress_bar_config(disable=quiet, leave=False)

    # 2. Invert (unless loaded), then sample with the target prompt
    if inversion_file is None:
        inversion = run_inversion(pipe, picture, source_prompt, method, steps, guidance, inner_steps, note)
    edited = edit(pipe, inversion, target_prompt, cross_attention_steps, self_attention_steps)[0]
    write_png(edited, output)
    click.echo(str(output))
