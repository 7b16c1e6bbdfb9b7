"""The embedded default model: loads offline, draws what it is asked for, and `ldm-app generate "a cat"` works."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from safetensors import safe_open
from transformers import CLIPTokenizer

from ldm_app import LdmPipeline
from ldm_app.default_clip import load_clip
from ldm_app.pipeline import DEFAULT_MODEL_DIR

EVALUATOR_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluator"


def test_default_model_is_fp16_safetensors_under_48_mb():
    files = [p for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 48 * 2**20  # 28 MB, and 15 MB for the distilled LCM UNet
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder", "unet_lcm"}
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F16"}, path
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")]
    assert (DEFAULT_MODEL_DIR / "NOTICE").is_file()


def test_shipped_configs_name_no_path_of_the_machine_that_made_them():
    configs = [DEFAULT_MODEL_DIR / "model_index.json", *DEFAULT_MODEL_DIR.glob("*/*config.json")]
    assert len(configs) >= 6
    for config in configs:
        assert "_name_or_path" not in json.loads(config.read_text()), config


def test_default_tokenizer_is_clip_format_vocab_and_merges(tmp_path):
    folder = DEFAULT_MODEL_DIR / "tokenizer"
    for name in ("vocab.json", "merges.txt"):  # what loaders without tokenizer.json rebuild it from
        shutil.copy(folder / name, tmp_path / name)
    shipped, rebuilt = CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_pretrained(tmp_path)
    for text in ("a grinning cat face", "red heart emoji", "pizza"):
        assert rebuilt(text).input_ids == shipped(text).input_ids


def test_default_model_draws_the_colour_the_prompt_names():
    pipe = LdmPipeline.from_default()
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32  # shipped in fp16, run in fp32 on CPUs
    images = pipe(["red heart", "blue heart"], num_inference_steps=20, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    for image, channel in zip(images, (0, 2)):
        ink = image[image.min(axis=-1) < 0.8]  # pixels that are not white background
        assert len(ink) > 0.05 * image.shape[0] * image.shape[1]
        means = ink.mean(axis=0)
        assert means[channel] == means.max(), means


# Labels the independent evaluator CLIP chooses among: the subjects asked for, and look-alikes to confuse them with.
LABELS = ["cat", "cat face", "grinning cat", "weary cat", "black cat", "dog face", "tiger face", "lion", "fox",
          "bear", "hamster", "monkey face", "rabbit face", "grinning face", "smiling face", "red heart", "pizza",
          "rocket", "sun", "star", "fire"]


def test_the_evaluator_recognises_what_the_default_model_draws():
    """Eight seeds per prompt at the CLI's settings; the evaluator (never used for conditioning) names them."""
    pipe = LdmPipeline.from_default()
    pipe.set_progress_bar_config(disable=True)
    subjects = {"a cat": "cat", "a dog": "dog", "pizza": "pizza", "red heart": "heart"}
    prompts = [prompt for prompt in subjects for _ in range(8)]
    images = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(i % 8) for i in range(len(prompts))]).images
    evaluator, tokenizer = load_clip(EVALUATOR_DIR)
    with torch.no_grad():
        image_features = evaluator.encode_image(images * 2 - 1)  # the evaluator takes [-1, 1]
        tokens = tokenizer(LABELS, padding="longest", return_tensors="pt")
        label_features = evaluator.encode_text(tokens.input_ids, tokens.attention_mask)
    named = [LABELS[i] for i in (image_features @ label_features.T).argmax(dim=1)]
    for k, (prompt, subject) in enumerate(subjects.items()):
        hits = sum(subject in label for label in named[8 * k:8 * k + 8])
        assert hits >= 6, (prompt, named[8 * k:8 * k + 8])


def test_generate_a_cat_from_the_command_line(tmp_path):
    out = tmp_path / "cat.png"
    r = subprocess.run([sys.executable, "-m", "ldm_app", "generate", "a cat", "--seed", "0", "-o", str(out), "-q"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    image = np.asarray(PIL.Image.open(out).convert("RGB"))
    assert image.shape == (64, 64, 3) and image.std() > 10
