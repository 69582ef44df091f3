"""One CycleAlign training step, read top to bottom (paper, Sec. 3 and Fig. 2).

For a batch of prompts, up to ``max_iterations`` times (paper: N = 5):

1. **sample** - the white-box samples ``num_candidates`` responses per prompt (paper: l = 3);
2. **rank (black box)** - the judge ranks them given the prompt's demonstrations (static + dynamic) and
   writes a better response of its own; its requests run in the background while ...
3. **rank (white box)** - ... the white-box scores the candidates by mean token log-prob, its own belief;
4. **agree** - the longest common subsequence of both rankings becomes a new dynamic demonstration;
5. **update** - one optimizer step on L = L_rank + lambda * L_sft over the black-box ranking, with the
   judge's better response as the top candidate;
6. **stop?** - a prompt whose two rankings agree is done for this step; the others iterate again.

A prompt whose judgment failed (API error, unparseable reply, degenerate candidates) is masked out of the
loss for that iteration and counted; nothing is guessed. The white-box plumbing (tokens, generate) is in
``policy.py``; the losses are in ``objective.py``; the LCS is in ``ranking.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from cyclealign_pl.demonstrations import Demonstration, DemonstrationPool
from cyclealign_pl.judges.base import Judge, Judgment, RankRequest
from cyclealign_pl.objective import cycle_loss, default_sft_weight
from cyclealign_pl.policy import PromptEncoding, SamplingConfig, WhiteBox
from cyclealign_pl.ranking import Ranking, agreement, rank_by_scores

DemonstrationSource = Literal["agreement", "blackbox", "whitebox"]
# the failure of a candidate set with fewer than two distinct replies: not sent to the judge, counted
DEGENERATE_CANDIDATES = "fewer than two distinct candidates"


@dataclass
class CycleConfig:
    """The method's knobs. The paper's ablations (Table 3) are settings of these, see ``ABLATIONS``."""

    num_candidates: int = 3
    max_iterations: int = 5
    objective: Literal["rrhf", "pro"] = "rrhf"
    sft_weight: float | None = None  # None: (l - 1) ** 2, as in the paper
    demonstration_source: DemonstrationSource = "agreement"
    use_judge_response: bool = True  # add the judge's better response as the top candidate
    # True: the white box scores while the black box answers (same results, less waiting). False: the paper's
    # serial loop, the judge's answer awaited before the white box scores (a baseline for benchmarks).
    overlap_judge: bool = True

    def __post_init__(self) -> None:
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates (l) must be >= 2 to form a ranking, got {self.num_candidates}")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations (N) must be >= 1, got {self.max_iterations}")
        if self.objective not in ("rrhf", "pro"):
            raise ValueError(f"objective must be 'rrhf' or 'pro', got {self.objective!r}")
        if self.demonstration_source not in ("agreement", "blackbox", "whitebox"):
            raise ValueError(f"unknown demonstration_source {self.demonstration_source!r}")

    @property
    def lambda_sft(self) -> float:
        return default_sft_weight(self.num_candidates) if self.sft_weight is None else self.sft_weight


@dataclass
class IterationRecord:
    """What happened to one prompt in one iteration (kept for metrics; never logged as text by default)."""

    candidates: list[str]
    whitebox: Ranking
    whitebox_scores: list[float]
    blackbox: Ranking | None
    agreement: Ranking | None
    failure: str | None = None
    used_judge_response: bool = False

    @property
    def agreed(self) -> bool:
        return self.blackbox is not None and self.blackbox == self.whitebox


@dataclass
class PromptRecord:
    prompt_id: str
    iterations: list[IterationRecord] = field(default_factory=list)

    @property
    def agreed(self) -> bool:
        return bool(self.iterations) and self.iterations[-1].agreed


@dataclass
class StepOutcome:
    prompts: list[PromptRecord]
    losses: list[float] = field(default_factory=list)
    rank_losses: list[float] = field(default_factory=list)
    sft_losses: list[float] = field(default_factory=list)
    updates: int = 0
    skipped_updates: int = 0
    interrupted: bool = False  # a stop was requested: the step ended after fewer iterations than it could have
    judge_latency_s: float = 0.0  # seconds from submitting the judge requests to their answers, summed
    judge_wait_s: float = 0.0  # seconds the cycle sat blocked on those answers; the rest was hidden

    @property
    def judge_hidden_fraction(self) -> float | None:
        """The share of the judge's latency during which the white box worked instead of waiting."""
        if self.judge_latency_s <= 0:
            return None
        return max(0.0, 1.0 - self.judge_wait_s / self.judge_latency_s)


