"""Training checkpoints in the run folder: written whole or not at all, the newest few kept, the last resumed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from accelerate import Accelerator


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest first (a run resumes from the last)."""
    return sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator: Accelerator, folder: Path, step: int, keep: int) -> None:
    """accelerator.save_state into a temp folder, renamed when complete; keep the last `keep`."""
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"tmp-{step}"
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, folder / f"checkpoint-{step}")
        for old in checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, folder: Path) -> int:
    """Load the last complete checkpoint in `folder` into the prepared objects; the step it was taken at (0: none)."""
    if not checkpoints(folder):
        return 0
    last = checkpoints(folder)[-1]
    accelerator.load_state(str(last))
    step = int(last.name.split("-")[1])
    accelerator.print(f"Resuming from {last} (step {step})")
    return step
