import os
from pathlib import Path

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
