"""Anthropic HH-RLHF: dialogue cleaning, loading through ``datasets``, prompt sampling, a LightningDataModule.

Cleaning follows the preprocessing the paper cites (OpenAssistant's ``AnthropicRLHF``, reused by PRO), with a
few differences on purpose (docs/method.md); every dropped pair is counted per reason and logged. The prompt
is the context rendered back in the canonical format, ending with ``"\n\nAssistant:"``.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import datasets

from cyclealign_pl.data.base import PromptDataModuleBase
from cyclealign_pl.data.rows import (
    CleaningStats,
    DataFileError,
    PromptRow,
    Turn,
    render_prompt,
)
from cyclealign_pl.hub import require_hub

log = logging.getLogger(__name__)

SUBSETS: tuple[str, ...] = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HUB_NAME = "Anthropic/hh-rlhf"
LOCAL_COPY = "--data.init_args.root <a directory in the upstream layout>"
# The shipped sample: the first 300 rows of harmless-base/test, upstream layout (see samples/README.md).
SAMPLE_ROOT = Path(__file__).resolve().parent / "samples" / "hh-rlhf"

DROP_REASONS: tuple[str, ...] = (
    "missing_field",  # chosen or rejected absent or null
    "no_assistant_turn",
    "text_before_first_turn",  # text before the first speaker tag
    "first_turn_not_human",
    "final_turn_not_assistant",
    "context_mismatch",  # chosen and rejected differ before their final replies
    "empty_prompt",  # no human text in the context
    "empty_chosen",
    "empty_rejected",
    "reply_starts_with_speaker_tag",  # "\n\nAssistant: Human: ..." - the assistant reply is empty
    "duplicate_prompt",  # same prompt as an earlier row of the same file
)

_TURN_TAG = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_LEADING_TAG = re.compile(r"(?:Human|Assistant):")


# --------------------------------------------------------------------------------------------- cleaning


class Dialogue(NamedTuple):
    """Alternating turns, how many same-speaker turns were merged into them, and any text before turn 1."""

    turns: tuple[Turn, ...]
    merged_turns: int
    preamble: str


def split_turns(text: str) -> tuple[str, list[Turn]]:
    """Text before the first speaker tag, and the turns in order (stripped, not merged)."""
    parts = _TURN_TAG.split(text.lstrip())
    preamble, tags, bodies = parts[0].strip(), parts[1::2], parts[2::2]
    return preamble, [Turn(tag, body.strip()) for tag, body in zip(tags, bodies)]


def merge_turns(turns: Iterable[Turn]) -> tuple[list[Turn], int]:
    """Consecutive turns of one speaker joined by a newline (as OpenAssistant does), and the merge count."""
    merged: list[Turn] = []
    count = 0
    for turn in turns:
        if merged and merged[-1].speaker == turn.speaker:
            count += 1
            previous = merged[-1].text
            merged[-1] = Turn(turn.speaker, "\n".join(t for t in (previous, turn.text) if t))
        else:
            merged.append(turn)
    return merged, count


def parse_dialogue(text: str) -> Dialogue:
    """Split an HH-RLHF dialogue on its speaker tags and merge same-speaker runs."""
    preamble, turns = split_turns(text)
    merged, count = merge_turns(turns)
    return Dialogue(tuple(merged), count, preamble)


class CleanPair(NamedTuple):
    prompt: str  # context in canonical HH format, ending with "\n\nAssistant:"
    chosen: str
    rejected: str


@dataclass(frozen=True)
class CleanResult:
    """The cleaned pair, or ``None`` and the reason (one of :data:`DROP_REASONS`)."""

    pair: CleanPair | None
    reason: str | None
    merged_turns: int


def clean_pair(chosen: str, rejected: str) -> CleanResult:
    """Clean one chosen/rejected pair of full dialogues into (prompt, chosen reply, rejected reply)."""
    a, b = parse_dialogue(chosen), parse_dialogue(rejected)
    merges = a.merged_turns + b.merged_turns

    def dropped(reason: str) -> CleanResult:
        return CleanResult(None, reason, merges)

    if not all(any(t.speaker == "Assistant" for t in d.turns) for d in (a, b)):
        return dropped("no_assistant_turn")
    if a.preamble or b.preamble:
        return dropped("text_before_first_turn")
    if a.turns[0].speaker != "Human" or b.turns[0].speaker != "Human":
        return dropped("first_turn_not_human")
    if a.turns[-1].speaker != "Assistant" or b.turns[-1].speaker != "Assistant":
        return dropped("final_turn_not_assistant")
    context = a.turns[:-1]
    if context != b.turns[:-1]:
        return dropped("context_mismatch")
    if not any(t.speaker == "Human" and t.text for t in context):
        return dropped("empty_prompt")
    chosen_reply, rejected_reply = a.turns[-1].text, b.turns[-1].text
    if not chosen_reply:
        return dropped("empty_chosen")
    if not rejected_reply:
        return dropped("empty_rejected")
    if _LEADING_TAG.match(chosen_reply) or _LEADING_TAG.match(rejected_reply):
        return dropped("reply_starts_with_speaker_tag")
    return CleanResult(CleanPair(render_prompt(context), chosen_reply, rejected_reply), None, merges)


# ---------------------------------------------------------------------------------------------- loading


def split_file(root: str | Path, subset: str, split: str) -> Path:
    """``<root>/<subset>/<split>.jsonl.gz`` (upstream layout) or ``.jsonl``; an error naming it if absent."""
    base = Path(root) / subset
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (base / name).is_file():
            return base / name
    hint = ""
    if Path(root).resolve() == SAMPLE_ROOT:
        hint = (
            " (the packaged sample ships only harmless-base/test; set train_split='test' to draw disjoint "
            "training and evaluation prompts from it, or point root at the full HH-RLHF data)"
        )
    raise FileNotFoundError(f"HH-RLHF file not found: {base / (split + '.jsonl.gz')}{hint}")


def scan_jsonl(path: str | Path) -> list[int]:
    """Check that every line of a (gzipped) JSON-lines file is a JSON object; return the rows' line numbers.

    ``datasets`` skips blank lines and reports broken files without a line number; this pass names the
    file and line of the first problem, and maps row index -> line for stable row ids.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    lines: list[int] = []
    line_no = 0
    try:
        with opener(path, "rb") as fh:  # bytes, decoded line by line: an error names its own line
            for line_no, data in enumerate(fh, start=1):
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataFileError(
                        path, f"not UTF-8 ({err.reason} at byte {err.start + 1})", line_no
                    ) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    problem = f"invalid JSON ({err.msg}, column {err.colno})"
                    raise DataFileError(path, problem, line_no) from None
                if not isinstance(record, dict):
                    raise DataFileError(path, f"expected a JSON object, got {type(record).__name__}", line_no)
                for key in ("chosen", "rejected"):
                    value = record.get(key)
                    if value is not None and not isinstance(value, str):
                        problem = f"field {key!r} must be a string, got {type(value).__name__}"
                        raise DataFileError(path, problem, line_no)
                    if value and not _is_text(value):
                        problem = f"field {key!r} holds a lone surrogate escape (e.g. \\ud800): not text"
                        raise DataFileError(path, problem, line_no)
                lines.append(line_no)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError; truncation an EOFError
        raise DataFileError(path, f"cannot read ({type(err).__name__}: {err})", line_no + 1) from err
    if not lines:
        raise DataFileError(path, "no rows (the file is empty)")
    return lines


