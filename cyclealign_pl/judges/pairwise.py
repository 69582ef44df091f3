"""The pairwise comparison prompt (paper Table 2): which of two replies to one conversation is better.

Built on the ranking template's format and nonce delimiting; the verdict is read strictly from the reply's
last line, or from the reply's JSON under structured output (:func:`verdict_schema`), never guessed
(docs/judges.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cyclealign_pl.judges.base import RankRequest
from cyclealign_pl.judges.prompt import RankingTemplate, delimiters, load_template, request_nonce

Verdict = Literal["A", "B", "TIE"]
VERDICTS: tuple[Verdict, ...] = ("A", "B", "TIE")
DEFAULT_PAIRWISE_TEMPLATE = "pairwise_v1.txt"

_DELIMITERS = frozenset({"begin", "end"})
PAIRWISE_SLOTS: dict[str, frozenset[str]] = {
    "system": _DELIMITERS,
    "request": _DELIMITERS | {"instruction", "reply_a", "reply_b", "answer"},
    "answer": _DELIMITERS,
    "answer_with_reasoning": _DELIMITERS,
}

_ECHOED_BLOCK = re.compile(r"<text-([0-9a-f]{8,16})>.*?</text-\1>", re.DOTALL)
_MARKER = re.compile(r"\[\[\s*([^\[\]\n]{0,20}?)\s*\]\]")


def load_pairwise_template(path: str | Path | None = None) -> RankingTemplate:
    """Read a pairwise template file (None: the packaged ``pairwise_v1.txt``) and check it."""
    return load_template(path, packaged=DEFAULT_PAIRWISE_TEMPLATE, slots=PAIRWISE_SLOTS, kind="pairwise")


def build_pairwise_messages(
    instruction: str,
    reply_a: str,
    reply_b: str,
    *,
    reasoning: bool = False,
    template: RankingTemplate | None = None,
) -> list[dict[str, str]]:
    """The chat messages (system, user) asking which of ``reply_a`` (shown first) or ``reply_b`` is better."""
    template = template or load_pairwise_template()
    begin, end = delimiters(request_nonce(RankRequest(instruction, (reply_a, reply_b))))

    def block(text: str) -> str:
        return f"{begin}\n{text}\n{end}"

    common = {"begin": begin, "end": end}
    answer = template.render("answer_with_reasoning" if reasoning else "answer", **common)
    user = template.render(
        "request",
        instruction=block(instruction),
        reply_a=block(reply_a),
        reply_b=block(reply_b),
        answer=answer.strip(),
        **common,
    )
    return [
        {"role": "system", "content": template.render("system", **common).strip()},
        {"role": "user", "content": user.strip()},
    ]


@dataclass(frozen=True)
class ParsedVerdict:
    """What a judge's answer says: a verdict (in the order shown) or ``None`` and why; its reasoning."""

    verdict: Verdict | None
    reasoning: str | None
    failure: str | None


def verdict_schema(reasoning: bool, max_reasoning_chars: int | None = None) -> dict[str, object]:
    """The JSON schema of a verdict, for structured output: ``{"reasoning": "...", "verdict": "A"}``, the
    reasoning first (the paper's chain of thought) and only when asked; a server that constrains decoding by
    the schema (llama.cpp, vLLM) can then only write a valid verdict."""
    properties: dict[str, object] = {}
    if reasoning:
        text: dict[str, object] = {"type": "string"}
        if max_reasoning_chars is not None:
            text["maxLength"] = int(max_reasoning_chars)
        properties["reasoning"] = text
    properties["verdict"] = {"enum": list(VERDICTS)}
    schema = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    return {"name": "verdict_with_reasoning" if reasoning else "verdict", "strict": True, "schema": schema}


def _json_verdict(text: str) -> ParsedVerdict | None:
    """The verdict of a reply that is one JSON object with a ``verdict`` key; None for any other reply."""
    stripped = (text or "").strip()
    if not stripped.startswith("{"):
        return None
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "verdict" not in data:
        return None
    reasoning = str(data.get("reasoning") or "").strip() or None
    verdict = str(data["verdict"]).strip().upper()
    if verdict not in VERDICTS:
        return ParsedVerdict(None, reasoning, f"unknown verdict {data['verdict']!r} (expected A, B or TIE)")
    return ParsedVerdict(verdict, reasoning, None)  # type: ignore[arg-type]


def parse_verdict(text: str) -> ParsedVerdict:
    """Read the verdict from a JSON reply (structured output), else from the last non-empty line, the lines
    before it being the reasoning."""
    structured = _json_verdict(text)
    if structured is not None:
        return structured
    visible = _ECHOED_BLOCK.sub("", text or "")  # texts the judge quoted back are data, not its verdict
    lines = [line for line in visible.splitlines() if line.strip()]
    if not lines:
        return ParsedVerdict(None, None, "empty reply")
    reasoning = "\n".join(lines[:-1]).strip() or None
    labels = [m.group(1).strip().upper() for m in _MARKER.finditer(lines[-1])]
    if not labels:
        if any(_MARKER.search(line) for line in lines[:-1]):
            return ParsedVerdict(None, reasoning, "the verdict is not on the last line")
        return ParsedVerdict(None, reasoning, "no verdict ([[A]], [[B]] or [[TIE]]) on the last line")
    distinct = list(dict.fromkeys(labels))
    if len(distinct) > 1:
        shown = ", ".join(f"[[{label}]]" for label in distinct[:3])
        return ParsedVerdict(None, reasoning, f"the last line names several verdicts ({shown})")
    if distinct[0] not in VERDICTS:
        return ParsedVerdict(
            None, reasoning, f"unknown verdict [[{distinct[0]}]] (expected [[A]], [[B]] or [[TIE]])"
        )
    return ParsedVerdict(distinct[0], reasoning, None)  # type: ignore[arg-type]


__all__ = [
    "DEFAULT_PAIRWISE_TEMPLATE",
    "PAIRWISE_SLOTS",
    "VERDICTS",
    "ParsedVerdict",
    "Verdict",
    "build_pairwise_messages",
    "load_pairwise_template",
    "parse_verdict",
    "verdict_schema",
]
