"""The GPU check (benchmarks/gpu_check.py) at least starts here: its plan on --dry-run, one line without CUDA."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_dry_run_prints_each_check_and_its_launch_command():
    proc = gpu_check("--dry-run")
    assert proc.returncode == 0, proc.stderr
    plan = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert list(plan) == ["bf16", "fp16", "fsdp", "deepspeed", "sampling", "vae_fp16", "compile"]
    assert "--config_file configs/accelerate/fsdp.yaml" in plan["fsdp"]
    assert "train.distributed_type=FSDP" in plan["fsdp"] and "--mixed_precision fp16" in plan["fp16"]
    assert (ROOT / "configs/accelerate/fsdp.yaml").exists() and (ROOT / "configs/accelerate/deepspeed_zero2.yaml").exists()


def test_an_unknown_check_is_one_line():
    proc = gpu_check("--only", "bf16,fp8", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: unknown check(s) fp8; choose from bf16, fp16, fsdp, deepspeed, sampling, vae_fp16, compile."]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the check would run")
def test_without_cuda_it_stops_with_one_line():
    proc = gpu_check("--only", "compile")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "needs a CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr
