import dataclasses
import hashlib
import json
import re

import PIL.Image
import PIL.PngImagePlugin
import pytest
import torch

from ldm_app.lora import LORA_FILE
from ldm_app.lora_saving import save_atomic
from ldm_app.lora_tags import find_lora, split_lora_tags
from ldm_app.png_metadata import a1111_text, parse_a1111, read_png, save_png
from ldm_app.request import GenerationRequest
from ldm_app.samplers import SAMPLERS

# ------------------------------------------------------------------------------------------------------------
# Reference reader: AUTOMATIC1111/stable-diffusion-webui, modules/infotext_utils.py, `parse_generation_parameters`
# (formerly generation_parameters_copypaste.py), ported without its web-UI parts: the prompt-styles lookup, the
# defaults it adds for absent settings (Clip skip, Hires …, RNG: GPU, …) and the settings-driven back-compat.
# What it returns for the fields written here is what A1111's "Read generation parameters" fills in.

A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def a1111_parse_generation_parameters(x: str) -> dict:
    res = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(A1111_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for k, v in A1111_RE_PARAM.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = a1111_unquote(v)
        m = A1111_RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"] = m.group(1)
            res[f"{k}-2"] = m.group(2)
        else:
            res[k] = v
    return res


# ------------------------------------------------------------------------------------------------------------


def params(**overrides) -> GenerationRequest:
    base = GenerationRequest(prompt="a cat", negative_prompt="", steps=25, guidance=5.0, eta=0.0, sampler="ddim",
                            seed=7, width=64, height=48, model="default")
    return dataclasses.replace(base, **overrides)


def tensor_hash(path) -> str:
    """A1111's LoRA hash, computed here independently: SHA-256 of everything after the safetensors header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def lora_file(folder, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    path = folder / f"{name}.safetensors"
    save_atomic({"lora_unet_x_to_q.lora_down.weight": torch.randn(4, 8, generator=g),
                 "lora_unet_x_to_q.lora_up.weight": torch.randn(8, 4, generator=g)}, path)
    return path


def test_a1111_reads_every_field_back_with_commas_quotes_colons_and_two_loras(tmp_path):
    (tmp_path / "my,models").mkdir()
    style, detail = lora_file(tmp_path, "style"), lora_file(tmp_path / "my,models", "de,tail: v2", seed=1)
    p = params(prompt='a "cat", sitting: on a mat\nsecond line', negative_prompt='blurry, "bad": hands',
               sampler="dpm++-karras", guidance=7.5, seed=2**40 + 3, model=str(tmp_path / "my,models" / "run: 1"),
               loras=[f"{style}:0.8", f"{detail}:-0.25"])
    got = a1111_parse_generation_parameters(a1111_text(p))
    assert got == {
        "Prompt": 'a "cat", sitting: on a mat\nsecond line <lora:style:0.8> <lora:de,tail: v2:-0.25>',
        "Negative prompt": 'blurry, "bad": hands',
        "Steps": "25", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7.5", "Seed": str(2**40 + 3),
        "Size-1": "64", "Size-2": "48", "Model": str(tmp_path / "my,models" / "run: 1"), "RNG": "CPU",
        # A1111 drops ':' and ',' from names in Lora hashes, and hashes the tensor bytes
        "Lora hashes": f"style: {tensor_hash(style)}, detail v2: {tensor_hash(detail)}",
    }


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_each_sampler_is_written_with_a_name_a1111_knows_and_ddim_eta_as_eta_ddim(sampler):
    a1111_names = {"DDIM", "Euler", "Euler a", "Heun", "LMS", "DPM++ 2M", "UniPC", "LCM"}  # sd_samplers_*.py labels
    got = a1111_parse_generation_parameters(a1111_text(params(sampler=sampler, eta=0.3)))
    assert got["Sampler"] in a1111_names and got["RNG"] == "CPU"
    assert got.get("Schedule type") == ("Karras" if sampler.endswith("-karras") else None)
    assert got.get("Eta DDIM") == {"ddim": "0.3", "ddpm": "1.0"}.get(sampler)  # A1111 has no DDPM: DDIM at η = 1
    assert "Eta" not in got and "Lora hashes" not in got


def test_our_reader_reads_our_a1111_text_back_and_reports_what_it_ignores(tmp_path):
    p = params(prompt="a, b: c", negative_prompt='x "y"', sampler="euler-karras", model="/models/a,b", steps=9)
    back, ignored = parse_a1111(a1111_text(p))
    assert back == dataclasses.replace(p, model="default")  # a PNG never chooses the model
    assert ignored == ["Model: /models/a,b"]
    back, _ = parse_a1111(a1111_text(params(sampler="ddim", eta=0.25)))
    assert (back.sampler, back.eta) == ("ddim", 0.25)
    back, _ = parse_a1111(a1111_text(params(sampler="ddpm", eta=0.0)))
    assert (back.sampler, back.eta) == ("ddim", 1.0)


def write_png(path, chunks: dict[str, str]):
    info = PIL.PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    PIL.Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


A1111_PNG_TEXT = (
    "masterpiece, a cat <lora:style:0.7>\n"
    "Negative prompt: lowres, bad anatomy\n"
    'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, Size: 512x768, '
    'Model hash: 45dee52b, Model: v1-5-pruned, Clip skip: 2, RNG: GPU, Lora hashes: "style: 0123456789ab", '
    "Version: v1.10.1")


def test_an_a1111_png_reads_into_our_parameters(tmp_path):
    path = write_png(tmp_path / "a1111.png", {"parameters": A1111_PNG_TEXT})
    p, ignored = read_png(path)
    assert p == GenerationRequest(prompt="masterpiece, a cat <lora:style:0.7>", negative_prompt="lowres, bad anatomy",
                                 steps=20, guidance=7.0, eta=0.0, sampler="dpm++-karras", seed=965400086, width=512,
                                 height=768, model="default")
    assert ignored == ["Model hash: 45dee52b", "Model: v1-5-pruned", "Clip skip: 2", "RNG: GPU",
                       "Lora hashes: style: 0123456789ab", "Version: v1.10.1"]
    # the old single-name spelling, and a sampler we do not have
    p, _ = read_png(write_png(tmp_path / "old.png", {"parameters": "a\nSteps: 5, Sampler: LMS Karras, CFG scale: 3, "
                                                                   "Seed: 1, Size: 64x64"}))
    assert p.sampler == "lms-karras"
    p, ignored = read_png(write_png(tmp_path / "sde.png", {"parameters": "a\nSteps: 5, Sampler: DPM++ SDE, "
                                                                   "CFG scale: 3, Seed: 1, Size: 64x64"}))
    assert p.sampler == "ddim" and ignored == ["Sampler: DPM++ SDE (not available; ddim used)"]


def test_our_own_png_reads_from_its_json_chunk_exactly(tmp_path):
    p = params(prompt="a, cat", sampler="unipc", model=str(tmp_path), dtype="fp16", loras=["x.safetensors:0.5"])
    save_png(PIL.Image.new("RGB", (8, 8)), tmp_path / "ours.png", p)
    assert read_png(tmp_path / "ours.png") == (p, [])
    older = {k: v for k, v in dataclasses.asdict(p).items() if k not in ("dtype", "loras")}  # before those fields
    assert read_png(write_png(tmp_path / "old.png", {"ldm-app": json.dumps(older)}))[0] == dataclasses.replace(
        p, dtype="auto", loras=[])


@pytest.mark.parametrize("change, message", [
    ({"steps": "3"}, "steps is '3', expected a whole number"),
    ({"steps": True}, "steps is True"),
    ({"dtype": "float64"}, "dtype is 'float64', expected one of auto, fp32, fp16, bf16"),
    ({"seed": 2**70}, "seed is 1180591620717411303424, expected a whole number from 0 to"),
    ({"seed": -1}, "seed is -1"),
    ({"eta": 2}, "eta is 2, expected a number from 0 to 1"),
    ({"guidance": None}, "guidance is None"),
    ({"width": 0}, "width is 0"),
    ({"sampler": "plms"}, "sampler is 'plms', expected one of ddim, ddpm"),
    ({"prompt": ["a", "b"]}, "prompt is ['a', 'b'], expected a string"),
    ({"loras": "x.safetensors"}, "loras is 'x.safetensors', expected a list"),
])
def test_bad_values_in_our_json_chunk_are_value_errors_with_a_fix(tmp_path, change, message):
    stored = dataclasses.asdict(params()) | change
    path = write_png(tmp_path / "bad.png", {"ldm-app": json.dumps(stored)})
    with pytest.raises(ValueError, match="pass a PNG written by ldm-app generate") as err:
        read_png(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("just a prompt", "no 'Steps: …, Sampler: …' line"),
    ("a\nSteps: 5, Sampler: Euler, CFG scale: 3, Size: 64x64", "lack Seed"),
    ("a\nSteps: five, Sampler: Euler, CFG scale: 3, Seed: 1, Size: 64x64", "Steps is 'five', expected a number"),
    ("a\nSteps: 5, Sampler: Euler, CFG scale: 3, Seed: 1, Size: big", "Size is 'big'"),
    ("a\nSteps: 5, Sampler: Euler, CFG scale: 3, Seed: 1180591620717411303424, Size: 64x64", "seed is 11805"),
])
def test_bad_a1111_parameters_are_value_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match="pass a PNG written by A1111 or ldm-app generate|ldm-app generate") as err:
        read_png(write_png(tmp_path / "bad.png", {"parameters": text}))
    assert message in str(err.value)


def test_a_png_without_parameters_or_not_a_png_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="carries no generation parameters"):
        read_png(write_png(tmp_path / "plain.png", {}))
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ValueError, match="Cannot read"):
        read_png(tmp_path / "text.png")


def test_lora_tags_split_from_the_prompt_and_resolve_in_a_lora_folder(tmp_path):
    assert split_lora_tags("a cat <lora:style:0.7>, red <lora:my detail> and <hypernet:x:1>") == (
        "a cat, red and <hypernet:x:1>", [("style", 0.7), ("my detail", 1.0)])
    assert split_lora_tags("no tags") == ("no tags", [])
    with pytest.raises(ValueError, match="no single numeric weight"):
        split_lora_tags("a <lora:style:0.5:0.3>")

    (tmp_path / "sub").mkdir()
    style = lora_file(tmp_path / "sub", "style")
    (tmp_path / "folder-lora").mkdir()
    lora_file(tmp_path / "folder-lora", LORA_FILE.removesuffix(".safetensors"))
    assert find_lora("style", tmp_path) == style
    assert find_lora("folder-lora", tmp_path) == tmp_path / "folder-lora"
    with pytest.raises(ValueError, match="matches no nope.safetensors"):
        find_lora("nope", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        find_lora("style", tmp_path / "missing")
    lora_file(tmp_path, "style")
    with pytest.raises(ValueError, match="matches 2 files"):
        find_lora("style", tmp_path)


def test_tags_we_write_read_back_as_the_loras_we_applied(tmp_path):
    (tmp_path / "loras" / "folder-lora").mkdir(parents=True)
    style = lora_file(tmp_path / "loras", "style")
    folder = tmp_path / "loras" / "folder-lora"
    lora_file(folder, LORA_FILE.removesuffix(".safetensors"))
    text = a1111_text(params(prompt="a cat", loras=[f"{style}:0.6", str(folder)]))
    prompt, loras = split_lora_tags(parse_a1111(text)[0].prompt)
    assert prompt == "a cat" and loras == [("style", 0.6), ("folder-lora", 1.0)]
    assert [find_lora(name, tmp_path / "loras") for name, _ in loras] == [style, folder]
