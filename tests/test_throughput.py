"""The batched, overlapped cycle computes what the paper's serial loop computes (speed is in benchmarks/).

* one slot reproduces the paper's loop exactly: same candidates, rankings, demonstrations and final weights;
* continuous batching: a prompt that is done frees its slot for the next prompt of the data, which starts with
  its own demonstrations; every round but the last ones runs on a full batch; one optimizer step per round;
* the black box answers while the white box scores (or, in the serial mode, before it scores);
* scoring with a shared prompt prefix gives the scores and gradients of full sequences, and scoring in
  chunks of tokens gives those of the whole logits;
* benchmarks/time_to_quality.py runs its sweep with tiny settings and counts rounds and prompts to R.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Sequence

import pytest
import torch
from lightning.pytorch import Callback

from cyclealign_pl.cycle import CycleConfig, CycleState, StepOutcome, run_cycle
from cyclealign_pl.demonstrations import STATIC_DEMONSTRATION, Demonstration, DemonstrationPool
from cyclealign_pl.judges.base import Judge, Judgment, RankRequest
from cyclealign_pl.objective import rrhf_loss
from cyclealign_pl.policy import Reply, SamplingConfig, WhiteBox
from cyclealign_pl.ranking import agreement, rank_by_scores
from cyclealign_pl.settings import WhiteBoxConfig
from tests.helpers import (
    QUESTIONS,
    AgreesAtIterationJudge,
    hh_prompt,
    make_data,
    make_trainer,
    tiny_module,
    update_recorder,
)


class SeedFirstStep(Callback):
    """Seeds torch right before the first training step and keeps every step's outcome."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.outcomes: list[StepOutcome] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            torch.manual_seed(self.seed)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.outcomes.append(outputs["outcome"])


def paper_serial_loop(
    whitebox: WhiteBox, optimizer, judge: Judge, prompts: Sequence[str], config: CycleConfig, clip: float
) -> list[tuple]:
    """The paper's loop (Sec. 3, Fig. 2), one prompt at a time, written out plainly: sample l candidates; the
    black box ranks them (blocking) given the static and this prompt's dynamic demonstrations; the white box
    ranks them by mean log-prob; the LCS of both becomes a demonstration; one optimizer step on
    L_RRHF + lambda * L_SFT over [better reply] + candidates in the black box's order; stop on agreement (or
    when the samples are all one reply: nothing to rank)."""
    trace = []
    for prompt in prompts:
        demonstrations = [STATIC_DEMONSTRATION]
        for _ in range(config.max_iterations):
            replies = whitebox.sample([prompt], config.num_candidates)[0]
            candidates = [r.text for r in replies]
            if len(set(candidates)) < 2:  # nothing to rank
                trace.append((candidates, None, None))
                break
            judgment = judge.rank([RankRequest(prompt, tuple(candidates), tuple(demonstrations))])[0]
            scored = whitebox.score([prompt], [replies])
            scores = scored.scores
            own = rank_by_scores(scores[0].tolist())
            trace.append((candidates, own, judgment.ranking))
            demonstration = Demonstration.from_ranking(prompt, candidates, agreement(own, judgment.ranking))
            if demonstration is not None:
                demonstrations.append(demonstration)
            # the better reply is scored on the prompt's encoding from above (the white box's own scoring API)
            better_reply = whitebox.reply_from_text(
                prompt, judgment.better_response, whitebox.reply_room(scored, 0)
            )
            better = whitebox.score_more(scored, [prompt], [0], [better_reply])
            responses = torch.cat([better[:, None], scores], dim=1)  # column 0: the black box's better reply
            order = torch.tensor([[0, *(c + 1 for c in judgment.ranking)]])
            loss = rrhf_loss(responses, order) + config.lambda_sft * -responses[0, 0]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(whitebox.model.parameters(), clip)
            optimizer.step()
            if own == judgment.ranking:
                break
    return trace


