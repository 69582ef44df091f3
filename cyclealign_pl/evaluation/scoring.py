"""Reward scoring of the white box's greedy replies: per-subset means (a torchmetrics ``Metric`` that reduces
across processes), the collapse monitors, the paired gain over the zero-shot model, and coverage.

With several processes Lightning's sampler may repeat up to ``world_size - 1`` prompts to even out the
ranks: the metric counts them, the generations are deduplicated by id. Evaluate on one device for exact
paper figures.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from cyclealign_pl.evaluation.files import TOTAL, GenerationRecord, RewardRow

log = logging.getLogger(__name__)


LOOP_MIN_WORDS = 10  # shorter replies are too short to call a loop
LOOP_MAX_DISTINCT_2 = 0.5  # a reply loops when fewer than half of its own word bigrams are distinct


class ReplyStats(NamedTuple):
    """Collapse monitors over a set of replies (pure text statistics)."""

    empty_share: float
    mean_reply_words: float
    distinct_2: float
    looping_share: float


def reply_stats(replies: Sequence[str]) -> ReplyStats:
    """Share of empty replies, mean length in words, distinct-2 (distinct word bigrams over all bigrams of
    all replies: 1.0 when no bigram repeats, near 0 when every reply is the same text), and the share of
    replies that loop on their own (``is_looping``), which distinct-2 over a varied set of prompts misses."""
    if not replies:
        return ReplyStats(math.nan, math.nan, math.nan, math.nan)
    words = [reply.split() for reply in replies]
    bigrams = [pair for w in words for pair in itertools.pairwise(w)]
    distinct = len(set(bigrams)) / len(bigrams) if bigrams else 0.0
    return ReplyStats(
        sum(not r.strip() for r in replies) / len(replies),
        sum(map(len, words)) / len(words),
        distinct,
        sum(map(is_looping, words)) / len(words),
    )


def is_looping(words: Sequence[str]) -> bool:
    """A reply of at least ``LOOP_MIN_WORDS`` words that mostly repeats itself ("I'm made to be. I'm made to
    be. ..."): fewer than ``LOOP_MAX_DISTINCT_2`` of its word bigrams are distinct."""
    if len(words) < LOOP_MIN_WORDS:
        return False
    bigrams = list(itertools.pairwise(words))
    return len(set(bigrams)) / len(bigrams) < LOOP_MAX_DISTINCT_2


def collapse_warning(
    stats: ReplyStats, max_empty_share: float, min_distinct_2: float, max_looping_share: float
) -> str | None:
    """Why these replies look collapsed (None: they do not)."""
    problems = []
    if stats.empty_share > max_empty_share:
        problems.append(f"{stats.empty_share:.0%} of the replies are empty (more than {max_empty_share:.0%})")
    if stats.distinct_2 < min_distinct_2:
        problems.append(
            f"distinct-2 is {stats.distinct_2:.3f} (below {min_distinct_2:g}): the replies repeat "
            "the same words"
        )
    if stats.looping_share > max_looping_share:
        problems.append(
            f"{stats.looping_share:.0%} of the replies loop, repeating their own words (more than "
            f"{max_looping_share:.0%})"
        )
    return "; ".join(problems) or None


class PairedGain(NamedTuple):
    """The mean reward after minus before over the prompts scored in both, and its standard error."""

    n: int
    before: float
    after: float
    gain: float
    standard_error: float

    @property
    def z(self) -> float:
        return standard_errors(self.gain, self.standard_error)


def standard_errors(gain: float, standard_error: float) -> float:
    """A gain in standard errors (a gain without spread: +-inf by its sign, 0 when there is none)."""
    if standard_error > 0:
        return gain / standard_error
    return math.copysign(math.inf, gain) if gain else 0.0


def paired_gain(after: Mapping[str, float], before: Mapping[str, float]) -> PairedGain | None:
    """Rewards paired by prompt id (finite in both); None with fewer than two pairs."""
    ids = [i for i in after if i in before and math.isfinite(after[i]) and math.isfinite(before[i])]
    if len(ids) < 2:
        return None
    diffs = [after[i] - before[i] for i in ids]
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return PairedGain(
        len(ids),
        sum(before[i] for i in ids) / len(ids),
        sum(after[i] for i in ids) / len(ids),
        mean,
        math.sqrt(variance / len(diffs)),
    )


def with_reply_stats(
    rows: Sequence[RewardRow], records: Sequence[GenerationRecord], threshold: float | None
) -> list[RewardRow]:
    """The rows with their subset's (the total: all records') preferred share and collapse monitors."""
    out = []
    for row in rows:
        group = [r for r in records if row.subset in (TOTAL, r["subset"])]
        stats = reply_stats([r["reply"] for r in group])
        rewards = [r["reward"] for r in group if r["reward"] is not None and math.isfinite(r["reward"])]
        preferred = (
            (sum(w > threshold for w in rewards) / len(rewards))
            if rewards and threshold is not None
            else None
        )
        out.append(
            row._replace(
                preferred_share=preferred,
                empty_share=stats.empty_share,
                mean_reply_words=stats.mean_reply_words,
                distinct_2=stats.distinct_2,
                looping_share=stats.looping_share,
            )
        )
    return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SubsetMeanReward(Metric):
    """Mean reward per subset and the total: sample-weighted (every reply counts once, whatever its subset),
    or, with ``weights``, the subsets' means weighted by them (the paper's Table 1 weights by the full
    test-set sizes of the subsets, so that a total over equal samples per subset is still the paper's Total).

    Subset names are best given up front (from the evaluation rows), so that every process holds the same
    state layout; in a single process new names are also registered as they come. ``compute()`` returns
    ``{subset: mean, ..., "total": mean}`` for subsets with at least one reply; :meth:`table` gives the rows
    with their counts. Non-finite rewards are skipped and counted (``skipped``), never averaged in.
    """

    # forward() then updates the global state first, so a subset first seen in a batch grows it before the
    # batch-only state is built from the (grown) defaults
    full_state_update = True
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self, subsets: Iterable[str] = (), weights: Mapping[str, float] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if weights is not None and any(not (w > 0 and math.isfinite(w)) for w in weights.values()):
            raise ValueError(f"subset weights must be positive, got {dict(weights)}")
        self.weights = dict(weights) if weights is not None else None
        self.subsets: list[str] = []
        self._index: dict[str, int] = {}
        self.add_state("sums", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("skipped", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in subsets:
            self.add_subset(name)

    def add_subset(self, name: str) -> int:
        """Register ``name`` (idempotent) and return its slot; the states grow by one zero entry."""
        if name in self._index:
            return self._index[name]
        if name == TOTAL:
            raise ValueError(f"a subset may not be called {TOTAL!r}: that name is the sample-weighted total")
        grown: dict[str, Tensor] = {}
        for state in ("sums", "counts"):
            current: Tensor = getattr(self, state)
            grown[state] = torch.cat([current, current.new_zeros(1)])
            # re-registering updates the default, so reset() keeps the subsets and zeroes their values
            self.add_state(state, current.new_zeros(len(self.subsets) + 1), dist_reduce_fx="sum")
        self.sums, self.counts = grown["sums"], grown["counts"]
        self._index[name] = len(self.subsets)
        self.subsets.append(name)
        return self._index[name]

    def update(self, subsets: Sequence[str], rewards: Sequence[float] | Tensor) -> None:
        values = torch.as_tensor(rewards, dtype=torch.float64, device=self.sums.device).flatten()
        if len(subsets) != values.numel():
            raise ValueError(f"got {len(subsets)} subset names for {values.numel()} rewards")
        unknown = list(dict.fromkeys(s for s in subsets if s not in self._index))  # in order of appearance
        if unknown and _distributed():
            raise ValueError(
                f"subset(s) {unknown} were not registered up front; with several processes "
                "every subset must be given to SubsetMeanReward(subsets=...) so all ranks share "
                "one state layout"
            )
        for name in unknown:
            self.add_subset(name)
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            dropped = int((~finite).sum())
            self.skipped += dropped
            log.warning(
                "skipped %d non-finite reward(s) of subset(s) %s",
                dropped,
                sorted({s for s, ok in zip(subsets, finite.tolist()) if not ok}),
            )
        index = torch.tensor([self._index[s] for s in subsets], device=values.device)[finite]
        self.sums.index_add_(0, index, values[finite])
        self.counts.index_add_(0, index, torch.ones_like(values[finite]))

    def _rows(self) -> list[RewardRow]:
        rows = [
            RewardRow(name, int(n), float(s / n))
            for name, s, n in zip(self.subsets, self.sums.tolist(), self.counts.tolist())
            if n > 0
        ]
        n_total = float(self.counts.sum())
        total = float(self.sums.sum() / n_total) if n_total > 0 else math.nan
        if self.weights is not None and rows:
            missing = [row.subset for row in rows if row.subset not in self.weights]
            if missing:
                raise ValueError(
                    f"no total weight for subset(s) {missing}; weights are given for {sorted(self.weights)}"
                )
            weight = sum(self.weights[row.subset] for row in rows)
            total = sum(self.weights[row.subset] * row.mean_reward for row in rows) / weight
        return [*rows, RewardRow(TOTAL, int(n_total), total)]

    def compute(self) -> dict[str, Tensor]:
        return {row.subset: torch.tensor(row.mean_reward) for row in self._rows()}

    def table(self) -> list[RewardRow]:
        """The rows over all processes (a collective call: every rank must make it)."""
        with self.sync_context(should_sync=True, should_unsync=True):
            return self._rows()


# ------------------------------------------------------------------------------------------------ one pass


class RewardEvaluation:
    """One evaluation pass (a validate/test/predict epoch): generate greedily, score, accumulate."""

    def __init__(
        self,
        subsets: Iterable[str] = (),
        device: torch.device | str = "cpu",
        weights: Mapping[str, float] | None = None,
    ) -> None:
        self.metric = SubsetMeanReward(subsets, weights).to(device)
        self.records: list[GenerationRecord] = []

    def step(
        self, whitebox, reward_model, batch: Mapping[str, Sequence[str]], max_new_tokens: int
    ) -> list[GenerationRecord]:
        """Greedy replies (prompt left-truncated, reply cut at the next turn) and their rewards for one batch.

        ``reward_model`` is anything with ``score(prompts, responses) -> list[float]`` (``RewardModelJudge``);
        ``None`` records replies without rewards.
        """
        prompts = list(batch["prompt"])
        replies = whitebox.greedy(prompts, max_new_tokens)
        rewards: list[float | None] = [None] * len(prompts)
        if reward_model is not None:
            rewards = [float(r) for r in reward_model.score(prompts, replies)]
            self.metric.update(list(batch["subset"]), rewards)
        records = [
            GenerationRecord(id=i, subset=s, prompt=p, reply=r, reward=w)
            for i, s, p, r, w in zip(batch["id"], batch["subset"], prompts, replies, rewards)
        ]
        self.records.extend(records)
        return records


def subsets_of(dataloaders: Any) -> list[str]:
    """Subset names in order of first appearance in the evaluation rows of one or more dataloaders.

    Works for any dataloader whose dataset is a sequence of rows with a ``subset`` key (the package's data
    modules); otherwise returns what it found and the metric registers the rest as they come.
    """
    if dataloaders is None:
        return []
    loaders = dataloaders if isinstance(dataloaders, (list, tuple)) else [dataloaders]
    names: dict[str, None] = {}
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        if not isinstance(dataset, Sequence):
            continue
        for row in dataset:
            if isinstance(row, Mapping) and "subset" in row:
                names.setdefault(str(row["subset"]), None)
    return list(names)


class Coverage(NamedTuple):
    """What an evaluation scored out of what its data holds: prompts, and subsets (or categories)."""

    prompts: int
    of_prompts: int
    subsets: list[str]
    of_subsets: list[str]

    @property
    def missing(self) -> list[str]:
        scored = set(self.subsets)
        return [s for s in self.of_subsets if s not in scored]

    @property
    def complete(self) -> bool:
        return self.prompts >= self.of_prompts and not self.missing

    def describe(self, group: str = "subset") -> str:
        """``"100 of 100 prompts, 1 of 1 subset (harmless-base)"``."""
        groups = f"{len(self.subsets)} of {len(self.of_subsets)} {plural(group, len(self.of_subsets))}"
        listed = f" ({'; '.join(self.subsets)})" if 0 < len(self.subsets) <= 4 else ""
        return f"{self.prompts} of {self.of_prompts} prompts, {groups}{listed}"

    def missing_text(self, at_most: int = 6) -> str:
        """The groups not scored (names may hold commas: joined by semicolons), the first ``at_most``."""
        missing = self.missing
        more = f" and {len(missing) - at_most} more" if len(missing) > at_most else ""
        return "; ".join(missing[:at_most]) + more


def plural(word: str, n: int) -> str:
    if n == 1:
        return word
    return word[:-1] + "ies" if word.endswith("y") else word + "s"


def coverage(dataloaders: Any, records: Sequence[GenerationRecord]) -> Coverage:
    """The prompts and subsets scored (``records``) against those of the evaluation data (``dataloaders``)."""
    loaders = dataloaders if isinstance(dataloaders, (list, tuple)) else [dataloaders]
    available = sum(
        len(d) for d in (getattr(lo, "dataset", None) for lo in loaders) if isinstance(d, Sequence)
    )
    scored = list(dict.fromkeys(r["subset"] for r in records))
    return Coverage(
        len({r["id"] for r in records}), max(available, len(records)), scored, subsets_of(loaders)
    )


def gather_records(records: list[GenerationRecord]) -> list[GenerationRecord]:
    """All processes' records (a collective call), each id once; the records as given in one process."""
    if not _distributed():
        return records
    gathered: list[list[GenerationRecord] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    seen: set[str] = set()
    merged: list[GenerationRecord] = []
    for part in gathered:
        for record in part or []:
            if record["id"] not in seen:
                seen.add(record["id"])
                merged.append(record)
    return merged
