"""The files of an evaluation under ``<log_dir>/eval/`` (docs/evaluation.md), and their one reader.

* ``<stage>_rewards.csv``: one row per subset and a last ``total`` row (``RewardRow``'s fields);
* ``<stage>_generations.jsonl``: one ``{"id", "subset", "prompt", "reply", "reward"}`` object per prompt.
  Prompts and replies may be harmful text: they go to this file only, never to the logs;
* ``<stage>_meta.json``: what was evaluated (checkpoint, steps, evaluator, data), to label results tables.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

TOTAL = "total"  # the name of the sample-weighted row; no subset may be called this
GENERATION_FIELDS = ("id", "subset", "prompt", "reply")


class RewardRow(NamedTuple):
    """One row of the results table: a subset (or ``"total"``), its number of scored replies, their mean
    reward, and what shows a collapsed white box beside it (None where not computed)."""

    subset: str
    n: int
    mean_reward: float
    preferred_share: float | None = None  # replies whose reward is above the evaluator's threshold
    empty_share: float | None = None
    mean_reply_words: float | None = None
    distinct_2: float | None = None  # distinct word bigrams / all word bigrams, over the subset's replies
    looping_share: float | None = None  # replies that repeat their own words (``scoring.is_looping``)


class GenerationRecord(TypedDict):
    id: str
    subset: str
    prompt: str
    reply: str
    reward: float | None  # None when no evaluator was set (predict without a reward model)


@dataclass(frozen=True)
class GenerationRow:
    """One row of a generations file, with where it came from (for error messages)."""

    id: str
    subset: str
    prompt: str
    reply: str
    reward: float | None
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.line}"


def write_generations(path: str | Path, records: Sequence[GenerationRecord]) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_generations(path: str | Path, need_rewards: bool = False) -> dict[str, GenerationRow]:
    """The rows of a generations file by id; a bad row is an error naming the file, line and field.
    ``need_rewards``: a row without a finite reward is an error too."""
    path = Path(path)
    rows: dict[str, GenerationRow] = {}
    try:
        handle = path.open(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot read generations file {path}: {err}") from err
    with handle:
        for number, text in enumerate(handle, start=1):
            if text.strip():
                row = _generation_row(text, f"{path}, line {number}", str(path), number, need_rewards)
                if row.id in rows:
                    raise ValueError(
                        f"{row.where}: id {row.id!r} appears twice (first on line {rows[row.id].line})"
                    )
                rows[row.id] = row
    if not rows:
        raise ValueError(f"{path}: the generations file holds no rows")
    return rows


def _generation_row(text: str, where: str, path: str, line: int, need_rewards: bool) -> GenerationRow:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in GENERATION_FIELDS:
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r}")
    row_id = record["id"]
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        raise ValueError(f"{where}: field 'id' must be a string, got {json.dumps(row_id)}")
    for name in GENERATION_FIELDS[1:]:
        if not isinstance(record[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {json.dumps(record[name])}")
    if record["subset"] == TOTAL:
        raise ValueError(f"{where}: a subset may not be called {TOTAL!r} (the name of the total row)")
    reward = record.get("reward")
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise ValueError(f"{where}: field 'reward' must be a number or null, got {json.dumps(reward)}")
        reward = float(reward)
    if need_rewards and (reward is None or not math.isfinite(reward)):
        raise ValueError(f"{where}: no reward (was it evaluated with a reward model?)")
    return GenerationRow(str(row_id), record["subset"], record["prompt"], record["reply"], reward, path, line)


def eval_paths(log_dir: str | Path, stage: str) -> dict[str, Path]:
    """Where one stage's files go: ``rewards`` (CSV), ``generations`` (JSONL), ``meta`` (JSON)."""
    root = Path(log_dir) / "eval"
    return {
        "rewards": root / f"{stage}_rewards.csv",
        "generations": root / f"{stage}_generations.jsonl",
        "meta": root / f"{stage}_meta.json",
    }


def write_eval_outputs(
    log_dir: str | Path,
    stage: str,
    rows: Sequence[RewardRow] | None,
    records: Sequence[GenerationRecord],
    meta: Mapping[str, Any],
) -> dict[str, Path]:
    """Write the table (when there are rewards), the generations and the metadata; return the paths."""
    paths = eval_paths(log_dir, stage)
    paths["rewards"].parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if rows is not None:
        with paths["rewards"].open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(RewardRow._fields)
            writer.writerows([r.subset, r.n, *(_rounded(v) for v in r[2:])] for r in rows)
        written["rewards"] = paths["rewards"]
    written["generations"] = write_generations(paths["generations"], records)
    paths["meta"].write_text(json.dumps(dict(meta), indent=2, default=str) + "\n", encoding="utf-8")
    written["meta"] = paths["meta"]
    return written


def _rounded(value: float | None) -> str:
    """A table cell: 4 decimals (rewards, shares, distinct-2; the generations file keeps full precision)."""
    if value is None:
        return ""
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def read_rewards_csv(path: str | Path) -> list[RewardRow]:
    """The rows of a ``<stage>_rewards.csv`` file; a malformed row is an error naming the file and line."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(RewardRow._fields)
        if (
            reader.fieldnames is None
            or reader.fieldnames != fields[: len(reader.fieldnames)]
            or len(reader.fieldnames) < 3
        ):
            raise ValueError(f"{path}: header {reader.fieldnames} is not {fields}")
        rows = []
        for line, record in enumerate(reader, start=2):
            try:
                extra = [float(record[f]) if record.get(f) not in (None, "") else None for f in fields[3:]]
                rows.append(
                    RewardRow(record["subset"], int(record["n"]), float(record["mean_reward"]), *extra)
                )
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}, line {line}: {error}") from error
    return rows
