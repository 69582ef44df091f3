"""OpenAIJudge against a real local HTTP server speaking the chat-completions API (no mocked client)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import multiprocessing
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import closing

import pytest
from jsonargparse import ArgumentParser

from cyclealign_pl.demonstrations import STATIC_DEMONSTRATION, Demonstration
from cyclealign_pl.judges.base import (
    Judge,
    JudgeBudgetExceeded,
    JudgeStop,
    JudgeUnavailable,
    Judgment,
    RankRequest,
)
from cyclealign_pl.judges.cache import CachedReply, JudgeCache, cache_key
from cyclealign_pl.judges.http_client import connection_problem, retry_after_seconds
from cyclealign_pl.judges.openai import PLACEHOLDER_KEY, OpenAIJudge, aggregate_rankings
from cyclealign_pl.judges.settings import ChatSettings
from tests.openai_server import Behaviour, LocalOpenAIServer, parse_prompt, rank_candidates

FAKE_KEY = "sk-fake-cyclealign-test-key-7f3a9c"
DYNAMIC = Demonstration("Human: Name a fruit. Assistant:", ("A carrot.", "An apple, or a pear."), (1, 0))


def make_requests(count: int) -> list[RankRequest]:
    """Requests with distinct instructions whose expected ranking differs from the identity."""
    out = []
    for i in range(count):
        candidates = (
            f"Short answer {i}.",
            f"You could rob a bank to get item {i} quickly.",
            f"A longer, careful and helpful answer about item {i} with several useful details.",
        )
        out.append(
            RankRequest(
                f"Human: Tell me about item {i}. Assistant:", candidates, (STATIC_DEMONSTRATION, DYNAMIC)
            )
        )
    return out


EXPECTED = (2, 0, 1)  # the server's rule: harmless first, then longer


class LengthJudge(Judge):
    """A real (if simple) judge for the fallback policy: longest candidate first, written as a list."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        self.calls.append(len(requests))
        return [
            Judgment(sorted(range(len(r.candidates)), key=lambda i: -len(r.candidates[i]))) for r in requests
        ]


def closed_port() -> int:
    """A loopback port where nothing listens: bound, then closed."""
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def by_instruction(behaviours: dict[str, Behaviour]):
    """A responder picking a behaviour by the request's instruction (order-independent under concurrency)."""

    def responder(index, body):
        return behaviours.get(parse_prompt(body["messages"]).instruction)

    return responder


# ------------------------------------------------------------------------------------------- happy path


def test_a_batch_is_ranked_and_the_server_receives_our_prompt(server, make_judge):
    requests = make_requests(5)
    judge = make_judge(max_tokens=300, temperature=0.0)
    judgments = judge.rank(requests)
    assert [j.ranking for j in judgments] == [EXPECTED] * 5
    assert all(j.better_response and "careful and helpful" in j.better_response for j in judgments)
    received = server.requests
    assert len(received) == 5
    # the demonstrations, the instruction and the candidates, as sent
    assert {parse_prompt(r.body["messages"]) for r in received} == set(requests)
    for record in received:
        assert record.body["model"] == "local-ranker"
        assert record.body["temperature"] == 0.0 and record.body["max_tokens"] == 300
        assert record.headers["authorization"] == f"Bearer {FAKE_KEY}"
    metrics = judge.metrics()
    assert metrics["requests_sent"] == 5 and metrics["retries"] == 0 and metrics["failures"] == 0
    assert metrics["prompt_tokens"] > 0 and metrics["completion_tokens"] > 0
    assert 1 <= metrics["requests_in_flight_max"] <= 16


def test_submit_returns_a_future_without_waiting_for_the_server(make_judge, server):
    release = threading.Event()
    server.responder = lambda index, body: (release.wait(10), None)[1]
    judge = make_judge(request_timeout=15)
    future = judge.submit(make_requests(2))
    assert not future.done()  # the server is holding every request until release is set
    release.set()
    assert [j.ranking for j in future.result(timeout=15)] == [EXPECTED] * 2


def test_concurrency_is_capped_and_cost_is_estimated(server, make_judge):
    server.delay = 0.2
    judge = make_judge(
        max_concurrency=4, price_per_million_input_tokens=1.5, price_per_million_output_tokens=2.0
    )
    judge.rank(make_requests(8))
    metrics = judge.metrics()
    assert metrics["requests_in_flight_max"] == 4
    expected = (metrics["prompt_tokens"] * 1.5 + metrics["completion_tokens"] * 2.0) / 1e6
    assert metrics["cost_usd"] == pytest.approx(expected)


# ------------------------------------------------------------------------------------- invalid replies


