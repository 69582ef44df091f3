"""The candidate orders a judge is shown and the aggregation of its rankings: controls for position bias."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence

from cyclealign_pl.judges.base import RankRequest
from cyclealign_pl.ranking import Ranking


def candidate_orders(
    request: RankRequest, seed: int, shuffle: bool, num_orders: int
) -> list[tuple[int, ...]]:
    """The orders to show: rotations of the base order (shuffled when asked), then seeded random ones; seeded
    by the request's content and ``seed``, so a rerun asks the same (cached) prompts."""
    n = len(request.candidates)
    content = json.dumps([seed, request.instruction, list(request.candidates)], ensure_ascii=False)
    digest = hashlib.sha256(content.encode("utf-8")).digest()
    rng = random.Random(digest)
    base = list(range(n))
    if shuffle:
        rng.shuffle(base)
    out = []
    for j in range(num_orders):
        if j < n:
            out.append(tuple(base[j:] + base[:j]))
        else:
            extra = list(range(n))
            rng.shuffle(extra)
            out.append(tuple(extra))
    return out


def aggregate_rankings(rankings: Sequence[Ranking], num_candidates: int) -> Ranking:
    """Mean rank (Borda count) over several full rankings; ties go to the lower index (stable)."""
    total = [0.0] * num_candidates
    for ranking in rankings:
        for position, item in enumerate(ranking):
            total[item] += position
    return tuple(sorted(range(num_candidates), key=lambda i: (total[i] / len(rankings), i)))


def orders_cancel_out(rankings: Sequence[Ranking], num_candidates: int) -> bool:
    """Several rankings that give every candidate the same mean rank (a judge ranking by position only)."""
    return len(rankings) > 1 and len({_mean_rank(rankings, i) for i in range(num_candidates)}) == 1


def _mean_rank(rankings: Sequence[Ranking], item: int) -> float:
    return sum(ranking.index(item) for ranking in rankings) / len(rankings)


__all__ = ["aggregate_rankings", "candidate_orders", "orders_cancel_out"]
