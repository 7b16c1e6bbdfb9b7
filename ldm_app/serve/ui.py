"""The gradio UI, mounted at / on the server's FastAPI app: text to image, image to image, inpainting (mask
drawn in the browser), invert and edit, PNG info, Train LoRA (`ui_train.py`). Every button goes through the same queue and the same checks
(`validation.py`) as the APIs.

Layout, top to bottom (one column on a phone): the prompt (only on the tabs that use it), the tabs with their
buttons, the results (this run, Stop), the settings, then the history of this session's results.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import PIL.Image
from fastapi import FastAPI

from ..inversion import METHODS
from ..sizes import MAX_UPSCALE, plan_size
from ..request import GenerationRequest
from ..samplers import SAMPLERS, sampler_defaults
from .engine import Engine, read_png_text
from .jobs import Jobs
from .queue import Job, JobQueue, QueueFull
from .settings import Limits
from .ui_train import train_lora_tab
from .ui_errors import user_error
from .validation import ApiError, check_edit, decode_image_bytes, image_request

CSS = """
#gallery {min-height: 200px}
@media (max-width: 640px) { .gradio-container {padding: 4px !important} }
"""
HISTORY_LIMIT = 200  # images kept in a session's history (the oldest drop out)
STRENGTH = {"img2img": 0.8, "inpaint": 1.0}  # the CLI's and the library's defaults


def mount_ui(app: FastAPI) -> None:
    """Build the UI over `app`'s engine and queue and serve it at /."""
    outputs = Path(tempfile.mkdtemp(prefix="ldm-app-ui-"))  # the PNGs gradio serves (it keeps its own copies)
    app.router.on_shutdown.append(lambda: shutil.rmtree(outputs, ignore_errors=True))
    blocks = build_ui(app.state.engine, app.state.queue, app.state.settings.limits, outputs, app.state.jobs,
                      app.state.settings.api_key)
    blocks.queue(max_size=app.state.settings.max_queue)  # gradio's own queue, bounded like the server's
    gr.mount_gradio_app(app, blocks, path="/", ssr_mode=False, footer_links=["api"], css=CSS,
                        max_file_size=app.state.settings.limits.max_body_bytes)


# ----------------------------------------------------------------------------------------------------------
# Components, one function per part of the page


@dataclass
class Form:
    """What the three generation buttons read: the prompt box, the settings, their tab's own inputs and the
    history. gradio passes a set of inputs as one dict keyed by component; `read` turns it into values keyed by
    these field names."""

    prompt: gr.Textbox
    negative: gr.Textbox
    allow_empty: gr.Checkbox
    sampler: gr.Dropdown
    steps: gr.Slider
    guidance: gr.Slider
    eta: gr.Slider
    seed: gr.Number
    width: gr.Slider
    height: gr.Slider
    count: gr.Slider
    loras: gr.Dropdown
    lora_weight: gr.Slider
    history: gr.State
    init: gr.Image  # image to image
    img2img_strength: gr.Slider
    editor: gr.ImageEditor  # inpainting
    inpaint_strength: gr.Slider

    def inputs(self, *own: str) -> set:
        """The shared inputs plus the tab's `own` fields."""
        tab_fields = ("init", "img2img_strength", "editor", "inpaint_strength")
        return {getattr(self, f.name) for f in fields(self) if f.name not in tab_fields or f.name in own}

    def read(self, values: dict) -> dict[str, Any]:
        return {f.name: values.get(getattr(self, f.name)) for f in fields(self)}


@dataclass
class Results:
    gallery: gr.Gallery
    stop: gr.Button
    note: gr.Markdown
    seed: gr.Number
    info: gr.Textbox

    def outputs(self) -> list:
        return [self.gallery, self.seed, self.info, self.note]


def size_range(engine: Engine, limits: Limits) -> tuple[int, int]:
    """(step, max) of the size sliders: up to 8× the model's native side (A1111's 512 on the 64-px default model,
    drawn by `sizes.plan_size`), within --max-pixels."""
    factor, native = engine.size_factor, engine.default_size
    by_pixels = int(limits.max_pixels ** 0.5) // factor * factor
    return factor, max(native, min(8 * native, by_pixels))


