"""The black-box judge: any chat-completions server (OpenAI, Azure, vLLM, Ollama, llama.cpp, TGI).

What it does about the usual complaints on API judges:

* **hangs** - every request has a hard wall-clock timeout, every wait is bounded, and a whole ``rank()`` call has
  a computed deadline; a dead server gives counted failures, not a stuck job.
* **retry exhaustion killing the run** - a reply that never comes or cannot be parsed fails *that prompt* with a
  reason (``on_failure="skip"``: the cycle masks it; ``"fallback"``: another judge answers; ``"stop"``: a clean
  :class:`JudgeStop`). Only a spent budget or a configuration error (bad key, unknown model) stops the run.
* **request storms** - at most ``max_concurrency`` requests in flight, optional requests/tokens-per-minute token
  buckets, and a 429 pauses *all* requests until its ``Retry-After`` (not just the one that got it).
* **paying twice** - an SQLite cache keyed by the full request; ``replay=True`` serves only from it.

Retries are our own small loop, not the openai client's (which runs with ``max_retries=0``). Reading the client
(openai 3.57, ``_base_client.py``): its backoff starts at a hard-coded 0.5 s with 0-25 % jitter, ignores
``Retry-After: 0``, refuses to retry past 120 s and backs off per request; we need configurable backoff, a
judge-wide pause on 429, per-reason failure counts and a retry counter. Like the client, we honour
``retry-after-ms`` and ``Retry-After`` (seconds or HTTP date) and ``x-should-retry``, and retry 408/409/429/5xx,
timeouts and connection errors with exponential backoff (jitter 50-100 %).

The async client runs on one event-loop thread owned by the judge (started lazily, restarted after pickling,
stopped by :meth:`close`); :meth:`rank` blocks on it, :meth:`submit` returns a future at once.

The API key is read from the environment variable ``api_key_env`` when the first request is made, handed to the
client and kept nowhere else: it is not an argument, not in ``repr``, ``state_dict``, pickles or the cache.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import ipaddress
import json
import logging
import math
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from cyclealign_pl.judges.base import Judge, Judgment, JudgeStop, RankRequest
from cyclealign_pl.judges.cache import CachedReply, JudgeCache, cache_key
from cyclealign_pl.judges.limits import BudgetGate, Cost, TokenBucket
from cyclealign_pl.judges.prompt import RankingTemplate, build_messages, load_template, parse_reply
from cyclealign_pl.ranking import Ranking

log = logging.getLogger(__name__)

FAILURE_KINDS = (
    "timeout", "connection", "rate_limit", "server_error", "http_error", "bad_response", "invalid_reply",
    "replay_miss",
)
_COUNTERS = (
    "prompts", "requests_sent", "cache_hits", "retries", "failures", "invalid_replies", "fallbacks",
    "prompt_tokens", "completion_tokens", "cost_usd", "requests_in_flight_max",
)
PLACEHOLDER_KEY = "sk-no-key-required"  # sent to loopback servers when api_key_env is unset
DEFAULT_BASE_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class _Call:
    """One chat-completions call: a permutation of one request's candidates."""

    request_index: int
    permutation: tuple[int, ...]
    messages: list[dict[str, str]]
    key: str


@dataclass(frozen=True)
class _Outcome:
    text: str | None = None
    kind: str | None = None  # failure kind (FAILURE_KINDS) when text is None
    reason: str | None = None


