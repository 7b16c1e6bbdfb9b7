"""`ldm-app generate --prompts FILE -o DIR`: the batch job's options and the call into ldm_app.batch_generation."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from .common import UserError, notes

BATCH_EXAMPLES = """
  ldm-app generate --prompts prompts.txt -o synthetic/ --seed 0
  ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 -m ldm_app generate --prompts p.jsonl -o out/
  accelerate launch -m ldm_app generate --prompts user/prompts --prompt-column text -o out/   (all GPUs)
  RAY_ADDRESS=auto ldm-app generate --prompts p.csv -o /shared/out --engine ray --push-to-hub me/synthetic
"""


def batch_options(command: Callable) -> Callable:
    """The options that turn `generate` into a batch job over a prompt file or data set."""
    options = [
        click.option("--prompts", "prompts_source", default=None, metavar="FILE|DATASET",
                     help="Batch job: a .txt (one prompt a line), .jsonl/.csv (prompt, optional negative_prompt, seed, "
                          "steps, guidance, eta, sampler, width, height; other columns kept) or a Hub data set; "
                          "--output becomes an image-folder data set, resumed when re-run."),
        click.option("--prompt-column", default="prompt", help="With --prompts: the column holding the prompt."),
        click.option("--split", default="train", help="With --prompts DATASET: the split to read."),
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
                     help="With --prompts: this process (or each process of accelerate launch / torchrun), or a Ray "
                          "Data pipeline (RAY_ADDRESS picks a cluster; local Ray otherwise)."),
        click.option("--push-to-hub", "push_to_hub", default=None, metavar="OWNER/NAME",
                     help="With --prompts: upload the finished data set to this Hub data set repo."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), command)


def run_batch(params: dict[str, Any], prompts_source: str, prompt_column: str, split: str, engine: str,
              push_to_hub: str | None) -> None:
    """The batch job from `generate`'s own parameters (defaults for every row)."""
    from ..batch_generation import Settings, make_items, read_rows, run_local

    note = notes(params["quiet"])
    if params["prompt"] is not None:
        raise UserError("Pass either PROMPT or --prompts FILE, not both.")
    unsupported = {"--image": params["image_path"], "--mask": params["mask_path"], "--strength": params["strength"],
                   "--lora-dir": params["lora_dir"], "--grid": params["grid"], "--overwrite": params["overwrite"]}
    given = [flag for flag, value in unsupported.items() if value not in (None, False)]
    if given:
        raise UserError(f"--prompts makes a text-to-image data set, resumed when re-run; drop {', '.join(given)}.")
    if params["output"] is None:
        raise UserError("--prompts needs --output DIR, the folder that becomes the data set.")
    if push_to_hub is not None and push_to_hub.count("/") != 1:
        raise UserError(f"--push-to-hub {push_to_hub}: give the data set repo as owner/name.")
    seed = 0 if params["seed"] is None else params["seed"]
    defaults = {"negative_prompt": params["negative_prompt"], "steps": params["steps"], "guidance": params["guidance"],
                "eta": params["eta"], "sampler": params["sampler"], "width": params["width"],
                "height": params["height"]}
    items = make_items(read_rows(prompts_source, prompt_column, split), defaults, seed, params["num_images"])
    if not items:
        raise UserError(f"--prompts {prompts_source} holds no prompts.")
    settings = Settings(params["model"], params["variant"], params["device"], params["dtype"], tuple(params["loras"]),
                        params["batch_size"], params["threads"])
    note(f"{len(items)} images, seeds from {seed} (a row's seed wins)")
    if engine == "ray":
        from ..batch_ray import run_ray

        metadata = run_ray(items, params["output"], settings, progress=not params["quiet"])
    else:
        metadata = run_local(items, params["output"], settings, progress=not params["quiet"])
    if metadata is None:  # another process writes metadata.jsonl
        return
    click.echo(str(metadata))
    if push_to_hub:
        from ..batch_generation import push_dataset

        click.echo(push_dataset(metadata.parent, push_to_hub))
