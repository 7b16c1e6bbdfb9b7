"""Inversion quality on held-out images: how closely each method samples the image back from its x_T.

    python benchmarks/inversion_quality.py [--model DIR] [--data ~/ldm-runs/data/emoji64/test] [--num-images 8]
                                           [--steps 50] [--guidance 5] [--inner-steps 10] [--device cpu]

Rows: the VAE-only round trip (the ceiling: every method reconstructs through the VAE), DDIM inversion at w = 1,
DDIM at the sampling guidance w (inverted and sampled at w), null-text and negative-prompt inversion at w.
Prints the median and mean PSNR against the input over the images, and seconds per image (inversion plus the
reconstruction). Captions are the `text` field of the folder's metadata.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ldm_app import LdmPipeline
from ldm_app.images import decode_image
from ldm_app.evaluation import psnr, unit_tensor
from ldm_app.inversion import invert, prepare_image, vae_round_trip


def load_images(folder: Path, count: int) -> list[tuple]:
    """The first `count` decodable images (by file name) with their captions."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    pairs = []
    for row in sorted(rows, key=lambda r: r["file_name"]):
        image = decode_image({"path": str(folder / row["file_name"]), "bytes": None})
        if image is not None:
            pairs.append((image, row["text"]))
        if len(pairs) == count:
            break
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Pipeline folder (default: the embedded default model).")
    parser.add_argument("--data", type=Path, default=Path("~/ldm-runs/data/emoji64/test").expanduser())
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--inner-steps", type=int, default=10, help="null-text: Adam steps per DDIM step.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    # Setup: model and images
    try:
        pipe = LdmPipeline.from_pretrained(args.model) if args.model else LdmPipeline.from_default()
    except ValueError as err:
        parser.error(f"{err} (pass --model DIR)")
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if not (args.data / "metadata.jsonl").is_file():
        parser.error(f"{args.data} has no metadata.jsonl; pass --data with an imagefolder of held-out images.")
    images = load_images(args.data, args.num_images)
    w = args.guidance
    methods = {  # name: (method, guidance, extra arguments)
        "DDIM, w = 1": ("ddim", 1.0, {}),
        f"DDIM, w = {w:g}": ("ddim", w, {}),
        f"null-text, w = {w:g}": ("null-text", w, {"num_inner_steps": args.inner_steps}),
        f"negative-prompt, w = {w:g}": ("negative-prompt", w, {}),
    }

    # Reconstruct every image with every method
    results: dict[str, tuple[list[float], list[float]]] = {"VAE round trip (ceiling)": ([], [])}
    results.update({name: ([], []) for name in methods})
    for image, caption in images:
        pixels, _ = prepare_image(pipe, image)
        target = pixels / 2 + 0.5
        start = time.perf_counter()
        vae_only = vae_round_trip(pipe, pixels).cpu() / 2 + 0.5
        results["VAE round trip (ceiling)"][0].append(psnr(vae_only, target).item())
        results["VAE round trip (ceiling)"][1].append(time.perf_counter() - start)
        for name, (method, guidance, extra) in methods.items():
            start = time.perf_counter()
            inversion = invert(pipe, image, caption, method, args.steps, guidance, **extra)
            seconds = time.perf_counter() - start
            results[name][0].append(psnr(unit_tensor(inversion.reconstruction), target).item())
            results[name][1].append(seconds)

    # Table
    print(f"{len(images)} images from {args.data}, {args.steps} DDIM steps, model {args.model or 'default'}, "
          f"{args.device}")
    print(f"{'method':<28} {'PSNR median':>12} {'PSNR mean':>10} {'s / image':>10}")
    for name, (values, seconds) in results.items():
        print(f"{name:<28} {statistics.median(values):>9.2f} dB {statistics.fmean(values):>7.2f} dB "
              f"{statistics.median(seconds):>10.2f}")


if __name__ == "__main__":
    main()
