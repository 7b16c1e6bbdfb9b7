"""Hub-ready exports: model cards, folders that load in plain diffusers without ldm_app, push_to_hub offline."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard

from ldm_app.hub import bundle_source, make_portable, push_to_hub, share_export, write_model_card
from ldm_app.pipeline_loaders import native_index
from ldm_app.pipeline import LdmPipeline
from ldm_app.testing import tiny_pipeline
from ldm_app.unet import LdmUNet


def _image(pipe) -> np.ndarray:
    return pipe("a red cat", num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


@pytest.fixture
def portable(tmp_path):
    """A tiny LdmUNet pipeline saved, made portable and carded, and the image ldm_app's pipeline gives."""
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    PIL.Image.new("RGB", (16, 16), "red").save(tmp_path / "grid.png")
    share_export(tmp_path / "pipe", "pipeline", base_model=None, prompts=["a red cat"],
                 sample_image_path=tmp_path / "grid.png",
                 config_dict={"train": {"steps": 10, "output_dir": tmp_path}, "unet": {"channels": (32, 64)}})
    return tmp_path / "pipe", _image(pipe)


def test_a_pipeline_card_has_the_header_diffusers_training_scripts_write(portable):
    folder, _ = portable
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0" and card.data.inference
    assert {"text-to-image", "diffusers", "diffusers-training", "ldm-app"} <= set(card.data.tags)
    assert card.data.widget == [{"text": "a red cat", "output": {"url": "samples.png"}}]
    assert (folder / "samples.png").is_file() and "![samples](samples.png)" in card.text
    assert "trust_remote_code=True" in card.text  # the folder is portable, so the card says how to load it
    assert "steps: 10" in card.text and "- 32\n" in card.text  # the config, tuples and paths included
    assert card.data.base_model is None  # trained from scratch


def test_a_lora_card_names_its_hub_base_model_and_instance_prompt(tmp_path):
    write_model_card(tmp_path, "lora", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                     prompts=["a sks dog", "a sks dog in snow"], license="creativeml-openrail-m")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and "lora" in card.data.tags
    assert card.data.instance_prompt == "a sks dog" and card.data.license == "creativeml-openrail-m"
    assert [w["text"] for w in card.data.widget] == ["a sks dog", "a sks dog in snow"]
    write_model_card(tmp_path, "lora", base_model=str(tmp_path), prompts=[])  # a local base: no hub id to name
    assert ModelCard.load(tmp_path / "README.md").data.base_model is None
    with pytest.raises(ValueError, match="Sample image .* does not exist"):
        write_model_card(tmp_path, "lora", None, [], sample_image_path=tmp_path / "missing.png")


PLAIN_DIFFUSERS = """
import sys
sys.modules["ldm_app"] = None  # an editable install would otherwise make it importable even under -I
try:
    import ldm_app
    raise SystemExit("ldm_app is importable")
except ImportError:
    pass
import numpy as np, torch
from diffusers import DiffusionPipeline
for source, name in (("folder", sys.argv[1]), ("hub", sys.argv[2])):
    pipe = DiffusionPipeline.from_pretrained(name, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red cat", num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    np.save(f"{sys.argv[3]}/{source}.npy", image)
    print(type(pipe).__module__, type(pipe.unet).__module__)
"""


def test_a_bundle_is_its_modules_without_their_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("from __future__ import annotations\n\nfrom .b import double as twice\n\n\n"
                                  "def run(x: int) -> int:\n    return twice(x) + 1\n\n\n"
                                  "def lazy():\n    from .c import g\n    return g()\n")
    (package / "b.py").write_text('"""b"""\nimport math\n\n\ndef double(x):\n    return int(math.pow(x, 1)) * 2\n')
    (package / "c.py").write_text("def g():\n    return 'c'\n")
    source = bundle_source(package / "a.py", package="pkg")
    assert "from ." not in source and "from pkg.c import g" in source  # a lazy import stays lazy, on the package
    assert source.index("# pkg/b.py") < source.index("# pkg/a.py") and "# pkg/c.py" not in source
    namespace: dict = {}
    exec(compile(source, "bundle.py", "exec"), namespace)
    assert namespace["run"](2) == 5
    (package / "a.py").write_text("from .b import double\n\n\ndef double(x):\n    return x\n")
    with pytest.raises(ValueError, match="double is defined in both b.py and a.py"):
        bundle_source(package / "a.py", package="pkg")


class PortableAwarePipeline(LdmPipeline):
    """LdmPipeline plus the `load_config` override proposed for ldm_app/pipeline.py (see native_index)."""

    @classmethod
    def load_config(cls, *args, **kwargs):
        config = super().load_config(*args, **kwargs)
        return (native_index(config[0]), *config[1:]) if isinstance(config, tuple) else native_index(config)


def test_ldm_app_loads_a_portable_folder_with_its_own_classes(portable):
    folder, expected = portable
    make_portable(folder)  # again, as a re-export would: nothing changes
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["unet", "LdmUNet"] and index["_class_name"] == ["pipeline", "LdmPipeline"]
    pipe = PortableAwarePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet) is LdmUNet
    np.testing.assert_allclose(_image(pipe), expected, atol=1e-5)
    with pytest.raises(ValueError, match="not a saved LdmPipeline folder"):
        make_portable(folder / "unet")


