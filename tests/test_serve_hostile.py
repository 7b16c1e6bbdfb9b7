"""A real server on 127.0.0.1 (a child process, stopped by its PID) against hostile clients: sockets that send
nothing or drip their headers, hostile PNGs and strings, WebSockets without the key, SIGTERM with requests
waiting, weak and non-ASCII keys. Every wait is bounded."""

import base64
import os
import json
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from ldm_app.serve.process import start_server, stop_server  # noqa: E402
from ldm_app.testing import hand_made_png as png, tiny_pipeline  # noqa: E402

KEY = "clé-ключ-for-tests-0123"  # non-ASCII, and not Latin-1: clients must send it as UTF-8 bytes
AUTH = {"Authorization": b"Bearer " + KEY.encode("utf-8")}
SMALL = {"prompt": "a red cat", "steps": 2, "seed": 5, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    tiny_pipeline().save_pretrained(folder / "model")
    return folder


@pytest.fixture(scope="module")
def server(model_dir):
    """--max-queue 2 --max-batch 1: a request cap of 19, which 64 idle sockets once filled three times over."""
    log = model_dir / "server.log"
    proc, url = start_server(["--model", str(model_dir / "model"), "--device", "cpu", "--no-ui", "--threads", "1",
                              "--api-key", KEY, "--max-queue", "2", "--max-batch", "1", "--head-timeout", "2",
                              "--body-timeout", "3"], log_path=str(log))
    try:
        yield url, log
    finally:
        stop_server(proc)


def address(url: str) -> tuple[str, int]:
    host, port = url.rsplit("/", 1)[1].split(":")
    return host, int(port)


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={**AUTH, "Content-Type": "application/json"},
                      timeout=60, trust_env=False, **kwargs)


def closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing `sock` (b"" for a silent close), or None if it stayed open."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


# ----------------------------------------------------------------------------------------------------------------
# Connections


def test_idle_and_dripping_connections_neither_lock_out_clients_nor_stay_open(server):
    url, log = server
    idle = [socket.create_connection(address(url)) for _ in range(64)]
    dripping = [socket.create_connection(address(url)) for _ in range(8)]
    body_stalled = socket.create_connection(address(url))
    opened = time.monotonic()
    try:
        for sock in dripping:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        body_stalled.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{")
        # real clients are served while all of them are open
        assert httpx.get(url + "/healthz", timeout=10, trust_env=False).status_code == 200
        r = post(url, "/sdapi/v1/txt2img", SMALL)
        assert r.status_code == 200, r.text
        for _ in range(3):  # the dripping ones keep sending, one byte at a time
            time.sleep(0.4)
            for sock in dripping:
                sock.sendall(b"s")
        # ... and every one of them is closed by its deadline: 2 s for a head, 3 s for a body
        answers = [closed_by_server(sock, within=6) for sock in idle + dripping]
        assert all(a is not None for a in answers), "a socket that sent no complete head is still open"
        assert answers[:64] == [b""] * 64  # silent: a browser's spare sockets send nothing either
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers[64:])  # a head that started gets a 408
        assert closed_by_server(body_stalled, within=6) is not None
        assert time.monotonic() - opened < 12
    finally:
        for sock in idle + dripping + [body_stalled]:
            sock.close()
    assert httpx.get(url + "/healthz", timeout=10, trust_env=False).status_code == 200
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "1 CPU threads" in text.splitlines()[0]  # --threads 1


# ----------------------------------------------------------------------------------------------------------------
# Hostile input


@pytest.mark.parametrize("path, body", [
    ("/sdapi/v1/txt2img", b'{"prompt": "a \\ud800 cat", "steps": 2}'),
    ("/sdapi/v1/txt2img", b'{"prompt": "a cat", "negative_prompt": "\\udfff", "steps": 2}'),
    ("/v1/images/generations", b'{"prompt": "a \\ud800 cat", "steps": 2}'),
])
def test_lone_surrogates_are_a_clean_4xx_on_both_apis(server, path, body):
    r = post(server[0], path, body)
    assert r.status_code in (400, 422), r.text
    assert "surrogate" in r.text and "Traceback" not in r.text


