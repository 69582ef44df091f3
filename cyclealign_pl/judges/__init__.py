"""Judges rank candidate responses: the black box of the cycle, and reference rankers for metrics."""

from cyclealign_pl.judges.base import (
    Judge,
    JudgeBudgetExceeded,
    JudgeStop,
    JudgeUnavailable,
    Judgment,
    RankRequest,
)

__all__ = ["Judge", "JudgeBudgetExceeded", "JudgeStop", "JudgeUnavailable", "Judgment", "RankRequest"]
