"""``python -m cyclealign_pl compare A.jsonl B.jsonl``: pairwise win rates of two runs (paper Table 2).

A judge LLM compares the two runs' replies, prompt by prompt, through a :class:`ChatClient` (its preflight,
budget, cache and retries apply). The order shown comes from a hash of the seed and the id, so a rerun sends
the same requests (and hits the cache). Inputs, outcomes and output files: docs/commands.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ActionYesNo

from cyclealign_pl.cli_parser import OneLineParser
from cyclealign_pl.commands import fail, parser_names
from cyclealign_pl.evaluation.files import TOTAL, GenerationRow, read_generations
from cyclealign_pl.judges.base import JudgeStop
from cyclealign_pl.judges.chat import ChatClient
from cyclealign_pl.judges.pairwise import (
    Verdict,
    build_pairwise_messages,
    load_pairwise_template,
    parse_verdict,
    verdict_schema,
)
from cyclealign_pl.judges.prompt import RankingTemplate
from cyclealign_pl.judges.request import ChatReply
from cyclealign_pl.judges.settings import ChatSettings
from cyclealign_pl.judges.structured import STRUCTURED_OUTPUT_FORMS
from cyclealign_pl.signals import EXIT_STOPPED  # as fit: a deliberate stop (budget spent, bad key)

log = logging.getLogger(__name__)
_VERDICT_OVERHEAD_TOKENS = 16  # '{"reasoning": "', '", "verdict": "TIE"}' in tokens at most


Outcome = Literal["win", "tie", "lose", "invalid", "failed"]


# ------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Pairing:
    """The two runs joined on id: the pairs (in run A's order) and the ids found in one run only."""

    pairs: list[tuple[GenerationRow, GenerationRow]]
    only_a: list[GenerationRow]
    only_b: list[GenerationRow]


def join_runs(rows_a: Mapping[str, GenerationRow], rows_b: Mapping[str, GenerationRow]) -> Pairing:
    """Pair the rows with the same id; the same id with another prompt or subset is an error naming it."""
    pairs = []
    for row_id, a in rows_a.items():
        b = rows_b.get(row_id)
        if b is None:
            continue
        for name in ("prompt", "subset"):
            if getattr(a, name) != getattr(b, name):
                raise ValueError(
                    f"id {row_id!r} has different {name}s in {a.where} and {b.where}: the two runs were not "
                    "evaluated on the same data"
                )
        pairs.append((a, b))
    only_a = [a for row_id, a in rows_a.items() if row_id not in rows_b]
    only_b = [b for row_id, b in rows_b.items() if row_id not in rows_a]
    if not pairs:
        raise ValueError("the two generations files have no id in common: nothing to compare")
    return Pairing(pairs, only_a, only_b)


def shows_b_first(row_id: str, seed: int) -> bool:
    """The coin ordering one comparison: a hash of the seed and the id, so a rerun sends the same request."""
    return hashlib.sha256(f"{seed}\0{row_id}".encode()).digest()[0] & 1 == 1


# ----------------------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Comparison:
    """One id's judgment: for run A (``outcome``), and as the judge saw it (``b_first``, ``verdict``)."""

    id: str
    subset: str
    outcome: Outcome
    b_first: bool
    verdict: Verdict | None = None  # in the order shown: "A" is the reply shown first
    failure: str | None = None
    reasoning: str | None = None
    judge_reply: str | None = None  # kept for invalid judgments only, to see what went wrong


def _outcome(verdict: Verdict, b_first: bool) -> Outcome:
    if verdict == "TIE":
        return "tie"
    first_won = verdict == "A"
    return "win" if first_won != b_first else "lose"


def compare_pairs(
    client: ChatClient,
    pairing: Pairing,
    *,
    reasoning: bool = True,
    seed: int = 0,
    template: RankingTemplate | None = None,
    batch_size: int = 256,
    structured_output: str = "auto",
) -> list[Comparison]:
    """Ask the judge (through ``client``) about every pair, ``batch_size`` calls at a time, concurrently
    within a batch; with ``structured_output`` (not ``off``) the verdict is asked as JSON following
    :func:`verdict_schema`, in the strongest form the server takes (``auto``: OpenAI's first)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if structured_output not in ("auto", *STRUCTURED_OUTPUT_FORMS):
        raise ValueError(
            f"structured_output must be auto, json_schema, json_object or off, got {structured_output!r}"
        )
    template = template or load_pairwise_template()
    orders = [shows_b_first(a.id, seed) for a, _ in pairing.pairs]
    messages = [
        build_pairwise_messages(
            a.prompt,
            *((b.reply, a.reply) if b_first else (a.reply, b.reply)),
            reasoning=reasoning,
            template=template,
        )
        for (a, b), b_first in zip(pairing.pairs, orders)
    ]
    schema = None
    if structured_output != "off":
        max_tokens = client.settings.max_tokens
        room = None if max_tokens is None else max(16, max_tokens - _VERDICT_OVERHEAD_TOKENS)
        schema = verdict_schema(reasoning, room)
    first = "json_schema" if structured_output == "auto" else structured_output
    replies = _ask(client, messages, batch_size, template.version, schema, first)
    out = [
        _judgment(a, b_first, reply, reasoning)
        for (a, _), b_first, reply in zip(pairing.pairs, orders, replies)
    ]
    bad = sum(c.outcome in ("invalid", "failed") for c in out)
    if bad:
        log.warning("%d of %d comparisons have no valid verdict (see the comparisons file)", bad, len(out))
    return out


def _ask(
    client: ChatClient,
    messages: list[list[dict[str, str]]],
    batch_size: int,
    template_version: str,
    schema: dict[str, object] | None,
    structured_output: str,
) -> list[ChatReply]:
    """The judge's replies, batch by batch; a stop says how many were done and where they are cached."""
    replies: list[ChatReply] = []
    for start in range(0, len(messages), batch_size):
        try:
            replies += client.complete(
                messages[start : start + batch_size],
                template_version=template_version,
                schema=schema,
                structured_output=structured_output,
            )
        except JudgeStop as stop:
            cache = client.settings.cache_path
            where = f"; the replies received are cached in {cache}" if cache else ""
            done = f"stopped with {len(replies)} of {len(messages)} comparisons done{where}"
            raise type(stop)(f"{stop} ({done})") from stop
        log.info("%d of %d comparisons answered", len(replies), len(messages))
    return replies


def _judgment(a: GenerationRow, b_first: bool, reply: ChatReply, reasoning: bool) -> Comparison:
    """One reply of the judge as run A's outcome (``failed``: no reply; ``invalid``: no readable verdict)."""
    if reply.text is None:
        return Comparison(a.id, a.subset, "failed", b_first, failure=reply.reason)
    parsed = parse_verdict(reply.text)
    kept_reasoning = parsed.reasoning if reasoning else None
    if parsed.verdict is None:
        return Comparison(
            a.id,
            a.subset,
            "invalid",
            b_first,
            failure=parsed.failure,
            reasoning=kept_reasoning,
            judge_reply=reply.text,
        )
    outcome = _outcome(parsed.verdict, b_first)
    return Comparison(a.id, a.subset, outcome, b_first, parsed.verdict, reasoning=kept_reasoning)


# ------------------------------------------------------------------------------------------------ table


@dataclass(frozen=True)
class WinRateRow:
    """One row of Table 2: a subset (or ``total``), its counts, and run A's win/tie/lose % over valid ones."""

    subset: str
    compared: int = 0
    win: int = 0
    tie: int = 0
    lose: int = 0
    invalid: int = 0
    failed: int = 0
    only_a: int = 0
    only_b: int = 0

    @property
    def valid(self) -> int:
        return self.win + self.tie + self.lose

    def percent(self, count: int) -> float:
        """``count`` as a percentage of the valid judgments (NaN when there are none)."""
        return 100.0 * count / self.valid if self.valid else math.nan

    @property
    def win_pct(self) -> float:
        return self.percent(self.win)

    @property
    def tie_pct(self) -> float:
        return self.percent(self.tie)

    @property
    def lose_pct(self) -> float:
        return self.percent(self.lose)


COLUMNS = (
    "subset",
    "compared",
    "win",
    "tie",
    "lose",
    "invalid",
    "failed",
    "win_pct",
    "tie_pct",
    "lose_pct",
    "only_a",
    "only_b",
)


def tally(comparisons: Sequence[Comparison], pairing: Pairing) -> list[WinRateRow]:
    """The rows per subset (subsets of the compared ids first, in run A's order) and the ``total`` row."""
    subsets = [row.subset for pair in pairing.pairs for row in pair[:1]]
    subsets += [row.subset for row in (*pairing.only_a, *pairing.only_b)]
    counts: dict[str, Counter[str]] = {subset: Counter() for subset in subsets}
    for c in comparisons:
        counts[c.subset].update(("compared", c.outcome))
    for name, missing in (("only_a", pairing.only_a), ("only_b", pairing.only_b)):
        for row in missing:
            counts[row.subset][name] += 1
    rows = [WinRateRow(subset, **values) for subset, values in counts.items()]
    total = Counter[str]()
    for values in counts.values():
        total.update(values)
    return [*rows, WinRateRow(TOTAL, **total)]


def _cells(row: WinRateRow, digits: int | None) -> list[str]:
    def pct(value: float) -> str:
        if math.isnan(value):
            return "nan"
        return repr(value) if digits is None else f"{value:.{digits}f}"

    return [
        row.subset,
        *(str(getattr(row, name)) for name in COLUMNS[1:7]),
        pct(row.win_pct),
        pct(row.tie_pct),
        pct(row.lose_pct),
        str(row.only_a),
        str(row.only_b),
    ]


def format_table(rows: Iterable[WinRateRow]) -> str:
    """The rows as an aligned text table (percentages with one decimal)."""
    body = [list(COLUMNS), *(_cells(row, 1) for row in rows)]
    widths = [max(len(line[i]) for line in body) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in body
    )


def read_win_rates_csv(path: str | Path) -> list[WinRateRow]:
    """The rows of a results CSV (for notebooks); a malformed row is an error naming the file and line."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != list(COLUMNS):
            raise ValueError(f"{path}: header {reader.fieldnames} is not {list(COLUMNS)}")
        rows = []
        for line, record in enumerate(reader, start=2):
            try:
                rows.append(
                    WinRateRow(
                        record["subset"],
                        **{name: int(record[name]) for name in COLUMNS[1:7]},
                        only_a=int(record["only_a"]),
                        only_b=int(record["only_b"]),
                    )
                )
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}, line {line}: {error}") from error
    return rows


# ------------------------------------------------------------------------------------------------ files


def output_paths(out: str | Path) -> dict[str, Path]:
    """``table`` (the CSV given), ``comparisons`` (JSONL) and ``meta`` (JSON) next to it."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return {
        "table": out,
        "comparisons": out.with_name(f"{stem}.comparisons.jsonl"),
        "meta": out.with_name(f"{stem}.meta.json"),
    }


