"""--threads: torch's CPU threads for generate (serve's is checked on a real server in test_serve_hostile.py)."""

import pytest
import torch
from click.testing import CliRunner

from ldm_app.cli import app
from ldm_app.testing import tiny_pipeline
from ldm_app.threads import use_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_generate_runs_on_the_threads_it_is_given(tmp_path, restore_threads):
    tiny_pipeline().save_pretrained(tmp_path / "model")
    torch.set_num_threads(2)
    r = CliRunner().invoke(app, ["generate", "a cat", "--model", str(tmp_path / "model"), "--steps", "1",
                                 "--width", "32", "--height", "32", "--threads", "1", "-o", str(tmp_path / "a.png"),
                                 "-q", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 1 and (tmp_path / "a.png").is_file()
    bad = CliRunner().invoke(app, ["generate", "a cat", "--threads", "0"])
    assert bad.exit_code == 2 and "--threads" in bad.stderr


def test_use_threads_leaves_torchs_default_when_not_told(restore_threads):
    torch.set_num_threads(1)
    assert use_threads(None) == 1 and use_threads(2) == 2 == torch.get_num_threads()
    with pytest.raises(ValueError, match="at least 1"):
        use_threads(0)