def flat_trace(outcomes: Sequence[StepOutcome]) -> list[tuple]:
    return [
        (it.candidates, it.whitebox_ranking if it.blackbox_ranking is not None else None, it.blackbox_ranking)
        for outcome in outcomes
        for record in outcome.finished
        for it in record.iterations
    ]


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "serial"])
def test_one_slot_reproduces_the_paper_serial_loop(overlap, hh_root, tmp_path):
    root = hh_root(QUESTIONS[:12])
    cycle = CycleConfig(max_iterations=3, overlap_judge=overlap)
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731 - large steps: drift would show
    sampling = SamplingConfig(max_new_tokens=16)

    judge = AgreesAtIterationJudge()
    module = tiny_module(judge, cycle=cycle, optimizer=optimizer, sampling=sampling)
    seeding = SeedFirstStep(seed=1234)
    make_trainer(tmp_path, batches=5, callbacks=[seeding]).fit(module, make_data(root))

    data = make_data(root)
    data.setup("fit")
    prompts = [batch["prompt"][0] for batch in data.train_dataloader()][:5]  # the order the Trainer saw
    reference_judge = AgreesAtIterationJudge()
    reference = tiny_module(reference_judge, cycle=cycle, optimizer=optimizer, sampling=sampling)
    torch.manual_seed(1234)
    trace = paper_serial_loop(
        reference.whitebox, optimizer(reference.model.parameters()), reference_judge, prompts, cycle, clip=1.0
    )

    assert [len(o.finished) for o in seeding.outcomes] == [1] * 5  # one slot: each step is one whole prompt
    iterations = [len(r.iterations) for o in seeding.outcomes for r in o.finished]
    assert len(set(iterations)) > 1, f"the prompts should stop at different iterations, got {iterations}"
    assert flat_trace(seeding.outcomes) == trace  # same candidates, white-box and black-box rankings
    assert judge.requests == reference_judge.requests  # same demonstrations shown to the black box
    assert module.counters.optimizer_steps == len([t for t in trace if t[2] is not None])
    for (name, mine), theirs in zip(module.model.named_parameters(), reference.model.parameters()):
        assert torch.equal(mine, theirs), f"{name} differs from the paper's serial loop"


def prompts_agreeing_at(*iterations: int, spread: int = 3) -> list[str]:
    """Distinct HH prompts that :class:`AgreesAtIterationJudge` (``spread``) agrees with at these
    iterations."""
    pool = [hh_prompt(f"question {i}?") for i in range(200)]
    by_iteration = {
        it: [p for p in pool if 1 + zlib.crc32(p.encode()) % spread == it] for it in set(iterations)
    }
    return [by_iteration[it].pop(0) for it in iterations]


def test_a_prompt_that_is_done_frees_its_slot_for_the_next_prompt():
    """Two slots, four prompts agreeing at iterations 1, 3, 2 and 1: the slot freed after round 1 takes the
    third prompt at once (its own iteration 1, only the static demonstration), so every round is full."""
    module = tiny_module(None)
    judge = AgreesAtIterationJudge(spread=3)
    judge.watch(module.whitebox)
    prompts = prompts_agreeing_at(1, 3, 2, 1)
    ids = ["a", "b", "c", "d"]
    update, changed = update_recorder(module.model)
    state, pool = CycleState(capacity=2), DemonstrationPool()

    first = run_cycle(
        state, module.whitebox, judge, pool, prompts[:2], ids[:2], CycleConfig(max_iterations=3), update
    )
    assert [r.prompt_id for r in first.finished] == [
        "a"
    ]  # done after round 1: the step returns for more data
    assert first.rounds == 1 and [r.prompt_id for r in state.active()] == ["b"]
    second = run_cycle(
        state,
        module.whitebox,
        judge,
        pool,
        prompts[2:],
        ids[2:],
        CycleConfig(max_iterations=3),
        update,
        drain=True,
    )
    asked = [(r.instruction, len(r.demonstrations)) for r in judge.requests]
    a, b, c, d = prompts
    assert asked == [
        (a, 1),
        (b, 1),  # round 1: both slots
        (c, 1),
        (b, 2),  # round 2: c took a's slot and starts with the static demonstration only
        (c, 2),
        (b, 3),  # round 3: c agrees (its 2nd iteration), b agrees (its 3rd)
        (d, 1),
    ]  # round 4 (drain): d alone
    assert [r.prompt_id for r in second.finished] == ["c", "b", "d"]
    assert [len(r.iterations) for r in second.finished] == [2, 3, 1]
    assert first.active_fraction == 1.0 and second.rounds == 3 and second.active_slots == 5
    assert changed == [True] * 4  # one optimizer step per round
    assert not state.active() and not state.waiting and not pool.current


