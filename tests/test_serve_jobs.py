"""Jobs (issue 25) against a real server on 127.0.0.1 (a child process, stopped by its PID), with httpx: submit a
fine-tune and watch its server-sent events, kill -9 the server mid-training, restart it and get the same LoRA,
bit for bit, as an uninterrupted run; queued generations re-run or fail with a reason; cancel; bad input is a 4xx;
jobs belong to their key. The tiny random model, a handful of steps."""

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from safetensors.torch import load as load_safetensors  # noqa: E402

from ldm_app.lora import LORA_FILE  # noqa: E402
from ldm_app.serve import Limits, Settings, create_app  # noqa: E402
from ldm_app.serve.engine import Engine  # noqa: E402
from ldm_app.serve.jobs.store import JobStore  # noqa: E402
from ldm_app.serve.process import start_server, stop_server  # noqa: E402
from ldm_app.testing import tiny_pipeline, write_toy_dataset  # noqa: E402

JOBS = "/ldm/v1/jobs"
TUNE = {"prompt": "a sks shape", "steps": "40", "batch_size": "2", "rank": "2", "seed": "3",
        "checkpoint_every": "10", "sample_every": "0"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("jobs")
    tiny_pipeline().save_pretrained(folder / "base")
    write_toy_dataset(folder / "photos", n=4, layout="sidecar")
    return folder


def photos(inputs: Path) -> list:
    return [("photos", (p.name, p.read_bytes(), "image/png")) for p in sorted((inputs / "photos").glob("*.png"))]


def serve(inputs: Path, data: Path, log: Path, *extra: str):
    return start_server(["--model", str(inputs / "base"), "--device", "cpu", "--no-ui", "--data-dir", str(data),
                         "--max-steps", "150", *extra], log_path=str(log))


def events(client: httpx.Client, job_id: str, until=lambda view: False):
    """The job's server-sent events as (event, view), up to its end or the first view `until` accepts."""
    with client.stream("GET", f"{JOBS}/{job_id}/events", timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                view = json.loads(line[6:])
                yield kind, view
                if kind == "end" or until(view):
                    return


def lora_tensors(client: httpx.Client, job_id: str) -> dict[str, torch.Tensor]:
    r = client.get(f"{JOBS}/{job_id}/files/{LORA_FILE}")
    assert r.status_code == 200
    return load_safetensors(r.content)


def post_quietly(url: str, body: dict, headers: dict) -> None:
    """A client whose server is about to be killed."""
    try:
        httpx.post(url, json=body, headers=headers, timeout=60)
    except httpx.HTTPError:
        pass


def test_kill_9_mid_training_resumes_to_the_same_lora_and_no_queued_generation_is_lost(inputs, tmp_path):
    data = tmp_path / "data"
    proc, url = serve(inputs, data, tmp_path / "server-1.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            r = client.post(f"{JOBS}/finetune-lora", files=photos(inputs), data={**TUNE, "name": "resumed"})
            assert r.status_code == 202, r.text
            tune = r.json()["id"]
            seen = list(events(client, tune, until=lambda v: v["progress"]["step"] >= 15))
            assert [kind for kind, _ in seen][-1] == "progress" and seen[-1][1]["state"] == "running"
            assert seen[-1][1]["progress"]["total"] == 40 and seen[-1][1]["progress"]["loss"] > 0
            # work the crash must not lose: a generation job, and an A1111 request whose client waits
            generation = client.post(f"{JOBS}/generate", json={"prompt": "a red cat", "steps": 150, "n": 4,
                                                                "seed": 7}).json()["id"]
            waiting = threading.Thread(target=post_quietly, args=(f"{url}/sdapi/v1/txt2img", {
                "prompt": "a blue dog", "steps": 150, "batch_size": 16}, {"X-Job-Id": "a1111-request-1"}), daemon=True)
            waiting.start()
            deadline = time.monotonic() + 30
            while client.get(f"{JOBS}/a1111-request-1").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no shutdown handlers: as a crash or the OOM killer would
        proc.wait()
        stop_server(proc)
    killed_at = JobStore(data / "jobs.sqlite").get(tune)
    assert killed_at.state == "running" and 15 <= killed_at.step < 40, "the run ended before the kill"

    proc, url = serve(inputs, data, tmp_path / "server-2.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            seen = list(events(client, tune))
            assert seen[-1][0] == "end" and seen[-1][1]["state"] == "done", seen[-1]
            steps = [view["progress"]["step"] for _, view in seen]  # from the last checkpoint before the kill
            assert steps == sorted(steps) and steps[0] <= killed_at.step // 10 * 10 and steps[-1] == 40
            assert client.get(f"{JOBS}/a1111-request-1").json()["error"].startswith("The server stopped before")
            assert client.get(f"{JOBS}/a1111-request-1").json()["state"] == "failed"
            rerun = list(events(client, generation))[-1][1]
            assert rerun["state"] == "done" and len(rerun["result"]["images"]) == 4

            # the same fine-tune, never interrupted, on the same server
            r = client.post(f"{JOBS}/finetune-lora", files=photos(inputs), data={**TUNE, "name": "straight"})
            straight = r.json()["id"]
            assert list(events(client, straight))[-1][1]["state"] == "done"
            resumed, reference = lora_tensors(client, tune), lora_tensors(client, straight)
            assert resumed.keys() == reference.keys()
            assert all(torch.equal(resumed[k], reference[k]) for k in reference)

            # both LoRAs are offered by name, and change the picture when switched on
            names = [lora["name"] for lora in client.get("/sdapi/v1/loras").json()]
            assert {"resumed", "straight"} <= set(names)
            result = client.get(f"{JOBS}/{tune}").json()["result"]
            assert result["lora"] == "resumed" and {"README.md", "before_after.png", LORA_FILE} <= set(result["files"])
            assert (data / "loras" / "resumed" / LORA_FILE).is_file()
            body = {"prompt": "a red cat", "steps": 4, "seed": 1}
            plain = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
            tuned = client.post("/sdapi/v1/txt2img", json={**body, "loras": {"resumed": 1.0}}).json()["images"][0]
            assert plain != tuned
        log = (tmp_path / "server-2.log").read_text()
        assert "resum" in log.lower()
    finally:
        stop_server(proc)


def test_cancel_stops_a_running_fine_tune_at_a_step_boundary(inputs, tmp_path):
    proc, url = serve(inputs, tmp_path / "data", tmp_path / "server.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            tune = client.post(f"{JOBS}/finetune-lora", files=photos(inputs),
                               data={**TUNE, "steps": "5000", "name": "never"}).json()["id"]
            list(events(client, tune, until=lambda v: v["progress"]["step"] >= 2))
            r = client.delete(f"{JOBS}/{tune}")
            assert r.status_code == 202 and r.json()["state"] == "running"
            end = list(events(client, tune))[-1][1]
            assert end["state"] == "cancelled" and end["error"].startswith("Cancelled by its owner at step")
            assert end["progress"]["step"] < 5000
            assert client.delete(f"{JOBS}/{tune}").status_code == 409  # nothing left to cancel
            assert "never" not in [lora["name"] for lora in client.get("/sdapi/v1/loras").json()]

            # the training thread is free again: a queued generation job runs, and equals txt2img's image
            job = client.post(f"{JOBS}/generate", json={"prompt": "a red cat", "steps": 3, "seed": 11}).json()["id"]
            view = list(events(client, job))[-1][1]
            assert view["state"] == "done" and view["result"]["seeds"] == [11]
            png = client.get(view["result"]["images"][0]).content
            same = client.post("/sdapi/v1/txt2img", json={"prompt": "a red cat", "steps": 3, "seed": 11})
            assert same.headers["x-job-id"]  # A1111 requests are jobs too
            import base64
            a = np.asarray(PIL.Image.open(io.BytesIO(png)))
            b = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(same.json()["images"][0]))))
            assert np.array_equal(a, b)
    finally:
        stop_server(proc)


# ----------------------------------------------------------------------------------------------------------
# In-process (TestClient): validation, ownership, the store


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    limits = Limits(max_steps=30, max_images=4, max_body_bytes=2_000_000, max_prompt_chars=100, max_pixels=64 * 64)
    app = create_app(Engine(tiny_pipeline(), "tiny"), Settings(ui=False, limits=limits, api_key="jobs-test-key-1234",
                                                                data_dir=str(tmp_path_factory.mktemp("data"))))
    with TestClient(app, headers={"Authorization": "Bearer jobs-test-key-1234"}) as c:
        yield c


def png(size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("data, files, status, message", [
    ({"name": "x", "prompt": "p"}, [], 422, "no photos were sent"),
    ({"prompt": "p"}, [("photos", ("a.png", png()))], 422, "name is missing"),
    ({"name": "../etc", "prompt": "p"}, [("photos", ("a.png", png()))], 422, "name='../etc'"),
    ({"name": "x", "prompt": "p", "steps": "0"}, [("photos", ("a.png", png()))], 422, "steps=0: use a whole number"),
    ({"name": "x", "prompt": "p", "steps": "ten"}, [("photos", ("a.png", png()))], 422, "is not a whole number"),
    ({"name": "x", "prompt": "p", "lr": "nan"}, [("photos", ("a.png", png()))], 422, "lr=nan"),
    ({"name": "x", "prompt": "p", "format": "ckpt"}, [("photos", ("a.png", png()))], 422, "format='ckpt'"),
    ({"name": "x", "prompt": "p", "colour": "red"}, [("photos", ("a.png", png()))], 422, "unknown field 'colour'"),
    ({"name": "x"}, [("photos", ("a.png", png()))], 422, "a.png has no caption"),
    ({"name": "x", "prompt": "p"}, [("photos", ("cat.png", b"not an image"))], 422, "photos (cat.png) is not an image"),
    ({"name": "x", "prompt": "p"}, [("photos", ("big.png", png((200, 200))))], 413, "photos (big.png) is too large (200x200)"),
    ({"name": "x", "prompt": "p"}, [("photos", ("a.zip", b"PK not a zip"))], 422, "a.zip is not a zip file"),
    ({"name": "x", "prompt": "p", "prior_preservation": "true"}, [("photos", ("a.png", png()))], 422,
     "prior_preservation needs class_prompt"),
    ({"name": "x", "prompt": "p", "captions": "[1]"}, [("photos", ("a.png", png()))], 422, "captions must be"),
    ({"name": "x", "prompt": "p" * 101}, [("photos", ("a.png", png()))], 422, "prompt has 101 characters"),
])
def test_bad_fine_tune_requests_are_a_4xx_that_says_what_to_fix(client, data, files, status, message):
    r = client.post(f"{JOBS}/finetune-lora", data=data, files=files or None)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert client.get(JOBS).json()["jobs"] == [] or all(j["kind"] != "finetune-lora" for j in
                                                         client.get(JOBS).json()["jobs"])


def test_bad_generation_jobs_and_unknown_ids_are_4xx(client):
    assert client.post(f"{JOBS}/generate", json={"prompt": "a cat", "steps": 31}).status_code == 422
    assert client.post(f"{JOBS}/generate", json={"prompt": "a cat", "colour": 1}).status_code == 422
    assert client.post(f"{JOBS}/generate", json={"prompt": "a cat", "loras": {"nope": 1}}).status_code == 422
    assert client.get(f"{JOBS}/0123456789abcdef").status_code == 404
    assert client.delete(f"{JOBS}/0123456789abcdef").status_code == 404
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2}, headers={"X-Job-Id": "no/slashes"})
    assert r.status_code == 422 and "X-Job-Id" in r.json()["detail"]
    assert client.get(JOBS, headers={"Authorization": "Bearer wrong-key-000000"}).status_code == 401


