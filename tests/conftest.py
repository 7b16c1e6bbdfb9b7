import os
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """A saved tiny random pipeline folder, for commands that take `--model`; tests only read it."""
    from ldm_app.testing import tiny_pipeline  # here, so that tests that need no model do not import torch for it

    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tiny random model and toy data for training runs (`configs/tiny.yaml`), fresh for each test module."""
    from ldm_app.testing import write_tiny_run_inputs

    return write_tiny_run_inputs(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def image() -> PIL.Image.Image:
    """A 32×32 picture with shapes and colours for image-to-image, inpainting and the diffusers contract."""
    image = PIL.Image.new("RGB", (32, 32), (250, 240, 200))
    draw = PIL.ImageDraw.Draw(image)
    draw.ellipse((6, 6, 26, 26), fill=(220, 40, 40))
    draw.rectangle((0, 24, 31, 31), fill=(40, 60, 220))
    return image
