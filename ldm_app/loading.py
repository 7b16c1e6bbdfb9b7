"""The one place a model is loaded: the name a user gives (`default`, a pipeline folder, its fp16 variant, a
single-file checkpoint, a hub id) → an `LdmPipeline` on a device, with errors that say what to pass instead.
Every command, the server and the trainer's frozen encoders load through here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .request import DTYPES

if TYPE_CHECKING:  # torch and the pipeline are imported when a model is loaded: `ldm-app --help` stays fast
    import torch

    from .pipeline import LdmPipeline

DEFAULT_MODEL = "default"  # the embedded model that ships inside the package


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA, then Apple's MPS, then the CPU."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible; use --device cpu or auto.")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps but MPS is not available; use --device cpu or auto.")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on CUDA (half the memory, tensor cores), fp32 elsewhere (CPUs gain nothing from halves)."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, DTYPES[dtype])


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float16` → "fp16", as written into outputs."""
    return next(name for name, torch_name in DTYPES.items() if str(dtype) == f"torch.{torch_name}")


def looks_local(spec: str) -> bool:
    """Whether a model or LoRA reference means a local path rather than a hub id (`owner/name`)."""
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1


def model_record(model: str) -> str:
    """How a model is written into outputs for later reuse: local folders as absolute paths (so `--from` and
    `edit --inversion` work from any directory), hub ids and 'default' as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if model != DEFAULT_MODEL and path.exists() else model


def trusted_model(model: str) -> bool:
    """Whether a model named by a file someone else made (a PNG, an inversion) may be loaded without asking: the
    default model or a folder on this machine, never a hub id (a download) or a file to convert."""
    return model == DEFAULT_MODEL or Path(model).expanduser().is_dir()


def _variants(folder: Path) -> set[str]:
    """Weight-file variants in a pipeline folder (`model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`
    → 'fp16'); '' stands for plain weights (`model.safetensors`, `model-00001-of-00002.safetensors`)."""
    names = [f.name.split(".") for f in folder.glob("*/*.safetensors")]
    return {parts[1].split("-")[0] if len(parts) == 3 else "" for parts in names}


def load_model(spec: str | os.PathLike, variant: str | None = None, torch_dtype: torch.dtype | None = None,
               **kwargs: Any) -> LdmPipeline:
    """What `--model` names, loaded: 'default' (the shipped model), a single-file `.safetensors` checkpoint, a
    pipeline folder (`variant="fp16"` for folders of `*.fp16.safetensors` files) or a hub id."""
    from .pipeline import LdmPipeline
    from .single_file import is_single_file

    dtype_kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if str(spec) == DEFAULT_MODEL:
        return LdmPipeline.from_default(**dtype_kwargs, **kwargs)
    path = Path(spec).expanduser()
    if is_single_file(path):
        if variant is not None:
            raise ValueError(f"variant={variant!r} is for pipeline folders; a single file has one set of weights. "
                             "Drop the variant.")
        return LdmPipeline.from_single_file(path, torch_dtype=torch_dtype)
    if path.is_dir():
        variants = _variants(path)
        named = sorted(variants - {""})
        if variant is None and named and "" not in variants:
            raise ValueError(f"{path} holds only {'/'.join(named)} variant weights; pass variant={named[0]!r} "
                             f"(--variant {named[0]}).")
        if variant is not None and variant not in variants:
            raise ValueError(f"{path} has no {variant!r} variant weights (*.{variant}.safetensors); "
                             f"{'variants there: ' + ', '.join(named) if named else 'drop the variant'}.")
        return LdmPipeline.from_pretrained(path, variant=variant, **dtype_kwargs, **kwargs)
    return LdmPipeline.from_pretrained(str(spec), variant=variant, **dtype_kwargs, **kwargs)  # a hub id


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype, variant: str | None = None) -> LdmPipeline:
    """The embedded default model, a pipeline folder (its `variant` weights, e.g. fp16), a single-file SD-1.x
    checkpoint or a hub id, on `device` in `dtype`."""
    import torch
    from diffusers.utils import logging as dlogging
    from safetensors import SafetensorError
    from transformers.utils import logging as tlogging

    from .pipeline_loaders import cast_quietly

    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    path = Path(model).expanduser()
    if model != DEFAULT_MODEL and looks_local(model) and not path.exists():
        raise ValueError(f"Model folder {model} does not exist; pass a pipeline folder or a hub id "
                         "(or leave --model out for the default model).")
    hub_kwargs = {}
    if model != DEFAULT_MODEL and not path.exists() and cached_only(model):
        hub_kwargs["local_files_only"] = True
    try:
        pipe = load_model(str(path) if path.exists() else model, variant=variant, **hub_kwargs)
        missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
                   if getattr(pipe, name, None) is None]
        if missing:
            raise ValueError(f"no {', '.join(missing)} in it")
        if pipe.tokenizer.model_max_length > pipe.text_encoder.config.max_position_embeddings:
            raise ValueError("its tokenizer is missing or incomplete (tokenizer/ needs vocab.json, merges.txt and "
                             "tokenizer_config.json)")
    except (OSError, ValueError, KeyError, AttributeError, TypeError, json.JSONDecodeError, SafetensorError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if path.is_file():  # the single-file loader's errors already say what is supported
            raise ValueError(f"Cannot load model {model!r}: {reason[:300]}") from None
        raise ValueError(f"Cannot load model {model!r}: {reason[:300].rstrip('.')}. Check that it is a complete "
                         "pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).") from None
    pipe = pipe.to(device)
    if pipe.unet.dtype != dtype:
        pipe = cast_quietly(pipe, dtype)
    if device.type == "cpu":
        pipe.unet.to(memory_format=torch.channels_last)  # measured +22 % sampling speed on CPU
    return pipe


def cached_only(hub_id: str) -> bool:
    """Whether a hub id must load from the local cache: the Hub is offline (HF_HUB_OFFLINE=1) or out of reach.
    Neither with no cached copy fails at once with a message about the network, rather than after 30 s of
    retries with one that blames the folder."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(hub_id, "model_index.json"), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise ValueError(f"{hub_id!r} is a hub id, but the Hub is in offline mode (HF_HUB_OFFLINE=1) and it is not in "
                         "the local cache; download it once with network access (HF_HUB_OFFLINE unset), or pass a "
                         "local pipeline folder.")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # reached through a proxy: no direct probe
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
        return False
    except OSError:
        if cached:
            return True
        raise ValueError(f"{hub_id!r} is a hub id, but {endpoint.hostname} cannot be reached (no network?) and it is "
                         "not in the local cache; connect to the network, or pass a local pipeline folder.") from None


def load_loras(pipe: LdmPipeline, specs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Load each LoRA ("PATH[:SCALE]": a file, a folder or a hub id) as its own adapter, inactive until a request
    names it (`generation.activate_loras`); returns PATH → adapter name."""
    from .lora_tags import split_lora_spec

    adapters: dict[str, str] = {}
    for spec in specs:
        path, _ = split_lora_spec(spec)
        if path in adapters:
            continue
        local = Path(path).expanduser()
        if not local.exists() and (path.endswith(".safetensors") or looks_local(path)):
            raise ValueError(f"--lora {path}: no such file or folder; pass a LoRA .safetensors file, a folder with "
                             "one, or a hub id.")
        name = f"lora_{len(adapters)}"
        try:
            pipe.load_lora_weights(str(local) if local.exists() else path, adapter_name=name)
        except (ValueError, OSError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            question = " Was it made for this model?" if isinstance(err, RuntimeError) or "matches no module" in reason \
                else ""  # RuntimeError: tensor shapes of another model
            raise ValueError(f"Cannot load LoRA {path}: {reason.rstrip('.')}.{question}") from None
        adapters[path] = name
    return adapters