class _Runtime:
    """What does not pickle: the loop thread, the client, the cache connections, the limiters."""

    def __init__(self, judge: "OpenAIJudge") -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="OpenAIJudge-loop", daemon=True)
        self.thread.start()
        self.client: Any = None
        self.cache = JudgeCache(judge.cache_path) if judge.cache_path else None
        self.semaphore = asyncio.Semaphore(judge.max_concurrency)
        self.rpm = TokenBucket(judge.requests_per_minute) if judge.requests_per_minute else None
        self.tpm = TokenBucket(judge.tokens_per_minute) if judge.tokens_per_minute else None
        self.gate = BudgetGate(judge.budget_requests, judge.budget_tokens, judge.budget_usd, judge._spent)
        self.cooldown_until = 0.0
        self.in_flight = 0
        self.fatal: JudgeStop | None = None
        self.finalizer = weakref.finalize(self, _stop_loop, self.loop, self.thread)


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _display_url(url: str) -> str:
    """The URL without user:password, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"


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


def aggregate_rankings(rankings: Sequence[Ranking], num_candidates: int) -> Ranking:
    """Mean rank (Borda count) over several full rankings; ties go to the lower index (stable)."""
    total = [0.0] * num_candidates
    for ranking in rankings:
        for position, item in enumerate(ranking):
            total[item] += position
    return tuple(sorted(range(num_candidates), key=lambda i: (total[i] / len(rankings), i)))


class OpenAIJudge(Judge):
    """Ranks candidates with an LLM behind the chat-completions API (the paper: gpt-3.5-turbo-0613).

    Args:
        model: the model name the server knows.
        base_url: the API root (e.g. ``http://127.0.0.1:8000/v1`` for vLLM); None: ``OPENAI_BASE_URL`` or OpenAI.
        api_key_env: the environment variable holding the API key (read at first use, never stored). When it is
            unset and the server is on a loopback address, a placeholder key is sent.
        temperature, max_tokens: sampling settings of each request.
        request_timeout: hard wall-clock limit of one HTTP attempt, in seconds.
        max_retries: retries per request after the first attempt (429, 408, 409, 5xx, timeouts, connection).
        backoff_initial_s, backoff_max_s: exponential backoff between retries (times 0.5-1.0 random jitter).
        max_retry_after_s: the longest ``Retry-After`` honoured; a longer one fails the request.
        extra_headers: headers added to every request (never cached; their values are not shown in ``repr``).
        max_concurrency: requests in flight at most.
        requests_per_minute, tokens_per_minute: optional rate limits (token buckets).
        budget_requests, budget_tokens, budget_usd: optional hard budget (HTTP attempts, prompt + completion
            tokens, dollars); when the next request might exceed it, :meth:`rank` raises
            :class:`JudgeBudgetExceeded` without sending it.
        price_per_million_input_tokens, price_per_million_output_tokens: for ``cost_usd`` and ``budget_usd``.
        cache_path: SQLite file caching replies (None: no cache).
        replay: answer only from the cache, never send a request; a miss fails with reason ``"replay miss"``.
        template: a ranking template file (None: the packaged ``ranking_v1.txt``).
        shuffle_candidates: show the candidates in a per-request random order (seeded by the request's content
            and ``seed``) and map the ranking back: a control for position bias.
        num_permutations: ask this many orders (rotations of the base order, then random ones) and aggregate the
            valid rankings by mean rank.
        on_failure: for a prompt without a valid ranking: ``"skip"`` (a failed judgment, masked by the cycle),
            ``"fallback"`` (ask ``fallback``), ``"stop"`` (raise :class:`JudgeStop`).
        fallback: the judge asked under ``on_failure="fallback"``.
        seed: seeds the candidate shuffles and the backoff jitter.
    """

    def __init__(
        self,
        model: str = "gpt-3.5-turbo-0613",
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_tokens: int | None = 1024,
        request_timeout: float = 60.0,
        max_retries: int = 5,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        max_retry_after_s: float = 120.0,
        extra_headers: dict[str, str] | None = None,
        max_concurrency: int = 16,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        budget_requests: int | None = None,
        budget_tokens: int | None = None,
        budget_usd: float | None = None,
        price_per_million_input_tokens: float = 0.0,
        price_per_million_output_tokens: float = 0.0,
        cache_path: str | None = None,
        replay: bool = False,
        template: str | None = None,
        shuffle_candidates: bool = False,
        num_permutations: int = 1,
        on_failure: Literal["skip", "fallback", "stop"] = "skip",
        fallback: Judge | None = None,
        seed: int = 0,
    ) -> None:
        def positive(name: str, value: float | None, allow_none: bool = True) -> None:
            if value is None and allow_none:
                return
            if value is None or not value > 0:
                raise ValueError(f"OpenAIJudge: {name} must be > 0, got {value!r}")

        positive("request_timeout", request_timeout, allow_none=False)
        positive("max_concurrency", max_concurrency, allow_none=False)
        positive("num_permutations", num_permutations, allow_none=False)
        for name, value in (("max_tokens", max_tokens), ("requests_per_minute", requests_per_minute),
                            ("tokens_per_minute", tokens_per_minute), ("budget_requests", budget_requests),
                            ("budget_tokens", budget_tokens), ("budget_usd", budget_usd)):
            positive(name, value)
        for name, value in (("max_retries", max_retries), ("backoff_initial_s", backoff_initial_s),
                            ("backoff_max_s", backoff_max_s), ("max_retry_after_s", max_retry_after_s),
                            ("temperature", temperature),
                            ("price_per_million_input_tokens", price_per_million_input_tokens),
                            ("price_per_million_output_tokens", price_per_million_output_tokens)):
            if value < 0:
                raise ValueError(f"OpenAIJudge: {name} must be >= 0, got {value!r}")
        if on_failure not in ("skip", "fallback", "stop"):
            raise ValueError(f"OpenAIJudge: on_failure must be 'skip', 'fallback' or 'stop', got {on_failure!r}")
        if on_failure == "fallback" and fallback is None:
            raise ValueError("OpenAIJudge: on_failure='fallback' needs a fallback judge")
        if replay and not cache_path:
            raise ValueError("OpenAIJudge: replay=True needs a cache_path to replay from")
        if budget_usd is not None and price_per_million_input_tokens == 0 and price_per_million_output_tokens == 0:
            raise ValueError("OpenAIJudge: budget_usd needs price_per_million_input_tokens/output_tokens")
        if (budget_tokens is not None or budget_usd is not None) and max_tokens is None:
            raise ValueError("OpenAIJudge: budget_tokens/budget_usd need max_tokens (to bound each request's cost)")
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.request_timeout = float(request_timeout)
        self.max_retries = int(max_retries)
        self.backoff_initial_s = float(backoff_initial_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.extra_headers = dict(extra_headers or {})
        self.max_concurrency = int(max_concurrency)
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.budget_requests = budget_requests
        self.budget_tokens = budget_tokens
        self.budget_usd = budget_usd
        self.price_per_million_input_tokens = float(price_per_million_input_tokens)
        self.price_per_million_output_tokens = float(price_per_million_output_tokens)
        self.cache_path = cache_path
        self.replay = replay
        self.template_path = template
        self.template: RankingTemplate = load_template(template)  # fail now on a bad template file
        self.shuffle_candidates = shuffle_candidates
        self.num_permutations = int(num_permutations)
        self.on_failure = on_failure
        self.fallback = fallback
        self.seed = int(seed)
        self._counters: dict[str, float] = dict.fromkeys(_COUNTERS, 0.0)
        self._counters.update({f"failures/{kind}": 0.0 for kind in FAILURE_KINDS})
        self._counter_lock = threading.Lock()
        self._rt: _Runtime | None = None
        self._rt_lock = threading.Lock()
        self._jitter = random.Random(self.seed)

    # -------------------------------------------------------------------------------------- public API

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        """Rank every request (concurrently); blocks until all are answered or failed."""
        future = self.submit(requests)
        rt = self._runtime()
        while True:
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:
                if not rt.thread.is_alive():
                    raise JudgeStop("OpenAIJudge: its event-loop thread died") from None

    def submit(self, requests: Sequence[RankRequest]) -> "Future[list[Judgment]]":
        """Start ranking in the judge's event loop and return its future at once."""
        rt = self._runtime()
        return asyncio.run_coroutine_threadsafe(self._rank_async(rt, list(requests)), rt.loop)

    def metrics(self) -> dict[str, float]:
        """Cumulative counters: requests, cache hits, retries, failures (total and per reason), tokens, cost."""
        with self._counter_lock:
            return dict(self._counters)

    def state_dict(self) -> dict[str, Any]:
        """The counters, budget spent included, so a resumed run keeps what it spent."""
        return {"counters": self.metrics()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counters = state.get("counters", {})
        with self._counter_lock:
            for name, value in counters.items():
                if name in self._counters:
                    self._counters[name] = float(value)

    def close(self) -> None:
        """Stop the event-loop thread, close the HTTP client and the cache connections."""
        with self._rt_lock:
            rt, self._rt = self._rt, None
        if rt is not None and rt.pid == os.getpid():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(rt), rt.loop).result(timeout=10)
            except Exception as err:  # closing must not raise because a connection was already broken
                log.debug("OpenAIJudge: error while closing: %r", err)
            rt.finalizer()
            if rt.cache is not None:
                rt.cache.close()
        if self.fallback is not None:
            self.fallback.close()
        super().close()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in ("_rt", "_rt_lock", "_counter_lock"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._rt = None
        self._rt_lock = threading.Lock()
        self._counter_lock = threading.Lock()

    def __repr__(self) -> str:
        headers = "{" + ", ".join(f"{k!r}: '***'" for k in self.extra_headers) + "}"
        return (
            f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency}, "
            f"request_timeout={self.request_timeout}, max_retries={self.max_retries}, "
            f"cache_path={self.cache_path!r}, replay={self.replay}, template={self.template.version!r}, "
            f"shuffle_candidates={self.shuffle_candidates}, num_permutations={self.num_permutations}, "
            f"on_failure={self.on_failure!r}, extra_headers={headers})"
        )

    # ------------------------------------------------------------------------------------------ internals

    def _runtime(self) -> _Runtime:
        with self._rt_lock:
            if self._rt is None or self._rt.pid != os.getpid():  # first use, or a forked child
                self._rt = _Runtime(self)
            return self._rt

    def _bump(self, name: str, value: float = 1.0) -> None:
        with self._counter_lock:
            self._counters[name] += value

    def _spent(self) -> Cost:
        with self._counter_lock:
            c = self._counters
            return Cost(c["requests_sent"], c["prompt_tokens"] + c["completion_tokens"], c["cost_usd"])

    def _cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.price_per_million_input_tokens
                + completion_tokens * self.price_per_million_output_tokens) / 1e6

    def _permutations(self, request: RankRequest) -> list[tuple[int, ...]]:
        """The orders to show: rotations of the base order (shuffled when asked), then seeded random ones."""
        n = len(request.candidates)
        digest = hashlib.sha256(
            json.dumps([self.seed, request.instruction, list(request.candidates)], ensure_ascii=False).encode()
        ).digest()
        rng = random.Random(digest)
        base = list(range(n))
        if self.shuffle_candidates:
            rng.shuffle(base)
        out = []
        for j in range(self.num_permutations):
            if j < n:
                out.append(tuple(base[j:] + base[:j]))
            else:
                extra = list(range(n))
                rng.shuffle(extra)
                out.append(tuple(extra))
        return out

    def _calls(self, requests: Sequence[RankRequest]) -> list[_Call]:
        calls = []
        for index, request in enumerate(requests):
            for perm in self._permutations(request):
                shown = RankRequest(request.instruction, tuple(request.candidates[i] for i in perm),
                                    request.demonstrations)
                messages = build_messages(shown, self.template)
                key = cache_key(model=self.model, template_version=self.template.version, messages=messages,
                                temperature=self.temperature, max_tokens=self.max_tokens, permutation=perm)
                calls.append(_Call(index, perm, messages, key))
        return calls

    def _deadline(self, num_calls: int) -> float:
        """A bound on one rank() call's request phase: if it passes, something is broken, not slow."""
        per_call = (self.max_retries + 1) * self.request_timeout + self.max_retries * max(
            self.backoff_max_s, self.max_retry_after_s)
        waves = math.ceil(num_calls / self.max_concurrency)
        limiter = num_calls * 60.0 / self.requests_per_minute if self.requests_per_minute else 0.0
        if self.tokens_per_minute:
            limiter += num_calls * 60.0 * (self.max_tokens or 4096) / self.tokens_per_minute
        return waves * per_call + limiter + 60.0

    async def _rank_async(self, rt: _Runtime, requests: list[RankRequest]) -> list[Judgment]:
        for i, request in enumerate(requests):
            if not request.candidates:
                raise ValueError(f"OpenAIJudge: request {i} has no candidates")
        calls = self._calls(requests)
        outcomes: dict[int, _Outcome] = {}
        pending = []
        for j, call in enumerate(calls):
            cached = rt.cache.get(call.key) if rt.cache is not None else None
            if cached is not None:
                self._bump("cache_hits")
                outcomes[j] = _Outcome(text=cached.text)
            elif self.replay:
                outcomes[j] = _Outcome(kind="replay_miss", reason="replay miss")
            else:
                pending.append(j)
        if pending:
            deadline = self._deadline(len(pending))
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(self._request(rt, calls[j]) for j in pending), return_exceptions=True),
                    timeout=deadline,
                )
            except asyncio.TimeoutError:
                raise JudgeStop(f"OpenAIJudge: {len(pending)} requests did not finish within {deadline:.0f} s") \
                    from None
            stop: BaseException | None = None
            for j, result in zip(pending, results):
                if isinstance(result, BaseException):
                    stop = stop or result
                else:
                    outcomes[j] = result
            if stop is not None:
                raise stop
        self._bump("prompts", len(requests))
        judgments = self._judgments(requests, calls, outcomes)
        return await self._apply_policy(requests, judgments)

    def _judgments(
        self, requests: list[RankRequest], calls: list[_Call], outcomes: dict[int, _Outcome]
    ) -> list[Judgment]:
        by_request: list[list[tuple[_Call, _Outcome]]] = [[] for _ in requests]
        for j, call in enumerate(calls):
            by_request[call.request_index].append((call, outcomes[j]))
        judgments = []
        for request, pairs in zip(requests, by_request):
            n = len(request.candidates)
            rankings: list[Ranking] = []
            better = raw = None
            first_failure: tuple[str, str] | None = None
            for call, outcome in pairs:
                raw = raw if raw is not None else outcome.text
                if outcome.text is None:
                    first_failure = first_failure or (str(outcome.kind), str(outcome.reason))
                    continue
                parsed = parse_reply(outcome.text, n)
                if parsed.ranking is None:
                    self._bump("invalid_replies")
                    first_failure = first_failure or ("invalid_reply", f"invalid reply: {parsed.failure}")
                    continue
                rankings.append(tuple(call.permutation[s] for s in parsed.ranking))
                better = better if better is not None else parsed.better_response
            if rankings:
                judgments.append(Judgment(aggregate_rankings(rankings, n), better_response=better, raw=raw))
            else:
                assert first_failure is not None
                kind, reason = first_failure
                self._bump("failures")
                self._bump(f"failures/{kind}")
                log.warning("OpenAIJudge: no ranking for a prompt (%s)", reason)
                judgments.append(Judgment.failed(reason, raw=raw))
        return judgments

    async def _apply_policy(self, requests: list[RankRequest], judgments: list[Judgment]) -> list[Judgment]:
        failed = [i for i, j in enumerate(judgments) if not j.ok]
        if not failed or self.on_failure == "skip":
            return judgments
        if self.on_failure == "stop":
            raise JudgeStop(
                f"OpenAIJudge (on_failure='stop'): {len(failed)} of {len(judgments)} prompts got no ranking; "
                f"first reason: {judgments[failed[0]].failure}"
            )
        assert self.fallback is not None
        answers = await asyncio.to_thread(self.fallback.rank, [requests[i] for i in failed])
        out = list(judgments)
        for i, answer in zip(failed, answers):
            if answer.ok:
                self._bump("fallbacks")
            out[i] = answer
        return out

    async def _client(self, rt: _Runtime) -> Any:
        if rt.client is None:
            import httpx2
            import openai

            url = self.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
            key = os.environ.get(self.api_key_env)
            if not key:
                if not _is_loopback(url):
                    raise JudgeStop(
                        f"OpenAIJudge: the environment variable {self.api_key_env} is not set (or empty), and the "
                        f"server at {_display_url(url)} needs an API key. Set it, or set api_key_env to the "
                        "variable that holds the key."
                    )
                key = PLACEHOLDER_KEY
            rt.client = openai.AsyncOpenAI(
                api_key=key,
                base_url=self.base_url,
                max_retries=0,
                timeout=self.request_timeout,
                default_headers=self.extra_headers or None,
                http_client=openai.DefaultAsyncHttpxClient(
                    timeout=httpx2.Timeout(self.request_timeout, connect=min(self.request_timeout, 10.0)),
                    limits=httpx2.Limits(max_connections=self.max_concurrency,
                                         max_keepalive_connections=self.max_concurrency),
                ),
            )
        return rt.client

    def _upper_bound(self, call: _Call) -> Cost:
        """The most one attempt can cost: a byte-level BPE token count never exceeds the byte count."""
        prompt = sum(len(m["content"].encode("utf-8")) + 16 for m in call.messages)
        completion = self.max_tokens or 0
        return Cost(1.0, float(prompt + completion), self._cost(prompt, completion))

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_initial_s * 2.0**attempt) * self._jitter.uniform(0.5, 1.0)

    async def _request(self, rt: _Runtime, call: _Call) -> _Outcome:
        async with rt.semaphore:
            return await self._with_retries(rt, call)

    async def _with_retries(self, rt: _Runtime, call: _Call) -> _Outcome:
        import openai

        client = await self._client(rt)
        url = _display_url(str(client.base_url))
        bound = self._upper_bound(call)
        rate_tokens = sum(len(m["content"]) for m in call.messages) / 4 + (self.max_tokens or 0)
        outcome = _Outcome(kind="connection", reason="not sent")
        for attempt in range(self.max_retries + 1):
            if rt.fatal is not None:
                raise rt.fatal
            pause = rt.cooldown_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            if rt.tpm is not None:
                await rt.tpm.acquire(rate_tokens)
            if rt.rpm is not None:
                await rt.rpm.acquire(1.0)
            await rt.gate.reserve(bound)
            self._bump("requests_sent")
            if attempt:
                self._bump("retries")
            rt.in_flight += 1
            with self._counter_lock:
                self._counters["requests_in_flight_max"] = max(self._counters["requests_in_flight_max"],
                                                               float(rt.in_flight))
            retry_after: float | None = None
            retryable = True
            try:
                response = await asyncio.wait_for(
                    client.chat.completions.create(
                        model=self.model, messages=call.messages, temperature=self.temperature,
                        max_tokens=self.max_tokens if self.max_tokens is not None else openai.omit,
                        timeout=self.request_timeout,
                    ),
                    timeout=self.request_timeout,
                )
                text, usage = self._read(response)
                if usage is not None:
                    self._bump("prompt_tokens", usage[0])
                    self._bump("completion_tokens", usage[1])
                    self._bump("cost_usd", self._cost(*usage))
                self._store(rt, call, text, usage)
                return _Outcome(text=text)
            except (asyncio.TimeoutError, openai.APITimeoutError):
                outcome = _Outcome(kind="timeout", reason=(
                    f"timeout: no reply from {url} within {self.request_timeout:g} s ({attempt + 1} attempts)"))
            except openai.APIConnectionError as err:
                cause = err.__cause__ or err
                outcome = _Outcome(kind="connection", reason=(
                    f"connection: cannot reach {url} ({type(cause).__name__}: {cause}) ({attempt + 1} attempts)"))
            except openai.APIStatusError as err:
                status = err.status_code
                headers = err.response.headers
                retry_after = retry_after_seconds(headers)
                if status in (401, 403, 404):
                    what = {401: "the API key was refused", 403: "access is denied",
                            404: f"model {self.model!r} or the URL was not found"}[status]
                    rt.fatal = JudgeStop(
                        f"OpenAIJudge: HTTP {status} from {url}: {what} (check model, base_url and the key in "
                        f"{self.api_key_env})"
                    )
                    raise rt.fatal from None
                kind = "rate_limit" if status == 429 else "server_error" if status >= 500 else "http_error"
                should = headers.get("x-should-retry")
                retryable = should == "true" if should in ("true", "false") else status in (408, 409, 429) \
                    or status >= 500
                outcome = _Outcome(kind=kind, reason=f"{kind}: HTTP {status} from {url} ({attempt + 1} attempts)")
            except (openai.APIResponseValidationError, ValueError, KeyError, TypeError, AttributeError) as err:
                retryable = False
                outcome = _Outcome(kind="bad_response", reason=(
                    f"bad_response: {url} answered with something that is not a chat completion "
                    f"({type(err).__name__})"))
            finally:
                rt.in_flight -= 1
                await rt.gate.release(bound)
            if not retryable or attempt == self.max_retries:
                break
            if retry_after is not None and retry_after > self.max_retry_after_s:
                outcome = _Outcome(kind=outcome.kind, reason=(
                    f"{outcome.reason}; the server asked to wait {retry_after:g} s, more than "
                    f"max_retry_after_s={self.max_retry_after_s:g}"))
                break
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            if outcome.kind == "rate_limit":  # pause everyone, not just this request: no storm of retries
                rt.cooldown_until = max(rt.cooldown_until, time.monotonic() + delay)
            log.info("OpenAIJudge: %s; retry %d/%d in %.2f s", outcome.reason, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)
        return outcome

    @staticmethod
    def _store(rt: _Runtime, call: _Call, text: str, usage: tuple[int, int] | None) -> None:
        if rt.cache is None:
            return
        try:
            rt.cache.put(call.key, CachedReply(text, *(usage or (0, 0))))
        except sqlite3.Error as err:  # the reply is still good; a rerun will pay for it again
            log.warning("OpenAIJudge: could not write to the cache %s: %s", rt.cache.path, err)

    @staticmethod
    def _read(response: Any) -> tuple[str, tuple[int, int] | None]:
        """The reply text and (prompt, completion) tokens of a chat completion; ValueError if it is not one."""
        if isinstance(response, (str, bytes)) or not getattr(response, "choices", None):
            raise ValueError("no choices")
        text = response.choices[0].message.content or ""
        usage = getattr(response, "usage", None)
        tokens = (int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0)) if usage is not None else None
        return text, tokens

    async def _shutdown(self, rt: _Runtime) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if rt.client is not None:
            await rt.client.close()


__all__ = ["FAILURE_KINDS", "OpenAIJudge", "aggregate_rankings", "retry_after_seconds"]
