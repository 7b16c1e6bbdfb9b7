"""The README's sample grid of the embedded default model: 10 prompts × seeds 0 and 1, 25 DDIM steps, CFG 5.

    python training/default_model/sample_grid.py [--model PIPELINE] [--out docs/default_model_samples.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from ldm_app import LdmPipeline
from ldm_app.atomic import atomic_write

PROMPTS = ["a cat", "cat face", "grinning face", "red heart", "pizza", "rocket", "sun", "dog face", "star", "fire"]
SEEDS = (0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder (default: the embedded default model)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[2] / "docs" / "default_model_samples.png")
    parser.add_argument("--scale", type=int, default=1, help="upscale each image this many times (nearest)")
    args = parser.parse_args()
    pipe = LdmPipeline.from_pretrained(args.model) if args.model else LdmPipeline.from_default()
    images = []
    for seed in SEEDS:
        images += pipe(PROMPTS, num_inference_steps=25, guidance_scale=5.0,
                       generator=[torch.Generator().manual_seed(seed) for _ in PROMPTS]).images
    size = images[0].width * args.scale
    grid = make_image_grid([im.resize((size, size), resample=0) for im in images], rows=len(SEEDS), cols=len(PROMPTS))
    with atomic_write(args.out) as tmp:
        grid.save(tmp)
    print(args.out)


if __name__ == "__main__":
    main()
