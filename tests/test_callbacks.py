"""The callbacks (cyclealign_pl.callbacks), unit by unit: what CycleMetrics logs for a hand-built step and
keeps across a checkpoint, what ExportPretrained writes, and when CycleCheckpoint saves.

The same callbacks in real fits: ``test_reliability.py`` (checkpoints by steps and time, metrics of failing
judges), ``test_run_dir.py`` (the default run's export), ``test_export.py`` (a failed export).
"""

from __future__ import annotations

import io
import logging
import time
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from cyclealign_pl.callbacks import CycleCheckpoint, CycleMetrics, ExportPretrained
from cyclealign_pl.cycle import DEGENERATE_CANDIDATES, IterationRecord, PromptRecord, StepOutcome
from cyclealign_pl.judges.base import Judgment, RankRequest
from tests.helpers import bpe_tokenizer, tiny_llama_for

# -- CycleMetrics: one step's outcome, logged ----------------------------------------------------------------


class LoggingModule:
    """What CycleMetrics needs of a LightningModule: ``log`` (recorded), a judge, maybe a reference ranker."""

    def __init__(self, judge: Any = None, reward_model: Any = None) -> None:
        self.judge = judge
        self.reward_model = reward_model
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: Any, **_: Any) -> None:
        self.logged[name] = float(value)


ONE_PROCESS = SimpleNamespace(world_size=1)


def iteration(
    candidates: list[str], blackbox: tuple[int, ...] | None, failure: str | None = None
) -> IterationRecord:
    return IterationRecord(
        candidates=candidates,
        whitebox_ranking=(0, 1, 2),
        whitebox_scores=[0.0, -1.0, -2.0],
        blackbox_ranking=blackbox,
        agreement=None,
        failure=failure,
    )


def two_prompts() -> StepOutcome:
    """Two prompts finish: one agrees at its second iteration; one fails a judgment, then samples one reply
    three times. 2 rounds over 2 slots, 3 of the 4 slot-rounds busy; 1 s of the judge's 4 s waited for."""
    agreed = PromptRecord(
        "p1",
        "prompt one",
        [
            iteration(["a b c", "a b d", ""], blackbox=(1, 0, 2)),
            iteration(["a b c", "e f", "g"], blackbox=(0, 1, 2)),
        ],
    )
    collapsed = PromptRecord(
        "p2",
        "prompt two",
        [
            iteration(["x", "y", "z"], blackbox=None, failure="invalid reply: no ranking"),
            iteration(["same", "same", "same"], blackbox=None, failure=DEGENERATE_CANDIDATES),
        ],
    )
    outcome = StepOutcome(finished=[agreed, collapsed], capacity=2, rounds=2, active_slots=3)
    outcome.times["judge_wait_s"] = 1.0
    outcome.judge_latency_s = 4.0
    return outcome


def one_prompt_of_four_iterations() -> StepOutcome:
    record = PromptRecord("p3", "prompt three", [iteration(["a", "b", "c"], blackbox=(0, 1, 2))] * 4)
    return StepOutcome(finished=[record], capacity=1, rounds=4, active_slots=4)


class CountingJudge:
    def metrics(self) -> dict[str, float]:
        return {"requests_sent": 3, "cache_hits": 1}


def test_cycle_metrics_log_a_steps_finished_prompts():
    module = LoggingModule(judge=CountingJudge())
    CycleMetrics().record_outcome(ONE_PROCESS, module, two_prompts())
    logged = module.logged
    assert logged["cycle/iterations"] == 2.0  # 4 iterations over 2 prompts
    assert logged["cycle/agreement"] == 0.5
    assert logged["cycle/identical_samples"] == 0.5  # sample collapse, counted apart from agreement
    assert logged["cycle/judge_failure_rate"] == pytest.approx(1 / 3)  # the degenerate set was never judged
    assert logged["cycle/active_fraction"] == 0.75
    assert logged["cycle/empty_share"] == pytest.approx(1 / 12)  # over every sampled candidate
    assert logged["time/judge_latency_s"] == 4.0
    assert logged["cycle/judge_hidden_fraction_mean"] == 0.75
    assert logged["judge/requests_sent"] == 3.0 and logged["judge/cache_hits"] == 1.0
    assert logged["cycle/iterations_mean"] == 2.0  # the running mean of one step is that step
    assert "cycle/candidate_reward" not in logged  # no reference ranker


