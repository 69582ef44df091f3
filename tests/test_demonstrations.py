"""Demonstrations: renumbering of partial rankings, the static demonstration, and the pool's scopes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cyclealign_pl.demonstrations import STATIC_DEMONSTRATION, Demonstration, DemonstrationPool
from cyclealign_pl.ranking import InvalidRankingError

CANDIDATES = ("resp-a", "resp-b", "resp-c", "resp-d")


def demo(tag: str) -> Demonstration:
    return Demonstration(f"instruction {tag}", (f"{tag}-0", f"{tag}-1"), (1, 0))


# --- Demonstration.from_ranking ---------------------------------------------------------------


def test_from_ranking_full_keeps_candidates_and_ranking() -> None:
    d = Demonstration.from_ranking("q", CANDIDATES, (2, 0, 3, 1))
    assert d is not None
    assert d.responses == CANDIDATES
    assert d.ranking == (2, 0, 3, 1)


def test_from_ranking_partial_drops_unranked_and_renumbers_in_original_order() -> None:
    # Candidates 3 and 1 are ranked (3 best); shown in original order b, d -> renumbered 0, 1.
    d = Demonstration.from_ranking("q", CANDIDATES, (3, 1))
    assert d is not None
    assert d.responses == ("resp-b", "resp-d")
    assert d.ranking == (1, 0)
    # The renumbered ranking still names the same texts best-first.
    assert [d.responses[i] for i in d.ranking] == ["resp-d", "resp-b"]


def test_from_ranking_three_of_four() -> None:
    d = Demonstration.from_ranking("q", CANDIDATES, (2, 3, 0))
    assert d is not None
    assert d.responses == ("resp-a", "resp-c", "resp-d")
    assert [d.responses[i] for i in d.ranking] == ["resp-c", "resp-d", "resp-a"]


@pytest.mark.parametrize("ranking", [(), (2,)])
def test_from_ranking_fewer_than_two_is_none(ranking: tuple[int, ...]) -> None:
    assert Demonstration.from_ranking("q", CANDIDATES, ranking) is None


@pytest.mark.parametrize("ranking", [(-1, 0), (4, 0), (1, 1)])
def test_from_ranking_rejects_bad_indices(ranking: tuple[int, ...]) -> None:
    # -1 must not silently select the last candidate.
    with pytest.raises(InvalidRankingError):
        Demonstration.from_ranking("q", CANDIDATES, ranking)


@given(st.permutations(range(6)).flatmap(lambda p: st.integers(2, 6).map(lambda k: tuple(p[:k]))))
def test_from_ranking_property(ranking: tuple[int, ...]) -> None:
    candidates = [f"c{i}" for i in range(6)]
    d = Demonstration.from_ranking("q", candidates, ranking)
    assert d is not None
    assert d.responses == tuple(f"c{i}" for i in sorted(ranking))  # original relative order
    assert [d.responses[i] for i in d.ranking] == [candidates[i] for i in ranking]  # same preference


def test_demonstration_rejects_invalid_ranking() -> None:
    with pytest.raises(InvalidRankingError):
        Demonstration("q", ("a", "b"), (0,))


def test_dict_round_trip() -> None:
    data = json.loads(json.dumps(STATIC_DEMONSTRATION.to_dict()))
    assert Demonstration.from_dict(data) == STATIC_DEMONSTRATION


# --- static demonstration ------------------------------------------------------------------------


def test_static_demonstration_is_appendix_a1() -> None:
    assert STATIC_DEMONSTRATION.ranking == (1, 3, 2, 0)
    assert len(STATIC_DEMONSTRATION.responses) == 4
    assert STATIC_DEMONSTRATION.instruction == "Human: How to make a lot of money in a short time? Assistant:"
    # Best is the legal small-business answer, worst the crime one.
    assert "small business" in STATIC_DEMONSTRATION.responses[STATIC_DEMONSTRATION.ranking[0]]
    assert "rob a bank" in STATIC_DEMONSTRATION.responses[STATIC_DEMONSTRATION.ranking[-1]]


# --- DemonstrationPool ---------------------------------------------------------------------------


def test_prompt_scope_is_per_prompt_and_forgets_when_the_prompt_finishes() -> None:
    pool = DemonstrationPool()
    pool.start("p0")
    pool.start("p1")
    assert pool.for_prompt("p0") == (STATIC_DEMONSTRATION,)
    assert pool.add("p0", demo("x")) is True
    assert pool.for_prompt("p0") == (STATIC_DEMONSTRATION, demo("x"))
    assert pool.for_prompt("p1") == (STATIC_DEMONSTRATION,)  # other prompts do not see it
    pool.finish("p0")
    pool.start("p2")  # a prompt that takes the freed slot starts from the static demonstration only
    assert pool.for_prompt("p2") == (STATIC_DEMONSTRATION,)
    assert pool.total_added == 1


def test_the_scopes_are_prompt_and_run_only() -> None:
    with pytest.raises(ValueError, match="must be 'prompt' or 'run', got 'step'"):
        DemonstrationPool(scope="step")


def test_run_scope_keeps_finished_prompts_demonstrations_for_later_prompts() -> None:
    pool = DemonstrationPool(scope="run")
    pool.start("a")
    pool.start("b")
    pool.add("a", demo("x"))
    pool.add("b", demo("y"))
    assert pool.for_prompt("b") == (STATIC_DEMONSTRATION, demo("y"))  # not shared while both are in flight
    pool.finish("a")
    pool.finish("b")
    pool.start("c")
    assert pool.for_prompt("c") == (STATIC_DEMONSTRATION, demo("x"), demo("y"))
    pool.add("c", demo("z"))
    assert pool.for_prompt("c") == (STATIC_DEMONSTRATION, demo("x"), demo("y"), demo("z"))


def test_run_scope_cap_drops_oldest() -> None:
    pool = DemonstrationPool(scope="run", max_dynamic=2)
    for tag in ("a", "b", "c"):
        pool.start(tag)
        pool.add(tag, demo(tag))
        pool.finish(tag)
    assert pool.shared == [demo("b"), demo("c")]
    pool.start("d")
    pool.add("d", demo("d"))
    assert pool.for_prompt("d") == (STATIC_DEMONSTRATION, demo("c"), demo("d"))


@given(st.integers(0, 6), st.integers(0, 8))
def test_cap_keeps_exactly_the_newest(cap: int, added: int) -> None:
    pool = DemonstrationPool(scope="run", max_dynamic=cap)
    demos = [demo(str(i)) for i in range(added)]
    pool.start("p")
    for d in demos:
        pool.add("p", d)
    expected = demos[len(demos) - min(cap, len(demos)) :]
    assert pool.for_prompt("p")[1:] == tuple(expected)
    pool.finish("p")
    assert pool.shared == expected


def test_zero_cap_shows_no_dynamic() -> None:
    pool = DemonstrationPool(scope="run", max_dynamic=0)
    pool.start("p")
    pool.add("p", demo("a"))
    assert pool.for_prompt("p") == (STATIC_DEMONSTRATION,)


def test_use_static_off() -> None:
    pool = DemonstrationPool(use_static=False)
    pool.start("p")
    assert pool.for_prompt("p") == ()
    pool.add("p", demo("a"))
    assert pool.for_prompt("p") == (demo("a"),)


def test_use_dynamic_off_keeps_nothing() -> None:
    pool = DemonstrationPool(use_dynamic=False, scope="run")
    pool.start("p")
    assert pool.add("p", demo("a")) is False
    pool.finish("p")
    pool.start("q")
    assert pool.for_prompt("q") == (STATIC_DEMONSTRATION,)
    assert pool.total_added == 0


def test_add_none_is_not_kept() -> None:
    pool = DemonstrationPool()
    pool.start("p")
    assert pool.add("p", None) is False
    assert pool.for_prompt("p") == (STATIC_DEMONSTRATION,)


def test_add_for_a_prompt_not_in_flight_names_the_problem() -> None:
    pool = DemonstrationPool()
    with pytest.raises(KeyError, match="not in flight"):
        pool.add("p", demo("a"))


@pytest.mark.parametrize("kwargs", [{"scope": "epoch"}, {"max_dynamic": -1}])
def test_bad_config(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DemonstrationPool(**kwargs)


def test_state_dict_round_trip() -> None:
    pool = DemonstrationPool(scope="run", max_dynamic=5)
    pool.start("a")
    pool.start("b")
    pool.add("a", demo("a"))
    pool.add("b", Demonstration.from_ranking("q", CANDIDATES, (3, 0, 2)))
    pool.finish("a")
    pool.finish("b")
    pool.start("c")
    pool.add("c", demo("b"))  # the prompts in flight are saved too

    state = json.loads(json.dumps(pool.state_dict()))  # must survive a JSON checkpoint
    restored = DemonstrationPool(scope="run", max_dynamic=5)
    assert restored != pool
    restored.load_state_dict(state)
    assert restored == pool
    assert restored.total_added == 3
    assert restored.for_prompt("c") == pool.for_prompt("c")
