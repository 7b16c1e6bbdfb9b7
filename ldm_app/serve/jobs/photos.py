"""Photos uploaded for a fine-tune (files, or zips of them, with .txt captions or a caption per file name) →
the folder `finetune_lora` reads: images and .txt sidecars under safe names, other captions in metadata.jsonl.

Everything is checked before the folder appears (it appears whole or not at all): every image decodes and is
within the pixel limit, every image has a caption, zips are bounded in entries and unpacked size.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path, PurePosixPath

from ...atomic import atomic_folder
from ...images import IMAGE_EXTENSIONS
from ..settings import Limits
from ..validation import ApiError, decode_image_bytes

MAX_PHOTOS = 1000  # images per fine-tune
MAX_UNZIPPED_BYTES = 512 * 2**20  # all entries of the uploaded zips together


def safe_name(name: str) -> str:
    """A file name without folders or characters a file system or URL may choke on; keeps the suffix."""
    base = PurePosixPath(name.replace("\\", "/")).name
    stem, suffix = Path(base).stem, Path(base).suffix.lower()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".") or "photo"
    return stem[:100] + re.sub(r"[^a-z0-9.]", "", suffix)


def expand_zips(files: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Uploaded (name, bytes), with each .zip replaced by its images and .txt files (folders flattened)."""
    out, unzipped = [], 0
    for name, raw in files:
        if not name.lower().endswith(".zip"):
            out.append((name, raw))
            continue
        try:
            archive = zipfile.ZipFile(io.BytesIO(raw))
            entries = [e for e in archive.infolist() if not e.is_dir()]
        except (zipfile.BadZipFile, OSError, ValueError):
            raise ApiError(422, f"{name} is not a zip file that can be read; send the photos themselves or a "
                                "valid .zip.", "photos") from None
        for entry in entries:
            entry_name = PurePosixPath(entry.filename).name
            if entry_name.startswith(".") or "__MACOSX" in entry.filename:
                continue
            suffix = Path(entry_name).suffix.lower()
            if suffix not in IMAGE_EXTENSIONS | {".txt"}:
                continue
            unzipped += entry.file_size
            if unzipped > MAX_UNZIPPED_BYTES or len(out) >= 2 * MAX_PHOTOS:
                raise ApiError(413, f"{name} unpacks to more than {MAX_UNZIPPED_BYTES // 2**20} MiB or "
                                    f"{2 * MAX_PHOTOS} files; send fewer photos.", "photos")
            try:
                data = archive.read(entry)
            except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError):
                raise ApiError(422, f"{name}: {entry.filename} cannot be unpacked; zip the photos again "
                                    "(no encryption).", "photos") from None
            if len(data) != entry.file_size:  # a size in the directory that lies
                raise ApiError(422, f"{name}: {entry.filename} is damaged; zip the photos again.", "photos")
            out.append((entry_name, data))
    return out


def stage_uploads(files: list[tuple[str, bytes]], captions: dict[str, str], prompt: str | None, folder: Path,
                  limits: Limits) -> int:
    """Write the uploads into `folder` as `finetune_lora` reads them; returns the number of photos.

    A photo's caption is its .txt sidecar (same name), else `captions[its uploaded name]`, else `prompt`.
    """
    files = expand_zips(files)
    texts = {Path(safe_name(n)).stem: raw for n, raw in files if n.lower().endswith(".txt")}
    images: dict[str, bytes] = {}
    metadata = []
    for name, raw in files:
        if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            if not name.lower().endswith(".txt"):
                raise ApiError(422, f"{name} is neither an image ({', '.join(sorted(IMAGE_EXTENSIONS))}), a .txt "
                                    "caption nor a .zip of them; leave it out.", "photos")
            continue
        decode_image_bytes(raw, f"photos ({name})", limits)  # a 4xx naming the file if it is not an image
        stored = safe_name(name)
        stem, suffix, i = Path(stored).stem, Path(stored).suffix, 1
        while stored in images:  # two uploads with one name keep both
            stored, i = f"{stem}-{i}{suffix}", i + 1
        images[stored] = raw
        caption = captions.get(name) or captions.get(PurePosixPath(name).name)
        if Path(stored).stem in texts:
            pass  # its sidecar, written below, wins
        elif caption and caption.strip():
            metadata.append({"file_name": stored, "text": caption.strip()})
        elif not prompt:
            raise ApiError(422, f"{name} has no caption; send a prompt for all photos, a caption for it in "
                                "'captions', or a .txt file of the same name.", "prompt")
    if not images:
        raise ApiError(422, "no photos were sent; send image files (or a .zip of them) as 'photos'.", "photos")
    if len(images) > MAX_PHOTOS:
        raise ApiError(413, f"{len(images)} photos sent; a fine-tune takes at most {MAX_PHOTOS}.", "photos")
    unknown = [name for name in captions if name not in {n for n, _ in files}]
    if unknown:
        raise ApiError(422, f"captions names {unknown[0]!r}, which is not among the photos sent; use the photos' "
                            "file names as keys.", "captions")
    with atomic_folder(folder) as tmp:
        for stored, raw in images.items():
            (tmp / stored).write_bytes(raw)
            sidecar = texts.get(Path(stored).stem)
            if sidecar is not None:
                try:
                    text = sidecar.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise ApiError(422, f"the caption for {stored} is not UTF-8 text; save it as UTF-8.",
                                   "photos") from None
                (tmp / Path(stored).with_suffix(".txt")).write_text(text, encoding="utf-8")
        if metadata:
            (tmp / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metadata),
                                                encoding="utf-8")
    return len(images)
