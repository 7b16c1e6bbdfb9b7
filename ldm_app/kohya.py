"""kohya/A1111 LoRA files (`lora_unet_*` keys, sd-scripts' metadata, fp16) both ways, and the hashes A1111 and
the additional-networks extension index them by (`Lora hashes` in PNG parameters)."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from typing import BinaryIO

import safetensors.torch
import torch
from diffusers import UNet2DConditionModel

from .lora import lora_file_path, split_key


def kohya_base_problem(unet: torch.nn.Module) -> str | None:
    """Why A1111/ComfyUI cannot apply a kohya file made for `unet`, or None when they can.

    They apply LoRAs to the Stable Diffusion checkpoint they have loaded, matching kohya names to its modules.
    An `LdmUNet` is no Stable Diffusion UNet (other blocks, other sizes): neither tool can load such a model,
    so no renaming could make its LoRA apply there. We still write the file (ldm-app loads it, and it is what
    the user asked for) and say so, rather than refuse after training.
    """
    if isinstance(unet, UNet2DConditionModel):
        return None
    return (f"the kohya file is for an {type(unet).__name__} base, which A1111 and ComfyUI cannot load, so they "
            "cannot apply it (ldm-app can); fine-tune a Stable Diffusion 1.x model for a LoRA those tools use.")



def kohya_metadata(tensors: dict[str, torch.Tensor], unet: torch.nn.Module, rank: int, alpha: float) -> dict[str, str]:
    """The metadata sd-scripts' train_network.py writes that tools read: network module, dim, α, base model,
    and the two hashes A1111 and the additional-networks extension index files by (`sshs_*`). As in sd-scripts,
    the hashes cover the file as saved with only the `ss_*` keys, so later user metadata does not change them."""
    cross = getattr(unet.config, "cross_attention_dim", None)
    base = {1024: "sd_v2", 2048: "sdxl_base_v1-0"}.get(cross, "sd_v1")
    if not isinstance(unet, UNet2DConditionModel):
        base = f"ldm_app_{type(unet).__name__}"  # honest: not a Stable Diffusion base (see kohya_base_problem)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
                "ss_base_model_version": base, "ss_v2": str(base == "sd_v2")}
    saved = safetensors.torch.save(tensors, metadata)
    return metadata | {"sshs_model_hash": addnet_hash(saved), "sshs_legacy_hash": addnet_legacy_hash(saved)}



def addnet_hash(data: bytes | BinaryIO) -> str:
    """SHA-256 of a safetensors file's tensor bytes (all after the header): A1111's LoRA hash, of which
    `Lora hashes` in PNG parameters shows the first 12 digits. Metadata edits leave it unchanged."""
    stream = _stream(data)
    header = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header)
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()



def addnet_legacy_hash(data: bytes | BinaryIO) -> str:
    """The older additional-networks hash: SHA-256 of the 64 KiB at offset 1 MiB, 8 digits."""
    stream = _stream(data)
    stream.seek(0x100000)
    return hashlib.sha256(stream.read(0x10000)).hexdigest()[:8]



def _stream(data: bytes | BinaryIO) -> BinaryIO:
    if isinstance(data, bytes):
        return io.BytesIO(data)
    data.seek(0)
    return data



def lora_short_hash(path: str | os.PathLike) -> str | None:
    """The hash A1111 writes for a LoRA file in `Lora hashes` (sd-scripts' precomputed one when the file has it);
    None for something that is not a local file (a hub id). Cached per file version: one hash per run, not per PNG."""
    path = lora_file_path(path)
    if not path.is_file():
        return None
    stat = path.stat()
    return _short_hash(str(path.resolve()), stat.st_mtime_ns, stat.st_size)



@functools.lru_cache(maxsize=64)
def _short_hash(path: str, mtime_ns: int, size: int) -> str | None:
    with open(path, "rb") as f:
        try:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except (ValueError, MemoryError, OverflowError):  # not a safetensors file: no hash to show
            return None
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        stored = metadata.get("sshs_model_hash") if isinstance(metadata, dict) else None
        return (stored if isinstance(stored, str) and stored else addnet_hash(f))[:12]



def to_kohya(state: dict[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """diffusers layout (α/r folded into up) → kohya/A1111 (`lora_unet_<module_with_underscores>.lora_down.weight`,
    `.lora_up.weight`, `.alpha`). With `alpha`, up is unfolded and α stored, as sd-scripts does; without, α = r."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        module, kind = split_key(rest)
        name = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + module.replace(".", "_")
        rank = value.shape[0] if kind == "down" else value.shape[1]
        out[f"{name}.lora_{kind}.weight"] = value / (alpha / rank) if kind == "up" and alpha else value
        if kind == "down":
            out[f"{name}.alpha"] = torch.tensor(float(alpha or rank))
    return out



def from_kohya(state: dict[str, torch.Tensor], modules: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """kohya/A1111 → diffusers layout, matching underscored names against each component's module names."""
    lookup = {"lora_unet_": ("unet", modules.get("unet", [])), "lora_te_": ("text_encoder", modules.get("text_encoder", []))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.endswith((".lora_down.weight", ".lora_up.weight")):
            continue
        name, kind = key.split(".", 1)
        value = value.float()  # sd-scripts stores fp16; scale in fp32
        prefix = next((p for p in lookup if name.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"Unknown kohya LoRA key {key!r}; expected lora_unet_* or lora_te_* keys.")
        component, names = lookup[prefix]
        by_underscore = {n.replace(".", "_"): n for n in names}
        short = name[len(prefix):]  # A1111 files made with transformers 4 say text_model_encoder_...
        module = by_underscore.get(short) or by_underscore.get(short.removeprefix("text_model_"))
        if module is None:
            raise ValueError(f"LoRA key {key!r} matches no module of the {component}; was it made for this model?")
        if kind.startswith("lora_up"):
            rank = value.shape[1]
            alpha = state.get(f"{name}.alpha")
            value = value * (float(alpha) / rank if alpha is not None else 1.0)
        layer = "lora" if component == "unet" else "lora_linear_layer"  # diffusers' names for each component
        out[f"{component}.{module}.{layer}.{'up' if kind.startswith('lora_up') else 'down'}.weight"] = value
    return out



def is_kohya(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_")) for k in state)