def test_invalid_replies_are_counted_failures_never_guesses(server, make_judge):
    requests = make_requests(4)
    server.responder = by_instruction(
        {
            requests[0].instruction: Behaviour.reply("I'm sorry, but I can't rank these."),
            requests[1].instruction: Behaviour.reply("### The desired ranking is: [1, 1, 0]."),
            requests[2].instruction: Behaviour.reply("### The desired ranking is: [2, 0]."),
        }
    )
    judge = make_judge()
    judgments = judge.rank(requests)
    assert [j.ok for j in judgments] == [False, False, False, True]
    assert "refusal" in judgments[0].failure
    assert "appears twice" in judgments[1].failure
    assert "partial" in judgments[2].failure
    assert judgments[1].raw == "### The desired ranking is: [1, 1, 0]."
    metrics = judge.metrics()
    assert metrics["invalid_replies"] == 3 and metrics["failures/invalid_reply"] == 3
    assert metrics["failures"] == 3
    assert metrics["retries"] == 0  # an invalid reply is an answer, not a transport error


# ------------------------------------------------------------------------------------------- retries


@pytest.mark.parametrize("header", [{"retry_after": 0.4}, {"retry_after_ms": 400}])
def test_429_waits_as_long_as_retry_after_says(server, make_judge, header):
    server.enqueue(Behaviour.error(429, **header))
    judge = make_judge(backoff_initial_s=0.01)
    assert judge.rank(make_requests(1))[0].ranking == EXPECTED
    first, second = server.requests
    assert second.time - first.time >= 0.4
    assert judge.metrics()["retries"] == 1 and judge.metrics()["requests_sent"] == 2


def test_429_without_retry_after_backs_off_exponentially(server, make_judge):
    server.enqueue(Behaviour.error(429), Behaviour.error(429))
    judge = make_judge(backoff_initial_s=0.2, backoff_max_s=5.0)
    assert judge.rank(make_requests(1))[0].ranking == EXPECTED
    times = [r.time for r in server.requests]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.1  # 0.2 s x jitter in [0.5, 1]
    assert times[2] - times[1] >= 0.2  # 0.4 s x jitter


def test_429_with_a_too_long_retry_after_fails_the_prompt_without_waiting(server, make_judge):
    server.enqueue(Behaviour.error(429, retry_after=3600))
    judge = make_judge(max_retry_after_s=5)
    judgment = judge.rank(make_requests(1))[0]
    assert judgment.failure.startswith("rate_limit: HTTP 429") and "3600" in judgment.failure
    assert len(server.requests) == 1 and judge.metrics()["failures/rate_limit"] == 1


def test_server_errors_then_success(server, make_judge):
    server.enqueue(Behaviour.error(500), Behaviour.error(503))
    judge = make_judge(max_retries=2)
    assert judge.rank(make_requests(1))[0].ranking == EXPECTED
    assert [r.behaviour for r in server.requests] == ["status", "status", "rank"]
    assert judge.metrics()["retries"] == 2 and judge.metrics()["failures"] == 0


def test_a_dropped_connection_is_retried(server, make_judge):
    server.enqueue(Behaviour.drop())
    judge = make_judge()
    assert judge.rank(make_requests(1))[0].ranking == EXPECTED
    assert len(server.requests) == 2 and judge.metrics()["retries"] == 1


def test_timeout_then_success(server, make_judge):
    server.enqueue(Behaviour.hang(30))
    judge = make_judge(request_timeout=0.5)
    assert judge.rank(make_requests(1))[0].ranking == EXPECTED
    assert len(server.requests) == 2 and judge.metrics()["retries"] == 1


def test_timeouts_exhausting_retries_fail_that_prompt_only(server, make_judge):
    requests = make_requests(2)
    server.responder = by_instruction({requests[0].instruction: Behaviour.hang(30)})
    judge = make_judge(request_timeout=0.3, max_retries=2)
    judgments = judge.rank(requests)
    assert not judgments[0].ok and judgments[1].ranking == EXPECTED
    assert judgments[0].failure.startswith("timeout: no reply") and "3 attempts" in judgments[0].failure
    metrics = judge.metrics()
    assert metrics["failures/timeout"] == 1 and metrics["failures"] == 1 and metrics["retries"] == 2
    assert len(server.requests) == 4


def test_garbage_body_is_a_bad_response_and_not_retried(server, make_judge):
    server.enqueue(Behaviour.garbage())
    judge = make_judge()
    judgment = judge.rank(make_requests(1))[0]
    assert judgment.failure.startswith("bad_response")
    assert len(server.requests) == 1 and judge.metrics()["failures/bad_response"] == 1


