"""The server's temporary files in one private folder per process (`ldm-app-serve-PID-*` in the system's temp
folder): the UI's PNGs (`ldm-app-ui-*`) and gradio's uploads and cache (GRADIO_TEMP_DIR) all go there.

Files older than `UPLOAD_MAX_AGE` are deleted every `SWEEP_EVERY` seconds; the folder is removed when the
server stops, and a folder whose process is gone (killed with SIGKILL, a crash, a power cut) is removed when the
next server starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

PREFIX = "ldm-app-serve-"
UPLOAD_MAX_AGE = 3600.0  # s a file uploaded to (or cached by) the UI is kept: time to use it in a few runs
SWEEP_EVERY = 600.0  # s between sweeps


def private_temp_folder(base: str | None = None) -> Path:
    """A new folder for this process's temp files, made the default of `tempfile` and of gradio (call before
    gradio is imported); leftovers of dead servers are removed first."""
    base_dir = Path(base or tempfile.gettempdir())
    remove_orphans(base_dir)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base_dir))
    (folder / "gradio").mkdir()
    os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
    tempfile.tempdir = str(folder)  # tempfile.mkdtemp() in this process (the UI's output folder) lands here
    return folder


def remove_orphans(base: Path) -> list[Path]:
    """Remove this user's `ldm-app-serve-PID-*` folders whose process no longer runs; returns them."""
    removed = []
    for folder in base.glob(f"{PREFIX}*"):
        pid = folder.name.removeprefix(PREFIX).partition("-")[0]
        try:
            mine = folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not process_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep(folder: Path, max_age: float = UPLOAD_MAX_AGE, now: float | None = None) -> int:
    """Delete files under `folder` not modified for `max_age` seconds, and the folders they leave empty (but not
    `folder`'s own subfolders, which the UI and gradio write into); returns the number of files deleted."""
    now = time.time() if now is None else now
    deleted = 0
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(root) / name
            try:
                if now - path.lstat().st_mtime > max_age:
                    path.unlink()
                    deleted += 1
            except OSError:
                continue
        if Path(root).parent != folder and Path(root) != folder and not os.listdir(root):
            try:
                os.rmdir(root)
            except OSError:
                pass
    return deleted


class UploadSweeper:
    """A daemon thread that sweeps the private folder (uploads, gradio's cache, the UI's PNGs) on a schedule."""

    def __init__(self, folder: Path, every: float = SWEEP_EVERY, max_age: float = UPLOAD_MAX_AGE):
        self.folder, self.every, self.max_age = folder, every, max_age
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ldm-app-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            sweep(self.folder, self.max_age)
