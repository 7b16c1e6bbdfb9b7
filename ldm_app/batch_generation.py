"""Batch generation: a prompt file or data set → an image-folder data set (`metadata.jsonl` + one PNG per image,
each carrying its parameters), on one process, on N processes (`accelerate launch` / `torchrun`) or on Ray.

Image i is drawn from `seed + i` unless its row gives a seed, so the files do not depend on the number of processes,
the batch size or the interruptions. Each image is written whole (a temp file, then a rename), then its record
(`.records/<i>.json`); an item counts as done when its record exists, so re-running the same command skips it and
a kill loses at most the items in flight. `metadata.jsonl` is assembled from the records once every item is done,
by one process, so it never holds a partial or duplicate row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from tqdm.auto import tqdm

from .atomic import atomic_write
from .distributed import check_launched
from .generation import generate_images
from .hub import push_to_hub
from .loading import dtype_name, load_loras, load_pipeline, model_record, pick_device, pick_dtype
from .outputs import png_bytes, require_free_space
from .png_metadata import png_info
from .request import GenerationRequest
from .threads import use_threads

METADATA, RECORDS, JOB = "metadata.jsonl", ".records", ".job.json"  # in the output folder
# what a row may set for its own images (the other columns are copied into metadata.jsonl as they are)
ROW_FIELDS: dict[str, type] = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance": float,
                               "eta": float, "sampler": str, "width": int, "height": int}


@dataclass(frozen=True)
class Item:
    """One image of the job: its place, its generation fields and the row's other columns."""

    index: int
    fields: dict[str, Any]  # every key of ROW_FIELDS (width/height None: the model's native size)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return f"{self.index:08d}.png"


@dataclass(frozen=True)
class Settings:
    """What every item shares: the model and how it runs."""

    model: str = "default"
    variant: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    loras: tuple[str, ...] = ()
    batch_size: int = 8
    threads: int | None = None  # CPU threads per process (None: torch's default; Ray gives each actor its CPU)


# ----------------------------------------------------------------------------------------------------------
# Prompts in


