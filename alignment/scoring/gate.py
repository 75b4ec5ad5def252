"""ASGI middleware in front of the scorer's routes: what is checked before a body is parsed, and a
barrier that turns every unexpected exception into an answer.

:class:`RequestGate` checks, in this order and before reading a byte of the body: the method (405
with ``Allow``), the bearer token (401), the declared body size (413); then it reads the body with
a size limit (413) and a deadline (408: a body shorter than its ``Content-Length`` never stalls the
service), and hands the complete body to the app as one ``bytearray`` (which the app may empty to
free it early; nothing else keeps a reference). A request rejected before its body was read is
answered with ``Connection: close``, so an unauthenticated 57 MB upload is not read at all.

:func:`unless_disconnected` runs a route's work until the client hangs up, then cancels it
(:class:`ClientGone`: the route answers 499, which nobody reads and ``/metrics`` counts apart).

:class:`ErrorBarrier` answers a JSON 500 for any exception from the app and does not re-raise it:
an exception that reaches the server closes the keep-alive connection, which other well-behaved
requests of that client then see as ``Connection reset by peer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("alignment.scoring.service")

# asyncio.wait_for raises asyncio.TimeoutError; it is the builtin TimeoutError only from Python 3.11
_TIMEOUT = (asyncio.TimeoutError, TimeoutError)


async def send_json(
    send: Send, status: int, body: dict, headers: Mapping[str, str] | None = None, close: bool = False
) -> None:
    """Send a complete JSON response."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def bearer_matches(header: bytes | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time compare)."""
    scheme, _, given = (header or b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class RequestGate:
    """Method, token, body size and body time checks for ``routes`` (path -> allowed methods).

    Paths outside ``routes`` (the OpenAPI document, 404s) pass through unchecked. ``protected``
    paths need the bearer token when ``token`` is set.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[str, tuple[str, ...]],
        protected: frozenset[str],
        token: str | None,
        max_body_bytes: int,
        body_timeout: float,
    ) -> None:
        self.app, self.token, self.protected = app, token, protected
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout
        # HEAD is answered wherever GET is (Starlette does so by itself).
        self.routes = {p: (*m, "HEAD") if "GET" in m else tuple(m) for p, m in routes.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.routes:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        has_body = (length or 0) > 0 or b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        allowed = self.routes[scope["path"]]
        if scope["method"] not in allowed:
            await send_json(
                send,
                405,
                {"error": f"{scope['method']} is not allowed on {scope['path']}; use {', '.join(allowed)}"},
                {"Allow": ", ".join(allowed)},
                close=has_body,
            )
            return
        if (
            self.token is not None
            and scope["path"] in self.protected
            and not bearer_matches(headers.get(b"authorization"), self.token)
        ):
            await send_json(
                send,
                401,
                {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                {"WWW-Authenticate": "Bearer"},
                close=has_body,
            )
            return
        if length is not None and length > self.max_body_bytes:
            await self._too_large(send, length)
            return
        if not has_body:
            await self.app(scope, receive, send)
            return
        body = await self._read_body(receive, send)
        if body is None:
            return
        replay = _replay(body, receive)
        del body  # the app's to keep or free
        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, size: int) -> None:
        message = f"request body of {size} bytes exceeds the limit of {self.max_body_bytes} bytes"
        await send_json(send, 413, {"error": message}, close=True)

    async def _read_body(self, receive: Receive, send: Send) -> bytearray | None:
        """The whole body, or None once an answer (408, 413) was sent or the client left."""
        body = bytearray()  # grown in place: no list of chunks joined into a second copy at the end
        deadline = time.monotonic() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except _TIMEOUT:
                await send_json(
                    send,
                    408,
                    {"error": f"the request body did not arrive within {self.body_timeout:g} s"},
                    close=True,
                )
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if len(body) + len(chunk) > self.max_body_bytes:
                await self._too_large(send, len(body) + len(chunk))
                return None
            body += chunk
            if not message.get("more_body", False):
                return body


def _replay(body: bytearray, receive: Receive) -> Receive:
    """A ``receive`` that yields the body once, then what the server says (e.g. a disconnect);
    it keeps no reference to the body once given."""
    held: list[bytearray] = [body]
    del body

    async def replay() -> Message:
        if held:
            return {"type": "http.request", "body": held.pop(), "more_body": False}
        return await receive()

    return replay


class ClientGone(Exception):
    """The caller closed its connection before its answer was ready."""


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable):
    """The result of ``work``; cancels it (dropping its queued items) when the client hangs up.

    ``task.cancel()`` only asks: the task is not cancelled until it next runs, so the hang-up is
    decided by which of the two finished, never by ``task.cancelled()`` right after asking (which
    was still False, so ``task.result()`` raised and a hang-up was answered and counted as 500).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # its cleanup (dropping queued items, stopping its tokenisation) runs now
    if watcher.done() and not watcher.cancelled() and watcher.exception() is None:
        raise ClientGone()
    return task.result()


class ErrorBarrier:
    """Answer a JSON 500 for an exception from ``app`` instead of letting it reach the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            logger.error("%s %s failed", scope["method"], scope["path"], exc_info=exc)
            if not started:
                await send_json(send, 500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
