"""The CycleAlign cycle, read top to bottom (paper, Sec. 3 and Fig. 2).

Each prompt goes through up to N iterations of: 1. **sample** l replies (white box); 2. **rank** them with
the black box (in the background, with the prompt's static and dynamic demonstrations; it also writes a
better reply) while 3. the white box ranks them by mean token log-prob; 4. **agree**: the LCS of both
rankings becomes a new dynamic demonstration; 5. **update**: one optimizer step on L_rank + lambda * L_sft;
6. **stop?**: a prompt is done when both rankings agree or its l samples are one reply. Prompts run in slots
refilled from the data as they finish (continuous batching); failed judgments are masked, never guessed.
Rounds, stops and data parallelism: docs/method.md.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from cyclealign_pl.demonstrations import Demonstration, DemonstrationPool
from cyclealign_pl.judges.base import Judge, JudgeStop, Judgment, RankRequest
from cyclealign_pl.objective import cycle_loss, default_sft_weight, pad_rankings
from cyclealign_pl.policy import Reply, ScoredCandidates, WhiteBox
from cyclealign_pl.ranking import Ranking, agreement, rank_by_scores

DemonstrationSource = Literal["agreement", "blackbox", "whitebox"]
Ablation = Literal["none", "no_d2", "no_icl", "no_wrd", "no_brd", "no_cycle"]
ABLATIONS: tuple[str, ...] = ("none", "no_d2", "no_icl", "no_wrd", "no_brd", "no_cycle")
# the failure of a candidate set with fewer than two distinct replies: not sent to the judge, counted
DEGENERATE_CANDIDATES = "fewer than two distinct candidates"
TIMES = ("generate_s", "score_s", "judge_wait_s", "update_s")


@dataclass
class CycleConfig:
    """The method's settings (``model.cycle``); the paper's Table 3 ablations are one of them (``ablation``).

    Attributes:
        num_candidates: l, the replies the white box samples per prompt and iteration (paper: 3).
        max_iterations: N, the iterations a prompt gets at most before it is done (paper: 5).
        objective: the ranking loss: ``rrhf`` (pairwise hinge) or ``pro`` (listwise softmax).
        sft_weight: lambda, the weight of the SFT loss on the best reply; null: (l - 1)^2 as in the paper.
        demonstration_source: what becomes a dynamic demonstration: ``agreement`` (the paper: the LCS of both
            rankings), ``blackbox`` or ``whitebox`` (one side's ranking: the w/o WRD and w/o BRD ablations).
        use_judge_response: rank the judge's better reply above the candidates (and train on it as the best).
        overlap_judge: score with the white box while the black box answers (same results, less waiting);
            false is the paper's serial loop, and the faster one when the judge computes on the same CPU cores
            (a local llama.cpp server): overlapped, both compete for them.
        demonstration_scope: ``prompt`` (paper: each prompt starts from the static demonstration) or ``run``
            (a finished prompt's dynamic demonstrations are kept for later prompts).
        max_demonstrations: the most dynamic demonstrations per request, newest kept (null: all).
        ablation: ``no_d2`` (no dynamic demonstrations), ``no_icl`` (none at all), ``no_wrd`` / ``no_brd``
            (dynamic ones from the black box's / white box's ranking only), ``no_cycle`` (one iteration).
    """

    num_candidates: int = 3
    max_iterations: int = 5
    objective: Literal["rrhf", "pro"] = "rrhf"
    sft_weight: float | None = None
    demonstration_source: DemonstrationSource = "agreement"
    use_judge_response: bool = True
    overlap_judge: bool = True
    demonstration_scope: Literal["prompt", "run"] = "prompt"
    max_demonstrations: int | None = None
    ablation: Ablation = "none"

    def __post_init__(self) -> None:
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates (l) must be >= 2 to form a ranking, got {self.num_candidates}")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations (N) must be >= 1, got {self.max_iterations}")
        if self.objective not in ("rrhf", "pro"):
            raise ValueError(f"objective must be 'rrhf' or 'pro', got {self.objective!r}")
        if self.demonstration_source not in ("agreement", "blackbox", "whitebox"):
            raise ValueError(f"unknown demonstration_source {self.demonstration_source!r}")
        if self.sft_weight is not None and self.sft_weight < 0:
            raise ValueError(f"sft_weight (lambda) must be >= 0 or null, got {self.sft_weight}")
        if self.demonstration_scope not in ("prompt", "run"):
            raise ValueError(
                f"demonstration_scope must be 'prompt' or 'run', got {self.demonstration_scope!r}"
            )
        if self.max_demonstrations is not None and self.max_demonstrations < 0:
            raise ValueError(f"max_demonstrations must be >= 0 or null, got {self.max_demonstrations}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; choose one of {', '.join(ABLATIONS)}")

    @property
    def lambda_sft(self) -> float:
        return default_sft_weight(self.num_candidates) if self.sft_weight is None else self.sft_weight

    def effective(self) -> CycleConfig:
        """These settings with the ablation applied to the loop's own settings."""
        if self.ablation == "no_wrd":
            return replace(self, demonstration_source="blackbox")
        if self.ablation == "no_brd":
            return replace(self, demonstration_source="whitebox")
        if self.ablation == "no_cycle":
            return replace(self, max_iterations=1)
        return self

    def demonstration_pool(self) -> DemonstrationPool:
        """The pool of demonstrations these settings (and the ablation) show the black box."""
        return DemonstrationPool(
            scope=self.demonstration_scope,
            max_dynamic=self.max_demonstrations,
            use_static=self.ablation != "no_icl",
            use_dynamic=self.ablation not in ("no_icl", "no_d2"),
        )


@dataclass
class IterationRecord:
    """What happened to one prompt in one iteration (kept for metrics; never logged as text by default)."""

    candidates: list[str]
    whitebox_ranking: Ranking
    whitebox_scores: list[float]
    blackbox_ranking: Ranking | None
    agreement: Ranking | None
    failure: str | None = None
    used_judge_response: bool = False

    @property
    def agreed(self) -> bool:
        return self.blackbox_ranking is not None and self.blackbox_ranking == self.whitebox_ranking

    @property
    def degenerate(self) -> bool:
        return self.failure == DEGENERATE_CANDIDATES

    @property
    def judged(self) -> bool:
        """Its candidates went to the judge (a set of one distinct reply never does)."""
        return not self.degenerate

    @property
    def judge_failed(self) -> bool:
        """The judge was asked and gave no usable ranking: the one definition of a judge failure."""
        return self.judged and self.failure is not None


@dataclass
class PromptRecord:
    """One prompt's way through the cycle (its text is kept for the reference metrics, never logged)."""

    prompt_id: str
    prompt: str
    iterations: list[IterationRecord] = field(default_factory=list)

    @property
    def agreed(self) -> bool:
        return bool(self.iterations) and self.iterations[-1].agreed

    @property
    def identical_samples(self) -> bool:
        """Ended because its l samples were one reply (nothing to rank): sample collapse, not agreement."""
        return bool(self.iterations) and self.iterations[-1].degenerate

    def done(self, max_iterations: int) -> bool:
        last = self.iterations[-1] if self.iterations else None
        return last is not None and (last.agreed or last.degenerate or len(self.iterations) >= max_iterations)


@dataclass
class StepOutcome:
    """One training step: the prompts that finished in it, and what its rounds did."""

    finished: list[PromptRecord] = field(default_factory=list)
    capacity: int = 1
    rounds: int = 0
    active_slots: int = 0  # summed over rounds: the batch that each round actually ran
    losses: list[float] = field(default_factory=list)
    rank_losses: list[float] = field(default_factory=list)
    sft_losses: list[float] = field(default_factory=list)
    updates: int = 0
    skipped_updates: int = 0
    cut_better_replies: int = 0  # judge replies too long for max_length: cut and trained without EOS
    interrupted: bool = False  # a stop was requested: the step ended before its rounds were done
    out_of_steps: bool = False  # the optimizer steps (max_steps) were spent before the rounds were done
    judge_stop: JudgeStop | None = None  # this process's judge stopped the run (its last round not recorded)
    judge_latency_s: float = 0.0  # seconds from submitting the judge requests to their answers, summed
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMES, 0.0))

    @property
    def active_fraction(self) -> float | None:
        """The mean share of the slots that the rounds of this step kept busy."""
        return self.active_slots / (self.rounds * self.capacity) if self.rounds else None

    @property
    def judge_hidden_fraction(self) -> float | None:
        return hidden_fraction(self.times["judge_wait_s"], self.judge_latency_s)


