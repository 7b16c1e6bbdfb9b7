"""The UI's "Train LoRA" tab: drop photos (or a zip), caption them, choose finetune-lora's options, start; watch
the step count, the loss curve and samples; the finished LoRA is then offered by name (`<lora:name:1>` in the
prompt, the LoRA picker, GET /sdapi/v1/loras). The tab submits a job like POST /ldm/v1/jobs/finetune-lora does."""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import gradio as gr
import pandas as pd
import PIL.Image

from ..images import IMAGE_EXTENSIONS
from .jobs.api import owner_for_key
from .jobs.photos import stage_uploads
from .jobs.service import Jobs
from .jobs.training import FinetuneOptions, samples
from .ui_errors import user_error
from .validation import ApiError


def photo_captions(paths: list[str] | None) -> list[list[str]]:
    """[photo name, caption] for each uploaded photo (zips opened): the caption of a same-named .txt, else empty."""
    entries: list[tuple[str, bytes | None]] = []
    for path in paths or []:
        if path.lower().endswith(".zip"):
            try:
                with zipfile.ZipFile(path) as archive:
                    entries += [(PurePosixPath(e.filename).name, archive.read(e) if e.filename.endswith(".txt")
                                 else None) for e in archive.infolist() if not e.is_dir()
                                and "__MACOSX" not in e.filename]
            except (zipfile.BadZipFile, OSError):
                raise user_error(f"{Path(path).name} is not a zip file that can be read.") from None
        else:
            entries.append((Path(path).name, Path(path).read_bytes() if path.endswith(".txt") else None))
    texts = {Path(name).stem: raw.decode("utf-8", "replace").strip() for name, raw in entries if raw is not None}
    return [[name, texts.get(Path(name).stem, "")] for name, _ in entries
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS]