Update = Callable[[Tensor | None], bool]


def run_cycle(
    whitebox: WhiteBox,
    judge: Judge,
    pool: DemonstrationPool,
    prompts: Sequence[str],
    prompt_ids: Sequence[str],
    config: CycleConfig,
    sampling: SamplingConfig,
    update: Update,
    any_rank_active: Callable[[bool], bool] = lambda local: local,
    should_stop: Callable[[], bool] = lambda: False,
) -> StepOutcome:
    """Run the cycle for one batch of prompts; ``update(loss)`` takes one optimizer step (or ``None``: a
    zero-gradient step so that data-parallel peers stay in lockstep) and returns whether it was applied.
    ``should_stop()`` is asked between iterations (a signal): True ends the step with the iterations done."""
    outcome = StepOutcome(prompts=[PromptRecord(pid) for pid in prompt_ids])
    pool.begin_step(len(prompts))
    active = list(range(len(prompts)))
    for iteration in range(config.max_iterations):
        if iteration and should_stop():  # collective under DDP: every rank asks at the same point
            outcome.interrupted = bool(active)
            break
        if not any_rank_active(bool(active)):
            break
        if not active:  # done here, but another process still iterates: join its gradient all-reduce
            update(None)
            continue
        instructions = [prompts[i] for i in active]

        # 1. sample l candidates per prompt, all prompts in one generate call
        candidates = whitebox.sample(instructions, config.num_candidates, sampling)

        # 2. the black box ranks in the background, with each prompt's current demonstrations ...
        requests = [RankRequest(prompts[i], tuple(c), pool.for_prompt(i)) for i, c in zip(active, candidates)]
        judged = [len(set(c)) >= 2 for c in candidates]  # fewer than two distinct replies: nothing to rank
        submitted = time.perf_counter()
        pending = judge.submit([r for r, ok in zip(requests, judged) if ok])
        answered = _answer_clock(pending)
        if not config.overlap_judge:  # the paper's serial loop: wait for the black box first
            answers = _await(pending, submitted, answered, outcome)

        # 3. ... while the white box ranks them by its own belief (mean token log-prob; keeps the graph)
        scored = whitebox.score(instructions, candidates, sampling.max_new_tokens)
        whitebox_rankings = [rank_by_scores(row) for row in scored.scores.detach().float().tolist()]

        if config.overlap_judge:
            answers = _await(pending, submitted, answered, outcome)
        judgments = _merge(answers, judged)

        # 4. agreement -> a dynamic demonstration for this prompt's next iterations
        for slot, i in enumerate(active):
            record = _record(candidates[slot], whitebox_rankings[slot], scored.scores[slot], judgments[slot])
            outcome.prompts[i].iterations.append(record)
            pool.add(i, _demonstration(prompts[i], record, config.demonstration_source))

        # 5. one optimizer step on the black-box rankings (+ the judge's better response on top)
        loss = _loss(whitebox, instructions, scored.scores, judgments, config, sampling, outcome, active, scored.prompts)
        applied = update(loss)
        outcome.updates += int(applied)
        outcome.skipped_updates += int(not applied)

        # 6. a prompt is done once both rankings agree
        active = [i for i in active if not outcome.prompts[i].iterations[-1].agreed]
    pool.end_step()
    return outcome


def _answer_clock(pending: Future) -> list[float]:
    """A list that receives the time the judge's future completes (filled from the judge's thread)."""
    answered: list[float] = []
    pending.add_done_callback(lambda _: answered.append(time.perf_counter()))
    return answered


