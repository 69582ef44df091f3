"""The default run's figures, from a finished run's files: did the cycle align the white box, and how well?

Inputs: the ``<stage>_generations.jsonl`` of a zero-shot and of a trained evaluation (``validate`` without
and with ``--ckpt_path``, or the validation at the end of ``fit``), and the fit's ``metrics.csv``. Pure
reading and arithmetic; ``benchmarks/default_run.py`` runs the commands and prints :func:`format_figures`.

The targets (issue 11) are checked in :func:`check_figures`: the evaluator's reward rises by at least 3
standard errors of the paired difference (per prompt id), the share of replies it prefers goes from at most
60% to at least 85%, at least 95% of replies are non-empty, mean iterations per step fall from the first to
the last third of the run, and the black box's pairwise ranking accuracy against the evaluator is in (0.5, 1).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cyclealign_pl import evaluation

PREFERRED_THRESHOLD = 50.0  # sigmoid(reward) x 100 above this: the evaluator prefers the reply


@dataclass(frozen=True)
class EvaluationFigures:
    """One evaluation's figures: rewards and the collapse monitors."""

    prompts: int
    mean_reward: float
    preferred_share: float
    empty_share: float
    mean_words: float
    distinct_2: float
    looping_share: float


@dataclass(frozen=True)
class Figures:
    zero_shot: EvaluationFigures
    trained: EvaluationFigures
    paired_prompts: int
    reward_gain: float  # mean over prompts of trained - zero-shot reward
    reward_gain_se: float  # standard error of that mean
    iterations_first_third: float | None
    iterations_last_third: float | None
    judge_pairwise_accuracy: float | None
    # (first, middle, last third of the run): how prompts ended, by agreement or on identical samples
    iterations_by_third: tuple[float, float, float] | None = None
    agreement_by_third: tuple[float, float, float] | None = None
    identical_samples_by_third: tuple[float, float, float] | None = None

    @property
    def gain_in_se(self) -> float:
        return evaluation.standard_errors(self.reward_gain, self.reward_gain_se)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gain_in_se": self.gain_in_se}


def evaluation_figures(
    rows: Sequence[evaluation.GenerationRow], threshold: float = PREFERRED_THRESHOLD
) -> EvaluationFigures:
    """Rewards, the preferred share and the collapse monitors (``evaluation.reply_stats``) of one
    evaluation."""
    text = evaluation.reply_stats([row.reply for row in rows])
    rewards = [row.reward for row in rows]
    n = len(rows)
    return EvaluationFigures(
        prompts=n,
        mean_reward=sum(rewards) / n,
        preferred_share=sum(w > threshold for w in rewards) / n,
        empty_share=text.empty_share,
        mean_words=text.mean_reply_words,
        distinct_2=text.distinct_2,
        looping_share=text.looping_share,
    )


def read_metric(path: str | Path, name: str) -> list[float]:
    """The logged values of one metric in a Lightning ``metrics.csv``, in order (empty cells skipped)."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return [float(row[name]) for row in csv.DictReader(fh) if row.get(name) not in (None, "")]


def by_third(values: Sequence[float]) -> tuple[float, float, float] | None:
    """The means of the first, the middle and the last third of ``values`` (the middle one takes what the
    other two leave; None when there are fewer than 3)."""
    if len(values) < 3:
        return None
    k = len(values) // 3
    middle = values[k:-k]
    return sum(values[:k]) / k, sum(middle) / len(middle), sum(values[-k:]) / k


def thirds(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The means of the first and the last third of ``values`` (None when there are fewer than 3)."""
    three = by_third(values)
    return (None, None) if three is None else (three[0], three[2])


