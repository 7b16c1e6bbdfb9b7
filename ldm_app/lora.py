"""LoRA (Hu et al. 2021) on the UNet's attention projections: W' = W + (α/r) · B A, with B = 0 at the start.

Adapters are peft layers added through diffusers' `PeftAdapterMixin` (UNet) or injected by peft and registered
the way transformers registers them (text encoder), so `set_adapters`, `fuse_lora` and `unfuse_lora` are
diffusers' own. Saved files put the α/r scale into B, so they are self-contained: any loader that assumes α = r
(diffusers' default) gives the same result.

Files from the ecosystem: kohya/A1111 (`lora_unet_*`, sd-scripts' metadata, fp16) and diffusers layouts load;
every other format (LyCORIS LoHa/LoKr/…, DoRA, SDXL, embeddings, checkpoints) is refused with a one-line
error that names it. A1111's prompt syntax `<lora:name:weight>` is parsed here (`split_lora_tags`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers import ModelMixin, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .atomic import atomic_write

_log = logging.getLogger(__name__)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
PEFT_SECOND_ADAPTER = "Already found a `peft_config` attribute"  # peft's warning when a model gets a 2nd adapter


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, targets: list[str]) -> None:
    """Freeze `model` and add trainable rank-`rank` adapters on `targets`; B starts at zero, so the model's
    output is unchanged until training moves it."""
    model.requires_grad_(False)
    attach(model, LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets))


def attach(model: torch.nn.Module, config: LoraConfig, adapter_name: str = "default") -> None:
    """Add an adapter. transformers' own `add_adapter` insists on a newer peft than may be installed, so text
    encoders get peft's injection plus the two attributes transformers sets (diffusers reads them)."""
    if isinstance(model, ModelMixin):
        model.add_adapter(config, adapter_name)
        return
    with warnings.catch_warnings():  # peft warns on a second adapter; several (one per --lora) are intended
        warnings.filterwarnings("ignore", message=PEFT_SECOND_ADAPTER)
        inject_adapter_in_model(config, model, adapter_name)
    model.peft_config = {**getattr(model, "peft_config", {}), adapter_name: config}
    model._hf_peft_config_loaded = True


def split_key(key: str) -> tuple[str, str]:
    """`<module>.lora.down.weight`, `.lora_linear_layer.up.weight` (diffusers) or `.lora_A.weight` (peft)
    → (module, "down" | "up")."""
    for marker, kind in ((".lora.down.", "down"), (".lora.up.", "up"), (".lora_linear_layer.down.", "down"),
                         (".lora_linear_layer.up.", "up"), (".lora_A.", "down"), (".lora_B.", "up")):
        if marker in key:
            return key.split(marker)[0], kind
    raise ValueError(f"{key!r} is not a LoRA weight key; pass a diffusers, peft or kohya LoRA file.")


