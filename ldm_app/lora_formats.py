"""Which LoRA files ldm-app applies: kohya/A1111 and diffusers/peft layouts load; every other format (LyCORIS
LoHa/LoKr/…, DoRA, SDXL, embeddings, checkpoints) is refused whole, in one line that names it."""

from __future__ import annotations

import os
import re

import torch
from safetensors.torch import load_file

from .lora import LORA_FILE, lora_file_path


# Key patterns of formats we do not apply, and their names: a file with any of them is refused whole, since
# applying only its plain-LoRA part would silently give another image.
UNSUPPORTED_FORMATS = [
    (r"\.hada_w[12]_[ab]$|\.hada_t[12]$", "a LyCORIS LoHa file (hada_w1_a keys)"),
    (r"\.lokr_w[12](_[ab])?$|\.lokr_t2$", "a LyCORIS LoKr file (lokr_w1 keys)"),
    (r"\.on_input$", "a LyCORIS (IA)³ file (on_input keys)"),
    (r"\.oft_blocks$|\.oft_diag$|\.oft_r\b|\.boft_", "an OFT/BOFT file (oft_blocks keys)"),
    (r"\.a[12]\.weight$|\.b[12]\.weight$", "a LyCORIS GLoRA file (a1/b1 keys)"),
    (r"\.diff(_b)?$", "a LyCORIS full-weight difference file (diff keys)"),
    (r"\.lora_mid\.", "a LoCon/LyCORIS file with a Tucker core (lora_mid keys)"),
    (r"dora_scale$|lora_magnitude_vector", "a DoRA file (dora_scale / lora_magnitude_vector keys)"),
    (r"^lora_te[12]_|^text_encoder_2\.", "an SDXL LoRA (two text encoders)"),
    (r"^lora_transformer_|^transformer\.|^diffusion_model\.", "a LoRA for a transformer model (SD3, Flux, …)"),
    (r"^emb_params$|^string_to_param|^clip_[lg]$", "a textual-inversion embedding, not a LoRA"),
    (r"^model\.diffusion_model\.|^first_stage_model\.", "a full Stable Diffusion checkpoint, not a LoRA"),
]

LORA_KEY = re.compile(r"[._](lora_down|lora_up|lora[._]down|lora[._]up|lora_linear_layer\.(down|up)|lora_[AB])"
                      r"\.weight$|\.alpha$")


def check_lora_keys(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse, in one line naming the format, any file that is not a plain LoRA we can apply."""
    for pattern, name in UNSUPPORTED_FORMATS:
        key = next((k for k in state if re.search(pattern, k)), None)
        if key is not None:
            raise ValueError(f"{source} is {name}; ldm-app applies plain LoRA files only (lora_down/lora_up or "
                             "lora_A/lora_B keys): pass one of those, or convert this file to LoRA first.")
    foreign = next((k for k in state if not LORA_KEY.search(k)), None)
    if foreign is not None or not state:
        raise ValueError(f"{source} holds no LoRA weights ({f'key {foreign!r}' if foreign else 'no tensors'}); pass "
                         "a diffusers, peft or kohya LoRA file.")



def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LoRA safetensors file, or the standard file inside a folder; other formats are refused by name."""
    path = lora_file_path(path)
    if not path.is_file():
        raise ValueError(f"No LoRA file at {path}; pass a .safetensors file or a folder with {LORA_FILE}.")
    try:
        state = load_file(path)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"Cannot read LoRA file {path}: {err}; pass a safetensors LoRA file.") from None
    check_lora_keys(state, str(path))
    return state
