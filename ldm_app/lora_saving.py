"""Saving trained LoRA adapters: the diffusers file every loader reads, and with `kohya` the kohya/A1111 one.

Saved files put the α/r scale into B, so they are self-contained: any loader that assumes α = r (diffusers'
default) gives the same result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_write
from .kohya import kohya_base_problem, kohya_metadata, to_kohya
from .lora import KOHYA_FILE, LORA_FILE, lora_state_dict

_log = logging.getLogger(__name__)


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata or {"format": "pt"})



def save_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, folder: Path, kohya: bool = False) -> Path:
    """Write the adapters of `unet` (and of `text_encoder`, when given) as `pytorch_lora_weights.safetensors`
    (diffusers layout, fp32), and with `kohya` also the kohya/A1111 file as sd-scripts writes it (fp16, α and
    rank in `.alpha` tensors and `ss_*` metadata, `sshs_*` hashes); returns the diffusers file."""
    models = {"unet": unet} | ({"text_encoder": text_encoder} if text_encoder is not None else {})
    states = {prefix: lora_state_dict(model, prefix) for prefix, model in models.items()}
    save_atomic({k: v for state in states.values() for k, v in state.items()}, folder / LORA_FILE)
    if kohya:
        problem = kohya_base_problem(unet)
        if problem:
            _log.warning(f"warning: {problem}")
        tensors = {k: v.half() for prefix, model in models.items()
                   for k, v in to_kohya(states[prefix], model.peft_config["default"].lora_alpha).items()}
        config = unet.peft_config["default"]
        save_atomic(tensors, folder / KOHYA_FILE, kohya_metadata(tensors, unet, config.r, config.lora_alpha))
    return folder / LORA_FILE
