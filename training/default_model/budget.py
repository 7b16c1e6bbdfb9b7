"""What the recipe's small trainers (VAE, CLIP) share: a time budget that drives the learning rate, a log,
and atomic checkpoints, so each stops anywhere and a re-run of the same command continues where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class BudgetedRun:
    """Step counter, training seconds and the optimizer, saved together in `run/` and restored on start."""

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
        if (self.run / "state.pt").exists():
            model.load_state_dict(load_file(self.run / "model.safetensors"))
            saved = torch.load(self.run / "state.pt", weights_only=True)
            optimizer.load_state_dict(saved.pop("optimizer"))
            self.state = saved
            self.report(f"resumed at step {self.step} ({self.state['elapsed'] / 60:.1f} min)")

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Temp files, then rename: an interrupted save never corrupts a resume."""
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, self.run / "model.tmp")
        torch.save({"optimizer": optimizer.state_dict(), **self.state}, self.run / "state.tmp")
        os.replace(self.run / "model.tmp", self.run / "model.safetensors")
        os.replace(self.run / "state.tmp", self.run / "state.pt")

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
