"""The one training loop: UNet training in latent space with accelerate (CPU, one GPU, many GPUs/nodes).

Full training from scratch and LoRA fine-tuning share it; only which parameters are trainable differs.
Re-running the same command resumes from the run folder's last checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from .atomic import atomic_folder, atomic_write
from .batches import make_batches, seeded_generator
from .checkpoints import (CHECKPOINTS, TrainingError, checkpoints, hold_run_folder, require_free_space, resume,
                          save_checkpoint)
from .components import UNet, load_unet
from .consistency import ConsistencyLoss, add_guidance_input, frozen_copy, lcm_scheduler
from .config import Config, TrainConfig, save_config, validate_config
from .distributed import check_distributed, describe
from .encoders import Encoders, pipeline_subfolder
from .generation import generate_images
from .hub import make_portable, push_to_hub, share_export, write_model_card
from .loading import load_model
from .lora import KOHYA_FILE, LORA_FILE, TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora
from .lora_saving import save_lora
from .objective import DenoisingLoss, noise_scheduler, sampling_scheduler
from .pipeline import LdmPipeline
from .request import GenerationRequest
from .single_file import is_single_file
from .unet import LdmUNet


# train.report_to → accelerate's log_with (accelerate's own "all" means every tracker that happens to be installed)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "all": ["tensorboard", "wandb"], "none": None}

# ----------------------------------------------------------------------------------------------------------
# The loop


def train(config: Config, setup_unet: Callable[[UNet], None] | None = None, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None) -> Path:
    """Train (or resume) the run in `config.train.output_dir`; returns its exported pipeline folder, or with
    LoRA (`lora.rank > 0`) the adapters' file, `pytorch_lora_weights.safetensors`.

    `setup_unet` may freeze parameters or add hooks before the optimizer is built; only parameters that still
    require grad are optimised. `progress=False` (a command's --quiet) hides the progress bars and notes.
    `on_step(step, loss)` runs after each step's checkpoint and validation: a server reports progress there, and
    an exception it raises stops the run at that step boundary (re-running resumes).
    """
    validate_config(config)  # also for a Config built in code rather than by load_config
    out = Path(config.train.output_dir).expanduser()

    # 1. Set up accelerate (devices, mixed precision, gradient accumulation, trackers) and the run folder
    try:
        accelerator = Accelerator(
            mixed_precision=config.train.mixed_precision,
            gradient_accumulation_steps=config.train.gradient_accumulation_steps,
            log_with=TRACKERS[config.train.report_to],
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    except ImportError as err:  # a DeepSpeed launch without deepspeed installed: accelerate's message says what to do
        raise ValueError(str(err)) from err
    # the saved config says which precision and distributed setup ran, also when they came from `accelerate launch`
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, mixed_precision=accelerator.mixed_precision,
        distributed_type=check_distributed(accelerator, config.train.distributed_type)))
    if progress:  # a note, as the progress bars are
        accelerator.print(f"Training with {describe(accelerator)}, mixed precision {accelerator.mixed_precision}")
    t, obj, train_text = config.train, config.objective, config.lora.train_text_encoder
    rank, world = accelerator.process_index, accelerator.num_processes
    with hold_run_folder(out, accelerator):  # one trainer per run folder; a full disk is one line
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_config(config, out / "config.yaml")
        torch.manual_seed(t.seed)  # same initial weights on every process
        torch.set_flush_denormal(True)  # zero-initialised layers make denormal floats early on: 50× slower on CPUs

        # 2. Frozen encoders and the UNet. Full training trains all of the UNet; LoRA fine-tuning (lora.rank > 0)
        # only rank-r adapters on its attention, and with lora.train_text_encoder on the text encoder's too
        encoders = Encoders.load(config.model, accelerator.device, frozen_dtype(accelerator))
        unet = build_unet(config, encoders.text_encoder.config.hidden_size, encoders.vae.config.latent_channels,
                          config.data.resolution // encoders.vae_factor)
        teacher = distillation_teacher(unet, config)
        if config.lora.rank:
            add_lora(unet, config.lora.rank, config.lora.alpha, UNET_TARGETS)
        if setup_unet is not None:
            setup_unet(unet)
        if config.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if t.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
            if teacher is not None:
                teacher = teacher.to(memory_format=torch.channels_last)
        require_free_space(out, [unet], [] if config.lora.rank else [unet, encoders.vae, encoders.text_encoder])

        # 3. The batch source: the encoded cache, encoding every step, or a stream
        batches = make_batches(config, encoders, accelerator, out / "cache", encode_text=not train_text,
                               progress=progress)
        if train_text:  # added after the cache was keyed on the frozen text encoder's weights
            add_lora(encoders.text_encoder, config.lora.rank, config.lora.alpha, TEXT_ENCODER_TARGETS)
        trained = [unet, encoders.text_encoder] if train_text else [unet]
        # ∅ for caption dropout: its hidden states, or its token ids when the text encoder trains and runs in-graph
        empty = encoders.tokenize([""]) if train_text else encoders.encode_captions([""]).cpu()

        # 4. The trainable parameters in fp32, their EMA, the optimizer and the LR schedule
        params = [p for model in trained for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        ema = EMAModel(params, decay=t.ema_decay, use_ema_warmup=True, power=3 / 4) if t.use_ema else None
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay)
        lr_scheduler = lr_schedule(optimizer, t)
        if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed reads the micro-batch from a dataloader we lack
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
        *trained, optimizer = accelerator.prepare(*trained, optimizer)
        unet, text_encoder = trained[0], (trained[1] if train_text else None)
        if teacher is None:
            loss_fn = DenoisingLoss(noise_scheduler(obj), obj, empty, encoders.scaling_factor, accelerator.device)
        else:  # the EMA is the target network θ⁻
            loss_fn = ConsistencyLoss(noise_scheduler(obj), config.distill, teacher.to(accelerator.device),
                                      copy.deepcopy(accelerator.unwrap_model(unet)) if ema is not None else None,
                                      ema, empty, encoders.scaling_factor, accelerator.device)

        # 5. Resume from the last complete checkpoint
        ckpt_dir = out / CHECKPOINTS
        step = resume(accelerator, ckpt_dir, lr_scheduler, ema)
        if step:
            use_configured_learning_rate(lr_scheduler, t.learning_rate, accelerator)
        if ema is not None:  # after load_state: it loads the EMA weights onto the CPU
            ema.to(accelerator.device)
        if accelerator.is_main_process:
            accelerator.init_trackers("ldm", config=flat_config(config))

        # 6. Training loop
        start_time, done_at_start = time.time(), step
        samples_per_step = t.batch_size * world * t.gradient_accumulation_steps
        bar = tqdm(total=t.max_steps, initial=step, desc="Training", disable=not (progress and accelerator.is_local_main_process))
        unet.train()
        while step < t.max_steps:
            for k in range(t.gradient_accumulation_steps):
                micro = step * t.gradient_accumulation_steps + k
                batch = batches(micro, t.batch_size, rank, world)
                with accelerator.accumulate(*trained):
                    loss = loss_fn(unet, batch, seeded_generator(t.seed, 4, micro, rank), text_encoder)
                    if not torch.isfinite(loss):
                        last = checkpoints(ckpt_dir)[-1] if checkpoints(ckpt_dir) else "none yet"
                        raise TrainingError(f"Loss is {loss.item()} at step {step}; stopping. Last good checkpoint: "
                                            f"{last}. Lower train.learning_rate or use train.mixed_precision=no.")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
            if ema is not None:
                ema.step(params)
            step += 1

            # Logging, checkpoints, validation
            elapsed = time.time() - start_time
            rate = (step - done_at_start) * samples_per_step / max(elapsed, 1e-9)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", samples_per_s=f"{rate:.1f}")
            if step % t.log_every == 0:
                accelerator.log({"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0], "samples_per_s": rate},
                                step=step)
            out_of_time = t.max_minutes is not None and bool(accelerator.reduce(  # all processes stop together
                torch.tensor(float(elapsed > 60 * t.max_minutes), device=accelerator.device), "max"))
            if step % t.checkpoint_every == 0 or step == t.max_steps or out_of_time:
                save_checkpoint(accelerator, ckpt_dir, step, t.keep_checkpoints, lr_scheduler, ema)
            if accelerator.is_main_process and t.validation_every and step % t.validation_every == 0:
                pipe = make_pipeline(accelerator, trained, ema, encoders, config)
                validation_grid(pipe, config, out / "samples" / f"step-{step:07d}.png")
            if on_step is not None:
                on_step(step, loss.item())
            if out_of_time:
                accelerator.print(f"Time budget of {t.max_minutes} min reached at step {step}; re-run to continue.")
                break
        bar.close()
        if not t.cache:  # the cache reports its undecodable images when it is built
            skipped = accelerator.reduce(torch.tensor(batches.skipped, device=accelerator.device), "sum")
            accelerator.print(f"{int(skipped)} undecodable images skipped while making batches "
                              "(a bad file counts each time it comes up)")

        # 7. Export the pipeline, or just the LoRA adapters (EMA weights where kept)
        if accelerator.is_main_process:
            pipe = make_pipeline(accelerator, trained, ema, encoders, config)
            if config.lora.rank:
                save_lora(pipe.unet, pipe.text_encoder if train_text else None, out, config.lora.kohya)
                share_export(out, "lora", config.model.pretrained_unet, t.validation_prompts,
                             config_dict=dataclasses.asdict(config), push_to=hub_repo(t), private=t.hub_private,
                             allow_patterns=[LORA_FILE, KOHYA_FILE])
            else:
                export_pipeline(pipe, out / "pipeline", step, config)
                if t.push_to_hub:
                    push_to_hub(out / "pipeline", t.hub_model_id, private=t.hub_private)
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return out / LORA_FILE if config.lora.rank else out / "pipeline"


# ----------------------------------------------------------------------------------------------------------
# Stages


def distillation_teacher(unet: UNet, config: Config) -> UNet | None:
    """With `distill.method` set: a frozen copy of the pretrained UNet as the teacher, taken before adapters or
    the guidance input are added to the student (and before a resumed checkpoint overwrites it)."""
    if config.distill.method == "none":
        return None
    teacher = frozen_copy(unet)
    if config.distill.time_cond_proj_dim:
        add_guidance_input(unet, config.distill.time_cond_proj_dim)
    return teacher


def frozen_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """Half precision for the frozen encoders on GPUs under mixed precision (they only run forward)."""
    if accelerator.device.type != "cuda":
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)


def build_unet(config: Config, cross_attention_dim: int, latent_channels: int, latent_size: int) -> UNet:
    """A pretrained UNet (pipeline or UNet folder, single-file checkpoint), or a fresh LdmUNet sized to the
    encoders."""
    m = config.model
    if m.pretrained_unet and is_single_file(m.pretrained_unet):
        return load_model(m.pretrained_unet).unet.train()
    if m.pretrained_unet:
        subfolder = pipeline_subfolder(m.pretrained_unet, m.pretrained_unet_subfolder, "unet")
        return load_unet(m.pretrained_unet, subfolder).train()
    overrides = dict(cross_attention_dim=cross_attention_dim, in_channels=latent_channels,
                     out_channels=latent_channels, sample_size=latent_size) | m.unet_overrides
    return LdmUNet.from_preset(m.unet_preset, **overrides)


def lr_schedule(optimizer: torch.optim.Optimizer, t: TrainConfig) -> LambdaLR:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to 0 at `max_steps`."""
    name = t.lr_scheduler
    if name == "constant" and t.warmup_steps > 0:  # diffusers' "constant" silently drops num_warmup_steps
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)


