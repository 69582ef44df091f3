"""The command line itself: a fit configured on the command line, a fit against a real OpenAI-compatible
server, a dead judge refused before training, help, and the paper's GPU configs.

Configuration errors (one line, "did you mean", no abbreviations) are in ``test_cli_errors.py``; where a run's
files go and resuming in ``test_run_dir.py``; the end-of-fit report in ``test_summary.py``; the screen and
run.log in ``test_console.py``; the progress bar in ``test_progress.py``.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cyclealign_pl.cli import EXIT_BAD_INPUT, main
from tests.helpers import Capture, cli_args

ROOT = Path(__file__).resolve().parents[1]
TINY_OPENAI = str(ROOT / "configs" / "tiny_openai.yaml")
THREE_STEPS_NO_VALIDATION = ("--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0")


# -- the session's default run (tests/conftest.py) is made once ------------------------------------------


def test_the_tests_reading_the_default_run_share_one_worker(request, default_run):
    """Under ``--dist loadgroup`` (pyproject.toml) the default run is made once, on the worker of its group;
    a pytest whose node ids pytest-xdist cannot tag (9.2 with xdist 3.8) would make it once per worker."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by pytest-xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@default_run")


# -- fits configured on the command line ---------------------------------------------------------------------


def test_a_learning_rate_warm_up_is_a_config_setting_stepped_once_per_optimizer_step(tmp_path):
    """``model.lr_scheduler`` (here a linear warm-up over 4 optimizer steps) is stepped by the cycle's manual
    optimization once per optimizer step, logged as ``train/lr`` and kept in the checkpoint."""
    import torch

    cli = main(
        [
            "fit",
            *cli_args(
                tmp_path,
                *THREE_STEPS_NO_VALIDATION,
                "--model.lr_scheduler",
                "torch.optim.lr_scheduler.LinearLR",
                "--model.lr_scheduler.start_factor",
                "0.25",
                "--model.lr_scheduler.total_iters",
                "4",
            ),
        ]
    )
    module = cli.model
    steps = module.counters.optimizer_steps
    assert steps >= 2
    scheduler = module.lr_schedulers()
    assert scheduler.last_epoch == steps
    base = 1e-4  # configs/tiny.yaml
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(
        base * (0.25 + 0.75 * min(steps, 4) / 4)
    )
    rows = list(csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()))
    logged = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert logged and logged[0] < base and logged == sorted(logged)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == steps

    plateau = type(module)(
        model="builtin:whitebox", lr_scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    )
    with pytest.raises(ValueError, match="ReduceLROnPlateau needs a monitored metric"):
        plateau.configure_optimizers()


@pytest.mark.slow
def test_tiny_fit_against_a_local_openai_compatible_server(tmp_path, monkeypatch):
    """configs/tiny.yaml + configs/tiny_openai.yaml: the black box is a real HTTP server on 127.0.0.1."""
    from tests.openai_server import LocalOpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-local")
    with LocalOpenAIServer() as server:
        cli = main(
            [
                "fit",
                *cli_args(
                    tmp_path,
                    *THREE_STEPS_NO_VALIDATION,
                    "--config",
                    TINY_OPENAI,
                    "--model.judge.init_args.base_url",
                    server.url,
                ),
            ]
        )
        requests_seen = len(server.requests)
    module = cli.model
    assert type(module.judge).__name__ == "OpenAIJudge"
    assert module.counters.steps == 3
    # every iteration with >= 2 distinct candidates asked the server once
    assert requests_seen == module.counters.iterations - module.counters.degenerate_sets > 0
    rows = list(csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()))
    sent = [float(r["judge/requests_sent"]) for r in rows if r.get("judge/requests_sent")]
    assert sent and sent[-1] == requests_seen
    assert any(r.get("judge/prompt_tokens") for r in rows)
    assert (
        tmp_path / "judge_cache.sqlite"
    ).is_file()  # tiny_openai.yaml's relative cache_path, under the root


def closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_dead_judge_fails_before_training_with_one_line(tmp_path):
    """Needs the judge's preflight check (``Judge.preflight``, called in the module's setup).

    Without it this run sends every request to a closed port, takes no optimizer step and exits 4.
    """
    url = f"http://127.0.0.1:{closed_port()}/v1"
    fit = [
        "fit",
        *cli_args(tmp_path / "run", "--config", TINY_OPENAI, "--model.judge.init_args.base_url", url),
    ]
    fit += ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0"]
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-local", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "cyclealign_pl", *fit]
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("cyclealign_pl:")]
    assert len(lines) == 1 and url.rsplit("/", 1)[0] in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- help --------------------------------------------------------------------------------------------------


HEAVY = ("cyclealign_pl.module", "transformers.modeling_utils", "datasets", "deepspeed", "openai")


