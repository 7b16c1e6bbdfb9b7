import numpy as np
import pytest
import torch
from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionPipeline)

from ldm_app import LdmPipeline
from ldm_app.testing import tiny_components, tiny_pipeline

STEPS = 4


def generate(pipe, prompt="a cat", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_default_size_comes_from_unet_and_vae(pipe):
    assert pipe.vae_scale_factor == 4
    assert generate(pipe).shape == (1, 32, 32, 3)
    assert generate(pipe, height=16, width=24).shape == (1, 16, 24, 3)
    # odd latent sizes (9×5): each up-sampling goes back to its skip's size
    assert generate(pipe, height=36, width=20).shape == (1, 36, 20, 3)


def test_same_seed_same_image_and_other_seed_other_image(pipe):
    a, b, c = generate(pipe, seed=0), generate(pipe, seed=0), generate(pipe, seed=1)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_bf16_pipeline_generates_close_to_fp32():
    """`--dtype auto` picks fp16 on GPUs; every module (the UNet's timestep MLP included) must run in half."""
    reference = generate(tiny_pipeline())
    half = generate(tiny_pipeline().to(dtype=torch.bfloat16))
    assert np.isfinite(half).all()
    assert np.abs(half - reference).mean() < 0.05


def test_batch_with_generator_list_equals_single_runs(pipe):
    prompts = ["a cat", "a red heart"]
    batch = pipe(prompts, num_inference_steps=STEPS, output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    singles = [generate(pipe, p, seed=s)[0] for p, s in zip(prompts, (0, 1))]
    np.testing.assert_allclose(batch, np.stack(singles), atol=1e-5)


def test_num_images_per_prompt_and_output_types(pipe):
    out = generate(pipe, num_images_per_prompt=3)
    assert out.shape == (3, 32, 32, 3)
    assert 0 <= out.min() and out.max() <= 1
    pt = pipe("a cat", num_inference_steps=2, output_type="pt").images
    assert pt.shape == (1, 3, 32, 32)
    latent = pipe("a cat", num_inference_steps=2, output_type="latent").images
    assert latent.shape == (1, 4, 8, 8)
    pil = pipe("a cat", num_inference_steps=2).images[0]
    assert pil.size == (32, 32) and pil.mode == "RGB"


def test_guidance_and_negative_prompt_change_the_image(pipe):
    base = generate(pipe, guidance_scale=1.0)
    guided = generate(pipe, guidance_scale=7.0)
    negative = generate(pipe, guidance_scale=7.0, negative_prompt="blue dog")
    assert np.abs(base - guided).max() > 1e-4
    assert np.abs(guided - negative).max() > 1e-4


def test_eta_adds_noise_but_stays_seeded(pipe):
    det = generate(pipe, eta=0.0)
    stoch = generate(pipe, eta=1.0)
    assert np.abs(det - stoch).max() > 1e-4
    np.testing.assert_array_equal(stoch, generate(pipe, eta=1.0))


def test_callback_can_replace_latents(pipe):
    seen = []

    def zero_at_end(p, i, t, tensors):
        seen.append(int(t))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == STEPS - 1 else {}

    out = pipe("a cat", num_inference_steps=STEPS, output_type="latent", callback_on_step_end=zero_at_end).images
    assert len(seen) == STEPS and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_other_schedulers_swap_in_and_match_stable_diffusion_pipeline(scheduler_cls):
    # Euler scales model inputs and starts from σ_max-sized noise; DPM++ keeps a history: a loop that skipped
    # scale_model_input, init_noise_sigma or the scheduler's state would drift from diffusers' own pipeline
    components = tiny_components("diffusers")
    components["scheduler"] = scheduler_cls.from_config(components["scheduler"].config)
    ours = LdmPipeline(**components)
    ours.set_progress_bar_config(disable=True)
    out = generate(ours, guidance_scale=3.0)
    np.testing.assert_allclose(out, generate(sd_pipeline(components), guidance_scale=3.0), atol=1e-4)
    np.testing.assert_array_equal(out, generate(ours, guidance_scale=3.0))


def test_save_load_gives_the_same_image(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "model_index.json").is_file()
    assert list((tmp_path / "unet").glob("*.safetensors"))
    loaded = LdmPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(pipe), generate(loaded))


def sd_pipeline(components) -> StableDiffusionPipeline:
    sd = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd


@pytest.mark.parametrize("kwargs", [
    dict(guidance_scale=1.0),
    dict(guidance_scale=5.0),
    dict(guidance_scale=5.0, negative_prompt="a blue dog"),
    dict(guidance_scale=3.0, eta=1.0, num_images_per_prompt=2),
])
def test_parity_with_diffusers_stable_diffusion_pipeline(kwargs):
    components = tiny_components("diffusers")
    ours = LdmPipeline(**components)
    ours.set_progress_bar_config(disable=True)
    theirs = sd_pipeline(components)
    prompts = ["a cat", "a red heart"]
    if "negative_prompt" in kwargs:
        kwargs = {**kwargs, "negative_prompt": [kwargs["negative_prompt"], ""]}
    np.testing.assert_allclose(generate(ours, prompts, **kwargs), generate(theirs, prompts, **kwargs), atol=1e-4)


def test_stable_diffusion_folder_loads_into_ldm_pipeline(tmp_path):
    components = tiny_components("diffusers")
    sd = sd_pipeline(components)
    sd.save_pretrained(tmp_path)
    ours = LdmPipeline.from_pretrained(tmp_path)
    ours.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(generate(ours, guidance_scale=5.0), generate(sd, guidance_scale=5.0), atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=["a", "b"], negative_prompt=["x"]), "one negative prompt per prompt"),
    (dict(height=30), "multiple of the VAE factor 4"),
    (dict(width=0), "multiple of the VAE factor"),
    (dict(num_inference_steps=0), "use 1 to 999 steps"),
    (dict(num_inference_steps=1000), "use 1 to 999 steps"),  # t would start at 1000, past the schedule
    (dict(guidance_scale=-1.0), "negative"),
])
def test_bad_input_is_a_value_error_that_names_the_fix(pipe, kwargs, match):
    kwargs = {"prompt": "a cat", "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_folder_that_is_not_a_pipeline_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a pipeline folder"):
        LdmPipeline.from_pretrained(tmp_path)
