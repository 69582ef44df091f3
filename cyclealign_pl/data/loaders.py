"""Batches of prompt rows: collation, a seeded sampler, a DataLoader that resumes mid-epoch, seeded draws.

Apart from :mod:`cyclealign_pl.data.rows` (what a row is) because this is how rows are *served*: the order a
run sees them in, and how a resumed run skips exactly the batches it already trained on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, RandomSampler

from cyclealign_pl.data.rows import BATCH_KEYS, PromptRow


def collate_rows(rows: Sequence[PromptRow]) -> dict[str, list[str]]:
    """Dict of lists, one list per key of :data:`BATCH_KEYS`, in row order."""
    return {key: [row[key] for row in rows] for key in BATCH_KEYS}


class EpochShuffleSampler(RandomSampler):
    """A random order that depends on ``(seed, epoch)`` only, so a resumed process sees the same order.

    A ``RandomSampler`` with a generator draws each epoch's order from the generator's running state, which
    a new process does not have. This one recomputes epoch ``e``'s order from the seed: the orders are those
    that ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` draws over full epochs in
    one process (per epoch: the loader's worker seed, the order, an empty tail), so runs keep their data
    order. Lightning calls ``set_epoch`` before every epoch (as for ``DistributedSampler``); being a
    ``RandomSampler``, this one is still recognised as shuffling when Lightning injects a
    ``DistributedSampler`` (which is ``(seed, epoch)``-determined too).
    """

    def __init__(self, data_source: Sequence[object], seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            torch.randperm(n, generator=generator)
            torch.randperm(n, generator=generator)
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        yield from torch.randperm(n, generator=generator).tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning saves and restores mid-epoch (``state_dict`` / ``load_state_dict``).

    Its state is the number of batches of the current epoch handed out so far. Lightning's fit loop stores it
    in every checkpoint and, when a run resumes mid-epoch, loads it before iterating again; that iteration
    then drops those batches, so no prompt is trained twice and none is left out. The count is exact because
    Lightning fetches no batch ahead from a loader that has a length. Dropping (rather than re-sampling)
    works with any sampler, also the ``DistributedSampler`` Lightning injects under DDP; collating a few
    thousand skipped rows of text costs milliseconds.
    """

    _yielded: int = 0
    _resume_at: int = 0

    def __iter__(self) -> Iterator[dict[str, list[str]]]:
        skip, self._resume_at = self._resume_at, 0
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            if self._yielded > skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_at = int(state_dict.get("batches", 0))


def rows_dataloader(
    rows: Sequence[PromptRow], batch_size: int, *, shuffle: bool, seed: int, num_workers: int
) -> ResumableDataLoader:
    """A resumable DataLoader over rows; the shuffled order is a function of ``(seed, epoch)`` so runs repeat.

    The loader also draws its worker seed from its own generator, so loading data never moves the global RNG.
    """
    rows = list(rows)
    return ResumableDataLoader(
        rows,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(rows, seed) if shuffle else None,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_rows,
        num_workers=num_workers,
    )


def sample_indices(n: int, k: int | None, seed: str) -> list[int]:
    """``k`` of ``range(n)`` drawn with ``seed``, in ascending order (all of them when ``k`` is None or >= n).

    A string seed lets callers derive independent streams (``"0:eval:harmless-base"``) so that adding a
    subset or changing the training count leaves the other draws unchanged.
    """
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))
