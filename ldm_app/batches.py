"""Deterministic batches: which example and which random draws each step uses is a function of
(seed, step, process), so a resumed run sees exactly the data and noise an uninterrupted one would.

Example order: an endless stream of per-epoch permutations; global position p of micro-step s on process r
is s · (B · world) + r · B + j. Per-example choices (caption variant, flip, crop) come from a generator seeded
by (seed, p); per-step draws (posterior sample, noise, timesteps, caption dropout) from one seeded by
(seed, s, r). The cached and the on-the-fly sources share these choices, so they give the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator

from .cache import EncodedDataset, build_encoded_dataset, cache_key, load_or_build_cache
from .config import Config, DataConfig
from .data import caption_variants, load_image_dataset
from .encoders import Encoders
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


def text_batch(mean: torch.Tensor, std: torch.Tensor, captions: list[str], encoders: Encoders,
               encode_text: bool) -> Batch:
    """A batch of on-the-fly encodings; no frozen text states unless `encode_text` (a trained text encoder
    encodes the token ids inside the training graph)."""
    context = encoders.encode_captions(captions).cpu() if encode_text else None
    return Batch(mean.cpu(), std.cpu(), encoders.tokenize(captions), context)


def prepare_example(image: PIL.Image.Image, variants: list[str], num_main: int, seed: int, position: int,
                    cfg: DataConfig) -> tuple[torch.Tensor, str]:
    """The image tensor and caption that stream position `position` trains on: its caption variant and flip
    (`example_choice`), then resize and crop (random crops from their own generator)."""
    choice = example_choice(seed, position, len(variants), num_main, cfg)
    x = preprocess(image, cfg.resolution, cfg.center_crop, choice.flip, seeded_generator(seed, 3, position))
    return x, variants[choice.caption]


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
                return *prepare_example(image, *caption_variants(example, self.cfg), self.seed, position,
                                        self.cfg), skipped
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

    def __init__(self, ds: datasets.Dataset, cfg: DataConfig, seed: int, encoders: Encoders, encode_text: bool = True):
        self.dataset = _PositionDataset(ds, cfg, seed)
        self.cfg, self.encoders, self.encode_text = cfg, encoders, encode_text
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
        mean, std = self.encoders.encode_images(images)
        return text_batch(mean, std, list(captions), self.encoders, self.encode_text)


class StreamingBatches:
    """Batches from an iterable (streaming) dataset, shuffled through a buffer; for data larger than the disk.

    Resuming skips the examples already consumed, so order is reproduced but skipping costs a pass. Only
    decodable examples count as consumed, so undecodable ones cannot shift a resumed run.
    """

    def __init__(self, ds: datasets.IterableDataset, cfg: DataConfig, seed: int, rank: int, world: int,
                 encoders: Encoders, encode_text: bool = True, buffer_size: int = 1000):
        from datasets.distributed import split_dataset_by_node

        self.cfg, self.seed = cfg, seed
        self.encoders, self.encode_text = encoders, encode_text
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
            x, caption = prepare_example(image, variants, num_main, self.seed, self._position * world + rank, self.cfg)
            images.append(x)
            captions.append(caption)
        mean, std = self.encoders.encode_images(torch.stack(images))
        return text_batch(mean, std, captions, self.encoders, self.encode_text)


class BatchSource(Protocol):
    """(micro-step, batch size, rank, world) → that process's batch; a pure function of its arguments."""

    skipped: int  # undecodable images met so far (the cache counts its own when it is built)

    def __call__(self, micro_step: int, batch_size: int, rank: int, world: int) -> Batch: ...


def make_batches(config: Config, encoders: Encoders, accelerator: Accelerator, cache_folder: Path,
                 encode_text: bool = True, progress: bool = True) -> BatchSource:
    """The run's batch source: the encoded cache (built by the main process, read by the others), or decoding
    and encoding every step, or a stream. `encode_text=False` when the text encoder trains in-graph."""
    ds = load_image_dataset(config.data)
    t = config.train
    if t.cache:
        key = cache_key(ds, config.data, encoders)
        if accelerator.is_main_process:  # one process encodes; the others read what it wrote
            encoded = load_or_build_cache(cache_folder, key,
                                          lambda: build_encoded_dataset(ds, config.data, encoders, progress=progress))
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            encoded = load_or_build_cache(cache_folder, key, lambda: None)
        if progress:
            accelerator.print(f"{len(encoded)} training images cached ({encoded.skipped} failed to decode, skipped)")
        return CachedBatches(encoded, t.seed, config.data)
    if config.data.streaming:
        return StreamingBatches(ds, config.data, t.seed, accelerator.process_index, accelerator.num_processes,
                                encoders, encode_text)
    return EncodingBatches(ds, config.data, t.seed, encoders, encode_text)