def test_top_level_help_is_specific_and_imports_no_models_data_or_judges():
    probe = (
        "import sys\nfrom cyclealign_pl.cli import main\ntry:\n    main(['--help'])\n"
        "except SystemExit as e:\n"
        f"    code = e.code\nprint('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m cyclealign_pl ")
    assert "CycleAlign aligns a white-box causal LM" in done.stdout
    assert "Lightning Trainer command line tool" not in done.stdout and "__main__.py" not in done.stdout
    for name in ("fit", "validate", "test", "predict"):
        assert f"\n    {name} " in done.stdout
    assert done.stdout.rstrip().endswith("HEAVY [] 0")


def _option_help(help_text: str) -> dict[str, str]:
    """``--option`` -> its help text (the type/default note removed), from argparse's help layout."""
    options: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        stripped = line.strip()
        if line.startswith("  --"):
            current = stripped.split()[0]
            options[current] = " ".join(stripped.split()[2:]) if "  " in stripped else ""
        elif current and line.startswith(" " * 10) and stripped:
            options[current] += " " + stripped
        else:
            current = None
    return {k: v.split("(type:")[0].strip() for k, v in options.items()}


@pytest.fixture(scope="module")
def fit_help() -> str:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "200")  # wide lines: one option's text is not broken across option names
        with Capture() as capture, pytest.raises(SystemExit):
            main(["fit", "--help"])
    return capture.out


def test_fit_help_names_the_program_and_the_subcommand(fit_help):
    assert fit_help.startswith("usage: python -m cyclealign_pl [options] fit ")
    assert "Align the white box with the black box by CycleAlign" in fit_help
    assert "--report.judge_failure_warning" in fit_help


def test_fit_help_describes_every_method_setting(fit_help):
    """Every ``model.cycle.*`` and ``model.sampling.*`` option has a description (the dataclasses' field
    docs).

    Needs ``Attributes:`` sections in the docstrings of ``CycleConfig`` (cycle.py) and ``SamplingConfig``
    (policy.py).
    """
    options = _option_help(fit_help)
    method = {
        k: v
        for k, v in options.items()
        if k.startswith(("--model.cycle.", "--model.sampling.")) and not k.endswith(("cycle", "sampling"))
    }
    assert len(method) >= 10, sorted(options)[:20]
    undocumented = sorted(k for k, text in method.items() if not text)
    assert not undocumented, f"options without a description: {undocumented}"


def test_fit_help_says_what_this_project_means(fit_help):
    options = _option_help(fit_help)
    ckpt = options["--ckpt_path"]
    assert "'last': the newest checkpoints/last*.ckpt under --trainer.default_root_dir" in ckpt
    assert "registry" not in ckpt and "hpc" not in ckpt  # Lightning's generic keywords are not this CLI's
    for option in ("--export.dirpath", "--export.enabled", "--metrics.log_judge_metrics"):
        assert options[option], f"{option} has no description"
    assert "<log_dir>/hf_model" in options["--export.dirpath"]
    assert "The main advantage is" not in fit_help  # no cut-off sentence from LightningDataModule's docstring
    assert "PromptDataModule (your own prompts" in fit_help
    assert "--model.cycle.demonstration_scope {prompt,run}" in fit_help  # the README's values, no alias


# -- the paper's GPU configs parse (and build what needs no GPU) ---------------------------------------------


@pytest.mark.parametrize("name, objective", [("llama_rrhf.yaml", "rrhf"), ("alpaca_pro.yaml", "pro")])
def test_gpu_configs_parse_and_build_what_needs_no_gpu(name, objective, capsys, monkeypatch):
    config_path = ROOT / "configs" / name
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config_path), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out  # deepspeed may log "[date] [WARNING] ..." lines to stdout on import
    printed = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith("[")))
    assert printed["model"]["cycle"] == {
        **printed["model"]["cycle"],
        "num_candidates": 3,
        "max_iterations": 5,
        "objective": objective,
    }
    assert (
        printed["model"]["whitebox"]["max_length"] == 512 and printed["data"]["init_args"]["batch_size"] == 1
    )
    assert printed["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(5e-5)
    assert printed["data"]["init_args"]["num_train_prompts"] == 1000
    root = printed["trainer"]["default_root_dir"]
    assert root == f"runs/{name.removesuffix('.yaml')}" and root not in out.replace(
        f"default_root_dir: {root}", ""
    )

    # the DeepSpeed ZeRO stage-2 strategy and its config build on the CPU (fit() itself needs CUDA)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy_spec = printed["trainer"]["strategy"]
    assert strategy_spec["class_path"].endswith("DeepSpeedStrategy")
    strategy = DeepSpeedStrategy(**strategy_spec["init_args"])
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"

    # the black box builds without network or key (the key is read at the first request only)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    from cyclealign_pl.judges.openai import OpenAIJudge

    judge_spec = printed["model"]["judge"]
    judge = OpenAIJudge(**judge_spec["init_args"])
    assert judge.settings.model == "gpt-3.5-turbo-0613"
    judge.close()

    from cyclealign_pl.data.hh_rlhf import HHRLHFDataModule

    data = HHRLHFDataModule(**printed["data"]["init_args"])
    assert data.root is None and len(data.subsets) == 4
