"""The black-box ranking prompt (paper Sec. 3.2, A.1/A.3): template loading, message building, reply parsing.

Texts written by others are enclosed in nonce delimiters that no text of the request holds, so a candidate
cannot rewrite the prompt or the ranking; the parser never repairs or guesses a ranking (docs/judges.md).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cyclealign_pl.judges.base import RankRequest
from cyclealign_pl.ranking import InvalidRankingError, Ranking, validate_ranking

DEFAULT_TEMPLATE = "ranking_v1.txt"

_COMMON_SLOTS = frozenset({"begin", "end", "num_responses", "max_index"})
_SECTION_SLOTS: dict[str, frozenset[str]] = {
    "system": frozenset(),
    "demonstrations": frozenset({"items"}),
    "demonstration": frozenset({"instruction", "responses", "ranking"}),
    "response": frozenset({"index", "text"}),
    "request": frozenset({"demonstrations", "instruction", "responses"}),
}
# what a ranking template may contain: its sections and, for each, the slots it may use
RANKING_SLOTS: dict[str, frozenset[str]] = {
    name: slots | _COMMON_SLOTS for name, slots in _SECTION_SLOTS.items()
}
_IGNORED_SECTIONS = frozenset({"notes"})
_SECTION_LINE = re.compile(r"^===\s*([A-Za-z_]+)\s*===\s*$")


class TemplateError(ValueError):
    """A ranking template file that cannot be used (the message names the file, line and problem)."""


@dataclass(frozen=True)
class RankingTemplate:
    """A parsed template file: its version (part of the cache key) and its sections."""

    version: str
    sections: Mapping[str, str]
    source: str

    def render(self, section: str, **slots: object) -> str:
        return self.sections[section].format(**slots)


def load_template(
    path: str | Path | None = None,
    *,
    packaged: str = DEFAULT_TEMPLATE,
    slots: Mapping[str, frozenset[str]] = RANKING_SLOTS,
    kind: str = "ranking",
) -> RankingTemplate:
    """Read a template file (None: the packaged one; a bare name that is no file here: that packaged
    template, e.g. ``ranking_compact_v1.txt``) and check its sections and slots.

    ``packaged``, ``slots`` and ``kind`` let other prompts (the pairwise comparison) share this format and its
    checks: ``slots`` maps each required section to the slots it may use; ``kind`` names it in errors.
    """
    shipped = resources.files("cyclealign_pl.judges").joinpath("templates")
    bare = path is not None and Path(path).name == str(path) and not Path(path).exists()
    if bare and shipped.joinpath(str(path)).is_file():
        path, packaged = None, str(path)
    if path is None:
        resource = shipped.joinpath(packaged)
        text = resource.read_text("utf-8")
        source = f"<packaged {packaged}>"
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise TemplateError(f"cannot read {kind} template {source}: {err}") from err
    return parse_template(text, source, slots)


def parse_template(
    text: str, source: str = "<string>", slots: Mapping[str, frozenset[str]] = RANKING_SLOTS
) -> RankingTemplate:
    """Parse template text (see the packaged file's ``notes`` section for the format)."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None or not lines[first].startswith("version:") or not lines[first][8:].strip():
        raise TemplateError(f"{source}, line {(first or 0) + 1}: the first line must be 'version: <name>'")
    version = lines[first][8:].strip()
    sections: dict[str, list[str]] = {}
    starts: dict[str, int] = {}
    current: str | None = None
    for number, line in enumerate(lines[first + 1 :], start=first + 2):
        match = _SECTION_LINE.match(line)
        if match:
            current = match.group(1).lower()
            if current not in slots and current not in _IGNORED_SECTIONS:
                raise TemplateError(
                    f"{source}, line {number}: unknown section {current!r} "
                    f"(expected {sorted(slots)} or 'notes')"
                )
            if current in sections:
                raise TemplateError(f"{source}, line {number}: section {current!r} appears twice")
            sections[current] = []
            starts[current] = number
        elif current is None:
            if line.strip():
                raise TemplateError(f"{source}, line {number}: text before the first '=== section ===' line")
        else:
            sections[current].append(line)
    missing = sorted(set(slots) - set(sections))
    if missing:
        raise TemplateError(f"{source}: missing section(s) {missing}")
    out: dict[str, str] = {}
    for name, body in sections.items():
        if name in _IGNORED_SECTIONS:
            continue
        content = "\n".join(body).strip("\n")
        allowed = slots[name]
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(content) if f is not None}
        except ValueError as err:
            raise TemplateError(
                f"{source}, section {name!r} (line {starts[name]}): {err} "
                "(write {{ and }} for literal braces)"
            ) from err
        unknown = sorted(f for f in fields if f not in allowed)
        if unknown:
            raise TemplateError(
                f"{source}, section {name!r} (line {starts[name]}): unknown slot(s) {unknown}; "
                f"allowed: {sorted(allowed)}"
            )
        out[name] = content
    return RankingTemplate(version=version, sections=out, source=source)


