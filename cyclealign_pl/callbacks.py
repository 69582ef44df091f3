"""Callbacks: the cycle's metrics (torchmetrics, logged through ``self.log``) and the Hugging Face export."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric, SumMetric

from cyclealign_pl.cycle import StepOutcome
from cyclealign_pl.judges.base import RankRequest
from cyclealign_pl.metrics import RankingAccuracy

log = logging.getLogger(__name__)


class CycleMetrics(Callback):
    """Tracks the cycle per step and as running means over the run (paper Fig. 3, 4 and 5).

    Logged each training step (``cycle/...``): iterations used, agreement rate, judge failures, and, when
    the module has a ``reward_model`` (the reference ranker), the black box's ranking accuracy against it at
    each prompt's last iteration, the mean reward of the sampled candidates and their reward spread
    ("delta score"). ``*_mean`` values are running means since the start of the run (they are checkpointed).
    Judge counters (requests, cache hits, tokens, cost, ...) are logged as ``judge/...``.
    """

    def __init__(self, log_judge_metrics: bool = True) -> None:
        self.log_judge_metrics = log_judge_metrics
        self.running = torch.nn.ModuleDict(
            {
                "iterations": MeanMetric(),
                "agreement": MeanMetric(),
                "judge_failure_rate": MeanMetric(),
                "candidate_reward": MeanMetric(),
                "reward_delta": MeanMetric(),
            }
        )
        self.accuracy = RankingAccuracy()
        self.totals = torch.nn.ModuleDict({"prompts": SumMetric(), "iterations": SumMetric(), "judge_failures": SumMetric()})
        for metric in self._all():
            metric.persistent(True)

    def _all(self):
        return [*self.running.values(), self.accuracy, *self.totals.values()]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for metric in self._all():
            metric.to(pl_module.device)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        outcome: StepOutcome | None = outputs.get("outcome") if isinstance(outputs, dict) else None
        if outcome is None:
            return
        step: dict[str, float] = {}
        iterations = [len(p.iterations) for p in outcome.prompts]
        attempts = [it for p in outcome.prompts for it in p.iterations]
        failures = sum(it.failure is not None for it in attempts)
        step["iterations"] = sum(iterations) / len(iterations)
        step["agreement"] = sum(p.agreed for p in outcome.prompts) / len(outcome.prompts)
        step["judge_failure_rate"] = failures / max(len(attempts), 1)
        self.totals["prompts"].update(len(outcome.prompts))
        self.totals["iterations"].update(sum(iterations))
        self.totals["judge_failures"].update(failures)

        reference = getattr(pl_module, "reward_model", None)
        if reference is not None:
            step.update(self._reference_metrics(reference, batch["prompt"], outcome))

        for name, value in step.items():
            self.running[name].update(value)
            pl_module.log(f"cycle/{name}", value, on_step=True, on_epoch=False, batch_size=len(outcome.prompts))
        for name, metric in self.running.items():
            if metric.update_called:
                value = metric.compute()
                if torch.isfinite(value):
                    pl_module.log(f"cycle/{name}_mean", value, on_step=True, on_epoch=False, prog_bar=name in ("iterations", "agreement"))
        if self.accuracy.update_called:
            for name, value in self.accuracy.compute().items():
                pl_module.log(f"cycle/ranking_{name}_mean", value, on_step=True, on_epoch=False, prog_bar=name == "pairwise_accuracy")
        for name, metric in self.totals.items():
            pl_module.log(f"cycle/total_{name}", metric.compute(), on_step=True, on_epoch=False, reduce_fx="sum")
        judge = getattr(pl_module, "judge", None)
        if self.log_judge_metrics and judge is not None:
            for name, value in judge.metrics().items():
                pl_module.log(f"judge/{name}", float(value), on_step=True, on_epoch=False)

    def _reference_metrics(self, reference, prompts: list[str], outcome: StepOutcome) -> dict[str, float]:
        """Black-box accuracy against the reference ranker at each prompt's last iteration (paper Sec. 4.4)."""
        last = [(prompts[i], p.iterations[-1]) for i, p in enumerate(outcome.prompts) if p.iterations]
        judged = reference.rank([RankRequest(prompt, tuple(it.candidates)) for prompt, it in last])
        predictions, references, rewards, deltas = [], [], [], []
        for (_, it), ref in zip(last, judged):
            if ref.scores is not None:
                rewards.extend(ref.scores)
                deltas.append(max(ref.scores) - min(ref.scores))
            if it.blackbox is not None and ref.ranking is not None:
                predictions.append(it.blackbox)
                references.append(ref.ranking)
        self.accuracy.update(predictions, references)
        out: dict[str, float] = {}
        if rewards:
            out["candidate_reward"] = sum(rewards) / len(rewards)
            out["reward_delta"] = sum(deltas) / len(deltas)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"metrics": {str(i): m.state_dict() for i, m in enumerate(self._all())}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for i, metric in enumerate(self._all()):
            saved = state_dict.get("metrics", {}).get(str(i))
            if saved:
                metric.load_state_dict(saved)
                metric._update_count = 1  # restored running means count as updated


class ExportPretrained(Callback):
    """At the end of ``fit``, write the aligned white-box with ``save_pretrained`` (+ tokenizer).

    The directory loads in plain transformers (``AutoModelForCausalLM.from_pretrained``) or vLLM.
    Default: ``<log_dir>/hf_model``.
    """

    def __init__(self, dirpath: str | None = None, enabled: bool = True) -> None:
        self.dirpath = dirpath
        self.enabled = enabled
        self.exported_to: str | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.interrupted:
            return
        self.exported_to = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf_model")
        self._export(pl_module, self.exported_to)

    @rank_zero_only
    def _export(self, pl_module: LightningModule, path: str) -> None:
        pl_module.model.save_pretrained(path)
        pl_module.tokenizer.save_pretrained(path)
        log.info("exported the aligned white-box to %s", path)
