"""``CycleAlignModule``: the white-box as a LightningModule, trained by the cycle in ``cycle.py``.

Manual optimization: one training step (one batch of prompts) takes up to ``max_iterations`` optimizer
steps, so ``trainer.global_step`` counts optimizer steps, not batches. Use ``max_epochs`` and
``limit_train_batches`` (or the data module's ``num_train_prompts``) to size a run.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from cyclealign_pl.cycle import CycleConfig, CycleState, StepOutcome, run_cycle
from cyclealign_pl.demonstrations import DemonstrationPool
from cyclealign_pl.evaluation import (
    GenerationRecord,
    RewardEvaluation,
    RewardRow,
    collapse_warning,
    gather_records,
    paired_gain,
    reply_stats,
    subsets_of,
    with_reply_stats,
    write_eval_outputs,
)
from cyclealign_pl.hf import apply_lora, load_causal_lm, load_tokenizer
from cyclealign_pl.judges.base import Judge, JudgeStop, JudgeUnavailable
from cyclealign_pl.policy import DEFAULT_LOGIT_CHUNK_ELEMENTS, PromptFormat, SamplingConfig, WhiteBox
from cyclealign_pl.rng import capture_rng_state, restore_rng_state
from cyclealign_pl.signals import StopRequest

log = logging.getLogger(__name__)

# hparams hold these dataclasses: allow them in ``torch.load(weights_only=True)`` so checkpoints load safely
torch.serialization.add_safe_globals([CycleConfig, SamplingConfig])

Ablation = Literal["none", "no_d2", "no_icl", "no_wrd", "no_brd", "no_cycle"]


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=5e-5)


class RunStopped(RuntimeError):
    """The run stopped on purpose (judge budget spent, judge failure policy 'stop', signal); a checkpoint was
    saved."""


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
        demonstration_scope: ``"prompt"`` (paper: each prompt starts from the static demonstration) or
            ``"run"`` (a finished prompt's dynamic demonstrations are kept for later prompts,
            ``max_demonstrations`` newest).
        ablation: the paper's Table 3 settings, applied on top of ``cycle``: ``no_d2`` (no dynamic
            demonstrations), ``no_icl`` (no demonstrations), ``no_wrd`` (dynamic ones from black-box rankings
            only), ``no_brd`` (from white-box rankings only), ``no_cycle`` (one sample-rank-update per
            prompt).
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
        logit_chunk_elements: score replies a chunk of tokens at a time, each chunk at most this many logits
            (recomputed in backward), so scoring memory does not grow with the vocabulary; null: all at once.
        collapse_max_empty_share, collapse_min_distinct_2: evaluation warns that the replies collapsed when
            more than this share of them is empty, or when their distinct-2 falls below this floor.
        prompt_format: ``chat`` renders prompts with the tokenizer's chat template and ends replies at its
            end-of-turn token (chat models); ``dialogue`` is the HH-RLHF ``Human:``/``Assistant:`` text (base
            models, the paper's LLaMA); ``auto``: ``chat`` when the tokenizer has a chat template.
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
        demonstration_scope: Literal["prompt", "step", "run"] = "prompt",
        max_demonstrations: int | None = None,
        ablation: Ablation = "none",
        max_length: int = 512,
        optimizer: OptimizerCallable = _default_optimizer,
        gradient_clip_val: float | None = 1.0,
        gradient_checkpointing: bool = False,
        eval_max_new_tokens: int = 128,
        shared_prefix: bool = True,
        lora: dict[str, Any] | None = None,
        logit_chunk_elements: int | None = DEFAULT_LOGIT_CHUNK_ELEMENTS,
        collapse_max_empty_share: float = 0.5,
        collapse_min_distinct_2: float = 0.02,
        prompt_format: PromptFormat = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["judge", "reward_model", "optimizer"])
        self.automatic_optimization = False
        for name, new_tokens in (
            ("sampling.max_new_tokens", sampling.max_new_tokens),
            ("eval_max_new_tokens", eval_max_new_tokens),
        ):
            if max_length <= new_tokens:
                raise ValueError(
                    f"max_length={max_length} leaves no room for a prompt: it must exceed {name}={new_tokens}"
                )
        if logit_chunk_elements is not None and logit_chunk_elements < 1:
            raise ValueError(f"logit_chunk_elements must be >= 1 or null, got {logit_chunk_elements}")
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
        self.model = load_causal_lm(model, model_config).train()  # from_pretrained hands it over in eval mode
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if lora is not None:
            self.model = apply_lora(self.model, lora)
            if gradient_checkpointing:
                # the frozen embeddings give checkpointed blocks no input that needs grad
                self.model.enable_input_require_grads()
        self.whitebox = WhiteBox(
            self.model,
            self.tokenizer,
            max_length,
            sampling,
            shared_prefix=shared_prefix,
            logit_chunk_elements=logit_chunk_elements,
            prompt_format=prompt_format,
        )
        self.judge = judge
        self.reward_model = reward_model
        self.pool = DemonstrationPool(
            scope=demonstration_scope, max_dynamic=max_demonstrations, **pool_switches
        )
        self.optimizer_factory = optimizer
        self.gradient_clip_val = gradient_clip_val
        self.eval_max_new_tokens = eval_max_new_tokens
        self.collapse_max_empty_share = collapse_max_empty_share
        self.collapse_min_distinct_2 = collapse_min_distinct_2
        self.counters: dict[str, int] = {
            "steps": 0,  # training steps: batches of prompts taken from the data
            "rounds": 0,  # rounds of the cycle (one iteration of every prompt in flight)
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
            "cut_better_replies": 0,  # judge replies cut to fit max_length (trained on without EOS)
            "interrupted_steps": 0,  # steps ended early by a stop request (signal)
        }
        # ids of the prompts trained (this process's batches), in order: checkpointed, so a resumed run shows
        # each once
        self.trained_ids: list[str] = []
        self._stop_request = StopRequest()
        self._pending_rng: dict[str, Any] | None = None
        # the prompts in flight (slots sized by the data's batch size)
        self.cycle_state: CycleState | None = None
        self._pending_cycle_state: dict[str, Any] | None = None
        self.run_id: str | None = None  # names this run in the judge's spend ledger; kept across resumes
        self.zero_shot: dict[str, Any] | None = None  # the untrained white box's evaluation, once per run
        self.evaluation_summary: dict[str, Any] | None = None  # the last validation's headline figures
        # the counters over all processes, set at the end of training
        self.totals: dict[str, int] | None = None

    # -- setup --------------------------------------------------------------------------------------
    def configure_optimizers(self):
        # with LoRA: the adapters only
        return self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])

    def setup(self, stage: str) -> None:
        for judge in (self.judge, self.reward_model):
            if judge is not None:
                judge.to(self.device)
        if stage != "fit":
            return
        if self.judge is None:
            raise ValueError(
                "fit needs a black-box judge: set model.judge (e.g. an OpenAIJudge or RewardModelJudge)"
            )
        self._configure_deepspeed()
        self.judge.use_run_dir(self.trainer.default_root_dir)
        self._preflight()

    def _preflight(self) -> None:
        """An unreachable judge stops the run here, in seconds, before the first step; every process checks
        and all stop together when any of them cannot reach it."""
        error: JudgeStop | None = None
        try:
            self.judge.preflight()
        except JudgeStop as failed:
            error = failed
        if self._any_rank(error is not None):
            error = error or JudgeUnavailable("the judge preflight failed on another process")
        if error is not None:
            raise error

    def _configure_deepspeed(self) -> None:
        """Hand ``gradient_clip_val`` to DeepSpeed, which clips inside its engine (the module's own clipping
        is bypassed there, and Lightning takes DeepSpeed's value from the Trainer, which manual optimization
        leaves unset). A different value already in the DeepSpeed config is a conflict, not something to
        ignore."""
        if not self._is_deepspeed():
            return
        config = self.trainer.strategy.config
        clip = float(self.gradient_clip_val or 0.0)
        given = config.get("gradient_clipping") if isinstance(config, dict) else None
        if given is not None and float(given) != clip:
            raise ValueError(
                f"model.gradient_clip_val={self.gradient_clip_val} and the DeepSpeed config's "
                f"gradient_clipping={given} disagree: set one of them"
            )
        config["gradient_clipping"] = clip

    def teardown(self, stage: str) -> None:
        self._stop_request.uninstall()  # also after RunStopped, which skips on_train_end
        for judge in (self.judge, self.reward_model):
            if judge is not None:
                judge.close()

    # -- training: the cycle --------------------------------------------------------------------------
    def training_step(self, batch: dict[str, list[str]], batch_idx: int) -> dict[str, Any]:
        last = batch_idx + 1 >= self.trainer.num_training_batches  # the epoch's last: finish every prompt
        outcome = self._run_cycle(batch["prompt"], batch["id"], drain=last)
        self._count_truncated(batch["prompt"])
        return {"outcome": outcome}

    def on_train_epoch_end(self) -> None:
        """Prompts still in flight at the end of an epoch (a run resumed after a stop in its last step) finish
        here, before the epoch's checkpoint (the checkpoint callback runs after this hook)."""
        if self.cycle_state is not None and (self.cycle_state.active() or self.cycle_state.waiting):
            outcome = self._run_cycle([], [], drain=True)
            for callback in self.trainer.callbacks:
                if hasattr(callback, "record_outcome"):
                    callback.record_outcome(self.trainer, self, outcome)

    def _run_cycle(self, prompts: list[str], ids: list[str], drain: bool) -> StepOutcome:
        try:
            outcome = run_cycle(
                self.cycle_state,
                self.whitebox,
                self.judge,
                self.pool,
                prompts,
                ids,
                self.cycle_config,
                update=self._update,
                drain=drain,
                any_rank=self._any_rank,
                should_stop=lambda: self._stop_reason() is not None,
            )
        except JudgeStop as stop:
            self._stop(f"the judge stopped the run: {stop}")
        self._count(outcome)
        self.trained_ids.extend(record.prompt_id for record in outcome.finished)
        self._log_step(outcome)
        return outcome

    def _log_step(self, outcome: StepOutcome) -> None:
        size = max(len(outcome.finished), 1)
        sync = self.trainer.world_size > 1  # counters are per process: the logged value is the sum over all
        self.log_dict(
            {f"counters/{k}": float(v) for k, v in self.counters.items()},
            on_step=True,
            on_epoch=False,
            batch_size=size,
            sync_dist=sync,
            reduce_fx="sum",
        )
        if outcome.losses:
            for name, values in (
                ("loss", outcome.losses),
                ("rank_loss", outcome.rank_losses),
                ("sft_loss", outcome.sft_losses),
            ):
                self.log(f"train/{name}", sum(values) / len(values), batch_size=size)

    def _update(self, loss: Tensor | None) -> bool:
        """One optimizer step; skips (and counts) a missing or non-finite loss or gradient.

        With several processes the decision is collective: when no process has a usable loss, every one skips
        (a step on zero gradients would still move the weights through AdamW's momentum and weight decay);
        when some have one, the others backpropagate a zero connected to all parameters, so that every rank
        takes part in the gradient all-reduce and applies the same averaged step.
        """
        if loss is not None and not torch.isfinite(loss).item():
            self.counters["nonfinite_updates"] += 1
            log.warning("non-finite loss %s: update skipped", float(loss.detach()))
            loss = None
        if not self._any_rank(loss is not None):
            return False
        if loss is None:
            loss = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if not self._is_deepspeed():
            if self.gradient_clip_val is not None:
                self.clip_gradients(
                    optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
                )
            norm = torch.linalg.vector_norm(
                torch.stack(
                    [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
                )
            )
            if not math.isfinite(norm.item()):  # identical on every rank after the all-reduce
                self.counters["nonfinite_updates"] += 1
                log.warning("non-finite gradient norm: update skipped")
                optimizer.zero_grad()
                return False
        optimizer.step()
        # DeepSpeed's ZeRO optimizer checks the gradients itself and skips a step on inf/NaN ("overflow")
        if self._is_deepspeed() and getattr(getattr(optimizer, "optimizer", optimizer), "overflow", False):
            self.counters["nonfinite_updates"] += 1
            log.warning("non-finite gradient: DeepSpeed skipped the update")
            return False
        return True

    def _any_rank(self, local: bool) -> bool:
        """True when this process or any other says True (one collective call under data parallelism)."""
        if self.trainer.world_size == 1:
            return local
        return self.trainer.strategy.reduce_boolean_decision(local, all=False)

    def _is_deepspeed(self) -> bool:
        return type(self.trainer.strategy).__name__.startswith("DeepSpeed")

    def _count(self, outcome: StepOutcome) -> None:
        c = self.counters
        iterations = [it for record in outcome.finished for it in record.iterations]
        c["steps"] += 1
        c["rounds"] += outcome.rounds
        c["prompts"] += len(outcome.finished)
        c["iterations"] += len(iterations)
        c["optimizer_steps"] += outcome.updates
        c["skipped_updates"] += outcome.skipped_updates
        c["agreed_prompts"] += sum(record.agreed for record in outcome.finished)
        c["judge_failures"] += sum(it.failure is not None and not it.degenerate for it in iterations)
        c["empty_candidates"] += sum(not text for it in iterations for text in it.candidates)
        c["degenerate_sets"] += sum(it.degenerate for it in iterations)
        c["cut_better_replies"] += outcome.cut_better_replies
        c["interrupted_steps"] += int(outcome.interrupted)

    def _count_truncated(self, prompts: list[str]) -> None:
        truncated = sum(self.whitebox.prompt_overflow(p) > 0 for p in prompts)
        if truncated and not self.counters["truncated_prompts"]:
            log.warning(
                "a prompt is longer than max_length - sampling.max_new_tokens tokens: it keeps its last "
                "tokens (the latest turns); counted as counters/truncated_prompts"
            )
        self.counters["truncated_prompts"] += truncated

    # -- the run: slots for the prompts in flight, the judge's spend ledger, the zero-shot evaluation --------
    def on_train_start(self) -> None:
        self._stop_request.install()
        if self.cycle_state is None:
            loader = self.trainer.train_dataloader
            self.cycle_state = CycleState(getattr(loader, "batch_size", None) or 1)
        if self._pending_cycle_state is not None:
            self.cycle_state.load_state_dict(self._pending_cycle_state)
            self._pending_cycle_state = None
        if self.run_id is None:
            # a new run (a resumed one has its id from the checkpoint); one id for all ranks
            self.run_id = self.trainer.strategy.broadcast(uuid.uuid4().hex)
        self.judge.bind_run(self.run_id, self.trainer.default_root_dir)  # spend recorded durably under it
        if self.zero_shot is None and self.trainer.global_step == 0 and not self.trained_ids:
            self.zero_shot = self._zero_shot_evaluation()

    def on_train_end(self) -> None:
        self._stop_request.uninstall()
        self.totals = self.run_totals()  # for the end-of-fit summary, which only rank 0 prints

    def _stop_reason(self) -> str | None:
        """Why the run should stop now (SIGTERM: Lightning's flag; SIGINT: ours), agreed by all ranks."""
        reason = "received SIGTERM" if self.trainer.received_sigterm else self._stop_request.reason
        if self._any_rank(reason is not None):
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
        """The checkpoint callback's ``last.ckpt`` (so ``--ckpt_path last`` resumes from here), else
        stopped.ckpt."""
        callback = self.trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            return os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
        return os.path.join(self.trainer.default_root_dir, "checkpoints", "stopped.ckpt")

    # -- evaluation: validate / test / predict (reward scoring) ----------------------------------------
    # Greedy replies to the evaluation prompts, scored by ``reward_model`` (the evaluator); see evaluation.py.
    # Logged as ``<stage>/reward/<subset>`` and ``<stage>/reward/total`` with the collapse monitors beside
    # them; table, generations and metadata go to ``<log_dir>/eval/<stage>_*``. Validation during fit runs the
    # same code (skipped without evaluator). The zero-shot model is evaluated once per run, before its first
    # step (kept in the checkpoints), and every later evaluation reports its gain over it, paired by prompt.
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
            raise ValueError(
                f"{self.trainer.state.fn.value} scores replies with a reward model: set "
                "model.reward_model (e.g. --config configs/eval/oasst_rm.yaml)"
            )
        return RewardEvaluation(subsets_of(dataloaders), self.device, self._subset_weights())

    def _subset_weights(self) -> dict[str, float] | None:
        data = self.trainer.datamodule
        weights = getattr(data, "subset_weights", None)
        return weights() if weights is not None else None

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
        records = gather_records(evaluation.records)  # collective: all ranks
        threshold = getattr(self.reward_model, "preferred_threshold", None)
        if rows is not None:
            rows = with_reply_stats(rows, records, threshold)
        summary = self._summarise(stage, rows, records)
        if stage != "predict" and not self.trainer.sanity_checking:
            for row in rows or []:
                self.log(f"{stage}/reward/{row.subset}", row.mean_reward, sync_dist=False)
            for name, value in summary.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.log(f"{stage}/{name}", float(value), sync_dist=False)
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # collective: all ranks ask
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            meta = {**self._evaluation_meta(stage, len(records)), "summary": summary}
            paths = write_eval_outputs(log_dir, stage, rows, records, meta)
            log.info("%s: %d prompts evaluated; files in %s", stage, len(records), paths["meta"].parent)

    def _summarise(
        self, stage: str, rows: list[RewardRow] | None, records: list[GenerationRecord]
    ) -> dict[str, Any]:
        """The figures a user looks at first: the reward, its gain over the zero-shot model (paired by prompt,
        with its standard error) and the collapse monitors; warns when the replies collapsed."""
        stats = reply_stats([r["reply"] for r in records])
        summary: dict[str, Any] = {"prompts": len(records), **stats._asdict()}
        if rows:
            total = rows[-1]
            summary.update(reward=total.mean_reward, preferred_share=total.preferred_share)
        warning = collapse_warning(stats, self.collapse_max_empty_share, self.collapse_min_distinct_2)
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
        if stage == "val" or self.trainer.state.fn == "validate":
            self.evaluation_summary = summary
        return summary

    def _zero_shot_evaluation(self) -> dict[str, Any] | None:
        """Evaluate the untrained white box on the validation prompts once, before the first step; the result
        goes into the checkpoints, so a resumed run and ``validate --ckpt_path`` compare against it."""
        if self.reward_model is None or not self.trainer.limit_val_batches:
            return None
        data = self.trainer.datamodule
        if data is None or not callable(getattr(data, "val_dataloader", None)):
            return None
        loaders = data.val_dataloader()
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        evaluation = RewardEvaluation(subsets_of(loaders), self.device, self._subset_weights())
        limit, rank, world = self.trainer.limit_val_batches, self.trainer.global_rank, self.trainer.world_size
        for loader in loaders:
            # limit_val_batches as Lightning reads it: a count, or a fraction of the loader's batches
            batches = limit if isinstance(limit, int) else max(1, int(len(loader) * limit))
            for index, batch in enumerate(loader):
                if index >= batches:
                    break
                if index % world == rank:  # each process its share of the batches
                    evaluation.step(self.whitebox, self.reward_model, batch, self.eval_max_new_tokens)
        rows = evaluation.metric.table()
        records = gather_records(evaluation.records)
        rows = with_reply_stats(rows, records, getattr(self.reward_model, "preferred_threshold", None))
        if self.trainer.is_global_zero:
            meta = {
                **self._evaluation_meta("zero_shot", len(records)),
                "summary": reply_stats([r["reply"] for r in records])._asdict(),
            }
            write_eval_outputs(
                self.trainer.log_dir or self.trainer.default_root_dir, "zero_shot", rows, records, meta
            )
        total = rows[-1] if rows else None
        log.info(
            "zero-shot evaluation: %d prompts, mean reward %s",
            len(records),
            f"{total.mean_reward:.4g}" if total else "n/a",
        )
        return {
            "rewards": {r["id"]: float(r["reward"]) for r in records if r["reward"] is not None},
            "reward": total.mean_reward if total else None,
            "preferred_share": total.preferred_share if total else None,
        }

    def _evaluation_meta(self, stage: str, prompts: int) -> dict[str, Any]:
        """What was evaluated, for labelling results tables (no dataset text)."""
        data = self.trainer.datamodule
        weights = self._subset_weights()
        return {
            "stage": stage,
            "trainer_fn": self.trainer.state.fn.value,
            "checkpoint": self.trainer.ckpt_path,
            "trained_steps": self.counters["steps"],
            "optimizer_steps": self.counters["optimizer_steps"],
            "white_box": self.hparams.get("model") or "model_config",
            "evaluator": repr(self.reward_model),
            "preferred_threshold": getattr(self.reward_model, "preferred_threshold", None),
            "total_weighting": "subset_size" if weights else "prompts",
            "subset_weights": weights,
            "data": type(data).__name__ if data is not None else None,
            "data_args": {k: v for k, v in getattr(data, "hparams", {}).items() if not k.startswith("_")},
            "max_new_tokens": self.eval_max_new_tokens,
            "prompts": prompts,
        }

    # -- checkpoints ----------------------------------------------------------------------------------
    # Every process has its own prompts in flight, counters, demonstrations and random streams. A checkpoint
    # is written by rank 0, so each process's state is gathered into it (``processes``, one entry per rank)
    # and each process takes its own back on resume.
    def _process_state(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "trained_ids": list(self.trained_ids),
            "pool": self.pool.state_dict(),
            "cycle": self.cycle_state.state_dict()
            if self.cycle_state is not None
            else self._pending_cycle_state,
            "judge": self.judge.state_dict() if self.judge is not None else {},
            "rng": capture_rng_state(),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        local = self._process_state()
        processes = [local]
        if self.trainer.world_size > 1:  # every rank dumps the checkpoint (rank 0 writes it): a collective
            processes = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(processes, local)
        checkpoint["cyclealign"] = {
            "processes": processes,
            "run_id": self.run_id,
            "zero_shot": self.zero_shot,
            # the run as a whole, for readers of the checkpoint (notebooks, tests): not used to resume
            "counters": {name: sum(p["counters"][name] for p in processes) for name in self.counters},
            "trained_ids": [i for p in processes for i in p["trained_ids"]],
            "judge": processes[0]["judge"],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("cyclealign")
        if not state:
            return
        self.run_id = state.get("run_id")
        self.zero_shot = state.get("zero_shot")
        processes = state.get("processes") or [state]  # a checkpoint of one process from before the gathering
        trainer = self._trainer  # None in load_from_checkpoint
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if len(processes) == world:
            mine = processes[rank]
        else:
            mine = self._merged_processes(processes, first=rank == 0)
        self.counters.update(mine["counters"])
        self.trained_ids = list(mine.get("trained_ids", []))
        self._pending_rng = mine.get("rng")
        self._pending_cycle_state = mine.get("cycle")
        self.pool.load_state_dict(mine["pool"])
        if self.judge is not None:
            self.judge.load_state_dict(mine.get("judge", {}))

    def _merged_processes(self, processes: list[dict[str, Any]], first: bool) -> dict[str, Any]:
        """A checkpoint of another number of processes: the totals go to rank 0 (the others start from zero).
        Prompts in flight cannot move between processes, so a fit that has some must resume with as many."""
        in_flight = [
            p
            for p in processes
            if (p.get("cycle") or {}).get("waiting") or any((p.get("cycle") or {}).get("slots", []))
        ]
        if in_flight and self._trainer is not None and self.trainer.state.fn == "fit":
            raise ValueError(
                f"the checkpoint was saved by {len(processes)} processes with prompts in flight; "
                f"resume it with {len(processes)} processes (trainer.devices x num_nodes)"
            )
        counters = {name: sum(p["counters"].get(name, 0) for p in processes) for name in self.counters}
        return {
            "counters": counters if first else dict.fromkeys(self.counters, 0),
            "trained_ids": [i for p in processes for i in p.get("trained_ids", [])] if first else [],
            "pool": processes[0]["pool"] if first else {},
            "cycle": None,
            "judge": processes[0].get("judge", {}) if first else {},
            "rng": processes[0].get("rng") if first else None,
        }

    def run_totals(self) -> dict[str, int]:
        """The counters summed over all processes (a collective call under data parallelism)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return dict(self.counters)
        values = torch.tensor(
            [float(v) for v in self.counters.values()], device=self.device, dtype=torch.float64
        )
        totals = self.trainer.strategy.reduce(values, reduce_op="sum")
        return {name: int(v) for name, v in zip(self.counters, totals.tolist())}


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
