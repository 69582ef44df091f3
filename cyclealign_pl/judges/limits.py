"""Rate limits, the adaptive concurrency limit and hard budgets for API judges (asyncio, one event loop).

They keep the load within what the server and the budget allow, before a request is sent (docs/judges.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import astuple, dataclass
from typing import Protocol

from cyclealign_pl.judges.base import JudgeBudgetExceeded


class TokenBucket:
    """At most ``per_minute`` units per minute, in bursts of at most one second's worth (at least 1)."""

    def __init__(self, per_minute: float) -> None:
        if per_minute <= 0:
            raise ValueError(f"a rate limit must be > 0 per minute, got {per_minute}")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self._level = self.capacity
        self._stamp = time.monotonic()
        self._lock: asyncio.Lock | None = None

    def _refill(self) -> None:
        now = time.monotonic()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, amount: float = 1.0) -> float:
        """Wait until ``amount`` units are available (first come, first served); return the seconds waited."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        amount = min(float(amount), self.capacity)  # a single request larger than a burst still goes, alone
        waited = 0.0
        async with self._lock:
            self._refill()
            if self._level < amount:
                waited = (amount - self._level) / self.rate
                await asyncio.sleep(waited)
                self._refill()
            self._level -= amount
        return waited

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_lock"] = None
        return state


class ConcurrencyLimit:
    """At most ``limit`` requests in flight; with ``adaptive``, AIMD moves ``limit`` within [1, ``ceiling``].

    The latency baseline is the fastest reply seen (drifting up slowly, so it follows prompts that grow). A
    reply slower than ``tolerance`` times the baseline (and by more than ``min_queue_s``: jitter of a fast
    local server is no queue), a timeout or an overload (429, 5xx) halves the limit,
    at most once per round trip: requests sent before a decrease carry no news about the new limit. Otherwise
    the limit grows by one per reply until the first decrease (slow start), then by one per ``limit`` replies.
    Without ``adaptive`` it is a plain semaphore of ``ceiling``.
    """

    def __init__(
        self,
        ceiling: int,
        adaptive: bool = True,
        tolerance: float = 2.0,
        initial: int = 2,
        min_queue_s: float = 0.05,
    ) -> None:
        if ceiling < 1 or tolerance <= 1.0:
            raise ValueError(f"need ceiling >= 1 and tolerance > 1, got {ceiling}, {tolerance}")
        self.ceiling = int(ceiling)
        self.adaptive = adaptive
        self.tolerance = float(tolerance)
        self.min_queue_s = float(min_queue_s)
        self.limit = float(min(self.ceiling, initial) if adaptive else self.ceiling)
        self.in_flight = 0
        self.decreases = 0  # also the epoch: a request sent before the latest decrease cannot cause another
        self.baseline_s: float | None = None
        self._slow_start = True
        self._changed: asyncio.Condition | None = None  # made in the event loop that uses it

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a free slot and hold it."""
        changed = self._condition()
        async with changed:
            await changed.wait_for(lambda: self.in_flight < self.current)
            self.in_flight += 1
        try:
            yield
        finally:
            async with changed:
                self.in_flight -= 1
                changed.notify_all()

    def record(self, epoch: int, latency_s: float | None, overloaded: bool = False) -> None:
        """A reply after ``latency_s`` seconds (None: no reply), or an overload, of a request sent when
        ``decreases`` was ``epoch``; adapts the limit."""
        if not self.adaptive:
            return
        if latency_s is not None and not overloaded:
            drifted = None if self.baseline_s is None else self.baseline_s * 1.02
            self.baseline_s = latency_s if drifted is None else min(drifted, latency_s)
            queue_s = latency_s - self.baseline_s
            overloaded = latency_s > self.tolerance * self.baseline_s and queue_s > self.min_queue_s
        if overloaded:
            if epoch == self.decreases and self.limit > 1.0:
                self.limit = max(1.0, self.limit / 2.0)
                self.decreases += 1
                self._slow_start = False
        elif self._slow_start:
            self.limit = min(float(self.ceiling), self.limit + 1.0)
        else:
            self.limit = min(float(self.ceiling), self.limit + 1.0 / self.limit)
        if self._changed is not None:
            self._wake()

    def _wake(self) -> None:
        changed = self._changed
        assert changed is not None

        async def notify() -> None:
            async with changed:
                changed.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop: nobody waits
            asyncio.get_running_loop().create_task(notify())

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_changed"] = None
        return state


