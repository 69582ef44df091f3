"""Time to quality: how much sooner the batched cycle reaches a fixed reward than the paper's serial loop.

Prompts per second can hide a loop that runs faster but learns less, so this measures the training time each
loop needs to reach an evaluator reward R on the default task (docs/default_task.md: its pretrained white box,
lexicon judge and evaluator; the judge answers after ``--delay`` seconds, like a hosted LLM). Fair by
construction:

* **R is fixed before the run** (``--target``), not read off either loop's curve.
* **Each loop at its best learning rate**: every loop runs every rate of ``--lrs`` (one grid for all loops),
  ``--repeats`` times with seeds 0, 1, ...; the runs are interleaved (repeat by repeat, the order of the
  loops alternating) so that both loops see the same load on a shared machine. A loop's best rate is the one
  with the lowest median time to R (a run that never reaches R counts as infinitely slow).
* **The same evaluation cadence**: both loops are evaluated on the 100 held-out prompts after every
  ``--eval-every`` rounds (one round = one judge round trip: one iteration of one prompt in the serial loop,
  of every prompt in flight in the batched one), and the clock is stopped while the evaluator works. A run
  stops at its first evaluation at or above R, or after ``--prompts`` training prompts.
* **Load-independent figures next to seconds**: rounds (judge round trips, which set the pace when the judge
  is slow), prompts and judge requests to R. Seconds are medians with their range over the repeats.

The loops: ``serial`` is one slot with the judge awaited before the white box scores (the paper's loop);
``B<n>`` is continuous batching with n slots and the judge overlapped. ``--warmup K`` adds a linear
learning-rate warm-up over K optimizer steps to every loop (``model.lr_scheduler`` in a config).
``--no-judge-reply`` trains without the judge's better reply (``cycle.use_judge_response: false``): a task
that learns from the rankings alone. ``--judge-noise p`` replaces a share p of the judge's rankings by random
ones (decided by a hash of each request, so every loop meets the same judge): LLM judges disagree with human
labels on a third of HH-RLHF pairs or more, and a noisy teacher is where one prompt per update is a poor
estimate. ``--threads`` and ``--batched-threads`` give each loop its best thread count (docs/scaling.md 1.1:
the serial loop is fastest with 1, batching puts the second core to work).

    python benchmarks/time_to_quality.py [--loops serial B8] [--lrs 4e-4 8e-4 1.6e-3 3.2e-3] \
        [--target 92] [--repeats 3] [--delay 0.5] [--prompts 96] [--max-rounds 40]

docs/scaling.md (section 1.2) gives the commands of its tables.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cycle_throughput import make_update

from cyclealign_pl.cycle import TIMES, CycleConfig, CycleState, StepOutcome, run_cycle
from cyclealign_pl.data.hh_rlhf import HHRLHFDataModule
from cyclealign_pl.demo.judge import LexiconJudge
from cyclealign_pl.demonstrations import DemonstrationPool
from cyclealign_pl.evaluation import RewardEvaluation
from cyclealign_pl.hf import load_causal_lm, load_tokenizer
from cyclealign_pl.judges.base import Judge, Judgment, RankRequest
from cyclealign_pl.judges.reward_model import RewardModelJudge
from cyclealign_pl.policy import SamplingConfig, WhiteBox

# configs/tiny.yaml, the default task
SAMPLING = SamplingConfig(max_new_tokens=48, temperature=1.0, top_p=0.9)
MAX_LENGTH, EVAL_TOKENS = 144, 48
WIDTHS = (7, 8, 8, 18, 14, 14, 16)  # the sweep table's columns


def mean_reward(whitebox: WhiteBox, evaluator: RewardModelJudge, rows: Sequence[dict]) -> float:
    evaluation = RewardEvaluation(["harmless-base"])
    for start in range(0, len(rows), 50):
        batch = {key: [r[key] for r in rows[start : start + 50]] for key in ("id", "subset", "prompt")}
        evaluation.step(whitebox, evaluator, batch, EVAL_TOKENS)
    return evaluation.metric.table()[-1].mean_reward


class NoisyJudge(Judge):
    """``judge`` that answers a uniformly random ranking instead of its own with probability ``noise``,
    decided by a hash of the request (the same request gets the same answer in every loop and run): LLM
    judges disagree with human labels on a third of HH-RLHF pairs or more."""

    def __init__(self, judge: Judge, noise: float) -> None:
        self.judge, self.noise = judge, noise

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        judgments = self.judge.rank(requests)
        out = []
        for request, judgment in zip(requests, judgments):
            digest = hashlib.sha256(repr((request.instruction, request.candidates)).encode()).digest()
            draw = random.Random(digest)
            if judgment.ok and draw.random() < self.noise:
                ranking = list(range(len(request.candidates)))
                draw.shuffle(ranking)
                judgment = replace(judgment, ranking=tuple(ranking))
            out.append(judgment)
        return out

    def preflight(self) -> None:
        self.judge.preflight()

    def close(self) -> None:
        self.judge.close()


def one_round_at_a_time(
    state: CycleState, whitebox: WhiteBox, judge, rows: Sequence[dict], cycle: CycleConfig, update
) -> Iterator[StepOutcome]:
    """Continuous batching as ``CycleAlignModule`` runs it, one round per ``next``: the waiting line is kept
    topped up from ``rows`` (in order), and the last prompts are drained."""
    pool, taken = DemonstrationPool(), 0
    while True:
        free = state.capacity - len(state.active()) - len(state.waiting)
        batch = rows[taken : taken + max(free, 0)]
        taken += len(batch)
        outcome = run_cycle(
            state,
            whitebox,
            judge,
            pool,
            [r["prompt"] for r in batch],
            [r["id"] for r in batch],
            cycle,
            update,
            drain=taken >= len(rows),
            should_stop=lambda _judge_stop: True,  # asked after the first round: one round per call
        )
        if not outcome.rounds:
            return
        yield outcome


@dataclass
class Run:
    """One training run; ``curve`` holds (seconds, rounds, prompts taken, judge requests, reward) per
    evaluation."""

    loop: str
    lr: float
    seed: int
    curve: list[tuple[float, int, int, int, float]] = field(default_factory=list)
    reached: tuple[float, int, int, int, float] | None = None
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMES, 0.0))

    def per_round(self) -> str:
        """Where a round's time went (ms): generate, score, judge wait, update."""
        rounds = max(self.curve[-1][1], 1)
        return " / ".join(f"{self.times[name] * 1000 / rounds:.0f}" for name in TIMES)


