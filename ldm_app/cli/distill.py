"""`ldm-app distill --model BASE --data DATA -o OUT`: a shell over `ldm_app.distill.distill_lcm`."""

from __future__ import annotations

from pathlib import Path

import click

from .common import model_option

DISTILL_EXAMPLES = """

\b
Examples:
  ldm-app distill --data ./captioned-images -o lcm-student --steps 2000
  ldm-app distill --model ./my-run/pipeline --data ./images --lora -o my-lcm-lora
  ldm-app generate "a cat" --model lcm-student/pipeline --sampler lcm
  ldm-app generate "a cat" --model ./my-run/pipeline --lora my-lcm-lora --sampler lcm
"""


@click.command("distill", epilog=DISTILL_EXAMPLES)
@model_option("The teacher: a pipeline folder or 'default' (the embedded model).")
@click.option("--data", required=True, help="Captioned images (metadata.jsonl or .txt files) or a hub dataset: LCM "
                                            "distils on real latents.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run folder; re-running the same command resumes it.")
@click.option("--lora", is_flag=True, help="Train an LCM-LoRA (rank --rank) instead of a whole student UNet.")
@click.option("--rank", type=click.IntRange(min=1), default=64, help="LoRA rank, with --lora.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate.  [default: 1e-4 with --lora, else 5e-5]")
@click.option("--guidance", type=(click.FloatRange(min=1), click.FloatRange(min=1)), default=(3.0, 7.0),
              help="Range of the teacher's CFG scale, baked into the student.")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, help="Seed of the data order and noise.")
def distill(model: str, data: str, output: Path, lora: bool, rank: int, steps: int, batch_size: int,
            lr: float | None, guidance: tuple[float, float], mixed_precision: str, seed: int) -> None:
    """Distil a model into a latent consistency model (LCM) that samples in 2-8 steps with --sampler lcm."""
    from ..distill import distill_lcm

    result = distill_lcm(model, data, output, lora=lora, rank=rank, steps=steps, batch_size=batch_size,
                         learning_rate=lr, guidance=guidance, seed=seed, mixed_precision=mixed_precision)
    click.echo(str(result))
