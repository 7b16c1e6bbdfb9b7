"""Writing files so that a reader (or the user, after a crash) sees the old version or the whole new one,
never half of one."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block succeeds it is renamed onto `path`.

    On an error the temporary file is removed and `path` keeps what it had. The temporary name keeps the
    suffix, so writers that infer the format from it (PIL) work.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """`atomic_write` for a folder: a fresh temp folder beside `final` to write into, renamed to `final` when the block ends without an error, so
    `final` is never there half-written. An old `final` is moved aside first and deleted last: a crash in between
    leaves it at `final.old` instead of losing both."""
    final = Path(final)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:  # the block failed: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # else `old` may be the only complete copy (a crash between the renames below)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
