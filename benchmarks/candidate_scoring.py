"""Candidate scoring: one full sequence per candidate vs each prompt encoded once (shared prefix, KV cache).

The cycle scores l candidates per prompt with gradients. Full sequences encode every prompt l times; the
shared prefix encodes it once, repeats its key/value cache per candidate and runs only the candidates on
top. This times forward + backward of ``WhiteBox.score`` both ways on the same inputs, checks that the
scores and gradients agree, and prints the figures (medians of ``--repeats``) and peak memory; then the same
for sampling the candidates (``WhiteBox.sample``: the prompt prefilled once and its cache repeated).

    python benchmarks/candidate_scoring.py [--model tiny|small] [--prompts 16] [--prompt-tokens 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from cyclealign_pl.hf import load_causal_lm, load_tokenizer
from cyclealign_pl.policy import WhiteBox

MODELS = {
    # configs/tiny.yaml
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    # a larger CPU model
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8},
}
WORDS = "the a help you can please question answer house water kind friend day book go see know".split()


def text(rng: random.Random, characters: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < characters:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:characters]


def forward_backward(whitebox: WhiteBox, prompts, replies, max_new_tokens: int) -> tuple[float, torch.Tensor, list]:
    whitebox.model.zero_grad()
    start = time.perf_counter()
    scores = whitebox.score(prompts, replies, max_new_tokens).scores
    scores.sum().backward()
    seconds = time.perf_counter() - start
    return seconds, scores.detach(), [p.grad.clone() for p in whitebox.model.parameters()]


def timed(whiteboxes: list[WhiteBox], prompts, replies, max_new_tokens: int, repeats: int) -> list[tuple]:
    """Median seconds, scores and gradients of each white box; the ways alternate, so machine load hits both."""
    runs: list[list] = [[] for _ in whiteboxes]
    for repeat in range(repeats + 1):  # the first round warms up
        for runs_of, whitebox in zip(runs, whiteboxes):
            result = forward_backward(whitebox, prompts, replies, max_new_tokens)
            if repeat:
                runs_of.append(result)
    return [(statistics.median(r[0] for r in rs), rs[-1][1], rs[-1][2]) for rs in runs]


def time_sampling(whiteboxes: list[WhiteBox], prompts, candidates: int, max_new_tokens: int, repeats: int) -> tuple:
    """Median seconds of ``sample`` for each white box (alternating), and whether all sampled the same replies."""
    from cyclealign_pl.policy import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    times: list[list[float]] = [[] for _ in whiteboxes]
    same = True
    for repeat in range(repeats + 1):
        replies = []
        for spent, whitebox in zip(times, whiteboxes):
            torch.manual_seed(repeat)
            start = time.perf_counter()
            replies.append(whitebox.sample(prompts, candidates, sampling))
            if repeat:
                spent.append(time.perf_counter() - start)
        same = same and all(r == replies[0] for r in replies)
    return [statistics.median(t) for t in times], same


def peak_bytes(whitebox: WhiteBox, prompts, replies, max_new_tokens: int) -> int:
    """Peak bytes held by autograd-saved and live tensors during one forward + backward (CPU allocator)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        whitebox.score(prompts, replies, max_new_tokens).scores.sum().backward()
    live = peak = 0
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=200, help="bytes = tokens (byte tokenizer)")
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer("byt5")
    config = {"model_type": "llama", **MODELS[args.model], "num_key_value_heads": MODELS[args.model]["num_attention_heads"],
              "max_position_embeddings": 1024, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    model = load_causal_lm(None, config, seed=0).train()
    rng = random.Random(0)
    prompts = [f"\n\nHuman: {text(rng, rng.randint(args.prompt_tokens // 2, args.prompt_tokens))}\n\nAssistant:"
               for _ in range(args.prompts)]
    replies = [[text(rng, rng.randint(args.reply_tokens // 3, args.reply_tokens)) for _ in range(args.candidates)]
               for _ in prompts]
    max_length = args.prompt_tokens + 2 * args.reply_tokens + 32
    full = WhiteBox(model, tokenizer, max_length, shared_prefix=False)
    shared = WhiteBox(model, tokenizer, max_length, shared_prefix=True)

    (full_s, full_scores, full_grads), (shared_s, shared_scores, shared_grads) = timed(
        [full, shared], prompts, replies, args.reply_tokens, args.repeats)
    score_diff = (full_scores - shared_scores).abs().max().item()
    grad_diff = max((a - b).abs().max().item() / max(a.abs().max().item(), 1e-12) for a, b in zip(full_grads, shared_grads))
    full_peak = peak_bytes(full, prompts, replies, args.reply_tokens)
    shared_peak = peak_bytes(shared, prompts, replies, args.reply_tokens)

    (full_gen, shared_gen), same_samples = time_sampling([full, shared], prompts, args.candidates, args.reply_tokens,
                                                         max(args.repeats // 2, 1))

    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} ({params / 1e6:.2f} M parameters, {torch.get_num_threads()} threads); {args.prompts} prompts "
          f"x {args.candidates} candidates, prompts <= {args.prompt_tokens} tokens, replies <= {args.reply_tokens} tokens")
    print(f"  full sequences : {full_s * 1000:7.1f} ms forward+backward, peak {full_peak / 2**20:6.1f} MiB")
    print(f"  shared prefix  : {shared_s * 1000:7.1f} ms forward+backward, peak {shared_peak / 2**20:6.1f} MiB")
    print(f"  speed-up {full_s / shared_s:.2f}x, memory {full_peak / max(shared_peak, 1):.2f}x less; "
          f"max |score diff| {score_diff:.1e}, max relative grad diff {grad_diff:.1e}")
    print(f"  sampling {args.candidates} candidates per prompt ({args.reply_tokens} new tokens): prompt encoded per candidate "
          f"{full_gen * 1000:.0f} ms, once per prompt {shared_gen * 1000:.0f} ms ({full_gen / shared_gen:.2f}x); "
          f"same samples for a seed: {same_samples}")


if __name__ == "__main__":
    main()
