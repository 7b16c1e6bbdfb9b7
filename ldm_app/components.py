"""Loading the frozen components around the UNet: VAE, text encoder, tokenizer — and the UNet itself.

Each loader takes a local folder or a hub id, with an optional subfolder, so a Stable-Diffusion-1.x style
repository (`vae/`, `text_encoder/`, `tokenizer/`, `unet/`) and this project's own folders load alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin
from transformers import CLIPTextModel, CLIPTokenizer

from .loading import looks_local
from .unet import LdmUNet

UNet = LdmUNet | UNet2DConditionModel  # either UNet works wherever the other does
UNET_CLASSES = {"LdmUNet": LdmUNet, "UNet2DConditionModel": UNet2DConditionModel}


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Inference mode and no gradients: the VAE and text encoder are never trained with the UNet."""
    model.requires_grad_(False)
    return model.eval()


def _cast(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    return model if dtype is None else model.to(dtype=dtype)


def _resolve(path: str | os.PathLike) -> str:
    """`~/x` → the home folder's x; hub ids and other paths pass through."""
    return os.path.expanduser(str(path))


def _is_local(path: str | os.PathLike) -> bool:
    return Path(path).exists()


def _check_local_folder(path: str | os.PathLike, subfolder: str | None, what: str) -> None:
    folder = Path(path) / (subfolder or "")
    if not _is_local(path) and looks_local(str(path)):  # else the hub is asked for it, and the error is about that
        raise ValueError(f"{path} does not exist; point to a {what} folder or a hub id (owner/name).")
    if _is_local(path) and not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; point to a {what} folder (or a pipeline folder with {subfolder}/).")


def load_vae(path: str | os.PathLike, subfolder: str | None = None, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """A frozen `AutoencoderKL` from a folder or hub id."""
    path = _resolve(path)
    _check_local_folder(path, subfolder, "VAE")
    return freeze(_cast(AutoencoderKL.from_pretrained(path, subfolder=subfolder), dtype))


def load_text_encoder(path: str | os.PathLike, subfolder: str | None = None,
                      dtype: torch.dtype | None = None) -> CLIPTextModel:
    """A frozen `CLIPTextModel` from a folder or hub id, in fp32 unless `dtype` says otherwise (transformers 5
    would keep the stored dtype: fp16 weights would then run in fp16 on CPUs, many times slower)."""
    path = _resolve(path)
    _check_local_folder(path, subfolder, "text encoder")
    kwargs = {"subfolder": subfolder} if subfolder else {}
    return freeze(_cast(CLIPTextModel.from_pretrained(path, **kwargs), dtype or torch.float32))


def load_tokenizer(path: str | os.PathLike, subfolder: str | None = None) -> CLIPTokenizer:
    """A `CLIPTokenizer` (vocab.json + merges.txt) from a folder or hub id."""
    path = _resolve(path)
    _check_local_folder(path, subfolder, "tokenizer")
    kwargs = {"subfolder": subfolder} if subfolder else {}
    return CLIPTokenizer.from_pretrained(path, **kwargs)


def unet_class(path: str | os.PathLike, subfolder: str | None = None) -> type[LdmUNet] | type[UNet2DConditionModel]:
    """Which UNet class a saved config describes (`_class_name`), so either kind loads from the same call."""
    path = _resolve(path)
    config = ConfigMixin.load_config(path, subfolder=subfolder) if not _is_local(path) else json.loads(
        (Path(path) / (subfolder or "") / "config.json").read_text()
    )
    name = config.get("_class_name", "LdmUNet")
    if name not in UNET_CLASSES:
        raise ValueError(f"Unsupported UNet class {name!r} in {path}; expected one of {', '.join(UNET_CLASSES)}.")
    return UNET_CLASSES[name]


def load_unet(path: str | os.PathLike, subfolder: str | None = None) -> UNet:
    """An `LdmUNet` or diffusers `UNet2DConditionModel`, whichever the folder holds."""
    path = _resolve(path)
    _check_local_folder(path, subfolder, "UNet")
    if _is_local(path) and not (Path(path) / (subfolder or "") / "config.json").is_file():
        raise ValueError(f"No config.json in {Path(path) / (subfolder or '')}; point to a UNet or pipeline folder.")
    return unet_class(path, subfolder).from_pretrained(path, subfolder=subfolder)
