"""The run's counts (one definition of each: a judge failure, the judged iterations, their rates), summed over
the training steps of a process and, at the end of training, over the processes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cyclealign_pl.cycle import StepOutcome


@dataclass
class CycleCounters:
    """The run's counts, one definition each (summed over processes for the run's totals)."""

    steps: int = 0  # training steps: batches of prompts taken from the data
    rounds: int = 0  # rounds of the cycle (one iteration of every prompt in flight)
    prompts: int = 0  # prompts finished
    iterations: int = 0  # iterations of the finished prompts
    optimizer_steps: int = 0
    skipped_updates: int = 0
    nonfinite_updates: int = 0
    agreed_prompts: int = 0  # prompts that ended because both rankings agreed
    identical_sample_prompts: int = 0  # prompts that ended because their l samples were one reply
    judge_failures: int = 0  # judged iterations without a usable ranking (IterationRecord.judge_failed)
    empty_candidates: int = 0  # sampled replies that were empty (still ranked: the judge decides)
    degenerate_sets: int = 0  # candidate sets with fewer than two distinct replies (not judged)
    truncated_prompts: int = 0  # prompts cut to their last tokens to fit whitebox.max_length
    cut_better_replies: int = 0  # judge replies cut to fit whitebox.max_length (trained on without EOS)
    interrupted_steps: int = 0  # steps ended early by a stop request (signal)

    @classmethod
    def of(cls, outcome: StepOutcome) -> CycleCounters:
        """The counts of one training step."""
        iterations = [it for record in outcome.finished for it in record.iterations]
        return cls(
            steps=int(not outcome.interrupted),  # an interrupted step is redone (and counted) on resume
            rounds=outcome.rounds,
            prompts=len(outcome.finished),
            iterations=len(iterations),
            optimizer_steps=outcome.updates,
            skipped_updates=outcome.skipped_updates,
            agreed_prompts=sum(record.agreed for record in outcome.finished),
            identical_sample_prompts=sum(record.identical_samples for record in outcome.finished),
            judge_failures=sum(it.judge_failed for it in iterations),
            empty_candidates=sum(not text for it in iterations for text in it.candidates),
            degenerate_sets=sum(it.degenerate for it in iterations),
            cut_better_replies=outcome.cut_better_replies,
            interrupted_steps=int(outcome.interrupted),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CycleCounters:
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in values.items() if k in names})

    def add(self, other: CycleCounters) -> None:
        for name in self.names():
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def judged(self) -> int:
        """Iterations whose candidates went to the judge."""
        return self.iterations - self.degenerate_sets

    @property
    def judge_failure_rate(self) -> float | None:
        return self.judge_failures / self.judged if self.judged else None

    @property
    def mean_iterations(self) -> float | None:
        return self.iterations / self.prompts if self.prompts else None


@dataclass
class RunTotals(CycleCounters):
    """The counters summed over all processes at the end of training, and the prompts still in flight."""

    in_flight: int = 0