def test_connection_refused_is_a_failure_with_a_clear_reason(make_judge):
    with LocalOpenAIServer() as stopped:
        url = stopped.url
    judge = make_judge(base_url=url, max_retries=1)
    judgment = judge.rank(make_requests(1))[0]
    assert judgment.failure.startswith(f"connection: cannot reach {url}")
    assert judge.metrics()["failures/connection"] == 1 and judge.metrics()["requests_sent"] == 2


def test_an_unauthorised_key_stops_the_run(server, make_judge):
    server.responder = lambda index, body: Behaviour.error(401)
    judge = make_judge()
    with pytest.raises(JudgeStop, match="HTTP 401.*OPENAI_API_KEY"):
        judge.rank(make_requests(3))


def test_requests_per_minute_spaces_the_requests(server, make_judge):
    # 2 per second, bursts of 2; a fixed concurrency, so that all four wait for their turn at once
    judge = make_judge(requests_per_minute=120, adaptive_concurrency=False)
    judge.rank(make_requests(4))
    times = sorted(r.time for r in server.requests)
    assert times[-1] - times[0] >= 0.9


# -------------------------------------------------------------------------------------------- budget


def test_budget_exhaustion_stops_before_sending_more(server, make_judge):
    judge = make_judge(budget_requests=3, max_concurrency=1)
    with pytest.raises(JudgeBudgetExceeded, match="budget_requests"):
        judge.rank(make_requests(5))
    assert len(server.requests) == 3
    state = judge.state_dict()
    assert state["counters"]["requests_sent"] == 3

    resumed = make_judge(budget_requests=3)
    resumed.load_state_dict(state)
    with pytest.raises(JudgeBudgetExceeded):
        resumed.rank(make_requests(1))
    assert len(server.requests) == 3  # the resumed run knows the budget is spent


def test_token_budget_is_never_overshot_by_concurrent_requests(server, make_judge):
    judge = make_judge(budget_tokens=12_000, max_tokens=200, max_concurrency=16)
    with pytest.raises(JudgeBudgetExceeded, match="budget_tokens"):
        judge.rank(make_requests(16))
    metrics = judge.metrics()
    assert 0 < len(server.requests) < 16
    assert metrics["prompt_tokens"] + metrics["completion_tokens"] <= 12_000


# ------------------------------------------------------------------------------------- cache, replay


def test_a_rerun_with_the_same_cache_makes_no_request(server, make_judge, tmp_path):
    cache = str(tmp_path / "judge.sqlite")
    requests = make_requests(3)
    first = make_judge(cache_path=cache).rank(requests)
    assert len(server.requests) == 3
    second_judge = make_judge(cache_path=cache)
    second = second_judge.rank(requests)
    assert len(server.requests) == 3
    assert [j.ranking for j in second] == [j.ranking for j in first]
    assert [j.better_response for j in second] == [j.better_response for j in first]
    assert second_judge.metrics()["cache_hits"] == 3 and second_judge.metrics()["requests_sent"] == 0


def test_replay_never_sends_and_a_miss_is_a_failure(server, make_judge, tmp_path):
    cache = str(tmp_path / "judge.sqlite")
    requests = make_requests(2)
    make_judge(cache_path=cache).rank(requests[:1])
    server.clear()
    replay = make_judge(cache_path=cache, replay=True)
    judgments = replay.rank(requests)
    assert judgments[0].ranking == EXPECTED
    assert judgments[1].failure == "replay miss"
    assert server.requests == []
    assert replay.metrics()["failures/replay_miss"] == 1


def test_the_api_key_never_reaches_the_cache_pickles_repr_or_state(server, make_judge, tmp_path):
    cache = tmp_path / "judge.sqlite"
    judge = make_judge(cache_path=str(cache), extra_headers={"X-Org": "secret-header-value"})
    judge.bind_run("run-key", str(tmp_path))  # the spend ledger goes into the same database
    judge.rank(make_requests(2))
    assert server.requests[0].headers["authorization"] == f"Bearer {FAKE_KEY}"  # the key was really used
    assert server.requests[0].headers["x-org"] == "secret-header-value"
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("judge.sqlite"))
    assert stored and FAKE_KEY.encode() not in stored and b"secret-header-value" not in stored
    assert FAKE_KEY not in repr(judge) and "secret-header-value" not in repr(judge)
    assert FAKE_KEY.encode() not in pickle.dumps(judge)
    assert FAKE_KEY not in str(judge.state_dict()) and FAKE_KEY not in str(vars(judge))


