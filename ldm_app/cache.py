"""Encoding images and captions with the frozen VAE and text encoder — and caching the results.

The VAE and text encoder never change during UNet training, so their outputs can be computed once. The
cache stores the VAE *posterior* (mean, std), not a latent sample: each step still draws a fresh
z = mean + std · ε, exactly as encoding on the fly would. It lives in the run folder under a key made from
the data and encoder fingerprints, so changing either builds a new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from .atomic import atomic_write
from .config import DataConfig
from .data import dataset_fingerprint, iter_examples


CACHE_FORMAT = "2"  # bump when EncodedDataset's fields change, so old caches are rebuilt


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) in [-1, 1] → the VAE posterior's mean and std (unscaled latents)."""
    posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Captions → token ids (B, T), padded/truncated to the tokenizer's length."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_captions(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, captions: list[str]) -> torch.Tensor:
    """Captions → text-encoder hidden states (B, T, D)."""
    return text_encoder(tokenize(tokenizer, captions).to(text_encoder.device))[0].float()


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's weights: the cache must be rebuilt when an encoder changes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class EncodedDataset:
    """Posterior parameters per image (and per flipped image) and text states per unique caption."""

    mean: torch.Tensor  # (N, C, h, w)
    std: torch.Tensor  # (N, C, h, w)
    flipped_mean: torch.Tensor | None  # the same for horizontally flipped images, when data.random_flip
    flipped_std: torch.Tensor | None
    caption_offsets: torch.Tensor  # (N + 1,) example i's captions are caption_index[offsets[i]:offsets[i+1]]
    caption_index: torch.Tensor  # (M,) rows of text_states
    caption_main: torch.Tensor  # (N,) how many of example i's captions come from its caption (the rest: tags)
    text_states: torch.Tensor  # (U, T, D)
    caption_ids: torch.Tensor  # (U, T) token ids of the unique captions, for runs that train the text encoder
    skipped: int  # images that failed to decode

    def __len__(self) -> int:
        return self.mean.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k) for k in ("mean", "std", "caption_offsets", "caption_index", "caption_main",
                                                "text_states", "caption_ids")}
        if self.flipped_mean is not None:
            out |= {"flipped_mean": self.flipped_mean, "flipped_std": self.flipped_std}
        return {k: v.contiguous() for k, v in out.items()}


def build_encoded_dataset(ds: datasets.Dataset, cfg: DataConfig, vae: AutoencoderKL, tokenizer: CLIPTokenizer,
                          text_encoder: CLIPTextModel, batch_size: int = 32, progress: bool = True) -> EncodedDataset:
    """One pass over the data through both frozen encoders."""
    means, stds, fmeans, fstds, per_example, mains = [], [], [], [], [], []
    skipped: list[int] = []
    captions: dict[str, int] = {}
    batch: list[torch.Tensor] = []

    def flush() -> None:
        images = torch.stack(batch)
        m, s = encode_images(vae, images)
        means.append(m), stds.append(s)
        if cfg.random_flip:
            fm, fs = encode_images(vae, images.flip(-1))
            fmeans.append(fm), fstds.append(fs)
        batch.clear()

    for example in tqdm(iter_examples(ds, cfg, skipped=skipped), total=len(ds), desc="Encoding images",
                        disable=not progress):
        batch.append(example.image)
        per_example.append([captions.setdefault(c, len(captions)) for c in example.captions])
        mains.append(example.num_main)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not per_example:
        raise ValueError(f"No usable image in {cfg.path} ({len(skipped)} failed to decode); check data.path.")

    texts = list(captions)
    states = torch.cat([encode_captions(tokenizer, text_encoder, texts[i:i + 256])
                        for i in tqdm(range(0, len(texts), 256), desc="Encoding captions", disable=not progress)])
    counts = torch.tensor([0] + [len(c) for c in per_example])
    return EncodedDataset(
        mean=torch.cat(means), std=torch.cat(stds),
        flipped_mean=torch.cat(fmeans) if fmeans else None, flipped_std=torch.cat(fstds) if fstds else None,
        caption_offsets=counts.cumsum(0), caption_index=torch.tensor([i for c in per_example for i in c]),
        caption_main=torch.tensor(mains),
        text_states=states, caption_ids=tokenize(tokenizer, texts), skipped=len(skipped))


def cache_key(ds: datasets.Dataset, cfg: DataConfig, vae: torch.nn.Module, tokenizer: CLIPTokenizer,
              text_encoder: torch.nn.Module) -> str:
    """Changes whenever the data, the preprocessing, or an encoder changes."""
    parts = [CACHE_FORMAT, dataset_fingerprint(ds, cfg), module_fingerprint(vae), module_fingerprint(text_encoder),
             json.dumps(tokenizer.get_vocab(), sort_keys=True), str(tokenizer.model_max_length)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_or_build_cache(folder: Path, key: str, build: Callable[[], EncodedDataset]) -> EncodedDataset:
    """Load `folder/encoded-<key>.safetensors`, or build it, write it atomically and drop stale caches."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"encoded-{key}.safetensors"
    if path.is_file():
        tensors = load_file(path)
        meta = json.loads((folder / f"encoded-{key}.json").read_text())
        return EncodedDataset(flipped_mean=tensors.pop("flipped_mean", None),
                              flipped_std=tensors.pop("flipped_std", None), skipped=meta["skipped"], **tensors)
    encoded = build()
    (folder / f"encoded-{key}.json").write_text(json.dumps({"skipped": encoded.skipped, "examples": len(encoded)}))
    with atomic_write(path) as tmp:  # the tensors file appears last: it marks the cache as complete
        save_file(encoded.tensors(), tmp)
    for stale in folder.glob("encoded-*"):
        if key not in stale.name:
            stale.unlink()
    return encoded
