"""The cycle inside Lightning: learning, early stop, ablations, resume (tiny models, real Trainer)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from cyclealign_pl.cycle import CycleConfig
from cyclealign_pl.module import CycleAlignModule
from cyclealign_pl.policy import SamplingConfig
from tests.helpers import (
    BAD,
    GOOD,
    QUESTIONS,
    TINY_LLAMA,
    PrefersHelpJudge,
    WhiteBoxMirrorJudge,
    is_good,
    make_data,
    make_trainer,
    swap_top_two,
    tiny_module,
)

# -- learning -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_lm(tmp_path_factory) -> Path:
    """A tiny LM pre-trained for seconds to answer with helpful or dismissive templates, about half each."""
    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    rng = random.Random(0)
    config = LlamaConfig(vocab_size=384, pad_token_id=0, eos_token_id=1, bos_token_id=None, **{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        ids = []
        for _ in range(32):
            prompt = f"\n\nHuman: {rng.choice(QUESTIONS)}\n\nAssistant:"
            reply = rng.choice(GOOD + BAD)
            ids.append(tokenizer(f"{prompt} {reply}", add_special_tokens=False).input_ids + [1])
        width = max(map(len, ids))
        x = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, seq in enumerate(ids):
            x[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        loss = model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("pretrained")
    model.save_pretrained(path)
    return path


def good_fraction(module: CycleAlignModule, samples: int = 96) -> float:
    torch.manual_seed(123)
    prompts = [f"\n\nHuman: {q}\n\nAssistant:" for q in QUESTIONS[: samples // 3]]
    replies = module.whitebox.sample(prompts, 3)
    flat = [r.text for group in replies for r in group]
    return sum(map(is_good, flat)) / len(flat)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["rrhf", "pro"])
def test_cycle_raises_reward_of_preferred_replies(objective, pretrained_lm, hh_root, tmp_path):
    """The gradient aligns: a short run moves the LM towards the judge's preferred kind of reply."""
    judge = PrefersHelpJudge()
    module = CycleAlignModule(
        model=str(pretrained_lm),
        tokenizer="byt5",
        judge=judge,
        cycle=CycleConfig(objective=objective, max_iterations=3),
        sampling=SamplingConfig(max_new_tokens=24),
        max_length=128,
        eval_max_new_tokens=32,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-4),
    )
    before = good_fraction(module)
    assert 0.2 < before < 0.8, f"the pre-trained LM should produce both kinds, got {before:.2f} good"
    make_trainer(tmp_path, batches=24).fit(module, make_data(hh_root(QUESTIONS)))
    after = good_fraction(module)
    assert after >= 0.9 and after - before >= 0.25, f"{objective}: good replies {before:.2f} -> {after:.2f}"
    assert module.counters["prompts"] == 24 and module.counters["optimizer_steps"] >= 12


# -- early stop and iterations --------------------------------------------------------------------------


def test_judge_that_always_agrees_stops_after_one_iteration(hh_root, tmp_path):
    judge = WhiteBoxMirrorJudge()
    module = tiny_module(judge, cycle=CycleConfig(max_iterations=5))
    make_trainer(tmp_path, batches=4).fit(module, make_data(hh_root(QUESTIONS[:8])))
    assert module.counters["prompts"] == 4
    assert module.counters["iterations"] == 4  # one each
    assert module.counters["agreed_prompts"] == 4
    assert module.counters["optimizer_steps"] == 4


def test_judge_that_never_agrees_uses_all_iterations(hh_root, tmp_path):
    judge = WhiteBoxMirrorJudge(swap_top_two)
    module = tiny_module(judge, cycle=CycleConfig(max_iterations=3))
    make_trainer(tmp_path, batches=2).fit(module, make_data(hh_root(QUESTIONS[:8])))
    assert module.counters["iterations"] == 6
    assert module.counters["agreed_prompts"] == 0
    assert module.trainer.global_step == 6  # manual optimization: global_step counts optimizer steps