def load_text_encoder_lora(text_encoder: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Adapters in the diffusers layout (component prefix stripped) onto a text encoder. Keys written for
    transformers 4 (`text_model.` prefix) load into transformers 5's flattened CLIPTextModel too."""
    modules = {n for n, _ in text_encoder.named_modules()}
    weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for key, value in state.items():
        module, kind = split_key(key)
        if module not in modules and module.removeprefix("text_model.") in modules:
            module = module.removeprefix("text_model.")
        if module not in modules:
            raise ValueError(f"LoRA key {key!r} matches no module of the text encoder; was it made for this model?")
        weights[f"{module}.lora_{'A' if kind == 'down' else 'B'}.weight"] = value
        if kind == "down":
            ranks[module] = value.shape[0]
    rank = max(ranks.values())
    attach(text_encoder, LoraConfig(r=rank, lora_alpha=rank, rank_pattern={m: r for m, r in ranks.items() if r != rank},
                                    target_modules=list(ranks)), adapter_name)
    set_peft_model_state_dict(text_encoder, weights, adapter_name)
    text_encoder.requires_grad_(False)


def lora_state_dict(model: torch.nn.Module, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """Adapter weights in the diffusers layout, α/r folded into up: `unet.<module>.lora.down/up.weight` and
    `text_encoder.text_model.<module>.lora_linear_layer.down/up.weight`. Text-encoder modules are named as in
    transformers 4 (`text_model.` first), which older diffusers, ComfyUI and A1111 read; we read both."""
    config = model.peft_config["default"]
    scale = config.lora_alpha / config.r
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    if prefix == "text_encoder":
        state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    return {f"{prefix}.{k}": (v * scale if ".up." in k else v).detach().float().cpu().contiguous()
            for k, v in state.items()}


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata or {"format": "pt"})


def save_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, folder: Path, kohya: bool = False) -> Path:
    """Write the adapters of `unet` (and of `text_encoder`, when given) as `pytorch_lora_weights.safetensors`
    (diffusers layout, fp32), and with `kohya` also the kohya/A1111 file as sd-scripts writes it (fp16, α and
    rank in `.alpha` tensors and `ss_*` metadata, `sshs_*` hashes); returns the diffusers file."""
    models = {"unet": unet} | ({"text_encoder": text_encoder} if text_encoder is not None else {})
    states = {prefix: lora_state_dict(model, prefix) for prefix, model in models.items()}
    save_atomic({k: v for state in states.values() for k, v in state.items()}, folder / LORA_FILE)
    if kohya:
        problem = kohya_base_problem(unet)
        if problem:
            _log.warning(f"warning: {problem}")
        tensors = {k: v.half() for prefix, model in models.items()
                   for k, v in to_kohya(states[prefix], model.peft_config["default"].lora_alpha).items()}
        config = unet.peft_config["default"]
        save_atomic(tensors, folder / KOHYA_FILE, kohya_metadata(tensors, unet, config.r, config.lora_alpha))
    return folder / LORA_FILE


def kohya_base_problem(unet: torch.nn.Module) -> str | None:
    """Why A1111/ComfyUI cannot apply a kohya file made for `unet`, or None when they can.

    They apply LoRAs to the Stable Diffusion checkpoint they have loaded, matching kohya names to its modules.
    An `LdmUNet` is no Stable Diffusion UNet (other blocks, other sizes): neither tool can load such a model,
    so no renaming could make its LoRA apply there. We still write the file (ldm-app loads it, and it is what
    the user asked for) and say so, rather than refuse after training.
    """
    if isinstance(unet, UNet2DConditionModel):
        return None
    return (f"the kohya file is for an {type(unet).__name__} base, which A1111 and ComfyUI cannot load, so they "
            "cannot apply it (ldm-app can); fine-tune a Stable Diffusion 1.x model for a LoRA those tools use.")


def kohya_metadata(tensors: dict[str, torch.Tensor], unet: torch.nn.Module, rank: int, alpha: float) -> dict[str, str]:
    """The metadata sd-scripts' train_network.py writes that tools read: network module, dim, α, base model,
    and the two hashes A1111 and the additional-networks extension index files by (`sshs_*`). As in sd-scripts,
    the hashes cover the file as saved with only the `ss_*` keys, so later user metadata does not change them."""
    cross = getattr(unet.config, "cross_attention_dim", None)
    base = {1024: "sd_v2", 2048: "sdxl_base_v1-0"}.get(cross, "sd_v1")
    if not isinstance(unet, UNet2DConditionModel):
        base = f"ldm_app_{type(unet).__name__}"  # honest: not a Stable Diffusion base (see kohya_base_problem)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
                "ss_base_model_version": base, "ss_v2": str(base == "sd_v2")}
    saved = safetensors.torch.save(tensors, metadata)
    return metadata | {"sshs_model_hash": addnet_hash(saved), "sshs_legacy_hash": addnet_legacy_hash(saved)}


