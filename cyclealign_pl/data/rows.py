"""The prompt-row format every data module yields, and what the data modules share.

A row is one contextualised question: the dialogue so far rendered in the HH-RLHF format and ending with
``"\\n\\nAssistant:"`` (the white-box continues after it), plus the dataset's own chosen/rejected replies
where it has them. Batches are dicts of lists of strings; tokenisation is the model's job, so the same rows
serve any tokenizer and any judge. How rows are batched and served is in :mod:`cyclealign_pl.data.loaders`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, TypedDict

Speaker = Literal["Human", "Assistant"]
BATCH_KEYS: tuple[str, ...] = ("id", "subset", "prompt", "chosen", "rejected")


class Turn(NamedTuple):
    speaker: Speaker
    text: str


class PromptRow(TypedDict):
    id: str  # stable across runs: "<subset>:<split>:<line>" for HH-RLHF
    subset: str  # what evaluation reports are grouped by (HH-RLHF subset, BeaverTails category)
    prompt: str
    chosen: str  # "" where the dataset has no reference replies
    rejected: str


class DataFileError(ValueError):
    """A data file that cannot be read as promised; the message names the file (and line, when known)."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {problem}")


@dataclass
class CleaningStats:
    """What loading one source did to its rows: counts only, never text (the data holds harmful text)."""

    source: str
    rows: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    merged_turns: int = 0  # same-speaker turns merged into the previous turn (both sides of each pair)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "rows": self.rows,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "merged_turns": self.merged_turns,
        }

    def log(self, logger: logging.Logger) -> None:
        """One line per source; a warning when rows were dropped, so a drop is never silent."""
        level = logging.WARNING if self.dropped else logging.INFO
        logger.log(
            level,
            "%s: %d rows, kept %d, dropped %d %s, merged %d same-speaker turns",
            self.source,
            self.rows,
            self.kept,
            self.num_dropped,
            dict(sorted(self.dropped.items())),
            self.merged_turns,
        )


def render_prompt(context: Sequence[Turn]) -> str:
    """The canonical HH-RLHF text of ``context`` followed by the open assistant turn."""
    parts = [f"\n\n{t.speaker}: {t.text}" if t.text else f"\n\n{t.speaker}:" for t in context]
    return "".join(parts) + "\n\nAssistant:"


_SPEAKER_TAG = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_ROLES: dict[str, str] = {"Human": "user", "Assistant": "assistant"}


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    """A prompt row's dialogue as chat messages (``Human`` -> user, ``Assistant`` -> assistant), without the
    open assistant turn it ends with: what a chat template renders (``add_generation_prompt``). Text without
    speaker tags is one user message; text before the first tag joins the first message."""
    parts = _SPEAKER_TAG.split(prompt.strip("\n"))
    preamble, tags, bodies = parts[0].strip(), parts[1::2], [b.strip() for b in parts[2::2]]
    if not tags:
        return [{"role": "user", "content": preamble}]
    if tags[-1] == "Assistant" and not bodies[-1]:
        tags, bodies = tags[:-1], bodies[:-1]
    messages: list[dict[str, str]] = []
    for tag, body in zip(tags, bodies):
        role = _ROLES[tag]
        if messages and messages[-1]["role"] == role:  # same-speaker runs join, as the data cleaning does
            messages[-1]["content"] = "\n".join(t for t in (messages[-1]["content"], body) if t)
        else:
            messages.append({"role": role, "content": body})
    if preamble:
        if messages and messages[0]["role"] == "user":
            messages[0]["content"] = f"{preamble}\n{messages[0]['content']}".strip()
        else:
            messages.insert(0, {"role": "user", "content": preamble})
    return messages or [{"role": "user", "content": ""}]
