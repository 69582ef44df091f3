"""The batched, overlapped cycle computes what the paper's serial loop computes (speed is in benchmarks/).

* batch 1 reproduces the paper's loop exactly: same candidates, rankings, demonstrations and final weights;
* in a batch, prompts that agree drop out and the others keep training, one optimizer step per iteration;
* the black box answers while the white box scores (or, in the serial mode, before it scores);
* scoring with a shared prompt prefix gives the scores and gradients of full sequences.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Sequence

import pytest
import torch
from lightning.pytorch import Callback

from cyclealign_pl.cycle import CycleConfig, StepOutcome, run_cycle
from cyclealign_pl.demonstrations import STATIC_DEMONSTRATION, Demonstration, DemonstrationPool
from cyclealign_pl.judges.base import Judge, Judgment, RankRequest
from cyclealign_pl.objective import rrhf_loss
from cyclealign_pl.policy import SamplingConfig, WhiteBox
from cyclealign_pl.ranking import agreement, rank_by_scores
from tests.test_cycle import QUESTIONS, make_data, make_trainer, random_module, swap_top_two

BETTER = "Sure, glad to help."


class AgreesAtIterationJudge(Judge):
    """Ranks by the white box's own scores, swapped at the top until a prompt's chosen iteration, where it
    agrees. Each prompt agrees at iteration ``1 + crc32(prompt) % spread`` (as counted by its demonstrations:
    the static one plus one agreement per earlier iteration); ``spread=None`` never agrees."""

    def __init__(self, spread: int | None = 3, better_response: str | None = BETTER) -> None:
        self.spread = spread
        self.better_response = better_response
        self.whitebox: WhiteBox | None = None
        self.requests: list[RankRequest] = []

    def agrees(self, request: RankRequest) -> bool:
        if self.spread is None:
            return False
        return len(request.demonstrations) == 1 + zlib.crc32(request.instruction.encode()) % self.spread

    def rank(self, requests: Sequence[RankRequest]) -> list[Judgment]:
        self.requests.extend(requests)
        with torch.no_grad():  # the very call the cycle makes, so the scores are bit-identical
            scores = self.whitebox.score([r.instruction for r in requests], [r.candidates for r in requests], 16)
        rankings = [rank_by_scores(row) for row in scores.scores.float().tolist()]
        return [Judgment(ranking=ranking if self.agrees(r) else swap_top_two(ranking), better_response=self.better_response)
                for r, ranking in zip(requests, rankings)]


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


def paper_serial_loop(whitebox: WhiteBox, optimizer, judge: Judge, prompts: Sequence[str], config: CycleConfig,
                      sampling: SamplingConfig, clip: float) -> list[tuple]:
    """The paper's loop (Sec. 3, Fig. 2), one prompt at a time, written out plainly: sample l candidates; the
    black box ranks them (blocking) given the static and this prompt's dynamic demonstrations; the white box
    ranks them by mean log-prob; the LCS of both becomes a demonstration; one optimizer step on
    L_RRHF + lambda * L_SFT over [better response] + candidates in the black box's order; stop on agreement."""
    trace = []
    for prompt in prompts:
        demonstrations = [STATIC_DEMONSTRATION]
        for _ in range(config.max_iterations):
            candidates = whitebox.sample([prompt], config.num_candidates, sampling)[0]
            if len(set(candidates)) < 2:  # nothing to rank
                trace.append((candidates, None, None))
                continue
            judgment = judge.rank([RankRequest(prompt, tuple(candidates), tuple(demonstrations))])[0]
            scored = whitebox.score([prompt], [candidates], sampling.max_new_tokens)
            scores = scored.scores
            own = rank_by_scores(scores[0].tolist())
            trace.append((candidates, own, judgment.ranking))
            demonstration = Demonstration.from_ranking(prompt, candidates, agreement(own, judgment.ranking))
            if demonstration is not None:
                demonstrations.append(demonstration)
            # the better response is scored on the prompt's encoding from above (the white box's own scoring API)
            better = whitebox.score_on(scored.prompts, [0], [judgment.better_response], sampling.max_new_tokens)
            responses = torch.cat([better[:, None], scores], dim=1)  # column 0: the black box's better response
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
    return [(it.candidates, it.whitebox if it.blackbox is not None else None, it.blackbox)
            for outcome in outcomes for prompt in outcome.prompts for it in prompt.iterations]


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "serial"])
def test_batch_of_one_reproduces_the_paper_serial_loop(overlap, hh_root, tmp_path):
    root = hh_root(QUESTIONS[:12])
    cycle = CycleConfig(max_iterations=3, overlap_judge=overlap)
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731 - large steps: drift would show
    sampling = SamplingConfig(max_new_tokens=16)

    judge = AgreesAtIterationJudge()
    module = random_module(judge, cycle=cycle, optimizer=optimizer, sampling=sampling)
    judge.whitebox = module.whitebox
    seeding = SeedFirstStep(seed=1234)
    make_trainer(tmp_path, batches=5, callbacks=[seeding]).fit(module, make_data(root))

    data = make_data(root)
    data.setup("fit")
    prompts = [batch["prompt"][0] for batch in data.train_dataloader()][:5]  # the order the Trainer saw
    reference_judge = AgreesAtIterationJudge()
    reference = random_module(reference_judge, cycle=cycle, optimizer=optimizer, sampling=sampling)
    reference_judge.whitebox = reference.whitebox
    torch.manual_seed(1234)
    trace = paper_serial_loop(reference.whitebox, optimizer(reference.model.parameters()), reference_judge, prompts,
                              cycle, sampling, clip=1.0)

    assert [r.instruction for r in judge.requests[:1]] == prompts[:1]
    iterations = [len(p.iterations) for o in seeding.outcomes for p in o.prompts]
    assert len(set(iterations)) > 1, f"the prompts should stop at different iterations, got {iterations}"
    assert flat_trace(seeding.outcomes) == trace  # same candidates, white-box and black-box rankings
    assert judge.requests == reference_judge.requests  # same demonstrations shown to the black box
    assert module.counters["optimizer_steps"] == len([t for t in trace if t[2] is not None])
    for (name, mine), theirs in zip(module.model.named_parameters(), reference.model.parameters()):
        assert torch.equal(mine, theirs), f"{name} differs from the paper's serial loop"