def train(loop: str, lr: float, seed: int, data, judge, evaluator: RewardModelJudge, args) -> Run:
    """Train a fresh white box with ``loop`` at ``lr`` until its reward reaches ``args.target`` (or
    ``args.max_rounds`` rounds, or ``args.prompts`` prompts, have passed)."""
    slots = 1 if loop == "serial" else int(loop[1:])
    torch.set_num_threads(args.threads if slots == 1 else args.batched_threads or args.threads)
    tokenizer = load_tokenizer("builtin:whitebox")
    model = load_causal_lm("builtin:whitebox").train()
    whitebox = WhiteBox(model, tokenizer, MAX_LENGTH, SAMPLING)
    whitebox.sample([r["prompt"] for r in data.train_rows[:slots]], 3)  # warm up the kernels, off the clock
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = (
        torch.optim.lr_scheduler.LinearLR(optimizer, 1 / args.warmup, 1.0, args.warmup)
        if args.warmup
        else None
    )
    step = make_update(model, optimizer)

    def update(loss: torch.Tensor | None) -> bool:
        applied = step(loss)
        if applied and schedule is not None:
            schedule.step()
        return applied

    cycle = CycleConfig(overlap_judge=slots > 1, use_judge_response=not args.no_judge_reply)
    state = CycleState(slots)
    rows = data.train_rows[: args.prompts]
    run = Run(loop, lr, seed, [(0.0, 0, 0, 0, mean_reward(whitebox, evaluator, data.eval_rows))])
    seconds, rounds, requests, finished = 0.0, 0, 0, 0
    rounds_of = one_round_at_a_time(state, whitebox, judge, rows, cycle, update)
    while rounds < args.max_rounds:
        started = time.perf_counter()
        outcome = next(rounds_of, None)
        seconds += time.perf_counter() - started
        if outcome is None:
            break
        rounds += 1
        requests += outcome.active_slots
        for name in TIMES:
            run.times[name] += outcome.times[name]
        finished += len(outcome.finished)
        if rounds % args.eval_every:
            continue
        taken = finished + len(state.active())  # prompts started
        # the clock is stopped while the evaluator scores
        reward = mean_reward(whitebox, evaluator, data.eval_rows)
        run.curve.append((seconds, rounds, taken, requests, reward))
        if reward >= args.target:
            run.reached = run.curve[-1]
            break
    return run


