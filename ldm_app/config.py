"""Training configuration: dataclass defaults < a YAML file < `section.key=value` on the command line.

Every field has a comment; an unknown key is an error that lists the valid ones, and the resolved config is
written into the run folder so a run can be read back and resumed exactly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .atomic import atomic_write


@dataclass
class DataConfig:
    path: str = ""  # imagefolder with metadata.jsonl, a folder of images with .txt captions, or a hub dataset name
    split: str = "train"  # dataset split to train on
    caption_column: str = "text"  # column holding the caption (a string or a list of strings)
    tags_column: str | None = None  # optional column of extra short captions (e.g. emoji tags), sampled too
    caption_templates: list[str] = field(default_factory=lambda: ["{}"])  # applied to the caption, e.g. "a {}"
    tag_templates: list[str] = field(default_factory=lambda: ["{}"])  # applied to each tag
    tag_probability: float = 0.3  # chance that a step uses one of an example's tag captions instead of its caption
    resolution: int = 64  # images are resized (shorter side) and cropped to this square size
    center_crop: bool = True  # center crop; False = random crop (not cacheable)
    random_flip: bool = False  # horizontal flip; off by default because captions may say left/right
    streaming: bool = False  # stream a dataset larger than the disk (no cache)
    num_workers: int = 0  # data-loader worker processes when not training from the cache
    max_samples: int | None = None  # use only the first N examples (smoke tests)


@dataclass
class ModelConfig:
    vae: str = ""  # VAE folder or hub id (a pipeline folder works with vae_subfolder="vae")
    vae_subfolder: str | None = None  # folder inside `vae` (default: "vae" when `vae` is a pipeline folder)
    text_encoder: str = ""  # CLIP text encoder folder or hub id
    text_encoder_subfolder: str | None = None  # likewise ("text_encoder")
    tokenizer: str = ""  # CLIP tokenizer folder or hub id (default: the text encoder's location)
    tokenizer_subfolder: str | None = None  # likewise ("tokenizer"); used only when `tokenizer` is set
    unet_preset: str = "small"  # LdmUNet size when training from scratch (see ldm_app.unet.UNET_PRESETS)
    unet_overrides: dict[str, Any] = field(default_factory=dict)  # LdmUNet arguments that override the preset
    pretrained_unet: str | None = None  # start from a UNet or pipeline folder instead (LdmUNet or UNet2DConditionModel)
    pretrained_unet_subfolder: str | None = None  # likewise ("unet")
    gradient_checkpointing: bool = False  # trade compute for activation memory


BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


@dataclass
class ObjectiveConfig:
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"  # ε, x0 or v view of the loss
    beta_schedule: BetaSchedule = "scaled_linear"  # β_t over t (SD's)
    beta_start: float = 0.00085  # β_1 (linear schedules)
    beta_end: float = 0.012  # β_T (linear schedules)
    num_train_timesteps: int = 1000  # T, the number of forward-process steps
    zero_terminal_snr: bool = False  # rescale betas so x_T is pure noise (Lin et al. 2023); not with epsilon
    snr_gamma: float | None = 5.0  # min-SNR-γ loss weighting (Hang et al. 2023); None = plain MSE
    caption_dropout: float = 0.1  # probability of the empty prompt, so classifier-free guidance works
    noise_offset: float = 0.0  # per-channel offset noise (helps very dark / bright images)


@dataclass
class TrainConfig:
    output_dir: str = "runs/ldm"  # run folder: config, checkpoints, cache, logs, samples, final pipeline
    seed: int = 0  # initial weights, data order and all noise follow from it
    batch_size: int = 64  # per process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 10_000  # optimizer steps
    max_minutes: float | None = None  # stop (with a checkpoint) after this wall time; re-run to continue
    learning_rate: float = 2e-4  # peak AdamW learning rate, reached after the warm-up
    lr_scheduler: Literal["constant", "cosine"] = "cosine"  # after the warm-up: hold, or cosine decay to 0 at max_steps
    warmup_steps: int = 500  # linear warm-up from 0 to learning_rate (with either scheduler)
    adam_beta1: float = 0.9  # AdamW's first-moment decay
    adam_beta2: float = 0.999  # AdamW's second-moment decay
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    # autocast, master weights stay fp32; unset: what `accelerate launch` was given (its config or flag), else no
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    # accelerate's distributed type (NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED); unset: whatever `accelerate launch`
    # sets up, written back into the run's config.yaml; set: the run refuses to start under any other
    distributed_type: str | None = None
    use_ema: bool = True  # keep an exponential moving average of the weights; it is what gets sampled and exported
    ema_decay: float = 0.999  # EMAModel's maximum decay (warm-up lets early steps move faster)
    cache: bool = True  # cache VAE posteriors and text-encoder states once, in the run folder
    channels_last: bool = True  # faster convolutions on CPU and GPU
    checkpoint_every: int = 500  # steps between accelerator.save_state checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept, older ones deleted (0 = keep all)
    log_every: int = 10  # steps between TensorBoard scalars
    validation_every: int = 1000  # steps between validation grids (0 = off)
    validation_prompts: list[str] = field(  # one column of the validation grid each
        default_factory=lambda: ["a cat", "a red heart", "a smiling face", "a dog"])
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])  # one row of the grid each
    validation_steps: int = 25  # DDIM steps per validation image
    validation_guidance: float = 5.0  # classifier-free guidance scale of the validation images
    report_to: Literal["tensorboard", "wandb", "all", "none"] = "tensorboard"  # where loss/lr/throughput go
    push_to_hub: bool = False  # upload the export (pipeline folder or LoRA file, with its model card) when done
    hub_model_id: str | None = None  # the Hub repo to push to, owner/name (needed with push_to_hub)
    hub_private: bool = False  # create that repo private


@dataclass
class LoraTrainConfig:
    rank: int = 0  # 0: train the whole UNet; r > 0: train only rank-r LoRA adapters on a frozen pretrained UNet
    alpha: float | None = None  # LoRA α; the update is scaled by α/r (default α = r)
    kohya: bool = False  # also write the adapters in kohya/A1111 format
    train_text_encoder: bool = False  # also adapt the text encoder's attention (captions then encoded in-graph)


@dataclass
class DistillConfig:
    # "lcm": latent consistency distillation (Luo et al. 2023) of model.pretrained_unet into the trained UNet
    # (whole, or LoRA with lora.rank > 0); the EMA (train.ema_decay, e.g. 0.95) is the target network θ⁻
    method: Literal["none", "lcm"] = "none"
    num_ddim_timesteps: int = 50  # N: the teacher's DDIM solver skips T/N timesteps per step (LCMScheduler's original_inference_steps)
    guidance_min: float = 3.0  # the teacher's CFG scale ω+1 is drawn uniformly from [guidance_min, guidance_max]
    guidance_max: float = 7.0
    loss: Literal["huber", "l2"] = "huber"  # consistency distance: pseudo-Huber √(d² + c²) − c, or squared error
    huber_c: float = 0.001  # c of the pseudo-Huber loss
    timestep_scaling: float = 10.0  # boundary conditions c_skip, c_out at t × this (LCMScheduler's timestep_scaling)
    time_cond_proj_dim: int | None = None  # give a whole student (lora.rank 0) a zero-initialised guidance input


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)  # what to train on
    model: ModelConfig = field(default_factory=ModelConfig)  # the frozen encoders and the UNet
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # noise schedule and loss
    train: TrainConfig = field(default_factory=TrainConfig)  # the loop: optimizer, checkpoints, validation
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)  # LoRA fine-tuning instead of full training
    distill: DistillConfig = field(default_factory=DistillConfig)  # consistency distillation instead of denoising


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the field's type, with an error that names the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise ValueError(f"{key}={value!r} does not fit the type {annotation}.")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off and yes/on as booleans
            value = next((word for word in (("yes", "on") if value else ("no", "off")) if word in args), value)
        if value not in args:
            raise ValueError(f"{key}={value!r}; choose one of {', '.join(map(str, args))}.")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{key}={value!r} is not a boolean; use true or false.")
    if annotation is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{key}={value!r} is not a whole number.")  # int() would truncate 2.7 to 2
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} is not a {annotation.__name__}.") from None
    if origin in (list, dict):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, origin):
            raise ValueError(f"{key}={value!r} is not a {origin.__name__}.")
        return value
    return value


def _apply(config: Config, key: str, value: Any) -> None:
    section_name, _, name = key.partition(".")
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if section_name not in sections or not name:
        raise ValueError(f"Unknown config key {key!r}; keys look like section.name with section one of "
                         f"{', '.join(sections)}.")
    section = sections[section_name]
    types_ = _field_types(type(section))
    if name not in types_:
        raise ValueError(f"Unknown config key {key!r}; valid keys in '{section_name}': {', '.join(types_)}.")
    setattr(section, name, _coerce(value, types_[name], key))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    """Defaults (or `base`), then the YAML file's sections, then `section.key=value` overrides."""
    config = base or Config()
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of sections "
                             f"({', '.join(f.name for f in dataclasses.fields(Config))}).")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ValueError(f"Section {section!r} in {path} must be a mapping of key: value.")
            for name, value in values.items():
                _apply(config, f"{section}.{name}", value)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Override {item!r} must look like section.key=value, e.g. train.batch_size=64.")
        _apply(config, key.strip(), yaml.safe_load(value) if value.strip() else "")
    validate_config(config)
    return config


