"""The HTTP APIs through FastAPI's TestClient on tiny random components: A1111's and OpenAI's shapes, bad input
answered with 4xx bodies that say what to fix, limits, the queue-full answer and the API key."""

import base64
import io
import json
import threading

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from ldm_app.serve import Limits, Settings, check_bind, create_app  # noqa: E402
from ldm_app.serve.engine import Engine  # noqa: E402
from ldm_app.testing import tiny_pipeline  # noqa: E402

SMALL = {"prompt": "a red cat", "steps": 2, "seed": 5, "sampler_name": "DDIM"}


def make_client(**settings) -> TestClient:
    settings.setdefault("ui", False)
    settings.setdefault("limits", Limits(max_steps=30, max_images=4, max_body_bytes=200_000, max_prompt_chars=100,
                                         max_pixels=64 * 64))
    return TestClient(create_app(Engine(tiny_pipeline(), "tiny"), Settings(**settings)))


@pytest.fixture(scope="module")
def client():
    with make_client() as c:
        yield c


def png_b64(size=(32, 32), color=(200, 30, 30), mode="RGB") -> str:
    buffer = io.BytesIO()
    PIL.Image.new(mode, size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(b64: str) -> PIL.Image.Image:
    return PIL.Image.open(io.BytesIO(base64.b64decode(b64)))


def test_txt2img_answers_in_a1111_shape_with_metadata_and_seeds(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "batch_size": 2, "n_iter": 1, "cfg_scale": 4,
                                              "styles": [], "restore_faces": False})  # ignored A1111 fields
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"} and isinstance(body["info"], str)
    info = json.loads(body["info"])
    assert info["all_seeds"] == [5, 6] and info["sampler_name"] == "DDIM" and info["cfg_scale"] == 4
    assert info["infotexts"][1].splitlines()[-1].startswith("Steps: 2, Sampler: DDIM, CFG scale: 4.0, Seed: 6")
    images = [decode(b) for b in body["images"]]
    assert [im.size for im in images] == [(32, 32)] * 2
    stored = json.loads(images[1].info["ldm-app"])
    assert stored["seed"] == 6 and stored["prompt"] == "a red cat" and stored["model"] == "tiny"
    again = client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 6, "cfg_scale": 4}).json()
    assert np.array_equal(np.asarray(decode(again["images"][0])), np.asarray(images[1]))  # seed 6 alone = image 1


def test_unknown_sampler_is_a_422_listing_the_valid_names(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "sampler_name": "Euler a (imaginary)"})
    assert r.status_code == 422
    assert "Unknown sampler" in r.json()["detail"] and "DDIM" in r.json()["detail"] and "Euler" in r.json()["detail"]
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert "DDIM" in names and "Euler" in names
    for name in names:  # every advertised name is accepted
        assert client.post("/sdapi/v1/txt2img", json={**SMALL, "steps": 1, "sampler_name": name}).status_code == 200


def test_info_endpoints(client):
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "tiny"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny"
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0 and progress["state"]["sampling_steps"] == 0
    assert client.get("/healthz").json()["status"] == "ok"
    metrics = client.get("/metrics").text
    assert "ldm_app_queue_length 0" in metrics and "ldm_app_images_total" in metrics


def test_png_info_reads_our_pngs_and_a1111_text(client):
    ours = client.post("/sdapi/v1/txt2img", json={**SMALL, "negative_prompt": "blue"}).json()["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": ours}).json()
    assert info["parameters"]["Prompt"] == "a red cat" and info["parameters"]["Negative prompt"] == "blue"
    assert info["parameters"]["Seed"] == "5" and info["parameters"]["Size-1"] == "32" and "ldm-app" in info["items"]
    a1111 = PIL.PngImagePlugin.PngInfo()
    a1111.add_text("parameters", 'a dog, "quoted"\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ 2M, '
                                 'CFG scale: 7, Seed: 42, Size: 512x768, Model: "sd, v1"')
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=a1111)
    parsed = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()}).json()
    assert parsed["parameters"]["Model"] == "sd, v1" and parsed["parameters"]["Size-2"] == "768"
    assert parsed["parameters"]["Prompt"] == 'a dog, "quoted"' and parsed["parameters"]["Sampler"] == "DPM++ 2M"
    plain = client.post("/sdapi/v1/png-info", json={"image": png_b64()}).json()
    assert plain == {"info": "", "items": {}, "parameters": {}}


