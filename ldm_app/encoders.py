"""The frozen encoders around the UNet — VAE for images, CLIP tokenizer + text encoder for captions — loaded
in one place and used through one object by training, caching and batching."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer

from .components import freeze, load_text_encoder, load_tokenizer, load_vae
from .config import ModelConfig
from .loading import load_model
from .single_file import is_single_file


def pipeline_subfolder(path: str, subfolder: str | None, component: str) -> str | None:
    """The explicit subfolder, else the component's subfolder when `path` is a local pipeline folder."""
    if subfolder is None and (Path(path).expanduser() / "model_index.json").is_file():
        return component
    return subfolder


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's weights: what is cached from an encoder must be rebuilt when it changes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Encoders:
    """VAE + tokenizer + text encoder: images → posterior (mean, std), captions → token ids → hidden states."""

    vae: AutoencoderKL
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel

    @classmethod
    def load(cls, m: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> "Encoders":
        """The encoders a model config names: folders or hub ids (a pipeline folder's subfolders by default), or
        single-file checkpoints, loaded as every command loads them (`ldm_app.loading.load_model`)."""
        tok_path = m.tokenizer or m.text_encoder
        files = {path: load_model(path) for path in {m.vae, m.text_encoder, tok_path} if is_single_file(path)}
        if m.vae in files:
            vae = freeze(files[m.vae].vae.to(dtype=dtype or files[m.vae].vae.dtype))
        else:
            vae = load_vae(m.vae, pipeline_subfolder(m.vae, m.vae_subfolder, "vae"), dtype)
        if m.text_encoder in files:
            text_encoder = freeze(files[m.text_encoder].text_encoder.to(dtype=dtype or torch.float32))
        else:
            text_encoder = load_text_encoder(m.text_encoder, pipeline_subfolder(
                m.text_encoder, m.text_encoder_subfolder, "text_encoder"), dtype)
        if tok_path in files:
            tokenizer = files[tok_path].tokenizer
        else:
            tokenizer = load_tokenizer(tok_path, pipeline_subfolder(
                tok_path, m.tokenizer_subfolder if m.tokenizer else None, "tokenizer"))
        return cls(vae.to(device), tokenizer, text_encoder.to(device))

    @property
    def scaling_factor(self) -> float:
        """The VAE's latent scale: the UNet sees z · scaling_factor (unit variance, roughly)."""
        return self.vae.config.scaling_factor

    @property
    def vae_factor(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] → the VAE posterior's mean and std (unscaled latents), fp32."""
        posterior = self.vae.encode(images.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions → token ids (B, T), padded/truncated to the tokenizer's length."""
        return self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Captions → text-encoder hidden states (B, T, D), fp32."""
        return self.text_encoder(self.tokenize(captions).to(self.text_encoder.device))[0].float()

    def fingerprint(self) -> str:
        """Changes whenever any encoder's weights or the tokenizer's vocabulary change."""
        return "\n".join([module_fingerprint(self.vae), module_fingerprint(self.text_encoder),
                          json.dumps(self.tokenizer.get_vocab(), sort_keys=True), str(self.tokenizer.model_max_length)])
