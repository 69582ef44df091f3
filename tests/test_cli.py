"""The command line end to end: the tiny fit, where a run's files go, resuming, the end-of-fit report, help.

Configuration errors (one line, "did you mean", no abbreviations) are in ``test_cli_errors.py``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cyclealign_pl.cli import EXIT_BAD_INPUT, EXIT_NO_UPDATE, main
from tests.helpers import Capture, cli_args

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TINY_OPENAI = str(ROOT / "configs" / "tiny_openai.yaml")


def files_under(path: Path) -> dict[str, float]:
    """Every file below ``path`` with its modification time (to tell that nothing was written)."""
    return {str(p.relative_to(path)): p.stat().st_mtime for p in sorted(path.rglob("*")) if p.is_file()}


# -- the default run (tests/conftest.py: one per session): layout, report, resuming, a second run ----------

STEPS = 48  # configs/tiny.yaml: limit_train_batches (batch size 1)


def test_the_tests_reading_the_default_run_share_one_worker(request, default_run):
    """Under ``--dist loadgroup`` (pyproject.toml) the default run is made once, on the worker of its group;
    a pytest whose node ids pytest-xdist cannot tag (9.2 with xdist 3.8) would make it once per worker."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by pytest-xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@default_run")


@pytest.mark.slow
def test_every_output_of_a_fit_goes_under_default_root_dir(default_run):
    cli, run_dir, workdir = default_run.cli, default_run.root, default_run.workdir
    assert cli.model.counters["steps"] == STEPS
    assert list(workdir.iterdir()) == []  # nothing in the working directory (no runs/tiny)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    log_dir = run_dir / "logs" / "version_0"
    assert Path(cli.trainer.log_dir) == log_dir
    # the judge's cache (configs/tiny.yaml), its spend ledger and the run's record
    assert {p.name for p in run_dir.iterdir()} == {
        "checkpoints",
        "logs",
        "judge_cache.sqlite",
        "judge_ledger.sqlite",
        "run.json",
        "run.log",
    }

    rows = list(csv.DictReader((log_dir / "metrics.csv").read_text().splitlines()))
    iterations = [float(r["cycle/iterations"]) for r in rows if r.get("cycle/iterations")]
    assert len(iterations) == STEPS and all(1 <= i <= 5 for i in iterations)
    assert any(r.get("train/loss") for r in rows)
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["cycle"]["num_candidates"] == 3
    assert json.loads((log_dir / "eval" / "val_meta.json").read_text())["trainer_fn"] == "fit"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(log_dir / "hf_model")
    tokenizer = AutoTokenizer.from_pretrained(log_dir / "hf_model")
    for name, tensor in cli.model.model.state_dict().items():
        assert (reloaded.state_dict()[name] == tensor).all(), name
    assert tokenizer("hi").input_ids


@pytest.mark.slow
def test_fit_ends_with_its_paths_and_numbers(default_run):
    cli, run_dir, out = default_run.cli, default_run.root, default_run.output
    counters = cli.model.counters
    report = out[out.index("cyclealign_pl: fit done") :]
    assert (
        f"{counters['steps']} steps, {counters['prompts']} prompts, "
        f"{counters['optimizer_steps']} optimizer steps" in report
    )
    assert f"{counters['iterations'] / counters['prompts']:.2f} iterations per prompt" in report
    judged = counters["iterations"] - counters["degenerate_sets"]
    assert f"{counters['judge_failures']} failed judgments of {judged}" in report
    reward = cli.trainer.callback_metrics["val/reward/total"].item()
    summary = cli.model.evaluation_summary
    assert f"reward {summary['zero_shot_reward']:.4g} (zero-shot) -> {reward:.4g}, gain" in report
    assert f"{summary['reward_gain_z']:+.1f} SE over {summary['paired_prompts']} prompts" in report
    assert f"replies the evaluator prefers: {summary['zero_shot_preferred_share']:.0%} -> " in report
    assert "  result: aligned: the evaluator's reward rose" in report  # the default run aligns its white box
    for what, path in [
        ("checkpoint", run_dir / "checkpoints" / "last.ckpt"),
        ("logs", run_dir / "logs" / "version_0"),
        ("exported model", run_dir / "logs" / "version_0" / "hf_model"),
    ]:
        assert f"  {what}: {path}" in report


