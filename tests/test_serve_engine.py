"""The server's engine: loading a model folder and a --lora-dir, LoRAs chosen by name (never by path),
per-step progress while a batch runs, and the inpainting mask drawn in the UI."""

import base64
import io
import json
import threading
import time

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from ldm_app.lora import lora_state_dict  # noqa: E402
from ldm_app.lora_saving import save_atomic  # noqa: E402
from ldm_app.serve import Settings, create_app  # noqa: E402
from ldm_app.serve.engine import Engine, lora_name  # noqa: E402
from ldm_app.testing import add_random_lora, tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def lora_client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    tiny_pipeline().save_pretrained(folder / "model")
    styled = add_random_lora(tiny_pipeline())
    (folder / "loras").mkdir()
    save_atomic(lora_state_dict(styled.unet), folder / "loras" / "style.safetensors")
    engine = Engine.load(str(folder / "model"), [], str(folder / "loras"), "cpu", "fp32")
    with TestClient(create_app(engine, Settings(ui=False))) as client:
        yield client, folder


def image_of(client, **body):
    r = client.post("/sdapi/v1/txt2img", json={"steps": 2, "seed": 3, **body})
    assert r.status_code == 200, r.text
    return PIL.Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))


def test_loras_from_the_lora_dir_are_chosen_by_name(lora_client):
    client, folder = lora_client
    assert [lora["name"] for lora in client.get("/sdapi/v1/loras").json()] == ["style"]
    base = np.asarray(image_of(client, prompt="a cat"), dtype=float)
    off = np.asarray(image_of(client, prompt="a cat <lora:style:0>"), dtype=float)
    on = image_of(client, prompt="a cat <lora:style:1>")
    np.testing.assert_allclose(off, base, atol=1)  # a --lora-dir LoRA is off unless asked for
    assert np.abs(np.asarray(on, dtype=float) - base).mean() > 1
    stored = json.loads(on.info["ldm-app"])
    assert stored["prompt"] == "a cat" and stored["loras"] == [f"{folder / 'loras' / 'style.safetensors'}:1"]
    same = image_of(client, prompt="a cat", loras={"style": 1.0})  # ldm-app's field, same effect
    np.testing.assert_allclose(np.asarray(same, dtype=float), np.asarray(on, dtype=float), atol=1)


def test_progress_moves_per_step_while_a_batch_runs(lora_client):
    client, _ = lora_client
    seen, done = [], threading.Event()

    def run():
        client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 60, "batch_size": 4, "seed": 1})
        done.set()

    threading.Thread(target=run).start()
    while not done.is_set():
        state = client.get("/sdapi/v1/progress").json()
        if 0 < state["progress"] < 1:
            seen.append(state["state"]["sampling_step"])
        time.sleep(0.02)
    assert len(set(seen)) >= 2 and seen == sorted(seen)  # several distinct steps, in order
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0  # idle again


def test_lora_names_are_the_png_tag_names_made_unique():
    from ldm_app.png_metadata import lora_name as tag_name

    taken = {"style": None}
    assert lora_name("/x/style.safetensors", taken) == "style_1"
    for path in ("/x/my lora/", "/x/a.b/", "/x/style v2.safetensors"):  # what the server's PNGs write in <lora:…>
        assert lora_name(path, {}) == tag_name(path.rstrip("/"))
    assert lora_name("/x/a:b.safetensors", {}) == "a_b"  # a colon would end the tag's name


def test_the_painted_layer_becomes_the_white_mask():
    gradio_ui = pytest.importorskip("ldm_app.serve.ui")
    background = PIL.Image.new("RGB", (16, 16), (10, 20, 30))
    layer = PIL.Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (4, 4, 8, 8))
    image, mask = gradio_ui.editor_image_and_mask({"background": background, "layers": [layer], "composite": None})
    assert image.size == (16, 16) and np.asarray(mask).sum() == 16 * 255
    with pytest.raises(Exception, match="Nothing is painted"):
        gradio_ui.editor_image_and_mask({"background": background, "layers": [PIL.Image.new("RGBA", (16, 16))]})


def test_invert_and_edit_runs_as_a_queue_task():
    """The UI's invert & edit tab: a one-off task on the worker thread, never batched."""
    from ldm_app.serve.queue import JobQueue

    queue = JobQueue(Engine(tiny_pipeline(), "tiny"))
    queue.start()
    try:
        image = PIL.Image.new("RGB", (40, 40), (200, 30, 30))
        job = queue.submit(task=lambda e: e.invert_and_edit(image, "a red cat", "a blue dog", "ddim", 3, 1.0, 0.8))
        reconstruction, edited = job.future.result(60)
    finally:
        queue.stop()
    assert reconstruction.size == edited.size == (32, 32)
    assert np.abs(np.asarray(reconstruction, dtype=float) - np.asarray(edited, dtype=float)).mean() > 0.5
