"""``python -m cyclealign_pl <subcommand>``: one entry point, one ``--help``, one way to fail.

Each subcommand's function is imported only when it is chosen, so ``--help`` and the subcommands that need
no trainer never import Lightning. Errors end a command with one line on stderr and an exit status
(docs/reliability.md): :func:`fail` for errors found while running, the parsers of ``cli_parser.py`` for bad
options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from cyclealign_pl.cli_parser import EXIT_BAD_INPUT, suggest

PROG = "python -m cyclealign_pl"
DESCRIPTION = (
    "CycleAlign aligns a white-box causal LM (weights visible, e.g. LLaMA-7B) with a black-box LLM judge "
    "(weights hidden, e.g. ChatGPT behind an API) in a cycle. For each prompt, up to N times: the white box "
    "samples l replies and ranks them by its own likelihood; the black box ranks them, guided by in-context "
    "demonstrations, and writes a better reply; the agreement of the two rankings becomes a new "
    "demonstration; the white box takes an optimizer step on a ranking loss (RRHF or PRO) plus a "
    "fine-tuning term. The prompt is done once both rankings agree. All outputs of a run go under "
    "--trainer.default_root_dir. Start with: python -m cyclealign_pl fit --config configs/tiny.yaml"
)
HELP_FLAGS = ("-h", "--help")


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: its one-line description and the ``module:function`` that runs it."""

    description: str
    target: str
    lightning: bool = False  # a LightningCLI subcommand: its function reads the subcommand's name too


SUBCOMMANDS: dict[str, Subcommand] = {
    "fit": Subcommand(
        "Align the white box with the black box by CycleAlign (resume with --ckpt_path last).",
        "cyclealign_pl.cli:main",
        lightning=True,
    ),
    "validate": Subcommand(
        "Score greedy replies to the evaluation prompts with model.reward_model (paper Tables 1, 8).",
        "cyclealign_pl.cli:main",
        lightning=True,
    ),
    "test": Subcommand("Like validate, on the test prompts.", "cyclealign_pl.cli:main", lightning=True),
    "predict": Subcommand(
        "Write greedy replies (and rewards, with model.reward_model) to eval/predict_generations.jsonl.",
        "cyclealign_pl.cli:main",
        lightning=True,
    ),
    "compare": Subcommand(
        "Pairwise win rates of two runs' replies, judged by an LLM (paper Table 2).",
        "cyclealign_pl.compare:main",
    ),
    "export": Subcommand(
        "Write a plain Hugging Face model (and a GGUF with --gguf) from a checkpoint.",
        "cyclealign_pl.export:main",
    ),
    "serve": Subcommand(
        "Serve the default task's judge rule as a local OpenAI-compatible server.",
        "cyclealign_pl.serve.__main__:main",
    ),
    "build-demo": Subcommand(
        "Rebuild the default task's white box and evaluator (offline, seeded).",
        "cyclealign_pl.demo.build:main",
    ),
    "train-evaluator": Subcommand(
        "Train the human-preference evaluator's reward head (configs/eval/human_rm.yaml).",
        "cyclealign_pl.evaluators.train:main",
    ),
}
LIGHTNING_SUBCOMMANDS = tuple(name for name, sub in SUBCOMMANDS.items() if sub.lightning)


def fail(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
    """End the command: one line on stderr, and the exit status."""
    print(f"cyclealign_pl: {message}", file=sys.stderr)
    sys.exit(status)


def parser_names(subcommand: str) -> dict[str, str]:
    """A subcommand parser's ``prog`` (in its usage and error lines) and its one-line ``description``."""
    return {"prog": f"{PROG} {subcommand}", "description": SUBCOMMANDS[subcommand].description}


def help_parser() -> argparse.ArgumentParser:
    """The top-level parser, for its help only (each subcommand parses its own options)."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    parser.add_argument(
        "-c", "--config", help="a YAML config for fit, validate, test or predict (or give it after them)"
    )
    choices = parser.add_subparsers(title="subcommands", metavar="<subcommand>")
    for name, sub in SUBCOMMANDS.items():
        choices.add_parser(name, help=sub.description)
    return parser


def load(target: str) -> Callable[..., Any]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> Any:
    """Run the subcommand that ``argv`` starts with (options first go to LightningCLI, as before)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    names = ", ".join(SUBCOMMANDS)
    if not argv:
        _usage_error(f"choose a subcommand: {names}")
    first = argv[0]
    sub = SUBCOMMANDS.get(first)
    if sub is not None:
        return load(sub.target)(argv if sub.lightning else argv[1:])
    if first.startswith("-"):  # LightningCLI's top-level options (--config, --print_config) or --help
        if any(a in HELP_FLAGS for a in argv) and not any(a in LIGHTNING_SUBCOMMANDS for a in argv):
            help_parser().print_help()
            sys.exit(0)
        return load(SUBCOMMANDS["fit"].target)(argv)
    match = suggest(first, SUBCOMMANDS)
    hint = f" (did you mean {match}?)" if match else ""
    _usage_error(f"unknown subcommand {first!r}{hint}; choose one of {names}")


def _usage_error(line: str) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {line}\n")
    sys.exit(EXIT_BAD_INPUT)
