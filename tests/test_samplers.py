import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from ldm_app import LdmPipeline
from ldm_app.samplers import SAMPLERS, make_scheduler, sampler_from_a1111
from ldm_app.testing import tiny_components, tiny_pipeline


@pytest.fixture(scope="module")
def components():
    return tiny_components("diffusers")


def sample(pipe, seed=0):
    return pipe(["a cat", "a red heart"], num_inference_steps=3, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_sampler_equals_diffusers_stable_diffusion_pipeline_on_the_same_scheduler(components, name):
    config = components["scheduler"].config
    ours = LdmPipeline(**{**components, "scheduler": make_scheduler(name, config)})
    theirs = StableDiffusionPipeline(**{**components, "scheduler": make_scheduler(name, config)}, safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    expected = SAMPLERS[name]
    assert type(ours.scheduler).__name__ == expected.scheduler
    assert ours.scheduler.config.beta_schedule == config.beta_schedule  # the model's own noise schedule
    assert all(ours.scheduler.config[k] == v for k, v in expected.config.items())
    images = sample(ours)
    np.testing.assert_allclose(images, sample(theirs), atol=1e-4)
    assert np.isfinite(images).all()


def test_karras_sigmas_change_the_schedule_and_the_image(components):
    config = components["scheduler"].config
    plain, karras = make_scheduler("dpm++", config), make_scheduler("dpm++-karras", config)
    plain.set_timesteps(4)
    karras.set_timesteps(4)
    assert not torch.equal(plain.timesteps, karras.timesteps)
    images = {}
    for name in ("dpm++", "dpm++-karras"):
        pipe = LdmPipeline(**{**components, "scheduler": make_scheduler(name, config)})
        pipe.set_progress_bar_config(disable=True)
        images[name] = sample(pipe)
    assert np.abs(images["dpm++"] - images["dpm++-karras"]).max() > 1e-3


@pytest.mark.parametrize("a1111, schedule_type, ours", [
    ("DDIM", None, "ddim"),
    ("Euler a", None, "euler-a"),
    ("euler a", "Automatic", "euler-a"),
    ("Euler", "Karras", "euler-karras"),
    ("DPM++ 2M Karras", None, "dpm++-karras"),  # A1111 before 1.9
    ("DPM++ 2M", "Karras", "dpm++-karras"),  # since 1.9
    ("LMS Karras", None, "lms-karras"),
    ("UniPC", None, "unipc"),
    ("Heun", None, "heun"),
    ("DPM++ SDE", None, None),
    ("Euler a", "Karras", None),  # diffusers' ancestral Euler has no Karras σ
    ("PLMS", None, None),
])
def test_a1111_names_map_to_ours(a1111, schedule_type, ours):
    assert sampler_from_a1111(a1111, schedule_type) == ours


def test_every_sampler_reads_back_from_its_a1111_name():
    for name, sampler in SAMPLERS.items():
        back = sampler_from_a1111(sampler.a1111, "Karras" if sampler.karras else None)
        assert back == ("ddim" if name == "ddpm" else name)  # A1111 has no DDPM: DDIM at η = 1 stands for it


def test_unknown_sampler_is_a_value_error(components):
    with pytest.raises(ValueError, match="choose one of ddim, ddpm"):
        make_scheduler("plms", components["scheduler"].config)


def test_ddpm_is_ddim_at_eta_one_until_the_last_step():
    # why PNGs write ddpm as A1111's DDIM with Eta DDIM 1 (Song et al. 2021, §4.1): same draws, same steps
    latents = {}
    for name, eta in (("ddpm", 0.0), ("ddim", 1.0)):
        pipe = tiny_pipeline()
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
        steps = []
        pipe("a cat", num_inference_steps=4, eta=eta, generator=torch.Generator().manual_seed(0), output_type="latent",
             callback_on_step_end=lambda p, i, t, tensors: steps.append(tensors["latents"].clone()) or {})
        latents[name] = steps
    for ddpm, ddim in zip(latents["ddpm"][:-1], latents["ddim"][:-1]):
        torch.testing.assert_close(ddpm, ddim, atol=1e-4, rtol=1e-4)
    # the last step differs: DDPM ends at ᾱ = 1, DDIM at ᾱ_0 (set_alpha_to_one=False)
    assert (latents["ddpm"][-1] - latents["ddim"][-1]).abs().max() > 1e-3
