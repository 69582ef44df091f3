"""The end-of-fit report and its exit status (cyclealign_pl.summary): the default run's report, the
verdict, what the report prints, and a fit whose judge never ranks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from cyclealign_pl.cli import EXIT_NO_UPDATE, main
from cyclealign_pl.counters import RunTotals
from tests.helpers import cli_args

ROOT = Path(__file__).resolve().parents[1]
TINY_OPENAI = str(ROOT / "configs" / "tiny_openai.yaml")


@pytest.mark.slow
def test_fit_ends_with_its_paths_and_numbers(default_run):
    cli, run_dir, out = default_run.cli, default_run.root, default_run.output
    counters = cli.model.counters
    report = out[out.index("cyclealign_pl: fit done") :]
    assert (
        f"{counters.steps} steps, {counters.prompts} prompts, "
        f"{counters.optimizer_steps} optimizer steps" in report
    )
    assert f"{counters.iterations / counters.prompts:.2f} iterations per prompt" in report
    judged = counters.iterations - counters.degenerate_sets
    assert f"{counters.judge_failures} failed judgments of {judged}" in report
    reward = cli.trainer.callback_metrics["val/reward/total"].item()
    summary = cli.model.evaluation_summary
    assert f"reward {summary['zero_shot_reward']:.4g} (zero-shot) -> {reward:.4g}, gain" in report
    assert f"{summary['reward_gain_z']:+.1f} SE over {summary['paired_prompts']} prompts" in report
    assert f"replies the evaluator prefers: {summary['zero_shot_preferred_share']:.0%} -> " in report
    assert "  result: aligned: the evaluator's reward rose" in report  # the default run aligns its white box
    for what, path in [
        ("checkpoint", run_dir / "checkpoints" / "last.ckpt"),
        ("logs", run_dir / "logs" / "version_0"),
        ("exported model", run_dir / "logs" / "version_0" / "hf_model"),
    ]:
        assert f"  {what}: {path}" in report


# -- the end-of-fit verdict ----------------------------------------------------------------------------------


def test_a_fit_without_any_optimizer_step_fails_and_says_why():
    from cyclealign_pl.summary import FitSummary, verdict

    dead = FitSummary(
        counters=RunTotals(steps=3, prompts=3, iterations=15, optimizer_steps=0, judge_failures=15),
        judge={},
        validation_reward=None,
        evaluation={},
    )
    status, messages = verdict(dead, 0.2)
    assert status == EXIT_NO_UPDATE == 4
    assert any("no optimizer step in 3 prompts (15 of 15 judgments failed)" in m for m in messages)
    assert any(m.startswith("warning: 100% of the judgments failed (15 of 15") for m in messages)

    healthy = FitSummary(
        counters=RunTotals(steps=3, prompts=3, iterations=10, optimizer_steps=9, judge_failures=1),
        judge={},
        validation_reward=None,
        evaluation={},
    )
    assert verdict(healthy, 0.2) == (0, [])
    status, messages = verdict(healthy, 0.05)  # 10% failed: above a 5% threshold
    assert status == 0 and messages == [
        (
            "warning: 10% of the judgments failed (1 of 10; report.judge_failure_warning=0.05): see "
            "judge/failures/* in metrics.csv"
        )
    ]
    no_prompts = FitSummary(
        counters=RunTotals(steps=0, prompts=0), judge={}, validation_reward=None, evaluation={}
    )
    assert verdict(no_prompts, 0.2) == (0, [])


@pytest.mark.parametrize(
    ("compared", "same", "chance", "warns"),
    [
        (167, 167, 167 / 6, True),  # the 135M judge without demonstrations (docs/real_models.md)
        (185, 126, 185 / 6, True),  # the same judge with them: 68%, against 1/6 by chance
        (185, 108, 185 / 6, True),  # just past halfway from chance to always
        (185, 107, 185 / 6, False),
        (100, 70, 50, False),  # two candidates: chance is 1/2
        (100, 75, 50, True),
        (19, 19, 19 / 6, False),  # too few to tell
        (0, 0, 0, False),
    ],
)
def test_a_judge_that_ranks_by_position_is_a_warning(compared, same, chance, warns):
    from cyclealign_pl.summary import FitSummary, verdict

    summary = FitSummary(
        counters=RunTotals(steps=3, prompts=3, iterations=10, optimizer_steps=9),
        judge={
            "rankings_compared": compared,
            "rankings_same_positions": same,
            "rankings_same_by_chance": chance,
        },
        validation_reward=None,
        evaluation={},
    )
    status, messages = verdict(summary, 0.2)
    assert status == 0
    assert [m.startswith("warning: the judge ranked by position") for m in messages] == (
        [True] if warns else []
    )


def test_the_report_prints_whatever_the_module_and_judge_provide():
    from cyclealign_pl.summary import collect, render

    class Judge:
        def metrics(self):
            return {"requests_sent": 12, "cache_hits": 3, "failures": 1, "cost_usd": 0.0123}

    module = SimpleNamespace(
        counters=RunTotals(
            steps=4,
            prompts=4,
            iterations=12,
            degenerate_sets=2,
            optimizer_steps=9,
            judge_failures=1,
            agreed_prompts=3,
            identical_sample_prompts=1,
        ),
        judge=Judge(),
        evaluation_summary={
            "prompts": 16,
            "empty_share": 0.0625,
            "mean_reply_words": 12.5,
            "distinct_2": 0.5,
            "looping_share": 0.25,
            "reward": 0.5,
            "preferred_share": 0.75,
            "zero_shot_reward": -0.25,
            "reward_gain": 0.75,
            "reward_gain_se": 0.125,
            "reward_gain_z": 6.0,
            "paired_prompts": 16,
            "zero_shot_preferred_share": 0.25,
            "collapse_warning": "distinct-2 is 0.010",
        },
    )
    summary = collect(module, {"val/reward/total": 0.5}, {"checkpoint": "/x/last.ckpt", "logs": None})
    lines = render(summary)
    assert lines[0] == (
        "fit done: 4 steps, 4 prompts, 9 optimizer steps, 3.00 iterations per prompt, 3 ended by agreement, "
        "1 on identical samples, 0 at the iteration limit"
    )
    assert (  # the degenerate candidate sets were never sent to the judge
        lines[1]
        == "  judge: 12 requests, 3 cache hits, 1 failed requests, $0.0123, 1 failed judgments of 10 (10.0%)"
    )
    for line in [
        "  evaluation on 16 prompts: reward -0.25 (zero-shot) -> 0.5, gain +0.75 +- 0.12 "
        "(paired standard error; +6.0 SE over 16 prompts)",
        "  replies the evaluator prefers: 25% -> 75%; empty 6%, 12.5 words on average, distinct-2 0.500, "
        "looping 25%",
        "  result: aligned: the evaluator's reward rose by more than 2 standard errors; but the replies "
        "collapsed (below): the reward does not measure that",
        "  warning: the replies collapsed: distinct-2 is 0.010",
        "  checkpoint: /x/last.ckpt",
    ]:
        assert line in lines
    for z, result in [(0.5, "no significant change"), (-1.9, "no significant change"), (-3.0, "worse")]:
        module.evaluation_summary["reward_gain_z"] = z
        assert any(line.startswith(f"  result: {result}") for line in render(collect(module, {}, {})))
    without_evaluation = render(collect(SimpleNamespace(counters=RunTotals()), {"val/reward/total": 0.5}, {}))
    assert "  validation reward (val/reward/total): 0.5" in without_evaluation
    assert not any(line.startswith("  logs") for line in lines)  # no logger: no line

    bare = collect(object(), {}, {})  # a module without counters or judge: nothing to crash on
    assert render(bare)[0].startswith("fit done: 0 steps")


def test_the_judge_failure_threshold_is_a_checked_setting():
    from cyclealign_pl.summary import ReportSettings

    assert ReportSettings().judge_failure_warning == 0.2
    with pytest.raises(ValueError, match="judge_failure_warning must be in"):
        ReportSettings(judge_failure_warning=1.5)


@pytest.mark.slow
def test_a_fit_whose_judge_never_ranks_exits_4_with_a_warning(tmp_path, monkeypatch, capsys):
    """Every judge reply is unparseable: no optimizer step, so the run must not exit 0."""
    from tests.openai_server import Behaviour, LocalOpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-local")
    with (
        LocalOpenAIServer(
            responder=lambda index, body: Behaviour.reply("They all look fine to me.")
        ) as server,
        pytest.raises(SystemExit) as exit_info,
    ):
        main(
            [
                "fit",
                *cli_args(
                    tmp_path / "run",
                    "--config",
                    TINY_OPENAI,
                    "--trainer.limit_train_batches",
                    "2",
                    "--trainer.limit_val_batches",
                    "0",
                    "--model.cycle.max_iterations",
                    "2",
                    "--model.judge.init_args.base_url",
                    server.url,
                ),
            ]
        )
    assert exit_info.value.code == EXIT_NO_UPDATE
    err = capsys.readouterr().err
    assert "cyclealign_pl: error: no optimizer step in 2 prompts (4 of 4 judgments failed)" in err
    assert "cyclealign_pl: warning: 100% of the judgments failed (4 of 4" in err
    assert (
        tmp_path / "run" / "judge_cache.sqlite"
    ).is_file()  # the config's relative cache_path: under the root
