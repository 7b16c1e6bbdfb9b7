"""Start `python -m ldm_app.serve` as a child process on a free loopback port and stop it by its PID: for the
tests, the browser test and the load benchmark, which talk to a real server the way clients do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], timeout: float = 180.0, log_path: str | None = None,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """The server with `args` (besides --host/--port) and its base URL, once /healthz answers; the child gets
    this environment (PYTHONPATH included) updated with `env`. Raises RuntimeError with the server's last output
    if it never answers."""
    port = free_port()
    log = open(log_path, "w+b") if log_path else subprocess.DEVNULL  # noqa: SIM115  (closed by stop_server)
    proc = subprocess.Popen([sys.executable, "-m", "ldm_app.serve", "--host", "127.0.0.1", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    proc.log = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with NO_PROXY.open(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    stop_server(proc)
    tail = ""
    if log_path:
        with open(log_path, "rb") as f:
            tail = f.read()[-2000:].decode(errors="replace")
    raise RuntimeError(f"ldm-app serve did not come up on {url} (exit code {proc.returncode}): {tail}")


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM to this PID (uvicorn shuts down cleanly), SIGKILL if it has not ended within `timeout`."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    log = getattr(proc, "log", None)
    if log not in (None, subprocess.DEVNULL):
        log.close()
