"""The notebooks run top to bottom against a fresh tiny run, and their plot cells draw images.

The session's default run (tests/conftest.py: fit, then validate with ``--ckpt_path last``, the base model,
and BeaverTails when its CSV is at hand) is the run each notebook is executed against, with nbclient in a
kernel pointed at it by ``CYCLEALIGN_RUN_DIR``. Cells tagged ``plot`` must produce ``image/png`` output. The
notebooks must not call blank replies a success, and must give each gain with its standard error.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
TINY = str(REPO / "configs" / "tiny.yaml")
BEAVERTAILS_CSV = REPO.parent / "shared" / "data" / "beavertails" / "BeaverTails-Evaluation.csv"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(validated_run) -> Path:
    """The session's default run with the evaluations the tables notebook reads
    (``conftest.validated_run``)."""
    return validated_run.root


def _execute(name: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("CYCLEALIGN_RUN_DIR", str(run_dir))
    monkeypatch.delenv("CYCLEALIGN_CKPT", raising=False)
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(run_dir.parent)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
    return notebook


def _plot_cells_draw(notebook: nbformat.NotebookNode) -> int:
    plots = [c for c in notebook.cells if "plot" in c.metadata.get("tags", [])]
    for cell in plots:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"plot cell produced no image:\n{cell.source[:200]}"
    return len(plots)


def _stdout(notebook: nbformat.NotebookNode) -> str:
    return "".join(
        o.text
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream" and o.name == "stdout"
    )


def _fit_generations(run_dir: Path) -> Path:
    fits = [
        p
        for p in run_dir.glob("logs/version_*/eval/val_meta.json")
        if json.loads(p.read_text())["trainer_fn"] == "fit"
    ]
    assert len(fits) == 1
    return fits[0].with_name("val_generations.jsonl")


def test_reload_and_compare_notebook(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = _execute("01_reload_and_compare", tiny_run, monkeypatch)
    assert _plot_cells_draw(notebook) == 2  # Fig. 4 (iterations, reward) and Fig. 3 (ranking accuracy)
    assert len(set(_images(notebook))) == 2  # two different plots
    out = _stdout(notebook)
    assert "trained for 48 steps" in out
    assert "checkpoint: checkpoints/last.ckpt" in out and "training logs: logs/version_0" in out
    assert "exported model has the checkpoint's weights: True" in out
    demo = int(re.search(r"aligned \(checkpoint\): (\d+)% of the replies are empty", out)[1]) / 100
    records = [json.loads(line) for line in _fit_generations(tiny_run).open()]
    validation = sum(not r["reply"].strip() for r in records) / len(records)
    assert f"{sum(not r['reply'].strip() for r in records)} of {len(records)} greedy replies are empty" in out
    if max(demo, validation) > 0.5:  # the notebook must say so, and claim nothing about the replies
        assert "COLLAPSED" in out and "gives the checkpoint's replies" not in out
    else:
        assert "COLLAPSED" not in out and "exported model gives the checkpoint's replies: True" in out

    # held-out prompts where the two models differ, each reply with its reward
    with open(tiny_run / "results" / "replies_base_vs_aligned.csv", newline="", encoding="utf-8") as fh:
        differ = list(csv.DictReader(fh))
    assert f"{len(differ)} of 100 held-out prompts get a different reply from the aligned model" in out
    assert differ and all(row["base"] != row["aligned (checkpoint)"] for row in differ)
    zero_shot = {
        r["id"]: r
        for r in map(json.loads, (_fit_generations(tiny_run).with_name("zero_shot_generations.jsonl")).open())
    }
    held_out = {r["id"] for r in records}
    assert {row["id"] for row in differ} <= held_out == set(zero_shot)  # the run's evaluation prompts only
    for row in differ:
        base_reward, aligned_reward = float(row["base reward"]), float(row["aligned reward"])
        assert 0 <= base_reward <= 100 and 0 <= aligned_reward <= 100
        assert float(row["gain"]) == pytest.approx(aligned_reward - base_reward, abs=2e-4)
        if row["base"] == zero_shot[row["id"]]["reply"]:  # the evaluator gives a reply the run's reward
            assert base_reward == pytest.approx(zero_shot[row["id"]]["reward"], abs=0.01)


def test_reload_and_compare_notebook_says_when_replies_collapsed(tiny_run, tmp_path, monkeypatch) -> None:
    """The same run with every validation reply blank: the notebook must call it a collapse, not a match."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("results"))
    generations = _fit_generations(copy)
    records = [json.loads(line) for line in generations.open()]
    generations.write_text("".join(json.dumps({**r, "reply": ""}) + "\n" for r in records))
    out = _stdout(_execute("01_reload_and_compare", copy, monkeypatch))
    assert f"{len(records)} of {len(records)} greedy replies are empty (100%)" in out
    assert "COLLAPSED: 100% of the aligned model's replies" in out
    assert "gives the checkpoint's replies" not in out


