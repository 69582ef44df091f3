"""The white box's token plumbing: what is sampled is what is scored, texts join their prompts as the dialogue
format does, the judge's better reply gets the room the sequence allows, evaluation cuts replies as PRO
does."""

from __future__ import annotations

import pytest
import torch

from cyclealign_pl.cycle import CycleConfig
from cyclealign_pl.policy import EVAL_MARKERS, TURN_MARKERS, Reply, SamplingConfig, WhiteBox
from tests.helpers import (
    GOOD,
    QUESTIONS,
    PrefersHelpJudge,
    bpe_tokenizer,
    hh_prompt,
    make_data,
    make_trainer,
    tiny_llama_for,
    tiny_module,
)

CORPUS = [f"{hh_prompt(q)} {reply}" for q in QUESTIONS for reply in ("Sure, glad to help.", "No. Go away.")]


def whitebox_for(tokenizer_kind: str, max_length: int = 128, max_new_tokens: int = 16) -> WhiteBox:
    """A tiny random Llama with the byte tokenizer or a BPE trained here (both offline)."""
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer() if tokenizer_kind == "byte" else bpe_tokenizer(CORPUS)
    model = tiny_llama_for(tokenizer)
    return WhiteBox(model, tokenizer, max_length, SamplingConfig(max_new_tokens=max_new_tokens))


def own_logprob(whitebox: WhiteBox, prompt: str, reply_ids: tuple[int, ...]) -> float:
    """The mean log-prob the model itself gives ``reply_ids`` after ``prompt``: one plain forward pass."""
    prompt_ids = whitebox.prompt_ids(prompt)
    ids = torch.tensor([prompt_ids + list(reply_ids)])
    with torch.no_grad():
        logps = torch.log_softmax(whitebox.model(input_ids=ids).logits[0].float(), -1)
    start = len(prompt_ids)
    return sum(logps[start - 1 + j, token].item() for j, token in enumerate(reply_ids)) / len(reply_ids)


@pytest.mark.parametrize("tokenizer_kind", ["byte", "bpe"])
def test_a_sampled_reply_is_scored_on_the_tokens_that_generate_produced(tokenizer_kind):
    whitebox = whitebox_for(tokenizer_kind)
    prompts = [hh_prompt("Can you help me with my garden?"), hh_prompt("What is a good name for a cat?")]
    torch.manual_seed(3)
    sampled = whitebox.sample(prompts, 3)
    with torch.no_grad():
        scores = whitebox.score(prompts, sampled).scores
    for row, (prompt, group) in enumerate(zip(prompts, sampled)):
        for column, reply in enumerate(group):
            assert scores[row, column].item() == pytest.approx(
                own_logprob(whitebox, prompt, reply.ids), abs=1e-4
            )
            if reply.finished and whitebox.eos_id in reply.ids:  # stopped by EOS: it is scored, once, last
                assert reply.ids.index(whitebox.eos_id) == len(reply.ids) - 1


@pytest.mark.parametrize("tokenizer_kind", ["byte", "bpe"])
def test_a_reply_as_text_scores_the_same_as_its_generated_ids(tokenizer_kind):
    """Generated ``Assistant: Sure, glad to help.</s>``: the reply's text (stripped) joins its prompt with the
    dialogue format's space, so text and ids give the same tokens and the same score; tokenising the stripped
    text alone (``Assistant:Sure``) would not."""
    whitebox = whitebox_for(tokenizer_kind)
    tokenizer, prompt = whitebox.tokenizer, hh_prompt("Can you help?")
    generated = tokenizer(f"{prompt} Sure, glad to help.", add_special_tokens=False)["input_ids"]
    prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    reply_ids = generated[prompt_len:] + [whitebox.eos_id]
    reply = whitebox._reply_from_generated(reply_ids + [whitebox.pad_id] * 3)  # generate pads finished rows
    assert reply == Reply("Sure, glad to help.", tuple(reply_ids), finished=True)
    as_text = whitebox.reply_from_text(prompt, reply.text, room=64)
    assert as_text.ids == reply.ids
    with torch.no_grad():
        both = whitebox.score([prompt], [[reply, as_text]]).scores[0]
    assert both[0].item() == both[1].item()
    stripped = tuple(tokenizer(reply.text, add_special_tokens=False)["input_ids"]) + (whitebox.eos_id,)
    assert stripped != reply.ids  # what the old join scored: tokens the model never produced


