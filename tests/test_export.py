"""Exports: a failed end-of-fit export is one line and an exit status, with the checkpoints kept."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cyclealign_pl.cli import main
from cyclealign_pl.summary import EXIT_EXPORT_FAILED
from tests.helpers import Capture, cli_args


@pytest.mark.slow
def test_a_failed_end_of_fit_export_is_one_line_with_the_checkpoints_kept(tmp_path: Path, caplog):
    blocked = tmp_path / "not_a_directory"
    blocked.write_text("a file where the export wants a directory")
    run_dir = tmp_path / "run"
    args = cli_args(
        run_dir,
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "0",
        "--export.dirpath",
        str(blocked),
    )
    with caplog.at_level(logging.ERROR), Capture() as captured, pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == EXIT_EXPORT_FAILED
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert f"the end-of-fit export to {blocked} failed" in errors[0] and "checkpoints are kept" in errors[0]
    assert "Traceback" not in captured.err
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "exported model" not in captured.out  # the summary names no export that does not exist
