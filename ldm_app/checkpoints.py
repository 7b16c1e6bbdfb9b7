"""The run folder's safety: one trainer at a time, checkpoints written whole or not at all and checked before they
are loaded, the newest few kept, a full disk reported in one line.

A checkpoint folder holds accelerate's `save_state` files and the trainer's own state:

    model.safetensors, model_1.safetensors   the trained models (safetensors)
    optimizer.bin                            AdamW state (torch.save; read back with weights_only=True)
    random_states_<rank>.pkl                 RNG states (torch.save; accelerate reads them with weights_only=True)
    scaler.pt                                fp16 loss scale, only under fp16 (torch.save; weights_only=True)
    ema.safetensors                          EMA weights
    trainer_state.json                       step, LR schedule and EMA counters
    manifest.json                            every file's size; a checkpoint that disagrees with it is damaged

Nothing is registered with `accelerator.register_for_checkpointing`: accelerate 1.15 writes those objects to
`custom_checkpoint_<i>.pkl` and reads them back with `weights_only=False`, which runs whatever code the file holds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils.environment import get_int_from_env
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LRScheduler

from .outputs import require_free_space as require_disk_space

MANIFEST, STATE, EMA_WEIGHTS = "manifest.json", "trainer_state.json", "ema.safetensors"
LOCK, CHECKPOINTS = ".lock", "checkpoints"  # in the run folder
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_DISK_FULL = ("No space left on device", "os error 28", "Disk quota exceeded")


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss, a full disk); the message says what happened and where."""


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint folders in `folder` (`checkpoint-<step>`, nothing else), oldest first."""
    found = [p for p in folder.glob("checkpoint-*") if _CHECKPOINT.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=_step)


def _step(checkpoint: Path) -> int:
    return int(_CHECKPOINT.fullmatch(checkpoint.name).group(1))


# ----------------------------------------------------------------------------------------------------------
# One trainer per run folder


@contextmanager
def hold_run_folder(folder: Path, accelerator: Accelerator) -> Iterator[None]:
    """This run's claim on its folder, from before anything is written there to the end of the run.

    Refuses processes that were launched together but did not join one distributed run (each would act as the
    main process and write the same checkpoints), and a second trainer in the folder (an exclusive `flock`, which
    the OS drops when the process dies, so a killed run leaves no stale lock); then clears the temp folders of
    interrupted saves. Inside, a full disk, wherever it is hit, becomes one `TrainingError` line.
    """
    launched = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if launched != accelerator.num_processes:
        raise ValueError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}), so each would train alone and overwrite the others' checkpoints. "
            f"Without CUDA, start them with `ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node "
            f"{launched} training/train_ldm.py …`; with GPUs, make CUDA visible to torch.")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as lock:
        if accelerator.is_main_process:  # the other ranks belong to the same run
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                raise ValueError(f"{folder} is in use by a running trainer ({holder}); wait for it to end, or set "
                                 "train.output_dir to another folder.") from None
            lock.truncate(0)
            lock.write(f"pid {os.getpid()}\n")
            lock.flush()
            for tmp in (folder / CHECKPOINTS).glob("tmp-*"):  # saves that a kill or a full disk interrupted
                shutil.rmtree(tmp, ignore_errors=True)
        try:
            yield
        except Exception as err:
            if not _disk_full(err, folder):
                raise
            raise TrainingError(
                f"The disk holding {folder} is full ({err}); {shutil.disk_usage(folder).free // 2**20} MiB free. "
                "Free some space and re-run the same command: it resumes from the last checkpoint.") from err


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether `err` (or an error it came from) is a write that found the disk full. torch.save's own error does
    not say why a write failed, so a nearly full disk at the moment of the error counts too."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain):
        return True
    if any(marker in str(e) for e in chain for marker in _DISK_FULL):
        return True
    return any(type(e) is RuntimeError for e in chain) and shutil.disk_usage(folder).free < 2**24


def require_free_space(folder: Path, trained: list[torch.nn.Module], exported: list[torch.nn.Module]) -> None:
    """Refuse to start when the disk cannot hold one more checkpoint of the `trained` models (their weights, AdamW's
    two moments and the EMA of what trains) and the `exported` ones: better now than after hours of training."""
    trainable = sum(_nbytes(p for p in m.parameters() if p.requires_grad) for m in trained)
    needed = sum(_nbytes(m.state_dict().values()) for m in trained + exported) + 3 * trainable
    folder.mkdir(parents=True, exist_ok=True)
    require_disk_space(folder, needed, "a checkpoint and the export",
                       "free some space or set train.output_dir to a larger disk", TrainingError)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------------------
# Save


def save_checkpoint(accelerator: Accelerator, folder: Path, step: int, keep: int, lr_scheduler: LRScheduler,
                    ema: EMAModel | None) -> None:
    """Write `checkpoint-<step>`: accelerator.save_state plus the trainer's state into a temp folder, a manifest of
    file sizes last, then one rename; keep the newest `keep` (0: all)."""
    tmp = folder / f"tmp-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing it
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        state = {"step": step, "lr_scheduler": lr_scheduler.state_dict()}
        if ema is not None:
            state["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)},
                      tmp / EMA_WEIGHTS)
        (tmp / STATE).write_text(json.dumps(state))
    accelerator.wait_for_everyone()  # every rank's random_states_<rank>.pkl is in place
    if accelerator.is_main_process:
        sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(sizes, indent=1))
        os.replace(tmp, folder / f"checkpoint-{step}")
        for old in checkpoints(folder)[:-keep] if keep else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------
# Resume


def resume(accelerator: Accelerator, folder: Path, lr_scheduler: LRScheduler, ema: EMAModel | None) -> int:
    """Load the newest whole checkpoint in `folder` into the prepared objects; the step it was taken at (0: none).

    A damaged newer checkpoint (a file missing, cut short or added, or one that fails to load) is renamed to
    `checkpoint-<step>.damaged` with a warning, and the one before it is loaded. When none loads, the error lists
    them all and nothing is renamed.
    """
    found, damaged = checkpoints(folder), []
    for checkpoint in reversed(found):
        problem = _damage(checkpoint)
        if problem is None:
            try:
                _load(accelerator, checkpoint, lr_scheduler, ema)
            except Exception as err:  # e.g. a flipped byte, or a model that no longer fits the config
                problem = f"it does not load: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        if problem is None:
            break
        damaged.append((checkpoint, problem))
    else:
        if damaged:
            raise ValueError(f"No checkpoint in {folder} can be resumed: "
                             + "; ".join(f"{c.name}: {p}" for c, p in damaged)
                             + f". Move them out of {folder} to train from step 0.")
        return 0
    accelerator.wait_for_everyone()  # every rank has decided before a damaged folder moves
    for bad, problem in damaged:
        accelerator.print(f"warning: skipping damaged checkpoint {bad} ({problem}); kept as {bad.name}.damaged")
        if accelerator.is_main_process:
            os.replace(bad, _free_name(bad.with_name(bad.name + ".damaged")))
    accelerator.print(f"Resuming from {checkpoint} (step {_step(checkpoint)})")
    return _step(checkpoint)


def _damage(checkpoint: Path) -> str | None:
    """What is wrong with `checkpoint` by its manifest (None: every file it lists is there, whole, and no other)."""
    try:
        sizes = json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST} (an interrupted copy, or written by an ldm-app that pickled its state)"
    present = {p.relative_to(checkpoint).as_posix(): p for p in checkpoint.rglob("*") if p.is_file()}
    for name, size in sizes.items():
        if name not in present:
            return f"{name} is missing"
        if present[name].stat().st_size != size:
            return f"{name} has {present[name].stat().st_size} bytes, not the {size} written"
    extra = sorted(set(present) - set(sizes) - {MANIFEST})
    return f"it holds {', '.join(extra)}, which the trainer did not write" if extra else None


def _load(accelerator: Accelerator, checkpoint: Path, lr_scheduler: LRScheduler, ema: EMAModel | None) -> None:
    """accelerator.load_state (safetensors, and torch.load with weights_only=True), then the trainer's state."""
    accelerator.load_state(str(checkpoint))
    state = json.loads((checkpoint / STATE).read_text())
    if state["step"] != _step(checkpoint):
        raise ValueError(f"{STATE} says step {state['step']}")
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        if "ema" not in state:
            raise ValueError("it has no EMA weights (written with train.use_ema=false); set train.use_ema=false")
        shadow = load_file(checkpoint / EMA_WEIGHTS)
        if len(shadow) != len(ema.shadow_params):
            raise ValueError(f"it has {len(shadow)} EMA tensors for {len(ema.shadow_params)} trained parameters")
        ema.load_state_dict(state["ema"] | {"shadow_params": [shadow[str(i)] for i in range(len(shadow))]})


def _free_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, … whichever does not exist yet."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
