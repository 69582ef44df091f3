"""The black-box judge: any chat-completions server (OpenAI, Azure, vLLM, Ollama, llama.cpp, TGI).

What it does about the usual complaints on API judges:

* **hangs** - every request has a hard wall-clock timeout, every wait is bounded, and a whole ``rank()`` call
  has a computed deadline; a dead server gives counted failures, not a stuck job.
* **retry exhaustion killing the run** - a reply that never comes or cannot be parsed fails *that prompt* with
  a reason (``on_failure="skip"``: the cycle masks it; ``"fallback"``: another judge answers; ``"stop"``: a
  clean :class:`JudgeStop`). Only a spent budget or a configuration error (bad key, unknown model) stops the
  run.
* **request storms** - at most ``max_concurrency`` requests in flight, optional requests/tokens-per-minute
  token buckets, and a 429 pauses *all* requests until its ``Retry-After`` (not just the one that got it).
* **paying twice** - an SQLite cache keyed by the full request; ``replay=True`` serves only from it.

This module turns rank requests into chat calls and replies into judgments (prompt, permutations, cache,
failure policy); :mod:`cyclealign_pl.judges.transport` sends one call robustly (retries, limits, budget). The
async client runs on one event-loop thread owned by the judge (started lazily, restarted after pickling or in
a forked child, stopped by :meth:`close`); :meth:`rank` blocks on it, :meth:`submit` returns a future at once.
:meth:`complete` lends the same path (cache, replay, transport) to other prompts, such as the pairwise
comparisons of :mod:`cyclealign_pl.compare`.

The API key is read from the environment variable ``api_key_env`` when the first request is made, handed to
the client and kept nowhere else: it is not an argument, not in ``repr``, ``state_dict``, pickles or the
cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Literal

from cyclealign_pl.judges.base import Judge, JudgeStop, Judgment, RankRequest
from cyclealign_pl.judges.cache import CachedReply, JudgeCache, cache_key
from cyclealign_pl.judges.prompt import RankingTemplate, build_messages, load_template, parse_reply
from cyclealign_pl.judges.transport import PLACEHOLDER_KEY, ChatReply, ChatSettings, ChatTransport, Counters
from cyclealign_pl.ranking import Ranking

log = logging.getLogger(__name__)

# why a prompt got no ranking; each is counted as ``failures/<kind>`` (judge/failures/<kind> in the logs)
JUDGMENT_FAILURE_KINDS = (
    "timeout", "connection", "rate_limit", "server_error", "http_error", "bad_response", "invalid_reply",
    "replay_miss",
)
_COUNTERS = (
    "prompts", "requests_sent", "cache_hits", "retries", "failures", "invalid_replies", "fallbacks",
    "prompt_tokens", "completion_tokens", "cost_usd", "requests_in_flight_max", "usage_estimated",
)


@dataclass(frozen=True)
class ChatCall:
    """One chat-completions call and its cache key (see :meth:`OpenAIJudge.complete`)."""

    messages: list[dict[str, str]]
    key: str


@dataclass(frozen=True)
class _Call(ChatCall):
    """A ranking call: a permutation of one request's candidates."""

    request_index: int = 0
    permutation: tuple[int, ...] = ()


