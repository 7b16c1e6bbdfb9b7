"""Image–caption data through HF `datasets`: imagefolders, caption sidecars, hub datasets, streaming.

Images are decoded here rather than by `datasets`, so that a file that fails to decode is skipped and
counted instead of stopping a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import datasets
import torch

from .config import DataConfig
from .images import IMAGE_EXTENSIONS, decode_image, preprocess


def _has_metadata(folder: Path) -> bool:
    return any(folder.glob("metadata.jsonl")) or any(folder.glob("*/metadata.jsonl"))


def read_caption(path: Path) -> str:
    """A sidecar caption file's text ("" when there is none), or an error that names the file."""
    if not path.is_file():
        return ""
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"Caption file {path} is not UTF-8 text; save it as UTF-8.") from None


def sidecar_dataset(folder: Path, caption_column: str = "text") -> datasets.Dataset:
    """Images in a folder (recursively) with captions in same-named .txt files; no caption → empty string."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    captions = [read_caption(p.with_suffix(".txt")) for p in paths]
    return datasets.Dataset.from_dict({"image": [str(p) for p in paths], caption_column: captions}).cast_column(
        "image", datasets.Image(decode=False))


def load_image_dataset(cfg: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    """The training dataset, images left undecoded (dicts of bytes/path) so bad files can be skipped."""
    if not cfg.path:
        raise ValueError("data.path is empty; set it to an image folder or a hub dataset name.")
    local = Path(cfg.path).expanduser()
    if local.is_dir():
        if _has_metadata(local):
            ds = datasets.load_dataset("imagefolder", data_dir=str(local), split=cfg.split, streaming=cfg.streaming)
        else:
            ds = sidecar_dataset(local, cfg.caption_column)
            if cfg.streaming:
                ds = ds.to_iterable_dataset()
    elif local.exists():
        raise ValueError(f"data.path={cfg.path} is a file; point it to a folder of images or a hub dataset name.")
    else:
        ds = datasets.load_dataset(cfg.path, split=cfg.split, streaming=cfg.streaming)
    columns = ds.column_names or []
    if "image" not in columns or cfg.caption_column not in columns:
        raise ValueError(f"Dataset {cfg.path} has columns {columns}; it needs 'image' and the caption column "
                         f"'{cfg.caption_column}' (set data.caption_column).")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    if cfg.max_samples is not None:
        ds = ds.take(cfg.max_samples) if cfg.streaming else ds.select(range(min(cfg.max_samples, len(ds))))
    return ds


def caption_variants(example: dict[str, Any], cfg: DataConfig) -> tuple[list[str], int]:
    """Every caption an example may be trained with — templates over its caption(s), then over its tags — and
    how many of them come from the caption itself (the rest are tag captions)."""
    main = example[cfg.caption_column]
    mains = [main] if isinstance(main, str) else list(main)
    tags = list(example.get(cfg.tags_column) or []) if cfg.tags_column else []
    unique = lambda texts: list(dict.fromkeys(t.strip() for t in texts if t.strip()))  # noqa: E731
    from_caption = unique(t.format(m) for m in mains for t in cfg.caption_templates) or [""]
    from_tags = [v for v in unique(t.format(tag) for tag in tags for t in cfg.tag_templates) if v not in from_caption]
    return from_caption + from_tags, len(from_caption)


@dataclass
class Example:
    image: torch.Tensor  # (3, R, R) in [-1, 1]
    captions: list[str]  # caption variants, those from the caption first, then those from tags
    num_main: int  # how many variants come from the caption


def iter_examples(ds: datasets.Dataset | datasets.IterableDataset, cfg: DataConfig,
                  skipped: list[int] | None = None) -> Iterator[Example]:
    """Decoded, preprocessed (center-crop, no flip) examples; undecodable images are counted in `skipped`."""
    for example in ds:
        image = decode_image(example["image"])
        if image is None:
            if skipped is not None:
                skipped.append(1)
            continue
        yield Example(preprocess(image, cfg.resolution), *caption_variants(example, cfg))


def dataset_fingerprint(ds: datasets.Dataset | datasets.IterableDataset, cfg: DataConfig) -> str:
    """What the cache depends on from the data side: the dataset's content fingerprint and preprocessing."""
    fp = getattr(ds, "_fingerprint", None) or ""
    local = Path(cfg.path).expanduser()
    files = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in local.rglob("*") if p.is_file()) \
        if local.is_dir() else []
    return json.dumps([fp, files, cfg.path, cfg.split, cfg.caption_column, cfg.tags_column, cfg.caption_templates,
                       cfg.tag_templates, cfg.tag_probability, cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.max_samples])
