"""The command line's parsers: option errors as one line with a "did you mean", no abbreviations.

jsonargparse reports a bad setting after the full usage (80 lines for ``fit``) and a failure inside a
``class_path`` value as a dump of every ``Union`` alternative it tried; a user needs the line that says what
is wrong (:func:`one_line`). :class:`OneLineParser` (jsonargparse) and :class:`OneLineArgumentParser`
(argparse) print it as ``<prog>: error: <line>`` and exit with status 2. Abbreviated options are refused: a
typo must not change a setting. No Lightning import here: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any, NoReturn

from jsonargparse import ArgumentParser

EXIT_BAD_INPUT = 2

_KEY_PREFIX = re.compile(r'^Parser key "(?P<key>[^"]+)":\s*(?P<rest>.*)$', re.DOTALL)
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (?P<args>.*)$", re.DOTALL)
_NOT_ACCEPTED = re.compile(
    r"^(?:Subcommand '\w+' does not accept option|Option) '(?P<key>[^']+)'(?: is not accepted)?"
)
_GROUP_NOT_ACCEPTED = re.compile(r"^Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'")
_CLASS_PATH_PROBLEM = re.compile(
    r"^Problem with given class_path '(?P<path>[^']+)':\s*(?P<rest>.*)$", re.DOTALL
)
_NONE_ALTERNATIVE = "Expected a <class 'NoneType'>"


def suggest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``name`` (a typo, a missing letter), or None when none is close.

    Dotted names are first compared by their last part among the siblings (``model.cycle.num_candidate`` ->
    ``model.cycle.num_candidates``), then whole; the groups that contain ``name`` are never suggested.
    """
    known = [k for k in dict.fromkeys(known) if k != name and not name.startswith(k + ".")]
    parent, _, leaf = name.rpartition(".")
    if parent:
        # a setting that moved into a group: model.max_length -> model.whitebox.max_length
        grouped = [k for k in known if k.startswith(parent + ".") and k.count(".") == name.count(".") + 1]
        moved = [k for k in grouped if k.rpartition(".")[2] == leaf]
        if len(moved) == 1:
            return moved[0]
        siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
        match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.75)
        if match:
            return siblings[match[0]]
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
    return match[0] if match else None


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    match = suggest(name, known)
    return f" (did you mean {match}?)" if match else ""


def _class_parameters(class_path: str) -> list[str]:
    """The constructor arguments of ``class_path`` (for suggestions; empty if it cannot be imported)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def _union_errors(text: str) -> list[str]:
    """The per-alternative errors of a "Does not validate against any of the Union subtypes" message."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Errors:") + 1
    except StopIteration:
        return []
    items: list[list[str]] = []
    bullet_indent = None
    for line in lines[start:]:
        stripped = line.strip()
        if stripped.startswith(("Given value type:", "Given value:")) and not line.startswith(" " * 4):
            break
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("- ") and (bullet_indent is None or indent <= bullet_indent):
            bullet_indent = indent
            items.append([stripped[2:]])
        elif items:
            items[-1].append(line)
    return ["\n".join(_dedent(item)) for item in items]


def _dedent(item: list[str]) -> list[str]:
    first, rest = item[0], item[1:]
    indents = [len(line) - len(line.lstrip()) for line in rest if line.strip()]
    cut = min(indents) if indents else 0
    return [first, *(line[cut:] for line in rest)]


