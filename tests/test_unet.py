import json

import pytest
import torch
from torch import nn

from ldm_app import UNET_PRESETS, LdmUNet
from ldm_app.pipeline import DEFAULT_MODEL_DIR


def tiny_unet(**overrides) -> LdmUNet:
    torch.manual_seed(0)
    return LdmUNet.from_preset("tiny", sample_size=8, **overrides)


@pytest.mark.parametrize("timestep", [10, torch.tensor(10), torch.tensor([1, 500, 999])])
def test_output_shape_matches_input_for_scalar_and_per_sample_timesteps(timestep):
    unet = tiny_unet()
    x = torch.randn(3, 4, 8, 8)
    out = unet(x, timestep, encoder_hidden_states=torch.randn(3, 7, 32))
    assert out.sample.shape == x.shape
    assert unet(x, timestep, encoder_hidden_states=torch.randn(3, 7, 32), return_dict=False)[0].shape == x.shape


def test_non_square_and_three_level_shapes():
    unet = LdmUNet(block_out_channels=(16, 32, 32), attention_levels=(False, True, True), layers_per_block=1,
                   attention_head_dim=8, cross_attention_dim=12, norm_num_groups=8)
    x = torch.randn(2, 4, 8, 16)
    assert unet(x, 3, torch.randn(2, 5, 12)).sample.shape == x.shape
    odd = torch.randn(1, 4, 17, 10)  # 17 → 9 → 5 down, 5 → 9 → 17 up (68×40 images through an f=4 VAE)
    assert unet(odd, 3, torch.randn(1, 5, 12)).sample.shape == odd.shape


def test_gradients_reach_every_parameter():
    unet = tiny_unet()
    for p in unet.parameters():  # undo the zero-inits, which (correctly) block gradients at step 0
        nn.init.normal_(p, std=0.05)
    loss = unet(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 7, 32)).sample.square().mean()
    loss.backward()
    silent = [n for n, p in unet.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not silent


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 7, 32)
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        for p in unet.parameters():
            nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
        calls = []
        if checkpointing:
            unet.enable_gradient_checkpointing()
            checkpoint = unet._gradient_checkpointing_func
            unet._gradient_checkpointing_func = lambda *args: calls.append(1) or checkpoint(*args)
        unet(x, t, ctx).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
        blocks = len(unet.down_layers) + len(unet.mid_block) + len(unet.up_layers)
        assert len(calls) == (blocks if checkpointing else 0)  # every block went through the checkpoint wrapper
    torch.testing.assert_close(grads[0], grads[1])


def text_effect(unet: LdmUNet, cross_attention: bool) -> float:
    """How much two different texts change the prediction; without `cross_attention` its keys and values are
    zeroed, so the attention output no longer depends on the text."""
    for p in unet.parameters():
        nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    if not cross_attention:
        for name, m in unet.named_modules():  # to_k / to_v reading the text: those of the cross-attentions
            if name.endswith(("to_k", "to_v")) and m.in_features == unet.config.cross_attention_dim:
                nn.init.zeros_(m.weight)
    x, g = torch.randn(1, 4, 8, 8), torch.Generator().manual_seed(0)
    with torch.no_grad():
        a = unet(x, 5, torch.randn(1, 7, 32, generator=g)).sample
        b = unet(x, 5, torch.randn(1, 7, 32, generator=g)).sample
    return (a - b).abs().max().item()


def test_text_enters_through_the_pooled_path_and_through_cross_attention_each_alone():
    assert text_effect(tiny_unet(), cross_attention=False) > 1e-4  # pooled path alone
    assert text_effect(tiny_unet(pooled_text_conditioning=False), cross_attention=True) > 1e-4  # cross-attn alone
    assert text_effect(tiny_unet(pooled_text_conditioning=False), cross_attention=False) == 0  # control: neither


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_runs_and_tracks_fp32(dtype):
    unet = tiny_unet()
    for p in unet.parameters():
        nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad():
        reference = unet(x, torch.tensor([3, 700]), ctx).sample
        half = unet.to(dtype)(x.to(dtype), torch.tensor([3, 700]), ctx.to(dtype)).sample
    assert half.dtype == dtype
    # measured: bf16 0.5 %, fp16 0.06 % of the largest output; dropping the text or swapping timesteps costs 2-4 %
    tolerance = {torch.bfloat16: 0.01, torch.float16: 0.002}[dtype]
    torch.testing.assert_close(half.float(), reference, atol=tolerance * reference.abs().max().item(), rtol=0)


def test_save_load_round_trip_is_exact(tmp_path):
    unet = tiny_unet()
    for p in unet.parameters():
        nn.init.normal_(p, std=0.05)
    unet.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = LdmUNet.from_pretrained(tmp_path)

    def public(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k[0] != "_"}

    assert public(loaded.config) == public(unet.config)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad():
        assert torch.equal(unet(x, 9, ctx).sample, loaded(x, 9, ctx).sample)


def test_attention_projections_are_named_for_peft():
    names = {n.rsplit(".", 1)[-1] for n, m in tiny_unet().named_modules() if isinstance(m, nn.Linear)}
    assert {"to_q", "to_k", "to_v"} <= names
    assert any(n.endswith("to_out.0") for n, _ in tiny_unet().named_modules())


def test_presets_grow_small_is_the_default_models_and_unknown_names_list_the_choices():
    sizes = {name: sum(p.numel() for p in LdmUNet.from_preset(name).parameters()) for name in UNET_PRESETS}
    assert sizes["tiny"] < sizes["small"] < sizes["base"]
    shipped = json.loads((DEFAULT_MODEL_DIR / "unet" / "config.json").read_text())
    shipped.setdefault("time_cond_proj_dim", None)  # added after the model shipped: None = no guidance input
    small = LdmUNet.from_preset("small", sample_size=shipped["sample_size"]).config
    assert all(list(v) == shipped[k] if isinstance(v, tuple) else v == shipped[k]
               for k, v in small.items() if not k.startswith("_"))
    with pytest.raises(ValueError, match="tiny"):
        LdmUNet.from_preset("huge")


def test_mismatched_attention_levels_is_a_clear_error():
    with pytest.raises(ValueError, match="one True/False per level"):
        LdmUNet(block_out_channels=(8, 16), attention_levels=(True,))
