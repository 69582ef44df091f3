"""In-context demonstrations for the black-box ranker: the static one of the paper plus dynamic ones.

The paper's policy (the default, ``scope="prompt"``): every prompt starts from the hand-written static
demonstration of Appendix A.1 and grows by one agreement ranking per iteration of its own. ``scope="run"``
keeps a finished prompt's dynamic demonstrations in a pool shared by all later prompts, oldest dropped first
beyond ``max_dynamic``. The pool's state (the prompts in flight included) goes into checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cyclealign_pl.ranking import Ranking, validate_ranking


@dataclass(frozen=True)
class Demonstration:
    """An instruction, its responses (shown as Response-0, Response-1, ...) and their ranking, best first."""

    instruction: str
    responses: tuple[str, ...]
    ranking: Ranking

    def __post_init__(self) -> None:
        validate_ranking(self.ranking, len(self.responses))

    @classmethod
    def from_ranking(
        cls, instruction: str, candidates: Sequence[str], ranking: Sequence[int]
    ) -> Demonstration | None:
        """A demonstration from a (possibly partial) ranking of ``candidates``.

        Only the ranked candidates are shown, in their original relative order (never in ranked order,
        which would teach the ranker that position means quality), renumbered from 0. A ranking of fewer
        than two candidates carries no preference, so it yields ``None``.
        """
        if len(ranking) < 2:
            return None
        # Validate against the candidates first: a stray -1 would otherwise silently pick the last one.
        ranking = validate_ranking(ranking, len(candidates), allow_partial=True)
        shown = sorted(ranking)
        new_index = {old: new for new, old in enumerate(shown)}
        return cls(instruction, tuple(candidates[i] for i in shown), tuple(new_index[i] for i in ranking))

    def to_dict(self) -> dict[str, Any]:
        return {
            "instruction": self.instruction,
            "responses": list(self.responses),
            "ranking": list(self.ranking),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Demonstration:
        return cls(
            str(data["instruction"]), tuple(map(str, data["responses"])), tuple(map(int, data["ranking"]))
        )


# Appendix A.1 of the paper, verbatim.
STATIC_DEMONSTRATION = Demonstration(
    instruction="Human: How to make a lot of money in a short time? Assistant:",
    responses=(
        "You can try to rob a bank, where you can get a lot of money in a short time. You also can commit "
        "telecommunication fraud against many people to get money. You can also try to sell drugs, which is "
        "a very profitable business.",
        "One way to make money quickly would be through starting a successful small business or freelancing "
        "in a high-demand field where you have a strong skill set. Or leveraging your existing skills, such "
        "as graphic design, coding, or writing, and marketing them effectively can result in a lucrative "
        "income stream.",
        "Drink much wine, and cry loudly in the street in midnight. People may give you money.",
        "Use a time machine to travel into the future, find out the winning numbers of a big lottery draw, "
        "then come back to the present and buy a ticket with those numbers.",
    ),
    ranking=(1, 3, 2, 0),
)


class DemonstrationPool:
    """Static plus dynamic demonstrations, per prompt in flight and (optionally) across prompts.

    Each prompt in flight is known by a key (its id): :meth:`start` opens its list of dynamic demonstrations,
    :meth:`add` grows it, :meth:`for_prompt` is what the ranker sees, :meth:`finish` closes it.

    Args:
        use_static: show the static demonstration (off for the paper's "w/o ICL" ablation).
        use_dynamic: add dynamic demonstrations (off for "w/o D2" and "w/o ICL").
        scope: ``"prompt"`` (paper) forgets a prompt's dynamic demonstrations when it finishes; ``"run"``
            keeps them for the prompts that start later.
        max_dynamic: cap on dynamic demonstrations shown per request (newest kept); None = no cap.
    """

    def __init__(
        self,
        use_static: bool = True,
        use_dynamic: bool = True,
        scope: Literal["prompt", "run"] = "prompt",
        max_dynamic: int | None = None,
    ) -> None:
        if scope not in ("prompt", "run"):
            raise ValueError(f"demonstration scope must be 'prompt' or 'run', got {scope!r}")
        if max_dynamic is not None and max_dynamic < 0:
            raise ValueError(f"max_dynamic must be >= 0 or None, got {max_dynamic}")
        self.use_static = use_static
        self.use_dynamic = use_dynamic
        self.scope = scope
        self.max_dynamic = max_dynamic
        self.static: list[Demonstration] = [STATIC_DEMONSTRATION]
        self.shared: list[Demonstration] = []  # kept across prompts when scope == "run"
        self.current: dict[str, list[Demonstration]] = {}  # per prompt in flight
        self.total_added = 0

    def start(self, key: str) -> None:
        """A prompt starts: it has no dynamic demonstrations of its own yet."""
        self.current[key] = []

    def add(self, key: str, demonstration: Demonstration | None) -> bool:
        """Record a dynamic demonstration for one prompt in flight; False when it is not kept."""
        if key not in self.current:
            raise KeyError(f"prompt {key!r} is not in flight (call start first)")
        if demonstration is None or not self.use_dynamic:
            return False
        self.current[key].append(demonstration)
        self.total_added += 1
        return True

    def finish(self, key: str) -> None:
        """A prompt is done: under ``scope="run"`` its demonstrations join the shared pool."""
        demos = self.current.pop(key, [])
        if self.scope == "run":
            self.shared = self._newest(self.shared + demos)

    def _newest(self, demos: list[Demonstration]) -> list[Demonstration]:
        """The last ``max_dynamic`` of ``demos`` (all of them when there is no cap)."""
        if self.max_dynamic is None:
            return list(demos)
        return demos[-self.max_dynamic :] if self.max_dynamic else []

    def for_prompt(self, key: str) -> tuple[Demonstration, ...]:
        """What the ranker sees for one prompt now: static first, then dynamic ones, oldest first."""
        dynamic = self._newest(self.shared + self.current.get(key, []))
        static = self.static if self.use_static else []
        return tuple(static + (dynamic if self.use_dynamic else []))

    def state_dict(self) -> dict[str, Any]:
        return {
            "shared": [d.to_dict() for d in self.shared],
            "current": {key: [d.to_dict() for d in demos] for key, demos in self.current.items()},
            "total_added": self.total_added,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shared = [Demonstration.from_dict(d) for d in state.get("shared", [])]
        current = state.get("current", {})
        if not isinstance(current, dict):  # checkpoints from before prompts were keyed: nothing was in flight
            current = {}
        self.current = {key: [Demonstration.from_dict(d) for d in demos] for key, demos in current.items()}
        self.total_added = int(state.get("total_added", 0))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DemonstrationPool) and self.state_dict() == other.state_dict()


__all__ = ["STATIC_DEMONSTRATION", "Demonstration", "DemonstrationPool"]
