"""BeaverTails-Evaluation: 700 unsafe prompts in 14 harm categories, as evaluation rows.

The paper evaluates generalisation to BeaverTails (Table 8). Its prompts become single-turn HH-format rows
(``"\\n\\nHuman: {prompt}\\n\\nAssistant:"``) whose ``subset`` is the harm category, so the LightningModule
that reports HH-RLHF per subset reports BeaverTails per category with no change. The dataset has no
reference replies: ``chosen`` and ``rejected`` are empty strings. Licence: CC BY-NC 4.0 (PKU-Alignment);
it is not shipped with the package.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

from cyclealign_pl.data.base import PromptDataModuleBase
from cyclealign_pl.data.loaders import sample_indices
from cyclealign_pl.data.rows import (
    CleaningStats,
    DataFileError,
    PromptRow,
    Turn,
    render_prompt,
)
from cyclealign_pl.hub import require_hub

log = logging.getLogger(__name__)

HUB_NAME = "PKU-Alignment/BeaverTails-Evaluation"
REQUIRED_COLUMNS: tuple[str, ...] = ("prompt", "category")
LOCAL_COPY = "--data.init_args.path <BeaverTails-Evaluation.csv, downloaded once>"
WHERE_TO_GET = (
    f"get BeaverTails-Evaluation.csv from the hub dataset {HUB_NAME} (CC BY-NC 4.0, not shipped "
    "here), or set data.init_args.path null to load it from the hub"
)


def _check_csv_header(path: Path) -> None:
    """A missing file, an empty file or a missing column is an error naming the file (and the column)."""
    if not path.is_file():
        raise FileNotFoundError(f"BeaverTails file not found: {path}; {WHERE_TO_GET}")
    with path.open("rb") as raw:  # decoded line by line, so that an error names its own line
        for line_no, data in enumerate(raw, start=1):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as err:
                problem = f"not UTF-8 ({err.reason} at byte {err.start + 1})"
                raise DataFileError(path, problem, line_no) from None
    with path.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        raise DataFileError(path, "no header row (the file is empty)")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataFileError(path, f"missing column(s) {missing}; header is {header}", 1)


def load_raw(
    path: str | Path | None, cache_dir: str | None = None, hub_split: str = "test"
) -> tuple[datasets.Dataset, str]:
    """The raw rows from a local CSV (checked first) or, when ``path`` is None, from the hub."""
    if path is None:
        require_hub(HUB_NAME, "dataset", LOCAL_COPY)
        raw = datasets.load_dataset(HUB_NAME, split=hub_split, cache_dir=cache_dir)
        source = f"{HUB_NAME}/{hub_split}"
    else:
        path = Path(path)
        _check_csv_header(path)
        try:
            raw = datasets.load_dataset(
                "csv", data_files={"train": str(path)}, split="train", cache_dir=cache_dir
            )
        except DatasetGenerationError as err:  # pandas' message names the line
            raise DataFileError(path, f"cannot parse CSV: {err.__cause__ or err}".strip()) from err
        source = str(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.column_names]
    if missing:
        raise DataFileError(source, f"missing column(s) {missing}; columns are {raw.column_names}")
    if len(raw) == 0:
        raise DataFileError(source, "no rows")
    return raw, source


def clean_rows(raw: datasets.Dataset, source: str) -> tuple[list[PromptRow], CleaningStats]:
    """Evaluation rows ``beavertails:<row>``; rows without prompt or category are counted and skipped."""
    stats = CleaningStats(source=source)
    rows: list[PromptRow] = []
    for index, record in enumerate(raw):
        stats.rows += 1
        prompt = str(record["prompt"]).strip() if record["prompt"] is not None else ""
        category = str(record["category"]).strip() if record["category"] is not None else ""
        if not prompt:
            stats.drop("empty_prompt")
            continue
        if not category:
            stats.drop("missing_category")
            continue
        rows.append(
            PromptRow(
                id=f"beavertails:{index}",
                subset=category,
                prompt=render_prompt([Turn("Human", prompt)]),
                chosen="",
                rejected="",
            )
        )
    stats.kept = len(rows)
    stats.log(log)
    return rows, stats


def load_beavertails(
    path: str | Path | None, cache_dir: str | None = None, hub_split: str = "test"
) -> tuple[list[PromptRow], CleaningStats]:
    """Load and check BeaverTails-Evaluation (local CSV with columns prompt, category; or the hub)."""
    raw, source = load_raw(path, cache_dir, hub_split)
    return clean_rows(raw, source)


class BeaverTailsDataModule(PromptDataModuleBase):
    """BeaverTails-Evaluation prompts for ``validate``/``test``/``predict``, grouped by harm category.

    Evaluation only (there is no training split): use it with ``trainer.validate`` and the same
    LightningModule trained on HH-RLHF. ``path`` is the local CSV; ``None`` loads the hub dataset.
    ``categories`` keeps only those categories; ``prompts_per_category`` draws a seeded sample of each.
    """

    group_name = "category"

    def __init__(
        self,
        path: str | None = None,
        categories: Sequence[str] | None = None,
        prompts_per_category: int | None = None,
        eval_batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        hub_split: str = "test",
    ) -> None:
        super().__init__(
            eval_batch_size=eval_batch_size, seed=seed, num_workers=num_workers, cache_dir=cache_dir
        )
        if path is not None and not Path(path).is_file():
            raise ValueError(f"BeaverTails CSV not found: {path}; {WHERE_TO_GET}")
        if prompts_per_category is not None and prompts_per_category < 1:
            raise ValueError(f"prompts_per_category must be >= 1 or None (all), got {prompts_per_category}")
        if categories is not None and not categories:
            raise ValueError("categories must be None (all) or name at least one category")
        self.save_hyperparameters()
        self.path = path
        self.categories = list(categories) if categories is not None else None
        self.prompts_per_category = prompts_per_category
        self.hub_split = hub_split

    def prepare_data(self) -> None:
        if self.path is None:
            require_hub(HUB_NAME, "dataset", LOCAL_COPY)
            datasets.load_dataset(HUB_NAME, split=self.hub_split, cache_dir=self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":
            raise ValueError("BeaverTailsDataModule is evaluation-only: use validate, test or predict")
        if self.eval_rows is not None:
            return
        rows, stats = load_beavertails(self.path, self.cache_dir, self.hub_split)
        self._stats = {"beavertails": stats}
        by_category: dict[str, list[PromptRow]] = {}
        for row in rows:
            by_category.setdefault(row["subset"], []).append(row)
        if self.categories is not None:
            unknown = [c for c in self.categories if c not in by_category]
            if unknown:
                raise ValueError(
                    f"unknown BeaverTails categories {unknown}; available: {sorted(by_category)}"
                )
            by_category = {c: by_category[c] for c in self.categories}
        selected: list[PromptRow] = []
        for category, group in by_category.items():
            seed = f"{self.seed}:beavertails:{category}"
            picks = sample_indices(len(group), self.prompts_per_category, seed)
            selected.extend(group[i] for i in picks)
        self.eval_rows = selected
        log.info("BeaverTails prompts: %d evaluation over %d categories", len(selected), len(by_category))