def _plain_types(text: str) -> str:
    """``<class 'int'>`` -> ``int``; ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    text = re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", text)
    return re.sub(r"typing\.Literal\[(.*?)\]", r"one of \1", text)


def one_line(message: str, options: Iterable[str] = (), key: str | None = None) -> str:
    """The one line that says what is wrong in a jsonargparse/LightningCLI error ``message``.

    ``options`` are the parser's option strings (``--model.cycle.num_candidates``, ...), used to suggest the
    closest one for an unknown option or key; ``key`` is the setting the message is about, when known.
    """
    options = list(options)
    text = message.strip()
    text = text.removeprefix("invalid configuration: ")
    found = _KEY_PREFIX.match(text)
    if found:
        key, text = found["key"], found["rest"].strip()
    if text.startswith("Does not validate against any of the Union subtypes"):
        errors = [e for e in _union_errors(text) if not e.startswith(_NONE_ALTERNATIVE)]
        # not "Expected a bool" beside a class
        specific = [e for e in errors if not e.startswith("Expected a")]
        lines = list(dict.fromkeys(one_line(e, options, key) for e in specific or errors))
        lines = [
            line for line in lines if "(did you mean" in line
        ] or lines  # the alternative that has a hint
        if lines:
            return "; ".join(lines)
        text = text.splitlines()[0]
    found = _CLASS_PATH_PROBLEM.match(text)
    if found:
        class_path, rest = found["path"], found["rest"].strip()
        inner = _NOT_ACCEPTED.match(rest)
        where = f"{key}: " if key else ""
        short = class_path.rsplit(".", 1)[-1]
        if inner:
            name = inner["key"]
            return (
                f"{where}{short} has no argument {name!r}{_did_you_mean(name, _class_parameters(class_path))}"
            )
        return f"{where}{short}: {one_line(rest, options)}"
    found = _UNRECOGNIZED.match(text)
    if found:
        given = [a.split("=", 1)[0] for a in found["args"].split() if a.startswith("-")]
        if given:
            hints = [f"{a}{_did_you_mean(a, options)}" for a in given]
            return f"unknown option{'s' if len(hints) > 1 else ''} {', '.join(hints)}"
        return f"unexpected value(s) {found['args']}"
    found = _GROUP_NOT_ACCEPTED.match(text) or _NOT_ACCEPTED.match(text)
    if found:
        name = f"{found['group']}.{found['key']}" if "group" in found.groupdict() else found["key"]
        keys = [o.lstrip("-") for o in options]
        return f"unknown key {name}{_did_you_mean(name, keys)}"
    kept = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("Given value")
    ]
    line = _plain_types(" ".join(kept))
    line = re.sub(r"^Expected an? ([^.]+)\. Got value: (.*)$", r"expected \1, got \2", line)
    return f"{key}: {line}" if key and key not in line else line


def _option_strings(parser: Any) -> list[str]:
    """Every long option of ``parser`` and of its subcommand parsers."""
    found: list[str] = []
    stack = [parser]
    while stack:
        current = stack.pop()
        found.extend(o for o in getattr(current, "_option_string_actions", {}) if o.startswith("--"))
        subcommands = getattr(current, "_subcommands_action", None)
        if subcommands is not None:
            stack.extend(subcommands._name_parser_map.values())
    return list(dict.fromkeys(found))


_CONFIG_FILE: ContextVar[str | None] = ContextVar("config_file", default=None)  # the file being read
_YAML_MARK = re.compile(r'\s*in "<(?:unicode )?string>",\s*line')


def name_config_file(message: str, path: str | None) -> str:
    """A YAML error names the config file, not ``"<unicode string>"`` (PyYAML reads the file's text)."""
    if path is None or not _YAML_MARK.search(message):
        return message
    text = _YAML_MARK.sub(" at line", message.strip())
    text = re.sub(r"^Problems parsing config:\s*", "", text)
    return f"config file {path} is not valid YAML: {text}"


def _print_one_line(parser: Any, message: str, named: Any = None) -> NoReturn:
    """``<prog>: error: <line>`` (``named``: the subcommand's parser that failed, when it has its own)."""
    line = one_line(message, _option_strings(parser))
    prog = (named or parser).prog.replace(" [options]", "")
    sys.stderr.write(f"{prog}: error: {line}\n")
    parser.exit(EXIT_BAD_INPUT)


class OneLineParser(ArgumentParser):
    """jsonargparse's parser with one-line errors and without abbreviated options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_path(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        token = _CONFIG_FILE.set(str(path))
        try:
            return super().parse_path(path, *args, **kwargs)
        finally:
            _CONFIG_FILE.reset(token)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        message = name_config_file(message, _CONFIG_FILE.get())
        if not self.exit_on_error:  # jsonargparse's own nested parsing: it handles the exception
            super().error(message, ex)
        _print_one_line(self, message, getattr(ex, "subcommand_parser", None))


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse's parser with the same one-line errors (the subcommands with a few plain options)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        _print_one_line(self, message)
