"""Training throughput (samples/s) on the same model and data, measured side by side in one run:

  (a) this trainer's step with the encoded cache (VAE posterior + text states computed once),
  (b) this trainer's step encoding every batch (no cache),
  (c) the loop diffusers' examples/text_to_image/train_text_to_image.py runs each step: decode + transform
      images, VAE encode, tokenize + text encode, UNet forward/backward, optimizer step.

    python benchmarks/train_throughput.py [--model PIPELINE] [--data FOLDER] [--batch 32] [--steps 8] [--repeats 3]

Defaults: random components of the default model's kind (a small f=4 VAE, 256-wide CLIP text encoder, the `small`
LdmUNet) and generated 64×64 toy images, so it runs anywhere.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_app.batches import CachedBatches, EncodingBatches, seeded_generator
from ldm_app.cache import build_encoded_dataset
from ldm_app.components import load_text_encoder, load_tokenizer, load_vae
from ldm_app.config import load_config
from ldm_app.data import load_image_dataset
from ldm_app.images import decode_image, preprocess
from ldm_app.encoders import Encoders
from ldm_app.objective import DenoisingLoss, noise_scheduler
from ldm_app.testing import tiny_components, write_toy_dataset
from ldm_app.unet import LdmUNet


def random_components(kind: str) -> tuple:
    """Random encoders: `default` sized like the embedded model's, `sd15` with Stable Diffusion 1.5's shapes."""
    torch.manual_seed(0)
    tokenizer = tiny_components()["tokenizer"]
    if kind == "sd15":
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    else:
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                            block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16)
        text = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                                max_position_embeddings=tokenizer.model_max_length, **text))
    return vae.eval().requires_grad_(False), tokenizer, text_encoder.eval().requires_grad_(False)


def examples_style_step(unet, optimizer, scheduler, ds, indices, vae, tokenizer, text_encoder, cfg, g) -> None:
    """What train_text_to_image.py does per step (its transforms, encode, loss), without accelerate."""
    rows = [ds[i] for i in indices]
    images = torch.stack([preprocess(decode_image(r["image"]), cfg.resolution) for r in rows])
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample(g) * vae.config.scaling_factor
        ids = tokenizer([r[cfg.caption_column] for r in rows], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        context = text_encoder(ids)[0]
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=g)
    pred = unet(scheduler.add_noise(latents, noise, t), t, context).sample
    F.mse_loss(pred, noise).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trainer_step(unet, optimizer, loss_fn, batches, step, batch_size) -> None:
    batch = batches(step, batch_size, 0, 1)
    loss = loss_fn(unet, batch, seeded_generator(0, step))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pipeline folder providing vae/, text_encoder/, tokenizer/")
    parser.add_argument("--encoders", choices=["default", "sd15"], default="default",
                        help="random encoders to use without --model")
    parser.add_argument("--data", help="image folder (metadata.jsonl or .txt captions); default: generated")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_flush_denormal(True)

    tmp = tempfile.TemporaryDirectory()
    data = args.data or str(write_toy_dataset(Path(tmp.name) / "data", n=256, size=64))
    cfg = load_config(None, [f"data.path={data}", "data.resolution=64"])
    if args.model:
        vae, text_encoder = load_vae(args.model, "vae"), load_text_encoder(args.model, "text_encoder")
        tokenizer = load_tokenizer(args.model, "tokenizer")
    else:
        vae, tokenizer, text_encoder = random_components(args.encoders)
    ds = load_image_dataset(cfg.data)
    start = time.perf_counter()
    encoders = Encoders(vae, tokenizer, text_encoder)
    encoded = build_encoded_dataset(ds, cfg.data, encoders, progress=False)
    cache_build = time.perf_counter() - start
    empty = text_encoder(tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                                   return_tensors="pt").input_ids)[0].detach()
    scheduler = noise_scheduler(cfg.objective)
    torch.manual_seed(0)
    unet = LdmUNet.from_preset("small", cross_attention_dim=text_encoder.config.hidden_size)
    example_unet = copy.deepcopy(unet)  # the example script trains in the default memory format
    unet = unet.to(memory_format=torch.channels_last)  # train.channels_last (the trainer's default)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    example_optimizer = torch.optim.AdamW(example_unet.parameters(), lr=1e-4)
    cached, fresh = CachedBatches(encoded, 0, cfg.data), EncodingBatches(ds, cfg.data, 0, encoders)
    g = torch.Generator().manual_seed(0)
    b = args.batch
    loss_fn = DenoisingLoss(scheduler, cfg.objective, empty, vae.config.scaling_factor)
    runners = {
        "(a) trainer, cache": lambda s: trainer_step(unet, optimizer, loss_fn, cached, s, b),
        "(b) trainer, no cache": lambda s: trainer_step(unet, optimizer, loss_fn, fresh, s, b),
        "(c) diffusers example loop": lambda s: examples_style_step(
            example_unet, example_optimizer, scheduler, ds, [(s * b + i) % len(ds) for i in range(b)], vae, tokenizer, text_encoder,
            cfg.data, g),
    }
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for fn in runners.values():
        fn(0)  # warm-up
    for r in range(args.repeats):  # interleaved so that machine noise hits all alike
        for name, fn in runners.items():
            t0 = time.perf_counter()
            for s in range(args.steps):
                fn(1 + r * args.steps + s)
            rates[name].append(args.steps * b / (time.perf_counter() - t0))

    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f"encoders: {args.model or args.encoders}; VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M, "
          f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.1f} M params")
    print(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M params, batch {b}, {len(ds)} images, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} × {args.steps} steps")
    print(f"one-off cache build: {cache_build:.1f} s ({len(ds) / cache_build:.0f} images/s)")
    print(f"{'loop':<30}{'samples/s':>10}")
    for name, rate in med.items():
        print(f"{name:<30}{rate:>10.1f}")
    a, bb, c = med.values()
    print(f"(a)/(c) = {a / c:.2f}   (b)/(c) = {bb / c:.2f}   (a)/(b) = {a / bb:.2f}")


if __name__ == "__main__":
    main()