class FakeHub(BaseHTTPRequestHandler):
    """The Hub API routes an upload of small files uses: create repo, validate the card, preupload (says
    "regular": the files travel inline in the commit), commit (NDJSON); and those a download uses: repo info,
    file tree, files. Keeps the repos in `server.repos`."""

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        endpoint = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if self.headers.get("Authorization") != "Bearer hf_fake_token":
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        if self.path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request.get('organization') or 'me'}/{request['name']}"
            self.server.repos[repo_id] = {"visibility": request.get("visibility"), "files": {}}
            return self._reply(200, {"url": f"{endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
        if self.path == "/api/validate-yaml":  # the Hub checks a README's metadata before the commit
            card = json.loads(body)["content"]
            errors = [] if "library_name: diffusers" in card else [{"message": "no library_name"}]
            return self._reply(400 if errors else 200, {"errors": errors, "warnings": []})
        parts = self.path.split("/")  # /api/models/<owner>/<name>/<preupload|commit>/<revision>
        repo_id, action = f"{parts[3]}/{parts[4]}", parts[5]
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if action == "commit":
            for line in body.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    file = entry["value"]
                    self.server.repos[repo_id]["files"][file["path"]] = base64.b64decode(file["content"])
            return self._reply(200, {"commitUrl": f"{endpoint}/{repo_id}/commit/abc123", "commitOid": "abc123"})
        self._reply(404, {"error": f"unexpected route {self.path}"})

    def do_GET(self, head: bool = False):  # noqa: N802 (the reads a download makes: repo info, tree, files)
        path = self.path.split("?")[0]
        parts = path.split("/")
        repo_id = f"{parts[3]}/{parts[4]}" if path.startswith("/api/models/") else "/".join(parts[1:3])
        if repo_id not in self.server.repos:
            return self._reply(404, {"error": f"Repository {repo_id} not found"})
        if path.startswith("/api/models/"):  # /api/models/<owner>/<name>/<revision|tree>/<revision>[/...]
            files = self.server.repos[repo_id]["files"]
            if len(parts) == 5 or parts[5] == "revision":
                return self._reply(200, {"id": f"{parts[3]}/{parts[4]}", "sha": FAKE_SHA, "private": False,
                                         "siblings": [{"rfilename": name} for name in files]})
            return self._reply(200, [{"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
                                     for name, data in files.items()])
        files = self.server.repos[repo_id]["files"]  # /<owner>/<name>/resolve/<revision>/<file>
        name = "/".join(parts[5:])
        if name not in files:
            return self._reply(404, {"error": "Entry not found"})
        data = files[name]
        self.send_response(200)
        for key, value in {"Content-Length": str(len(data)), "ETag": f'"{_git_oid(data)}"', "X-Repo-Commit": FAKE_SHA,
                           "Content-Type": "application/octet-stream"}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802
        self.do_GET(head=True)

    def log_message(self, *args):  # keep pytest's output clean
        pass


FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.repos = {}
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest sets it; this hub is local
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)  # what HF_ENDPOINT sets
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, endpoint
    server.shutdown()
    server.server_close()


def test_push_to_hub_creates_the_repo_and_uploads_every_file(portable, fake_hub):
    folder, _ = portable
    server, endpoint = fake_hub
    url = push_to_hub(folder, "me/tiny-ldm", token="hf_fake_token", private=True)
    assert url == f"{endpoint}/me/tiny-ldm/commit/abc123"
    repo = server.repos["me/tiny-ldm"]
    assert repo["visibility"] == "private"
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert repo["files"] == local and "unet/unet.py" in local and "README.md" in local


def test_a_portable_pipeline_loads_in_plain_diffusers_without_ldm_app_from_its_folder_and_the_hub(
        portable, fake_hub, tmp_path):
    folder, expected = portable
    # the code files a Hub download fetches: the `_class_name` module (also diffusers' pipeline.py) and the
    # custom component's module; no other .py file would arrive
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py")) == ["pipeline.py", "unet/unet.py"]
    _, endpoint = fake_hub
    push_to_hub(folder, "me/tiny-ldm", token="hf_fake_token")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": endpoint,
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    run = subprocess.run([sys.executable, "-I", "-c", PLAIN_DIFFUSERS, str(folder), "me/tiny-ldm", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[:2] == ["diffusers_modules.local.pipeline", "diffusers_modules.local.unet"]
    for source in ("folder", "hub"):
        np.testing.assert_allclose(np.load(tmp_path / f"{source}.npy"), expected, atol=1e-5)


@pytest.mark.usefixtures("fake_hub")
def test_push_to_hub_errors_are_one_line(portable, tmp_path):
    folder, _ = portable
    with pytest.raises(ValueError, match="401 response.*check the repo id and that the token") as error:
        push_to_hub(folder, "me/tiny-ldm", token="hf_wrong")
    assert "\n" not in str(error.value)
    (folder / "README.md").write_text("---\nlicense: mit\n---\nno library")
    with pytest.raises(ValueError, match="Invalid metadata in README.md. - no library_name") as error:
        push_to_hub(folder, "me/tiny-ldm", token="hf_fake_token")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="has no README.md; write its model card first"):
        push_to_hub(tmp_path / "pipe" / "unet", "me/x", token="hf_fake_token")


def test_a_lora_in_a_run_folder_is_pushed_without_the_rest_of_the_run(tmp_path, fake_hub):
    server, _ = fake_hub
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model.safetensors").write_bytes(b"not for the hub")
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "grid.png")
    share_export(tmp_path, "lora", "default", ["a sks dog"], sample_image_path=tmp_path / "grid.png",
                 push_to="me/lora", token="hf_fake_token", allow_patterns=["pytorch_lora_weights.safetensors"])
    assert set(server.repos["me/lora"]["files"]) == {"pytorch_lora_weights.safetensors", "README.md", "samples.png"}
