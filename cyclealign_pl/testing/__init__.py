"""Test support that really runs: a local OpenAI-compatible server (no mocked clients)."""

from cyclealign_pl.testing.openai_server import Behaviour, LocalOpenAIServer, RecordedRequest

__all__ = ["Behaviour", "LocalOpenAIServer", "RecordedRequest"]