def prompt_panel() -> tuple[gr.Column, gr.Textbox, gr.Textbox]:
    with gr.Column(variant="compact") as column:
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                            placeholder="Describe the picture you want…")
        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative",
                              placeholder="What to steer away from (optional)")
    return column, prompt, negative


def text_tab() -> tuple[gr.Tab, gr.Button]:
    with gr.Tab("Text to image", id="txt2img") as tab:
        return tab, gr.Button("Generate", variant="primary", elem_id="generate")


def image_tab() -> tuple[gr.Tab, gr.Image, gr.Slider, gr.Button]:
    with gr.Tab("Image to image", id="img2img") as tab:
        init = gr.Image(label="Start from", type="filepath", sources=["upload", "clipboard"], elem_id="init-image")
        strength = gr.Slider(0, 1, value=STRENGTH["img2img"], step=0.05, elem_id="strength-img2img",
                             label="Denoising strength (0 keeps the image, 1 ignores it)")
        button = gr.Button("Generate from image", variant="primary", elem_id="generate-img2img")
    return tab, init, strength, button


def inpaint_tab() -> tuple[gr.Tab, gr.ImageEditor, gr.Slider, gr.Button]:
    with gr.Tab("Inpaint", id="inpaint") as tab:
        editor = gr.ImageEditor(label="Paint over what to repaint", type="pil", image_mode="RGBA",
                                sources=["upload", "clipboard"], layers=False, transforms=(),
                                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), elem_id="inpaint-editor")
        strength = gr.Slider(0, 1, value=STRENGTH["inpaint"], step=0.05, elem_id="strength-inpaint",
                             label="Denoising strength under the mask")
        button = gr.Button("Inpaint", variant="primary", elem_id="generate-inpaint")
    return tab, editor, strength, button


@dataclass
class EditTab:
    tab: gr.Tab
    image: gr.Image
    source: gr.Textbox
    target: gr.Textbox
    method: gr.Dropdown
    steps: gr.Slider
    guidance: gr.Slider
    cross: gr.Slider
    button: gr.Button

    def inputs(self) -> list:
        return [self.image, self.source, self.target, self.method, self.steps, self.guidance, self.cross]


def edit_tab(engine: Engine, limits: Limits) -> EditTab:
    with gr.Tab("Invert & edit", id="edit") as tab:
        image = gr.Image(label="Real image", type="filepath", sources=["upload", "clipboard"], elem_id="edit-image")
        source = gr.Textbox(label="Source prompt (what the image shows)", elem_id="edit-source")
        target = gr.Textbox(label="Target prompt (what it should become)", elem_id="edit-target")
        with gr.Row():
            method = gr.Dropdown(list(METHODS), value="negative-prompt", label="Inversion", min_width=140)
            steps = gr.Slider(2, min(limits.max_steps, engine.max_steps), value=25, step=1, label="Steps",
                              min_width=140, elem_id="edit-steps")
            guidance = gr.Slider(1, 15, value=5, step=0.5, label="Guidance", min_width=140)
            cross = gr.Slider(0, 1, value=0.8, step=0.05, label="Cross-attention injection", min_width=140)
        button = gr.Button("Invert and edit", variant="primary", elem_id="generate-edit")
    return EditTab(tab, image, source, target, method, steps, guidance, cross, button)


def png_tab() -> tuple[gr.Tab, gr.File, gr.Textbox, gr.JSON, gr.Button]:
    with gr.Tab("PNG info", id="pnginfo") as tab:
        png_file = gr.File(label="Drop an ldm-app or A1111 PNG", file_types=[".png"], type="filepath",
                           elem_id="png-file")
        text = gr.Textbox(label="Parameters", lines=4, interactive=False, elem_id="png-text")
        parsed = gr.JSON(label="Fields", visible=False)
        send = gr.Button("Send to text to image", elem_id="send-to-txt2img")
    return tab, png_file, text, parsed, send


