"""``CycleAlignModule``: the white-box as a LightningModule, trained by the cycle in ``cycle.py``.

Manual optimization: one training step (one batch of prompts) takes up to ``max_iterations`` optimizer
steps, so ``trainer.global_step`` counts optimizer steps, not batches. Use ``max_epochs`` and
``limit_train_batches`` (or the data module's ``num_train_prompts``) to size a run.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from cyclealign_pl.cycle import DEGENERATE_CANDIDATES, CycleConfig, StepOutcome, run_cycle
from cyclealign_pl.demonstrations import DemonstrationPool
from cyclealign_pl.evaluation import (
    GenerationRecord,
    RewardEvaluation,
    gather_records,
    subsets_of,
    write_eval_outputs,
)
from cyclealign_pl.hf import apply_lora, load_causal_lm, load_tokenizer
from cyclealign_pl.judges.base import Judge, JudgeStop
from cyclealign_pl.policy import SamplingConfig, WhiteBox
from cyclealign_pl.rng import capture_rng_state, restore_rng_state
from cyclealign_pl.signals import StopRequest

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
        shared_prefix: score each prompt's candidates from one encoding of the prompt (KV cache) instead of
            one full sequence each: same scores, faster and less memory (docs/scaling.md). Not combined with
            gradient checkpointing (which drops the cache): then full sequences are used.
        lora: train LoRA adapters instead of all weights, e.g. ``{r: 16, lora_alpha: 32, lora_dropout: 0.05}``
            (``peft.LoraConfig`` arguments; needs the ``lora`` extra). Exports merge the adapters.
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
        shared_prefix: bool = True,
        lora: dict[str, Any] | None = None,
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
        if lora is not None:
            self.model = apply_lora(self.model, lora)
            if gradient_checkpointing:  # the frozen embeddings give checkpointed blocks no input that needs grad
                self.model.enable_input_require_grads()
        self.whitebox = WhiteBox(self.model, self.tokenizer, max_length, shared_prefix=shared_prefix)
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
            "empty_candidates": 0,  # sampled replies that were empty (still ranked: the judge decides)
            "degenerate_sets": 0,  # candidate sets with fewer than two distinct replies (not judged)
            "truncated_prompts": 0,  # prompts cut to their last tokens to fit max_length (policy.py)
            "interrupted_steps": 0,  # steps ended early by a stop request (signal)
        }
        # ids of the prompts trained (this process's batches), in order: checkpointed, so a resumed run shows each once
        self.trained_ids: list[str] = []
        self._stop_request = StopRequest()
        self._pending_rng: dict[str, Any] | None = None

    # -- setup --------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])  # LoRA: adapters

    def setup(self, stage: str) -> None:
        for judge in (self.judge, self.reward_model):
            if judge is not None:
                judge.to(self.device)
        if stage == "fit" and self.judge is None:
            raise ValueError("fit needs a black-box judge: set model.judge (e.g. an OpenAIJudge or RewardModelJudge)")

    def teardown(self, stage: str) -> None:
        self._stop_request.uninstall()  # also after RunStopped, which skips on_train_end
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
                should_stop=lambda: self._stop_reason() is not None,
            )
        except JudgeStop as stop:
            self._stop(f"the judge stopped the run: {stop}")
        self._count(outcome)
        self._count_truncated(batch["prompt"])
        self.trained_ids.extend(batch["id"])
        self.log_dict({f"counters/{k}": float(v) for k, v in self.counters.items()}, on_step=True, on_epoch=False,
                      batch_size=len(batch["prompt"]))
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
        c["empty_candidates"] += sum(not text for p in outcome.prompts for it in p.iterations for text in it.candidates)
        c["degenerate_sets"] += sum(it.failure == DEGENERATE_CANDIDATES for p in outcome.prompts for it in p.iterations)
        c["interrupted_steps"] += int(outcome.interrupted)

    def _count_truncated(self, prompts: list[str]) -> None:
        truncated = sum(self.whitebox.prompt_overflow(p, self.sampling.max_new_tokens) > 0 for p in prompts)
        if truncated and not self.counters["truncated_prompts"]:
            log.warning("a prompt is longer than max_length - sampling.max_new_tokens - 1 tokens: it keeps its last "
                        "tokens (the latest turns); counted as counters/truncated_prompts")
        self.counters["truncated_prompts"] += truncated

    # -- clean stop: a signal ends the step after the current iteration, then checkpoint + RunStopped ------
    def on_train_start(self) -> None:
        self._stop_request.install()

    def on_train_end(self) -> None:
        self._stop_request.uninstall()

    def _stop_reason(self) -> str | None:
        """Why the run should stop now (SIGTERM: Lightning's flag; SIGINT: ours), agreed by all ranks."""
        reason = "received SIGTERM" if self.trainer.received_sigterm else self._stop_request.reason
        if self.trainer.world_size > 1 and self.trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            reason = reason or "another process received a stop signal"
        return reason

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:  # first step after a resume: continue the saved random streams
            restore_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # after the callbacks' hooks (metrics, periodic checkpoint) and before Lightning's own SIGTERM exit
        reason = self._stop_reason()
        if reason is not None:
            self._stop(reason)

    def _stop(self, reason: str) -> None:
        """Save a checkpoint of the progress so far and end the run with a clear message."""
        path = self._stop_checkpoint_path()
        self.trainer.save_checkpoint(path)
        raise RunStopped(f"{reason}. A checkpoint was saved to {path}; resume with --ckpt_path {path}")

    def _stop_checkpoint_path(self) -> str:
        """The checkpoint callback's ``last.ckpt`` (so ``--ckpt_path last`` resumes from here), else stopped.ckpt."""
        callback = self.trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            return os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
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
            "trained_ids": list(self.trained_ids),
            "rng": capture_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("cyclealign")
        if not state:
            return
        self.counters.update(state["counters"])
        self.trained_ids = list(state.get("trained_ids", []))
        self._pending_rng = state.get("rng")
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
