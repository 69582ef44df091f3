"""How well a judge ranks human-labelled pairs: the check a run makes before it trains on the judge.

Each pair (a dialogue, the human-preferred reply, the other one) is asked as a ranking request of two
candidates with the paper's static demonstration, as the cycle asks a first iteration, in both orders. A
judge that ranks by position only is then right exactly half of the time, whatever its bias: the accuracy
measures preference, not position. A failed judgment counts as wrong: a judge that cannot answer cannot teach.
Why a run checks at all: trained on a chance-level judge's rankings, a white box gets worse, not just no
better (docs/real_models.md, "Defaults that do no harm").
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cyclealign_pl.demonstrations import STATIC_DEMONSTRATION, Demonstration
from cyclealign_pl.judges.base import Judge, JudgeStop, Judgment, RankRequest


class JudgeTooWeak(JudgeStop):
    """The judge ranked human-labelled pairs no better than the run's ``min_accuracy``: training on its
    rankings would harm the white box."""


@dataclass(frozen=True)
class JudgeAccuracy:
    """A judge's answers on human-labelled pairs, each pair asked in both orders."""

    judgments: int  # two per pair
    correct: int  # the human-preferred reply ranked first
    failed: int  # no ranking (parse or transport failure)
    first_shown_first: int  # judgments that put the reply shown first first (position bias: 0.5 is none)
    failures: Mapping[str, int] = field(default_factory=dict)  # the commonest reasons

    @property
    def accuracy(self) -> float:
        """Correct judgments over all asked (a failure is wrong)."""
        return self.correct / self.judgments if self.judgments else math.nan

    @property
    def standard_error(self) -> float:
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.judgments) if self.judgments else math.nan

    @property
    def answered(self) -> int:
        return self.judgments - self.failed

    @property
    def first_shown_share(self) -> float:
        return self.first_shown_first / self.answered if self.answered else math.nan

    def line(self) -> str:
        """One line for logs and errors."""
        return (
            f"accuracy {self.accuracy:.2f} +- {self.standard_error:.2f} on {self.judgments // 2} held-out "
            f"human-labelled pairs asked in both orders ({self.failed} of {self.judgments} judgments failed; "
            f"the reply shown first was put first in {self.first_shown_share:.0%})"
        )

    def metrics(self) -> dict[str, float]:
        return {
            "judge_check/accuracy": self.accuracy,
            "judge_check/judgments": float(self.judgments),
            "judge_check/failed": float(self.failed),
            "judge_check/first_shown_share": self.first_shown_share,
        }


def both_orders(
    pairs: Sequence[Mapping[str, str]], demonstrations: Sequence[Demonstration] = (STATIC_DEMONSTRATION,)
) -> list[RankRequest]:
    """Per pair (``prompt``, ``chosen``, ``rejected``): the chosen reply shown first, then second."""
    shots = tuple(demonstrations)
    requests = []
    for pair in pairs:
        chosen, rejected = pair["chosen"], pair["rejected"]
        requests.append(RankRequest(pair["prompt"], (chosen, rejected), shots))
        requests.append(RankRequest(pair["prompt"], (rejected, chosen), shots))
    return requests


def judge_accuracy(
    judge: Judge,
    pairs: Sequence[Mapping[str, str]],
    demonstrations: Sequence[Demonstration] = (STATIC_DEMONSTRATION,),
) -> JudgeAccuracy:
    """Ask ``judge`` every pair in both orders (one batch of requests) and count (module docstring)."""
    return count_judgments(judge.rank(both_orders(pairs, demonstrations)))


def count_judgments(judgments: Sequence[Judgment]) -> JudgeAccuracy:
    """The counts of judgments answering :func:`both_orders`' requests, in that order."""
    correct = failed = first = 0
    reasons: Counter[str] = Counter()
    for index, judgment in enumerate(judgments):
        if judgment.ranking is None:
            failed += 1
            reasons[str(judgment.failure).split(":")[0][:60]] += 1
            continue
        first += judgment.ranking[0] == 0
        correct += judgment.ranking[0] == index % 2  # the chosen reply is shown first in even requests
    return JudgeAccuracy(len(judgments), correct, failed, first, dict(reasons.most_common(5)))
