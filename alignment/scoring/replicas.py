"""The scorer replicas one client sends to: discovery, balancing by outstanding requests, failover.

    pool = ReplicaPool(http, sources=[Path("logs/scorers")])     # or urls=["http://a:8000", ...]
    replica = pool.acquire(exclude=set())   # the usable replica with the fewest requests in flight
    ...                                     # send; then pool.release(replica) and one of
    pool.succeeded(replica, items) / pool.failed(replica, why) / pool.reject(replica, why)

A replica is *usable* unless

- it is *suspect*: a request failed at the transport level (refused, reset, timed out) or got a 5xx
  that says the service itself is unwell (502, 504, a 503 without ``Retry-After``: the scheduler
  stopped); it gets no request until a ``GET /health`` probe answers healthy (a request is never
  the probe, so a dead replica costs one failed request per client, not one per retry);
- it is *busy*: a 503 or 429 with ``Retry-After`` (queue full) rests it that long (a busy replica
  still answers /health, so a probe would not tell);
- it rejected the bearer token (401/403): skipped until its address file changes.

A 500 says only that this request's scoring failed on that replica: the request goes to another
one, the replica stays usable. The scorer is *down* for a client (an outage) when no replica is
*alive*: none is known, or every one is suspect or rejected; busy replicas are alive.

With discovery (``sources``: address files and directories, see :mod:`alignment.scoring.address`)
the sources are read again at most every ``refresh_interval`` seconds, and whenever no replica is
usable: new addresses are probed and added, replicas whose file is gone are dropped (requests in
flight finish), and a file whose URL does not answer (a SIGKILLed replica leaves its file behind)
is ignored with one log line per file.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from alignment.scoring.address import ScorerAddress, read_addresses

logger = logging.getLogger("alignment.scoring.client")

FORCED_REFRESH_GAP = 0.2  # s: threads that all found nothing usable share one re-read of the sources


@dataclass
class Replica:
    """One scorer replica and what this client has seen of it."""

    address: ScorerAddress
    outstanding: int = 0
    answered: int = 0
    items: int = 0
    failures: int = 0
    # when it was last picked: ties of outstanding go round robin, from a random start, so that many
    # independent clients (trainer ranks) do not all pick the same replica first
    picked: float = field(default_factory=lambda: -random.random())
    suspect: str | None = None
    cool_until: float = 0.0
    rejected: str | None = None
    last_error: str | None = None

    @property
    def url(self) -> str:
        return self.address.url

    def usable(self, now: float) -> bool:
        return self.suspect is None and self.rejected is None and now >= self.cool_until

    def state(self, now: float) -> str:
        if self.rejected:
            return f"rejected the token ({self.rejected})"
        if self.suspect:
            return self.suspect
        if now < self.cool_until:
            return f"{self.last_error} (resting {self.cool_until - now:.1f}s)"
        return "usable"


def probe(http: httpx.Client, url: str, timeout: float) -> str | None:
    """None when ``url`` answers ``GET /health`` healthy, else what was seen (no token needed)."""
    try:
        response = http.get(f"{url}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    try:
        body = response.json()
        status, why = body.get("status"), body.get("error")
    except (ValueError, AttributeError):
        status = why = None
    if response.status_code == 200 and status == "healthy":
        return None
    return f"HTTP {response.status_code} from {url}/health" + (f" ({why or status})" if why or status else "")


class Outage:
    """Client-wide: when no replica could serve, since when, and the two log lines it is worth.

    One warning when the first request finds no usable replica, one when a request succeeds again;
    the retries in between log nothing above DEBUG, however many requests wait.
    """

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._since: float | None = None

    def elapsed(self, problem: str) -> float:
        """Seconds this outage has lasted (it starts now if none is under way)."""
        with self._lock:
            now = time.monotonic()
            if self._since is None:
                self._since = now
                logger.warning("scorer unavailable: %s; retrying for up to %.0fs (retry budget)", problem,
                               self.budget)  # fmt: skip
            return now - self._since

    def over(self, url: str) -> None:
        with self._lock:
            if self._since is None:
                return
            lasted, self._since = time.monotonic() - self._since, None
        logger.warning("scorer available again at %s after %.1fs", url, lasted)


class ReplicaPool:
    """Thread-safe set of replicas: fixed ``urls``, or discovered from ``sources``.

    ``token``: sent to every replica when given; else each discovered replica gets the token of its
    own address file (and a replica given by URL none).
    """

    def __init__(
        self,
        http: httpx.Client,
        urls: list[str] | None = None,
        sources: list[Path] | None = None,
        token: str | None = None,
        refresh_interval: float = 5.0,
        probe_timeout: float = 5.0,
        cooldown: float = 1.0,
    ) -> None:
        if (urls is None) == (sources is None):
            raise ValueError("give either urls or sources")
        self.http, self.sources, self.token = http, sources, token
        self.refresh_interval, self.probe_timeout, self.cooldown = refresh_interval, probe_timeout, cooldown
        self._replicas: dict[str, Replica] = {}
        self._left: dict[str, Replica] = {}  # dropped replicas, for the spread report
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._last_refresh = -math.inf
        self._notes: list[str] = []
        self._ignored: set[tuple[str, int | None]] = set()
        self._seq = 0
        for url in urls or []:
            self._replicas[url] = Replica(ScorerAddress(url, token))

    @property
    def discovering(self) -> bool:
        return self.sources is not None

    def token_for(self, replica: Replica) -> str | None:
        return self.token or replica.address.token

    def urls(self) -> list[str]:
        with self._lock:
            return list(self._replicas)

    # -- choosing --------------------------------------------------------------------------
    def acquire(self, exclude: set[str]) -> Replica | None:
        """The usable replica not in ``exclude`` with the fewest outstanding requests (counted as
        one more until :meth:`release`); None when there is none."""
        self.refresh()
        with self._lock:
            now = time.monotonic()
            choices = [r for r in self._replicas.values() if r.usable(now) and r.url not in exclude]
            if not choices:
                return None
            best = min(choices, key=lambda r: (r.outstanding, r.picked))
            self._seq += 1
            best.outstanding += 1
            best.picked = self._seq
            return best

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.outstanding -= 1

    # -- what happened ---------------------------------------------------------------------
    def succeeded(self, replica: Replica, items: int) -> None:
        with self._lock:
            replica.answered += 1
            replica.items += items

    def failed(self, replica: Replica, why: str, kind: str, retry_after: float | None = None) -> None:
        """A request to ``replica`` failed. ``kind``: ``"down"`` (transport error, the service
        unwell) makes it suspect, ``"busy"`` rests it for ``retry_after`` (else ``cooldown``)
        seconds, ``"request"`` (a 500: this request's scoring failed) only counts."""
        with self._lock:
            now = time.monotonic()
            replica.failures += 1
            replica.last_error = why
            newly = False
            if kind == "down":
                newly = replica.suspect is None
                replica.suspect = why
            elif kind == "busy":
                replica.cool_until = max(replica.cool_until, now + (retry_after or self.cooldown))
            others = sum(r.usable(now) for r in self._replicas.values())
        if newly and others:  # with none left, the client's outage warning says it once
            logger.warning("scorer %s failed (%s); its requests go to the other %d", replica.url, why, others)

    def reject(self, replica: Replica, why: str) -> None:
        """``replica`` refused our token: not ours (another job's scorer) or a token given by hand."""
        with self._lock:
            newly, replica.rejected = replica.rejected is None, why
            replica.failures += 1
        if not newly:  # requests that were in flight together: said once
            return
        where = f" (address file {replica.address.source})" if replica.address.source else ""
        logger.error("scorer %s rejected the bearer token: %s%s; skipping it", replica.url, why, where)

    def alive(self) -> bool:
        """Whether some replica is neither suspect nor rejected (busy ones count)."""
        with self._lock:
            return any(r.suspect is None and r.rejected is None for r in self._replicas.values())

    def all_rejected(self) -> bool:
        with self._lock:
            return bool(self._replicas) and all(r.rejected for r in self._replicas.values())

    def rest_left(self) -> float:
        """Seconds until the first resting (5xx) replica may be tried again; 0 when none rests."""
        with self._lock:
            now = time.monotonic()
            waits = [r.cool_until - now for r in self._replicas.values() if r.cool_until > now]
        return min(waits, default=0.0)

    def problem(self) -> str:
        """Why no replica is usable: each one's state, or what discovery found."""
        with self._lock:
            now = time.monotonic()
            states = [f"{r.url}: {r.state(now)}" for r in self._replicas.values()]
            notes = list(self._notes)
        if states:
            return "; ".join(states)
        where = ", ".join(str(s) for s in self.sources or [])
        seen = f" ({'; '.join(notes)})" if notes else ""
        return (
            f"no scorer address in {where}{seen}: start the scorer first (it writes its address file "
            "once it listens), or pass the scorer URL explicitly"
        )

    def spread(self) -> dict[str, dict[str, int]]:
        """Per replica URL: requests answered, items scored, failures, requests in flight."""
        with self._lock:
            every = {**self._left, **self._replicas}
            return {url: {"requests": r.answered, "items": r.items, "failures": r.failures,
                          "outstanding": r.outstanding} for url, r in every.items()}  # fmt: skip

    # -- discovery -------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Re-read the sources and probe new and suspect replicas: in the background when
        ``refresh_interval`` seconds have passed (a request never waits for a slow probe), or now
        with ``force`` (threads forcing together share one refresh)."""
        if force:
            with self._refresh_lock:
                if time.monotonic() - self._last_refresh >= FORCED_REFRESH_GAP:
                    self._refresh_now()
            return
        if time.monotonic() - self._last_refresh < self.refresh_interval:
            return
        if self._refresh_lock.acquire(blocking=False):  # released by the background thread
            threading.Thread(target=self._refresh_in_background, name="scorer-discovery", daemon=True).start()

    def _refresh_in_background(self) -> None:
        try:
            self._refresh_now()
        except Exception as exc:  # e.g. the client was closed meanwhile: the next refresh retries
            logger.debug("scorer discovery failed: %s", exc)
        finally:
            self._refresh_lock.release()

    def _refresh_now(self) -> None:
        try:
            self._refresh()
        finally:
            self._last_refresh = time.monotonic()

    def _refresh(self) -> None:
        if self.sources is not None:
            addresses, notes = read_addresses(self.sources)
            listed = {a.url: a for a in addresses}
            with self._lock:
                self._notes = notes
                for url in [u for u in self._replicas if u not in listed]:
                    self._left[url] = self._replicas.pop(url)
                    logger.info("scorer %s left: its address file is gone", url)
        else:
            with self._lock:
                listed = {url: r.address for url, r in self._replicas.items()}
        with self._lock:
            todo = [
                a for url, a in listed.items()
                if url not in self._replicas or self._replicas[url].suspect or self._replicas[url].address != a
            ]  # fmt: skip
        if not todo:
            return
        with ThreadPoolExecutor(min(8, len(todo))) as pool:
            seen = list(pool.map(lambda a: probe(self.http, a.url, self.probe_timeout), todo))
        for address, problem in zip(todo, seen, strict=True):
            self._update(address, problem)

    def _update(self, address: ScorerAddress, problem: str | None) -> None:
        with self._lock:
            known = self._replicas.get(address.url)
            if problem is not None:
                if known is not None:
                    known.suspect = known.suspect or problem
                    return
                key = (address.url, address.pid)
                fresh = key not in self._ignored
                self._ignored.add(key)
            elif known is None:
                self._replicas[address.url] = self._left.pop(address.url, None) or Replica(address)
                self._replicas[address.url].address = address
                self._replicas[address.url].suspect = None
                self._replicas[address.url].rejected = None
                message: tuple[Any, ...] = ("scorer %s joined (address file %s)", address.url, address.source)
            else:
                was = known.suspect
                if known.address != address:
                    known.rejected = None  # restarted or re-tokened: give it another chance
                known.address, known.suspect = address, None
                message = ("scorer %s is back", address.url) if was else ()
        if problem is not None:
            if fresh:
                logger.warning(
                    "ignoring scorer address file %s: %s does not answer (%s); a replica that died leaves "
                    "its file behind (written by pid %s on %s)",
                    address.source, address.url, problem, address.pid, address.hostname,
                )  # fmt: skip
            return
        if message:
            logger.info(*message)
