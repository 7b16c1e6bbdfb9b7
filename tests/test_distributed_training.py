"""Training beyond one process: the trainer says which distributed setup accelerate runs (log and config.yaml),
refuses a sharded run (FSDP, DeepSpeed) that accelerate did not set up, and a two-node run (two torchrun agents on
127.0.0.1) survives losing a node: resumed, it ends bit-identical to a run that was never interrupted."""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from ldm_app.config import load_config
from ldm_app.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def overrides(inputs: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.path={inputs / 'data'}", f"model.vae={inputs / 'model'}", f"model.text_encoder={inputs / 'model'}",
            f"train.output_dir={out}", "train.validation_every=0", "train.max_steps=2", *extra]


def test_the_run_folder_records_the_distributed_type_that_ran(inputs, tmp_path, capsys):
    train(load_config(TINY, overrides(inputs, tmp_path, "train.distributed_type=NO")))  # (YAML's NO is false)
    assert load_config(tmp_path / "config.yaml").train.distributed_type == "NO"
    assert "Training with NO on 1 process, cpu" in capsys.readouterr().out


@pytest.mark.parametrize("env, override, message", [
    ({"ACCELERATE_USE_FSDP": "true"}, [], "ACCELERATE_USE_FSDP=true .* asks for FSDP, but accelerate runs NO"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "asks for DEEPSPEED, but accelerate runs NO"
     if importlib.util.find_spec("deepspeed") else "DeepSpeed is not installed => run `pip install deepspeed`"),
    ({}, ["train.distributed_type=fsdp"], "train.distributed_type=FSDP asks for FSDP, but accelerate runs NO"),
    ({}, ["train.distributed_type=ddp"], "'DDP' is not one of accelerate's: NO, MULTI_CPU, MULTI_GPU"),
])
def test_a_sharded_run_that_accelerate_did_not_set_up_is_refused_before_the_folder_is_touched(
        inputs, tmp_path, monkeypatch, env, override, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        train(load_config(TINY, overrides(inputs, tmp_path / "run", *override)))
    assert not (tmp_path / "run").exists()


def launch(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_fsdp_config_under_accelerate_use_cpu_is_a_one_line_error(inputs, tmp_path):
    # accelerate would run plain multi-CPU DDP here and call it fine
    proc = launch("-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml",
                  "--num_processes", "2", "--mixed_precision", "no", "training/train_ldm.py", "--config", str(TINY),
                  *overrides(inputs, tmp_path / "run"), env={"ACCELERATE_USE_CPU": "true"})
    log = proc.communicate(timeout=300)[0]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors, log  # (torchrun stops the other process once one has failed)
    assert all("asks for FSDP, but accelerate runs MULTI_CPU on 2 process(es)" in line for line in errors)
    assert not (tmp_path / "run").exists()


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and its workers (torchrun starts each worker in a session of its own)."""
    agent = psutil.Process(pid)
    for process in [*agent.children(recursive=True), agent]:
        process.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(inputs: Path, out: Path, port: int) -> list[subprocess.Popen]:
    """Two torchrun agents, one process each, meeting at 127.0.0.1 as two machines would (static rendezvous);
    they share the run folder, as nodes share a network file system."""
    # ~12 steps/s on 2 loaded cores: 60 steps leave seconds between the first checkpoint and the end
    args = ["training/train_ldm.py", "--config", str(TINY),
            *overrides(inputs, out, "train.max_steps=60", "train.checkpoint_every=4", "train.batch_size=4",
                       "train.keep_checkpoints=0")]
    return [launch("-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                   "--master_addr", "127.0.0.1", "--master_port", str(port), *args, env={"ACCELERATE_USE_CPU": "true"})
            for rank in (0, 1)]


def finish(nodes: list[subprocess.Popen]) -> str:
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(logs)
    return logs[0]


def test_two_nodes_lose_one_and_resume_to_the_same_weights(inputs, tmp_path):
    straight = two_nodes(inputs, tmp_path / "straight", free_port())  # the reference, alongside
    nodes = two_nodes(inputs, tmp_path / "killed", free_port())
    deadline = time.time() + 300
    while not list((tmp_path / "killed" / "checkpoints").glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.01)
    kill_tree(nodes[1].pid)  # node 1 is gone: its agent and its worker
    try:  # node 0 fails at its next collective
        nodes[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_tree(nodes[0].pid)
    for node in nodes:
        node.communicate()
    assert nodes[0].returncode != 0
    assert not (tmp_path / "killed" / "pipeline").exists(), "the run finished before the kill; raise max_steps"

    log = finish(two_nodes(inputs, tmp_path / "killed", free_port()))
    assert "Resuming from" in log
    assert "Training with MULTI_CPU on 2 processes" in finish(straight)
    assert load_config(tmp_path / "straight" / "config.yaml").train.distributed_type == "MULTI_CPU"
    for path in ("pipeline/unet/diffusion_pytorch_model.safetensors", "checkpoints/checkpoint-60/model.safetensors",
                 "checkpoints/checkpoint-60/ema.safetensors"):
        a, b = load_file(tmp_path / "straight" / path), load_file(tmp_path / "killed" / path)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
