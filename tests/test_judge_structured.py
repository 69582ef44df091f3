"""Structured output (and its fallback), adaptive concurrency and the breaker's view of queued requests,
against the loopback OpenAI-compatible server (real HTTP, no mocked client)."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from cyclealign_pl.judges.limits import ConcurrencyLimit
from cyclealign_pl.judges.prompt import parse_reply, ranking_schema
from cyclealign_pl.testing import Behaviour, parse_prompt
from cyclealign_pl.testing.openai_server import rank_candidates
from tests.test_openai_judge import EXPECTED, make_requests


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake-structured-test")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def json_answer(body) -> Behaviour:
    """What a server that follows the schema writes: the rule's ranking as JSON."""
    request = parse_prompt(body["messages"])
    ranking = list(rank_candidates(request.candidates))
    return Behaviour.reply(json.dumps({"ranking": ranking, "better_response": "A careful answer."}))


def llama_cpp_like(index, body) -> Behaviour:
    """llama-cpp-python's server: 422 for OpenAI's json_schema form, JSON for json_object with a schema."""
    form = (body.get("response_format") or {}).get("type")
    if form == "json_schema":
        return Behaviour.error(422)
    return json_answer(body) if form == "json_object" else None


# ------------------------------------------------------------------------------------------- the schema


def test_the_schema_admits_exactly_the_valid_rankings():
    schema = ranking_schema(3, max_better_chars=100)["schema"]
    assert list(schema["properties"]) == ["ranking", "better_response"]  # the ranking is written first
    listed = schema["properties"]["ranking"]["enum"]
    assert sorted(map(tuple, listed)) == sorted(
        (a, b, c) for a in range(3) for b in range(3) for c in range(3) if len({a, b, c}) == 3
    )
    assert schema["properties"]["better_response"]["maxLength"] == 100
    big = ranking_schema(7)["schema"]["properties"]["ranking"]
    assert big["minItems"] == big["maxItems"] == 7 and big["items"]["enum"] == list(range(7))


