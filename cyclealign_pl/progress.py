"""A one-line progress bar with the cycle's key figures under short labels (no ``v_num``).

Lightning's bars show every ``prog_bar`` metric under its full name (``cycle/ranking_pairwise_accuracy_mean``)
plus the logger version, which wraps over several lines on an 80-column terminal. This bar shows at most
:data:`KEY_METRICS`, read from ``trainer.callback_metrics`` whatever their ``prog_bar`` flag, on tqdm's single
line (tqdm trims it to the terminal width).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

# logged name -> label on the bar, in display order
KEY_METRICS: dict[str, str] = {
    "train/loss": "loss",
    "cycle/iterations_mean": "iters",  # running mean of iterations per prompt (falls as the models agree)
    "cycle/agreement_mean": "agree",  # running share of prompts whose rankings agreed
    "cycle/ranking_pairwise_accuracy_mean": "acc",  # black-box ranking accuracy against the reference
}


class CycleProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` showing :data:`KEY_METRICS` only."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        logged = trainer.callback_metrics
        shown: dict[str, Any] = {}
        for name, label in KEY_METRICS.items():
            value = logged.get(name)
            if value is not None:
                shown[label] = float(value.item() if hasattr(value, "item") else value)
        return shown