def write_results(
    out: str | Path,
    rows: Sequence[WinRateRow],
    comparisons: Sequence[Comparison],
    pairing: Pairing,
    meta: Mapping[str, Any],
    *,
    reasoning: bool,
) -> dict[str, Path]:
    """Write the table, one JSON line per id (compared or found in one run only) and the metadata."""
    paths = output_paths(out)
    paths["table"].parent.mkdir(parents=True, exist_ok=True)
    with paths["table"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(_cells(row, None) for row in rows)
    with paths["comparisons"].open("w", encoding="utf-8") as fh:
        for c in comparisons:
            record: dict[str, Any] = {
                "id": c.id,
                "subset": c.subset,
                "outcome": c.outcome,
                "shown_first": "B" if c.b_first else "A",
                "verdict": c.verdict,
                "failure": c.failure,
            }
            if reasoning:
                record["reasoning"] = c.reasoning
            if c.judge_reply is not None:
                record["judge_reply"] = c.judge_reply
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        for outcome, missing in (("only_a", pairing.only_a), ("only_b", pairing.only_b)):
            for row in missing:
                fh.write(json.dumps({"id": row.id, "subset": row.subset, "outcome": outcome}) + "\n")
    paths["meta"].write_text(json.dumps(dict(meta), indent=2, default=str) + "\n", encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------------------------- one run

_SPENT = (
    "requests_sent",
    "cache_hits",
    "retries",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "requests_in_flight_max",
    "usage_estimated",
)


@dataclass
class ComparisonResult:
    """What :func:`compare_files` produced: the table, the comparisons, the pairing, the files written."""

    rows: list[WinRateRow]
    comparisons: list[Comparison]
    pairing: Pairing
    judge_metrics: dict[str, float]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def total(self) -> WinRateRow:
        return self.rows[-1]


def compare_files(
    run_a: str | Path,
    run_b: str | Path,
    client: ChatClient,
    *,
    reasoning: bool = True,
    seed: int = 0,
    template: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 256,
    structured_output: str = "auto",
) -> ComparisonResult:
    """Read, join, judge, tally and (with ``out``) write; see the module docstring."""
    pairwise_template = load_pairwise_template(template)  # fail on a bad template before reading anything
    rows_a, rows_b = read_generations(run_a), read_generations(run_b)
    pairing = join_runs(rows_a, rows_b)
    if pairing.only_a or pairing.only_b:
        log.warning(
            "%d id(s) only in %s and %d only in %s are not compared (counted as only_a, only_b)",
            len(pairing.only_a),
            run_a,
            len(pairing.only_b),
            run_b,
        )
    client.preflight()  # a dead server, a refused key or an unknown model: one line now, not N failures
    comparisons = compare_pairs(
        client,
        pairing,
        reasoning=reasoning,
        seed=seed,
        template=pairwise_template,
        batch_size=batch_size,
        structured_output=structured_output,
    )
    rows = tally(comparisons, pairing)
    result = ComparisonResult(rows, comparisons, pairing, client.metrics())
    if out is not None:
        meta = {
            "run_a": str(run_a),
            "run_b": str(run_b),
            "rows_a": len(rows_a),
            "rows_b": len(rows_b),
            "judge": client.settings.describe(),
            "template": pairwise_template.version,
            "template_source": pairwise_template.source,
            "reasoning": reasoning,
            "structured_output": structured_output,
            "seed": seed,
            "judge_metrics": {k: v for k, v in result.judge_metrics.items() if k in _SPENT},
            "total": asdict(result.total),
        }
        result.paths = write_results(out, rows, comparisons, pairing, meta, reasoning=reasoning)
    return result


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> OneLineParser:
    """The command line: the two files, the comparison's options, and the judge's chat settings."""
    parser = OneLineParser(**parser_names("compare"))
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    parser.add_argument(
        "run_a",
        type=str,
        help="run A's generations JSONL "
        "(<log_dir>/eval/<stage>_generations.jsonl); wins are counted for this run",
    )
    parser.add_argument("run_b", type=str, help="run B's generations JSONL")
    parser.add_argument(
        "--reasoning",
        action=ActionYesNo,
        default=True,
        help="ask the judge to reason before its verdict (the paper's chain of thought)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds which reply is shown first in each comparison (and the retry jitter)",
    )
    parser.add_argument(
        "--template",
        type=str | None,
        default=None,
        help="a pairwise template file (default: the packaged pairwise_v1.txt)",
    )
    parser.add_argument(
        "--out",
        type=str | None,
        default=None,
        help="the results CSV; the comparisons JSONL and meta JSON are written next to it",
    )
    parser.add_argument("--batch_size", type=int, default=256, help="comparisons per progress step")
    parser.add_argument(
        "--structured_output",
        type=Literal["auto", "json_schema", "json_object", "off"],
        default="auto",
        help="ask for the verdict as JSON following a schema (llama.cpp and vLLM constrain decoding with "
        "it); auto: OpenAI's form first, then llama.cpp's, then the text verdict, as the server takes it",
    )
    parser.add_class_arguments(ChatSettings, None)
    parser.set_defaults(model="gpt-4")  # the paper's judge for Table 2
    return parser


def _underscored(argv: Sequence[str]) -> list[str]:
    """``--base-url`` -> ``--base_url``: both spellings of an option work (values are left alone)."""
    out = []
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            arg = "--" + name[2:].replace("-", "_") + eq + value
        out.append(arg)
    return out + list(argv[len(out) :])


def main(argv: Sequence[str] | None = None) -> ComparisonResult:
    """Run the comparison from the command line; print the table and where the files went."""
    parser = build_parser()
    config = parser.parse_args(_underscored(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # not a line per request
    try:
        settings = ChatSettings(**{name: config[name] for name in ChatSettings.names()})
    except ValueError as error:
        parser.error(f"invalid judge settings: {error}")
    client = ChatClient(settings, seed=config.seed, name="judge")
    try:
        result = compare_files(
            config.run_a,
            config.run_b,
            client,
            reasoning=config.reasoning,
            seed=config.seed,
            template=config.template,
            out=config.out,
            batch_size=config.batch_size,
            structured_output=config.structured_output,
        )
    except ValueError as error:  # bad input files or template: the message names the file, line and field
        fail(f"bad input: {error}")
    except JudgeStop as stop:
        fail(str(stop), EXIT_STOPPED)
    finally:
        client.close()
    pairing = result.pairing
    print(f"A: {config.run_a}\nB: {config.run_b}")
    print(
        f"compared {len(pairing.pairs)} ids; {len(pairing.only_a)} only in A, {len(pairing.only_b)} only "
        "in B; win/tie/lose % of A over the valid verdicts"
    )
    print(format_table(result.rows))
    metrics = result.judge_metrics
    tokens = metrics["prompt_tokens"] + metrics["completion_tokens"]
    print(
        f"judge {settings.model}: {metrics['requests_sent']:g} requests, {metrics['cache_hits']:g} cache "
        f"hits, {metrics['retries']:g} retries, {tokens:g} tokens, ${metrics['cost_usd']:.4f}"
    )
    for name, path in result.paths.items():
        print(f"{name}: {path}")
    return result


__all__ = [
    "COLUMNS",
    "Comparison",
    "ComparisonResult",
    "GenerationRow",
    "Pairing",
    "WinRateRow",
    "build_parser",
    "compare_files",
    "compare_pairs",
    "format_table",
    "join_runs",
    "main",
    "output_paths",
    "read_generations",
    "read_win_rates_csv",
    "shows_b_first",
    "tally",
    "write_results",
]


if __name__ == "__main__":
    main()