def validate_config(config: Config) -> None:
    """Settings that load but cannot work together; the error says how to fix them."""
    _check_ranges(config)
    o, t, lora = config.objective, config.train, config.lora
    if o.zero_terminal_snr and o.prediction_type == "epsilon":  # the first DDIM step divides by √ᾱ_T = 0
        raise ValueError("objective.zero_terminal_snr=true with prediction_type=epsilon samples NaN images; "
                         "set objective.prediction_type=v_prediction.")
    if lora.rank and not config.model.pretrained_unet:
        raise ValueError("lora.rank > 0 fine-tunes a pretrained UNet; set model.pretrained_unet to a pipeline folder.")
    if lora.train_text_encoder and not lora.rank:
        raise ValueError("lora.train_text_encoder needs LoRA on the UNet too; set lora.rank > 0.")
    _check_distill(config)
    if t.cache and config.data.streaming:
        raise ValueError("train.cache=true needs a finite dataset; set train.cache=false to stream.")
    if t.cache and not config.data.center_crop:
        raise ValueError("Random crops cannot be cached; set data.center_crop=true or train.cache=false.")
    if t.push_to_hub and (not t.hub_model_id or t.hub_model_id.count("/") != 1):
        raise ValueError("train.push_to_hub=true needs the repo to push to; set train.hub_model_id=owner/name.")
    if t.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:  # accelerate would drop it
        raise ValueError(f"train.report_to={t.report_to} needs wandb: pip install wandb (then wandb login), or set "
                         "train.report_to=tensorboard.")