def test_cycle_metrics_running_means_span_steps_and_skip_steps_where_nothing_finished():
    module = LoggingModule()
    metrics = CycleMetrics(log_judge_metrics=False)
    metrics.record_outcome(ONE_PROCESS, module, two_prompts())
    metrics.record_outcome(ONE_PROCESS, module, one_prompt_of_four_iterations())
    assert module.logged["cycle/iterations"] == 4.0
    assert module.logged["cycle/iterations_mean"] == 3.0  # (2 + 4) / 2
    assert module.logged["cycle/agreement_mean"] == 0.75

    module.logged.clear()
    nothing_finished = StepOutcome(capacity=1, rounds=1, active_slots=1)
    metrics.record_outcome(ONE_PROCESS, module, nothing_finished)
    assert "cycle/iterations" not in module.logged  # no prompt finished: no per-step value
    assert module.logged["cycle/iterations_mean"] == 3.0  # the running mean is still shown, unchanged
    assert module.logged["cycle/active_fraction_mean"] == pytest.approx((0.75 + 1.0 + 1.0) / 3)
    assert not any(name.startswith("judge/") for name in module.logged)  # log_judge_metrics=False


class ReferenceRanker:
    """A reference ranker (the module's ``reward_model``) with fixed scores: it ranks candidates by them."""

    def __init__(self) -> None:
        self.requests: list[RankRequest] = []

    def rank(self, requests: list[RankRequest]) -> list[Judgment]:
        self.requests.extend(requests)
        scores = {"prompt one": (0.5, 1.0, -1.0), "prompt two": (0.0, 0.0, 0.0)}
        return [Judgment(ranking=(1, 0, 2), scores=scores[r.instruction]) for r in requests]


def test_cycle_metrics_score_the_black_box_against_a_reference_at_each_prompts_last_iteration():
    reference = ReferenceRanker()
    module = LoggingModule(reward_model=reference)
    CycleMetrics().record_outcome(ONE_PROCESS, module, two_prompts())
    assert [r.candidates for r in reference.requests] == [
        ("a b c", "e f", "g"),
        ("same", "same", "same"),
    ]  # the last iteration of each
    # the black box (0, 1, 2) against the reference (1, 0, 2): 2 of 3 pairs; the failed judgment left out
    assert module.logged["cycle/ranking_pairwise_accuracy_mean"] == pytest.approx(2 / 3)
    assert module.logged["cycle/candidate_reward"] == pytest.approx(0.5 / 6)
    assert module.logged["cycle/reward_delta"] == 1.0  # spreads 2.0 and 0.0


