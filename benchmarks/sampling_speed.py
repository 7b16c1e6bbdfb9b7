"""Sampling speed: LdmPipeline vs diffusers' StableDiffusionPipeline on identical components, and vs a bare
loop of the same UNet calls (the limit any pipeline can reach). Prints a table of medians and the ratios.

    python benchmarks/sampling_speed.py [--unet diffusers|ldm] [--steps 25] [--batch 4] [--repeats 7]

Components are random and sized like the default model (64×64 images, 16×16×4 latents), so the numbers
measure pipeline overhead, not image quality.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

from ldm_app import LdmPipeline, LdmUNet
from ldm_app.testing import tiny_components


def components(unet_kind: str) -> dict:
    c = tiny_components("diffusers")
    torch.manual_seed(0)
    c["vae"] = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                             block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
                             norm_num_groups=16, sample_size=64).eval()
    if unet_kind == "ldm":
        c["unet"] = LdmUNet.from_preset("small", cross_attention_dim=32).eval()
    else:
        c["unet"] = UNet2DConditionModel(
            sample_size=16, block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8).eval()
    return c


@torch.no_grad()
def bare_loop(pipe: LdmPipeline, prompts: list[str], steps: int, guidance: float) -> None:
    """The same UNet calls, scheduler steps and VAE decode with nothing around them."""
    cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, True, None)
    embeds = torch.cat([uncond, cond])
    latents = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(steps)
    for t in pipe.scheduler.timesteps:
        noise_uncond, noise_text = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=embeds).sample.chunk(2)
        latents = pipe.scheduler.step(noise_uncond + guidance * (noise_text - noise_uncond), t, latents).prev_sample
    pipe.vae.decode(latents / pipe.vae.config.scaling_factor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=["diffusers", "ldm"], default="diffusers")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    c = components(args.unet)
    ours = LdmPipeline(**c)
    theirs = StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    prompts = ["a cat"] * args.batch
    kw = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=64, width=64, output_type="np")
    runners = {
        "bare loop (limit)": lambda: bare_loop(ours, prompts, args.steps, 5.0),
        "LdmPipeline": lambda: ours(prompts, generator=torch.Generator().manual_seed(0), **kw),
        "StableDiffusionPipeline": lambda: theirs(prompts, generator=torch.Generator().manual_seed(0), **kw),
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    for fn in runners.values():
        fn()  # warm-up
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits all three alike
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"UNet: {args.unet}, {sum(p.numel() for p in c['unet'].parameters()) / 1e6:.1f} M params; "
          f"batch {args.batch}, {args.steps} DDIM steps, CFG; median of {args.repeats}; {torch.get_num_threads()} threads")
    print(f"{'runner':<26}{'s/batch':>10}{'images/s':>10}")
    for name, s in med.items():
        print(f"{name:<26}{s:>10.3f}{args.batch / s:>10.2f}")
    print(f"LdmPipeline / StableDiffusionPipeline speed: {med['StableDiffusionPipeline'] / med['LdmPipeline']:.3f}")
    print(f"LdmPipeline / bare loop speed:              {med['bare loop (limit)'] / med['LdmPipeline']:.3f}")


if __name__ == "__main__":
    main()
