"""Prompt-to-Prompt (Hertz et al. 2022): edit an image by changing its prompt while the edited branch reuses
the source branch's attention maps for the first steps, so that layout and shapes stay where they were.

The cross-attention maps decide where each word is painted; handing the source's maps to the target prompt
for the early (layout-forming) steps keeps the composition and lets the new words change only appearance.
The processor here works on `LdmUNet` and diffusers' `UNet2DConditionModel` (SD-1.x style attention) alike.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


def token_alignment(source_ids: list[int], target_ids: list[int]) -> torch.Tensor:
    """For each target token, the source token whose attention map it takes, or -1 to keep its own.

    Tokens both prompts share and words swapped one-for-one (same token count) are aligned, as in P2P's word
    swap and refinement; inserted words keep their own maps.
    """
    index = [-1] * len(target_ids)
    matcher = difflib.SequenceMatcher(None, source_ids, target_ids, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal" or (op == "replace" and i2 - i1 == j2 - j1):
            index[j1:j2] = range(i1, i2)
    return torch.tensor(index)


class PromptToPromptProcessor:
    """Attention with explicit probabilities, where the target branch's maps are replaced by the source's.

    `pairs` are (source, target) batch indices to edit; `step` is set by the sampling loop. Cross-attention
    maps are injected while `step < cross_steps` (through `token_map`, see `token_alignment`), self-attention
    maps while `step < self_steps` and only in layers of at most `self_max_tokens` positions (16×16, as in the
    authors' code: finer self-attention maps would pin the fine detail the edit is meant to change, and cost
    N² memory at SD's resolutions). Call signature: that of diffusers' attention processors.
    """

    def __init__(self, pairs: list[tuple[int, int]], token_map: torch.Tensor, cross_steps: int, self_steps: int = 0,
                 self_max_tokens: int = 16 * 16):
        self.pairs = pairs
        self.token_map = token_map
        self.cross_steps = cross_steps
        self.self_steps = self_steps
        self.self_max_tokens = self_max_tokens
        self.step = 0

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        unsupported = [n for n in ("spatial_norm", "group_norm", "norm_q", "norm_k")
                       if getattr(attn, n, None) is not None]
        if unsupported or hidden_states.ndim != 3:
            raise ValueError(f"Prompt-to-Prompt supports SD-1.x style transformer attention only (this attention "
                             f"has {unsupported or '4-D inputs'}); edit with cross_attention_steps=0 instead.")
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and getattr(attn, "norm_cross", None) is not None:
            context = attn.norm_encoder_hidden_states(context)
        b, n, _ = hidden_states.shape
        m = context.shape[1]
        q = attn.to_q(hidden_states).view(b, n, attn.heads, -1).transpose(1, 2)  # (B, h, N, d)
        k = attn.to_k(context).view(b, m, attn.heads, -1).transpose(1, 2)  # (B, h, M, d)
        v = attn.to_v(context).view(b, m, attn.heads, -1).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * attn.scale  # (B, h, N, M)
        if attention_mask is not None:
            scores = scores + attn.prepare_attention_mask(attention_mask, m, b).view(b, attn.heads, -1, m)
        probs = self.inject(scores.float().softmax(dim=-1).to(q.dtype), is_cross)
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)  # (B, N, h·d)
        out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "residual_connection", False):
            out = out + hidden_states
        return out / getattr(attn, "rescale_output_factor", 1.0)

    def inject(self, probs: torch.Tensor, is_cross: bool) -> torch.Tensor:
        """Replace each target's attention maps (B, h, N, M) by its source's while the step is early enough."""
        if self.step >= (self.cross_steps if is_cross else self.self_steps):
            return probs
        if not is_cross and probs.shape[-2] > self.self_max_tokens:
            return probs
        probs = probs.clone()
        for src, tgt in self.pairs:
            if is_cross:  # column j of the target's maps comes from source token token_map[j] where aligned
                token_map = self.token_map.to(probs.device)
                injected = probs[src][..., token_map.clamp(min=0)]
                probs[tgt] = torch.where(token_map >= 0, injected, probs[tgt])
            else:
                probs[tgt] = probs[src]
        return probs


@contextmanager
def attention_processor(unet: nn.Module, processor: Any) -> Iterator[Any]:
    """Route every attention module of `unet` through `processor`; the original processors come back after."""
    saved = unet.attn_processors
    unet.set_attn_processor(processor)
    try:
        yield processor
    finally:
        unet.set_attn_processor(saved)