def _check_distill(config: Config) -> None:
    d = config.distill
    if d.method == "none":
        return
    if not config.model.pretrained_unet:
        raise ValueError("distill.method=lcm distils a pretrained teacher; set model.pretrained_unet to a pipeline folder.")
    if config.lora.train_text_encoder:
        raise ValueError("distill.method=lcm keeps the text encoder frozen; set lora.train_text_encoder=false.")
    if d.time_cond_proj_dim and config.lora.rank:
        raise ValueError("distill.time_cond_proj_dim adds a layer that LoRA would not train; use lora.rank=0 with it "
                         "or unset it.")
    if not (_is_whole(d.num_ddim_timesteps) and 1 <= d.num_ddim_timesteps <= config.objective.num_train_timesteps):
        raise ValueError(f"distill.num_ddim_timesteps={d.num_ddim_timesteps!r} must be a whole number from 1 to "
                         f"objective.num_train_timesteps, e.g. 50.")
    if not 1 <= d.guidance_min <= d.guidance_max < float("inf"):
        raise ValueError(f"distill.guidance_min={d.guidance_min!r} and guidance_max={d.guidance_max!r} must satisfy "
                         "1 <= guidance_min <= guidance_max, e.g. 3 and 7.")
    if not (d.huber_c > 0 and d.timestep_scaling > 0):
        raise ValueError("distill.huber_c and distill.timestep_scaling must be > 0, e.g. 0.001 and 10.")


# Range checks, run before any work so that a bad value never costs a cache build: (key, what the bound means).
# Comparisons are written so that NaN fails them.
_AT_LEAST_ONE = [("train.batch_size", "samples per process per step"), ("train.max_steps", "optimizer steps"),
                 ("train.gradient_accumulation_steps", "micro-batches per step; 1 = none"),
                 ("train.checkpoint_every", "steps between checkpoints"), ("train.log_every", "steps between logs"),
                 ("train.validation_steps", "sampling steps"), ("objective.num_train_timesteps", "e.g. 1000")]