def test_the_schema_is_sent_in_openai_form_and_the_json_reply_read(server, make_judge):
    server.responder = lambda index, body: json_answer(body)
    judge = make_judge(max_tokens=200)
    judgments = judge.rank(make_requests(3))
    assert [j.ranking for j in judgments] == [EXPECTED] * 3
    assert {j.better_response for j in judgments} == {"A careful answer."}
    sent = server.requests[0].body["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["schema"]["properties"]["better_response"]["maxLength"] == 200 - 48
    assert judge.metrics()["structured_output_fallbacks"] == 0


def test_a_refused_json_schema_falls_back_to_llama_cpp_form_once(server, make_judge, caplog):
    server.responder = llama_cpp_like
    judge = make_judge(max_concurrency=1)
    with caplog.at_level(logging.WARNING):
        first = judge.rank(make_requests(2))
        second = judge.rank(make_requests(4)[2:])
    assert [j.ranking for j in first + second] == [EXPECTED] * 4
    forms = [r.body["response_format"]["type"] for r in server.requests]
    assert forms == ["json_schema", "json_object", "json_object", "json_object", "json_object"]
    assert judge.metrics()["structured_output_fallbacks"] == 1
    assert judge.metrics()["failures"] == 0 and judge.metrics()["retries"] == 0
    said = [r.getMessage() for r in caplog.records if "refused response_format" in r.getMessage()]
    assert len(said) == 1 and "json_object" in said[0]


def test_a_server_refusing_any_response_format_gets_plain_requests_and_the_text_parser(server, make_judge):
    server.responder = lambda index, body: Behaviour.error(400) if "response_format" in body else None
    judge = make_judge(max_concurrency=1)
    assert [j.ranking for j in judge.rank(make_requests(3))] == [EXPECTED] * 3
    assert ["response_format" in r.body for r in server.requests] == [True, True, False, False, False]
    assert judge.metrics()["structured_output_fallbacks"] == 1


def test_a_400_that_is_not_about_the_schema_keeps_structured_output(server, make_judge):
    server.responder = lambda index, body: Behaviour.error(400)
    judge = make_judge(max_concurrency=1)
    judgments = judge.rank(make_requests(2))
    assert all(j.failure.startswith("http_error: HTTP 400") for j in judgments)
    assert judge.metrics()["structured_output_fallbacks"] == 0
    forms = [(r.body.get("response_format") or {}).get("type") for r in server.requests]
    assert forms == ["json_schema", "json_object", None] * 2  # each request asks in the strongest form again


def test_structured_output_off_sends_no_response_format_and_keys_the_cache_apart(server, make_judge):
    off = make_judge(structured_output="off")
    assert [j.ranking for j in off.rank(make_requests(1))] == [EXPECTED]
    assert "response_format" not in server.requests[0].body
    on = make_judge()
    assert off._calls(make_requests(1))[0].key != on._calls(make_requests(1))[0].key
    with pytest.raises(ValueError, match="structured_output must be"):
        make_judge(structured_output="grammar")


# -------------------------------------------------------------------------------- one request at a time


def serial(server, service_s: float) -> threading.Lock:
    """Make ``server`` answer one request at a time, ``service_s`` each (as llama.cpp's Python server)."""
    lock = threading.Lock()

    def responder(index, body):
        with lock:
            time.sleep(service_s)
        return None  # then the ranker answers

    server.responder = responder
    return lock


def test_adaptive_concurrency_fits_a_one_request_at_a_time_server(server, make_judge):
    serial(server, 0.1)
    judge = make_judge(max_concurrency=16, request_timeout=0.75, max_retries=2)
    judgments = judge.rank(make_requests(16))
    assert [j.ranking for j in judgments] == [EXPECTED] * 16
    metrics = judge.metrics()
    assert metrics["retries"] == 0 and metrics["failures"] == 0
    assert metrics["requests_in_flight_max"] <= 8  # 16 at once would wait up to 1.6 s: past the timeout
    assert metrics["concurrency_limit"] <= 4


def test_a_fixed_concurrency_of_16_times_out_on_the_same_server(server, make_judge):
    serial(server, 0.1)
    judge = make_judge(
        max_concurrency=16,
        request_timeout=0.75,
        max_retries=2,
        adaptive_concurrency=False,
        max_consecutive_failures=None,
    )
    judge.rank(make_requests(16))
    assert judge.metrics()["retries"] > 0  # what the adaptive limit avoids


def test_timeouts_behind_our_own_requests_do_not_trip_the_breaker(server, make_judge):
    serial(server, 0.15)
    judge = make_judge(
        max_concurrency=4,
        adaptive_concurrency=False,
        request_timeout=0.5,
        max_consecutive_failures=1,  # any timeout counted as a dead server would stop the run
    )
    judgments = judge.rank(make_requests(4))  # the fourth waits 0.6 s behind the other three: a timeout
    assert [j.ranking for j in judgments] == [EXPECTED] * 4
    assert judge.metrics()["timeouts_queued"] >= 1 and judge.metrics()["retries"] >= 1


def test_the_limit_halves_on_slow_replies_and_grows_back():
    limit = ConcurrencyLimit(16, adaptive=True)
    assert limit.current == 2
    limit.record(0, 1.0)
    limit.record(0, 1.0)
    assert limit.current == 4  # slow start: one more per reply
    limit.record(0, 3.0)  # three times the fastest reply: a queue
    assert limit.current == 2 and limit.decreases == 1
    limit.record(0, 5.0)  # sent before the decrease: no second one
    assert limit.current == 2
    for _ in range(4):
        limit.record(1, 1.0)
    assert limit.current == 3  # additive increase after the first decrease
    limit.record(1, None, overloaded=True)
    assert limit.current == 1
    fixed = ConcurrencyLimit(16, adaptive=False)
    fixed.record(0, 100.0)
    assert fixed.current == 16


def test_a_json_reply_cut_by_max_tokens_keeps_its_ranking_written_first():
    parsed = parse_reply('{"ranking": [2, 0, 1], "better_response": "Sure, here is', 3)
    assert parsed.ranking == (2, 0, 1) and parsed.better_response is None  # counted missing, not invented


# --------------------------------------------------------------------------- a managed server, as configured


def test_a_managed_server_is_configured_in_yaml_and_checked_before_anything_starts(tmp_path):
    from jsonargparse import ArgumentParser

    from cyclealign_pl.judges.base import Judge
    from cyclealign_pl.judges.llama_server import LlamaCppServer
    from cyclealign_pl.judges.openai import OpenAIJudge
    from cyclealign_pl.local_models import LocalModelError

    gguf = tmp_path / "Tiny-Judge.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--judge", type=Judge)
    init = {"server": {"gguf": str(gguf), "n_ctx": 2048, "n_threads": 2}, "structured_output": "json_object"}
    config = parser.parse_object(
        {"judge": {"class_path": "cyclealign_pl.judges.openai.OpenAIJudge", "init_args": init}}
    )
    judge = parser.instantiate_classes(config).judge
    try:
        assert isinstance(judge.server, LlamaCppServer) and judge.server.n_threads == 2
        assert judge.settings.model == "Tiny-Judge.Q4"  # the GGUF's name, unless model is given
        assert judge.settings.max_concurrency == 1  # it serves one request at a time
        assert not judge.server.running  # nothing starts before the run needs it
        assert "server=LlamaCppServer(gguf=" in repr(judge)
    finally:
        judge.close()
    with pytest.raises(ValueError, match="not both"):
        OpenAIJudge(server=LlamaCppServer(gguf=str(gguf)), base_url="http://127.0.0.1:8000/v1")
    with pytest.raises(LocalModelError, match="GGUF file not found"):
        LlamaCppServer(gguf=str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="n_ctx must be > 0"):
        LlamaCppServer(gguf=str(gguf), n_ctx=0)


# ------------------------------------------------------------------------------------------ position bias


def test_orders_that_cancel_out_are_a_counted_failure_not_a_tie_break(server, make_judge):
    from cyclealign_pl.judges.base import RankRequest

    server.responder = lambda index, body: Behaviour.reply('{"ranking": [0, 1], "better_response": "x"}')
    pair = RankRequest("Human: Hi. Assistant:", ("Hello, how can I help?", "Go away."))  # first shown wins
    biased = make_judge(num_permutations=2).rank([pair])[0]
    assert biased.ranking is None and biased.failure.startswith("position bias: the 2 orders asked cancel")
    assert make_judge(num_permutations=1).rank([pair])[0].ranking == (0, 1)  # one order cannot tell
    server.responder = lambda index, body: json_answer(body)  # a judge that reads the content
    assert make_judge(num_permutations=2).rank([pair])[0].ranking == (0, 1)


def test_a_managed_server_without_llama_cpp_installed_is_one_line_at_preflight(tmp_path, monkeypatch):
    import importlib.util

    from cyclealign_pl.judges.base import JudgeUnavailable
    from cyclealign_pl.judges.llama_server import LlamaCppServer
    from cyclealign_pl.judges.openai import OpenAIJudge

    gguf = tmp_path / "judge.gguf"
    gguf.write_bytes(b"GGUF")
    judge = OpenAIJudge(server=LlamaCppServer(gguf=str(gguf)))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name)
    )
    try:
        with pytest.raises(
            JudgeUnavailable, match=r"llama-cpp-python is not installed: pip install -e '\.\[local\]'"
        ):
            judge.preflight()
    finally:
        judge.close()
