"""The run's counts and the per-process state a checkpoint carries (counters.py, run_state.py): no fit."""

from __future__ import annotations

import pytest

from cyclealign_pl.counters import CycleCounters, RunTotals
from cyclealign_pl.cycle import DEGENERATE_CANDIDATES, IterationRecord, PromptRecord, StepOutcome
from cyclealign_pl.demonstrations import DemonstrationPool
from cyclealign_pl.run_state import ProcessState, checkpoint_entry, reopen_unfinished_epoch, state_for_rank


def iteration(failure: str | None = None, agreed: bool = False, candidates=("a", "b", "")) -> IterationRecord:
    blackbox = None if failure else ((0, 1, 2) if agreed else (1, 0, 2))
    return IterationRecord(list(candidates), (0, 1, 2), [0.0, -1.0, -2.0], blackbox, None, failure)


def test_a_judge_failure_is_a_judged_iteration_without_a_ranking_and_degenerate_sets_are_not_judged():
    outcome = StepOutcome(
        finished=[
            PromptRecord("p1", "q1", [iteration("no ranking found"), iteration(agreed=True)]),
            PromptRecord("p2", "q2", [iteration(DEGENERATE_CANDIDATES, candidates=("x", "x", "x"))]),
        ],
        rounds=2,
        updates=1,
        skipped_updates=1,
    )
    counts = CycleCounters.of(outcome)
    assert (counts.prompts, counts.iterations, counts.degenerate_sets, counts.judged) == (2, 3, 1, 2)
    assert counts.judge_failures == 1 and counts.judge_failure_rate == pytest.approx(0.5)
    assert (counts.agreed_prompts, counts.identical_sample_prompts) == (1, 1)
    assert counts.empty_candidates == 2 and counts.mean_iterations == pytest.approx(1.5)
    assert CycleCounters().judge_failure_rate is None  # nothing judged: no rate, not 0%


def test_a_checkpoint_of_two_processes_resumes_on_another_number_with_the_totals_on_rank_0():
    processes = []
    for steps in (3, 4):
        state = ProcessState(DemonstrationPool())
        state.counters.add(CycleCounters(steps=steps, prompts=steps))
        state.trained_ids = [f"id{steps}"]
        processes.append(state.state_dict(judge_state={}))
    entry = checkpoint_entry(processes, "run", None)
    assert entry["counters"]["steps"] == 7 and entry["trained_ids"] == ["id3", "id4"]
    first, other = state_for_rank(entry, 0, 1, fitting=True), state_for_rank(entry, 1, 3, fitting=True)
    assert first["counters"]["steps"] == 7 and first["trained_ids"] == ["id3", "id4"]
    assert other["counters"]["steps"] == 0 and other["trained_ids"] == []
    restored = ProcessState(DemonstrationPool())
    restored.load_state_dict(first)
    assert restored.counters == CycleCounters(steps=7, prompts=7) and restored.in_flight() == 0
    assert RunTotals(**restored.counters.as_dict(), in_flight=2).in_flight == 2


def test_a_checkpoint_of_another_kind_is_one_clear_error():
    with pytest.raises(ValueError, match="written by cyclealign_pl 0.1 .* start a new run"):
        state_for_rank({"counters": {}, "run_id": None}, 0, 1, fitting=True)
    in_flight = {"counters": {}, "trained_ids": [], "pool": {}, "judge": {}, "rng": None, "redo": None}
    in_flight["cycle"] = {"slots": [{"prompt_id": "p"}], "waiting": []}
    entry = checkpoint_entry([in_flight, dict(in_flight)], "run", None)
    with pytest.raises(ValueError, match="resume it with 2 processes"):
        state_for_rank(entry, 0, 1, fitting=True)


def test_an_epoch_stopped_by_max_steps_is_recorded_as_still_running():
    def loops(batches_done: int) -> dict:
        epoch = {
            part: {"ready": 1, "started": 1, "processed": 1, "completed": 0} for part in ("total", "current")
        }
        batch = {"current": {"completed": batches_done}}
        return {"loops": {"fit_loop": {"epoch_progress": epoch, "epoch_loop.batch_progress": batch}}}

    mid_epoch, whole_epoch = loops(2), loops(48)
    reopen_unfinished_epoch(mid_epoch, 48)
    reopen_unfinished_epoch(whole_epoch, 48)
    assert mid_epoch["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 0
    assert whole_epoch["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 1