def read_rows(source: str, column: str = "prompt", split: str = "train") -> list[dict[str, Any]]:
    """The rows of a prompt source, each with a `prompt`: a .txt file (one prompt a line, blank lines skipped), a
    .jsonl or .csv file with a `column` column, or a Hub data set (or a local data set folder) with that column."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl", ".csv") and not path.is_file():
        raise ValueError(f"--prompts {source}: no such file; pass a .txt, .jsonl or .csv file or a Hub data set.")
    if suffix == ".txt":
        return [{"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{source} line {n} is not JSON ({err.msg}); write one object a line.") from None
                if not isinstance(rows[-1], dict):
                    raise ValueError(f"{source} line {n} is not a JSON object; write {{\"prompt\": \"…\"}} a line.")
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = [_csv_values(row) for row in csv.DictReader(f)]
    else:
        rows = _dataset_rows(source, column, split)
    return [_with_prompt(row, column, source, n) for n, row in enumerate(rows, 1)]


def _csv_values(row: dict[str, str]) -> dict[str, Any]:
    """CSV cells are text: numbers for the generation fields, empty cells left out (the defaults apply)."""
    out = {}
    for key, value in row.items():
        if value is None or value == "":
            continue
        kind = ROW_FIELDS.get(key, str)
        try:
            out[key] = kind(value) if kind in (int, float) else value
        except ValueError:
            raise ValueError(f"column {key} holds {value!r}, not a {kind.__name__}") from None
    return out


def _dataset_rows(source: str, column: str, split: str) -> list[dict[str, Any]]:
    import datasets

    saved = Path(source).expanduser()
    try:
        if (saved / "state.json").is_file() or (saved / "dataset_dict.json").is_file():  # written by save_to_disk
            ds = datasets.load_from_disk(str(saved))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, KeyError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise ValueError(f"--prompts {source}: not a .txt/.jsonl/.csv file, and no data set loads from it "
                         f"({' '.join(str(err).split())[:200]}).") from None
    if column not in ds.column_names:
        raise ValueError(f"--prompts {source} has no column {column!r}; its columns: {', '.join(ds.column_names)}; "
                         "pass --prompt-column.")
    keep = [c for c in ds.column_names if c in ROW_FIELDS or c == column]  # not its images or other payloads
    return ds.select_columns(keep).to_list()


def _with_prompt(row: dict[str, Any], column: str, source: str, n: int) -> dict[str, Any]:
    row = dict(row)
    if column != "prompt" and column in row:
        row["prompt"] = row.pop(column)
    if not isinstance(row.get("prompt"), str):
        raise ValueError(f"{source} row {n} has no text in column {column!r}; give every row a prompt "
                         "(or pass --prompt-column).")
    return row


def make_items(rows: list[dict[str, Any]], defaults: dict[str, Any], seed: int, per_row: int = 1) -> list[Item]:
    """`per_row` items per row; item i uses seed + i, or its row's seed + k for the row's k-th image. A row's
    generation fields override `defaults`; its other columns are kept for metadata.jsonl."""
    items = []
    for n, row in enumerate(rows):
        fields, extra = dict(defaults), {}
        for key, value in row.items():
            if key not in ROW_FIELDS:
                extra[key] = value
            elif value is not None:
                fields[key] = _typed(key, value, n + 1)
        if "file_name" in extra:
            raise ValueError(f"row {n + 1} has a file_name column, which metadata.jsonl uses for the image; rename it.")
        for k in range(per_row):
            index = len(items)
            item_seed = row["seed"] + k if row.get("seed") is not None else seed + index
            items.append(Item(index, fields | {"seed": item_seed}, extra))
            try:  # the request's own rules, before any model loads (the model's are checked when it has)
                GenerationRequest(**items[-1].fields).checked()
            except ValueError as err:
                raise ValueError(f"row {n + 1}: {err}; fix the row or the option that sets it.") from None
    return items


def _typed(key: str, value: Any, row: int) -> Any:
    kind = ROW_FIELDS[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"row {row}: {key} is {value!r}, not a {kind.__name__}.")
    return value


# ----------------------------------------------------------------------------------------------------------
# The output folder


class OutputFolder:
    """The data set being written: which items are done, writing one item, assembling metadata.jsonl."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        self.records = self.folder / RECORDS

    def claim(self, items: list[Item], settings: Settings) -> None:
        """Start the job here, or check that the job already here is this one (re-running resumes it)."""
        job = {"items": job_fingerprint(items), "count": len(items), "model": settings.model,
               "variant": settings.variant, "dtype": settings.dtype, "loras": list(settings.loras)}
        path = self.folder / JOB
        if path.is_file():
            held = json.loads(path.read_text())
            if held != job:
                changed = [key for key in job if held.get(key) != job[key]]
                raise ValueError(f"{self.folder} holds another batch job ({', '.join(changed)} differ); re-run its own "
                                 "command to resume it, or pass another --output.")
            for tmp in [*self.folder.glob(".*.tmp*"), *self.records.glob(".*.tmp*")]:  # left by a kill mid-write
                tmp.unlink(missing_ok=True)
            return
        if self.folder.exists() and any(p.name != RECORDS for p in self.folder.iterdir()):
            raise ValueError(f"{self.folder} is not empty and holds no batch job; pass a new or empty --output.")
        self.records.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(job, indent=1))

    def done(self, item: Item) -> bool:
        return (self.records / f"{item.index:08d}.json").is_file()

    def write(self, item: Item, png: bytes, record: dict[str, Any]) -> None:
        """The image, then its record, each whole or not at all (the record marks the item done)."""
        with atomic_write(self.folder / item.file_name) as tmp:
            tmp.write_bytes(png)
        with atomic_write(self.records / f"{item.index:08d}.json") as tmp:
            tmp.write_text(json.dumps(record, ensure_ascii=False))

    def assemble(self, items: list[Item]) -> Path:
        """metadata.jsonl from the records, in item order; written whole."""
        with atomic_write(self.folder / METADATA) as tmp, open(tmp, "w", encoding="utf-8") as out:
            for item in items:
                out.write((self.records / f"{item.index:08d}.json").read_text(encoding="utf-8") + "\n")
        return self.folder / METADATA


def job_fingerprint(items: list[Item]) -> str:
    """A digest of every item's fields and columns: the same prompts and settings give the same digest."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.index, item.fields, item.extra], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Items → PNG bytes


class Painter:
    """A loaded pipeline that turns items into PNG files' bytes (with their parameters) and metadata records, through
    the library's one image loop (`generation.generate_images`). One per process, or one per Ray actor."""

    def __init__(self, settings: Settings, device: str | None = None) -> None:
        use_threads(settings.threads)
        dev = pick_device(device or settings.device)
        weights_dtype = pick_dtype(settings.dtype, dev)
        self.pipe = load_pipeline(settings.model, dev, weights_dtype, settings.variant)
        self.pipe.set_progress_bar_config(disable=True)
        self.adapters = load_loras(self.pipe, settings.loras)
        self.settings = settings
        self.recorded = {"model": model_record(settings.model), "dtype": dtype_name(weights_dtype),
                         "loras": list(settings.loras)}

    def request(self, item: Item) -> GenerationRequest:
        """The item's one-image request, checked against the model, its native size filled in."""
        return GenerationRequest(**item.fields, **self.recorded).resolved(self.pipe)

    def __call__(self, items: list[Item]) -> list[tuple[bytes, dict[str, Any]]]:
        requests = [self.request(item) for item in items]
        images = generate_images(self.pipe, requests, self.settings.batch_size, self.adapters)
        return [(png(image, request), record(item, request)) for item, request, (image,) in zip(items, requests, images)]


