"""The judge interface: what the cycle asks of a black box (or of a reference ranker).

A judge never guesses: a prompt it cannot rank gets a :class:`Judgment` with ``ranking=None`` and a
``failure`` reason, and the cycle masks that prompt out of the loss.
"""

from __future__ import annotations

import abc
import operator
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cyclealign_pl.demonstrations import Demonstration
from cyclealign_pl.ranking import Ranking


@dataclass(frozen=True)
class RankRequest:
    """One prompt's ranking task: the instruction (dialogue so far), its candidates, the demonstrations."""

    instruction: str
    candidates: tuple[str, ...]
    demonstrations: tuple[Demonstration, ...] = ()


@dataclass(frozen=True)
class Judgment:
    """A judge's answer for one request: a full ranking (best first), or ``None`` and why."""

    ranking: Ranking | None
    better_response: str | None = None
    failure: str | None = None
    scores: tuple[float, ...] | None = None  # per-candidate scores, when the judge has them (reward models)
    raw: str | None = field(default=None, repr=False)  # the judge's raw reply, for debugging

    def __post_init__(self) -> None:
        # One type at the boundary: a judge may build its ranking as a list (or of numpy/torch integers),
        # and a list never equals a tuple: the cycle would count it as disagreeing with every white box.
        if self.ranking is not None:
            object.__setattr__(self, "ranking", tuple(operator.index(i) for i in self.ranking))
        if self.scores is not None:
            object.__setattr__(self, "scores", tuple(float(x) for x in self.scores))

    @property
    def ok(self) -> bool:
        return self.ranking is not None

    @classmethod
    def failed(cls, reason: str, raw: str | None = None) -> Judgment:
        return cls(ranking=None, failure=reason, raw=raw)


class JudgeStop(RuntimeError):
    """The run must stop cleanly (checkpoint, non-zero exit): the judge cannot or must not go on."""


class JudgeBudgetExceeded(JudgeStop):
    """The judge's hard budget (requests, tokens or money) is spent."""


class JudgeUnavailable(JudgeStop):
    """The judge cannot be used: unreachable, refusing the key, or not serving the model.

    ``str()`` is one line naming the URL and what went wrong (from :meth:`Judge.preflight`, or from the
    circuit breaker mid-run).
    """


class Judge(abc.ABC):
    """Ranks candidates. Subclasses implement :meth:`rank`; :meth:`submit` runs it in the background.

    ``submit`` is what lets the white-box compute while the black box answers: the cycle submits the
    requests, scores its candidates, then waits on the future.
    """

    _executor: ThreadPoolExecutor | None = None

    @abc.abstractmethod
    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        """One judgment per request, in order. Must not raise for a single bad reply (return a failure)."""

    def submit(self, requests: Sequence[RankRequest]) -> Future[list[Judgment]]:
        """Start :meth:`rank` in a background thread and return its future."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=type(self).__name__)
        return self._executor.submit(self.rank, list(requests))

    def preflight(self) -> None:
        """Check, within seconds, that the judge can answer; raise :class:`JudgeUnavailable` if not.

        Called once before the first training step, so that a dead server or a refused key stops the run at
        once instead of failing every prompt. Local judges have nothing to check.
        """

    def bind_run(self, run_id: str, run_dir: str) -> None:
        """Record spend durably for the run ``run_id`` (the same id on every rank and after a resume).

        API judges keep what they spend in a ledger that survives ``kill -9`` and enforce their budget against
        it; the ledger is a file of its own in ``run_dir`` (never the cache). Local judges spend
        nothing.
        """

    def use_run_dir(self, run_dir: str) -> None:
        """Where the judge may keep files of its own (a server's log): ``trainer.default_root_dir``. Called
        before :meth:`preflight`."""

    def to(self, device: Any) -> Judge:
        """Move local weights (if any) to ``device``; API judges ignore it."""
        return self

    def metrics(self) -> dict[str, float]:
        """Cumulative counters for logging (requests, failures, tokens, cost, cache hits, ...)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Counters that must survive a resume (e.g. budget spent)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def close(self) -> None:
        """Release threads, connections and files."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __getstate__(self) -> dict[str, Any]:
        # Executors and clients do not pickle (DDP spawn, deepcopy); they are recreated lazily.
        state = self.__dict__.copy()
        state["_executor"] = None
        return state
