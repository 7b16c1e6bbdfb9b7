"""LoRA fine-tuning of the default model on 8 images of one distinctive style, end to end through the CLI:

    python benchmarks/lora_finetune.py [--steps 200] [--data ~/ldm-runs/data/emoji64] [--train-text-encoder]
        [--prior-preservation]

The style: 8 training emoji in grayscale, captioned "<label>, sks style". Reports the wall time of
`ldm-app finetune-lora`, the LoRA file size, and how generations move: for the trained prompts, the colour
saturation (the photos have none) and the evaluator CLIP's cosine similarity to the matching photo; for 8
unrelated prompts, the similarity of each generation after fine-tuning to the one before (1 = unchanged).
--prior-preservation trains on 16 of the base model's own images of 8 other labels (DreamBooth's remedy for
that drift); --train-text-encoder adds adapters to the text encoder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ldm_app import LdmPipeline
from ldm_app.default_clip import load_clip
from ldm_app.lora import LORA_FILE

HERE = Path(__file__).resolve().parent


def saturation(images: np.ndarray) -> float:
    """Mean HSV saturation of non-white pixels, images (B, H, W, 3) in [0, 1]."""
    mx, mn = images.max(-1), images.min(-1)
    ink = mn < 0.9
    return float(((mx - mn) / np.maximum(mx, 1e-6))[ink].mean())


@torch.no_grad()
def features(evaluator, images: np.ndarray) -> torch.Tensor:
    return evaluator.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2 - 1)


def generate(pipe: LdmPipeline, prompts: list[str]) -> np.ndarray:
    return pipe(prompts, num_inference_steps=25, guidance_scale=5.0, output_type="np",
                generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("~/ldm-runs/data/emoji64"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument("--prior-preservation", action="store_true")
    args = parser.parse_args()

    rows = [json.loads(line) for line in (args.data.expanduser() / "train" / "metadata.jsonl").read_text().splitlines()]
    google = [r for r in rows if r["source"] == "google"]
    picks, unrelated, classes = google[100:900:100], google[150:950:100], google[125:925:100]
    with tempfile.TemporaryDirectory() as tmp:
        photos, out = Path(tmp) / "photos", Path(tmp) / "lora"
        photos.mkdir()
        gray = []
        for i, r in enumerate(picks):
            image = PIL.Image.open(args.data.expanduser() / "train" / r["file_name"]).convert("L").convert("RGB")
            image.save(photos / f"{i}.png")
            (photos / f"{i}.txt").write_text(f"{r['text']}, sks style")
            gray.append(np.asarray(image, dtype=np.float32) / 255)
        trained = [f"{r['text']}, sks style" for r in picks]
        others = [r["text"] for r in unrelated]

        options = ["--train-text-encoder"] if args.train_text_encoder else []
        if args.prior_preservation:
            options += ["--prior-preservation", "--num-class-images", "16"]
            options += [arg for r in classes for arg in ("--class-prompt", r["text"])]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ldm_app", "finetune-lora", str(photos), "--steps", str(args.steps),
                        "--rank", str(args.rank), "--lr", str(args.lr), "--batch-size", "8", "-o", str(out), "-q",
                        *options], check=True)
        minutes = (time.perf_counter() - start) / 60
        size_kb = (out / LORA_FILE).stat().st_size / 1024

        pipe = LdmPipeline.from_default()
        pipe.set_progress_bar_config(disable=True)
        before_t, before_o = generate(pipe, trained), generate(pipe, others)
        pipe.load_lora_weights(out / LORA_FILE)
        after_t, after_o = generate(pipe, trained), generate(pipe, others)

    evaluator, _ = load_clip(HERE / "evaluator")
    target = features(evaluator, np.stack(gray))
    sim = lambda a, b: float((a * b).sum(-1).mean())  # noqa: E731  (features are L2-normalised)
    extras = [name for name, on in (("text encoder", args.train_text_encoder),
                                      ("prior preservation", args.prior_preservation)) if on]
    print(f"LoRA rank {args.rank}, lr {args.lr}, {' + '.join(['UNet'] + extras)}, {args.steps} steps of batch 8 "
          f"on 8 images: {minutes:.1f} min on "
          f"{torch.get_num_threads()} threads (incl. start-up and the before/after grid); file {size_kb:.0f} KB")
    print(f"{'':<44}{'before':>10}{'after':>10}")
    print(f"{'trained prompts: saturation (photos: 0)':<44}{saturation(before_t):>10.3f}{saturation(after_t):>10.3f}")
    print(f"{'trained prompts: similarity to the photo':<44}{sim(features(evaluator, before_t), target):>10.3f}"
          f"{sim(features(evaluator, after_t), target):>10.3f}")
    print(f"{'unrelated prompts: saturation':<44}{saturation(before_o):>10.3f}{saturation(after_o):>10.3f}")
    print(f"unrelated prompts: similarity after vs before: "
          f"{sim(features(evaluator, after_o), features(evaluator, before_o)):.3f} (1 = unchanged)")


if __name__ == "__main__":
    main()