def results_panel() -> tuple[gr.Column, Results]:
    with gr.Column() as column:
        stop = gr.Button("Stop", variant="stop", size="sm", elem_id="stop")
        gallery = gr.Gallery(label="This run (downloads keep the PNG parameters)", columns=4, elem_id="gallery",
                             buttons=["download", "fullscreen"], object_fit="contain", format="png", height="auto")
        note = gr.Markdown(elem_id="run-note")
        with gr.Row():
            seed = gr.Number(label="Seed used", interactive=False, precision=0, elem_id="last-seed", min_width=120)
            info = gr.Textbox(label="Parameters", interactive=False, lines=2, elem_id="run-info", scale=3)
    return column, Results(gallery, stop, note, seed, info)


def settings_panel(engine: Engine, limits: Limits) -> tuple[gr.Accordion, dict[str, Any], gr.Button, gr.Markdown,
                                                            gr.Row]:
    """The settings shared by the generation tabs (the `Form`'s fields from sampler to lora_weight)."""
    labels = engine.sampler_labels()
    step, max_side = size_range(engine, limits)
    native = engine.default_size
    with gr.Accordion("Settings", open=True) as accordion:
        with gr.Row():
            sampler = gr.Dropdown([(f"{name} ({label})", name) for name, label in labels.items()], value="ddim",
                                  label="Sampler", min_width=140)
            steps = gr.Slider(1, min(limits.max_steps, engine.max_steps), value=25, step=1, label="Steps",
                              min_width=140, elem_id="steps")
            guidance = gr.Slider(0, 20, value=5, step=0.5, label="Guidance (CFG)", min_width=140)
            eta = gr.Slider(0, 1, value=0, step=0.05, label="η (DDIM)", min_width=140)
        with gr.Row():
            seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, min_width=140, elem_id="seed")
            reuse = gr.Button("♻ Reuse last seed", min_width=140, elem_id="reuse-seed")
            count = gr.Slider(1, limits.max_images, value=1, step=1, label="Images", min_width=140, elem_id="count")
        with gr.Row():
            width = gr.Slider(step, max_side, value=native, step=step, label="Width", min_width=140, elem_id="width")
            height = gr.Slider(step, max_side, value=native, step=step, label="Height", min_width=140,
                               elem_id="height")
        size_note = gr.Markdown(f"This model draws {native}x{native}; sides over {MAX_UPSCALE * native} are drawn "
                                "smaller and resized up.", elem_id="size-note")
        with gr.Row(visible=bool(engine.loras)) as lora_row:
            loras = gr.Dropdown(list(engine.loras), value=[], multiselect=True, label="LoRAs (or <lora:name:weight> "
                                "in the prompt)", elem_id="lora-picker", min_width=200)
            lora_weight = gr.Slider(-1, 2, value=0.8, step=0.05, label="LoRA weight", min_width=140,
                                    elem_id="lora-weight")
        allow_empty = gr.Checkbox(False, label="Allow an empty prompt (draws an unconditional sample)",
                                  elem_id="allow-empty")
    sampler.input(sampler_settings, [sampler, steps, guidance], [steps, guidance])
    form = dict(allow_empty=allow_empty, sampler=sampler, steps=steps, guidance=guidance, eta=eta, seed=seed,
                width=width, height=height, count=count, loras=loras, lora_weight=lora_weight)
    return accordion, form, reuse, size_note, lora_row


def sampler_settings(name: str, steps: int, guidance: float) -> tuple[Any, Any]:
    """Picking a sampler with its own defaults (lcm: 4 steps, CFG 1) sets them; leaving it for another restores
    the usual ones; other settings are the user's and stay."""
    own = SAMPLERS[name]
    if own.steps is not None or own.guidance is not None:
        return sampler_defaults(name, None, None)
    if any((steps, guidance) == (s.steps, s.guidance) for s in SAMPLERS.values() if s.steps is not None):
        return sampler_defaults(name, None, None)
    return gr.update(), gr.update()


