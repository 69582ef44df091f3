"""One chat-completions call, robustly: bounded time, counted retries, rate limits, a hard budget, a breaker.

Retries are this module's own small loop; the openai client runs with ``max_retries=0``. Reading the client
(openai 3.57, ``_base_client.py``): its backoff starts at a hard-coded 0.5 s with 0-25 % jitter, treats
``Retry-After: 0`` as absent, refuses to retry past 120 s and backs off per request, and its retries are
invisible to the caller. We need configurable backoff, a pause of *all* requests when the server is in trouble
(429, 5xx, connection errors: no retry storm), per-reason failure counts and a retry counter. Like the client,
we honour ``retry-after-ms`` and ``Retry-After`` (seconds or HTTP date) and ``x-should-retry``, and retry
408/409/429/5xx, timeouts and connection errors with exponential backoff (jitter 50-100 %).

What stops instead of failing prompt after prompt (:class:`~cyclealign_pl.judges.base.JudgeUnavailable`, one
line naming the URL): 401/403/404 (a refused key, an unknown model or URL: configuration errors, never
retried), and ``max_consecutive_failures`` transport failures in a row (connection refused, name not resolved,
timeouts: a dead server), the circuit breaker. :meth:`ChatTransport.preflight` finds the same problems within
seconds before any work: ``GET /models`` (free), else one 1-token completion.

How many requests are in flight adapts to what the server sustains (:class:`~.limits.ConcurrencyLimit`, up to
``max_concurrency``): a server that answers one request at a time gets about one at a time, not 16 that queue
until they time out. A request's timeout runs from when it is sent, never while it waits for a slot; and a
timeout while another request of ours got its reply is the server's queue, not a dead server: the circuit
breaker does not count it.

Structured output: a call may carry a JSON schema. It is sent as ``response_format`` in OpenAI's form
(``{"type": "json_schema", ...}``); a server that refuses it (HTTP 400/422) is asked again at once in
llama.cpp's form (``{"type": "json_object", "schema": ...}``), then without it (the caller's parser reads the
text). What the server accepts is remembered, logged once and counted (``structured_output_fallbacks``).

Every await is bounded: an attempt by ``request_timeout`` (wall clock, not just between bytes), a backoff by
``backoff_max_s`` or ``max_retry_after_s``, a rate-limit wait by the rate, a budget wait by the requests in
flight. Each attempt is recorded in the spend ledger before it is sent (:class:`~.limits.BudgetGate`).
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import math
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, NoReturn
from urllib.parse import urlsplit

from cyclealign_pl.judges.base import JudgeStop, JudgeUnavailable
from cyclealign_pl.judges.limits import Budget, BudgetGate, ConcurrencyLimit, Cost, TokenBucket

log = logging.getLogger(__name__)

PLACEHOLDER_KEY = "sk-no-key-required"  # sent to loopback servers when api_key_env is unset
DEFAULT_BASE_URL = "https://api.openai.com/v1"
# What a failed call can be (``ChatReply.kind``); the judge counts them as judge/failures/<kind>.
CALL_FAILURE_KINDS = ("timeout", "connection", "rate_limit", "server_error", "http_error", "bad_response")
# Failures that say the server (not this one request) is in trouble: every request waits out the backoff.
_PAUSE_ALL = frozenset({"rate_limit", "server_error", "connection"})
# Failures that say nothing answered at all: counted by the circuit breaker.
_UNREACHABLE = frozenset({"connection", "timeout"})
_REFUSED = {
    401: "the API key in {env} was refused",
    403: "access is denied to the key in {env}",
    404: "model {model!r} or the URL was not found (check model and base_url)",
}
# How a JSON schema is asked for, strongest first: OpenAI's structured outputs, llama.cpp's JSON mode with a
# schema (llama-cpp-python's server takes only this one), none (the reply's text is parsed).
STRUCTURED_OUTPUT_FORMS = ("json_schema", "json_object", "off")
_SCHEMA_REFUSED = (
    400,
    422,
)  # and any error status whose message names response_format (llama-cpp-python: 500)


class Counters:
    """Cumulative float counters shared by the judge's threads; they pickle (for resume) without the lock."""

    def __init__(self, names: Iterable[str]) -> None:
        self._values = dict.fromkeys(names, 0.0)
        self._lock = threading.Lock()

    def bump(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self._values[name] += value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._values[name] = float(value)

    def maximum(self, name: str, value: float) -> None:
        with self._lock:
            self._values[name] = max(self._values[name], float(value))

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def load(self, values: Mapping[str, float]) -> None:
        with self._lock:
            for name, value in values.items():
                if name in self._values:
                    self._values[name] = float(value)

    def __getstate__(self) -> dict[str, Any]:
        return {"_values": self.snapshot()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._values = dict(state["_values"])
        self._lock = threading.Lock()


@dataclass(frozen=True)
class ChatSettings:
    """How to reach a chat-completions server and how hard to try; checked when built.

    Args:
        model: the model name the server knows.
        base_url: the API root (e.g. ``http://127.0.0.1:8000/v1`` for vLLM); None: ``OPENAI_BASE_URL``, else
            OpenAI.
        api_key_env: the environment variable holding the API key (read at first use, never stored). When it
            is unset and the server is on a loopback address, a placeholder key is sent.
        temperature: sampling temperature of each request.
        max_tokens: the longest reply of each request (None: the server's default).
        request_timeout: hard wall-clock limit of one HTTP attempt, in seconds.
        max_retries: retries per request after the first attempt (429, 408, 409, 5xx, timeouts, connection).
        backoff_initial_s: the first backoff between retries; it doubles (times 0.5-1.0 random jitter).
        backoff_max_s: the longest backoff.
        max_retry_after_s: the longest ``Retry-After`` honoured; a longer one fails the request.
        extra_headers: headers added to every request (never cached; values not shown in ``repr``). A value
            ``"env:NAME"`` is read from the environment variable NAME at first use, for secrets such as
            Azure's ``api-key`` header, which must not be written into a config file.
        max_concurrency: requests in flight at most.
        adaptive_concurrency: adapt the requests in flight (1 to ``max_concurrency``) to what the server
            sustains: additive increase, multiplicative decrease on latency, timeouts and overload. False:
            always ``max_concurrency``.
        requests_per_minute: optional rate limit on requests (a token bucket).
        tokens_per_minute: optional rate limit on tokens (a token bucket).
        budget_requests: optional hard budget of HTTP attempts; when the next request might exceed a budget,
            nothing more is sent and :class:`~cyclealign_pl.judges.base.JudgeBudgetExceeded` is raised.
        budget_tokens: optional hard budget of prompt + completion tokens.
        budget_usd: optional hard budget in dollars (needs the prices).
        price_per_million_input_tokens: for ``cost_usd`` and ``budget_usd``.
        price_per_million_output_tokens: for ``cost_usd`` and ``budget_usd``.
        cache_path: SQLite file caching replies, and holding the spend ledger of a bound run (None: no cache).
        replay: answer only from the cache, never send a request; a miss fails with reason ``"replay miss"``.
        max_consecutive_failures: stop (``JudgeUnavailable``) after this many transport failures in a row
            (connection refused, name not resolved, timeouts) with no success between; None: never.
    """

    model: str = "gpt-3.5-turbo-0613"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int | None = 1024
    request_timeout: float = 60.0
    max_retries: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 120.0
    extra_headers: dict[str, str] | None = field(default=None, repr=False)
    max_concurrency: int = 16
    adaptive_concurrency: bool = True
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    budget_requests: int | None = None
    budget_tokens: int | None = None
    budget_usd: float | None = None
    price_per_million_input_tokens: float = 0.0
    price_per_million_output_tokens: float = 0.0
    cache_path: str | None = None
    replay: bool = False
    max_consecutive_failures: int | None = 8

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        for name in (
            "request_timeout",
            "max_concurrency",
            "max_tokens",
            "requests_per_minute",
            "tokens_per_minute",
            "budget_requests",
            "budget_tokens",
            "budget_usd",
            "max_consecutive_failures",
        ):
            value = getattr(self, name)
            required = name in ("request_timeout", "max_concurrency")
            if (value is not None or required) and not _number(value) > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        for name in (
            "max_retries",
            "backoff_initial_s",
            "backoff_max_s",
            "max_retry_after_s",
            "temperature",
            "price_per_million_input_tokens",
            "price_per_million_output_tokens",
        ):
            value = getattr(self, name)
            if not _number(value) >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        headers = dict(self.extra_headers or {})
        bad = [k for k, v in headers.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise ValueError(f"extra_headers must map names to string values; {bad[0]!r} does not")
        object.__setattr__(self, "extra_headers", headers)  # a private copy (a caller's dict may change)
        if self.replay and not self.cache_path:
            raise ValueError("replay=True needs a cache_path to replay from")
        if self.budget_usd is not None and self.price_per_million_input_tokens == 0 == (
            self.price_per_million_output_tokens
        ):
            raise ValueError("budget_usd needs price_per_million_input_tokens/output_tokens")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings' names (the arguments a caller passes on, e.g. from a judge's own arguments)."""
        return tuple(f.name for f in fields(cls))

    @property
    def budget(self) -> Budget:
        return Budget(self.budget_requests, self.budget_tokens, self.budget_usd)

    @property
    def preflight_timeout(self) -> float:
        """The bound of each preflight request: a check must answer within seconds, not a request timeout."""
        return min(self.request_timeout, 10.0)

    def describe(self) -> dict[str, Any]:
        """The settings for a record (results metadata): header values hidden, they may be secrets."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["extra_headers"] = dict.fromkeys(self.extra_headers or {}, "***")
        return out

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (
            prompt_tokens * self.price_per_million_input_tokens
            + completion_tokens * self.price_per_million_output_tokens
        ) / 1e6

    def deadline(self, num_calls: int) -> float:
        """A bound on ``num_calls`` concurrent calls: past it, something is broken, not slow."""
        per_call = (self.max_retries + 1) * self.request_timeout + self.max_retries * max(
            self.backoff_max_s, self.max_retry_after_s
        )
        waves = num_calls if self.adaptive_concurrency else math.ceil(num_calls / self.max_concurrency)
        limiter = num_calls * 60.0 / self.requests_per_minute if self.requests_per_minute else 0.0
        if self.tokens_per_minute:
            limiter += num_calls * 60.0 * (self.max_tokens or 4096) / self.tokens_per_minute
        return waves * per_call + limiter + 60.0


def _schema_refused(outcome: _Outcome) -> bool:
    """Whether the server refused the request's ``response_format``: a 400/422, or an error naming it (a
    validation error that llama-cpp-python's server answers with HTTP 500)."""
    status = outcome.status
    return status in _SCHEMA_REFUSED or (status is not None and "response_format" in outcome.detail)


def _response_format(schema: dict[str, Any] | None, form: int) -> dict[str, Any] | None:
    """``response_format`` asking for JSON following ``schema`` in ``STRUCTURED_OUTPUT_FORMS[form]``."""
    what = STRUCTURED_OUTPUT_FORMS[form]
    if schema is None or what == "off":
        return None
    if what == "json_schema":
        return {"type": "json_schema", "json_schema": schema}
    return {"type": "json_object", "schema": schema["schema"]}


def _number(value: object) -> float:
    """``value`` as a number for the range checks; NaN (fails every comparison) for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


@dataclass(frozen=True)
class ChatReply:
    """A call's result: the reply text and token usage, or ``text=None`` with a failure kind and reason."""

    text: str | None = None
    usage: tuple[int, int] = (0, 0)
    kind: str | None = None
    reason: str | None = field(default=None)


class _Outcome(NamedTuple):
    """One HTTP attempt: the reply or failure, the HTTP status of a failure, the server's Retry-After."""

    reply: ChatReply
    status: int | None = None
    retry_after: float | None = None
    retryable: bool = False
    sent_at: float = 0.0  # time.monotonic() when the attempt was sent
    detail: str = ""  # the error message of an HTTP error


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def display_url(url: str) -> str:
    """The URL without user:password, for messages."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path.rstrip('/')}"


def connection_problem(error: BaseException, url: str) -> str:
    """What a connection error means, in words: the cause found in the exception chain."""
    seen = []
    cause: BaseException | None = error
    while cause is not None and len(seen) < 16:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    for err in seen:
        if isinstance(err, socket.gaierror):
            return f"the host name {urlsplit(url).hostname!r} does not resolve ({err.strerror or err})"
        if isinstance(err, ConnectionRefusedError):
            return "connection refused (is the server running, on this port?)"
        if isinstance(err, ssl.SSLError):
            return f"TLS error: {err}"
        if isinstance(err, ConnectionResetError):
            return "the connection was reset"
    last = seen[-1]
    text = " ".join(str(last).split()) or "no details"
    if type(last).__name__ == "RemoteProtocolError" or "without sending" in text:
        return f"the server closed the connection without a response ({text})"
    return f"{type(last).__name__}: {text}"


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, ``Retry-After`` (seconds or HTTP date)."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    value = headers.get("retry-after")
    if value:
        try:
            date = email.utils.parsedate_tz(value)
            if date is not None:
                return max(0.0, float(email.utils.mktime_tz(date) - time.time()))
        except (TypeError, ValueError, OverflowError):
            return None
    return None


class ChatTransport:
    """Sends chat completions from one event loop: at most ``max_concurrency`` at a time, each bounded.

    Args:
        settings: the server and the limits.
        counters: where retries, the most requests in flight and estimated usages are counted.
        gate: records each attempt in the spend ledger before it is sent and enforces the budget.
        seed: seeds the backoff jitter.
        name: who is talking, for messages (e.g. ``OpenAIJudge``).
    """

    def __init__(
        self,
        settings: ChatSettings,
        counters: Counters,
        gate: BudgetGate,
        *,
        seed: int = 0,
        name: str = "judge",
    ) -> None:
        self.settings = settings
        self.counters = counters
        self.gate = gate
        self.name = name
        self.limit = ConcurrencyLimit(settings.max_concurrency, settings.adaptive_concurrency)
        self.structured_floor = 0  # index into STRUCTURED_OUTPUT_FORMS: the strongest form the server takes
        self.last_reply_at = -math.inf  # monotonic time of the latest reply: a live server
        self.rpm = TokenBucket(settings.requests_per_minute) if settings.requests_per_minute else None
        self.tpm = TokenBucket(settings.tokens_per_minute) if settings.tokens_per_minute else None
        self.cooldown_until = 0.0  # a 429 pauses every request until then
        self.consecutive_failures = 0  # transport failures since the last success: the circuit breaker
        self.fatal: JudgeStop | None = None
        self._stopped = asyncio.Event()  # set with ``fatal``: wakes every request sleeping in a backoff
        self._jitter = random.Random(seed)
        self._client: Any = None
        self._placeholder_key = False

    # ------------------------------------------------------------------------------------------ client

    def _headers(self) -> dict[str, str]:
        out = {}
        for name, value in (self.settings.extra_headers or {}).items():
            if value.startswith("env:"):
                resolved = os.environ.get(value[4:])
                if not resolved:
                    raise JudgeUnavailable(
                        f"{self.name}: header {name!r} reads the environment variable {value[4:]}, which is "
                        "not set"
                    )
                value = resolved
            out[name] = value
        return out

    def client(self) -> Any:
        """The AsyncOpenAI client, created at first use: that is when the API key is read."""
        if self._client is None:
            import httpx2
            import openai

            s = self.settings
            url = s.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
            key = os.environ.get(s.api_key_env)
            if not key:
                if not is_loopback(url):
                    raise JudgeUnavailable(
                        f"{self.name}: the environment variable {s.api_key_env} is not set (or empty), and "
                        f"the server at {display_url(url)} needs an API key. Set it, or set api_key_env to "
                        "the variable that holds the key."
                    )
                key, self._placeholder_key = PLACEHOLDER_KEY, True
            self._client = openai.AsyncOpenAI(
                api_key=key,
                base_url=s.base_url,
                max_retries=0,
                timeout=s.request_timeout,
                default_headers=self._headers() or None,
                http_client=openai.DefaultAsyncHttpxClient(
                    timeout=httpx2.Timeout(s.request_timeout, connect=s.preflight_timeout),
                    limits=httpx2.Limits(
                        max_connections=s.max_concurrency, max_keepalive_connections=s.max_concurrency
                    ),
                ),
            )
        return self._client

    def url(self) -> str:
        return display_url(str(self.client().base_url))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ------------------------------------------------------------------------------------------- calls

    async def complete(
        self,
        messages: list[dict[str, str]],
        schema: dict[str, Any] | None = None,
        structured_output: str = "json_schema",
    ) -> ChatReply:
        """One chat completion with retries. Raises only :class:`JudgeStop` (budget spent, judge unusable).

        ``schema`` (``{"name": ..., "schema": {...}}``): ask for JSON following it, first in the form
        ``structured_output`` (one of :data:`STRUCTURED_OUTPUT_FORMS`), weaker forms when refused.
        """
        first = (
            STRUCTURED_OUTPUT_FORMS.index(structured_output)
            if schema is not None
            else len(STRUCTURED_OUTPUT_FORMS) - 1
        )
        self.url()  # the HTTP client exists before the first turn is taken
        rate_tokens = sum(len(m["content"]) for m in messages) / 4 + (self.settings.max_tokens or 0)
        await self._wait_for_turn(rate_tokens)  # a rate-limit wait holds no slot
        async with self.limit.slot():
            return await self._with_retries(messages, schema, first, rate_tokens)

    @property
    def in_flight(self) -> int:
        return self.limit.in_flight

    async def preflight(self) -> None:
        """Raise :class:`JudgeUnavailable` (one line) unless the server answers and serves the model.

        ``GET /models`` costs nothing; a server without that route (or whose list is unreadable) gets one
        chat completion of at most one token instead, recorded in the ledger like any request. Each request
        is bounded by ``min(request_timeout, 10 s)`` and never retried.
        """
        import openai

        s, url, timeout = self.settings, self.url(), self.settings.preflight_timeout
        served: list[str] | None = None
        try:
            page = await asyncio.wait_for(self.client().models.list(timeout=timeout), timeout + 1.0)
            served = [str(model.id) for model in page.data]
        except (asyncio.TimeoutError, openai.APITimeoutError):
            self._fail(f"no answer from {url} within {timeout:g} s")
        except openai.APIConnectionError as err:
            self._fail(f"cannot reach {url}: {connection_problem(err, url)}")
        except openai.APIStatusError as err:
            if err.status_code in (401, 403):
                self._fail(self._refusal(err.status_code, url))
        except (openai.APIResponseValidationError, ValueError, TypeError, AttributeError, KeyError):
            pass  # not a model list: ask the chat route
        if served is not None and (s.model in served or f"{s.model}:latest" in served):
            return
        probe = [{"role": "user", "content": "Reply with OK."}]
        async with self.limit.slot():
            outcome = await self._attempt(probe, url, "(preflight)", max_tokens=1, timeout=timeout)
        reply = outcome.reply
        listed = (
            ""
            if served is None
            else f" (it serves: {', '.join(served[:10]) or 'no model'}"
            + (", ...)" if len(served) > 10 else ")")
        )
        if reply.text is not None:
            if served is not None:
                log.warning(
                    "%s: model %r is not in the model list of %s, but it answers", self.name, s.model, url
                )
            return
        if outcome.status == 404 and served is not None:
            self._fail(f"model {s.model!r} is not served at {url}{listed}")
        if outcome.status in _REFUSED:
            self._fail(self._refusal(outcome.status, url))
        if reply.kind == "timeout":
            self._fail(f"no answer from {url} within {timeout:g} s")
        unlisted = served is not None and reply.kind == "http_error"  # a 4xx for a model it does not list
        if reply.kind in ("connection", "bad_response") or unlisted:
            self._fail(f"{reply.reason}{listed}")
        log.warning(
            "%s: preflight request to %s failed (%s); going on, the run's retries decide",
            self.name,
            url,
            reply.reason,
        )

    def _refusal(self, status: int, url: str) -> str:
        s = self.settings
        what = _REFUSED[status].format(env=s.api_key_env, model=s.model)
        if status == 401 and self._placeholder_key:
            what += " (it is not set: a placeholder key was sent)"
        return f"HTTP {status} from {url}: {what}"

    def _fail(self, message: str) -> NoReturn:
        """Stop every request of this transport: raise (and keep) a one-line JudgeUnavailable."""
        self.fatal = JudgeUnavailable(f"{self.name}: {' '.join(message.split())}")
        self._stopped.set()
        raise self.fatal

    def _check(self) -> None:
        if self.fatal is not None:
            raise self.fatal

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or wake early when the transport stops."""
        if seconds > 0:
            try:
                await asyncio.wait_for(self._stopped.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        self._check()

    async def _wait_for_turn(self, rate_tokens: float, rates: bool = True) -> None:
        """Wait out a pause of all requests (a 429) and, with ``rates``, take a turn of the rate limits."""
        await self._sleep(self.cooldown_until - time.monotonic())
        if rates and self.tpm is not None:
            await self.tpm.acquire(rate_tokens)
        if rates and self.rpm is not None:
            await self.rpm.acquire(1.0)
        self._check()

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return min(s.backoff_max_s, s.backoff_initial_s * 2.0**attempt) * self._jitter.uniform(0.5, 1.0)

    async def _with_retries(
        self, messages: list[dict[str, str]], schema: dict[str, Any] | None, first: int, rate_tokens: float
    ) -> ChatReply:
        s = self.settings
        url = self.url()
        failure = ChatReply(kind="connection", reason="not sent")
        for attempt in range(s.max_retries + 1):
            # the first attempt took its rate-limit turn before its slot; a pause may have begun since
            await self._wait_for_turn(rate_tokens, rates=attempt > 0)
            tries = f"({attempt + 1} attempt{'s' if attempt else ''})"
            form = max(first, self.structured_floor)
            outcome = await self._attempt(
                messages,
                url,
                tries,
                max_tokens=s.max_tokens,
                timeout=s.request_timeout,
                retry=attempt > 0,
                response_format=_response_format(schema, form),
            )
            while _schema_refused(outcome) and form + 1 < len(STRUCTURED_OUTPUT_FORMS):
                form += 1  # refused: the same request at once in the next weaker form
                outcome = await self._attempt(
                    messages,
                    url,
                    tries,
                    max_tokens=s.max_tokens,
                    timeout=s.request_timeout,
                    response_format=_response_format(schema, form),
                )
                if not _schema_refused(outcome):  # taken: the server refused the stronger form
                    self._structured_fallback(form, url)
            if outcome.status in _REFUSED:  # configuration errors: never retried, nothing else is sent
                self._fail(self._refusal(outcome.status, url))
            self._track(outcome, url)
            if outcome.reply.text is not None:
                return outcome.reply
            failure = outcome.reply
            if not outcome.retryable or attempt == s.max_retries:
                break
            retry_after = outcome.retry_after
            if retry_after is not None and retry_after > s.max_retry_after_s:
                failure = ChatReply(
                    kind=failure.kind,
                    reason=(
                        f"{failure.reason}; the server asked to wait {retry_after:g} s, more than "
                        f"max_retry_after_s={s.max_retry_after_s:g}"
                    ),
                )
                break
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            if failure.kind in _PAUSE_ALL:  # pause everyone, not just this request: no storm of retries
                self.cooldown_until = max(self.cooldown_until, time.monotonic() + delay)
            log.info(
                "%s: %s; retry %d/%d in %.2f s", self.name, failure.reason, attempt + 1, s.max_retries, delay
            )
            await self._sleep(delay)
        return failure

    def _structured_fallback(self, form: int, url: str) -> None:
        """Remember the strongest form of structured output the server takes; say so once per change."""
        if form <= self.structured_floor:
            return
        refused = ", ".join(STRUCTURED_OUTPUT_FORMS[self.structured_floor : form])
        self.structured_floor = form
        self.counters.bump("structured_output_fallbacks")
        now = STRUCTURED_OUTPUT_FORMS[form]
        log.warning(
            "%s: the server at %s refused response_format %s; %s",
            self.name,
            url,
            refused,
            "asking without it: the reply's text is parsed"
            if now == "off"
            else f"using {now!r} with the schema (llama.cpp's form)",
        )

    def _track(self, outcome: _Outcome, url: str) -> None:
        """The circuit breaker: a dead server stops the run after K failures in a row, not N prompts later."""
        reply = outcome.reply
        if reply.text is not None:  # kept (and cached) even after a stop: it is paid for
            self.consecutive_failures = 0
            return
        self._check()  # already tripped by a request that failed at the same time: one stop, one message
        if reply.kind == "timeout" and self.last_reply_at > outcome.sent_at:
            # another request of ours got its reply meanwhile: this one waited in the server's queue
            self.counters.bump("timeouts_queued")
            return
        if reply.kind in _UNREACHABLE:
            self.consecutive_failures += 1
            limit = self.settings.max_consecutive_failures
            if limit is not None and self.consecutive_failures >= limit:
                self._fail(
                    f"stopped after {self.consecutive_failures} consecutive transport failures "
                    f"(connection refused, name not resolved or timeout) at {url}; the last: "
                    f"{reply.reason}"
                )

    def _upper_bound(self, messages: Sequence[dict[str, str]], max_tokens: int | None) -> Cost:
        """The most one attempt can cost: a byte-level BPE token count never exceeds the byte count."""
        prompt = sum(len(m["content"].encode("utf-8")) + 16 for m in messages)
        completion = max_tokens or 0
        return Cost(1.0, float(prompt), float(completion), self.settings.cost(prompt, completion))

    async def _attempt(
        self,
        messages: list[dict[str, str]],
        url: str,
        tries: str,
        *,
        max_tokens: int | None,
        timeout: float,
        retry: bool = False,
        response_format: dict[str, Any] | None = None,
    ) -> _Outcome:
        """One HTTP attempt (in a slot of the concurrency limit), recorded in the ledger before it is sent and
        settled with what it cost; its timeout runs from when it is sent."""
        self._check()
        bound = self._upper_bound(messages, max_tokens)
        row = await self.gate.reserve(bound)  # raises JudgeBudgetExceeded before anything is sent
        spent = Cost(requests=1.0)  # a failed attempt is a request without (known) tokens
        if retry:
            self.counters.bump("retries")
        self.counters.maximum("requests_in_flight_max", self.in_flight)
        epoch, sent_at = self.limit.decreases, time.monotonic()
        outcome: _Outcome | None = None
        try:
            outcome = await self._call(
                messages, url, tries, max_tokens=max_tokens, timeout=timeout, response_format=response_format
            )
            outcome = outcome._replace(sent_at=sent_at)
            if outcome.reply.text is not None:
                prompt, completion = outcome.reply.usage
                spent = Cost(1.0, prompt, completion, self.settings.cost(prompt, completion))
            return outcome
        finally:
            self.gate.settle(row, spent)
            self._adapt(epoch, outcome, sent_at)

    def _adapt(self, epoch: int, outcome: _Outcome | None, sent_at: float) -> None:
        """Tell the concurrency limit how the attempt went: its latency, or an overload."""
        if outcome is None:
            return
        if outcome.reply.text is not None:
            now = time.monotonic()
            self.last_reply_at = now
            self.limit.record(epoch, now - sent_at)
        elif outcome.reply.kind in ("timeout", "rate_limit", "server_error") and not _schema_refused(outcome):
            self.limit.record(epoch, None, overloaded=True)
        self.counters.set("concurrency_limit", self.limit.current)

    async def _call(
        self,
        messages: list[dict[str, str]],
        url: str,
        tries: str,
        *,
        max_tokens: int | None,
        timeout: float,
        response_format: dict[str, Any] | None = None,
    ) -> _Outcome:
        import openai

        s = self.settings
        try:
            response = await asyncio.wait_for(
                self.client().chat.completions.create(
                    model=s.model,
                    messages=messages,
                    temperature=s.temperature,
                    max_tokens=max_tokens if max_tokens is not None else openai.omit,
                    response_format=response_format if response_format is not None else openai.omit,
                    timeout=timeout,
                ),
                timeout=timeout,
            )
            text, usage = self._read(response)
        except (asyncio.TimeoutError, openai.APITimeoutError):
            reason = f"timeout: no reply from {url} within {timeout:g} s {tries}"
            return _Outcome(ChatReply(kind="timeout", reason=reason), retryable=True)
        except openai.APIConnectionError as err:
            reason = f"connection: cannot reach {url}: {connection_problem(err, url)} {tries}"
            return _Outcome(ChatReply(kind="connection", reason=reason), retryable=True)
        except openai.APIStatusError as err:
            status, headers = err.status_code, err.response.headers
            should = headers.get("x-should-retry")
            if should in ("true", "false"):
                retryable = should == "true"
            else:
                retryable = status in (408, 409, 429) or status >= 500
            kind = "rate_limit" if status == 429 else "server_error" if status >= 500 else "http_error"
            reply = ChatReply(kind=kind, reason=f"{kind}: HTTP {status} from {url} {tries}")
            retry_after = retry_after_seconds(headers)
            detail = str(getattr(err, "message", "") or "")[:2000]
            return _Outcome(reply, status, retry_after, retryable and status not in _REFUSED, detail=detail)
        except (openai.APIResponseValidationError, ValueError, KeyError, TypeError, AttributeError) as err:
            reason = (
                f"bad_response: {url} answered with something that is not a chat completion "
                f"({type(err).__name__})"
            )
            return _Outcome(ChatReply(kind="bad_response", reason=reason))
        if usage is None:  # some local servers report no usage: estimate it, so budgets still hold
            self.counters.bump("usage_estimated")
            usage = (math.ceil(sum(len(m["content"]) for m in messages) / 4), math.ceil(len(text) / 4))
        return _Outcome(ChatReply(text=text, usage=usage))

    @staticmethod
    def _read(response: Any) -> tuple[str, tuple[int, int] | None]:
        """The reply text and (prompt, completion) tokens of a chat completion; ValueError if not one."""
        if isinstance(response, (str, bytes)) or not getattr(response, "choices", None):
            raise ValueError("no choices")
        text = response.choices[0].message.content or ""
        usage = getattr(response, "usage", None)
        if usage is None:
            return text, None
        return text, (int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))


__all__ = [
    "CALL_FAILURE_KINDS",
    "DEFAULT_BASE_URL",
    "PLACEHOLDER_KEY",
    "STRUCTURED_OUTPUT_FORMS",
    "ChatReply",
    "ChatSettings",
    "ChatTransport",
    "Counters",
    "connection_problem",
    "display_url",
    "is_loopback",
    "retry_after_seconds",
]
