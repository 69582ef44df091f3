"""Your own prompts: a local JSONL, CSV or Parquet file, or a hub dataset by name, read with ``datasets``.

The prompt column holds either plain text (one user turn) or a conversation: a list of chat messages
(``{"role": "user"|"assistant"|"system", "content": ...}``, or ShareGPT's ``{"from", "value"}``). A
conversation becomes the dialogue so far in the HH-RLHF format the rest of the package reads
(:func:`~cyclealign_pl.data.rows.render_prompt`): consecutive turns of one speaker are merged, a system
message is put before the first user turn, and a final assistant message is the row's reference reply
(``chosen``), not part of the prompt. Text already in the HH format (``"Human: ..."``) is parsed as such.

Evaluation prompts come from ``eval_path`` (another file or hub dataset), else from ``eval_split`` of the same
hub dataset, else they are held out of the training data (a seeded partition). In every case no training
prompt is also an evaluation prompt. Rows without a usable prompt are counted per reason and logged, never
silent; a file where none is usable is an error naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetGenerationError

from cyclealign_pl.data.base import PromptDataModuleBase
from cyclealign_pl.data.hh_rlhf import merge_turns, parse_dialogue
from cyclealign_pl.data.rows import CleaningStats, DataFileError, PromptRow, Turn, render_prompt
from cyclealign_pl.hub import require_hub

log = logging.getLogger(__name__)

# file suffix -> the ``datasets`` builder that reads it (compressed variants are decompressed by datasets)
BUILDERS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
LOCAL_COPY = "--data.init_args.path <a local .jsonl, .csv or .parquet file>"
ROLES: dict[str, str] = {  # chat roles (OpenAI, ShareGPT) -> HH-RLHF speakers; "system" is handled apart
    "user": "Human",
    "human": "Human",
    "assistant": "Assistant",
    "gpt": "Assistant",
    "bot": "Assistant",
    "model": "Assistant",
}
DROP_REASONS: tuple[str, ...] = (
    "missing_prompt",  # null or absent
    "empty_prompt",  # no user text
    "bad_messages",  # a message that is not a {"role", "content"} object, or an unknown role
    "no_user_turn",  # a conversation without any user message
    "duplicate_prompt",  # same prompt as an earlier row of the same source
)


def _builder(path: Path) -> str | None:
    """The ``datasets`` builder for a file name (``data.jsonl.gz`` -> ``json``), None if unknown."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def is_local(source: str) -> bool:
    """A local file or directory (or a name that looks like a file), as opposed to a hub dataset name."""
    path = Path(source).expanduser()
    return path.exists() or _builder(path) is not None or source.startswith((".", "/", "~"))


def check_source(source: str, what: str) -> None:
    """A local source that does not exist, or has a suffix ``datasets`` cannot read, fails at once."""
    if not is_local(source):
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"{what} not found: {source} (a .jsonl, .csv or .parquet file, or a hub dataset name)"
        )
    if path.is_file() and _builder(path) is None:
        raise ValueError(
            f"{what} {source}: unknown file type {''.join(path.suffixes) or '(no suffix)'}; expected one of "
            f"{', '.join(BUILDERS)} (optionally compressed: {', '.join(COMPRESSED)})"
        )


def load_source(
    source: str, split: str, cache_dir: str | None = None, hub_config: str | None = None
) -> tuple[datasets.Dataset, str]:
    """The raw rows of a local file (one split), a local dataset directory, or a hub dataset's ``split``."""
    path = Path(source).expanduser()
    builder = _builder(path) if path.is_file() else None
    try:
        if builder is not None:
            raw = datasets.load_dataset(
                builder, data_files={"train": str(path)}, split="train", cache_dir=cache_dir
            )
            return raw, str(path)
        if not path.exists():
            require_hub(source, "dataset", LOCAL_COPY)
        raw = datasets.load_dataset(str(source), hub_config, split=split, cache_dir=cache_dir)
    except DatasetGenerationError as err:  # pandas/pyarrow's message says what is wrong
        raise DataFileError(source, f"cannot read: {err.__cause__ or err}".strip()) from err
    except ValueError as err:  # e.g. an unknown split: datasets names the available ones
        if "split" in str(err).lower():
            raise DataFileError(source, str(err)) from err
        raise
    return raw, f"{source}/{split}"


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def messages_to_turns(messages: Sequence[Any]) -> tuple[list[Turn], str] | str:
    """A chat conversation -> (alternating HH turns ending with a human turn, the final assistant reply).

    Returns a drop reason (one of :data:`DROP_REASONS`) instead when the conversation cannot be a prompt.
    """
    system: list[str] = []
    turns: list[Turn] = []
    for message in messages:
        if not isinstance(message, Mapping):
            return "bad_messages"
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if not isinstance(role, str) or not (content is None or isinstance(content, str)):
            return "bad_messages"
        role = role.strip().lower()
        if role == "system":
            system.append(_text(content))
        elif role in ROLES:
            turns.append(Turn(ROLES[role], _text(content)))  # type: ignore[arg-type]
        else:
            return "bad_messages"
    turns, _ = merge_turns(turns)
    reply = ""
    if turns and turns[-1].speaker == "Assistant":
        reply = turns.pop().text
    if not any(t.speaker == "Human" for t in turns):
        return "no_user_turn"
    if turns[0].speaker != "Human":  # the white box's format starts with the user
        turns.insert(0, Turn("Human", ""))
    preamble = "\n\n".join(s for s in system if s)
    if preamble:
        turns[0] = Turn("Human", "\n\n".join(t for t in (preamble, turns[0].text) if t))
    return turns, reply


