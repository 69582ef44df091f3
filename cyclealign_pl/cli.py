"""``python -m cyclealign_pl {fit,validate,test,predict}``: a LightningCLI over the module and a data module.

The metrics callback and the Hugging Face export are always on (configurable under ``metrics:`` and
``export:``); ``report:`` sets how the end-of-fit report judges the run. A run's files all go under
``trainer.default_root_dir``, one run per directory (``run_dir.py``). Bad configuration fails before any model
is built or any request is sent, with one line saying what is wrong (``cli_parser.py``); bad input found while
running (a data file, a model path) ends the run with its message, without a traceback.

Exit statuses (docs/reliability.md): 0 done (or nothing left to do); 2 bad input or configuration, or a judge
that fails its preflight check (nothing was run, nothing to resume); 3 stopped on purpose with a checkpoint
(signal, judge budget, judge circuit breaker); 4 ``fit`` had prompts but took no optimizer step.

Top-level ``--help`` is answered without importing the package's models, data or judges (seconds faster).
"""

from __future__ import annotations

import sys
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import ActionConfigFile, LightningCLI

from cyclealign_pl.cli_parser import EXIT_BAD_INPUT, CycleAlignParser
from cyclealign_pl.summary import EXIT_NO_UPDATE

EXIT_STOPPED = 3
__all__ = ["EXIT_BAD_INPUT", "EXIT_NO_UPDATE", "EXIT_STOPPED", "CycleAlignCLI", "main"]

PROG = "python -m cyclealign_pl"
DESCRIPTION = (
    "CycleAlign aligns a white-box causal LM (weights visible, e.g. LLaMA-7B) with a black-box LLM judge "
    "(weights hidden, e.g. ChatGPT behind an API) in a cycle. For each prompt, up to N times: the white box "
    "samples l replies and ranks them by its own likelihood; the black box ranks them, guided by in-context "
    "demonstrations, and writes a better reply; the agreement of the two rankings becomes a new "
    "demonstration; the white box takes an optimizer step on a ranking loss (RRHF or PRO) plus a "
    "fine-tuning term. The prompt is done once both rankings agree. All outputs of a run go under "
    "--trainer.default_root_dir. Start with: python -m cyclealign_pl fit --config configs/tiny.yaml"
)
SUBCOMMANDS = {
    "fit": "Align the white box with the black box by CycleAlign (resume with --ckpt_path last).",
    "validate": "Score greedy replies to the evaluation prompts with model.reward_model (paper Tables 1, 8).",
    "test": "Like validate, on the test prompts.",
    "predict": (
        "Write greedy replies (and rewards, with model.reward_model) to eval/predict_generations.jsonl."
    ),
}
HELP_FLAGS = ("-h", "--help")


def _parser_kwargs() -> dict[str, Any]:
    kwargs: dict[str, Any] = {"prog": PROG, "description": DESCRIPTION}
    for name, description in SUBCOMMANDS.items():
        kwargs[name] = {"description": description}
    return kwargs


def top_level_parser() -> CycleAlignParser:
    """The top-level parser alone (subcommands without their options): enough for ``--help``, and fast."""
    parser = CycleAlignParser(prog=PROG, description=DESCRIPTION)
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="Path to a configuration file in json or yaml format."
    )
    subcommands = parser.add_subcommands()
    for name, description in SUBCOMMANDS.items():
        subcommands.add_subcommand(name, CycleAlignParser(description=description), help=description)
    return parser


class CycleAlignCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        from cyclealign_pl.callbacks import CycleMetrics, ExportPretrained
        from cyclealign_pl.summary import RunReport

        parser.add_lightning_class_args(CycleMetrics, "metrics")
        parser.add_lightning_class_args(ExportPretrained, "export")
        parser.add_class_arguments(RunReport, "report")

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
        """``--ckpt_path last`` -> this root's newest ``last*.ckpt``; one run per root; nothing to do if
        done."""
        dirs = run_dir.checkpoint_dirs(config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last" and dirs:
            last = run_dir.resolve_last(dirs)
            if last is None and self.subcommand != "fit":
                self._error(
                    f"--ckpt_path last: no last*.ckpt in {', '.join(map(str, dirs))}; train with fit "
                    "first, or give a checkpoint file"
                )
            if last is None:
                print(f"cyclealign_pl: no checkpoint in {dirs[0]} yet: starting a new run", file=sys.stderr)
            ckpt_path = config["ckpt_path"] = str(last) if last is not None else None
        if self.subcommand != "fit":
            return
        try:
            run_dir.refuse_second_run(dirs, ckpt_path)
        except run_dir.RunDirError as error:
            self._error(str(error))
        if ckpt_path is None or ckpt_path == "last":
            return
        from pathlib import Path

        progress = run_dir.read_progress(Path(ckpt_path))
        if progress is None:
            return
        trainer = config["trainer"]
        done = run_dir.finished_message(progress, trainer.get("max_epochs"), trainer.get("max_steps"))
        if done is not None:
            print(f"cyclealign_pl: {ckpt_path}: {done}")
            sys.exit(0)

    def instantiate_classes(self) -> None:
        from cyclealign_pl.hf import ModelLoadError

        try:
            super().instantiate_classes()
        except (ValueError, TypeError, ModelLoadError) as error:  # bad values that only a constructor can see
            self._error(f"invalid configuration: {error}")

    def instantiate_trainer(self, **kwargs: Any):
        """The trainer, with the one-line progress bar unless the config chose a bar or none."""
        from lightning.pytorch.callbacks import ProgressBar

        from cyclealign_pl.progress import CycleProgressBar

        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            trainer_config["callbacks"] = [*callbacks, CycleProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """Where the outputs went, what the run did, and a non-zero status if it changed nothing."""
        from cyclealign_pl import summary

        trainer = self.trainer
        if trainer.interrupted or trainer.state.status.value != "finished":
            return
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
        if status:
            sys.exit(status)

    def _output_paths(self) -> dict[str, str | None]:
        trainer = self.trainer
        checkpoint = trainer.checkpoint_callback
        saved = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
        exported = next((c.exported_to for c in trainer.callbacks if getattr(c, "exported_to", None)), None)
        return {
            "checkpoint": saved or None,
            "logs": trainer.log_dir if trainer.logger is not None else None,
            "exported model": exported,
        }


def _wants_top_level_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv) and not any(a in SUBCOMMANDS for a in argv)


def main(args: list[str] | None = None, run: bool = True) -> CycleAlignCLI | None:
    """The command line: ``args`` start with a subcommand; ``run=False`` (no subcommand) builds the trainer,
    model and data only, for a caller that adds to them before fitting (benchmarks/soak.py)."""
    argv = sys.argv[1:] if args is None else list(args)
    if _wants_top_level_help(argv):
        top_level_parser().print_help()
        sys.exit(0)
    if not argv:
        top_level_parser().error("choose a subcommand: fit, validate, test or predict")

    import logging

    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cyclealign_pl.data.rows import DataFileError
    from cyclealign_pl.hf import ModelLoadError
    from cyclealign_pl.judges.base import JudgeStop
    from cyclealign_pl.module import CycleAlignModule, RunStopped

    # errors that name what is wrong with the user's input (file, line, field, path): the message is enough
    input_errors = (DataFileError, ModelLoadError, FileNotFoundError)
    # "Seed set to N" would come before a configuration error's one line; the seed is in config.yaml; and the
    # per-file "Loading weights" bars of from_pretrained say nothing a user needs
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
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
    except RunStopped as stopped:
        print(f"cyclealign_pl: {stopped}", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except JudgeStop as stop:  # before any training step (preflight): no checkpoint, not a RunStopped
        print(f"cyclealign_pl: the judge cannot be used: {stop}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except SIGTERMException:  # SIGTERM outside a training step (e.g. validation): Lightning's own exit
        print(
            "cyclealign_pl: received SIGTERM outside a training step; resume from the last periodic "
            "checkpoint with --ckpt_path last",
            file=sys.stderr,
        )
        sys.exit(EXIT_STOPPED)
    except input_errors as error:
        print(f"cyclealign_pl: bad input: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except ConnectionError as error:  # a hub dataset or model offline (the judge's own errors are counted)
        print(
            f"cyclealign_pl: bad input: {error}; offline, download it and give its local path (e.g. "
            "--data.init_args.path for BeaverTails, --data.init_args.root for HH-RLHF)",
            file=sys.stderr,
        )
        sys.exit(EXIT_BAD_INPUT)
