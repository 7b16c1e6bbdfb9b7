"""Training under faults and hostile input (issue 14): each case is a config or a fault → the outcome promised.

Bad settings are refused before any work; a second trainer or a mis-launched pair is refused before anything is
written; a damaged newest checkpoint is set aside and the one before it resumes to the same weights; nothing in a
checkpoint is unpickled beyond torch's weights-only loader; a full disk is one TrainingError line.
"""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from accelerate.utils import load
from safetensors.torch import load_file

from ldm_app import checkpoints as ckpt_module
from ldm_app.checkpoints import LOCK, TrainingError, hold_run_folder
from ldm_app.config import Config, TrainConfig, load_config
from ldm_app.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
WEIGHTS = "checkpoints/checkpoint-4/model.safetensors"


def config(inputs: Path, out: Path, *overrides: str) -> Config:
    return load_config(TINY, [f"data.path={inputs / 'data'}", f"model.vae={inputs / 'model'}",
                              f"model.text_encoder={inputs / 'model'}", f"train.output_dir={out}",
                              "train.validation_every=0", "train.max_steps=4", "train.checkpoint_every=2",
                              "train.keep_checkpoints=0", *overrides])


@pytest.fixture(scope="module")
def finished_run(inputs, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4: the reference that damaged copies must resume to."""
    out = tmp_path_factory.mktemp("run")
    train(config(inputs, out))
    return out


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------------------------------
# 9. Settings out of range are refused by load_config, naming the key, before any work


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size=0 must be a whole number >= 1"),
    ("train.batch_size=-4", "train.batch_size=-4 must be a whole number >= 1"),
    ("train.batch_size=2.7", "train.batch_size=2.7 is not a whole number"),  # was truncated to 2
    ("train.checkpoint_every=0", "train.checkpoint_every=0 must be"),
    ("train.log_every=0", "train.log_every=0 must be"),
    ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps=0 must be"),
    ("train.max_steps=0", "train.max_steps=0 must be"),  # exported an untrained model
    ("train.warmup_steps=-5", "train.warmup_steps=-5 must be a whole number >= 0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints=-1 must be a whole number >= 0 (0 = keep all)"),
    ("objective.num_train_timesteps=0", "objective.num_train_timesteps=0 must be"),
    ("train.learning_rate=0", "train.learning_rate=0.0 must be > 0"),
    ("train.learning_rate=.nan", "train.learning_rate=nan must be > 0"),
    ("objective.caption_dropout=1.5", "objective.caption_dropout=1.5 must be between 0 and 1"),
    ("data.tag_probability=-0.1", "data.tag_probability=-0.1 must be between 0 and 1"),
    ("data.resolution=7", "data.resolution=7 must be a positive multiple of 8"),  # trained a 4×4 model
    ("data.resolution=0", "data.resolution=0 must be a positive multiple of 8"),
    ("data.caption_templates=['{1}']", "data.caption_templates template '{1}' does not format a caption"),
    ("data.caption_templates=['{0.__class__}']", "template '{0.__class__}' does not format a caption"),
    ("data.caption_templates=['{0[0]}']", "template '{0[0]}' does not format a caption"),
    ("data.tag_templates=['a photo']", "data.tag_templates template 'a photo' does not format a caption"),
    ("data.caption_templates=['{']", "template '{' does not format a caption"),
])
def test_out_of_range_setting_is_refused_naming_the_key(override, message):
    with pytest.raises(ValueError) as err:
        load_config(TINY, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("override, key, value", [
    ("train.keep_checkpoints=0", "keep_checkpoints", 0),
    ("train.max_steps=4.0", "max_steps", 4),  # a whole number written as a float is fine
    ("data.caption_templates=['{}!', 'a {0}']", "caption_templates", None),
    ("train.warmup_steps=0", "warmup_steps", 0),
])
def test_settings_at_the_edge_of_their_range_load(override, key, value):
    loaded = load_config(TINY, [override])
    section = loaded.data if key == "caption_templates" else loaded.train
    assert value is None or getattr(section, key) == value


def test_a_config_built_in_code_is_checked_before_the_run_folder_is_touched(tmp_path):
    with pytest.raises(ValueError, match="train.batch_size=2.7 must be a whole number"):
        train(Config(train=TrainConfig(output_dir=str(tmp_path / "run"), batch_size=2.7)))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# 3. keep_checkpoints: the newest N, or 0 = all


@pytest.mark.parametrize("keep, left", [(1, ["checkpoint-4"]), (0, ["checkpoint-2", "checkpoint-4"])])
def test_keep_checkpoints_keeps_the_newest_or_all(inputs, tmp_path, keep, left):
    train(config(inputs, tmp_path, f"train.keep_checkpoints={keep}"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == left


# ----------------------------------------------------------------------------------------------------------
# 4. A damaged newest checkpoint is set aside; the previous one resumes to the same weights


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty_folder(checkpoint: Path) -> None:
    shutil.rmtree(checkpoint)
    checkpoint.mkdir()


def zero_first_bytes(path: Path) -> None:  # same size, so only loading it finds the damage
    data = bytearray(path.read_bytes())
    data[:64] = bytes(64)
    path.write_bytes(bytes(data))


DAMAGE = {
    "empty folder": empty_folder,
    "model truncated": lambda c: truncate(c / "model.safetensors"),
    "optimizer truncated": lambda c: truncate(c / "optimizer.bin"),
    "optimizer overwritten": lambda c: zero_first_bytes(c / "optimizer.bin"),
    "EMA truncated": lambda c: truncate(c / "ema.safetensors"),
    "trainer state missing": lambda c: (c / "trainer_state.json").unlink(),
    "manifest missing (older ldm-app)": lambda c: (c / "manifest.json").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_to_the_same_weights(
        finished_run, inputs, tmp_path, damage, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns("pipeline"))
    DAMAGE[damage](out / "checkpoints" / "checkpoint-4")
    train(config(inputs, out))
    log = capsys.readouterr().out
    assert "warning: skipping damaged checkpoint" in log and "checkpoint-4 (" in log
    assert "(step 2)" in log
    assert (out / "checkpoints" / "checkpoint-4.damaged").is_dir()  # kept for the user to look at
    reference, resumed = load_file(finished_run / WEIGHTS), load_file(out / WEIGHTS)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_a_stray_folder_beside_the_checkpoints_is_not_one(finished_run, inputs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "checkpoints" / "checkpoint-40.bak").mkdir()
    (out / "checkpoints" / "tmp-6").mkdir()  # left by a kill mid-save: removed
    train(config(inputs, out))
    assert "checkpoint-4 (step 4)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4",
                                                                       "checkpoint-40.bak"]


def test_when_no_checkpoint_loads_the_error_lists_them_and_moves_nothing(finished_run, inputs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns("pipeline"))
    for step in (2, 4):
        truncate(out / "checkpoints" / f"checkpoint-{step}" / "optimizer.bin")
    with pytest.raises(ValueError, match=r"No checkpoint in .* can be resumed: checkpoint-4: optimizer.bin has .*"
                                         r"checkpoint-2: optimizer.bin has .*Move them out"):
        train(config(inputs, out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


# ----------------------------------------------------------------------------------------------------------
# 5. Nothing in the run folder is unpickled beyond torch's weights-only loader


class RunsCode:
    """Unpickling this creates a file: the proof that a loader executed what a file said."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoints_hold_no_pickle_that_needs_more_than_weights_only(finished_run):
    checkpoint = finished_run / "checkpoints" / "checkpoint-4"
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # accelerate loads those with weights_only=False
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["lr_scheduler"]["last_epoch"] == 4 and state["ema"]["optimization_step"] == 4
    for name in ("optimizer.bin", "random_states_0.pkl"):
        load(checkpoint / name)  # accelerate's loader: weights_only=True (numpy arrays allowed), raises on code


def test_a_planted_pickle_in_a_checkpoint_is_never_run(finished_run, inputs, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns("pipeline"))
    torch.save(RunsCode(marker), out / "checkpoints" / "checkpoint-4" / "custom_checkpoint_0.pkl")
    train(config(inputs, out))
    assert "custom_checkpoint_0.pkl, which the trainer did not write" in capsys.readouterr().out
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# 2. One trainer per run folder; processes launched together must join one run


def test_a_second_trainer_in_the_folder_is_refused_until_the_first_ends(inputs, tmp_path):
    from accelerate import Accelerator
    with hold_run_folder(tmp_path, Accelerator()):
        with pytest.raises(ValueError, match=f"in use by a running trainer \\(pid {os.getpid()}\\)"):
            train(config(inputs, tmp_path))
    assert not (tmp_path / "checkpoints").exists()
    train(config(inputs, tmp_path, "train.max_steps=1"))  # free again


def test_a_killed_trainer_leaves_no_stale_lock(inputs, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a');"
                               "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(60)",
                               str(tmp_path / LOCK)], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    with open(tmp_path / LOCK) as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while the holder lives
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    train(config(inputs, tmp_path, "train.max_steps=1"))


def test_more_processes_than_accelerate_set_up_is_refused_in_process(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 processes were launched but accelerate set up 1.*"
                                         "ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2"):
        train(config(inputs, tmp_path / "run"))
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_accelerate_launch_multi_gpu_without_cuda_is_one_line_per_process(inputs, tmp_path):
    # on a machine without CUDA, this starts two non-distributed copies that both acted as the main process
    proc = run_cli("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "training/train_ldm.py", "--config",
                   str(TINY), f"data.path={inputs / 'data'}", f"model.vae={inputs / 'model'}",
                   f"model.text_encoder={inputs / 'model'}", f"train.output_dir={tmp_path / 'run'}")
    if "processes were launched" not in proc.stderr and proc.returncode == 0:
        pytest.skip("accelerate set up a real 2-process run here (CUDA present)")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 2, proc.stderr
    assert not re.search(r'File ".*(ldm_app|train_ldm\.py)"', proc.stderr)  # (the launcher's own report follows)
    assert all("ACCELERATE_USE_CPU=true torchrun" in line for line in errors)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------------------
# 6. Too little disk is refused before the work; a full disk mid-run is one TrainingError line


def test_too_little_free_space_is_refused_before_the_cache_is_built(inputs, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(ckpt_module.shutil, "disk_usage", lambda p: real(p)._replace(free=2**20))
    with pytest.raises(TrainingError, match="has 1 MiB free, but a checkpoint and the export need about .* MiB; "
                                            "free some space or set train.output_dir"):
        train(config(inputs, tmp_path))
    assert not (tmp_path / "cache").exists()


def torch_save_on_a_full_disk(monkeypatch, usage):
    """torch.save's own error on ENOSPC says nothing about the disk; the disk is then (nearly) full."""
    monkeypatch.setattr(ckpt_module.shutil, "disk_usage", lambda p: usage(p)._replace(free=0))
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


FULL_DISK = {
    "checkpoint (torch.save)": ("accelerate.checkpointing.save", torch_save_on_a_full_disk),
    "checkpoint (safetensors)": ("ldm_app.checkpoints.save_file", SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)")),
    "export": ("ldm_app.trainer.export_pipeline", OSError(28, "No space left on device")),
}


@pytest.mark.parametrize("where", FULL_DISK)
def test_a_full_disk_mid_run_is_one_training_error_and_the_run_resumes(inputs, tmp_path, monkeypatch, where):
    target, error = FULL_DISK[where]
    usage = shutil.disk_usage

    def fail(*args, **kwargs):
        if callable(error):
            error(monkeypatch, usage)
        raise error

    monkeypatch.setattr(target, fail)
    with pytest.raises(TrainingError, match="The disk holding .* is full .*re-run the same command"):
        train(config(inputs, tmp_path))
    monkeypatch.undo()
    train(config(inputs, tmp_path))
    assert (tmp_path / "pipeline").is_dir()
