"""One chat-completions call, robustly: bounded time, counted retries, rate limits, a hard budget.

Retries are this module's own small loop; the openai client runs with ``max_retries=0``. Reading the client
(openai 3.57, ``_base_client.py``): its backoff starts at a hard-coded 0.5 s with 0-25 % jitter, treats
``Retry-After: 0`` as absent, refuses to retry past 120 s and backs off per request, and its retries are
invisible to the caller. We need configurable backoff, a pause of *all* requests when the server is in trouble
(429, 5xx, connection errors: no retry storm), per-reason failure counts and a retry counter. Like the client,
we honour ``retry-after-ms`` and ``Retry-After`` (seconds or HTTP date) and ``x-should-retry``, and retry
408/409/429/5xx, timeouts and connection errors with exponential backoff (jitter 50-100 %). 401/403/404 are
configuration errors: they stop the run (:class:`JudgeStop`) instead of failing every prompt one by one.

Every await is bounded: an attempt by ``request_timeout`` (wall clock, not just between bytes), a backoff by
``backoff_max_s`` or ``max_retry_after_s``, a rate-limit wait by the rate, a budget wait by the requests in
flight.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cyclealign_pl.judges.base import JudgeStop
from cyclealign_pl.judges.limits import BudgetGate, Cost, TokenBucket

log = logging.getLogger(__name__)

PLACEHOLDER_KEY = "sk-no-key-required"  # sent to loopback servers when api_key_env is unset
# Failures that say the server (not this one request) is in trouble: every request waits out the backoff.
_PAUSE_ALL = frozenset({"rate_limit", "server_error", "connection"})
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class Counters:
    """Cumulative float counters shared by the judge's threads; they pickle (for resume) without the lock."""

    def __init__(self, names: Iterable[str]) -> None:
        self._values = dict.fromkeys(names, 0.0)
        self._lock = threading.Lock()

    def bump(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self._values[name] += value

    def maximum(self, name: str, value: float) -> None:
        with self._lock:
            self._values[name] = max(self._values[name], float(value))

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def load(self, values: dict[str, float]) -> None:
        with self._lock:
            for name, value in values.items():
                if name in self._values:
                    self._values[name] = float(value)

    def spent(self) -> Cost:
        with self._lock:
            v = self._values
            return Cost(v["requests_sent"], v["prompt_tokens"] + v["completion_tokens"], v["cost_usd"])

    def __getstate__(self) -> dict[str, Any]:
        return {"_values": self.snapshot()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._values = dict(state["_values"])
        self._lock = threading.Lock()


@dataclass(frozen=True)
class ChatSettings:
    """Everything a transport needs to know (the judge's init arguments, minus the prompt side)."""

    model: str
    base_url: str | None
    api_key_env: str
    temperature: float
    max_tokens: int | None
    request_timeout: float
    max_retries: int
    backoff_initial_s: float
    backoff_max_s: float
    max_retry_after_s: float
    max_concurrency: int
    extra_headers: tuple[tuple[str, str], ...] = ()
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    budget_requests: int | None = None
    budget_tokens: int | None = None
    budget_usd: float | None = None
    price_per_million_input_tokens: float = 0.0
    price_per_million_output_tokens: float = 0.0

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.price_per_million_input_tokens
                + completion_tokens * self.price_per_million_output_tokens) / 1e6

    def deadline(self, num_calls: int) -> float:
        """A bound on ``num_calls`` concurrent calls: past it, something is broken, not slow."""
        per_call = (self.max_retries + 1) * self.request_timeout + self.max_retries * max(
            self.backoff_max_s, self.max_retry_after_s)
        waves = math.ceil(num_calls / self.max_concurrency)
        limiter = num_calls * 60.0 / self.requests_per_minute if self.requests_per_minute else 0.0
        if self.tokens_per_minute:
            limiter += num_calls * 60.0 * (self.max_tokens or 4096) / self.tokens_per_minute
        return waves * per_call + limiter + 60.0


@dataclass(frozen=True)
class ChatReply:
    """A call's result: the reply text and token usage, or ``text=None`` with a failure kind and reason."""

    text: str | None = None
    usage: tuple[int, int] = (0, 0)
    kind: str | None = None
    reason: str | None = field(default=None)


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
    """Sends chat completions from one event loop: at most ``max_concurrency`` at a time, each bounded."""

    def __init__(self, settings: ChatSettings, counters: Counters, seed: int = 0) -> None:
        self.settings = settings
        self.counters = counters
        self.semaphore = asyncio.Semaphore(settings.max_concurrency)
        self.rpm = TokenBucket(settings.requests_per_minute) if settings.requests_per_minute else None
        self.tpm = TokenBucket(settings.tokens_per_minute) if settings.tokens_per_minute else None
        self.gate = BudgetGate(settings.budget_requests, settings.budget_tokens, settings.budget_usd,
                               counters.spent)
        self.cooldown_until = 0.0  # a 429 pauses every request until then
        self.in_flight = 0
        self.fatal: JudgeStop | None = None
        self._jitter = random.Random(seed)
        self._client: Any = None

    # ------------------------------------------------------------------------------------------ client

    def _headers(self) -> dict[str, str]:
        out = {}
        for name, value in self.settings.extra_headers:
            if value.startswith("env:"):
                resolved = os.environ.get(value[4:])
                if not resolved:
                    raise JudgeStop(
                        f"OpenAIJudge: header {name!r} reads the environment variable {value[4:]}, "
                        "which is not set"
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
                    raise JudgeStop(
                        f"OpenAIJudge: the environment variable {s.api_key_env} is not set (or empty), and "
                        f"the server at {display_url(url)} needs an API key. Set it, or set api_key_env to "
                        "the variable that holds the key."
                    )
                key = PLACEHOLDER_KEY
            self._client = openai.AsyncOpenAI(
                api_key=key,
                base_url=s.base_url,
                max_retries=0,
                timeout=s.request_timeout,
                default_headers=self._headers() or None,
                http_client=openai.DefaultAsyncHttpxClient(
                    timeout=httpx2.Timeout(s.request_timeout, connect=min(s.request_timeout, 10.0)),
                    limits=httpx2.Limits(max_connections=s.max_concurrency,
                                         max_keepalive_connections=s.max_concurrency),
                ),
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ------------------------------------------------------------------------------------------- calls

    def _upper_bound(self, messages: Sequence[dict[str, str]]) -> Cost:
        """The most one attempt can cost: a byte-level BPE token count never exceeds the byte count."""
        prompt = sum(len(m["content"].encode("utf-8")) + 16 for m in messages)
        completion = self.settings.max_tokens or 0
        return Cost(1.0, float(prompt + completion), self.settings.cost(prompt, completion))

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return min(s.backoff_max_s, s.backoff_initial_s * 2.0**attempt) * self._jitter.uniform(0.5, 1.0)

    async def complete(self, messages: list[dict[str, str]]) -> ChatReply:
        """One chat completion with retries. Raises only :class:`JudgeStop` (budget spent, bad config)."""
        async with self.semaphore:
            return await self._with_retries(messages)

    async def _wait_for_turn(self, rate_tokens: float) -> None:
        pause = self.cooldown_until - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        if self.tpm is not None:
            await self.tpm.acquire(rate_tokens)
        if self.rpm is not None:
            await self.rpm.acquire(1.0)

    async def _with_retries(self, messages: list[dict[str, str]]) -> ChatReply:
        s = self.settings
        client = self.client()
        url = display_url(str(client.base_url))
        bound = self._upper_bound(messages)
        rate_tokens = sum(len(m["content"]) for m in messages) / 4 + (s.max_tokens or 0)
        failure = ChatReply(kind="connection", reason="not sent")
        for attempt in range(s.max_retries + 1):
            if self.fatal is not None:
                raise self.fatal
            await self._wait_for_turn(rate_tokens)
            await self.gate.reserve(bound)  # raises JudgeBudgetExceeded before anything is sent
            self.counters.bump("requests_sent")
            if attempt:
                self.counters.bump("retries")
            self.in_flight += 1
            self.counters.maximum("requests_in_flight_max", self.in_flight)
            try:
                reply, retry_after, retryable = await self._attempt(client, messages, url, attempt)
            finally:
                self.in_flight -= 1
                await self.gate.release(bound)
            if reply.text is not None:
                return reply
            failure = reply
            if not retryable or attempt == s.max_retries:
                break
            if retry_after is not None and retry_after > s.max_retry_after_s:
                failure = ChatReply(kind=failure.kind, reason=(
                    f"{failure.reason}; the server asked to wait {retry_after:g} s, more than "
                    f"max_retry_after_s={s.max_retry_after_s:g}"))
                break
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            if failure.kind in _PAUSE_ALL:  # pause everyone, not just this request: no storm of retries
                self.cooldown_until = max(self.cooldown_until, time.monotonic() + delay)
            log.info("OpenAIJudge: %s; retry %d/%d in %.2f s", failure.reason, attempt + 1, s.max_retries,
                     delay)
            await asyncio.sleep(delay)
        return failure

    async def _attempt(
        self, client: Any, messages: list[dict[str, str]], url: str, attempt: int
    ) -> tuple[ChatReply, float | None, bool]:
        """One HTTP attempt: (reply or failure, the server's Retry-After in seconds or None, retryable)."""
        import openai

        s = self.settings
        tries = f"({attempt + 1} attempt{'s' if attempt else ''})"
        try:
            response = await asyncio.wait_for(
                client.chat.completions.create(
                    model=s.model, messages=messages, temperature=s.temperature,
                    max_tokens=s.max_tokens if s.max_tokens is not None else openai.omit,
                    timeout=s.request_timeout,
                ),
                timeout=s.request_timeout,
            )
            text, usage = self._read(response)
        except (asyncio.TimeoutError, openai.APITimeoutError):
            reason = f"timeout: no reply from {url} within {s.request_timeout:g} s {tries}"
            return ChatReply(kind="timeout", reason=reason), None, True
        except openai.APIConnectionError as err:
            cause = err.__cause__ or err
            reason = f"connection: cannot reach {url} ({type(cause).__name__}: {cause}) {tries}"
            return ChatReply(kind="connection", reason=reason), None, True
        except openai.APIStatusError as err:
            status, headers = err.status_code, err.response.headers
            if status in (401, 403, 404):
                what = {401: "the API key was refused", 403: "access is denied",
                        404: f"model {s.model!r} or the URL was not found"}[status]
                self.fatal = JudgeStop(
                    f"OpenAIJudge: HTTP {status} from {url}: {what} (check model, base_url and the key in "
                    f"{s.api_key_env})"
                )
                raise self.fatal from None
            should = headers.get("x-should-retry")
            if should in ("true", "false"):
                retryable = should == "true"
            else:
                retryable = status in (408, 409, 429) or status >= 500
            kind = "rate_limit" if status == 429 else "server_error" if status >= 500 else "http_error"
            reply = ChatReply(kind=kind, reason=f"{kind}: HTTP {status} from {url} {tries}")
            return reply, retry_after_seconds(headers), retryable
        except (openai.APIResponseValidationError, ValueError, KeyError, TypeError, AttributeError) as err:
            reason = (f"bad_response: {url} answered with something that is not a chat completion "
                      f"({type(err).__name__})")
            return ChatReply(kind="bad_response", reason=reason), None, False
        if usage is None:  # some local servers report no usage: estimate it, so budgets still hold
            self.counters.bump("usage_estimated")
            usage = (math.ceil(sum(len(m["content"]) for m in messages) / 4), math.ceil(len(text) / 4))
        self.counters.bump("prompt_tokens", usage[0])
        self.counters.bump("completion_tokens", usage[1])
        self.counters.bump("cost_usd", s.cost(*usage))
        return ChatReply(text=text, usage=usage), None, False

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
    "ChatReply", "ChatSettings", "ChatTransport", "Counters", "DEFAULT_BASE_URL", "PLACEHOLDER_KEY",
    "display_url", "is_loopback", "retry_after_seconds",
]
