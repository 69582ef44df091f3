"""``fit``, ``validate``, ``test``, ``predict``: a LightningCLI over the module and a data module.

``python -m cyclealign_pl`` dispatches here (``commands.py``). The metrics callback and the Hugging Face
export are always on (``metrics:``, ``export:``); ``report:`` sets how the end-of-fit report judges the run.
A run's files go under ``trainer.default_root_dir``, one run per directory (``run_dir.py``). Bad
configuration fails before any model is built, in one line (``cli_parser.py``); bad input found while
running ends the run with its message, without a traceback. Exit statuses: docs/reliability.md.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cyclealign_pl.cli_parser import EXIT_BAD_INPUT, OneLineParser
from cyclealign_pl.commands import DESCRIPTION, HELP_FLAGS, LIGHTNING_SUBCOMMANDS, PROG, SUBCOMMANDS, fail
from cyclealign_pl.signals import EXIT_STOPPED
from cyclealign_pl.summary import EXIT_NO_UPDATE

__all__ = ["EXIT_BAD_INPUT", "EXIT_NO_UPDATE", "EXIT_STOPPED", "CycleAlignCLI", "main"]

_LAST = (
    "'last': the newest checkpoints/last*.ckpt under --trainer.default_root_dir (this run's own: one run "
    "per directory)"
)
CKPT_PATH_HELP = {
    "fit": (
        f"Resume a run: {_LAST}, or none there yet: start the run; or a checkpoint file. Without it, a "
        "directory that already holds a run is refused. A finished run says so and exits 0."
    ),
    **{
        name: (
            f"The weights to {verb}: {_LAST}; or a checkpoint file; none: the untrained white box (the "
            "zero-shot row)."
        )
        for name, verb in (("validate", "evaluate"), ("test", "evaluate"), ("predict", "reply with"))
    },
}
DATA_HELP = (
    "The prompts (a LightningDataModule): HHRLHFDataModule (training and per-subset evaluation), "
    "BeaverTailsDataModule (evaluation per harm category), PromptDataModule (your own prompts: a JSONL, CSV "
    "or Parquet file or a hub dataset); --data.help CLASS lists a module's settings"
)


class CycleAlignParser(OneLineParser, LightningArgumentParser):
    """LightningCLI's parser with one-line errors and without abbreviated options."""


def _parser_kwargs() -> dict[str, Any]:
    kwargs: dict[str, Any] = {"prog": PROG, "description": DESCRIPTION}
    for name in LIGHTNING_SUBCOMMANDS:
        kwargs[name] = {"description": SUBCOMMANDS[name].description}
    return kwargs


