"""A chat-completions client for judges and tools: cache, replay, robust sending, a spend ledger, a preflight.

Whatever asks an LLM something (the ranking judge, ``compare.py``'s pairwise comparisons) goes through one
:class:`ChatClient`, so caching, budgets and the spend ledger hold for every caller (docs/judges.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cyclealign_pl.judges.base import JudgeStop, JudgeUnavailable
from cyclealign_pl.judges.cache import CachedReply, JudgeCache, cache_key
from cyclealign_pl.judges.counters import Counters
from cyclealign_pl.judges.ledger import SpendLedger
from cyclealign_pl.judges.limits import BudgetGate, Cost
from cyclealign_pl.judges.preflight import preflight
from cyclealign_pl.judges.request import ChatReply
from cyclealign_pl.judges.settings import ChatSettings
from cyclealign_pl.judges.transport import ChatTransport

log = logging.getLogger(__name__)

T = TypeVar("T")
LEDGER_FILE = "judge_ledger.sqlite"  # in the run directory, apart from the cache
UNBOUND_RUN = "unbound"  # the run id of the private in-memory ledger, before bind_run
SPEND = ("requests_sent", "prompt_tokens", "completion_tokens", "cost_usd")  # from the ledger
CLIENT_COUNTERS = (
    "cache_hits",
    "retries",
    "requests_in_flight_max",
    "usage_estimated",
    "structured_output_fallbacks",  # the server refused a form of structured output (structured.py)
    "timeouts_queued",  # timeouts while other requests got replies: the server's queue, not a dead server
    "concurrency_limit",  # the adaptive limit of requests in flight, now
)
_LEDGER_SLACK_S = 60.0  # beyond request_timeout, before an unsettled request of another process is dead


@dataclass(frozen=True)
class ChatCall:
    """One chat-completions call and its cache key (:meth:`ChatClient.key`); ``schema``: ask for JSON that
    follows it (structured output, in the form ``structured_output`` first: structured.py)."""

    messages: list[dict[str, str]]
    key: str
    schema: dict[str, Any] | None = None
    structured_output: str = "json_schema"


class _Runtime:
    """What does not pickle: the loop thread, the transport (HTTP client, limiters), the cache connections."""

    def __init__(self, client: ChatClient) -> None:
        s = client.settings
        self.pid = os.getpid()
        self.cache = JudgeCache(s.cache_path) if s.cache_path else None  # may fail: before the thread
        ledger = weakref.WeakMethod(client._spend_ledger)  # no cycle: a dropped client stops its loop at once
        gate = BudgetGate(s.budget, lambda: ledger()())  # type: ignore[misc]
        self.transport = ChatTransport(s, client.counters, gate, seed=client.seed, name=client.name)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"{client.name}-loop", daemon=True)
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


class ChatClient:
    """Sends chat completions with a cache, a spend ledger and a preflight check, from its own event-loop
    thread (one per process; :meth:`close` stops it).

    Args:
        settings: the server, its limits and budget, the cache.
        seed: seeds the backoff jitter.
        name: who is asking, for messages and the loop thread's name (e.g. ``OpenAIJudge``).
    """

    def __init__(self, settings: ChatSettings, *, seed: int = 0, name: str = "judge") -> None:
        self.settings = settings
        self.seed = int(seed)
        self.name = name
        self.counters = Counters(CLIENT_COUNTERS)
        self.run: tuple[str, str] | None = None  # (run id, ledger file) once bound
        self._floor = Cost()  # spend known from a checkpoint: no ledger of this client may show less
        self._ledger: SpendLedger | None = None
        self._ledger_pid = 0
        self._rt: _Runtime | None = None
        self._lock = threading.RLock()

    # -------------------------------------------------------------------------------------- public API

    def key(
        self,
        messages: Sequence[dict[str, str]],
        template_version: str,
        permutation: Sequence[int] = (),
        schema: Mapping[str, Any] | None = None,
    ) -> str:
        """The cache key of one call: its messages and everything else that shapes the reply."""
        s = self.settings
        return cache_key(
            model=s.model,
            template_version=template_version,
            messages=messages,
            temperature=s.temperature,
            max_tokens=s.max_tokens,
            permutation=permutation,
            schema=schema,
        )

    def complete(
        self,
        messages: Sequence[list[dict[str, str]]],
        *,
        template_version: str,
        schema: Mapping[str, Any] | None = None,
        structured_output: str = "json_schema",
    ) -> list[ChatReply]:
        """Send these prompts (concurrently) and block until each has a reply or a failure.

        A failure is ``ChatReply.text is None`` with ``kind`` and ``reason``; reading the replies is the
        caller's job. Raises :class:`JudgeStop` (budget spent, judge unavailable) after the calls in flight
        have ended; the replies that came are cached.
        """
        calls = [
            ChatCall(list(m), self.key(m, template_version, schema=schema), schema, structured_output)
            for m in messages
        ]
        return self.wait(self.submit(self.send, calls))

    async def send(self, calls: Sequence[ChatCall]) -> list[ChatReply]:
        """Each call's reply: from the cache, a replay miss, or sent and then cached.

        Runs on the client's loop (in a coroutine given to :meth:`submit`).
        """
        rt = self._runtime()
        replies: dict[int, ChatReply] = {}
        pending = []
        for j, call in enumerate(calls):
            cached = rt.cache.get(call.key) if rt.cache is not None else None
            if cached is not None:
                self.counters.bump("cache_hits")
                usage = (cached.prompt_tokens, cached.completion_tokens)
                replies[j] = ChatReply(text=cached.text, usage=usage)
            elif self.settings.replay:
                replies[j] = ChatReply(kind="replay_miss", reason="replay miss")
            else:
                pending.append(j)
        if pending:
            replies.update(await self._send(rt, [calls[j] for j in pending], pending))
        return [replies[j] for j in range(len(calls))]

    def submit(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the client's event loop; its future, at once."""
        rt = self._runtime()
        return asyncio.run_coroutine_threadsafe(fn(*args), rt.loop)

    def wait(self, future: Future[T]) -> T:
        """The future's result, checking that the loop thread is alive (a dead thread would never answer)."""
        rt = self._runtime()
        while True:
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:
                if not rt.thread.is_alive():
                    raise JudgeStop(f"{self.name}: its event-loop thread died") from None

    def preflight(self) -> None:
        """Raise :class:`JudgeUnavailable` (one line naming the URL) unless the server answers and serves the
        model, within seconds. In replay mode nothing is sent: only the cache is checked for replies."""
        if self.settings.replay:
            cache = self._runtime().cache
            if cache is not None and len(cache) == 0:
                raise JudgeUnavailable(
                    f"{self.name}: replay=True, but the cache {cache.path} holds no replies"
                )
            return
        self.wait(self.submit(self._preflight))

    def bind_run(self, run_id: str, run_dir: str | os.PathLike[str]) -> None:
        """Keep the spend ledger of run ``run_id`` in its own file in ``run_dir`` (never in the cache: losing
        or replacing the cache must not lose the spend).

        Spend recorded before (in the private ledger: a preflight request, say) moves into the run's ledger;
        spend loaded from a checkpoint is carried in where the ledger knows less. Raises ValueError for an
        unusable file.
        """
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"{self.name}: bind_run needs a non-empty run id, got {run_id!r}")
        path = str(Path(run_dir) / LEDGER_FILE)
        with self._lock:
            old = self._ledger if self._ledger_pid == os.getpid() else None
            if self.run == (run_id, path) and old is not None:
                return
            new = self._open_ledger(run_id, path)
            if old is not None and old.path is None:  # requests sent before binding belong to this run
                new.add(old.recorded())
            if old is not None:
                old.close()
            self.run, self._ledger, self._ledger_pid = (run_id, path), new, os.getpid()

    def metrics(self) -> dict[str, float]:
        """Requests sent, tokens and cost (from the ledger), cache hits, retries, most in flight."""
        spent = self._spend_ledger().spent()
        values = (spent.requests, spent.prompt_tokens, spent.completion_tokens, spent.usd)
        return {**self.counters.snapshot(), **dict(zip(SPEND, values))}

    def load_metrics(self, values: Mapping[str, float]) -> None:
        """Restore :meth:`metrics` from a checkpoint; its spend is a floor: the ledger wins when higher."""
        self.counters.load({k: v for k, v in values.items() if k not in SPEND})
        floor = Cost(*(float(values.get(name, 0.0)) for name in SPEND))
        with self._lock:
            self._floor = self._floor.at_least(floor)
        self._spend_ledger().raise_to(floor)

    def close(self) -> None:
        """Stop the event-loop thread, close the HTTP client, the cache and the ledger."""
        with self._lock:
            rt, self._rt = self._rt, None
            ledger, self._ledger = (self._ledger, None) if self._ledger_pid == os.getpid() else (None, None)
        if ledger is not None:
            self._floor = self._floor.at_least(ledger.spent())  # an unbound client keeps its count
            ledger.close()
        if rt is not None and rt.pid == os.getpid():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(rt), rt.loop).result(timeout=10)
            except Exception as err:
                log.debug("%s: error while closing: %r", self.name, err)
            rt.finalizer()
            if rt.cache is not None:
                rt.cache.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        ledger = self._ledger if self._ledger_pid == os.getpid() else None
        if ledger is not None:  # a copy keeps what was spent, bound or not
            state["_floor"] = self._floor.at_least(ledger.spent())
        for name in ("_rt", "_lock", "_ledger"):
            state[name] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        s = self.settings
        headers = s.describe()["extra_headers"]  # names only: values may be secrets
        return (
            f"ChatClient({self.name!r}, model={s.model!r}, base_url={s.base_url!r}, "
            f"api_key_env={s.api_key_env!r}, cache_path={s.cache_path!r}, replay={s.replay}, "
            f"run={self.run[0] if self.run else None!r}, extra_headers={headers})"
        )

    # ------------------------------------------------------------------------------------------ internals

    def _runtime(self) -> _Runtime:
        with self._lock:
            if self._rt is None or self._rt.pid != os.getpid():  # first use, or a forked child
                self._rt = _Runtime(self)
            return self._rt

    def _open_ledger(self, run_id: str, path: str | None) -> SpendLedger:
        ledger = SpendLedger(path, run_id, stale_after_s=self.settings.request_timeout + _LEDGER_SLACK_S)
        ledger.raise_to(self._floor)
        return ledger

    def _spend_ledger(self) -> SpendLedger:
        """The ledger in use: the bound run's, else a private in-memory one (reopened in a new process)."""
        with self._lock:
            if self._ledger is None or self._ledger_pid != os.getpid():
                run_id, path = self.run or (UNBOUND_RUN, None)
                self._ledger, self._ledger_pid = self._open_ledger(run_id, path), os.getpid()
            return self._ledger

    async def _preflight(self) -> None:
        await preflight(self._runtime().transport)

    async def _send(self, rt: _Runtime, calls: list[ChatCall], slots: list[int]) -> dict[int, ChatReply]:
        """Send the calls concurrently, cache each reply as it comes; raise a JudgeStop after all ended."""

        async def one(call: ChatCall) -> ChatReply:
            reply = await rt.transport.complete(call.messages, call.schema, call.structured_output)
            if reply.text is not None and rt.cache is not None:
                try:
                    rt.cache.put(call.key, CachedReply(reply.text, *reply.usage))
                except sqlite3.Error as err:  # the reply is still good; only a rerun would pay for it again
                    log.warning("%s: could not write to the cache %s: %s", self.name, rt.cache.path, err)
            return reply

        deadline = self.settings.deadline(len(calls))
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(one(call) for call in calls), return_exceptions=True), timeout=deadline
            )
        except asyncio.TimeoutError:
            raise JudgeStop(
                f"{self.name}: {len(calls)} requests to {rt.transport.url()} did not finish "
                f"within {deadline:.0f} s"
            ) from None
        stop = next((r for r in results if isinstance(r, BaseException)), None)
        if stop is not None:  # budget spent or judge unusable; the replies that came are cached
            raise stop
        return dict(zip(slots, results))  # type: ignore[arg-type]

    @staticmethod
    async def _shutdown(rt: _Runtime) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await rt.transport.aclose()


__all__ = ["LEDGER_FILE", "ChatCall", "ChatClient"]
