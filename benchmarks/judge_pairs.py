r"""A ranking judge on human-labelled pairs: parse failures, pairwise accuracy and position bias.

Each HH-RLHF harmless-base test pair (the human-preferred "chosen" reply and the "rejected" one, after the
project's cleaning) is asked as a ranking request with two candidates and the paper's static demonstration,
as the cycle asks its first iteration, in both orders (chosen shown first, then rejected shown first). Each
setting is the same judge with a different position-bias control:

* ``plain``: the order as given (no control);
* ``shuffle``: ``shuffle_candidates`` (a seeded random order per request);
* ``both_orders``: ``num_permutations=2`` (both orders asked, aggregated by mean rank; a tie goes to the
  candidate shown first in the request);
* ``plain_unshared``: ``plain`` with a delimiter nonce of each request's own, as before the nonce was shared:
  no two requests begin alike, so its seconds per request against ``plain``'s measure what the server's
  prompt cache saves (llama.cpp reuses the longest prefix of the previous request).

Printed per setting: judgments that failed (parse or transport), accuracy (chosen ranked first, over the
judgments that came; 0.5 is chance), the share of judgments that put the request's first reply first (the
one shown first, except under ``shuffle``; position bias: 0.5 is none, 1.0 always the first, 0.0 always the
second), requests sent, seconds and prompt tokens per request sent; and the accuracy of
"the longer reply is better" on the same pairs, for reference. A few better responses are shown.

    python benchmarks/judge_pairs.py --pairs 20                       # starts the packaged SmolLM2 judge
    python benchmarks/judge_pairs.py --base_url http://127.0.0.1:8011/v1 --model smollm2 --pairs 20
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
SETTINGS = {
    "plain": {},
    "shuffle": {"shuffle_candidates": True},
    "both_orders": {"num_permutations": 2},
    "plain_unshared": {},  # plain, each request with a delimiter of its own (no prefix for a cache to reuse)
}


def unshared_nonce(request) -> str:
    """The delimiter nonce as it was before it was shared: a hash of the whole request, so no two requests
    begin with the same bytes (for ``plain_unshared``: what a server's prompt cache saves)."""
    import hashlib

    payload = json.dumps([request.instruction, list(request.candidates), len(request.demonstrations)])
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


def load_pairs(path: Path, count: int, max_chars: int) -> list[tuple[str, str, str]]:
    """The first ``count`` cleaned (prompt, chosen, rejected) triples whose texts fit ``max_chars``."""
    from cyclealign_pl.data.hh_rlhf import clean_pair

    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            pair = clean_pair(row["chosen"], row["rejected"]).pair
            if pair is None or pair.chosen == pair.rejected:
                continue
            if max(len(pair.prompt), len(pair.chosen), len(pair.rejected)) > max_chars:
                continue
            out.append((pair.prompt, pair.chosen, pair.rejected))
            if len(out) == count:
                break
    return out


def measure(judge, pairs: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    """Rank every pair in both orders with ``judge``; the figures of the module docstring."""
    from cyclealign_pl.judges.accuracy import both_orders, count_judgments

    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
    before = judge.metrics().get("requests_sent", 0.0)
    started = time.perf_counter()
    judgments = judge.rank(both_orders(rows))
    seconds = time.perf_counter() - started
    counts = count_judgments(judgments)
    return {
        "judgments": counts.judgments,
        "failed": counts.failed,
        "accuracy": counts.correct / counts.answered if counts.answered else float("nan"),
        "first_shown_first": counts.first_shown_share,
        "requests": judge.metrics().get("requests_sent", 0.0) - before,
        "prompt_tokens": judge.metrics().get("prompt_tokens", 0.0),
        "seconds": seconds,
        "better": [j.better_response for j in judgments if j.better_response][:3],
        "failures": sorted({(j.failure or "")[:90] for j in judgments if not j.ok})[:3],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--max_chars", type=int, default=600, help="skip pairs with a longer text")
    parser.add_argument("--gguf", default="local:smollm2-135m-instruct", help="start this model's server")
    parser.add_argument("--base_url", default=None, help="use a running server instead")
    parser.add_argument("--model", default="gpt-3.5-turbo-0613")
    parser.add_argument("--n_threads", type=int, default=None)
    parser.add_argument("--n_ctx", type=int, default=2048)
    parser.add_argument("--template", default="ranking_compact_v1.txt")
    parser.add_argument("--structured_output", default="auto")
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--cache", default=None, help="a judge cache file shared by the settings (default: new)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from cyclealign_pl.judges.llama_server import LlamaCppServer
    from cyclealign_pl.judges.openai import OpenAIJudge

    data = Path(args.data)
    if not data.is_file():
        raise SystemExit(f"no HH-RLHF test file at {data} (--data)")
    pairs = load_pairs(data, args.pairs, args.max_chars)
    longer = sum(len(c) > len(r) for _, c, r in pairs) / len(pairs)
    server = None
    if args.base_url is None:
        server = LlamaCppServer(gguf=args.gguf, n_ctx=args.n_ctx, n_threads=args.n_threads)
        server.start(tempfile.mkdtemp(prefix="judge-pairs-"))
        print(f"started {server.path.name} at {server.url} (log {server.log_path})")
    print(
        f"{len(pairs)} HH-RLHF harmless-base test pairs, both orders; template {args.template}, "
        f"structured_output={args.structured_output}, max_tokens={args.max_tokens}; "
        f"'the longer reply is better' scores {longer:.2f}"
    )
    cache = args.cache or str(Path(tempfile.mkdtemp(prefix="judge-pairs-")) / "cache.sqlite")
    header = ("setting", "failed", "accuracy", "1st-first", "sent", "s/request", "tokens/req")
    print(f"{header[0]:<12} " + " ".join(f"{h:>10}" for h in header[1:]))
    try:
        for name in args.settings:
            judge = OpenAIJudge(
                model=server.model if server else args.model,
                base_url=server.url if server else args.base_url,
                api_key_env="CYCLEALIGN_BENCHMARK_NO_KEY" if server else "OPENAI_API_KEY",
                template=args.template,
                structured_output=args.structured_output,
                max_tokens=args.max_tokens,
                request_timeout=300,
                cache_path=cache,  # an order already asked by another setting is not asked again
                **SETTINGS[name],
            )
            try:
                if name == "plain_unshared":
                    with mock.patch("cyclealign_pl.judges.prompt.request_nonce", unshared_nonce):
                        r = measure(judge, pairs)
                else:
                    r = measure(judge, pairs)
            finally:
                judge.close()
            sent = max(1.0, r["requests"])
            print(
                f"{name:<12} {r['failed']:>5}/{r['judgments']:<4} {r['accuracy']:>10.2f} "
                f"{r['first_shown_first']:>10.2f} {r['requests']:>10.0f} {r['seconds'] / sent:>10.1f} "
                f"{r['prompt_tokens'] / sent:>10.0f}"
            )
            for text in r["better"]:
                print(f"    better response: {' '.join(text.split())[:150]!r}")
            for text in r["failures"]:
                print(f"    failure: {text}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
