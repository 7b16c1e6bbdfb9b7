"""Single-file checkpoints → pipeline components (`LdmPipeline.from_single_file` builds the pipeline from them).

A1111 and ComfyUI users hold one `.safetensors` in the original CompVis/LDM key layout (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`). diffusers converts such files (`from_single_file`), but
reads each component's config from the hub; the Stable Diffusion 1.x configs and the CLIP tokenizer ship in
`sd_configs/v1` (no weights, see its README), so loading them needs no network.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors import SafetensorError, safe_open

SD_V1_CONFIG = Path(__file__).parent / "sd_configs" / "v1"
SUPPORTED = "Stable Diffusion 1.x (v1-4, v1-5 and their fine-tunes, e.g. A1111/Civitai .safetensors files)"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The parts of an SD-1.x single file, by key prefix; a file without one of them cannot become a pipeline.
V1_PARTS = {"model.diffusion_model.": "UNet", "first_stage_model.": "VAE",
            "cond_stage_model.transformer.": "CLIP text encoder"}
# diffusers' names for the model families it tells apart (`infer_diffusers_model_type`), as users know them
FAMILY_NAMES = {"unknown": "not a Stable Diffusion UNet checkpoint (no model.diffusion_model.* keys)",
                "v2": "Stable Diffusion 2.x", "inpainting": "Stable Diffusion 1.x inpainting",
                "inpainting_v2": "Stable Diffusion 2.x inpainting", "xl_base": "SDXL", "xl_refiner": "SDXL refiner",
                "xl_inpaint": "SDXL inpainting", "playground-v2-5": "Playground v2.5", "upscale": "SD x4 upscaler"}


def read_header(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The file's tensors as shape-only meta tensors: enough to tell the model family without reading gigabytes."""
    with safe_open(str(path), framework="pt") as f:
        return {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}


def checkpoint_family(state_dict: dict[str, torch.Tensor]) -> str:
    """'v1' for a complete SD-1.x file, else a name for what it is (diffusers' detection by key names and shapes)."""
    if not any(key.startswith("model.diffusion_model.") for key in state_dict):
        return "unknown"
    family = infer_diffusers_model_type(state_dict)  # falls back to "v1" for any LDM UNet it does not recognise
    if family == "v1" and any(key.startswith("cond_stage_model.model.") for key in state_dict):
        return "v2"  # an OpenCLIP text encoder: SD 2.x layout, whatever the UNet's attention width
    return family


def check_single_file(path: str | os.PathLike) -> Path:
    """Refuse, with the reason and a fix, anything but a complete SD-1.x `.safetensors` file."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path} is a pickle checkpoint ({path.suffix}); ldm-app never loads pickles (loading one can "
                         "run code). Use the model's .safetensors file, or convert it once with a tool you trust.")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; pass a single-file checkpoint, a pipeline folder, "
                         "'default' or a hub id.")
    if not path.is_file():
        raise ValueError(f"{path} does not exist; check the path of the single-file checkpoint.")
    try:
        header = read_header(path)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable .safetensors file ({error}); download it again.") from None
    family = checkpoint_family(header)
    if family != "v1":
        what = FAMILY_NAMES.get(family, f"a {family!r} checkpoint")
        raise ValueError(f"{path} is {what}; single files of {SUPPORTED} are supported. Convert others to a "
                         "diffusers folder and pass that folder.")
    missing = [part for prefix, part in V1_PARTS.items() if not any(key.startswith(prefix) for key in header)]
    if missing:
        raise ValueError(f"{path} has no {' and no '.join(missing)} weights; a single-file checkpoint must hold the "
                         "whole model (UNet, VAE and CLIP text encoder), as A1111's model files do.")
    return path


def single_file_components(path: str | os.PathLike, config: str | os.PathLike | None = None,
                           torch_dtype: torch.dtype | None = None) -> dict[str, torch.nn.Module | object]:
    """The vae, text_encoder, tokenizer, unet and scheduler of an SD-1.x single-file checkpoint, offline.

    diffusers converts the weights; `config` is a diffusers-format folder with the component configs and the
    tokenizer (default: the shipped SD-1.x one; a test passes the folder of a tiny model). Stored dtype unless
    `torch_dtype`.
    """
    from diffusers import StableDiffusionPipeline  # imported here: it pulls in transformers' image processors

    path = check_single_file(path)
    dtype_kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        sd = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config or SD_V1_CONFIG), local_files_only=True, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, **dtype_kwargs)
    except (SingleFileComponentError, KeyError, RuntimeError) as err:  # keys missing or of the wrong shape
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is incomplete or damaged ({reason}); a single-file checkpoint must hold the whole "
                         "SD-1.x model, as A1111's model files do: download it again.") from None
    return {name: sd.components[name] for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}


def is_single_file(spec: str | os.PathLike) -> bool:
    """Whether a model name means a single-file checkpoint (checked further by `check_single_file`)."""
    path = Path(spec).expanduser()
    return path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES) or path.is_file()
