"""benchmarks/real_models.py's table, without fitting: a collapsed setting is marked in its row and named
under the table (a reward model can score loops like any reply), and ``--combine`` joins settings that ran
apart only when they ran at the same size."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.delitem(sys.modules, "real_models", raising=False)
    return importlib.import_module("real_models")


def _evaluation(preferred: float, looping: float) -> dict[str, Any]:
    return {
        "prompts": 100,
        "mean_reward": 50.0,
        "preferred_share": preferred,
        "empty_share": 0.0,
        "mean_words": 40.0,
        "distinct_2": 0.5,
        "looping_share": looping,
    }


def _result(setting: str, gain: float, collapse: str | None, training_prompts: int = 64) -> dict[str, Any]:
    iterations = {"prompts": 1, "iterations": 2.0}
    return {
        "setting": setting,
        "figures": {
            "zero_shot": _evaluation(0.45, 0.13),
            "trained": _evaluation(0.93, 0.97 if collapse else 0.05),
            "reward_gain": gain,
            "reward_gain_se": 0.5,
            "gain_in_se": gain / 0.5,
        },
        "iterations": {
            "all": {"prompts": 3, "iterations": 2.0},
            "agreed": iterations,
            "identical_samples": iterations,
            "ran_out_or_failed": {"prompts": 0, "iterations": None},
            "judge_failure_rate": 0.0,
        },
        "training_prompts": training_prompts,
        "prompts_per_hour": 60.0,
        "judge_requests": 100.0,
        "collapse_warning": collapse,
        "threads": 2,
        "run_dir": f"runs/{setting}",
        "peak_rss_gb": 4.0,
        "peak_rss_with_server_gb": 5.0,
    }


def _write(folder: Path, result: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{result['setting']}.json").write_text(json.dumps(result), encoding="utf-8")


def test_a_collapsed_setting_is_marked_in_its_row_and_named_under_the_table(benchmark):
    loops = "97% of the replies loop, repeating their own words (more than 50%)"
    results = {"none": _result("none", -0.2, None), "no_icl": _result("no_icl", 6.2, loops)}
    args = argparse.Namespace(train_prompts=64, eval_prompts=100)
    table = benchmark.report(None, results, args).splitlines()
    rows = {line.split("|")[1].strip(): line for line in table if line.startswith("| no") or "| none" in line}
    assert "**collapsed**" in rows["no_icl"] and "+6.20 +- 0.50 (12.4)" in rows["no_icl"]
    assert "collapsed" not in rows["none"]
    assert f"no_icl: the replies collapsed: {loops}; its gain is how the evaluator scores" in "\n".join(table)


def test_combine_joins_settings_run_apart_in_the_benchmark_order(benchmark, tmp_path):
    _write(tmp_path / "a", _result("no_cycle", -1.8, None))
    _write(tmp_path / "b", _result("none", -0.2, None))
    (tmp_path / "b" / "pairs.json").write_text(json.dumps({"pairs": {"pairs": 100}}), encoding="utf-8")
    pairs, results, sizes = benchmark.combine([str(tmp_path / "a"), str(tmp_path / "b")])
    assert pairs == {"pairs": 100}
    assert list(results) == ["none", "no_cycle"]  # the benchmark's order, not the folders'
    assert sizes == (64, 100)


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (lambda: _result("none", 1.0, None), "none appears twice"),
        (
            lambda: _result("no_d2", 1.0, None, training_prompts=25),
            "different sizes .training, evaluation prompts.: 25/100, 64/100",
        ),
    ],
    ids=["a setting twice", "different sizes"],
)
def test_combine_refuses_a_setting_twice_or_settings_of_different_sizes(benchmark, tmp_path, second, message):
    _write(tmp_path / "a", _result("none", -0.2, None))
    _write(tmp_path / "b", second())
    with pytest.raises(SystemExit, match=message):
        benchmark.combine([str(tmp_path / "a"), str(tmp_path / "b")])


def test_combine_of_a_folder_without_figures_says_so(benchmark, tmp_path):
    with pytest.raises(SystemExit, match="no setting's figures"):
        benchmark.combine([str(tmp_path)])
