"""LoRA (Hu et al. 2021) on the UNet's attention projections: W' = W + (α/r) · B A, with B = 0 at the start.

Adapters are peft layers added through diffusers' `PeftAdapterMixin` (UNet) or injected by peft and registered
the way transformers registers them (text encoder), so `set_adapters`, `fuse_lora` and `unfuse_lora` are
diffusers' own. Saved files put the α/r scale into B, so they are self-contained: any loader that assumes α = r
(diffusers' default) gives the same result.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers import ModelMixin
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .atomic import atomic_write

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, targets: list[str]) -> None:
    """Freeze `model` and add trainable rank-`rank` adapters on `targets`; B starts at zero, so the model's
    output is unchanged until training moves it."""
    model.requires_grad_(False)
    attach(model, LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets))


def attach(model: torch.nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
    """Add an adapter. transformers' own `add_adapter` insists on a newer peft than may be installed, so text
    encoders get peft's injection plus the two attributes transformers sets (diffusers reads them)."""
    if isinstance(model, ModelMixin):
        model.add_adapter(config, adapter_name)
        return
    inject_adapter_in_model(config, model, adapter_name)
    model.peft_config = {**getattr(model, "peft_config", {}), adapter_name: config}
    model._hf_peft_config_loaded = True


def split_key(key: str) -> tuple[str, str]:
    """`<module>.lora.down.weight`, `.lora_linear_layer.up.weight` (diffusers) or `.lora_A.weight` (peft)
    → (module, "down" | "up")."""
    for marker, kind in ((".lora.down.", "down"), (".lora.up.", "up"), (".lora_linear_layer.down.", "down"),
                         (".lora_linear_layer.up.", "up"), (".lora_A.", "down"), (".lora_B.", "up")):
        if marker in key:
            return key.split(marker)[0], kind
    raise ValueError(f"{key!r} is not a LoRA weight key; pass a diffusers, peft or kohya LoRA file.")


def load_text_encoder_lora(text_encoder: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Adapters in the diffusers layout (component prefix stripped) onto a text encoder. Keys written for
    transformers 4 (`text_model.` prefix) load into transformers 5's flattened CLIPTextModel too."""
    modules = {n for n, _ in text_encoder.named_modules()}
    weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for key, value in state.items():
        module, kind = split_key(key)
        if module not in modules and module.removeprefix("text_model.") in modules:
            module = module.removeprefix("text_model.")
        if module not in modules:
            raise ValueError(f"LoRA key {key!r} matches no module of the text encoder; was it made for this model?")
        weights[f"{module}.lora_{'A' if kind == 'down' else 'B'}.weight"] = value
        if kind == "down":
            ranks[module] = value.shape[0]
    rank = max(ranks.values())
    attach(text_encoder, LoraConfig(r=rank, lora_alpha=rank, rank_pattern={m: r for m, r in ranks.items() if r != rank},
                                    target_modules=list(ranks)), adapter_name)
    set_peft_model_state_dict(text_encoder, weights, adapter_name)
    text_encoder.requires_grad_(False)


def lora_state_dict(model: torch.nn.Module, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """Adapter weights in the diffusers layout (`<prefix>.<module>.lora.down/up.weight`), α/r folded into up."""
    config = model.peft_config["default"]
    scale = config.lora_alpha / config.r
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    return {f"{prefix}.{k}": (v * scale if ".up." in k else v).detach().float().cpu().contiguous()
            for k, v in state.items()}


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata or {"format": "pt"})


def save_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, folder: Path, kohya: bool = False) -> Path:
    """Write the adapters of `unet` (and of `text_encoder`, when given) as `pytorch_lora_weights.safetensors`
    (diffusers layout), and with `kohya` also the kohya/A1111 file; returns the diffusers file."""
    state = lora_state_dict(unet) | (lora_state_dict(text_encoder, "text_encoder") if text_encoder is not None else {})
    save_atomic(state, folder / LORA_FILE)
    if kohya:
        save_atomic(to_kohya(state), folder / KOHYA_FILE, {"ss_network_module": "networks.lora"})
    return folder / LORA_FILE


def to_kohya(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers layout → kohya/A1111 (`lora_unet_<module_with_underscores>.lora_down.weight`, `.alpha`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        module, kind = split_key(rest)
        if component == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module  # transformers 5 flattened CLIPTextModel; A1111/kohya use 4's names
        name = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + module.replace(".", "_")
        out[f"{name}.lora_{kind}.weight"] = value
        if kind == "down":
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
