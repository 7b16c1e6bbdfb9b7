"""Who may call the server when it has an API key: the key check (every door: Bearer, HTTP Basic, the UI's
session cookie; WebSocket upgrades too), and the UI's login and logout pages.

The session cookie is `EXPIRES.SIGNATURE`, an HMAC of its expiry under the key: it is valid for `SESSION_MAX_AGE`
seconds (or until /logout, or until the key changes), and the server keeps no session table.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.requests import HTTPConnection

from .errors import error_response

SESSION_COOKIE = "ldm_app_session"
SESSION_MAX_AGE = 12 * 3600  # seconds a UI login lasts: a working day, then the key is asked for again
OPEN_PATHS = {"/healthz", "/login", "/logout"}


def same_secret(given: bytes, expected: bytes) -> bool:
    """Constant-time comparison of bytes (`hmac.compare_digest` refuses non-ASCII strings)."""
    return hmac.compare_digest(given, expected)


def key_forms(api_key: str) -> tuple[bytes, ...]:
    """The bytes a client may send for `api_key` in a header: UTF-8 (curl, httpx), or Latin-1 where the key
    fits in it (Python's http.client and requests encode header values so)."""
    forms = [api_key.encode("utf-8")]
    try:
        forms.append(api_key.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    return tuple(dict.fromkeys(forms))


class Sessions:
    """Signed, expiring UI session tokens, and the ones logged out before they expired."""

    def __init__(self, api_key: str, max_age: int = SESSION_MAX_AGE):
        self.secret, self.max_age = hashlib.sha256(b"ldm-app ui session\0" + api_key.encode("utf-8")).digest(), max_age
        self.revoked: dict[str, int] = {}  # token → its expiry (dropped once expired)

    def new(self) -> str:
        expires = int(time.time()) + self.max_age
        return f"{expires}.{self._sign(expires)}"

    def valid(self, token: str) -> bool:
        expires, _, signature = token.partition(".")
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):  # int() takes "²" or 10⁴ digits badly
            return False
        if int(expires) < time.time() or token in self.revoked:
            return False
        return same_secret(signature.encode("latin-1", "replace"), self._sign(int(expires)).encode())

    def revoke(self, token: str) -> None:
        now = time.time()
        self.revoked = {t: e for t, e in self.revoked.items() if e >= now}
        expires = token.partition(".")[0]
        if self.valid(token):
            self.revoked[token] = int(expires)

    def _sign(self, expires: int) -> str:
        return hmac.new(self.secret, str(expires).encode(), hashlib.sha256).hexdigest()


class RequireKey:
    """Every request but /healthz, /login and /logout needs the key: `Authorization: Bearer KEY` (APIs), HTTP
    Basic with the key as password (A1111 clients' --api-auth), or the session cookie /login sets (the UI).
    A WebSocket without it is accepted and closed at once with 1008 (policy violation), as RFC 6455 names it."""

    def __init__(self, app: Any, api_key: str, sessions: Sessions):
        self.app, self.keys, self.sessions = app, key_forms(api_key), sessions

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS or self._allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong API key"})
            return None
        request = Request(scope)
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            return await RedirectResponse("/login", status_code=303)(scope, receive, send)
        response = error_response(request, 401, "Missing or wrong API key; send the header "
                                                "'Authorization: Bearer KEY' with the server's --api-key.",
                                  headers={"WWW-Authenticate": "Bearer"})
        return await response(scope, receive, send)

    def _allowed(self, scope: dict) -> bool:
        connection = HTTPConnection(scope)  # a Request would refuse WebSocket scopes
        raw = dict(scope.get("headers", [])).get(b"authorization", b"")  # the bytes the client sent, not Latin-1 text
        scheme, _, credentials = raw.partition(b" ")
        if scheme.lower() == b"bearer":
            return self._is_key(credentials.strip())
        if scheme.lower() == b"basic":
            try:
                password = base64.b64decode(credentials.strip(), validate=True).partition(b":")[2]
            except binascii.Error:
                return False
            return self._is_key(password)
        return self.sessions.valid(connection.cookies.get(SESSION_COOKIE, ""))

    def _is_key(self, given: bytes) -> bool:
        return any([same_secret(given, form) for form in self.keys])  # a list: compare every form, always


LOGIN_PAGE = """<!doctype html><html><head><meta name="viewport" content="width=device-width, initial-scale=1">
<title>ldm-app: sign in</title></head><body style="font-family:sans-serif;max-width:26rem;margin:3rem auto;padding:1rem">
<h2>ldm-app</h2><form method="post" action="/login"><label>API key<br>
<input name="key" type="password" autofocus style="width:100%;font-size:1.1rem"></label>
<p>{message}</p><button type="submit" style="font-size:1.1rem">Sign in</button></form>
<p style="color:#666;font-size:.9rem">A sign-in lasts {hours} hours on this browser; <a href="/logout">/logout</a>
ends it sooner.</p></body></html>"""


def add_login(app: FastAPI, api_key: str, sessions: Sessions) -> None:
    """/login (the form, then the session cookie) and /logout (the cookie revoked and removed)."""
    hours = sessions.max_age // 3600

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page() -> str:
        return LOGIN_PAGE.format(message="", hours=hours)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await request.form()
        if not same_secret(str(form.get("key", "")).encode("utf-8", "surrogatepass"), api_key.encode("utf-8")):
            return HTMLResponse(LOGIN_PAGE.format(message="Wrong key.", hours=hours), status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, sessions.new(), max_age=sessions.max_age, httponly=True,
                            samesite="strict")
        return response

    @app.api_route("/logout", methods=["GET", "POST"], include_in_schema=False)
    def logout(request: Request) -> Response:
        sessions.revoke(request.cookies.get(SESSION_COOKIE, ""))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict")
        return response
