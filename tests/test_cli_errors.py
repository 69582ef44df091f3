"""Configuration errors: one line, status 2, a "did you mean" for near misses, no abbreviated options."""

from __future__ import annotations

from pathlib import Path

import pytest

from cyclealign_pl.cli import EXIT_BAD_INPUT, main
from cyclealign_pl.cli_parser import one_line, suggest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
BEAVERTAILS = str(ROOT / "configs" / "eval" / "beavertails.yaml")


def run_cli(tmp_path: Path, capsys, *args: str, subcommand: str = "fit") -> str:
    """Run the CLI expecting a configuration error; return its stderr, checked to be one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                subcommand,
                "--config",
                TINY,
                "--trainer.default_root_dir",
                str(tmp_path / "run"),
                "--trainer.enable_progress_bar",
                "false",
                *args,
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "usage:" not in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    return lines[0]


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            ["--model.cycle.num_candidate", "4"],
            "unknown option --model.cycle.num_candidate (did you mean --model.cycle.num_candidates?)",
        ),
        (
            ["--trainer.max_epoch", "1"],
            "unknown option --trainer.max_epoch (did you mean --trainer.max_epochs?)",
        ),
        (["--model.cycle.bogus", "1"], "unknown option --model.cycle.bogus"),
        (["--model.cycle.num_candidates", "three"], "model.cycle.num_candidates: expected int, got three"),
        (["--model.cycle.num_candidates", "1"], "num_candidates (l) must be >= 2"),
        (["--model.cycle.max_iterations", "0"], "max_iterations (N) must be >= 1"),
        (["--model.cycle.objective", "dpo"], "model.cycle.objective: expected one of 'rrhf', 'pro', got dpo"),
        (
            ["--model.judge.init_args.sed", "1"],
            "model.judge: LexiconJudge has no argument 'sed' (did you mean seed?)",
        ),
        (
            ["--model.model", "/no/such/model"],
            "could not load tokenizer '/no/such/model' (not a local directory",
        ),
        (
            ["--model.model", "/no/such/model", "--model.tokenizer", "byt5"],
            "could not load causal LM '/no/such/model' (not a local directory",
        ),
        (["--model.cycle.ablation", "no_everything"], "model.cycle.ablation: expected one of 'none'"),
        (["--data.init_args.subsets", "[harmless-bass]"], "unknown HH-RLHF subset(s) ['harmless-bass']"),
        (["--data.init_args.root", "/no/such/hh"], "HH-RLHF root directory not found: /no/such/hh"),
        (
            ["--data.init_args.num_train_prompt", "3"],
            "data: HHRLHFDataModule has no argument 'num_train_prompt' (did you mean num_train_prompts?)",
        ),
        (
            ["--trainer.callbacks.init_args.every_n_batch", "3"],
            "trainer.callbacks: CycleCheckpoint has no argument 'every_n_batch' "
            "(did you mean every_n_batches?)",
        ),
        (
            ["--trainer.logger.init_args.nme", "x"],
            "trainer.logger: CSVLogger has no argument 'nme' (did you mean name?)",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(override, expected, tmp_path, capsys):
    line = run_cli(tmp_path, capsys, *override)
    assert line.startswith("python -m cyclealign_pl fit: error: ")
    assert expected in line
    assert "Expected a" not in line and "Given value" not in line  # no other Union alternative's complaint


def test_an_abbreviated_option_is_not_taken_for_the_full_one(tmp_path, capsys):
    """argparse would read --model.cycle.num_candidate 4 as num_candidates=4: a typo must not change a
    setting."""
    line = run_cli(tmp_path, capsys, "--model.cycle.num_candidate", "4", "--print_config")
    assert "did you mean --model.cycle.num_candidates?" in line


def test_an_unknown_key_in_a_config_file_gets_a_suggestion(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  cycle:\n    max_iteration: 3\n")
    line = run_cli(tmp_path, capsys, "--config", str(extra))
    assert "unknown key model.cycle.max_iteration (did you mean model.cycle.max_iterations?)" in line


def test_a_yaml_mistake_names_the_config_file_and_line(tmp_path, capsys):
    broken = tmp_path / "mine.yaml"
    broken.write_text("model:\n  cycle:\n    num_candidates: [3\n  max_length: 64\n")
    line = run_cli(tmp_path, capsys, "--config", str(broken))
    assert line.startswith(f"python -m cyclealign_pl fit: error: config file {broken} is not valid YAML: ")
    assert "at line 3, column" in line and "<unicode string>" not in line


@pytest.mark.parametrize("first, second", [("model", "model_config"), ("model_config", "model")])
def test_a_white_box_by_path_and_by_config_names_both_keys_before_any_model_is_built(
    first, second, tmp_path, capsys, monkeypatch
):
    """A config that sets one of model.model / model.model_config, and the other on the command line."""
    from cyclealign_pl import hf

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the configuration was checked")

    monkeypatch.setattr(hf, "_init_from_config", no_model)
    monkeypatch.setattr(hf.AutoModelForCausalLM, "from_pretrained", no_model)
    values = {
        "model": f'"{tmp_path / "my-model"}"',
        "model_config": '{"model_type": "llama"}',
    }  # JSON is YAML
    extra = tmp_path / "first.yaml"
    extra.write_text(f"model:\n  model: null\n  {first}: {values[first]}\n")
    line = run_cli(tmp_path, capsys, "--config", str(extra), f"--model.{second}", values[second].strip('"'))
    assert "model.model=" in line and "model.model_config" in line and f"--model.{first} null" in line


def test_no_subcommand_and_a_wrong_one_are_one_line(capsys):
    for args, expected in [
        ([], "choose a subcommand: fit, validate, test, predict, compare, export,"),
        (["fitt"], "invalid choice: 'fitt'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == EXIT_BAD_INPUT and len(err) == 1 and expected in err[0]


def test_a_missing_beavertails_file_says_where_to_get_it(tmp_path, capsys):
    line = run_cli(
        tmp_path,
        capsys,
        "--config",
        BEAVERTAILS,
        "--data.init_args.path",
        str(tmp_path / "bt.csv"),
        subcommand="validate",
    )
    assert f"BeaverTails CSV not found: {tmp_path / 'bt.csv'}" in line
    assert "PKU-Alignment/BeaverTails-Evaluation" in line and "CC BY-NC" in line


def test_the_beavertails_config_defaults_to_the_hub_and_fails_offline_in_one_line(
    tmp_path, capsys, monkeypatch
):
    import yaml

    assert (
        yaml.safe_load(Path(BEAVERTAILS).read_text())["data"]["init_args"]["path"] is None
    )  # no CI-only path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "validate",
                "--config",
                TINY,
                "--config",
                BEAVERTAILS,
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.enable_progress_bar",
                "false",
                "--data.init_args.cache_dir",
                str(tmp_path / "hf"),
            ]
        )
    assert exit_info.value.code == EXIT_BAD_INPUT
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cyclealign_pl:")]
    assert (
        len(lines) == 1
        and "PKU-Alignment/BeaverTails-Evaluation" in lines[0]
        and "--data.init_args.path" in lines[0]
    )


# -- the message extraction itself (pure) --------------------------------------------------------------------

UNION_DUMP = """Does not validate against any of the Union subtypes
Subtypes: [<class 'lightning.pytorch.core.datamodule.LightningDataModule'>, <class 'NoneType'>]
Errors:
  - HH-RLHF root directory not found: /nope
  - Expected a <class 'NoneType'>
