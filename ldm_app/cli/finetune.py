"""`ldm-app finetune-lora PHOTOS_DIR`: a shell over `ldm_app.finetune.finetune_lora`."""

from __future__ import annotations

from pathlib import Path

import click

from .common import UserError, model_option, notes, quiet_option, utf8_text

FINETUNE_EXAMPLES = """

\b
Examples:
  ldm-app finetune-lora ./photos --prompt "a photo of sks cat" --steps 400
  ldm-app finetune-lora ./photos --prompt "sks style" --rank 16 --format kohya -o my-lora
  ldm-app finetune-lora ./photos --prompt "a sks cat" --train-text-encoder --lr 3e-4
  ldm-app finetune-lora ./photos --prompt "a sks dog" --prior-preservation --class-prompt "a dog"
  ldm-app generate "a sks dog" --lora my-lora:0.8
"""


@click.command("finetune-lora", epilog=FINETUNE_EXAMPLES)
@click.argument("photos_dir", type=click.Path(file_okay=False, path_type=Path))
@model_option("Base pipeline folder or hub id ('default' = the embedded model).")
@click.option("--prompt", default=None, callback=utf8_text, help="Caption for photos without a .txt or metadata.jsonl caption.")
@click.option("--rank", type=click.IntRange(min=1), default=8, help="LoRA rank r.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None, help="LoRA α (default: rank).")
@click.option("--steps", type=click.IntRange(min=1), default=400, help="Optimizer steps.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, help="Learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8)
@click.option("--resolution", type=click.IntRange(min=8), default=None, help="Training size (default: the model's).")
@click.option("--train-text-encoder", is_flag=True,
              help="Also put LoRA on the text encoder's attention (q/k/v/out_proj): learns new words better.")
@click.option("--prior-preservation", is_flag=True, help="DreamBooth: also train on the base model's class images.")
@click.option("--class-prompt", "class_prompts", multiple=True, callback=utf8_text,
              help="Prompt for the class images, e.g. 'a photo of a cat'; repeat it to use several in turn.")
@click.option("--num-class-images", type=click.IntRange(min=1), default=16)
@click.option("--format", "fmt", type=click.Choice(["diffusers", "kohya"]), default="diffusers",
              help="kohya: also write a kohya/A1111 file.")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no",
              help="Autocast while training (fp16 on CUDA GPUs, bf16 on recent ones); LoRA weights stay fp32.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("lora-output"))
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, help="Seed of the weights, data order and noise.")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint.")
@click.option("--push-to-hub", "push_to_hub", metavar="OWNER/NAME", default=None,
              help="Upload the LoRA, its model card and the before/after grid to this Hub repo (token: HF_TOKEN).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@quiet_option()
def finetune_lora(photos_dir: Path, model: str, prompt: str | None, rank: int, alpha: float | None, steps: int,
                  lr: float, batch_size: int, resolution: int | None, train_text_encoder: bool,
                  prior_preservation: bool, class_prompts: tuple[str, ...], num_class_images: int, fmt: str,
                  mixed_precision: str, output: Path, seed: int, resume: bool, push_to_hub: str | None, private: bool,
                  quiet: bool) -> None:
    """Fine-tune LoRA adapters on the photos in PHOTOS_DIR; the base model on disk is never modified."""
    from ..finetune import finetune_lora as run

    if prior_preservation and not class_prompts:
        raise UserError("--prior-preservation needs --class-prompt, e.g. --class-prompt \"a photo of a cat\".")
    result = run(photos_dir, output, model=model, prompt=prompt, rank=rank, alpha=alpha, steps=steps,
                 learning_rate=lr, batch_size=batch_size, resolution=resolution,
                 train_text_encoder=train_text_encoder, class_prompts=class_prompts if prior_preservation else (),
                 num_class_images=num_class_images, kohya=fmt == "kohya", mixed_precision=mixed_precision, seed=seed,
                 resume=resume, push_to_hub=push_to_hub, private=private, note=notes(quiet), progress=not quiet)
    for path in (result.lora_file, result.kohya_file, result.config_file, result.grid):
        if path is not None:
            click.echo(str(path))
