"""Shared test helpers: tiny models built from configs, real judges with simple rules, HH-format files."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from cyclealign_pl.judges.openai import OpenAIJudge
from cyclealign_pl.testing.openai_server import LocalOpenAIServer
from tests.helpers import write_hh_split

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture
def hh_root(tmp_path: Path) -> Callable[..., Path]:
    """A factory for small HH-RLHF directories: ``hh_root(questions, good, bad) -> root``."""

    def make(questions: Sequence[str], good: str = "Sure, glad to help.", bad: str = "No. Go away.") -> Path:
        pairs = [(f"\n\nHuman: {q}\n\nAssistant: {good}", f"\n\nHuman: {q}\n\nAssistant: {bad}") for q in questions]
        write_hh_split(tmp_path / "hh", "harmless-base", "train", pairs)
        write_hh_split(tmp_path / "hh", "harmless-base", "test", pairs[:4])
        return tmp_path / "hh"

    return make


@pytest.fixture
def server():
    """A local OpenAI-compatible server on 127.0.0.1 (the default rule-based ranker unless scripted)."""
    with LocalOpenAIServer() as srv:
        yield srv


@pytest.fixture
def make_judge(server):
    """``make_judge(**overrides) -> OpenAIJudge`` against ``server``, with short timeouts and backoffs; closed after."""
    judges: list[OpenAIJudge] = []

    def make(**kwargs) -> OpenAIJudge:
        settings = {"model": "local-ranker", "base_url": server.url, "request_timeout": 2.0, "max_retries": 2,
                    "backoff_initial_s": 0.02, "backoff_max_s": 0.1, **kwargs}
        judges.append(OpenAIJudge(**settings))
        return judges[-1]

    yield make
    for judge in judges:
        judge.close()
