"""ldm-app: latent diffusion text-to-image — train, fine-tune, invert, edit and generate.

The public names load on first use (PEP 562), so that `import ldm_app.cli` — and `ldm-app --help` — does not
import torch and diffusers."""

from importlib import import_module
from typing import TYPE_CHECKING

__all__ = ["LdmPipeline", "LdmUNet", "UNET_PRESETS", "load_vae", "load_text_encoder", "load_tokenizer", "load_unet",
           "finetune_lora"]
__version__ = "0.1.0"

_WHERE = {"LdmPipeline": "pipeline", "LdmUNet": "unet", "UNET_PRESETS": "unet", "load_vae": "components",
          "load_text_encoder": "components", "load_tokenizer": "components", "load_unet": "components",
          "finetune_lora": "finetune"}

if TYPE_CHECKING:
    from .components import load_text_encoder, load_tokenizer, load_unet, load_vae
    from .finetune import finetune_lora
    from .pipeline import LdmPipeline
    from .unet import UNET_PRESETS, LdmUNet


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'ldm_app' has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
