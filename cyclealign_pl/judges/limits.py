"""Rate limits and hard budgets for API judges (asyncio, one event loop).

A :class:`TokenBucket` smooths requests (or tokens) per minute so that 16 concurrent requests do not arrive as
one burst: its capacity is one second's worth, so the rate holds over any second, not just over a minute.

A :class:`BudgetGate` makes a budget *hard*: before each request it reserves an upper bound of what the
request can cost (prompt bytes + ``max_tokens``), so concurrent requests can never jointly overshoot. When the
budget cannot cover the next request even after the requests in flight settle, it raises
:class:`~cyclealign_pl.judges.base.JudgeBudgetExceeded` and nothing is sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Cost:
    """What one request may cost (an upper bound) or did cost."""

    requests: float = 0.0
    tokens: float = 0.0
    usd: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.requests + other.requests, self.tokens + other.tokens, self.usd + other.usd)

    def __sub__(self, other: "Cost") -> "Cost":
        return Cost(self.requests - other.requests, self.tokens - other.tokens, self.usd - other.usd)


class BudgetGate:
    """Reserve a request's maximum cost before sending it; refuse when the budget cannot cover it.

    Args:
        requests, tokens, usd: the limits (None: unlimited).
        spent: returns what has been spent so far (the judge's counters, which survive a resume).
    """

    def __init__(
        self, requests: int | None, tokens: int | None, usd: float | None, spent: Callable[[], Cost]
    ) -> None:
        self.limits = (requests, tokens, usd)
        self.spent = spent
        self.reserved = Cost()
        self._changed: asyncio.Condition | None = None

    @property
    def active(self) -> bool:
        return any(limit is not None for limit in self.limits)

    def _over(self, cost: Cost) -> str | None:
        names = ("budget_requests", "budget_tokens", "budget_usd")
        for name, limit, value in zip(names, self.limits, (cost.requests, cost.tokens, cost.usd)):
            if limit is not None and value > limit + 1e-12:
                return name
        return None

    async def reserve(self, cost: Cost) -> None:
        """Reserve ``cost``, waiting for requests in flight to settle if that may make room."""
        if not self.active:
            return
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            while True:
                spent = self.spent()
                name = self._over(spent + cost)
                if name is not None:
                    raise JudgeBudgetExceeded(
                        f"{name} is spent: spent {spent.requests:g} requests, {spent.tokens:g} tokens, "
                        f"${spent.usd:.4f}; the next request may cost up to {cost.requests:g} request, "
                        f"{cost.tokens:g} tokens, ${cost.usd:.4f} (limits: requests={self.limits[0]}, "
                        f"tokens={self.limits[1]}, usd={self.limits[2]})"
                    )
                if self._over(spent + self.reserved + cost) is None:
                    self.reserved = self.reserved + cost
                    return
                await self._changed.wait()  # bounded: requests in flight end within their own timeouts

    async def release(self, cost: Cost) -> None:
        """Drop a reservation (call after the actual cost was added to the spent counters)."""
        if not self.active:
            return
        assert self._changed is not None
        async with self._changed:
            self.reserved = self.reserved - cost
            self._changed.notify_all()


__all__ = ["BudgetGate", "Cost", "TokenBucket"]
