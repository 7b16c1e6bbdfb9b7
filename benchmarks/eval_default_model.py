"""Evaluate the embedded default model (or any emoji-trained pipeline folder):

  1. VAE: PSNR of the encode → decode round trip on held-out emoji.
  2. Text alignment: R-precision@1 of a separate evaluator CLIP (its own seed and image tower, trained on real
     images only, never used for conditioning; weights in benchmarks/evaluator/). For 200 fixed training
     captions: is the true caption the evaluator's top choice among it and 99 random others — for the real
     image and for a generation (25 DDIM steps, --guidance)?
  3. The DDIM paper's table on our model: Fréchet distance in the evaluator's image-feature space between
     generations and real images, for steps × η (and DDPM ancestral sampling); with two floors to read it
     against: the FD of the captions' own real images, and of their VAE round trips.
  4. Seconds per image and per batch of 16.

    python benchmarks/eval_default_model.py [--model PIPELINE] [--data ~/ldm-runs/data/emoji64] [--fd-images 1000]

The full table takes hours on 2 cores: with --json FILE --resume, cells already in FILE (same model, same
--fd-images) are kept, so the table fills in over several runs; --parts picks what to run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import time
from pathlib import Path

import datasets
import numpy as np
import torch

from ldm_app import LdmPipeline
from ldm_app.atomic import atomic_write
from ldm_app.encoders import module_fingerprint
from ldm_app.default_clip import load_clip
from ldm_app.evaluation import frechet_distance, psnr, r_precision
from ldm_app.samplers import make_scheduler

HERE = Path(__file__).resolve().parent


def load_split(data: Path, split: str) -> tuple[torch.Tensor, list[dict]]:
    """Images (N, 3, 64, 64) in [-1, 1] and their metadata rows."""
    ds = datasets.load_dataset("imagefolder", data_dir=str(data), split=split)
    images = np.stack([np.asarray(im.convert("RGB")) for im in ds["image"]])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, ds.remove_columns("image").to_list()


@torch.no_grad()
def vae_round_trip(pipe: LdmPipeline, images: torch.Tensor) -> torch.Tensor:
    return pipe.decode_latents(pipe.encode_image(images)).clamp(-1, 1)


def vae_psnr(pipe: LdmPipeline, images: torch.Tensor) -> float:
    values = [psnr((vae_round_trip(pipe, batch) + 1) / 2, (batch + 1) / 2) for batch in images.split(64)]
    return torch.cat(values).mean().item()


@torch.no_grad()
def generate(pipe: LdmPipeline, prompts: list[str], seeds: list[int], steps: int, guidance: float, eta: float = 0.0,
             batch: int = 50) -> torch.Tensor:
    """Images in [-1, 1], one generator per image so results do not depend on batching."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        images = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, eta=eta,
                      generator=gens, output_type="pt").images
        out.append(images * 2 - 1)
    return torch.cat(out)


@torch.no_grad()
def model_fingerprint(pipe: LdmPipeline) -> str:
    """Identifies the weights a saved result belongs to (UNet, VAE, text encoder), so --resume never mixes two
    models."""
    parts = [module_fingerprint(m) for m in (pipe.unet, pipe.vae, pipe.text_encoder)]
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


@torch.no_grad()
def r_precision_setup(rng: random.Random, train_rows: list[dict], n: int
                      ) -> tuple[list[int], list[str], list[str], torch.Tensor, torch.Tensor]:
    """The R-precision task, the same in every benchmark (drawn from `rng`, seeded 0): `n` training captions (rows
    `picks`), each to be told apart from 99 random other labels of the vocabulary; `own`/`others` index `vocab`."""
    labels = sorted({r["text"] for r in train_rows})
    picks = rng.sample(range(len(train_rows)), n)
    captions = [train_rows[i]["text"] for i in picks]
    vocab = sorted(set(captions) | set(rng.sample(labels, min(len(labels), 2000))))
    own = torch.tensor([vocab.index(c) for c in captions])
    others = torch.stack([torch.tensor(rng.sample([j for j in range(len(vocab)) if j != k], 99)) for k in own])
    return picks, captions, vocab, own, others