def use_configured_learning_rate(lr_scheduler: LambdaLR, learning_rate: float, accelerator: Accelerator) -> None:
    """After a resume: `train.learning_rate` as given now, not as the checkpoint had it, from the next step on (the
    schedule's shape and position are kept), so a run can go on with a lower rate (e.g. a distillation's last,
    quieter phase: lower rate, larger batch). Unchanged, nothing moves and the resume stays bit-identical."""
    if all(base == learning_rate for base in lr_scheduler.base_lrs):
        return
    accelerator.print(f"note: train.learning_rate={learning_rate:g} replaces the checkpoint's "
                      f"{lr_scheduler.base_lrs[0]:g} from here on")
    lr_scheduler.base_lrs = [learning_rate] * len(lr_scheduler.base_lrs)
    groups = lr_scheduler.optimizer.param_groups
    for group, factor in zip(groups, lr_scheduler.lr_lambdas):
        group["lr"] = learning_rate * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in groups]


def with_ema(models: list[torch.nn.Module], ema: EMAModel | None) -> list[torch.nn.Module]:
    """Copies of the trained models carrying the EMA weights (the weights we sample and export with)."""
    copies = [copy.deepcopy(m) for m in models]
    if ema is not None:
        ema.copy_to([p for m in copies for p in m.parameters() if p.requires_grad])
    return [m.eval().to(memory_format=torch.contiguous_format) for m in copies]


