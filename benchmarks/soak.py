"""Soak: the tiny fit for a few hundred steps against a judge server that fails 20% of requests.

Usage: python benchmarks/soak.py [--steps 300] [--failure-rate 0.2] [extra CLI overrides...]

The judge is ``configs/tiny_openai.yaml``'s OpenAIJudge talking to a ``LocalOpenAIServer`` in a child process
(so that its record of every request does not count in the memory figures), which answers a share of the
requests with a mix of failures drawn at random: HTTP 429, HTTP 500, a hang past the client's timeout, a 200
with a body that is not JSON, and a dropped connection. Prints:

* steps completed (training steps = batches of one prompt) and optimizer steps;
* failures absorbed: failed attempts at the server by kind, how the judge absorbed them (retries; prompts
  whose judgment failed and were masked out of the loss, by reason), and the run's own judge-failure counter;
* requests repeated: request bodies the server *answered* more than once (target 0: nothing paid twice; a
  retry after a failed attempt is not an answered repeat, and is shown separately);
* memory of the training process: peak RSS, and RSS after 10%, 50% and 100% of the steps (no growth expected).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """Resident memory of this process now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(conn, failure_rate: float, hang_seconds: float, seed: int) -> None:
    """The failing judge server (child process): sends its URL, and on request its record of what it
    answered."""
    from cyclealign_pl.demo.judge import LexiconRule
    from cyclealign_pl.serve import SCRIPTED_FAILURES, LocalOpenAIServer, failure_mix

    failures = failure_mix(SCRIPTED_FAILURES, hang_seconds=hang_seconds)
    with LocalOpenAIServer(
        failure_rate=failure_rate, failure=failures, seed=seed, rule=LexiconRule()
    ) as server:
        conn.send(server.url)
        conn.recv()
        conn.send(
            [
                (
                    r.behaviour,
                    r.status,
                    hashlib.sha256(json.dumps(r.body, sort_keys=True).encode()).hexdigest(),
                )
                for r in server.requests
            ]
        )


class MemoryProbe(Callback):
    """RSS after every training step."""

    def __init__(self) -> None:
        self.rss: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rss.append(rss_mib())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--prompts", type=int, default=100, help="training prompts per epoch (epochs fill --steps)"
    )
    parser.add_argument("--failure-rate", type=float, default=0.2)
    parser.add_argument(
        "--request-timeout", type=float, default=1.0, help="the client's per-attempt timeout (s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args()

    from cyclealign_pl.cli import main as cli_main

    prompts = min(args.prompts, args.steps)
    epochs = math.ceil(args.steps / prompts)
    conn, child_conn = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(
        target=serve, args=(child_conn, args.failure_rate, args.request_timeout * 3, args.seed), daemon=True
    )
    server.start()
    url = conn.recv()
    with tempfile.TemporaryDirectory() as run_dir:
        cli = cli_main(
            [
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                "--config",
                str(ROOT / "configs" / "tiny_openai.yaml"),
                "--trainer.default_root_dir",
                run_dir,
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.max_epochs",
                str(epochs),
                "--trainer.limit_train_batches",
                str(prompts),
                "--trainer.limit_val_batches",
                "0",
                "--model.reward_model",
                "null",
                "--data.init_args.num_train_prompts",
                str(prompts),
                "--model.judge.init_args.base_url",
                url,
                "--model.judge.init_args.cache_path",
                f"{run_dir}/judge_cache.sqlite",
                "--model.judge.init_args.request_timeout",
                str(args.request_timeout),
                "--model.judge.init_args.max_retries",
                "4",
                "--model.judge.init_args.backoff_initial_s",
                "0.05",
                "--model.judge.init_args.backoff_max_s",
                "0.5",
                *overrides,
            ],
            run=False,
        )
        probe = MemoryProbe()
        cli.trainer.callbacks.append(probe)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        elapsed = time.perf_counter() - start
    conn.send("report")
    requests = conn.recv()
    server.join(timeout=30)
    module = cli.model
    c, judge = module.counters, module.judge.metrics()

    failed = Counter(
        str(status) if behaviour == "status" else {"hang": "timeout"}.get(behaviour, behaviour)
        for behaviour, status, _ in requests
        if behaviour != "rank"
    )
    answered = Counter(body for behaviour, _, body in requests if behaviour == "rank")
    sent = Counter(body for _, _, body in requests)
    lost = {k.removeprefix("failures/"): int(v) for k, v in judge.items() if k.startswith("failures/") and v}

    print(
        f"soak: {c.steps} steps completed of {prompts * epochs} ({epochs} epochs x {prompts} prompts), "
        f"{c.optimizer_steps} optimizer steps, "
        f"{c.iterations / max(c.steps, 1):.2f} iterations/step, {elapsed:.0f} s"
    )
    print(
        f"server: {len(requests)} requests, {sum(failed.values())} failed "
        f"({sum(failed.values()) / max(len(requests), 1):.1%}): {dict(sorted(failed.items()))}"
    )
    print(
        f"failures absorbed: {int(judge['retries'])} retried, {int(judge['failures'])} prompts masked out "
        f"of the loss {lost}; run counter judge_failures={c.judge_failures} "
        f"(besides {c.degenerate_sets} degenerate candidate sets, never judged), "
        f"skipped updates={c.skipped_updates}, "
        f"non-finite={c.nonfinite_updates}"
    )
    print(
        f"requests repeated (answered more than once): {sum(n - 1 for n in answered.values() if n > 1)}   "
        f"(bodies sent again after a failed attempt: {sum(n - 1 for n in sent.values() if n > 1)})"
    )
    early, middle, end = (probe.rss[max(len(probe.rss) * k // 10 - 1, 0)] for k in (1, 5, 10))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"memory: peak RSS {peak:.0f} MiB; RSS after 10% / 50% / 100% of the steps: "
        f"{early:.0f} / {middle:.0f} / {end:.0f} MiB (growth after warm-up {end - early:+.0f} MiB)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
