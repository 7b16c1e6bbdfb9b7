"""`python -m ldm_app.serve ...`: the same server as `ldm-app serve`, for environments without the CLI entry."""

from __future__ import annotations

import argparse
import os
import sys

from . import Limits, run_server


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ldm_app.serve", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default", help="Pipeline folder or hub id ('default' = the embedded model).")
    p.add_argument("--variant", default=None, metavar="NAME", help="Load a folder's *.NAME.safetensors, e.g. fp16.")
    p.add_argument("--lora", dest="loras", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA applied by default at SCALE; requests may rescale it by name (repeatable).")
    p.add_argument("--lora-dir", default=None, help="Folder of LoRAs requests may choose by name (scale 0 unless asked).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind; anything but loopback needs --api-key.")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key", default=None,
                   help="Require 'Authorization: Bearer KEY' (UI: a login page); or set LDM_APP_API_KEY.")
    p.add_argument("--insecure", action="store_true", help="Allow a non-loopback --host without --api-key.")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    p.add_argument("--max-queue", type=int, default=32, help="Requests that may wait; more get 503 + Retry-After.")
    p.add_argument("--max-batch", type=int, default=16, help="Images per batched pipeline call.")
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels, help="Width × height per image.")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps, help="Denoising steps per request.")
    p.add_argument("--max-images", type=int, default=Limits.max_images, help="Images per request.")
    p.add_argument("--max-body-mb", type=float, default=Limits.max_body_bytes / 2**20, help="Request body size.")
    p.add_argument("--max-prompt-chars", type=int, default=Limits.max_prompt_chars, help="Prompt length.")
    p.add_argument("--no-ui", action="store_true", help="Serve the APIs only.")
    p.add_argument("--data-dir", default=None,
                   help="Folder for jobs (a database and the jobs' files), kept across restarts; default: a "
                        "temporary folder.")
    args = p.parse_args(argv)
    try:
        limits = Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images,
                        max_body_bytes=int(args.max_body_mb * 2**20), max_prompt_chars=args.max_prompt_chars)
        api_key = args.api_key or os.environ.get("LDM_APP_API_KEY")  # not a default: --help would print it
        run_server(args.model, args.loras, args.host, args.port, api_key, args.insecure, args.device,
                   args.dtype, args.max_queue, args.max_batch, args.lora_dir, limits, not args.no_ui, args.variant,
                   args.data_dir)
    except ValueError as err:  # bad flags, a model or LoRA that cannot be loaded: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
