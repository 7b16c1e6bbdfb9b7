"""The gradio UI, mounted at / on the server's FastAPI app: text to image, image to image, inpainting (mask
drawn in the browser), invert and edit, PNG info. Every button goes through the same queue as the APIs."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import PIL.Image
from fastapi import FastAPI

from .engine import Engine, ImageRequest, read_png_text
from .queue import JobQueue, QueueFull
from .ui_train import train_lora_tab
from .validation import ApiError, image_request

CSS = """
#gallery {min-height: 240px}
@media (max-width: 640px) { .gradio-container {padding: 4px !important} }
"""


def mount_ui(app: FastAPI) -> None:
    """Build the UI over `app`'s engine and queue and serve it at /."""
    outputs = Path(tempfile.mkdtemp(prefix="ldm-app-ui-"))  # the PNGs gradio serves (it keeps its own copies)
    app.router.on_shutdown.append(lambda: shutil.rmtree(outputs, ignore_errors=True))
    blocks = build_ui(app.state.engine, app.state.queue, app.state.settings.limits, outputs, app.state.jobs,
                      app.state.settings.api_key)
    blocks.queue(max_size=app.state.settings.max_queue)  # gradio's own queue, bounded like the server's
    gr.mount_gradio_app(app, blocks, path="/", ssr_mode=False, footer_links=["api"], css=CSS,
                        max_file_size=app.state.settings.limits.max_body_bytes)


