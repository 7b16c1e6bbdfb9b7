"""SDEdit's trade-off on held-out emoji: how much of the input survives, and how far the target prompt gets in.

    python benchmarks/img2img_tradeoff.py [--model DIR] [--data ~/ldm-runs/data/emoji64/test] [--num-images 16]
                                          [--steps 25] [--guidance 5] [--device cpu]

Each held-out image is redrawn with a different image's caption as the target prompt (the next image's).
Image-to-image, for strength 0 … 1: faithfulness (PSNR to the input) and text alignment, measured by the
independent evaluator CLIP (benchmarks/evaluator): its cosine similarity to the target prompt and to the input's
own caption, and the share of images it finds closer to the target. Strength 1 is text-to-image of the target.
Inpainting (the middle half of the image masked, strength 1): the same measures on the masked region (cropped
and upsampled to the evaluator's 64×64), and how exactly the unmasked region is kept, with and without
pasting the input back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F

from ldm_app import LdmPipeline
from ldm_app.default_clip import load_clip
from ldm_app.evaluation import psnr
from ldm_app.images import decode_image

HERE = Path(__file__).resolve().parent
STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def load_images(folder: Path, count: int) -> tuple[list[PIL.Image.Image], list[str]]:
    """`count` decodable images with distinct captions, one from each of `count` even stretches of the folder (by
    file name: every category and both art styles show up), and their captions."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["file_name"])
    stretch = max(1, len(rows) // count)
    images, captions = [], []
    for start in range(0, stretch * count, stretch):
        for row in rows[start:start + stretch]:  # the stretch's first new caption (the same emoji's other art: next)
            image = decode_image({"path": str(folder / row["file_name"]), "bytes": None})
            if image is not None and row["text"] not in captions:
                images.append(image)
                captions.append(row["text"])
                break
    return images, captions


class Scorer:
    """The evaluator CLIP's cosine similarities between images in [0, 1] and the target and source captions."""

    def __init__(self, evaluator_dir: Path, targets: list[str], sources: list[str]):
        self.model, self.tokenizer = load_clip(evaluator_dir)
        self.targets, self.sources = self.text(targets), self.text(sources)

    @torch.no_grad()
    def text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding="longest", truncation=True, return_tensors="pt")
        return self.model.encode_text(tokens.input_ids, tokens.attention_mask)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[float, float, float]:
        """Mean similarity to the target, to the source, and the share of images closer to the target."""
        features = self.model.encode_image(images.float().cpu() * 2 - 1)
        to_target = (features * self.targets).sum(-1)
        to_source = (features * self.sources).sum(-1)
        return to_target.mean().item(), to_source.mean().item(), (to_target > to_source).float().mean().item()


def crop(images: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The (left, top, right, bottom) region of images (B, 3, H, W), upsampled to size × size for the evaluator."""
    left, top, right, bottom = box
    return F.interpolate(images[..., top:bottom, left:right], size=(size, size), mode="bicubic",
                         align_corners=False).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Pipeline folder (default: the embedded default model).")
    parser.add_argument("--data", type=Path, default=Path("~/ldm-runs/data/emoji64/test").expanduser())
    parser.add_argument("--evaluator", type=Path, default=HERE / "evaluator")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    # Setup: images, target prompts, model, evaluator
    if not (args.data / "metadata.jsonl").is_file():
        parser.error(f"{args.data} has no metadata.jsonl; pass --data with an imagefolder of held-out images "
                     "(python training/default_model/build_emoji_dataset.py writes the emoji set).")
    images, sources = load_images(args.data, args.num_images)
    pipe = (LdmPipeline.from_pretrained(args.model) if args.model else LdmPipeline.from_default()).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    n, size = len(images), pipe.default_size
    targets = sources[1:] + sources[:1]  # the next image's caption: another emoji
    score = Scorer(args.evaluator, targets, sources)
    inputs = pipe.image_processor.preprocess(images, size, size, resize_mode="crop") / 2 + 0.5  # (N, 3, S, S), [0, 1]

    def redraw(**kwargs) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = pipe(targets, image=images, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   generator=[torch.Generator().manual_seed(i) for i in range(n)], output_type="pt", **kwargs)
        return out.images.cpu(), (time.perf_counter() - start) / n

    print(f"{n} held-out images from {args.data}, target = another image's caption, {args.steps} DDIM steps, "
          f"guidance {args.guidance:g}, model {args.model or 'default'}, {args.device}")

    # 1. Image-to-image: faithfulness against text alignment, per strength
    print(f"\n{'image-to-image':<16} {'steps':>5} {'PSNR to input':>14} {'sim. target':>12} {'sim. source':>12} "
          f"{'closer to target':>17} {'s / image':>10}")
    to_target, to_source, closer = score(inputs)
    print(f"{'the inputs':<16} {'':>5} {'':>14} {to_target:>12.3f} {to_source:>12.3f} {closer:>17.2f}")
    for strength in STRENGTHS:
        out, seconds = redraw(strength=strength)
        to_target, to_source, closer = score(out)
        print(f"{'strength %.1f' % strength:<16} {int(args.steps * strength):>5} "
              f"{statistics.median(psnr(out, inputs).tolist()):>11.2f} dB {to_target:>12.3f} {to_source:>12.3f} "
              f"{closer:>17.2f} {seconds:>10.2f}")

    # 2. Inpainting the middle half: the masked region's alignment, the unmasked region's exactness
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    mask = PIL.Image.new("L", (size, size), 0)
    mask.paste(255, box)
    outside = torch.ones(1, 1, size, size, dtype=torch.bool)
    outside[..., box[1]:box[3], box[0]:box[2]] = False
    print(f"\n{'inpainting, middle half':<28} {'region: sim. target':>20} {'sim. source':>12} {'closer to target':>17} "
          f"{'outside: max |Δ|':>17} {'PSNR':>9}")
    rows = {"the inputs": inputs}
    for name, paste_back in (("strength 1, paste-back", True), ("strength 1, no paste-back", False)):
        rows[name] = redraw(mask_image=[mask] * n, paste_back=paste_back)[0]
    for name, out in rows.items():
        to_target, to_source, closer = score(crop(out, box, size))
        diff = (out - inputs).abs() * 255 * outside  # (N, 3, S, S), 0–255 units, outside the mask only
        mse = ((out - inputs) * outside).square().sum() / (outside.sum() * 3 * n)
        outside_psnr = "exact" if mse == 0 else f"{10 * torch.log10(1 / mse).item():.2f} dB"
        print(f"{name:<28} {to_target:>20.3f} {to_source:>12.3f} {closer:>17.2f} {diff.max().item():>17.1f} "
              f"{outside_psnr:>9}")


if __name__ == "__main__":
    main()
