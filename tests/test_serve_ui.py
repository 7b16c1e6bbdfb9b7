"""The UI's handlers called as gradio's endpoints would be by a script (no browser): the same limits as the APIs,
and one readable sentence for what a slider could never send."""

import types

import pytest

gr = pytest.importorskip("gradio")

from ldm_app.serve.engine import Engine  # noqa: E402
from ldm_app.serve.queue import JobQueue  # noqa: E402
from ldm_app.serve.settings import Limits  # noqa: E402
from ldm_app.serve.ui import Handlers, build_ui  # noqa: E402
from ldm_app.testing import tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    engine = Engine(tiny_pipeline())
    queue = JobQueue(engine)  # not started: every call below must be refused before it would queue
    build_ui(engine, queue, Limits(), tmp_path_factory.mktemp("ui"))  # the page builds over this engine
    return Handlers(engine, queue, Limits(), tmp_path_factory.mktemp("out"), form=None)


@pytest.fixture
def blue_png(tmp_path):
    import PIL.Image

    PIL.Image.new("RGB", (32, 32), (40, 60, 220)).save(tmp_path / "blue.png")
    return {"path": str(tmp_path / "blue.png")}


SESSION = types.SimpleNamespace(session_hash="s1")
EDIT = dict(source="a blue square", target="a red square", method="negative-prompt", steps=3, guidance=5.0,
            cross=0.8, history=[])


@pytest.mark.parametrize("change, message", [
    ({"source": "x" * 1_000_000}, "at most 4000"),  # the APIs' --max-prompt-chars
    ({"guidance": float("nan")}, "Guidance must be a finite number"),
    ({"guidance": 1e9}, "guidance=1000000000.0; use a number from 0 to 100"),
    ({"steps": 10_000}, "steps=10000; use 2 to"),
    ({"steps": "many"}, "Steps must be a whole number"),
    ({"cross": 3.0}, "use a number from 0 to 1"),
    ({"method": "magic"}, "inversion='magic'"),
    ({"target": " "}, "Describe the image"),
])
def test_invert_and_edit_meets_the_api_limits(handlers, blue_png, change, message):
    with pytest.raises(gr.Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        handlers.invert_edit(blue_png, **{**EDIT, **change}, request=SESSION)
    assert handlers.queue.snapshot()["queue_length"] == 0  # refused before queueing


def test_an_upload_that_is_not_an_image_is_one_sentence(handlers, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(gr.Error, match="The uploaded file is not an image PIL can read; send a PNG, JPEG or WebP"):
        handlers.invert_edit({"path": str(tmp_path / "notes.png")}, **EDIT, request=SESSION)


def test_damaged_png_info_is_a_sentence_and_sends_nothing(handlers, tmp_path):
    import PIL.Image
    import PIL.PngImagePlugin

    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("ldm-app", "[1, 2]")  # JSON, but not ldm-app's object
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "odd.png", pnginfo=info)
    text, parsed = handlers.png_info(str(tmp_path / "odd.png"))
    assert "damaged" in text and parsed["ldm-app"] == {}
    with pytest.raises(gr.Error, match="No parameters to send"):
        handlers.send_to_txt2img(parsed)
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(gr.Error, match="drop a PNG made by ldm-app or A1111"):
        handlers.png_info(str(tmp_path / "text.png"))


def test_stop_without_a_job_says_so(handlers):
    assert handlers.stop(SESSION) == "Nothing is running."