def _await(pending: Future, submitted: float, answered: list[float], outcome: StepOutcome) -> list[Judgment]:
    """The judge's answers; adds the judge's latency and the time spent blocked on it to ``outcome``."""
    start = time.perf_counter()
    answers = pending.result()
    end = time.perf_counter()
    done = min(answered[0], end) if answered else end  # the callback may run just after result() returns
    outcome.judge_wait_s += end - start
    outcome.judge_latency_s += max(done - submitted, end - start)
    return answers


def _merge(judgments: Sequence[Judgment], judged: Sequence[bool]) -> list[Judgment]:
    """Judgments back in batch order; unjudged (degenerate) candidate sets become counted failures."""
    answers = iter(judgments)
    return [next(answers) if ok else Judgment.failed(DEGENERATE_CANDIDATES) for ok in judged]


def _record(candidates: list[str], whitebox: Ranking, scores: Tensor, judgment: Judgment) -> IterationRecord:
    agreed = agreement(whitebox, judgment.ranking) if judgment.ranking is not None else None
    return IterationRecord(
        candidates=list(candidates),
        whitebox=whitebox,
        whitebox_scores=scores.detach().float().tolist(),
        blackbox=judgment.ranking,
        agreement=agreed,
        failure=judgment.failure,
    )


def _demonstration(instruction: str, record: IterationRecord, source: DemonstrationSource) -> Demonstration | None:
    """The new dynamic demonstration: the agreement (paper), or one side's ranking (ablations w/o WRD/BRD)."""
    ranking = {"agreement": record.agreement, "blackbox": record.blackbox, "whitebox": record.whitebox}[source]
    return Demonstration.from_ranking(instruction, record.candidates, ranking) if ranking else None


def _loss(
    whitebox: WhiteBox,
    instructions: Sequence[str],
    candidate_scores: Tensor,
    judgments: Sequence[Judgment],
    config: CycleConfig,
    sampling: SamplingConfig,
    outcome: StepOutcome,
    active: Sequence[int],
    encoding: PromptEncoding | None = None,
) -> Tensor | None:
    """L = L_rank + lambda * L_sft over [better response?] + candidates, ranked by the black box.

    Column 0 holds the judge's better response (when it gave a usable one), columns 1..l the candidates.
    Rankings are padded with -1; a prompt with no valid ranking is all -1 and so masked out of both terms.
    """
    num_prompts, width = candidate_scores.shape[0], config.num_candidates + 1
    rankings = torch.full((num_prompts, width), -1, dtype=torch.long, device=candidate_scores.device)
    better_rows: list[int] = []
    better_texts: list[str] = []
    for row, judgment in enumerate(judgments):
        if judgment.ranking is None:
            continue
        order = [c + 1 for c in judgment.ranking]
        response = (judgment.better_response or "").strip() if config.use_judge_response else ""
        if response:
            better_rows.append(row)
            better_texts.append(response)
            order = [0] + order
            outcome.prompts[active[row]].iterations[-1].used_judge_response = True
        rankings[row, : len(order)] = torch.tensor(order)
    if not (rankings[:, 1] >= 0).any():
        return None  # no prompt has a preference this iteration
    better = torch.zeros((num_prompts, 1), dtype=candidate_scores.dtype, device=candidate_scores.device)
    if better_rows:  # on the prompts' encoding from candidate scoring when there is one (shared prefix)
        if encoding is not None:
            better_scores = whitebox.score_on(encoding, better_rows, better_texts, sampling.max_new_tokens)
        else:
            prompts = [instructions[r] for r in better_rows]
            better_scores = whitebox.score(prompts, [[t] for t in better_texts], sampling.max_new_tokens).scores[:, 0]
        index = torch.tensor(better_rows, device=candidate_scores.device)
        better = better.index_put((index,), better_scores.to(better.dtype).unsqueeze(1))
    scores = torch.cat([better, candidate_scores], dim=1)
    parts = cycle_loss(scores, rankings, config.objective, config.lambda_sft)
    outcome.losses.append(float(parts.total.detach()))
    outcome.rank_losses.append(float(parts.rank.detach()))
    outcome.sft_losses.append(float(parts.sft.detach()))
    return parts.total
