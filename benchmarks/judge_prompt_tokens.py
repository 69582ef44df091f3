r"""Prompt tokens of the ranking prompt, per template, with a judge's own tokenizer and chat template.

A typical request: an HH-RLHF harmless-base test dialogue, 3 candidates (its chosen and rejected replies cut
to 300 characters, and a one-line reply), the paper's static demonstration, and 0 or 2 dynamic
demonstrations of the same prompt. Printed per template: the system message's tokens, the fixed part (the
static demonstration with 3 one-letter candidates), and the mean (min-max) over the dialogues.

    python benchmarks/judge_prompt_tokens.py [--gguf local:smollm2-135m-instruct] [--dialogues 20] \
        [--templates ranking_v1.txt ranking_compact_v1.txt]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", default="local:smollm2-135m-instruct", help="the tokenizer comes from here")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--dialogues", type=int, default=20)
    parser.add_argument("--templates", nargs="+", default=["ranking_v1.txt", "ranking_compact_v1.txt"])
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from cyclealign_pl.data.hh_rlhf import clean_pair
    from cyclealign_pl.demonstrations import STATIC_DEMONSTRATION, Demonstration
    from cyclealign_pl.judges.base import RankRequest
    from cyclealign_pl.judges.prompt import build_messages, load_template
    from cyclealign_pl.local_models import resolve_gguf

    path = resolve_gguf(args.gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    def count(messages: list[dict[str, str]]) -> int:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    triples = []
    with gzip.open(args.data, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            pair = clean_pair(row["chosen"], row["rejected"]).pair
            if pair is not None:
                one_line = "I am not sure what you mean, could you say more?"
                triples.append((pair.prompt, (pair.chosen[:300], pair.rejected[:300], one_line)))
            if len(triples) == args.dialogues:
                break
    print(f"{path.name}'s tokenizer and chat template; {len(triples)} HH-RLHF harmless-base test dialogues")
    for name in args.templates:
        template = load_template(name)
        fixed = build_messages(RankRequest("x", ("a", "b", "c"), (STATIC_DEMONSTRATION,)), template)
        system = len(tokenizer(fixed[0]["content"])["input_ids"])
        row = [f"{name}: system message {system}, fixed part {count(fixed)}"]
        for dynamic in (0, 2):
            totals = []
            for prompt, candidates in triples:
                demos = (STATIC_DEMONSTRATION,) + (Demonstration(prompt, candidates[:2], (0, 1)),) * dynamic
                totals.append(count(build_messages(RankRequest(prompt, candidates, demos), template)))
            row.append(
                f"{dynamic} dynamic demos {sum(totals) / len(totals):.0f} ({min(totals)}-{max(totals)})"
            )
        print("; ".join(row))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
