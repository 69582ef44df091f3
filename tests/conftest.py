"""Shared fixtures: small HH-RLHF directories, a local OpenAI-compatible server and judges on it (plain
helpers are in ``tests/helpers.py``)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep, not spin
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cyclealign_pl.judges.chat import ChatClient
from cyclealign_pl.judges.openai import OpenAIJudge
from cyclealign_pl.judges.settings import ChatSettings
from tests.helpers import Capture, cli_args, write_hh_split
from tests.openai_server import LocalOpenAIServer

# expensive runs shared by several tests -> the xdist group whose one worker makes them once
SHARED_RUNS = {
    "default_run": "default_run",
    "validated_run": "default_run",
    "interrupted_run": "interrupted_run",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that read one shared run (the session's default run, a module's interrupted run) share an
    xdist worker, so the run is made once."""
    for item in items:
        group = next((SHARED_RUNS[n] for n in getattr(item, "fixturenames", ()) if n in SHARED_RUNS), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def hh_root(tmp_path: Path) -> Callable[..., Path]:
    """A factory for small HH-RLHF directories: ``hh_root(questions, good, bad) -> root``."""

    def make(questions: Sequence[str], good: str = "Sure, glad to help.", bad: str = "No. Go away.") -> Path:
        pairs = [
            (f"\n\nHuman: {q}\n\nAssistant: {good}", f"\n\nHuman: {q}\n\nAssistant: {bad}") for q in questions
        ]
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
    return {
        "model": "local-ranker",
        "base_url": server.url,
        "request_timeout": 2.0,
        "max_retries": 2,
        "backoff_initial_s": 0.02,
        "backoff_max_s": 0.1,
        **overrides,
    }


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


@dataclass
class DefaultRun:
    """The README's first command (``fit --config configs/tiny.yaml``, exactly as shipped), started from
    another working directory: its CLI object, run directory, that working directory and what it printed."""

    cli: Any
    root: Path
    workdir: Path
    output: str

    def copy(self, to: Path) -> Path:
        """A copy of the run directory, for tests that add evaluations or files to it."""
        shutil.copytree(self.root, to)
        return to


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> DefaultRun:
    """One default run for the whole session: the learning, CLI, run-directory, report, console, notebook and
    evaluation tests all read it."""
    from cyclealign_pl.cli import main

    base = tmp_path_factory.mktemp("default-run")
    workdir = base / "cwd"
    workdir.mkdir()
    with pytest.MonkeyPatch.context() as patch, Capture() as capture:
        patch.chdir(workdir)
        cli = main(["fit", *cli_args(base / "run")])
    return DefaultRun(cli, base / "run", workdir, capture.out + capture.err)


@dataclass
class ValidatedRun:
    """A copy of the default run with ``validate --ckpt_path last``, ``validate`` of the zero-shot white box
    and, when the BeaverTails CSV is at hand, a BeaverTails ``validate``: the evaluations a user runs."""

    root: Path
    trained: Any  # the CLI objects of those commands
    zero_shot: Any
    beavertails: Any | None


BEAVERTAILS_CSV = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "beavertails" / "BeaverTails-Evaluation.csv"
)


@pytest.fixture(scope="session")
def validated_run(default_run: DefaultRun, tmp_path_factory: pytest.TempPathFactory) -> ValidatedRun:
    from cyclealign_pl.cli import main

    root = default_run.copy(tmp_path_factory.mktemp("validated") / "run")
    with Capture():
        trained = main(["validate", *cli_args(root, "--ckpt_path", "last")])
        zero_shot = main(["validate", *cli_args(root)])
        beavertails = None
        if BEAVERTAILS_CSV.is_file():
            preset = Path(__file__).resolve().parents[1] / "configs" / "eval" / "beavertails.yaml"
            beavertails = main(
                [
                    "validate",
                    *cli_args(
                        root,
                        "--config",
                        str(preset),
                        "--data.init_args.path",
                        str(BEAVERTAILS_CSV),
                        "--data.init_args.prompts_per_category",
                        "1",
                        "--data.init_args.cache_dir",
                        str(root.parent / "hf-cache"),
                        "--ckpt_path",
                        "last",
                    ),
                ]
            )
    return ValidatedRun(root, trained, zero_shot, beavertails)
