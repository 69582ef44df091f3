"""The black-box judge: any chat-completions server (OpenAI, Azure, vLLM, Ollama, llama.cpp, TGI).

The ranking side: the prompt, the candidate orders shown, reading and aggregating the replies, the failure
policy. Sending (cache, retries, limits, budget, ledger) is the job of :class:`~.chat.ChatClient`; what the
judge does about hangs, dead servers, request storms and paying twice: docs/judges.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import inspect
import logging
import math
import textwrap
import typing
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from cyclealign_pl.judges.base import Judge, JudgeStop, JudgeUnavailable, Judgment, RankRequest
from cyclealign_pl.judges.chat import ChatCall, ChatClient
from cyclealign_pl.judges.counters import Counters
from cyclealign_pl.judges.http_client import PLACEHOLDER_KEY
from cyclealign_pl.judges.llama_server import LlamaCppServer
from cyclealign_pl.judges.orders import aggregate_rankings, candidate_orders, orders_cancel_out
from cyclealign_pl.judges.prompt import (
    RankingTemplate,
    build_messages,
    load_template,
    parse_reply,
    ranking_schema,
)
from cyclealign_pl.judges.request import CALL_FAILURE_KINDS, ChatReply
from cyclealign_pl.judges.settings import DEFAULT_MODEL, ChatSettings
from cyclealign_pl.judges.structured import STRUCTURED_OUTPUT_FORMS
from cyclealign_pl.ranking import Ranking

log = logging.getLogger(__name__)

# Why a prompt got no ranking; each is counted as ``failures/<kind>`` (``judge/failures/<kind>`` in the logs).
# "position_bias": the orders asked (num_permutations > 1) cancel out: every candidate has the same mean rank
JUDGMENT_FAILURE_KINDS = (*CALL_FAILURE_KINDS, "invalid_reply", "replay_miss", "position_bias")
_COUNTERS = ("prompts", "failures", "invalid_replies", "missing_better_responses", "fallbacks")
# rankings compared with the one before them by shown position, how many were the same, and how many would
# be by chance (1/n! each: shuffled or sampled alike, the shown order says nothing of content): a judge that
# ranks by where a reply is shown, not by what it says, repeats itself (summary.verdict warns)
_POSITION_COUNTERS = ("rankings_compared", "rankings_same_positions", "rankings_same_by_chance")
# an environment variable that is never set: a managed local server gets a placeholder key, never a real one
_NO_KEY_ENV = "CYCLEALIGN_LOCAL_SERVER_NO_KEY"
_REPLY_OVERHEAD_TOKENS = 48  # '{"ranking": [...], "better_response": "' and the closing, in tokens at most


@dataclass(frozen=True)
class _Call(ChatCall):
    """A ranking call: a permutation of one request's candidates."""

    request_index: int = 0
    permutation: tuple[int, ...] = ()


def _check_structured_output_and_server(
    structured_output: str, server: LlamaCppServer | None, base_url: str | None, api_key_env: str
) -> None:
    if structured_output not in ("auto", *STRUCTURED_OUTPUT_FORMS):
        raise ValueError(
            "OpenAIJudge: structured_output must be 'auto', 'json_schema', 'json_object' or 'off', "
            f"got {structured_output!r}"
        )
    if server is not None and base_url is not None:
        raise ValueError("OpenAIJudge: give base_url (a running server) or server (one to start), not both")
    if server is not None and api_key_env != "OPENAI_API_KEY":
        raise ValueError("OpenAIJudge: a server the judge starts takes no API key: leave api_key_env unset")


def _check_ranking(num_permutations: int, on_failure: str, fallback: Judge | None) -> None:
    if type(num_permutations) is not int or num_permutations <= 0:
        raise ValueError(f"OpenAIJudge: num_permutations must be > 0, got {num_permutations!r}")
    if on_failure not in ("skip", "fallback", "stop"):
        raise ValueError(f"OpenAIJudge: on_failure must be 'skip', 'fallback' or 'stop', got {on_failure!r}")
    if on_failure == "fallback" and fallback is None:
        raise ValueError("OpenAIJudge: on_failure='fallback' needs a fallback judge")


