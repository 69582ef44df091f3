"""``python -m cyclealign_pl {fit,validate,test,predict}``: a LightningCLI over the module and a data module.

The metrics callback and the Hugging Face export are always on (configurable under ``metrics:`` and
``export:``). Bad configuration fails before any model is built or any request is sent, with the message
of what is wrong; bad input found while running (a data file, a model path) ends the run with its message and
status 2, without a traceback; a deliberate stop (judge budget spent, SIGTERM, Ctrl-C) exits with status 3
after a checkpoint (see docs/reliability.md).
"""

from __future__ import annotations

import sys

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cyclealign_pl.callbacks import CycleMetrics, ExportPretrained
from cyclealign_pl.data.rows import DataFileError
from cyclealign_pl.hf import ModelLoadError
from cyclealign_pl.module import CycleAlignModule, RunStopped

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
# errors that name what is wrong with the user's input (file, line, field, path): the message is enough
INPUT_ERRORS = (DataFileError, ModelLoadError, FileNotFoundError)


class CycleAlignCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(CycleMetrics, "metrics")
        parser.add_lightning_class_args(ExportPretrained, "export")

    def before_instantiate_classes(self) -> None:
        """DeepSpeed runs on CUDA GPUs only: say so before any model is built (Lightning fails deep in fit)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = config.get("trainer") if config is not None else None
        if trainer is None:
            return
        strategy = trainer.get("strategy")
        name = strategy if isinstance(strategy, str) else str(getattr(strategy, "class_path", "") or "")
        if "deepspeed" in name.lower() and (trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()):
            self.parser.error(f"trainer.strategy={name} needs CUDA GPUs (trainer.accelerator: gpu); none is "
                              "available here. On the CPU use --trainer.strategy ddp (docs/scaling.md)")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, ModelLoadError) as error:  # bad values that only a constructor can see
            self.parser.error(f"invalid configuration: {error}")


def main(args: list[str] | None = None) -> CycleAlignCLI | None:
    try:
        return CycleAlignCLI(
            CycleAlignModule,
            LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except RunStopped as stopped:
        print(f"cyclealign_pl: {stopped}", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except SIGTERMException:  # SIGTERM outside a training step (e.g. validation): Lightning's own exit
        print("cyclealign_pl: received SIGTERM outside a training step; resume from the last periodic "
              "checkpoint with --ckpt_path last", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except INPUT_ERRORS as error:
        print(f"cyclealign_pl: bad input: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