def validation_grid(pipe: LdmPipeline, config: Config, path: Path) -> None:
    """Sample the validation prompts (columns) × seeds (rows) into one image, written atomically."""
    t = config.train
    requests = [GenerationRequest(prompt, steps=t.validation_steps, guidance=t.validation_guidance, sampler=None,
                                  seed=seed) for seed in t.validation_seeds for prompt in t.validation_prompts]
    images = [image for (image,) in generate_images(pipe, requests, batch_size=len(t.validation_prompts))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        make_image_grid(images, rows=len(t.validation_seeds), cols=len(t.validation_prompts)).save(tmp)


def export_pipeline(pipe: LdmPipeline, folder: Path, step: int, config: Config | None = None) -> None:
    """Write the pipeline folder with the step it holds, so that a crash at any point leaves a complete one:
    the new folder is written beside it, the old one renamed aside (`.old`), the new one renamed in. With the
    run's `config` it is made ready to share: loadable by plain diffusers, with a model card."""
    with atomic_folder(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_step.json").write_text(json.dumps({"step": step}))
        if config is not None:  # the card names the final folder (or the Hub repo), not this temporary one
            grids = sorted((folder.parent / "samples").glob("step-*.png"))
            make_portable(tmp)
            write_model_card(tmp, "pipeline", config.model.pretrained_unet, config.train.validation_prompts,
                             grids[-1] if grids else None, dataclasses.asdict(config),
                             repo_id=hub_repo(config.train) or str(folder.resolve()))


def hub_repo(t: TrainConfig) -> str | None:
    return t.hub_model_id if t.push_to_hub else None


def flat_config(config: Config) -> dict[str, bool | int | float | str]:
    """The run's settings as `section.key` scalars, as trackers take hyperparameters (TensorBoard's hparams
    accept no None, lists or dicts: those become their text)."""
    flat = {}
    for section, values in dataclasses.asdict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def make_pipeline(accelerator: Accelerator, trained: list[torch.nn.Module], ema: EMAModel | None,
                  encoders: Encoders, config: Config) -> LdmPipeline:
    """A pipeline with the trained models' EMA weights (the UNet, and the text encoder where it trains)."""
    unet, *trained_text = with_ema([accelerator.unwrap_model(m) for m in trained], ema)
    scheduler = (sampling_scheduler(config.objective) if config.distill.method == "none"
                 else lcm_scheduler(config.objective, config.distill))
    pipe = LdmPipeline(vae=encoders.vae, text_encoder=trained_text[0] if trained_text else encoders.text_encoder,
                       tokenizer=encoders.tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
