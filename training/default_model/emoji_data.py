"""The emoji set that build_emoji_dataset.py writes, read whole into memory: one loader for the recipe's trainers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from datasets import load_dataset


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, list[dict]]:
    """A split's images as a uint8 NCHW tensor and its metadata rows; the set is tiny, so it stays in memory."""
    ds = load_dataset("imagefolder", data_dir=str(data_dir), split=split)
    images = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in ds["image"]]))
    return images.permute(0, 3, 1, 2).contiguous(), ds.remove_columns("image").to_list()
