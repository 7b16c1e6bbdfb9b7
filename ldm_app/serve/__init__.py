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
               port: int = 7860, api_key: str | None = None, insecure: bool = False, device: str = "auto",
               dtype: str = "auto", max_queue: int = 32, max_batch: int = 16, lora_dir: str | None = None,
               limits: Limits | None = None, ui: bool = True, variant: str | None = None,
               data_dir: str | None = None) -> None:
    """Load the model and LoRAs, then serve until interrupted. Raises ValueError (before loading anything) for
    a non-loopback `host` without `api_key` unless `insecure`, and for bad settings."""
    import importlib.util
    from pathlib import Path

    check_bind(host, api_key, insecure)
    needed = ["uvicorn", "fastapi", "multipart"] + (["gradio"] if ui else [])  # multipart: OpenAI's image edits
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ldm-app serve needs the web extra ({', '.join(missing)} missing): pip install "
                         "\"ldm-app[web]\"")
    import uvicorn

    from .app import create_app as _create_app
    from .engine import Engine

    settings = Settings(api_key=api_key, max_queue=max_queue, max_batch=max_batch, ui=ui,
                        limits=limits or Limits(), data_dir=data_dir, lora_dir=lora_dir)
    if data_dir is not None and lora_dir is None:  # fine-tunes finish into the data folder: offer those too
        lora_dir = str(Path(data_dir).expanduser() / "loras")
        Path(lora_dir).mkdir(parents=True, exist_ok=True)
    engine = Engine.load(model, list(loras), lora_dir, device, dtype, variant)
    app = _create_app(engine, settings)
    print(f"ldm-app serve: http://{host}:{port}/ (UI), /sdapi/v1 (A1111), /v1/images (OpenAI)", flush=True)
    # connections beyond the queue's bound get 503 from uvicorn before their bodies are read into memory
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                limit_concurrency=max_queue + max_batch + 16)
