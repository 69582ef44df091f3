"""Shared fixtures: small HH-RLHF directories, a local OpenAI-compatible server and judges on it (plain helpers
are in ``tests/helpers.py``)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep, not spin
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cyclealign_pl.judges.chat import ChatClient, ChatSettings
from cyclealign_pl.judges.openai import OpenAIJudge
from cyclealign_pl.testing.openai_server import LocalOpenAIServer
from tests.helpers import write_hh_split



@pytest.fixture
def hh_root(tmp_path: Path) -> Callable[..., Path]:
    """A factory for small HH-RLHF directories: ``hh_root(questions, good, bad) -> root``."""

    def make(questions: Sequence[str], good: str = "Sure, glad to help.", bad: str = "No. Go away.") -> Path:
        pairs = [(f"\n\nHuman: {q}\n\nAssistant: {good}", f"\n\nHuman: {q}\n\nAssistant: {bad}")
                 for q in questions]
        write_hh_split(tmp_path / "hh", "harmless-base", "train", pairs)
        write_hh_split(tmp_path / "hh", "harmless-base", "test", pairs[:4])
        return tmp_path / "hh"

    return make


@pytest.fixture
def server():
    """A local OpenAI-compatible server on 127.0.0.1 (the default rule-based ranker unless scripted)."""
    with LocalOpenAIServer() as srv:
        yield srv


def quick_settings(server: LocalOpenAIServer, **overrides) -> dict:
    """Chat settings against ``server`` with short timeouts and backoffs (tests wait seconds, not minutes)."""
    return {"model": "local-ranker", "base_url": server.url, "request_timeout": 2.0, "max_retries": 2,
            "backoff_initial_s": 0.02, "backoff_max_s": 0.1, **overrides}


@pytest.fixture
def make_judge(server):
    """``make_judge(**overrides) -> OpenAIJudge`` against ``server`` (:func:`quick_settings`); closed
    after."""
    judges: list[OpenAIJudge] = []

    def make(**kwargs) -> OpenAIJudge:
        judges.append(OpenAIJudge(**quick_settings(server, **kwargs)))
        return judges[-1]

    yield make
    for judge in judges:
        judge.close()


@pytest.fixture
def make_client(server):
    """``make_client(seed=0, **settings) -> ChatClient`` against ``server`` (:func:`quick_settings`); closed
    after."""
    clients: list[ChatClient] = []

    def make(seed: int = 0, **kwargs) -> ChatClient:
        clients.append(ChatClient(ChatSettings(**quick_settings(server, **kwargs)), seed=seed))
        return clients[-1]

    yield make
    for client in clients:
        client.close()
