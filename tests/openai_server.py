"""The tests' black box: the local OpenAI-compatible server (``cyclealign_pl.serve``) answering by a plain
keyword rule, and the names the tests use from the serving side (``from tests.openai_server import ...``).

The keyword rule ranks candidates by fewer harmful keywords, then more words, then lower index; its better
response is the best candidate when that one is harmless, else a polite refusal. On the paper's static
demonstration this gives the paper's ranking ``[1, 3, 2, 0]``. A pairwise prompt gets the same rule's verdict
(equal keys: a tie).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from cyclealign_pl.judges.pairwise import Verdict
from cyclealign_pl.serve import replies, server
from cyclealign_pl.serve.replies import (
    NO_RESPONSES,
    format_reply,
    format_verdict,
    parse_pairwise_prompt,
    parse_prompt,
    rule_reply,
)
from cyclealign_pl.serve.server import (
    SCRIPTED_FAILURES,
    Behaviour,
    RecordedRequest,
    count_tokens,
    failure_mix,
)

_HARMFUL = re.compile(
    r"\b(?:rob|robb|steal|stole|fraud|drug|kill|murder|weapon|bomb|explosive|hack|poison|scam|illegal|hurt"
    r"|attack|violen|cheat|launder|kidnap|smuggl)\w*",
    re.IGNORECASE,
)
REFUSAL = "I can't help with that, but I'm glad to help with a safe alternative."


def harm_score(text: str) -> int:
    """How many harmful keywords the text contains (the rule's first criterion; lower is better)."""
    return len(_HARMFUL.findall(text))


def rank_candidates(candidates: Iterable[str]) -> tuple[int, ...]:
    """The keyword rule: fewer harmful keywords, then more words, then lower index."""
    texts = list(candidates)
    return tuple(sorted(range(len(texts)), key=lambda i: (harm_score(texts[i]), -len(texts[i].split()), i)))


def compare_replies(reply_a: str, reply_b: str) -> Verdict:
    """The keyword rule for two replies: the one it would rank first, or a tie when they score the same."""
    key_a, key_b = ((harm_score(t), -len(t.split())) for t in (reply_a, reply_b))
    return "A" if key_a < key_b else "B" if key_b < key_a else "TIE"


class KeywordRule:
    """The keyword rule as a :class:`~cyclealign_pl.serve.replies.Rule`."""

    def rank(self, instruction: str, candidates: Sequence[str]) -> tuple[int, ...]:
        return rank_candidates(candidates)

    def better_reply(self, instruction: str, candidates: Sequence[str], ranking: Sequence[int]) -> str:
        best = candidates[ranking[0]]
        return best if harm_score(best) == 0 else REFUSAL

    def compare(self, conversation: str, reply_a: str, reply_b: str) -> Verdict:
        return compare_replies(reply_a, reply_b)


class LocalOpenAIServer(server.LocalOpenAIServer):
    """:class:`cyclealign_pl.serve.LocalOpenAIServer` answering by the keyword rule unless told otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("rule", KeywordRule())
        super().__init__(*args, **kwargs)


__all__ = [
    "NO_RESPONSES",
    "REFUSAL",
    "SCRIPTED_FAILURES",
    "Behaviour",
    "KeywordRule",
    "LocalOpenAIServer",
    "RecordedRequest",
    "compare_replies",
    "count_tokens",
    "failure_mix",
    "format_reply",
    "format_verdict",
    "harm_score",
    "parse_pairwise_prompt",
    "parse_prompt",
    "rank_candidates",
    "replies",
    "rule_reply",
]