def median_range(values: Sequence[float], fmt: str) -> str:
    """``median [min..max]``; ``-`` for a run that did not reach R (infinite)."""
    text = [
        format(v, fmt) if v != float("inf") else "-"
        for v in (statistics.median(values), min(values), max(values))
    ]
    return f"{text[0]} [{text[1]}..{text[2]}]" if len(values) > 1 else text[0]


def summarise(runs: Sequence[Run]) -> dict[str, list[float]]:
    """Per measure (seconds, rounds, prompts, judge requests), the values of the runs (inf: R not reached)."""
    names = ("seconds", "rounds", "prompts", "requests")
    return {
        name: [float(r.reached[k]) if r.reached else float("inf") for r in runs]
        for k, name in enumerate(names)
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", nargs="+", default=["serial", "B8"], help="serial and/or B<slots>")
    parser.add_argument(
        "--lrs", nargs="+", type=float, default=[4e-4, 8e-4, 1.6e-3, 3.2e-3], help="the one grid"
    )
    parser.add_argument("--target", type=float, default=92.0, help="R, the evaluator reward to reach")
    parser.add_argument("--repeats", type=int, default=3, help="runs per loop and rate")
    parser.add_argument("--first-seed", type=int, default=0, help="the repeats use seeds from this one on")
    parser.add_argument("--delay", type=float, default=0.5, help="the judge's latency per request (s)")
    parser.add_argument("--prompts", type=int, default=96, help="training prompts at most (the task has 192)")
    parser.add_argument("--max-rounds", type=int, default=40, help="judge round trips per run at most")
    parser.add_argument("--eval-every", type=int, default=1, help="evaluate after every this many rounds")
    parser.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts evaluated (<= 100)")
    parser.add_argument(
        "--warmup", type=int, default=0, help="linear learning-rate warm-up (optimizer steps)"
    )
    parser.add_argument(
        "--no-judge-reply", action="store_true", help="train without the judge's better reply"
    )
    parser.add_argument(
        "--judge-noise", type=float, default=0.0, help="share of rankings replaced by random ones"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the serial loop")
    parser.add_argument("--batched-threads", type=int, default=None, help="torch threads of the B<n> loops")
    parser.add_argument("--curves", action="store_true", help="print every run's curve")
    args = parser.parse_args(argv)
    data = HHRLHFDataModule(train_split="test", num_train_prompts=192, eval_prompts_per_subset=100)
    data.setup("fit")
    data.eval_rows = data.eval_rows[: args.eval_prompts]
    evaluator = RewardModelJudge(model="builtin:evaluator", sigmoid=True, scale=100, max_length=64)
    print(
        f"time to reward R = {args.target:g} on {len(data.eval_rows)} held-out prompts; at most "
        f"{args.prompts} training prompts; judge latency {args.delay:g} s; evaluated every {args.eval_every} "
        f"round(s), clock stopped; {args.repeats} repeat(s) per loop and rate, interleaved; warm-up "
        f"{args.warmup} steps; judge's better reply {'off' if args.no_judge_reply else 'on'}; random "
        f"rankings {args.judge_noise:.0%}; threads: serial {args.threads}, batched "
        f"{args.batched_threads or args.threads}",
        flush=True,
    )
    judge: Judge = LexiconJudge(delay=args.delay, seed=0)
    if args.judge_noise:
        judge = NoisyJudge(judge, args.judge_noise)
    judge.preflight()  # the local server starts off the clock
    runs: list[Run] = []
    for seed in range(args.first_seed, args.first_seed + args.repeats):
        for lr in args.lrs:
            loops = args.loops if (seed + args.lrs.index(lr)) % 2 == 0 else args.loops[::-1]
            for loop in loops:
                run = train(loop, lr, seed, data, judge, evaluator, args)
                runs.append(run)
                last = run.curve[-1]
                print(
                    f"  seed {seed} {loop:>6} lr {lr:<8.3g} "
                    + (
                        f"reached {last[4]:.2f} after {last[0]:.1f} s, {last[1]} rounds, {last[2]} prompts"
                        if run.reached
                        else f"did not reach R: {max(c[4] for c in run.curve):.2f} at best, "
                        f"{last[1]} rounds, {last[2]} prompts, {last[0]:.1f} s"
                    )
                    + f"; per round (ms) generate / score / judge wait / update: {run.per_round()}",
                    flush=True,
                )
                if args.curves:
                    print("    " + "  ".join(f"{c[0]:.1f}s/{c[1]}r:{c[4]:.1f}" for c in run.curve))

    print("\nthe sweep: time to R, median [min..max] over the repeats ('-': R not reached in a run)")
    header = ("loop", "lr", "reached", "seconds", "rounds", "prompts", "judge requests")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, WIDTHS)))
    best: dict[str, tuple[float, float, dict]] = {}
    for loop in args.loops:
        for lr in args.lrs:
            mine = [r for r in runs if r.loop == loop and r.lr == lr]
            figures = summarise(mine)
            reached = sum(r.reached is not None for r in mine)
            cells = [loop, f"{lr:.3g}", f"{reached}/{len(mine)}", median_range(figures["seconds"], ".1f")]
            cells += [median_range(figures[name], ".0f") for name in ("rounds", "prompts", "requests")]
            print(" ".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS)))
            seconds = statistics.median(figures["seconds"])
            if loop not in best or seconds < best[loop][0]:
                best[loop] = (seconds, lr, figures)
    judge.close()
    print("\neach loop at its best rate (lowest median seconds to R):")
    for loop, (seconds, lr, figures) in best.items():
        rounds = statistics.median(figures["rounds"])
        print(f"  {loop:>6}: lr {lr:.3g}, {seconds:.1f} s, {rounds:.0f} rounds to R")
    if "serial" in best:
        serial_s, _, serial = best["serial"]
        serial_rounds = statistics.median(serial["rounds"])
        for loop, (seconds, _, figures) in best.items():
            if loop == "serial":
                continue
            ratio = serial_s / seconds if seconds < float("inf") else 0.0
            per_seed = [s / b for s, b in zip(serial["seconds"], figures["seconds"])]
            spread = f" (per seed {min(per_seed):.1f}-{max(per_seed):.1f}x)" if len(per_seed) > 1 else ""
            print(
                f"  {loop} vs serial: {ratio:.1f}x in seconds{spread}, "
                f"{serial_rounds / statistics.median(figures['rounds']):.1f}x in rounds "
                f"(target >= 4x: {'met' if ratio >= 4 else 'NOT met'})"
            )


if __name__ == "__main__":
    main()