def history_panel() -> tuple[gr.State, gr.Gallery]:
    with gr.Accordion("History (this session, newest first)", open=True):
        state = gr.State([])  # [(path, caption)], oldest first; one list per browser session
        gallery = gr.Gallery(columns=6, elem_id="history", object_fit="contain", format="png", height="auto",
                             buttons=["download", "fullscreen"], show_label=False)
    return state, gallery


def build_ui(engine: Engine, queue: JobQueue, limits: Limits, outputs: Path, jobs: Jobs | None = None,
             api_key: str | None = None) -> gr.Blocks:
    """The page (see the module's docstring), then its handlers (`Handlers`) wired to the components; with the
    server's `jobs`, a Train LoRA tab."""
    with gr.Blocks(title="ldm-app", fill_width=True) as blocks:
        signed_in = " · [Log out](/logout)" if api_key is not None else ""  # the session cookie's end
        gr.Markdown(f"### ldm-app · `{engine.model_name}`{signed_in}")
        prompt_column, prompt, negative = prompt_panel()
        with gr.Tabs(overflow_behavior="wrap") as tabs:  # on a phone the tabs wrap instead of hiding behind "⋯"
            txt2img_tab, txt2img_button = text_tab()
            img2img_tab, init, img2img_strength, img2img_button = image_tab()
            inpaint_tab_, editor, inpaint_strength, inpaint_button = inpaint_tab()
            edit = edit_tab(engine, limits)
            png_tab_, png_file, png_text, png_parsed, send_button = png_tab()
            train_tab, trained = train_lora_tab(jobs, limits, api_key) if jobs is not None else (None, None)
        results_column, results = results_panel()
        settings, settings_fields, reuse, size_note, lora_row = settings_panel(engine, limits)
        history, history_gallery = history_panel()
        form = Form(prompt=prompt, negative=negative, **settings_fields, history=history, init=init,
                    img2img_strength=img2img_strength, editor=editor, inpaint_strength=inpaint_strength)

        # Handlers, now that every component they use exists
        ui = Handlers(engine, queue, limits, outputs, form)
        shown = [prompt_column, settings, results_column]  # the prompt and settings only where they are used
        for tab_id, tab in (("txt2img", txt2img_tab), ("img2img", img2img_tab), ("inpaint", inpaint_tab_),
                            ("edit", edit.tab), ("pnginfo", png_tab_), ("train", train_tab)):
            if tab is not None:
                tab.select(functools.partial(layout, tab_id), None, shown, queue=False)
        if trained is not None:  # a fine-tune has ended: its LoRA joins the picker
            trained.change(lambda name: (gr.Dropdown(choices=list(engine.loras)), gr.Row(visible=True)), trained,
                           [form.loras, lora_row], queue=False)
        generated = [*results.outputs(), history, history_gallery]
        txt2img_button.click(ui.txt2img, form.inputs(), generated)
        # uploads reach the handlers unprocessed (preprocess=False) and are read as the APIs read theirs: a file
        # that is not an image is one sentence, not gradio's "Could not preprocess input component"
        img2img_button.click(ui.img2img, form.inputs("init", "img2img_strength"), generated, preprocess=False)
        inpaint_button.click(ui.inpaint, form.inputs("editor", "inpaint_strength"), generated)
        edit.button.click(ui.invert_edit, [*edit.inputs(), history], generated, preprocess=False)
        results.stop.click(ui.stop, None, results.note, queue=False)
        reuse.click(lambda s: s, results.seed, form.seed, queue=False)
        form.width.change(ui.size_note, [form.width, form.height], size_note, queue=False)
        form.height.change(ui.size_note, [form.width, form.height], size_note, queue=False)
        png_file.change(ui.png_info, png_file, [png_text, png_parsed])
        send_button.click(ui.send_to_txt2img, png_parsed,
                          [prompt, negative, form.sampler, form.steps, form.guidance, form.eta, form.seed,
                           form.width, form.height, tabs, *shown])
    return blocks


LAYOUT = {"edit": (False, False, True), "pnginfo": (False, False, False),  # (prompt, settings, results) shown
          "train": (False, False, False)}


