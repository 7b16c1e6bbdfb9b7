"""Single-file SD-1.x checkpoints, fp16-variant folders and `load_model`'s dispatch."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm_app.pipeline import LdmPipeline, cast_quietly
from ldm_app.loading import load_model
from ldm_app.single_file import SD_V1_CONFIG, checkpoint_family
from ldm_app.testing import tiny_pipeline

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key(key: str, unet: UNet2DConditionModel) -> str:
    """A diffusers UNet key → the CompVis key (the inverse of diffusers' convert_ldm_unet_checkpoint)."""
    per_level = unet.config.layers_per_block + 1  # input_blocks per down level (layers + downsampler)
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    for old, new in RESNET.items():
        key = re.sub(rf"(resnets\.\d+)\.{old}\.", rf"\1.{new}.", key)
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + i * per_level + j}.{0 if kind == 'resnets' else 1}.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[2]) if m[1] == 'resnets' else 1}.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * per_level + j}.{0 if kind == 'resnets' else 1}.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        i = int(m[1])
        slot = 2 if "CrossAttn" in unet.config.up_block_types[i] else 1
        return f"output_blocks.{i * per_level + per_level - 1}.{slot}.{m[2]}"
    raise AssertionError(f"unmapped UNet key {key}")


def _vae_key(key: str, levels: int) -> str:
    """A diffusers VAE key → the CompVis key."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    return key


def to_original_layout(pipe: LdmPipeline | SimpleNamespace) -> dict[str, torch.Tensor]:
    """A diffusers-UNet pipeline's weights (unet, vae, text_encoder) as an A1111/CompVis single file holds them."""
    state = {f"model.diffusion_model.{_unet_key(k, pipe.unet)}": v for k, v in pipe.unet.state_dict().items()}
    levels = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        is_attention_linear = ".attentions.0.to_" in k and k.endswith("weight")  # 1×1 convs in the original
        state[f"first_stage_model.{_vae_key(k, levels)}"] = v[:, :, None, None] if is_attention_linear else v
    for k, v in pipe.text_encoder.state_dict().items():
        state[f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}"] = v
    positions = pipe.text_encoder.config.max_position_embeddings  # a buffer real files carry (transformers 4.2x)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return {k: v.contiguous() for k, v in state.items()}


def _image(pipe: LdmPipeline) -> np.ndarray:
    return pipe("a red cat", num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


def test_a_single_file_checkpoint_gives_the_same_image_as_the_components_it_was_made_from(tmp_path):
    pipe = cast_quietly(tiny_pipeline("diffusers"), torch.float16)  # stored in fp16, as most shared files are
    pipe.save_pretrained(tmp_path / "config")  # the diffusers-format configs and tokenizer of this tiny model
    save_file(to_original_layout(pipe), tmp_path / "model.safetensors")
    pipe = cast_quietly(pipe, torch.float32)
    loaded = LdmPipeline.from_single_file(tmp_path / "model.safetensors", config=tmp_path / "config")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, LdmPipeline)
    assert {m.dtype for m in (loaded.unet, loaded.vae, loaded.text_encoder)} == {torch.float32}  # fp32 unless told
    np.testing.assert_allclose(_image(loaded), _image(pipe), atol=1e-5)


