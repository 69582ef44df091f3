"""The chat client's settings: where the server is, how hard to try, what may be spent; checked when built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from cyclealign_pl.judges.limits import Budget

DEFAULT_MODEL = "gpt-3.5-turbo-0613"  # the paper's black box


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
        max_response_bytes: the largest response body read from the server; a longer one is cut off while
            it streams in (never held whole, never cached) and is a failure of kind ``too_large``.
    """

    model: str = DEFAULT_MODEL
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
    max_response_bytes: int = 1 << 20

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
            "max_response_bytes",
        ):
            value = getattr(self, name)
            required = name in ("request_timeout", "max_concurrency", "max_response_bytes")
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


def _number(value: object) -> float:
    """``value`` as a number for the range checks; NaN (fails every comparison) for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


__all__ = ["DEFAULT_MODEL", "ChatSettings"]
