"""Rankings of candidate responses: validation, white-box ranking, LCS agreement, accuracy.

A *ranking* is a tuple of candidate indices, best first: ``(1, 3, 2, 0)`` says candidate 1 is the best
and candidate 0 the worst. Pure Python, no I/O: every function here is deterministic and cheap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import combinations

Ranking = tuple[int, ...]


class InvalidRankingError(ValueError):
    """A ranking that is not a permutation of the candidates (the message says why)."""


def validate_ranking(
    ranking: Iterable[object], num_candidates: int, *, allow_partial: bool = False
) -> Ranking:
    """Return ``ranking`` as a tuple of ints, or raise :class:`InvalidRankingError` saying what is wrong.

    A full ranking names every candidate exactly once. ``allow_partial`` accepts a duplicate-free subset
    of at least two candidates (a partial order is still a preference; fewer than two is not).
    """
    items = list(ranking)
    out: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise InvalidRankingError(f"ranking entry {item!r} is not an integer index")
        if not 0 <= item < num_candidates:
            raise InvalidRankingError(f"index {item} is out of range for {num_candidates} candidates")
        if item in out:
            raise InvalidRankingError(f"index {item} appears twice")
        out.append(item)
    if allow_partial:
        if len(out) < 2:
            raise InvalidRankingError(f"a ranking needs at least two candidates, got {len(out)}")
    elif len(out) != num_candidates:
        missing = sorted(set(range(num_candidates)) - set(out))
        raise InvalidRankingError(f"ranking is partial: candidates {missing} are missing")
    return tuple(out)


def rank_by_scores(scores: Sequence[float]) -> Ranking:
    """White-box ranking: indices by descending score; ties keep index order; NaN ranks last."""

    def key(i: int) -> tuple[bool, float, int]:
        s = float(scores[i])
        return (math.isnan(s), -s if not math.isnan(s) else 0.0, i)

    return tuple(sorted(range(len(scores)), key=key))


def agreement(whitebox: Sequence[int], blackbox: Sequence[int]) -> Ranking:
    """The agreement ranking: a longest common subsequence of the two rankings.

    Tie-break (paper, Sec. 3.2: "the LCS ... with the highest black-box rankings"): among all longest
    common subsequences, return the one whose positions in the *black-box* ranking, read best-first, are
    lexicographically smallest. So its best element is as high in the black-box ranking as any LCS allows,
    then its second, and so on. Rankings hold distinct indices, so each element matches at most once.
    """
    bb, wb = list(blackbox), list(whitebox)
    n, m = len(bb), len(wb)
    # suffix[i][j] = length of an LCS of bb[i:] and wb[j:]
    suffix = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            if bb[i] == wb[j]:
                suffix[i][j] = 1 + suffix[i + 1][j + 1]
            else:
                suffix[i][j] = max(suffix[i + 1][j], suffix[i][j + 1])
    position_in_wb = {item: p for p, item in enumerate(wb)}
    out: list[int] = []
    i = j = 0
    while suffix[i][j] > 0:
        # Greedy on black-box position: the first bb element that can still start an LCS of full length.
        for k in range(i, n):
            p = position_in_wb.get(bb[k], -1)
            if p >= j and 1 + suffix[k + 1][p + 1] == suffix[i][j]:
                out.append(bb[k])
                i, j = k + 1, p + 1
                break
    return tuple(out)


def _common_pairs(prediction: Sequence[int], reference: Sequence[int]) -> tuple[int, int]:
    """(concordant, discordant) pairs over the candidates present in both rankings."""
    pred_pos = {item: p for p, item in enumerate(prediction)}
    ref_pos = {item: p for p, item in enumerate(reference)}
    common = [item for item in reference if item in pred_pos]
    concordant = discordant = 0
    for a, b in combinations(common, 2):
        if (pred_pos[a] - pred_pos[b]) * (ref_pos[a] - ref_pos[b]) > 0:
            concordant += 1
        else:
            discordant += 1
    return concordant, discordant


def pairwise_accuracy(prediction: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of candidate pairs that ``prediction`` orders as ``reference`` does (NaN if no pair)."""
    concordant, discordant = _common_pairs(prediction, reference)
    total = concordant + discordant
    return concordant / total if total else math.nan


def kendall_tau(prediction: Sequence[int], reference: Sequence[int]) -> float:
    """Kendall's tau-a between two rankings of the same candidates, in [-1, 1] (NaN if no pair)."""
    concordant, discordant = _common_pairs(prediction, reference)
    total = concordant + discordant
    return (concordant - discordant) / total if total else math.nan


def exact_match(prediction: Sequence[int], reference: Sequence[int]) -> bool:
    """Whether the two rankings are identical."""
    return tuple(prediction) == tuple(reference)
