"""A real server on 127.0.0.1 (a child process, stopped by its PID) driven by the clients users run: `webuiapi`
(A1111) and the official `openai` client; and a client that disconnects while waiting."""

import base64
import io
import json
import socket
import time

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("fastapi")

from ldm_app.consistency import LCM_STUDENT  # noqa: E402
from ldm_app.serve.process import start_server, stop_server  # noqa: E402
from ldm_app.testing import tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    tiny_pipeline().save_pretrained(folder / "model")
    tiny_pipeline(seed=1).unet.save_pretrained(folder / "model" / LCM_STUDENT)  # a distilled UNet for "LCM"
    proc, url = start_server(["--model", str(folder / "model"), "--device", "cpu", "--no-ui",
                              "--api-key", "test-key-1234567"], log_path=str(folder / "server.log"))
    try:
        yield url
    finally:
        stop_server(proc)
        assert proc.poll() is not None


def test_webuiapi_txt2img_and_png_info(server):
    webuiapi = pytest.importorskip("webuiapi")
    port = int(server.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="DDIM", steps=2)
    api.session.headers["Authorization"] = "Bearer test-key-1234567"
    result = api.txt2img(prompt="a red cat", seed=11, batch_size=2, cfg_scale=5, eta=0.0, width=32, height=32)
    assert len(result.images) == 2 and result.images[0].size == (32, 32)
    assert result.info["all_seeds"] == [11, 12] and result.info["sampler_name"] == "DDIM"
    assert json.loads(result.images[1].info["ldm-app"])["seed"] == 12
    assert any(s["name"] == "DDIM" for s in api.get_samplers())
    assert api.get_sd_models()[0]["model_name"].endswith("model")
    info = api.png_info(result.images[0])
    assert info.info.startswith("a red cat") and info.parameters["Seed"] == "11"
    with pytest.raises(RuntimeError, match="422"):
        api.txt2img(prompt="x", sampler_name="No Such Sampler", width=32, height=32)


def test_webuiapi_lcm_draws_with_the_models_distilled_unet(server):
    webuiapi = pytest.importorskip("webuiapi")
    from diffusers import LCMScheduler

    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(server.rsplit(":", 1)[1]))
    api.session.headers["Authorization"] = "Bearer test-key-1234567"
    result = api.txt2img(prompt="a red cat", seed=3, sampler_name="LCM", steps=4, cfg_scale=1, width=32, height=32)
    assert result.info["sampler_name"] == "LCM"
    expected = tiny_pipeline()
    expected.unet, expected.scheduler = tiny_pipeline(seed=1).unet, LCMScheduler.from_config(expected.scheduler.config)
    image = expected("a red cat", num_inference_steps=4, guidance_scale=1.0,
                     generator=torch.Generator().manual_seed(3)).images[0]
    assert np.abs(np.asarray(result.image, dtype=int) - np.asarray(image, dtype=int)).max() <= 1
    ddim = api.txt2img(prompt="a red cat", seed=3, sampler_name="DDIM", steps=4, cfg_scale=1, width=32, height=32)
    assert np.abs(np.asarray(ddim.image, dtype=int) - np.asarray(image, dtype=int)).max() > 1  # its own UNet again


def test_openai_client_generations_and_edits(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="test-key-1234567", max_retries=0)
    response = client.images.generate(prompt="a red cat", n=2, size="32x32", response_format="b64_json",
                                      extra_body={"steps": 2, "seed": 3})
    images = [PIL.Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in response.data]
    assert [im.size for im in images] == [(32, 32)] * 2
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # seeds 3 and 4
    with pytest.raises(openai.BadRequestError) as err:  # 4xx: the client raises with the server's message
        client.images.generate(prompt="x", size="31x31")
    assert "multiple of 4" in str(err.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")

    buffer = io.BytesIO()
    PIL.Image.new("RGBA", (32, 32), (200, 40, 40, 255)).save(buffer, format="PNG")
    mask = PIL.Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 24, 24))  # transparent = repaint (OpenAI's convention)
    mask_buffer = io.BytesIO()
    mask.save(mask_buffer, format="PNG")
    edited = client.images.edit(image=("in.png", buffer.getvalue(), "image/png"), prompt="a blue dog",
                                mask=("mask.png", mask_buffer.getvalue(), "image/png"), size="32x32",
                                response_format="b64_json", extra_body={"steps": 2, "seed": 1})
    assert PIL.Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).size == (32, 32)


def _metrics(url: str) -> dict[str, float]:
    import urllib.request

    req = urllib.request.Request(url + "/metrics", headers={"Authorization": "Bearer test-key-1234567"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return {k: float(v) for k, v in (line.split() for line in r.read().decode().splitlines())}


def _post_raw(url: str, body: dict) -> socket.socket:
    host, port = url.rsplit("/", 1)[1].split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer test-key-1234567\r\nContent-Length: " + str(len(payload)).encode() +
                 b"\r\n\r\n" + payload)
    return sock


def test_a_client_that_disconnects_frees_its_slot(server):
    """While a long request runs, a second one waits; when its client hangs up it leaves the queue."""
    long = {"prompt": "a cat", "steps": 150, "batch_size": 16, "width": 32, "height": 32, "seed": 1}
    first = _post_raw(server, long)
    deadline = time.monotonic() + 30
    while _metrics(server)["ldm_app_running_jobs"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = _metrics(server)
    second = _post_raw(server, {**long, "steps": 149})  # other steps: cannot join the running batch
    while _metrics(server)["ldm_app_queue_length"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metrics(server)["ldm_app_queue_length"] == 1
    second.close()
    while _metrics(server)["ldm_app_queue_length"] > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    after = _metrics(server)
    assert after["ldm_app_queue_length"] == 0
    assert after["ldm_app_cancelled_total"] == before["ldm_app_cancelled_total"] + 1
    first.close()  # the running batch's only client goes too: it stops at its next step
    while _metrics(server)["ldm_app_running_jobs"] > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metrics(server)["ldm_app_running_jobs"] == 0 and time.monotonic() < deadline
