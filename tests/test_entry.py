"""The one entry point, ``python -m cyclealign_pl <subcommand>``: its help, its errors, its dispatch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cyclealign_pl import commands
from cyclealign_pl.commands import SUBCOMMANDS, main

EXPECTED = (
    "fit",
    "validate",
    "test",
    "predict",
    "compare",
    "export",
    "serve",
    "build-demo",
    "train-evaluator",
)


def test_the_subcommands_are_the_expected_ones():
    assert tuple(SUBCOMMANDS) == EXPECTED


def test_help_lists_every_subcommand_and_no_help_imports_lightning():
    """``--help`` of the package and of the subcommands that need no trainer, in one fresh process."""
    probe = (
        "import runpy, sys\n"
        "codes = []\n"
        "for argv in (['--help'], ['compare', '--help'], ['export', '--help'], ['serve', '--help']):\n"
        "    sys.argv = ['cyclealign_pl', *argv]\n"
        "    try:\n"
        "        runpy.run_module('cyclealign_pl', run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as e:\n"
        "        codes.append(e.code)\n"
        "print('PROBE', codes, [m for m in ('lightning', 'torch') if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("usage: python -m cyclealign_pl ")
    top = out.split("usage: python -m cyclealign_pl compare")[0]
    for name, sub in SUBCOMMANDS.items():
        assert f"\n    {name} " in top, name
        assert sub.description.split()[0] in top
    for name in ("compare", "export", "serve"):
        assert f"usage: python -m cyclealign_pl {name} " in out
    assert out.rstrip().endswith("PROBE [0, 0, 0, 0] []")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["fitt"], "unknown subcommand 'fitt' (did you mean fit?); choose one of fit, validate,"),
        (["evaluate"], "unknown subcommand 'evaluate'; choose one of"),
        ([], "choose a subcommand: fit, validate, test, predict, compare, export, serve,"),
    ],
)
def test_no_or_an_unknown_subcommand_is_one_line_and_status_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"python -m cyclealign_pl: error: {expected}")


def test_compare_help_works(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compare", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m cyclealign_pl compare ")
    assert "--api_key_env" in out and "run_a" in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["compare", "a.jsonl"], "compare: error: the following arguments are required: run_b"),
        (["compare", "a", "b", "--sed", "1"], "compare: error: unknown option --sed (did you mean --seed?)"),
        (["export"], "export: error: the following arguments are required: checkpoint, out_dir"),
        (["serve", "--prot", "80"], "serve: error: unknown option --prot"),
    ],
)
def test_bad_options_of_every_kind_of_subcommand_are_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"python -m cyclealign_pl {expected}\n"


def test_a_bad_input_file_of_compare_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(SystemExit) as info:
        main(["compare", str(missing), str(missing), "--base_url", "http://127.0.0.1:9/v1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cyclealign_pl: bad input: cannot read generations file {missing}")
    assert err.count("\n") == 1


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, list[str]]]:
    """Every subcommand's function replaced by a recorder of (target, argv)."""
    recorded: list[tuple[str, list[str]]] = []

    def load(target: str):
        return lambda argv: recorded.append((target, list(argv))) or target

    monkeypatch.setattr(commands, "load", load)
    return recorded


@pytest.mark.parametrize("name", EXPECTED)
def test_each_subcommand_dispatches_to_its_function(name, calls):
    target = SUBCOMMANDS[name].target
    assert main([name, "--seed", "1"]) == target
    lightning = name in ("fit", "validate", "test", "predict")
    assert calls == [(target, [name, "--seed", "1"] if lightning else ["--seed", "1"])]


def test_options_before_the_subcommand_go_to_lightningcli_as_before(calls):
    main(["--config", "configs/tiny.yaml", "fit"])
    assert calls == [("cyclealign_pl.cli:main", ["--config", "configs/tiny.yaml", "fit"])]


def test_every_target_is_a_main_function():
    for name, sub in SUBCOMMANDS.items():
        function = commands.load(sub.target)
        assert callable(function) and function.__name__ == "main", name
