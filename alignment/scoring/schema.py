"""The scorer's wire format: request and response models, and an OpenAPI document that says what the
service really answers (every status, the error body, the bearer scheme, text/plain metrics, the
request limits of this instance).

The scoring routes parse their bodies themselves (:mod:`alignment.scoring.body`, to bound the
memory a body takes), so their request bodies are declared here (:func:`request_body`), not
inferred by FastAPI from the route's signature."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

PROTECTED = frozenset({"/score", "/score_texts", "/metrics"})
ROUTES = {"/health": ("GET",), "/score": ("POST",), "/score_texts": ("POST",), "/metrics": ("GET",)}


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompts: list[str]
    responses: list[str]


class ScoreTextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    texts: list[str]


class ScoreResponse(BaseModel):
    rewards: list[float]
    costs: list[float]
    truncated: list[int]


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer: ``error`` says what was wrong; 422 answers list each problem."""

    error: str
    detail: list[ErrorDetail] | None = None


class HealthBody(BaseModel):
    status: Literal["healthy", "unhealthy"]
    device: str
    reward_model: str
    cost_model: str
    max_length: int
    max_batch_size: int
    max_batch_tokens: int
    batching: bool
    auth: bool
    queued_items: int
    error: str | None = None


def _err(description: str, retry_after: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorBody, "description": description}
    if retry_after:
        out["headers"] = {
            "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
        }
    return out


# Every route's body is read under the gate's limits (alignment.scoring.gate), GETs included: a
# declared Content-Length over --max-body-mb is 413 and a body that does not arrive in time is 408.
_BODY_LIMITS: dict[int | str, dict[str, Any]] = {
    408: _err("a body was announced and did not arrive in time"),
    413: _err("the announced body exceeds this service's limit"),
}
REQUEST_MODELS: tuple[type[BaseModel], ...] = (ScoreRequest, ScoreTextsRequest)


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that parses a ``model`` JSON body itself."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def score_responses(auth: bool) -> dict[int | str, dict[str, Any]]:
    """What ``/score`` and ``/score_texts`` answer besides 200."""
    out: dict[int | str, dict[str, Any]] = {
        400: _err("the body is not UTF-8 encoded JSON"),
        408: _err("the body did not arrive in time"),
        413: _err("the body, the number of items or a text exceeds this service's limits"),
        422: _err("the body is not a valid request (the fields at fault are named)"),
        500: _err("scoring this request failed (other requests are not affected)"),
        503: _err("the queue is full (retry after Retry-After seconds) or the scorer stopped", True),
    }
    if auth:
        out[401] = _err("missing or wrong bearer token")
    return out


def metrics_responses(auth: bool) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **_BODY_LIMITS,
    }
    if auth:
        out[401] = _err("missing or wrong bearer token")
    return out


HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": HealthBody, "description": "the scorer cannot score (its batch loop stopped)"},
    **_BODY_LIMITS,
}


def install_openapi(app: FastAPI, auth: bool, max_items: int, max_text_chars: int) -> None:
    """Make ``app.openapi()`` describe this instance: bearer security and the request limits."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, fields in (("ScoreRequest", ("prompts", "responses")), ("ScoreTextsRequest", ("texts",))):
            for field in fields:
                prop = schemas[name]["properties"][field]
                prop["maxItems"] = max_items
                prop["items"]["maxLength"] = max_text_chars
        if auth:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path in PROTECTED:
                for operation in schema["paths"][path].values():
                    operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