def test_prompts_in_flight_survive_a_checkpoint_of_the_cycle_state():
    state = CycleState(capacity=2)
    state.waiting.extend([("x", "prompt x"), ("y", "prompt y")])
    module = tiny_module(None)
    judge = AgreesAtIterationJudge(spread=None)  # never agrees: the prompts stay in flight
    judge.watch(module.whitebox)
    update, _ = update_recorder(module.model)
    outcome = run_cycle(
        state,
        module.whitebox,
        judge,
        DemonstrationPool(),
        [hh_prompt("z?")],
        ["z"],
        CycleConfig(max_iterations=3),
        update,
        should_stop=lambda judge_stop: True,
    )  # a signal after round 1
    assert outcome.interrupted and outcome.rounds == 1 and not outcome.finished
    saved = json.loads(json.dumps(state.state_dict()))  # checkpoints must be able to hold it as plain data
    restored = CycleState(capacity=2)
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved
    assert [r.prompt_id for r in restored.active()] == ["x", "y"] and list(restored.waiting) == [
        ("z", hh_prompt("z?"))
    ]
    assert restored.active()[0].iterations == state.active()[0].iterations
    wider = CycleState(capacity=3)  # resumed with a larger batch: the prompts in flight keep their order
    wider.load_state_dict(saved)
    assert [r.prompt_id if r else None for r in wider.slots] == ["x", "y", None]
    with pytest.raises(ValueError, match="batch size >= 2"):
        CycleState(capacity=1).load_state_dict(saved)


class ScoringOrder(WhiteBox):
    """A white box that notes when it starts scoring candidates (a real WhiteBox otherwise)."""

    def __init__(self, *args, events: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events = events
        self.scoring = threading.Event()

    def score(self, prompts, replies):
        self.events.append("white box scores")
        self.scoring.set()
        return super().score(prompts, replies)


class OrderJudge(Judge):
    """Answers (a fixed order) and notes when; with ``wait_for`` it answers only once the white box scores."""

    def __init__(self, events: list[str], wait_for: threading.Event | None = None) -> None:
        self.events = events
        self.wait_for = wait_for

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        if self.wait_for is not None:
            assert self.wait_for.wait(timeout=60), "the white box never scored while the judge was pending"
        self.events.append("black box answers")
        return [Judgment(ranking=tuple(range(len(r.candidates)))) for r in requests]


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "serial"])
def test_the_white_box_scores_while_the_black_box_answers(overlap):
    module = tiny_module(None)
    events: list[str] = []
    whitebox = ScoringOrder(
        module.model, module.tokenizer, 128, SamplingConfig(max_new_tokens=16), events=events
    )
    judge = OrderJudge(events, wait_for=whitebox.scoring if overlap else None)
    update, _ = update_recorder(module.model)
    torch.manual_seed(0)
    outcome = run_cycle(
        CycleState(2),
        whitebox,
        judge,
        DemonstrationPool(),
        [hh_prompt("hi?")] * 2,
        ["a", "b"],
        CycleConfig(max_iterations=1, overlap_judge=overlap),
        update,
    )
    judge.close()
    first, second = (
        ("white box scores", "black box answers") if overlap else ("black box answers", "white box scores")
    )
    assert events == [first, second]
    assert 0 <= outcome.times["judge_wait_s"] <= outcome.judge_latency_s
    assert outcome.judge_hidden_fraction is not None and 0 <= outcome.judge_hidden_fraction <= 1
    assert all(outcome.times[name] > 0 for name in ("generate_s", "score_s", "update_s"))


SCORING_PROMPTS = [hh_prompt("a short one?"), hh_prompt("a much longer question " * 4)]
SCORING_REPLIES = [
    ["Sure.", "No, not today, sorry about that.", ""],
    ["Yes", "Maybe later.", "I could help with that!"],
]


def replies_of(whitebox: WhiteBox) -> list[list[Reply]]:
    return [
        [whitebox.reply_from_text(p, text, 16) for text in group]
        for p, group in zip(SCORING_PROMPTS, SCORING_REPLIES)
    ]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kv-cache", "gradient-checkpointing"])
