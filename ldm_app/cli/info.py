"""`ldm-app info`: what a model is made of."""

from __future__ import annotations

import click

from .common import model_option, variant_option

INFO_EXAMPLES = """

\b
Examples:
  ldm-app info
  ldm-app info --model ./my-run/pipeline
"""


@click.command(epilog=INFO_EXAMPLES)
@model_option()
@variant_option
def info(model: str, variant: str | None) -> None:
    """Show a model's components, parameter counts, scheduler and native size."""
    import torch

    from ..loading import load_pipeline

    pipe = load_pipeline(model, torch.device("cpu"), torch.float32, variant)
    click.echo(f"model: {model}")
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        n = sum(p.numel() for p in module.parameters())
        click.echo(f"{name}: {type(module).__name__}, {n / 1e6:.2f} M parameters")
    tok = pipe.tokenizer
    click.echo(f"tokenizer: {type(tok).__name__}, vocabulary {len(tok)}, max {tok.model_max_length} tokens")
    sc = pipe.scheduler.config
    click.echo(f"scheduler: {type(pipe.scheduler).__name__} ({sc.num_train_timesteps} steps, {sc.beta_schedule}, "
               f"prediction {sc.prediction_type})")
    click.echo(f"native size: {pipe.default_size}x{pipe.default_size} "
               f"(latents {pipe.unet.config.in_channels}x{pipe.unet.config.sample_size}x{pipe.unet.config.sample_size}, "
               f"VAE factor {pipe.vae_scale_factor}, scaling {pipe.vae.config.scaling_factor:.4f})")