def hidden_fraction(wait_s: float, latency_s: float) -> float | None:
    """The share of the judge's latency during which the white box worked instead of waiting (None: none)."""
    return max(0.0, 1.0 - wait_s / latency_s) if latency_s > 0 else None


class CycleState:
    """The prompts in flight across training steps: the slots and the prompts waiting for one
    (checkpointed)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the cycle needs at least one slot, got capacity {capacity}")
        self.slots: list[PromptRecord | None] = [None] * capacity
        self.waiting: deque[tuple[str, str]] = deque()  # (id, prompt) taken from the data, not started yet

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def active(self) -> list[PromptRecord]:
        return [record for record in self.slots if record is not None]

    def full(self) -> bool:
        return all(record is not None for record in self.slots)

    def state_dict(self) -> dict[str, Any]:
        return {
            "slots": [_record_to_dict(r) if r is not None else None for r in self.slots],
            "waiting": [list(item) for item in self.waiting],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("slots", [])
        slots = [_record_from_dict(r) if r is not None else None for r in saved]
        if len(slots) != self.capacity:  # another batch size: keep the prompts in flight, in order
            in_flight = [r for r in slots if r is not None]
            if len(in_flight) > self.capacity:
                raise ValueError(
                    f"the checkpoint has {len(in_flight)} prompts in flight but this run has "
                    f"{self.capacity} slots (data batch_size): resume with batch size >= {len(in_flight)}"
                )
            slots = in_flight + [None] * (self.capacity - len(in_flight))
        self.slots = slots
        self.waiting = deque((str(i), str(p)) for i, p in state.get("waiting", []))


Update = Callable[[Tensor | None], bool]


def run_cycle(
    state: CycleState,
    whitebox: WhiteBox,
    judge: Judge,
    pool: DemonstrationPool,
    prompts: Sequence[str],
    prompt_ids: Sequence[str],
    config: CycleConfig,
    update: Update,
    drain: bool = False,
    any_rank: Callable[[bool], bool] = lambda local: local,
    should_stop: Callable[[JudgeStop | None], bool] = lambda judge_stop: judge_stop is not None,
    steps_left: Callable[[], bool] = lambda: True,
) -> StepOutcome:
    """One training step: ``prompts`` join the waiting line, then rounds run until all of them have started
    and a slot is free (``drain``: until every slot is empty). ``update(loss)`` takes one optimizer step (or,
    for ``None``, none - on every process alike) and returns whether it was applied. ``any_rank`` makes the
    decision to run another round collective under data parallelism. ``should_stop(judge_stop)`` is asked
    after every round, with the ``JudgeStop`` of this process's judge if it stopped the run, and answers for
    all processes (a signal, a judge): True ends the step. ``steps_left()`` (the same on every process: the
    optimizer steps taken) False ends it before its next round. Either way the prompts in flight stay in
    ``state``."""
    outcome = StepOutcome(capacity=state.capacity)
    state.waiting.extend(zip(prompt_ids, prompts))
    while True:
        _fill_free_slots(state, pool)
        wants_round = state.full() or (drain and bool(state.active()))
        if not any_rank(wants_round):
            break
        if not steps_left():
            outcome.out_of_steps = True
            break
        _run_round(state, whitebox, judge, pool, config, update, outcome)
        for slot, record in enumerate(state.slots):
            if record is not None and record.done(config.max_iterations):
                outcome.finished.append(record)
                pool.finish(record.prompt_id)
                state.slots[slot] = None
        if should_stop(outcome.judge_stop):  # collective: every process asks here
            outcome.interrupted = True
            break
    return outcome


def _fill_free_slots(state: CycleState, pool: DemonstrationPool) -> None:
    """Free slots take the waiting prompts in order; each starts with no dynamic demonstrations."""
    for slot, record in enumerate(state.slots):
        if record is None and state.waiting:
            prompt_id, prompt = state.waiting.popleft()
            state.slots[slot] = PromptRecord(prompt_id, prompt)
            pool.start(prompt_id)


def _rank_requests(
    active: Sequence[PromptRecord],
    shown: Sequence[str],
    texts: Sequence[Sequence[str]],
    pool: DemonstrationPool,
) -> tuple[list[bool], list[RankRequest]]:
    """Which candidate sets go to the judge (fewer than two distinct replies: nothing to rank), and their
    requests with each prompt's current demonstrations."""
    judged = [len(set(group)) >= 2 for group in texts]
    requests = [
        RankRequest(prompt, tuple(group), pool.for_prompt(record.prompt_id))
        for record, prompt, group, ok in zip(active, shown, texts, judged)
        if ok
    ]
    return judged, requests