def _rewards(run_dir: Path, with_checkpoint: bool) -> dict[str, float]:
    """Prompt id -> reward of the HH-RLHF ``validate`` with (or without) a checkpoint, from its generations
    file."""
    for meta_path in run_dir.glob("logs/version_*/eval/val_meta.json"):
        meta = json.loads(meta_path.read_text())
        if (meta["trainer_fn"], meta["data"], bool(meta["checkpoint"])) == (
            "validate",
            "HHRLHFDataModule",
            with_checkpoint,
        ):
            lines = meta_path.with_name("val_generations.jsonl").read_text().splitlines()
            return {r["id"]: r["reward"] for r in map(json.loads, lines)}
    raise AssertionError(f"no validate {'with' if with_checkpoint else 'without'} a checkpoint in {run_dir}")


def _paired_gain(run_dir: Path) -> tuple[float, float, int]:
    """The checkpoint's total gain over the base model and its standard error, computed here from the
    files."""
    aligned, base = _rewards(run_dir, True), _rewards(run_dir, False)
    diffs = [aligned[i] - base[i] for i in base if i in aligned]
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    return mean, se, len(diffs)


def _images(notebook: nbformat.NotebookNode) -> list[str]:
    return [
        o["data"]["image/png"]
        for c in notebook.cells
        if "plot" in c.metadata.get("tags", [])
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]


def test_results_tables_notebook(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = _execute("02_results_tables", tiny_run, monkeypatch)
    assert _plot_cells_draw(notebook) == 2  # rewards per subset, gains with error bars
    plots = [c.source for c in notebook.cells if "plot" in c.metadata.get("tags", [])]
    assert len(set(plots)) == len(plots) and len(set(_images(notebook))) == len(_images(notebook)) == 2
    assert "mean reward per subset" in plots[0] and "gain over the base model" in plots[1]
    with open(tiny_run / "results" / "table1_hh_rlhf.csv", newline="") as fh:
        table1 = list(csv.DictReader(fh))
    assert [row["evaluation"] for row in table1] == [
        "base (zero-shot)",
        "during fit (48 steps)",
        "last.ckpt (48 steps)",
    ]
    assert list(table1[0])[1:] == ["harmless-base", "total"]

    with open(tiny_run / "results" / "gains_hh_rlhf.csv", newline="") as fh:
        gains = {(row["evaluation"], row["subset"]): row for row in csv.DictReader(fh)}
    assert set(gains) == {
        (e, s) for e in ("during fit (48 steps)", "last.ckpt (48 steps)") for s in ("harmless-base", "total")
    }
    row = gains[("last.ckpt (48 steps)", "total")]
    gain, se, n = _paired_gain(tiny_run)
    assert int(row["prompts"]) == n == 100
    assert float(row["gain"]) == pytest.approx(gain, abs=1e-4)
    assert float(row["gain"]) == pytest.approx(
        float(table1[2]["total"]) - float(table1[0]["total"]), abs=1e-3
    )
    assert float(row["se"]) == pytest.approx(se, abs=1e-4)
    expected = "significant" if abs(gain) > 2 * se else "not significant"
    assert row["verdict"] == expected
    out = _stdout(notebook)
    assert (
        f"HH-RLHF, last.ckpt (48 steps): gain {gain:+.4f} ± {se:.4f} (standard error, 100 paired prompts, "
        f"{gain / se:+.1f} SE): {expected}"
    ) in out
    if BEAVERTAILS_CSV.is_file():
        with open(tiny_run / "results" / "table8_beavertails.csv", newline="") as fh:
            header = next(csv.reader(fh))
        assert len(header) == 1 + 14 + 1  # index, 14 categories, total
        assert "BeaverTails: no zero-shot evaluation on these prompts" in out
