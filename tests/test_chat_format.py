"""Chat white boxes: prompts rendered by the chat template, replies ending at the end-of-turn token, and the
scored tokens exactly the generated ones; the dialogue format for base models behind ``prompt_format``."""

from __future__ import annotations

import pytest
import torch

from cyclealign_pl.data.rows import prompt_messages
from cyclealign_pl.policy import SamplingConfig, WhiteBox, end_of_turn_id
from cyclealign_pl.settings import WhiteBoxConfig
from tests.helpers import QUESTIONS, bpe_tokenizer, chat_tokenizer, hh_prompt, tiny_llama_for

CORPUS = [f"{hh_prompt(q)} {reply}" for q in QUESTIONS for reply in ("Sure, glad to help.", "No. Go away.")]
DIALOGUE = "\n\nHuman: Can you help me?\n\nAssistant: Sure, with what?\n\nHuman: My garden.\n\nAssistant:"


def tiny_whitebox(tokenizer, prompt_format: str = "auto", max_new_tokens: int = 6) -> WhiteBox:
    """A tiny random Llama whose head favours the token that ends a reply (+5 on its logit, a forward hook
    that generation and scoring both go through), so sampled replies end there or at the budget."""
    model = tiny_llama_for(tokenizer)
    whitebox = WhiteBox(
        model, tokenizer, 256, SamplingConfig(max_new_tokens=max_new_tokens), prompt_format=prompt_format
    )
    end = whitebox.eos_id

    def favour_end(module, inputs, output):
        output = output.clone()
        output[..., end] += 5.0
        return output

    model.get_output_embeddings().register_forward_hook(favour_end)
    return whitebox


def test_prompt_messages_are_the_dialogues_turns_without_the_open_assistant_turn():
    assert prompt_messages(DIALOGUE) == [
        {"role": "user", "content": "Can you help me?"},
        {"role": "assistant", "content": "Sure, with what?"},
        {"role": "user", "content": "My garden."},
    ]
    assert prompt_messages("just a question") == [{"role": "user", "content": "just a question"}]
    merged = prompt_messages("\n\nHuman: one\n\nHuman: two\n\nAssistant:")
    assert merged == [{"role": "user", "content": "one\ntwo"}]


def test_the_end_of_turn_token_is_read_from_the_template():
    tokenizer = chat_tokenizer(CORPUS)
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer) != tokenizer.eos_token_id


def test_auto_picks_chat_for_a_template_and_dialogue_without_one():
    chat = tiny_whitebox(chat_tokenizer(CORPUS))
    ids = chat.prompt_ids(DIALOGUE)
    rendered = chat.tokenizer.apply_chat_template(
        prompt_messages(DIALOGUE), tokenize=False, add_generation_prompt=True
    )
    assert chat.chat and ids == chat.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    text = chat.tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "Human:" not in text and "My garden." in text
    base = tiny_whitebox(bpe_tokenizer(CORPUS))
    assert not base.chat and base.eos_id == base.tokenizer.eos_token_id
    assert base.tokenizer.decode(base.prompt_ids(DIALOGUE)) == DIALOGUE
    forced = tiny_whitebox(chat_tokenizer(CORPUS), prompt_format="dialogue")
    assert not forced.chat and forced.tokenizer.decode(forced.prompt_ids(DIALOGUE)) == DIALOGUE
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        tiny_whitebox(bpe_tokenizer(CORPUS), prompt_format="chat")