def _run_round(
    state: CycleState,
    whitebox: WhiteBox,
    judge: Judge,
    pool: DemonstrationPool,
    config: CycleConfig,
    update: Update,
    outcome: StepOutcome,
) -> None:
    """One iteration of every prompt in a slot, and one optimizer step."""
    active = state.active()
    outcome.rounds += 1
    outcome.active_slots += len(active)
    if not active:  # done here, but another process still runs a round: join its gradient all-reduce
        _timed(outcome, "update_s", update, None)
        return
    instructions = [record.prompt for record in active]

    # 1. sample l candidates per prompt, all prompts in one generate call
    candidates: list[list[Reply]] = _timed(
        outcome, "generate_s", whitebox.sample, instructions, config.num_candidates
    )
    texts = [[reply.text for reply in group] for group in candidates]

    # 2. the black box ranks in the background, with each prompt's current demonstrations ...
    shown = [whitebox.visible_prompt(record.prompt) for record in active]  # as trimmed to the budget
    judged, requests = _rank_requests(active, shown, texts, pool)
    submitted = time.perf_counter()
    pending = judge.submit(requests)
    answered = _answer_clock(pending)
    if not config.overlap_judge:  # the paper's serial loop: wait for the black box first
        answers = _await(pending, submitted, answered, outcome)

    # 3. ... while the white box ranks them by its own belief (mean token log-prob; keeps the graph)
    scored: ScoredCandidates = _timed(outcome, "score_s", whitebox.score, instructions, candidates)
    whitebox_rankings = [rank_by_scores(row) for row in scored.scores.detach().float().tolist()]

    if config.overlap_judge:
        answers = _await(pending, submitted, answered, outcome)
    if answers is None:  # the judge stopped the run: nothing recorded (redone on resume); join the update
        _timed(outcome, "update_s", update, None)
        return
    judgments = _merge(answers, judged)

    # 4. agreement -> a dynamic demonstration for this prompt's next iterations
    for slot, record in enumerate(active):
        iteration = _record(texts[slot], whitebox_rankings[slot], scored.scores[slot], judgments[slot])
        record.iterations.append(iteration)
        pool.add(record.prompt_id, _demonstration(shown[slot], iteration, config.demonstration_source))

    # 5. one optimizer step on the black-box rankings (+ the judge's better reply on top)
    started = time.perf_counter()
    loss = _loss(whitebox, active, scored, judgments, config, outcome)
    applied = update(loss)
    outcome.times["update_s"] += time.perf_counter() - started
    outcome.updates += int(applied)
    outcome.skipped_updates += int(not applied)
    # 6. (the caller frees the slots of the prompts that are done)


