"""The `ldm-app` command: one click group, one module per command (each imports torch only when it runs)."""

from __future__ import annotations

import click

from . import distill, finetune, generate, info, invert, serve
from .common import OneLineErrors


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="ldm-app")
def app() -> None:
    """Latent diffusion text-to-image: generate, fine-tune (LoRA), invert and edit."""


for command in (generate.generate, info.info, finetune.finetune_lora, invert.invert_command, invert.edit_command,
                serve.serve, distill.distill):
    app.add_command(command)


def main() -> None:
    app()
