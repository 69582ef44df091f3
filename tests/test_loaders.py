"""How prompt rows are served (cyclealign_pl.data.loaders): collation, the ``(seed, epoch)`` sampler, the
DataLoader that resumes mid-epoch, seeded draws."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from cyclealign_pl.data.loaders import (
    EpochShuffleSampler,
    ResumableDataLoader,
    collate_rows,
    rows_dataloader,
    sample_indices,
)
from cyclealign_pl.data.rows import BATCH_KEYS, PromptRow


def rows(count: int) -> list[PromptRow]:
    return [
        PromptRow(id=f"s:train:{i}", subset="s", prompt=f"question {i}?", chosen="yes", rejected="no")
        for i in range(count)
    ]


def ids(batches: list[dict[str, list[str]]]) -> list[str]:
    return [row_id for batch in batches for row_id in batch["id"]]


def test_a_batch_is_a_dict_of_lists_in_row_order():
    batch = collate_rows(rows(3))
    assert tuple(batch) == BATCH_KEYS
    assert batch["id"] == ["s:train:0", "s:train:1", "s:train:2"]
    assert batch["prompt"] == ["question 0?", "question 1?", "question 2?"]


# -- the seeded sampler ----------------------------------------------------------------------------------


def test_each_epochs_order_is_what_a_seeded_shuffling_dataloader_draws_in_one_process():
    """Runs keep the data order of ``DataLoader(shuffle=True, generator=seed)``, epoch after epoch, while
    a fresh process (a resumed run) gets epoch ``e``'s order from ``(seed, e)`` alone."""
    data = list(range(10))
    plain = DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(5))
    one_process = [[i for batch in plain for i in batch.tolist()] for _ in range(3)]

    for epoch, expected in enumerate(one_process):
        fresh = EpochShuffleSampler(data, seed=5)
        fresh.set_epoch(epoch)
        assert list(fresh) == expected, epoch
    assert len({tuple(order) for order in one_process}) == 3  # each epoch has an order of its own


def test_the_order_depends_on_the_seed_and_is_a_permutation():
    data = list(range(20))
    orders = [list(EpochShuffleSampler(data, seed)) for seed in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == data


# -- the DataLoader that resumes mid-epoch -------------------------------------------------------------------


def loader(shuffle: bool = True) -> ResumableDataLoader:
    return rows_dataloader(rows(11), batch_size=2, shuffle=shuffle, seed=3, num_workers=0)


@pytest.mark.parametrize("epoch", [0, 1])
def test_a_reloaded_loader_hands_out_the_rest_of_the_epoch_exactly(epoch):
    uninterrupted = loader()
    uninterrupted.sampler.set_epoch(epoch)  # Lightning calls this before every epoch
    whole = list(uninterrupted)
    assert len(whole) == 6 and sorted(ids(whole)) == sorted(r["id"] for r in rows(11))

    interrupted = loader()
    interrupted.sampler.set_epoch(epoch)
    taken = []
    for batch in interrupted:
        taken.append(batch)
        if len(taken) == 4:
            break
    state = interrupted.state_dict()
    assert state == {"batches": 4}

    resumed = loader()  # a new process: a new loader, its position from the checkpoint
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(epoch)
    rest = list(resumed)
    assert ids(taken) + ids(rest) == ids(whole)  # none trained twice, none left out, same order
    assert resumed.state_dict() == {"batches": 6}


def test_the_skip_applies_to_one_epoch_only():
    resumed = loader()
    resumed.load_state_dict({"batches": 5})
    assert len(list(resumed)) == 1
    resumed.sampler.set_epoch(1)
    next_epoch = loader()
    next_epoch.sampler.set_epoch(1)
    assert ids(list(resumed)) == ids(list(next_epoch))  # the next epoch is whole again


def test_an_unshuffled_loader_serves_rows_in_order_and_resumes_too():
    in_order = loader(shuffle=False)
    assert ids(list(in_order)) == [r["id"] for r in rows(11)]
    in_order.load_state_dict({"batches": 2})
    assert ids(list(in_order)) == [r["id"] for r in rows(11)][4:]


def test_loading_data_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(loader())
    assert torch.equal(torch.rand(3), expected)


# -- seeded draws -------------------------------------------------------------------------------------------


def test_seeded_draws_are_sorted_repeatable_and_independent_per_seed():
    drawn = sample_indices(100, 10, "0:train")
    assert drawn == sorted(drawn) and len(set(drawn)) == 10 and all(0 <= i < 100 for i in drawn)
    assert sample_indices(100, 10, "0:train") == drawn
    assert sample_indices(100, 10, "0:eval:harmless-base") != drawn
    assert sample_indices(5, None, "x") == sample_indices(5, 9, "x") == [0, 1, 2, 3, 4]
