"""What the recipe's trainers share: a time budget that drives the learning rate, a log and atomic checkpoints, so
each stops anywhere and a re-run of the same command continues where it stopped."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm_app.atomic import atomic_folder


class BudgetedRun:
    """Step counter, training seconds and the optimizer, saved together in `run/checkpoint/` and restored on start."""

    def __init__(self, run: Path, minutes: float, steps: int = 0, eval_every_minutes: float = 3.0):
        self.run, self.minutes, self.steps = run, minutes, steps
        self.eval_every = 60 * eval_every_minutes
        run.mkdir(parents=True, exist_ok=True)
        self.state = {"step": 0, "elapsed": 0.0}
        self._log = open(run / "log.txt", "a")
        self._last_eval = self._window_start = time.time()
        self._seen = 0

    def report(self, message: str) -> None:
        print(message, flush=True)
        self._log.write(message + "\n")
        self._log.flush()

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        checkpoint = self._checkpoint()
        if checkpoint:
            model.load_state_dict(load_file(checkpoint / "model.safetensors"))
            saved = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
            optimizer.load_state_dict(saved.pop("optimizer"))
            self.state = saved
            self.report(f"resumed at step {self.step} ({self.state['elapsed'] / 60:.1f} min)")

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Weights and state in one folder that replaces the last one whole, so a resume never pairs new weights
        with an old step and optimizer."""
        with atomic_folder(self.run / "checkpoint") as folder:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
            torch.save({"optimizer": optimizer.state_dict(), **self.state}, folder / "state.pt")
        for name in ("model.safetensors", "state.pt"):  # the earlier layout's files, now stale
            (self.run / name).unlink(missing_ok=True)

    def _checkpoint(self) -> Path | None:
        """The newest complete checkpoint: `checkpoint/`; `checkpoint.old/` when a save stopped between its two
        renames; the run folder itself for runs saved before checkpoints were folders."""
        folders = (self.run / "checkpoint", self.run / "checkpoint.old", self.run)
        return next((folder for folder in folders if (folder / "state.pt").is_file()), None)

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def progress(self) -> float:
        """Fraction of the budget used: by steps when --steps is set, else by training time."""
        return self.step / self.steps if self.steps else self.state["elapsed"] / (60 * self.minutes)

    def set_learning_rate(self, optimizer: torch.optim.Optimizer, peak: float, warmup_steps: int) -> float:
        """Linear warm-up, then cosine decay to 5 % of `peak` over the budget; returns the rate it set."""
        decay = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(self.progress, 1.0)))
        lr = peak * min(1.0, (self.step + 1) / warmup_steps) * decay
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def finish_step(self, started: float, examples: int) -> None:
        self.state["step"] += 1
        self.state["elapsed"] += time.time() - started
        self._seen += examples

    def eval_due(self) -> bool:
        return time.time() - self._last_eval > self.eval_every or self.progress >= 1.0

    def examples_per_second(self) -> float:
        """Throughput since the last call (one eval window), then start a new window."""
        now = time.time()
        rate = self._seen / max(now - self._window_start, 1e-9)
        self._last_eval = self._window_start = now
        self._seen = 0
        return rate
