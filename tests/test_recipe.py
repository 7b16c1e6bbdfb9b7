"""The default-model recipe's own pieces: VAE widening keeps the function, budgeted runs resume, and a stage
is marked done (the path recipe.sh tests to skip it) only once all it writes is there, so a killed stage re-runs."""

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from ldm_app import LdmPipeline
from ldm_app.config import Config, TrainConfig, save_config
from ldm_app.default_clip import load_clip
from ldm_app.testing import tiny_pipeline

RECIPE = Path(__file__).resolve().parents[1] / "training" / "default_model"
sys.path.insert(0, str(RECIPE))
import assemble  # noqa: E402
import train_clip  # noqa: E402
import train_vae  # noqa: E402
from budget import BudgetedRun  # noqa: E402
from train_vae import build_vae, widen  # noqa: E402


@torch.no_grad()
def test_widening_the_vae_keeps_latents_and_reconstructions():
    torch.manual_seed(0)
    vae = build_vae(width=4).eval()
    for p in vae.parameters():  # zero-initialised layers would hide a wrong mapping
        p.add_(torch.randn_like(p) * 0.1)
    wide = widen(vae, 2).eval()
    assert wide.config.block_out_channels == [8, 16, 32] and wide.config.norm_num_groups == 8
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in vae.parameters())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    a, b = vae.encode(x).latent_dist, wide.encode(x).latent_dist
    torch.testing.assert_close(b.mean, a.mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.std, a.std, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(wide.decode(a.mean).sample, vae.decode(a.mean).sample, atol=1e-4, rtol=1e-4)
    # the copies of a channel are read with different weights, else they would get equal gradients forever
    w = wide.decoder.conv_out.weight
    half = w.shape[1] // 2
    assert (w[:, :half] - w[:, half:]).abs().max() > 1e-3


def test_budgeted_run_resumes_step_weights_and_learning_rate(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    run = BudgetedRun(tmp_path, minutes=1.0, steps=10)
    for _ in range(4):
        lr = run.set_learning_rate(opt, 1e-3, warmup_steps=2)
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        run.finish_step(time.time(), 5)
    run.save(model, opt)
    next_lr = run.set_learning_rate(opt, 1e-3, warmup_steps=2)

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    resumed = BudgetedRun(tmp_path, minutes=1.0, steps=10)
    resumed.resume(fresh, fresh_opt)
    assert resumed.step == 4 and resumed.progress == 0.4 and lr > next_lr
    assert resumed.set_learning_rate(fresh_opt, 1e-3, warmup_steps=2) == next_lr
    torch.testing.assert_close(fresh.weight, model.weight, atol=0, rtol=0)
    assert fresh_opt.state_dict()["state"][0]["step"] == 4


# ---------------------------------------------------------------- a stage is marked done only once complete


class Killed(Exception):
    """Stands in for the process being killed at that point."""


def crash_when_writing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Kill the run when it writes a file called `name` with `Path.write_text`."""
    write_text = Path.write_text

    def write_or_crash(path: Path, *args, **kwargs):
        if path.name == name:
            raise Killed(path)
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_or_crash)


def recipe_marker(run: Path, command: str) -> Path:
    """The path recipe.sh tests to skip the stage that runs `command`, with `run` standing in for $RUNS/<stage>."""
    line = next(line for line in (RECIPE / "recipe.sh").read_text().splitlines() if command in line)
    return run / re.search(r"\[ -[df] \$RUNS/[^/ ]+/(\S+) \]", line).group(1)


LABELS = ["cat face", "dog face", "red heart", "pizza", "rocket", "sun", "moon", "star", "tree", "fish", "car", "bus"]


@pytest.fixture(scope="module")
def emoji_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder laid out like build_emoji_dataset.py's: 64x64 RGB, 7 emoji in train and 5 in test."""
    folder = tmp_path_factory.mktemp("emoji64")
    rng = np.random.default_rng(0)
    for split, labels in (("train", LABELS[:7]), ("test", LABELS[7:])):
        (folder / split).mkdir()
        rows = []
        for i, label in enumerate(labels):
            name = f"{split}_{i}.png"
            PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / split / name)
            rows.append({"file_name": name, "text": label, "tags": [label.split()[0]], "codepoints": f"{split}-{i}"})
        (folder / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_both_trainers_read_the_data_with_one_load_split(emoji_set):
    from emoji_data import load_split

    images, rows = load_split(emoji_set, "test")
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 64, 64)
    assert [r["text"] for r in rows] == LABELS[7:] and "image" not in rows[0]
    assert train_vae.load_split is train_clip.load_split is load_split


def test_vae_final_appears_only_complete(emoji_set, tmp_path, monkeypatch):
    run = tmp_path / "vae"
    monkeypatch.setattr(sys, "argv", ["train_vae.py", "--data", str(emoji_set), "--run", str(run), "--width", "4",
                                      "--steps", "1", "--batch", "2"])
    with monkeypatch.context() as m:
        crash_when_writing(m, "metrics.json")  # killed after the weights, before the metrics
        with pytest.raises(Killed):
            train_vae.main()
    marker = recipe_marker(run, "train_vae.py --run $RUNS/vae ")
    assert not marker.exists() and not (run / "final").exists()

    train_vae.main()  # the re-run the recipe does: resumes at the last step and exports again
    assert marker.exists() and json.loads((run / "final" / "metrics.json").read_text())["steps"] == 1
    AutoencoderKL.from_pretrained(run / "final")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "final", "log.txt"]


