"""The one-line progress bar (cyclealign_pl.progress)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


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
