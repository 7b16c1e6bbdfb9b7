"""Metrics for generated images: PSNR, CLIP R-precision and the Fréchet distance in a feature space (the CLIP
that scores the default model is `ldm_app.default_clip`)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch


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
