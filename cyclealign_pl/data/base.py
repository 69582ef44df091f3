"""What every prompt data module shares: batch sizes, seed, workers and cache, the rows, the dataloaders.

A data module only has to fill ``train_rows`` (for ``fit``) and ``eval_rows`` (for ``validate``/``test``/
``predict``) in ``setup``; this base class checks the common arguments and serves the rows (resumable, seeded:
:mod:`cyclealign_pl.data.loaders`).
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from cyclealign_pl.data.loaders import rows_dataloader
from cyclealign_pl.data.rows import CleaningStats, PromptRow


class PromptDataModuleBase(LightningDataModule):
    """Rows of prompts (:class:`~cyclealign_pl.data.rows.PromptRow`) served in batches of dicts of lists.

    Subclasses call ``super().__init__(...)`` with the shared arguments, ``self.save_hyperparameters()``, and
    fill :attr:`train_rows` / :attr:`eval_rows` (and :attr:`_stats`) in ``setup``.
    """

    group_name = "subset"  # what the evaluation's groups of prompts are called in reports

    def __init__(
        self,
        batch_size: int = 1,
        eval_batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self._stats: dict[str, CleaningStats] = {}
        self.train_rows: list[PromptRow] | None = None
        self.eval_rows: list[PromptRow] | None = None

    @property
    def cleaning_stats(self) -> dict[str, CleaningStats]:
        """Per source: rows read, kept and dropped per reason (filled by ``setup``)."""
        return dict(self._stats)

    def subset_weights(self) -> dict[str, float] | None:
        """The evaluation total's subset weights; None: every evaluated prompt counts once."""
        return None

    def _require(self, rows: list[PromptRow] | None, what: str) -> list[PromptRow]:
        if rows is None:
            raise RuntimeError(f"{what} prompts are not loaded: call setup() first (Lightning does)")
        return rows

    def train_dataloader(self) -> DataLoader:
        rows = self._require(self.train_rows, "training")
        return rows_dataloader(
            rows, self.batch_size, shuffle=True, seed=self.seed, num_workers=self.num_workers
        )

    def _eval_dataloader(self) -> DataLoader:
        rows = self._require(self.eval_rows, "evaluation")
        return rows_dataloader(
            rows, self.eval_batch_size, shuffle=False, seed=self.seed, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self._eval_dataloader()
