"""The judge's spend ledger: every request recorded before it is sent, so kill -9 loses no spend and budgets
hold across crashes and processes (real processes, a real local server, real SQLite files)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cyclealign_pl.judges.base import JudgeBudgetExceeded, RankRequest
from cyclealign_pl.judges.chat import LEDGER_FILE
from cyclealign_pl.judges.ledger import SpendLedger
from cyclealign_pl.judges.limits import Budget, Cost
from cyclealign_pl.judges.openai import OpenAIJudge
from cyclealign_pl.testing import Behaviour, LocalOpenAIServer

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "sk-fake-ledger-test-key-90d1"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def requests(tag: str, count: int) -> list[RankRequest]:
    return [
        RankRequest(f"Human: question {tag}-{i}? Assistant:", ("No.", "Yes, gladly.", "Maybe later."))
        for i in range(count)
    ]


def spend(judge: OpenAIJudge) -> tuple[float, float, float]:
    m = judge.metrics()
    return m["requests_sent"], m["prompt_tokens"], m["completion_tokens"]


# ------------------------------------------------------------------------------------------- the ledger


def test_a_request_of_a_dead_process_counts_at_its_bound(tmp_path):
    path = tmp_path / "ledger.sqlite"
    sender = SpendLedger(path, "run", stale_after_s=3600)
    bound = Cost(1, 100, 50, 0.01)
    row = sender.try_reserve(bound, Budget())
    alive = SpendLedger(path, "run", stale_after_s=3600)  # another process, while the sender may still live
    assert alive.spent() == Cost(1, 0, 0, 0)  # sent: counted as a request; its tokens when it settles
    assert alive.try_reserve(Cost(1, 100, 50, 0.01), Budget(tokens=200)) is None  # wait: it may cost 150
    later = SpendLedger(path, "run", stale_after_s=0)  # ... and once the sender is surely dead
    assert later.spent() == bound  # counted at its bound: too much maybe, never too little
    sender.settle(row, Cost(1, 10, 5, 0.001))  # it was alive after all: the real cost replaces the bound
    assert later.spent() == alive.spent() == Cost(1, 10, 5, 0.001)
    assert alive.try_reserve(Cost(1, 100, 50, 0.01), Budget(tokens=200)) is not None
    assert SpendLedger(path, "other-run", stale_after_s=0).spent() == Cost()  # runs keep separate books
    for ledger in (sender, alive, later):
        ledger.close()


def test_a_checkpoint_floor_is_carried_once_and_the_ledger_wins_when_it_knows_more(tmp_path):
    ledger = SpendLedger(tmp_path / "l.sqlite", "run", stale_after_s=60)
    ledger.settle(ledger.try_reserve(Cost(1, 9, 9, 0), Budget()), Cost(1, 5, 3, 0.5))
    ledger.raise_to(Cost(4, 2, 2, 0.1))  # a checkpoint that saw 4 requests (the ledger file was replaced)
    ledger.raise_to(Cost(4, 2, 2, 0.1))  # the same checkpoint loaded by a second rank: carried once
    assert ledger.spent() == Cost(4, 5, 3, 0.5)
    assert ledger.recorded() == Cost(1, 5, 3, 0.5)  # what its own records cover
    ledger.settle(ledger.try_reserve(Cost(1, 9, 9, 0), Budget()), Cost(1, 1, 1, 0.1))
    assert ledger.spent() == Cost(5, 6, 4, 0.6)  # new spend adds on top of the carried floor
    ledger.close()


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("not a database " * 100)
    with pytest.raises(ValueError, match=f"judge spend ledger {path}: not a usable SQLite database"):
        SpendLedger(path, "run", stale_after_s=60)


# ------------------------------------------------------------------------------------ the judge, bound


def test_each_request_is_recorded_before_its_reply_comes(tmp_path):
    arrived, release = threading.Semaphore(0), threading.Event()

    def hold(index, body):  # the server has the request; its reply waits for release
        arrived.release()
        release.wait(20)

    with LocalOpenAIServer(responder=hold) as server:
        judge = OpenAIJudge(
            model="local-ranker", base_url=server.url, request_timeout=30, adaptive_concurrency=False
        )  # all three in flight at once
        judge.bind_run("run-a", str(tmp_path))
        future = judge.submit(requests("held", 3))
        assert all(arrived.acquire(timeout=20) for _ in range(3))
        observer = OpenAIJudge(model="local-ranker", base_url=server.url)  # another process would see this
        observer.bind_run("run-a", str(tmp_path))
        assert spend(observer) == (3, 0, 0)  # sent, not answered: counted already
        release.set()
        assert all(j.ok for j in future.result(timeout=20))
        assert spend(observer) == spend(judge) and spend(judge)[1] > 0
        assert (tmp_path / LEDGER_FILE).exists()
        for j in (judge, observer):
            j.close()


def test_the_ledger_lives_in_the_cache_database_when_there_is_one(tmp_path):
    cache = tmp_path / "cache" / "judge.sqlite"
    with LocalOpenAIServer() as server:
        judge = OpenAIJudge(model="local-ranker", base_url=server.url, cache_path=str(cache))
        judge.bind_run("run-c", str(tmp_path / "run"))
        judge.rank(requests("c", 2))
        judge.close()
    assert not (tmp_path / "run" / LEDGER_FILE).exists()
    with sqlite3.connect(cache) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"replies", "spend_totals", "spend_in_flight"} <= tables
        recorded = conn.execute("SELECT recorded_requests FROM spend_totals WHERE run_id = 'run-c'")
        assert recorded.fetchone() == (2,)
    assert FAKE_KEY.encode() not in b"".join(p.read_bytes() for p in cache.parent.iterdir())


def test_state_dict_agrees_with_the_ledger_and_the_ledger_wins(tmp_path):
    with LocalOpenAIServer() as server:
        first = OpenAIJudge(model="local-ranker", base_url=server.url)
        first.bind_run("run-s", str(tmp_path / "run"))
        first.rank(requests("s", 2))
        checkpoint = first.state_dict()  # an older checkpoint: 2 requests
        first.rank(requests("t", 3))
        assert first.state_dict()["counters"]["requests_sent"] == 5
        first.close()

        resumed = OpenAIJudge(model="local-ranker", base_url=server.url)
        resumed.bind_run("run-s", str(tmp_path / "run"))  # as the module does in setup, before loading
        resumed.load_state_dict(checkpoint)
        assert resumed.metrics()["requests_sent"] == 5  # the ledger knows more than the checkpoint: it wins
        resumed.close()

        moved = OpenAIJudge(model="local-ranker", base_url=server.url)
        moved.load_state_dict(checkpoint)  # loaded before binding, into a run whose ledger was lost
        moved.bind_run("run-s", str(tmp_path / "elsewhere"))
        assert moved.metrics()["requests_sent"] == 2  # never below the checkpoint
        moved.rank(requests("u", 1))
        assert moved.metrics()["requests_sent"] == 3
        moved.close()


def test_spend_before_binding_moves_into_the_run(tmp_path):
    with LocalOpenAIServer(models_route=False) as server:
        judge = OpenAIJudge(model="local-ranker", base_url=server.url)
        judge.preflight()  # no /models route: one 1-token completion, paid for
        judge.bind_run("run-p", str(tmp_path))
        judge.rank(requests("p", 1))
        judge.close()
        again = OpenAIJudge(model="local-ranker", base_url=server.url)
        again.bind_run("run-p", str(tmp_path))
        assert again.metrics()["requests_sent"] == len(server.requests) == 2
        again.close()


def test_a_fallback_judge_keeps_its_own_books(tmp_path):
    with LocalOpenAIServer() as server:
        server.enqueue(Behaviour.reply("They all look fine."))  # the first prompt gets no ranking
        fallback = OpenAIJudge(model="local-ranker", base_url=server.url)
        judge = OpenAIJudge(
            model="local-ranker",
            base_url=server.url,
            on_failure="fallback",
            fallback=fallback,
            max_concurrency=1,
        )
        judge.bind_run("run-f", str(tmp_path))
        assert all(j.ok for j in judge.rank(requests("f", 3)))
        assert (judge.metrics()["requests_sent"], fallback.metrics()["requests_sent"]) == (3, 1)
        assert fallback.client.run[0] == "run-f/fallback"
        judge.close()


# ------------------------------------------------------------------------------------ real processes

SENDER = textwrap.dedent("""
    import sys
    from cyclealign_pl.judges.base import JudgeBudgetExceeded, RankRequest
    from cyclealign_pl.judges.openai import OpenAIJudge

    url, run_dir, run_id, tag, budget, rounds = sys.argv[1:7]
    judge = OpenAIJudge(model="local-ranker", base_url=url, max_concurrency=4, request_timeout=30,
                        budget_requests=int(budget) if budget != "none" else None)
    judge.bind_run(run_id, run_dir)
    i = 0
    try:
        while rounds == "forever" or i < int(rounds):
            batch = [RankRequest(f"Human: {tag} {i}-{k}? Assistant:", ("a", "bb", "ccc")) for k in range(4)]
            judge.rank(batch)
            i += 1
    except JudgeBudgetExceeded:
        print("budget spent", flush=True)
    judge.close()