@dataclass(frozen=True)
class Cost:
    """What requests may cost (an upper bound) or did cost."""

    requests: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    usd: float = 0.0

    @property
    def tokens(self) -> float:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def __sub__(self, other: Cost) -> Cost:
        return Cost(*(a - b for a, b in zip(astuple(self), astuple(other))))

    def at_least(self, floor: Cost) -> Cost:
        """Each part the larger of the two."""
        return Cost(*(max(a, b) for a, b in zip(astuple(self), astuple(floor))))


@dataclass(frozen=True)
class Budget:
    """Hard limits on requests (HTTP attempts), tokens (prompt + completion) and dollars; None: no limit."""

    requests: float | None = None
    tokens: float | None = None
    usd: float | None = None

    @property
    def active(self) -> bool:
        return any(limit is not None for limit in astuple(self))

    def exceeded(self, cost: Cost) -> str | None:
        """The name of the first limit ``cost`` passes (``budget_requests``, ...), or None."""
        for name, limit, value in zip(
            ("requests", "tokens", "usd"), astuple(self), (cost.requests, cost.tokens, cost.usd)
        ):
            if limit is not None and value > limit + 1e-12:
                return f"budget_{name}"
        return None

    def refusal(self, spent: Cost, cost: Cost) -> JudgeBudgetExceeded:
        """The error for a request that ``spent`` leaves no room for."""
        return JudgeBudgetExceeded(
            f"{self.exceeded(spent + cost)} is spent: spent {spent.requests:g} requests, {spent.tokens:g} "
            f"tokens, ${spent.usd:.4f}; the next request may cost up to {cost.requests:g} request, "
            f"{cost.tokens:g} tokens, ${cost.usd:.4f} (limits: requests={self.requests}, "
            f"tokens={self.tokens}, usd={self.usd})"
        )


class Ledger(Protocol):
    """Where spend is recorded (:class:`~cyclealign_pl.judges.ledger.SpendLedger`)."""

    def try_reserve(self, bound: Cost, budget: Budget) -> int | None: ...

    def settle(self, row: int, actual: Cost) -> None: ...


class BudgetGate:
    """Reserve a request's maximum cost in the ledger before sending; refuse when the budget cannot cover it.

    The check and the reservation are one transaction of the ledger, so concurrent requests, and processes
    sharing the ledger, can never jointly overshoot. When only the requests in flight stand in the way, the
    gate waits for them to settle (each ends within its own timeout) and checks again.

    Args:
        budget: the limits.
        ledger: returns the ledger in use (it may be replaced when the judge is bound to a run).
        poll_s: how often to look again for requests of other processes settling.
    """

    def __init__(self, budget: Budget, ledger: Callable[[], Ledger], poll_s: float = 0.1) -> None:
        self.budget = budget
        self.ledger = ledger
        self.poll_s = poll_s
        self._settled: asyncio.Event | None = None

    async def reserve(self, bound: Cost) -> int:
        """Record a request about to be sent at its bound; its ledger row. Raises JudgeBudgetExceeded."""
        if self._settled is None:
            self._settled = asyncio.Event()
        while True:
            row = self.ledger().try_reserve(bound, self.budget)
            if row is not None:
                return row
            self._settled.clear()
            try:  # bounded: requests in flight end within their own timeouts
                await asyncio.wait_for(self._settled.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass

    def settle(self, row: int, actual: Cost) -> None:
        """Replace the reservation by what the request cost (zero tokens for a failed attempt)."""
        self.ledger().settle(row, actual)
        if self._settled is not None:
            self._settled.set()


__all__ = ["Budget", "BudgetGate", "Cost", "Ledger", "TokenBucket"]