_AT_LEAST_ZERO = [("train.warmup_steps", "0 = no warm-up"), ("train.keep_checkpoints", "0 = keep all"),
                  ("train.validation_every", "0 = off"), ("data.num_workers", "0 = load in the main process"),
                  ("lora.rank", "0 = full training")]
_PROBABILITIES = ["data.tag_probability", "objective.caption_dropout", "train.ema_decay"]


def _get(config: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def _check_template(key: str, template: Any) -> None:
    """A caption template formats one caption: only `{}` / `{0}` fields, so nothing else can be read through
    `str.format` (`{0.__class__}`, `{0[1]}`) and no field waits for a second argument (`{1}`)."""
    fix = f"write templates like \"a photo of {{}}\" with {{}} where the caption goes, e.g. {key}='[\"a {{}}\"]'."
    if not isinstance(template, str):
        raise ValueError(f"{key} holds {template!r}, not a string; {fix}")
    try:  # fields are checked before anything is formatted
        fields = [(name, spec) for _, name, spec, _ in string.Formatter().parse(template) if name is not None]
        if not fields or any(name not in ("", "0") or "{" in spec for name, spec in fields):
            raise ValueError("it must hold {} for the caption and no other field")
        template.format("caption")
    except ValueError as err:
        raise ValueError(f"{key} template {template!r} does not format a caption: {err}; {fix}") from None


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ranges(config: Config) -> None:
    """Each numeric setting within the range it can work in; the error names the key and what works."""
    for lowest, keys in ((1, _AT_LEAST_ONE), (0, _AT_LEAST_ZERO)):
        for key, hint in keys:
            value = _get(config, key)
            if not (_is_whole(value) and value >= lowest):
                raise ValueError(f"{key}={value!r} must be a whole number >= {lowest} ({hint}).")
    for key in _PROBABILITIES:
        value = _get(config, key)
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"{key}={value!r} must be between 0 and 1.")
    t, d = config.train, config.data
    if not (isinstance(t.learning_rate, (int, float)) and 0 < t.learning_rate < float("inf")):
        raise ValueError(f"train.learning_rate={t.learning_rate!r} must be > 0, e.g. train.learning_rate=1e-4.")
    if t.max_minutes is not None and not t.max_minutes >= 0:
        raise ValueError(f"train.max_minutes={t.max_minutes!r} must be >= 0 (or null for no time limit).")
    o, lora = config.objective, config.lora
    # (key, value, fits, what works); comparisons written so that NaN fails them
    for key, value, fits, works in (
        ("train.max_grad_norm", t.max_grad_norm, t.max_grad_norm >= 0, ">= 0 (0 = no clipping)"),
        ("train.adam_beta1", t.adam_beta1, 0 <= t.adam_beta1 < 1, "in [0, 1), e.g. 0.9"),
        ("train.adam_beta2", t.adam_beta2, 0 <= t.adam_beta2 < 1, "in [0, 1), e.g. 0.999"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
        ("objective.noise_offset", o.noise_offset, o.noise_offset >= 0, ">= 0 (0 = off)"),
        ("objective.snr_gamma", o.snr_gamma, o.snr_gamma is None or o.snr_gamma > 0, "> 0, e.g. 5 (or null)"),
        ("lora.alpha", lora.alpha, lora.alpha is None or 0 < lora.alpha < float("inf"), "> 0 (or null: α = rank)"),
    ):
        if not fits:
            raise ValueError(f"{key}={value!r} must be {works}.")
    if not (_is_whole(d.resolution) and d.resolution >= 8 and d.resolution % 8 == 0):
        nearest = max(8, d.resolution // 8 * 8) if _is_whole(d.resolution) else 64
        raise ValueError(f"data.resolution={d.resolution!r} must be a positive multiple of 8 (the VAE downsamples by "
                         f"up to 8), e.g. data.resolution={nearest}.")
    for key in ("data.caption_templates", "data.tag_templates"):
        templates = _get(config, key)
        if not isinstance(templates, list) or not templates:
            raise ValueError(f"{key} must be a non-empty list of templates, e.g. {key}='[\"{{}}\", \"a {{}}\"]'.")
        for template in templates:
            _check_template(key, template)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain dicts and lists, for YAML."""
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
