"""Build the default task's assets from the shipped HH-RLHF sample and the reply bank, offline and seeded.

    python -m cyclealign_pl build-demo --out DIR [--quick]

Writes ``whitebox/`` and ``evaluator/`` (``save_pretrained``, one shared tokenizer) and ``build_info.json``;
the recipe, its settings and its figures: docs/default_task.md ("How the assets are built").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from cyclealign_pl.data.hh_rlhf import HHRLHFDataModule, parse_dialogue
from cyclealign_pl.data.rows import render_prompt
from cyclealign_pl.demo.bank import (
    BANK,
    HELDOUT,
    BankReply,
    asks_question,
    good_reply_for,
    label_of,
    replies_for,
    topic_of,
)
from cyclealign_pl.judges.reward_model import format_for_reward_model
from cyclealign_pl.policy import WhiteBox

log = logging.getLogger(__name__)

EOS, PAD = "<|endoftext|>", "<|pad|>"
ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class BuildConfig:
    """Every setting of the recipe (recorded in ``build_info.json``)."""

    seed: int = 0  # model initialisation and the draws of training examples
    data_seed: int = 0  # the data module's seed: configs/tiny.yaml's evaluation prompts are held out
    eval_prompts: int = 100  # held out exactly as configs/tiny.yaml's data section draws them
    vocab_size: int = 2048
    good_after_question: float = 0.75  # P(good reply) when the human's last turn ends with "?"
    good_otherwise: float = 0.1  # P(good reply) otherwise
    fitting_share: float = 0.7  # P(the good reply that fits the request best | a good reply)
    general_share: float = 0.2  # P(a general reply) for a request with a topic (else one of its topic's)
    # the last prompt tokens kept: configs/tiny.yaml's max_length - max_new_tokens - 1
    prompt_tokens: int = 95
    lm_hidden: int = 96
    lm_layers: int = 2
    lm_heads: int = 4
    lm_intermediate: int = 256
    lm_steps: int = 500
    lm_batch: int = 16
    lm_lr: float = 3e-3
    rm_hidden: int = 64
    rm_layers: int = 2
    rm_heads: int = 4
    rm_intermediate: int = 192
    rm_max_length: int = 64  # the evaluator reads the last tokens: the reply and the end of the dialogue
    rm_steps: int = 200
    rm_batch: int = 32
    rm_lr: float = 2e-3


QUICK = BuildConfig(
    vocab_size=400,
    lm_hidden=32,
    lm_layers=1,
    lm_heads=2,
    lm_intermediate=64,
    lm_steps=8,
    lm_batch=8,
    rm_hidden=32,
    rm_layers=1,
    rm_heads=2,
    rm_intermediate=64,
    rm_steps=8,
    rm_batch=8,
)


# ------------------------------------------------------------------------------------------------ data


def split_prompts(seed: int, eval_prompts: int) -> tuple[list[str], list[dict[str, str]]]:
    """Training prompts (each training dialogue and its earlier turns) and the held-out evaluation rows,
    split by the data module itself with the default config's settings."""
    data = HHRLHFDataModule(
        train_split="test",
        eval_split="test",
        num_train_prompts=None,
        eval_prompts_per_subset=eval_prompts,
        seed=seed,
    )
    data.setup("fit")
    held_out = {row["prompt"] for row in data.eval_rows}
    prompts: dict[str, None] = {}
    for row in data.train_rows:
        turns = parse_dialogue(row["prompt"]).turns
        for end, turn in enumerate(turns):
            if turn.speaker == "Assistant":  # an earlier point of the dialogue where the assistant replied
                prompts.setdefault(render_prompt(turns[:end]), None)
        prompts.setdefault(row["prompt"], None)
    train = [p for p in prompts if p not in held_out]
    return train, [dict(row) for row in data.eval_rows]


