"""The native-size rule (`ldm_app.sizes`) on every door, and the samplers that need scipy.

A1111 clients ask for 512×512; the default model draws 64×64. The rule draws far-too-large requests at the native
size and resizes them up, and says so: the CLI in one warning line, the APIs and PNGs in `Drawn at`."""

import json
import os
import subprocess
import sys

import PIL.Image
import pytest

from ldm_app.png_metadata import read_png
from ldm_app.sizes import plan_size


@pytest.mark.parametrize("size, drawn", [
    ((64, 64), (64, 64)),  # native: drawn as asked
    ((128, 96), (128, 96)),  # up to 2× the native side: drawn as asked
    ((512, 512), (64, 64)),  # A1111's default
    ((768, 512), (64, 44)),  # the longer side becomes native, the aspect kept, multiples of the factor (4)
    ((1024, 8), (64, 4)),  # never below one factor
])
def test_plan_size(size, drawn):
    plan = plan_size(*size, native=64, factor=4)
    assert (plan.draw_width, plan.draw_height) == drawn and (plan.width, plan.height) == size
    assert plan.resized == (drawn != size)
    assert (plan.note(64) is None) == (drawn == size)
    if plan.resized:
        assert f"drawn at {drawn[0]}x{drawn[1]}" in plan.note(64) and plan.drawn_at == f"{drawn[0]}x{drawn[1]}"


def cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ldm_app", "generate", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_cli_512_on_the_default_model_is_drawn_at_64_resized_and_recorded(tmp_path):
    r = cli("a red heart", "--width", "512", "--height", "512", "--steps", "4", "--seed", "3", "-o", "a.png",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 512x512 is over 2× this model's native 64x64: drawn at 64x64 and resized up."]
    image = PIL.Image.open(tmp_path / "a.png")
    assert image.size == (512, 512)
    assert "Size: 512x512, Drawn at: 64x64" in image.info["parameters"]
    params, ignored = read_png(tmp_path / "a.png")
    assert (params.width, params.height, params.drawn_at, ignored) == (512, 512, "64x64", [])
    again = cli("--from", "a.png", "-o", "b.png", cwd=tmp_path)  # the same rule redraws the same picture
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("sampler", ["lms", "lms-karras"])
def test_lms_samplers_run_end_to_end(tmp_path, sampler):
    # diffusers' LMSDiscreteScheduler integrates its coefficients with scipy, a core dependency for this reason
    r = cli("a cat", "--sampler", sampler, "--steps", "4", "--seed", "1", "-o", "lms.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(PIL.Image.open(tmp_path / "lms.png").info["ldm-app"])["sampler"] == sampler


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("fastapi")
    from ldm_app.serve.process import start_server, stop_server

    folder = tmp_path_factory.mktemp("serve")
    proc, url = start_server(["--device", "cpu", "--no-ui", "--api-key", "test-key-native-size"],
                             log_path=str(folder / "server.log"))
    try:
        yield url
    finally:
        stop_server(proc)


def test_webuiapi_defaults_on_the_default_model_are_quick_and_say_what_was_done(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(server.rsplit(":", 1)[1]))  # its defaults: 512×512
    api.session.headers["Authorization"] = "Bearer test-key-native-size"
    result = api.txt2img(prompt="a red heart", seed=5, steps=10)  # drawn at 64×64: seconds, not minutes
    assert result.image.size == (512, 512)
    assert "Drawn at: 64x64" in result.info["infotexts"][0]
    assert "Drawn at: 64x64" in result.image.info["parameters"]


def test_openai_1024_on_the_default_model_is_drawn_at_64(server):
    openai = pytest.importorskip("openai")
    import base64
    import io

    client = openai.OpenAI(base_url=server + "/v1", api_key="test-key-native-size", max_retries=0)
    response = client.images.generate(prompt="a cat", size="1024x1024", extra_body={"steps": 4, "seed": 1})
    image = PIL.Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json)))
    assert image.size == (1024, 1024) and json.loads(image.info["ldm-app"])["drawn_at"] == "64x64"