_default_template: RankingTemplate | None = None


def default_template() -> RankingTemplate:
    global _default_template
    if _default_template is None:
        _default_template = load_template(None)
    return _default_template


# ----------------------------------------------------------------------------------------------- messages


def request_nonce(request: RankRequest) -> str:
    """8 hex digits that no text of the request holds: the same for every request whose texts do not hold it.

    Shared, so that requests share their prefix (system message, static demonstration) and a server's prompt
    cache (llama.cpp's, OpenAI's) serves it instead of reading it again; a request with a text that holds it
    gets the next salt's. No text can then close its block, and a secret nonce would protect nothing more.
    Its length only costs tokens: 18 delimiter lines of 16 hex digits took ~20 tokens each, of 8 ~13."""
    lowered = [request.instruction.lower(), *(t.lower() for t in request.candidates)]
    for demo in request.demonstrations:
        lowered += [demo.instruction.lower(), *(t.lower() for t in demo.responses)]
    for salt in itertools.count():
        nonce = hashlib.sha256(f"cyclealign-delimiter\0{salt}".encode()).hexdigest()[:8]
        if not any(nonce in t for t in lowered):
            return nonce
    raise AssertionError("unreachable")


def delimiters(nonce: str) -> tuple[str, str]:
    return f"<text-{nonce}>", f"</text-{nonce}>"


def format_ranking(ranking: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(i)) for i in ranking) + "]"


def build_messages(request: RankRequest, template: RankingTemplate | None = None) -> list[dict[str, str]]:
    """The chat messages (system, user) that ask the black box to rank ``request.candidates``."""
    template = template or default_template()
    if not request.candidates:
        raise ValueError("a ranking request needs at least one candidate")
    begin, end = delimiters(request_nonce(request))
    common = {
        "begin": begin,
        "end": end,
        "num_responses": len(request.candidates),
        "max_index": len(request.candidates) - 1,
    }

    def block(text: str) -> str:
        return f"{begin}\n{text}\n{end}"

    def responses(texts: Sequence[str]) -> str:
        return "\n\n".join(
            template.render("response", index=i, text=block(t), **common) for i, t in enumerate(texts)
        )

    demos = [
        template.render(
            "demonstration",
            instruction=block(d.instruction),
            responses=responses(d.responses),
            ranking=format_ranking(d.ranking),
            **common,
        )
        for d in request.demonstrations
    ]
    demonstrations = template.render("demonstrations", items="\n\n".join(demos), **common) if demos else ""
    user = template.render(
        "request",
        demonstrations=demonstrations,
        instruction=block(request.instruction),
        responses=responses(request.candidates),
        **common,
    )
    return [
        {"role": "system", "content": template.render("system", **common).strip()},
        {"role": "user", "content": user.strip()},
    ]


_MAX_ENUMERATED = 5  # up to 5! = 120 permutations, listed: only a valid ranking can be written


def ranking_schema(num_candidates: int, max_better_chars: int | None = None) -> dict[str, object]:
    """The JSON schema of a ranking reply, for structured output: ``{"ranking": [...], "better_response":
    "..."}``, the ranking first (it is what the cycle needs; a reply cut short still has it).

    Up to five candidates the ranking is one of the listed permutations, so a server that constrains decoding
    by the schema (llama.cpp, vLLM) can only write a valid one; beyond, an array of the indices.
    ``max_better_chars`` bounds the better response, so the reply ends within ``max_tokens``.
    """
    n = int(num_candidates)
    ranking: dict[str, object]
    if n <= _MAX_ENUMERATED:
        ranking = {"enum": [list(p) for p in itertools.permutations(range(n))]}
    else:
        items = {"type": "integer", "enum": list(range(n))}
        ranking = {"type": "array", "items": items, "minItems": n, "maxItems": n}
    better: dict[str, object] = {"type": "string"}
    if max_better_chars is not None:
        better["maxLength"] = int(max_better_chars)
    schema = {
        "type": "object",
        "properties": {"ranking": ranking, "better_response": better},
        "required": ["ranking", "better_response"],
        "additionalProperties": False,
    }
    return {"name": f"ranking_of_{n}", "strict": True, "schema": schema}


# ---------------------------------------------------------------------------------------------- the reply


@dataclass(frozen=True)
class ParsedReply:
    """What a reply says: a valid full ranking, or ``None`` and why; and the judge's better response."""

    ranking: Ranking | None
    better_response: str | None
    failure: str | None