def pretraining_reply(prompt: str, rng: random.Random, config: BuildConfig) -> BankReply:
    """The white box's pretraining reply to ``prompt``: good with probability ``good_after_question`` when the
    human's last turn asks a question, ``good_otherwise`` when not. A good reply is the one that fits the
    request best (:func:`~cyclealign_pl.demo.bank.good_reply_for`) with probability ``fitting_share``; any
    other reply is drawn from the request topic's replies, or with probability ``general_share`` from the
    general ones."""
    question = asks_question(prompt)
    good = rng.random() < (config.good_after_question if question else config.good_otherwise)
    if good and rng.random() < config.fitting_share:
        return good_reply_for(prompt)
    topic = "general" if rng.random() < config.general_share else topic_of(prompt)
    return rng.choice(replies_for(topic, good, question))


# ------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _batches(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (input ids, attention mask, labels with -100 outside the reply)."""
    width = max(len(prompt) + len(reply) for prompt, reply in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, (prompt, reply) in enumerate(sequences):
        seq = prompt + reply
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(prompt) : len(seq)] = torch.tensor(reply)
    return ids, mask, labels


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 5% of the steps, then cosine decay to 10%."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------- white box


def _step(model: torch.nn.Module, loss: torch.Tensor, optimizer, scheduler) -> None:
    """One clipped optimizer step and one scheduler step."""
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()


