"""ldm-app: latent diffusion text-to-image — train, fine-tune, invert, edit and generate."""

from .components import load_text_encoder, load_tokenizer, load_unet, load_vae
from .pipeline import LdmPipeline
from .unet import UNET_PRESETS, LdmUNet

__all__ = ["LdmPipeline", "LdmUNet", "UNET_PRESETS", "load_vae", "load_text_encoder", "load_tokenizer", "load_unet"]
__version__ = "0.1.0"