def test_the_shipped_sd_v1_configs_describe_the_real_model():
    # SD-1.5's published sizes: 859.52 M UNet, 83.65 M VAE, 123.06 M text-encoder parameters; CLIP's token ids
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD_V1_CONFIG, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD_V1_CONFIG, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD_V1_CONFIG, subfolder="text_encoder"))
    sizes = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text_encoder)]
    assert sizes == [859_520_964, 83_653_863, 123_060_480]
    tokenizer = CLIPTokenizer.from_pretrained(SD_V1_CONFIG, subfolder="tokenizer")
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_the_full_size_sd_v1_layout_is_detected_and_converts_to_the_shipped_configs():
    # shape-only (meta) SD-1.5 components from the shipped configs, in the CompVis layout: no memory, no download
    with init_empty_weights():
        full = SimpleNamespace(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD_V1_CONFIG, subfolder="unet")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(SD_V1_CONFIG, subfolder="vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(SD_V1_CONFIG, subfolder="text_encoder")))
    state = to_original_layout(full)
    assert state["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in state  # keys every v1 file has
    assert checkpoint_family(state) == "v1"
    for model, converted in ((full.unet, convert_ldm_unet_checkpoint(state, full.unet.config)),
                             (full.vae, convert_ldm_vae_checkpoint(state, full.vae.config))):
        assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}
    unprefixed = {k.removeprefix("text_model.") for k in convert_ldm_clip_checkpoint(state)}
    expected = {k.removeprefix("text_model.") for k in full.text_encoder.state_dict()}
    assert unprefixed - {"embeddings.position_ids"} == expected - {"embeddings.position_ids"}  # a buffer or not


@pytest.mark.parametrize("keys, named", [
    ({"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(1, 1024)},
     "Stable Diffusion 2.x"),
    ({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1)}, "SDXL"),
    ({"cond_stage_model.model.positional_embedding": torch.zeros(1)}, "Stable Diffusion 2.x"),
])
def test_other_families_get_a_one_line_error_naming_what_is_supported(tmp_path, keys, named):
    path = tmp_path / "other.safetensors"
    save_file({**{"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1)}, **keys}, path)
    with pytest.raises(ValueError, match=f"is {named}; single files of Stable Diffusion 1.x") as error:
        load_model(str(path))
    assert "\n" not in str(error.value)


def test_incomplete_unknown_and_pickled_files_are_refused(tmp_path):
    path = tmp_path / "unet_only.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1)}, path)
    with pytest.raises(ValueError, match="has no VAE and no CLIP text encoder weights"):
        load_model(path)
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a Stable Diffusion UNet checkpoint"):
        load_model(path)
    path.write_bytes(b"half a download")
    with pytest.raises(ValueError, match="is not a readable .safetensors file .*; download it again"):
        load_model(path)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"never read")
    with pytest.raises(ValueError, match="pickle checkpoint .* never loads pickles"):
        load_model(pickle)


def test_a_folder_of_fp16_variant_files_loads_with_its_variant(tmp_path):
    pipe = tiny_pipeline("diffusers")
    cast_quietly(pipe, torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    assert not list((tmp_path / "fp16").glob("*/diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="holds only fp16 variant weights; pass variant='fp16'"):
        load_model(tmp_path / "fp16")
    with pytest.raises(ValueError, match="no 'bf16' variant weights"):
        load_model(tmp_path / "fp16", variant="bf16")
    loaded = load_model(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    expected = _image(cast_quietly(pipe, torch.float32))  # the same fp16-rounded weights, in fp32
    np.testing.assert_allclose(_image(loaded), expected, atol=1e-5)


def test_load_model_dispatches_default_and_folders(tmp_path):
    assert load_model("default").unet.config.sample_size == LdmPipeline.from_default().unet.config.sample_size
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    assert type(load_model(tmp_path / "pipe").unet).__name__ == "LdmUNet"
    with pytest.raises(ValueError, match="is for pipeline folders"):
        load_model(tmp_path / "model.safetensors", variant="fp16")


def test_finetune_lora_takes_a_single_file_and_a_failed_start_leaves_nothing_behind(tmp_path, monkeypatch):
    import shutil

    from ldm_app import single_file
    from ldm_app.finetune import finetune_lora
    from ldm_app.lora import LORA_FILE
    from ldm_app.testing import write_toy_dataset

    pipe = tiny_pipeline("diffusers")
    pipe.save_pretrained(tmp_path / "config")  # the tiny model's configs stand in for the shipped SD-1.x ones
    save_file(to_original_layout(pipe), tmp_path / "base.safetensors")
    monkeypatch.setattr(single_file, "SD_V1_CONFIG", tmp_path / "config")
    photos = write_toy_dataset(tmp_path / "photos", n=2, layout="sidecar")
    kwargs = dict(model=str(tmp_path / "base.safetensors"), steps=2, batch_size=2, rank=4)

    # the trainer refuses to start (no room for a checkpoint) after the photos were staged and its config written
    real = shutil.disk_usage
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=0))
        with pytest.raises(ValueError, match="MiB free"):
            finetune_lora(photos, tmp_path / "failed", **kwargs)
    assert not (tmp_path / "failed").exists()

    result = finetune_lora(photos, tmp_path / "lora", **kwargs)
    assert result.lora_file == tmp_path / "lora" / LORA_FILE and result.lora_file.is_file() and result.grid.is_file()
