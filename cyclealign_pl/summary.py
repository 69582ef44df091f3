"""What ``fit`` tells the user at its end: where the files went, what the run did, and whether it worked.

:func:`collect` reads the numbers (pure: from the module's counters, the judge's metrics, the trainer's
logged metrics and an optional ``evaluation_summary`` dict of the module); :func:`render` writes the lines;
:func:`verdict` decides whether the run did its job: a run that had prompts but took no optimizer step
failed (:data:`EXIT_NO_UPDATE`); a judge failure rate above a threshold, and a judge that ranks by shown
position (:func:`position_bias`), are warnings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cyclealign_pl.counters import RunTotals

EXIT_NO_UPDATE = 4  # fit had prompts but took no optimizer step: the model is unchanged
EXIT_EXPORT_FAILED = 5  # fit trained, but the end-of-fit export failed (the checkpoints are kept)
SIGNIFICANT_SE = 2.0  # a reward gain beyond this many standard errors is reported as a change
# a judge whose rankings repeat the previous one by shown position this far from chance (1/6 with 3
# candidates, 1/2 with 2) toward always ranks by position, not content; judged over at least this many
# rankings
POSITION_BIAS_WARNING = 0.5
POSITION_BIAS_MIN_RANKINGS = 20

VALIDATION_REWARD = "val/reward/total"


class ReportSettings:
    """The ``report:`` settings: how ``fit``'s end-of-run report judges the run.

    Args:
        judge_failure_warning: warn at the end of ``fit`` when more than this share of the judgments
            (judge failures / iterations) failed; 1.0 never warns.
    """

    def __init__(self, judge_failure_warning: float = 0.2) -> None:
        if not 0.0 <= judge_failure_warning <= 1.0:
            raise ValueError(f"report.judge_failure_warning must be in [0, 1], got {judge_failure_warning}")
        self.judge_failure_warning = judge_failure_warning


@dataclass
class FitSummary:
    counters: RunTotals  # over all processes (run_state.py: one definition of each count and rate)
    judge: dict[str, float]
    validation_reward: float | None
    evaluation: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)  # what -> where: checkpoint, logs, exported model
    judge_check: str | None = None  # the judge's accuracy on human-labelled pairs before training, one line


def _number(value: Any) -> float | None:
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def collect(module: Any, callback_metrics: Mapping[str, Any], paths: Mapping[str, str | None]) -> FitSummary:
    """The run's numbers, read defensively: any part the module does not have is left out."""
    counters = getattr(module, "totals", None) or getattr(module, "counters", None) or RunTotals()
    if not isinstance(counters, RunTotals):  # the module's own (no training ran in this process)
        counters = RunTotals(**counters.as_dict())
    judge = getattr(module, "judge", None)
    judge_metrics = judge.metrics() if judge is not None and hasattr(judge, "metrics") else {}
    evaluation = getattr(module, "evaluation_summary", None)
    checked = getattr(module, "judge_check_result", None)
    return FitSummary(
        counters=counters,
        judge={k: n for k, v in judge_metrics.items() if (n := _number(v)) is not None},
        validation_reward=_number(callback_metrics.get(VALIDATION_REWARD)),
        evaluation=dict(evaluation) if isinstance(evaluation, Mapping) else {},
        paths={k: v for k, v in paths.items() if v},
        judge_check=checked.line() if checked is not None else None,
    )


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def _relative(path: str) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if relative.startswith("..") else relative


def render(summary: FitSummary) -> list[str]:
    """The report's lines (no trailing newlines)."""
    c = summary.counters
    lines = []
    run = [
        f"{_fmt(c.steps)} steps",
        f"{_fmt(c.prompts)} prompts",
        f"{_fmt(c.optimizer_steps)} optimizer steps",
    ]
    if c.mean_iterations is not None:
        run.append(f"{c.mean_iterations:.2f} iterations per prompt")
    capped = c.prompts - c.agreed_prompts - c.identical_sample_prompts
    run.append(
        f"{_fmt(c.agreed_prompts)} ended by agreement, {_fmt(c.identical_sample_prompts)} on "
        f"identical samples, {_fmt(capped)} at the iteration limit"
    )
    nothing_ranked = c.skipped_updates - c.nonfinite_updates
    if nothing_ranked:
        run.append(
            f"{_fmt(nothing_ranked)} rounds without a ranking to learn from (identical candidates "
            "or failed judgments)"
        )
    if c.nonfinite_updates:
        run.append(f"{_fmt(c.nonfinite_updates)} non-finite updates skipped")
    lines.append("fit done: " + ", ".join(run))
    if c.in_flight:
        lines.append(
            f"  {_fmt(c.in_flight)} prompts still in flight at the end of training: saved in the "
            "checkpoint, not counted above"
        )
    j = summary.judge
    judged = []
    if "requests_sent" in j:
        judged.append(f"{_fmt(j['requests_sent'])} requests")
    if "cache_hits" in j:
        judged.append(f"{_fmt(j['cache_hits'])} cache hits")
    if "failures" in j:
        judged.append(f"{_fmt(j['failures'])} failed requests")
    if "cost_usd" in j:
        judged.append(f"${j['cost_usd']:.4f}")
    rate = c.judge_failure_rate
    share = f" ({rate:.1%})" if rate is not None else ""
    judged.append(f"{_fmt(c.judge_failures)} failed judgments of {_fmt(c.judged)}{share}")
    if judged:
        lines.append("  judge: " + ", ".join(judged))
    if summary.judge_check:
        lines.append(f"  judge check before training: {summary.judge_check}")
    lines.extend(_evaluation_lines(summary))
    for what, path in summary.paths.items():
        lines.append(f"  {what}: {_relative(path)}")
    return lines


