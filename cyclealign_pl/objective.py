"""The white-box training objective: L = L_rank + lambda * L_sft (paper, Eq. 1), batched and masked.

Shapes: B prompts x C candidates x T tokens, right padding; a candidate's score p_i is its mean response
log-prob; rankings are ``LongTensor[B, K]`` of candidate indices, best first, padded with ``-1``. RRHF and PRO
follow their reference code, not the paper's Eq. (3)/(4), which carry a sign slip and a missing log
(docs/method.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "LossParts",
    "cycle_loss",
    "default_sft_weight",
    "mean_response_logprob",
    "pad_rankings",
    "pro_loss",
    "rrhf_loss",
    "target_logprobs",
]


class LossParts(NamedTuple):
    """The total loss and its two parts (all 0-dim tensors), so each can be logged."""

    total: Tensor
    rank: Tensor
    sft: Tensor


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16 (their exp/sum lose too much), unchanged for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def target_logprobs(
    hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, chunk_positions: int | None = None
) -> Tensor:
    """log p(targets[k, t] | hidden[k, t]) for every position, where ``head(hidden)`` gives the logits.

    ``hidden`` [K, T, H] holds the hidden state that *predicts* each target (the position before it), so only
    the positions that are scored go through the output head. With ``chunk_positions`` the head runs on that
    many (row, token) positions at a time, taken across rows as well as tokens, and each chunk's logits are
    recomputed in backward (activation checkpointing): peak memory holds one chunk's logits
    [chunk_positions, V] whatever the number of rows K and the length T, which is what lets large
    vocabularies (32k-128k) score many candidates. The result is float32 (or float64) whatever the model's
    dtype: low-precision logsumexp loses too much.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: expected "
            "hidden of shape targets.shape + (hidden_size,)"
        )
    if chunk_positions is not None and chunk_positions < 1:
        raise ValueError(f"chunk_positions must be >= 1, got {chunk_positions}")
    positions = targets.numel()
    if chunk_positions is None or chunk_positions >= positions:
        return _chunk_logprobs(hidden, targets, head)
    flat_hidden = hidden.reshape(positions, hidden.shape[-1])
    flat_targets = targets.reshape(positions)
    parts = [
        checkpoint(
            _chunk_logprobs,
            flat_hidden[start : start + chunk_positions],
            flat_targets[start : start + chunk_positions],
            head,
            use_reentrant=False,
        )
        for start in range(0, positions, chunk_positions)
    ]
    return torch.cat(parts).reshape(targets.shape)


def _chunk_logprobs(hidden: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
    logits = head(hidden)
    logits = logits.to(_at_least_float32(logits.dtype))
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def mean_response_logprob(token_logps: Tensor, response_mask: Tensor) -> Tensor:
    """The candidate score p_i: mean log-prob over the response tokens that ``response_mask`` selects.

    The mask excludes prompt and padding and includes the EOS token once (RRHF/PRO convention). A row
    with an empty mask scores 0 with zero (not NaN) gradient: the masked positions are *selected away*
    with ``where`` (so a -inf there cannot make 0 * inf = NaN) and the count is clamped to 1.
    """
    if token_logps.shape != response_mask.shape:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and response_mask {tuple(response_mask.shape)} disagree"
        )
    mask = response_mask.to(torch.bool)
    total = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)
    count = mask.sum(dim=-1).clamp(min=1)
    return total / count


def pad_rankings(
    rankings: Sequence[Sequence[int] | None], width: int, device: torch.device | str | None = None
) -> Tensor:
    """Rankings as the ``LongTensor[B, width]`` the losses take, right-padded with -1 (None = unranked)."""
    rows = []
    for b, ranking in enumerate(rankings):
        row = list(ranking) if ranking is not None else []
        if len(row) > width:
            raise ValueError(f"ranking {b} has {len(row)} entries, more than the width {width}")
        rows.append(row + [-1] * (width - len(row)))
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), width)


def _check_rankings(scores: Tensor, rankings: Tensor) -> None:
    """Raise ValueError naming the first malformed ranking row (one small device-to-host copy)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [prompts, candidates], got shape {tuple(scores.shape)}")
    if rankings.dim() != 2 or rankings.shape[0] != scores.shape[0]:
        raise ValueError(
            f"rankings must be [prompts, K] with {scores.shape[0]} prompts, got shape {tuple(rankings.shape)}"
        )
    if rankings.dtype.is_floating_point or rankings.dtype == torch.bool or rankings.dtype.is_complex:
        raise ValueError(f"rankings must hold integer candidate indices, got dtype {rankings.dtype}")
    num_candidates = scores.shape[1]
    for b, row in enumerate(rankings.detach().cpu().tolist()):
        ranked = [i for i in row if i != -1]
        if any(not -1 <= i < num_candidates for i in row):
            raise ValueError(f"ranking {b} {row}: indices must be in [0, {num_candidates}) or -1 (padding)")
        if row[: len(ranked)] != ranked:
            raise ValueError(f"ranking {b} {row}: -1 padding must come after all ranked indices")
        if len(set(ranked)) != len(ranked):
            raise ValueError(f"ranking {b} {row}: a candidate is ranked twice")


def _ranked_scores(scores: Tensor, rankings: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(scores in ranked order [B, K] float32, entry mask [B, K], prompt validity [B] = >= 2 entries)."""
    _check_rankings(scores, rankings)
    rankings = rankings.to(device=scores.device, dtype=torch.long)
    entry = rankings >= 0
    ranked = scores.gather(dim=1, index=rankings.clamp(min=0)).to(_at_least_float32(scores.dtype))
    valid = entry.sum(dim=1) >= 2  # fewer than two ranked candidates carry no preference
    return ranked, entry, valid


