"""LoRA (Hu et al. 2021) on the UNet's attention projections: W' = W + (α/r) · B A, with B = 0 at the start.

Adapters are peft layers added through diffusers' `PeftAdapterMixin` (UNet) or injected by peft and registered
the way transformers registers them (text encoder), so `set_adapters`, `fuse_lora` and `unfuse_lora` are
diffusers' own. The rest of LoRA lives by job: saving (`lora_saving`), kohya/A1111 files and their hashes
(`kohya`), refusing formats we do not apply (`lora_formats`), A1111's `<lora:name:weight>` syntax (`lora_tags`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from diffusers import ModelMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

LORA_FILE = "pytorch_lora_weights.safetensors"

KOHYA_FILE = "lora_kohya.safetensors"

PEFT_SECOND_ADAPTER = "Already found a `peft_config` attribute"  # peft's warning when a model gets a 2nd adapter


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
    with warnings.catch_warnings():  # peft warns on a second adapter; several (one per --lora) are intended
        warnings.filterwarnings("ignore", message=PEFT_SECOND_ADAPTER)
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
    """Adapter weights in the diffusers layout, α/r folded into up: `unet.<module>.lora.down/up.weight` and
    `text_encoder.text_model.<module>.lora_linear_layer.down/up.weight`. Text-encoder modules are named as in
    transformers 4 (`text_model.` first), which older diffusers, ComfyUI and A1111 read; we read both."""
    config = model.peft_config["default"]
    scale = config.lora_alpha / config.r
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    if prefix == "text_encoder":
        state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    return {f"{prefix}.{k}": (v * scale if ".up." in k else v).detach().float().cpu().contiguous()
            for k, v in state.items()}



def lora_file_path(path: str | os.PathLike) -> Path:
    """A LoRA file as given, or the standard file inside a folder."""
    path = Path(path).expanduser()
    return path / LORA_FILE if path.is_dir() else path
