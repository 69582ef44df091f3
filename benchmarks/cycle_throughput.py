"""Prompts per second of the cycle: the paper's serial loop against the batched, overlapped one.

The paper's loop is data-serial: one prompt at a time, and the white box idles while the black box answers.
This runs both loops in one process on the same prompts, from the same initial weights and seed:

* **serial** - batch 1, the judge's answer awaited before the white box scores (``overlap_judge=False``);
* **batched** - ``--batch-size`` prompts per step: one ``generate`` for all candidates, one scoring forward,
  all judge requests in flight at once while the white box scores, prompts dropping out once they agree.

The black box is the OpenAI judge against the local OpenAI-compatible server answering after a fixed delay
(``--delays``: 0.5 s is a slow API, 0 is compute-bound). The white box is the tiny CPU model of
``configs/tiny.yaml`` on the HH-RLHF sample shipped in the package. Both loops call ``cycle.run_cycle``
with the optimizer step of ``CycleAlignModule`` (clip, step), without the Trainer around it.
Printed per delay: prompts/s of both and their ratio (targets: >= 8x at 0.5 s, >= 1.5x at 0 s), iterations
and optimizer steps, the share of judge latency hidden behind white-box work, and peak memory.

    python benchmarks/cycle_throughput.py [--prompts 64] [--batch-size 32] [--delays 0.5 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch

from cyclealign_pl.cycle import CycleConfig, StepOutcome, run_cycle
from cyclealign_pl.data.hh_rlhf import HHRLHFDataModule
from cyclealign_pl.demonstrations import DemonstrationPool
from cyclealign_pl.hf import load_causal_lm, load_tokenizer
from cyclealign_pl.judges.openai import OpenAIJudge
from cyclealign_pl.policy import SamplingConfig, WhiteBox
from cyclealign_pl.testing import LocalOpenAIServer

# The white box of configs/tiny.yaml.
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
}


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

    def __enter__(self) -> "PeakMemory":
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

    def summary(self) -> str:
        iterations = sum(len(p.iterations) for o in self.outcomes for p in o.prompts)
        updates = sum(o.updates for o in self.outcomes)
        latency = sum(o.judge_latency_s for o in self.outcomes)
        wait = sum(o.judge_wait_s for o in self.outcomes)
        hidden = 1 - wait / latency if latency > 0 else float("nan")
        return (f"{self.prompts_per_s:6.2f} prompts/s ({self.seconds:.1f} s; {iterations / self.prompts:.2f} "
                f"iterations/prompt, {updates} optimizer steps; judge latency {latency:.1f} s, waited {wait:.1f} s, "
                f"hidden {hidden:.0%}; {self.memory.describe() if self.memory else ''})")


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


def run(
    prompts: Sequence[dict], batch_size: int, overlap: bool, judge: OpenAIJudge, args: argparse.Namespace
) -> Result:
    """Train a fresh white box (same seed every time) through ``prompts`` in batches of ``batch_size``."""
    tokenizer = load_tokenizer("byt5")
    config = {**TINY_LLAMA, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    model = load_causal_lm(None, config, seed=0).to(args.device)
    whitebox = WhiteBox(model, tokenizer, max_length=args.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    update = make_update(model, optimizer)
    cycle = CycleConfig(num_candidates=3, max_iterations=args.iterations, overlap_judge=overlap)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    pool = DemonstrationPool()
    torch.manual_seed(0)
    whitebox.sample([prompts[0]["prompt"]], 3, sampling)  # warm up the kernels outside the timing
    result = Result(seconds=0.0, prompts=len(prompts))
    with PeakMemory() as memory:
        start = time.perf_counter()
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first : first + batch_size]
            outcome = run_cycle(whitebox, judge, pool, [r["prompt"] for r in batch], [r["id"] for r in batch],
                                cycle, sampling, update)
            result.outcomes.append(outcome)
        result.seconds = time.perf_counter() - start
    result.memory = memory
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.5, 0.0], help="judge latency (s)")
    parser.add_argument("--iterations", type=int, default=5, help="N, iterations per prompt at most")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads, the same for both loops (the tiny model gains nothing from more)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = HHRLHFDataModule(train_split="test", num_train_prompts=args.prompts, eval_prompts_per_subset=1)
    data.setup("fit")
    prompts = data.train_rows
    print(f"{len(prompts)} HH-RLHF prompts, tiny Llama white box on {args.device} ({torch.get_num_threads()} threads), "
          f"l=3, N={args.iterations}, max_new_tokens={args.max_new_tokens}, batch {args.batch_size}")
    # all serial runs first, then the batched ones: peak RSS only grows (freed memory stays with the process),
    # so each loop's peak is measured after runs that needed no more memory than it does
    results: dict[tuple[float, bool], Result] = {}
    for overlap, batch_size in ((False, 1), (True, args.batch_size)):
        for delay in args.delays:
            with LocalOpenAIServer(delay=delay) as server:
                judge = OpenAIJudge(model="local-ranker", base_url=server.url, api_key_env="CYCLEALIGN_BENCH_UNSET",
                                    max_concurrency=max(args.batch_size, 1), request_timeout=60)
                try:
                    results[delay, overlap] = run(prompts, batch_size, overlap, judge, args)
                finally:
                    judge.close()
    for delay in args.delays:
        serial, batched = results[delay, False], results[delay, True]
        target = 8.0 if delay >= 0.5 else 1.5
        ratio = batched.prompts_per_s / serial.prompts_per_s
        print(f"\njudge latency {delay:.2f} s")
        print(f"  serial  (B=1, judge awaited):        {serial.summary()}")
        print(f"  batched (B={args.batch_size}, judge overlapped): {batched.summary()}")
        verdict = "met" if ratio >= target else "NOT met"
        print(f"  speed-up: {ratio:.1f}x (target >= {target:g}x: {verdict})", flush=True)

if __name__ == "__main__":
    main()
