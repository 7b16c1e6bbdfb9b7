"""Generation parameters carried inside each PNG: A1111's `parameters` text chunk (read by A1111, ComfyUI,
Civitai and most image tools) and a JSON chunk (`ldm-app`) that `ldm-app generate --from` reads back exactly.

The `parameters` text is what A1111's `create_infotext` writes and its `parse_generation_parameters` reads:

    a cat <lora:style:0.8>
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.0, Seed: 7, Size: 64x64, Model: default,
    RNG: CPU, Lora hashes: "style: 0123456789ab"

(the last two lines are one). Values holding a comma, colon or newline are JSON-quoted, as A1111's `quote()`
does. LoRAs go into the prompt in A1111's own syntax, and the noise is drawn on the CPU (`RNG: CPU`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.PngImagePlugin

from .atomic import atomic_write
from .kohya import lora_short_hash
from .lora_tags import lora_tag, split_lora_spec
from .request import GenerationRequest
from .samplers import SAMPLERS, sampler_from_a1111

JSON_KEY = "ldm-app"
A1111_KEY = "parameters"
MAX_INFOTEXT_CHARS = 65536  # parameters text read from a PNG: an A1111 infotext is a few hundred characters
A1111_SAMPLER_FALLBACK = "ddim"  # used when an A1111 PNG names a sampler we do not have (reported as ignored)
# The JSON chunk's keys → the request's fields (one image per PNG: no `n`; the input files under their old keys)
JSON_FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "guidance": "guidance",
               "eta": "eta", "sampler": "sampler", "seed": "seed", "width": "width", "height": "height",
               "model": "model", "dtype": "dtype", "loras": "loras", "strength": "strength", "image": "image_path",
               "image_sha256": "image_sha256", "mask": "mask_path", "mask_sha256": "mask_sha256",
               "paste_back": "paste_back", "mask_feather": "mask_feather", "drawn_at": "drawn_at"}
REQUIRED = ("prompt", "negative_prompt", "steps", "guidance", "eta", "sampler", "seed", "width", "height", "model")


# ----------------------------------------------------------------------------------------------------------
# Writing


def quote(value: Any) -> str:
    """A1111's quoting: a value with a comma, colon or newline becomes a JSON string, others stay as they are."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def lora_name(path: str) -> str:
    """The name a LoRA has in `<lora:name:…>`: its file name without `.safetensors`, or its folder's name."""
    p = Path(path)
    return p.stem if p.suffix == ".safetensors" else p.name


def a1111_text(p: GenerationRequest) -> str:
    """The `parameters` text A1111 writes: prompt (with `<lora:name:weight>` tags), negative prompt, then
    `Key: value` pairs in A1111's order and spelling."""
    sampler = SAMPLERS.get(p.sampler)
    loras = [split_lora_spec(spec) for spec in p.loras]
    hashes = {lora_name(path).replace(":", "").replace(",", ""): lora_short_hash(path) for path, _ in loras}
    prompt = p.prompt + "".join(" " + lora_tag(lora_name(path), scale) for path, scale in loras)
    fields = {
        "Steps": p.steps,
        "Sampler": sampler.a1111 if sampler else p.sampler,
        "Schedule type": "Karras" if sampler and sampler.karras else None,
        "CFG scale": p.guidance,
        "Seed": p.seed,
        "Size": f"{p.width}x{p.height}",
        "Drawn at": p.drawn_at,
        "Model": p.model,
        "Denoising strength": p.strength,
        # A1111 reads DDIM's η as `Eta DDIM`; DDPM is written as DDIM at η = 1 (see samplers.py)
        "Eta DDIM": p.eta if p.sampler == "ddim" else 1.0 if p.sampler == "ddpm" else None,
        "RNG": "CPU",  # every image's noise comes from a CPU generator (same image on any device)
        "Lora hashes": ", ".join(f"{name}: {h}" for name, h in hashes.items() if h) or None,
    }
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None)
    return f"{prompt}\nNegative prompt: {p.negative_prompt}\n{line}"


def json_record(params: GenerationRequest) -> dict[str, Any]:
    """ldm-app's JSON chunk: the request of one image (its own seed), its input files by path and digest."""
    return {key: getattr(params, name) for key, name in JSON_FIELDS.items()}


