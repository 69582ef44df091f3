"""torchmetrics ``Metric``s of the cycle: ranking accuracy against a reference ranker.

States are sums, so they reduce across processes by summation and survive checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from cyclealign_pl.ranking import exact_match, kendall_tau, pairwise_accuracy


class RankingAccuracy(Metric):
    """How well predicted rankings match reference rankings (paper Fig. 3/5: black box vs reward model).

    ``compute()`` returns the mean over rankings of pairwise accuracy, of Kendall tau and of
    exact match. Rankings with fewer than two common candidates are ignored.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("accuracy_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tau_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("exact", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> None:
        for prediction, reference in zip(predictions, references):
            accuracy = pairwise_accuracy(prediction, reference)
            if accuracy != accuracy:  # NaN: no common pair
                continue
            self.accuracy_sum += accuracy
            self.tau_sum += kendall_tau(prediction, reference)
            self.exact += float(exact_match(prediction, reference))
            self.count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1)
        return {
            "pairwise_accuracy": (self.accuracy_sum / count).float(),
            "kendall_tau": (self.tau_sum / count).float(),
            "exact_match": (self.exact / count).float(),
        }
