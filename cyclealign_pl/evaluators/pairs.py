"""The human preference pairs the evaluator learns from, split so that no run's prompt is ever trained on.

HH-RLHF's harmless-base test split has 2,312 chosen/rejected pairs; the package ships them in two files:

* lines 1-300 in ``data/samples`` (``SAMPLE_ROOT``): the prompts that CycleAlign runs draw their training
  *and* evaluation prompts from. The evaluator never trains on them; their pairs are its held-out test set;
* lines 301-2,312 here (``PAIRS_ROOT``): the evaluator's training and validation pairs.

HH-RLHF holds several dialogues that open with the same human request, so a prompt is identified by its
*first human turn* (lower-cased, whitespace collapsed): a pair is trained on only if no reserved row opens the
same way, and training and validation are split by that key (seeded hash), never by row.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from cyclealign_pl.data.hh_rlhf import SAMPLE_ROOT, clean_rows, load_file, load_raw, parse_dialogue
from cyclealign_pl.data.rows import DataFileError, PromptRow

log = logging.getLogger(__name__)

PAIRS_ROOT = Path(__file__).resolve().parent / "data" / "hh-rlhf"
PAIRS_SPLIT = "test-from-line-301"  # lines 301-2,312 of harmless-base/test.jsonl.gz, byte for byte
FIRST_LINE = 301
SUBSET = "harmless-base"
BUILTIN_PAIRS = "builtin:hh-harmless-base"  # the shipped pairs' validation split (labelled_pairs)


def prompt_key(prompt: str) -> str:
    """What identifies a prompt across rows: its first human turn, lower-cased, whitespace collapsed."""
    turns = parse_dialogue(prompt).turns
    first = next((turn.text for turn in turns if turn.speaker == "Human"), prompt)
    return " ".join(first.lower().split())


def load_training_pairs() -> list[PromptRow]:
    """The shipped pairs of lines 301-2,312, cleaned as every HH-RLHF row is, ids by upstream line."""
    raw, lines, source = load_raw(PAIRS_ROOT, SUBSET, PAIRS_SPLIT)
    upstream = [line + FIRST_LINE - 1 for line in lines]
    rows, _ = clean_rows(raw, upstream, SUBSET, "test", source)
    return rows


def load_reserved_pairs() -> list[PromptRow]:
    """The pairs of lines 1-300 (the runs' prompts): the evaluator's held-out test pairs."""
    raw, lines, source = load_raw(SAMPLE_ROOT, SUBSET, "test")
    rows, _ = clean_rows(raw, lines, SUBSET, "test", source)
    return rows


class PairSplit(NamedTuple):
    train: list[PromptRow]
    validation: list[PromptRow]
    excluded: list[PromptRow]  # rows whose prompt opens like a reserved row's: never used


def _hash_fraction(text: str) -> float:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_pairs(
    rows: Sequence[PromptRow],
    reserved: Iterable[PromptRow],
    validation_fraction: float = 0.15,
    seed: int = 0,
) -> PairSplit:
    """Train/validation by prompt key (seeded hash), without every row whose key is a reserved row's."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    reserved_keys = {prompt_key(row["prompt"]) for row in reserved}
    split = PairSplit([], [], [])
    for row in rows:
        key = prompt_key(row["prompt"])
        if key in reserved_keys:
            split.excluded.append(row)
        elif _hash_fraction(f"{seed}:{key}") < validation_fraction:
            split.validation.append(row)
        else:
            split.train.append(row)
    log.info(
        "evaluator pairs: %d train, %d validation, %d excluded (their prompt opens like a run's prompt)",
        len(split.train),
        len(split.validation),
        len(split.excluded),
    )
    return split


def key_digest(key: str) -> str:
    """A prompt key as the head's card lists it: the first 16 hex digits of its sha256 (no words)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def overlapping_ids(trained_keys: Iterable[str], rows: Iterable[PromptRow]) -> list[str]:
    """The ids of ``rows`` whose prompt the evaluator was trained on (``trained_keys``: the card's digests);
    must be empty for a fair figure."""
    keys = set(trained_keys)
    return [row["id"] for row in rows if key_digest(prompt_key(row["prompt"])) in keys]


def labelled_pairs(source: str, count: int, max_chars: int | None = None) -> list[PromptRow]:
    """The first ``count`` human-labelled pairs whose texts all fit ``max_chars`` characters.

    ``builtin:hh-harmless-base`` is the shipped pairs' validation split: no run's prompt opens like them and
    the evaluator never trained on them. Anything else is the path of an HH-RLHF-format JSON-lines file
    (``chosen``/``rejected`` dialogues, gzipped or not).
    """
    if source == BUILTIN_PAIRS:
        cleaning = logging.getLogger(clean_rows.__module__)
        level = cleaning.level
        cleaning.setLevel(logging.ERROR)  # the shipped files' known drops are not the user's to act on
        try:
            rows = split_pairs(load_training_pairs(), load_reserved_pairs()).validation
        finally:
            cleaning.setLevel(level)
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(f"no file of labelled pairs at {source} (or use {BUILTIN_PAIRS})")
        raw, lines = load_file(source)
        rows, _ = clean_rows(raw, lines, "pairs", "check", source)
    fitting = [
        row
        for row in rows
        if max_chars is None or max(len(row["prompt"]), len(row["chosen"]), len(row["rejected"])) <= max_chars
    ]
    if len(fitting) < count:
        problem = f"{len(fitting)} labelled pairs whose texts fit {max_chars} characters, {count} asked"
        raise DataFileError(source, problem)
    return fitting[:count]
