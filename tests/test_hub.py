"""An unreachable hub is one line within seconds, naming what was wanted and what to do (cyclealign_pl.hub).

The hub is ``HF_ENDPOINT`` pointed at a closed port on 127.0.0.1: no request leaves the machine. Subprocesses,
because the hub's client reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` when it is imported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
        HF_HOME=str(tmp_path / "hf-home"),  # an empty cache
        HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"),
        PYTHONPATH=str(ROOT),
    )
    return env


TIMED = """
import json, sys, time
from cyclealign_pl.hf import load_causal_lm, load_tokenizer
from cyclealign_pl.data.beavertails import BeaverTailsDataModule
from cyclealign_pl.data.prompts import PromptDataModule
from cyclealign_pl.hub import HubUnreachable
calls = {
    "model": lambda: load_causal_lm("some-org/some-model"),
    "tokenizer": lambda: load_tokenizer("some-org/some-tokenizer"),
    "beavertails": lambda: BeaverTailsDataModule().prepare_data(),
    "prompts": lambda: PromptDataModule("some-org/my-prompts").setup("fit"),
}
out = {}
for name, call in calls.items():
    start = time.monotonic()
    try:
        call()
        out[name] = (None, time.monotonic() - start)
    except HubUnreachable as error:
        out[name] = (str(error), time.monotonic() - start)
print(json.dumps(out))
"""


def test_an_unreachable_hub_fails_in_seconds_naming_what_was_wanted(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", TIMED], env=offline_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    wanted = {
        "model": "'some-org/some-model'",
        "tokenizer": "'some-org/some-tokenizer'",
        "beavertails": "'PKU-Alignment/BeaverTails-Evaluation'",
        "prompts": "'some-org/my-prompts'",
    }
    for name, (message, seconds) in results.items():
        assert message is not None, f"{name}: no error"
        assert seconds < 5, f"{name}: {seconds:.1f} s"
        assert "is unreachable" in message and wanted[name] in message and "HF_HUB_OFFLINE=1" in message
    assert "Retrying" not in done.stderr and "Retrying" not in done.stdout


@pytest.mark.slow
def test_the_beavertails_validate_offline_is_one_line_with_what_to_do(tmp_path: Path) -> None:
    """The README's BeaverTails command with no network: exit status 2, one line, no retry lines."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cyclealign_pl",
            "validate",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--config",
            str(ROOT / "configs" / "eval" / "beavertails.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
        env=offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cyclealign_pl: the Hugging Face hub (http://127.0.0.1:")
    assert "PKU-Alignment/BeaverTails-Evaluation" in lines[0] and "--data.init_args.path" in lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0]
