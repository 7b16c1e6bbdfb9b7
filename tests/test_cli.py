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


def test_image_to_image_and_inpainting_round_trip_through_from(model, tmp_path):
    photo, mask = tmp_path / "in.png", tmp_path / "mask.png"
    PIL.Image.new("RGB", (48, 32), (200, 40, 40)).save(photo)  # not square: covered and center-cropped
    PIL.Image.new("L", (48, 32), 0).save(mask)
    PIL.Image.open(mask).point(lambda v: 255).crop((0, 0, 24, 32)).save(tmp_path / "half.png")
    full = PIL.Image.new("L", (48, 32), 0)
    full.paste(255, (12, 8, 36, 24))
    full.save(mask)
    out = tmp_path / "inpainted.png"
    r = cli("generate", "a cat", "--model", str(model), "--steps", "3", "--seed", "5", "--image", str(photo),
            "--mask", str(mask), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "resized and center-cropped to 32x32" in r.stderr
    stored = json.loads(PIL.Image.open(out).info["ldm-app"])
    assert stored["image"] == str(photo.resolve()) and stored["strength"] == 1.0 and stored["mask_sha256"]
    assert "Denoising strength: 1.0" in PIL.Image.open(out).info["parameters"]
    again = tmp_path / "again.png"
    r = cli("generate", "--from", str(out), "-o", str(again))
    assert r.returncode == 0 and "reusing --image" in r.stderr and "reusing --mask" in r.stderr
    assert np.array_equal(pixels(out), pixels(again))
    # outside the mask the input's pixels are kept exactly (after the cover-and-crop to 32x32: columns 8..40)
    kept = pixels(out).astype(int)
    assert (kept[:8] == [200, 40, 40]).all() and (kept[24:] == [200, 40, 40]).all()

    PIL.Image.new("RGB", (48, 32), (0, 0, 255)).save(photo)  # the input changed since
    r = cli("generate", "--from", str(out), "-o", str(tmp_path / "changed.png"))
    assert r.returncode == 2 and "has changed since" in r.stderr and "Traceback" not in r.stderr
    r = cli("generate", "a cat", "--model", str(model), "--image", str(photo), "--strength", "0.5", "--steps", "4",
            "-o", str(tmp_path / "sdedit.png"), "-q")
    assert r.returncode == 0 and json.loads(PIL.Image.open(tmp_path / "sdedit.png").info["ldm-app"])["strength"] == 0.5


@pytest.mark.parametrize("args, message", [
    (["--strength", "0.5"], "--strength needs --image"),
    (["--image", "{tmp}/in.png", "--mask", "{tmp}/black.png"], "nothing to repaint"),
    (["--image", "{tmp}/in.png", "--mask", "{tmp}/small.png"], "pass a mask of the image's size"),
    (["--image", "{tmp}/in.png", "--mask", "{tmp}/notes.txt"], "--mask"),
    (["--image", "{tmp}/missing.png"], "no such file"),
])
def test_bad_image_inputs_are_one_line_exit_2(model, tmp_path, args, message):
    PIL.Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "in.png")
    PIL.Image.new("L", (32, 32), 0).save(tmp_path / "black.png")
    PIL.Image.new("L", (16, 16), 255).save(tmp_path / "small.png")
    (tmp_path / "notes.txt").write_text("not an image")
    r = cli("generate", "a cat", "--model", str(model), "--steps", "1", "-o", str(tmp_path / "o.png"),
            *[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert [line.startswith("error:") for line in r.stderr.splitlines()].count(True) == 1
    assert "Traceback" not in r.stderr


def test_from_reads_an_a1111_png_and_applies_its_lora_tags_from_lora_dir(model, tmp_path):
    from ldm_app.testing import tiny_pipeline

    name, to_q = next((n, m) for n, m in tiny_pipeline().unet.named_modules() if n.endswith("to_q"))
    loras = tmp_path / "loras"
    loras.mkdir()
    torch.manual_seed(0)
    save_file({f"unet.{name}.lora.down.weight": torch.randn(4, to_q.in_features),
               f"unet.{name}.lora.up.weight": torch.randn(to_q.out_features, 4)}, loras / "style.safetensors")
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat <lora:style:0.7>\nNegative prompt: a dog\nSteps: 3, Sampler: DPM++ 2M, "
                                "Schedule type: Karras, CFG scale: 4, Seed: 9, Size: 32x32, Model hash: abc, "
                                "Model: sd15, Clip skip: 2")
    png = tmp_path / "a1111.png"
    PIL.Image.new("RGB", (32, 32)).save(png, pnginfo=info)
    out = tmp_path / "ours.png"
    r = cli("generate", "--from", str(png), "--model", str(model), "--lora-dir", str(loras), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "Clip skip: 2" in r.stderr  # reported as not used
    stored = json.loads(PIL.Image.open(out).info["ldm-app"])
    assert (stored["prompt"], stored["negative_prompt"], stored["steps"], stored["sampler"], stored["seed"]) == \
        ("a cat", "a dog", 3, "dpm++-karras", 9)
    assert stored["loras"] == [f"{loras / 'style.safetensors'}:0.7"]
    assert "<lora:style:0.7>" in PIL.Image.open(out).info["parameters"]
    r = cli("generate", "--from", str(png), "--model", str(model), "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "--lora-dir" in r.stderr