def prompt_of(value: Any) -> tuple[str, str] | str:
    """A prompt column value -> (HH-format prompt, reference reply or ""), or a drop reason."""
    if value is None:
        return "missing_prompt"
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return "empty_prompt"
        if text.startswith(("Human:", "\n\nHuman:")):  # already a dialogue in the HH format
            turns = [t for t in parse_dialogue(text).turns]
            if turns and turns[-1] == Turn("Assistant", ""):
                turns.pop()
            converted = messages_to_turns([{"role": t.speaker.lower(), "content": t.text} for t in turns])
        else:
            return render_prompt([Turn("Human", text)]), ""
    elif isinstance(value, Sequence):
        converted = messages_to_turns(value)
    else:
        return "bad_messages"
    if isinstance(converted, str):
        return converted
    turns, reply = converted
    if not any(t.speaker == "Human" and t.text for t in turns):
        return "empty_prompt"
    return render_prompt(turns), reply


def clean_rows(
    raw: datasets.Dataset,
    source: str,
    *,
    prompt_column: str,
    name: str,
    subset_column: str | None = None,
    id_column: str | None = None,
) -> tuple[list[PromptRow], CleaningStats]:
    """Rows ``<name>:<index>`` (or the ``id_column``) in the ``subset_column``'s groups (or one, ``name``)."""
    columns = [c for c in (prompt_column, subset_column, id_column) if c is not None]
    missing = [c for c in columns if c not in raw.column_names]
    if missing:
        raise DataFileError(source, f"no column(s) {missing}; the columns are {raw.column_names}")
    stats = CleaningStats(source=source)
    seen: set[str] = set()
    rows: list[PromptRow] = []
    for index, record in enumerate(raw):
        stats.rows += 1
        result = prompt_of(record[prompt_column])
        if isinstance(result, str):
            stats.drop(result)
            continue
        prompt, reply = result
        if prompt in seen:
            stats.drop("duplicate_prompt")
            continue
        seen.add(prompt)
        subset = (
            _text(str(record[subset_column])) if subset_column and record[subset_column] is not None else ""
        )
        row_id = str(record[id_column]) if id_column and record[id_column] is not None else f"{name}:{index}"
        rows.append(PromptRow(id=row_id, subset=subset or name, prompt=prompt, chosen=reply, rejected=""))
    stats.kept = len(rows)
    stats.log(log)
    if not rows:
        reasons = dict(sorted(stats.dropped.items()))
        raise DataFileError(
            source,
            f"no usable prompts in column {prompt_column!r}: all {stats.rows} rows were dropped {reasons}",
        )
    return rows, stats


def _name(source: str) -> str:
    """A short name for a source: ``data/my_prompts.jsonl`` -> ``my_prompts``, ``org/set`` -> ``set``."""
    path = Path(source)
    if is_local(source):
        stem = path.name
        for suffix in reversed(path.suffixes):
            stem = stem.removesuffix(suffix)
        return stem or path.name
    return source.rstrip("/").rsplit("/", 1)[-1]


def _group(rows: Sequence[PromptRow]) -> dict[str, list[PromptRow]]:
    groups: dict[str, list[PromptRow]] = {}
    for row in rows:
        groups.setdefault(row["subset"], []).append(row)
    return groups


