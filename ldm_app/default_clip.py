"""The default model's small CLIP (text tower + CNN image tower): its text tower is the default model's text
encoder, and a second one, trained apart, scores the default model's images (benchmarks, recipe tests).
Trained by training/default_model/train_clip.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


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
