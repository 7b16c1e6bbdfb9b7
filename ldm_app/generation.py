"""Requests → images: the one image loop that the CLI, the server, training's sample grids and fine-tuning's class
images run (EDM2's `generate_images`: seeds split into batches, one RNG per seed, images out).

Image i of a request is drawn with its own CPU generator seeded `seed + i`, so its noise is the same in any batch
and on any device (the pixels can still differ in the last bit with the batch size and the hardware). Requests
whose `batch_key` is equal share pipeline calls of at most `batch_size` images; a request with an input image
runs alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch

from .consistency import use_lcm_student
from .lora_tags import split_lora_spec
from .request import GenerationRequest
from .samplers import make_scheduler

if TYPE_CHECKING:
    from .pipeline import LdmPipeline

ProgressHook = Callable[[int, int], None]  # (denoising steps done, steps in all) over the whole call


def generate_images(pipe: LdmPipeline, requests: Sequence[GenerationRequest], batch_size: int = 8,
                    adapters: Mapping[str, str] | None = None,
                    on_step: ProgressHook | None = None) -> list[list[PIL.Image.Image]]:
    """The images of each request (image i from seed + i), in pipeline calls of at most `batch_size` images.

    Each request is checked against the model (`GenerationRequest.resolved`) before any image is drawn. Its
    sampler becomes the pipeline's scheduler (None keeps the pipeline's own). `adapters` maps the LoRA paths that
    requests name (`loras`, "PATH[:SCALE]") to the adapters loaded for them (`loading.load_loras`): each group of
    requests runs with exactly its LoRAs active; without `adapters` the pipeline's LoRA state is left as it is.
    `on_step(done, total)` is called after every denoising step (a server's progress, or its interruption). A
    size far above the model's native one is drawn smaller and resized up (`sizes.plan_size`).
    """
    requests = [r.resolved(pipe) for r in requests]
    groups = _groups(requests)
    plans = [(group, _chunks(requests, group, batch_size)) for group in groups]
    total = sum(_denoising_steps(requests[group[0]]) * len(chunks) for group, chunks in plans)
    images: list[list[PIL.Image.Image]] = [[] for _ in requests]
    done = 0
    for group, chunks in plans:
        first = requests[group[0]]
        use_sampler(pipe, first.sampler, first.loras)
        if adapters:
            activate_loras(pipe, first.loras, adapters)
        steps = _denoising_steps(first)
        width, height = first.draw_size
        for chunk in chunks:
            out = pipe([requests[r].prompt for r, _ in chunk],
                       negative_prompt=[requests[r].negative_prompt for r, _ in chunk],
                       height=height, width=width, num_inference_steps=first.steps,
                       guidance_scale=first.guidance, eta=first.eta,
                       generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
                       callback_on_step_end=None if on_step is None else _progress(on_step, done, total),
                       **_image_kwargs(first))
            for (r, _), image in zip(chunk, out.images):  # each to its own size (`sizes.plan_size`)
                size = (requests[r].width, requests[r].height)
                images[r].append(image if image.size == size else image.resize(size, PIL.Image.Resampling.LANCZOS))
            done += steps
    return images


def _groups(requests: list[GenerationRequest]) -> list[list[int]]:
    """Indices of the requests that share pipeline calls, in order of their first request."""
    groups: dict[Any, list[int]] = {}
    for i, request in enumerate(requests):
        key = request.batch_key()
        groups.setdefault(("alone", i) if key is None else key, []).append(i)
    return list(groups.values())


def _chunks(requests: list[GenerationRequest], group: list[int],
            batch_size: int) -> list[list[tuple[int, int]]]:
    """(request index, seed) of every image in `group`, split into pipeline calls."""
    items = [(r, seed) for r in group for seed in requests[r].seeds]
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def _denoising_steps(request: GenerationRequest) -> int:
    """Steps one pipeline call runs: all of them, or image-to-image's last steps · strength."""
    return max(1, int(request.steps * request.strength)) if request.image is not None else request.steps


def _image_kwargs(request: GenerationRequest) -> dict[str, Any]:
    if request.image is None:
        return {}
    return {"image": request.image, "mask_image": request.mask, "strength": request.strength,
            "paste_back": request.paste_back, "mask_feather": request.mask_feather}


def _progress(on_step: ProgressHook, done: int, total: int) -> Callable[..., dict]:
    def callback(pipe: LdmPipeline, i: int, t: Any, tensors: dict) -> dict:
        on_step(min(total, done + i + 1), total)
        return {}

    return callback


def use_sampler(pipe: LdmPipeline, name: str | None, loras: Sequence[str] = ()) -> None:
    """Make the named sampler the pipeline's scheduler, over the noise schedule the pipeline was loaded with (the
    first scheduler's config is kept, so switching back and forth never drifts); None keeps the current one.
    `lcm` without LoRAs also swaps in the model's distilled UNet where its folder ships one (the default model
    does); with LoRAs (an LCM-LoRA, say) they apply to the model's own UNet."""
    if name is None:
        return
    if getattr(pipe.scheduler, "ldm_sampler", None) != name:
        base = getattr(pipe.scheduler, "ldm_base_config", None) or dict(pipe.scheduler.config)
        scheduler = make_scheduler(name, base)
        scheduler.ldm_sampler, scheduler.ldm_base_config = name, base
        pipe.scheduler = scheduler
    use_lcm_student(pipe, name == "lcm" and not loras)


def activate_loras(pipe: LdmPipeline, loras: Sequence[str], adapters: Mapping[str, str]) -> None:
    """Exactly the LoRAs named in `loras` ("PATH[:SCALE]") active, at their scales; the pipeline's other adapters
    off. Only LoRAs at a non-zero scale are activated: peft runs every active adapter's branch, even at scale 0."""
    active = []
    for spec in loras:
        path, scale = split_lora_spec(spec)
        if path not in adapters:
            raise ValueError(f"LoRA {path} was not loaded for this pipeline; load it first (loading.load_loras).")
        if scale:
            active.append((adapters[path], scale))
    if active:
        pipe.enable_lora()
        pipe.set_adapters([name for name, _ in active], [scale for _, scale in active])
    else:
        pipe.disable_lora()
