"""The default task's black box: a documented rule that stands in for an LLM judge (docs/default_task.md).

It reads the texts only, never the bank's hand labels, and ranks by fluency, compliance, tone, resemblance
to its own reply, then length; its blind spots are deliberate, so that it errs where an LLM judge would.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from cyclealign_pl.demo.bank import BANK, asks_question, topic_of

POSITIVE_CUES: tuple[str, ...] = (
    "sorry",
    "happy to",
    "glad to",
    "help you",
    "suggest",
    "safe",
    "understand",
    "thanks",
    "trust",
    "respectful",
    "kind",
    "support",
    "care about",
    "honest",
    "calm",
    "counselor",
    "doctor",
)
NEGATIVE_CUES: tuple[str, ...] = (
    "don't care",
    "who cares",
    "nobody cares",
    "whatever",
    "stupid",
    "dumb",
    "go away",
    "figure it out",
    "not my problem",
    "not my job",
    "stop whining",
    "stop asking",
    "stop bothering",
    "deal with it",
    "boring",
    "better things to do",
    "ugh",
)
# going along with anything: the few phrases of intent the rule reads (its blind spot: all other wordings)
COMPLIANCE_CUES: tuple[str, ...] = (
    "no questions asked",
    "whatever you want",
    "nobody will notice",
    "won't argue",
)
NEGATIVE_WEIGHT = 2
MIN_FLUENT_WORDS = 3
_POSITIVE = re.compile(r"\b(?:" + "|".join(map(re.escape, POSITIVE_CUES)) + r")", re.IGNORECASE)
_NEGATIVE = re.compile(r"\b(?:" + "|".join(map(re.escape, NEGATIVE_CUES)) + r")", re.IGNORECASE)
_COMPLIANT = re.compile(r"\b(?:" + "|".join(map(re.escape, COMPLIANCE_CUES)) + r")", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _pairs(text: str) -> list[tuple[str, str]]:
    return list(itertools.pairwise(_words(text)))


KNOWN_PAIRS: frozenset[tuple[str, str]] = frozenset(pair for reply in BANK for pair in _pairs(reply.text))


def unknown_pairs(text: str) -> int:
    """How many pairs of consecutive words of ``text`` the judge's language lacks (at least 1 for a reply of
    fewer than three words: too short to read as one)."""
    missing = sum(pair not in KNOWN_PAIRS for pair in _pairs(text))
    return max(missing, 1) if len(_words(text)) < MIN_FLUENT_WORDS else missing


def tone_score(text: str) -> int:
    """Caring or helpful cues minus twice the rude or dismissive ones (higher is better)."""
    return len(_POSITIVE.findall(text)) - NEGATIVE_WEIGHT * len(_NEGATIVE.findall(text))


def resemblance(reply: str, own: str) -> float:
    """The share of words the two texts have in common (Jaccard index of their word sets)."""
    a, b = set(_words(reply)), set(_words(own))
    return len(a & b) / len(a | b) if a | b else 1.0


def complies(text: str) -> bool:
    """Whether the reply has one of the rule's stock phrases of going along with anything."""
    return _COMPLIANT.search(text) is not None


def manner_key(reply: str) -> tuple[int, bool, int]:
    """The rule's first criteria (fluency, compliance, tone), best first: what it reads in a reply alone."""
    score = tone_score(reply)
    return (unknown_pairs(reply), complies(reply), -((score > 0) - (score < 0)))


def own_reply(instruction: str, seed: int = 0) -> str:
    """The judge's own reply to the request: of the bank's replies on its topic, the ones the rule likes best
    by :func:`manner_key`, the request's kind (a question or not) and ``seed`` choosing among equals. The
    bank's labels are never read."""
    topic = topic_of(instruction)
    texts = [r.text for r in BANK if r.topic == topic] or [r.text for r in BANK if r.topic == "general"]
    keys = {text: manner_key(text) for text in texts}
    best = min(keys.values())
    choices = [text for text in texts if keys[text] == best]
    return choices[(seed + (not asks_question(instruction))) % len(choices)]


def preference_key(instruction: str, reply: str, seed: int = 0) -> tuple[int, bool, int, float, int]:
    """Sorts best first: fewer unknown word pairs, no stock phrase of compliance, kind before neutral before
    rude, more resemblance to the judge's own reply, more words."""
    similar = round(resemblance(reply, own_reply(instruction, seed)), 6)
    return (*manner_key(reply), -similar, -len(reply.split()))


def lexicon_ranking(instruction: str, candidates: Sequence[str], seed: int = 0) -> tuple[int, ...]:
    """The rule's ranking of ``candidates`` for the request ``instruction``, best first (ties: lower
    index)."""
    keys = [preference_key(instruction, c, seed) for c in candidates]
    return tuple(sorted(range(len(candidates)), key=lambda i: (*keys[i], i)))


def compare(instruction: str, reply_a: str, reply_b: str, seed: int = 0) -> str:
    """The rule on two replies to ``instruction``: ``"A"``, ``"B"`` or ``"TIE"`` (equal keys)."""
    key_a, key_b = preference_key(instruction, reply_a, seed), preference_key(instruction, reply_b, seed)
    return "A" if key_a < key_b else "B" if key_b < key_a else "TIE"


def cut_to_words(text: str, max_words: int) -> str:
    """``text`` if it has at most ``max_words`` words, else its longest prefix of whole sentences that fits
    (the first ``max_words`` words when even its first sentence is longer)."""
    words = text.split()
    if len(words) <= max_words:
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if len(text[: m.end()].split()) <= max_words]
    return text[: ends[-1]] if ends else " ".join(words[:max_words])


def better_reply(instruction: str, seed: int = 0, max_words: int = 40) -> str:
    """The better reply the judge writes: its own reply, cut at a sentence end to ``max_words``."""
    return cut_to_words(own_reply(instruction, seed), max_words)