def png(image: PIL.Image.Image, request: GenerationRequest) -> bytes:
    """The PNG file of one image, with its parameters (as every ldm-app PNG)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(request))
    return buffer.getvalue()


def record(item: Item, request: GenerationRequest) -> dict[str, Any]:
    """The item's row of metadata.jsonl: its file, its settings as drawn, the row's other columns."""
    fields = {name: getattr(request, name) for name in ROW_FIELDS}
    return {"file_name": item.file_name, **fields, **item.extra}


# ----------------------------------------------------------------------------------------------------------
# The job


def pending_batches(items: list[Item], out: OutputFolder, size: int) -> list[list[Item]]:
    """The job's fixed batches (items 0…size−1, size…2·size−1, …) that still hold an unfinished item.

    Batches are cut from the whole job, never from what is left, and a batch is redone whole: the pixels of an image
    can change in the last bit with the other images in its batch, so fixed batches give the same files on any
    number of processes and after any interruption."""
    fixed = [items[start:start + size] for start in range(0, len(items), size)]
    return [batch for batch in fixed if not all(out.done(item) for item in batch)]


def check_space(out: OutputFolder, painter: Painter, items: list[Item]) -> None:
    """Refuse before drawing when the disk cannot hold the images still to come (sized as the first one)."""
    request = painter.request(items[0])
    what = f"{len(items)} images of {request.width}x{request.height}"
    require_free_space(out.folder, png_bytes(len(items), request.width, request.height), what,
                       "free some space or choose another --output")


def run_local(items: list[Item], output: str | os.PathLike, settings: Settings, progress: bool = True) -> Path | None:
    """Make the pending items on this process, or this process's share of them under `accelerate launch` /
    `torchrun`; returns metadata.jsonl's path (from the one process that writes it; None on the others)."""
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_launched(state.num_processes, "-m ldm_app generate --prompts …")
    out = OutputFolder(output)
    if state.is_main_process:
        out.claim(items, settings)
    state.wait_for_everyone()
    out.claim(items, settings)  # every process checks (and fails) alike
    pending = pending_batches(items, out, settings.batch_size)
    state.wait_for_everyone()  # every process has its list before any item is written
    mine = pending[state.process_index::state.num_processes]
    if mine:
        painter = Painter(settings, str(state.device) if state.num_processes > 1 else None)
        check_space(out, painter, [item for batch in pending for item in batch])
        with tqdm(total=sum(map(len, mine)), unit="img", desc="Generating",
                  disable=not (progress and state.is_local_main_process)) as bar:
            for batch in mine:
                for item, (png, record) in zip(batch, painter(batch)):
                    out.write(item, png, record)
                bar.update(len(batch))
    state.wait_for_everyone()
    return out.assemble(items) if state.is_main_process else None


def push_dataset(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload the finished data set (images, metadata.jsonl and a card) to a Hub data set repo; the commit's URL."""
    folder = Path(folder)
    job = json.loads((folder / JOB).read_text())
    card = (f"---\ntask_categories:\n- text-to-image\ntags:\n- synthetic\n- ldm-app\n---\n\n"
            f"# {repo_id.split('/')[-1]}\n\n{job['count']} images made by `ldm-app generate --prompts` with the model "
            f"`{job['model']}` ({job['dtype']}). Each row of `metadata.jsonl` holds an image's prompt, seed and "
            "settings; each PNG carries them too (A1111's `parameters` chunk).\n\n"
            f"```python\nfrom datasets import load_dataset\nds = load_dataset(\"{repo_id}\", split=\"train\")\n```\n")
    with atomic_write(folder / "README.md") as tmp:
        tmp.write_text(card)
    return push_to_hub(folder, repo_id, private=private, repo_type="dataset",
                       commit_message="Upload a data set made with ldm-app generate --prompts")