LIBRARY_NOISE = (
    "GPU available",
    "TPU available",
    "litlogger",
    "LeafSpec",
    "Total FLOPs",
    "Trainable params",  # the model summary
    "Setting accelerator to CPU",
    "exists and is not empty",
    "weights_only",
    "Generating train split",
    "`Trainer.fit` stopped",
)


@pytest.mark.slow
def test_a_default_fit_shows_its_summary_and_keeps_library_noise_in_the_run_log(default_run):
    out = default_run.output
    shown = [noise for noise in LIBRARY_NOISE if noise in out]
    assert not shown, f"on the screen: {shown}\n{out[-3000:]}"
    assert "cyclealign_pl: fit done" in out and "result: aligned" in out
    run_log = default_run.root / "run.log"
    assert f"  run log: {run_log}" in out
    kept = run_log.read_text(encoding="utf-8")
    for line in ("GPU available: False", "Trainable params", "zero-shot evaluation: 100 prompts"):
        assert line in kept  # not lost: in the run's log file
    # the user's own warnings (here: about their data) stay on the screen
    assert "300 rows, kept 292, dropped 8" in out


def test_the_screen_shows_the_users_warnings_and_errors_not_library_chatter(tmp_path):
    import logging

    from cyclealign_pl import console

    stream = io.StringIO()
    screen = console.RunConsole(stream).install()
    try:
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
        logging.getLogger("some.library").error("a real failure")
        logging.getLogger("cyclealign_pl.data").warning("your file: 3 rows dropped")
        screen._warning(FutureWarning("old API"), FutureWarning, "/x/site-packages/lib/mod.py", 3)
        not_empty = UserWarning("Checkpoint directory x exists and is not empty.")
        screen._warning(not_empty, UserWarning, "/a.py", 1)
        screen._warning(UserWarning("check your prompts"), UserWarning, str(tmp_path / "train.py"), 7)
        path = screen.attach(tmp_path / "run")
        logging.getLogger("lightning.pytorch").info("after attach")
    finally:
        screen.uninstall()
    shown = stream.getvalue()
    assert "a real failure" in shown and "3 rows dropped" in shown and "check your prompts" in shown
    for noise in ("GPU available", "Setting accelerator", "old API", "not empty", "after attach"):
        assert noise not in shown
    kept = path.read_text()
    for line in ("GPU available", "Setting accelerator", "old API", "not empty", "after attach", "3 rows"):
        assert line in kept


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_writes_nothing(default_run, capsys):
    run_dir = default_run.root
    before = files_under(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *cli_args(run_dir, "--ckpt_path", "last")])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"already finished ({STEPS} of {STEPS} steps, 1 of 1 epochs)" in out
    assert str(run_dir / "checkpoints" / "last.ckpt") in out
    assert files_under(run_dir) == before  # no log version, no export, no checkpoint


@pytest.mark.slow
def test_a_new_fit_into_a_root_that_holds_a_run_is_refused(default_run, capsys):
    run_dir = default_run.root
    before = files_under(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *cli_args(run_dir)])
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "already holds a run's checkpoints" in err[0] and "--ckpt_path last" in err[0]
    assert "--trainer.default_root_dir" in err[0]
    assert files_under(run_dir) == before


