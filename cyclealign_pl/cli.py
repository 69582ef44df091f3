"""``python -m cyclealign_pl {fit,validate,test,predict}``: a LightningCLI over the module and a data module.

The metrics callback and the Hugging Face export are always on (configurable under ``metrics:`` and
``export:``). Bad configuration fails before any model is built or any request is sent, with the message
of what is wrong; a deliberate stop (judge budget spent, signal) exits with status 3 after a checkpoint.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from cyclealign_pl.callbacks import CycleMetrics, ExportPretrained
from cyclealign_pl.hf import ModelLoadError
from cyclealign_pl.module import CycleAlignModule, RunStopped

EXIT_STOPPED = 3


class CycleAlignCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(CycleMetrics, "metrics")
        parser.add_lightning_class_args(ExportPretrained, "export")

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