@pytest.mark.parametrize("evaluator", [False, True], ids=["text-encoder", "evaluator"])
def test_clip_outputs_are_marked_done_only_once_all_written(emoji_set, tmp_path, monkeypatch, evaluator):
    run = tmp_path / ("evaluator" if evaluator else "clip")
    argv = ["train_clip.py", "--data", str(emoji_set), "--run", str(run), "--tokenizer", str(tmp_path / "clip" / "tokenizer"),
            "--vocab-size", "300", "--steps", "1", "--batch", "4", *(["--evaluator"] if evaluator else [])]
    monkeypatch.setattr(sys, "argv", argv)
    with monkeypatch.context() as m:
        crash_when_writing(m, "clip_config.json")  # killed after the text encoder and clip.safetensors
        with pytest.raises(Killed):
            train_clip.main()
    marker = recipe_marker(run, "train_clip.py --evaluator" if evaluator else "train_clip.py --minutes")
    assert not marker.exists()

    train_clip.main()
    assert marker.exists()
    # what the recipe's readers load: the pipeline's text encoder and tokenizer, and load_clip for scoring
    CLIPTextModel.from_pretrained(run / "text_encoder")
    CLIPTokenizer.from_pretrained(run / "tokenizer")
    assert (run / "tokenizer" / "vocab.json").is_file() and (run / "tokenizer" / "merges.txt").is_file()
    load_clip(run)
    assert not [p for p in run.iterdir() if p.suffix in (".tmp", ".old")]


def test_tokenizer_is_not_taken_as_trained_when_killed_while_writing(tmp_path, monkeypatch):
    rows = [{"text": label, "tags": []} for label in LABELS]
    with monkeypatch.context() as m:
        crash_when_writing(m, "merges.txt")
        with pytest.raises(Killed):
            train_clip.train_tokenizer(rows, 300, tmp_path / "tokenizer")
    assert not (tmp_path / "tokenizer" / "tokenizer_config.json").exists()  # what train_clip.py checks to reuse it
    tokenizer = train_clip.train_tokenizer(rows, 300, tmp_path / "tokenizer")
    train_clip.check_tokenizer(tokenizer, rows)


