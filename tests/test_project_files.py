"""What a new user meets before any code runs: the install, the README's Usage block, LICENSE, CHANGELOG,
and the configs for a real LLM judge."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_building_the_package_declares_its_data_without_setuptools_warnings(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "cyclealign_pl", source / "cyclealign_pl", ignore=shutil.ignore_patterns("__pycache__")
    )
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", "dist", "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "is absent from the `packages` configuration" not in output
    assert "SetuptoolsDeprecationWarning" not in output
    (wheel,) = (source / "dist").glob("cyclealign_pl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "cyclealign_pl/demo/assets/whitebox/model.safetensors",
        "cyclealign_pl/demo/assets/evaluator/tokenizer.json",
        "cyclealign_pl/data/samples/hh-rlhf/harmless-base/test.jsonl.gz",
        "cyclealign_pl/judges/templates/ranking_v1.txt",
        "cyclealign_pl/py.typed",
    ):
        assert shipped in names, shipped
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_license_changelog_and_the_usage_block() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.lstrip().startswith(
        "Apache License\n                           Version 2.0, January 2004"
    )
    assert "END OF TERMS AND CONDITIONS" in license_text and len(license_text.splitlines()) > 190
    assert re.search(r"^license = Apache-2.0$", (ROOT / "setup.cfg").read_text(), re.M)
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()
    readme = (ROOT / "README.md").read_text()
    usage = readme.split("## Usage", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in usage.strip().splitlines()]
    assert commands[0] == "source .venv/bin/activate"  # the install made .venv: `python` is its python after
    assert all(c.startswith("python -m cyclealign_pl") for c in commands[1:])


def test_the_vllm_config_points_the_real_judge_at_a_local_server(capsys, monkeypatch) -> None:
    from cyclealign_pl.cli import main
    from cyclealign_pl.judges.openai import OpenAIJudge

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/tiny.yaml", "--config", "configs/tiny_vllm.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    judge = printed["model"]["judge"]
    assert judge["class_path"] == "cyclealign_pl.judges.openai.OpenAIJudge"
    assert judge["init_args"]["base_url"] == "http://127.0.0.1:8000/v1"
    assert printed["trainer"]["default_root_dir"] == "runs/tiny_vllm"
    built = OpenAIJudge(**judge["init_args"])  # every setting is one the judge takes
    try:
        assert (
            built.settings.model == "Qwen/Qwen2.5-7B-Instruct"
            and built.settings.price_per_million_input_tokens == 0
        )
    finally:
        built.close()
