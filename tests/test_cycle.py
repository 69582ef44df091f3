"""The cycle inside Lightning: learning, early stop, ablations, resume (tiny models, real Trainer)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from cyclealign_pl.cycle import CycleConfig
from tests.helpers import (
    QUESTIONS,
    Capture,
    WhiteBoxMirrorJudge,
    cli_args,
    make_data,
    make_trainer,
    swap_top_two,
    tiny_module,
)

# -- learning: the default task (docs/default_task.md) -------------------------------------------------------


def metric(run_dir: Path, name: str) -> list[float]:
    rows = csv.DictReader((run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines())
    return [float(row[name]) for row in rows if row.get(name)]


@pytest.mark.slow
def test_the_default_run_aligns_its_white_box(default_run):
    """The README's first command, as shipped: on 100 held-out prompts the evaluator's reward rises by >= 3
    standard errors of the paired difference, the share of replies it prefers goes from <= 60% to >= 85%, the
    replies stay non-empty and varied, iterations per step fall over the run (the paper's Fig. 4), and the
    black box ranks like the evaluator more often than chance but not always."""
    summary = default_run.cli.model.evaluation_summary
    assert summary["paired_prompts"] == 100
    assert summary["reward_gain_z"] >= 3, summary
    assert summary["zero_shot_preferred_share"] <= 0.6 and summary["preferred_share"] >= 0.85, summary
    assert (
        summary["empty_share"] <= 0.05 and summary["distinct_2"] > 0.02 and "collapse_warning" not in summary
    )
    iterations = metric(default_run.root, "cycle/iterations")
    third = len(iterations) // 3
    assert sum(iterations[-third:]) / third < sum(iterations[:third]) / third, iterations
    accuracy = metric(default_run.root, "cycle/ranking_pairwise_accuracy_mean")[-1]
    assert 0.5 < accuracy < 1.0


@pytest.mark.slow
def test_the_pro_objective_aligns_the_default_white_box_too(tmp_path):
    from cyclealign_pl.cli import main

    with Capture():
        cli = main(
            [
                "fit",
                *cli_args(
                    tmp_path / "run", "--model.cycle.objective", "pro", "--trainer.limit_train_batches", "16"
                ),
            ]
        )
    summary = cli.model.evaluation_summary
    assert cli.model.cycle_config.objective == "pro"
    assert summary["reward_gain_z"] >= 3 and summary["preferred_share"] >= 0.8, summary


# -- early stop and iterations --------------------------------------------------------------------------


def test_judge_that_always_agrees_stops_after_one_iteration(hh_root, tmp_path):
    judge = WhiteBoxMirrorJudge()
    module = tiny_module(judge, cycle=CycleConfig(max_iterations=5))
    make_trainer(tmp_path, batches=4).fit(module, make_data(hh_root(QUESTIONS[:8])))
    assert module.counters.prompts == 4
    assert module.counters.iterations == 4  # one each
    assert module.counters.agreed_prompts == 4 and module.counters.identical_sample_prompts == 0
    assert module.counters.optimizer_steps == 4


def test_judge_that_never_agrees_uses_all_iterations(hh_root, tmp_path):
    judge = WhiteBoxMirrorJudge(swap_top_two)
    module = tiny_module(judge, cycle=CycleConfig(max_iterations=3))
    make_trainer(tmp_path, batches=2).fit(module, make_data(hh_root(QUESTIONS[:8])))
    assert module.counters.iterations == 6
    assert module.counters.agreed_prompts == 0
    assert module.trainer.global_step == 6  # manual optimization: global_step counts optimizer steps


def test_batched_prompts_drop_out_independently(hh_root, tmp_path):
    """Prompts that agree stop; the rest keep training (one optimizer step per iteration while any is
    active)."""
    calls = {"n": 0}

    def agree_on_even_requests(ranking):
        calls["n"] += 1
        return ranking if calls["n"] % 2 else swap_top_two(ranking)

    judge = WhiteBoxMirrorJudge(agree_on_even_requests)
    module = tiny_module(judge, cycle=CycleConfig(max_iterations=3))
    make_trainer(tmp_path, batches=1).fit(module, make_data(hh_root(QUESTIONS[:8]), batch_size=2))
    # iteration 1: request 1 agrees, request 2 does not; iteration 2: request 3 agrees -> done after 2
    # iterations
    assert module.counters.iterations == 3
    assert module.counters.optimizer_steps == 2
    assert module.counters.agreed_prompts == 2


# -- ablations (paper Table 3) --------------------------------------------------------------------------


def _demos_by_iteration(judge: WhiteBoxMirrorJudge) -> list[int]:
    return [len(r.demonstrations) for r in judge.requests]


@pytest.mark.parametrize(
    "ablation, expected_demos, iterations",
    [
        ("none", [1, 2, 3], 3),  # static, then + one agreement per iteration
        ("no_d2", [1, 1, 1], 3),
        ("no_icl", [0, 0, 0], 3),
        ("no_wrd", [1, 2, 3], 3),
        ("no_brd", [1, 2, 3], 3),
        ("no_cycle", [1], 1),
    ],
)
def test_ablation_switches(ablation, expected_demos, iterations, hh_root, tmp_path):
    judge = WhiteBoxMirrorJudge(swap_top_two)
    module = tiny_module(judge, cycle=CycleConfig(max_iterations=3, ablation=ablation))
    make_trainer(tmp_path, batches=1).fit(module, make_data(hh_root(QUESTIONS[:8])))
    assert _demos_by_iteration(judge) == expected_demos
    assert module.counters.iterations == iterations
    if ablation in ("none", "no_wrd", "no_brd"):
        first_dynamic = judge.requests[1].demonstrations[1]
        candidates = judge.requests[0].candidates
        blackbox = judge.rankings[0]
        whitebox = swap_top_two(blackbox)  # the mirror judge swapped the white-box's top two
        shown = {"none": (blackbox[0], blackbox[2]), "no_wrd": blackbox, "no_brd": whitebox}[ablation]
        # the demonstration shows the ranked candidates in their original order, renumbered
        assert first_dynamic.responses == tuple(candidates[i] for i in sorted(shown))
        order = sorted(shown)
        assert tuple(order[i] for i in first_dynamic.ranking) == shown


# -- checkpoints ----------------------------------------------------------------------------------------


def test_resume_restores_pool_and_counters(hh_root, tmp_path):
    root = hh_root(QUESTIONS[:12])
    judge = WhiteBoxMirrorJudge(swap_top_two)
    first = tiny_module(
        judge, cycle=CycleConfig(max_iterations=2, demonstration_scope="run", max_demonstrations=5)
    )
    trainer = make_trainer(tmp_path, batches=3)
    trainer.fit(first, make_data(root))
    ckpt = tmp_path / "three.ckpt"
    trainer.save_checkpoint(ckpt)
    assert first.run_state.pool.shared, "scope='run' keeps demonstrations across steps"

    second_judge = WhiteBoxMirrorJudge(swap_top_two)
    second = tiny_module(
        second_judge, cycle=CycleConfig(max_iterations=2, demonstration_scope="run", max_demonstrations=5)
    )
    make_trainer(tmp_path, batches=3).fit(
        second, make_data(root), ckpt_path=ckpt
    )  # already complete: restores only
    assert second.counters == first.counters
    assert second.run_state.pool == first.run_state.pool
    assert not second_judge.requests

    third_judge = WhiteBoxMirrorJudge(swap_top_two)
    third = tiny_module(
        third_judge, cycle=CycleConfig(max_iterations=2, demonstration_scope="run", max_demonstrations=5)
    )
    make_trainer(tmp_path, batches=3, max_epochs=2).fit(third, make_data(root), ckpt_path=ckpt)
    assert third.counters.steps == 6 and third.counters.prompts == 6
    # the restored pool is what the first resumed request sees (capped at max_demonstrations, after the static
    # one)
    assert third_judge.requests[0].demonstrations[1:] == tuple(first.run_state.pool.shared[-5:])
