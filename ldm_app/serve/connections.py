"""Connections that send nothing, or send slowly, must not hold the server: uvicorn's HTTP/1.1 protocol with
deadlines, and a cap on open connections that drops the oldest idle one first.

uvicorn (h11) starts no timer before a connection's first request, re-arms its keep-alive timer only after a
response, and cancels it on any byte received; so a socket that never sends, or sends a header one byte at a
time, stays open forever. Its `limit_concurrency` then counts such sockets as load and answers every real
request 503. Here a request's head must arrive within `head_timeout` seconds of the connection (or of the previous
response) and its body within `body_timeout` seconds of the head, whatever the rate; the server's request cap
counts requests in progress (`middleware.InFlightLimit`), not sockets.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import Settings


class DeadlineH11Protocol(H11Protocol):
    """One connection: its phase ("head": waiting for a request head, "body": reading a body, None: the app is
    working or the connection was upgraded) and the timer that closes it if the phase lasts too long."""

    head_timeout = Settings.head_timeout
    body_timeout = Settings.body_timeout
    max_connections = Settings.max_connections

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase: str | None = None
        self.phase_started = 0.0
        self.deadline: asyncio.TimerHandle | None = None
        self.upgraded = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.follow_phase()
        if len(self.connections) > self.max_connections:
            self.drop_oldest_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self.follow_phase()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.follow_phase()  # a kept-alive connection waits for its next head

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self.upgraded = True  # the WebSocket protocol takes the socket over, with its own ping timeouts
        self.cancel_deadline()
        super().handle_websocket_upgrade(event)

    # ------------------------------------------------------------------------------------------------------

    def follow_phase(self) -> None:
        """Re-arm the deadline when h11's view of the client changes phase."""
        state = self.conn.their_state
        phase = None if self.upgraded else "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase == self.phase or self.transport.is_closing():
            return
        self.cancel_deadline()
        self.phase, self.phase_started = phase, time.monotonic()
        if phase is not None:
            timeout = self.head_timeout if phase == "head" else self.body_timeout
            self.deadline = self.loop.call_later(timeout, self.expire)

    def cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def expire(self) -> None:
        """Past the deadline: a 408 where no request has started (nothing else is writing), then close. A body
        that stops arriving ends the same way for the app: its request sees the client disconnect."""
        self.deadline = None
        if self.transport.is_closing():
            return
        if self.phase == "head" and self.conn.our_state is h11.IDLE:
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.transport.close()

    def drop_oldest_idle(self) -> None:
        """Too many sockets: close the one that has waited longest for its head (this one if no other waits)."""
        idle = [c for c in self.connections if isinstance(c, DeadlineH11Protocol) and c.phase == "head"]
        oldest = min(idle, key=lambda c: c.phase_started, default=self)
        oldest.expire()


def deadline_protocol(settings: Settings) -> type[DeadlineH11Protocol]:
    """The protocol class uvicorn builds per connection (`uvicorn.Config(http=...)`), with `settings`' limits."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {
        "head_timeout": settings.head_timeout, "body_timeout": settings.body_timeout,
        "max_connections": settings.max_connections})