@pytest.mark.parametrize("kwargs, status, words", [
    ({"content": b'{"prompt": "a cat", ', "headers": {"content-type": "application/json"}}, 422, "not valid JSON"),
    ({"json": ["a list"]}, 422, "JSON object"),
    ({"json": {"prompt": "x", "steps": "many"}}, 422, "steps"),
    ({"json": {"prompt": ["not", "a", "string"]}}, 422, "prompt"),
    ({"json": {"prompt": "x", "steps": 31}}, 422, "use 1 to 30"),
    ({"json": {"prompt": "x", "width": 128, "height": 128}}, 422, "--max-pixels"),
    ({"json": {"prompt": "x", "width": 30}}, 422, "multiple of 4"),
    ({"json": {"prompt": "x", "batch_size": 3, "n_iter": 2}}, 422, "--max-images"),
    ({"json": {"prompt": "x" * 101}}, 422, "--max-prompt-chars"),
    ({"json": {"prompt": "x", "cfg_scale": -1}}, 422, "cfg_scale"),
    ({"json": {"prompt": "x", "enable_hr": True}}, 422, "hires"),
    ({"json": {"prompt": "x <lora:../../etc/passwd:1>"}}, 422, "Unknown LoRA"),
    ({"json": {"prompt": "x", "loras": {"/tmp/evil.safetensors": 1}}}, 422, "Unknown LoRA"),
    ({"content": b"x" * 300_000, "headers": {"content-type": "application/json"}}, 413, "--max-body-mb"),
])
def test_bad_requests_get_a_4xx_that_says_what_to_fix(client, kwargs, status, words):
    r = client.post("/sdapi/v1/txt2img", **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"] and "Traceback" not in r.text


@pytest.mark.parametrize("init, words", [("%%%", "not valid base64"), (base64.b64encode(b"hello").decode(),
                                                                         "not an image"), ("", "empty")])
def test_bad_images_get_a_422(client, init, words):
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init]})
    assert r.status_code == 422 and words in r.json()["detail"]


def test_img2img_and_inpainting(client):
    mask = png_b64(color=(255, 255, 255))
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [png_b64()], "denoising_strength": 0.5,
                                              "mask": mask})
    assert r.status_code == 200, r.text
    assert decode(r.json()["images"][0]).size == (32, 32)
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.5
    black = png_b64(color=(0, 0, 0))
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [png_b64()], "mask": black})
    assert r.status_code == 422 and "nothing to repaint" in r.json()["detail"]


def test_openai_generations_and_errors_in_openai_shape(client):
    r = client.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, "size": "32x32", "steps": 2,
                                                    "seed": 1, "model": "dall-e-2", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2 and decode(r.json()["data"][1]["b64_json"]).size == (32, 32)
    bad = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "big"})
    assert bad.status_code == 400 and "WIDTHxHEIGHT" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "size"
    url = client.post("/v1/images/generations", json={"prompt": "a cat", "response_format": "url"})
    assert url.status_code == 400 and "b64_json" in url.json()["error"]["message"]


def test_openai_edits_takes_multipart_and_checks_its_fields(client):
    image = base64.b64decode(png_b64())
    r = client.post("/v1/images/edits", files={"image": ("in.png", b"not a png", "image/png")},
                    data={"prompt": "a cat"})
    assert r.status_code == 400 and "not an image" in r.json()["error"]["message"]
    r = client.post("/v1/images/edits", files={"image": ("in.png", image, "image/png")}, data={"prompt": "x", "n": "two"})
    assert r.status_code == 400 and "n='two'" in r.json()["error"]["message"]
    r = client.post("/v1/images/edits", files={"image": ("in.png", image, "image/png"),
                                               "mask": ("m.png", base64.b64decode(png_b64((16, 16))), "image/png")},
                    data={"prompt": "x"})
    assert r.status_code == 400 and "mask is 16x16" in r.json()["error"]["message"]


