"""LdmUNet: the project's own ε-prediction UNet for latent diffusion.

Layout follows the latent-diffusion UNet (Rombach et al. 2022): a sinusoidal timestep embedding, ResNet
blocks with timestep scale-shift, transformer blocks with self-attention and cross-attention to the text
encoder's hidden states, and a down path / middle / up path joined by skip connections. The call signature
is that of diffusers' `UNet2DConditionModel`, so schedulers, pipelines, peft and `save_pretrained` just work.

Order in this file: helpers → embeddings → attention → blocks → the model → size presets.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

# ----------------------------------------------------------------------------------------------------------
# Helpers


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so a residual branch starts as the identity (stable early training)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Embeddings


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in "Attention is all you need" / DDPM.

    Returns (B, dim) with the cosine half first, matching diffusers' `flip_sin_to_cos=True`.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Module):
    """Sinusoidal features → MLP, the conditioning vector every ResNet block reads.

    With `cond_dim` (a latent consistency model's guidance-scale embedding, `timestep_cond`) a bias-free linear
    projection of it is added to the sinusoidal features, where diffusers' `TimestepEmbedding.cond_proj` adds it
    (same key). It starts at zero, so a student given it and the teacher's weights starts as the teacher."""

    def __init__(self, in_dim: int, emb_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.in_dim = in_dim
        self.linear_1 = nn.Linear(in_dim, emb_dim)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)
        self.cond_proj = zero_module(nn.Linear(cond_dim, in_dim, bias=False)) if cond_dim else None

    def forward(self, timesteps: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        # The sinusoids are computed in fp32; cast them to the weights' dtype so fp16/bf16 models run.
        features = timestep_embedding(timesteps, self.in_dim).to(self.linear_1.weight.dtype)
        if self.cond_proj is not None:
            if condition is None:
                raise ValueError("This UNet has time_cond_proj_dim set (a latent consistency model); pass "
                                 "timestep_cond, the guidance-scale embedding of (guidance_scale - 1).")
            features = features + self.cond_proj(condition.to(features.dtype))
        return self.linear_2(F.silu(self.linear_1(features)))


# ----------------------------------------------------------------------------------------------------------
# Attention


class AttnProcessor(Protocol):
    """What computes an `Attention` module's output; swapped in to record or edit attention (Prompt-to-Prompt).

    The signature matches diffusers' attention processors, so one processor can serve both UNets.
    """

    def __call__(
        self, attn: "Attention", hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor: ...


class SdpaAttnProcessor:
    """Multi-head attention through `F.scaled_dot_product_attention` (flash / memory-efficient kernels)."""

    def __call__(
        self, attn: "Attention", hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states).view(b, n, attn.heads, -1).transpose(1, 2)  # (B, h, N, d)
        k = attn.to_k(context).view(b, context.shape[1], attn.heads, -1).transpose(1, 2)  # (B, h, M, d)
        v = attn.to_v(context).view(b, context.shape[1], attn.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


class Attention(nn.Module):
    """Self-attention (no context) or cross-attention (queries from the image, keys/values from the text).

    Projections are named `to_q`, `to_k`, `to_v`, `to_out.0` as in diffusers, so peft LoRA targets them by name.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.scale = head_dim**-0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])
        self.processor: AttnProcessor = SdpaAttnProcessor()

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states)


class GEGLUFeedForward(nn.Module):
    """Gated-GELU feed-forward (Shazeer 2020), the transformer MLP used by Stable Diffusion."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(x * F.gelu(gate)))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention → cross-attention to the text → feed-forward, each residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the H×W positions of a feature map; the output projection starts at zero."""

    def __init__(self, channels: int, context_dim: int, head_dim: int, depth: int, groups: int, dropout: float):
        super().__init__()
        heads = max(1, channels // head_dim)
        self.norm = group_norm(channels, groups)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, context_dim, heads, channels // heads, dropout) for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, HW, C)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = self.proj_out(tokens).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + tokens


# ----------------------------------------------------------------------------------------------------------
# Blocks


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice; the timestep embedding modulates the second norm (scale-shift, as in
    improved DDPM / ADM), and a 1×1 conv matches channels on the skip path."""

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_emb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.conv_shortcut(x) + h


class ResAttnLayer(nn.Module):
    """One UNet layer: a ResNet block, followed by a spatial transformer at the levels that have attention."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, context_dim: int, head_dim: int, depth: int,
                 attention: bool, groups: int, dropout: float):
        super().__init__()
        self.resnet = ResnetBlock(in_ch, out_ch, temb_dim, groups, dropout)
        self.attention = SpatialTransformer(out_ch, context_dim, head_dim, depth, groups, dropout) if attention else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnet(x, temb)
        return x if self.attention is None else self.attention(x, context)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Up to `size`, the skip's size: twice `x`'s, or one less where a down-sampling met an odd size."""
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# ----------------------------------------------------------------------------------------------------------
# The model


class LdmUNet(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """ε-prediction UNet over VAE latents, conditioned on the timestep and on text.

    Text enters twice: by cross-attention to every token's hidden state, and as the mean-pooled text
    embedding added to the timestep embedding. The pooled path gives every ResNet block a global summary of
    the prompt; on small models and budgets it is what makes the conditioning learnable quickly.

    `PeftAdapterMixin` gives it diffusers' LoRA API (`add_adapter`, `load_lora_adapter`, `fuse_lora`, ...).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,  # latent height/width the model is trained at (image size / VAE factor)
        in_channels: int = 4,  # VAE latent channels
        out_channels: int = 4,  # predicted ε (or x0 / v, per the scheduler's prediction_type)
        block_out_channels: tuple[int, ...] = (128, 256, 256),  # channels per resolution level
        layers_per_block: int = 2,  # ResNet(+attention) layers per level on the down path (up path: +1)
        attention_levels: tuple[bool, ...] = (False, True, True),  # levels that get transformer blocks
        attention_head_dim: int = 32,  # channels per attention head
        transformer_depth: int = 1,  # transformer blocks per spatial transformer
        cross_attention_dim: int = 256,  # text encoder hidden size
        pooled_text_conditioning: bool = True,  # add the mean-pooled text embedding to the timestep embedding
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        time_cond_proj_dim: int | None = None,  # size of `timestep_cond` (LCM's guidance embedding); None: no input
    ):
        super().__init__()
        if len(attention_levels) != len(block_out_channels):
            raise ValueError(
                f"attention_levels has {len(attention_levels)} entries but block_out_channels has "
                f"{len(block_out_channels)}; give one True/False per level."
            )
        ch0 = block_out_channels[0]
        temb_dim = 4 * ch0
        self.gradient_checkpointing = False

        # Timestep (and pooled text) embedding
        self.time_embedding = TimestepMLP(ch0, temb_dim, time_cond_proj_dim)
        self.text_pool_proj = nn.Linear(cross_attention_dim, temb_dim) if pooled_text_conditioning else None

        def layer(cin: int, cout: int, attn: bool) -> ResAttnLayer:
            return ResAttnLayer(cin, cout, temb_dim, cross_attention_dim, attention_head_dim, transformer_depth,
                                attn, norm_num_groups, dropout)

        # Down path: remember every layer's output channels for the skip connections
        self.conv_in = nn.Conv2d(in_channels, ch0, 3, padding=1)
        self.down_layers = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels = [ch0]
        ch = ch0
        for level, (cout, attn) in enumerate(zip(block_out_channels, attention_levels)):
            for _ in range(layers_per_block):
                self.down_layers.append(layer(ch, cout, attn))
                ch = cout
                skip_channels.append(ch)
            is_last = level == len(block_out_channels) - 1
            self.downsamplers.append(nn.Identity() if is_last else Downsample(ch))
            if not is_last:
                skip_channels.append(ch)

        # Middle: ResNet → transformer → ResNet at the lowest resolution
        self.mid_block = nn.ModuleList([layer(ch, ch, True), layer(ch, ch, False)])

        # Up path: one more layer per level than the down path, each eating one skip connection
        self.up_layers = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level, (cout, attn) in reversed(list(enumerate(zip(block_out_channels, attention_levels)))):
            for _ in range(layers_per_block + 1):
                self.up_layers.append(layer(ch + skip_channels.pop(), cout, attn))
                ch = cout
            self.upsamplers.append(Upsample(ch) if level > 0 else nn.Identity())

        self.conv_norm_out = group_norm(ch, norm_num_groups)
        self.conv_out = zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))

    # -- attention processors (used by Prompt-to-Prompt editing) ------------------------------------------
    @property
    def attn_processors(self) -> dict[str, AttnProcessor]:
        """Processor of every attention module, keyed like diffusers' (`<module path>.processor`)."""
        return {f"{name}.processor": m.processor for name, m in self.named_modules() if isinstance(m, Attention)}

    def set_attn_processor(self, processor: AttnProcessor | dict[str, AttnProcessor]) -> None:
        """Set one processor for every attention module, or a dict keyed as in `attn_processors`."""
        for name, m in self.named_modules():
            if isinstance(m, Attention):
                m.processor = processor[f"{name}.processor"] if isinstance(processor, dict) else processor

    def _run(self, layer: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(layer, *args)
        return layer(*args)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Predict the noise in `sample` (B, C, H, W) at `timestep` (scalar or (B,)) given text hidden states
        (B, T, cross_attention_dim), and with `time_cond_proj_dim` set the guidance embedding `timestep_cond`
        (B, time_cond_proj_dim). Extra keyword arguments that `UNet2DConditionModel` accepts and this
        model has no use for (e.g. `cross_attention_kwargs=None`) are ignored."""
        b = sample.shape[0]
        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps.reshape(b)

        # 1. Conditioning vector: timestep embedding (+ pooled text)
        temb = self.time_embedding(timesteps, timestep_cond).to(sample.dtype)
        context = encoder_hidden_states.to(sample.dtype)
        if self.text_pool_proj is not None:
            temb = temb + self.text_pool_proj(context.mean(dim=1))

        # 2. Down path
        h = self.conv_in(sample)
        skips = [h]
        layers = iter(self.down_layers)
        for downsample in self.downsamplers:
            for _ in range(self.config.layers_per_block):
                h = self._run(next(layers), h, temb, context)
                skips.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                skips.append(h)

        # 3. Middle
        for mid in self.mid_block:
            h = self._run(mid, h, temb, context)

        # 4. Up path, concatenating the skips in reverse order
        layers = iter(self.up_layers)
        for upsample in self.upsamplers:
            for _ in range(self.config.layers_per_block + 1):
                h = self._run(next(layers), torch.cat([h, skips.pop()], dim=1), temb, context)
            if not isinstance(upsample, nn.Identity):
                h = upsample(h, skips[-1].shape[-2:])

        # 5. Output
        out = self.conv_out(F.silu(self.conv_norm_out(h)))
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LdmUNet":
        """A randomly initialised model of a named size (see `UNET_PRESETS`); keyword arguments override it."""
        if name not in UNET_PRESETS:
            raise ValueError(f"Unknown UNet preset {name!r}; choose one of {', '.join(UNET_PRESETS)}.")
        return cls(**{**UNET_PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------------------
# Size presets. small/base are sized for 64×64 images through a 4× VAE, i.e. 16×16×4 latents.

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a CPU, for tests and smoke runs
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(False, True),
                 attention_head_dim=16, cross_attention_dim=32, norm_num_groups=8),
    # the embedded default model: trains on 2 CPU cores within a session
    "small": dict(block_out_channels=(64, 128, 128), layers_per_block=1, attention_levels=(False, True, True),
                  attention_head_dim=32, cross_attention_dim=256, norm_num_groups=32),
    # a GPU-sized model for 16×16 latents
    "base": dict(block_out_channels=(128, 256, 256), layers_per_block=2, attention_levels=(False, True, True),
                 attention_head_dim=32, cross_attention_dim=256, norm_num_groups=32),
}
