"""A local OpenAI-compatible chat-completions server with a rule playing the judge (``server.py``), and the
inverse of our prompts that such a rule needs (``replies.py``). ``python -m cyclealign_pl serve`` serves the
default task's judge for trying a black box over HTTP (README)."""

from cyclealign_pl.serve.replies import Rule, rule_reply
from cyclealign_pl.serve.server import (
    SCRIPTED_FAILURES,
    Behaviour,
    LocalOpenAIServer,
    RecordedRequest,
    failure_mix,
)

__all__ = [
    "SCRIPTED_FAILURES",
    "Behaviour",
    "LocalOpenAIServer",
    "RecordedRequest",
    "Rule",
    "failure_mix",
    "rule_reply",
]