class CycleAlignCLI(LightningCLI):
    _finishing = False  # resuming a fit killed during its end: only its end (export, evaluation) is redone

    def add_arguments_to_parser(self, parser) -> None:
        from cyclealign_pl.callbacks import CycleMetrics, ExportPretrained
        from cyclealign_pl.summary import ReportSettings

        parser.add_lightning_class_args(CycleMetrics, "metrics")
        parser.add_lightning_class_args(ExportPretrained, "export")
        parser.add_class_arguments(ReportSettings, "report")

    def parse_arguments(self, parser, args) -> None:
        """Parse, place the run's files under ``trainer.default_root_dir``, then validate.

        The configs leave the logger's ``save_dir`` unset (it is required by the loggers' signatures), so the
        paths are filled in between parsing and validation (``run_dir.place_run_files``).
        """
        if isinstance(args, (dict, Namespace)):  # a config object given from Python: already complete
            super().parse_arguments(parser, args)
            return
        config = parser.parse_args(args, _skip_validation=True)
        subcommand = config.get("subcommand")
        from cyclealign_pl import run_dir

        run_dir.place_run_files(config.get(subcommand) if subcommand else config)
        try:
            parser.validate(config)
        except (TypeError, KeyError, ValueError) as error:
            culprit = self._subcommand_parsers.get(subcommand, parser) if subcommand else parser
            culprit.error(str(error), error)
        self.config = config

    def _error(self, message: str) -> None:
        self._parser(self.subcommand).error(message)

    def before_instantiate_classes(self) -> None:
        """Checks that need no model: place the run's files, refuse what would mix runs, stop a finished
        one."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None or config.get("trainer") is None:
            return
        from cyclealign_pl import run_dir

        self._check_strategy(config["trainer"])
        from cyclealign_pl.hf import white_box_conflict

        model = config.get("model")
        conflict = model is not None and white_box_conflict(model.get("model"), model.get("model_config"))
        if conflict:
            self._error(conflict)
        if self.subcommand is not None:
            self._resolve_checkpoint(config, run_dir)
            from cyclealign_pl import console

            console.attach(run_dir.root_dir(config))  # what the screen does not show goes to <root>/run.log

    def _check_strategy(self, trainer) -> None:
        """DeepSpeed runs on CUDA GPUs only: say so before any model is built (Lightning fails deep in
        fit)."""
        import torch

        strategy = trainer.get("strategy")
        name = strategy if isinstance(strategy, str) else str(getattr(strategy, "class_path", "") or "")
        if "deepspeed" in name.lower() and (
            trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()
        ):
            self._error(
                f"trainer.strategy={name} needs CUDA GPUs (trainer.accelerator: gpu); none is available "
                "here. On the CPU use --trainer.strategy ddp (docs/scaling.md)"
            )

    def _resolve_checkpoint(self, config, run_dir) -> None:
        """``--ckpt_path last`` -> this root's newest loadable ``last*.ckpt``; one run per root; nothing to do
        if done."""
        dirs = run_dir.checkpoint_dirs(config)
        if config.get("ckpt_path") == "last" and dirs:
            last = self._newest_loadable(dirs, run_dir)
            config["ckpt_path"] = str(last) if last is not None else None
        if self.subcommand != "fit":
            return
        ckpt_path = config.get("ckpt_path")
        try:
            run_dir.refuse_second_run(dirs, ckpt_path)
        except run_dir.RunDirError as error:
            self._error(str(error))
        if ckpt_path is not None and ckpt_path != "last":
            self._resume_or_finish(config, ckpt_path, run_dir)

    def _newest_loadable(self, dirs, run_dir):
        """The checkpoint ``--ckpt_path last`` means (newer damaged ones are named); None: ``fit`` starts."""
        from cyclealign_pl import storage

        for folder in dirs:  # what a writer killed mid-checkpoint left
            storage.remove_temporaries(folder)
        last, skipped = run_dir.resolve_resumable(dirs)
        where = ", ".join(map(str, dirs))
        if skipped:
            damaged = "; ".join(f"{p.name} ({why})" for p, why in skipped)
            if last is None:
                self._error(
                    f"--ckpt_path last: no checkpoint in {where} loads: {damaged}; start again in another "
                    "--trainer.default_root_dir"
                )
            print(
                f"cyclealign_pl: resuming from {last}: newer checkpoints do not load: {damaged}",
                file=sys.stderr,
            )
        if last is None and self.subcommand != "fit":
            self._error(
                f"--ckpt_path last: no last*.ckpt in {where}; train with fit first, or give a checkpoint file"
            )
        if last is None:
            print(f"cyclealign_pl: no checkpoint in {dirs[0]} yet: starting a new run", file=sys.stderr)
        return last

    def _resume_or_finish(self, config, ckpt_path: str, run_dir) -> None:
        """Say how far the checkpoint got; a finished fit exits 0, one killed during its end is finished."""
        from pathlib import Path

        from cyclealign_pl import storage

        progress = run_dir.read_checkpoint_progress(Path(ckpt_path))
        if progress is None:
            return
        trainer = config["trainer"]
        done = run_dir.finished_message(progress, trainer.get("max_epochs"), trainer.get("max_steps"))
        if done is None:
            steps = progress.counters.get("steps", progress.batches)
            print(  # Lightning's "Restored all states" line is in the run log
                f"cyclealign_pl: resuming from {ckpt_path} ({steps} steps, "
                f"{progress.global_step} optimizer steps done)",
                file=sys.stderr,
            )
            return
        if storage.run_record(run_dir.root_dir(config)).get("fit_complete") is True:
            print(f"cyclealign_pl: {ckpt_path}: {done}")
            sys.exit(0)
        # killed during the final evaluation or the export: Lightning skips the finished training loop;
        # after_fit does the export, the evaluation and the summary again
        print(
            f"cyclealign_pl: {ckpt_path}: the training is finished but the fit did not reach its end: "
            "finishing it (export, final evaluation, summary)",
            file=sys.stderr,
        )
        self._finishing = True

    def instantiate_classes(self) -> None:
        from cyclealign_pl.hf import ModelLoadError

        try:
            super().instantiate_classes()
        except (ValueError, TypeError, ModelLoadError) as error:  # bad values that only a constructor can see
            self._error(f"invalid configuration: {error}")

    def instantiate_trainer(self, **kwargs: Any):
        """The trainer, with the one-line progress bar unless the config chose a bar or none, and the model
        summary in the run's log file rather than on the screen."""
        from lightning.pytorch.callbacks import ModelSummary, ProgressBar

        from cyclealign_pl.progress import CycleProgressBar

        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks = [*callbacks, CycleProgressBar()]
        if trainer_config.get("enable_model_summary") is not False and not any(
            isinstance(c, ModelSummary) for c in callbacks
        ):
            callbacks = [*callbacks, ModelSummary()]  # logs at INFO: run.log (Lightning's default prints)
        trainer_config["callbacks"] = callbacks
        self._atomic_checkpoints(trainer_config)
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def _atomic_checkpoints(trainer_config: dict[str, Any]) -> None:
        """Checkpoints written atomically in their own folder (``storage.AtomicCheckpointIO``), unless the
        config chose a ``CheckpointIO`` or DeepSpeed (which writes its own checkpoint directories)."""
        from lightning.fabric.plugins import CheckpointIO

        from cyclealign_pl.storage import AtomicCheckpointIO

        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        strategy = trainer_config.get("strategy")
        name = strategy if isinstance(strategy, str) else type(strategy).__name__
        if "deepspeed" in str(name).lower() or any(isinstance(p, CheckpointIO) for p in plugins):
            return
        trainer_config["plugins"] = [*plugins, AtomicCheckpointIO()]

    def before_fit(self) -> None:
        """The run's record says this fit has not reached its end yet (until :meth:`after_fit` is done)."""
        from cyclealign_pl import storage

        if self.trainer.is_global_zero:
            storage.update_run_record(self.trainer.default_root_dir, fit_complete=False)

    def after_fit(self) -> None:
        """Where the outputs went, what the run did, and a non-zero status if it changed nothing."""
        from cyclealign_pl import storage, summary

        trainer = self.trainer
        if trainer.interrupted or trainer.state.status.value != "finished":
            return
        if self._finishing:
            self._final_evaluation()
        report = self._get(self.config_init, "report")
        threshold = getattr(report, "judge_failure_warning", 0.2)
        result = summary.collect(self.model, trainer.callback_metrics, self._output_paths())
        status, messages = summary.verdict(result, threshold)
        if any(getattr(c, "error", None) for c in trainer.callbacks if hasattr(c, "exported_to")):
            status = status or summary.EXIT_EXPORT_FAILED  # its one line was logged when it failed
        if trainer.is_global_zero:
            print(
                "\n".join(
                    f"cyclealign_pl: {line}" if i == 0 else line
                    for i, line in enumerate(summary.render(result))
                )
            )
            for message in messages:
                print(f"cyclealign_pl: {message}", file=sys.stderr)
            storage.update_run_record(trainer.default_root_dir, fit_complete=True)
        if status:
            sys.exit(status)

    def after_validate(self) -> None:
        self._report_evaluation("validate", "val")

    def after_test(self) -> None:
        self._report_evaluation("test", "test")

    def _report_evaluation(self, command: str, stage: str) -> None:
        """What the evaluation scored out of what, its figures and where its files went (in place of
        Lightning's metric table: the metrics are in metrics.csv and eval/)."""
        from cyclealign_pl import console, storage, summary
        from cyclealign_pl.evaluation import eval_paths

        trainer = self.trainer
        evaluation = getattr(self.model, "evaluation_summary", None)
        if not trainer.is_global_zero or trainer.state.status.value != "finished" or not evaluation:
            return
        log_dir = storage.log_dir(trainer)
        run_log = console.current().log_file if console.current() is not None else None
        paths = {
            "checkpoint": trainer.ckpt_path,
            "eval files": str(eval_paths(log_dir, stage)["rewards"].parent),
            "run log": str(run_log) if run_log is not None else None,
        }
        lines = summary.render_evaluation(command, evaluation, paths)
        print("\n".join(f"cyclealign_pl: {line}" if i == 0 else line for i, line in enumerate(lines)))

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        """The subcommand's parser, with this project's meaning of ``--ckpt_path`` and ``--data`` in its
        help (Lightning's describe its generic Trainer and DataModule)."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):  # the report above replaces Lightning's table of metrics
            parser.set_defaults(verbose=False)
        for action in parser._actions:
            if action.dest == "ckpt_path":
                action.help = CKPT_PATH_HELP[subcommand]
        for group in parser._action_groups:
            if any(action.dest == "data" for action in group._group_actions):
                group.title, group.description = DATA_HELP, None
        return parser

    def _final_evaluation(self) -> None:
        """The validation a finished fit runs at its end, for a fit resumed after a kill during it (the
        training loop, already done, is skipped, and with it the validation)."""
        model, trainer = self.model, self.trainer
        if getattr(model, "reward_model", None) is None or not trainer.limit_val_batches:
            return
        trainer.validate(model, datamodule=self.datamodule, verbose=False)

    def _output_paths(self) -> dict[str, str | None]:
        trainer = self.trainer
        checkpoint = trainer.checkpoint_callback
        saved = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
        exported = next((c.exported_to for c in trainer.callbacks if getattr(c, "exported_to", None)), None)
        from cyclealign_pl import console

        run_log = console.current().log_file if console.current() is not None else None
        return {
            "checkpoint": saved or None,
            "logs": trainer.log_dir if trainer.logger is not None else None,
            "exported model": exported,
            "run log": str(run_log) if run_log is not None else None,
        }


def main(args: list[str] | None = None, run: bool = True) -> CycleAlignCLI | None:
    """``args`` start with a subcommand; ``run=False`` (no subcommand) builds the trainer, model and data
    only, for a caller that adds to them before fitting (benchmarks/soak.py)."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or (any(a in HELP_FLAGS for a in argv) and not any(a in LIGHTNING_SUBCOMMANDS for a in argv)):
        from cyclealign_pl.commands import main as dispatch

        dispatch(argv)  # the top-level help, or the one line that asks for a subcommand
    from lightning.pytorch import LightningDataModule

    from cyclealign_pl.module import CycleAlignModule

    _quiet_libraries()
    with _one_line_errors():
        return CycleAlignCLI(
            CycleAlignModule,
            LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_class=CycleAlignParser,
            parser_kwargs=_parser_kwargs(),
            args=args,
            run=run,
        )


