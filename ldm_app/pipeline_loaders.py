"""How `LdmPipeline` loads: pipeline folders (Stable Diffusion 1.x ones too), the embedded default model, single-file
checkpoints and LoRA files of every layout users have, as classmethods of the class (diffusers' loader mixins).

Which of them a name means (`default`, a folder, a file, a hub id) is decided in `ldm_app.loading`; this module is
what the class itself can do. `ldm_app.single_file` turns a checkpoint file into components; `from_single_file`
builds the pipeline from them, as diffusers' `FromSingleFileMixin` does.
"""

from __future__ import annotations

import contextlib
import inspect
import logging as stdlib_logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging
from diffusers.utils.peft_utils import get_adapter_name

from .consistency import LCM_STUDENT, use_lcm_student
from .kohya import from_kohya, is_kohya
from .lora import PEFT_SECOND_ADAPTER, load_text_encoder_lora
from .lora_formats import read_lora_file

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
PIPELINE_MODULE = "pipeline"  # a portable folder's pipeline.py: model_index.json's `_class_name` names it
UNET_MODULE = "unet"  # a portable folder's unet/unet.py; model_index.json's unet entry names it
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only")


class LdmLoadersMixin:
    """`from_pretrained`, `from_default`, `from_single_file` and `load_lora_weights` for `LdmPipeline`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a pipeline folder (model_index.json + component subfolders) or hub id.

        A Stable-Diffusion-1.x folder loads too: its extra components (safety checker, feature extractor)
        are skipped.
        """
        path = Path(pretrained_model_name_or_path)
        if path.exists() and not (path / "model_index.json").is_file():
            raise ValueError(
                f"{path} is not a pipeline folder (no model_index.json); point to a folder written by "
                "LdmPipeline.save_pretrained, a training run's 'pipeline' folder, or a hub id."
            )
        index = cls.load_config(pretrained_model_name_or_path, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        for unused in set(index) - set(inspect.signature(cls.__init__).parameters):
            if not unused.startswith("_"):
                kwargs.setdefault(unused, None)  # a Stable Diffusion folder's safety checker, feature extractor, ...
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            # diffusers loads its models in fp32 unless told otherwise, transformers 5 in the stored dtype: match
            pipe.text_encoder.to(torch.float32)
        return pipe

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config: str | os.PathLike | None = None,
                         torch_dtype: torch.dtype | None = None) -> Any:
        """A pipeline from an SD-1.x single-file checkpoint (A1111/ComfyUI .safetensors), offline; fp32 unless
        `torch_dtype` (files are often fp16: slow on CPUs). See `ldm_app.single_file` for `config`."""
        # imported here: diffusers' checkpoint conversion stays out of portable exports (hub.make_portable)
        from .single_file import single_file_components

        pipe = cls(**single_file_components(path, config, torch_dtype))
        return pipe if torch_dtype is not None else cast_quietly(pipe, torch.float32)

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """model_index.json; a portable folder's entries for its code copies (ldm_app.hub.make_portable, for plain
        diffusers) are swapped for ldm_app's own classes."""
        config = super().load_config(*args, **kwargs)
        return (native_index(config[0]), *config[1:]) if isinstance(config, tuple) else native_index(config)

    @classmethod
    def from_default(cls, lcm: bool = False, **kwargs: Any) -> Any:
        """The embedded default model that ships inside the package: offline, CPU-sized. With `lcm` its distilled
        UNet and `LCMScheduler`: sample it with 4 steps at guidance_scale=1."""
        if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
            raise ValueError(f"The embedded default model is missing from {DEFAULT_MODEL_DIR}; reinstall ldm-app "
                             "or pass a model folder or hub id.")
        pipe = cls.from_pretrained(DEFAULT_MODEL_DIR, **kwargs)  # shipped in fp16, loaded in fp32 unless told
        if lcm and not use_lcm_student(pipe):
            raise ValueError(f"This ldm-app ships no distilled LCM UNet ({DEFAULT_MODEL_DIR / LCM_STUDENT} is "
                             "missing); use from_default() with DDIM or DPM++.")
        return pipe

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
                          adapter_name: str | None = None, **kwargs: Any) -> None:
        """diffusers' LoRA loading, plus local folders with pytorch_lora_weights.safetensors and kohya/A1111
        files (`lora_unet_*` keys), which are matched against this pipeline's own module names. Text-encoder
        adapters in local files and dicts are attached with peft directly (see `lora.attach`)."""
        source = pretrained_model_name_or_path_or_dict
        if not isinstance(source, dict) and Path(source).expanduser().exists():
            source = read_lora_file(source)
        if isinstance(source, dict) and is_kohya(source):
            modules = {"unet": [n for n, _ in self.unet.named_modules()],
                       "text_encoder": [n for n, _ in self.text_encoder.named_modules()]}
            source = from_kohya(source, modules)
        adapter_name = adapter_name or get_adapter_name(self.unet)
        if isinstance(source, dict) and any(k.startswith("text_encoder.") for k in source):
            prefix = "text_encoder."
            load_text_encoder_lora(self.text_encoder, {k[len(prefix):]: v for k, v in source.items()
                                                       if k.startswith(prefix)}, adapter_name)
            source = {k: v for k, v in source.items() if not k.startswith(prefix)}
            if not source:
                return
        with quiet_lora_loading(isinstance(source, dict)):  # a dict's text-encoder part was applied above
            super().load_lora_weights(source, adapter_name=adapter_name, **kwargs)


class _NoTextEncoderNotice(stdlib_logging.Filter):
    def filter(self, record: stdlib_logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")



@contextlib.contextmanager
def quiet_lora_loading(text_encoder_applied: bool = True) -> Iterator[None]:
    """Hide two false notices while diffusers loads LoRA adapters: peft's warning on a second adapter (several,
    one per --lora, are intended) and, when `text_encoder_applied`, "No LoRA keys associated to CLIPTextModel
    found" for a state dict whose text-encoder part (if any) `load_text_encoder_lora` has already applied: there
    it is false (the keys were applied) or empty (the file has none). Hub ids are left to diffusers."""
    source = stdlib_logging.getLogger("diffusers.loaders.lora_base")
    drop = _NoTextEncoderNotice()
    if text_encoder_applied:
        source.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PEFT_SECOND_ADAPTER)
            yield
    finally:
        source.removeFilter(drop)


def native_index(index: dict[str, Any]) -> dict[str, Any]:
    """model_index.json as ldm_app reads it: a portable folder's entries for its code copies (which only plain
    diffusers needs, and only with trust_remote_code) replaced by ldm_app's own classes. Other folders pass."""
    if index.get("_class_name") != [PIPELINE_MODULE, "LdmPipeline"]:
        return index
    return {**{k: ["ldm_app.unet", "LdmUNet"] if v == [UNET_MODULE, "LdmUNet"] else v for k, v in index.items()},
            "_class_name": "LdmPipeline"}


def cast_quietly(pipe: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
    """`pipe.to(dtype)` without diffusers' warning that every cast gets (none of our modules need fp32)."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return pipe.to(dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
