"""``CycleAlignModule``: the white-box as a LightningModule, trained by the cycle in ``cycle.py``.

Manual optimization: one training step (one batch of prompts) takes up to ``max_iterations`` optimizer
steps, so ``trainer.global_step`` counts optimizer steps, not batches. Use ``max_epochs`` and
``limit_train_batches`` (or the data module's ``num_train_prompts``) to size a run.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from cyclealign_pl.cycle import CycleConfig, StepOutcome, run_cycle
from cyclealign_pl.demonstrations import DemonstrationPool
from cyclealign_pl.evaluation import (
    GenerationRecord,
    RewardEvaluation,
    gather_records,
    subsets_of,
    write_eval_outputs,
)
from cyclealign_pl.hf import load_causal_lm, load_tokenizer
from cyclealign_pl.judges.base import Judge, JudgeStop
from cyclealign_pl.policy import SamplingConfig, WhiteBox

log = logging.getLogger(__name__)

# hparams hold these dataclasses: allow them in ``torch.load(weights_only=True)`` so checkpoints load safely
torch.serialization.add_safe_globals([CycleConfig, SamplingConfig])

Ablation = Literal["none", "no_d2", "no_icl", "no_wrd", "no_brd", "no_cycle"]


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=5e-5)


class RunStopped(RuntimeError):
    """The run stopped on purpose (judge budget spent, judge failure policy 'stop', signal); a checkpoint was saved."""


class CycleAlignModule(LightningModule):
    """Aligns a causal LM with a black-box judge by CycleAlign (RRHF or PRO objective).

    Args:
        model: path or hub name of the white-box (``AutoModelForCausalLM``).
        model_config: build the white-box from scratch from this config dict instead (``model_type`` key;
            ``vocab_size``, ``pad_token_id`` and ``eos_token_id`` default to the tokenizer's).
        tokenizer: tokenizer path; defaults to ``model``; ``"byt5"`` is the file-free byte tokenizer.
        judge: the black box (e.g. ``OpenAIJudge``, or ``RewardModelJudge`` offline). Needed for ``fit`` only.
        reward_model: the reference ranker (ranking accuracy during fit) and the evaluator (``validate``).
        cycle: the method's settings (l, N, objective, lambda, demonstration source).
        sampling: how candidates are sampled.
        demonstration_scope: ``"step"`` (paper) or ``"run"`` (a pool kept across steps, ``max_demonstrations``).
        ablation: the paper's Table 3 settings, applied on top of ``cycle``: ``no_d2`` (no dynamic
            demonstrations), ``no_icl`` (no demonstrations), ``no_wrd`` (dynamic ones from black-box rankings only),
            ``no_brd`` (from white-box rankings only), ``no_cycle`` (one sample-rank-update per prompt).
        max_length: prompt + response token budget (paper: 512).
        optimizer: optimizer factory (paper: AdamW-style, lr 5e-5).
        gradient_clip_val: clip the gradient norm (None: no clipping).
        gradient_checkpointing: trade compute for memory on large white-boxes.
        eval_max_new_tokens: greedy reply length for ``validate`` (paper setting: 128).
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        judge: Judge | None = None,
        reward_model: Judge | None = None,
        cycle: CycleConfig = CycleConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        demonstration_scope: Literal["step", "run"] = "step",
        max_demonstrations: int | None = None,
        ablation: Ablation = "none",
        max_length: int = 512,
        optimizer: OptimizerCallable = _default_optimizer,
        gradient_clip_val: float | None = 1.0,
        gradient_checkpointing: bool = False,
        eval_max_new_tokens: int = 128,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["judge", "reward_model", "optimizer"])
        self.automatic_optimization = False
        for name, new_tokens in (("sampling.max_new_tokens", sampling.max_new_tokens), ("eval_max_new_tokens", eval_max_new_tokens)):
            if max_length <= new_tokens + 1:
                raise ValueError(f"max_length={max_length} leaves no room for a prompt: it must exceed {name}={new_tokens} + 1")
        self.cycle_config, pool_switches = _apply_ablation(cycle, ablation)
        self.sampling = sampling
        self.tokenizer = load_tokenizer(tokenizer or model or "byt5")
        if model_config is not None:
            model_config = {
                "vocab_size": len(self.tokenizer),
                "pad_token_id": self.tokenizer.pad_token_id,
                "eos_token_id": self.tokenizer.eos_token_id,
                **model_config,
            }
        self.model = load_causal_lm(model, model_config)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.whitebox = WhiteBox(self.model, self.tokenizer, max_length)
        self.judge = judge
        self.reward_model = reward_model
        self.pool = DemonstrationPool(scope=demonstration_scope, max_dynamic=max_demonstrations, **pool_switches)
        self.optimizer_factory = optimizer
        self.gradient_clip_val = gradient_clip_val
        self.eval_max_new_tokens = eval_max_new_tokens
        self.counters: dict[str, int] = {
            "steps": 0,
            "prompts": 0,
            "iterations": 0,
            "optimizer_steps": 0,
            "skipped_updates": 0,
            "nonfinite_updates": 0,
            "agreed_prompts": 0,
            "judge_failures": 0,
        }

    # -- setup --------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return self.optimizer_factory(self.model.parameters())

    def setup(self, stage: str) -> None:
        for judge in (self.judge, self.reward_model):
            if judge is not None:
                judge.to(self.device)
        if stage == "fit" and self.judge is None:
            raise ValueError("fit needs a black-box judge: set model.judge (e.g. an OpenAIJudge or RewardModelJudge)")

    def teardown(self, stage: str) -> None:
        for judge in (self.judge, self.reward_model):
            if judge is not None:
                judge.close()

    # -- training: the cycle --------------------------------------------------------------------------
    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> dict[str, Any]:
        try:
            outcome = run_cycle(
                self.whitebox,
                self.judge,
                self.pool,
                batch["prompt"],
                batch["id"],
                self.cycle_config,
                self.sampling,
                update=self._update,
                any_rank_active=self._any_rank_active,
            )
        except JudgeStop as stop:
            self._stop(f"the judge stopped the run: {stop}")
        self._count(outcome)
        if outcome.losses:
            self.log("train/loss", sum(outcome.losses) / len(outcome.losses), prog_bar=True, batch_size=len(batch["prompt"]))
            self.log("train/rank_loss", sum(outcome.rank_losses) / len(outcome.rank_losses), batch_size=len(batch["prompt"]))
            self.log("train/sft_loss", sum(outcome.sft_losses) / len(outcome.sft_losses), batch_size=len(batch["prompt"]))
        return {"outcome": outcome}

    def _update(self, loss: Tensor | None) -> bool:
        """One optimizer step; skips (and counts) a missing or non-finite loss or gradient.

        With several processes every rank must take part in each backward (gradient all-reduce), so a rank
        without a usable loss backpropagates a zero connected to all parameters instead of skipping.
        """
        distributed = self.trainer.world_size > 1
        if loss is not None and not torch.isfinite(loss).item():
            self.counters["nonfinite_updates"] += 1
            log.warning("non-finite loss %s: update skipped", float(loss.detach()))
            loss = None
        if loss is None:
            if not distributed:
                return False
            loss = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if not self._is_deepspeed():
            if self.gradient_clip_val is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None])
            )
            if not math.isfinite(norm.item()):  # identical on every rank after the all-reduce
                self.counters["nonfinite_updates"] += 1
                log.warning("non-finite gradient norm: update skipped")
                optimizer.zero_grad()
                return False
        optimizer.step()
        return True

    def _any_rank_active(self, local: bool) -> bool:
        if self.trainer.world_size == 1:
            return local
        return self.trainer.strategy.reduce_boolean_decision(local, all=False)

    def _is_deepspeed(self) -> bool:
        return type(self.trainer.strategy).__name__.startswith("DeepSpeed")

    def _count(self, outcome: StepOutcome) -> None:
        c = self.counters
        c["steps"] += 1
        c["prompts"] += len(outcome.prompts)
        c["iterations"] += sum(len(p.iterations) for p in outcome.prompts)
        c["optimizer_steps"] += outcome.updates
        c["skipped_updates"] += outcome.skipped_updates
        c["agreed_prompts"] += sum(p.agreed for p in outcome.prompts)
        c["judge_failures"] += sum(it.failure is not None for p in outcome.prompts for it in p.iterations)

    def _stop(self, reason: str) -> None:
        """Save a checkpoint of the progress so far and end the run with a clear message."""
        path = self._stop_checkpoint_path()
        self.trainer.save_checkpoint(path)
        raise RunStopped(f"{reason}. A checkpoint was saved to {path}; resume with --ckpt_path {path}")

    def _stop_checkpoint_path(self) -> str:
        import os

        return os.path.join(self.trainer.default_root_dir, "checkpoints", "stopped.ckpt")

    # -- evaluation: validate / test / predict (reward scoring) ----------------------------------------
    # Greedy replies to the evaluation prompts, scored by ``reward_model`` (the evaluator); see evaluation.py.
    # Logged as ``<stage>/reward/<subset>`` and ``<stage>/reward/total``; table, generations and metadata go
    # to ``<log_dir>/eval/<stage>_*``. Validation during fit runs the same code (skipped without evaluator).
    def on_validation_epoch_start(self) -> None:
        self._evaluation = self._start_evaluation("val", self.trainer.val_dataloaders)

    def validation_step(self, batch: dict[str, list[str]], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._evaluation = self._start_evaluation("test", self.trainer.test_dataloaders)

    def test_step(self, batch: dict[str, list[str]], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def on_predict_epoch_start(self) -> None:
        self._evaluation = self._start_evaluation("predict", self.trainer.predict_dataloaders)

    def predict_step(
        self, batch: dict[str, list[str]], batch_idx: int, dataloader_idx: int = 0
    ) -> list[GenerationRecord]:
        """Greedy replies (with rewards when ``reward_model`` is set), also written to ``eval/predict_*``."""
        return self._evaluate(batch)

    def on_predict_epoch_end(self) -> None:
        self._finish_evaluation("predict")

    def _start_evaluation(self, stage: str, dataloaders: Any) -> RewardEvaluation | None:
        if self.reward_model is None and stage != "predict":
            if self.trainer.state.fn == "fit":
                if not getattr(self, "_warned_no_evaluator", False):
                    log.warning("no model.reward_model: validation during fit is skipped")
                    self._warned_no_evaluator = True
                return None
            raise ValueError(f"{self.trainer.state.fn.value} scores replies with a reward model: set "
                             "model.reward_model (e.g. --config configs/eval/oasst_rm.yaml)")
        return RewardEvaluation(subsets_of(dataloaders), self.device)

    def _evaluate(self, batch: dict[str, list[str]]) -> list[GenerationRecord]:
        evaluation: RewardEvaluation | None = getattr(self, "_evaluation", None)
        if evaluation is None:
            return []
        return evaluation.step(self.whitebox, self.reward_model, batch, self.eval_max_new_tokens)

    def _finish_evaluation(self, stage: str) -> None:
        evaluation: RewardEvaluation | None = getattr(self, "_evaluation", None)
        self._evaluation = None
        if evaluation is None:
            return
        rows = evaluation.metric.table() if self.reward_model is not None else None  # reduced over ranks
        if rows is not None and stage != "predict":
            for row in rows:
                self.log(f"{stage}/reward/{row.subset}", row.mean_reward, sync_dist=False)
        records = gather_records(evaluation.records)
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # collective: all ranks ask
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            meta = self._evaluation_meta(stage, len(records))
            paths = write_eval_outputs(log_dir, stage, rows, records, meta)
            log.info("%s: %d prompts evaluated; files in %s", stage, len(records), paths["meta"].parent)

    def _evaluation_meta(self, stage: str, prompts: int) -> dict[str, Any]:
        """What was evaluated, for labelling results tables (no dataset text)."""
        data = self.trainer.datamodule
        return {
            "stage": stage,
            "trainer_fn": self.trainer.state.fn.value,
            "checkpoint": self.trainer.ckpt_path,
            "trained_steps": self.counters["steps"],
            "optimizer_steps": self.counters["optimizer_steps"],
            "white_box": self.hparams.get("model") or "model_config",
            "evaluator": repr(self.reward_model),
            "data": type(data).__name__ if data is not None else None,
            "data_args": {k: v for k, v in getattr(data, "hparams", {}).items() if not k.startswith("_")},
            "max_new_tokens": self.eval_max_new_tokens,
            "prompts": prompts,
        }


    # -- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cyclealign"] = {
            "counters": dict(self.counters),
            "pool": self.pool.state_dict(),
            "judge": self.judge.state_dict() if self.judge is not None else {},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("cyclealign")
        if not state:
            return
        self.counters.update(state["counters"])
        self.pool.load_state_dict(state["pool"])
        if self.judge is not None:
            self.judge.load_state_dict(state.get("judge", {}))


def _apply_ablation(cycle: CycleConfig, ablation: str) -> tuple[CycleConfig, dict[str, bool]]:
    """The cycle settings and demonstration switches of one of the paper's Table 3 ablations."""
    from dataclasses import replace

    switches = {"use_static": True, "use_dynamic": True}
    if ablation == "none":
        return cycle, switches
    if ablation == "no_d2":
        return cycle, {**switches, "use_dynamic": False}
    if ablation == "no_icl":
        return cycle, {"use_static": False, "use_dynamic": False}
    if ablation == "no_wrd":
        return replace(cycle, demonstration_source="blackbox"), switches
    if ablation == "no_brd":
        return replace(cycle, demonstration_source="whitebox"), switches
    if ablation == "no_cycle":
        return replace(cycle, max_iterations=1), switches
    raise ValueError(f"unknown ablation {ablation!r}; choose none, no_d2, no_icl, no_wrd, no_brd or no_cycle")
