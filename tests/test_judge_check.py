"""The judge check before training (``model.judge_check``): the judge ranks held-out human-labelled pairs in
both orders over real HTTP, and a fit whose judge is at chance stops before its first step, in one line."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import pytest

from cyclealign_pl.cli import EXIT_BAD_INPUT, main
from cyclealign_pl.data.hh_rlhf import SAMPLE_ROOT, load_hh_rlhf
from cyclealign_pl.data.rows import DataFileError
from cyclealign_pl.evaluators.pairs import BUILTIN_PAIRS, labelled_pairs, prompt_key
from cyclealign_pl.judges.accuracy import judge_accuracy
from tests.helpers import cli_args
from tests.openai_server import LocalOpenAIServer, rank_candidates

TINY_OPENAI = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_openai.yaml")
PAIRS = 6


class ShownSecondFirst:
    """A judge with no preference at all: it puts the reply shown last first, as the 135M judge does."""

    def rank(self, instruction: str, candidates: Sequence[str]) -> tuple[int, ...]:
        return tuple(reversed(range(len(candidates))))

    def better_reply(self, instruction: str, candidates: Sequence[str], ranking: Sequence[int]) -> None:
        return None

    def compare(self, conversation: str, reply_a: str, reply_b: str) -> str:
        return "B"


def keyword_rule_correct(pairs: Sequence[dict]) -> int:
    """How many of the 2 x len(pairs) judgments the keyword rule gets right, computed here without HTTP."""
    return sum(
        (rank_candidates((p["chosen"], p["rejected"]))[0] == 0)
        + (rank_candidates((p["rejected"], p["chosen"]))[0] == 1)
        for p in pairs
    )


def test_builtin_pairs_open_like_no_run_prompt_and_fit_the_character_budget():
    pairs = labelled_pairs(BUILTIN_PAIRS, 30, max_chars=600)
    assert len(pairs) == 30 and len({p["id"] for p in pairs}) == 30
    assert all(max(len(p["prompt"]), len(p["chosen"]), len(p["rejected"])) <= 600 for p in pairs)
    runs_prompts, _ = load_hh_rlhf(SAMPLE_ROOT, "harmless-base", "test")  # where every run draws from
    assert not {prompt_key(p["prompt"]) for p in pairs} & {prompt_key(r["prompt"]) for r in runs_prompts}
    with pytest.raises(DataFileError, match="labelled pairs whose texts fit 20 characters, 30 asked"):
        labelled_pairs(BUILTIN_PAIRS, 30, max_chars=20)


def test_accuracy_counts_the_human_preferred_reply_ranked_first_in_both_orders(make_judge, server):
    pairs = labelled_pairs(BUILTIN_PAIRS, PAIRS, max_chars=600)
    result = judge_accuracy(make_judge(), pairs)
    assert len(server.requests) == result.judgments == 2 * PAIRS and result.failed == 0
    assert result.correct == keyword_rule_correct(pairs)
    assert result.accuracy == pytest.approx(result.correct / (2 * PAIRS))


def test_a_judge_that_ranks_by_position_only_is_exactly_at_chance(make_judge, server):
    server.rule = ShownSecondFirst()
    result = judge_accuracy(make_judge(), labelled_pairs(BUILTIN_PAIRS, PAIRS, max_chars=600))
    assert (result.accuracy, result.first_shown_share, result.failed) == (0.5, 0.0, 0)


def test_a_judgment_that_fails_counts_as_wrong(make_judge, server):
    server.rule = None  # its answers hold no ranking
    result = judge_accuracy(make_judge(on_failure="skip"), labelled_pairs(BUILTIN_PAIRS, 2, max_chars=600))
    assert (result.failed, result.correct, result.accuracy) == (4, 0, 0.0)
    assert result.failures == {"invalid reply": 4}


def test_a_fit_whose_judge_is_at_chance_stops_before_its_first_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-local")
    with LocalOpenAIServer(rule=ShownSecondFirst()) as server:
        fit = cli_args(tmp_path, "--config", TINY_OPENAI, "--model.judge.init_args.base_url", server.url)
        fit += ["--model.judge_check.pairs", str(PAIRS), "--trainer.limit_train_batches", "2"]
        with pytest.raises(SystemExit) as stopped:
            main(["fit", *fit])
        sent = len(server.requests)
    assert stopped.value.code == EXIT_BAD_INPUT
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cyclealign_pl:")]
    assert len(lines) == 1, lines
    assert "accuracy 0.50" in lines[0] and "min_accuracy 0.6" in lines[0] and "min_accuracy null" in lines[0]
    assert sent == 2 * PAIRS  # the check's requests only: no training request was sent
    assert not (tmp_path / "checkpoints").exists()


def test_a_fit_that_only_measures_the_judge_logs_its_accuracy_and_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-local")
    pairs = labelled_pairs(BUILTIN_PAIRS, PAIRS, max_chars=600)
    with LocalOpenAIServer() as server:
        fit = cli_args(tmp_path, "--config", TINY_OPENAI, "--model.judge.init_args.base_url", server.url)
        fit += ["--model.judge_check.pairs", str(PAIRS), "--model.judge_check.min_accuracy", "null"]
        fit += ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0"]
        cli = main(["fit", *fit])
    assert cli.model.counters.optimizer_steps > 0
    rows = list(csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()))
    logged = [float(r["judge_check/accuracy"]) for r in rows if r.get("judge_check/accuracy")]
    assert logged == [pytest.approx(keyword_rule_correct(pairs) / (2 * PAIRS))]
    said = [line for line in capsys.readouterr().out.splitlines() if "judge check before training" in line]
    assert len(said) == 1 and f"accuracy {logged[0]:.2f}" in said[0]  # the end-of-fit summary says it
