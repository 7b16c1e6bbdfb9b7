import hashlib
import logging

import numpy as np
import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_app.kohya import kohya_base_problem, lora_short_hash
from ldm_app.lora import KOHYA_FILE, LORA_FILE
from ldm_app.lora_saving import save_lora
from ldm_app.testing import add_random_lora, tiny_pipeline


def generate(pipe):
    return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def trained_pipe(kind="diffusers", text_encoder=True):
    """A pipeline with rank-4, α = 8 adapters whose B is random (as after training)."""
    return add_random_lora(tiny_pipeline(kind), text_encoder=text_encoder, alpha=8)


def tensor_hash(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


@pytest.mark.parametrize("keys, name", [
    ({"lora_unet_a_to_q.hada_w1_a", "lora_unet_a_to_q.hada_w1_b", "lora_unet_a_to_q.hada_w2_a",
      "lora_unet_a_to_q.hada_w2_b", "lora_unet_a_to_q.alpha"}, "LyCORIS LoHa"),
    ({"lora_unet_a_to_q.lokr_w1", "lora_unet_a_to_q.lokr_w2_a", "lora_unet_a_to_q.lokr_w2_b"}, "LyCORIS LoKr"),
    ({"lora_unet_a_to_q.weight", "lora_unet_a_to_q.on_input"}, "(IA)³"),
    ({"lora_unet_a_to_q.oft_blocks", "lora_unet_a_to_q.alpha"}, "OFT"),
    ({"lora_unet_a_to_q.a1.weight", "lora_unet_a_to_q.a2.weight", "lora_unet_a_to_q.b1.weight"}, "GLoRA"),
    ({"lora_unet_a_to_q.diff", "lora_unet_a_to_q.diff_b"}, "full-weight difference"),
    ({"lora_unet_a_conv.lora_down.weight", "lora_unet_a_conv.lora_mid.weight", "lora_unet_a_conv.lora_up.weight"},
     "Tucker"),
    ({"lora_unet_a_to_q.lora_down.weight", "lora_unet_a_to_q.lora_up.weight", "lora_unet_a_to_q.dora_scale"}, "DoRA"),
    ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"}, "SDXL LoRA"),
    ({"transformer.single_blocks.0.attn.to_q.lora_A.weight"}, "transformer model"),
    ({"emb_params"}, "textual-inversion embedding"),
    ({"model.diffusion_model.input_blocks.0.0.weight"}, "full Stable Diffusion checkpoint"),
    ({"some.other.weight"}, "holds no LoRA weights (key 'some.other.weight')"),
])
def test_every_unsupported_format_is_a_one_line_error_naming_it(tmp_path, keys, name):
    path = tmp_path / "file.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, path)
    with pytest.raises(ValueError) as err:
        tiny_pipeline().load_lora_weights(path)
    message = str(err.value)
    assert name in message and str(path) in message and "\n" not in message


def test_kohya_file_is_written_as_sd_scripts_writes_it_and_loads_back_to_the_same_images(tmp_path):
    pipe = trained_pipe()
    expected = generate(pipe)
    save_lora(pipe.unet, pipe.text_encoder, tmp_path, kohya=True)
    path = tmp_path / KOHYA_FILE
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert {k: v for k, v in metadata.items() if k.startswith("ss_")} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "8.0",
        "ss_base_model_version": "sd_v1", "ss_v2": "False"}
    # A1111 indexes the file by sshs_model_hash, which is the SHA-256 of its tensor bytes
    assert metadata["sshs_model_hash"] == tensor_hash(path) and lora_short_hash(path) == tensor_hash(path)[:12]
    assert len(metadata["sshs_legacy_hash"]) == 8
    kohya, diffusers = load_file(path), load_file(tmp_path / LORA_FILE)
    assert {v.dtype for v in kohya.values()} == {torch.float16} and {v.dtype for v in diffusers.values()} == {
        torch.float32}
    alphas = [k for k in kohya if k.endswith(".alpha")]
    assert alphas and all(kohya[k].item() == 8 for k in alphas)
    # sd-scripts keeps up unscaled (α/r applied when loading); the diffusers file has α/r folded in
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    folded = diffusers["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight"]
    torch.testing.assert_close(kohya[f"{name}.lora_up.weight"].float() * 2, folded, atol=2e-3, rtol=2e-3)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)

    fresh = tiny_pipeline("diffusers")
    fresh.load_lora_weights(path)
    np.testing.assert_allclose(generate(fresh), expected, atol=5e-3)  # fp16 storage


def test_kohya_for_an_ldm_unet_says_a1111_and_comfyui_cannot_apply_it(tmp_path, caplog):
    pipe = trained_pipe("ldm", text_encoder=False)
    assert kohya_base_problem(tiny_pipeline("diffusers").unet) is None
    assert "A1111 and ComfyUI cannot load" in kohya_base_problem(pipe.unet)
    with caplog.at_level(logging.WARNING, logger="ldm_app.lora_saving"):
        save_lora(pipe.unet, None, tmp_path, kohya=True)
    assert "A1111 and ComfyUI cannot load" in caplog.text
    with safe_open(tmp_path / KOHYA_FILE, "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "ldm_app_LdmUNet"
    fresh = tiny_pipeline("ldm")
    fresh.load_lora_weights(tmp_path / KOHYA_FILE)  # ldm-app itself applies it
    np.testing.assert_allclose(generate(fresh), generate(pipe), atol=5e-3)


def test_diffusers_file_names_text_encoder_keys_as_older_diffusers_and_comfyui_read_them(tmp_path):
    pipe = trained_pipe()
    expected = pipe.encode_prompt("a red circle", torch.device("cpu"), do_classifier_free_guidance=False)[0]
    save_lora(pipe.unet, pipe.text_encoder, tmp_path)
    state = load_file(tmp_path / LORA_FILE)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight" in state
    assert all(k.startswith(("unet.", "text_encoder.text_model.encoder.layers.")) for k in state)
    # both layouts load: transformers 4's names (written) and transformers 5's (files from before)
    flat = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in state.items()}
    for layout in (state, flat):
        fresh = tiny_pipeline("diffusers")
        fresh.load_lora_weights(dict(layout))
        got = fresh.encode_prompt("a red circle", torch.device("cpu"), do_classifier_free_guidance=False)[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_no_false_text_encoder_warning_when_we_apply_its_keys(tmp_path):
    pipe = trained_pipe()
    save_lora(pipe.unet, pipe.text_encoder, tmp_path)
    unet_only = {k: v for k, v in load_file(tmp_path / LORA_FILE).items() if k.startswith("unet.")}
    seen = Collect()
    logging.getLogger("diffusers").addHandler(seen)  # diffusers' loggers do not propagate to the root
    try:
        # diffusers alone, given the UNet part left once we have applied the text-encoder part, warns ...
        StableDiffusionLoraLoaderMixin.load_lora_weights(tiny_pipeline("diffusers"), unet_only, adapter_name="x")
        assert any(m.startswith("No LoRA keys associated to CLIPTextModel") for m in seen.messages)
        seen.messages.clear()
        # ... our loader applies both parts (file or folder, twice) and does not
        fresh = tiny_pipeline("diffusers")
        fresh.load_lora_weights(tmp_path / LORA_FILE)
        fresh.load_lora_weights(tmp_path, adapter_name="second")
    finally:
        logging.getLogger("diffusers").removeHandler(seen)
    assert not [m for m in seen.messages if "No LoRA keys" in m]
    assert len(fresh.text_encoder.peft_config) == 2 and len(fresh.unet.peft_config) == 2
