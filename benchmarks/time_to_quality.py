"""Time to quality: how long the batched cycle needs to align the default task as far as the serial loop does.

Prompts per second can hide a loop that runs faster but learns less. This trains the default task's white box
(docs/default_task.md: its pretrained white box, lexicon judge and evaluator; the judge answers after
``--delay`` seconds, like a hosted LLM) twice in one process, from the same weights and seed:

* **serial** - the paper's loop: one prompt at a time, the judge awaited before the white box scores, through
  all ``--prompts`` training prompts; then its evaluator reward R on the 100 held-out prompts;
* **batched** - continuous batching with ``--batch-size`` slots and the judge overlapped; the clock stops
  after every training step while the evaluator scores the white box, until the reward reaches R (for at most
  ``--max-passes`` passes over the prompts). It runs twice: with the serial loop's learning rate, and with
  it scaled by sqrt(B). One optimizer step per round averages B prompts' gradients, so at the same rate it
  takes B times fewer steps per prompt than the serial loop; raising the rate with the batch, as is usual for
  Adam, is how a batched run is meant to be configured (docs/scaling.md).

Printed: the curves (training seconds, prompts, reward), the serial loop's time T_s, each batched run's time
to reach R, T_b, and T_s / T_b (issue 14's target: >= 4x). Evaluation time is not counted in either.

    python benchmarks/time_to_quality.py [--prompts 96] [--batch-size 8] [--delay 0.5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cycle_throughput import make_update, training_steps

from cyclealign_pl.cycle import CycleConfig, CycleState
from cyclealign_pl.data.hh_rlhf import HHRLHFDataModule
from cyclealign_pl.demo.judge import LexiconJudge
from cyclealign_pl.demonstrations import DemonstrationPool
from cyclealign_pl.evaluation import RewardEvaluation
from cyclealign_pl.hf import load_causal_lm, load_tokenizer
from cyclealign_pl.judges.reward_model import RewardModelJudge
from cyclealign_pl.policy import SamplingConfig, WhiteBox

# configs/tiny.yaml, the default task
SAMPLING = SamplingConfig(max_new_tokens=48, temperature=1.0, top_p=0.9)
MAX_LENGTH, EVAL_TOKENS, LR = 144, 48, 1e-4


def mean_reward(whitebox: WhiteBox, evaluator: RewardModelJudge, rows: list[dict]) -> float:
    evaluation = RewardEvaluation(["harmless-base"])
    for start in range(0, len(rows), 50):
        batch = {key: [r[key] for r in rows[start : start + 50]] for key in ("id", "subset", "prompt")}
        evaluation.step(whitebox, evaluator, batch, EVAL_TOKENS)
    return evaluation.metric.table()[-1].mean_reward


def train(
    batch_size: int, lr: float, train_rows: list[dict], eval_rows: list[dict], args, target: float | None
) -> list[tuple]:
    """Train a fresh white box; the curve ``[(training seconds, prompts done, reward)]`` after every step
    (serial: only at the end). Stops early once the reward reaches ``target``."""
    tokenizer = load_tokenizer("builtin:whitebox")
    model = load_causal_lm("builtin:whitebox").train()
    whitebox = WhiteBox(model, tokenizer, MAX_LENGTH, SAMPLING)
    evaluator = RewardModelJudge(model="builtin:evaluator", sigmoid=True, scale=100, max_length=64)
    judge = LexiconJudge(delay=args.delay, seed=0)
    update = make_update(model, torch.optim.AdamW(model.parameters(), lr=lr))
    cycle = CycleConfig(overlap_judge=batch_size > 1)
    state, pool = CycleState(batch_size), DemonstrationPool()
    torch.manual_seed(0)
    curve = [(0.0, 0, mean_reward(whitebox, evaluator, eval_rows))]
    seconds, done = 0.0, 0
    passes = 1 if target is None else args.max_passes
    rows = [{**r, "id": f"{r['id']}#{k // len(train_rows)}"} for k, r in enumerate(train_rows * passes)]
    steps = training_steps(state, whitebox, judge, pool, rows, cycle, update)
    try:
        while True:
            started = time.perf_counter()
            outcome = next(steps, None)
            seconds += time.perf_counter() - started
            if outcome is None:
                break
            done += len(outcome.finished)
            if batch_size > 1 or done == len(rows):  # the clock is stopped while the evaluator scores
                curve.append((seconds, done, mean_reward(whitebox, evaluator, eval_rows)))
                if target is not None and curve[-1][2] >= target:
                    break
    finally:
        judge.close()
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96, help="training prompts (the default task has 192)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.5, help="the judge's latency per request (s)")
    parser.add_argument(
        "--max-passes", type=int, default=2, help="passes over the prompts a batched run may take"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = HHRLHFDataModule(train_split="test", num_train_prompts=args.prompts, eval_prompts_per_subset=100)
    data.setup("fit")
    print(
        f"default task: {len(data.train_rows)} training prompts, {len(data.eval_rows)} held-out evaluation "
        f"prompts, judge latency {args.delay:g} s, batched loop with {args.batch_size} slots",
        flush=True,
    )

    serial = train(1, LR, data.train_rows, data.eval_rows, args, target=None)
    serial_s, _, reached = serial[-1]
    print(
        f"serial (lr {LR:g}): reward {serial[0][2]:.2f} -> {reached:.2f} after {serial[-1][1]} prompts in "
        f"{serial_s:.1f} s",
        flush=True,
    )
    for lr in (LR, LR * args.batch_size**0.5):
        batched = train(args.batch_size, lr, data.train_rows, data.eval_rows, args, target=reached)
        print(f"batched (B={args.batch_size}, lr {lr:.3g}):")
        for seconds, done, reward in batched:
            print(f"  {seconds:6.1f} s  {done:3d} prompts  reward {reward:.2f}")
        hit = next(((s, n) for s, n, r in batched if r >= reached), None)
        if hit is None:
            print(
                f"  did not reach {reached:.2f} within {args.max_passes} passes over the prompts", flush=True
            )
            continue
        ratio = serial_s / hit[0] if hit[0] > 0 else float("inf")
        print(
            f"  time to reward {reached:.2f}: serial {serial_s:.1f} s, batched {hit[0]:.1f} s "
            f"({hit[1]} prompts): {ratio:.1f}x (target >= 4x: {'met' if ratio >= 4 else 'NOT met'})",
            flush=True,
        )


if __name__ == "__main__":
    main()
