r"""Prompts per second of the cycle: the paper's serial loop against continuous batching.

The paper's loop is data-serial: one prompt at a time, and the white box idles while the black box answers.
This runs both loops in one process on the same prompts, from the same initial weights and seed:

* **serial** - one slot, the judge's answer awaited before the white box scores (``overlap_judge=False``);
* **batched** - ``B`` slots (continuous batching): one ``generate`` for all candidates of a round, one scoring
  forward, all judge requests in flight while the white box scores, and a prompt that is done hands its slot
  to the next prompt at once, so rounds run on a full batch.

The black box is the OpenAI judge against the local OpenAI-compatible server answering after a fixed delay
(``--delays``: 0.5 s is a slow API, 0 is compute-bound). The white box is a random Llama with the byte
tokenizer (``--hidden``/``--layers``; the defaults are those of the tests' tiny model) on the HH-RLHF sample
shipped in the package. Both loops call ``cycle.run_cycle`` as ``CycleAlignModule`` does (batches of B prompts
from the data, the last one drained), with its optimizer step (clip, step), without the Trainer around it.

Printed per row: prompts/s and the ratio to the serial loop, the mean share of the slots the rounds kept busy,
optimizer steps, where a round's time went (generate, score, judge wait, update) and peak memory. Targets
(issue 14, for the default white box): B=16 at 0.5 s >= 10x, B=32 at 0.5 s >= 14x, B=32 at 0 s >= 3x.

    python benchmarks/cycle_throughput.py [--prompts 256] [--serial-prompts 32] [--batch-sizes 16 32] \
        [--delays 0.5 0]
    python benchmarks/cycle_throughput.py --hidden 512 --layers 8 \
        --batch-sizes 32 --prompts 64 --serial-prompts 8   # a larger white box (docs/scaling.md 1.3)
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch

from cyclealign_pl.cycle import TIMES, CycleConfig, CycleState, StepOutcome, run_cycle
from cyclealign_pl.data.hh_rlhf import HHRLHFDataModule
from cyclealign_pl.demo.judge import LexiconRule
from cyclealign_pl.demonstrations import DemonstrationPool
from cyclealign_pl.hf import load_causal_lm, load_tokenizer
from cyclealign_pl.judges.openai import OpenAIJudge
from cyclealign_pl.policy import SamplingConfig, WhiteBox
from cyclealign_pl.serve import LocalOpenAIServer


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled), and peak CUDA memory if any."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_rss = 0
        self.peak_cuda = 0
        self._stop = threading.Event()
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
        if torch.cuda.is_available():
            self.peak_cuda = torch.cuda.max_memory_allocated()

    def describe(self) -> str:
        text = f"peak RSS {self.peak_rss / 2**20:.0f} MiB"
        return text + (f", peak CUDA {self.peak_cuda / 2**20:.0f} MiB" if self.peak_cuda else "")


@dataclass
class Result:
    seconds: float
    prompts: int
    outcomes: list[StepOutcome] = field(default_factory=list)
    memory: PeakMemory | None = None

    @property
    def prompts_per_s(self) -> float:
        return self.prompts / self.seconds

    @property
    def rounds(self) -> int:
        return sum(o.rounds for o in self.outcomes)

    def active_fraction(self) -> float:
        slots = sum(o.rounds * o.capacity for o in self.outcomes)
        return sum(o.active_slots for o in self.outcomes) / slots if slots else float("nan")

    def per_round(self) -> dict[str, float]:
        """Mean seconds per round of each part (generate, score, judge wait, update) and the judge's
        latency."""
        totals = {name: sum(o.times[name] for o in self.outcomes) for name in TIMES}
        totals["judge_latency_s"] = sum(o.judge_latency_s for o in self.outcomes)
        return {name: value / max(self.rounds, 1) for name, value in totals.items()}

    def summary(self) -> str:
        iterations = sum(len(r.iterations) for o in self.outcomes for r in o.finished)
        updates = sum(o.updates for o in self.outcomes)
        parts = self.per_round()
        latency, wait = parts["judge_latency_s"], parts["judge_wait_s"]
        hidden = 1 - wait / latency if latency > 0 else float("nan")
        breakdown = ", ".join(f"{name[:-2]} {parts[name] * 1000:.0f}" for name in TIMES)
        return (
            f"{self.prompts_per_s:6.2f} prompts/s = {3600 * self.prompts_per_s:,.0f} prompts/hour "
            f"({self.seconds:.1f} s; {iterations / self.prompts:.2f} "
            f"iterations/prompt, {self.rounds} rounds, {updates} optimizer steps, "
            f"active {self.active_fraction():.0%})"
            f"\n      per round (ms): {breakdown}; judge latency {latency * 1000:.0f}, hidden {hidden:.0%}; "
            f"{self.memory.describe() if self.memory else ''}"
        )


def make_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip: float = 1.0) -> Callable:
    """``CycleAlignModule._update`` on one process: backward, clip the gradient norm, step."""

    def update(loss: torch.Tensor | None) -> bool:
        if loss is None or not torch.isfinite(loss):
            return False
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return True

    return update


def training_steps(
    state: CycleState,
    whitebox: WhiteBox,
    judge,
    pool: DemonstrationPool,
    rows: Sequence[dict],
    cycle: CycleConfig,
    update: Callable,
) -> Iterator[StepOutcome]:
    """The training steps of ``CycleAlignModule`` over ``rows``: batches of ``state.capacity`` prompts taken
    in order, the last one drained; yields each step's outcome."""
    size = state.capacity
    for first in range(0, len(rows), size):
        batch = rows[first : first + size]
        prompts, ids = [r["prompt"] for r in batch], [r["id"] for r in batch]
        yield run_cycle(
            state, whitebox, judge, pool, prompts, ids, cycle, update, drain=first + size >= len(rows)
        )