def test_assemble_keeps_the_old_model_until_the_new_one_is_in(tmp_path, monkeypatch):
    tiny_pipeline().save_pretrained(tmp_path / "pipeline")
    out = tmp_path / "default_model"
    out.mkdir()
    (out / "model_index.json").write_text("old")
    monkeypatch.setattr(sys, "argv", ["assemble.py", "--pipeline", str(tmp_path / "pipeline"), "--out", str(out)])
    replace = os.replace

    def crash_moving_in(src, dst):
        if Path(dst) == out:
            raise Killed(dst)
        return replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash_moving_in)
        with pytest.raises(Killed):
            assemble.main()
    folders = [p for p in tmp_path.glob("default_model*") if (p / "model_index.json").is_file()]
    assert "old" in [(p / "model_index.json").read_text() for p in folders]  # kept, if under another name

    assemble.main()
    LdmPipeline.from_pretrained(out)
    assert sorted(p.name for p in tmp_path.glob("default_model*")) == ["default_model"]


def test_assemble_refuses_a_run_stopped_before_its_max_steps(tmp_path, monkeypatch, capsys):
    """A time-budgeted invocation exports what it has; only the finished run may become the default model."""
    run, out = tmp_path / "unet", tmp_path / "default_model"
    tiny_pipeline().save_pretrained(run / "pipeline")
    (run / "pipeline" / "training_step.json").write_text(json.dumps({"step": 300}))
    save_config(Config(train=TrainConfig(max_steps=500)), run / "config.yaml")
    monkeypatch.setattr(sys, "argv", ["assemble.py", "--pipeline", str(run / "pipeline"), "--out", str(out)])
    with pytest.raises(SystemExit, match="step 300 of its run's 500"):
        assemble.main()
    assert not out.exists()

    monkeypatch.setattr(sys, "argv", [*sys.argv, "--allow-unfinished"])
    assemble.main()
    assert "UNet step 300" in capsys.readouterr().out
    (run / "pipeline" / "training_step.json").write_text(json.dumps({"step": 500}))
    monkeypatch.setattr(sys, "argv", sys.argv[:-1])
    assemble.main()
    assert "EMA weights after 500 steps" in (out / "README.md").read_text()


# ---------------------------------------------------------------- checkpoints


def train_steps(run: BudgetedRun, model: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        run.finish_step(time.time(), 5)


def test_a_save_killed_between_renames_resumes_a_matching_pair(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    run = BudgetedRun(tmp_path, minutes=1.0, steps=10)
    train_steps(run, model, opt, 4)
    run.save(model, opt)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(run, model, opt, 3)
    renames = []
    replace = os.replace

    def crash_on_second_rename(src, dst):
        renames.append(dst)
        if len(renames) == 2:  # the first rename has moved something, the second has not
            raise Killed(dst)
        return replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash_on_second_rename)
        with pytest.raises(Killed):
            run.save(model, opt)
    with monkeypatch.context() as m:  # the next save dies before its rename: checkpoint.old must survive it
        m.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(Killed(dst)))
        with pytest.raises(Killed):
            run.save(model, opt)

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    resumed = BudgetedRun(tmp_path, minutes=1.0, steps=10)
    resumed.resume(fresh, fresh_opt)
    assert resumed.step == 4 and fresh_opt.state_dict()["state"][0]["step"] == 4
    torch.testing.assert_close(fresh.state_dict(), saved, atol=0, rtol=0)


def test_budgeted_run_resumes_the_earlier_layout_and_moves_on_from_it(tmp_path):
    """Runs in ~/ldm-runs saved model.safetensors + state.pt in the run folder itself."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    train_steps(BudgetedRun(tmp_path, minutes=1.0, steps=10), model, opt, 3)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    torch.save({"optimizer": opt.state_dict(), "step": 3, "elapsed": 1.5}, tmp_path / "state.pt")

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    resumed = BudgetedRun(tmp_path, minutes=1.0, steps=10)
    resumed.resume(fresh, fresh_opt)
    assert resumed.step == 3 and resumed.state["elapsed"] == 1.5
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), atol=0, rtol=0)
    resumed.save(fresh, fresh_opt)
    assert not (tmp_path / "state.pt").exists() and not (tmp_path / "model.safetensors").exists()