class PromptDataModule(PromptDataModuleBase):
    """Your own prompts for ``fit`` (training) and ``validate``/``test``/``predict`` (evaluation).

    Args:
        path: a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file (optionally ``.gz``), a local dataset
            directory, or a hub dataset name (``org/name``, loaded with ``datasets.load_dataset``).
        prompt_column: the column with the prompt: plain text, or a list of chat messages.
        split: the hub dataset's training split (a local file has one).
        eval_path: evaluation prompts from another file or hub dataset (its ``eval_split``).
        eval_split: the hub split of the evaluation prompts (of ``eval_path``, else of ``path``); with neither
            ``eval_path`` nor ``eval_split`` the evaluation prompts are held out of the training data.
        hub_config: the hub dataset's configuration name, if it has several.
        subset_column: a column to report evaluation rewards by (e.g. a category); None: one group, ``name``.
        id_column: a column of stable row ids; None: ``<name>:<row index>``.
        name: the group's name in evaluation tables and row ids (default: the file's or dataset's name).
        num_train_prompts: training prompts drawn (seeded); None: all.
        eval_prompts_per_subset: evaluation prompts drawn per group (seeded); None: all of an evaluation
            source (held out of the training data, a number is needed).
    """

    def __init__(
        self,
        path: str,
        prompt_column: str = "prompt",
        split: str = "train",
        eval_path: str | None = None,
        eval_split: str | None = None,
        hub_config: str | None = None,
        subset_column: str | None = None,
        id_column: str | None = None,
        name: str | None = None,
        num_train_prompts: int | None = None,
        eval_prompts_per_subset: int | None = 100,
        batch_size: int = 1,
        eval_batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, num_workers, cache_dir)
        check_source(path, "prompt file")
        if eval_path is not None:
            check_source(eval_path, "evaluation prompt file")
        for what, value in (
            ("num_train_prompts", num_train_prompts),
            ("eval_prompts_per_subset", eval_prompts_per_subset),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{what} must be >= 1 or None (all), got {value}")
        if eval_split is not None and eval_path is None and Path(path).expanduser().is_file():
            raise ValueError(
                f"eval_split={eval_split!r}: the file {path} has one split; give the evaluation prompts as "
                "eval_path, or leave eval_split unset to hold some out of the training data"
            )
        held_out = eval_path is None and eval_split is None
        if held_out and eval_prompts_per_subset is None:
            raise ValueError(
                "eval_prompts_per_subset=None (all) needs evaluation prompts of their own (eval_path or "
                "eval_split): held out of the training data, say how many"
            )
        self.save_hyperparameters()
        self.path = path
        self.prompt_column = prompt_column
        self.split = split
        self.eval_path = eval_path
        self.eval_split = eval_split
        self.hub_config = hub_config
        self.subset_column = subset_column
        self.id_column = id_column
        self._given_name = name
        self.name = name or _name(path)
        self.num_train_prompts = num_train_prompts
        self.eval_prompts_per_subset = eval_prompts_per_subset
        self.held_out = held_out
        self._loaded: dict[tuple[str, str], list[PromptRow]] = {}

    def _rows(self, source: str, split: str) -> list[PromptRow]:
        if (source, split) not in self._loaded:
            raw, where = load_source(source, split, self.cache_dir, self.hub_config)
            name = self._given_name or _name(source)
            rows, stats = clean_rows(
                raw,
                where,
                prompt_column=self.prompt_column,
                name=name,
                subset_column=self.subset_column,
                id_column=self.id_column,
            )
            if source != self.path or split != self.split:  # ids unique across training and evaluation
                rows = [PromptRow(**{**row, "id": f"{row['id']}@{split}"}) for row in rows]  # type: ignore[typeddict-item]
            self._loaded[source, split] = rows
            self._stats[where] = stats
        return self._loaded[source, split]

    def _eval_source(self) -> tuple[str, str]:
        if self.eval_path is not None:
            return self.eval_path, self.eval_split or "test"
        if self.eval_split is not None:
            return self.path, self.eval_split
        return self.path, self.split

    def prepare_data(self) -> None:
        """Download hub datasets once per node (local files need nothing)."""
        for source, split in {(self.path, self.split), self._eval_source()}:
            if not is_local(source):
                require_hub(source, "dataset", LOCAL_COPY)
                datasets.load_dataset(source, self.hub_config, split=split, cache_dir=self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load what ``stage`` needs: the training prompts only for ``fit`` (or no stage)."""
        if not self._select_rows(
            stage,
            lambda: _group(self._rows(*self._eval_source())),
            lambda: {self.name: self._rows(self.path, self.split)},
            num_train=self.num_train_prompts,
            eval_per_subset=self.eval_prompts_per_subset,
        ):
            return
        log.info(
            "prompts: %s training, %d evaluation (%s)",
            len(self.train_rows) if self.train_rows is not None else "no",
            len(self.eval_rows),
            "held out of the training data" if self.held_out else "from {}/{}".format(*self._eval_source()),
        )