def run(
    prompts: Sequence[dict], batch_size: int, overlap: bool, judge: OpenAIJudge, args: argparse.Namespace
) -> Result:
    """Train a fresh white box (same seed every time) through ``prompts`` with ``batch_size`` slots."""
    tokenizer = load_tokenizer("byt5")  # its ids (< 384) are valid in any larger --vocab
    heads = args.heads or max(args.hidden // 16, 1)
    config = {
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate or 2 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": max(args.max_length, 512),
        "vocab_size": args.vocab or len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    with torch.device(args.device):
        model = load_causal_lm(None, config, seed=0, dtype=args.dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    whitebox = WhiteBox(model, tokenizer, args.max_length, SamplingConfig(max_new_tokens=args.max_new_tokens))
    update = make_update(model, torch.optim.AdamW(model.parameters(), lr=1e-5))
    cycle = CycleConfig(num_candidates=3, max_iterations=args.iterations, overlap_judge=overlap)
    pool, state = DemonstrationPool(), CycleState(batch_size)
    torch.manual_seed(0)
    whitebox.sample([prompts[0]["prompt"]], 3)  # warm up the kernels outside the timing
    result = Result(seconds=0.0, prompts=len(prompts))
    with PeakMemory() as memory:
        start = time.perf_counter()
        result.outcomes.extend(training_steps(state, whitebox, judge, pool, prompts, cycle, update))
        result.seconds = time.perf_counter() - start
    result.memory = memory
    return result


TARGETS = {(16, 0.5): 10.0, (32, 0.5): 14.0, (32, 0.0): 3.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256, help="prompts of the batched loops")
    parser.add_argument(
        "--serial-prompts",
        type=int,
        default=32,
        help="prompts of the serial loop (its rate per prompt does not depend on how many)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--delays", type=float, nargs="+", default=[0.5, 0.0], help="judge latency (s)")
    parser.add_argument("--iterations", type=int, default=5, help="N, iterations per prompt at most")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument(
        "--hidden", type=int, default=64, help="white-box hidden size (512 with 8 layers: compute-bound)"
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP size (0: 2 x hidden)")
    parser.add_argument("--heads", type=int, default=0, help="attention heads (0: hidden / 16)")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (0: the byte tokenizer's 384)")
    parser.add_argument("--dtype", default=None, help="weights' dtype, e.g. bfloat16 (default: float32)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-serial", action="store_true", help="skip the serial loop (no ratios)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads, the same for every loop (0: torch's default, every core). Batching is what "
        "lets the cycle use more than one core: the serial loop's small matrices do not gain from them",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = HHRLHFDataModule(train_split="test", num_train_prompts=args.prompts, eval_prompts_per_subset=1)
    data.setup("fit")
    prompts = data.train_rows
    print(
        f"{len(prompts)} HH-RLHF prompts ({min(args.serial_prompts, len(prompts))} for the serial loop), "
        f"Llama white box hidden {args.hidden} x {args.layers} layers on "
        f"{args.device} ({torch.get_num_threads()} threads), l=3, N={args.iterations}, "
        f"max_new_tokens={args.max_new_tokens}",
        flush=True,
    )
    # serial runs first, then the batched ones: peak RSS only grows (freed memory stays with the process),
    # so each loop's peak is measured after runs that needed no more memory than it does
    results: dict[tuple[int, float], Result] = {}
    for batch_size in (() if args.no_serial else (1,)) + tuple(args.batch_sizes):
        for delay in args.delays:
            with LocalOpenAIServer(delay=delay, rule=LexiconRule()) as server:
                judge = OpenAIJudge(
                    model="local-ranker",
                    base_url=server.url,
                    api_key_env="CYCLEALIGN_BENCH_UNSET",
                    max_concurrency=max(args.batch_sizes),
                    request_timeout=60,
                )
                share = prompts[: args.serial_prompts] if batch_size == 1 else prompts
                try:
                    results[batch_size, delay] = run(share, batch_size, batch_size > 1, judge, args)
                finally:
                    judge.close()
            print(
                f"  done: B={batch_size}, judge latency {delay:g} s: "
                f"{results[batch_size, delay].prompts_per_s:.2f} prompts/s",
                flush=True,
            )
    # the targets are set for the default white box (the tests' tiny model); other shapes print ratios only
    model_args = ("hidden", "layers", "intermediate", "heads", "vocab", "dtype", "gradient_checkpointing")
    targets = TARGETS if all(getattr(args, a) == parser.get_default(a) for a in model_args) else {}
    for delay in args.delays:
        serial = results.get((1, delay))
        print(f"\njudge latency {delay:.2f} s")
        if serial is not None:
            print(f"  serial  (B=1, judge awaited):   {serial.summary()}")
        for batch_size in args.batch_sizes:
            batched = results[batch_size, delay]
            print(f"  batched (B={batch_size}, continuous): {batched.summary()}")
            if serial is not None:
                ratio = batched.prompts_per_s / serial.prompts_per_s
                target = targets.get((batch_size, delay))
                verdict = (
                    f" (target >= {target:g}x: {'met' if ratio >= target else 'NOT met'})" if target else ""
                )
                print(f"  speed-up B={batch_size}: {ratio:.1f}x{verdict}", flush=True)


if __name__ == "__main__":
    main()
