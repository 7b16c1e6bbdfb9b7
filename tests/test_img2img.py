"""Image-to-image (SDEdit), inpainting and the shared denoising loop: diffusers parity, properties, bad input."""

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline, UNet2DConditionModel)

from ldm_app import LdmPipeline
from ldm_app.pipeline import feathered_mask
from ldm_app.testing import tiny_components, tiny_pipeline

STEPS = 4
PROMPTS = ["a cat", "a red heart"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def mask() -> PIL.Image.Image:
    """White (repaint) in the upper middle; 13×11 pixels, so not aligned to the VAE's 4-pixel grid."""
    mask = PIL.Image.new("L", (32, 32), 0)
    PIL.ImageDraw.Draw(mask).rectangle((9, 5, 21, 15), fill=255)
    return mask


def run(pipe, prompt="a cat", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def diffusers_pipeline(cls, components):
    theirs = cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def ours_and_theirs(cls, components):
    ours = LdmPipeline(**components)
    ours.set_progress_bar_config(disable=True)
    return ours, diffusers_pipeline(cls, components)


def inpainting_components() -> dict:
    """tiny_components with a 9-channel UNet (latents + mask + masked-image latents), as SD's inpainting models."""
    components = tiny_components("diffusers")
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    return components


# ----------------------------------------------------------------------------------------------------------
# Image-to-image


@pytest.mark.parametrize("kwargs", [
    dict(strength=0.5, guidance_scale=1.0),
    dict(strength=0.75, guidance_scale=5.0, negative_prompt=["a blue dog", ""]),
    dict(strength=0.3, guidance_scale=3.0, eta=1.0, num_images_per_prompt=2),
])
def test_img2img_parity_with_diffusers(image, kwargs):
    ours, theirs = ours_and_theirs(StableDiffusionImg2ImgPipeline, tiny_components("diffusers"))
    np.testing.assert_allclose(run(ours, PROMPTS, image=image, **kwargs), run(theirs, PROMPTS, image=image, **kwargs),
                               atol=1e-4)


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_img2img_parity_with_diffusers_for_schedulers_that_start_mid_way(image, scheduler_cls):
    # Euler's add_noise and step look up σ by step index: starting the loop part-way must tell them where
    components = tiny_components("diffusers")
    components["scheduler"] = scheduler_cls.from_config(components["scheduler"].config)
    ours, theirs = ours_and_theirs(StableDiffusionImg2ImgPipeline, components)
    kwargs = dict(image=image, strength=0.6, guidance_scale=3.0)
    np.testing.assert_allclose(run(ours, **kwargs), run(theirs, **kwargs), atol=1e-4)


def test_strength_0_is_the_vae_round_trip_and_1_ignores_the_input(pipe, image):
    pixels = pipe.image_processor.preprocess(image)
    latents = pipe.encode_image(pixels, torch.Generator().manual_seed(0), sample=True)  # the same posterior sample
    round_trip = pipe.image_processor.postprocess(pipe.decode_latents(latents).detach(), output_type="np")
    out = pipe("a cat", image=image, strength=0.0, num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(0), output_type="np")
    np.testing.assert_allclose(out.images, round_trip, atol=1e-6)
    assert (out.strength, out.denoising_steps) == (0.0, 0)

    other = PIL.Image.new("RGB", (32, 32), "white")
    full = run(pipe, image=image, strength=1.0)
    np.testing.assert_array_equal(full, run(pipe, image=other, strength=1.0))
    np.testing.assert_array_equal(full, run(pipe))  # exactly text-to-image with the same seed


def test_more_strength_moves_further_from_the_input(pipe, image):
    # in latent space: the tiny random VAE decodes anything to much the same blur
    x_0 = pipe.encode_image(pipe.image_processor.preprocess(image)).detach()
    distances = [(pipe("a cat", image=image, strength=s, num_inference_steps=10, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images - x_0).square().mean().item()
                 for s in (0.2, 0.5, 1.0)]
    assert distances[0] < distances[1] < distances[2], distances


def test_img2img_batch_with_generator_list_equals_single_runs(pipe, image):
    batch = pipe(PROMPTS, image=image, strength=0.6, num_inference_steps=STEPS, output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    singles = [run(pipe, p, seed=s, image=image, strength=0.6)[0] for p, s in zip(PROMPTS, (0, 1))]
    np.testing.assert_allclose(batch, np.stack(singles), atol=1e-5)


def test_output_reports_strength_steps_and_input_size(pipe, image, mask):
    out = pipe("a cat", image=image, num_inference_steps=10, output_type="np")
    assert (out.strength, out.denoising_steps, out.input_size) == (0.8, 8, (32, 32))
    out = pipe("a cat", image=image, strength=0.35, num_inference_steps=10, output_type="np")
    assert (out.strength, out.denoising_steps) == (0.35, 3)  # int(10 · 0.35) steps, as diffusers runs
    out = pipe("a cat", image=image, mask_image=mask, num_inference_steps=STEPS, output_type="np")
    assert (out.strength, out.denoising_steps) == (1.0, STEPS)
    out = pipe("a cat", num_inference_steps=2, output_type="np")
    assert (out.strength, out.denoising_steps, out.input_size) == (None, None, None)


def test_other_sizes_are_resized_to_cover_and_center_cropped(pipe):
    wide = PIL.Image.new("RGB", (96, 32), "white")
    PIL.ImageDraw.Draw(wide).rectangle((32, 0, 63, 31), fill=(220, 40, 40))  # red middle third
    pixels, mask, size = pipe.preprocess_images(wide, PIL.Image.new("L", (96, 32), 255), 32, 32)
    assert pixels.shape == (1, 3, 32, 32) and mask.shape == (1, 1, 32, 32) and size == (96, 32)
    red = torch.tensor([220, 40, 40]) / 127.5 - 1
    torch.testing.assert_close(pixels[0, :, :, 1:-1], red[:, None, None].expand(3, 32, 30), atol=0.02, rtol=0)
    out = pipe("a cat", image=wide, strength=0.5, num_inference_steps=STEPS, height=16, width=32, output_type="np")
    assert out.images.shape == (1, 16, 32, 3) and out.input_size == (96, 32)


# ----------------------------------------------------------------------------------------------------------
# Inpainting


@pytest.mark.parametrize("kwargs", [
    dict(guidance_scale=5.0),  # strength 1: the masked region from pure noise
    dict(strength=0.5, guidance_scale=3.0, num_images_per_prompt=2),
])
def test_inpaint_parity_with_diffusers_for_an_ordinary_unet(image, mask, kwargs):
    # η = 0: diffusers also VAE-encodes the masked image, unused by a 4-channel UNet, with the generator after the
    # noise; we skip that encode, so only steps that draw fresh noise (η > 0) would differ
    ours, theirs = ours_and_theirs(StableDiffusionInpaintPipeline, tiny_components("diffusers"))
    kwargs = dict(image=image, mask_image=mask, **kwargs)
    np.testing.assert_allclose(run(ours, PROMPTS, paste_back=False, **kwargs), run(theirs, PROMPTS, **kwargs),
                               atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(guidance_scale=5.0), dict(strength=0.5, guidance_scale=1.0, eta=1.0)])
def test_inpaint_parity_with_diffusers_for_an_inpainting_unet(image, mask, kwargs):
    ours, theirs = ours_and_theirs(StableDiffusionInpaintPipeline, inpainting_components())
    kwargs = dict(image=image, mask_image=mask, **kwargs)
    out = run(ours, paste_back=False, **kwargs)
    assert out.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(out, run(theirs, **kwargs), atol=1e-4)


def test_paste_back_keeps_unmasked_pixels_exact_and_repaints_the_mask(pipe, image, mask):
    out = pipe("a cat", image=image, mask_image=mask, num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(0)).images[0]
    original, result = np.asarray(image, dtype=int), np.asarray(out, dtype=int)
    inside = np.asarray(mask) > 127
    np.testing.assert_array_equal(result[~inside], original[~inside])
    assert np.abs(result[inside] - original[inside]).mean() > 10  # a random UNet's repaint: far from the input
    unpasted = run(pipe, image=image, mask_image=mask, paste_back=False)[0]
    assert np.abs(unpasted[~inside] * 255 - original[~inside]).max() > 1  # without it, the VAE round trip shows


def test_a_masks_alpha_is_ignored_so_strokes_on_a_transparent_layer_work(pipe, image):
    strokes = PIL.Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent black, white strokes: repaint the strokes
    PIL.ImageDraw.Draw(strokes).rectangle((8, 8, 15, 15), fill=(255, 255, 255, 255))
    _, mask, _ = pipe.preprocess_images(image, strokes, 32, 32)
    assert mask.sum() == 64 and mask[0, 0, 8:16, 8:16].all()


def test_feathered_mask_ramps_inside_and_is_zero_outside():
    mask = torch.zeros(1, 1, 12, 12)
    mask[..., 2:10, 0:10] = 1  # touches the left border
    soft = feathered_mask(mask, 3)
    assert torch.equal(soft[mask == 0], torch.zeros(int((mask == 0).sum())))
    # row 5: the nearest unmasked pixels are column 10 and rows 1 and 10 (4 away); the left border is no edge
    row = soft[0, 0, 5, :10]
    torch.testing.assert_close(row, torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3]), atol=1e-6, rtol=0)
    assert torch.equal(feathered_mask(mask, 0), mask)


# ----------------------------------------------------------------------------------------------------------
# The shared loop


def test_callbacks_may_replace_prompt_embeddings_mid_loop(pipe):
    # the same run split in two at step 2 (DDIM keeps no state between steps) equals one run whose hook swaps
    # the prompt after step 1: per-step conditioning needs no loop of its own
    cat, _ = pipe.encode_prompt("a cat", pipe.device, 1, False)
    heart, _ = pipe.encode_prompt("a red heart", pipe.device, 1, False)
    empty, _ = pipe.encode_prompt("", pipe.device, 1, False)
    pipe.scheduler.set_timesteps(STEPS)
    timesteps = pipe.scheduler.timesteps
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def swap(p, i, t, tensors):
        return {"prompt_embeds": heart} if i == 1 else {}

    with torch.no_grad():
        hooked = pipe.denoise(x_T, timesteps, cat, empty, 3.0, callbacks=[swap])
        split = pipe.denoise(pipe.denoise(x_T, timesteps[:2], cat, empty, 3.0), timesteps[2:], heart, empty, 3.0)
        plain = pipe.denoise(x_T, timesteps, cat, empty, 3.0)
    torch.testing.assert_close(hooked, split, atol=1e-6, rtol=0)
    assert (hooked - plain).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(strength=-0.1), r"use a value in \[0, 1\]"),
    (dict(strength=1.5), r"use a value in \[0, 1\]"),
    (dict(mask_image=PIL.Image.new("L", (16, 32), 255)), "pass a mask of the image's size"),
    (dict(mask_image=PIL.Image.new("L", (32, 32), 0)), "nothing to repaint"),
    (dict(mask_image="mask.png"), "mask_image must be a PIL image.*read_image"),
    (dict(mask_image=PIL.Image.new("L", (32, 32), 255), mask_feather=-1), "mask_feather"),
    (dict(image=None, strength=0.5), "needs an input image"),
    (dict(image=None, mask_image=PIL.Image.new("L", (32, 32), 255)), "needs an input image"),
    (dict(image="photo.png"), "image must be a PIL image.*read_image"),  # arrays and tensors are images too now
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "not offered"),
])
def test_bad_image_input_is_a_value_error_that_names_the_fix(pipe, image, kwargs, match):
    kwargs = {"image": image, "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe("a cat", **kwargs)


def test_an_inpainting_unet_asks_for_a_mask(image):
    pipe = LdmPipeline(**inpainting_components())
    with pytest.raises(ValueError, match="inpainting model; pass mask_image"):
        pipe("a cat", image=image, num_inference_steps=2)
    with pytest.raises(ValueError, match="pass image= and mask_image="):
        pipe("a cat", num_inference_steps=2)