def render_evaluation(
    command: str, evaluation: Mapping[str, Any], paths: Mapping[str, str | None]
) -> list[str]:
    """The report of ``validate``/``test``: what it scored out of what, the reward (and the gain over the
    zero-shot model, with a checkpoint of a run), the collapse monitors and where the files went."""
    head = f"{command} done"
    fields = evaluation.get("coverage") or {}
    if fields:
        from cyclealign_pl.evaluation import Coverage

        covered = Coverage(*(fields[name] for name in Coverage._fields))
        head += f": scored {covered.describe(fields.get('group', 'subset'))}"
        if covered.missing:
            head += f"; not scored: {covered.missing_text()}"
    lines = [head]
    lines.extend(_evaluation_lines(FitSummary(RunTotals(), {}, None, dict(evaluation))))
    for what, path in paths.items():
        if path:
            lines.append(f"  {what}: {_relative(path)}")
    return lines


def _evaluation_lines(summary: FitSummary) -> list[str]:
    """The validation's headline: the reward against the zero-shot white box, and the collapse monitors."""
    e = summary.evaluation
    if not e:
        if summary.validation_reward is None:
            return []
        return [f"  validation reward ({VALIDATION_REWARD}): {summary.validation_reward:.4g}"]
    lines = []
    prompts = f"{_fmt(e.get('prompts', 0))} prompts"
    if e.get("reward_gain") is not None:
        lines.append(
            f"  evaluation on {prompts}: reward {e['zero_shot_reward']:.4g} (zero-shot) "
            f"-> {e['reward']:.4g}, gain {e['reward_gain']:+.4g} +- {e['reward_gain_se']:.2g} "
            f"(paired standard error; "
            f"{e['reward_gain_z']:+.1f} SE over {_fmt(e['paired_prompts'])} prompts)"
        )
        result = _result(e["reward_gain_z"])
        if e.get("collapse_warning"):  # a reward model can score loops like any reply (docs/real_models.md)
            result += "; but the replies collapsed (below): the reward does not measure that"
        lines.append("  result: " + result)
    elif e.get("reward") is not None:
        lines.append(f"  evaluation on {prompts}: reward {e['reward']:.4g}")
    shares = []
    if e.get("preferred_share") is not None:
        before = e.get("zero_shot_preferred_share")
        shares.append(
            "replies the evaluator prefers: "
            + (f"{before:.0%} -> " if before is not None else "")
            + f"{e['preferred_share']:.0%}"
        )
    if e.get("empty_share") is not None:
        shares.append(
            f"empty {e['empty_share']:.0%}, {e['mean_reply_words']:.1f} words on average, "
            f"distinct-2 {e['distinct_2']:.3f}"
            + (f", looping {e['looping_share']:.0%}" if e.get("looping_share") is not None else "")
        )
    if shares:
        lines.append("  " + "; ".join(shares))
    if e.get("collapse_warning"):
        lines.append(f"  warning: the replies collapsed: {e['collapse_warning']}")
    return lines


def _result(z: float) -> str:
    """What the paired gain says, in words."""
    if z >= SIGNIFICANT_SE:
        return f"aligned: the evaluator's reward rose by more than {SIGNIFICANT_SE:g} standard errors"
    if z <= -SIGNIFICANT_SE:
        return f"worse: the evaluator's reward fell by more than {SIGNIFICANT_SE:g} standard errors"
    return f"no significant change from the zero-shot white box (within {SIGNIFICANT_SE:g} standard errors)"


def position_bias(same: float, compared: float, chance: float) -> float | None:
    """How far ``same`` of ``compared`` rankings that repeat the one before by shown position went from
    ``chance`` (0) toward always (1); None before :data:`POSITION_BIAS_MIN_RANKINGS` rankings."""
    if compared < POSITION_BIAS_MIN_RANKINGS or compared <= chance:
        return None
    return (same - chance) / (compared - chance)


def verdict(summary: FitSummary, judge_failure_warning: float) -> tuple[int, list[str]]:
    """The exit status and the warning/error lines for a finished ``fit``."""
    c = summary.counters
    messages = []
    rate = c.judge_failure_rate
    if rate is not None and rate > judge_failure_warning:
        messages.append(
            f"warning: {rate:.0%} of the judgments failed ({_fmt(c.judge_failures)} of "
            f"{_fmt(c.judged)}; report.judge_failure_warning={judge_failure_warning:g}): see "
            "judge/failures/* in metrics.csv"
        )
    same, compared, chance = (
        summary.judge.get(f"rankings_{name}", 0.0)
        for name in ("same_positions", "compared", "same_by_chance")
    )
    bias = position_bias(same, compared, chance)
    if bias is not None and bias >= POSITION_BIAS_WARNING:
        messages.append(
            f"warning: the judge ranked by position: {_fmt(same)} of {_fmt(compared)} rankings put the "
            f"shown replies in the same order as the ranking before (chance: {_fmt(round(chance))}), so they "
            "do not follow what the replies say; measure the judge with model.judge_check (docs/judges.md)"
        )
    if c.prompts > 0 and c.optimizer_steps == 0:
        reasons = []
        if c.judge_failures:
            reasons.append(f"{_fmt(c.judge_failures)} of {_fmt(c.judged)} judgments failed")
        if c.nonfinite_updates:
            reasons.append(f"{_fmt(c.nonfinite_updates)} non-finite updates were skipped")
        why = "; ".join(reasons) or "no iteration gave a loss to learn from"
        prompts = _fmt(c.prompts) + (" prompt" if c.prompts == 1 else " prompts")
        messages.append(f"error: no optimizer step in {prompts} ({why}): the model is unchanged")
        return EXIT_NO_UPDATE, messages
    return 0, messages