def train_lora_tab(jobs: Jobs, limits: Any, api_key: str | None) -> tuple[gr.Tab, gr.Textbox]:
    """The tab's components and handlers (call inside `gr.Tabs()`): the tab, and a hidden textbox that takes the
    name of each LoRA when its training ends, for the LoRA picker to follow."""
    owner = owner_for_key(api_key)

    def start(paths: list[str] | None, table: Any, prompt: str, name: str, steps: float, rank: float, lr: float,
              batch_size: float, text_encoder: bool, class_prompt: str, fmt: str, seed: float) -> tuple:
        if not paths:
            raise user_error("Drop some photos (or a .zip of them) first.")
        rows = table.values.tolist() if isinstance(table, pd.DataFrame) else (table or [])
        captions = {str(row[0]): str(row[1]).strip() for row in rows if len(row) > 1 and str(row[1] or "").strip()}
        try:
            options = FinetuneOptions(name=name.strip(), prompt=prompt.strip() or None, steps=int(steps),
                                      rank=int(rank), lr=float(lr), batch_size=int(batch_size),
                                      train_text_encoder=bool(text_encoder), format=fmt, seed=int(seed),
                                      class_prompts=[class_prompt.strip()] if class_prompt.strip() else [])
            for text in (options.prompt or "", class_prompt):
                if len(text) > limits.max_prompt_chars:
                    raise ValueError(f"A prompt has {len(text)} characters; the server accepts at most "
                                     f"{limits.max_prompt_chars}.")
            uploads = [(Path(p).name, Path(p).read_bytes()) for p in paths]
            record = jobs.submit_finetune(
                options, lambda folder: stage_uploads(uploads, captions, options.prompt, folder, limits), owner)
        except ApiError as err:
            raise user_error(err.message) from None
        except ValueError as err:
            raise user_error(str(err)) from None
        return record.id, f"Queued **{options.name}** ({options.steps} steps)…", gr.Timer(active=True)

    def watch(job_id: str) -> tuple:
        """The job's state for the tab: status line, loss curve, latest sample, grid, downloads, finished name."""
        record = jobs.store.get(job_id) if job_id else None
        if record is None:
            return (gr.update(),) * 5 + (gr.update(), gr.Timer(active=False))
        losses = jobs.store.losses(job_id)
        curve = pd.DataFrame(losses, columns=["step", "loss"])
        run = jobs.run_dir(job_id)
        shown = samples(run)
        sample = PIL.Image.open(run / shown[-1]).copy() if shown else None
        name = record.params["name"]
        status = f"**{name}** · {record.state} · step {record.step}/{record.total}"
        if losses:
            status += f" · loss {losses[-1][1]:.4f}"
        grid, links, finished = None, "", gr.update()
        if record.state == "done":
            grid = PIL.Image.open(run / "before_after.png").copy() if (run / "before_after.png").is_file() else None
            links = " · ".join(f"[{file}]({url})" for file, url in record.result["files"].items())
            status += f" — use it as `<lora:{name}:1>` in the prompt, or pick **{name}** among the LoRAs."
            finished = name
        elif record.error:
            status += f" — {record.error}"
        return status, curve, sample, grid, links, finished, gr.Timer(active=not record.final)

    def cancel(job_id: str) -> str:
        if not job_id:
            raise user_error("No training is running.")
        record = jobs.cancel(job_id)
        return f"Cancelling **{record.params['name']}** at its next step…" if not record.final else gr.update()

    with gr.Tab("Train LoRA", id="train") as tab:
        photos = gr.File(label="Photos (or a .zip; .txt files of the same name are captions)", file_count="multiple",
                         file_types=["image", ".zip", ".txt"], type="filepath", elem_id="train-photos")
        table = gr.Dataframe(headers=["photo", "caption"], datatype=["str", "str"], interactive=True,
                             label="Captions (empty: the prompt below)", elem_id="train-captions", static_columns=[0])
        with gr.Row():
            prompt = gr.Textbox(label="Caption for all photos", placeholder="e.g. a photo of sks cat",
                                elem_id="train-prompt")
            name = gr.Textbox(label="LoRA name", placeholder="e.g. my-cat", elem_id="train-name")
        with gr.Accordion("Options (as ldm-app finetune-lora)", open=False):
            with gr.Row():
                steps = gr.Number(400, label="Steps", precision=0, minimum=1, elem_id="train-steps")
                rank = gr.Number(8, label="Rank", precision=0, minimum=1)
                lr = gr.Number(1e-3, label="Learning rate", minimum=0)
                batch_size = gr.Number(8, label="Batch size", precision=0, minimum=1, elem_id="train-batch")
                seed = gr.Number(0, label="Seed", precision=0, minimum=0)
            with gr.Row():
                text_encoder = gr.Checkbox(label="Also train the text encoder (learns new words better)")
                class_prompt = gr.Textbox(label="Prior preservation: class prompt (empty = off)",
                                          placeholder="e.g. a photo of a cat")
                fmt = gr.Radio(["diffusers", "kohya"], value="diffusers", label="Files (kohya: also an A1111 file)")
        with gr.Row():
            start_button = gr.Button("Start training", variant="primary", elem_id="train-start")
            cancel_button = gr.Button("Cancel training", elem_id="train-cancel")
        status = gr.Markdown(elem_id="train-status")
        with gr.Row():
            curve = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss", label="Loss",
                                elem_id="train-loss")
            sample = gr.Image(label="Latest sample", type="pil", interactive=False, elem_id="train-sample")
        grid = gr.Image(label="Before (top) / after (bottom)", type="pil", interactive=False, elem_id="train-grid")
        links = gr.Markdown(elem_id="train-files")
        job_id = gr.State("")
        finished = gr.Textbox(visible=False, elem_id="train-finished")
        timer = gr.Timer(1.0, active=False)

    photos.change(photo_captions, photos, table)
    start_button.click(start, [photos, table, prompt, name, steps, rank, lr, batch_size, text_encoder, class_prompt,
                               fmt, seed], [job_id, status, timer])
    timer.tick(watch, job_id, [status, curve, sample, grid, links, finished, timer])
    cancel_button.click(cancel, job_id, status)
    return tab, finished
