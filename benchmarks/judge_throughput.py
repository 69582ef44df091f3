"""Throughput of the black-box judge: concurrent vs serial requests against a server with a fixed latency.

The black box's latency, not our code, bounds a training step; concurrency is what hides it. This ranks
``--prompts`` prompts against the local OpenAI-compatible server answering after ``--delay`` seconds, once
with ``max_concurrency=--concurrency`` and once serially (``max_concurrency=1``), and prints both wall times
and their ratio (target: >= 10x for 64 prompts, concurrency 16, 0.5 s delay; the ideal is 16x). A third,
concurrent run is bound to a run (``bind_run``), so each request is also recorded in the spend ledger on disk
(two SQLite transactions, fsynced): what durable spend costs.

    python benchmarks/judge_throughput.py [--prompts 64] [--delay 0.5] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from cyclealign_pl.demo.judge import LexiconRule
from cyclealign_pl.demonstrations import STATIC_DEMONSTRATION
from cyclealign_pl.judges.base import RankRequest
from cyclealign_pl.judges.openai import OpenAIJudge
from cyclealign_pl.serve import LocalOpenAIServer


def requests(count: int) -> list[RankRequest]:
    return [
        RankRequest(
            f"Human: Give me tip number {i} for studying. Assistant:",
            (f"Tip {i}: sleep well.", f"Tip {i}: review your notes every evening and test yourself.", "No."),
            (STATIC_DEMONSTRATION,),
        )
        for i in range(count)
    ]


def timed_rank(
    url: str, batch: list[RankRequest], concurrency: int, run_dir: str | None = None
) -> tuple[float, dict[str, float]]:
    judge = OpenAIJudge(
        model="local-ranker",
        base_url=url,
        api_key_env="CYCLEALIGN_BENCH_UNSET",
        max_concurrency=concurrency,
        request_timeout=30,
    )
    if run_dir is not None:
        judge.bind_run("judge-throughput", run_dir)
    try:
        judge.rank(batch[:1])  # start the loop thread and the connection pool outside the timing
        start = time.perf_counter()
        judgments = judge.rank(batch[1:])
        elapsed = time.perf_counter() - start
        if not all(j.ok for j in judgments):
            raise SystemExit(f"some prompts failed: {[j.failure for j in judgments if not j.ok][:3]}")
        return elapsed, judge.metrics()
    finally:
        judge.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--delay", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    batch = requests(args.prompts + 1)
    with (
        LocalOpenAIServer(delay=args.delay, rule=LexiconRule()) as server,
        tempfile.TemporaryDirectory() as run_dir,
    ):
        concurrent, metrics = timed_rank(server.url, batch, args.concurrency)
        durable, bound = timed_rank(server.url, batch, args.concurrency, run_dir)
        serial, _ = timed_rank(server.url, batch, 1)
    ideal = args.prompts * args.delay
    print(f"{args.prompts} prompts, server delay {args.delay} s")
    in_flight = metrics["requests_in_flight_max"]
    print(
        f"concurrent (max_concurrency={args.concurrency}): {concurrent:.2f} s "
        f"({args.prompts / concurrent:.1f} prompts/s, in flight max {in_flight:.0f})"
    )
    recorded = bound["requests_sent"]
    print(f"concurrent, spend ledger on disk: {durable:.2f} s ({recorded:.0f} requests recorded)")
    print(f"serial     (max_concurrency=1): {serial:.2f} s (lower bound {ideal:.1f} s)")
    ideal_ratio = min(args.concurrency, args.prompts)
    print(f"speed-up: {serial / concurrent:.1f}x (ideal {ideal_ratio}x, target >= 10x)")


if __name__ == "__main__":
    main()
