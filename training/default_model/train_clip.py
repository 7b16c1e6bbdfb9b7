"""Train a small CLIP on the emoji set; its text tower is the default model's frozen text encoder.

Also trains the tokenizer (a CLIP-format byte-level BPE, loadable by `CLIPTokenizer`) when it
does not exist yet. With `--evaluator` the same recipe trains an independent CLIP (other seed,
other image tower) that later scores generated images; `load_clip` loads either one.
Resumable: checkpoints are written atomically and re-running the same command continues.
The export writes `metrics.json` last (and removes it first): recipe.sh takes the stage as done by it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTokenizer

from ldm_app.atomic import atomic_folder, atomic_write
from ldm_app.default_clip import Clip

from budget import BudgetedRun  # this folder's shared resume/time-budget helper
from emoji_data import load_split

MAX_LENGTH = 32
SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


# ---------------------------------------------------------------- tokenizer


def captions_for(label: str, tags: list[str]) -> list[str]:
    """The caption variants used in training (and by the lead's UNet trainer)."""
    return [label, f"a {label}", f"{label} emoji", *tags]


def train_tokenizer(rows: list[dict], vocab_size: int, out: Path) -> CLIPTokenizer:
    """Byte-level BPE with `</w>` suffixes, trained with CLIPTokenizer's own normalizer and
    pre-tokenizer so that CLIPTokenizer splits text exactly as during training; the vocab is
    laid out like OpenAI's (256 bytes, 256 bytes+</w>, one token per merge, specials)."""
    reference = CLIPTokenizer().backend_tokenizer
    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer, bpe.pre_tokenizer = reference.normalizer, reference.pre_tokenizer
    alphabet = ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False)
    corpus = [c for r in rows for c in captions_for(r["text"], r["tags"])]
    bpe.train_from_iterator(corpus, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]

    base = sorted(alphabet)
    tokens = base + [ch + "</w>" for ch in base] + [a + b for a, b in merges] + SPECIALS
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    with atomic_folder(out) as folder:  # main() reuses `out` once it holds tokenizer_config.json
        tokenizer.save_pretrained(folder)
        # Plain vocab.json/merges.txt too, for loaders that rebuild the tokenizer from them.
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizer.from_pretrained(out)


def check_tokenizer(tokenizer: CLIPTokenizer, rows: list[dict]) -> None:
    """Round-trip and no-unknown check: every caption word must map to real vocab tokens."""
    ids = tokenizer("a cat face")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a cat face", tokenizer.decode(ids)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    for r in rows:
        inner = tokenizer(r["text"])["input_ids"][1:-1]
        assert tokenizer.eos_token_id not in inner, f"unknown token in {r['text']!r}"


# ---------------------------------------------------------------- model


# ---------------------------------------------------------------- data, eval


