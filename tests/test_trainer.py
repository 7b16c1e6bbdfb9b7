import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from ldm_app import LdmPipeline
from ldm_app.batches import CachedBatches, EncodingBatches, seeded_generator
from ldm_app.cache import build_encoded_dataset, cache_key, load_or_build_cache
from ldm_app.components import load_text_encoder, load_tokenizer, load_vae
from ldm_app.encoders import Encoders, module_fingerprint
from ldm_app.config import Config, ObjectiveConfig, TrainConfig, load_config
from ldm_app.data import load_image_dataset
from ldm_app.objective import DenoisingLoss, noise_scheduler
from ldm_app.testing import tiny_components, tiny_pipeline, write_toy_dataset
from ldm_app.trainer import TrainingError, export_pipeline, lr_schedule, train, validation_grid

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_config(inputs: Path, out: Path, *overrides: str):
    return load_config(TINY, [f"data.path={inputs / 'data'}", f"model.vae={inputs / 'model'}",
                              f"model.text_encoder={inputs / 'model'}", f"train.output_dir={out}",
                              "train.validation_every=0", *overrides])


def fixed_batch_loss(unet, config, inputs) -> float:
    """Loss of a UNet on one fixed batch with fixed noise: comparable before and after training."""
    vae = load_vae(inputs / "model", "vae")
    tok, te = load_tokenizer(inputs / "model", "tokenizer"), load_text_encoder(inputs / "model", "text_encoder")
    encoded = build_encoded_dataset(load_image_dataset(config.data), config.data, Encoders(vae, tok, te), progress=False)
    batch = CachedBatches(encoded, 0, config.data)(0, 32, 0, 1)
    empty = te(tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids)[0]
    loss = DenoisingLoss(noise_scheduler(config.objective), config.objective, empty, vae.config.scaling_factor)
    with torch.no_grad():
        return loss(unet.eval(), batch, seeded_generator(123)).item()


@pytest.mark.parametrize("prediction_type, extra", [
    ("epsilon", []),
    ("sample", []),
    ("v_prediction", ["objective.zero_terminal_snr=true"]),
])
def test_loss_falls_for_each_prediction_type(inputs, tmp_path, prediction_type, extra):
    steps = "100" if prediction_type == "epsilon" else "40"
    config = tiny_config(inputs, tmp_path, f"objective.prediction_type={prediction_type}", *extra,
                         f"train.max_steps={steps}", "train.use_ema=false", f"train.checkpoint_every={steps}")
    from ldm_app.trainer import build_unet
    torch.manual_seed(config.train.seed)
    before = fixed_batch_loss(build_unet(config, 32, 4, 8), config, inputs)
    pipeline = train(config)
    after = fixed_batch_loss(LdmPipeline.from_pretrained(pipeline).unet, config, inputs)
    assert after < (0.8 if prediction_type == "epsilon" else 0.95) * before, (before, after)
    scheduler = LdmPipeline.from_pretrained(pipeline).scheduler
    assert scheduler.config.prediction_type == prediction_type


def test_cache_gives_the_same_batches_and_loss_as_encoding_every_step(inputs):
    config = load_config(TINY, [f"data.path={inputs / 'data'}", "data.random_flip=true"])
    vae = load_vae(inputs / "model", "vae")
    tok, te = load_tokenizer(inputs / "model", "tokenizer"), load_text_encoder(inputs / "model", "text_encoder")
    ds = load_image_dataset(config.data)
    encoders = Encoders(vae, tok, te)
    cached = CachedBatches(build_encoded_dataset(ds, config.data, encoders, progress=False), 0, config.data)
    fresh = EncodingBatches(ds, config.data, 0, encoders)
    empty = torch.zeros(1, tok.model_max_length, 32)
    torch.manual_seed(0)
    from ldm_app.unet import LdmUNet
    unet = LdmUNet.from_preset("tiny", sample_size=8).eval()
    for step in (0, 1, 5):  # step 5 wraps into the second epoch: a new permutation
        a, b = cached(step, 8, 0, 1), fresh(step, 8, 0, 1)
        torch.testing.assert_close(a.mean, b.mean)
        torch.testing.assert_close(a.std, b.std)
        torch.testing.assert_close(a.context, b.context)
        with torch.no_grad():
            loss = DenoisingLoss(noise_scheduler(config.objective), config.objective, empty, 0.5)
            losses = [loss(unet, batch, seeded_generator(7, step)) for batch in (a, b)]
        torch.testing.assert_close(losses[0], losses[1])

    # two ranks split one global batch of 8 between them: disjoint halves, nothing seen twice
    ranks = [cached(1, 4, rank, 2) for rank in (0, 1)]
    whole = cached(1, 8, 0, 1)
    torch.testing.assert_close(torch.cat([r.mean for r in ranks]), whole.mean, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([r.context for r in ranks]), whole.context, rtol=0, atol=0)
    assert not torch.equal(ranks[0].mean, ranks[1].mean)


