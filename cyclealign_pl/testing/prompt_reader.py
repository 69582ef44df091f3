"""Reading our prompts back and writing canonical replies: what a test server needs to play the judge.

The judges only *write* prompts and *read* replies (:mod:`cyclealign_pl.judges.prompt`,
:mod:`cyclealign_pl.judges.pairwise`). A server standing in for the black box does the opposite: it recovers
the request from the messages it was sent and answers in the format the template asks for. That inverse lives
here, next to the server, so the judge package carries no code only tests use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from cyclealign_pl.demonstrations import Demonstration
from cyclealign_pl.judges.base import RankRequest
from cyclealign_pl.judges.pairwise import Verdict
from cyclealign_pl.judges.prompt import delimiters, format_ranking

_NONCE_OPEN = re.compile(r"<text-([0-9a-f]{8})>")
_DEMO_RANKING = re.compile(r"The desired ranking is:\s*\[([\d,\s]*)\]")
_RESPONSE_HEADER = re.compile(r"# Response-(\d+)\.")


def delimited_user_message(messages: Sequence[Mapping[str, object]]) -> tuple[str, str, str]:
    """The last user message's text and its nonce delimiters (begin, end); ValueError when it has none."""
    user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if user is None or not isinstance(user.get("content"), str):
        raise ValueError("no user message with text content")
    content = str(user["content"])
    match = _NONCE_OPEN.search(content)
    if match is None:
        raise ValueError("the prompt has no delimited texts")
    begin, end = delimiters(match.group(1))
    return content, begin, end


def parse_prompt(messages: Sequence[Mapping[str, object]]) -> RankRequest:
    """Recover the request from messages built with a template that keeps the paper's headers.

    The inverse of :func:`~cyclealign_pl.judges.prompt.build_messages` for the packaged template (and any
    template that keeps ``### Instruction:``, ``# Response-i.`` and ``The desired ranking is: [...]``). Used
    by the local test server to rank what a judge sent, and by tests to check that no candidate can change the
    structure. Raises ValueError for messages that are not a ranking prompt.
    """
    content, begin, end = delimited_user_message(messages)
    items: list[dict[str, object]] = []
    expect: str | None = None
    pos = 0
    while True:
        start = content.find(begin + "\n", pos)
        outside = content[pos:] if start < 0 else content[pos:start]
        ranking = _DEMO_RANKING.search(outside)
        if ranking and items:
            items[-1]["ranking"] = tuple(int(x) for x in re.findall(r"\d+", ranking.group(1)))
        if "### Instruction:" in outside:
            items.append({"instruction": None, "responses": [], "ranking": None})
            expect = "instruction"
        elif _RESPONSE_HEADER.search(outside):
            expect = "response"
        if start < 0:
            break
        body_start = start + len(begin) + 1
        stop = content.find("\n" + end, start + len(begin))
        if stop < 0:
            raise ValueError(f"unterminated delimited text at offset {start}")
        text = content[body_start:stop] if stop >= body_start else ""
        pos = stop + 1 + len(end)
        if not items or expect is None:
            raise ValueError(f"delimited text at offset {start} follows no instruction or response header")
        if expect == "instruction":
            items[-1]["instruction"] = text
        else:
            items[-1]["responses"].append(text)  # type: ignore[union-attr]
        expect = None
    if not items or items[-1]["ranking"] is not None:
        raise ValueError("the prompt has no instruction to rank after its demonstrations")
    demos = tuple(
        Demonstration(str(it["instruction"]), tuple(it["responses"]), it["ranking"])  # type: ignore[arg-type]
        for it in items[:-1]
    )
    last = items[-1]
    return RankRequest(str(last["instruction"]), tuple(last["responses"]), demos)  # type: ignore[arg-type]


def format_reply(ranking: Sequence[int], better_response: str | None = None) -> str:
    """The canonical reply that the ranking template asks for."""
    text = f"### The desired ranking is: {format_ranking(ranking)}."
    return text if better_response is None else f"{text}\n### A better response: {better_response}"


def parse_pairwise_prompt(messages: Sequence[Mapping[str, object]]) -> tuple[str, str, str]:
    """The (conversation, reply A, reply B) that ``build_pairwise_messages`` enclosed, in that order.

    Raises ValueError for messages that do not hold exactly three delimited texts.
    """
    content, begin, end = delimited_user_message(messages)
    texts = re.findall(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), content, flags=re.DOTALL)
    if len(texts) != 3:
        raise ValueError(f"a pairwise prompt holds 3 delimited texts, this one {len(texts)}")
    return texts[0], texts[1], texts[2]


def format_verdict(verdict: Verdict, reasoning: str | None = None) -> str:
    """The answer the pairwise template asks for: the reasoning, then ``Verdict: [[X]]`` on the last line."""
    line = f"Verdict: [[{verdict}]]"
    return line if not reasoning else f"{reasoning.strip()}\n{line}"


__all__ = [
    "delimited_user_message",
    "format_reply",
    "format_verdict",
    "parse_pairwise_prompt",
    "parse_prompt",
]