def to_model(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def random_shift(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Small translations on a white canvas (no flips: arrows and flags are directional)."""
    padded = F.pad(x, (pad,) * 4, value=1.0)
    dx, dy = torch.randint(0, 2 * pad + 1, (2, len(x))).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + 64, dx[i]:dx[i] + 64] for i in range(len(x))])


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(captions, padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def retrieval(model: Clip, tokenizer: CLIPTokenizer, images: torch.Tensor, rows: list[dict]) -> dict[str, float]:
    """Top-1/top-5 image->label over the split's distinct emoji, and top-1 label->image
    (correct when the retrieved image shows that emoji in either style)."""
    model.eval()
    codes = sorted({r["codepoints"] for r in rows})
    label = {r["codepoints"]: r["text"] for r in rows}
    text = model.encode_text(**tokenize(tokenizer, [label[c] for c in codes]))
    image = torch.cat([model.encode_image(to_model(b)) for b in images.split(256)])
    truth = torch.tensor([codes.index(r["codepoints"]) for r in rows])
    sim = image @ text.T
    top5 = sim.topk(5, dim=1).indices
    model.train()
    return {
        "img2txt_top1": (top5[:, 0] == truth).float().mean().item(),
        "img2txt_top5": (top5 == truth[:, None]).any(1).float().mean().item(),
        "txt2img_top1": (truth[sim.argmax(0)] == torch.arange(len(codes))).float().mean().item(),
        "n_labels": len(codes),
    }


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("~/ldm-runs/data/emoji64"))
    parser.add_argument("--evaluator", action="store_true",
                        help="train the independent evaluator CLIP (other seed and image tower)")
    parser.add_argument("--run", type=Path, help="default ~/ldm-runs/clip or ~/ldm-runs/evaluator")
    parser.add_argument("--tokenizer", type=Path, default=Path("~/ldm-runs/clip/tokenizer"),
                        help="shared tokenizer folder; trained here if missing")
    parser.add_argument("--vocab-size", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=12.0, help="training time budget (drives the LR schedule)")
    parser.add_argument("--steps", type=int, default=0, help="if set, schedule/stop by steps instead of time")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=float, default=3.0, help="minutes between evals + checkpoints")
    args = parser.parse_args()
    seed = 1 if args.evaluator else 0
    tower = ({"width": 32, "blocks": 1, "stages": 3, "dim": 256, "patch": 2} if args.evaluator
             else {"width": 64, "blocks": 1, "stages": 2, "dim": 256, "patch": 4})
    run = (args.run or Path("~/ldm-runs/evaluator" if args.evaluator else "~/ldm-runs/clip")).expanduser()
    budget = BudgetedRun(run, args.minutes, args.steps, args.eval_every)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    torch.manual_seed(seed)
    rng = random.Random(seed)

    # --- data + tokenizer ---
    data = args.data.expanduser()
    train_images, train_rows = load_split(data, "train")
    test_images, test_rows = load_split(data, "test")
    tok_dir = args.tokenizer.expanduser()
    tokenizer = (CLIPTokenizer.from_pretrained(tok_dir) if (tok_dir / "tokenizer_config.json").exists()
                 else train_tokenizer(train_rows + test_rows, args.vocab_size, tok_dir))
    check_tokenizer(tokenizer, train_rows + test_rows)
    # A fixed train subset as large as the test set, so train/test retrieval are comparable.
    n_test_codes = len({r["codepoints"] for r in test_rows})
    probe_codes = set(random.Random(0).sample(sorted({r["codepoints"] for r in train_rows}), n_test_codes))
    probe = [i for i, r in enumerate(train_rows) if r["codepoints"] in probe_codes]

    # --- model, optimizer, resume ---
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=tower["dim"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = Clip(text_config, tower)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    budget.resume(model, opt)
    n_text = sum(p.numel() for p in model.text_model.parameters())
    n_image = sum(p.numel() for p in model.image_tower.parameters())
    budget.report(f"text params {n_text:,} image params {n_image:,} vocab {len(tokenizer)}; args {vars(args)}")

    # --- contrastive training (warmup, cosine to 5 %); soft targets so that pairs sharing an
    # emoji or an identical caption (two styles, a common tag) are not pushed apart ---
    model.train()
    while budget.progress < 1.0:
        t0 = time.time()
        lr = budget.set_learning_rate(opt, args.lr, warmup_steps=100)
        idx = rng.sample(range(len(train_rows)), args.batch)
        rows = [train_rows[i] for i in idx]
        captions = [rng.choice(captions_for(r["text"], r["tags"])) for r in rows]
        codes = [r["codepoints"] for r in rows]
        match = torch.tensor([[codes[i] == codes[j] or captions[i] == captions[j] for j in range(len(rows))]
                              for i in range(len(rows))], dtype=torch.float32)
        image = model.encode_image(random_shift(to_model(train_images[idx])))
        text = model.encode_text(**tokenize(tokenizer, captions))
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
        loss = (F.cross_entropy(logits, match / match.sum(1, keepdim=True))
                + F.cross_entropy(logits.T, match.T / match.T.sum(1, keepdim=True))) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        budget.finish_step(t0, args.batch)
        if budget.eval_due():
            test = retrieval(model, tokenizer, test_images, test_rows)
            train = retrieval(model, tokenizer, train_images[probe], [train_rows[i] for i in probe])
            budget.report(f"step {budget.step} {budget.state['elapsed'] / 60:.1f}min lr {lr:.2e} "
                          f"loss {loss.item():.3f} T {model.logit_scale.exp().item():.1f} "
                          f"{budget.examples_per_second():.0f} pairs/s test {test} train {train}")
            budget.save(model, opt)

    # --- export: text encoder + tokenizer for the pipeline, whole CLIP for scoring; metrics.json, which
    # recipe.sh skips this stage by, goes first and comes back last, so a half-done export is never taken as done ---
    model.eval()
    (run / "metrics.json").unlink(missing_ok=True)
    with atomic_folder(run / "text_encoder") as folder:
        model.text_model.save_pretrained(folder, safe_serialization=True)
    if (run / "tokenizer").resolve() != tok_dir.resolve():  # a copy, with its plain vocab.json and merges.txt
        with atomic_folder(run / "tokenizer") as folder:
            shutil.copytree(tok_dir, folder, dirs_exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run / "clip.safetensors")
    (run / "clip_config.json").write_text(json.dumps({"text": text_config.to_dict(), "tower": tower}, indent=2))
    metrics = {"test": retrieval(model, tokenizer, test_images, test_rows),
               "train_probe": retrieval(model, tokenizer, train_images[probe], [train_rows[i] for i in probe]),
               "text_params": n_text, "image_params": n_image, "steps": budget.step,
               "train_minutes": budget.state["elapsed"] / 60}
    with atomic_write(run / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    budget.report(f"final {json.dumps(metrics)}")


if __name__ == "__main__":
    main()
