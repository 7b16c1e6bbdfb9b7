"""Tiny random components built in code: for tests, benchmarks and smoke runs, no hub needed."""

from __future__ import annotations

import json
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .config import ObjectiveConfig
from .lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora
from .objective import sampling_scheduler
from .pipeline import LdmPipeline
from .unet import LdmUNet

TINY_WORDS = ["a", "cat", "dog", "red", "blue", "heart", "face", "smiling", "emoji", "photo", "of", "sks"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character map that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_tokenizer(folder: str | Path, model_max_length: int = 16) -> CLIPTokenizer:
    """A valid CLIP BPE tokenizer (vocab.json + merges.txt): every byte, a few whole words, the two specials."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in TINY_WORDS:  # merge left to right: c-a → ca, ca-t</w> → cat</w>
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab_tokens.append(merged)
            pieces = [merged] + pieces[2:]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_components(unet_kind: Literal["ldm", "diffusers"] = "ldm", seed: int = 0) -> dict:
    """vae, text_encoder, tokenizer, unet, scheduler — random, tiny (f=4 VAE, 8×8 latents), deterministic."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tiny_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)  # detach from the temp files
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(seed)
    if unet_kind == "ldm":
        unet = LdmUNet.from_preset("tiny", sample_size=8)
        for p in unet.parameters():  # zero-initialised output layers would make a random UNet ignore its input
            if not p.any():
                torch.nn.init.normal_(p, std=0.05)
    else:
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                    layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=8)
    return dict(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                scheduler=sampling_scheduler(ObjectiveConfig()))


def tiny_pipeline(unet_kind: Literal["ldm", "diffusers"] = "ldm", seed: int = 0) -> LdmPipeline:
    """An `LdmPipeline` over `tiny_components`, progress bar off."""
    pipe = LdmPipeline(**tiny_components(unet_kind, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_random_lora(pipe: LdmPipeline, unet: bool = True, text_encoder: bool = False, rank: int = 4,
                    alpha: float | None = None, seed: int = 1, std: float = 0.2) -> LdmPipeline:
    """Attach LoRA adapters to `pipe`'s UNet and/or text encoder with random B matrices, as after training.

    peft starts B at zero, where an adapter changes nothing; a test of saving, loading, fusing or scaling one needs
    an adapter that moves the output. B is drawn from one generator seeded `seed`, UNet first."""
    g = torch.Generator().manual_seed(seed)
    for model, targets, wanted in ((pipe.unet, UNET_TARGETS, unet), (pipe.text_encoder, TEXT_ENCODER_TARGETS,
                                                                     text_encoder)):
        if not wanted:
            continue
        add_lora(model, rank=rank, alpha=alpha, targets=targets)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * std
    return pipe


TOY_COLORS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 170, 60), "yellow": (235, 200, 30)}
TOY_SHAPES = ("square", "circle")


def write_toy_dataset(folder: str | Path, n: int = 32, size: int = 32, layout: Literal["metadata", "sidecar"] =
                      "metadata", corrupt: int = 0, seed: int = 0) -> Path:
    """Coloured shapes on white with captions like "a red circle": learnable in a few CPU steps.

    `layout="metadata"` writes an imagefolder with metadata.jsonl (text + tags); "sidecar" writes .txt files.
    `corrupt` extra files are not decodable images, to exercise skipping.
    """
    import random

    import PIL.Image
    import PIL.ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        color, shape = rng.choice(list(TOY_COLORS)), rng.choice(TOY_SHAPES)
        image = PIL.Image.new("RGB", (size, size), "white")
        draw = PIL.ImageDraw.Draw(image)
        box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=TOY_COLORS[color])
        name = f"{i:04d}.png"
        image.save(folder / name)
        caption = f"{color} {shape}"
        rows.append({"file_name": name, "text": caption, "tags": [color, shape]})
        if layout == "sidecar":
            (folder / f"{i:04d}.txt").write_text(caption)
    for j in range(corrupt):
        (folder / f"broken-{j}.png").write_bytes(b"not a png")
        rows.append({"file_name": f"broken-{j}.png", "text": "broken", "tags": []})
    if layout == "metadata":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_tiny_run_inputs(folder: str | Path) -> Path:
    """A tiny random pipeline (model/) and toy data (data/) for `configs/tiny.yaml` and tests."""
    folder = Path(folder)
    tiny_pipeline().save_pretrained(folder / "model")
    write_toy_dataset(folder / "data")
    return folder


def hand_made_png(width: int, height: int, text: dict[str, bytes]) -> bytes:
    """A PNG written byte by byte: IHDR declaring width × height (any, a decompression bomb too), tEXt chunks as
    given (any bytes), no pixel data worth the name — what a hostile client can send."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    body += b"".join(chunk(b"tEXt", key.encode() + b"\0" + value) for key, value in text.items())
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


if __name__ == "__main__":
    import sys

    print(write_tiny_run_inputs(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny"))