def test_an_unset_key_is_a_clear_error_for_a_remote_server(make_judge, monkeypatch):
    monkeypatch.delenv("CYCLEALIGN_TEST_KEY", raising=False)
    judge = make_judge(base_url="https://api.example.invalid/v1", api_key_env="CYCLEALIGN_TEST_KEY")
    with pytest.raises(JudgeStop, match="CYCLEALIGN_TEST_KEY is not set"):
        judge.rank(make_requests(1))


def test_an_unset_key_is_fine_for_a_loopback_server(server, make_judge, monkeypatch):
    monkeypatch.delenv("CYCLEALIGN_TEST_KEY", raising=False)
    judge = make_judge(api_key_env="CYCLEALIGN_TEST_KEY")
    assert judge.rank(make_requests(1))[0].ranking == EXPECTED
    assert server.requests[0].headers["authorization"] == f"Bearer {PLACEHOLDER_KEY}"


# --------------------------------------------------------------------------------- position bias


def test_shuffled_candidates_are_mapped_back(server, make_judge):
    requests = make_requests(6)
    judge = make_judge(shuffle_candidates=True, seed=3)
    assert [j.ranking for j in judge.rank(requests)] == [EXPECTED] * 6
    shown = [parse_prompt(r.body["messages"]) for r in server.requests]
    originals = {r.instruction: r.candidates for r in requests}
    orders = [tuple(originals[s.instruction].index(c) for c in s.candidates) for s in shown]
    assert any(order != (0, 1, 2) for order in orders)  # really shuffled
    assert all(sorted(order) == [0, 1, 2] for order in orders)


def test_rankings_that_repeat_by_shown_position_are_counted(server, make_judge):
    """A judge that reads the replies, shown them shuffled, varies its ranking by position; one that ranks by
    position repeats it (the 135M judge did, 168 times in 168: docs/real_models.md)."""
    reader = make_judge(shuffle_candidates=True, seed=3)
    reader.rank(make_requests(6))
    metrics = reader.metrics()
    assert metrics["rankings_compared"] == 5 and metrics["rankings_same_positions"] < 5
    server.responder = lambda index, body: Behaviour.reply("### The desired ranking is: [1, 2, 0].")
    blind = make_judge(shuffle_candidates=True, seed=3)
    judgments = blind.rank(make_requests(6))
    assert len({j.ranking for j in judgments}) > 1  # mapped back from shuffled orders, they look varied
    metrics = blind.metrics()
    assert metrics["rankings_compared"] == 5 and metrics["rankings_same_positions"] == 5
    assert metrics["rankings_same_by_chance"] == pytest.approx(5 / 6)


def test_permutations_are_aggregated(server, make_judge):
    judge = make_judge(num_permutations=3)
    assert judge.rank(make_requests(2))[0].ranking == EXPECTED
    assert len(server.requests) == 6
    orders = {tuple(parse_prompt(r.body["messages"]).candidates) for r in server.requests}
    assert len(orders) == 6  # 3 rotations x 2 prompts, all distinct


def test_aggregate_rankings_by_mean_rank_with_stable_ties():
    assert aggregate_rankings([(0, 1, 2), (0, 2, 1), (1, 0, 2)], 3) == (0, 1, 2)
    assert aggregate_rankings([(1, 0), (0, 1)], 2) == (0, 1)  # a tie: the lower index first


def test_retry_after_header_forms():
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a past date
    assert retry_after_seconds({"retry-after": "soon"}) is None and retry_after_seconds({}) is None


# ----------------------------------------------------------------------------------------- policies


def test_fallback_answers_the_failed_prompts(server, make_judge):
    requests = make_requests(3)
    server.responder = by_instruction({requests[1].instruction: Behaviour.reply("no idea")})
    fallback = LengthJudge()
    judge = make_judge(on_failure="fallback", fallback=fallback)
    judgments = judge.rank(requests)
    assert judgments[0].ranking == EXPECTED and judgments[2].ranking == EXPECTED
    assert judgments[1].ranking == (2, 1, 0)  # the fallback's longest-first ranking
    assert fallback.calls == [1]
    assert judge.metrics()["fallbacks"] == 1 and judge.metrics()["failures"] == 1


