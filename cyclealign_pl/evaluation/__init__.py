"""The evaluation room: its files and their rows (files.py, light: no torch), reward scoring (scoring.py), and
the module's evaluation epochs (stages.py). The scoring names load on first use, so that reading a
generations file (``compare``) imports no torch."""

from importlib import import_module
from typing import Any

from cyclealign_pl.evaluation.files import (
    TOTAL,
    GenerationRecord,
    GenerationRow,
    RewardRow,
    eval_paths,
    read_generations,
    read_rewards_csv,
    write_eval_outputs,
    write_generations,
)

_SCORING = (
    "Coverage",
    "PairedGain",
    "ReplyStats",
    "RewardEvaluation",
    "SubsetMeanReward",
    "collapse_warning",
    "coverage",
    "gather_records",
    "paired_gain",
    "plural",
    "reply_stats",
    "standard_errors",
    "subsets_of",
    "with_reply_stats",
)


def __getattr__(name: str) -> Any:
    if name in _SCORING:
        return getattr(import_module("cyclealign_pl.evaluation.scoring"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TOTAL",
    "GenerationRecord",
    "GenerationRow",
    "RewardRow",
    "eval_paths",
    "read_generations",
    "read_rewards_csv",
    "write_eval_outputs",
    "write_generations",
    *_SCORING,
]