def layout(tab_id: str) -> list:
    """Prompt, settings and results shown on the tabs that use them (all three on the generation tabs)."""
    return [gr.update(visible=v) for v in LAYOUT.get(tab_id, (True, True, True))]


# ----------------------------------------------------------------------------------------------------------
# Handlers


class Handlers:
    """Every event's handler: methods over the engine, queue and limits the server runs with (gradio injects the
    session's `gr.Request` and a progress tracker by their annotation and default)."""

    def __init__(self, engine: Engine, queue: JobQueue, limits: Limits, outputs: Path, form: Form):
        self.engine, self.queue, self.limits, self.outputs, self.form = engine, queue, limits, outputs, form
        self.running: dict[str, Job] = {}  # session → its job in the queue (what Stop cancels)

    # Generation

    def txt2img(self, values: dict, request: gr.Request, progress: gr.Progress = gr.Progress()) -> list:
        return self._generate(self.form.read(values), None, None, None, request, progress)

    def img2img(self, values: dict, request: gr.Request, progress: gr.Progress = gr.Progress()) -> list:
        v = self.form.read(values)
        if v["init"] is None:
            raise user_error("Upload an image to start from.")
        return self._generate(v, self._read_image(v["init"]), None, v["img2img_strength"], request, progress)

    def inpaint(self, values: dict, request: gr.Request, progress: gr.Progress = gr.Progress()) -> list:
        v = self.form.read(values)
        image, mask = editor_image_and_mask(v["editor"])
        return self._generate(v, image, mask, v["inpaint_strength"], request, progress)

    def _generate(self, v: dict[str, Any], image: PIL.Image.Image | None, mask: PIL.Image.Image | None,
                  strength: float | None, request: gr.Request, progress: gr.Progress) -> list:
        """The form's values → [gallery, seed used, infotext, note, history, history gallery]."""
        history = v["history"] or []
        image_request = self._request(v, image, mask, strength)
        images = self._wait(self._submit(request=image_request), request, progress)
        if images is None:
            return [gr.update(), gr.update(), gr.update(), "Stopped.", history, gr.update()]
        paths = self._save(image_request, images)
        params = self.engine.params(image_request, image_request.seed)
        plan = plan_size(image_request.width, image_request.height, self.engine.default_size, self.engine.size_factor)
        history = history + [(p, f"seed {s}") for p, s in zip(paths, image_request.seeds)]
        return [paths, image_request.seed, self.engine.infotext(params), plan.note(self.engine.default_size) or "",
                *self._history(history)]

    def _request(self, v: dict[str, Any], image: PIL.Image.Image | None, mask: PIL.Image.Image | None,
                 strength: float | None) -> GenerationRequest:
        """The form's values through the APIs' checks (`image_request`), after the UI's own: an empty prompt is
        refused unless the box under Settings says it is meant."""
        prompt = v["prompt"] if isinstance(v["prompt"], str) else ""
        if not prompt.strip() and not v["allow_empty"]:
            raise user_error("Type a prompt first (to draw an unconditional sample on purpose, tick \"Allow an empty "
                           "prompt\" under Settings).")
        picked = v["loras"] or []
        try:
            return image_request(
                self.engine, self.limits, prompt=prompt, negative_prompt=v["negative"] or "",
                steps=whole(v["steps"], "Steps"), guidance=number(v["guidance"], "Guidance"),
                eta=number(v["eta"], "η"), sampler=v["sampler"] or "ddim",
                seed=-1 if v["seed"] is None else whole(v["seed"], "Seed"), width=whole(v["width"], "Width"),
                height=whole(v["height"], "Height"), n=whole(v["count"], "Images"),
                loras={name: number(v["lora_weight"], "LoRA weight") for name in picked} or None, image=image,
                mask=mask, **({} if strength is None else {"strength": number(strength, "Denoising strength")}))
        except ApiError as err:
            raise user_error(err.message) from None

    def invert_edit(self, path: dict | None, source: str, target: str, method: str, steps: float, guidance: float,
                    cross: float, history: list, request: gr.Request, progress: gr.Progress = gr.Progress()) -> list:
        if path is None:
            raise user_error("Upload the image to edit.")
        steps_, guidance_, cross_ = whole(steps, "Steps"), number(guidance, "Guidance"), number(cross, "Cross")
        try:
            check_edit(self.engine, self.limits, source=source, target=target, method=method, steps=steps_,
                       guidance=guidance_, cross_attention=cross_)
        except ApiError as err:
            raise user_error(err.message) from None
        image = self._read_image(path)
        task = lambda e: e.invert_and_edit(image, source, target, method, steps_, guidance_, cross_)  # noqa: E731
        images = self._wait(self._submit(task=task), request, progress)
        if images is None:
            return [gr.update(), gr.update(), gr.update(), "Stopped.", history, gr.update()]
        paths = []
        for picture, caption in zip(images, ("reconstruction", "edit")):
            paths.append(str(self.outputs / f"edit-{caption}-{time.time_ns()}.png"))
            picture.save(paths[-1])
        info = (f"Invert & edit: {method} inversion, {steps_} steps, guidance {guidance_:g}, cross-attention "
                f"{cross_:g}, seed 0\nSource: {source}\nTarget: {target}")
        history = history + [(paths[0], "reconstruction"), (paths[1], f"edit: {target[:40]}")]
        return [list(zip(paths, ("reconstruction", "edit"))), 0, info, "", *self._history(history)]

    def stop(self, request: gr.Request) -> str:
        """Cancel this session's job: dropped if it still waits, else its batch stops at the next step."""
        job = self.running.get(request.session_hash)
        if job is None:
            return "Nothing is running."
        self.queue.cancel(job)
        return "Stopping…"

    # Waiting on the queue

    def _submit(self, **kwargs: Any) -> Job:
        try:
            return self.queue.submit(**kwargs)
        except QueueFull as err:
            raise user_error(str(err)) from None

    def _wait(self, job: Job, request: gr.Request, progress: gr.Progress) -> Any:
        """Block this UI worker until the job is done, moving the progress bar per denoising step; None when the
        session's Stop cancelled it."""
        self.running[request.session_hash] = job
        try:
            while not job.future.done() and not job.cancelled:
                step, total = self.queue.progress(job)
                if total:
                    progress((step, total), desc="denoising", unit="steps")
                time.sleep(0.1)
        finally:
            self.running.pop(request.session_hash, None)
        if job.cancelled:
            return None
        try:
            return job.future.result()
        except (ValueError, NotImplementedError, QueueFull) as err:  # QueueFull: also the server shutting down
            raise user_error(str(err)) from None

    # Files

    def _read_image(self, upload: dict | str) -> PIL.Image.Image:
        """An upload (gradio's unprocessed file data, already checked to lie in its upload folder), read as the
        APIs read theirs: an image, within the pixel limit."""
        path = upload.get("path") if isinstance(upload, dict) else upload
        if not isinstance(path, str):
            raise user_error("Upload the image again; its file did not arrive.")
        try:
            return decode_image_bytes(Path(path).read_bytes(), "The uploaded file", self.limits)
        except ApiError as err:
            raise user_error(err.message) from None

    def _save(self, request: GenerationRequest, images: list[PIL.Image.Image]) -> list[str]:
        paths = []
        for image, seed in zip(images, request.seeds):
            path = self.outputs / f"ldm-{seed}-{time.time_ns()}.png"
            path.write_bytes(self.engine.png(image, self.engine.params(request, seed)))
            paths.append(str(path))
        return paths

    @staticmethod
    def _history(history: list) -> tuple[list, list]:
        history = history[-HISTORY_LIMIT:]
        return history, list(reversed(history))

    # Settings and PNG info

    def size_note(self, width: float, height: float) -> str:
        native = self.engine.default_size
        try:
            note = plan_size(int(width), int(height), native, self.engine.size_factor).note(native)
        except (TypeError, ValueError):
            note = None
        return note or (f"This model draws {native}x{native}; sides over {MAX_UPSCALE * native} are drawn smaller "
                        "and resized up.")

    def png_info(self, path: str | None) -> tuple[str, dict]:
        if path is None:
            return "", {}
        try:
            text, items, fields_ = read_png_text(Path(path).read_bytes())
        except Exception:  # noqa: BLE001  (whatever PIL or the parser raise, the person gets one sentence)
            raise user_error("That file is not a PNG whose parameters can be read; drop a PNG made by ldm-app or "
                           "A1111.") from None
        try:
            stored = json.loads(items["ldm-app"]) if "ldm-app" in items else {}
        except ValueError:
            stored = None
        if not isinstance(stored, dict):  # damaged: A1111's text (if any) still applies
            text = (text + "\n\n" if text else "") + "(this PNG's ldm-app parameters are damaged and are ignored)"
            stored = {}
        return text or "(no generation parameters in this PNG)", {"fields": fields_, "ldm-app": stored}

    def send_to_txt2img(self, parsed: dict | None) -> list:
        """The PNG's parameters into the settings (ldm-app's exact JSON first, else A1111's text fields); values
        that do not fit a setting leave it as it is."""
        parsed = parsed if isinstance(parsed, dict) else {}
        stored, fields_ = parsed.get("ldm-app") or {}, parsed.get("fields") or {}
        if not isinstance(stored, dict) or not isinstance(fields_, dict) or not (stored or fields_):
            raise user_error("No parameters to send; drop a PNG made by ldm-app or A1111 first.")
        step, max_side = size_range(self.engine, self.limits)
        size = str(fields_.get("Size", "x")).split("x")

        def pick(key: str, field: str, cast: Any) -> Any:
            try:
                value = cast(stored[key]) if key in stored else cast(fields_[field])
            except (KeyError, ValueError, TypeError, OverflowError):
                return gr.update()  # not in this PNG: leave the setting as it is
            return value if not isinstance(value, float) or math.isfinite(value) else gr.update()

        def side(key: str, text: str) -> Any:
            try:
                value = int(stored[key]) if key in stored else int(text)
            except (KeyError, ValueError, TypeError, OverflowError):
                return gr.update()
            return min(max_side, max(step, value // step * step))  # the sliders' range; the note says the rest

        try:
            sampler = self.engine.resolve_sampler(str(stored.get("sampler") or fields_.get("Sampler", "")),
                                                  fields_.get("Schedule type"))
        except ValueError:
            sampler = gr.update()
        eta_field = "Eta DDIM" if "Eta DDIM" in fields_ else "Eta"
        return [pick("prompt", "Prompt", str), pick("negative_prompt", "Negative prompt", str), sampler,
                pick("steps", "Steps", int), pick("guidance", "CFG scale", float), pick("eta", eta_field, float),
                pick("seed", "Seed", int), side("width", size[0]), side("height", size[-1]),
                gr.Tabs(selected="txt2img"), *layout("txt2img")]


def whole(value: Any, name: str) -> int:
    """A form number as an int; one sentence for what a slider cannot send but a script can (NaN, text, None)."""
    try:
        if float(value) == int(float(value)):
            return int(float(value))
    except (TypeError, ValueError, OverflowError):
        pass
    raise user_error(f"{name} must be a whole number.")


def number(value: Any, name: str) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        result = math.nan
    if not math.isfinite(result):
        raise user_error(f"{name} must be a finite number.")
    return result


def editor_image_and_mask(value: dict | None) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """gradio's ImageEditor value → (the uploaded image, white where the user painted)."""
    if not value or value.get("background") is None:
        raise user_error("Upload an image to inpaint, then paint over the area to repaint.")
    background = value["background"].convert("RGB")
    painted = np.zeros(background.size[::-1], dtype=bool)
    for layer in value.get("layers") or []:
        painted |= np.asarray(layer.convert("RGBA").resize(background.size))[..., 3] > 0
    if not painted.any():
        raise user_error("Nothing is painted; paint over the area to repaint.")
    return background, PIL.Image.fromarray(painted.astype(np.uint8) * 255)