def test_cycle_metrics_resume_their_running_means_from_a_checkpoint():
    before = CycleMetrics()
    before.record_outcome(ONE_PROCESS, LoggingModule(), two_prompts())
    buffer = io.BytesIO()
    torch.save(before.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed, module = CycleMetrics(), LoggingModule()
    resumed.load_state_dict(saved)
    resumed.record_outcome(ONE_PROCESS, module, StepOutcome())  # nothing finished yet after the resume
    assert module.logged["cycle/iterations_mean"] == 2.0  # the restored mean, shown from the first step
    resumed.record_outcome(ONE_PROCESS, module, one_prompt_of_four_iterations())
    assert module.logged["cycle/iterations_mean"] == 3.0

    # another process of the resumed run starts from zero: the saved totals are counted once, on rank 0
    other_rank, module = CycleMetrics(), LoggingModule()
    other_rank._rank = 1
    other_rank.load_state_dict(saved)
    other_rank.record_outcome(ONE_PROCESS, module, one_prompt_of_four_iterations())
    assert module.logged["cycle/iterations_mean"] == 4.0


# -- ExportPretrained ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_module() -> SimpleNamespace:
    """What the export reads of a CycleAlignModule: a tiny random Llama and its tokenizer."""
    tokenizer = bpe_tokenizer(["Sure, glad to help.", "No. Go away."] * 4, vocab_size=300)
    return SimpleNamespace(model=tiny_llama_for(tokenizer), tokenizer=tokenizer)


def finished_fit(tmp_path, interrupted: bool = False, log_dir: str | None = "logs/version_0") -> Any:
    return SimpleNamespace(
        interrupted=interrupted,
        log_dir=str(tmp_path / log_dir) if log_dir else None,
        default_root_dir=str(tmp_path),
    )


def test_the_export_is_a_plain_transformers_model_under_the_log_dir(tmp_path, tiny_module):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = ExportPretrained()
    export.on_fit_end(finished_fit(tmp_path), tiny_module)
    path = tmp_path / "logs" / "version_0" / "hf_model"
    assert export.exported_to == str(path) and export.error is None
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    for name, tensor in tiny_module.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert AutoTokenizer.from_pretrained(path)("glad to help").input_ids

    without_logger = ExportPretrained()
    without_logger.on_fit_end(finished_fit(tmp_path / "b", log_dir=None), tiny_module)
    assert without_logger.exported_to == str(tmp_path / "b" / "hf_model")


@pytest.mark.parametrize(
    "export, interrupted",
    [(ExportPretrained(enabled=False), False), (ExportPretrained(), True)],
    ids=["disabled", "interrupted"],
)
def test_no_export_when_disabled_or_after_an_interrupted_fit(export, interrupted, tmp_path, tiny_module):
    export.on_fit_end(finished_fit(tmp_path, interrupted=interrupted), tiny_module)
    assert export.exported_to is None and not tmp_path.joinpath("logs").exists()


def test_an_export_that_fails_is_one_logged_line_naming_the_way_out(tmp_path, tiny_module, caplog):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    export = ExportPretrained(dirpath=str(blocked))
    with caplog.at_level(logging.ERROR, logger="cyclealign_pl.callbacks"):
        export.on_fit_end(finished_fit(tmp_path), tiny_module)  # no exception: the fit's checkpoints stand
    assert export.exported_to is None
    assert export.error is not None and "\n" not in export.error
    assert f"the end-of-fit export to {blocked} failed (NotADirectoryError" in export.error
    assert "python -m cyclealign_pl export <checkpoint> <out_dir>" in export.error
    assert [r.getMessage() for r in caplog.records] == [export.error]


# -- CycleCheckpoint: when it saves -------------------------------------------------------------------------


class FakeTrainer(SimpleNamespace):
    """The trainer as CycleCheckpoint reads it at a batch end; ``rank0_timed`` is what rank 0's clock says."""

    def __init__(self, fn: TrainerFn = TrainerFn.FITTING, rank0_timed: bool | None = None) -> None:
        broadcast = (lambda value: value) if rank0_timed is None else (lambda value: rank0_timed)
        super().__init__(
            fast_dev_run=False,
            sanity_checking=False,
            state=SimpleNamespace(fn=fn),
            fit_loop=SimpleNamespace(total_batch_idx=-1),
            strategy=SimpleNamespace(broadcast=broadcast),
        )


def saves_over(saver: CycleCheckpoint, trainer: FakeTrainer, batches: range) -> list[int]:
    """The batch counts (training steps done) at which ``saver`` saves over ``batches``."""
    saved: list[int] = []
    saver._monitor_candidates = lambda trainer: {}
    saver._save_topk_checkpoint = lambda trainer, candidates: saved.append(saver._batches_done(trainer))
    saver._save_last_checkpoint = lambda trainer, candidates: None
    for index in batches:
        trainer.fit_loop.total_batch_idx = index
        saver.on_train_batch_end(trainer, None, None, None, index)
    return saved


def test_checkpoints_every_n_training_steps_counted_across_a_resume(tmp_path):
    saver = CycleCheckpoint(dirpath=tmp_path, every_n_batches=3)
    assert saves_over(saver, FakeTrainer(), range(10)) == [3, 6, 9]
    resumed = CycleCheckpoint(dirpath=tmp_path, every_n_batches=3)
    assert saves_over(resumed, FakeTrainer(), range(4, 10)) == [6, 9]  # the fit loop's count survives
    validating = CycleCheckpoint(dirpath=tmp_path, every_n_batches=1)
    assert saves_over(validating, FakeTrainer(TrainerFn.VALIDATING), range(3)) == []


def test_checkpoints_by_time_follow_rank_zeros_clock(tmp_path):
    started_long_ago = time.monotonic() - 60
    timed = CycleCheckpoint(dirpath=tmp_path, train_time_interval=timedelta(seconds=1))
    timed._last_time_checked = started_long_ago
    assert saves_over(timed, FakeTrainer(), range(1)) == [1]
    hourly = CycleCheckpoint(dirpath=tmp_path, train_time_interval=timedelta(hours=1))
    hourly._last_time_checked = started_long_ago
    assert saves_over(hourly, FakeTrainer(), range(3)) == []
    # this process's clock says "due", rank 0's does not: no process saves alone
    outvoted = CycleCheckpoint(dirpath=tmp_path, train_time_interval=timedelta(seconds=1))
    outvoted._last_time_checked = started_long_ago
    assert saves_over(outvoted, FakeTrainer(rank0_timed=False), range(3)) == []
