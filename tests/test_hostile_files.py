"""Hostile files handed to `ldm-app generate --from` and to the loaders: each is one `error:` line, fast."""

import json
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ldm_app.cli import app
from ldm_app.png_metadata import MAX_INFOTEXT_CHARS, infotext_fields, split_infotext
from ldm_app.testing import hand_made_png as png


VALID = {"prompt": "a cat", "negative_prompt": "", "steps": 2, "guidance": 5.0, "eta": 0.0, "sampler": "ddim",
         "seed": 1, "width": 32, "height": 32, "model": "default"}


@pytest.mark.parametrize("name, data, words", [
    ("bomb.png", png(50000, 50000, {"parameters": b"a cat\nSteps: 2, Sampler: DDIM, CFG scale: 5, Seed: 1, Size: 8x8"}),
     "safety limit"),
    ("deep.png", png(8, 8, {"ldm-app": b"[" * 100_000 + b"]" * 100_000}), "damaged"),
    ("surrogate.png", png(8, 8, {"ldm-app": json.dumps({**VALID, "prompt": "a \ud800"}).encode()}), "UTF-8 text"),
    ("long.png", png(8, 8, {"parameters": b"word " * 200_000}), str(MAX_INFOTEXT_CHARS)),
], ids=["50000x50000", "100k-deep-json", "lone-surrogate", "1MB-infotext"])
def test_generate_from_a_hostile_png_is_one_error_line(tmp_path, name, data, words):
    path = tmp_path / name
    path.write_bytes(data)
    started = time.monotonic()
    out = CliRunner().invoke(app, ["generate", "--from", str(path), "-o", str(tmp_path)])
    assert out.exit_code == 2 and time.monotonic() - started < 10
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], out.stderr
    assert not list(tmp_path.glob("*-*.png"))


@pytest.mark.parametrize("size", [32_000, 1_000_000])
def test_the_infotext_parser_is_linear(size):
    """A1111's own field regex takes 5.8 s on a 32k last line without a colon, and hours on 1 MB."""
    line = ("word " * size)[:size]
    started = time.monotonic()
    assert infotext_fields(line) == []
    assert infotext_fields(line + ", Steps: 2, Seed: 3") == [("Steps", "2"), ("Seed", "3")]
    assert time.monotonic() - started < 1


def test_the_infotext_parser_reads_what_a1111_reads():
    """Same fields as A1111's `re_param.findall` on real and awkward lines (its regex, kept here as the oracle)."""
    import re

    re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    lines = ['Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, '
             'Model: "sd, v1", Lora hashes: "a: 1, b: 2"', 'a: "x"y, bb: ", cc:: 3', "x:1, yy: 2,zz :3", "",
             'k-/ k: "\\"q\\"", Eta DDIM: 0.5, é: 1, éé: 2']
    for line in lines:
        assert infotext_fields(line) == re_param.findall(line), line
    assert split_infotext("a cat\nNegative prompt: ugly\nSteps: 2, Seed: 3, Size: 8x8")[2]["Size"] == "8x8"
    with pytest.raises(ValueError, match="65536"):
        split_infotext("x" * (MAX_INFOTEXT_CHARS + 1))


def test_an_incomplete_single_file_is_one_error_line(tmp_path):
    """One tensor under each prefix passes the key check; diffusers' conversion then fails: one line, no traceback."""
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 8)},
              tmp_path / "partial.safetensors")
    out = CliRunner().invoke(app, ["generate", "a cat", "--model", str(tmp_path / "partial.safetensors"),
                                   "-o", str(tmp_path / "out.png"), "-q"])
    assert out.exit_code == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "incomplete or damaged" in errors[0], out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out.png").exists()
