"""`ldm-app serve`: the web UI, A1111's API and OpenAI's images API on one model (a shell over
`ldm_app.serve.run_server`). The one definition of the serve flags: `python -m ldm_app.serve` runs this command,
and every default is the field's default in `ldm_app.serve.settings`."""

from __future__ import annotations

import click

from ..serve.settings import Limits, Settings
from .common import device_option, dtype_option, model_option, threads_option, variant_option

SERVE_EXAMPLES = """

\b
Examples:
  ldm-app serve
  ldm-app serve --model ./my-run/pipeline --lora my-lora:0.8 --lora-dir ~/loras
  ldm-app serve --host 0.0.0.0 --api-key "$KEY" --threads 4
"""


@click.command(epilog=SERVE_EXAMPLES)
@model_option()
@variant_option
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="LoRA on by default at SCALE; requests may rescale it by name (repeatable).")
@click.option("--lora-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of LoRAs that requests switch on by name (<lora:name:weight>); off unless asked for.")
@click.option("--host", default="127.0.0.1", help="Address to bind; anything but loopback needs --api-key (or --insecure).")
@click.option("--port", type=click.IntRange(1, 65535), default=7860)
@click.option("--api-key", envvar="LDM_APP_API_KEY", show_envvar=True, default=None,
              help="Require 'Authorization: Bearer KEY' on every request (16+ characters); the UI asks for it once.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without --api-key.")
@device_option
@dtype_option
@threads_option
@click.option("--max-queue", type=click.IntRange(min=1), default=Settings.max_queue,
              help="Requests that may wait; one more gets 503 + Retry-After.")
@click.option("--max-batch", type=click.IntRange(min=1), default=Settings.max_batch, help="Images per batched pipeline call.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=Limits.max_pixels, help="Width × height of one image.")
@click.option("--max-steps", type=click.IntRange(min=1), default=Limits.max_steps, help="Denoising steps per request.")
@click.option("--max-images", type=click.IntRange(min=1), default=Limits.max_images, help="Images per request.")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=Limits.max_body_bytes / 2**20,
              help="Request body size, images included.")
@click.option("--max-prompt-chars", type=click.IntRange(min=1), default=Limits.max_prompt_chars,
              help="Length of a prompt or negative prompt.")
@click.option("--head-timeout", type=click.FloatRange(min=0.1), default=Settings.head_timeout,
              help="Seconds a connection may take to send a request's headers; then it is closed (408).")
@click.option("--body-timeout", type=click.FloatRange(min=0.1), default=Settings.body_timeout,
              help="Seconds a request may take to send its body after its headers.")
@click.option("--telemetry", is_flag=True,
              help="Let gradio check for updates and send its usage analytics (off: the server contacts no one).")
@click.option("--no-ui", is_flag=True, help="Serve the APIs only.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for jobs (fine-tunes, queued generations, finished LoRAs), kept across restarts: a killed "
                   "server resumes them. Default: a temporary folder.")
def serve(model: str, variant: str | None, loras: tuple[str, ...], lora_dir: str | None, host: str, port: int,
          api_key: str | None, insecure: bool, device: str, dtype: str, threads: int | None, max_queue: int,
          max_batch: int, max_pixels: int, max_steps: int, max_images: int, max_body_mb: float,
          max_prompt_chars: int, head_timeout: float, body_timeout: float, telemetry: bool, no_ui: bool,
          data_dir: str | None) -> None:
    """Serve a web UI, AUTOMATIC1111's API (/sdapi/v1) and OpenAI's images API (/v1/images) on one model."""
    from ..serve import run_server

    limits = Limits(max_pixels, max_steps, max_images, int(max_body_mb * 2**20), max_prompt_chars)
    settings = Settings(api_key=api_key, max_queue=max_queue, max_batch=max_batch, ui=not no_ui, limits=limits,
                        head_timeout=head_timeout, body_timeout=body_timeout, telemetry=telemetry,
                        data_dir=data_dir)
    run_server(model, loras, host, port, settings, insecure, device, dtype, lora_dir, variant, threads)
