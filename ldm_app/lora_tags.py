"""How users name LoRAs: A1111's prompt syntax `<lora:name:weight>` (found in a LoRA folder as A1111 finds it)
and the `PATH[:SCALE]` of `--lora`."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from .lora import LORA_FILE


# A1111's prompt syntax for LoRAs: <lora:NAME> or <lora:NAME:WEIGHT> anywhere in the prompt
LORA_TAG = re.compile(r"\s*<lora:([^:>]+)(?::([^>]*))?>")


def lora_tag(name: str, weight: float) -> str:
    return f"<lora:{name}:{weight!r}>"



def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """`"a cat <lora:style:0.7>"` → `("a cat", [("style", 0.7)])`: the prompt the text encoder sees, and the LoRAs
    to apply, as A1111 reads them (weight 1 when absent)."""
    loras = []
    for match in LORA_TAG.finditer(prompt):
        name, weight = match.group(1).strip(), (match.group(2) or "1").strip()
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"<lora:{name}:{weight}> has no single numeric weight (separate text-encoder and UNet "
                             f"weights are not supported); write it as <lora:{name}:0.8>.") from None
        if not math.isfinite(value):
            raise ValueError(f"<lora:{name}:{weight}>: the weight is not a finite number; write e.g. <lora:{name}:0.8>.")
        loras.append((name, value))
    return LORA_TAG.sub("", prompt).strip(), loras



def find_lora(name: str, lora_dir: str | os.PathLike) -> Path:
    """The file `<lora:name:…>` means in `lora_dir`, as A1111 finds it: `name.safetensors` anywhere below it (or a
    folder `name` with the standard file)."""
    root = Path(lora_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"LoRA folder {root} does not exist; pass --lora-dir with the folder that holds your LoRAs.")
    found = sorted(p for p in root.rglob("*.safetensors") if p.stem == name and p.name != LORA_FILE and p.is_file())
    found += sorted(p.parent for p in root.rglob(LORA_FILE) if p.parent.name == name)  # names may hold [ or *
    if not found:
        raise ValueError(f"<lora:{name}:…> matches no {name}.safetensors in {root}; check the name or --lora-dir.")
    if len(found) > 1:
        raise ValueError(f"<lora:{name}:…> matches {len(found)} files in {root} ({', '.join(map(str, found[:3]))}); "
                         "rename one, or pass the file with --lora.")
    return found[0]



def split_lora_spec(spec: str) -> tuple[str, float]:
    """`PATH` or `PATH:SCALE` (a trailing number after the last colon is the scale) → (path, scale); a scale that
    is not a finite number after an existing path is an error, not part of the path."""
    path, sep, scale = spec.rpartition(":")
    if not sep or Path(spec).expanduser().exists():
        return spec, 1.0
    try:
        value = float(scale)
    except ValueError:
        if Path(path).expanduser().exists():
            raise ValueError(f"--lora {spec}: the scale {scale!r} is not a number; pass PATH:SCALE, e.g. "
                             f"{path}:0.8.") from None
        return spec, 1.0
    if not math.isfinite(value):
        raise ValueError(f"--lora {spec}: the scale {scale!r} is not a finite number; pass e.g. {path}:0.8.")
    return path, value
