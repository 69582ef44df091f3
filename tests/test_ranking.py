"""Rankings: validation, white-box ranking by score, LCS agreement (checked by brute force), accuracy."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cyclealign_pl.ranking import (
    InvalidRankingError,
    agreement,
    exact_match,
    kendall_tau,
    pairwise_accuracy,
    rank_by_scores,
    validate_ranking,
)

# --- validate_ranking ----------------------------------------------------------------------------


def test_validate_accepts_full_permutation() -> None:
    assert validate_ranking([2, 0, 1], 3) == (2, 0, 1)


@pytest.mark.parametrize(
    ("ranking", "num", "match"),
    [
        ((0, 0, 1), 3, "twice"),
        ((0, 1, 3), 3, "out of range"),
        ((0, -1, 1), 3, "out of range"),
        ((0, 1), 3, "partial"),
        ((0, 1.0, 2), 3, "not an integer"),
        ((0, "1", 2), 3, "not an integer"),
        ((True, 0, 2), 3, "not an integer"),
    ],
)
def test_validate_errors(ranking: tuple, num: int, match: str) -> None:
    with pytest.raises(InvalidRankingError, match=match):
        validate_ranking(ranking, num)


def test_validate_partial() -> None:
    assert validate_ranking((2, 0), 3, allow_partial=True) == (2, 0)
    with pytest.raises(InvalidRankingError, match="at least two"):
        validate_ranking((2,), 3, allow_partial=True)
    with pytest.raises(InvalidRankingError, match="twice"):
        validate_ranking((2, 2), 3, allow_partial=True)


def test_invalid_ranking_error_is_value_error() -> None:
    assert issubclass(InvalidRankingError, ValueError)


# --- rank_by_scores ------------------------------------------------------------------------------


def test_rank_by_scores_descending() -> None:
    assert rank_by_scores([-2.0, -0.5, -1.0]) == (1, 2, 0)


def test_rank_by_scores_ties_keep_index_order() -> None:
    assert rank_by_scores([-1.0, -0.5, -1.0, -0.5]) == (1, 3, 0, 2)


def test_rank_by_scores_nan_last() -> None:
    assert rank_by_scores([math.nan, -3.0, math.nan, -math.inf, -1.0]) == (4, 1, 3, 0, 2)


# --- agreement (LCS) ---------------------------------------------------------------------------


def is_subsequence(sub: tuple[int, ...], seq: tuple[int, ...]) -> bool:
    it = iter(seq)
    return all(item in it for item in sub)


def brute_force_agreement(whitebox: tuple[int, ...], blackbox: tuple[int, ...]) -> tuple[int, ...]:
    """All common subsequences by enumeration; longest, then smallest black-box position vector."""
    common = [
        sub
        for k in range(len(whitebox) + 1)
        for sub in combinations(whitebox, k)
        if is_subsequence(sub, blackbox)
    ]
    longest = max(len(sub) for sub in common)
    longest_ones = [sub for sub in common if len(sub) == longest]
    return min(longest_ones, key=lambda sub: [blackbox.index(i) for i in sub])


@pytest.mark.parametrize(
    ("whitebox", "blackbox", "expected"),
    [
        ((0, 1, 2), (1, 0, 2), (1, 2)),  # LCSs (0, 2) and (1, 2): (1, 2) is higher in the black-box ranking
        ((0, 1, 2), (0, 1, 2), (0, 1, 2)),
        ((0, 1, 2), (2, 1, 0), (2,)),  # complete disagreement: a single candidate, the black box's best
        ((2, 0, 1), (0, 2, 1), (0, 1)),
        ((), (0, 1), ()),
    ],
)
def test_agreement_hand_examples(whitebox: tuple, blackbox: tuple, expected: tuple) -> None:
    assert agreement(whitebox, blackbox) == expected


def check_agreement(whitebox: tuple[int, ...], blackbox: tuple[int, ...]) -> None:
    result = agreement(whitebox, blackbox)
    assert is_subsequence(result, whitebox)
    assert is_subsequence(result, blackbox)
    # No longer common subsequence exists, and the tie-break picks the best black-box positions.
    assert result == brute_force_agreement(whitebox, blackbox)


@given(st.integers(1, 7).flatmap(lambda n: st.tuples(st.permutations(range(n)), st.permutations(range(n)))))
def test_agreement_permutations(pair: tuple[list[int], list[int]]) -> None:
    check_agreement(tuple(pair[0]), tuple(pair[1]))


distinct_subset = st.lists(st.integers(0, 6), unique=True, max_size=7).map(tuple)


@given(distinct_subset, distinct_subset)
def test_agreement_distinct_subsets(whitebox: tuple[int, ...], blackbox: tuple[int, ...]) -> None:
    check_agreement(whitebox, blackbox)


def test_brute_force_tie_break_is_not_vacuous() -> None:
    # Two LCSs of equal length exist here; the checker must distinguish them.
    wb, bb = (0, 1, 2), (1, 0, 2)
    assert brute_force_agreement(wb, bb) == (1, 2)
    assert brute_force_agreement(wb, bb) != (0, 2)


# --- accuracy metrics --------------------------------------------------------------------------


def test_identical_rankings() -> None:
    assert pairwise_accuracy((2, 0, 1), (2, 0, 1)) == 1.0
    assert kendall_tau((2, 0, 1), (2, 0, 1)) == 1.0
    assert exact_match((2, 0, 1), [2, 0, 1])


def test_reversed_ranking() -> None:
    assert pairwise_accuracy((0, 1, 2, 3), (3, 2, 1, 0)) == 0.0
    assert kendall_tau((0, 1, 2, 3), (3, 2, 1, 0)) == -1.0
    assert not exact_match((0, 1, 2, 3), (3, 2, 1, 0))


def test_one_swap() -> None:
    # (1, 0, 2) vs (0, 1, 2): of 3 pairs, (0,1) discordant, (0,2) and (1,2) concordant.
    assert pairwise_accuracy((1, 0, 2), (0, 1, 2)) == pytest.approx(2 / 3)
    assert kendall_tau((1, 0, 2), (0, 1, 2)) == pytest.approx((2 - 1) / 3)


def test_partial_overlap_counts_common_candidates_only() -> None:
    # Common candidates {0, 2}: prediction puts 2 above 0, reference 0 above 2.
    assert pairwise_accuracy((2, 0), (0, 1, 2)) == 0.0
    assert kendall_tau((2, 0), (0, 1, 2)) == -1.0
    # Common {0, 1, 2} out of reference (1, 0, 2, 3): (1,0) discordant, (1,2), (0,2) concordant.
    assert pairwise_accuracy((0, 1, 2), (1, 0, 2, 3)) == pytest.approx(2 / 3)
    assert not exact_match((0, 1, 2), (1, 0, 2, 3))


def test_no_common_pair_is_nan() -> None:
    assert math.isnan(pairwise_accuracy((0,), (0, 1)))
    assert math.isnan(kendall_tau((2, 3), (0, 1)))


@given(st.integers(2, 6).flatmap(lambda n: st.tuples(st.permutations(range(n)), st.permutations(range(n)))))
def test_tau_is_affine_in_accuracy(pair: tuple[list[int], list[int]]) -> None:
    prediction, reference = pair
    accuracy = pairwise_accuracy(prediction, reference)
    assert kendall_tau(prediction, reference) == pytest.approx(2 * accuracy - 1)
    assert exact_match(prediction, reference) == (accuracy == 1.0)
