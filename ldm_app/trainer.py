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
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from .atomic import atomic_folder, atomic_write
from .batches import Batch, CachedBatches, EncodingBatches, StreamingBatches, seeded_generator
from .checkpoints import (CHECKPOINTS, TrainingError, checkpoints, hold_run_folder, require_free_space, resume,
                          save_checkpoint)
from .cache import build_encoded_dataset, encode_captions, cache_key, load_or_build_cache, tokenize
from .components import UNet, load_text_encoder, load_tokenizer, load_unet, load_vae
from .config import Config, ObjectiveConfig, TrainConfig, save_config, validate_config
from .data import load_image_dataset
from .lora import LORA_FILE, TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, save_lora
from .objective import diffusion_loss, noise_scheduler, sampling_scheduler
from .pipeline import LdmPipeline
from .unet import LdmUNet


# ----------------------------------------------------------------------------------------------------------
# Helpers


def pipeline_subfolder(path: str, subfolder: str | None, component: str) -> str | None:
    """The explicit subfolder, else the component's subfolder when `path` is a local pipeline folder."""
    if subfolder is None and (Path(path).expanduser() / "model_index.json").is_file():
        return component
    return subfolder


def build_unet(config: Config, cross_attention_dim: int, latent_channels: int, latent_size: int) -> UNet:
    """A pretrained UNet (pipeline or UNet folder), or a fresh LdmUNet sized to the encoders."""
    m = config.model
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


def with_ema(models: list[torch.nn.Module], ema: EMAModel | None) -> list[torch.nn.Module]:
    """Copies of the trained models carrying the EMA weights (the weights we sample and export with)."""
    copies = [copy.deepcopy(m) for m in models]
    if ema is not None:
        ema.copy_to([p for m in copies for p in m.parameters() if p.requires_grad])
    return [m.eval().to(memory_format=torch.contiguous_format) for m in copies]


def validation_grid(pipe: LdmPipeline, config: Config, path: Path) -> None:
    """Sample the validation prompts (columns) × seeds (rows) into one image, written atomically."""
    t = config.train
    images = []
    for seed in t.validation_seeds:
        images += pipe(t.validation_prompts, num_inference_steps=t.validation_steps,
                       guidance_scale=t.validation_guidance,
                       generator=[torch.Generator().manual_seed(seed) for _ in t.validation_prompts]).images
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        make_image_grid(images, rows=len(t.validation_seeds), cols=len(t.validation_prompts)).save(tmp)


