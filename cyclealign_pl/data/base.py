"""What every prompt data module shares: batch sizes, seed, workers and cache, the rows, the dataloaders.

A data module only has to fill ``train_rows`` (for ``fit``) and ``eval_rows`` (for ``validate``/``test``/
``predict``) in ``setup``; this base class checks the common arguments and serves the rows (resumable, seeded:
:mod:`cyclealign_pl.data.loaders`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from cyclealign_pl.data.loaders import rows_dataloader, sample_indices
from cyclealign_pl.data.rows import CleaningStats, PromptRow

log = logging.getLogger(__name__)

Pool = Mapping[str, Sequence[PromptRow]]  # subset -> its prompt rows


def select_prompts(
    eval_pool: Mapping[str, Sequence[PromptRow]],
    train_pool: Mapping[str, Sequence[PromptRow]] | None,
    *,
    num_train: int | None,
    eval_per_subset: int | None,
    seed: int,
) -> tuple[list[PromptRow], list[PromptRow]]:
    """Seeded (train, eval) prompt selection; no training prompt is also an evaluation prompt.

    Evaluation prompts are drawn per subset (all of them when ``eval_per_subset`` is None). Training
    prompts are drawn uniformly from the pooled subsets (so in proportion to their sizes, as in "1,000
    prompts across the four subsets"), after removing every prompt chosen for evaluation. When both pools
    come from the same split this is a seeded partition of it; across splits it removes leaked prompts.
    Asking for more prompts than there are gives all of them, with a warning.
    """
    eval_rows: list[PromptRow] = []
    for subset, rows in eval_pool.items():
        if eval_per_subset is not None and eval_per_subset > len(rows):
            warnings.warn(
                f"eval_prompts_per_subset={eval_per_subset} but {subset} has only {len(rows)} "
                f"evaluation prompts after cleaning; using all {len(rows)}",
                stacklevel=2,
            )
        eval_rows.extend(rows[i] for i in sample_indices(len(rows), eval_per_subset, f"{seed}:eval:{subset}"))
    if train_pool is None:
        return [], eval_rows

    held_out = {row["prompt"] for row in eval_rows}
    pool = [row for rows in train_pool.values() for row in rows if row["prompt"] not in held_out]
    excluded = sum(len(rows) for rows in train_pool.values()) - len(pool)
    if excluded:
        log.info("excluded %d training rows whose prompt is an evaluation prompt", excluded)
    if not pool:
        raise ValueError(
            "no training prompts left after holding out the evaluation prompts; with "
            "train_split == eval_split, set eval_prompts_per_subset below the number of rows"
        )
    if num_train is not None and num_train > len(pool):
        warnings.warn(
            f"num_train_prompts={num_train} but only {len(pool)} training prompts are available "
            f"after cleaning and holding out evaluation prompts; using all {len(pool)}",
            stacklevel=2,
        )
    train_rows = [pool[i] for i in sample_indices(len(pool), num_train, f"{seed}:train")]
    return train_rows, eval_rows


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

    def _select_rows(
        self,
        stage: str | None,
        eval_pool: Callable[[], Pool],
        train_pool: Callable[[], Pool],
        *,
        num_train: int | None,
        eval_per_subset: int | None,
    ) -> bool:
        """Fill the rows ``stage`` needs (training ones only for ``fit`` or no stage) by
        :func:`select_prompts`; False when they are loaded already."""
        need_train = stage in (None, "fit")
        if self.eval_rows is not None and (self.train_rows is not None or not need_train):
            return False
        train_rows, self.eval_rows = select_prompts(
            eval_pool(),
            train_pool() if need_train else None,
            num_train=num_train,
            eval_per_subset=eval_per_subset,
            seed=self.seed,
        )
        if need_train:
            self.train_rows = train_rows
        return True

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
