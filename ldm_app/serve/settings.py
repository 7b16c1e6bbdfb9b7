"""What a server allows: request limits, queue sizes and who may call it, checked once at start-up."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass
class Limits:
    """Per-request ceilings; a request over one gets a 4xx that names the limit and the flag that raises it."""

    max_pixels: int = 1024 * 1024  # width × height of one image (--max-pixels); the default model is 64 × 64
    max_steps: int = 150  # denoising steps (--max-steps)
    max_images: int = 16  # images per request: A1111's batch_size × n_iter, OpenAI's n (--max-images)
    max_body_bytes: int = 32 * 1024 * 1024  # request body, base64 images included (--max-body-mb)
    max_prompt_chars: int = 4000  # prompt and negative prompt, each (--max-prompt-chars)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: request limits are positive integers; pass at least 1 to its "
                                 "--max-* flag.")


@dataclass
class Settings:
    """How the server runs; `run_server` builds it from flags, tests build it directly."""

    api_key: str | None = None  # every request but /healthz needs `Authorization: Bearer KEY` when set
    max_queue: int = 32  # requests waiting for the model; one more gets 503 + Retry-After
    max_batch: int = 16  # images per pipeline call when compatible requests are batched
    ui: bool = True  # mount the gradio UI at / (needs the `web` extra's gradio)
    data_dir: str | None = None  # jobs database and job folders (--data-dir); None: a temporary folder
    lora_dir: str | None = None  # where finished fine-tunes go (--lora-dir); None: <data_dir>/loras
    limits: Limits = field(default_factory=Limits)
    head_timeout: float = 10.0  # s from connect (or the previous response) to a request's complete head
    body_timeout: float = 60.0  # s from a request's head to its body's last byte (32 MB: about 4.5 Mbit/s)
    max_connections: int = 512  # open sockets; beyond it the oldest still waiting for its request head is closed
    telemetry: bool = False  # let gradio check for updates and send its analytics (off: the server calls no one)

    @property
    def max_requests(self) -> int:
        """Requests in progress (waiting, running, being read or answered, the UI's streams): one more is a 503."""
        return self.max_queue + self.max_batch + 16

    def __post_init__(self) -> None:
        if self.max_queue < 1 or self.max_batch < 1:
            raise ValueError(f"max_queue={self.max_queue}, max_batch={self.max_batch}; both must be at least 1.")
        if self.api_key is not None:
            check_key(self.api_key)
        if not (self.head_timeout > 0 and self.body_timeout > 0 and self.max_connections >= 1):
            raise ValueError(f"head_timeout={self.head_timeout}, body_timeout={self.body_timeout}, max_connections="
                             f"{self.max_connections}: all must be positive.")


MIN_KEY_CHARS = 16


def check_key(api_key: str) -> None:
    """A key that guessing cannot find: 16 characters at least, and no space at either end (clients strip it)."""
    fix = "use a long random key, e.g. python -c 'import secrets; print(secrets.token_urlsafe())'"
    if not api_key.strip():
        raise ValueError(f"--api-key is empty or all whitespace; {fix}.")
    if api_key != api_key.strip():
        raise ValueError(f"--api-key starts or ends with whitespace, which clients strip from headers; {fix}.")
    if len(api_key) < MIN_KEY_CHARS:
        raise ValueError(f"--api-key is shorter than {MIN_KEY_CHARS} characters; {fix}.")


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name that may resolve to anything


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose the model beyond this machine without a key, unless the user says so explicitly."""
    if not is_loopback(host) and api_key is None and not insecure:
        raise ValueError(f"--host {host} accepts connections from other machines; pass --api-key KEY so that only "
                         "callers with the key are served (or --insecure to serve anyone who can reach it).")