def compute_figures(
    zero_shot: str | Path,
    trained: str | Path,
    metrics_csv: str | Path | None = None,
    threshold: float = PREFERRED_THRESHOLD,
) -> Figures:
    """The figures of one run (see the module docstring); the rewards are paired by prompt id."""
    before = evaluation.read_generations(zero_shot, need_rewards=True)
    after = evaluation.read_generations(trained, need_rewards=True)
    ids = sorted(set(before) & set(after))
    gain = evaluation.paired_gain({i: after[i].reward for i in ids}, {i: before[i].reward for i in ids})
    if gain is None:
        raise ValueError(
            f"{zero_shot} and {trained} share {len(ids)} prompt ids; need at least 2 to pair them"
        )
    first = last = accuracy = None
    ended: dict[str, tuple[float, float, float] | None] = {}
    if metrics_csv is not None:
        first, last = thirds(read_metric(metrics_csv, "cycle/iterations"))
        accuracies = read_metric(metrics_csv, "cycle/ranking_pairwise_accuracy_mean")
        accuracy = accuracies[-1] if accuracies else None
        for name in ("iterations", "agreement", "identical_samples"):
            ended[f"{name}_by_third"] = by_third(read_metric(metrics_csv, f"cycle/{name}"))
    return Figures(
        zero_shot=evaluation_figures([before[i] for i in ids], threshold),
        trained=evaluation_figures([after[i] for i in ids], threshold),
        paired_prompts=gain.n,
        reward_gain=gain.gain,
        reward_gain_se=gain.standard_error,
        iterations_first_third=first,
        iterations_last_third=last,
        judge_pairwise_accuracy=accuracy,
        **ended,
    )


def check_figures(f: Figures) -> list[tuple[str, bool]]:
    """Each target of the default run and whether this run meets it."""
    first, last, accuracy = f.iterations_first_third, f.iterations_last_third, f.judge_pairwise_accuracy
    return [
        (f"reward gain {f.reward_gain:+.2f} >= 3 SE ({f.gain_in_se:.1f} SE)", f.gain_in_se >= 3),
        (
            f"zero-shot preferred share {f.zero_shot.preferred_share:.0%} <= 60%",
            f.zero_shot.preferred_share <= 0.6,
        ),
        (
            f"trained preferred share {f.trained.preferred_share:.0%} >= 85%",
            f.trained.preferred_share >= 0.85,
        ),
        (f"trained non-empty replies {1 - f.trained.empty_share:.0%} >= 95%", f.trained.empty_share <= 0.05),
        (
            f"iterations per step fall ({_num(first)} -> {_num(last)})",
            first is not None and last is not None and last < first,
        ),
        (
            f"judge pairwise accuracy {_num(accuracy)} in (0.5, 1)",
            accuracy is not None and 0.5 < accuracy < 1,
        ),
    ]


def _share(value: float) -> str:
    return f"{value:.0%}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_figures(f: Figures) -> str:
    """A small table of both evaluations and the target checks."""
    rows = [("", "zero-shot", "trained")]
    for name in (
        "prompts",
        "mean_reward",
        "preferred_share",
        "empty_share",
        "mean_words",
        "distinct_2",
        "looping_share",
    ):
        a, b = getattr(f.zero_shot, name), getattr(f.trained, name)
        rows.append((name, *(str(v) if isinstance(v, int) else f"{v:.3f}" for v in (a, b))))
    table = "\n".join(f"{a:<18}{b:>12}{c:>12}" for a, b, c in rows)
    lines = [
        table,
        (
            f"paired reward gain: {f.reward_gain:+.2f} +- {f.reward_gain_se:.2f} "
            f"(SE, {f.paired_prompts} prompts)"
        ),
        (
            f"iterations per step: first third {_num(f.iterations_first_third)}, "
            f"last third {_num(f.iterations_last_third)}"
        ),
        f"black box pairwise accuracy vs the evaluator: {_num(f.judge_pairwise_accuracy)}",
    ]
    thirds_of_run = (
        ("iterations per step", f.iterations_by_third, _num),
        ("prompts ended by agreement", f.agreement_by_third, _share),
        ("prompts ended on identical samples", f.identical_samples_by_third, _share),
    )
    for what, values, show in thirds_of_run:
        if values is not None:
            lines.append(f"{what}, first / middle / last third: {' / '.join(show(v) for v in values)}")
    lines += [f"[{'ok' if ok else 'MISSED'}] {text}" for text, ok in check_figures(f)]
    return "\n".join(lines)