def test_shared_prefix_scores_and_gradients_equal_full_sequences(checkpointing):
    module = tiny_module(None, whitebox=WhiteBoxConfig(max_length=128, gradient_checkpointing=checkpointing))
    module.model.train()
    sampling = SamplingConfig(max_new_tokens=16)
    results = []
    for shared in (False, True):
        module.model.zero_grad()
        whitebox = WhiteBox(module.model, module.tokenizer, 96, sampling, shared_prefix=shared)
        scored = whitebox.score(SCORING_PROMPTS, replies_of(whitebox))
        scored.scores.sum().backward()
        results.append((scored, [p.grad.clone() for p in module.model.parameters()]))
    (full, full_grads), (shared, shared_grads) = results
    assert torch.equal(full.lengths, shared.lengths)
    if checkpointing:  # no cache under gradient checkpointing: full sequences, nothing kept
        assert shared.encoding is None
        return
    # more replies later on the same prompt encoding (the judge's better replies), any rows, any order
    later = WhiteBox(module.model, module.tokenizer, 96, sampling, shared_prefix=True)
    texts = [(1, "Happy to help."), (0, "No."), (1, "")]
    more = [later.reply_from_text(SCORING_PROMPTS[row], text, 16) for row, text in texts]
    on_encoding = later.score_more(shared, SCORING_PROMPTS, [row for row, _ in texts], more)
    separately = (
        WhiteBox(module.model, module.tokenizer, 96, sampling, shared_prefix=False)
        .score([SCORING_PROMPTS[row] for row, _ in texts], [[reply] for reply in more])
        .scores[:, 0]
    )
    torch.testing.assert_close(on_encoding, separately, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.scores, full.scores, rtol=1e-5, atol=1e-5)
    for a, b in zip(full_grads, shared_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "full-sequences"])
def test_scoring_in_chunks_of_tokens_equals_scoring_all_logits_at_once(shared):
    """Chunked log-probs (each chunk's logits recomputed in backward) give the scores and gradients of the
    whole logits to 1e-5; the chunk is sized by ``logit_chunk_elements`` (here: 2 tokens of 6 replies)."""
    module = tiny_module(None)
    module.model.train()
    sampling = SamplingConfig(max_new_tokens=16)
    results = []
    for elements in (None, 2 * 6 * module.model.config.vocab_size):
        module.model.zero_grad()
        whitebox = WhiteBox(
            module.model, module.tokenizer, 96, sampling, shared_prefix=shared, logit_chunk_elements=elements
        )
        scored = whitebox.score(SCORING_PROMPTS, replies_of(whitebox))
        (scored.scores * torch.arange(1.0, 7.0).view(2, 3)).sum().backward()
        results.append((scored.scores.detach(), [p.grad.clone() for p in module.model.parameters()]))
    (whole, whole_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    for a, b in zip(whole_grads, chunked_grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "full-sequences"])
def test_chunks_bound_the_logits_whatever_the_number_of_replies(shared):
    """``logit_chunk_elements`` bounds the logits the head holds at once for any number of replies: here 2 x V
    with 6 replies (a chunk of whole tokens of every reply would hold 6 x V), in forward and in backward."""
    module = tiny_module(None)
    module.model.train()
    vocab = module.model.config.vocab_size
    whitebox = WhiteBox(
        module.model,
        module.tokenizer,
        96,
        SamplingConfig(max_new_tokens=16),
        shared_prefix=shared,
        logit_chunk_elements=2 * vocab,
    )
    replies = replies_of(whitebox)
    sizes: list[int] = []
    hook = module.model.lm_head.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()))
    try:
        scored = whitebox.score(SCORING_PROMPTS, replies)
        scored.scores.sum().backward()
    finally:
        hook.remove()
    assert sizes and max(sizes) <= 2 * vocab


def test_the_time_to_quality_benchmark_runs_its_sweep_and_counts_rounds_to_r(capsys, monkeypatch):
    """benchmarks/time_to_quality.py with tiny settings: every loop at every rate of the one grid, each run
    stopped at its first evaluation at or above R, the sweep printed with rounds and prompts to R."""
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.delitem(sys.modules, "time_to_quality", raising=False)
    benchmark = importlib.import_module("time_to_quality")
    common = ["--loops", "serial", "B2", "--lrs", "1e-4", "1e-3", "--repeats", "1", "--delay", "0"]
    common += ["--prompts", "4", "--eval-prompts", "2", "--warmup", "2"]
    benchmark.main([*common, "--target", "0"])  # reached at the first evaluation, after one round
    out = capsys.readouterr().out
    rows = [r for r in map(str.split, out.splitlines()) if r[:1] in (["serial"], ["B2"]) and "/" in r[2]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("serial", "0.0001", "1/1"),
        ("serial", "0.001", "1/1"),
        ("B2", "0.0001", "1/1"),
        ("B2", "0.001", "1/1"),
    ]
    assert [r[4:7] for r in rows] == [["1", "1", "1"]] * 2 + [
        ["1", "2", "2"]
    ] * 2  # rounds, prompts, requests
    assert "B2 vs serial:" in out and "1.0x in rounds" in out

    benchmark.main([*common, "--lrs", "1e-3", "--target", "101", "--max-rounds", "3"])  # unreachable
    out = capsys.readouterr().out
    assert out.count("did not reach R") == 2 and out.count(", 3 rounds") == 2
    assert "0/1" in out and "NOT met" in out
