"""Where generated images go: output names claimed atomically, the free-space check before long work, and the
grid of a run's images. Shared by the CLI and every later door that writes files (batch jobs, training)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import PIL.Image
from diffusers.utils import make_image_grid

OTHER_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PNG_BYTES_PER_PIXEL = 3  # a PNG of an RGB image is at most about 3 bytes a pixel, plus its chunks
PNG_OVERHEAD = 65536  # metadata chunks and headers, generously


def output_paths(output: str | None, count: int, overwrite: bool) -> list[Path]:
    """Where each image goes: a file (`x.png`, or x-0.png, x-1.png … for several) or new names in a folder.

    Each name is claimed at once by creating it empty with O_EXCL, so two runs writing into one folder never
    pick the same name; the images replace their empty files atomically (`release_unwritten` removes the rest)."""
    target = Path(output or ".").expanduser()
    if target.suffix.lower() in OTHER_IMAGE_SUFFIXES:
        raise ValueError(f"--output {output}: images are written as PNG (which stores the generation parameters); "
                         f"use {target.with_suffix('.png').name} or a folder.")
    named = target.suffix.lower() == ".png"
    folder = target.parent if named else target
    if not named:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # reported below as not creatable
    if not folder.is_dir():
        raise ValueError(f"Output folder {folder} does not exist or cannot be created; pick a writable --output.")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"Output folder {folder} is not writable; pick a writable --output.")
    if named:
        paths = [target] if count == 1 else [target.with_name(f"{target.stem}-{i}.png") for i in range(count)]
        if overwrite:
            return paths
        claimed = []
        for path in paths:
            if not claim(path):
                release_unwritten(claimed)
                raise ValueError(f"{path} already exists; pass --overwrite or choose another --output.")
            claimed.append(path)
        return claimed
    paths, i = [], 0
    while len(paths) < count:  # the next free numbers; a name another run claims first is skipped
        path = folder / f"ldm-{i:05d}.png"
        if claim(path):
            paths.append(path)
        i += 1
    return paths


def claim(path: Path) -> bool:
    """Create `path` empty if no file has that name yet (atomically: O_EXCL); whether this call created it."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


@contextmanager
def claimed_outputs(output: str | None, count: int, overwrite: bool) -> Iterator[list[Path]]:
    """`output_paths`, released again where the block stops before an image was written."""
    paths = output_paths(output, count, overwrite)
    try:
        yield paths
    finally:
        release_unwritten(paths)


def release_unwritten(paths: list[Path]) -> None:
    """Remove the claimed names that are still empty (a run that stopped before writing them)."""
    for path in paths:
        if path.is_file() and path.stat().st_size == 0:
            path.unlink()


def require_free_space(folder: Path, need: int, what: str, fix: str, error: type[Exception] = ValueError) -> None:
    """Refuse before long work when `folder`'s disk cannot hold `need` bytes: better now than after it. `what`
    names what needs the space ("4 images of 512x512"), `fix` how to make room."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise error(f"{folder} has {free / 2**20:.0f} MiB free, but {what} need about {-(-need // 2**20)} MiB; "
                    f"{fix}.")


def png_bytes(count: int, width: int, height: int) -> int:
    """The most that `count` PNGs of width × height take on disk."""
    return count * (PNG_BYTES_PER_PIXEL * width * height + PNG_OVERHEAD)


def image_grid(images: Sequence[PIL.Image.Image], max_cols: int = 8) -> PIL.Image.Image:
    """All images in rows of at most `max_cols` (diffusers' `make_image_grid`), the last row padded with white."""
    cols = min(len(images), max_cols)
    rows = -(-len(images) // cols)
    blank = images[0].copy()
    blank.paste((255, 255, 255), (0, 0, *blank.size))
    return make_image_grid([*images, *[blank] * (rows * cols - len(images))], rows=rows, cols=cols)