def build_ui(engine: Engine, queue: JobQueue, limits: Any, outputs: Path, app_jobs: Any = None,
             api_key: str | None = None) -> gr.Blocks:
    """The UI's components and handlers; every handler goes through `queue`, generated PNGs go to `outputs`."""
    labels = engine.sampler_labels()
    factor, native = engine.size_factor, engine.default_size
    max_side = max(native, int((limits.max_pixels) ** 0.5) // factor * factor)

    def wait(job: Any, progress: gr.Progress) -> Any:
        """Block this UI worker until the job is done, moving the progress bar per denoising step."""
        while not job.future.done():
            step, total = queue.progress(job)
            if total:
                progress((step, total), desc="denoising", unit="steps")
            time.sleep(0.1)
        try:
            return job.future.result()
        except (ValueError, NotImplementedError) as err:
            raise gr.Error(str(err)) from None

    def submit(**kwargs: Any) -> Any:
        try:
            return queue.submit(**kwargs)
        except QueueFull as err:
            raise gr.Error(str(err)) from None

    def settings_request(prompt: str, negative: str, sampler: str, steps: float, guidance: float, eta: float,
                         seed: float, width: float, height: float, count: float, lora_scales: list[float],
                         **image_kwargs: Any) -> ImageRequest:
        loras = dict(zip(engine.loras, lora_scales))
        try:
            return image_request(engine, limits, prompt=prompt, negative_prompt=negative, steps=int(steps),
                                 guidance=float(guidance), eta=float(eta), sampler=sampler, seed=int(seed),
                                 width=int(width), height=int(height), n=int(count), loras=loras or None,
                                 **image_kwargs)
        except ApiError as err:
            raise gr.Error(err.message) from None

    def save(request: ImageRequest, images: list[PIL.Image.Image]) -> list[str]:
        paths = []
        for image, seed in zip(images, request.seeds):
            path = outputs / f"ldm-{seed}-{time.time_ns()}.png"
            path.write_bytes(engine.png(image, engine.params(request, seed)))
            paths.append(str(path))
        return paths

    def generate(mode: str, values: dict, progress: gr.Progress) -> tuple:
        """One button: the settings (`values`, keyed by component) → gallery paths, the seed used, the infotext."""
        image = mask = None
        if mode == "img2img":
            if values[init] is None:
                raise gr.Error("Upload an image to start from.")
            image = values[init].convert("RGB")
        elif mode == "inpaint":
            image, mask = editor_image_and_mask(values[editor])
        request = settings_request(values[prompt], values[negative], values[sampler], values[steps],
                                   values[guidance], values[eta], values[seed], values[width], values[height],
                                   values[count], [values[s] for s in lora_sliders], image=image, mask=mask,
                                   strength=values[strength])
        images = wait(submit(request=request), progress)
        params = engine.params(request, request.seed)
        return save(request, images), request.seed, engine.infotext(params)

    def handler(mode: str) -> Any:
        # gradio finds the progress tracker among positional parameters with a gr.Progress default
        def run(values: dict, progress: gr.Progress = gr.Progress()) -> tuple:
            return generate(mode, values, progress)
        return run

    def invert_edit(image: Any, source: str, target: str, method: str, steps: float, guidance: float,
                    cross: float, progress: gr.Progress = gr.Progress()) -> list:
        if image is None:
            raise gr.Error("Upload the image to edit.")
        if not source.strip() or not target.strip():
            raise gr.Error("Describe the image (source prompt) and what it should become (target prompt).")
        task = lambda e: e.invert_and_edit(image.convert("RGB"), source, target, method, int(steps),  # noqa: E731
                                           float(guidance), float(cross))
        reconstruction, edited = wait(submit(task=task), progress)
        return [(reconstruction, "reconstruction"), (edited, "edit")]

    def png_info(path: str | None) -> tuple[str, dict]:
        if path is None:
            return "", {}
        try:
            text, items, fields = read_png_text(Path(path).read_bytes())
        except (OSError, ValueError, SyntaxError):
            raise gr.Error("That file is not a PNG that can be read.") from None
        stored = json.loads(items["ldm-app"]) if "ldm-app" in items else {}
        return text or "(no generation parameters in this PNG)", {"fields": fields, "ldm-app": stored}

    def send_to_txt2img(parsed: dict) -> list:
        """The PNG's parameters into the settings (ldm-app's exact JSON first, else A1111's text fields)."""
        stored, fields = parsed.get("ldm-app") or {}, parsed.get("fields") or {}
        if not stored and not fields:
            raise gr.Error("No parameters to send; drop a PNG made by ldm-app or A1111 first.")
        size = fields.get("Size", "x").split("x")

        def pick(key: str, field: str, cast: Any) -> Any:
            try:
                return cast(stored[key]) if key in stored else cast(fields[field])
            except (KeyError, ValueError, TypeError):
                return gr.update()  # not in this PNG: leave the setting as it is
        try:
            sampler = engine.resolve_sampler(stored.get("sampler") or fields.get("Sampler", ""),
                                             fields.get("Schedule type"))
        except ValueError:
            sampler = gr.update()
        return [pick("prompt", "Prompt", str), pick("negative_prompt", "Negative prompt", str), sampler,
                pick("steps", "Steps", int), pick("guidance", "CFG scale", float), pick("eta", "Eta DDIM" if "Eta DDIM" in fields else "Eta", float),
                pick("seed", "Seed", int), stored.get("width") or (int(size[0]) if size[0] else gr.update()),
                stored.get("height") or (int(size[1]) if size[1:] and size[1] else gr.update()),
                gr.Tabs(selected="txt2img")]

    with gr.Blocks(title="ldm-app", fill_width=True) as blocks:
        gr.Markdown(f"### ldm-app · `{engine.model_name}`")
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", placeholder="a red heart")
        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="txt2img"):
                txt2img_button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Tab("Image to image", id="img2img"):
                init = gr.Image(label="Start from", type="pil", image_mode="RGB", sources=["upload", "clipboard"])
                img2img_button = gr.Button("Generate from image", variant="primary", elem_id="generate-img2img")
            with gr.Tab("Inpaint", id="inpaint"):
                editor = gr.ImageEditor(label="Paint over what to repaint", type="pil", image_mode="RGBA",
                                        sources=["upload", "clipboard"], layers=False, transforms=(),
                                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), elem_id="inpaint-editor")
                inpaint_button = gr.Button("Inpaint", variant="primary", elem_id="generate-inpaint")
            with gr.Tab("Invert & edit", id="edit"):
                edit_image = gr.Image(label="Real image", type="pil", image_mode="RGB", sources=["upload", "clipboard"])
                source = gr.Textbox(label="Source prompt (what the image shows)")
                target = gr.Textbox(label="Target prompt (what it should become)")
                with gr.Row():
                    method = gr.Dropdown(["ddim", "null-text", "negative-prompt"], value="negative-prompt",
                                         label="Inversion")
                    edit_steps = gr.Slider(2, min(100, engine.max_steps), value=25, step=1, label="Steps")
                    edit_guidance = gr.Slider(1, 15, value=5, step=0.5, label="Guidance")
                    cross = gr.Slider(0, 1, value=0.8, step=0.05, label="Cross-attention injection")
                edit_button = gr.Button("Invert and edit", variant="primary", elem_id="generate-edit")
            train_lora_tab(app_jobs, limits, api_key)
            with gr.Tab("PNG info", id="pnginfo"):
                png_file = gr.File(label="Drop an ldm-app or A1111 PNG", file_types=[".png"], type="filepath",
                                   elem_id="png-file")
                png_text = gr.Textbox(label="Parameters", lines=4, interactive=False, elem_id="png-text")
                png_parsed = gr.JSON(label="Fields", visible=False)
                send_button = gr.Button("Send to text to image", elem_id="send-to-txt2img")
        with gr.Accordion("Settings", open=True):
            with gr.Row():
                sampler = gr.Dropdown([(f"{name} ({label})", name) for name, label in labels.items()], value="ddim",
                                      label="Sampler", min_width=140)
                steps = gr.Slider(1, min(limits.max_steps, engine.max_steps), value=25, step=1, label="Steps",
                                  min_width=140)
                guidance = gr.Slider(0, 20, value=5, step=0.5, label="Guidance (CFG)", min_width=140)
                eta = gr.Slider(0, 1, value=0, step=0.05, label="η (DDIM)", min_width=140)
            with gr.Row():
                seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, min_width=140, elem_id="seed")
                reuse = gr.Button("♻ Reuse last seed", min_width=140, elem_id="reuse-seed")
                width = gr.Slider(factor, max_side, value=native, step=factor, label="Width", min_width=140)
                height = gr.Slider(factor, max_side, value=native, step=factor, label="Height", min_width=140)
                count = gr.Slider(1, limits.max_images, value=1, step=1, label="Images", min_width=140, elem_id="count")
                strength = gr.Slider(0, 1, value=0.75, step=0.05, label="Denoising strength (img2img, inpaint)",
                                     min_width=140)
            lora_sliders = [gr.Slider(-1, 2, value=lora.scale, step=0.05, label=f"LoRA {name}", min_width=140)
                            for name, lora in engine.loras.items()]
        gallery = gr.Gallery(label="Images (downloads keep the PNG parameters)", columns=4, elem_id="gallery",
                             buttons=["download", "fullscreen"], object_fit="contain", format="png")
        last_seed = gr.Number(label="Seed used", interactive=False, precision=0, elem_id="last-seed")
        info = gr.Textbox(label="Parameters", interactive=False, lines=2)

        settings = {prompt, negative, sampler, steps, guidance, eta, seed, width, height, count, init, editor, strength,
                    *lora_sliders}  # a set: the handler gets one dict, keyed by component
        for mode, button in (("txt2img", txt2img_button), ("img2img", img2img_button), ("inpaint", inpaint_button)):
            button.click(handler(mode), settings, [gallery, last_seed, info])
        edit_button.click(invert_edit, [edit_image, source, target, method, edit_steps, edit_guidance, cross], gallery)
        reuse.click(lambda s: s, last_seed, seed)
        png_file.change(png_info, png_file, [png_text, png_parsed])
        send_button.click(send_to_txt2img, png_parsed,
                          [prompt, negative, sampler, steps, guidance, eta, seed, width, height, tabs])
    return blocks


def editor_image_and_mask(value: dict | None) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """gradio's ImageEditor value → (the uploaded image, white where the user painted)."""
    if not value or value.get("background") is None:
        raise gr.Error("Upload an image to inpaint, then paint over the area to repaint.")
    background = value["background"].convert("RGB")
    painted = np.zeros(background.size[::-1], dtype=bool)
    for layer in value.get("layers") or []:
        painted |= np.asarray(layer.convert("RGBA").resize(background.size))[..., 3] > 0
    if not painted.any():
        raise gr.Error("Nothing is painted; paint over the area to repaint.")
    return background, PIL.Image.fromarray(painted.astype(np.uint8) * 255)

