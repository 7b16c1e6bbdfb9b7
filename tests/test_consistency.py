"""Latent consistency distillation: the guidance input, the method's pieces against diffusers', the trainer
objective (loss falls, exact resume), LCM-LoRAs in both layouts, and `--sampler lcm` end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from ldm_app import LdmPipeline
from ldm_app.batches import CachedBatches, seeded_generator
from ldm_app.cache import build_encoded_dataset
from ldm_app.components import load_text_encoder, load_tokenizer, load_vae
from ldm_app.config import load_config
from ldm_app.consistency import (LCM_STUDENT, ConsistencyLoss, DDIMSolver, add_guidance_input, boundary_scalings,
                                 frozen_copy, guidance_scale_embedding)
from ldm_app.data import load_image_dataset
from ldm_app.encoders import Encoders
from ldm_app.objective import noise_scheduler
from ldm_app.pipeline import DEFAULT_MODEL_DIR
from ldm_app.generation import generate_images
from ldm_app.loading import load_loras
from ldm_app.lora_saving import save_lora
from ldm_app.request import GenerationRequest
from ldm_app.testing import add_random_lora, tiny_components, tiny_pipeline
from ldm_app.trainer import train
from ldm_app.unet import LdmUNet

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def lcm_config(inputs: Path, out: Path, *overrides: str):
    model = inputs / "model"
    return load_config(TINY, [f"data.path={inputs / 'data'}", f"model.vae={model}", f"model.text_encoder={model}",
                              f"model.pretrained_unet={model}", f"train.output_dir={out}", "train.validation_every=0",
                              "distill.method=lcm", "train.ema_decay=0.95", "train.lr_scheduler=constant",
                              "train.learning_rate=3e-4", "train.report_to=none", *overrides])


# ----------------------------------------------------------------------------------------------------------
# The guidance input and the method's pieces


def test_guidance_input_starts_as_the_teacher_and_then_conditions_on_w():
    teacher = tiny_components()["unet"]  # its zero-initialised layers randomised, so the timestep matters
    student = LdmUNet.from_preset("tiny", sample_size=8, time_cond_proj_dim=16).eval()
    missing = student.load_state_dict(teacher.state_dict(), strict=False).missing_keys
    assert missing == ["time_embedding.cond_proj.weight"]  # diffusers' key
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    cond = guidance_scale_embedding(torch.tensor([2.0, 7.0]), 16)
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, ctx, timestep_cond=cond).sample, teacher(x, t, ctx).sample)
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight)
        assert not torch.allclose(student(x, t, ctx, timestep_cond=cond).sample, teacher(x, t, ctx).sample)
    with pytest.raises(ValueError, match="timestep_cond"):
        student(x, t, ctx)


def test_add_guidance_input_gives_a_diffusers_unet_the_same_contract(tmp_path):
    unet = tiny_components("diffusers")["unet"]
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    with torch.no_grad():
        before = unet(x, t, ctx).sample
        add_guidance_input(unet, 32)
        after = unet(x, t, ctx, timestep_cond=guidance_scale_embedding(torch.tensor([3.0, 5.0]), 32)).sample
    torch.testing.assert_close(after, before)
    assert unet.config.time_cond_proj_dim == 32
    unet.save_pretrained(tmp_path)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)  # diffusers builds the same layer from the config
    torch.testing.assert_close(reloaded.time_embedding.cond_proj.weight, unet.time_embedding.cond_proj.weight)


def test_embedding_boundary_conditions_and_solver_match_diffusers():
    w = torch.tensor([0.0, 1.5, 7.0])
    ours = guidance_scale_embedding(w, 32)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    torch.testing.assert_close(ours, theirs)

    scheduler = LCMScheduler()
    for t in (0, 19, 259, 999):
        c_skip, c_out = boundary_scalings(torch.tensor([t]), 10.0)
        expected = scheduler.get_scalings_for_boundary_condition_discrete(t)
        torch.testing.assert_close((c_skip.item(), c_out.item()), tuple(float(e) for e in expected))
    assert boundary_scalings(torch.tensor([0]), 10.0) == (torch.tensor([1.0]), torch.tensor([0.0]))

    solver = DDIMSolver(scheduler.alphas_cumprod, 50)
    scheduler.set_timesteps(4)  # LCMScheduler samples on the solver's grid
    assert set(scheduler.timesteps.tolist()) <= set(solver.timesteps.tolist())
    assert solver.timesteps[0] == 19 and solver.timesteps[-1] == 999 and solver.skip == 20


# ----------------------------------------------------------------------------------------------------------
# The trainer objective


def fixed_consistency_loss(unet: torch.nn.Module, config, inputs: Path) -> float:
    """The consistency loss on one fixed batch with fixed draws, the student its own target (μ = 0)."""
    vae = load_vae(inputs / "model", "vae")
    tok, te = load_tokenizer(inputs / "model", "tokenizer"), load_text_encoder(inputs / "model", "text_encoder")
    encoded = build_encoded_dataset(load_image_dataset(config.data), config.data, Encoders(vae, tok, te),
                                    progress=False)
    batch = CachedBatches(encoded, 0, config.data)(0, 32, 0, 1)
    empty = te(tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids)[0]
    teacher = frozen_copy(LdmPipeline.from_pretrained(config.model.pretrained_unet).unet)
    loss = ConsistencyLoss(noise_scheduler(config.objective), config.distill, teacher, None, None, empty.detach(),
                           vae.config.scaling_factor)
    with torch.no_grad():
        return loss(unet.eval(), batch, seeded_generator(123)).item()


@pytest.mark.parametrize("unet_kind", ["ldm", "diffusers"])
def test_a_few_distillation_steps_lower_the_consistency_loss(inputs, tmp_path, unet_kind):
    teacher = inputs / "model"
    if unet_kind == "diffusers":  # a tiny SD-1.x UNet (UNet2DConditionModel) as teacher and student
        teacher = tmp_path / "sd-model"
        tiny_pipeline("diffusers").save_pretrained(teacher)
    config = lcm_config(inputs, tmp_path / "run", "train.max_steps=40", "train.checkpoint_every=40",
                        "distill.loss=l2", "train.learning_rate=1e-3", f"model.pretrained_unet={teacher}")
    before = fixed_consistency_loss(LdmPipeline.from_pretrained(teacher).unet, config, inputs)
    pipeline = train(config)
    student = LdmPipeline.from_pretrained(pipeline)
    assert type(student.unet).__name__ == ("LdmUNet" if unet_kind == "ldm" else "UNet2DConditionModel")
    after = fixed_consistency_loss(student.unet, config, inputs)
    assert after < 0.8 * before, (before, after)
    assert isinstance(student.scheduler, LCMScheduler)  # the export samples as an LCM


def test_distillation_resumes_to_the_same_weights(inputs, tmp_path):
    common = ["train.checkpoint_every=3", "train.keep_checkpoints=0", "distill.time_cond_proj_dim=16"]
    train(lcm_config(inputs, tmp_path / "a", "train.max_steps=6", *common))
    train(lcm_config(inputs, tmp_path / "b", "train.max_steps=3", *common))
    train(lcm_config(inputs, tmp_path / "b", "train.max_steps=6", *common))  # resumes at step 3
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoints" / "checkpoint-6" / name) for run in "ab")
        assert a.keys() == b.keys()
        # bit for bit: the cache read back from disk has the layout of the one built in memory (a channels_last
        # copy made the teacher's convolutions round differently after a resume)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    unet = LdmPipeline.from_pretrained(tmp_path / "a" / "pipeline").unet
    assert unet.config.time_cond_proj_dim == 16 and unet.time_embedding.cond_proj.weight.abs().sum() > 0


def test_lcm_lora_distillation_round_trips_through_diffusers_load_lora_weights(inputs, tmp_path):
    lora_file = train(lcm_config(inputs, tmp_path, "train.max_steps=4", "train.checkpoint_every=4", "lora.rank=4",
                                 "train.use_ema=false", "train.learning_rate=1e-2"))
    pipe = LdmPipeline.from_pretrained(inputs / "model")
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([259]), torch.randn(1, 5, 32)
    with torch.no_grad():
        base = pipe.unet(x, t, ctx).sample
        pipe.load_lora_weights(str(lora_file))
        with_lora = pipe.unet(x, t, ctx).sample
    assert not torch.allclose(base, with_lora, atol=1e-4)
    keys = load_file(lora_file)
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)  # diffusers' layout


# ----------------------------------------------------------------------------------------------------------
# LCM-LoRAs made by others: SD 1.x UNet, diffusers (peft) and kohya layouts, attention and convolutions


def sd_lcm_lora(unet: UNet2DConditionModel, rank: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """A random LCM-LoRA over the layers LCM-LoRA trains (attention, feed-forward, ResNet convs), in diffusers'
    (`unet.<module>.lora_A.weight`) and kohya's (`lora_unet_<module>.lora_down.weight` + alpha) layouts."""
    g = torch.Generator().manual_seed(0)
    targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1", "conv2")
    diffusers_sd, kohya_sd = {}, {}
    for name, module in unet.named_modules():
        if not name.endswith(targets) or "attentions" not in name and "resnets" not in name:
            continue
        if isinstance(module, torch.nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) * 0.1
            up = torch.randn(module.out_channels, rank, 1, 1, generator=g) * 0.1
        else:
            down = torch.randn(rank, module.in_features, generator=g) * 0.1
            up = torch.randn(module.out_features, rank, generator=g) * 0.1
        diffusers_sd[f"unet.{name}.lora_A.weight"], diffusers_sd[f"unet.{name}.lora_B.weight"] = down, up
        kohya = "lora_unet_" + name.replace(".", "_")
        kohya_sd |= {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up,
                     f"{kohya}.alpha": torch.tensor(float(rank))}
    return {"diffusers": diffusers_sd, "kohya": kohya_sd}


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_sd1_lcm_loras_from_others_load_as_any_lora(tmp_path, layout):
    components = tiny_components("diffusers")
    path = tmp_path / f"lcm-lora-{layout}.safetensors"
    save_file(sd_lcm_lora(components["unet"])[layout], path)
    ours = LdmPipeline(**{k: v for k, v in components.items()})
    theirs = StableDiffusionPipeline(**tiny_components("diffusers"), safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([259]), torch.randn(1, 5, 32)
    with torch.no_grad():
        base = ours.unet(x, t, ctx).sample
        ours.load_lora_weights(str(path))
        theirs.load_lora_weights(str(path))  # diffusers' own reading of the same file
        loaded, expected = ours.unet(x, t, ctx).sample, theirs.unet(x, t, ctx).sample
    torch.testing.assert_close(loaded, expected)
    assert (loaded - base).abs().max() > 1e-3
    ours.scheduler = LCMScheduler.from_config(ours.scheduler.config)
    ours.set_progress_bar_config(disable=True)
    image = ours("a cat", num_inference_steps=4, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


# ----------------------------------------------------------------------------------------------------------
# --sampler lcm end to end


def test_generate_with_sampler_lcm_uses_the_folders_student_and_its_defaults(tmp_path):
    folder = tmp_path / "model"
    pipe = tiny_pipeline()
    pipe.save_pretrained(folder)
    student = tiny_pipeline(seed=1).unet
    student.save_pretrained(folder / LCM_STUDENT)
    out = tmp_path / "cat.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "ldm_app", "generate", "a cat", "--model", str(folder), "--sampler",
                        "lcm", "--seed", "3", "-o", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "unet_lcm" in r.stderr
    info = PIL.Image.open(out).info
    assert "Steps: 4, Sampler: LCM, CFG scale: 1.0, Seed: 3" in info["parameters"]
    assert json.loads(info["ldm-app"])["sampler"] == "lcm"

    pipe.unet = student
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    expected = pipe("a cat", num_inference_steps=4, guidance_scale=1.0, output_type="pil",
                    generator=torch.Generator().manual_seed(3)).images[0]
    got = np.asarray(PIL.Image.open(out).convert("RGB"), dtype=int)
    assert np.abs(got - np.asarray(expected, dtype=int)).max() <= 1


def test_the_lcm_sampler_swaps_the_student_in_and_out_per_request(tmp_path):
    """The server, the UI and batch jobs share one pipeline: `lcm` requests get the folder's student, others (and
    `lcm` with a LoRA, e.g. an LCM-LoRA) the model's own UNet, in any order."""
    folder = tmp_path / "model"
    tiny_pipeline().save_pretrained(folder)
    tiny_pipeline(seed=1).unet.save_pretrained(folder / LCM_STUDENT)
    pipe = LdmPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    teacher = pipe.unet
    (tmp_path / "lora").mkdir()
    lora = save_lora(add_random_lora(tiny_pipeline()).unet, None, tmp_path / "lora")

    def draw(sampler: str, loras: list[str] = ()) -> np.ndarray:
        request = GenerationRequest("a cat", sampler=sampler, seed=3, loras=list(loras))
        return np.asarray(generate_images(pipe, [request], adapters=load_loras(pipe, loras))[0][0], dtype=int)

    ddim = draw("ddim")
    lcm = draw("lcm")
    assert pipe.unet is not teacher and isinstance(pipe.scheduler, LCMScheduler)
    reference = LdmPipeline.from_pretrained(folder)
    reference.unet = LdmUNet.from_pretrained(folder / LCM_STUDENT)
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    expected = reference("a cat", num_inference_steps=4, guidance_scale=1.0,
                         generator=torch.Generator().manual_seed(3)).images[0]
    assert np.abs(lcm - np.asarray(expected, dtype=int)).max() <= 1
    assert np.array_equal(draw("ddim"), ddim) and pipe.unet is teacher
    draw("lcm", [f"{lora}:1.0"])
    assert pipe.unet is teacher and isinstance(pipe.scheduler, LCMScheduler)


def test_from_default_lcm_says_when_no_student_ships():
    if (DEFAULT_MODEL_DIR / LCM_STUDENT).is_dir():  # shipped: it samples in 4 steps without CFG
        pipe = LdmPipeline.from_default(lcm=True)
        assert isinstance(pipe.scheduler, LCMScheduler)
        assert pipe("a cat", num_inference_steps=4, guidance_scale=1.0, output_type="np").images.shape[0] == 1
    else:
        with pytest.raises(ValueError, match="ships no distilled LCM UNet"):
            LdmPipeline.from_default(lcm=True)


def test_distill_command_writes_an_lcm_lora_and_refuses_missing_data_in_one_line(inputs, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "ldm_app", "distill", "--model", str(inputs / "model"), "-o", str(tmp_path / "out")]
    r = subprocess.run([*run, "--data", str(inputs / "data"), "--lora", "--rank", "4", "--steps", "2",
                        "--batch-size", "4"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    written = Path(r.stdout.strip().splitlines()[-1])
    assert written.name == "pytorch_lora_weights.safetensors" and written.is_file()
    r = subprocess.run([*run, "--data", str(tmp_path / "nowhere")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