@pytest.mark.slow
def test_validate_with_ckpt_path_last_reads_the_roots_checkpoint(default_run, tmp_path, capsys):
    run_dir = default_run.copy(tmp_path / "run")
    cli = main(
        [
            "validate",
            "--config",
            TINY,
            "--trainer.default_root_dir",
            str(run_dir),
            "--trainer.limit_val_batches",
            "1",
            "--ckpt_path",
            "last",
        ]
    )
    from cyclealign_pl.progress import CycleProgressBar

    assert isinstance(cli.trainer.progress_bar_callback, CycleProgressBar)  # the CLI's one-line bar
    meta = json.loads((Path(cli.trainer.log_dir) / "eval" / "val_meta.json").read_text())
    assert Path(meta["checkpoint"]) == run_dir / "checkpoints" / "last.ckpt"
    assert meta["trained_steps"] == STEPS and Path(cli.trainer.log_dir).parent == run_dir / "logs"

    # in a root without a run, "last" is an error (validating the untrained model instead would mislead)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *cli_args(tmp_path / "empty", "--ckpt_path", "last")])
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "no last*.ckpt in" in err[0] and str(tmp_path / "empty" / "checkpoints") in err[0]
    )
    assert not (tmp_path / "empty").exists()


def test_run_files_are_placed_under_the_root_unless_set():
    from jsonargparse import Namespace

    from cyclealign_pl.run_dir import checkpoint_dirs, place_run_files

    config = Namespace(
        trainer=Namespace(
            default_root_dir="/r",
            logger=Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=None)
            ),
            callbacks=[
                Namespace(
                    class_path="cyclealign_pl.callbacks.CycleCheckpoint", init_args=Namespace(dirpath=None)
                ),
                Namespace(
                    class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                    init_args=Namespace(dirpath="/elsewhere"),
                ),
                Namespace(
                    class_path="lightning.pytorch.callbacks.LearningRateMonitor", init_args=Namespace()
                ),
            ],
        ),
        model=Namespace(
            judge=Namespace(class_path="x.Judge", init_args=Namespace(cache_path="cache.sqlite"))
        ),
    )
    place_run_files(config)
    assert config.trainer.logger.init_args.save_dir == "/r"
    assert config.trainer.callbacks[0].init_args.dirpath == "/r/checkpoints"
    assert config.trainer.callbacks[1].init_args.dirpath == "/elsewhere"  # set by the user: kept
    assert checkpoint_dirs(config) == [Path("/r/checkpoints"), Path("/elsewhere")]
    assert config.model.judge.init_args.cache_path == "/r/cache.sqlite"


def test_finished_is_lightnings_fit_loop_done():
    from cyclealign_pl.run_dir import CheckpointProgress, finished_message

    one_epoch = CheckpointProgress(epochs=1, batches=48, global_step=131, counters={"steps": 48})
    assert "already finished (48 of 48 steps, 1 of 1 epochs)" in finished_message(one_epoch, 1, -1)
    assert finished_message(one_epoch, 2, -1) is None  # a second epoch to go
    assert finished_message(one_epoch, None, -1) is None  # Lightning's default: 1000 epochs
    assert "131 of 100 optimizer steps" in finished_message(one_epoch, None, 100)
    mid_epoch = CheckpointProgress(epochs=0, batches=20, global_step=55, counters={"steps": 20})
    assert finished_message(mid_epoch, 1, -1) is None


def test_the_progress_bar_shows_a_few_key_metrics_under_short_labels():
    import torch

    from cyclealign_pl.progress import KEY_METRICS, CycleProgressBar

    trainer = SimpleNamespace(
        callback_metrics={
            "train/loss": torch.tensor(21.6),
            "cycle/iterations_mean": torch.tensor(3.25),
            "cycle/agreement_mean": torch.tensor(0.75),
            "cycle/ranking_pairwise_accuracy_mean": torch.tensor(0.5),
            "judge/requests_sent": torch.tensor(40.0),
            "train/sft_loss": 2.0,
        }
    )
    shown = CycleProgressBar().get_metrics(trainer, None)
    assert shown == pytest.approx({"loss": 21.6, "iters": 3.25, "agree": 0.75, "acc": 0.5})
    assert "v_num" not in shown
    postfix = ", ".join(f"{k}={v:.3f}" for k, v in shown.items())
    assert len(postfix) <= 50  # fits beside tqdm's bar on 80 columns
    assert len(KEY_METRICS) == 4


