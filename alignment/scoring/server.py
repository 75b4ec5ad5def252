"""The scorer's HTTP server: uvicorn with a header deadline, a connection cap, rate-limited logs, and
the address file published once it listens.

uvicorn has a keep-alive timeout but no deadline for request headers, and accepts connections until
the process runs out of file descriptors: 300 sockets that never send a request held 300 descriptors
for ever, normal requests timed out and every failed ``accept`` was logged. Here

- a connection that has not completed its request headers ``header_timeout`` seconds after it
  opened (or after its first byte following the previous response) is closed;
- beyond ``max_connections`` open connections (by default a third of the file-descriptor limit,
  which is first raised to the hard limit), one is closed to make room: a connection stalled
  mid-request (part of a request sent, then silence for ``STALL_S``) if there is one, else any
  connection without a complete request (idle, or still sending one), the longest silent first
  either way. A connection whose request is complete (being scored or answered) is never closed;
  if every one is, the new connection is. 1,100 sockets that sent half a body and stalled used to
  count as busy, so new connections were refused and 310 of 3,643 normal requests failed; now
  each new connection pushes out a stalled one;
- each log line is let through at most a few times a minute (:class:`RepeatFilter`, while the service runs).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

logger = logging.getLogger("alignment.scoring.service")

STALL_S = 1.0  # a connection silent this long in the middle of a request is stalled


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_max_connections() -> int:
    """Open connections allowed: a third of the file descriptors (raised to the hard limit first).

    Connections being accepted, open and being closed each hold a descriptor; at a third of the
    limit a burst of all three still leaves room for the models, logs and pipes.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    except (ImportError, OSError, ValueError):
        return 1024
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, (soft - 32) // 3))


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # asyncio turns Nagle's algorithm off only for sockets whose proto is IPPROTO_TCP; with proto 0
    # every keep-alive response waited ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"scorer: cannot listen on {host}:{port}: {exc}") from exc
    sock.set_inheritable(True)
    return sock


def guarded_protocol(header_timeout: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol class with a header deadline and a connection cap.

    Relies on what uvicorn's h11 and httptools protocols share (0.30 onwards): ``cycle`` is the
    current request (set once its headers are complete), ``connections`` the open connections.
    """

    class GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._opened = self._heard = time.monotonic()
            self._partial = False  # bytes of a request not yet complete have arrived
            self._header_timer = None
            self._arm_header_deadline()
            if len(self.connections) > max_connections:
                self._make_room()

        def data_received(self, data: bytes) -> None:
            self._heard = time.monotonic()
            idle = self._idle()
            super().data_received(data)
            if idle:
                self._partial = True
            if self._header_timer is None and self._idle():
                self._arm_header_deadline()  # the first bytes of a next request

        def on_response_complete(self) -> None:
            self._partial = False
            self._heard = time.monotonic()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _idle(self) -> bool:
            cycle = self.cycle
            return cycle is None or cycle.response_complete

        def _state(self) -> str:
            """ "answering" (the request is complete), "sending" (part of one arrived) or "idle"."""
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                return "sending" if cycle.more_body else "answering"
            return "sending" if self._partial else "idle"

        def _arm_header_deadline(self) -> None:
            armed_for = self.cycle

            def expire() -> None:
                self._header_timer = None
                if self.cycle is armed_for and not self.transport.is_closing():
                    logger.warning(
                        "closing a connection that sent no complete request in %g s", header_timeout
                    )
                    self.transport.close()

            self._header_timer = self.loop.call_later(header_timeout, expire)

        def _make_room(self) -> None:
            now = time.monotonic()
            victim, victim_rank = None, (2, 0.0)
            for c in self.connections:
                if c is self or not hasattr(c, "_heard") or c.transport.is_closing():
                    continue
                state = c._state()
                if state == "answering":
                    continue
                silent = now - c._heard
                rank = (0 if state == "sending" and silent >= STALL_S else 1, -silent)
                if rank < victim_rank:
                    victim, victim_rank = c, rank
            if victim is None:
                logger.warning("%d connections open (limit %d), all answering: refusing a new one",
                               len(self.connections), max_connections)  # fmt: skip
                self.transport.close()
            elif victim_rank[0] == 0:
                logger.warning("%d connections open (limit %d): closing the one stalled longest mid-request",
                               len(self.connections), max_connections)  # fmt: skip
                victim.transport.close()
            else:
                logger.warning("%d connections open (limit %d): closing the longest silent one",
                               len(self.connections), max_connections)  # fmt: skip
                victim.transport.close()

    return GuardedHTTPProtocol


class RepeatFilter(logging.Filter):
    """Let each message (same logger, level and format string) through ``burst`` times per ``window``
    seconds; the first one let through after a quiet spell says how many were held back."""

    exempt = frozenset({"uvicorn.access"})  # --access-log asks for every request, and each has one format

    def __init__(self, burst: int = 5, window: float = 60.0) -> None:
        super().__init__()
        self.burst, self.window = burst, window
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # key -> [start, count, held back]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in self.exempt:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= self.window:
                held = int(entry[2]) if entry else 0
                if len(self._seen) > 4096:  # forget quiet messages
                    self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window}
                self._seen[key] = [now, 1, 0]
                if held and isinstance(record.msg, str):
                    record.msg += f" [{held} more like this in the last {self.window:g} s were not logged]"
                return True
            entry[1] += 1
            if entry[1] <= self.burst:
                return True
            entry[2] += 1
            return False


@contextlib.contextmanager
def repeat_filter(burst: int = 5, window: float = 60.0) -> Iterator[RepeatFilter]:
    """Rate-limit every handler of the root logger (uvicorn's loggers propagate to it here) while the
    block runs. Taken off again afterwards: the handlers may belong to whoever embeds the service
    (pytest's log capture does), and a filter left on them would swallow that caller's messages."""
    flt = RepeatFilter(burst, window)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(flt)
    try:
        yield flt
    finally:
        for handler in handlers:
            handler.removeFilter(flt)


class ScorerServer(uvicorn.Server):
    """Calls ``on_started`` once the socket accepts connections and ``on_stopped`` on shutdown.

    ``on_stopped`` runs first in ``shutdown``, before requests drain (clients must stop being sent
    here), and there rather than after ``run()``: after a signal-driven shutdown uvicorn re-raises
    the signal, which ends the process before code after ``run()`` gets to run.
    """

    def __init__(
        self, config: uvicorn.Config, on_started: Callable[[], None], on_stopped: Callable[[], None]
    ):
        super().__init__(config)
        self._on_started, self._on_stopped = on_started, on_stopped

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()

    async def shutdown(self, sockets=None) -> None:
        with contextlib.suppress(Exception):
            self._on_stopped()
        await super().shutdown(sockets=sockets)