def _llama_config(tokenizer, hidden: int, intermediate: int, layers: int, heads: int, **extra) -> LlamaConfig:
    """A small Llama over ``tokenizer`` (no BOS: the dialogue format starts every text)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **extra,
    )


def train_whitebox(prompts: Sequence[str], tokenizer, config: BuildConfig) -> LlamaForCausalLM:
    """Pretrain the white box on ``prompt + " " + reply + EOS`` (the reply's tokens carry the loss)."""
    torch.manual_seed(config.seed)
    rng = random.Random(f"{config.seed}:whitebox")
    model = LlamaForCausalLM(
        _llama_config(
            tokenizer,
            config.lm_hidden,
            config.lm_intermediate,
            config.lm_layers,
            config.lm_heads,
            tie_word_embeddings=True,
        )
    )
    prompt_ids = {p: _ids(tokenizer, p)[-config.prompt_tokens :] for p in prompts}
    # the reply follows what the white box sees of a long dialogue: its last prompt_tokens tokens
    visible = {p: tokenizer.decode(ids) for p, ids in prompt_ids.items()}
    reply_ids = {r.text: _ids(tokenizer, r.text) + [tokenizer.eos_token_id] for r in BANK}
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lm_lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, config.lm_steps)
    model.train()
    for step in range(config.lm_steps):
        batch = [rng.choice(prompts) for _ in range(config.lm_batch)]
        pairs = [(prompt_ids[p], reply_ids[pretraining_reply(visible[p], rng, config).text]) for p in batch]
        ids, mask, labels = _batches(pairs, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        _step(model, loss, optimizer, scheduler)
        if step % 100 == 0 or step == config.lm_steps - 1:
            log.info("white box step %d/%d: loss %.3f", step + 1, config.lm_steps, loss.item())
    return model.eval()


# ------------------------------------------------------------------------------------------- evaluator


def evaluator_examples(prompts: Sequence[str], rng: random.Random) -> Iterator[tuple[str, str, float]]:
    """Endless (prompt, reply, label) triples: bank replies half good, half bad, and negatives (an empty
    reply, shuffled words, a bad sentence spliced into a good reply), each with its hand label."""
    good = [r.text for r in BANK if r.good]
    bad = [r.text for r in BANK if not r.good]
    while True:
        prompt = rng.choice(prompts)
        draw = rng.random()
        if draw < 0.4:
            yield prompt, rng.choice(good), 1.0
        elif draw < 0.8:
            yield prompt, rng.choice(bad), 0.0
        elif draw < 0.85:
            yield prompt, "", 0.0
        elif draw < 0.92:
            words = rng.choice(good).split()
            rng.shuffle(words)
            yield prompt, " ".join(words), 0.0
        else:
            yield prompt, f"{_first_sentence(rng.choice(good))} {_first_sentence(rng.choice(bad))}", 0.0


def _first_sentence(text: str) -> str:
    for i, char in enumerate(text):
        if char in ".!?" and (i + 1 == len(text) or text[i + 1] == " "):
            return text[: i + 1]
    return text


def _encode_for_evaluator(tokenizer, prompts: Sequence[str], replies: Sequence[str], max_length: int):
    """The evaluator's input exactly as ``RewardModelJudge.score`` builds it (plain format, left
    truncation)."""
    texts = [format_for_reward_model(p, r, "plain") for p, r in zip(prompts, replies)]
    return tokenizer(
        texts,
        add_special_tokens=False,
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )


def train_evaluator(prompts: Sequence[str], tokenizer, config: BuildConfig) -> LlamaForSequenceClassification:
    """A one-label reward model trained pointwise on the bank's labels (logit > 0: preferred)."""
    torch.manual_seed(config.seed + 1)
    rng = random.Random(f"{config.seed}:evaluator")
    tokenizer.truncation_side = "left"  # as RewardModelJudge reads: the reply is at the end
    model = LlamaForSequenceClassification(
        _llama_config(
            tokenizer,
            config.rm_hidden,
            config.rm_intermediate,
            config.rm_layers,
            config.rm_heads,
            num_labels=1,
        )
    )
    examples = evaluator_examples(prompts, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.rm_lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, config.rm_steps)
    model.train()
    for step in range(config.rm_steps):
        batch = [next(examples) for _ in range(config.rm_batch)]
        enc = _encode_for_evaluator(
            tokenizer, [b[0] for b in batch], [b[1] for b in batch], config.rm_max_length
        )
        logits = model(**enc).logits[:, 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.tensor([b[2] for b in batch])
        )
        _step(model, loss, optimizer, scheduler)
        if step % 100 == 0 or step == config.rm_steps - 1:
            log.info("evaluator step %d/%d: loss %.3f", step + 1, config.rm_steps, loss.item())
    return model.eval()


@torch.no_grad()
def evaluator_logits(
    model, tokenizer, prompts: Sequence[str], replies: Sequence[str], max_length: int, batch_size: int = 64
) -> list[float]:
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        enc = _encode_for_evaluator(
            tokenizer, prompts[start : start + batch_size], replies[start : start + batch_size], max_length
        )
        out.extend(model(**enc).logits[:, 0].float().tolist())
    return out


def evaluator_accuracy(
    model, tokenizer, prompts: Sequence[str], replies: Sequence[BankReply], max_length: int
) -> dict[str, float]:
    """Pointwise accuracy (logit > 0 iff good) and pairwise accuracy (good above bad, same prompt)."""
    grid = [(p, r) for p in prompts for r in replies]
    logits = evaluator_logits(model, tokenizer, [p for p, _ in grid], [r.text for _, r in grid], max_length)
    pointwise = sum((x > 0) == r.good for x, (_, r) in zip(logits, grid)) / len(grid)
    wins = pairs = 0
    for i in range(len(prompts)):
        row = logits[i * len(replies) : (i + 1) * len(replies)]
        goods = [x for x, r in zip(row, replies) if r.good]
        bads = [x for x, r in zip(row, replies) if not r.good]
        wins += sum(g > b for g in goods for b in bads)
        pairs += len(goods) * len(bads)
    return {"pointwise_accuracy": pointwise, "pairwise_accuracy": wins / max(pairs, 1)}


# ---------------------------------------------------------------------------------------------- report


def evaluator_report(model, tokenizer, prompts: Sequence[str], max_length: int) -> dict[str, Any]:
    """The evaluator on held-out prompts: with the bank, with the paraphrases no model saw, with no reply."""
    empty = evaluator_logits(model, tokenizer, prompts, [""] * len(prompts), max_length)
    return {
        "bank_on_held_out_prompts": evaluator_accuracy(model, tokenizer, prompts, list(BANK), max_length),
        "paraphrases_on_held_out_prompts": evaluator_accuracy(
            model, tokenizer, prompts, list(HELDOUT), max_length
        ),
        "empty_reply_preferred_share": sum(x > 0 for x in empty) / len(prompts),
    }


def whitebox_report(
    model, tokenizer, prompts: Sequence[str], config: BuildConfig, max_new_tokens: int = 48
) -> dict[str, Any]:
    """Greedy replies to held-out prompts: the share that are bank texts, good ones, distinct ones, empty."""
    whitebox = WhiteBox(model, tokenizer, max_length=config.prompt_tokens + max_new_tokens + 1)
    replies: list[str] = []
    for start in range(0, len(prompts), 25):
        replies.extend(whitebox.greedy(prompts[start : start + 25], max_new_tokens))
    labels = [label_of(r) for r in replies]
    return {
        "prompts": len(prompts),
        "bank_share": sum(label is not None for label in labels) / len(prompts),
        "good_share": sum(label is True for label in labels) / len(prompts),
        "distinct_replies": len(set(replies)),
        "empty_share": sum(not r for r in replies) / len(prompts),
    }


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------- build


def build(out: str | Path, config: BuildConfig = BuildConfig()) -> dict[str, Any]:
    """Build every asset into ``out`` (``whitebox/``, ``evaluator/``, ``build_info.json``); return the
    info."""
    started = time.perf_counter()
    out = Path(out)
    torch.manual_seed(config.seed)
    prompts, eval_rows = split_prompts(config.data_seed, config.eval_prompts)
    eval_prompts = [row["prompt"] for row in eval_rows]
    texts = prompts + [r.text for r in BANK]
    tokenizer = build_tokenizer(texts, config.vocab_size)
    log.info(
        "%d training prompts, tokenizer of %d tokens (%.0f s)",
        len(prompts),
        len(tokenizer),
        time.perf_counter() - started,
    )
    whitebox = train_whitebox(prompts, tokenizer, config)
    log.info("white box trained (%.0f s)", time.perf_counter() - started)
    evaluator = train_evaluator(prompts, tokenizer, config)
    log.info("evaluator trained (%.0f s)", time.perf_counter() - started)
    info: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "training_prompts": len(prompts),
        "held_out_prompt_ids": [row["id"] for row in eval_rows],
        "evaluator": evaluator_report(evaluator, tokenizer, eval_prompts, config.rm_max_length),
        "whitebox_greedy_on_held_out_prompts": whitebox_report(whitebox, tokenizer, eval_prompts, config),
    }
    info["longest_reply_tokens"] = max(len(_ids(tokenizer, r.text)) for r in BANK)
    for name, model in (("whitebox", whitebox), ("evaluator", evaluator)):
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        for path in (out / name).iterdir():
            path.chmod(0o644)  # package data: readable by every user of an installed copy
        info[f"{name}_bytes"] = _dir_size(out / name)
    info["build_seconds"] = round(time.perf_counter() - started, 1)
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def main(argv: list[str] | None = None) -> None:
    from cyclealign_pl.cli_parser import OneLineArgumentParser
    from cyclealign_pl.commands import parser_names

    parser = OneLineArgumentParser(**parser_names("build-demo"))
    parser.add_argument(
        "--out", default=str(ASSETS), help=f"output directory (default: the package's {ASSETS})"
    )
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps: checks the recipe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick and Path(args.out).resolve() == ASSETS:
        parser.error("--quick builds toy models: give --out DIR (it would replace the shipped assets)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = dataclasses.replace(QUICK if args.quick else BuildConfig(), seed=args.seed)
    info = build(args.out, config)
    summary = {k: v for k, v in info.items() if k != "held_out_prompt_ids"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