def addnet_hash(data: bytes | BinaryIO) -> str:
    """SHA-256 of a safetensors file's tensor bytes (all after the header): A1111's LoRA hash, of which
    `Lora hashes` in PNG parameters shows the first 12 digits. Metadata edits leave it unchanged."""
    stream = _stream(data)
    header = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header)
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def addnet_legacy_hash(data: bytes | BinaryIO) -> str:
    """The older additional-networks hash: SHA-256 of the 64 KiB at offset 1 MiB, 8 digits."""
    stream = _stream(data)
    stream.seek(0x100000)
    return hashlib.sha256(stream.read(0x10000)).hexdigest()[:8]


def _stream(data: bytes | BinaryIO) -> BinaryIO:
    if isinstance(data, bytes):
        return io.BytesIO(data)
    data.seek(0)
    return data


def lora_short_hash(path: str | os.PathLike) -> str | None:
    """The hash A1111 writes for a LoRA file in `Lora hashes` (sd-scripts' precomputed one when the file has it);
    None for something that is not a local file (a hub id). Cached per file version: one hash per run, not per PNG."""
    path = lora_file_path(path)
    if not path.is_file():
        return None
    stat = path.stat()
    return _short_hash(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _short_hash(path: str, mtime_ns: int, size: int) -> str | None:
    with open(path, "rb") as f:
        try:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except (ValueError, MemoryError, OverflowError):  # not a safetensors file: no hash to show
            return None
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        stored = metadata.get("sshs_model_hash") if isinstance(metadata, dict) else None
        return (stored if isinstance(stored, str) and stored else addnet_hash(f))[:12]


def to_kohya(state: dict[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """diffusers layout (α/r folded into up) → kohya/A1111 (`lora_unet_<module_with_underscores>.lora_down.weight`,
    `.lora_up.weight`, `.alpha`). With `alpha`, up is unfolded and α stored, as sd-scripts does; without, α = r."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        module, kind = split_key(rest)
        name = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + module.replace(".", "_")
        rank = value.shape[0] if kind == "down" else value.shape[1]
        out[f"{name}.lora_{kind}.weight"] = value / (alpha / rank) if kind == "up" and alpha else value
        if kind == "down":
            out[f"{name}.alpha"] = torch.tensor(float(alpha or rank))
    return out


def from_kohya(state: dict[str, torch.Tensor], modules: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """kohya/A1111 → diffusers layout, matching underscored names against each component's module names."""
    lookup = {"lora_unet_": ("unet", modules.get("unet", [])), "lora_te_": ("text_encoder", modules.get("text_encoder", []))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.endswith((".lora_down.weight", ".lora_up.weight")):
            continue
        name, kind = key.split(".", 1)
        value = value.float()  # sd-scripts stores fp16; scale in fp32
        prefix = next((p for p in lookup if name.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"Unknown kohya LoRA key {key!r}; expected lora_unet_* or lora_te_* keys.")
        component, names = lookup[prefix]
        by_underscore = {n.replace(".", "_"): n for n in names}
        short = name[len(prefix):]  # A1111 files made with transformers 4 say text_model_encoder_...
        module = by_underscore.get(short) or by_underscore.get(short.removeprefix("text_model_"))
        if module is None:
            raise ValueError(f"LoRA key {key!r} matches no module of the {component}; was it made for this model?")
        if kind.startswith("lora_up"):
            rank = value.shape[1]
            alpha = state.get(f"{name}.alpha")
            value = value * (float(alpha) / rank if alpha is not None else 1.0)
        layer = "lora" if component == "unet" else "lora_linear_layer"  # diffusers' names for each component
        out[f"{component}.{module}.{layer}.{'up' if kind.startswith('lora_up') else 'down'}.weight"] = value
    return out


def is_kohya(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_")) for k in state)


# Key patterns of formats we do not apply, and their names: a file with any of them is refused whole, since
# applying only its plain-LoRA part would silently give another image.
UNSUPPORTED_FORMATS = [
    (r"\.hada_w[12]_[ab]$|\.hada_t[12]$", "a LyCORIS LoHa file (hada_w1_a keys)"),
    (r"\.lokr_w[12](_[ab])?$|\.lokr_t2$", "a LyCORIS LoKr file (lokr_w1 keys)"),
    (r"\.on_input$", "a LyCORIS (IA)³ file (on_input keys)"),
    (r"\.oft_blocks$|\.oft_diag$|\.oft_r\b|\.boft_", "an OFT/BOFT file (oft_blocks keys)"),
    (r"\.a[12]\.weight$|\.b[12]\.weight$", "a LyCORIS GLoRA file (a1/b1 keys)"),
    (r"\.diff(_b)?$", "a LyCORIS full-weight difference file (diff keys)"),
    (r"\.lora_mid\.", "a LoCon/LyCORIS file with a Tucker core (lora_mid keys)"),
    (r"dora_scale$|lora_magnitude_vector", "a DoRA file (dora_scale / lora_magnitude_vector keys)"),
    (r"^lora_te[12]_|^text_encoder_2\.", "an SDXL LoRA (two text encoders)"),
    (r"^lora_transformer_|^transformer\.|^diffusion_model\.", "a LoRA for a transformer model (SD3, Flux, …)"),
    (r"^emb_params$|^string_to_param|^clip_[lg]$", "a textual-inversion embedding, not a LoRA"),
    (r"^model\.diffusion_model\.|^first_stage_model\.", "a full Stable Diffusion checkpoint, not a LoRA"),
]
LORA_KEY = re.compile(r"[._](lora_down|lora_up|lora[._]down|lora[._]up|lora_linear_layer\.(down|up)|lora_[AB])"
                      r"\.weight$|\.alpha$")


def check_lora_keys(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse, in one line naming the format, any file that is not a plain LoRA we can apply."""
    for pattern, name in UNSUPPORTED_FORMATS:
        key = next((k for k in state if re.search(pattern, k)), None)
        if key is not None:
            raise ValueError(f"{source} is {name}; ldm-app applies plain LoRA files only (lora_down/lora_up or "
                             "lora_A/lora_B keys): pass one of those, or convert this file to LoRA first.")
    foreign = next((k for k in state if not LORA_KEY.search(k)), None)
    if foreign is not None or not state:
        raise ValueError(f"{source} holds no LoRA weights ({f'key {foreign!r}' if foreign else 'no tensors'}); pass "
                         "a diffusers, peft or kohya LoRA file.")


def lora_file_path(path: str | os.PathLike) -> Path:
    """A LoRA file as given, or the standard file inside a folder."""
    path = Path(path).expanduser()
    return path / LORA_FILE if path.is_dir() else path


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LoRA safetensors file, or the standard file inside a folder; other formats are refused by name."""
    path = lora_file_path(path)
    if not path.is_file():
        raise ValueError(f"No LoRA file at {path}; pass a .safetensors file or a folder with {LORA_FILE}.")
    try:
        state = load_file(path)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"Cannot read LoRA file {path}: {err}; pass a safetensors LoRA file.") from None
    check_lora_keys(state, str(path))
    return state


class _NoTextEncoderNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


@contextlib.contextmanager
def quiet_lora_loading(text_encoder_applied: bool = True) -> Iterator[None]:
    """Hide two false notices while diffusers loads LoRA adapters: peft's warning on a second adapter (several,
    one per --lora, are intended) and, when `text_encoder_applied`, "No LoRA keys associated to CLIPTextModel
    found" for a state dict whose text-encoder part (if any) `load_text_encoder_lora` has already applied: there
    it is false (the keys were applied) or empty (the file has none). Hub ids are left to diffusers."""
    source = logging.getLogger("diffusers.loaders.lora_base")
    drop = _NoTextEncoderNotice()
    if text_encoder_applied:
        source.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PEFT_SECOND_ADAPTER)
            yield
    finally:
        source.removeFilter(drop)


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