Given value type: <class 'jsonargparse._namespace.Namespace'>
Given value: Namespace(class_path='cyclealign_pl.data.hh_rlhf.HHRLHFDataModule', init_args=Namespace(root='/nope'))"""  # noqa: E501

NESTED_DUMP = """Parser key "model.judge":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'cyclealign_pl.judges.base.Judge'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'cyclealign_pl.judges.reward_model.RewardModelJudge':
        Option 'sed' is not accepted
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='sed', val='1')"""


def test_one_line_keeps_the_reason_out_of_a_union_dump():
    assert one_line("invalid configuration: " + UNION_DUMP) == "HH-RLHF root directory not found: /nope"
    assert one_line(NESTED_DUMP) == "model.judge: RewardModelJudge has no argument 'sed' (did you mean seed?)"
    assert "\n" not in one_line("first line\n  second line")


def test_suggestions_are_near_misses_only():
    options = [
        "--model.cycle",
        "--model.cycle.num_candidates",
        "--model.cycle.max_iterations",
        "--trainer.max_epochs",
        "--model.sampling.top_p",
    ]
    assert suggest("--model.cycle.num_candidate", options) == "--model.cycle.num_candidates"
    assert suggest("--modle.cycle.num_candidates", options) == "--model.cycle.num_candidates"
    assert suggest("--model.cycle.bogus", options) is None  # not the group that holds it
    assert suggest("--model.sampling.top_q", options) == "--model.sampling.top_p"
    # a setting that moved into a group (0.1 -> 0.2) is found there, before a near miss among its old siblings
    grouped = [*options, "--model.whitebox.max_length", "--model.cycle.ablation", "--model.evaluation"]
    assert suggest("--model.max_length", grouped) == "--model.whitebox.max_length"
    assert suggest("--model.ablation", grouped) == "--model.cycle.ablation"
    assert one_line("unrecognized arguments: --model.cycle.num_candidate 4", options) == (
        "unknown option --model.cycle.num_candidate (did you mean --model.cycle.num_candidates?)"
    )