def test_png_info_refuses_a_png_declaring_50000_by_50000(server):
    bomb = png(50000, 50000, {"parameters": b"a cat\nSteps: 20, Sampler: Euler, Seed: 1"})
    assert len(bomb) < 200
    r = post(server[0], "/sdapi/v1/png-info", {"image": base64.b64encode(bomb).decode()})
    assert r.status_code == 413 and "too large" in r.json()["detail"]


@pytest.mark.parametrize("size, status", [(32_000, 200), (1_000_000, 422)])
def test_png_info_reads_a_long_line_without_a_colon_at_once(server, size, status):
    """A1111's field regex takes 5.8 s on a 32k line without a colon (hours on 1 MB), holding the GIL."""
    text = ("word " * size)[:size]
    image = base64.b64encode(png(8, 8, {"parameters": text.encode()})).decode()
    started = time.monotonic()
    r = post(server[0], "/sdapi/v1/png-info", {"image": image})
    assert time.monotonic() - started < 3
    assert r.status_code == status, r.text[:300]
    if status == 200:
        assert r.json()["parameters"]["Prompt"] == text.strip()
    else:
        assert "65536" in r.json()["detail"]


def test_method_tiling_and_4xx_logging(server):
    url, log = server
    r = httpx.get(url + "/sdapi/v1/txt2img", headers=AUTH, timeout=10, trust_env=False)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "POST" in r.json()["detail"]
    r = httpx.get(url + "/v1/images/generations", headers=AUTH, timeout=10, trust_env=False)
    assert r.status_code == 405 and "POST" in r.json()["error"]["message"]
    r = post(url, "/sdapi/v1/txt2img", {**SMALL, "tiling": True})
    assert r.status_code == 422 and r.json()["param"] == "tiling"
    time.sleep(0.3)
    lines = log.read_text(errors="replace").splitlines()
    assert any("/sdapi/v1/txt2img → 422: tiling" in line for line in lines)
    assert not any("Traceback" in line for line in lines)


def test_multipart_limits_are_reported_as_limits(server):
    files = [("image", ("in.png", png(8, 8, {}), "image/png"))] * 5  # more files than the route takes
    r = httpx.post(server[0] + "/v1/images/edits", files=files, data={"prompt": "x"}, headers=AUTH, timeout=30,
                   trust_env=False)
    assert r.status_code == 413 and "Too many files" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------------------------------------------
# Keys and WebSockets


def test_non_ascii_key_matches_via_bearer_and_basic(server):
    url, _ = server
    assert httpx.get(url + "/sdapi/v1/samplers", headers=AUTH, timeout=10, trust_env=False).status_code == 200
    basic = b"Basic " + base64.b64encode(b"user:" + KEY.encode())
    assert httpx.get(url + "/sdapi/v1/samplers", headers={"Authorization": basic}, timeout=10,
                     trust_env=False).status_code == 200
    wrong = {"Authorization": b"Bearer " + KEY.encode("utf-8")[:-1]}
    assert httpx.get(url + "/sdapi/v1/samplers", headers=wrong, timeout=10, trust_env=False).status_code == 401


def test_the_ui_session_expires_and_logout_ends_it(server):
    url, _ = server
    with httpx.Client(base_url=url, trust_env=False, timeout=10) as client:
        r = client.post("/login", data={"key": KEY}, follow_redirects=False)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert "Max-Age=43200" in cookie and "HttpOnly" in cookie
        token = client.cookies["ldm_app_session"]
        assert client.get("/sdapi/v1/samplers").status_code == 200
        assert client.get("/logout", follow_redirects=False).headers["location"] == "/login"
        assert "ldm_app_session" not in client.cookies
        stolen = client.get("/sdapi/v1/samplers", cookies={"ldm_app_session": token})
        assert stolen.status_code == 401  # the token itself is revoked, not only deleted from this browser
    expired = "1000." + token.partition(".")[2]
    assert httpx.get(url + "/sdapi/v1/samplers", cookies={"ldm_app_session": expired}, timeout=10,
                     trust_env=False).status_code == 401


