"""The declared dependency ranges hold: the shipped model, a saved pipeline and a LoRA give the same output under
the lowest allowed versions as under the newest.

`.ci/lowest-versions` runs this module in a venv with pyproject's floors installed; the main test run checks the
newest versions against the same reference. Regenerate the reference (only when the default model changes) under
the newest versions with `python tests/test_versions.py`.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ldm_app import LdmPipeline
from ldm_app.config import load_config
from ldm_app.lora import LORA_FILE
from ldm_app.lora_saving import save_lora
from ldm_app.pipeline import DEFAULT_MODEL_DIR
from ldm_app.testing import add_random_lora, write_toy_dataset
from ldm_app.trainer import train

REFERENCE = Path(__file__).parent / "data" / "default_model_reference.safetensors"


def sample(pipe: LdmPipeline) -> dict[str, torch.Tensor]:
    """Fixed-seed latents after 4 DDIM steps with guidance, and the decoded image pooled to 8×8 (checks the VAE)."""
    latents = pipe("a cat", num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images  # (1, 4, 16, 16)
    with torch.no_grad():
        image = F.avg_pool2d(pipe.decode_latents(latents), 8)  # (1, 3, 8, 8), [-1, 1]
    return {"latents": latents.float().contiguous(), "image": image.float().contiguous()}


def default_pipeline() -> LdmPipeline:
    pipe = LdmPipeline.from_default()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return sample(default_pipeline())


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    for name in expected:
        np.testing.assert_allclose(actual[name].numpy(), expected[name].numpy(), atol=atol, rtol=0, err_msg=name)


def test_the_default_model_gives_the_reference_output_of_the_newest_versions(base):
    # A text encoder whose weights were silently not loaded, or a tokenizer read differently, moves these by ~1.
    assert_same(base, load_file(REFERENCE), atol=1e-4)


def test_a_saved_pipeline_reloads_to_the_same_output(tmp_path, base):
    default_pipeline().save_pretrained(tmp_path)
    pipe = LdmPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert_same(sample(pipe), base, atol=1e-6)


def test_a_lora_loads_changes_the_output_and_at_scale_zero_gives_the_base(tmp_path, base):
    pipe = add_random_lora(default_pipeline(), text_encoder=True, std=0.05)
    with_lora = sample(pipe)
    save_lora(pipe.unet, pipe.text_encoder, tmp_path)

    fresh = default_pipeline()
    fresh.load_lora_weights(tmp_path, adapter_name="test")
    loaded = sample(fresh)
    assert (loaded["latents"] - base["latents"]).abs().max() > 1e-2
    assert_same(loaded, with_lora, atol=1e-4)
    fresh.set_adapters(["test"], [0.0])
    assert_same(sample(fresh), base, atol=1e-5)


def test_a_lora_fine_tune_of_the_default_model_runs_and_its_file_loads(tmp_path, base):
    """Two optimizer steps through the project's trainer: accelerate, datasets, TensorBoard and peft at work."""
    base_dir = str(DEFAULT_MODEL_DIR)
    config = load_config(None, [
        f"data.path={write_toy_dataset(tmp_path / 'data', n=4, size=64)}", f"model.vae={base_dir}",
        f"model.text_encoder={base_dir}", f"model.pretrained_unet={base_dir}", "lora.rank=4",
        "lora.train_text_encoder=true", f"train.output_dir={tmp_path / 'run'}", "train.batch_size=2",
        "train.max_steps=2", "train.warmup_steps=0", "train.learning_rate=1e-2", "train.use_ema=false",
        "train.validation_every=0"])
    assert train(config) == tmp_path / "run" / LORA_FILE
    assert any((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))

    pipe = default_pipeline()
    pipe.load_lora_weights(tmp_path / "run", adapter_name="trained")
    assert (sample(pipe)["latents"] - base["latents"]).abs().max() > 1e-3
    pipe.set_adapters(["trained"], [0.0])
    assert_same(sample(pipe), base, atol=1e-5)


if __name__ == "__main__":
    REFERENCE.parent.mkdir(exist_ok=True)
    save_file(sample(default_pipeline()), REFERENCE)
    print(f"wrote {REFERENCE}")
