"""Deterministic batches: which example and which random draws each step uses is a function of
(seed, step, process), so a resumed run sees exactly the data and noise an uninterrupted one would.

Example order: an endless stream of per-epoch permutations; global position p of micro-step s on process r
is s · (B · world) + r · B + j. Per-example choices (caption variant, flip, crop) come from a generator seeded
by (seed, p); per-step draws (posterior sample, noise, timesteps, caption dropout) from one seeded by
(seed, s, r). The cached and the on-the-fly sources share these choices, so they give the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import datasets
import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer

from .cache import EncodedDataset, encode_captions, encode_images, tokenize
from .config import DataConfig
from .data import caption_variants
from .images import decode_image, preprocess


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed mixes the keys (NumPy's SeedSequence avoids collisions between them)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


class EpochOrder:
    """Position in the endless example stream → dataset index, reshuffled every epoch."""

    def __init__(self, num_examples: int, seed: int):
        self.n, self.seed = num_examples, seed
        self._epoch, self._perm = -1, None

    def __getitem__(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=seeded_generator(self.seed, 1, epoch))
        return int(self._perm[position % self.n])


@dataclass
class ExampleChoice:
    caption: int  # which caption variant
    flip: bool


def example_choice(seed: int, position: int, num_captions: int, num_main: int, cfg: DataConfig) -> ExampleChoice:
    """Caption variant (a tag caption with probability cfg.tag_probability, if there are any) and flip."""
    g = seeded_generator(seed, 2, position)
    use_tag = bool(torch.rand(1, generator=g) < cfg.tag_probability) and num_captions > num_main
    lo, hi = (num_main, num_captions) if use_tag else (0, num_main)
    caption = lo + int(torch.randint(hi - lo, (1,), generator=g))
    flip = bool(torch.rand(1, generator=g) < 0.5) and cfg.random_flip
    return ExampleChoice(caption, flip)


@dataclass
class Batch:
    mean: torch.Tensor  # (B, C, h, w) VAE posterior mean (unscaled)
    std: torch.Tensor  # (B, C, h, w) VAE posterior std
    input_ids: torch.Tensor  # (B, T) token ids of the chosen captions
    context: torch.Tensor | None  # (B, T, D) their frozen text-encoder hidden states (None: encoded in-graph)


def text_batch(mean: torch.Tensor, std: torch.Tensor, captions: list[str], tokenizer: CLIPTokenizer,
               text_encoder: CLIPTextModel | None) -> Batch:
    """A batch of on-the-fly encodings; no frozen text states when `text_encoder` is None (it is being trained)."""
    context = encode_captions(tokenizer, text_encoder, captions).cpu() if text_encoder is not None else None
    return Batch(mean.cpu(), std.cpu(), tokenize(tokenizer, captions), context)


def positions(micro_step: int, batch_size: int, rank: int, world: int) -> range:
    start = micro_step * batch_size * world + rank * batch_size
    return range(start, start + batch_size)


class CachedBatches:
    """Batches gathered from the encoded cache: no VAE or text encoder work at all."""

    def __init__(self, encoded: EncodedDataset, seed: int, cfg: DataConfig):
        self.encoded, self.seed, self.cfg = encoded, seed, cfg
        self.order = EpochOrder(len(encoded), seed)

    def __call__(self, micro_step: int, batch_size: int, rank: int, world: int) -> Batch:
        e = self.encoded
        idx, rows, flips = [], [], []
        for p in positions(micro_step, batch_size, rank, world):
            i = self.order[p]
            lo, hi = int(e.caption_offsets[i]), int(e.caption_offsets[i + 1])
            choice = example_choice(self.seed, p, hi - lo, int(e.caption_main[i]), self.cfg)
            idx.append(i), rows.append(int(e.caption_index[lo + choice.caption])), flips.append(choice.flip)
        idx_t, flip_t = torch.tensor(idx), torch.tensor(flips)[:, None, None, None]
        mean, std = e.mean[idx_t], e.std[idx_t]
        if e.flipped_mean is not None:
            mean = torch.where(flip_t, e.flipped_mean[idx_t], mean)
            std = torch.where(flip_t, e.flipped_std[idx_t], std)
        rows_t = torch.tensor(rows)
        return Batch(mean, std, e.caption_ids[rows_t], e.text_states[rows_t])


class _PositionDataset(torch.utils.data.Dataset):
    """Stream position → (preprocessed image, chosen caption, images skipped on the way); runs in workers."""

    def __init__(self, ds: datasets.Dataset, cfg: DataConfig, seed: int):
        self.ds, self.cfg, self.seed = ds, cfg, seed
        self.order = EpochOrder(len(ds), seed)

    def __len__(self) -> int:  # endless stream; the sampler decides
        return 2**62

    def __getitem__(self, position: int) -> tuple[torch.Tensor, str, int]:
        index = self.order[position]
        for skipped in range(len(self.ds)):  # a bad image is skipped; the next index takes its place
            example = self.ds[(index + skipped) % len(self.ds)]
            image = decode_image(example["image"])
            if image is not None:
                variants, num_main = caption_variants(example, self.cfg)
                choice = example_choice(self.seed, position, len(variants), num_main, self.cfg)
                x = preprocess(image, self.cfg.resolution, self.cfg.center_crop, choice.flip,
                               seeded_generator(self.seed, 3, position))
                return x, variants[choice.caption], skipped
        raise ValueError(f"No image in {self.cfg.path} can be decoded; check data.path.")


class _StepPositions(torch.utils.data.Sampler):
    def __init__(self, first_micro_step: int, batch_size: int, rank: int, world: int):
        self.first, self.batch_size, self.rank, self.world = first_micro_step, batch_size, rank, world

    def __iter__(self):
        step = self.first
        while True:
            yield list(positions(step, self.batch_size, self.rank, self.world))
            step += 1


class EncodingBatches:
    """Batches decoded (in `num_workers` data-loader workers) and encoded on the fly, every step: the work
    the cache saves. An image that fails to decode is skipped and counted."""

    def __init__(self, ds: datasets.Dataset, cfg: DataConfig, seed: int, vae: AutoencoderKL, tokenizer: CLIPTokenizer,
                 text_encoder: CLIPTextModel | None):
        self.dataset = _PositionDataset(ds, cfg, seed)
        self.cfg, self.vae, self.tokenizer, self.text_encoder = cfg, vae, tokenizer, text_encoder
        self.skipped = 0
        self._loader: Iterator | None = None
        self._next_step = -1

    def __call__(self, micro_step: int, batch_size: int, rank: int, world: int) -> Batch:
        if self._loader is None or micro_step != self._next_step:
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=_StepPositions(micro_step, batch_size, rank, world),
                num_workers=self.cfg.num_workers, persistent_workers=False)
            self._loader = iter(loader)
        images, captions, skipped = next(self._loader)
        self._next_step = micro_step + 1
        self.skipped += int(skipped.sum())
        mean, std = encode_images(self.vae, images)
        return text_batch(mean, std, list(captions), self.tokenizer, self.text_encoder)


class StreamingBatches:
    """Batches from an iterable (streaming) dataset, shuffled through a buffer; for data larger than the disk.

    Resuming skips the examples already consumed, so order is reproduced but skipping costs a pass. Only
    decodable examples count as consumed, so undecodable ones cannot shift a resumed run.
    """

    def __init__(self, ds: datasets.IterableDataset, cfg: DataConfig, seed: int, rank: int, world: int,
                 vae: AutoencoderKL, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel | None,
                 buffer_size: int = 1000):
        from datasets.distributed import split_dataset_by_node

        self.cfg, self.seed = cfg, seed
        self.vae, self.tokenizer, self.text_encoder = vae, tokenizer, text_encoder
        self.ds = split_dataset_by_node(ds.shuffle(seed=seed, buffer_size=buffer_size), rank=rank, world_size=world)
        self._iter: Iterator | None = None
        self._position = 0  # decodable examples consumed: micro-step s starts at s · batch_size
        self._epoch = 0
        self.skipped = 0

    def _next_example(self):
        while True:
            if self._iter is None:
                self.ds.set_epoch(self._epoch)
                self._iter = iter(self.ds)
            try:
                example = next(self._iter)
            except StopIteration:
                self._iter, self._epoch = None, self._epoch + 1
                continue
            image = decode_image(example["image"])
            if image is None:
                self.skipped += 1
                continue
            self._position += 1
            return image, *caption_variants(example, self.cfg)

    def __call__(self, micro_step: int, batch_size: int, rank: int, world: int) -> Batch:
        while self._position < micro_step * batch_size:  # resume: skip what earlier steps consumed
            self._next_example()
        images, captions = [], []
        for _ in range(batch_size):
            image, variants, num_main = self._next_example()
            p = self._position * world + rank
            choice = example_choice(self.seed, p, len(variants), num_main, self.cfg)
            images.append(preprocess(image, self.cfg.resolution, self.cfg.center_crop, choice.flip,
                                     seeded_generator(self.seed, 3, p)))
            captions.append(variants[choice.caption])
        mean, std = encode_images(self.vae, torch.stack(images))
        return text_batch(mean, std, captions, self.tokenizer, self.text_encoder)
