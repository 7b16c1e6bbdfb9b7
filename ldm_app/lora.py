"""LoRA (Hu et al. 2021) on the UNet's attention projections: W' = W + (α/r) · B A, with B = 0 at the start.

Adapters are peft layers added through diffusers' `PeftAdapterMixin`, so loading, `set_adapters`,
`fuse_lora` and `unfuse_lora` are diffusers' own. Saved files put the α/r scale into B, so they are
self-contained: any loader that assumes α = r (diffusers' default) gives the same result.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, targets: list[str]) -> None:
    """Freeze `model` and add trainable rank-`rank` adapters on `targets`; B starts at zero, so the model's
    output is unchanged until training moves it."""
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                 target_modules=targets))


def lora_state_dict(model: torch.nn.Module, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """Adapter weights in the diffusers layout (`<prefix>.<module>.lora.down/up.weight`), α/r folded into up."""
    config = model.peft_config["default"]
    scale = config.lora_alpha / config.r
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    return {f"{prefix}.{k}": (v * scale if ".up." in k else v).detach().float().cpu().contiguous()
            for k, v in state.items()}


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata=metadata or {"format": "pt"})
    os.replace(tmp, path)


def to_kohya(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers layout → kohya/A1111 (`lora_unet_<module_with_underscores>.lora_down.weight`, `.alpha`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        module, kind = rest.split(".lora.")
        name = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + module.replace(".", "_")
        out[f"{name}.lora_{kind.split('.')[0]}.weight"] = value
        if kind.startswith("down"):
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))  # α = r: the scale is already in up
    return out


def from_kohya(state: dict[str, torch.Tensor], modules: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """kohya/A1111 → diffusers layout, matching underscored names against each component's module names."""
    lookup = {"lora_unet_": ("unet", modules.get("unet", [])), "lora_te_": ("text_encoder", modules.get("text_encoder", []))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.endswith((".lora_down.weight", ".lora_up.weight")):
            continue
        name, kind = key.split(".", 1)
        prefix = next((p for p in lookup if name.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"Unknown kohya LoRA key {key!r}; expected lora_unet_* or lora_te_* keys.")
        component, names = lookup[prefix]
        by_underscore = {n.replace(".", "_"): n for n in names}
        module = by_underscore.get(name[len(prefix):])
        if module is None:
            raise ValueError(f"LoRA key {key!r} matches no module of the {component}; was it made for this model?")
        if kind.startswith("lora_up"):
            rank = value.shape[1]
            alpha = state.get(f"{name}.alpha")
            value = value * (float(alpha) / rank if alpha is not None else 1.0)
        out[f"{component}.{module}.lora.{'up' if kind.startswith('lora_up') else 'down'}.weight"] = value
    return out


def is_kohya(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_")) for k in state)


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LoRA safetensors file, or the standard file inside a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise ValueError(f"No LoRA file at {path}; pass a .safetensors file or a folder with {LORA_FILE}.")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"Cannot read LoRA file {path}: {err}; pass a safetensors LoRA file.") from None
