"""Code written for diffusers' StableDiffusion pipelines runs unchanged on LdmPipeline and gives the same images.

Each test calls LdmPipeline and the matching diffusers pipeline (`StableDiffusionPipeline`,
`StableDiffusionImg2ImgPipeline`, `StableDiffusionInpaintPipeline`) side by side on the same tiny components
(a diffusers `UNet2DConditionModel`, so both run the very same UNet), the same arguments and the same seeds.
"""

import logging

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from diffusers import (AutoencoderTiny, DDIMScheduler, DiffusionPipeline, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig, inject_adapter_in_model

from ldm_app import LdmPipeline
from ldm_app.hub import make_portable
from ldm_app.testing import tiny_components, tiny_pipeline

STEPS = 3
PROMPTS = ["a cat", "a red heart"]


def tiny_unet(**overrides) -> UNet2DConditionModel:
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=8)
    return UNet2DConditionModel(**{**config, **overrides}).eval()


def pair(cls, components: dict) -> tuple[LdmPipeline, DiffusionPipeline]:
    """LdmPipeline and the diffusers pipeline `cls` over the same component objects."""
    ours = LdmPipeline(**components)
    theirs = cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def run(pipe, prompt="a cat", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    if prompt is not None:
        kwargs["prompt"] = prompt
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def same(ours, theirs, atol=1e-6):
    np.testing.assert_allclose(ours, theirs, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def mask() -> PIL.Image.Image:
    mask = PIL.Image.new("L", (32, 32), 0)
    PIL.ImageDraw.Draw(mask).rectangle((8, 4, 23, 15), fill=255)
    return mask


@pytest.fixture(scope="module")
def text2img():
    return pair(StableDiffusionPipeline, tiny_components("diffusers"))


@pytest.fixture(scope="module")
def img2img():
    return pair(StableDiffusionImg2ImgPipeline, tiny_components("diffusers"))


def as_numpy(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255  # (H, W, 3) in [0, 1]


def as_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(as_numpy(image)).permute(2, 0, 1)  # (3, H, W) in [0, 1]


# ----------------------------------------------------------------------------------------------------------
# 1. Image inputs: PipelineImageInput


@pytest.mark.parametrize("form", ["pil", "numpy", "numpy-batch", "tensor", "tensor-batch", "tensor-minus1-1",
                                  "list-pil", "list-numpy", "list-tensor"])
def test_img2img_takes_every_pipeline_image_input_form(img2img, image, form):
    value = {"pil": image, "numpy": as_numpy(image), "numpy-batch": as_numpy(image)[None], "tensor": as_tensor(image),
             "tensor-batch": as_tensor(image)[None], "tensor-minus1-1": as_tensor(image)[None] * 2 - 1,
             "list-pil": [image, image], "list-numpy": [as_numpy(image)] * 2,
             "list-tensor": [as_tensor(image)] * 2}[form]
    prompt, pil = (PROMPTS, [image, image]) if form.startswith("list") else ("a cat", image)
    ours, theirs = img2img
    got = run(ours, prompt, image=value, strength=0.7, guidance_scale=3.0)
    same(got, run(theirs, prompt, image=value, strength=0.7, guidance_scale=3.0))
    same(got, run(ours, prompt, image=pil, strength=0.7, guidance_scale=3.0), atol=1e-5)  # = the PIL run


def test_inpainting_takes_tensor_images_and_masks(image, mask):
    ours, theirs = pair(StableDiffusionInpaintPipeline, tiny_components("diffusers"))
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]  # (1, 1, H, W)
    kwargs = dict(image=as_tensor(image)[None], mask_image=m, guidance_scale=3.0)
    same(run(ours, paste_back=False, **kwargs), run(theirs, **kwargs))
    same(run(ours, paste_back=False, **kwargs), run(ours, paste_back=False, image=image, mask_image=mask,
                                                    guidance_scale=3.0), atol=1e-5)


def test_img2img_output_keeps_the_inputs_size_rounded_to_the_vae_factor(img2img):
    ours, theirs = img2img
    wide = torch.rand(1, 3, 42, 50, generator=torch.Generator().manual_seed(0))  # → 40 × 48 (factor 4)
    got = run(ours, image=wide, strength=0.6, guidance_scale=3.0)
    assert got.shape == (1, 40, 48, 3)
    same(got, run(theirs, image=wide, strength=0.6, guidance_scale=3.0))
    out = ours("a cat", image=PIL.Image.new("RGB", (42, 50)), strength=0.5, num_inference_steps=2)
    assert out.images[0].size == (40, 48) and out.input_size == (42, 50)


# ----------------------------------------------------------------------------------------------------------
# 2–3. Embeddings, clip_skip, guidance_rescale, LoRA scale per call; encode_prompt on its own


def test_prompt_embeddings_replace_prompts(text2img):
    ours, theirs = text2img
    cond, uncond = ours.encode_prompt(["a cat", "a dog"], ours.device, 1, True, ["a red heart", ""])
    kwargs = dict(prompt=None, prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=4.0)
    got = run(ours, **kwargs)
    same(got, run(theirs, **kwargs))
    same(got, run(ours, ["a cat", "a dog"], negative_prompt=["a red heart", ""], guidance_scale=4.0))
    same(run(ours, prompt=None, prompt_embeds=cond, guidance_scale=4.0, num_images_per_prompt=2),
         run(theirs, prompt=None, prompt_embeds=cond, guidance_scale=4.0, num_images_per_prompt=2))


def test_encode_prompt_works_on_a_pipeline_of_text_encoder_and_tokenizer_alone(text2img):
    ours, theirs = text2img
    text_only = LdmPipeline(vae=None, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=None,
                            scheduler=None)
    for kwargs in (dict(), dict(negative_prompt=["a dog", "x"], num_images_per_prompt=2)):
        args = (PROMPTS, torch.device("cpu"), kwargs.pop("num_images_per_prompt", 1), True)
        for a, b in zip(text_only.encode_prompt(*args, **kwargs), theirs.encode_prompt(*args, **kwargs)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_clip_skip_takes_an_earlier_layer_for_the_prompt_as_diffusers_does(text2img):
    # diffusers' own clip_skip reads `text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has;
    # its rule — the hidden states clip_skip layers before the last, through the final layer norm, for the prompt
    # only — is written out here
    ours, theirs = text2img
    tokens = ours.tokenizer(PROMPTS, padding="max_length", max_length=ours.tokenizer.model_max_length,
                            return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = ours.text_encoder(tokens, output_hidden_states=True).hidden_states
        expected = ours.text_encoder.final_layer_norm(hidden[-2])
    cond, uncond = ours.encode_prompt(PROMPTS, torch.device("cpu"), 1, True, clip_skip=1)
    torch.testing.assert_close(cond, expected, atol=0, rtol=0)
    torch.testing.assert_close(uncond, ours.encode_prompt(PROMPTS, torch.device("cpu"), 1, True)[1], atol=0, rtol=0)
    got = run(ours, PROMPTS, guidance_scale=5.0, clip_skip=1)
    same(got, run(theirs, prompt=None, prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=5.0))
    assert np.abs(got - run(ours, PROMPTS, guidance_scale=5.0)).max() > 1e-3


@pytest.mark.parametrize("kwargs", [dict(guidance_rescale=0.7), dict(eta=1.0, guidance_rescale=0.3)])
def test_guidance_rescale_matches(text2img, kwargs):
    ours, theirs = text2img
    got = run(ours, PROMPTS, guidance_scale=5.0, **kwargs)
    same(got, run(theirs, PROMPTS, guidance_scale=5.0, **kwargs))
    assert np.abs(got - run(ours, PROMPTS, guidance_scale=5.0, eta=kwargs.get("eta", 0.0))).max() > 1e-3


def test_textual_inversion_embeddings_load_and_expand_as_in_diffusers():
    ours, theirs = pair(StableDiffusionPipeline, tiny_components("diffusers"))
    torch.manual_seed(3)
    ours.load_textual_inversion({"<toy>": torch.randn(2, 32)}, token="<toy>")  # two vectors: "<toy> <toy>_1"
    kwargs = dict(negative_prompt="a <toy>", guidance_scale=3.0)
    got = run(ours, "a <toy> cat", **kwargs)
    same(got, run(theirs, "a <toy> cat", **kwargs))  # theirs shares the tokenizer and text encoder ours extended
    assert np.abs(got - run(ours, "a cat", negative_prompt="a", guidance_scale=3.0)).max() > 1e-3


def test_lora_scale_per_call_through_cross_attention_kwargs():
    components = tiny_components("diffusers")
    torch.manual_seed(1)
    config = dict(r=4, lora_alpha=4, init_lora_weights=False)  # random B: the adapter changes the output
    components["unet"].add_adapter(LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"], **config))
    inject_adapter_in_model(LoraConfig(target_modules=["q_proj", "v_proj"], **config), components["text_encoder"])
    ours, theirs = pair(StableDiffusionPipeline, components)
    half = run(ours, guidance_scale=3.0, cross_attention_kwargs={"scale": 0.5})
    same(half, run(theirs, guidance_scale=3.0, cross_attention_kwargs={"scale": 0.5}))
    full = run(ours, guidance_scale=3.0)
    same(full, run(theirs, guidance_scale=3.0))  # the scale was undone after the call
    assert np.abs(half - full).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# 4. Custom schedules


@pytest.mark.parametrize("schedule", [dict(timesteps=[999, 600, 250]), dict(sigmas=[14.0, 3.0, 0.5])])
def test_custom_timesteps_and_sigmas(schedule):
    components = tiny_components("diffusers")
    components["scheduler"] = EulerDiscreteScheduler.from_config(components["scheduler"].config)
    ours, theirs = pair(StableDiffusionPipeline, components)
    got = run(ours, guidance_scale=3.0, **schedule)
    same(got, run(theirs, guidance_scale=3.0, **schedule))
    assert ours.num_timesteps == theirs.num_timesteps == len(ours.scheduler.timesteps)


def test_a_scheduler_without_custom_timesteps_gives_diffusers_error(text2img):
    ours, theirs = text2img  # DDIM
    for pipe in (ours, theirs):
        with pytest.raises(ValueError, match="does not support custom timestep schedules"):
            run(pipe, timesteps=[999, 500])


# ----------------------------------------------------------------------------------------------------------
# 5. Step callbacks see the pipeline's state


def test_cfg_cutoff_callback_dynamic_guidance_and_num_timesteps(text2img):
    ours, theirs = text2img
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)
    got = run(ours, guidance_scale=5.0, callback_on_step_end=cutoff)
    assert ours.num_timesteps == STEPS and ours.guidance_scale == 0.0 and not ours.do_classifier_free_guidance
    same(got, run(theirs, guidance_scale=5.0, callback_on_step_end=cutoff))
    assert np.abs(got - run(ours, guidance_scale=5.0)).max() > 1e-4

    def ramp(pipe, i, t, tensors):  # dynamic CFG: w grows every step
        pipe._guidance_scale = pipe.guidance_scale + 2.0
        return {}
    same(run(ours, guidance_scale=2.0, callback_on_step_end=ramp), run(theirs, guidance_scale=2.0,
                                                                         callback_on_step_end=ramp))


def test_interrupt_from_a_callback_stops_the_loop(text2img):
    ours, theirs = text2img
    seen = []

    def stop_after_first(pipe, i, t, tensors):
        seen.append(i)
        pipe._interrupt = True
        return tensors

    got = run(ours, guidance_scale=3.0, output_type="latent", callback_on_step_end=stop_after_first,
              callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"])
    assert seen == [0] and ours.interrupt
    same(got, run(theirs, guidance_scale=3.0, output_type="latent", callback_on_step_end=stop_after_first))
    for pipe in (ours, theirs):
        with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
            run(pipe, callback_on_step_end=stop_after_first, callback_on_step_end_tensor_inputs=["noise_pred"])


# ----------------------------------------------------------------------------------------------------------
# 6, 11. Inpainting: masked_image_latents, stochastic samplers with an ordinary UNet


def test_masked_image_latents_for_an_inpainting_unet(image, mask):
    components = tiny_components("diffusers")
    components["unet"] = tiny_unet(in_channels=9)
    ours, theirs = pair(StableDiffusionInpaintPipeline, components)
    pixels = ours.image_processor.preprocess(image)
    masked = ours.encode_image(pixels * (ours.mask_processor.preprocess(mask) < 0.5)).detach()
    kwargs = dict(image=image, mask_image=mask, masked_image_latents=masked, guidance_scale=3.0)
    got = run(ours, paste_back=False, **kwargs)
    same(got, run(theirs, **kwargs))
    assert np.abs(got - run(ours, paste_back=False, image=image, mask_image=mask, guidance_scale=3.0)).max() > 1e-4


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_ordinary_unet_inpainting_with_a_stochastic_sampler(image, mask, strength):
    components = tiny_components("diffusers")
    components["scheduler"] = EulerAncestralDiscreteScheduler.from_config(components["scheduler"].config)
    ours, theirs = pair(StableDiffusionInpaintPipeline, components)
    kwargs = dict(image=image, mask_image=mask, guidance_scale=3.0, strength=strength)
    # the same draws (a skipped masked-image sample would shift every later one by ~0.1); σ-scaled float rounding
    same(run(ours, PROMPTS, paste_back=False, **kwargs), run(theirs, PROMPTS, **kwargs), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 7. Guidance-distilled (LCM) UNets


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_unets_with_time_cond_proj_dim_get_the_guidance_embedding_and_no_cfg_batch(guidance_scale):
    components = tiny_components("diffusers")
    components["unet"] = tiny_unet(time_cond_proj_dim=16)
    components["scheduler"] = LCMScheduler.from_config(components["scheduler"].config)
    ours, theirs = pair(StableDiffusionPipeline, components)
    batches = []
    hook = ours.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        got = run(ours, PROMPTS, guidance_scale=guidance_scale, num_inference_steps=2)
    finally:
        hook.remove()
    assert batches == [2, 2] and not ours.do_classifier_free_guidance
    same(got, run(theirs, PROMPTS, guidance_scale=guidance_scale, num_inference_steps=2))


# ----------------------------------------------------------------------------------------------------------
# 8. AutoencoderTiny (TAESD)


def test_autoencoder_tiny_encodes_and_decodes(image):
    components = tiny_components("diffusers")
    torch.manual_seed(0)
    components["vae"] = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                                        num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1)).eval()
    ours, theirs = pair(StableDiffusionImg2ImgPipeline, components)
    assert ours.vae_scale_factor == 4
    same(run(ours, image=image, strength=0.6, guidance_scale=3.0), run(theirs, image=image, strength=0.6,
                                                                        guidance_scale=3.0))


# ----------------------------------------------------------------------------------------------------------
# 10. steps_offset fix-up


def test_a_steps_offset_0_scheduler_is_fixed_up_as_diffusers_does():
    components = tiny_components("diffusers")
    config = {**components["scheduler"].config, "steps_offset": 0}
    ours = LdmPipeline(**{**components, "scheduler": DDIMScheduler.from_config(config)})
    ours.set_progress_bar_config(disable=True)
    assert ours.scheduler.config.steps_offset == 1
    ours.scheduler.set_timesteps(2)
    assert ours.scheduler.timesteps.tolist() == [501, 1]
    theirs = StableDiffusionPipeline(**{**components, "scheduler": DDIMScheduler.from_config(config)},
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    same(run(ours, guidance_scale=3.0, num_inference_steps=2), run(theirs, guidance_scale=3.0, num_inference_steps=2))


# ----------------------------------------------------------------------------------------------------------
# FreeU and fused QKV projections (StableDiffusionMixin), output tuples


def test_freeu_and_fused_qkv_projections_as_stable_diffusion_mixin_offers_them():
    ours, theirs = pair(StableDiffusionPipeline, tiny_components("diffusers"))
    plain = run(ours, guidance_scale=3.0)
    ours.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # on the shared UNet: both pipelines use it
    freeu = run(ours, guidance_scale=3.0)
    same(freeu, run(theirs, guidance_scale=3.0))
    assert np.abs(freeu - plain).max() > 1e-4
    ours.disable_freeu()
    ours.fuse_qkv_projections()
    same(run(ours, guidance_scale=3.0), plain, atol=1e-5)  # the same maths in one matmul
    images, nsfw = ours("a cat", num_inference_steps=1, output_type="np", return_dict=False)
    assert images.shape == (1, 32, 32, 3) and nsfw is None


def test_freeu_and_qkv_fusion_on_ldm_unet_are_clear_errors():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="FreeU needs diffusers' UNet2DConditionModel"):
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(ValueError, match="unet=False"):
        pipe.fuse_qkv_projections()


# ----------------------------------------------------------------------------------------------------------
# 12. Portable exports load in plain diffusers without the "Expected types" warning


def test_plain_diffusers_loads_an_export_without_a_type_warning(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    make_portable(tmp_path)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    root = diffusers_logging.get_logger("diffusers")
    root.addHandler(handler)
    try:
        loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    finally:
        root.removeHandler(handler)
    assert type(loaded.unet).__name__ == "LdmUNet"
    assert not [r for r in records if "Expected types" in r], records
