"""One generation request, checked in one place, and one image loop: the CLI, both server APIs and a PNG's
parameters give the same answer for the same bad value; image i is drawn from seed + i in any batch."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from ldm_app.cli import app
from ldm_app.generation import generate_images
from ldm_app.png_metadata import json_record, save_png
from ldm_app.request import GenerationRequest
from ldm_app.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cli_error(*args: str) -> str:
    r = CliRunner().invoke(app, ["generate", *args])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    return r.stderr.strip().splitlines()[-1].removeprefix("error: ")


def test_the_cli_a_png_and_both_apis_refuse_a_bad_size_with_the_same_message(pipe, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ldm_app.serve import Settings, create_app
    from ldm_app.serve.engine import Engine

    pipe.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--steps", "1", "-o", str(tmp_path / "out.png")]
    from_cli = cli_error("a cat", "--width", "30", *common)
    save_png(PIL.Image.new("RGB", (8, 8)), tmp_path / "made.png",
             GenerationRequest("a cat", steps=1, seed=0, width=30, height=32))  # e.g. edited by hand
    from_png = cli_error("--from", str(tmp_path / "made.png"), *common)
    with TestClient(create_app(Engine(pipe, "tiny"), Settings(ui=False))) as client:
        a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "width": 30, "steps": 1})
        openai = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "30x32", "steps": 1})
    assert a1111.status_code == 422 and openai.status_code == 400
    assert "width=30 is not a positive multiple of the VAE factor 4" in from_cli
    assert from_cli == from_png == a1111.json()["detail"] == openai.json()["error"]["message"]


def test_field_rules_name_the_field_and_what_is_expected():
    with pytest.raises(ValueError, match=r"^eta is 2, expected a number from 0 to 1$"):
        GenerationRequest("a cat", eta=2).checked()
    with pytest.raises(ValueError, match=r"^cfg is -1, expected a number ≥ 0$"):
        GenerationRequest("a cat", guidance=-1).checked({"guidance": "cfg"})
    with pytest.raises(ValueError, match="seed is 9223372036854775807, expected a whole number from 0 to "
                                         "9223372036854775806"):
        GenerationRequest("a cat", seed=2**63 - 1, n=2).checked()  # the second image's seed would not exist


def test_resolved_fills_in_the_models_defaults(pipe):
    request = GenerationRequest("a cat").resolved(pipe)
    assert (request.width, request.height, request.drawn_at, request.strength) == (32, 32, None, None)
    big = GenerationRequest("a cat", width=128, height=96).resolved(pipe)  # over twice the native side
    assert big.drawn_at == "32x24" and big.draw_size == (32, 24)
    image = PIL.Image.new("RGB", (32, 32))
    assert GenerationRequest("a cat", image=image).resolved(pipe).strength == 0.8
    assert GenerationRequest("a cat", image=image, mask=image).resolved(pipe).strength == 1.0
    with pytest.raises(ValueError, match="use 1 to 20 steps: this server allows at most 20"):
        GenerationRequest("a cat", steps=21).resolved(pipe, max_steps=20)


def test_image_i_is_drawn_from_seed_plus_i_in_any_batch_as_the_pipeline_draws_it(pipe):
    requests = [GenerationRequest("a red cat", steps=2, seed=7, n=3), GenerationRequest("a dog", steps=2, seed=1)]
    batched = generate_images(pipe, requests, batch_size=4)
    alone = generate_images(pipe, requests, batch_size=1)
    assert [len(images) for images in batched] == [3, 1]
    for got, expected in zip(sum(batched, []), sum(alone, [])):
        np.testing.assert_allclose(np.asarray(got, float), np.asarray(expected, float), atol=2)
    direct = pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(8)).images[0]
    np.testing.assert_array_equal(np.asarray(alone[0][1]), np.asarray(direct))
    [[resized]] = generate_images(pipe, [GenerationRequest("a cat", steps=2, width=128, height=128)])
    assert resized.size == (128, 128)


def test_a_png_records_one_image_of_the_request():
    request = GenerationRequest("a cat", seed=5, n=4, width=32, height=32, image=PIL.Image.new("RGB", (4, 4)),
                                image_path="/in.png")
    record = json.loads(json.dumps(json_record(request.for_image(7))))  # the JSON chunk, as written
    assert record["seed"] == 7 and record["image"] == "/in.png" and "n" not in record