def update_recorder(model: torch.nn.Module, lr: float = 1e-2):
    """A plain optimizer step that records, per call, whether it ran and which parameters it changed."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    calls: list[bool] = []

    def update(loss: torch.Tensor | None) -> bool:
        if loss is None:
            calls.append(False)
            return False
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        calls.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
        return True

    return update, calls


def test_prompts_that_agree_at_different_iterations_drop_out_and_the_rest_keep_training():
    module = random_module(None)
    whitebox = module.whitebox
    # choose three prompts that agree at iterations 1, 2 and 3 (crc32 % 3 = 0, 1, 2), and one that never does
    judge = AgreesAtIterationJudge(spread=3)
    judge.whitebox = whitebox
    by_iteration: dict[int, str] = {}
    for question in QUESTIONS:
        prompt = f"\n\nHuman: {question}\n\nAssistant:"
        by_iteration.setdefault(1 + zlib.crc32(prompt.encode()) % 3, prompt)
    prompts = [by_iteration[1], by_iteration[2], by_iteration[3]]
    update, changed = update_recorder(module.model)

    outcome = run_cycle(whitebox, judge, DemonstrationPool(), prompts, ["a", "b", "c"],
                        CycleConfig(max_iterations=3), SamplingConfig(max_new_tokens=16), update)

    assert [len(p.iterations) for p in outcome.prompts] == [1, 2, 3]
    assert [p.agreed for p in outcome.prompts] == [True, True, True]
    # the judge saw 3, then 2, then 1 prompt(s): only the active ones
    asked = [r.instruction for r in judge.requests]
    assert asked == [prompts[0], prompts[1], prompts[2], prompts[1], prompts[2], prompts[2]]
    assert outcome.updates == 3 and changed == [True, True, True]  # the last prompt alone still trains
    assert len(outcome.losses) == 3


class ScoringOrder(WhiteBox):
    """A white box that notes when it starts scoring candidates (a real WhiteBox otherwise)."""

    def __init__(self, *args, events: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events = events
        self.scoring = threading.Event()

    def score(self, prompts, responses, max_new_tokens):
        if len(responses[0]) > 1:  # the candidates, not the better response
            self.events.append("white box scores")
            self.scoring.set()
        return super().score(prompts, responses, max_new_tokens)


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
    module = random_module(None)
    events: list[str] = []
    whitebox = ScoringOrder(module.model, module.tokenizer, 128, events=events)
    judge = OrderJudge(events, wait_for=whitebox.scoring if overlap else None)
    update, _ = update_recorder(module.model)
    torch.manual_seed(0)
    outcome = run_cycle(whitebox, judge, DemonstrationPool(), ["\n\nHuman: hi?\n\nAssistant:"] * 2, ["a", "b"],
                        CycleConfig(max_iterations=1, overlap_judge=overlap), SamplingConfig(max_new_tokens=16), update)
    judge.close()
    first, second = ("white box scores", "black box answers") if overlap else ("black box answers", "white box scores")
    assert events == [first, second]
    assert 0 <= outcome.judge_wait_s <= outcome.judge_latency_s
    assert outcome.judge_hidden_fraction is not None and 0 <= outcome.judge_hidden_fraction <= 1


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kv-cache", "gradient-checkpointing"])
def test_shared_prefix_scores_and_gradients_equal_full_sequences(checkpointing):
    module = random_module(None, gradient_checkpointing=checkpointing)
    module.model.train()
    prompts = ["\n\nHuman: a short one?\n\nAssistant:", "\n\nHuman: " + "a much longer question " * 4 + "\n\nAssistant:"]
    replies = [["Sure.", "No, not today, sorry about that.", ""], ["Yes", "Maybe later.", "I could help with that!"]]
    results = []
    for shared in (False, True):
        module.model.zero_grad()
        whitebox = WhiteBox(module.model, module.tokenizer, max_length=96, shared_prefix=shared)
        scored = whitebox.score(prompts, replies, 16)
        scored.scores.sum().backward()
        results.append((scored, [p.grad.clone() for p in module.model.parameters()]))
    (full, full_grads), (shared, shared_grads) = results
    assert torch.equal(full.lengths, shared.lengths)
    if checkpointing:  # no cache under gradient checkpointing: full sequences, nothing kept
        assert shared.prompts is None
        return
    # more replies later on the same prompt encoding (the judge's better responses), any rows, any order
    later = WhiteBox(module.model, module.tokenizer, max_length=96, shared_prefix=True)
    on_encoding = later.score_on(shared.prompts, [1, 0, 1], ["Happy to help.", "No.", ""], 16)
    separately = WhiteBox(module.model, module.tokenizer, max_length=96, shared_prefix=False).score(
        [prompts[1], prompts[0], prompts[1]], [["Happy to help."], ["No."], [""]], 16).scores[:, 0]
    torch.testing.assert_close(on_encoding, separately, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.scores, full.scores, rtol=1e-5, atol=1e-5)
    for a, b in zip(full_grads, shared_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