def _is_text(value: str) -> bool:
    """False for a string with a lone UTF-16 surrogate (JSON's ``"\\ud800"``), which no tokenizer or file
    can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_raw(
    root: str | Path | None, subset: str, split: str, cache_dir: str | None = None
) -> tuple[datasets.Dataset, list[int], str]:
    """The raw chosen/rejected rows of one subset and split, their line numbers, and where they came from.

    With a ``root``, the local file is checked by :func:`scan_jsonl` and read with the ``json`` builder;
    without one, the hub dataset is loaded (``data_dir=<subset>``). Both give the same columns, so what
    follows is one code path.
    """
    if root is None:
        require_hub(HUB_NAME, "dataset", LOCAL_COPY)
        raw = datasets.load_dataset(HUB_NAME, data_dir=subset, split=split, cache_dir=cache_dir)
        return raw, list(range(1, len(raw) + 1)), f"{HUB_NAME}/{subset}/{split}"
    path = split_file(root, subset, split)
    raw, lines = load_file(path, cache_dir)
    return raw, lines, str(path)


def load_file(path: str | Path, cache_dir: str | None = None) -> tuple[datasets.Dataset, list[int]]:
    """One local chosen/rejected JSON-lines file (gzipped or not), checked by :func:`scan_jsonl`, and the
    line number of each row."""
    lines = scan_jsonl(path)
    raw = datasets.load_dataset("json", data_files={"train": str(path)}, split="train", cache_dir=cache_dir)
    if len(raw) != len(lines):
        raise DataFileError(path, f"datasets read {len(raw)} rows where there are {len(lines)} JSON lines")
    return raw, lines


def clean_rows(
    raw: datasets.Dataset, lines: Sequence[int], subset: str, split: str, source: str
) -> tuple[list[PromptRow], CleaningStats]:
    """Cleaned rows with ids ``<subset>:<split>:<line>``, and the counts of what was dropped and merged."""
    stats = CleaningStats(source=source)
    columns = set(raw.column_names)
    seen_prompts: set[str] = set()
    rows: list[PromptRow] = []
    for line, record in zip(lines, raw):
        stats.rows += 1
        chosen = record.get("chosen") if "chosen" in columns else None
        rejected = record.get("rejected") if "rejected" in columns else None
        if chosen is None or rejected is None:
            stats.drop("missing_field")
            continue
        result = clean_pair(chosen, rejected)
        stats.merged_turns += result.merged_turns
        if result.pair is None:
            stats.drop(result.reason or "unknown")
            continue
        if result.pair.prompt in seen_prompts:
            stats.drop("duplicate_prompt")
            continue
        seen_prompts.add(result.pair.prompt)
        rows.append(
            PromptRow(
                id=f"{subset}:{split}:{line}",
                subset=subset,
                prompt=result.pair.prompt,
                chosen=result.pair.chosen,
                rejected=result.pair.rejected,
            )
        )
    stats.kept = len(rows)
    stats.log(log)
    return rows, stats


def load_hh_rlhf(
    root: str | Path | None, subset: str, split: str, cache_dir: str | None = None
) -> tuple[list[PromptRow], CleaningStats]:
    """Load and clean one subset and split of HH-RLHF (local upstream layout; the hub if root is None)."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown HH-RLHF subset {subset!r}; expected one of {', '.join(SUBSETS)}")
    raw, lines, source = load_raw(root, subset, split, cache_dir)
    return clean_rows(raw, lines, subset, split, source)