def png_info(params: GenerationRequest) -> PIL.PngImagePlugin.PngInfo:
    """The two metadata chunks every ldm-app PNG carries: A1111's `parameters` text and ldm-app's JSON."""
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(A1111_KEY, a1111_text(params))
    info.add_text(JSON_KEY, json.dumps(json_record(params)))
    return info


def save_png(image: PIL.Image.Image, path: Path, params: GenerationRequest) -> None:
    """Write the PNG with both metadata chunks, atomically (a temp file in the same folder, then rename)."""
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(params))


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_png(path: str | os.PathLike) -> tuple[GenerationRequest, list[str]]:
    """The parameters a PNG was made with, and the `Key: value` fields of an A1111 PNG that ldm-app cannot use.

    ldm-app's own JSON chunk wins; otherwise A1111's `parameters` text is read (see `parse_a1111`). Every value
    is checked as every request is (`GenerationRequest.checked`), so a damaged or hand-edited file is a ValueError
    that says so.
    """
    try:
        with PIL.Image.open(path) as image:
            info = dict(image.info)
    except PIL.Image.DecompressionBombError:
        raise ValueError(f"{path} declares more pixels than PIL's safety limit (a decompression bomb); pass a PNG "
                         "written by ldm-app generate or A1111.") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read {path} as an image ({err}); pass a PNG written by ldm-app generate.") from None
    if JSON_KEY in info:
        return params_from_json(info[JSON_KEY], str(path)), []
    if isinstance(info.get(A1111_KEY), str):
        return parse_a1111(info[A1111_KEY], str(path))
    raise ValueError(f"{path} carries no generation parameters (neither ldm-app's nor A1111's); pass a PNG written "
                     "by ldm-app generate or A1111.")


def params_from_json(raw: str, source: str) -> GenerationRequest:
    """ldm-app's JSON chunk → checked GenerationRequest."""
    try:
        stored = json.loads(raw) if len(raw) <= MAX_INFOTEXT_CHARS else None
    except (json.JSONDecodeError, RecursionError):  # RecursionError: arrays nested thousands deep
        stored = None
    missing = [key for key in REQUIRED if not isinstance(stored, dict) or key not in stored]
    if missing:
        raise ValueError(f"{source}'s ldm-app parameters are damaged (missing {', '.join(missing)}); "
                         "pass a PNG written by ldm-app generate.")
    unset = [key for key in ("steps", "guidance") if stored[key] is None]  # a request fills None in per sampler
    if unset:
        raise ValueError(f"{source}: {unset[0]} is None, expected a number; the PNG's parameters are damaged or were "
                         "edited: pass a PNG written by ldm-app generate, or the options themselves.")
    return checked(GenerationRequest(**{name: stored[key] for key, name in JSON_FIELDS.items() if key in stored}),
                   source)


def checked(p: GenerationRequest, source: str) -> GenerationRequest:
    """`p` if every value is one a request may have; otherwise a ValueError naming the first bad one."""
    try:
        return p.checked()
    except ValueError as err:
        raise ValueError(f"{source}: {err}; the PNG's parameters are damaged or were edited: pass a PNG written by "
                         "ldm-app generate, or the options themselves.") from None


# A1111's `Key: value` grammar (modules/infotext_utils.py, `re_param`): a key of word characters, spaces, dashes
# and slashes, then either a JSON-quoted string or anything up to the next comma. `re_param` itself takes time
# quadratic in a line without a colon (a 32k line: seconds, under the GIL); `infotext_fields` finds the same
# fields in one pass, and texts over MAX_INFOTEXT_CHARS are refused before any parsing.
A1111_KEY_RUN = re.compile(r"[\w \-/]+")
A1111_WORD = re.compile(r"\w")
A1111_VALUE = re.compile(r'\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")
A1111_USED = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Eta DDIM",
              "Drawn at")  # Drawn at: what sizes.py made of Size, made again from it


def infotext_fields(line: str) -> list[tuple[str, str]]:
    """`re_param.findall(line)` in linear time: the (key, raw value) pairs A1111 reads from a parameter line.

    `re_param` can only start a key at a word character whose run of key characters (word, space, `-`, `/`) is
    at least two long and ends at a colon; so each run is looked at once, and each value is consumed once."""
    fields, pos = [], 0
    while (run := A1111_KEY_RUN.search(line, pos)) is not None:
        end = run.end()
        key_start = A1111_WORD.search(line, run.start(), end - 1) if line.startswith(":", end) else None
        if key_start is None:  # no colon after this run, or no key of two characters in it
            pos = end
            continue
        value = A1111_VALUE.match(line, end + 1)  # always matches: [^,]* runs to the next comma or the end
        fields.append((line[key_start.start():end], value.group(1)))
        pos = max(value.end(), end + 1)
    return fields


