"""One run per ``trainer.default_root_dir`` (cyclealign_pl.run_dir): where a fit's files go, ``--ckpt_path
last``, a finished run resumed, a second fit into a root that holds a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from cyclealign_pl.cli import EXIT_BAD_INPUT, main
from tests.helpers import cli_args

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def files_under(path: Path) -> dict[str, float]:
    """Every file below ``path`` with its modification time (to tell that nothing was written)."""
    return {str(p.relative_to(path)): p.stat().st_mtime for p in sorted(path.rglob("*")) if p.is_file()}


# -- the default run (tests/conftest.py: one per session): layout, resuming, a second run ----------------


STEPS = 48  # configs/tiny.yaml: limit_train_batches (batch size 1)


@pytest.mark.slow
def test_every_output_of_a_fit_goes_under_default_root_dir(default_run):
    cli, run_dir, workdir = default_run.cli, default_run.root, default_run.workdir
    assert cli.model.counters.steps == STEPS
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


# -- the room's functions -----------------------------------------------------------------------------------


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
