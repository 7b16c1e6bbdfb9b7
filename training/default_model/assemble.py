"""Assemble the embedded default model: a trained pipeline folder → fp16 safetensors inside the package.

    python training/default_model/assemble.py [--pipeline ~/ldm-runs/unet/pipeline] [--out ldm_app/default_model]
        [--vae ~/ldm-runs/vae-wide/final] [--allow-unfinished]

--vae swaps in a VAE whose decoder was fine-tuned (or widened) after the UNet was trained; it must encode
exactly as the pipeline's VAE does, else the UNet's latents would no longer match, and that is checked.

A pipeline whose run stopped early (a time budget reached before the run config's `max_steps`) is refused
unless --allow-unfinished: re-running the training command continues it.

Writes into a temp folder and renames, so the shipped model is never half-written; the old one is moved aside
first and deleted last, so a crash in between leaves it as `<out>.old`. Adds the model card (README.md) with the
art licences, repeated from NOTICE.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from ldm_app import LdmPipeline
from ldm_app.atomic import atomic_folder
from ldm_app.config import load_config
from ldm_app.pipeline import cast_quietly

HERE = Path(__file__).resolve().parent
MAX_MB = 40

CARD = """# ldm-app default model

A small text-to-image latent diffusion model trained by the ldm-app project on openly licensed emoji art,
so that `ldm-app generate "a cat"` works offline on a CPU. 64×64 images.

| component | what | parameters |
|---|---|---|
| vae | diffusers `AutoencoderKL`, f=4 (64×64×3 → 16×16×4), trained from scratch | {vae} |
| text_encoder | transformers `CLIPTextModel`, the text tower of a small CLIP trained contrastively on the captions | {text} |
| tokenizer | `CLIPTokenizer` (byte-level BPE, vocab.json + merges.txt) trained on the captions | vocabulary {vocab} |
| unet | ldm-app `LdmUNet` (`small` preset), ε-prediction, EMA weights after {step} steps | {unet} |
| scheduler | `DDIMScheduler`, scaled-linear β, 1000 training steps | |

Recipe: `training/default_model/README.md` (data → VAE → CLIP → UNet → assemble → evaluate).
Weights are stored in fp16 and loaded in fp32 on CPUs.

## Licences and attribution of the training data

{notice}
"""


@torch.no_grad()
def swap_vae(current: AutoencoderKL, new: AutoencoderKL) -> AutoencoderKL:
    """`new`, after checking that it encodes like `current` (the latent space the UNet was trained in)."""
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a, b = current.encode(x).latent_dist, new.encode(x).latent_dist
    gap = max((a.mean - b.mean).abs().max().item(), (a.std - b.std).abs().max().item())
    if gap > 1e-3 or new.config.scaling_factor != current.config.scaling_factor:
        raise SystemExit(f"--vae encodes differently (max latent gap {gap:.2e}, scaling factor "
                         f"{new.config.scaling_factor} vs {current.config.scaling_factor}); the UNet needs its latents")
    return new.eval()


def training_step(pipeline: Path, allow_unfinished: bool) -> int | str:
    """The step the pipeline's UNet was exported at ("?" if unrecorded); refuses a run that has steps to go."""
    record, run_config = pipeline / "training_step.json", pipeline.parent / "config.yaml"
    if not record.is_file():
        return "?"
    step = json.loads(record.read_text())["step"]
    max_steps = load_config(run_config).train.max_steps if run_config.is_file() else step
    if step < max_steps and not allow_unfinished:
        raise SystemExit(f"{pipeline} holds step {step} of its run's {max_steps}: re-run the training command to "
                         "finish it (or pass --allow-unfinished)")
    return step


def drop_machine_paths(config: Path) -> None:
    """Remove this machine's paths and load-time flags from a saved config, so the shipped one names neither."""
    values = json.loads(config.read_text())
    for key in ("_name_or_path", "local_files_only", "is_local"):
        values.pop(key, None)
    config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=Path("~/ldm-runs/unet/pipeline"))
    parser.add_argument("--out", type=Path, default=HERE.parents[1] / "ldm_app" / "default_model")
    parser.add_argument("--vae", type=Path, help="a VAE folder with the same encoder function (decoder fine-tuned)")
    parser.add_argument("--allow-unfinished", action="store_true", help="ship a run stopped before its max_steps")
    args = parser.parse_args()
    source, out = args.pipeline.expanduser(), args.out
    step = training_step(source, args.allow_unfinished)

    pipe = LdmPipeline.from_pretrained(source)
    if args.vae:
        pipe.vae = swap_vae(pipe.vae, AutoencoderKL.from_pretrained(args.vae.expanduser()))
    with atomic_folder(out) as tmp:
        cast_quietly(pipe, torch.float16).save_pretrained(tmp, safe_serialization=True)
        pipe.tokenizer.backend_tokenizer.model.save(str(tmp / "tokenizer"))  # the CLIP-format vocab.json + merges.txt
        configs = [tmp / "model_index.json", *tmp.glob("*/config.json"), tmp / "tokenizer" / "tokenizer_config.json"]
        for config in configs:
            drop_machine_paths(config)
        (tmp / "README.md").write_text(CARD.format(
            vae=count(pipe.vae), text=count(pipe.text_encoder), vocab=len(pipe.tokenizer), unet=count(pipe.unet),
            step=step, notice=(HERE / "NOTICE").read_text().strip()))
        shutil.copy(HERE / "NOTICE", tmp / "NOTICE")
        size_mb = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 2**20
        if size_mb > MAX_MB:
            raise SystemExit(f"assembled model is {size_mb:.1f} MB, over the {MAX_MB} MB budget; use a smaller preset")
    print(f"{out}: {size_mb:.1f} MB, UNet step {step}")


if __name__ == "__main__":
    main()