def test_undecodable_images_are_skipped_and_counted(tmp_path):
    write_toy_dataset(tmp_path / "data", n=6, corrupt=2)
    config = load_config(None, [f"data.path={tmp_path / 'data'}", "data.resolution=32"])
    from ldm_app.testing import tiny_components
    c = tiny_components()
    encoded = build_encoded_dataset(load_image_dataset(config.data), config.data,
                                    Encoders(c["vae"], c["tokenizer"], c["text_encoder"]), progress=False)
    assert len(encoded) == 6 and encoded.skipped == 2


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(inputs, tmp_path):
    config = tiny_config(inputs, tmp_path, "train.max_steps=6", "train.checkpoint_every=2")
    calls = []

    def poison_from_step_3(module, args):  # forward 4 is step 3's: NaN after checkpoint-2 was written
        calls.append(1)
        return (args[0] * float("nan"),) if len(calls) > 3 else None

    def poison(unet):
        unet.conv_out.register_forward_pre_hook(poison_from_step_3)

    with pytest.raises(TrainingError, match="at step 3.*checkpoint-2"):
        train(config, setup_unet=poison)
    assert [p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    weights = load_file(tmp_path / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "pipeline").exists()


def test_time_budget_stops_a_run_that_the_next_call_continues_keeping_the_newest_checkpoints(inputs, tmp_path):
    # max_minutes=0: each call trains one step, checkpoints it and exports, as a session-bounded run would
    config = tiny_config(inputs, tmp_path, "train.max_steps=10", "train.max_minutes=0", "train.checkpoint_every=100",
                         "train.keep_checkpoints=1")
    for expected_step in (1, 2):
        train(config)
        assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [f"checkpoint-{expected_step}"]
        step = json.loads((tmp_path / "pipeline" / "training_step.json").read_text())["step"]
        assert step == expected_step


def test_a_resumed_run_takes_the_learning_rate_it_is_given_now(inputs, tmp_path):
    common = ["train.lr_scheduler=constant", "train.warmup_steps=0", "train.checkpoint_every=1",
              "train.keep_checkpoints=0"]
    train(tiny_config(inputs, tmp_path / "a", "train.max_steps=3", *common))  # 1e-3 throughout
    train(tiny_config(inputs, tmp_path / "b", "train.max_steps=2", *common))
    train(tiny_config(inputs, tmp_path / "b", "train.max_steps=3", "train.learning_rate=2.5e-4", *common))
    a, b = ({step: load_file(tmp_path / run / "checkpoints" / f"checkpoint-{step}" / "model.safetensors")
             for step in (2, 3)} for run in "ab")
    for k in a[2]:  # the same weights and Adam moments at step 2; AdamW's step 3 (and its decay) scale with the rate
        assert torch.equal(a[2][k], b[2][k])
        torch.testing.assert_close(b[3][k] - b[2][k], 0.25 * (a[3][k] - a[2][k]), rtol=1e-3, atol=1e-6)
    state = json.loads((tmp_path / "b" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["lr_scheduler"]["base_lrs"] == [2.5e-4]


def test_resume_moves_the_loaded_ema_to_the_device(inputs, tmp_path, monkeypatch):
    # accelerate's load_state loads the EMA weights with map_location="cpu": on a GPU they must move afterwards
    train(tiny_config(inputs, tmp_path, "train.max_steps=1", "train.checkpoint_every=1"))
    events = []
    for name in ("load_state_dict", "to"):
        def spy(self, *args, _name=name, _original=getattr(EMAModel, name), **kwargs):
            events.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(EMAModel, name, spy)
    train(tiny_config(inputs, tmp_path, "train.max_steps=2", "train.checkpoint_every=1"))
    assert "load_state_dict" in events and "to" in events[events.index("load_state_dict"):], events


def test_zero_terminal_snr_with_epsilon_is_a_clear_error():
    with pytest.raises(ValueError, match="set objective.prediction_type=v_prediction"):
        load_config(None, ["objective.zero_terminal_snr=true"])
    with pytest.raises(ValueError, match="set objective.prediction_type=v_prediction"):  # a Config built in code
        train(Config(objective=ObjectiveConfig(zero_terminal_snr=True)))
    load_config(None, ["objective.zero_terminal_snr=true", "objective.prediction_type=v_prediction"])


@pytest.mark.parametrize("scheduler, warmup", [("constant", 4), ("cosine", 4), ("constant", 0)])
def test_learning_rate_warms_up_with_either_scheduler(scheduler, warmup):
    t = TrainConfig(learning_rate=1e-3, lr_scheduler=scheduler, warmup_steps=warmup, max_steps=100)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=t.learning_rate)
    schedule, lrs = lr_schedule(optimizer, t), []
    for _ in range(warmup + 1):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs == sorted(set(lrs)) and lrs[-1] == pytest.approx(1e-3)  # rising to the peak at step `warmup`


def test_export_keeps_a_complete_pipeline_when_interrupted(tmp_path, monkeypatch):
    pipe, folder = tiny_pipeline(), tmp_path / "pipeline"
    export_pipeline(pipe, folder, 1)
    replace = os.replace

    def killed_before_the_new_folder_is_in_place(src, dst):
        if Path(src).name == "pipeline.tmp":
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_new_folder_is_in_place)
    with pytest.raises(KeyboardInterrupt):
        export_pipeline(pipe, folder, 2)
    steps = [json.loads((f / "training_step.json").read_text())["step"]
             for f in (folder, tmp_path / "pipeline.old") if f.is_dir()]
    assert steps == [1]
    monkeypatch.undo()
    export_pipeline(pipe, folder, 3)  # the next export tidies up
    assert json.loads((folder / "training_step.json").read_text())["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]


def test_validation_grid_is_replaced_whole(tmp_path, monkeypatch):
    config, pipe, path = load_config(TINY, ["train.validation_steps=1"]), tiny_pipeline(), tmp_path / "step.png"
    validation_grid(pipe, config, path)
    before = path.read_bytes()

    def disk_full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")
        raise OSError("No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", disk_full)
    with pytest.raises(OSError):
        validation_grid(pipe, config, path)
    assert path.read_bytes() == before


def run_cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def cli_overrides(inputs: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.path={inputs / 'data'}", f"model.vae={inputs / 'model'}", f"model.text_encoder={inputs / 'model'}",
            f"train.output_dir={out}", "train.validation_every=0", *extra]


def test_kill_and_resume_ends_with_the_same_weights(inputs, tmp_path):
    # ~35 steps/s on 2 cores: 120 steps leave seconds between the first checkpoint and the end, so the kill lands
    common = ["train.max_steps=120", "train.checkpoint_every=4", "train.keep_checkpoints=40"]
    straight = run_cli("training/train_ldm.py", "--config", str(TINY), *cli_overrides(inputs, tmp_path / "a", *common))
    assert straight.wait(timeout=600) == 0, straight.stdout.read()

    killed = run_cli("training/train_ldm.py", "--config", str(TINY), *cli_overrides(inputs, tmp_path / "b", *common))
    deadline = time.time() + 300
    while not list((tmp_path / "b" / "checkpoints").glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "b" / "pipeline").exists(), "the run finished before the kill; raise max_steps"
    resumed = run_cli("training/train_ldm.py", "--config", str(TINY), *cli_overrides(inputs, tmp_path / "b", *common))
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    assert "Resuming from" in log

    for path in ("pipeline/unet/diffusion_pytorch_model.safetensors", "checkpoints/checkpoint-120/model.safetensors"):
        a, b = load_file(tmp_path / "a" / path), load_file(tmp_path / "b" / path)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_two_process_ddp_run_exports_a_loadable_pipeline(inputs, tmp_path):
    # torchrun, because `accelerate launch --cpu` without an MPI host file starts a single process
    proc = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "training/train_ldm.py",
                   "--config", str(TINY), *cli_overrides(inputs, tmp_path, "train.max_steps=4",
                                                         "train.checkpoint_every=2", "train.batch_size=4"),
                   env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log
    assert {p.name for p in (tmp_path / "checkpoints" / "checkpoint-4").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}  # both ranks took part
    pipe = LdmPipeline.from_pretrained(tmp_path / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


def test_mixed_precision_comes_from_accelerate_launch_unless_the_config_sets_it(inputs, tmp_path):
    for flag, override, expected in (("bf16", [], "bf16"), ("bf16", ["train.mixed_precision=no"], "no")):
        out = tmp_path / expected
        proc = run_cli("-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                       "--mixed_precision", flag, "--dynamo_backend", "no", "training/train_ldm.py",
                       "--config", str(TINY), *cli_overrides(inputs, out, "train.max_steps=1", *override))
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, log
        assert load_config(out / "config.yaml").train.mixed_precision == expected


@pytest.mark.parametrize("override, message", [
    ("train.bacth_size=3", "valid keys in 'train'"),  # a typo names the valid keys
    ("train.validation_prompts=[a", "expected ',' or ']'"),  # broken YAML in a value
])
def test_bad_config_is_one_line_exit_2(tmp_path, override, message):
    proc = run_cli("training/train_ldm.py", "--config", str(TINY), override)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in out


@pytest.mark.parametrize("extra", [["data.streaming=true"], ["data.num_workers=2"]])
def test_uncached_runs_stream_or_use_loader_workers(inputs, tmp_path, extra, capsys):
    data, out = write_toy_dataset(tmp_path / "data", n=8, corrupt=2), tmp_path / "run"
    config = tiny_config(inputs, out, f"data.path={data}", "train.cache=false", "train.max_steps=3",
                         "train.batch_size=4", *extra)
    pipe = LdmPipeline.from_pretrained(train(config))
    ckpt = out / "checkpoints" / "checkpoint-3"
    assert ckpt.is_dir() and not (out / "cache").exists()
    # 12 examples from 8 good images: a whole pass, so both bad files came up and were counted
    assert int(re.search(r"(\d+) undecodable images skipped", capsys.readouterr().out).group(1)) >= 2
    # the export carries the EMA weights
    shadow = load_file(ckpt / "ema.safetensors")
    ema = [shadow[str(i)] for i in range(len(shadow))]
    exported = list(pipe.unet.parameters())
    assert len(exported) == len(ema)
    for a, b in zip(exported, ema):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_streaming_with_cache_is_a_clear_error(inputs, tmp_path):
    with pytest.raises(ValueError, match="train.cache=false"):
        train(tiny_config(inputs, tmp_path, "data.streaming=true"))


def test_module_fingerprint_follows_weights_not_memory_format():
    unet = tiny_components()["unet"]
    before = module_fingerprint(unet)
    unet.to(memory_format=torch.channels_last)  # 1×1 convs then have strides that a byte view rejects
    assert module_fingerprint(unet) == before
    with torch.no_grad():
        next(unet.parameters()).add_(1e-3)
    assert module_fingerprint(unet) != before


def test_cache_is_reused_until_data_preprocessing_or_an_encoder_changes(inputs, tmp_path):
    data = write_toy_dataset(tmp_path / "data", n=4)
    config = load_config(TINY, [f"data.path={data}"])
    c = tiny_components()

    def key(cfg, text_encoder=c["text_encoder"]):
        return cache_key(load_image_dataset(cfg.data), cfg.data, Encoders(c["vae"], c["tokenizer"], text_encoder))

    def build():
        return build_encoded_dataset(load_image_dataset(config.data), config.data,
                                     Encoders(c["vae"], c["tokenizer"], c["text_encoder"]), progress=False)

    def fail():
        raise AssertionError("rebuilt although nothing changed")

    first = load_or_build_cache(tmp_path / "cache", key(config), build)

    again = load_or_build_cache(tmp_path / "cache", key(config), fail)
    assert key(config) == key(load_config(TINY, [f"data.path={data}"]))
    torch.testing.assert_close(again.mean, first.mean, rtol=0, atol=0)
    torch.testing.assert_close(again.text_states, first.text_states, rtol=0, atol=0)

    changed_encoder = copy.deepcopy(c["text_encoder"])
    with torch.no_grad():
        next(changed_encoder.parameters()).add_(1e-3)
    assert key(config, changed_encoder) != key(config)
    assert key(load_config(TINY, [f"data.path={data}", "data.resolution=16"])) != key(config)
    old = key(config)
    write_toy_dataset(data, n=5)  # new content in the same folder
    assert key(config) != old
    load_or_build_cache(tmp_path / "cache", key(config), build)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"encoded-{key(config)}.json",
                                                                     f"encoded-{key(config)}.safetensors"]
