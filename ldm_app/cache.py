"""The encoded cache: the frozen encoders' outputs for a whole dataset, computed once per run folder.

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
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .atomic import atomic_write
from .config import DataConfig
from .data import dataset_fingerprint, iter_examples
from .encoders import Encoders

CACHE_FORMAT = "2"  # bump when EncodedDataset's fields change, so old caches are rebuilt


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


def build_encoded_dataset(ds: datasets.Dataset, cfg: DataConfig, encoders: Encoders, batch_size: int = 32,
                          progress: bool = True) -> EncodedDataset:
    """One pass over the data through both frozen encoders."""
    means, stds, fmeans, fstds, per_example, mains = [], [], [], [], [], []
    skipped: list[int] = []
    captions: dict[str, int] = {}
    batch: list[torch.Tensor] = []

    def flush() -> None:
        images = torch.stack(batch)
        m, s = encoders.encode_images(images)
        means.append(m), stds.append(s)
        if cfg.random_flip:
            fm, fs = encoders.encode_images(images.flip(-1))
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
    states = torch.cat([encoders.encode_captions(texts[i:i + 256])
                        for i in tqdm(range(0, len(texts), 256), desc="Encoding captions", disable=not progress)])
    counts = torch.tensor([0] + [len(c) for c in per_example])
    # contiguous, as the cache reads back from disk: a layout (the VAE's channels_last) changes how convolutions
    # round, so a run resumed from the saved cache would drift from one that built it in the last bit
    return EncodedDataset(
        mean=torch.cat(means).contiguous(), std=torch.cat(stds).contiguous(),
        flipped_mean=torch.cat(fmeans).contiguous() if fmeans else None,
        flipped_std=torch.cat(fstds).contiguous() if fstds else None,
        caption_offsets=counts.cumsum(0), caption_index=torch.tensor([i for c in per_example for i in c]),
        caption_main=torch.tensor(mains),
        text_states=states, caption_ids=encoders.tokenize(texts), skipped=len(skipped))


def cache_key(ds: datasets.Dataset, cfg: DataConfig, encoders: Encoders) -> str:
    """Changes whenever the data, the preprocessing, or an encoder changes."""
    parts = [CACHE_FORMAT, dataset_fingerprint(ds, cfg), encoders.fingerprint()]
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
