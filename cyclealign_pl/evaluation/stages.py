"""The module's evaluations: the validate / test / predict epochs and the zero-shot evaluation of a fit.

Greedy replies to the evaluation prompts, scored by the evaluator (``model.reward_model``), logged as
``<stage>/reward/<subset>`` with the collapse monitors beside them and written to ``<log_dir>/eval/``. The
untrained white box is evaluated once per fit, before its first step; every later evaluation reports its gain
over it, paired by prompt (docs/evaluation.md).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from cyclealign_pl import storage
from cyclealign_pl.evaluation.files import write_eval_outputs
from cyclealign_pl.evaluation.scoring import (
    GenerationRecord,
    RewardEvaluation,
    RewardRow,
    collapse_warning,
    coverage,
    gather_records,
    paired_gain,
    reply_stats,
    subsets_of,
    with_reply_stats,
)
from cyclealign_pl.settings import EvaluationConfig

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

log = logging.getLogger(__name__)


class StageEvaluator:
    """Runs one evaluation epoch at a time for a module that has ``whitebox`` and ``reward_model``."""

    def __init__(self, settings: EvaluationConfig) -> None:
        self.settings = settings
        self.current: RewardEvaluation | None = None  # the epoch in progress
        self.zero_shot: dict[str, Any] | None = None  # the untrained white box's figures, once per run
        self.summary: dict[str, Any] | None = None  # the last validation's headline figures
        self._warned_no_evaluator = False

    # -- one epoch --------------------------------------------------------------------------------------
    def start(self, module: LightningModule, stage: str, dataloaders: Any) -> None:
        self.current = None
        if module.reward_model is None and stage != "predict":
            if module.trainer.state.fn != "fit":
                raise ValueError(
                    f"{module.trainer.state.fn.value} scores replies with a reward model: set "
                    "model.reward_model (e.g. --config configs/eval/oasst_rm.yaml)"
                )
            if not self._warned_no_evaluator:
                log.warning("no model.reward_model: validation during fit is skipped")
                self._warned_no_evaluator = True
            return
        self.current = RewardEvaluation(
            subsets_of(dataloaders), module.device, _subset_weights(module.trainer)
        )

    def step(self, module: LightningModule, batch: dict[str, list[str]]) -> list[GenerationRecord]:
        if self.current is None:
            return []
        return self.current.step(module.whitebox, module.reward_model, batch, self.settings.max_new_tokens)

    def finish(self, module: LightningModule, stage: str) -> None:
        evaluation, self.current = self.current, None
        if evaluation is None:
            return
        trainer = module.trainer
        rows = evaluation.metric.table() if module.reward_model is not None else None  # reduced over ranks
        records = gather_records(evaluation.records)  # collective: all ranks
        if rows is not None:
            rows = with_reply_stats(rows, records, _threshold(module))
        summary = self._summarise(module, stage, rows, records)
        if stage != "predict" and not trainer.sanity_checking:
            for row in rows or []:
                module.log(f"{stage}/reward/{row.subset}", row.mean_reward, sync_dist=False)
            for name, value in summary.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    module.log(f"{stage}/{name}", float(value), sync_dist=False)
        log_dir = storage.log_dir(trainer)  # collective: all ranks ask
        if trainer.is_global_zero and not trainer.sanity_checking:
            meta = {**self._meta(module, stage, len(records)), "summary": summary}
            paths = write_eval_outputs(log_dir, stage, rows, records, meta)
            log.info("%s: %d prompts evaluated; files in %s", stage, len(records), paths["meta"].parent)

    def _summarise(
        self,
        module: LightningModule,
        stage: str,
        rows: list[RewardRow] | None,
        records: list[GenerationRecord],
    ) -> dict[str, Any]:
        """The figures a user looks at first: the reward, its gain over the zero-shot model (paired by prompt,
        with its standard error) and the collapse monitors; warns when the replies collapsed."""
        stats = reply_stats([r["reply"] for r in records])
        summary: dict[str, Any] = {"prompts": len(records), **stats._asdict()}
        summary["coverage"] = _coverage(module.trainer, stage, records)
        if rows:
            summary.update(reward=rows[-1].mean_reward, preferred_share=rows[-1].preferred_share)
        s = self.settings
        warning = collapse_warning(
            stats, s.collapse_max_empty_share, s.collapse_min_distinct_2, s.collapse_max_looping_share
        )
        if warning is not None and records:
            log.warning("%s: the white box's replies collapsed: %s", stage, warning)
            summary["collapse_warning"] = warning
        if self.zero_shot is not None and rows:
            rewards = {r["id"]: r["reward"] for r in records if r["reward"] is not None}
            gain = paired_gain(rewards, self.zero_shot["rewards"])
            if gain is not None:
                summary.update(
                    zero_shot_reward=gain.before,
                    reward_gain=gain.gain,
                    reward_gain_se=gain.standard_error,
                    reward_gain_z=gain.z,
                    paired_prompts=gain.n,
                    zero_shot_preferred_share=self.zero_shot.get("preferred_share"),
                )
        if stage == "val" or module.trainer.state.fn == "validate":
            self.summary = summary
        return summary

    # -- the zero-shot evaluation of a fit ------------------------------------------------------------
    def evaluate_zero_shot(self, module: LightningModule) -> None:
        """Evaluate the untrained white box on the validation prompts (each process its share of the batches),
        once per run; the figures go into the checkpoints, so a resumed run compares against them too."""
        trainer = module.trainer
        data = trainer.datamodule
        if module.reward_model is None or not trainer.limit_val_batches:
            return
        if data is None or not callable(getattr(data, "val_dataloader", None)):
            return
        loaders = data.val_dataloader()
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        evaluation = RewardEvaluation(subsets_of(loaders), module.device, _subset_weights(trainer))
        limit, rank, world = trainer.limit_val_batches, trainer.global_rank, trainer.world_size
        for loader in loaders:
            # limit_val_batches as Lightning reads it: a count, or a fraction of the loader's batches
            batches = limit if isinstance(limit, int) else max(1, int(len(loader) * limit))
            for index, batch in enumerate(loader):
                if index >= batches:
                    break
                if index % world == rank:
                    evaluation.step(module.whitebox, module.reward_model, batch, self.settings.max_new_tokens)
        rows = evaluation.metric.table()  # collective: all ranks
        records = gather_records(evaluation.records)
        rows = with_reply_stats(rows, records, _threshold(module))
        log_dir = storage.log_dir(trainer)  # collective: all ranks ask
        if trainer.is_global_zero:
            stats = reply_stats([r["reply"] for r in records])._asdict()
            write_eval_outputs(
                log_dir,
                "zero_shot",
                rows,
                records,
                {**self._meta(module, "zero_shot", len(records)), "summary": stats},
            )
        total = rows[-1] if rows else None
        log.info(
            "zero-shot evaluation: %d prompts, mean reward %s",
            len(records),
            f"{total.mean_reward:.4g}" if total else "n/a",
        )
        self.zero_shot = {
            "rewards": {r["id"]: float(r["reward"]) for r in records if r["reward"] is not None},
            "reward": total.mean_reward if total else None,
            "preferred_share": total.preferred_share if total else None,
        }

    def _meta(self, module: LightningModule, stage: str, prompts: int) -> dict[str, Any]:
        """What was evaluated, for labelling results tables (no dataset text)."""
        trainer = module.trainer
        data = trainer.datamodule
        weights = _subset_weights(trainer)
        counters = module.run_state.counters
        return {
            "stage": stage,
            "trainer_fn": trainer.state.fn.value,
            "checkpoint": trainer.ckpt_path,
            "trained_steps": counters.steps,
            "optimizer_steps": counters.optimizer_steps,
            "white_box": module.hparams.get("model") or "model_config",
            "evaluator": repr(module.reward_model),
            "preferred_threshold": _threshold(module),
            "total_weighting": "subset_size" if weights else "prompts",
            "subset_weights": weights,
            "data": type(data).__name__ if data is not None else None,
            "data_args": {k: v for k, v in getattr(data, "hparams", {}).items() if not k.startswith("_")},
            "max_new_tokens": self.settings.max_new_tokens,
            "prompts": prompts,
        }


def _threshold(module: LightningModule) -> float | None:
    return getattr(module.reward_model, "preferred_threshold", None)


def _subset_weights(trainer: Trainer) -> dict[str, float] | None:
    weights = getattr(trainer.datamodule, "subset_weights", None)
    return weights() if weights is not None else None


def _coverage(trainer: Trainer, stage: str, records: list[GenerationRecord]) -> dict[str, Any]:
    """What this evaluation scored out of its data; a warning when it left prompts or subsets out."""
    covered = coverage(getattr(trainer, f"{stage}_dataloaders", None), records)
    group = getattr(trainer.datamodule, "group_name", "subset")
    if not covered.complete and records and not trainer.sanity_checking:
        limit = getattr(trainer, f"limit_{stage}_batches", None)
        hint = (
            f"; trainer.limit_{stage}_batches={limit:g} stopped it early: set "
            f"--trainer.limit_{stage}_batches null to score them all"
            if isinstance(limit, int) or (isinstance(limit, float) and limit < 1.0)  # 1 batch vs all
            else ""
        )
        log.warning(
            "%s scored only %s%s%s",
            stage,
            covered.describe(group),
            f"; not scored: {covered.missing_text()}" if covered.missing else "",
            hint,
        )
    return {**covered._asdict(), "group": group, "missing": covered.missing, "complete": covered.complete}


class EvaluationHooks:
    """The validate / test / predict hooks of ``CycleAlignModule`` (a mixin: it needs ``self.evaluator``)."""

    def on_validation_epoch_start(self) -> None:
        self.evaluator.start(self, "val", self.trainer.val_dataloaders)

    def validation_step(self, batch: dict[str, list[str]], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluator.step(self, batch)

    def on_validation_epoch_end(self) -> None:
        self.evaluator.finish(self, "val")

    def on_test_epoch_start(self) -> None:
        self.evaluator.start(self, "test", self.trainer.test_dataloaders)

    def test_step(self, batch: dict[str, list[str]], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluator.step(self, batch)

    def on_test_epoch_end(self) -> None:
        self.evaluator.finish(self, "test")

    def on_predict_epoch_start(self) -> None:
        self.evaluator.start(self, "predict", self.trainer.predict_dataloaders)

    def predict_step(
        self, batch: dict[str, list[str]], batch_idx: int, dataloader_idx: int = 0
    ) -> list[GenerationRecord]:
        """Greedy replies (with rewards when ``reward_model`` is set), also written to ``eval/predict_*``."""
        return self.evaluator.step(self, batch)

    def on_predict_epoch_end(self) -> None:
        self.evaluator.finish(self, "predict")
