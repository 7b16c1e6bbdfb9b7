"""Faults and hostile inputs at the command line (issue #14): each case is a command and what must happen —
one `error:` line and exit 2 for bad input, exit 1 for a full disk, nothing half-written, nothing loaded or run
that the user did not ask for."""

import errno
import json
import shutil
from pathlib import Path

import PIL.Image
import PIL.PngImagePlugin
import pytest
import torch
from click.testing import CliRunner, Result

from ldm_app.cli import app
from ldm_app.outputs import output_paths
from ldm_app.config import load_config
from ldm_app.inversion import Inversion
from ldm_app.testing import tiny_pipeline, write_toy_dataset


def run(*args) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, code: int = 2) -> str:
    """The single `error:` line of a run that failed as the user should see it."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    return errors[0]


def png_with_params(folder: Path, **changes) -> Path:
    """A PNG carrying ldm-app parameters, with some fields changed (as a hand-edited or hostile file)."""
    params = {"prompt": "a cat", "negative_prompt": "", "steps": 1, "guidance": 5.0, "eta": 0.0, "sampler": "ddim",
              "seed": 1, "width": 32, "height": 32, "model": "default", "dtype": "fp32", "loras": []} | changes
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("ldm-app", json.dumps(params))
    path = folder / "params.png"
    PIL.Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


# 1. Two runs into one folder: each claims its names at once, so the second never picks the first's.
def test_runs_writing_into_one_folder_claim_different_names(tmp_path):
    first = output_paths(str(tmp_path), 2, overwrite=False)  # run A has chosen, not yet written
    second = output_paths(str(tmp_path), 2, overwrite=False)  # run B starts meanwhile
    assert not set(first) & set(second) and all(p.exists() for p in first + second)


def test_a_run_that_fails_leaves_no_claimed_file_behind(model, tmp_path):
    one_error_line(run("generate", "a cat", "--model", model, "--height", "30", "-o", tmp_path, "-q"))
    assert list(tmp_path.iterdir()) == []


# 6. A full disk: refused before sampling, or one line when a write fails; nothing half-written.
def test_too_little_free_space_is_refused_before_sampling(model, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    line = one_error_line(run("generate", "a cat", "--model", model, "--steps", "1", "-o", tmp_path, "-q"))
    assert "MiB free" in line and list(tmp_path.iterdir()) == []


def test_a_write_that_hits_a_full_disk_is_one_line_exit_1(model, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ldm-00000.png"))

    monkeypatch.setattr("ldm_app.png_metadata.save_png", full)
    line = one_error_line(run("generate", "a cat", "--model", model, "--steps", "1", "-o", tmp_path, "-q"), code=1)
    assert "no space left" in line and list(tmp_path.iterdir()) == []


# 7, 11, 12. Input that is not what it claims to be.
@pytest.mark.parametrize("args, message", [
    (["generate", "a \udcff cat"], "UTF-8"),
    (["generate", "a cat", "--negative-prompt", "\udcfe"], "UTF-8"),
    (["generate", "a cat", "--guidance", "nan"], "not a finite number"),
    (["generate", "a cat", "--guidance", "inf"], "not a finite number"),
    (["generate", "a cat", "--lora", "{model}:abc"], "the scale 'abc' is not a number"),
    (["invert", "{image}", "--prompt", "\udcff"], "UTF-8"),
    (["finetune-lora", "{tmp}", "--prompt", "x", "--seed", "-1"], "--seed"),
    (["finetune-lora", "{tmp}", "--prompt", "\udcff"], "UTF-8"),
])
def test_bad_input_is_one_line(model, tmp_path, args, message):
    image = tmp_path / "in.png"
    PIL.Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    args = [a.format(model=model, image=image, tmp=tmp_path) for a in args]
    extra = ["--model", str(model), "--steps", "1", "-o", str(tmp_path / "out.png")] if args[0] == "generate" else []
    assert message in one_error_line(run(*args, *extra))


# 8. A PNG's metadata is checked like typed input, and never chooses a model to fetch.
@pytest.mark.parametrize("changes, message", [
    ({"seed": 2**70}, "seed is"),
    ({"dtype": "float64"}, "dtype is"),
    ({"steps": "abc"}, "steps is"),
    ({"guidance": "nan"}, "guidance is"),
    ({"sampler": "plms"}, "sampler is"),
])
def test_from_metadata_is_validated_like_the_command_line(model, tmp_path, changes, message):
    png = png_with_params(tmp_path, **changes)
    assert message in one_error_line(run("generate", "--from", png, "--model", model, "-o", tmp_path / "x.png"))


def test_from_never_loads_a_model_named_only_by_the_png(model, tmp_path):
    png = png_with_params(tmp_path, model="someone/their-model")
    r = run("generate", "--from", png, "-o", tmp_path / "x.png")  # no --model: the PNG's is not trusted
    assert r.exit_code == 0, r.output
    assert "'someone/their-model', which is not a model folder on this machine; using 'default'" in r.stderr
    assert json.loads(PIL.Image.open(tmp_path / "x.png").info["ldm-app"])["model"] == "default"


def test_edit_never_loads_a_model_named_only_by_the_inversion(model, tmp_path):
    pipe = tiny_pipeline()
    size = pipe.unet.config.sample_size
    inversion = Inversion(torch.zeros(3, 1, 4, size, size), "a cat", 2, 1.0, "ddim", model="someone/their-model")
    inversion.save(tmp_path / "inv.safetensors")
    r = run("edit", "--inversion", tmp_path / "inv.safetensors", "--target-prompt", "a dog", "--model", model,
            "-o", tmp_path / "e.png")
    assert r.exit_code == 0 and "not a model folder" not in r.stderr  # --model given: used as asked
    r = run("edit", "--inversion", tmp_path / "inv.safetensors", "--target-prompt", "a dog", "-o", tmp_path / "f.png")
    assert "'someone/their-model', which is not a model folder on this machine" in r.stderr


# 10. Broken model folders.
@pytest.mark.parametrize("damage", ["truncated text encoder", "no tokenizer", "truncated unet"])
def test_broken_model_folders_are_one_line(model, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    if damage == "no tokenizer":
        shutil.rmtree(broken / "tokenizer")
    else:
        folder = broken / ("text_encoder" if "text" in damage else "unet")
        weights = next(folder.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
    line = one_error_line(run("generate", "a cat", "--model", broken, "--steps", "1", "-o", tmp_path / "x.png"))
    assert "Cannot load model" in line


# 12. Training input errors that name what to fix.
def test_a_missing_local_vae_is_named_not_looked_up_on_the_hub(tmp_path):
    from ldm_app.encoders import Encoders

    config = load_config(None, [f"model.vae={tmp_path / 'no-vae'}", f"model.text_encoder={tmp_path}"])
    with pytest.raises(ValueError, match="no-vae does not exist"):
        Encoders.load(config.model)


def test_a_caption_that_is_not_utf8_names_its_file(tmp_path):
    from ldm_app.data import load_image_dataset

    data = write_toy_dataset(tmp_path / "data", n=2, layout="sidecar")
    caption = next(data.glob("*.txt"))
    caption.write_bytes(b"a \xff cat")
    with pytest.raises(ValueError, match=f"{caption.name} is not UTF-8"):
        load_image_dataset(load_config(None, [f"data.path={data}"]).data)


def test_a_folder_of_fp16_variant_files_needs_and_takes_variant(tmp_path):
    from ldm_app.pipeline import cast_quietly

    cast_quietly(tiny_pipeline(), torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    line = one_error_line(run("generate", "a cat", "--model", tmp_path / "fp16", "--steps", "1", "-o", tmp_path / "a.png"))
    assert "--variant fp16" in line and not (tmp_path / "a.png").exists()
    r = run("generate", "a cat", "--model", tmp_path / "fp16", "--variant", "fp16", "--steps", "1", "-o",
            tmp_path / "b.png", "-q")
    assert r.exit_code == 0, r.output
    assert PIL.Image.open(tmp_path / "b.png").size == (32, 32)


def test_a_pickled_single_file_is_refused_unopened(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04not to be unpickled")
    line = one_error_line(run("generate", "a cat", "--model", tmp_path / "model.ckpt", "-o", tmp_path / "a.png"))
    assert "ckpt" in line