def _chat_settings(chat: dict[str, Any]) -> ChatSettings:
    """``ChatSettings`` from the judge's chat arguments; an unknown one is a clear error."""
    names = [f.name for f in fields(ChatSettings)]
    for name in chat:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            raise ValueError(
                f"unknown argument {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            )
    return ChatSettings(**chat)


def _for_managed_server(settings: ChatSettings, server: LlamaCppServer) -> ChatSettings:
    """The settings for a server the judge starts: the GGUF's name unless a model is named, its port once it
    runs, no key, and as many requests at a time as it serves."""
    return replace(
        settings,
        model=server.model if settings.model == DEFAULT_MODEL else settings.model,
        base_url="http://127.0.0.1:0/v1",  # the port is known once it runs
        api_key_env=_NO_KEY_ENV,
        max_concurrency=min(settings.max_concurrency, server.parallel),
        adaptive_concurrency=False,
    )


@contextlib.contextmanager
def _named_errors() -> Iterator[None]:
    """A settings error says whose it is: ``OpenAIJudge: <the error>``."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"OpenAIJudge: {err}") from None


class OpenAIJudge(Judge):
    """Ranks candidates with an LLM behind the chat-completions API (the paper: gpt-3.5-turbo-0613).

    The chat client's settings (``model`` ... ``max_response_bytes``, :class:`~.settings.ChatSettings`, shown
    in ``--help``) are taken flat, as configs write them; the arguments below are the ranking's own.

    Args:
        template: a ranking template file (None: the packaged ``ranking_v1.txt``).
        shuffle_candidates: show the candidates in a per-request random order (seeded by the request's content
            and ``seed``) and map the ranking back: a control for position bias.
        num_permutations: ask this many orders (rotations of the base order, then random ones) and aggregate
            the valid rankings by mean rank. When the orders cancel out (every candidate has the same mean
            rank, as with a judge that ranks by position only) the prompt gets no ranking (a counted
            ``position_bias`` failure), not one made by the tie-break.
        on_failure: for a prompt without a valid ranking: ``"skip"`` (a failed judgment, masked by the cycle),
            ``"fallback"`` (ask ``fallback``), ``"stop"`` (raise :class:`JudgeStop`).
        fallback: the judge asked under ``on_failure="fallback"``.
        seed: seeds the candidate shuffles and the backoff jitter.
        structured_output: ask for the reply as JSON following a schema (the ranking, then the better
            response): ``"auto"`` tries OpenAI's ``json_schema`` form, then llama.cpp's ``json_object`` with a
            schema, then none (the text parser), as the server refuses each (said once, counted as
            ``judge/structured_output_fallbacks``); ``"json_schema"``/``"json_object"`` start there;
            ``"off"`` never asks.
        server: a llama.cpp server that the judge starts and stops itself
            (:class:`~cyclealign_pl.judges.llama_server.LlamaCppServer`: any GGUF, e.g.
            ``{gguf: local:smollm2-135m-instruct}``); then leave ``base_url`` unset. ``model`` left at its
            default becomes the GGUF's name; requests go one at a time, as it serves them.
    """

    def __init__(
        self,
        template: str | None = None,
        shuffle_candidates: bool = False,
        num_permutations: int = 1,
        on_failure: Literal["skip", "fallback", "stop"] = "skip",
        fallback: Judge | None = None,
        seed: int = 0,
        structured_output: Literal["auto", "json_schema", "json_object", "off"] = "auto",
        server: LlamaCppServer | None = None,
        **chat: Any,
    ) -> None:
        defaults = ChatSettings()
        base_url, key = chat.get("base_url", defaults.base_url), chat.get("api_key_env", defaults.api_key_env)
        _check_structured_output_and_server(structured_output, server, base_url, key)
        with _named_errors():
            settings = _chat_settings(chat)
            self.settings = settings if server is None else _for_managed_server(settings, server)
        self.structured_output = structured_output
        self.server = server
        self._run_dir: str | None = None
        self._set_ranking(template, shuffle_candidates, num_permutations, on_failure, fallback, seed)
        self.client = ChatClient(self.settings, seed=self.seed, name=type(self).__name__)
        self._counters = Counters(
            [*_COUNTERS, *_POSITION_COUNTERS, *(f"failures/{kind}" for kind in JUDGMENT_FAILURE_KINDS)]
        )
        self._last_shown_ranking: tuple[int, ...] | None = None

    def _set_ranking(
        self,
        template: str | None,
        shuffle_candidates: bool,
        num_permutations: int,
        on_failure: str,
        fallback: Judge | None,
        seed: int,
    ) -> None:
        """The ranking's own arguments, checked."""
        _check_ranking(num_permutations, on_failure, fallback)
        self.template = template
        self.ranking_template: RankingTemplate = load_template(template)  # fail now on a bad template file
        self.shuffle_candidates = shuffle_candidates
        self.num_permutations = num_permutations
        self.on_failure = on_failure
        self.fallback = fallback
        self.seed = int(seed)

    # -------------------------------------------------------------------------------------- public API

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        """Rank every request (concurrently); blocks until all are answered or failed."""
        return self.client.wait(self.submit(requests))

    def submit(self, requests: Sequence[RankRequest]) -> Future[list[Judgment]]:
        """Start ranking in the client's event loop and return its future at once."""
        self._start_server()
        return self.client.submit(self._rank_async, list(requests))

    def preflight(self) -> None:
        """Within seconds: the server answers, takes the key and serves the model (the fallback's too); else
        :class:`JudgeUnavailable`, one line naming the URL. Sends nothing in replay mode. A managed server
        is started here (its log in the run directory)."""
        self._start_server()
        self.client.preflight()
        if self.fallback is not None:
            self.fallback.preflight()

    def bind_run(self, run_id: str, run_dir: str) -> None:
        """Record spend in the ledger of run ``run_id`` (``run_dir/judge_ledger.sqlite``, not the cache)
        and enforce the budget against it; the fallback judge keeps its own books (``<run_id>/fallback``)."""
        self.client.bind_run(run_id, run_dir)
        if self.fallback is not None:
            self.fallback.bind_run(f"{run_id}/fallback", run_dir)

    def metrics(self) -> dict[str, float]:
        """Cumulative counters: requests, tokens and cost (from the ledger when bound), cache hits, retries,
        failures (total, per reason), invalid replies, fallbacks."""
        return {**self.client.metrics(), **self._counters.snapshot()}

    def state_dict(self) -> dict[str, Any]:
        """The counters, spend included, so a resumed run knows what it spent (the ledger, when bound, knows
        at least as much and wins)."""
        return {"counters": self.metrics()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counters = state.get("counters", {})
        self._counters.load(counters)
        self.client.load_metrics(counters)

    def use_run_dir(self, run_dir: str) -> None:
        """A managed server writes its log here (``judge_server.log``)."""
        self._run_dir = str(run_dir)
        if self.fallback is not None:
            self.fallback.use_run_dir(run_dir)

    def close(self) -> None:
        """Stop the client (event-loop thread, HTTP client, cache and ledger), the managed server and the
        fallback."""
        self.client.close()
        if self.server is not None:
            self.server.stop()
        if self.fallback is not None:
            self.fallback.close()
        super().close()

    def __repr__(self) -> str:
        s = self.settings
        headers = s.describe()["extra_headers"]  # names only: values may be secrets
        return (
            f"{type(self).__name__}(model={s.model!r}, base_url={s.base_url!r}, "
            f"api_key_env={s.api_key_env!r}, max_concurrency={s.max_concurrency}, "
            f"request_timeout={s.request_timeout}, max_retries={s.max_retries}, "
            f"cache_path={s.cache_path!r}, replay={s.replay}, "
            f"template={self.ranking_template.version!r}, "
            f"shuffle_candidates={self.shuffle_candidates}, num_permutations={self.num_permutations}, "
            f"on_failure={self.on_failure!r}, structured_output={self.structured_output!r}, "
            f"server={self.server!r}, extra_headers={headers})"
        )

    # ------------------------------------------------------------------------------------------ internals

    def _start_server(self) -> None:
        """Start the managed server if this process has none running, and point the client at it."""
        if self.server is None or self.settings.replay or self.server.running:
            return
        url = self.server.start(self._run_dir)
        self.settings = replace(self.settings, base_url=url)
        self.client.close()  # nothing was sent through it: a new runtime talks to the new URL
        self.client.settings = self.settings

    def _schema(self, num_candidates: int) -> dict[str, Any] | None:
        if self.structured_output == "off":
            return None
        max_tokens = self.settings.max_tokens
        room = None if max_tokens is None else max(16, max_tokens - _REPLY_OVERHEAD_TOKENS)
        return ranking_schema(num_candidates, room)

    def _calls(self, requests: Sequence[RankRequest]) -> list[_Call]:
        calls = []
        for index, request in enumerate(requests):
            if not request.candidates:
                raise ValueError(f"OpenAIJudge: request {index} has no candidates")
            orders = candidate_orders(request, self.seed, self.shuffle_candidates, self.num_permutations)
            for perm in orders:
                shown = RankRequest(
                    request.instruction, tuple(request.candidates[i] for i in perm), request.demonstrations
                )
                messages = build_messages(shown, self.ranking_template)
                schema = self._schema(len(perm))
                key = self.client.key(messages, self.ranking_template.version, perm, schema)
                first = "json_schema" if self.structured_output == "auto" else self.structured_output
                calls.append(_Call(messages, key, schema, first, request_index=index, permutation=perm))
        return calls

    def _count_positions(self, shown_ranking: tuple[int, ...]) -> None:
        """Count whether this ranking, by shown position, repeats the previous one (a content-blind judge
        does; candidates sampled alike give a judge that reads them no reason to)."""
        last, self._last_shown_ranking = self._last_shown_ranking, shown_ranking
        if last is not None and len(last) == len(shown_ranking):
            self._counters.bump("rankings_compared")
            self._counters.bump("rankings_same_by_chance", 1.0 / math.factorial(len(shown_ranking)))
            if last == shown_ranking:
                self._counters.bump("rankings_same_positions")

    async def _rank_async(self, requests: list[RankRequest]) -> list[Judgment]:
        calls = self._calls(requests)
        replies = await self.client.send(calls)
        self._counters.bump("prompts", len(requests))
        return await self._apply_policy(requests, self._judgments(requests, calls, replies))

    def _judgments(
        self, requests: list[RankRequest], calls: list[_Call], replies: list[ChatReply]
    ) -> list[Judgment]:
        by_request: list[list[tuple[_Call, ChatReply]]] = [[] for _ in requests]
        for call, reply in zip(calls, replies):
            by_request[call.request_index].append((call, reply))
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
                self._count_positions(tuple(parsed.ranking))
                # back to the original indices: shown position s held candidate permutation[s]
                rankings.append(tuple(call.permutation[s] for s in parsed.ranking))
                better = better if better is not None else parsed.better_response
            if orders_cancel_out(rankings, n):
                first_failure = (
                    "position_bias",
                    f"position bias: the {len(rankings)} orders asked cancel out (every candidate has the "
                    "same mean rank)",
                )
                rankings = []
            if rankings:
                if better is None:
                    self._counters.bump("missing_better_responses")
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


def _with_chat_settings(init: Any) -> None:
    """Declare the chat settings, defined once as ``ChatSettings``' fields, as keyword arguments of ``init``
    (its ``**chat``): the signature and docstring that ``inspect``, jsonargparse's ``--help``, its config
    checks and the CLI's "did you mean" read."""
    own = inspect.signature(init)
    hints = {**typing.get_type_hints(init), **typing.get_type_hints(ChatSettings)}
    parameters = [
        p.replace(annotation=hints.get(name, p.annotation))
        for name, p in own.parameters.items()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    parameters += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in fields(ChatSettings)
    ]
    init.__signature__ = own.replace(parameters=parameters)
    init.__doc__ = "The chat client's settings (ChatSettings).\n\nArgs:\n" + textwrap.indent(
        textwrap.dedent((ChatSettings.__doc__ or "").split("Args:", 1)[-1].strip("\n")), "    "
    )


_with_chat_settings(OpenAIJudge.__init__)

__all__ = [
    "JUDGMENT_FAILURE_KINDS",
    "PLACEHOLDER_KEY",
    "ChatReply",
    "JudgeUnavailable",
    "OpenAIJudge",
    "aggregate_rankings",
]