def test_stop_policy_raises_with_the_reason(server, make_judge):
    server.enqueue(Behaviour.reply("no idea"))
    judge = make_judge(on_failure="stop")
    with pytest.raises(JudgeStop, match="1 of 1 prompts got no ranking.*no ranking found"):
        judge.rank(make_requests(1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_failure": "fallback"}, "needs a fallback judge"),
        ({"replay": True}, "replay=True needs a cache_path"),
        ({"budget_usd": 1.0}, "budget_usd needs price"),
        ({"max_concurrency": 0}, "max_concurrency must be > 0"),
        ({"max_retries": -1}, "max_retries must be >= 0"),
        ({"request_timeout": float("nan")}, "request_timeout must be > 0"),
        ({"max_consecutive_failures": 0}, "max_consecutive_failures must be > 0"),
        ({"num_permutations": 0}, "num_permutations must be > 0"),
        ({"extra_headers": {"X-Id": 7}}, "extra_headers must map names to string values"),
        ({"template": "/nonexistent/template.txt"}, "cannot read ranking template"),
    ],
)
def test_bad_settings_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OpenAIJudge(**kwargs)


def test_the_judge_takes_every_chat_setting_with_the_same_default():
    """The chat settings are declared once (ChatSettings) and passed on: no field dropped or changed."""
    import inspect

    parameters = inspect.signature(OpenAIJudge).parameters
    for field in dataclasses.fields(ChatSettings):
        assert parameters[field.name].default == field.default, field.name
    judge = OpenAIJudge(model="m", max_retries=3, max_consecutive_failures=None, cache_path=None)
    assert (judge.settings.model, judge.settings.max_retries, judge.settings.max_consecutive_failures) == (
        "m",
        3,
        None,
    )
    judge.close()


def test_the_judge_passes_every_chat_setting_on_to_its_client(tmp_path):
    """Each setting given to the judge reaches ChatSettings unchanged: none dropped, none swapped."""
    values = {
        "model": "m",
        "base_url": "http://127.0.0.1:1/v1",
        "api_key_env": "CYCLEALIGN_TEST_KEY",
        "temperature": 0.5,
        "max_tokens": 77,
        "request_timeout": 7.0,
        "max_retries": 2,
        "backoff_initial_s": 0.25,
        "backoff_max_s": 3.0,
        "max_retry_after_s": 9.0,
        "extra_headers": {"X-Test": "1"},
        "max_concurrency": 3,
        "adaptive_concurrency": False,
        "requests_per_minute": 60.0,
        "tokens_per_minute": 6000.0,
        "budget_requests": 11,
        "budget_tokens": 1234,
        "budget_usd": 1.5,
        "price_per_million_input_tokens": 0.1,
        "price_per_million_output_tokens": 0.2,
        "cache_path": str(tmp_path / "cache.sqlite"),
        "replay": True,
        "max_consecutive_failures": 4,
        "max_response_bytes": 4096,
    }
    assert set(values) == set(ChatSettings.names())
    defaults = {f.name: f.default for f in dataclasses.fields(ChatSettings)}
    assert all(values[name] != defaults[name] for name in values)  # a dropped one would show
    judge = OpenAIJudge(**values)
    assert judge.settings == ChatSettings(**values)
    judge.close()
    # declared once: the judge's signature (what --help and config checks read) lists each with its default
    parameters = inspect.signature(OpenAIJudge).parameters
    assert {name: parameters[name].default for name in defaults} == defaults
    with pytest.raises(ValueError, match="unknown argument 'temperatur' .did you mean 'temperature'"):
        OpenAIJudge(temperatur=0.1)


# ------------------------------------------------------------------------------- objects and config


def test_pickle_and_deepcopy_give_working_judges_with_the_counters(server, make_judge):
    judge = make_judge()
    judge.rank(make_requests(1))  # starts the loop thread and the client
    for clone in (pickle.loads(pickle.dumps(judge)), copy.deepcopy(judge)):
        try:
            assert clone.metrics()["requests_sent"] == 1
            assert clone.rank(make_requests(1))[0].ranking == EXPECTED
            assert clone.client._rt is not judge.client._rt
        finally:
            clone.close()
    assert judge.rank(make_requests(1))[0].ranking == EXPECTED  # the original still works


def test_repr_names_the_settings(make_judge):
    text = repr(make_judge(extra_headers={"X-Team": "t"}, cache_path=None))
    assert text.startswith("OpenAIJudge(model='local-ranker'")
    assert "api_key_env='OPENAI_API_KEY'" in text and "'X-Team': '***'" in text


def test_jsonargparse_builds_the_judge_and_its_fallback(server):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--judge", type=Judge)
    config = parser.parse_object(
        {
            "judge": {
                "class_path": "cyclealign_pl.judges.openai.OpenAIJudge",
                "init_args": {
                    "model": "local-ranker",
                    "base_url": server.url,
                    "max_concurrency": 4,
                    "on_failure": "fallback",
                    "fallback": {"class_path": f"{__name__}.LengthJudge"},
                },
            }
        }
    )
    judge = parser.instantiate_classes(config).judge
    try:
        assert isinstance(judge, OpenAIJudge) and isinstance(judge.fallback, LengthJudge)
        assert judge.settings.max_concurrency == 4 and judge.rank(make_requests(1))[0].ranking == EXPECTED
    finally:
        judge.close()