""")


def sender(
    server: LocalOpenAIServer,
    run_dir: Path,
    run_id: str,
    tag: str,
    budget: str = "none",
    rounds: str = "forever",
) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", SENDER, server.url, str(run_dir), run_id, tag, budget, rounds]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_9_loses_no_spend_and_the_budget_holds_across_the_crash(tmp_path):
    with LocalOpenAIServer(delay=0.05) as server:
        child = sender(server, tmp_path, "run-k", "killed")
        deadline = time.monotonic() + 120
        while len(server.requests) < 30:
            assert child.poll() is None, child.stdout.read()
            assert time.monotonic() < deadline, "the sender never got going"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)  # requests in flight, replies unread, no checkpoint, no cleanup
        child.wait(timeout=30)
        time.sleep(0.5)  # bytes already written by the dead process still reach the server
        received = len(server.requests)

        judge = OpenAIJudge(model="local-ranker", base_url=server.url, max_concurrency=1)
        judge.bind_run("run-k", str(tmp_path))
        sent = judge.metrics()["requests_sent"]
        assert received <= sent <= received + 4  # never fewer; at most the 4 in flight more
        judge.close()

        spent_out = OpenAIJudge(model="local-ranker", base_url=server.url, budget_requests=received)
        spent_out.bind_run("run-k", str(tmp_path))
        with pytest.raises(JudgeBudgetExceeded, match="budget_requests is spent"):
            spent_out.rank(requests("after", 1))
        assert len(server.requests) == received  # refused at once, nothing sent
        spent_out.close()

        room = OpenAIJudge(
            model="local-ranker", base_url=server.url, budget_requests=int(sent) + 2, max_concurrency=1
        )
        room.bind_run("run-k", str(tmp_path))
        with pytest.raises(JudgeBudgetExceeded):
            room.rank(requests("room", 5))
        assert len(server.requests) == received + 2  # the budget counts the crashed run's requests too
        room.close()


def test_processes_sharing_a_run_never_overspend_its_budget(tmp_path):
    with LocalOpenAIServer(delay=0.02) as server:
        children = [
            sender(server, tmp_path, "run-shared", f"rank{r}", budget="10", rounds="3") for r in range(2)
        ]
        outputs = [child.communicate(timeout=120)[0] for child in children]
        assert [child.returncode for child in children] == [0, 0], outputs
        assert len(server.requests) == 10  # 24 wanted, the shared budget allowed exactly 10
        assert any("budget spent" in out for out in outputs)
        judge = OpenAIJudge(model="local-ranker", base_url=server.url)
        judge.bind_run("run-shared", str(tmp_path))
        assert judge.metrics()["requests_sent"] == 10
        judge.close()
