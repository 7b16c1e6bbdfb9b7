"""The batch job on Ray (the `[ray]` extra): the pending items become a Ray Data set, `map_batches` sends them through
a pool of actors that each hold one loaded pipeline (one actor per GPU, or per CPU without GPUs), and the driver
writes what comes back into the same output folder as the local engine, so the files, the resume and
metadata.jsonl are the same. `RAY_ADDRESS` picks a cluster (e.g. `auto`, or `ray://head:10001`); without it a
local Ray starts, dashboard off. The actors return PNG bytes, so the nodes need no shared file system.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .batch_generation import Item, OutputFolder, Painter, Settings, pending_batches


class PainterActor:
    """A Ray Data actor: loads the pipeline once, then turns each of the job's fixed batches of items into PNG bytes
    and records."""

    def __init__(self, settings: Settings) -> None:
        self.painter = Painter(settings)

    def __call__(self, rows: dict[str, Any]) -> dict[str, list]:
        out = {"index": [], "png": [], "record": []}
        for batch in rows["batch"]:  # (map_batches hands over one row, one fixed batch, at a time)
            items = [Item(index, fields, extra) for index, fields, extra in json.loads(batch)]
            for item, (png, record) in zip(items, self.painter(items)):
                out["index"].append(item.index)
                out["png"].append(png)
                out["record"].append(json.dumps(record))
        return out


def run_ray(items: list[Item], output: str | os.PathLike, settings: Settings, progress: bool = True,
            actors: int | None = None) -> Path:
    """Make the unfinished batches on Ray and return metadata.jsonl's path. `actors`: the pool's size (default: the
    cluster's GPUs, or its CPUs when it has none)."""
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'ldm-app[ray]' (or pip install 'ray[data]').") from None
    out = OutputFolder(output)
    out.claim(items, settings)
    pending = pending_batches(items, out, settings.batch_size)
    if pending:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, ignore_reinit_error=True,
                 log_to_driver=False, logging_level=logging.WARNING)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts images
        context.execution_options.preserve_order = False
        gpus = int(ray.cluster_resources().get("GPU", 0))
        pool = actors or gpus or int(ray.cluster_resources().get("CPU", 1))
        # one row per fixed batch, as JSON text (Arrow would turn the dicts into struct columns)
        rows = [{"batch": json.dumps([[item.index, item.fields, item.extra] for item in batch])} for batch in pending]
        by_index = {item.index: item for batch in pending for item in batch}
        images = ray.data.from_items(rows).map_batches(
            PainterActor, fn_constructor_kwargs={"settings": settings}, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool), num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines
        try:
            with tqdm(total=len(by_index), unit="img", desc=f"Generating on Ray ({pool} actors)",
                      disable=not progress) as bar:
                for batch in images.iter_batches(batch_size=None, batch_format="numpy"):
                    for index, png, record in zip(batch["index"], batch["png"], batch["record"]):
                        out.write(by_index[int(index)], png, json.loads(record))
                    bar.update(len(batch["index"]))
        except Exception as err:  # an actor's ValueError (a model that does not load, a size it cannot draw)
            reason = user_error(err)
            if reason is None:
                raise
            raise ValueError(f"a Ray actor stopped: {reason}") from None
    return out.assemble(items)


def user_error(err: BaseException) -> str | None:
    """The message of the library's ValueError that Ray wrapped (with tracebacks) in `err`'s chain, if any."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    found = [line for text in chain for line in text.splitlines() if line.startswith("ValueError: ")]
    return found[-1].removeprefix("ValueError: ") if found else None
