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
               limits: Limits | None = None, ui: bool = True, variant: str | None = None) -> None:
    """Load the model and LoRAs, then serve until interrupted. Raises ValueError (before loading anything) for
    a non-loopback `host` without `api_key` unless `insecure`, and for bad settings."""
    check_bind(host, api_key, insecure)
    try:
        import uvicorn

        from .app import create_app as _create_app
    except ImportError as err:
        raise ValueError(f"ldm-app serve needs the web extra ({err.name} is missing): pip install \"ldm-app[web]\"") from None
    from .engine import Engine

    settings = Settings(api_key=api_key, max_queue=max_queue, max_batch=max_batch, ui=ui,
                        limits=limits or Limits())
    engine = Engine.load(model, list(loras), lora_dir, device, dtype, variant)
    app = _create_app(engine, settings)
    print(f"ldm-app serve: http://{host}:{port}/ (UI), /sdapi/v1 (A1111), /v1/images (OpenAI)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
