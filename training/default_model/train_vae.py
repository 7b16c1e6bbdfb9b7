"""Train the default model's small f=4 `AutoencoderKL` (64x64x3 -> 16x16x4) on the emoji set.

Small enough to train on 2 CPU cores in about half an hour: reconstruction (L1) plus a tiny
KL term, no GAN. Resumable: checkpoints are written atomically to the run dir and re-running
the same command continues from the last one. At the end `scaling_factor` is set to 1/std of
the train latents so the UNet sees unit-variance latents, and `final/` (weights + metrics.json)
appears in one rename, so recipe.sh never takes a half-exported VAE as done.

`--init <final dir> --decoder-only` fine-tunes only the decoder of a finished VAE: the encoder,
latents and scaling_factor stay bit-identical, so a UNet already trained on them stays valid.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ldm_app.atomic import atomic_folder
from ldm_app.evaluation import psnr

from budget import BudgetedRun  # this folder's shared resume/time-budget helper
from emoji_data import load_split

KL_WEIGHT = 1e-6


def build_vae(width: int) -> AutoencoderKL:
    """f=4 (three blocks, two downsamplings), no mid-block attention, 4 latent channels."""
    channels = (width, 2 * width, 4 * width)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=width,
        sample_size=64,
        mid_block_add_attention=False,
    )


def widen(vae: AutoencoderKL, factor: int, seed: int = 0) -> AutoencoderKL:
    """Net2WiderNet (Chen et al. 2016) for the whole VAE: `factor`× the channels and GroupNorm groups, computing
    the same function. Each hidden channel is repeated in blocks (so every new norm group holds copies of one old
    group); a weight reading repeated channels is split among the copies in random proportions that sum to one,
    which keeps the function but lets the copies' gradients differ, so the new width is used. The latents stay
    the same, so a UNet trained on them stays valid while a decoder-only fine-tune uses the extra width."""
    config = dict(vae.config)
    wide = AutoencoderKL.from_config({**config, "block_out_channels": [c * factor for c in config["block_out_channels"]],
                                      "norm_num_groups": config["norm_num_groups"] * factor})
    g = torch.Generator().manual_seed(seed)
    old = vae.state_dict()
    state = {}
    for name, new in wide.state_dict().items():
        value = old[name]
        for dim in range(value.ndim):
            if new.shape[dim] != factor * value.shape[dim]:
                continue
            if dim == 1:  # the input channels of a conv: the copies share the old weight
                shares = torch.rand((factor, *value.shape), generator=g) + 0.5
                shares = shares / shares.sum(0)
                value = torch.cat(list(shares * value), dim=1)
            else:
                value = torch.cat([value] * factor, dim=dim)
        state[name] = value
    wide.load_state_dict(state)
    return wide


def to_model(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def round_trip_psnr(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> float:
    """Mean per-image PSNR (dB) of the round trip through the posterior mode, as the benchmark reports it."""
    vae.eval()
    values = []
    for chunk in images.split(batch):
        x = to_model(chunk)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        values.append(psnr((y + 1) / 2, (x + 1) / 2))
    vae.train()
    return torch.cat(values).mean().item()


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> tuple[float, float, list[float]]:
    """Mean/std of posterior samples over the train set (as Stable Diffusion computed its factor)."""
    vae.eval()
    latents = torch.cat([vae.encode(to_model(c)).latent_dist.sample() for c in images.split(batch)])
    return latents.mean().item(), latents.std().item(), latents.std(dim=(0, 2, 3)).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("~/ldm-runs/data/emoji64"))
    parser.add_argument("--run", type=Path, default=Path("~/ldm-runs/vae"))
    parser.add_argument("--width", type=int, default=16, help="channels of the first block (x1, x2, x4)")
    parser.add_argument("--minutes", type=float, default=35.0, help="training time budget (drives the LR schedule)")
    parser.add_argument("--steps", type=int, default=0, help="if set, schedule/stop by steps instead of time")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=float, default=3.0, help="minutes between PSNR evals + checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, help="start from a saved VAE (from_pretrained folder)")
    parser.add_argument("--decoder-only", action="store_true", help="freeze encoder/latents (needs --init)")
    parser.add_argument("--widen", type=int, default=1, help="widen the --init VAE this many times, same function")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    torch.manual_seed(args.seed)
    run = args.run.expanduser()
    budget = BudgetedRun(run, args.minutes, args.steps, args.eval_every)

    # --- data (uint8, on the training device: the whole set is ~50 MB) ---
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = args.data.expanduser()
    (train, _), (test, _) = load_split(data, "train"), load_split(data, "test")
    train, test = train.to(device), test.to(device)

    # --- model, optimizer, resume ---
    vae = AutoencoderKL.from_pretrained(args.init.expanduser()) if args.init else build_vae(args.width)
    if args.widen > 1:
        vae = widen(vae, args.widen)
    vae = vae.to(device, memory_format=torch.channels_last)
    if args.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=args.lr)
    budget.resume(vae, opt)
    n_params = sum(p.numel() for p in vae.parameters())
    budget.report(f"vae params {n_params:,}; train {len(train)} test {len(test)}; args {vars(args)}")

    # --- train (warmup, then cosine decay to 5 % of the peak LR over the budget) ---
    vae.train()
    while budget.progress < 1.0:
        t0 = time.time()
        lr = budget.set_learning_rate(opt, args.lr, warmup_steps=200)
        idx = torch.randint(len(train), (args.batch,))
        x = to_model(train[idx])
        flip = (torch.rand(args.batch) < 0.5).to(device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        with torch.set_grad_enabled(not args.decoder_only):
            posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.l1_loss(recon, x) + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        budget.finish_step(t0, args.batch)
        if budget.eval_due():
            budget.report(f"step {budget.step} {budget.state['elapsed'] / 60:.1f}min lr {lr:.2e} "
                          f"loss {loss.item():.4f} kl {kl.item():.2f} {budget.examples_per_second():.1f} img/s "
                          f"test PSNR {round_trip_psnr(vae, test):.2f} dB")
            budget.save(vae, opt)

    # --- final metrics, scaling factor, export ---
    test_psnr, train_psnr = round_trip_psnr(vae, test), round_trip_psnr(vae, train[:512])
    mean, std, per_channel = latent_stats(vae, train)
    if not args.decoder_only:
        vae.register_to_config(scaling_factor=1.0 / std)
    summary = {"test_psnr_db": test_psnr, "train_psnr_db_first512": train_psnr, "latent_mean": mean,
               "latent_std": std, "latent_std_per_channel": per_channel, "scaling_factor": vae.config.scaling_factor,
               "params": n_params, "steps": budget.step, "train_minutes": budget.state["elapsed"] / 60}
    with atomic_folder(run / "final") as final:  # recipe.sh skips this stage once final/metrics.json exists
        vae.to("cpu", memory_format=torch.contiguous_format).save_pretrained(final, safe_serialization=True)
        (final / "metrics.json").write_text(json.dumps(summary, indent=2))
    budget.report(f"final {json.dumps(summary)}")


if __name__ == "__main__":
    main()