def split_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """A1111's infotext → (prompt, negative prompt, the last line's `Key: value` fields, unquoted). A text without
    a parameter line (fewer than 3 fields) is all prompt, with no fields. Raises ValueError for a text over
    MAX_INFOTEXT_CHARS (a damaged or hostile file)."""
    if len(text) > MAX_INFOTEXT_CHARS:
        raise ValueError(f"the A1111 parameters text has {len(text)} characters, more than the {MAX_INFOTEXT_CHARS} "
                         "ldm-app reads; the file is damaged or was not written by A1111 or ldm-app.")
    *lines, last = text.strip().split("\n")
    found = infotext_fields(last)
    if len(found) < 3:
        lines, last, found = lines + [last], "", []
    prompt, negative, in_negative = [], [], False
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    fields = {key.strip(): unquote(value.strip()) for key, value in found}
    return "\n".join(prompt), "\n".join(negative), fields


def parse_a1111(text: str, source: str = "parameters") -> tuple[GenerationRequest, list[str]]:
    """A1111's `parameters` text → (GenerationRequest, the fields not used, as `Key: value`).

    Used: prompt, negative prompt, steps, sampler (+ schedule type), CFG scale, seed, size and DDIM's η. The
    prompt keeps its `<lora:name:weight>` tags (apply them with `split_lora_tags` and a LoRA folder, as A1111
    does). The model is "default": a PNG never chooses which model gets loaded; `Model` is reported as ignored.
    An A1111 sampler we do not have is reported too, and ddim is used.
    """
    prompt, negative, fields = split_infotext(text)
    if not fields:
        raise ValueError(f"{source}: its A1111 parameters have no 'Steps: …, Sampler: …' line; pass a PNG written by "
                         "A1111 or ldm-app generate.")
    missing = [key for key in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if key not in fields]
    if missing:
        raise ValueError(f"{source}: its A1111 parameters lack {', '.join(missing)}; pass a PNG written by A1111 or "
                         "ldm-app generate.")

    ignored = [f"{key}: {value}" for key, value in fields.items()
               if key not in A1111_USED and (key, value) != ("RNG", "CPU")]  # our noise is drawn on the CPU too
    sampler = sampler_from_a1111(fields["Sampler"], fields.get("Schedule type"))
    if sampler is None:
        schedule = f", Schedule type: {fields['Schedule type']}" if "Schedule type" in fields else ""
        ignored.insert(0, f"Sampler: {fields['Sampler']}{schedule} (not available; {A1111_SAMPLER_FALLBACK} used)")
        sampler = A1111_SAMPLER_FALLBACK
    size = A1111_SIZE.match(fields["Size"].strip())
    if size is None:
        raise ValueError(f"{source}: Size is {fields['Size']!r}, expected WIDTHxHEIGHT such as 512x512; pass a PNG "
                         "written by A1111 or ldm-app generate.")
    params = GenerationRequest(
        prompt=prompt, negative_prompt=negative, steps=a1111_number(fields, "Steps", int, source),
        guidance=a1111_number(fields, "CFG scale", float, source), sampler=sampler,
        eta=a1111_number(fields, "Eta DDIM", float, source) if sampler == "ddim" and "Eta DDIM" in fields else 0.0,
        seed=a1111_number(fields, "Seed", int, source), width=int(size.group(1)), height=int(size.group(2)),
        model="default")
    if "Eta DDIM" in fields and sampler != "ddim":
        ignored.append(f"Eta DDIM: {fields['Eta DDIM']}")
    return checked(params, source), ignored


def a1111_number(fields: dict[str, str], key: str, kind: type, source: str) -> Any:
    try:
        return kind(fields[key].strip())
    except ValueError:
        raise ValueError(f"{source}: {key} is {fields[key][:40]!r}, expected a number; pass a PNG written by A1111 or "
                         "ldm-app generate.") from None


def unquote(value: str) -> str:
    """A `quote()`d value back to its text; anything that is not valid JSON stays as written (as in A1111)."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
