"""HTTP scorer service: hosts a Beaver reward model and cost model and scores (prompt, response) pairs.

    python -m alignment.scoring.scorer_service --reward-model PATH --cost-model PATH [--port 0]
    python -m alignment.scoring.scorer_service ... --replicas 4     # one replica per GPU of this node

Routes (see ARCHITECTURE.md): ``GET /health``, ``POST /score``, ``POST /score_texts``, ``GET /metrics``.
Each request's body is parsed within bounds (:mod:`~alignment.scoring.body`), tokenised in slices
that take turns with other requests' (:class:`~alignment.scoring.encoder_pool.EncoderPool`) and
queued slice by slice; :class:`~alignment.scoring.scheduler.BatchScheduler` merges the queued work
of all callers into length-sorted, token-budgeted forward passes. Once the
models are loaded and the socket listens, the service writes its reachable address (and bearer
token, if any) to the address file, which :class:`~alignment.scoring.client.ScorerClient` reads when
given ``url="auto"``: by default a file of its own in ``logs/scorers/`` (``--address-dir``), so
that clients find every replica. Listening beyond loopback without ``--token`` generates a token.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import secrets
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as `python alignment/scoring/scorer_service.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignment import cli
from alignment.conversation import scoring_text
from alignment.scoring import heap
from alignment.scoring.address import publish_path, remove_address_file, write_address_file
from alignment.scoring.batcher import BatchStats, Encoded, RewardCostScorer, TextEncodingError, plan_forwards
from alignment.scoring.body import max_values_for, parse_request
from alignment.scoring.encoder_pool import EncoderPool
from alignment.scoring.gate import ClientGone, ErrorBarrier, RequestGate, unless_disconnected
from alignment.scoring.limits import ApiError, RequestLimits, check_texts
from alignment.scoring.metrics import RequestCounter, ScorerMetrics
from alignment.scoring.scheduler import BatchScheduler, QueueFull, SchedulerStopped
from alignment.scoring.schema import (
    HEALTH_RESPONSES,
    PROTECTED,
    ROUTES,
    HealthBody,
    ScoreRequest,
    ScoreResponse,
    ScoreTextsRequest,
    install_openapi,
    metrics_responses,
    request_body,
    score_responses,
)
from alignment.scoring.score_model import ScoreModelLoadError, load_score_model
from alignment.scoring.server import (
    ScorerServer,
    bind,
    default_max_connections,
    guarded_protocol,
    is_loopback,
    repeat_filter,
)
from alignment.scoring.settings import ServiceSettings, parse_args

logger = logging.getLogger("alignment.scoring.service")


# Bodies this big are parsed in a worker thread (not on the event loop), and the heap is trimmed
# once the request's intermediates are gone (alignment.scoring.heap).
BIG_BODY_BYTES = 1 << 20
HANG_UP = 499  # nginx's "client closed request": answered to nobody, counted apart in /metrics


class _Templated(Sequence[str]):
    """``scoring_text(prompts[i], responses[i], eos)``, made when asked for (a slice at a time)."""

    def __init__(self, prompts: list[str], responses: list[str], eos: str) -> None:
        self.prompts, self.responses, self.eos = prompts, responses, eos

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return scoring_text(self.prompts[index], self.responses[index], self.eos)


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: object) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, **extra}, headers=headers)


def create_app(scorer: RewardCostScorer, settings: ServiceSettings, device: str = "cpu") -> FastAPI:
    """The FastAPI application around a loaded :class:`RewardCostScorer`."""
    metrics = ScorerMetrics()
    limits = RequestLimits(settings.max_items, settings.max_text_chars)
    token = settings.token
    encoder = EncoderPool(scorer.encode_texts, threads=settings.tokenizer_threads)

    def score_step(items: list[Encoded]) -> list[tuple[float, float]]:
        stats = BatchStats()
        out = scorer.score_encoded(items, stats)
        metrics.observe_forward(stats)
        return out

    scheduler = BatchScheduler(
        score_step,
        max_rows=settings.max_batch_size,
        max_tokens=scorer.max_batch_tokens,
        plan=lambda lengths: plan_forwards(
            lengths, scorer.max_batch_size, scorer.max_batch_tokens, scorer.max_padding
        ),
        max_wait_s=settings.max_wait_ms / 1000.0,
        merge=settings.batching,
        max_queue_items=settings.max_queue_items,
        on_step=metrics.observe_batch,
        on_drop=metrics.dropped.inc,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await scheduler.start()
        try:
            yield
        finally:
            await scheduler.stop()
            encoder.shutdown()

    app = FastAPI(title="Beaver reward/cost scorer", version="1.0", lifespan=lifespan)
    install_openapi(app, token is not None, settings.max_items, settings.max_text_chars)
    app.add_middleware(
        RequestGate,
        routes=ROUTES,
        protected=PROTECTED,
        token=token,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout,
    )
    app.add_middleware(ErrorBarrier)
    app.add_middleware(RequestCounter, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                reason = (err.get("ctx") or {}).get("error", "invalid JSON")
                problems.append({"field": "body", "message": f"not valid JSON ({reason})"})
                continue
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            if where == "body" and err.get("type") == "missing":
                problems.append({"field": "body", "message": "empty; expected a JSON object"})
                continue
            problems.append({"field": where, "message": str(err.get("msg", "invalid"))})
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
        return _error(422, f"invalid request body: {summary}", detail=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if "parsing the body" in message:
            message = "request body could not be parsed: it must be UTF-8 encoded JSON"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    def parse(body: bytearray, content_type: str | None, model: type[ScoreRequest] | type[ScoreTextsRequest]):
        """The parsed, validated and limit-checked body: (texts, name of item i). Empties ``body``."""
        try:
            req = parse_request(body, content_type, model, max_values_for(model, settings.max_items))
        finally:
            body.clear()  # also when it was refused before being decoded
        if isinstance(req, ScoreRequest):
            if len(req.prompts) != len(req.responses):
                raise ApiError(
                    422, f"prompts and responses differ in length: {len(req.prompts)} != {len(req.responses)}"
                )
            check_texts(limits, "prompts", req.prompts)
            check_texts(limits, "responses", req.responses)
            texts: Sequence[str] = _Templated(req.prompts, req.responses, scorer.eos_token)
            return texts, lambda i: f"prompts[{i}]/responses[{i}]"
        check_texts(limits, "texts", req.texts)
        return req.texts, lambda i: f"texts[{i}]"

    async def score_all(texts: Sequence[str], truncated: list[int], big: bool) -> list[tuple[float, float]]:
        async def parts() -> AsyncIterator[tuple[list[Encoded], list[int]]]:
            async for offset, items in encoder.parts(texts):
                truncated.extend(offset + i for i, it in enumerate(items) if it.truncated)
                yield items, [it.length for it in items]
            if big:  # the body, its text and the request's strings are gone: give the memory back
                await asyncio.get_running_loop().run_in_executor(None, heap.release)

        return await scheduler.submit_parts(len(texts), parts())

    async def handle(request: Request, model: type[ScoreRequest] | type[ScoreTextsRequest]):
        body = bytearray()
        async for chunk in request.stream():  # the gate's one bytearray (or nothing)
            body = chunk if isinstance(chunk, bytearray) and not body else body + chunk
            del chunk
        big = len(body) >= BIG_BODY_BYTES
        loop = asyncio.get_running_loop()
        try:
            content_type = request.headers.get("content-type")
            if big:
                texts, name = await loop.run_in_executor(None, parse, body, content_type, model)
            else:
                texts, name = parse(body, content_type, model)
            del body  # emptied by parse; dropped here
            if not len(texts):
                return ScoreResponse(rewards=[], costs=[], truncated=[])
            n, truncated = len(texts), []
            work = score_all(texts, truncated, big)
            del texts  # the tokenising slices hold them until the last slice is done
            try:
                results = await unless_disconnected(request, work)
            except ClientGone:
                return Response(status_code=HANG_UP)  # nobody reads it; counted apart in /metrics
            except TextEncodingError as exc:
                raise ApiError(422, f"{name(exc.index)} cannot be tokenised: {exc.reason}") from None
            except QueueFull as exc:
                raise ApiError(503, f"{exc}; retry later", {"Retry-After": str(exc.retry_after)}) from None
            except SchedulerStopped as exc:
                raise ApiError(503, f"the scorer cannot score: {exc}") from None
            except Exception as exc:  # this request's own failure (the scheduler isolated it)
                raise ApiError(500, f"scoring failed: {type(exc).__name__}: {exc}") from None
        except (ApiError, RequestValidationError):
            if big:  # a big body that was refused: it and its parse are gone too
                await loop.run_in_executor(None, heap.release)
            raise
        bad = [i for i, (r, c) in enumerate(results) if not (math.isfinite(r) and math.isfinite(c))]
        if bad:
            raise ApiError(500, f"the models produced non-finite scores for items {bad[:10]}")
        metrics.items.inc(n)
        metrics.truncated.inc(len(truncated))
        return ScoreResponse(
            rewards=[r for r, _ in results], costs=[c for _, c in results], truncated=sorted(truncated)
        )

    @app.get("/health", response_model=HealthBody, responses=HEALTH_RESPONSES)
    async def health() -> JSONResponse:
        body = HealthBody(
            status="healthy" if scheduler.alive else "unhealthy",
            device=device,
            reward_model=scorer.reward.name,
            cost_model=scorer.cost.name,
            max_length=scorer.max_length,
            max_batch_size=scorer.max_batch_size,
            max_batch_tokens=scorer.max_batch_tokens,
            batching=settings.batching,
            auth=token is not None,
            queued_items=scheduler.queued_items,
            error=scheduler.error,
        )
        return JSONResponse(status_code=200 if scheduler.alive else 503, content=body.model_dump())

    auth = token is not None

    @app.post(
        "/score",
        response_model=ScoreResponse,
        responses=score_responses(auth),
        openapi_extra=request_body(ScoreRequest),
    )
    async def score(request: Request):
        return await handle(request, ScoreRequest)

    @app.post(
        "/score_texts",
        response_model=ScoreResponse,
        responses=score_responses(auth),
        openapi_extra=request_body(ScoreTextsRequest),
    )
    async def score_texts(request: Request):
        return await handle(request, ScoreTextsRequest)

    @app.get("/metrics", response_class=Response, responses=metrics_responses(auth))
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    app.state.metrics, app.state.scheduler = metrics, scheduler
    return app


def resolve_token(settings: ServiceSettings) -> tuple[str | None, str]:
    """The token to require, and a sentence saying where it came from (for the log)."""
    if settings.token:
        return settings.token, "bearer token required (--token / $SCORER_TOKEN)"
    if settings.insecure_no_token:
        return None, "WARNING: no bearer token (--insecure-no-token): anyone who reaches the port can score"
    if is_loopback(settings.host):
        return None, f"no bearer token: listening on loopback {settings.host} only"
    token = secrets.token_urlsafe(32)
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:12]  # to tell tokens apart, not a secret
    return token, (
        f"listening on {settings.host} without --token: generated a bearer token (sha256 {fingerprint}...); "
        "it is in the address file (mode 0600), where clients given url='auto' read it"
    )


def serve(settings: ServiceSettings) -> None:
    """Load both models, listen, publish the address, serve until SIGINT/SIGTERM."""
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    settings.token, auth_note = resolve_token(settings)
    reward = load_score_model(settings.reward_model, settings.dtype, settings.device)
    cost = load_score_model(settings.cost_model, settings.dtype, settings.device)
    scorer = RewardCostScorer(
        reward,
        cost,
        settings.max_length,
        settings.max_batch_size,
        settings.max_batch_tokens,
        settings.max_padding,
    )
    app = create_app(scorer, settings, device=str(reward.device))
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    address_file = publish_path(settings.address_file, settings.address_dir, settings.host, port)
    max_connections = settings.max_connections or default_max_connections()
    config = uvicorn.Config(
        app,
        http=guarded_protocol(settings.header_timeout, max_connections),
        log_config=None,  # uvicorn's loggers propagate to ours, through the repeat filter
        access_log=settings.access_log,
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        backlog=min(2048, max_connections),  # accepts per burst: no descriptor storm
    )

    def publish() -> None:
        info = write_address_file(
            address_file, settings.host, port, settings.token, device=str(reward.device)
        )
        logger.info("scorer listening on %s (address file %s)", info["url"], address_file)
        logger.info("%s", auth_note)

    try:
        ScorerServer(config, publish, lambda: remove_address_file(address_file)).run(sockets=[sock])
    finally:
        remove_address_file(address_file)
        sock.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with repeat_filter():
        return _main(list(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    settings = parse_args(argv, prog="scorer_service", description=__doc__)
    if settings.replicas > 1:
        from alignment.scoring.launch import run_replicas

        return run_replicas(argv, settings.replicas, settings)
    shown = {k: ("***" if k == "token" and v else v) for k, v in asdict(settings).items()}
    logger.info("starting scorer with %s (pid %d)", shown, os.getpid())
    serve(settings)
    return 0


if __name__ == "__main__":
    cli.run(main, prog="scorer_service", user_errors=(ScoreModelLoadError,))