def image_features(evaluator, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([evaluator.encode_image(b) for b in images.split(256)])


@torch.no_grad()
def text_features(evaluator, tokenizer, captions: list[str]) -> torch.Tensor:
    enc = tokenizer(captions, padding="longest", truncation=True, return_tensors="pt")
    return evaluator.encode_text(enc.input_ids, enc.attention_mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder (default: the embedded default model)")
    parser.add_argument("--data", type=Path, default=Path("~/ldm-runs/data/emoji64"))
    parser.add_argument("--evaluator", type=Path, default=HERE / "evaluator")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--fd-images", type=int, default=1000)
    parser.add_argument("--fd-steps", default="10,20,50,100")
    parser.add_argument("--json", type=Path, help="also write the results here (after every table cell)")
    parser.add_argument("--resume", action="store_true", help="keep the results already in --json for this model")
    parser.add_argument("--parts", default="vae,rprecision,fd,speed", help="comma-separated subset to run")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_flush_denormal(True)

    pipe = LdmPipeline.from_pretrained(args.model) if args.model else LdmPipeline.from_default()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    evaluator, eval_tokenizer = load_clip(args.evaluator)
    data = args.data.expanduser()
    train_images, train_rows = load_split(data, "train")
    test_images, _ = load_split(data, "test")
    model_id = {"model": str(args.model or "default"), "weights_sha256": model_fingerprint(pipe),
                "fd_images": args.fd_images, "guidance": args.guidance}  # --resume keeps cells of this setting only
    results: dict = {}
    if args.resume and args.json and args.json.is_file():
        saved = json.loads(args.json.read_text())
        results = saved if saved.get("model_id") == model_id else {}
    results["model_id"] = model_id

    def save() -> None:
        if args.json:
            with atomic_write(args.json) as tmp:
                tmp.write_text(json.dumps(results, indent=2))

    # 1. VAE round trip on held-out emoji
    if "vae" in parts:
        results["vae_psnr_db"] = vae_psnr(pipe, test_images)
        print(f"VAE round-trip PSNR on {len(test_images)} held-out emoji: {results['vae_psnr_db']:.2f} dB")
        save()

    # 2. R-precision@1 among 100 candidates, real vs generated
    rng = random.Random(0)
    picks, captions, vocab, own, others = r_precision_setup(rng, train_rows, args.captions)
    if "rprecision" in parts:
        text = text_features(evaluator, eval_tokenizer, vocab)
        real = image_features(evaluator, train_images[picks])
        fake = image_features(evaluator, generate(pipe, captions, list(range(len(captions))), 25, args.guidance))
        results["r_precision_real"] = r_precision(real, text, own, others)
        results["r_precision_generated"] = r_precision(fake, text, own, others)
        print(f"R-precision@1 ({args.captions} captions, 1 true + 99 random): real {results['r_precision_real']:.3f}, "
              f"generated {results['r_precision_generated']:.3f} "
              f"(ratio {results['r_precision_generated'] / max(results['r_precision_real'], 1e-9):.2f}; "
              f"25 DDIM steps, CFG {args.guidance})")
        save()

    # 3. Fréchet distance table: steps × η, plus DDPM ancestral sampling
    n = args.fd_images
    chosen = rng.choices(range(len(train_rows)), k=n)
    prompts = [train_rows[i]["text"] for i in chosen]
    steps_list = [int(s) for s in args.fd_steps.split(",")]
    table: dict[str, dict[str, float]] = results.setdefault("fd_table", {})
    if "fd" in parts:
        reference = image_features(evaluator, train_images)
        # Floors to read the table against: the captions' own images, and their VAE round trips
        real = train_images[chosen]
        round_trips = torch.cat([vae_round_trip(pipe, batch) for batch in real.split(64)])
        floors = results["fd_floors"] = {"real images": frechet_distance(image_features(evaluator, real), reference),
                                         "VAE round trips": frechet_distance(image_features(evaluator, round_trips),
                                                                             reference)}
        for name, value in floors.items():
            print(f"  floor: {n} {name:<20} FD {value:.4f}", flush=True)
        save()
        ddim_config = dict(pipe.scheduler.config)
        for name, eta, sampler in [("DDIM η=0.0", 0.0, "ddim"), ("DDIM η=0.5", 0.5, "ddim"),
                                   ("DDIM η=1.0", 1.0, "ddim"), ("DDPM (ancestral)", 0.0, "ddpm")]:
            pipe.scheduler = make_scheduler(sampler, ddim_config)
            row = table.setdefault(name, {})
            for steps in steps_list:
                if str(steps) not in row:  # JSON keys are strings
                    images = generate(pipe, prompts, [10_000 + i for i in range(n)], steps, args.guidance, eta)
                    row[str(steps)] = frechet_distance(image_features(evaluator, images), reference)
                    save()
                print(f"  {name:<18} {steps:>4} steps: FD {row[str(steps)]:.4f}", flush=True)
        pipe.scheduler = make_scheduler("ddim", ddim_config)
        print(f"\nFréchet distance in the evaluator's feature space ({n} generations vs {len(reference)} real; "
              "lower is better)")
        print(f"{'sampler':<20}" + "".join(f"{s:>10}" for s in steps_list))
        for name, row in table.items():
            print(f"{name:<20}" + "".join(f"{row[str(s)]:>10.4f}" if str(s) in row else f"{'-':>10}"
                                          for s in steps_list))
        print("floors: " + ", ".join(f"{name} {value:.4f}" for name, value in floors.items()))

    # 4. Speed: one image, and a batch of 16, 25 DDIM steps with CFG
    if "speed" in parts:
        threads = torch.get_num_threads()
        times = {}
        for count in (1, 16):
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                generate(pipe, ["a cat face"] * count, list(range(count)), 25, args.guidance)
                runs.append(time.perf_counter() - t0)
            times[count] = statistics.median(runs)
        results[f"speed_{threads}_threads"] = {"seconds_per_image": times[1], "seconds_per_batch_16": times[16]}
        print(f"\nspeed ({threads} threads, median of 3): {times[1]:.2f} s for 1 image, {times[16]:.2f} s for a "
              f"batch of 16 ({times[16] / 16:.3f} s/image)")
        save()


if __name__ == "__main__":
    main()
