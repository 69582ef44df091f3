"""A real OpenAI-compatible chat-completions server on 127.0.0.1, with a rule playing the judge.

It stands in for the black box in the default task, the tests and soak runs: each request can be scripted
(:class:`Behaviour`) for fault injection, and every request is recorded.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from cyclealign_pl.serve.replies import NO_RESPONSES, Rule, rule_reply


def count_tokens(text: str) -> int:
    """A stand-in tokenizer for usage figures: one token per 4 characters, rounded up."""
    return math.ceil(len(text) / 4)


@dataclass(frozen=True)
class Behaviour:
    """How the server answers one request. Build with the class methods."""

    kind: Literal["rank", "reply", "status", "hang", "garbage", "drop"] = "rank"
    text: str | None = None
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    delay: float = 0.0  # extra latency before this answer, on top of the server's delay

    @classmethod
    def rank(cls, delay: float = 0.0) -> Behaviour:
        """The rule's answer."""
        return cls("rank", delay=delay)

    @classmethod
    def reply(cls, text: str, delay: float = 0.0) -> Behaviour:
        """A 200 reply whose message content is ``text``."""
        return cls("reply", text=text, delay=delay)

    @classmethod
    def error(
        cls,
        status: int,
        retry_after: float | str | None = None,
        retry_after_ms: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Behaviour:
        """An HTTP error with an OpenAI-style error body and optional Retry-After / retry-after-ms headers."""
        extra = dict(headers or {})
        if retry_after is not None:
            extra["Retry-After"] = str(retry_after)
        if retry_after_ms is not None:
            extra["retry-after-ms"] = str(retry_after_ms)
        return cls("status", status=status, headers=tuple(extra.items()))

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Behaviour:
        """Read the request, send nothing for ``seconds`` (or until the server stops), then close."""
        return cls("hang", seconds=seconds)

    @classmethod
    def garbage(cls) -> Behaviour:
        """A 200 response whose body is not JSON."""
        return cls("garbage")

    @classmethod
    def drop(cls) -> Behaviour:
        """Close the connection without any response."""
        return cls("drop")


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the server saw it; ``time`` is ``time.monotonic()`` at arrival."""

    index: int
    time: float
    path: str
    headers: dict[str, str]
    body: Any
    behaviour: str = field(default="rank")
    status: int = 200  # the HTTP status sent (0: none, for a hang or a dropped connection)


class LocalOpenAIServer:
    """An OpenAI-compatible HTTP server in a background thread.

    ``POST /v1/chat/completions`` answers with ``chat.completion`` JSON (with ``usage``); ``GET /v1/models``
    lists ``model``. A request gets the next queued :class:`Behaviour`, else ``responder``'s, else a failure
    drawn at ``failure_rate``, else the rule's reply.

    Args:
        host, port: where to listen (port 0: an ephemeral port; read :attr:`url`).
        delay: seconds to wait before every answer (simulates the black box's latency).
        failure_rate: probability that a request (not scripted otherwise) gets ``failure`` instead.
        failure: the behaviour used by ``failure_rate`` (default: HTTP 500), or several: each failing request
            gets one of them at random (see :func:`failure_mix`).
        seed: seeds the failure draws, so a run is reproducible.
        model: the model name reported back, and listed by ``GET /v1/models`` (any name is answered).
        rule: answers what is not scripted otherwise (None: no rule; every answer holds no ranking).
        responder: ``f(index, body) -> Behaviour | None`` consulted after the queue (None: fall through).
        api_key: when set, every request must carry ``Authorization: Bearer <api_key>`` or gets a 401 (as
            vLLM's ``--api-key``); None: any key is accepted.
        models_route: serve ``GET /v1/models``; False answers it with 404, like servers without that route.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        delay: float = 0.0,
        failure_rate: float = 0.0,
        failure: Behaviour | Sequence[Behaviour] | None = None,
        seed: int = 0,
        model: str = "local-ranker",
        rule: Rule | None = None,
        responder: Callable[[int, Any], Behaviour | None] | None = None,
        api_key: str | None = None,
        models_route: bool = True,
    ) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in [0, 1], got {failure_rate}")
        self.host, self.port = host, port
        self.delay = delay
        self.failure_rate = failure_rate
        failures = (failure,) if isinstance(failure, Behaviour) else tuple(failure or (Behaviour.error(500),))
        if not failures:
            raise ValueError("failure must name at least one behaviour")
        self.failures = failures
        self.model = model
        self.rule = rule
        self.responder = responder
        self.api_key = api_key
        self.models_route = models_route
        self._rng = random.Random(seed)
        self._queue: deque[Behaviour] = deque()
        self._requests: list[RecordedRequest] = []
        self._count = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------------------- control

    @property
    def url(self) -> str:
        """The base URL to give a client (``http://127.0.0.1:PORT/v1``)."""
        if self._httpd is None:
            raise RuntimeError("the server is not running; call start() or use it as a context manager")
        return f"http://{self.host}:{self._httpd.server_address[1]}/v1"

    def start(self) -> LocalOpenAIServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        handler = type("Handler", (_Handler,), {"server_owner": self})
        httpd = _HTTPServer((self.host, self.port), handler)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalOpenAIServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (later connections are refused) and release hung handlers."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> LocalOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def enqueue(self, *behaviours: Behaviour) -> None:
        """Script the next requests, one behaviour each, in arrival order."""
        with self._lock:
            self._queue.extend(behaviours)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every chat-completions request received so far, in arrival order."""
        with self._lock:
            return sorted(self._requests, key=lambda r: r.index)

    def clear(self) -> None:
        """Forget recorded requests and queued behaviours."""
        with self._lock:
            self._requests.clear()
            self._queue.clear()

    # ---------------------------------------------------------------------------------------- answering

    def authorised(self, headers: Mapping[str, str]) -> bool:
        """Whether a request with these (lower-cased) headers carries the key, when one is required."""
        return self.api_key is None or headers.get("authorization") == f"Bearer {self.api_key}"

    def _record(self, path: str, headers: dict[str, str], body: Any) -> Behaviour:
        arrived = time.monotonic()
        refused = None if self.authorised(headers) else Behaviour.error(401)
        with self._lock:
            index = self._count
            self._count += 1
            behaviour = refused or (self._queue.popleft() if self._queue else None)
        if behaviour is None and self.responder is not None:
            behaviour = self.responder(index, body)  # outside the lock: a responder may block
        if behaviour is None:
            with self._lock:
                failed = self._rng.random() < self.failure_rate
                if not failed:
                    behaviour = Behaviour.rank()
                else:  # one behaviour: no extra draw, so seeded runs fail where they always did
                    single = len(self.failures) == 1
                    behaviour = self.failures[0] if single else self._rng.choice(self.failures)
        status = 0 if behaviour.kind in ("hang", "drop") else behaviour.status
        with self._lock:
            record = RecordedRequest(index, arrived, path, headers, body, behaviour.kind, status)
            self._requests.append(record)
        return behaviour

    def completion(self, body: Any, text: str) -> dict[str, Any]:
        """A ``chat.completion`` object answering ``body`` with ``text``."""
        messages = body.get("messages", []) if isinstance(body, dict) else []
        prompt_tokens = sum(count_tokens(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
        completion_tokens = count_tokens(text)
        return {
            "id": f"chatcmpl-local-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model) if isinstance(body, dict) else self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def rule_answer(self, body: Any) -> str:
        """The rule's reply to one request body (:func:`~cyclealign_pl.serve.replies.rule_reply`)."""
        return NO_RESPONSES if self.rule is None else rule_reply(body, self.rule)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # hung handlers must not block stop()
    request_queue_size = 128  # many concurrent clients connect at once


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_owner: LocalOpenAIServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send_json(self, status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        owner = self.server_owner
        if not owner.authorised({k.lower(): v for k, v in self.headers.items()}):
            self._send_json(401, {"error": {"message": "invalid API key", "type": "invalid_request_error"}})
        elif self.path.rstrip("/").endswith("/models") and owner.models_route:
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [{"id": owner.model, "object": "model", "owned_by": "cyclealign-pl"}],
                },
            )
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        owner = self.server_owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        try:
            body: Any = json.loads(raw or b"null")
        except json.JSONDecodeError:
            body = None
        headers = {k.lower(): v for k, v in self.headers.items()}
        behaviour = owner._record(self.path, headers, body)
        try:
            self._answer(owner, behaviour, body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): nothing to do
            self.close_connection = True

    def _answer(self, owner: LocalOpenAIServer, behaviour: Behaviour, body: Any) -> None:
        if behaviour.kind == "hang":
            owner._stopping.wait(behaviour.seconds)
            self.close_connection = True
            return
        delay = owner.delay + behaviour.delay
        if delay > 0 and owner._stopping.wait(delay):
            self.close_connection = True
            return
        if behaviour.kind == "drop":
            self.close_connection = True
            return
        if behaviour.kind == "status":
            payload = {
                "error": {
                    "message": f"scripted HTTP {behaviour.status}",
                    "type": "scripted_error",
                    "code": str(behaviour.status),
                }
            }
            self._send_json(behaviour.status, payload, behaviour.headers)
            return
        if behaviour.kind == "garbage":
            data = b"<html>this is not JSON"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            error = {"message": "body must be JSON with 'messages'", "type": "invalid_request_error"}
            self._send_json(400, {"error": error})
            return
        scripted = behaviour.kind == "reply" and behaviour.text is not None
        text = behaviour.text if scripted else owner.rule_answer(body)
        self._send_json(200, owner.completion(body, text), behaviour.headers)


# the names of the failures a server can be scripted with (``--failure-kinds``, :func:`failure_mix`)
SCRIPTED_FAILURES: tuple[str, ...] = ("429", "500", "timeout", "garbage", "drop")


def failure_mix(
    kinds: Iterable[str] = SCRIPTED_FAILURES, hang_seconds: float = 30.0
) -> tuple[Behaviour, ...]:
    """Failure behaviours by name: ``429``/``500`` (HTTP errors), ``timeout`` (no answer for
    ``hang_seconds``), ``garbage`` (a 200 whose body is not JSON), ``drop`` (the connection closed without a
    response)."""
    table = {
        "429": Behaviour.error(429),
        "500": Behaviour.error(500),
        "timeout": Behaviour.hang(hang_seconds),
        "garbage": Behaviour.garbage(),
        "drop": Behaviour.drop(),
    }
    unknown = [k for k in kinds if k not in table]
    if unknown:
        raise ValueError(f"unknown failure kind(s) {unknown}; choose from {', '.join(SCRIPTED_FAILURES)}")
    return tuple(table[k] for k in kinds)


__all__ = [
    "SCRIPTED_FAILURES",
    "Behaviour",
    "LocalOpenAIServer",
    "RecordedRequest",
    "count_tokens",
    "failure_mix",
]