_ECHOED_BLOCK = re.compile(r"<text-([0-9a-f]{8,16})>.*?</text-\1>", re.DOTALL)
_BETTER_MARKER = re.compile(
    r"^[ \t>#*_`]*(?:an?\s+|my\s+)?better\s+response(?:\s+would\s+be)?[ \t*_`]*:[ \t*_`]*",
    re.IGNORECASE | re.MULTILINE,
)
_PHRASE = re.compile(
    r"(?:(?:desired|final|my|overall)\s+ranking(?:\s+(?:is|would\s+be|should\s+be))?\s*[:=]?"
    r"|^[ \t>#*_`-]*ranking\s*[:=])",
    re.IGNORECASE | re.MULTILINE,
)
_ITEM = r"(?:response[\s_-]*)?-?\d+"  # a sign is read, so that "-2" is refused, never dropped
_BRACKET = re.compile(r"\[([^\[\]\n]*)\]")
_BRACKET_BODY = re.compile(rf"^\s*{_ITEM}(?:\s*[,;>]\s*{_ITEM})*\s*,?\s*$", re.IGNORECASE)
_GT_CHAIN = re.compile(rf"{_ITEM}(?:\s*(?:>>?|->|→|≻)\s*{_ITEM})+", re.IGNORECASE)
_COMMA_CHAIN = re.compile(rf"{_ITEM}(?:\s*[,;]\s*(?:and\s+)?{_ITEM})+", re.IGNORECASE)
_RESPONSE_CHAIN = re.compile(r"response[\s_-]*\d+(?:\s*[,;]\s*(?:and\s+)?response[\s_-]*\d+)+", re.IGNORECASE)
_RESPONSE_REF = re.compile(r"response[\s_-]*(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+")
_MARKDOWN = re.compile(r"\*\*|__|`")
_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i (?:cannot|can ?not|can't|won't|will not)"
    r"|unable to (?:help|assist|comply|rank)"
    r"|as an ai)\b",
    re.IGNORECASE,
)


def _numbers(expr: str) -> tuple[int, ...]:
    refs = _RESPONSE_REF.findall(expr)
    return tuple(int(x) for x in (refs if refs else _NUMBER.findall(expr)))


def _expression_after_phrase(rest: str) -> tuple[int, ...] | None:
    """The ranking that follows a 'desired ranking is' phrase: on its line, or as a list on the next lines."""
    line, _, following = rest.partition("\n")
    match = _BRACKET.search(line)
    if match and _BRACKET_BODY.match(match.group(1)):
        return _numbers(match.group(1))
    refs = _RESPONSE_REF.findall(line)
    if refs:  # "Response-1 (best), Response-3, ..." in the order written
        return tuple(int(x) for x in refs)
    for pattern in (_GT_CHAIN, _COMMA_CHAIN):
        match = pattern.search(line)
        if match:
            return _numbers(match.group(0))
    if line.strip(" \t:.-*#"):
        return None
    block = following.split("\n\n", 1)[0]  # a vertical list: "1. Response-1" / "- Response-3" lines
    refs = _RESPONSE_REF.findall(block)
    return tuple(int(x) for x in refs) if refs else None


def _anywhere(text: str) -> list[tuple[int, ...]]:
    """Ranking expressions anywhere in the text (no phrase): bracket lists, '>' chains, Response-i lists."""
    found = []
    for match in _BRACKET.finditer(text):
        if _BRACKET_BODY.match(match.group(1)) and len(_numbers(match.group(1))) >= 2:
            found.append(_numbers(match.group(1)))
    for pattern in (_GT_CHAIN, _RESPONSE_CHAIN):
        found += [_numbers(m.group(0)) for m in pattern.finditer(text)]
    return found


def _clean_better(text: str) -> str | None:
    text = re.sub(r"</?text-[0-9a-f]{8,16}>", "", text).strip()
    if text.endswith("```"):  # the reply was wrapped in a code fence
        text = text[:-3].rstrip()
    if text.startswith("```"):
        text = text.partition("\n")[2].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text or None


