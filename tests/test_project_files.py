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


def _room_imports(package: Path) -> dict[str, set[str]]:
    """Rooms (top-level modules and subpackages) and the rooms each imports at run time (``TYPE_CHECKING``
    imports and ``__main__`` entry points left out)."""
    import ast

    rooms = {p.stem for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    rooms |= {p.parent.name for p in package.glob("*/__init__.py")}
    arrows: dict[str, set[str]] = {room: set() for room in rooms}
    for path in package.rglob("*.py"):
        relative = path.relative_to(package)
        if path.name == "__main__.py" or relative == Path("__init__.py"):
            continue
        source = relative.parts[0] if len(relative.parts) > 1 else path.stem
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == package.name and len(parts) > 1 and parts[1] in rooms and parts[1] != source:
                    arrows[source].add(parts[1])
    return arrows


def test_the_rooms_have_no_import_cycle_and_architecture_md_names_each_and_the_floors() -> None:
    arrows = _room_imports(ROOT / "cyclealign_pl")
    floors: dict[str, int] = {}

    def floor(room: str, path: tuple[str, ...] = ()) -> int:
        assert room not in path, f"import cycle: {' -> '.join((*path, room))}"
        if room not in floors:
            floors[room] = 1 + max((floor(dep, (*path, room)) for dep in arrows[room]), default=0)
        return floors[room]

    for room in arrows:
        floor(room)
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [r for r in arrows if not re.search(rf"\b{r}(\.py|/)", text)]
    assert not missing, f"docs/architecture.md does not name {missing}"
    stated = re.search(r"(\d+) rooms, (\d+) floors", text)
    assert stated, "docs/architecture.md should say 'N rooms, M floors'"
    assert (int(stated[1]), int(stated[2])) == (len(arrows), max(floors.values()))
