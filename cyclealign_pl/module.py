"""``CycleAlignModule``: the white box as a LightningModule, trained by the cycle in ``cycle.py``.

Manual optimization: one training step (a batch of prompts) takes up to N optimizer steps, so
``trainer.global_step`` counts optimizer steps; ``max_steps`` stops at exactly that many, the prompts in
flight kept in the checkpoint. A stop inside a step saves a checkpoint there; the resumed run redoes that
step without adding its prompts again (docs/reliability.md).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, NoReturn

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from cyclealign_pl import storage
from cyclealign_pl.counters import CycleCounters, RunTotals
from cyclealign_pl.cycle import CycleConfig, StepOutcome, run_cycle
from cyclealign_pl.evaluation.stages import EvaluationHooks, StageEvaluator
from cyclealign_pl.evaluators.pairs import labelled_pairs
from cyclealign_pl.hf import apply_lora, load_causal_lm, load_tokenizer
from cyclealign_pl.judges.accuracy import JudgeAccuracy, JudgeTooWeak, judge_accuracy
from cyclealign_pl.judges.base import Judge, JudgeStop, JudgeUnavailable
from cyclealign_pl.optimization import ManualOptimization
from cyclealign_pl.policy import SamplingConfig, WhiteBox
from cyclealign_pl.rng import restore_rng_state
from cyclealign_pl.run_state import (
    ProcessState,
    checkpoint_entry,
    reopen_unfinished_epoch,
    state_for_rank,
    uncount_current_batch,
)
from cyclealign_pl.settings import EvaluationConfig, JudgeCheckConfig, WhiteBoxConfig
from cyclealign_pl.signals import FitSignals

log = logging.getLogger(__name__)

# hparams hold these dataclasses: allow them in ``torch.load(weights_only=True)`` so checkpoints load safely
torch.serialization.add_safe_globals(
    [CycleConfig, SamplingConfig, WhiteBoxConfig, EvaluationConfig, JudgeCheckConfig]
)


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=5e-5)


class RunStopped(RuntimeError):
    """The run stopped on purpose (judge budget spent, judge failure policy 'stop', signal); a checkpoint was
    saved."""


class CycleAlignModule(ManualOptimization, EvaluationHooks, LightningModule):
    """Aligns a causal LM with a black-box judge by CycleAlign (RRHF or PRO objective).

    Args:
        model: path or hub name of the white box (``AutoModelForCausalLM``; ``local:``/``builtin:`` names).
        model_config: build the white box from scratch from this config dict instead (``model_type`` key).
        tokenizer: tokenizer path; defaults to ``model``; ``"byt5"`` is the file-free byte tokenizer.
        judge: the black box (``OpenAIJudge``, or ``RewardModelJudge`` offline). Needed for ``fit`` only.
        reward_model: the reference ranker during fit and the evaluator of ``validate``.
        cycle: the method (l, N, objective, lambda, demonstrations, the paper's ablations).
        sampling: how candidates are sampled.
        whitebox: the white box's token budget, prompt format and memory settings.
        evaluation: greedy reply length and the collapse monitors of the evaluations.
        judge_check: before training, the judge's accuracy on held-out human-labelled pairs, and the least
            that a fit accepts (off by default: ``pairs: 0``).
        optimizer, lr_scheduler: factories (paper: AdamW-style, lr 5e-5); the schedule steps per optimizer
            step.
        gradient_clip_val: clip the gradient norm (null: no clipping).
        stop_grace_s: after SIGTERM or Ctrl-C, the seconds a fit may take to finish its iteration and save;
            past them it exits (status 3) with the checkpoints it has (null: wait however long it takes).
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
        whitebox: WhiteBoxConfig = WhiteBoxConfig(),
        evaluation: EvaluationConfig = EvaluationConfig(),
        judge_check: JudgeCheckConfig = JudgeCheckConfig(),
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = 1.0,
        stop_grace_s: float | None = 120.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["judge", "reward_model", "optimizer", "lr_scheduler"])
        self.automatic_optimization = False
        whitebox.check_room("sampling.max_new_tokens", sampling.max_new_tokens)
        whitebox.check_room("evaluation.max_new_tokens", evaluation.max_new_tokens)
        if stop_grace_s is not None and not stop_grace_s > 0:
            raise ValueError(f"stop_grace_s must be > 0 or null, got {stop_grace_s}")
        self.cycle_config = cycle.effective()
        self.tokenizer = load_tokenizer(tokenizer or model or "byt5")
        self.model = _load_white_box(model, model_config, self.tokenizer, whitebox)
        self.whitebox = WhiteBox(
            self.model,
            self.tokenizer,
            whitebox.max_length,
            sampling,
            shared_prefix=whitebox.shared_prefix,
            logit_chunk_elements=whitebox.logit_chunk_elements,
            prompt_format=whitebox.prompt_format,
        )
        self.judge = judge
        self.reward_model = reward_model
        self.judge_check = judge_check
        self.judge_check_result: JudgeAccuracy | None = None  # set by the check before training
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.gradient_clip_val = gradient_clip_val
        self.run_state = ProcessState(cycle.demonstration_pool())
        self.evaluator = StageEvaluator(evaluation)
        self.run_id: str | None = None  # names this run in the judge's spend ledger; kept across resumes
        self.totals: RunTotals | None = None  # the counters over all processes, set at the end of training
        self._signals = FitSignals(stop_grace_s)
        self._stopping: str | None = None  # why the current step was asked to stop (all ranks agreed)

    # -- what readers of a trained module look at (callbacks, summary, notebooks, tests) ------------------
    @property
    def counters(self) -> CycleCounters:
        return self.run_state.counters

    @property
    def trained_ids(self) -> list[str]:
        return self.run_state.trained_ids

    @property
    def zero_shot(self) -> dict[str, Any] | None:
        return self.evaluator.zero_shot

    @property
    def evaluation_summary(self) -> dict[str, Any] | None:
        return self.evaluator.summary

    # -- setup --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        for judge in (self.judge, self.reward_model):
            if judge is not None:
                judge.to(self.device)
        if stage != "fit":
            return
        self.totals = None
        if self.judge is None:
            raise ValueError(
                "fit needs a black-box judge: set model.judge (e.g. an OpenAIJudge or RewardModelJudge)"
            )
        self._configure_deepspeed()
        self.judge.use_run_dir(self.trainer.default_root_dir)
        self._preflight()

    def _preflight(self) -> None:
        """An unreachable judge stops the run here, in seconds; all processes stop when any cannot."""
        error: JudgeStop | None = None
        try:
            self.judge.preflight()
        except JudgeStop as failed:
            error = failed
        if self._any_rank(error is not None):
            raise error or JudgeUnavailable("the judge preflight failed on another process")
        if self.judge_check.pairs:
            self._check_judge()

    def _check_judge(self) -> None:
        """The judge's accuracy on human-labelled pairs (rank 0 asks, every rank decides alike)."""
        check, result = self.judge_check, None
        pairs = labelled_pairs(check.data, check.pairs, check.max_chars)  # a bad file fails every rank alike
        if self.trainer.is_global_zero:
            try:
                result = judge_accuracy(self.judge, pairs)
            except JudgeStop as failed:
                result = failed
        result = self.trainer.strategy.broadcast(result, src=0)
        if isinstance(result, JudgeStop):
            raise result
        self.judge_check_result = result
        log.info("judge check: %s", result.line())
        for logger in self.loggers:
            logger.log_metrics(result.metrics(), step=0)
        if check.min_accuracy is not None and not result.accuracy >= check.min_accuracy:
            raise JudgeTooWeak(
                f"it ranks human preferences too poorly to train on: {result.line()}; below "
                f"judge_check.min_accuracy {check.min_accuracy:g}, and a white box trained on a judge at "
                "chance gets worse (docs/real_models.md). Use a stronger judge, or set "
                "--model.judge_check.min_accuracy null to train anyway"
            )

    def teardown(self, stage: str) -> None:
        self._signals.uninstall()  # also after RunStopped, which skips on_train_end
        for judge in (self.judge, self.reward_model):
            if judge is not None:
                judge.close()

    # -- training: the cycle --------------------------------------------------------------------------
    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> dict[str, Any]:
        last = batch_idx + 1 >= self.trainer.num_training_batches  # the epoch's last: finish every prompt
        prompts, ids = list(batch["prompt"]), list(batch["id"])
        if self.run_state.redo_ids is not None:  # the step a stop interrupted, redone after the resume
            if ids == self.run_state.redo_ids:
                prompts, ids = [], []  # its prompts are in flight or done already
            else:
                log.warning(
                    "the resumed data does not start with the batch of the interrupted step (is the train "
                    "dataloader resumable?): its prompts in flight finish along with the next ones"
                )
            self.run_state.redo_ids = None
        self._count_truncated(prompts)
        try:
            outcome = run_cycle(
                self.run_state.cycle,
                self.whitebox,
                self.judge,
                self.run_state.pool,
                prompts,
                ids,
                self.cycle_config,
                update=self._update,
                drain=last,
                any_rank=self._any_rank,
                should_stop=self._should_stop,
                steps_left=self._steps_left,
            )
        except JudgeStop as stop:  # raised outside the judge's answers (a judge's own submit): one process
            self._save_and_stop(f"the judge stopped the run: {stop}", interrupted=list(batch["id"]))
        self.run_state.record(outcome)
        self._log_step(outcome)
        if outcome.interrupted:  # stop here; the resumed run redoes this step
            for callback in self.trainer.callbacks:  # what on_train_batch_end would have recorded
                if hasattr(callback, "record_outcome"):
                    callback.record_outcome(self.trainer, self, outcome)
            self._save_and_stop(self._stopping or "stop requested", interrupted=list(batch["id"]))
        return {"outcome": outcome}

    def _should_stop(self, judge_stop: JudgeStop | None) -> bool:
        """Whether any process was asked to stop (a signal, or its judge stopped the run): collective."""
        self._stopping = self._stop_reason(judge_stop)
        return self._stopping is not None

    def _steps_left(self) -> bool:
        """False once ``trainer.max_steps`` optimizer steps are taken (the same count on every process)."""
        max_steps = self.trainer.max_steps
        return max_steps is None or max_steps < 0 or self.trainer.global_step < max_steps

    def _log_step(self, outcome: StepOutcome) -> None:
        size = max(len(outcome.finished), 1)
        self.log_dict(
            {f"counters/{k}": float(v) for k, v in self.counters.as_dict().items()},
            on_step=True,
            on_epoch=False,
            batch_size=size,
            sync_dist=self.trainer.world_size > 1,  # per process: the logged value is the sum over all
            reduce_fx="sum",
        )
        if outcome.losses:
            for name, values in (
                ("loss", outcome.losses),
                ("rank_loss", outcome.rank_losses),
                ("sft_loss", outcome.sft_losses),
            ):
                self.log(f"train/{name}", sum(values) / len(values), batch_size=size)
            self.log("train/lr", float(self.optimizers().param_groups[0]["lr"]), batch_size=size)

    def _any_rank(self, local: bool) -> bool:
        """True when this process or any other says True (one collective call under data parallelism)."""
        if self.trainer.world_size == 1:
            return local
        return self.trainer.strategy.reduce_boolean_decision(local, all=False)

    def _count_truncated(self, prompts: list[str]) -> None:
        truncated = sum(self.whitebox.prompt_overflow(p) > 0 for p in prompts)
        if truncated and not self.counters.truncated_prompts:
            log.warning(
                "a prompt is longer than whitebox.max_length - sampling.max_new_tokens tokens: it keeps its "
                "last tokens (the latest turns); counted as counters/truncated_prompts"
            )
        self.counters.truncated_prompts += truncated

    # -- the run: slots for the prompts in flight, the judge's spend ledger, the zero-shot evaluation --------
    def on_train_start(self) -> None:
        self._signals.install(self.trainer)
        self.run_state.start(getattr(self.trainer.train_dataloader, "batch_size", None) or 1)
        # the run's id is fixed in <default_root_dir>/run.json when it first starts, before anything is spent,
        # so that a resume after a crash before the first checkpoint counts the spend; one id for all ranks
        run_id = self.run_id or uuid.uuid4().hex
        if self.trainer.is_global_zero:
            run_id = storage.run_identity(self.trainer.default_root_dir, run_id)
        self.run_id = self.trainer.strategy.broadcast(run_id)
        self.judge.bind_run(self.run_id, self.trainer.default_root_dir)  # spend recorded durably under it
        if self.zero_shot is None and self.trainer.global_step == 0 and not self.trained_ids:
            self.evaluator.evaluate_zero_shot(self)

    def on_train_end(self) -> None:
        self._signals.uninstall(disarm=False)
        self.totals = self.run_totals()  # for the end-of-fit summary, which only rank 0 prints
        if self.totals.in_flight and self.trainer.is_global_zero:
            why = (
                "the data ended"
                if self._steps_left()
                else f"trainer.max_steps={self.trainer.max_steps} reached"
            )
            log.warning(
                "training ended with %d prompts in flight (%s): they are in the checkpoint",
                self.totals.in_flight,
                why,
            )

    def on_fit_end(self) -> None:
        if self.totals is None:  # no training ran (a resumed run with nothing left): the checkpoint's state
            self.totals = self.run_totals()

    def _stop_reason(self, judge_stop: JudgeStop | None = None) -> str | None:
        """Why the run should stop now (a signal, or this process's judge stopped the run), agreed by all
        ranks."""
        reason = self._signals.reason(self.trainer)
        if judge_stop is not None:
            reason = f"the judge stopped the run: {judge_stop}"
        if self._any_rank(reason is not None):
            reason = reason or "another process received a stop signal or its judge stopped the run"
        return reason

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.run_state.pending_rng is not None:  # first step after a resume: continue the random streams
            restore_rng_state(self.run_state.pending_rng)
            self.run_state.pending_rng = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # after the callbacks' hooks (metrics, periodic checkpoint) and before Lightning's own SIGTERM exit
        reason = self._stop_reason()
        if reason is not None:
            self._save_and_stop(reason)

    def _save_and_stop(self, reason: str, interrupted: list[str] | None = None) -> NoReturn:
        """Save a checkpoint of the progress so far and raise ``RunStopped``. ``interrupted``: the batch ids
        of the training step this stop interrupts, which the resumed run redoes."""
        path = storage.stop_checkpoint_path(self.trainer)
        self.run_state.interrupted_ids = interrupted
        self.trainer.save_checkpoint(path)
        raise RunStopped(f"{reason}. A checkpoint was saved to {path}; resume with --ckpt_path {path}")

    # -- checkpoints (run_state.py) ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        local = self.run_state.state_dict(self.judge.state_dict() if self.judge is not None else {})
        processes = [local]
        if self.trainer.world_size > 1:  # every rank dumps the checkpoint (rank 0 writes it): a collective
            processes = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(processes, local)
        checkpoint["cyclealign"] = checkpoint_entry(processes, self.run_id, self.zero_shot)
        if self.run_state.interrupted_ids is not None:
            uncount_current_batch(checkpoint)
        if self._trainer is not None and not self._steps_left():
            reopen_unfinished_epoch(checkpoint, self.trainer.num_training_batches)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        entry = checkpoint.get("cyclealign")
        if not entry:
            return
        trainer = self._trainer  # None in load_from_checkpoint
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        mine = state_for_rank(entry, rank, world, fitting=trainer is not None and trainer.state.fn == "fit")
        self.run_id, self.evaluator.zero_shot = entry["run_id"], entry["zero_shot"]
        self.run_state.load_state_dict(mine)
        if self.judge is not None:
            self.judge.load_state_dict(mine["judge"])

    def run_totals(self) -> RunTotals:
        """The counters and the prompts in flight, summed over all processes (a collective call)."""
        local = RunTotals(**self.counters.as_dict(), in_flight=self.run_state.in_flight())
        if self._trainer is None or self.trainer.world_size == 1:
            return local
        values = torch.tensor(list(local.as_dict().values()), device=self.device, dtype=torch.float64)
        totals = self.trainer.strategy.reduce(values, reduce_op="sum")
        return RunTotals(**{name: int(v) for name, v in zip(local.as_dict(), totals.tolist())})


def _load_white_box(
    model: str | None, model_config: dict[str, Any] | None, tokenizer: Any, settings: WhiteBoxConfig
) -> torch.nn.Module:
    """The white box in training mode (``from_pretrained`` hands it over in eval mode), with gradient
    checkpointing and LoRA as set; a ``model_config`` gets the tokenizer's vocabulary and special ids."""
    if model_config is not None:
        model_config = {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **model_config,
        }
    network = load_causal_lm(model, model_config).train()
    if settings.gradient_checkpointing:
        network.gradient_checkpointing_enable()
    if settings.lora is not None:
        network = apply_lora(network, settings.lora)
        if (
            settings.gradient_checkpointing
        ):  # the frozen embeddings give checkpointed blocks no input needing grad
            network.enable_input_require_grads()
    return network