def websocket_handshake(url: str, headers: bytes = b"") -> tuple[bytes, bytes]:
    """An RFC 6455 upgrade by hand: (the server's response head, what followed it before the close)."""
    sock = socket.create_connection(address(url), timeout=3)  # a refusal may leave the socket open: 3 s at most
    sock.sendall(b"GET /gradio_api/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + headers + b"\r\n")
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def test_websockets_are_closed_with_1008_without_the_key_and_never_a_500(server):
    url, log = server
    head, frames = websocket_handshake(url)
    assert head.startswith(b"HTTP/1.1 101")
    assert frames[0] == 0x88 and struct.unpack(">H", frames[2:4])[0] == 1008  # a close frame, code 1008
    head, _ = websocket_handshake(url, b"Authorization: Bearer " + KEY.encode() + b"\r\n")
    assert not head.startswith(b"HTTP/1.1 500")  # with the key: no WebSocket route here, refused cleanly
    assert "Traceback" not in log.read_text(errors="replace")


@pytest.mark.parametrize("key, words", [("               ", "whitespace"), ("short-key", "shorter than 16"),
                                        (" padded-key-of-20-chars ", "whitespace")])
def test_weak_keys_are_refused_at_start_in_one_line(key, words):
    out = subprocess.run([sys.executable, "-m", "ldm_app.serve", "--no-ui", "--api-key", key, "--port", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: --api-key") and words in out.stderr and "Traceback" not in out.stderr


# ----------------------------------------------------------------------------------------------------------------
# Shutdown


def test_sigterm_answers_waiting_requests_503_and_ends_the_running_batch(model_dir):
    log = model_dir / "sigterm.log"
    proc, url = start_server(["--model", str(model_dir / "model"), "--device", "cpu", "--no-ui", "--threads", "1",
                              "--api-key", KEY, "--max-queue", "4", "--max-batch", "1"], log_path=str(log))
    results: dict[int, httpx.Response] = {}

    def call(i: int, steps: int) -> None:
        results[i] = post(url, "/sdapi/v1/txt2img", {**SMALL, "steps": steps, "batch_size": 16, "seed": i})

    def metric(name: str) -> float:
        text = httpx.get(url + "/metrics", headers=AUTH, timeout=10, trust_env=False).text
        return float(dict(line.split() for line in text.splitlines())[f"ldm_app_{name}"])

    try:
        threads = [threading.Thread(target=call, args=(0, 150))]
        threads[0].start()
        deadline = time.monotonic() + 60
        while metric("running_jobs") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        threads += [threading.Thread(target=call, args=(i, 150 - i)) for i in (1, 2)]
        for t in threads[1:]:
            t.start()
        while metric("queue_length") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric("queue_length") == 2 and metric("running_jobs") == 1
        proc.send_signal(15)  # SIGTERM, to this PID
        for t in threads:
            t.join(30)
        assert proc.wait(30) is not None
    finally:
        stop_server(proc)
    assert sorted(results) == [0, 1, 2]
    for r in results.values():
        assert r.status_code == 503 and "shutting down" in r.json()["detail"], r.text
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "CancelledError" not in text


# ----------------------------------------------------------------------------------------------------------------
# No calls home; temp files


class ProxySink:
    """A local 'proxy' that records every connection made to it (and answers nothing): pointed to by
    HTTP(S)_PROXY, it catches any outbound request a library makes with the usual HTTP clients."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.requests.append(conn.recv(4096).split(b"\r\n")[0])
            except OSError:
                self.requests.append(b"(connected)")
            conn.close()

    def env(self, tmp: str) -> dict[str, str]:
        return {"HTTP_PROXY": self.url, "HTTPS_PROXY": self.url, "ALL_PROXY": self.url, "http_proxy": self.url,
                "https_proxy": self.url, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                "TMPDIR": tmp, "HF_HUB_OFFLINE": "0"}  # online as far as the libraries know: only the sink stops them


@pytest.mark.parametrize("telemetry", [False, True])
def test_the_ui_server_calls_no_one_unless_asked_and_keeps_its_temp_files_private(model_dir, tmp_path, telemetry):
    sink = ProxySink()
    orphan = tmp_path / "ldm-app-serve-999999999-left-by-kill-9"  # a server killed with SIGKILL left this
    (orphan / "ldm-app-ui-x").mkdir(parents=True)
    flags = ["--telemetry"] if telemetry else []
    proc, url = start_server(["--model", str(model_dir / "model"), "--device", "cpu", "--threads", "1", *flags],
                             log_path=str(tmp_path / "ui.log"), env=sink.env(str(tmp_path)))
    try:
        assert not orphan.exists()
        (private,) = tmp_path.glob(f"ldm-app-serve-{proc.pid}-*")
        upload = httpx.post(url + "/gradio_api/upload", files={"files": ("a.png", png(8, 8, {}), "image/png")},
                            timeout=30, trust_env=False)
        assert upload.status_code == 200, upload.text
        (stored,) = upload.json()
        assert stored.startswith(str(private / "gradio"))
        time.sleep(3)  # gradio's version check and analytics start in threads as the UI is built
    finally:
        stop_server(proc)
    assert not private.exists()  # uploads, gradio's cache and the UI's PNGs went with the server
    if telemetry:
        assert any(b"api.gradio.app" in line for line in sink.requests), sink.requests  # the sink does catch it
    else:
        assert sink.requests == []


def test_the_sweeper_deletes_old_uploads_and_keeps_the_folders_it_writes_into(tmp_path):
    from ldm_app.serve.tempfiles import remove_orphans, sweep

    old, new = tmp_path / "gradio" / "abc" / "old.png", tmp_path / "ldm-app-ui-x" / "new.png"
    for path in (old, new):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    now = time.time()
    assert sweep(tmp_path, max_age=3600, now=now + 1800) == 0
    assert sweep(tmp_path, max_age=3600, now=now + 7200) == 2
    assert not (tmp_path / "gradio" / "abc").exists()  # an upload's own folder goes with it
    assert (tmp_path / "gradio").is_dir() and (tmp_path / "ldm-app-ui-x").is_dir()  # still written into
    alive = tmp_path / f"ldm-app-serve-{os.getpid()}-live"
    alive.mkdir()
    assert remove_orphans(tmp_path) == [] and alive.is_dir()  # a running server's folder is left alone


def test_past_the_socket_cap_the_oldest_idle_socket_makes_room():
    """In-process uvicorn with the server's protocol and a cap of 4 sockets: a fifth, real client is served, and
    the socket that has waited longest without sending its head is the one closed."""
    import uvicorn

    from ldm_app.serve.connections import deadline_protocol
    from ldm_app.serve.process import free_port
    from ldm_app.serve.settings import Settings

    async def hello(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    protocol = deadline_protocol(Settings(head_timeout=30, max_connections=4))
    server = uvicorn.Server(uvicorn.Config(hello, host="127.0.0.1", port=port, http=protocol, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", port)))
            time.sleep(0.1)  # so that their ages differ
        r = httpx.get(f"http://127.0.0.1:{port}/", timeout=10, trust_env=False)
        assert r.status_code == 200 and r.text == "ok"
        assert closed_by_server(idle[0], within=5) is not None  # the oldest made room
        assert all(closed_by_server(sock, within=0.3) is None for sock in idle[1:])  # the others wait on
    finally:
        server.should_exit = True
        thread.join(15)
        for sock in idle:
            sock.close()