def _mean_over_valid(per_prompt: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``per_prompt`` over valid prompts.

    With no valid prompt this is 0, still computed from ``per_prompt`` (selected away by ``where``), so
    it keeps a grad_fn connected to the scores and ``backward()`` works (zero gradients) instead of raising.
    """
    kept = torch.where(valid, per_prompt, torch.zeros_like(per_prompt))
    return kept.sum() / valid.sum().clamp(min=1)


def rrhf_loss(scores: Tensor, rankings: Tensor) -> Tensor:
    """RRHF ranking loss: per prompt, sum over ranked pairs (better, worse) of max(0, p_worse - p_better).

    This is the paper's Eq. (3) with its sign slip fixed (the loss is minimised, as in RRHF's reference
    code). Ties cost 0. Reduced by the mean over prompts with >= 2 ranked candidates; see
    :func:`_mean_over_valid` for the all-invalid batch (returns 0 with a working backward).
    """
    ranked, entry, valid = _ranked_scores(scores, rankings)
    # diff[b, i, j] = p(rank j) - p(rank i): positive when the worse-ranked j outscores the better i.
    diff = ranked.unsqueeze(1) - ranked.unsqueeze(2)
    k = ranked.shape[1]
    better_first = torch.ones(k, k, dtype=torch.bool, device=ranked.device).triu(diagonal=1)  # i < j
    pairs = better_first & entry.unsqueeze(2) & entry.unsqueeze(1)
    per_prompt = torch.where(pairs, diff.clamp(min=0), torch.zeros_like(diff)).sum(dim=(1, 2))
    return _mean_over_valid(per_prompt, valid)


def pro_loss(scores: Tensor, rankings: Tensor) -> Tensor:
    """PRO ranking loss: per prompt, -sum_{j=0}^{k-2} log softmax(p_{r_j}, ..., p_{r_{k-1}})[0].

    This is the paper's Eq. (4) with the missing log restored (PRO's reference code is a sum of
    cross-entropies, each with the j-th best as the target class among it and all worse ones). Each
    denominator is a masked logsumexp, so it is stable for any score magnitude. Same masking and
    reduction as :func:`rrhf_loss`.
    """
    ranked, entry, valid = _ranked_scores(scores, rankings)
    k = ranked.shape[1]
    # suffix[b, j, i] selects the candidates ranked at j or below (i >= j) that are present.
    at_or_below = torch.ones(k, k, dtype=torch.bool, device=ranked.device).triu()
    suffix = at_or_below & entry.unsqueeze(1)
    masked = torch.where(suffix, ranked.unsqueeze(1).expand(-1, k, -1), -torch.inf)
    log_denominator = torch.logsumexp(masked, dim=-1)  # [B, K]; -inf where nothing is selected
    # A term exists for every ranked j with at least one ranked candidate after it (j <= k-2).
    has_worse = (entry.flip(1).cumsum(1).flip(1) - entry.long()) > 0
    terms = entry & has_worse
    nll = torch.where(terms, log_denominator - ranked, torch.zeros_like(ranked))
    return _mean_over_valid(nll.sum(dim=1), valid)


def default_sft_weight(num_candidates: int) -> float:
    """lambda = (l-1)^2 for l ranked candidates, PRO's weighting of the SFT term."""
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    return float((num_candidates - 1) ** 2)


def cycle_loss(
    scores: Tensor, rankings: Tensor, objective: Literal["rrhf", "pro"], sft_weight: float
) -> LossParts:
    """L = L_rank + lambda * L_sft (paper, Eq. 1) for one optimizer step.

    L_sft is the mean token NLL of each prompt's best response (``rankings[:, 0]``), which is exactly minus
    its score p (the score *is* the mean response token log-prob), so no second pass over tokens is needed.
    Prompts with fewer than two ranked candidates are masked out of both terms.

    ``sft_weight`` has no default on purpose: lambda = (l-1)^2 counts the l *sampled* candidates
    (:func:`default_sft_weight`), which the columns of ``scores`` cannot tell apart from the judge's better
    response ranked on top of them.

    Args:
        scores: [B, C] candidate scores p_i from :func:`mean_response_logprob`.
        rankings: [B, K] best-first candidate indices, -1 padded (from :func:`pad_rankings`).
        objective: ``"rrhf"`` or ``"pro"`` for L_rank.
        sft_weight: lambda.
    """
    if objective == "rrhf":
        rank = rrhf_loss(scores, rankings)
    elif objective == "pro":
        rank = pro_loss(scores, rankings)
    else:
        raise ValueError(f"objective must be 'rrhf' or 'pro', got {objective!r}")
    ranked, _, valid = _ranked_scores(scores, rankings)
    sft = _mean_over_valid(-ranked[:, 0], valid)
    return LossParts(total=rank + float(sft_weight) * sft, rank=rank, sft=sft)
