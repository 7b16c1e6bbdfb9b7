"""Metrics for generated images: PSNR, CLIP R-precision and the Fréchet distance in a feature space —
and the small CLIP (text tower + CNN image tower) that the default model's text encoder and its separate
evaluator are trained as."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def unit_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (1, 3, H, W) tensor in [0, 1], the range `psnr` expects."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [0, 1] shaped (B, C, H, W)."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1).clamp(min=1e-12)
    return 10 * torch.log10(1.0 / mse)


def r_precision(image_features: torch.Tensor, text_features: torch.Tensor, true_index: torch.Tensor,
                distractors: torch.Tensor) -> float:
    """Share of images whose own caption scores highest among it and its K distractor captions.

    image_features (N, D) and text_features (M, D, a pool of captions) are L2-normalised; true_index (N,) is
    each image's caption in the pool, distractors (N, K) the wrong candidates.
    """
    candidates = torch.cat([true_index[:, None], distractors], dim=1)  # (N, 1+K), the true caption first
    scores = torch.einsum("nd,nkd->nk", image_features, text_features[candidates])
    return (scores.argmax(dim=1) == 0).float().mean().item()


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½) between Gaussians fitted to two feature sets (FID's formula)."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return ((mu_a - mu_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross)).item()


class ImageTower(nn.Module):
    """Small CNN for 64x64 images: a patchify stem (cheap on CPU), then stride-2 stages that
    double the width, then average pooling."""

    def __init__(self, width: int, blocks: int, stages: int, dim: int, patch: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, patch, stride=patch)]
        channels = width
        for stage in range(stages):
            out = width * 2 ** (stage + 1) if stage < stages - 1 else dim
            layers += [nn.GroupNorm(8, channels), nn.GELU(), nn.Conv2d(channels, out, 3, stride=2, padding=1)]
            for _ in range(blocks - 1):
                layers += [nn.GroupNorm(8, out), nn.GELU(), nn.Conv2d(out, out, 3, padding=1)]
            channels = out
        layers += [nn.GroupNorm(8, channels), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(channels, dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class Clip(nn.Module):
    """Text tower (`CLIPTextModel` + projection) and image tower with a learnable temperature."""

    def __init__(self, text_config: CLIPTextConfig, tower: dict):
        super().__init__()
        self.text_model = CLIPTextModel(text_config)
        self.text_proj = nn.Linear(text_config.hidden_size, tower["dim"], bias=False)
        self.image_tower = ImageTower(**tower)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(self.text_proj(pooled), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """`images`: float in [-1, 1], NCHW, 64x64."""
        return F.normalize(self.image_tower(images), dim=-1)


def load_clip(run_dir: str | Path) -> tuple[Clip, CLIPTokenizer]:
    """Load an exported CLIP (main or evaluator) for scoring: `encode_text`/`encode_image`."""
    run_dir = Path(run_dir).expanduser()
    config = json.loads((run_dir / "clip_config.json").read_text())
    model = Clip(CLIPTextConfig(**config["text"]), config["tower"])
    model.load_state_dict(load_file(run_dir / "clip.safetensors"))
    return model.eval(), CLIPTokenizer.from_pretrained(run_dir / "tokenizer")
