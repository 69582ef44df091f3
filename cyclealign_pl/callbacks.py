"""Callbacks: the cycle's metrics (torchmetrics, logged through ``self.log``), the Hugging Face export, and
periodic checkpoints that fit the cycle's manual optimization."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric, Metric, SumMetric

from cyclealign_pl import storage
from cyclealign_pl.counters import CycleCounters
from cyclealign_pl.cycle import PromptRecord, StepOutcome, hidden_fraction
from cyclealign_pl.evaluation import reply_stats
from cyclealign_pl.hf import plain_model
from cyclealign_pl.judges.base import RankRequest
from cyclealign_pl.metrics import RankingAccuracy
from cyclealign_pl.storage import StorageError, is_environment_error

log = logging.getLogger(__name__)


class CycleMetrics(Callback):
    """Tracks the cycle per step and as running means over the run (paper Fig. 3, 4 and 5).

    Logged each training step (``cycle/...``), over the prompts that finished in it: iterations used, the
    share that ended by agreement (``agreement``) and the share that ended because their l samples were one
    reply (``identical_samples``: sample collapse, not agreement), judge failure rate, the collapse monitors
    of their sampled candidates (``empty_share``, ``mean_reply_words``, ``distinct_2``, ``looping_share``),
    and, when the module has a ``reward_model`` (the reference ranker),
    the black box's ranking accuracy against it at each prompt's last iteration, the mean reward of the
    sampled candidates and their reward spread ("delta score"). ``*_mean`` values are running means since the
    start of the run (checkpointed, reduced over processes). Throughput: ``cycle/active_fraction`` (the share
    of the batch's slots the rounds kept busy), ``time/<part>_s`` (seconds this step spent generating,
    scoring, waiting for the judge and updating), ``cycle/judge_hidden_fraction_mean`` (the share of the
    judge's latency spent on white-box work instead of waiting, over the run and all processes). Judge
    counters (requests, cache hits, tokens, cost, ...) are logged as ``judge/...``; the module's counters as
    ``counters/...``.

    Args:
        log_judge_metrics: also log the judge's counters (``judge/...``) each step.
    """

    def __init__(self, log_judge_metrics: bool = True) -> None:
        self.log_judge_metrics = log_judge_metrics
        self.running = torch.nn.ModuleDict(
            {
                "iterations": MeanMetric(),
                "agreement": MeanMetric(),
                "identical_samples": MeanMetric(),
                "judge_failure_rate": MeanMetric(),
                "active_fraction": MeanMetric(),
                "candidate_reward": MeanMetric(),
                "reward_delta": MeanMetric(),
            }
        )
        self.accuracy = RankingAccuracy()
        self._rank = 0  # this process's rank, set in setup
        self.judge_time = torch.nn.ModuleDict({"wait_s": SumMetric(), "latency_s": SumMetric()})
        for _, metric in self._named():
            metric.persistent(True)

    def _named(self) -> Iterator[tuple[str, Metric]]:
        """Every metric of the callback with its name in checkpoints."""
        yield from (("running/" + k, m) for k, m in self.running.items())
        yield "accuracy", self.accuracy
        yield from (("judge_time/" + k, m) for k, m in self.judge_time.items())

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank  # setup runs before a checkpoint is restored
        for _, metric in self._named():
            metric.to(pl_module.device)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        outcome: StepOutcome | None = outputs.get("outcome") if isinstance(outputs, dict) else None
        if outcome is not None:
            self.record_outcome(trainer, pl_module, outcome)

    def record_outcome(self, trainer: Trainer, pl_module: LightningModule, outcome: StepOutcome) -> None:
        """Log one step's outcome (also called by the module for rounds run outside a training step)."""
        step: dict[str, float] = {}
        finished = outcome.finished
        attempts = [it for record in finished for it in record.iterations]
        if finished:
            counts = CycleCounters.of(outcome)
            step["iterations"] = counts.mean_iterations
            step["agreement"] = counts.agreed_prompts / counts.prompts
            step["identical_samples"] = counts.identical_sample_prompts / counts.prompts
            step["judge_failure_rate"] = counts.judge_failure_rate or 0.0  # 0 when nothing was judged
            reference = getattr(pl_module, "reward_model", None)
            if reference is not None:
                step.update(self._reference_metrics(reference, finished))
        if outcome.active_fraction is not None:
            step["active_fraction"] = outcome.active_fraction
        size = max(len(finished), 1)
        for name, value in step.items():
            self.running[name].update(value)
            pl_module.log(f"cycle/{name}", value, on_step=True, on_epoch=False, batch_size=size)
        if attempts:
            stats = reply_stats([text for it in attempts for text in it.candidates])
            for name, value in stats._asdict().items():
                pl_module.log(f"cycle/{name}", value, on_step=True, on_epoch=False, batch_size=size)
        # compute() reduces over the processes: every process computes the metrics that any of them updated
        updated = self._updated_anywhere(trainer, [*self.running.values(), self.accuracy])
        for (name, metric), any_updated in zip(self.running.items(), updated):
            if any_updated:
                value = metric.compute()
                if torch.isfinite(value):
                    pl_module.log(
                        f"cycle/{name}_mean",
                        value,
                        on_step=True,
                        on_epoch=False,
                        prog_bar=name in ("iterations", "agreement"),
                    )
        if updated[-1]:
            for name, value in self.accuracy.compute().items():
                pl_module.log(
                    f"cycle/ranking_{name}_mean",
                    value,
                    on_step=True,
                    on_epoch=False,
                    prog_bar=name == "pairwise_accuracy",
                )
        self._log_time(pl_module, outcome)
        judge = getattr(pl_module, "judge", None)
        if self.log_judge_metrics and judge is not None:
            for name, value in judge.metrics().items():
                pl_module.log(f"judge/{name}", float(value), on_step=True, on_epoch=False)

    @staticmethod
    def _updated_anywhere(trainer: Trainer, metrics: list[Metric]) -> list[bool]:
        """Whether any process updated each metric (one collective under data parallelism): a process whose
        prompts did not finish yet must still join the reductions of the others."""
        local = [metric.update_called for metric in metrics]
        if trainer.world_size == 1:
            return local
        flags = torch.tensor(local, dtype=torch.float32, device=trainer.strategy.root_device)
        return (trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()

    def _log_time(self, pl_module: LightningModule, outcome: StepOutcome) -> None:
        """Where this step's time went, and how much of the black box's latency the cycle hid."""
        for name, seconds in outcome.times.items():
            pl_module.log(f"time/{name}", seconds, on_step=True, on_epoch=False)
        pl_module.log("time/judge_latency_s", outcome.judge_latency_s, on_step=True, on_epoch=False)
        self.judge_time["wait_s"].update(outcome.times["judge_wait_s"])
        self.judge_time["latency_s"].update(outcome.judge_latency_s)
        # over the run and all ranks
        hidden = hidden_fraction(
            self.judge_time["wait_s"].compute().item(), self.judge_time["latency_s"].compute().item()
        )
        if hidden is not None:
            pl_module.log("cycle/judge_hidden_fraction_mean", hidden, on_step=True, on_epoch=False)

    def _reference_metrics(self, reference, finished: list[PromptRecord]) -> dict[str, float]:
        """Black-box accuracy against the reference ranker at each prompt's last iteration
        (paper Sec. 4.4)."""
        last = [(record.prompt, record.iterations[-1]) for record in finished if record.iterations]
        judged = reference.rank([RankRequest(prompt, tuple(it.candidates)) for prompt, it in last])
        predictions, references, rewards, deltas = [], [], [], []
        for (_, it), ref in zip(last, judged):
            if ref.scores is not None:
                rewards.extend(ref.scores)
                deltas.append(max(ref.scores) - min(ref.scores))
            if it.blackbox_ranking is not None and ref.ranking is not None:
                predictions.append(it.blackbox_ranking)
                references.append(ref.ranking)
        self.accuracy.update(predictions, references)
        out: dict[str, float] = {}
        if rewards:
            out["candidate_reward"] = sum(rewards) / len(rewards)
            out["reward_delta"] = sum(deltas) / len(deltas)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The metric states summed over all processes (every rank calls this when a checkpoint is saved), so
        the checkpoint holds the run's totals, not rank 0's share; :meth:`load_state_dict` restores them
        once."""
        states = {}
        for name, metric in self._named():
            with metric.sync_context():  # a no-op in one process
                states[name] = metric.state_dict()
        return {"metrics": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_states = state_dict.get("metrics", {})
        for name, metric in self._named():
            saved = saved_states.get(name)
            if saved:
                if self._rank == 0:  # the other processes add their new updates from zero
                    metric.load_state_dict(saved)
                else:
                    metric.reset()
                metric._update_count = 1  # restored running means count as updated (on every rank alike)


class ExportPretrained(Callback):
    """At the end of ``fit``, write the aligned white-box with ``save_pretrained`` (+ tokenizer).

    The directory loads in plain transformers (``AutoModelForCausalLM.from_pretrained``) or vLLM.
    Default: ``<log_dir>/hf_model``. An export that fails is one logged line (``error``; ``fit`` then exits
    with status 5): the run's checkpoints are kept and ``python -m cyclealign_pl export`` writes the model
    from them. A full disk or a read-only folder is a ``StorageError`` instead (status 3): the resumed fit
    exports again.

    Args:
        dirpath: where to write it; null: ``<log_dir>/hf_model`` (under ``trainer.default_root_dir``).
        enabled: false: no export (the checkpoints hold the weights: ``python -m cyclealign_pl export``).
    """

    def __init__(self, dirpath: str | None = None, enabled: bool = True) -> None:
        self.dirpath = dirpath
        self.enabled = enabled
        self.exported_to: str | None = None
        self.error: str | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.interrupted:
            return
        path = self.dirpath or os.path.join(storage.log_dir(trainer), "hf_model")
        try:
            self._export(pl_module, path)
        except StorageError:  # a full disk or read-only folder: status 3, and the resumed fit exports again
            raise
        except (
            Exception
        ) as error:  # after the whole run: one line, never a traceback that hides the checkpoints
            reason = (str(error).strip().splitlines() or [""])[0]
            self.error = (
                f"the end-of-fit export to {path} failed ({type(error).__name__}: {reason}); the checkpoints "
                "are kept: python -m cyclealign_pl export <checkpoint> <out_dir> writes the model from one"
            )
            log.error(self.error)
            return
        self.exported_to = path

    @rank_zero_only
    def _export(self, pl_module: LightningModule, path: str) -> None:
        if os.path.exists(path) and not os.path.isdir(
            path
        ):  # save_pretrained only logs this, writing nothing
            raise NotADirectoryError(f"{path} exists and is not a directory")
        try:
            plain_model(pl_module.model).save_pretrained(path)  # LoRA adapters merged: plain transformers
            pl_module.tokenizer.save_pretrained(path)
        except Exception as err:  # safetensors reports a full disk as its own error, with the OS's words
            if is_environment_error(err) or "os error" in str(err):
                why = getattr(err, "strerror", None) or err
                raise StorageError(
                    f"cannot write the export {path}: {why}; the checkpoints are intact: make room, then "
                    "resume with --ckpt_path last to export again",
                    path,
                ) from err
            raise
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise OSError(f"save_pretrained wrote no config.json into {path}")
        log.info("exported the aligned white-box to %s", path)


class CycleCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves every ``every_n_batches`` training steps and every
    ``train_time_interval``.

    A CycleAlign training step is one batch of prompts and takes up to N optimizer steps. Under manual
    optimization Lightning's ``ModelCheckpoint`` counts ``every_n_train_steps`` in optimizer steps and saves
    only when ``global_step`` is a multiple of it at a batch end, which a cycle of several optimizer steps per
    batch jumps over; it also ignores ``train_time_interval`` there, and skips a save when no optimizer step
    happened since the last one (a batch whose judgments all failed is still progress). This subclass counts
    batches (``trainer.fit_loop.total_batch_idx + 1``, which survives a resume) and honours the time interval;
    all other arguments are ``ModelCheckpoint``'s. Saving at each epoch end stays on (``every_n_epochs=1``),
    so the end of training is always checkpointed. With ``save_last=True``, ``fit --ckpt_path last`` resumes
    from the newest.

    Args:
        every_n_batches: save after every this many training steps (batches); None: by time and epoch only.
        train_time_interval: also save when this much time has passed since the last save (checked at batch
            ends; e.g. ``"0:10:00"`` in YAML).
    """

    def __init__(
        self, every_n_batches: int | None = None, train_time_interval: timedelta | None = None, **kwargs: Any
    ) -> None:
        if kwargs.get("every_n_train_steps"):
            raise ValueError(
                "CycleCheckpoint counts training steps (batches) in every_n_batches; every_n_train_steps "
                "(optimizer steps) is not used under the cycle's manual optimization"
            )
        if every_n_batches is not None and every_n_batches < 1:
            raise ValueError(f"CycleCheckpoint: every_n_batches must be >= 1 or None, got {every_n_batches}")
        if kwargs.get("every_n_epochs") is None:  # the CLI passes None explicitly
            kwargs["every_n_epochs"] = 1
        super().__init__(**kwargs)
        self.every_n_batches = every_n_batches
        self.time_interval = train_time_interval  # not the parent's: it allows only one trigger kind
        self._last_batches_saved = -1
        self._last_save_time: float | None = None

    @staticmethod
    def _batches_done(trainer: Trainer) -> int:
        return trainer.fit_loop.total_batch_idx + 1

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        due = bool(self.every_n_batches) and self._batches_done(trainer) % self.every_n_batches == 0
        if self.time_interval is not None:
            started = self._last_save_time if self._last_save_time is not None else self._last_time_checked
            timed = started is not None and time.monotonic() - started >= self.time_interval.total_seconds()
            due = due or trainer.strategy.broadcast(timed)  # rank 0's clock decides for all
        if not due:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    # the parent's de-duplication compares optimizer steps; a batch without any is progress all the same
    def _should_skip_saving_checkpoint(self, trainer: Trainer) -> bool:
        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or self._last_batches_saved == self._batches_done(trainer)
        )

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._last_batches_saved = self._batches_done(trainer)
        self._last_save_time = time.monotonic()
