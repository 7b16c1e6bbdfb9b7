"""`ldm-app generate --prompts FILE -o DIR`: a prompt file becomes an image-folder data set that `datasets` loads,
with the same files on 1 or 2 processes (torchrun) or on Ray, after a kill and a re-run, and one-line errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import PIL.Image
import pytest

from ldm_app.batch_generation import (METADATA, RECORDS, OutputFolder, Settings, make_items, push_dataset, read_rows,
                                     run_local)
from ldm_app.png_metadata import read_png

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": "a red circle", "seed": 100, "label": "circle"},
        {"prompt": "a blue square", "negative_prompt": "blurry", "label": "square"},
        {"prompt": "a green cat", "guidance": 3, "label": "cat"},
        *({"prompt": f"shape {i}", "label": "other"} for i in range(7))]  # 10 rows, 2 images each


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def generate(model: Path, prompts: Path, out: Path, *extra: str, launcher: tuple[str, ...] = (),
             env: dict[str, str] | None = None, wait: bool = True):
    """The batch command, one thread per process (the thread count can change a pixel's last bit on CPUs)."""
    args = [sys.executable, *launcher, "-m", "ldm_app", "generate", "--prompts", str(prompts), "-o", str(out),
            "--model", str(model), "--steps", "2", "-n", "2", "--batch-size", "3", "--seed", "7", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    env = {name: value for name, value in env.items() if value != ""}  # "": unset
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def files(folder: Path) -> dict[str, bytes]:
    """Every file of the data set (records included), by name."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(model, prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "data"
    r = generate(model, prompts, out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / METADATA)
    return out


# ----------------------------------------------------------------------------------------------------------
# Rows and seeds


def test_prompt_files_of_each_kind_give_rows(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_rows(str(tmp_path / "p.txt")) == [{"prompt": "a cat"}, {"prompt": "a dog"}]
    (tmp_path / "p.csv").write_text("text,seed,steps,guidance,label\na cat,5,3,2.5,x\na dog,,,,y\n")
    assert read_rows(str(tmp_path / "p.csv"), column="text") == [
        {"prompt": "a cat", "seed": 5, "steps": 3, "guidance": 2.5, "label": "x"}, {"prompt": "a dog", "label": "y"}]
    ds = datasets.Dataset.from_dict({"caption": ["a cow"], "seed": [3], "image_id": [9]})
    ds.to_parquet(tmp_path / "hub-layout" / "train.parquet")  # as a Hub data set repo holds it
    ds.save_to_disk(tmp_path / "saved")
    for folder in ("hub-layout", "saved"):  # only the prompt and generation fields are kept
        assert read_rows(str(tmp_path / folder), column="caption") == [{"prompt": "a cow", "seed": 3}]


def test_item_i_uses_seed_plus_i_unless_its_row_gives_one():
    items = make_items([{"prompt": "a"}, {"prompt": "b", "seed": 50}, {"prompt": "c", "steps": 4, "x": 1}],
                       {"steps": 2, "negative_prompt": ""}, seed=10, per_row=2)
    assert [i.fields["seed"] for i in items] == [10, 11, 50, 51, 14, 15]
    assert [i.fields["steps"] for i in items] == [2, 2, 2, 2, 4, 4]
    assert items[4].extra == {"x": 1} and items[4].file_name == "00000004.png"


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a", "steps": "many"}\n', "row 1: steps is 'many', not a int"),
    ('{"prompt": "a"}\nnot json\n', "line 2 is not JSON"),
    ('{"caption": "a"}\n', "row 1 has no text in column 'prompt'"),
    ('{"prompt": "a", "file_name": "x.png"}\n', "row 1 has a file_name column"),
    ('{"prompt": "a"}\n{"prompt": "b", "steps": 0}\n', "row 2: steps is 0, expected a whole number ≥ 1"),
    ('{"prompt": "a", "sampler": "plms"}\n', "row 1: sampler is 'plms', expected one of ddim"),
])
def test_a_bad_row_is_refused_naming_it(tmp_path, text, message):
    (tmp_path / "p.jsonl").write_text(text)
    with pytest.raises(ValueError, match=message):
        make_items(read_rows(str(tmp_path / "p.jsonl")), {}, 0)


def test_a_folder_holding_another_job_or_other_files_is_refused(tmp_path):
    items = make_items([{"prompt": "a"}], {"steps": 2}, 0)
    OutputFolder(tmp_path / "job").claim(items, Settings())
    OutputFolder(tmp_path / "job").claim(items, Settings())  # the same job: resumed
    with pytest.raises(ValueError, match="holds another batch job \\(items differ\\)"):
        OutputFolder(tmp_path / "job").claim(make_items([{"prompt": "b"}], {"steps": 2}, 0), Settings())
    with pytest.raises(ValueError, match="holds another batch job \\(model differ\\)"):
        OutputFolder(tmp_path / "job").claim(items, Settings(model="other"))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="not empty and holds no batch job"):
        OutputFolder(tmp_path / "photos").claim(items, Settings())


def test_processes_that_did_not_join_one_run_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; this process runs alone
    with pytest.raises(ValueError, match="2 processes were launched but accelerate set up 1.*ACCELERATE_USE_CPU=true"):
        run_local(make_items([{"prompt": "a"}], {"steps": 2}, 0), tmp_path / "out", Settings())
    assert not (tmp_path / "out").exists()


def test_push_writes_a_data_set_card_and_offline_is_one_line(reference, tmp_path):
    shutil.copytree(reference, tmp_path / "data")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):  # (conftest keeps the tests offline)
        push_dataset(tmp_path / "data", "me/shapes")
    card = (tmp_path / "data" / "README.md").read_text()
    assert "task_categories:\n- text-to-image" in card and "20 images" in card
    assert 'load_dataset("me/shapes"' in card


def test_cli_errors_are_one_line(model, prompts, tmp_path):
    r = generate(model, prompts, tmp_path / "out", "--image", str(prompts))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --prompts makes a text-to-image data set, resumed when re-run; drop --image."]
    r = generate(model, tmp_path / "missing.txt", tmp_path / "out")
    assert r.returncode == 2 and "no such file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------
# The data set


def test_the_folder_loads_as_an_imagefolder_data_set_with_the_prompts(reference):
    ds = datasets.load_dataset("imagefolder", data_dir=str(reference), split="train")
    assert len(ds) == 20 and ds[0]["prompt"] == "a red circle" and ds[19]["prompt"] == "shape 6"
    assert ds["seed"][:6] == [100, 101, 9, 10, 11, 12]  # a row's seed, else --seed 7 + the item's index
    assert ds["label"][:6] == ["circle", "circle", "square", "square", "cat", "cat"]  # other columns kept
    assert ds[2]["negative_prompt"] == "blurry" and ds[4]["guidance"] == 3.0 and ds[0]["guidance"] == 5.0
    assert ds[0]["image"].size == (32, 32)
    params, _ = read_png(reference / "00000004.png")  # each PNG carries its parameters
    assert (params.prompt, params.seed, params.guidance, params.steps) == ("a green cat", 11, 3.0, 2)


def test_a_rerun_of_a_finished_job_changes_nothing(model, prompts, reference):
    before = {p: p.stat().st_mtime_ns for p in reference.glob("*.png")}
    r = generate(model, prompts, reference)
    assert r.returncode == 0, r.stderr
    assert {p: p.stat().st_mtime_ns for p in reference.glob("*.png")} == before


def test_two_processes_write_the_same_files_as_one(model, prompts, reference, tmp_path):
    r = generate(model, prompts, tmp_path / "data", env={"ACCELERATE_USE_CPU": "true"},
                 launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "data" / METADATA)  # printed once: one process writes it
    assert files(tmp_path / "data") == files(reference)


def test_a_kill_mid_run_loses_no_finished_item_and_the_rerun_ends_with_the_same_files(
        model, prompts, reference, tmp_path):
    out = tmp_path / "data"
    proc = generate(model, prompts, out, wait=False)
    deadline = time.time() + 300
    while len(list((out / RECORDS).glob("[0-9]*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.stem for p in (out / RECORDS).glob("[0-9]*.json"))
    assert 3 <= len(done) < 20 and not (out / METADATA).exists(), "the run ended before the kill"
    for stem in done:  # every finished item is whole
        PIL.Image.open(out / f"{stem}.png").load()
    r = generate(model, prompts, out)
    assert r.returncode == 0, r.stderr
    assert files(out) == files(reference)
    assert not list(out.glob(".*.tmp*"))


def test_ray_engine_writes_the_same_files(model, prompts, reference, tmp_path):
    pytest.importorskip("ray.data")
    r = generate(model, prompts, tmp_path / "data", "--engine", "ray", env={"RAY_ADDRESS": ""})  # a local Ray
    assert r.returncode == 0, r.stderr
    assert files(tmp_path / "data") == files(reference)