# --------------------------------------------------------------------------------------------- sampling


# ------------------------------------------------------------------------------------------- DataModule


class HHRLHFDataModule(PromptDataModuleBase):
    """HH-RLHF prompts for CycleAlign: K seeded training prompts, per-subset evaluation prompts.

    Batches are ``{"id", "subset", "prompt", "chosen", "rejected"}``, each a list of strings. ``root`` is a
    directory in the upstream layout ``<root>/<subset>/{train,test}.jsonl.gz`` (default: the 300-row
    sample shipped in the package, which has only ``harmless-base/test``, so use ``train_split="test"``
    with it); ``root=None`` loads the hub dataset ``Anthropic/hh-rlhf``.

    When ``train_split == eval_split`` the evaluation prompts are drawn first and the training prompts from
    the rest (seeded partition); in every case no training prompt text is an evaluation prompt.

    ``total_weighting`` says how the evaluation's ``total`` row averages the subsets: ``"prompts"`` (each
    evaluated prompt counts once) or ``"subset_size"`` (each subset's mean weighted by the number of rows of
    its full evaluation split, as the paper's Table 1 Total is: 2,312 / 2,354 / 1,137 / 2,749 test rows), so
    that a sample of equally many prompts per subset still estimates the paper's Total.
    """

    def __init__(
        self,
        root: str | None = str(SAMPLE_ROOT),
        subsets: Sequence[str] = ("harmless-base",),
        train_split: str = "train",
        eval_split: str = "test",
        num_train_prompts: int | None = 1000,
        eval_prompts_per_subset: int | None = 100,
        batch_size: int = 1,
        eval_batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        total_weighting: Literal["prompts", "subset_size"] = "prompts",
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, num_workers, cache_dir)
        if total_weighting not in ("prompts", "subset_size"):
            raise ValueError(f"total_weighting must be 'prompts' or 'subset_size', got {total_weighting!r}")
        subsets = list(subsets)
        if not subsets:
            raise ValueError("subsets must name at least one HH-RLHF subset")
        unknown = [s for s in subsets if s not in SUBSETS]
        if unknown:
            raise ValueError(
                f"unknown HH-RLHF subset(s) {unknown}; expected some of {list(SUBSETS)} "
                "(your own prompts: cyclealign_pl.data.prompts.PromptDataModule, configs/prompts.yaml)"
            )
        if len(set(subsets)) != len(subsets):
            raise ValueError(f"subsets has duplicates: {subsets}")
        for name, value in (
            ("num_train_prompts", num_train_prompts),
            ("eval_prompts_per_subset", eval_prompts_per_subset),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None (all), got {value}")
        if root is not None and not Path(root).is_dir():
            raise ValueError(f"HH-RLHF root directory not found: {root}")
        self.save_hyperparameters()
        self.root = root
        self.subsets = subsets
        self.train_split = train_split
        self.eval_split = eval_split
        self.num_train_prompts = num_train_prompts
        self.eval_prompts_per_subset = eval_prompts_per_subset
        self.total_weighting = total_weighting
        self._loaded: dict[tuple[str, str], list[PromptRow]] = {}

    def prepare_data(self) -> None:
        """Download the hub files once per node (local roots need nothing)."""
        if self.root is None:
            require_hub(HUB_NAME, "dataset", LOCAL_COPY)
            for subset in self.subsets:
                for split in {self.train_split, self.eval_split}:
                    datasets.load_dataset(HUB_NAME, data_dir=subset, split=split, cache_dir=self.cache_dir)

    def _split_rows(self, split: str) -> dict[str, list[PromptRow]]:
        for subset in self.subsets:
            if (subset, split) not in self._loaded:
                rows, stats = load_hh_rlhf(self.root, subset, split, self.cache_dir)
                if not rows:  # say why here, not later as "no prompts left"
                    reasons = dict(sorted(stats.dropped.items()))
                    raise DataFileError(
                        stats.source,
                        f"no usable rows: all {stats.rows} were dropped {reasons}; "
                        "each row needs 'chosen' and 'rejected' dialogues in the HH-RLHF format "
                        "with a non-empty human turn and a final assistant reply",
                    )
                self._loaded[subset, split] = rows
                self._stats[f"{subset}/{split}"] = stats
        return {subset: self._loaded[subset, split] for subset in self.subsets}

    def setup(self, stage: str | None = None) -> None:
        """Load and clean what ``stage`` needs; training prompts only for ``fit`` (or no stage)."""
        if not self._select_rows(
            stage,
            lambda: self._split_rows(self.eval_split),
            lambda: self._split_rows(self.train_split),
            num_train=self.num_train_prompts,
            eval_per_subset=self.eval_prompts_per_subset,
        ):
            return
        num_train = len(self.train_rows) if self.train_rows is not None else "no"
        log.info(
            "HH-RLHF prompts: %s training, %d evaluation over %s",
            num_train,
            len(self.eval_rows),
            self.subsets,
        )

    def subset_weights(self) -> dict[str, float] | None:
        """The evaluation total's subset weights (None: every prompt counts once); see ``total_weighting``."""
        if self.total_weighting == "prompts":
            return None
        self._split_rows(self.eval_split)
        return {subset: float(self._stats[f"{subset}/{self.eval_split}"].rows) for subset in self.subsets}
