"""A small OpenAI-compatible judge server for tests: real HTTP on 127.0.0.1 (uvicorn in a thread).

``POST /v1/chat/completions`` answers with the real chat-completion schema. The verdict is
deterministic: each answer scores ``len(answer) / 10`` (so longer wins, and answers within 5
characters tie under the 0.5 threshold). An answer containing ``GARBLE`` gets a reply without any
``[[s1, s2]]``. Failures can be injected (the first N requests, or every request after N), and
every request is recorded so tests can count what reached the server.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

_ANSWER = re.compile(
    r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S
)


def verdict_scores(answer_a: str, answer_b: str) -> tuple[float, float]:
    """The scores this server gives: answer length / 10."""
    return len(answer_a) / 10, len(answer_b) / 10


@dataclass
class Behaviour:
    """Failure injection: ``fail_first`` requests answer ``fail_status`` (retryable ones, e.g. 429
    or 500); once ``fail_after`` requests were answered well, every later one answers
    ``permanent_status``. ``api_key``: when set, other bearer tokens get 401."""

    fail_first: int = 0
    fail_status: int = 429
    fail_after: int | None = None
    permanent_status: int = 401
    api_key: str | None = None


@dataclass
class Recorded:
    """One request as the server saw it."""

    time: float
    status: int
    body: dict[str, Any]
    authorization: str | None


@dataclass
class JudgeServer:
    """Start with ``with JudgeServer(Behaviour(...)) as server:``; ``server.url`` is the base URL."""

    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ok = 0
        app = FastAPI()
        app.post("/v1/chat/completions")(self._complete)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        # log_config=None: uvicorn's dictConfig would shut down every existing logging handler, and
        # absl's (imported with rouge-score) then closes the stream it was created with: pytest's
        # capture file, which crashes the whole test session.
        config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def count(self, status: int | None = None) -> int:
        """Requests received (with that status, when given)."""
        with self._lock:
            return sum(1 for r in self.requests if status is None or r.status == status)

    def _status_for(self, authorization: str | None) -> int:
        b = self.behaviour
        with self._lock:
            seen = len(self.requests)
            if b.api_key is not None and authorization != f"Bearer {b.api_key}":
                return 401
            if seen < b.fail_first:
                return b.fail_status
            if b.fail_after is not None and self._ok >= b.fail_after:
                return b.permanent_status
            self._ok += 1
            return 200

    async def _complete(self, request: Request) -> JSONResponse:
        body = await request.json()
        authorization = request.headers.get("authorization")
        status = self._status_for(authorization)
        with self._lock:
            self.requests.append(Recorded(time.monotonic(), status, body, authorization))
        if status != 200:
            error = {"error": {"message": f"injected {status}", "type": "test", "param": None, "code": None}}
            return JSONResponse(error, status_code=status, headers={"retry-after-ms": "1"})
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        answers = dict(_ANSWER.findall(user))
        if "GARBLE" in answers["A"] or "GARBLE" in answers["B"]:
            text = "Both answers are hard to compare. Assistant A: 5, Assistant B: 5."
        else:
            a, b = verdict_scores(answers["A"], answers["B"])
            text = f"Comparative analysis: the longer answer is better here.\n\n[[{a}, {b}]]"
        return JSONResponse({
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": len(user.split()), "completion_tokens": len(text.split()),
                      "total_tokens": len(user.split()) + len(text.split())},
        })  # fmt: skip

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test judge server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
