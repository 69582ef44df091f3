"""``python -m cyclealign_pl serve --port 8000``: the default task's judge (the lexicon rule of
``cyclealign_pl/demo/rule.py``) as an OpenAI-compatible server on this machine, for trying the black box over
HTTP (``configs/tiny_openai.yaml``), optionally slow or failing."""

from __future__ import annotations

import time

from cyclealign_pl.cli_parser import OneLineArgumentParser
from cyclealign_pl.commands import fail, parser_names
from cyclealign_pl.serve.server import SCRIPTED_FAILURES, LocalOpenAIServer, failure_mix


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(**parser_names("serve"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="local-ranker", help="the model name it serves")
    parser.add_argument("--rule-seed", type=int, default=0, help="the rule's seed (LexiconJudge's seed)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--failure-rate", type=float, default=0.0, help="share of requests that fail")
    parser.add_argument(
        "--failure-kinds",
        default="500",
        help=f"comma-separated failures drawn at random: {','.join(SCRIPTED_FAILURES)}",
    )
    parser.add_argument("--hang-seconds", type=float, default=30.0, help="how long a 'timeout' failure hangs")
    parser.add_argument("--seed", type=int, default=0, help="seeds the failure draws")
    args = parser.parse_args(argv)
    from cyclealign_pl.demo.judge import LexiconRule  # imports the data modules (Lightning): not for --help

    try:
        failures = failure_mix(
            [k.strip() for k in args.failure_kinds.split(",") if k.strip()], args.hang_seconds
        )
        server = LocalOpenAIServer(
            args.host,
            args.port,
            delay=args.delay,
            failure_rate=args.failure_rate,
            failure=failures,
            seed=args.seed,
            model=args.model,
            rule=LexiconRule(seed=args.rule_seed),
        ).start()
    except (ValueError, OSError) as err:
        fail(str(err))
    print(f"serving the default task's judge rule at {server.url} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
