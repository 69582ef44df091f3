"""What the screen shows (cyclealign_pl.console): the user's warnings and errors and the end-of-fit summary;
library chatter goes to ``<root>/run.log``."""

from __future__ import annotations

import io

import pytest

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