def test_a_generated_reply_ends_at_the_next_dialogue_turn():
    whitebox = whitebox_for("byte")
    tokenizer = whitebox.tokenizer
    ids = tokenizer(" Sure.\n\nHuman: and now?", add_special_tokens=False)["input_ids"]
    reply = whitebox._reply_from_generated(ids)  # no EOS: the next turn ended the reply
    assert reply.text == "Sure." and tokenizer.decode(list(reply.ids)) == " Sure.\n\n" and reply.finished
    cut_at_budget = whitebox._reply_from_generated(
        tokenizer(" Sure, and", add_special_tokens=False)["input_ids"]
    )
    assert cut_at_budget.text == "Sure, and" and not cut_at_budget.finished


def test_evaluation_cuts_a_reply_at_a_speaker_tag_anywhere_as_pro_does():
    whitebox = whitebox_for("byte")
    ids = whitebox.tokenizer(" Sure. Human: tell me more", add_special_tokens=False)["input_ids"]
    assert whitebox._reply_from_generated(ids, EVAL_MARKERS).text == "Sure."
    assert (
        whitebox._reply_from_generated(ids, TURN_MARKERS).text == "Sure. Human: tell me more"
    )  # training: turns


def test_the_judges_better_reply_gets_the_room_the_sequence_allows():
    """Room is ``max_length`` minus the prompt, not the sampling budget; the reply is cut at the next turn; a
    reply that must still be cut gets no EOS (a cut reply is not a finished one)."""
    whitebox = whitebox_for("byte", max_length=96, max_new_tokens=8)
    prompt = hh_prompt("hi?")
    long_text = "I would be glad to help you with that, here is how."  # 51 bytes: more than max_new_tokens
    fits = whitebox.reply_from_text(prompt, long_text, room=64)
    assert fits.finished and fits.ids[-1] == whitebox.eos_id and len(fits.ids) == len(" " + long_text) + 1
    turn = whitebox.reply_from_text(prompt, "Sure.\n\nHuman: now do something else", room=64)
    assert turn.text == "Sure." and turn.finished
    cut = whitebox.reply_from_text(prompt, long_text, room=10)
    assert not cut.finished and len(cut.ids) == 10 and whitebox.eos_id not in cut.ids


def test_a_long_better_reply_is_trained_on_whole_or_cut_without_eos_and_counted(hh_root, tmp_path):
    """Through the cycle: a better reply longer than the sampling budget is kept whole; one longer than the
    room the sequence allows is cut, trained on without EOS, and counted."""
    root = hh_root(QUESTIONS[:4])
    longer_than_sampling = GOOD[0] * 3  # 57 bytes > max_new_tokens=16, well within max_length - prompt
    whole = tiny_module(
        PrefersHelpJudge(better_response=longer_than_sampling), cycle=CycleConfig(max_iterations=1)
    )
    make_trainer(tmp_path, batches=2).fit(whole, make_data(root))
    assert whole.counters.optimizer_steps > 0 and whole.counters.cut_better_replies == 0
    too_long = tiny_module(
        PrefersHelpJudge(better_response=GOOD[0] * 20), cycle=CycleConfig(max_iterations=1)
    )
    make_trainer(tmp_path, batches=2).fit(too_long, make_data(root))
    assert too_long.counters.cut_better_replies == too_long.counters.optimizer_steps > 0
