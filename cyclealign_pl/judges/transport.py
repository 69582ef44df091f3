"""One chat call, robustly: bounded time, counted retries, rate limits, a hard budget, a circuit breaker.

Its own retry loop, so that a server in trouble pauses every request (no retry storm) and each retry and
failure is counted; what is retried, what stops the judge and why every wait is bounded: docs/judges.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from cyclealign_pl.judges.base import JudgeStop, JudgeUnavailable
from cyclealign_pl.judges.counters import Counters
from cyclealign_pl.judges.http_client import display_url, open_client
from cyclealign_pl.judges.limits import BudgetGate, ConcurrencyLimit, Cost, TokenBucket
from cyclealign_pl.judges.request import REFUSED, ChatReply, Outcome, send_request
from cyclealign_pl.judges.settings import ChatSettings
from cyclealign_pl.judges.structured import (
    STRUCTURED_OUTPUT_FORMS,
    StructuredOutput,
    first_form,
    response_format,
    schema_refused,
)

log = logging.getLogger(__name__)

# Failures that say the server (not this one request) is in trouble: every request waits out the backoff.
_PAUSE_ALL = frozenset({"rate_limit", "server_error", "connection"})
# Failures that say nothing answered at all: counted by the circuit breaker.
_UNREACHABLE = frozenset({"connection", "timeout"})


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
        self.structured = StructuredOutput(counters, name)
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

    def client(self) -> Any:
        """The AsyncOpenAI client, created at first use: that is when the API key is read."""
        if self._client is None:
            self._client, self._placeholder_key = open_client(self.settings, self.name)
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
        ``structured_output`` (one of ``STRUCTURED_OUTPUT_FORMS``), weaker forms when refused.
        """
        first = first_form(schema, structured_output)
        self.url()  # the HTTP client exists before the first turn is taken
        rate_tokens = sum(len(m["content"]) for m in messages) / 4 + (self.settings.max_tokens or 0)
        await self._wait_for_turn(rate_tokens)  # a rate-limit wait holds no slot
        async with self.limit.slot():
            return await self._with_retries(messages, schema, first, rate_tokens)

    @property
    def in_flight(self) -> int:
        return self.limit.in_flight

    async def attempt(
        self,
        messages: list[dict[str, str]],
        url: str,
        tries: str,
        *,
        max_tokens: int | None,
        timeout: float,
        retry: bool = False,
        response_format: dict[str, Any] | None = None,
    ) -> Outcome:
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
        outcome: Outcome | None = None
        try:
            outcome = await send_request(
                self.client(),
                self.settings,
                messages,
                url,
                tries,
                max_tokens=max_tokens,
                timeout=timeout,
                response_format=response_format,
            )
            if outcome.usage_estimated:
                self.counters.bump("usage_estimated")
            outcome = outcome._replace(sent_at=sent_at)
            if outcome.reply.text is not None:
                prompt, completion = outcome.reply.usage
                spent = Cost(1.0, prompt, completion, self.settings.cost(prompt, completion))
            return outcome
        finally:
            self.gate.settle(row, spent)
            self._adapt(epoch, outcome, sent_at)

    def refusal(self, status: int, url: str) -> str:
        """What a 401/403/404 means, in words."""
        s = self.settings
        what = REFUSED[status].format(env=s.api_key_env, model=s.model)
        if status == 401 and self._placeholder_key:
            what += " (it is not set: a placeholder key was sent)"
        return f"HTTP {status} from {url}: {what}"

    def fail(self, message: str) -> NoReturn:
        """Stop every request of this transport: raise (and keep) a one-line JudgeUnavailable."""
        self.fatal = JudgeUnavailable(f"{self.name}: {' '.join(message.split())}")
        self._stopped.set()
        raise self.fatal

    # --------------------------------------------------------------------------------------- internals

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
            outcome = await self._attempt_structured(messages, url, tries, schema, first, retry=attempt > 0)
            if outcome.status in REFUSED:  # configuration errors: never retried, nothing else is sent
                self.fail(self.refusal(outcome.status, url))
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

    async def _attempt_structured(
        self,
        messages: list[dict[str, str]],
        url: str,
        tries: str,
        schema: dict[str, Any] | None,
        first: int,
        retry: bool,
    ) -> Outcome:
        """An attempt asking for structured output; refused, the same request at once in the next weaker
        form (the server's choice is remembered)."""
        s = self.settings
        send = functools.partial(
            self.attempt, messages, url, tries, max_tokens=s.max_tokens, timeout=s.request_timeout
        )
        form = self.structured.form(first)
        outcome = await send(retry=retry, response_format=response_format(schema, form))
        while schema_refused(outcome.status, outcome.detail) and form + 1 < len(STRUCTURED_OUTPUT_FORMS):
            form += 1
            outcome = await send(response_format=response_format(schema, form))
            if not schema_refused(outcome.status, outcome.detail):  # taken: the stronger form was refused
                self.structured.taken(form, url)
        return outcome

    def _track(self, outcome: Outcome, url: str) -> None:
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
                self.fail(
                    f"stopped after {self.consecutive_failures} consecutive transport failures "
                    f"(connection refused, name not resolved or timeout) at {url}; the last: "
                    f"{reply.reason}"
                )

    def _upper_bound(self, messages: Sequence[dict[str, str]], max_tokens: int | None) -> Cost:
        """The most one attempt can cost: a byte-level BPE token count never exceeds the byte count."""
        prompt = sum(len(m["content"].encode("utf-8")) + 16 for m in messages)
        completion = max_tokens or 0
        return Cost(1.0, float(prompt), float(completion), self.settings.cost(prompt, completion))

    def _adapt(self, epoch: int, outcome: Outcome | None, sent_at: float) -> None:
        """Tell the concurrency limit how the attempt went: its latency, or an overload."""
        if outcome is None:
            return
        if outcome.reply.text is not None:
            now = time.monotonic()
            self.last_reply_at = now
            self.limit.record(epoch, now - sent_at)
        elif outcome.reply.kind in ("timeout", "rate_limit", "server_error") and not schema_refused(
            outcome.status, outcome.detail
        ):
            self.limit.record(epoch, None, overloaded=True)
        self.counters.set("concurrency_limit", self.limit.current)


__all__ = ["ChatTransport"]