# -- the end-of-fit verdict ----------------------------------------------------------------------------------


def test_a_fit_without_any_optimizer_step_fails_and_says_why():
    from cyclealign_pl.summary import FitSummary, verdict

    dead = FitSummary(
        counters={"steps": 3, "prompts": 3, "iterations": 15, "optimizer_steps": 0, "judge_failures": 15},
        judge={},
        validation_reward=None,
        evaluation={},
    )
    status, messages = verdict(dead, 0.2)
    assert status == EXIT_NO_UPDATE == 4
    assert any("no optimizer step in 3 prompts (15 of 15 judgments failed)" in m for m in messages)
    assert any(m.startswith("warning: 100% of the judgments failed (15 of 15") for m in messages)

    healthy = FitSummary(
        counters={"steps": 3, "prompts": 3, "iterations": 10, "optimizer_steps": 9, "judge_failures": 1},
        judge={},
        validation_reward=None,
        evaluation={},
    )
    assert verdict(healthy, 0.2) == (0, [])
    status, messages = verdict(healthy, 0.05)  # 10% failed: above a 5% threshold
    assert status == 0 and messages == [
        (
            "warning: 10% of the judgments failed (1 of 10; report.judge_failure_warning=0.05): see "
            "judge/failures/* in metrics.csv"
        )
    ]
    no_prompts = FitSummary(
        counters={"steps": 0, "prompts": 0}, judge={}, validation_reward=None, evaluation={}
    )
    assert verdict(no_prompts, 0.2) == (0, [])


def test_the_report_prints_whatever_the_module_and_judge_provide():
    from cyclealign_pl.summary import collect, render

    class Judge:
        def metrics(self):
            return {"requests_sent": 12, "cache_hits": 3, "failures": 1, "cost_usd": 0.0123}

    module = SimpleNamespace(
        counters={
            "steps": 4,
            "prompts": 4,
            "iterations": 12,
            "degenerate_sets": 2,
            "optimizer_steps": 9,
            "judge_failures": 1,
        },
        judge=Judge(),
        evaluation_summary={
            "prompts": 16,
            "empty_share": 0.0625,
            "mean_reply_words": 12.5,
            "distinct_2": 0.5,
            "reward": 0.5,
            "preferred_share": 0.75,
            "zero_shot_reward": -0.25,
            "reward_gain": 0.75,
            "reward_gain_se": 0.125,
            "reward_gain_z": 6.0,
            "paired_prompts": 16,
            "zero_shot_preferred_share": 0.25,
            "collapse_warning": "distinct-2 is 0.010",
        },
    )
    summary = collect(module, {"val/reward/total": 0.5}, {"checkpoint": "/x/last.ckpt", "logs": None})
    lines = render(summary)
    assert lines[0] == "fit done: 4 steps, 4 prompts, 9 optimizer steps, 3.00 iterations per prompt"
    assert (  # the degenerate candidate sets were never sent to the judge
        lines[1]
        == "  judge: 12 requests, 3 cache hits, 1 failed requests, $0.0123, 1 failed judgments of 10 (10.0%)"
    )
    for line in [
        "  evaluation on 16 prompts: reward -0.25 (zero-shot) -> 0.5, gain +0.75 +- 0.12 "
        "(paired standard error; +6.0 SE over 16 prompts)",
        "  replies the evaluator prefers: 25% -> 75%; empty 6%, 12.5 words on average, distinct-2 0.500",
        "  result: aligned: the evaluator's reward rose by more than 2 standard errors",
        "  warning: the replies collapsed: distinct-2 is 0.010",
        "  checkpoint: /x/last.ckpt",
    ]:
        assert line in lines
    for z, result in [(0.5, "no significant change"), (-1.9, "no significant change"), (-3.0, "worse")]:
        module.evaluation_summary["reward_gain_z"] = z
        assert any(line.startswith(f"  result: {result}") for line in render(collect(module, {}, {})))
    without_evaluation = render(collect(SimpleNamespace(counters={}), {"val/reward/total": 0.5}, {}))
    assert "  validation reward (val/reward/total): 0.5" in without_evaluation
    assert not any(line.startswith("  logs") for line in lines)  # no logger: no line

    bare = collect(object(), {}, {})  # a module without counters or judge: nothing to crash on
    assert render(bare)[0].startswith("fit done: 0 steps")


