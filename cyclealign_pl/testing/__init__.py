"""Test support that really runs: a local OpenAI-compatible server (no mocked clients), and the inverse of our
prompts (reading a prompt back, writing a canonical reply) that such a server needs to play the judge.

The names are loaded on first access, so ``python -m cyclealign_pl.testing.openai_server`` does not import the
module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Behaviour": "openai_server",
    "LocalOpenAIServer": "openai_server",
    "RecordedRequest": "openai_server",
    "format_reply": "prompt_reader",
    "format_verdict": "prompt_reader",
    "parse_pairwise_prompt": "prompt_reader",
    "parse_prompt": "prompt_reader",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