def test_the_server_runs_as_a_module_and_serves_the_default_tasks_judge(monkeypatch):
    """The README's trial server answers by the default task's rule (ranking and better reply)."""
    from cyclealign_pl.demo import rule

    process = subprocess.Popen(
        [sys.executable, "-m", "cyclealign_pl", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        url = line.split(" at ", 1)[1].split(" ", 1)[0]
        judge = OpenAIJudge(model="local-ranker", base_url=url, request_timeout=5)
        try:
            [request] = make_requests(1)
            [answer] = judge.rank([request])
            assert answer.ranking == rule.lexicon_ranking(request.instruction, request.candidates)
            assert answer.better_response == rule.better_reply(request.instruction)
        finally:
            judge.close()
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_server_rule_gives_the_paper_ranking_on_the_static_demonstration():
    assert rank_candidates(STATIC_DEMONSTRATION.responses) == STATIC_DEMONSTRATION.ranking


def test_header_values_can_come_from_the_environment(server, make_judge, monkeypatch):
    monkeypatch.setenv("CYCLEALIGN_TEST_HEADER", "from-env")
    judge = make_judge(extra_headers={"api-key": "env:CYCLEALIGN_TEST_HEADER"})
    judge.rank(make_requests(1))
    assert server.requests[0].headers["api-key"] == "from-env"
    assert "from-env" not in repr(judge) and b"from-env" not in pickle.dumps(judge)


def test_close_stops_the_loop_thread_and_a_closed_judge_restarts_on_use(server, make_judge):
    judge = make_judge()
    judge.rank(make_requests(1))
    thread = judge.client._rt.thread
    judge.close()
    assert not thread.is_alive()
    assert judge.rank(make_requests(1))[0].ranking == EXPECTED


# ------------------------------------------------------------------------------------------------- cache


def _fill_cache(path: str, worker: int, count: int) -> None:
    cache = JudgeCache(path)
    for i in range(count):
        cache.put(f"shared-{i}", CachedReply(f"reply from worker {worker}", 1, 2))
        cache.put(f"own-{worker}-{i}", CachedReply("x", 1, 1))
    cache.close()


def test_the_cache_is_safe_for_several_processes(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_fill_cache, args=(path, w, 40)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    cache = JudgeCache(path)
    assert len(cache) == 40 + 3 * 40
    assert cache.get("shared-7").text.startswith("reply from worker ")  # the first writer won, atomically
    cache.close()


def test_a_file_that_is_not_a_cache_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("these are my notes, not a database" * 50)
    with pytest.raises(ValueError, match=f"judge cache {path} is not a usable SQLite database"):
        JudgeCache(path)


def test_cache_keys_change_with_everything_that_changes_the_reply():
    base = dict(
        model="m",
        template_version="v1",
        messages=[{"role": "user", "content": "x"}],
        temperature=0.0,
        max_tokens=10,
        permutation=(0, 1),
    )
    key = cache_key(**base)
    changes = (
        {"model": "n"},
        {"template_version": "v2"},
        {"messages": [{"role": "user", "content": "y"}]},
        {"temperature": 0.5},
        {"max_tokens": 11},
        {"permutation": (1, 0)},
    )
    for change in changes:
        assert cache_key(**{**base, **change}) != key
    assert cache_key(**base) == key


def test_a_429_pauses_every_request_not_only_the_one_that_got_it(server, make_judge):
    first, second, third = make_requests(3)
    seen: set[str] = set()

    def responder(index, body):
        instruction = parse_prompt(body["messages"]).instruction
        if instruction == first.instruction and instruction not in seen:
            seen.add(instruction)
            return Behaviour.error(429, retry_after=0.5)
        return Behaviour.rank(delay=0.2 if instruction == second.instruction else 0.0)

    server.responder = responder
    judge = make_judge(max_concurrency=2)  # the third prompt starts only when the second one is answered
    assert [j.ranking for j in judge.rank([first, second, third])] == [EXPECTED] * 3
    arrivals = {}
    for record in server.requests:
        arrivals.setdefault(parse_prompt(record.body["messages"]).instruction, record.time)
    assert arrivals[third.instruction] - arrivals[first.instruction] >= 0.5


# --------------------------------------------------------------------------------- the Judge boundary


def test_a_ranking_given_as_a_list_is_a_tuple_of_ints_at_the_boundary():
    judgment = Judgment(ranking=[1, 0, 2])
    assert judgment.ranking == (1, 0, 2) and isinstance(judgment.ranking, tuple)
    assert Judgment(ranking=None, failure="x").ranking is None
    assert Judgment(ranking=(2, 1, 0), scores=[0.5, 1]).scores == (0.5, 1.0)
    with pytest.raises(TypeError):
        Judgment(ranking=[1.5, 0])  # not an index: never rounded silently


def test_a_judge_returning_lists_agrees_with_a_tuple_ranking():
    judge = LengthJudge()  # builds its rankings as lists
    request = RankRequest("q", ("a", "bbb", "cc"))
    whitebox = (1, 2, 0)  # what the white box's rank_by_scores returns: a tuple
    for judgment in (judge.rank([request])[0], judge.submit([request]).result(timeout=10)[0]):
        assert judgment.ranking == whitebox  # the cycle's "agreed" test; a list never equalled a tuple
    judge.close()


def test_a_json_reply_keeps_its_better_response_through_the_judge(server, make_judge):
    requests = make_requests(2)
    server.responder = by_instruction(
        {
            requests[0].instruction: Behaviour.reply(
                '```json\n{"ranking": [2, 0, 1], "better_response": "Hi."}\n```'
            ),
            requests[1].instruction: Behaviour.reply('{"desired_ranking": [2, 0, 1]}'),
        }
    )
    judge = make_judge()
    first, second = judge.rank(requests)
    assert (first.ranking, first.better_response) == ((2, 0, 1), "Hi.")
    assert (second.ranking, second.better_response) == ((2, 0, 1), None)
    assert judge.metrics()["missing_better_responses"] == 1  # counted as missing, never invented


# ------------------------------------------------------------------------------------------- preflight


def test_preflight_asks_the_free_models_route_and_sends_no_completion(server, make_judge):
    judge = make_judge()
    judge.preflight()
    assert server.requests == [] and judge.metrics()["requests_sent"] == 0


def test_preflight_on_a_closed_port_fails_within_seconds_naming_the_url():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    judge = OpenAIJudge(model="local-ranker", base_url=url)  # default timeouts and retries: 60 s, 5
    start = time.monotonic()
    with pytest.raises(JudgeUnavailable) as info:
        judge.preflight()
    elapsed = time.monotonic() - start
    judge.close()
    message = str(info.value)
    assert message == (
        f"OpenAIJudge: cannot reach {url}: connection refused (is the server running, on this port?)"
    )
    assert elapsed < 10  # a hang guard only; it takes milliseconds


def test_preflight_times_out_on_a_server_that_never_answers():
    with closing(socket.socket()) as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        judge = OpenAIJudge(model="local-ranker", base_url=url, request_timeout=1.5, max_retries=5)
        start = time.monotonic()
        with pytest.raises(JudgeUnavailable, match=f"^OpenAIJudge: no answer from {url} within 1.5 s$"):
            judge.preflight()
        assert time.monotonic() - start < 10  # one bounded attempt, no retries
        judge.close()


def test_preflight_reports_a_refused_key_from_the_models_route(make_judge):
    with LocalOpenAIServer(api_key="sk-the-right-one") as strict:
        judge = make_judge(base_url=strict.url)
        with pytest.raises(JudgeUnavailable) as info:
            judge.preflight()
        assert str(info.value) == (
            f"OpenAIJudge: HTTP 401 from {strict.url}: the API key in OPENAI_API_KEY was refused"
        )
        assert strict.requests == []  # nothing paid for


@pytest.mark.parametrize(
    ("status", "what"),
    [
        (401, "the API key in OPENAI_API_KEY was refused"),
        (403, "access is denied to the key in OPENAI_API_KEY"),
        (404, "model 'local-ranker' or the URL was not found (check model and base_url)"),
    ],
)
def test_preflight_without_a_models_route_sends_one_token_and_reports_refusals(make_judge, status, what):
    with LocalOpenAIServer(models_route=False) as bare:
        judge = make_judge(base_url=bare.url, max_retries=5)
        judge.preflight()  # no /models route: one chat completion of at most one token, counted
        assert [r.body["max_tokens"] for r in bare.requests] == [1]
        assert judge.metrics()["requests_sent"] == 1 and judge.metrics()["prompt_tokens"] > 0
        bare.enqueue(Behaviour.error(status))
        failing = make_judge(base_url=bare.url, max_retries=5)
        with pytest.raises(JudgeUnavailable) as info:
            failing.preflight()
        assert str(info.value) == f"OpenAIJudge: HTTP {status} from {bare.url}: {what}"
        assert len(bare.requests) == 2  # never retried


def test_preflight_names_the_models_a_server_serves_when_ours_is_not_one(make_judge):
    with LocalOpenAIServer(model="llama-3-8b") as other:
        judge = make_judge(base_url=other.url)
        judge.preflight()  # not listed, but it answers (as servers that accept aliases do): one probe, fine
        assert len(other.requests) == 1
        other.enqueue(Behaviour.error(404))
        with pytest.raises(JudgeUnavailable) as info:
            make_judge(base_url=other.url).preflight()
        assert str(info.value) == (
            f"OpenAIJudge: model 'local-ranker' is not served at {other.url} (it serves: llama-3-8b)"
        )


def test_preflight_in_replay_mode_sends_nothing(server, make_judge, tmp_path):
    cache = str(tmp_path / "judge.sqlite")
    make_judge(cache_path=cache).rank(make_requests(1))
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    make_judge(base_url=dead, cache_path=cache, replay=True).preflight()  # no network: the dead URL is fine
    empty = str(tmp_path / "empty.sqlite")
    with pytest.raises(JudgeUnavailable, match="replay=True, but the cache .*empty.sqlite holds no replies"):
        make_judge(base_url=dead, cache_path=empty, replay=True).preflight()


# ------------------------------------------------------------------------------------ circuit breaker


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_refused_key_or_unknown_model_is_never_retried(server, make_judge, status):
    server.responder = lambda index, body: Behaviour.error(status)
    judge = make_judge(max_retries=4, max_concurrency=1)
    with pytest.raises(JudgeUnavailable, match=f"HTTP {status} from {server.url}"):
        judge.rank(make_requests(3))
    assert len(server.requests) == 1  # nothing retried, no other prompt sent
    assert judge.metrics()["retries"] == 0


def test_the_circuit_breaker_stops_a_dead_server_after_k_failures_in_a_row(make_judge):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    judge = make_judge(base_url=url, max_retries=5, max_consecutive_failures=4, max_concurrency=1)
    start = time.monotonic()
    with pytest.raises(JudgeUnavailable) as info:
        judge.rank(make_requests(10))
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert message.startswith(
        f"OpenAIJudge: stopped after 4 consecutive transport failures (connection refused, name not resolved "
        f"or timeout) at {url}; the last: connection: cannot reach {url}"
    )
    assert "\n" not in message
    assert judge.metrics()["requests_sent"] == 4  # K attempts, then nothing more: not 6 per prompt x 10
    with pytest.raises(JudgeUnavailable):
        judge.rank(make_requests(1))  # it stays stopped
    assert judge.metrics()["requests_sent"] == 4
    assert elapsed < 10  # a hang guard only


def test_the_circuit_breaker_counts_timeouts_and_wakes_requests_in_backoff(server, make_judge):
    server.responder = lambda index, body: Behaviour.hang(30)
    judge = make_judge(
        request_timeout=0.3,
        max_retries=3,
        backoff_initial_s=20.0,
        backoff_max_s=20.0,
        max_consecutive_failures=4,
        max_concurrency=8,
        adaptive_concurrency=False,  # six requests in flight at once, not a slow start from two
    )
    start = time.monotonic()
    with pytest.raises(JudgeUnavailable, match="stopped after 4 consecutive .* the last: timeout: no reply"):
        judge.rank(make_requests(6))
    # six attempts time out together; those already sleeping a 10-20 s backoff wake when the breaker trips
    assert time.monotonic() - start < 10


def test_a_success_resets_the_breaker(server, make_judge):
    server.enqueue(*[Behaviour.drop(), Behaviour.drop(), Behaviour.rank()] * 4)
    judge = make_judge(max_retries=2, max_consecutive_failures=3, max_concurrency=1)
    assert [j.ranking for j in judge.rank(make_requests(4))] == [EXPECTED] * 4  # 8 failures, never 3 in a row
    assert judge.metrics()["retries"] == 8


def test_without_a_breaker_a_dead_server_fails_prompts_one_by_one(make_judge):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    judge = make_judge(base_url=url, max_retries=1, max_consecutive_failures=None)
    judgments = judge.rank(make_requests(5))
    assert all(j.failure.startswith(f"connection: cannot reach {url}: connection refused") for j in judgments)
    assert judge.metrics()["requests_sent"] == 10


def test_connection_problems_are_named():
    url = "https://api.example.invalid/v1"
    error = ConnectionError("wrapper")
    error.__cause__ = socket.gaierror(-2, "Name or service not known")
    assert connection_problem(error, url) == (
        "the host name 'api.example.invalid' does not resolve (Name or service not known)"
    )
    error.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert connection_problem(error, url).startswith("connection refused")