def test_the_judge_failure_threshold_is_a_checked_setting():
    from cyclealign_pl.summary import ReportSettings

    assert ReportSettings().judge_failure_warning == 0.2
    with pytest.raises(ValueError, match="judge_failure_warning must be in"):
        ReportSettings(judge_failure_warning=1.5)


@pytest.mark.slow
def test_a_fit_whose_judge_never_ranks_exits_4_with_a_warning(tmp_path, monkeypatch, capsys):
    """Every judge reply is unparseable: no optimizer step, so the run must not exit 0."""
    from tests.openai_server import Behaviour, LocalOpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-local")
    with (
        LocalOpenAIServer(
            responder=lambda index, body: Behaviour.reply("They all look fine to me.")
        ) as server,
        pytest.raises(SystemExit) as exit_info,
    ):
        main(
            [
                "fit",
                *cli_args(
                    tmp_path / "run",
                    "--config",
                    TINY_OPENAI,
                    "--trainer.limit_train_batches",
                    "2",
                    "--trainer.limit_val_batches",
                    "0",
                    "--model.cycle.max_iterations",
                    "2",
                    "--model.judge.init_args.base_url",
                    server.url,
                ),
            ]
        )
    assert exit_info.value.code == EXIT_NO_UPDATE
    err = capsys.readouterr().err
    assert "cyclealign_pl: error: no optimizer step in 2 prompts (4 of 4 judgments failed)" in err
    assert "cyclealign_pl: warning: 100% of the judgments failed (4 of 4" in err
    assert (
        tmp_path / "run" / "judge_cache.sqlite"
    ).is_file()  # the config's relative cache_path: under the root


def test_a_learning_rate_warm_up_is_a_config_setting_stepped_once_per_optimizer_step(tmp_path):
    """``model.lr_scheduler`` (here a linear warm-up over 4 optimizer steps) is stepped by the cycle's manual
    optimization once per optimizer step, logged as ``train/lr`` and kept in the checkpoint."""
    import torch

    cli = main(
        [
            "fit",
            *cli_args(
                tmp_path,
                "--trainer.limit_train_batches",
                "3",
                "--trainer.limit_val_batches",
                "0",
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
    steps = module.counters["optimizer_steps"]
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
                    "--trainer.limit_train_batches",
                    "3",
                    "--trainer.limit_val_batches",
                    "0",
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
    assert module.counters["steps"] == 3
    # every iteration with >= 2 distinct candidates asked the server once
    assert requests_seen == module.counters["iterations"] - module.counters["degenerate_sets"] > 0
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
    assert "--model.demonstration_scope {prompt,run}" in fit_help  # the README's values, no alias


def test_hf_refuses_a_path_and_a_config_together():
    from cyclealign_pl.hf import ModelLoadError, load_causal_lm, load_reward_model

    with pytest.raises(
        ModelLoadError, match=r"model\.model='some/path' and model\.model_config are both set"
    ):
        load_causal_lm("some/path", {"model_type": "llama"})
    with pytest.raises(ModelLoadError, match="model='some/rm' and config are both set"):
        load_reward_model("some/rm", {"model_type": "llama"})


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
    assert printed["model"]["max_length"] == 512 and printed["data"]["init_args"]["batch_size"] == 1
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