def test_a_job_is_visible_and_cancellable_only_with_the_key_that_made_it(client):
    job = client.post(f"{JOBS}/generate", json={"prompt": "a cat", "steps": 2}).json()["id"]
    store = client.app.state.jobs.store
    theirs = store.add("generate", {"prompt": "x"}, owner="another key's hash").id
    listed = [j["id"] for j in client.get(JOBS).json()["jobs"]]
    assert job in listed and theirs not in listed
    assert client.get(f"{JOBS}/{theirs}").status_code == 404  # not even its existence is shown
    assert client.delete(f"{JOBS}/{theirs}").status_code == 404
    assert client.get(f"{JOBS}/{theirs}/events").status_code == 404
    assert store.get(theirs).state == "queued"


def test_zip_uploads_with_captions_are_staged_for_finetune_lora(tmp_path):
    import zipfile

    from ldm_app.finetune import find_photos
    from ldm_app.serve.jobs.photos import stage_uploads

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("cats/one.png", png())
        z.writestr("cats/one.txt", "a sks cat on a sofa")
        z.writestr("__MACOSX/._one.png", b"junk")
        z.writestr("cats/two.png", png())
    files = [("photos.zip", archive.getvalue()), ("three.png", png()), ("dir/three.png", png())]
    count = stage_uploads(files, {"three.png": "a sks cat outside"}, "a sks cat", tmp_path / "photos", Limits())
    assert count == 4
    captions = {path.name: caption for path, caption in find_photos(tmp_path / "photos", "a sks cat", print)}
    assert captions == {"one.png": "a sks cat on a sofa", "two.png": "a sks cat", "three.png": "a sks cat outside",
                        "three-1.png": "a sks cat outside"}


def test_the_store_keeps_jobs_across_reopening(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.add("finetune-lora", {"name": "x"}, owner="o", total=10)
    store.update(job.id, state="running")
    store.record_loss(job.id, 3, 0.5)
    store.record_loss(job.id, 3, 0.25)  # a resumed run repeats the step: the new loss replaces the old
    store.close()
    again = JobStore(tmp_path / "jobs.sqlite")
    assert again.get(job.id).state == "running" and again.get(job.id).step == 3
    assert again.losses(job.id) == [(3, 0.25)] and [r.id for r in again.unfinished()] == [job.id]
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_stored_generation_request_rebuilds_the_same_request():
    from ldm_app.serve.jobs.service import request_params
    from ldm_app.serve.validation import image_request

    engine = Engine(tiny_pipeline(), "tiny")
    request = image_request(engine, Limits(), prompt="a red cat", negative_prompt="blue", steps=7, n=2, seed=None,
                            guidance=3.0, sampler="euler")
    stored = json.loads(json.dumps(request_params(request, engine)))  # as the database keeps it
    assert image_request(engine, Limits(), **stored) == request  # the random seed included