def _timed(outcome: StepOutcome, name: str, fn: Callable[..., Any], *args: Any) -> Any:
    started = time.perf_counter()
    try:
        return fn(*args)
    finally:
        outcome.times[name] += time.perf_counter() - started


def _answer_clock(pending: Future) -> list[float]:
    """A list that receives the time the judge's future completes (filled from the judge's thread)."""
    answered: list[float] = []
    pending.add_done_callback(lambda _: answered.append(time.perf_counter()))
    return answered


def _await(
    pending: Future, submitted: float, answered: list[float], outcome: StepOutcome
) -> list[Judgment] | None:
    """The judge's answers (None when it stopped the run: ``outcome.judge_stop``); adds the judge's latency
    and the time spent blocked on it to ``outcome``."""
    start = time.perf_counter()
    try:
        answers = pending.result()
    except JudgeStop as stop:
        outcome.judge_stop = stop
        answers = None
    end = time.perf_counter()
    done = min(answered[0], end) if answered else end  # the callback may run just after result() returns
    outcome.times["judge_wait_s"] += end - start
    outcome.judge_latency_s += max(done - submitted, end - start)
    return answers


def _merge(judgments: Sequence[Judgment], judged: Sequence[bool]) -> list[Judgment]:
    """Judgments back in slot order; unjudged (degenerate) candidate sets become counted failures."""
    answers = iter(judgments)
    return [next(answers) if ok else Judgment.failed(DEGENERATE_CANDIDATES) for ok in judged]


