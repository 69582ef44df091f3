r"""Candidate scoring: one full sequence per candidate vs each prompt encoded once (shared prefix, KV cache),
and how scoring memory grows with the vocabulary (whole logits vs chunks of tokens).

The cycle scores l candidates per prompt with gradients. Full sequences encode every prompt l times; the
shared prefix encodes it once, repeats its key/value cache per candidate and runs only the candidates on
top. This times forward + backward of ``WhiteBox.score`` both ways on the same inputs, checks that the
scores and gradients agree, and prints the figures (medians of ``--repeats``) and peak memory; then the same
for sampling the candidates (``WhiteBox.sample``: the prompt prefilled once and its cache repeated).

``--memory`` measures the peak RSS of one forward + backward of ``WhiteBox.score`` in a fresh process per
setting (hidden 256, 4 layers, B=32 prompts x l=3 replies of 128 tokens after 240-token prompts), for a
vocabulary of 384 and of 32,000, with the logits of all reply tokens at once and in chunks of tokens
(``logit_chunk_elements``, recomputed in backward). Target (issue 14): the 32k chunked case within 30% of
the 384 case, with scores and gradients equal to 1e-5 (``tests/test_throughput.py`` checks the equality).

    python benchmarks/candidate_scoring.py [--model tiny|small] [--prompts 16] [--prompt-tokens 200] \
        [--threads 1]
    python benchmarks/candidate_scoring.py --memory
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from cyclealign_pl.hf import load_causal_lm, load_tokenizer
from cyclealign_pl.policy import DEFAULT_LOGIT_CHUNK_ELEMENTS, Reply, SamplingConfig, WhiteBox

MODELS = {
    # configs/tiny.yaml
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    # a larger CPU model
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8},
}
WORDS = [
    "the",
    "a",
    "help",
    "you",
    "can",
    "please",
    "question",
    "answer",
    "house",
    "water",
    "kind",
    "friend",
    "day",
    "book",
    "go",
    "see",
    "know",
]


def text(rng: random.Random, characters: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < characters:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:characters]


def forward_backward(whitebox: WhiteBox, prompts, replies) -> tuple[float, torch.Tensor, list]:
    whitebox.model.zero_grad()
    start = time.perf_counter()
    scores = whitebox.score(prompts, replies).scores
    scores.sum().backward()
    seconds = time.perf_counter() - start
    return seconds, scores.detach(), [p.grad.clone() for p in whitebox.model.parameters()]


def timed(whiteboxes: list[WhiteBox], prompts, replies, repeats: int) -> list[tuple]:
    """Median seconds, scores and gradients of each white box; the ways alternate, so machine load hits
    both."""
    runs: list[list] = [[] for _ in whiteboxes]
    for repeat in range(repeats + 1):  # the first round warms up
        for runs_of, whitebox in zip(runs, whiteboxes):
            result = forward_backward(whitebox, prompts, replies)
            if repeat:
                runs_of.append(result)
    return [(statistics.median(r[0] for r in rs), rs[-1][1], rs[-1][2]) for rs in runs]


def time_sampling(whiteboxes: list[WhiteBox], prompts, candidates: int, repeats: int) -> tuple:
    """Median seconds of ``sample`` for each white box (alternating), and whether all sampled the same
    replies."""
    times: list[list[float]] = [[] for _ in whiteboxes]
    same = True
    for repeat in range(repeats + 1):
        replies = []
        for spent, whitebox in zip(times, whiteboxes):
            torch.manual_seed(repeat)
            start = time.perf_counter()
            replies.append(whitebox.sample(prompts, candidates))
            if repeat:
                spent.append(time.perf_counter() - start)
        same = same and all(r == replies[0] for r in replies)
    return [statistics.median(t) for t in times], same


def peak_bytes(whitebox: WhiteBox, prompts, replies) -> int:
    """Peak bytes held by autograd-saved and live tensors during one forward + backward (CPU allocator)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        whitebox.score(prompts, replies).scores.sum().backward()
    live = peak = 0
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def memory_case(vocab: int, chunked: bool, shared: bool) -> int:
    """Peak RSS (bytes) of this process after one forward + backward of the issue-14 scoring case."""
    torch.set_num_threads(2)
    tokenizer = load_tokenizer("byt5")  # prompt ids < 384: valid in every vocabulary
    config = {
        "model_type": "llama",
        **MODELS["small"],
        "num_key_value_heads": MODELS["small"]["num_attention_heads"],
        "max_position_embeddings": 1024,
        "vocab_size": vocab,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    model = load_causal_lm(None, config, seed=0).train()
    whitebox = WhiteBox(
        model,
        tokenizer,
        240 + 128,
        SamplingConfig(max_new_tokens=128),
        shared_prefix=shared,
        logit_chunk_elements=DEFAULT_LOGIT_CHUNK_ELEMENTS if chunked else None,
    )
    rng = random.Random(0)
    prompts = [f"\n\nHuman: {text(rng, 220)}\n\nAssistant:" for _ in range(32)]
    replies = [
        [Reply("", tuple(rng.randrange(vocab) for _ in range(128))) for _ in range(3)] for _ in prompts
    ]
    whitebox.score(prompts, replies).scores.sum().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_table() -> None:
    """Each case in a fresh process (peak RSS never goes down within one)."""
    print(
        "peak RSS of WhiteBox.score forward + backward: hidden 256 x 4 layers, 32 prompts x 3 replies of "
        "128 tokens after 240-token prompts"
    )
    peaks = {}
    for shared in (True, False):
        for vocab in (384, 32_000):
            for chunked in (False, True):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--memory-case",
                        str(vocab),
                        str(int(chunked)),
                        str(int(shared)),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                peaks[shared, vocab, chunked] = int(out.strip().splitlines()[-1])
                print(
                    f"  {'shared prefix ' if shared else 'full sequences'}  vocab {vocab:>6}  "
                    f"{'chunked logits' if chunked else 'whole logits  '}  "
                    f"{peaks[shared, vocab, chunked] / 2**30:6.2f} GiB",
                    flush=True,
                )
    for shared in (True, False):
        small, large = peaks[shared, 384, True], peaks[shared, 32_000, True]
        ratio = large / small
        print(
            f"  {'shared prefix' if shared else 'full sequences'}: 32k chunked is {ratio:.2f}x the 384 case "
            f"(whole logits: {peaks[shared, 32_000, False] / small:.2f}x; target <= 1.30x: "
            f"{'met' if ratio <= 1.3 else 'NOT met'})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="the vocabulary memory table (issue 14)")
    parser.add_argument(
        "--memory-case", nargs=3, type=int, metavar=("VOCAB", "CHUNKED", "SHARED"), help=argparse.SUPPRESS
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=200, help="bytes = tokens (byte tokenizer)")
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if args.memory_case:
        vocab, chunked, shared = args.memory_case
        print(memory_case(vocab, bool(chunked), bool(shared)))
        return
    if args.memory:
        memory_table()
        return
    torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer("byt5")
    config = {
        "model_type": "llama",
        **MODELS[args.model],
        "num_key_value_heads": MODELS[args.model]["num_attention_heads"],
        "max_position_embeddings": 1024,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    model = load_causal_lm(None, config, seed=0).train()
    rng = random.Random(0)
    prompts = [
        f"\n\nHuman: {text(rng, rng.randint(args.prompt_tokens // 2, args.prompt_tokens))}\n\nAssistant:"
        for _ in range(args.prompts)
    ]
    max_length = args.prompt_tokens + 2 * args.reply_tokens + 32
    sampling = SamplingConfig(max_new_tokens=args.reply_tokens)
    full = WhiteBox(model, tokenizer, max_length, sampling, shared_prefix=False)
    shared = WhiteBox(model, tokenizer, max_length, sampling, shared_prefix=True)
    texts = [
        [text(rng, rng.randint(args.reply_tokens // 3, args.reply_tokens)) for _ in range(args.candidates)]
        for _ in prompts
    ]
    replies = [
        [full.reply_from_text(p, t, args.reply_tokens) for t in group] for p, group in zip(prompts, texts)
    ]

    (full_s, full_scores, full_grads), (shared_s, shared_scores, shared_grads) = timed(
        [full, shared], prompts, replies, args.repeats
    )
    score_diff = (full_scores - shared_scores).abs().max().item()
    grad_diff = max(
        (a - b).abs().max().item() / max(a.abs().max().item(), 1e-12)
        for a, b in zip(full_grads, shared_grads)
    )
    full_peak = peak_bytes(full, prompts, replies)
    shared_peak = peak_bytes(shared, prompts, replies)

    (full_gen, shared_gen), same_samples = time_sampling(
        [full, shared], prompts, args.candidates, max(args.repeats // 2, 1)
    )

    params = sum(p.numel() for p in model.parameters())
    print(
        f"model {args.model} ({params / 1e6:.2f} M parameters, {torch.get_num_threads()} threads); "
        f"{args.prompts} prompts x {args.candidates} candidates, prompts <= {args.prompt_tokens} tokens, "
        f"replies <= {args.reply_tokens} tokens"
    )
    print(f"  full sequences : {full_s * 1000:7.1f} ms forward+backward, peak {full_peak / 2**20:6.1f} MiB")
    print(
        f"  shared prefix  : {shared_s * 1000:7.1f} ms forward+backward, peak {shared_peak / 2**20:6.1f} MiB"
    )
    print(
        f"  speed-up {full_s / shared_s:.2f}x, memory {full_peak / max(shared_peak, 1):.2f}x less; "
        f"max |score diff| {score_diff:.1e}, max relative grad diff {grad_diff:.1e}"
    )
    print(
        f"  sampling {args.candidates} candidates per prompt ({args.reply_tokens} new tokens): "
        f"prompt encoded per candidate {full_gen * 1000:.0f} ms, once per prompt {shared_gen * 1000:.0f} ms "
        f"({full_gen / shared_gen:.2f}x); same samples for a seed: {same_samples}"
    )


if __name__ == "__main__":
    main()
