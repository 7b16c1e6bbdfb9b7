import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest
import torch
from safetensors.torch import save_file

from ldm_app.testing import tiny_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(folder)
    return folder


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ldm_app", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def test_generate_writes_png_with_parameters_and_from_reproduces_it(model, tmp_path):
    out = tmp_path / "cat.png"
    r = cli("generate", "a cat", "--model", str(model), "--steps", "3", "--seed", "7", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    info = PIL.Image.open(out).info
    assert info["parameters"].startswith("a cat\nNegative prompt: \nSteps: 3, Sampler: DDIM, CFG scale: 5.0, Seed: 7")
    params = json.loads(info["ldm-app"])
    assert params["seed"] == 7 and params["model"] == str(model) and params["width"] == 32

    again = tmp_path / "again.png"
    r = cli("generate", "--from", str(out), "-o", str(again), "--quiet")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(pixels(out), pixels(again))


def test_several_images_go_to_a_folder_with_a_grid_and_own_seeds(model, tmp_path):
    r = cli("generate", "a dog", "--model", str(model), "--steps", "2", "-n", "3", "--batch-size", "2",
            "--seed", "10", "--grid", "-o", str(tmp_path), "--sampler", "dpm++")
    assert r.returncode == 0, r.stderr
    written = [Path(line) for line in r.stdout.split()]
    assert len(written) == 4 and all(p.is_file() for p in written)
    seeds = [json.loads(PIL.Image.open(p).info["ldm-app"])["seed"] for p in written[:3]]
    assert seeds == [10, 11, 12]
    assert PIL.Image.open(written[3]).size == (96, 32)
    # image 11, drawn second in a batch of two, alone is the same image, up to the last bit of rounding
    single = tmp_path / "single.png"
    assert cli("generate", "--from", str(written[1]), "-o", str(single), "-q").returncode == 0
    gap = np.abs(pixels(written[1]).astype(int) - pixels(single).astype(int))
    assert gap.max() <= 1 and gap.mean() < 0.01
    assert "seed: 10" in r.stderr


def test_existing_file_is_kept_unless_overwrite(model, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    r = cli("generate", "a cat", "--model", str(model), "--steps", "1", "-o", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr and out.read_bytes() == b"precious"
    r = cli("generate", "a cat", "--model", str(model), "--steps", "1", "-o", str(out), "--overwrite", "-q")
    assert r.returncode == 0 and out.read_bytes() != b"precious"


def broken_model(tmp_path: Path) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "LdmPipeline", "unet": ["ldm_app.unet", "LdmUNet"]}')
    return folder


def foreign_lora(folder: Path) -> Path:
    """A LoRA whose module names fit the tiny UNet but whose shapes do not (as one made for another model)."""
    name = next(n for n, _ in tiny_pipeline().unet.named_modules() if n.endswith("to_q"))
    path = folder / "foreign.safetensors"
    save_file({f"unet.{name}.lora.down.weight": torch.zeros(4, 999), f"unet.{name}.lora.up.weight": torch.zeros(7, 4)},
              path)
    return path


def damaged_png(folder: Path) -> Path:
    """A PNG whose ldm-app chunk lacks required fields (as after hand-editing)."""
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("ldm-app", json.dumps({"steps": 3}))
    path = folder / "damaged.png"
    PIL.Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/missing"], "does not exist"),
    (["--model", "{broken}"], "Cannot load model"),
    (["--height", "30"], "multiple of the VAE factor"),
    (["--width", "40000"], "too large"),
    (["--steps", "0"], "--steps"),
    (["--steps", "1000"], "use at most 999"),
    (["-o", "{tmp}/cat.jpg"], "written as PNG"),
    (["--lora", "{tmp}/nothere.safetensors"], "no such file"),
    (["--lora", "{foreign}"], "Was it made for this model?"),
    (["--sampler", "plms"], "--sampler"),
    (["-o", "/etc/hostname/x.png"], "Output folder"),
    (["--from", "{tmp}/nope.png"], "no such file"),
    (["--from", "{damaged}"], "missing prompt"),
])
def test_bad_input_is_one_line_exit_2_without_traceback(model, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, broken=broken_model(tmp_path) if "{broken}" in a else "",
                     damaged=damaged_png(tmp_path) if "{damaged}" in a else "",
                     foreign=foreign_lora(tmp_path) if "{foreign}" in a else "") for a in args]
    if "--model" not in args:
        args = ["--model", str(model), *args]
    steps = [] if "--steps" in args else ["--steps", "1"]
    r = cli("generate", "a cat", "--quiet", *steps, *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr


def test_long_prompt_warns_with_dropped_token_count_and_empty_prompt_notes(model, tmp_path):
    r = cli("generate", " ".join(["cat"] * 30), "--model", str(model), "--steps", "1", "-n", "2", "--batch-size", "1",
            "-o", str(tmp_path / "a"))
    assert r.returncode == 0 and "last 16 token(s)" in r.stderr
    assert r.stderr.count("dropped") == 1  # said once, not once per batch
    r = cli("generate", "", "--model", str(model), "--steps", "1", "-o", str(tmp_path / "b.png"))
    assert r.returncode == 0 and "unconditional" in r.stderr


def test_info_lists_components(model):
    r = cli("info", "--model", str(model))
    assert r.returncode == 0, r.stderr
    assert "unet: LdmUNet" in r.stdout and "native size: 32x32" in r.stdout and "DDIMScheduler" in r.stdout


def test_every_help_ends_with_examples():
    for command in ("generate", "info"):
        r = cli(command, "--help")
        assert r.returncode == 0 and "Examples:" in r.stdout.split("Options:")[-1]