def test_batched_prompts_drop_out_independently(hh_root, tmp_path):
    """Prompts that agree stop; the rest keep training (one optimizer step per iteration while any is active)."""
    calls = {"n": 0}

    def agree_on_even_requests(ranking):
        calls["n"] += 1
        return ranking if calls["n"] % 2 else swap_top_two(ranking)

    judge = WhiteBoxMirrorJudge(agree_on_even_requests)
    module = tiny_module(judge, cycle=CycleConfig(max_iterations=3))
    make_trainer(tmp_path, batches=1).fit(module, make_data(hh_root(QUESTIONS[:8]), batch_size=2))
    # iteration 1: request 1 agrees, request 2 does not; iteration 2: request 3 agrees -> done after 2 iterations
    assert module.counters["iterations"] == 3
    assert module.counters["optimizer_steps"] == 2
    assert module.counters["agreed_prompts"] == 2


# -- ablations (paper Table 3) --------------------------------------------------------------------------


def _demos_by_iteration(judge: WhiteBoxMirrorJudge) -> list[int]:
    return [len(r.demonstrations) for r in judge.requests]


@pytest.mark.parametrize(
    "ablation, expected_demos, iterations",
    [
        ("none", [1, 2, 3], 3),  # static, then + one agreement per iteration
        ("no_d2", [1, 1, 1], 3),
        ("no_icl", [0, 0, 0], 3),
        ("no_wrd", [1, 2, 3], 3),
        ("no_brd", [1, 2, 3], 3),
        ("no_cycle", [1], 1),
    ],
)
def test_ablation_switches(ablation, expected_demos, iterations, hh_root, tmp_path):
    judge = WhiteBoxMirrorJudge(swap_top_two)
    module = tiny_module(judge, cycle=CycleConfig(max_iterations=3), ablation=ablation)
    make_trainer(tmp_path, batches=1).fit(module, make_data(hh_root(QUESTIONS[:8])))
    assert _demos_by_iteration(judge) == expected_demos
    assert module.counters["iterations"] == iterations
    if ablation in ("none", "no_wrd", "no_brd"):
        first_dynamic = judge.requests[1].demonstrations[1]
        candidates = judge.requests[0].candidates
        blackbox = judge.rankings[0]
        whitebox = swap_top_two(blackbox)  # the mirror judge swapped the white-box's top two
        shown = {"none": (blackbox[0], blackbox[2]), "no_wrd": blackbox, "no_brd": whitebox}[ablation]
        # the demonstration shows the ranked candidates in their original order, renumbered
        assert first_dynamic.responses == tuple(candidates[i] for i in sorted(shown))
        order = sorted(shown)
        assert tuple(order[i] for i in first_dynamic.ranking) == shown


# -- checkpoints ----------------------------------------------------------------------------------------


def test_resume_restores_pool_and_counters(hh_root, tmp_path):
    root = hh_root(QUESTIONS[:12])
    judge = WhiteBoxMirrorJudge(swap_top_two)
    first = tiny_module(judge, cycle=CycleConfig(max_iterations=2), demonstration_scope="run", max_demonstrations=5)
    trainer = make_trainer(tmp_path, batches=3)
    trainer.fit(first, make_data(root))
    ckpt = tmp_path / "three.ckpt"
    trainer.save_checkpoint(ckpt)
    assert first.pool.shared, "scope='run' keeps demonstrations across steps"

    second_judge = WhiteBoxMirrorJudge(swap_top_two)
    second = tiny_module(second_judge, cycle=CycleConfig(max_iterations=2), demonstration_scope="run", max_demonstrations=5)
    make_trainer(tmp_path, batches=3).fit(second, make_data(root), ckpt_path=ckpt)  # already complete: restores only
    assert second.counters == first.counters
    assert second.pool == first.pool
    assert not second_judge.requests

    third_judge = WhiteBoxMirrorJudge(swap_top_two)
    third = tiny_module(third_judge, cycle=CycleConfig(max_iterations=2), demonstration_scope="run", max_demonstrations=5)
    make_trainer(tmp_path, batches=3, max_epochs=2).fit(third, make_data(root), ckpt_path=ckpt)
    assert third.counters["steps"] == 6 and third.counters["prompts"] == 6
    # the restored pool is what the first resumed request sees (capped at max_demonstrations, after the static one)
    assert third_judge.requests[0].demonstrations[1:] == tuple(first.pool.shared[-5:])
