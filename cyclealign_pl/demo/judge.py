"""The default task's black box: the lexicon rule of ``rule.py`` behind an OpenAI-compatible server.

Reached with the real :class:`OpenAIJudge` client over loopback HTTP, so the default run goes through the
production path (the ranking prompt, retries, the reply parser, the cache); docs/default_task.md.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from cyclealign_pl.demo import rule
from cyclealign_pl.judges.base import Judge, Judgment, RankRequest
from cyclealign_pl.judges.openai import OpenAIJudge
from cyclealign_pl.judges.pairwise import Verdict
from cyclealign_pl.serve.replies import rule_reply
from cyclealign_pl.serve.server import LocalOpenAIServer

log = logging.getLogger(__name__)

RULE_VERSION = "lexicon-v2"  # part of the model name, hence of every cache key: bump it when the rule changes
# an environment variable that is never set: the client then sends a placeholder key to the loopback server,
# so a user's real OPENAI_API_KEY never travels, not even to 127.0.0.1
_NO_KEY_ENV = "CYCLEALIGN_DEMO_JUDGE_NO_KEY"


@dataclass(frozen=True)
class LexiconRule:
    """The lexicon rule (``rule.py``) as the server's :class:`~cyclealign_pl.serve.replies.Rule`."""

    seed: int = 0
    max_words: int = 40

    def rank(self, instruction: str, candidates: Sequence[str]) -> tuple[int, ...]:
        return rule.lexicon_ranking(instruction, candidates, self.seed)

    def better_reply(self, instruction: str, candidates: Sequence[str], ranking: Sequence[int]) -> str:
        return rule.better_reply(instruction, self.seed, self.max_words)

    def compare(self, conversation: str, reply_a: str, reply_b: str) -> Verdict:
        return rule.compare(conversation, reply_a, reply_b, self.seed)  # type: ignore[return-value]


def lexicon_reply(body: Any, seed: int = 0, max_words: int = 40) -> str:
    """The rule's chat reply to one chat-completions request body: a ranking and a better reply, a verdict,
    or a reply without a ranking (:func:`~cyclealign_pl.serve.replies.rule_reply`)."""
    return rule_reply(body, LexiconRule(seed, max_words))


class LexiconJudge(Judge):
    """The lexicon rule as a chat model on a loopback server, reached by ``OpenAIJudge``.

    Args:
        delay: seconds the server waits before each answer (a simulated LLM latency).
        cache_path: the client's SQLite reply cache (None: none). The rule's version, ``seed`` and
            ``max_words`` are part of the model name, so a cache never serves answers of another setting.
        seed: rotates which good reply fits each kind of request, its own reply (``rule.own_reply``).
        max_words: the better reply is cut at a sentence end to at most this many words.
        request_timeout, max_retries, max_concurrency: passed to the client.

    The server starts on first use and stops in :meth:`close`; a pickled copy (DDP spawn) or a forked child
    starts its own.
    """

    def __init__(
        self,
        delay: float = 0.0,
        cache_path: str | None = None,
        seed: int = 0,
        max_words: int = 40,
        request_timeout: float = 30.0,
        max_retries: int = 2,
        max_concurrency: int = 16,
    ) -> None:
        if delay < 0:
            raise ValueError(f"LexiconJudge: delay must be >= 0 seconds, got {delay}")
        if max_words < 1:
            raise ValueError(f"LexiconJudge: max_words must be >= 1, got {max_words}")
        self.delay = float(delay)
        self.cache_path = cache_path
        self.seed = int(seed)
        self.max_words = int(max_words)
        self.client_options = {
            "request_timeout": float(request_timeout),
            "max_retries": int(max_retries),
            "max_concurrency": int(max_concurrency),
        }
        # the client checks its options now (a bad value fails at config time); it sends nothing
        OpenAIJudge(model=self.model_name, base_url="http://127.0.0.1:1/v1", **self.client_options)
        self._lock = threading.Lock()
        self._server: LocalOpenAIServer | None = None
        self._client: OpenAIJudge | None = None
        self._pid = os.getpid()
        self._state: dict[str, Any] = {}  # counters to restore into the next client
        self._run: tuple[str, str] | None = None  # bind_run's arguments, for the next client too

    @property
    def model_name(self) -> str:
        return f"{RULE_VERSION}-seed{self.seed}-words{self.max_words}"

    @property
    def server(self) -> LocalOpenAIServer:
        """The running server (started on first use)."""
        self._running()
        assert self._server is not None
        return self._server

    def _running(self) -> OpenAIJudge:
        """The client, after starting the server (again in a forked child or an unpickled copy)."""
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._server = LocalOpenAIServer(
                    delay=self.delay, model=self.model_name, rule=LexiconRule(self.seed, self.max_words)
                ).start()
                self._client = OpenAIJudge(
                    model=self.model_name,
                    base_url=self._server.url,
                    api_key_env=_NO_KEY_ENV,
                    cache_path=self.cache_path,
                    seed=self.seed,
                    **self.client_options,
                )
                self._client.load_state_dict(self._state)
                if self._run is not None:
                    self._client.bind_run(*self._run)
                log.info("LexiconJudge: serving the lexicon rule at %s", self._server.url)
            return self._client

    # -- the Judge interface, delegated to the client --------------------------------------------------
    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        return self._fresh().rank(requests)

    def submit(self, requests: Sequence[RankRequest]) -> Future[list[Judgment]]:
        return self._fresh().submit(requests)

    def _fresh(self) -> OpenAIJudge:
        """The client, the server's records cleared: they keep the latest batch only, so a run does not grow
        them."""
        client = self._running()
        if self._server is not None:
            self._server.clear()
        return client

    def metrics(self) -> dict[str, float]:
        return self._client.metrics() if self._client is not None else dict(self._state.get("counters", {}))

    def state_dict(self) -> dict[str, Any]:
        return self._client.state_dict() if self._client is not None else dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = dict(state)
        if self._client is not None:
            self._client.load_state_dict(state)

    def preflight(self) -> None:
        """Start the server and let the client check it as it checks any server (model served, key taken)."""
        self._running().preflight()

    def bind_run(self, run_id: str, run_dir: str) -> None:
        """The client keeps its books (a spend ledger) for run ``run_id``; a restarted client keeps them
        too."""
        self._run = (run_id, run_dir)
        self._running().bind_run(run_id, run_dir)

    def close(self) -> None:
        """Close the client and stop the server (a later request starts them again)."""
        with self._lock:
            client, server = self._client, self._server
            self._client = self._server = None
        if client is not None:
            self._state = client.state_dict()
            client.close()
        if server is not None:
            server.stop()
        super().close()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if self._client is not None:
            state["_state"] = self._client.state_dict()
        state["_client"] = state["_server"] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"LexiconJudge(rule={RULE_VERSION!r}, delay={self.delay}, seed={self.seed}, "
            f"max_words={self.max_words}, cache_path={self.cache_path!r})"
        )