def export_pipeline(pipe: LdmPipeline, folder: Path, step: int) -> None:
    """Write the pipeline folder with the step it holds, so that a crash at any point leaves a complete one:
    the new folder is written beside it, the old one renamed aside (`.old`), the new one renamed in."""
    with atomic_folder(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_step.json").write_text(json.dumps({"step": step}))


# ----------------------------------------------------------------------------------------------------------
# The loop


def train(config: Config, setup_unet: Callable[[UNet], None] | None = None) -> Path:
    """Train (or resume) the run in `config.train.output_dir`; returns its exported pipeline folder, or with
    LoRA (`lora.rank > 0`) the adapters' file, `pytorch_lora_weights.safetensors`.

    `setup_unet` may freeze parameters or add adapters before the optimizer is built (LoRA fine-tuning);
    only parameters that still require grad are optimised.
    """
    validate_config(config)  # also for a Config built in code rather than by load_config
    t, obj = config.train, config.objective
    out = Path(t.output_dir).expanduser()

    # Setup accelerate: devices, mixed precision, gradient accumulation, TensorBoard
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    # the saved config says which precision ran, also when it came from `accelerate launch`
    config = dataclasses.replace(config, train=dataclasses.replace(t, mixed_precision=accelerator.mixed_precision))
    t = config.train
    with hold_run_folder(out, accelerator):  # before anything is written there
        rank, world = accelerator.process_index, accelerator.num_processes
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_config(config, out / "config.yaml")
        torch.manual_seed(t.seed)  # same initial weights on every process
        torch.set_flush_denormal(True)  # zero-initialised layers make denormal floats early on: 50× slower on CPUs

        # Frozen encoders (half precision on GPUs under mixed precision: they only run forward)
        m = config.model
        enc_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision) \
            if accelerator.device.type == "cuda" else None
        vae = load_vae(m.vae, pipeline_subfolder(m.vae, m.vae_subfolder, "vae"), enc_dtype).to(accelerator.device)
        text_encoder = load_text_encoder(m.text_encoder, pipeline_subfolder(
            m.text_encoder, m.text_encoder_subfolder, "text_encoder"), enc_dtype).to(accelerator.device)
        tok_path = m.tokenizer or m.text_encoder
        tokenizer = load_tokenizer(tok_path, pipeline_subfolder(
            tok_path, m.tokenizer_subfolder if m.tokenizer else None, "tokenizer"))
        scaling = vae.config.scaling_factor
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)

        # The UNet: trainable parameters in fp32 (accelerate autocasts the forward pass)
        unet = build_unet(config, text_encoder.config.hidden_size, vae.config.latent_channels,
                          config.data.resolution // vae_factor)
        if config.lora.rank:
            if not m.pretrained_unet:
                raise ValueError("lora.rank > 0 fine-tunes a pretrained UNet; "
                                 "set model.pretrained_unet to a pipeline folder.")
            add_lora(unet, config.lora.rank, config.lora.alpha, UNET_TARGETS)
        elif config.lora.train_text_encoder:
            raise ValueError("lora.train_text_encoder needs LoRA on the UNet too; set lora.rank > 0.")
        if setup_unet is not None:
            setup_unet(unet)
        if m.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if t.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        train_text = config.lora.train_text_encoder
        require_free_space(out, [unet, text_encoder] if train_text else [unet],
                           [] if config.lora.rank else [unet, vae, text_encoder])
        frozen_text_encoder = None if train_text else text_encoder  # a trained one runs inside the training graph

        # Data: the encoded cache, or decoding + encoding every step
        ds = load_image_dataset(config.data)
        if t.cache and config.data.streaming:
            raise ValueError("train.cache=true needs a finite dataset; set train.cache=false to stream.")
        if t.cache and not config.data.center_crop:
            raise ValueError("Random crops cannot be cached; set data.center_crop=true or train.cache=false.")
        if t.cache:
            key = cache_key(ds, config.data, vae, tokenizer, text_encoder)
            if accelerator.is_main_process:  # one process encodes; the others read what it wrote
                encoded = load_or_build_cache(
                    out / "cache", key, lambda: build_encoded_dataset(ds, config.data, vae, tokenizer, text_encoder))
            accelerator.wait_for_everyone()
            if not accelerator.is_main_process:
                encoded = load_or_build_cache(out / "cache", key, lambda: None)
            batches = CachedBatches(encoded, t.seed, config.data)
        elif config.data.streaming:
            batches = StreamingBatches(ds, config.data, t.seed, rank, world, vae, tokenizer, frozen_text_encoder)
        else:
            batches = EncodingBatches(ds, config.data, t.seed, vae, tokenizer, frozen_text_encoder)
        if t.cache:
            accelerator.print(f"{len(encoded)} training images cached ({encoded.skipped} failed to decode, skipped)")
        # ∅ for caption dropout: its hidden states, or its token ids when the text encoder trains and runs in-graph
        empty = tokenize(tokenizer, [""]) if train_text else encode_captions(tokenizer, text_encoder, [""]).cpu()

        # Trainable parameters in fp32, and their EMA (LoRA on the text encoder is added after the cache is keyed)
        if train_text:
            add_lora(text_encoder, config.lora.rank, config.lora.alpha, TEXT_ENCODER_TARGETS)
        trained = [unet, text_encoder] if train_text else [unet]
        params = [p for model in trained for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        ema = EMAModel(params, decay=t.ema_decay, use_ema_warmup=True, power=3 / 4) if t.use_ema else None

        # Optimizer, LR warm-up + decay, and the noise schedule of the forward process
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay)
        lr_scheduler = lr_schedule(optimizer, t)
        scheduler = noise_scheduler(obj)
        if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed reads the micro-batch from a dataloader we lack
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
        *trained, optimizer = accelerator.prepare(*trained, optimizer)
        unet = trained[0]

        # Resume from the last complete checkpoint
        ckpt_dir = out / CHECKPOINTS
        step = resume(accelerator, ckpt_dir, lr_scheduler, ema)
        if ema is not None:  # after load_state: it loads the EMA weights onto the CPU
            ema.to(accelerator.device)
        if accelerator.is_main_process:
            accelerator.init_trackers("ldm")

        # Training loop
        start_time, done_at_start = time.time(), step
        samples_per_step = t.batch_size * world * t.gradient_accumulation_steps
        bar = tqdm(total=t.max_steps, initial=step, desc="Training", disable=not accelerator.is_local_main_process)
        unet.train()
        while step < t.max_steps:
            for k in range(t.gradient_accumulation_steps):
                micro = step * t.gradient_accumulation_steps + k
                batch = batches(micro, t.batch_size, rank, world)
                with accelerator.accumulate(*trained):
                    loss = training_loss(unet, scheduler, batch, empty, obj, seeded_generator(t.seed, 4, micro, rank),
                                         scaling, accelerator.device, trained[1] if train_text else None)
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
                pipe = make_pipeline(accelerator, trained, ema, vae, text_encoder, tokenizer, config)
                validation_grid(pipe, config, out / "samples" / f"step-{step:07d}.png")
            if out_of_time:
                accelerator.print(f"Time budget of {t.max_minutes} min reached at step {step}; re-run to continue.")
                break
        bar.close()
        if not t.cache:  # the cache reports its undecodable images when it is built
            skipped = accelerator.reduce(torch.tensor(batches.skipped, device=accelerator.device), "sum")
            accelerator.print(f"{int(skipped)} undecodable images skipped while making batches "
                              "(a bad file counts each time it comes up)")

        # Export the pipeline, or just the LoRA adapters (EMA weights where kept)
        if accelerator.is_main_process:
            pipe = make_pipeline(accelerator, trained, ema, vae, text_encoder, tokenizer, config)
            if config.lora.rank:
                save_lora(pipe.unet, pipe.text_encoder if train_text else None, out, config.lora.kohya)
            else:
                export_pipeline(pipe, out / "pipeline", step)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return out / LORA_FILE if config.lora.rank else out / "pipeline"


def make_pipeline(accelerator: Accelerator, trained: list[torch.nn.Module], ema: EMAModel | None,
                  vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                  config: Config) -> LdmPipeline:
    """A pipeline with the trained models' EMA weights (the UNet, and the text encoder where it trains)."""
    unet, *trained_text = with_ema([accelerator.unwrap_model(m) for m in trained], ema)
    pipe = LdmPipeline(vae=vae, text_encoder=trained_text[0] if trained_text else text_encoder, tokenizer=tokenizer,
                       unet=unet, scheduler=sampling_scheduler(config.objective))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def training_loss(unet: UNet, scheduler: DDPMScheduler, batch: Batch, empty: torch.Tensor, obj: ObjectiveConfig,
                  generator: torch.Generator, scaling: float, device: torch.device,
                  text_encoder: torch.nn.Module | None = None) -> torch.Tensor:
    """One step's loss: z ~ q(z|x) from the VAE posterior, captions dropped to ∅ for CFG, then the
    denoising loss at a random timestep. All randomness comes from `generator`.

    `empty` is ∅'s hidden states; when a `text_encoder` is trained, it is ∅'s token ids and the captions are
    encoded here, inside the graph, so gradients reach the encoder's adapters."""
    b = batch.mean.shape[0]
    eps_z = torch.randn(batch.mean.shape, generator=generator)
    noise = torch.randn(batch.mean.shape, generator=generator)
    timesteps = torch.randint(0, obj.num_train_timesteps, (b,), generator=generator)
    drop = torch.rand(b, generator=generator) < obj.caption_dropout
    if obj.noise_offset:
        noise = noise + obj.noise_offset * torch.randn((b, noise.shape[1], 1, 1), generator=generator)
    x0 = (batch.mean + batch.std * eps_z) * scaling
    if text_encoder is None:
        context = torch.where(drop[:, None, None], empty, batch.context)
    else:
        context = text_encoder(torch.where(drop[:, None], empty, batch.input_ids).to(device))[0]
    return diffusion_loss(unet, scheduler, x0.to(device), context.to(device), noise.to(device),
                          timesteps.to(device), obj.snr_gamma)