class _Runtime:
    """What does not pickle: the loop thread, the transport (client, limiters), the cache connections."""

    def __init__(self, judge: "OpenAIJudge") -> None:
        self.pid = os.getpid()
        self.cache = JudgeCache(judge.cache_path) if judge.cache_path else None  # may fail: before the thread
        self.transport = ChatTransport(judge._settings(), judge._counters, seed=judge.seed)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="OpenAIJudge-loop", daemon=True)
        self.thread.start()
        self.finalizer = weakref.finalize(self, _stop_loop, self.loop, self.thread)


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
        if threading.current_thread() is thread:  # collected on its own loop: it stops after this callback
            return
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


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
        base_url: the API root (e.g. ``http://127.0.0.1:8000/v1`` for vLLM); None: ``OPENAI_BASE_URL``, else
            OpenAI.
        api_key_env: the environment variable holding the API key (read at first use, never stored). When it
            is unset and the server is on a loopback address, a placeholder key is sent.
        temperature, max_tokens: sampling settings of each request.
        request_timeout: hard wall-clock limit of one HTTP attempt, in seconds.
        max_retries: retries per request after the first attempt (429, 408, 409, 5xx, timeouts, connection).
        backoff_initial_s, backoff_max_s: exponential backoff between retries (times 0.5-1.0 random jitter).
        max_retry_after_s: the longest ``Retry-After`` honoured; a longer one fails the request.
        extra_headers: headers added to every request (never cached; values not shown in ``repr``). A value
            ``"env:NAME"`` is read from the environment variable NAME at first use, for secrets such as
            Azure's ``api-key`` header, which must not be written into a config file.
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
        num_permutations: ask this many orders (rotations of the base order, then random ones) and aggregate
            the valid rankings by mean rank.
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
            raise ValueError(
                f"OpenAIJudge: on_failure must be 'skip', 'fallback' or 'stop', got {on_failure!r}"
            )
        if on_failure == "fallback" and fallback is None:
            raise ValueError("OpenAIJudge: on_failure='fallback' needs a fallback judge")
        if replay and not cache_path:
            raise ValueError("OpenAIJudge: replay=True needs a cache_path to replay from")
        unpriced = price_per_million_input_tokens == 0 and price_per_million_output_tokens == 0
        if budget_usd is not None and unpriced:
            raise ValueError("OpenAIJudge: budget_usd needs price_per_million_input_tokens/output_tokens")
        if (budget_tokens is not None or budget_usd is not None) and max_tokens is None:
            raise ValueError(
                "OpenAIJudge: budget_tokens/budget_usd need max_tokens (to bound each request's cost)"
            )
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
        self.template = template
        self.ranking_template: RankingTemplate = load_template(template)  # fail now on a bad template file
        self.shuffle_candidates = shuffle_candidates
        self.num_permutations = int(num_permutations)
        self.on_failure = on_failure
        self.fallback = fallback
        self.seed = int(seed)
        self._counters = Counters([*_COUNTERS, *(f"failures/{kind}" for kind in JUDGMENT_FAILURE_KINDS)])
        self._rt: _Runtime | None = None
        self._rt_lock = threading.Lock()

    # -------------------------------------------------------------------------------------- public API

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        """Rank every request (concurrently); blocks until all are answered or failed."""
        return self._wait(self.submit(requests))

    def complete(self, messages: Sequence[list[dict[str, str]]], *, template_version: str) -> list[ChatReply]:
        """Send other prompts than rankings (e.g. pairwise comparisons) the way :meth:`rank` sends its own.

        The same concurrency cap, rate limits, retries (honouring ``Retry-After``), timeouts, hard budget,
        SQLite cache and ``replay`` apply; the cache key is :meth:`chat_key`. Blocks until every call has a
        reply or a failure (``ChatReply.text is None``, with ``kind`` and ``reason``); reading the replies is
        the caller's job, so failures are counted in the caller's terms, not in this judge's ``failures``.
        Raises :class:`JudgeStop` (budget spent, bad key or model) after the calls in flight have ended;
        the replies that came are cached.
        """
        calls = [ChatCall(list(m), self.chat_key(m, template_version)) for m in messages]
        rt = self._runtime()
        return self._wait(asyncio.run_coroutine_threadsafe(self._complete_async(rt, calls), rt.loop))

    def chat_key(self, messages: Sequence[dict[str, str]], template_version: str) -> str:
        """The cache key of one :meth:`complete` call: its messages and all else that shapes the reply."""
        return cache_key(model=self.model, template_version=template_version, messages=messages,
                         temperature=self.temperature, max_tokens=self.max_tokens, permutation=())

    def submit(self, requests: Sequence[RankRequest]) -> "Future[list[Judgment]]":
        """Start ranking in the judge's event loop and return its future at once."""
        rt = self._runtime()
        return asyncio.run_coroutine_threadsafe(self._rank_async(rt, list(requests)), rt.loop)

    def metrics(self) -> dict[str, float]:
        """Cumulative counters: requests, cache hits, retries, failures (total, per reason), tokens, cost."""
        return self._counters.snapshot()

    def state_dict(self) -> dict[str, Any]:
        """The counters, budget spent included, so a resumed run keeps what it spent."""
        return {"counters": self.metrics()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._counters.load(state.get("counters", {}))

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
        for name in ("_rt", "_rt_lock"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._rt = None
        self._rt_lock = threading.Lock()

    def __repr__(self) -> str:
        headers = "{" + ", ".join(f"{k!r}: '***'" for k in self.extra_headers) + "}"
        return (
            f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency}, "
            f"request_timeout={self.request_timeout}, max_retries={self.max_retries}, "
            f"cache_path={self.cache_path!r}, replay={self.replay}, "
            f"template={self.ranking_template.version!r}, "
            f"shuffle_candidates={self.shuffle_candidates}, num_permutations={self.num_permutations}, "
            f"on_failure={self.on_failure!r}, extra_headers={headers})"
        )

    # ------------------------------------------------------------------------------------------ internals

    def _wait(self, future: "Future[Any]") -> Any:
        """The future's result, checking that the loop thread is alive (a dead thread would never answer)."""
        rt = self._runtime()
        while True:
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:
                if not rt.thread.is_alive():
                    raise JudgeStop("OpenAIJudge: its event-loop thread died") from None

    def _runtime(self) -> _Runtime:
        with self._rt_lock:
            if self._rt is None or self._rt.pid != os.getpid():  # first use, or a forked child
                self._rt = _Runtime(self)
            return self._rt

    def _settings(self) -> ChatSettings:
        return ChatSettings(
            model=self.model, base_url=self.base_url, api_key_env=self.api_key_env,
            temperature=self.temperature, max_tokens=self.max_tokens, request_timeout=self.request_timeout,
            max_retries=self.max_retries,
            backoff_initial_s=self.backoff_initial_s, backoff_max_s=self.backoff_max_s,
            max_retry_after_s=self.max_retry_after_s, max_concurrency=self.max_concurrency,
            extra_headers=tuple(self.extra_headers.items()), requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute, budget_requests=self.budget_requests,
            budget_tokens=self.budget_tokens, budget_usd=self.budget_usd,
            price_per_million_input_tokens=self.price_per_million_input_tokens,
            price_per_million_output_tokens=self.price_per_million_output_tokens,
        )

    def _permutations(self, request: RankRequest) -> list[tuple[int, ...]]:
        """The orders to show: rotations of the base order (shuffled when asked), then seeded random ones."""
        n = len(request.candidates)
        content = json.dumps([self.seed, request.instruction, list(request.candidates)], ensure_ascii=False)
        digest = hashlib.sha256(content.encode("utf-8")).digest()
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
            if not request.candidates:
                raise ValueError(f"OpenAIJudge: request {index} has no candidates")
            for perm in self._permutations(request):
                shown = RankRequest(request.instruction, tuple(request.candidates[i] for i in perm),
                                    request.demonstrations)
                messages = build_messages(shown, self.ranking_template)
                key = cache_key(model=self.model, template_version=self.ranking_template.version,
                                messages=messages, temperature=self.temperature, max_tokens=self.max_tokens,
                                permutation=perm)
                calls.append(_Call(messages, key, request_index=index, permutation=perm))
        return calls

    async def _rank_async(self, rt: _Runtime, requests: list[RankRequest]) -> list[Judgment]:
        calls = self._calls(requests)
        replies = dict(enumerate(await self._complete_async(rt, calls)))
        self._counters.bump("prompts", len(requests))
        return await self._apply_policy(requests, self._judgments(requests, calls, replies))

    async def _complete_async(self, rt: _Runtime, calls: Sequence[ChatCall]) -> list[ChatReply]:
        """Each call's reply: from the cache, a replay miss, or sent (concurrently) and then cached."""
        replies: dict[int, ChatReply] = {}
        pending = []
        for j, call in enumerate(calls):
            cached = rt.cache.get(call.key) if rt.cache is not None else None
            if cached is not None:
                self._counters.bump("cache_hits")
                usage = (cached.prompt_tokens, cached.completion_tokens)
                replies[j] = ChatReply(text=cached.text, usage=usage)
            elif self.replay:
                replies[j] = ChatReply(kind="replay_miss", reason="replay miss")
            else:
                pending.append(j)
        if pending:
            replies.update(await self._send(rt, [calls[j] for j in pending], pending))
        return [replies[j] for j in range(len(calls))]

    async def _send(self, rt: _Runtime, calls: list[ChatCall], slots: list[int]) -> dict[int, ChatReply]:
        """Send the calls concurrently, cache each reply as it comes; raise a JudgeStop after all ended."""

        async def one(call: ChatCall) -> ChatReply:
            reply = await rt.transport.complete(call.messages)
            if reply.text is not None and rt.cache is not None:
                try:
                    rt.cache.put(call.key, CachedReply(reply.text, *reply.usage))
                except sqlite3.Error as err:  # the reply is still good; only a rerun would pay for it again
                    log.warning("OpenAIJudge: could not write to the cache %s: %s", rt.cache.path, err)
            return reply

        deadline = rt.transport.settings.deadline(len(calls))
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(one(call) for call in calls), return_exceptions=True), timeout=deadline
            )
        except asyncio.TimeoutError:
            message = f"OpenAIJudge: {len(calls)} requests did not finish within {deadline:.0f} s"
            raise JudgeStop(message) from None
        stop = next((r for r in results if isinstance(r, BaseException)), None)
        if stop is not None:  # budget spent or bad configuration; the replies that came are cached
            raise stop
        return dict(zip(slots, results))  # type: ignore[arg-type]

    def _judgments(
        self, requests: list[RankRequest], calls: list[_Call], replies: dict[int, ChatReply]
    ) -> list[Judgment]:
        by_request: list[list[tuple[_Call, ChatReply]]] = [[] for _ in requests]
        for j, call in enumerate(calls):
            by_request[call.request_index].append((call, replies[j]))
        judgments = []
        for request, pairs in zip(requests, by_request):
            n = len(request.candidates)
            rankings: list[Ranking] = []
            better = raw = None
            first_failure: tuple[str, str] | None = None
            for call, reply in pairs:
                raw = raw if raw is not None else reply.text
                if reply.text is None:
                    first_failure = first_failure or (str(reply.kind), str(reply.reason))
                    continue
                parsed = parse_reply(reply.text, n)
                if parsed.ranking is None:
                    self._counters.bump("invalid_replies")
                    first_failure = first_failure or ("invalid_reply", f"invalid reply: {parsed.failure}")
                    continue
                # back to the original indices: shown position s held candidate permutation[s]
                rankings.append(tuple(call.permutation[s] for s in parsed.ranking))
                better = better if better is not None else parsed.better_response
            if rankings:
                judgments.append(Judgment(aggregate_rankings(rankings, n), better_response=better, raw=raw))
            else:
                assert first_failure is not None
                kind, reason = first_failure
                self._counters.bump("failures")
                self._counters.bump(f"failures/{kind}")
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
                self._counters.bump("fallbacks")
            out[i] = answer
        return out

    @staticmethod
    async def _shutdown(rt: _Runtime) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await rt.transport.aclose()


__all__ = ["JUDGMENT_FAILURE_KINDS", "PLACEHOLDER_KEY", "ChatCall", "ChatReply", "OpenAIJudge", "aggregate_rankings"]
