"""Test support that really runs: a local OpenAI-compatible server (no mocked clients).

The names are loaded on first access, so ``python -m cyclealign_pl.testing.openai_server`` does not import the
module twice.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Behaviour", "LocalOpenAIServer", "RecordedRequest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cyclealign_pl.testing import openai_server

        return getattr(openai_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