def test_queue_full_is_a_503_with_retry_after():
    with make_client(max_queue=1) as c:
        queue = c.app.state.queue
        gate, busy = threading.Event(), threading.Event()
        blocker = queue.submit(task=lambda engine: busy.set() or gate.wait(10))
        assert busy.wait(5)  # the worker is busy
        waiting = queue.submit(task=lambda engine: None)  # and the one slot is taken
        r = c.post("/sdapi/v1/txt2img", json=SMALL)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and "busy" in r.json()["detail"]
        r = c.post("/v1/images/generations", json={"prompt": "a cat"})
        assert r.status_code == 503 and "busy" in r.json()["error"]["message"]
        gate.set()
        blocker.future.result(5), waiting.future.result(5)
        assert c.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200


def test_api_key_guards_every_request_but_healthz():
    with make_client(api_key="s3cret-key-123456") as c:
        assert c.get("/healthz").status_code == 200
        r = c.post("/sdapi/v1/txt2img", json=SMALL)
        assert r.status_code == 401 and "Bearer" in r.json()["detail"]
        assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret-key-123456"}).status_code == 200
        assert c.get("/sdapi/v1/samplers", auth=("any", "s3cret-key-123456")).status_code == 200  # A1111's --api-auth
        assert c.get("/", headers={"accept": "text/html"}, follow_redirects=False).headers["location"] == "/login"
        assert c.post("/login", data={"key": "nope"}).status_code == 401
        c.post("/login", data={"key": "s3cret-key-123456"}, follow_redirects=False)  # sets the session cookie
        assert c.get("/sdapi/v1/samplers").status_code == 200


def test_a_public_host_needs_a_key_or_insecure():
    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    with pytest.raises(ValueError, match="--api-key"):
        check_bind("0.0.0.0", None, False)
    check_bind("0.0.0.0", "a-long-key-of-16-chars", False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(ValueError, match="shorter than 16"):
        Settings(api_key="short")


def test_every_a1111_sampler_name_resolves_to_one_of_ours():
    engine = Engine(tiny_pipeline(), "tiny")
    labels = engine.sampler_labels()
    for name, label in labels.items():
        assert engine.resolve_sampler(name) == name
        ours = engine.resolve_sampler(label.upper())
        assert labels[ours] == label and list(labels).index(ours) <= list(labels).index(name)  # the first wins
        if label.endswith(" Karras"):  # A1111 1.9+ sends the schedule type apart
            assert engine.resolve_sampler(label.removesuffix(" Karras"), "Karras") == ours
    assert engine.resolve_sampler("DDIM") == "ddim"


def test_openai_edits_repaints_only_the_transparent_pixels(client):
    """No mask: the image's own transparent pixels are the area to repaint (OpenAI's rule); the rest is kept."""
    image = PIL.Image.new("RGBA", (32, 32), (200, 40, 40, 255))
    image.paste((0, 0, 0, 0), (8, 8, 24, 24))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    r = client.post("/v1/images/edits", files={"image": ("in.png", buffer.getvalue(), "image/png")},
                    data={"prompt": "a blue dog", "size": "32x32", "steps": "2", "seed": "1"})
    assert r.status_code == 200, r.text
    out = np.asarray(decode(r.json()["data"][0]["b64_json"]).convert("RGB")).astype(int)
    outside = np.ones((32, 32), dtype=bool)
    outside[8:24, 8:24] = False
    assert (out[outside] == [200, 40, 40]).all()  # pasted back exactly
    assert np.abs(out[~outside] - [200, 40, 40]).mean() > 5  # repainted