@pytest.mark.parametrize("prompt_format", ["chat", "dialogue"])
def test_the_scored_tokens_are_exactly_the_generated_ones_up_to_the_end_of_turn(prompt_format):
    """What ``generate`` produced, up to and including the token that ends the reply (``<|im_end|>`` for
    chat, ``</s>`` for dialogue), is what is scored: the scores equal a plain forward pass over the rendered
    prompt plus those tokens."""
    whitebox = tiny_whitebox(chat_tokenizer(CORPUS), prompt_format)
    end = whitebox.eos_id
    expected_end = "<|im_end|>" if prompt_format == "chat" else "</s>"
    assert whitebox.tokenizer.convert_ids_to_tokens(end) == expected_end
    generated: list[list[int]] = []
    generate = whitebox.model.generate

    def recording(**kwargs):
        output = generate(**kwargs)
        generated.extend(output[:, kwargs["input_ids"].shape[1] :].tolist())
        return output

    whitebox.model.generate = recording
    prompts = [DIALOGUE, hh_prompt("What is a good name for a cat?")]
    torch.manual_seed(1)
    sampled = whitebox.sample(prompts, 4)
    replies = [reply for group in sampled for reply in group]
    assert len(generated) == len(replies)
    finished = [r for r in replies if r.finished]
    assert finished and len(finished) < len(replies), "the test needs replies ended both ways"
    for reply, raw in zip(replies, generated):
        if reply.finished:
            assert reply.ids == tuple(raw[: raw.index(end) + 1]) and reply.ids.count(end) == 1
        else:
            assert reply.ids == tuple(raw) and end not in raw
    with torch.no_grad():
        scores = whitebox.score(prompts, sampled).scores
        for row, (prompt, group) in enumerate(zip(prompts, sampled)):
            for column, reply in enumerate(group):
                ids = torch.tensor([whitebox.prompt_ids(prompt) + list(reply.ids)])
                logps = torch.log_softmax(whitebox.model(input_ids=ids).logits[0].float(), -1)
                start = len(ids[0]) - len(reply.ids)
                own = sum(logps[start - 1 + j, t].item() for j, t in enumerate(reply.ids)) / len(reply.ids)
                assert scores[row, column].item() == pytest.approx(own, abs=1e-4)
    for reply in replies:  # the judge reads the reply's tokens before the end of turn, decoded
        body = reply.ids[:-1] if reply.finished else reply.ids
        assert reply.text == whitebox.tokenizer.decode(list(body), skip_special_tokens=True).strip()


def test_the_judges_better_reply_ends_with_the_end_of_turn_token_as_the_template_renders_it():
    whitebox = tiny_whitebox(chat_tokenizer(CORPUS))
    reply = whitebox.reply_from_text(DIALOGUE, " Sure, glad to help. ", room=64)
    rendered = whitebox.tokenizer.apply_chat_template(
        [*prompt_messages(DIALOGUE), {"role": "assistant", "content": "Sure, glad to help."}], tokenize=False
    )
    full = whitebox.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    head = whitebox.prompt_ids(DIALOGUE)
    assert full[: len(head)] == head and reply.ids == tuple(full[len(head) : len(head) + len(reply.ids)])
    assert reply.finished and reply.ids[-1] == whitebox.eos_id and reply.text == "Sure, glad to help."
    cut = whitebox.reply_from_text(DIALOGUE, "Sure, glad to help. " * 10, room=5)
    assert not cut.finished and len(cut.ids) == 5 and whitebox.eos_id not in cut.ids


def test_a_chat_white_box_trains_through_the_cycle(hh_root, tmp_path):
    """The module with a chat tokenizer (saved and loaded by path, as a user's model folder is): prompts go
    through the template, and the cycle samples, ranks and updates on replies that end at ``<|im_end|>``."""
    from cyclealign_pl.cycle import CycleConfig
    from tests.helpers import GOOD, PrefersHelpJudge, make_data, make_trainer, tiny_module

    chat_tokenizer(CORPUS).save_pretrained(tmp_path / "tokenizer")
    module = tiny_module(
        PrefersHelpJudge(better_response=GOOD[0]),
        tokenizer=str(tmp_path / "tokenizer"),
        cycle=CycleConfig(max_iterations=2),
    )
    whitebox = module.whitebox
    assert whitebox.chat and whitebox.tokenizer.convert_ids_to_tokens(whitebox.eos_id) == "<|im_end|>"
    sampled: list = []
    sample = whitebox.sample
    whitebox.sample = lambda prompts, n: sampled.append(sample(prompts, n)) or sampled[-1]
    make_trainer(tmp_path, batches=2).fit(module, make_data(hh_root(QUESTIONS[:4])))
    assert module.counters.optimizer_steps > 0 and sampled
    for reply in (r for group in sampled for replies in group for r in replies):
        assert whitebox.eos_id not in reply.ids[:-1]  # the end of turn, if any, is last
    dialogue = tiny_module(
        None,
        tokenizer=str(tmp_path / "tokenizer"),
        whitebox=WhiteBoxConfig(max_length=128, prompt_format="dialogue"),
    )
    assert not dialogue.whitebox.chat