def _record(candidates: list[str], whitebox: Ranking, scores: Tensor, judgment: Judgment) -> IterationRecord:
    agreed = agreement(whitebox, judgment.ranking) if judgment.ranking is not None else None
    return IterationRecord(
        candidates=list(candidates),
        whitebox_ranking=whitebox,
        whitebox_scores=scores.detach().float().tolist(),
        blackbox_ranking=judgment.ranking,
        agreement=agreed,
        failure=judgment.failure,
    )


def _demonstration(
    instruction: str, record: IterationRecord, source: DemonstrationSource
) -> Demonstration | None:
    """The new dynamic demonstration: the agreement (paper), or one side's ranking (ablations w/o WRD/BRD)."""
    ranking = {
        "agreement": record.agreement,
        "blackbox": record.blackbox_ranking,
        "whitebox": record.whitebox_ranking,
    }[source]
    return Demonstration.from_ranking(instruction, record.candidates, ranking) if ranking else None


def _loss(
    whitebox: WhiteBox,
    active: Sequence[PromptRecord],
    scored: ScoredCandidates,
    judgments: Sequence[Judgment],
    config: CycleConfig,
    outcome: StepOutcome,
) -> Tensor | None:
    """L = L_rank + lambda * L_sft over [better reply?] + candidates, ranked by the black box.

    Column 0 holds the judge's better reply (when it gave a usable one), columns 1..l the candidates. A
    prompt without a valid ranking gets an empty (all -1) row, so it is masked out of both terms.
    """
    orders: list[list[int] | None] = []
    better_rows: list[int] = []
    better_replies: list[Reply] = []
    for row, (record, judgment) in enumerate(zip(active, judgments)):
        if judgment.ranking is None:
            orders.append(None)
            continue
        order = [c + 1 for c in judgment.ranking]
        text = (judgment.better_response or "").strip() if config.use_judge_response else ""
        if text:
            reply = whitebox.reply_from_text(record.prompt, text, whitebox.reply_room(scored, row))
            outcome.cut_better_replies += int(not reply.finished)
            better_rows.append(row)
            better_replies.append(reply)
            order = [0, *order]
            record.iterations[-1].used_judge_response = True
        orders.append(order)
    rankings = pad_rankings(orders, config.num_candidates + 1, device=scored.scores.device)
    if not (rankings[:, 1] >= 0).any():
        return None  # no prompt has a preference this iteration
    better = scored.scores.new_zeros((len(active), 1))
    if better_rows:  # on the prompts' encoding from candidate scoring when there is one (shared prefix)
        better_scores = whitebox.score_more(scored, [r.prompt for r in active], better_rows, better_replies)
        index = better.new_tensor(better_rows, dtype=rankings.dtype)
        better = better.index_put((index,), better_scores.to(better.dtype).unsqueeze(1))
    scores = torch.cat([better, scored.scores], dim=1)
    parts = cycle_loss(scores, rankings, config.objective, config.lambda_sft)
    outcome.losses.append(float(parts.total.detach()))
    outcome.rank_losses.append(float(parts.rank.detach()))
    outcome.sft_losses.append(float(parts.sft.detach()))
    return parts.total


def _record_to_dict(record: PromptRecord) -> dict[str, Any]:
    """A prompt in flight as plain data (lists, not tuples), as a checkpoint holds it."""

    def plain(ranking: Ranking | None) -> list[int] | None:
        return list(ranking) if ranking is not None else None

    return {
        "prompt_id": record.prompt_id,
        "prompt": record.prompt,
        "iterations": [
            {
                **asdict(it),
                "whitebox_ranking": plain(it.whitebox_ranking),
                "blackbox_ranking": plain(it.blackbox_ranking),
                "agreement": plain(it.agreement),
            }
            for it in record.iterations
        ],
    }


def _record_from_dict(data: dict[str, Any]) -> PromptRecord:
    iterations = [
        IterationRecord(
            candidates=list(it["candidates"]),
            whitebox_ranking=tuple(it["whitebox_ranking"]),
            whitebox_scores=list(it["whitebox_scores"]),
            blackbox_ranking=tuple(it["blackbox_ranking"]) if it["blackbox_ranking"] is not None else None,
            agreement=tuple(it["agreement"]) if it["agreement"] is not None else None,
            failure=it.get("failure"),
            used_judge_response=bool(it.get("used_judge_response", False)),
        )
        for it in data.get("iterations", [])
    ]
    return PromptRecord(str(data["prompt_id"]), str(data["prompt"]), iterations)
