"""Prometheus metrics of the scorer service (one registry per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from alignment.scoring.batcher import BatchStats

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ScorerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "scorer_requests",
            "HTTP requests by status; 499: the client hung up first",
            ["route", "status"],
            registry=r,
        )
        self.items = Counter("scorer_items", "texts scored", registry=r)
        self.truncated = Counter("scorer_truncated_items", "texts truncated to --max-length", registry=r)
        self.dropped = Counter(
            "scorer_dropped_items", "texts of callers that went away, dropped before scoring", registry=r
        )
        self.forward_tokens = Counter(
            "scorer_forward_tokens",
            "tokens through the models, by kind (real or padding)",
            ["kind"],
            registry=r,
        )
        self.merged_batch_size = Histogram(
            "scorer_merged_batch_items",
            "texts per step of the scheduler (one forward pass of each model over the requests merged in it)",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.requests_per_batch = Histogram(
            "scorer_requests_per_batch",
            "requests whose first texts a step scores (the sum counts each request once)",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.forward_batch_size = Histogram(
            "scorer_forward_batch_rows", "rows per model forward pass", buckets=_SIZE_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "scorer_queue_wait_seconds",
            "time a request waited before its batch started",
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.forward_time = Histogram(
            "scorer_forward_seconds",
            "model time per step (both models)",
            buckets=_TIME_BUCKETS,
            registry=r,
        )

    def observe_batch(self, n_items: int, waits: list[float]) -> None:
        self.merged_batch_size.observe(n_items)
        self.requests_per_batch.observe(len(waits))
        for w in waits:
            self.queue_wait.observe(w)

    def observe_forward(self, stats: BatchStats) -> None:
        for n in stats.forward_batch_sizes:
            self.forward_batch_size.observe(n)
        self.forward_time.observe(stats.forward_seconds)
        self.forward_tokens.labels(kind="real").inc(stats.real_tokens)
        self.forward_tokens.labels(kind="padding").inc(stats.padded_tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_ROUTES = ("/health", "/score", "/score_texts", "/metrics")


class RequestCounter:
    """Pure ASGI middleware counting responses by route and status (cheaper than BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, metrics: ScorerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in _ROUTES else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route=route, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
