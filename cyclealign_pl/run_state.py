"""What one process of a fit carries from step to step, and into its checkpoints.

Every process has its own prompts in flight, counters, demonstrations and random streams. Rank 0 writes the
checkpoint, so each process's state is gathered into it (``processes``, one entry per rank) and each process
takes its own back on resume.
"""

from __future__ import annotations

import logging
from typing import Any

from cyclealign_pl.counters import CycleCounters
from cyclealign_pl.cycle import CycleState, StepOutcome
from cyclealign_pl.demonstrations import DemonstrationPool
from cyclealign_pl.rng import capture_rng_state

log = logging.getLogger(__name__)


class ProcessState:
    """This process's part of the run: counters, prompts trained and in flight, demonstrations, and what a
    checkpoint hands to the next ``training_step`` (random streams, prompts in flight, a step to redo)."""

    def __init__(self, pool: DemonstrationPool) -> None:
        self.counters = CycleCounters()
        self.trained_ids: list[str] = []  # the prompts finished, in order: a resumed run shows each once
        self.pool = pool
        self.cycle: CycleState | None = None  # the prompts in flight (slots sized by the data's batch size)
        self.interrupted_ids: list[str] | None = None  # the batch of a step a stop interrupted: redone
        self.redo_ids: list[str] | None = None  # ... as read from the checkpoint
        self.pending_rng: dict[str, Any] | None = None
        self.pending_cycle: dict[str, Any] | None = None

    def record(self, outcome: StepOutcome) -> None:
        self.counters.add(CycleCounters.of(outcome))
        self.trained_ids.extend(record.prompt_id for record in outcome.finished)

    def start(self, capacity: int) -> None:
        """Make the slots for the prompts in flight, with those of the checkpoint when resuming."""
        if self.cycle is None:
            self.cycle = CycleState(capacity)
        if self.pending_cycle is not None:
            self.cycle.load_state_dict(self.pending_cycle)
            self.pending_cycle = None

    def in_flight(self) -> int:
        """Prompts taken from the data and not finished (in a slot or waiting for one)."""
        if self.cycle is not None:
            return len(self.cycle.active()) + len(self.cycle.waiting)
        saved = self.pending_cycle or {}
        return sum(slot is not None for slot in saved.get("slots", [])) + len(saved.get("waiting", []))

    def state_dict(self, judge_state: dict[str, Any]) -> dict[str, Any]:
        return {
            "counters": self.counters.as_dict(),
            "trained_ids": list(self.trained_ids),
            "pool": self.pool.state_dict(),
            "cycle": self.cycle.state_dict() if self.cycle is not None else self.pending_cycle,
            "judge": judge_state,
            "rng": capture_rng_state(),
            "redo": self.interrupted_ids,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counters = CycleCounters.from_dict(state["counters"])
        self.trained_ids = list(state["trained_ids"])
        self.pending_rng = state["rng"]
        self.pending_cycle = state["cycle"]
        self.redo_ids = state["redo"]
        self.pool.load_state_dict(state["pool"])


def checkpoint_entry(processes: list[dict[str, Any]], run_id: str | None, zero_shot: Any) -> dict[str, Any]:
    """The checkpoint's ``cyclealign`` entry: every process's state, and the run as a whole for readers of
    the checkpoint (notebooks, tests; not used to resume)."""
    totals = CycleCounters()
    for process in processes:
        totals.add(CycleCounters.from_dict(process["counters"]))
    return {
        "processes": processes,
        "run_id": run_id,
        "zero_shot": zero_shot,
        "counters": totals.as_dict(),
        "trained_ids": [i for p in processes for i in p["trained_ids"]],
        "judge": processes[0]["judge"],
    }


def state_for_rank(entry: dict[str, Any], rank: int, world: int, fitting: bool) -> dict[str, Any]:
    """This rank's state from a checkpoint's ``cyclealign`` entry. Saved by another number of processes: the
    totals go to rank 0 (the others start from zero); prompts in flight cannot move between processes, so a
    fit that has some must resume with as many."""
    if "processes" not in entry:
        raise ValueError(
            "the checkpoint was written by cyclealign_pl 0.1 (no per-process state): it cannot be resumed by "
            "this version; start a new run (its exported hf_model still loads as a white box)"
        )
    processes = entry["processes"]
    if len(processes) == world:
        return processes[rank]
    in_flight = [
        p
        for p in processes
        if (p.get("cycle") or {}).get("waiting") or any((p.get("cycle") or {}).get("slots", []))
    ]
    if in_flight and fitting:
        raise ValueError(
            f"the checkpoint was saved by {len(processes)} processes with prompts in flight; "
            f"resume it with {len(processes)} processes (trainer.devices x num_nodes)"
        )
    first = rank == 0
    totals = CycleCounters()
    if first:
        for process in processes:
            totals.add(CycleCounters.from_dict(process["counters"]))
    return {
        "counters": totals.as_dict(),
        "trained_ids": [i for p in processes for i in p["trained_ids"]] if first else [],
        "pool": processes[0]["pool"] if first else {},
        "cycle": None,
        "judge": processes[0]["judge"] if first else {},
        "rng": processes[0]["rng"] if first else None,
        "redo": None,
    }


def uncount_current_batch(checkpoint: dict[str, Any]) -> None:
    """A checkpoint saved inside a training step: Lightning records that step's batch as not processed and
    fetches it again on resume, so the data position (``ResumableDataLoader``'s batches handed out) must not
    count it either."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    for state in loop.get("combined_loader", []):
        if isinstance(state, dict) and state.get("batches", 0) > 0:
            state["batches"] -= 1


def reopen_unfinished_epoch(checkpoint: dict[str, Any], batches_per_epoch: float) -> None:
    """A fit stopped by ``trainer.max_steps`` inside an epoch: Lightning records that epoch as processed, so
    a resume with a larger ``max_steps`` would skip the rest of it; record it as still running."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epoch, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epoch or not batches or batches["current"]["completed"] >= batches_per_epoch:
        return
    for part in ("total", "current"):
        epoch[part]["processed"] = min(epoch[part]["processed"], epoch[part]["completed"])