_JSON_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n(.*?)\n[ \t]*```", re.DOTALL | re.IGNORECASE)
_JSON_RANKING_KEYS = ("ranking", "desired_ranking", "the_desired_ranking", "final_ranking")
_JSON_BETTER_KEYS = ("better_response", "a_better_response", "response", "better")


def _json_reply(text: str) -> tuple[dict[str, object], str] | None:
    """The reply as a JSON object with a ranking key (bare, in a code fence, or the one ``{...}`` in prose),
    its keys normalised (``"Desired ranking"`` -> ``desired_ranking``), and the text around it; None when it
    is not one."""
    start, end = text.find("{"), text.rfind("}")
    if not 0 <= start < end:
        return None
    spans = [(m.group(1), m.start(), m.end()) for m in _JSON_FENCE.finditer(text)]
    for candidate, left, right in (*spans, (text[start : end + 1], start, end + 1)):
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            keys = {re.sub(r"[\s-]+", "_", str(k).strip().lower()): v for k, v in value.items()}
            if any(k in keys for k in _JSON_RANKING_KEYS):
                return keys, text[:left] + "\n" + text[right:]
    return None


def _json_ranking(value: object) -> tuple[int, ...] | None:
    """A ranking as a JSON list (``[1, 0, 2]``, ``["Response-1", ...]``) or string; None if not one."""
    if isinstance(value, str):
        return _expression_after_phrase(value) or (_numbers(value) if _BRACKET_BODY.match(value) else None)
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            out.append(item)
        elif isinstance(item, str) and len(_numbers(item)) == 1:
            out.append(_numbers(item)[0])
        else:
            return None
    return tuple(out)


def _checked(rankings: Sequence[tuple[int, ...]], better: str | None, visible: str, n: int) -> ParsedReply:
    """The one ranking the reply states, validated for ``n`` candidates; otherwise a failure saying why."""
    distinct = list(dict.fromkeys(rankings))
    if not distinct:
        if _REFUSAL.search(visible):
            return ParsedReply(None, better, "refusal: the judge declined to rank")
        return ParsedReply(None, better, "no ranking found in the reply")
    if len(distinct) > 1:
        shown = ", ".join(format_ranking(r) for r in distinct[:3])
        return ParsedReply(None, better, f"ambiguous reply: several different rankings ({shown})")
    try:
        ranking = validate_ranking(distinct[0], n)
    except InvalidRankingError as err:
        return ParsedReply(None, better, f"invalid ranking {format_ranking(distinct[0])}: {err}")
    return ParsedReply(ranking, better, None)


def parse_reply(text: str | None, num_candidates: int) -> ParsedReply:
    """Read the ranking and the better response out of a judge's reply; invalid replies say why.

    Accepts ``The desired ranking is: [1, 3, 2, 0]`` (with or without ``###``, markdown, text around it),
    ``1 > 3 > 2 > 0`` and ``Response-1, Response-3, ...``; the better response follows a
    ``A better response:`` marker. A JSON reply (bare or in a code fence) is read by its keys: ``ranking`` or
    ``desired_ranking``, and ``better_response``, ``a_better_response`` or ``response`` (absent: no better
    response). A reply that states two different rankings, a partial, duplicated or out-of-range ranking, a
    refusal or no ranking at all is a failure with its reason.
    """
    if text is None or not text.strip():
        return ParsedReply(None, None, "empty reply")
    visible = _ECHOED_BLOCK.sub(" ", text)
    found = _json_reply(visible)
    if found is not None:
        as_json, prose = found
        value = next(as_json[k] for k in _JSON_RANKING_KEYS if k in as_json)
        said = next((as_json[k] for k in _JSON_BETTER_KEYS if k in as_json), None)
        better = _clean_better(said) if isinstance(said, str) else None
        ranking = _json_ranking(value)
        if ranking is None:
            shown = json.dumps(value)[:80]
            return ParsedReply(None, better, f"no ranking in the JSON reply's ranking field: {shown}")
        # a ranking also stated in the prose around the JSON must be the same one, or the reply is ambiguous
        return _checked([ranking, *_text_rankings(prose)], better, visible, num_candidates)
    better: str | None = None
    marker = _BETTER_MARKER.search(visible)
    ranking_text = visible
    if marker:
        after = visible[marker.end() :]
        # A ranking line written after the better response ends it (a mere mention of "my ranking" does not).
        plain_after = _MARKDOWN.sub(lambda m: " " * len(m.group(0)), after)
        stated = (
            m for m in _PHRASE.finditer(plain_after) if _expression_after_phrase(plain_after[m.end() :])
        )
        nxt = next(stated, None)
        cut = after.rfind("\n", 0, nxt.start()) + 1 if nxt else len(after)
        better = _clean_better(after[:cut])
        ranking_text = visible[: marker.start()] + "\n" + after[cut:]
    return _checked(_text_rankings(ranking_text), better, visible, num_candidates)


def _text_rankings(text: str) -> list[tuple[int, ...]]:
    """The rankings a text states after a 'desired ranking' phrase, else any ranking expression in it."""
    plain = _MARKDOWN.sub("", text)
    stated = [r for r in (_expression_after_phrase(plain[m.end() :]) for m in _PHRASE.finditer(plain)) if r]
    return stated or _anywhere(plain)


__all__ = [
    "DEFAULT_TEMPLATE",
    "RANKING_SLOTS",
    "ParsedReply",
    "RankingTemplate",
    "TemplateError",
    "build_messages",
    "default_template",
    "delimiters",
    "format_ranking",
    "load_template",
    "parse_reply",
    "parse_template",
    "ranking_schema",
    "request_nonce",
]