def _quiet_libraries() -> None:
    """What the screen should not show: the seed line before a configuration error's one line (the seed is
    in config.yaml), progress bars of downloads and splits; the rest goes to ``<root>/run.log``."""
    import logging

    import datasets
    from transformers.utils import logging as transformers_logging

    from cyclealign_pl import console

    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    console.install()


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """The errors a run can meet, as one line and its exit status (docs/reliability.md)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cyclealign_pl.data.rows import DataFileError
    from cyclealign_pl.hf import ModelLoadError
    from cyclealign_pl.hub import HubUnreachable
    from cyclealign_pl.judges.base import JudgeStop
    from cyclealign_pl.module import RunStopped
    from cyclealign_pl.storage import StorageError, describe, is_environment_error

    try:
        yield
    except RunStopped as stopped:
        fail(str(stopped), EXIT_STOPPED)
    except JudgeStop as stop:  # before any training step (preflight): no checkpoint, not a RunStopped
        fail(f"the judge cannot be used: {stop}", EXIT_BAD_INPUT)
    except SIGTERMException:  # SIGTERM outside a training step (e.g. validation): Lightning's own exit
        fail(
            "received SIGTERM outside a training step; resume from the last periodic checkpoint with "
            "--ckpt_path last",
            EXIT_STOPPED,
        )
    except (DataFileError, ModelLoadError, FileNotFoundError) as error:  # the message names the input
        fail(f"bad input: {error}", EXIT_BAD_INPUT)
    except HubUnreachable as error:  # says what was wanted and what to do
        fail(str(error), EXIT_BAD_INPUT)
    except StorageError as error:  # a checkpoint or record that could not be written: nothing partial left
        fail(str(error), EXIT_STOPPED)
    except ConnectionError as error:  # a hub dataset or model offline (the judge's own errors are counted)
        fail(
            f"bad input: {error}; offline, download it and give its local path (e.g. --data.init_args.path "
            "for BeaverTails, --data.init_args.root for HH-RLHF)",
            EXIT_BAD_INPUT,
        )
    except OSError as error:  # a full disk, a read-only folder while writing logs, metrics, exports
        if not is_environment_error(error):
            raise
        fail(
            f"{describe(error)}; the files written before are kept: make room (or make it writable) and "
            "resume with --ckpt_path last",
            EXIT_STOPPED,
        )
