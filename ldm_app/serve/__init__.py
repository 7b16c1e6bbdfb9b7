"""`ldm-app serve`: one process holds the model and serves a web UI, an AUTOMATIC1111-compatible API and
OpenAI's images API, through one bounded queue that batches compatible requests.

Needs the `web` extra: `pip install "ldm-app[web]"`.
"""

from __future__ import annotations

from .settings import Limits, Settings, check_bind

__all__ = ["Limits", "Settings", "create_app", "run_server"]


def create_app(engine, settings: Settings | None = None):  # noqa: ANN001,ANN201  (FastAPI imported lazily)
    """The FastAPI app over `engine` (an `ldm_app.serve.engine.Engine`); see `app.create_app`."""
    from .app import create_app as _create_app

    return _create_app(engine, settings)


def run_server(model: str = "default", loras: list[str] | tuple[str, ...] = (), host: str = "127.0.0.1",
               port: int = 7860, settings: Settings | None = None, insecure: bool = False, device: str = "auto",
               dtype: str = "auto", lora_dir: str | None = None, variant: str | None = None,
               threads: int | None = None) -> None:
    """Load the model and LoRAs, then serve until interrupted (see `server.py` for what happens on SIGTERM).
    Raises ValueError, before loading anything, for a non-loopback `host` without an API key unless `insecure`,
    and for a missing web extra. `threads`: torch's CPU threads (None: one per physical core)."""
    import dataclasses
    import importlib.util
    import os

    settings = settings or Settings()
    check_bind(host, settings.api_key, insecure)
    needed = ["uvicorn", "fastapi", "multipart"] + (["gradio"] if settings.ui else [])  # multipart: image edits
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ldm-app serve needs the web extra ({', '.join(missing)} missing): pip install "
                         "\"ldm-app[web]\"")
    if settings.data_dir is not None and lora_dir is None:  # fine-tunes finish into the data folder: offer those
        lora_dir = os.path.join(os.path.expanduser(settings.data_dir), "loras")
        os.makedirs(lora_dir, exist_ok=True)
    settings = dataclasses.replace(settings, lora_dir=lora_dir)  # where finished fine-tunes go
    from .server import serve

    serve(model, list(loras), host, port, settings, device, dtype, lora_dir, variant, threads)
