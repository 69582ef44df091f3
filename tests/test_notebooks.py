"""The notebooks run top to bottom against a fresh tiny run, and their plot cells draw images.

One tiny run is made in-process (fit, then validate with the checkpoint, on the base model, and on
BeaverTails), then each notebook is executed with nbclient in a kernel pointed at the run by
``CYCLEALIGN_RUN_DIR``. Cells tagged ``plot`` must produce ``image/png`` output.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from cyclealign_pl.cli import main
from cyclealign_pl.evaluation import eval_paths

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
TINY = str(REPO / "configs" / "tiny.yaml")
BEAVERTAILS_CSV = REPO.parent / "shared" / "data" / "beavertails" / "BeaverTails-Evaluation.csv"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<tmp>/runs/tiny`` after a short fit and the evaluations the tables notebook reads."""
    root = tmp_path_factory.mktemp("notebook-run")
    last = "runs/tiny/checkpoints/last.ckpt"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        fit = main(["fit", "--config", TINY, "--trainer.limit_train_batches", "6"])
        with_ckpt = main(["validate", "--config", TINY, "--ckpt_path", last])
        zero_shot = main(["validate", "--config", TINY])
        runs = [fit, with_ckpt, zero_shot]
        if BEAVERTAILS_CSV.is_file():
            runs.append(main([
                "validate", "--config", TINY, "--config", str(REPO / "configs" / "eval" / "beavertails.yaml"),
                "--data.init_args.path", str(BEAVERTAILS_CSV), "--data.init_args.prompts_per_category", "1",
                "--data.init_args.cache_dir", str(root / "hf-cache"), "--ckpt_path", last,
            ]))
        metas = [json.loads(eval_paths(root / r.trainer.log_dir, "val")["meta"].read_text()) for r in runs]
    assert [(m["trainer_fn"], m["trained_steps"]) for m in metas[:3]] == [("fit", 6), ("validate", 6), ("validate", 0)]
    assert metas[1]["checkpoint"] == last and metas[2]["checkpoint"] is None
    return root / "runs" / "tiny"


def _execute(name: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("CYCLEALIGN_RUN_DIR", str(run_dir))
    monkeypatch.delenv("CYCLEALIGN_CKPT", raising=False)
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(run_dir.parent.parent)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    return notebook


def _plot_cells_draw(notebook: nbformat.NotebookNode) -> int:
    plots = [c for c in notebook.cells if "plot" in c.metadata.get("tags", [])]
    for cell in plots:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"plot cell produced no image:\n{cell.source[:200]}"
    return len(plots)


def _stdout(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.text for c in notebook.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream" and o.name == "stdout")


def test_reload_and_compare_notebook(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = _execute("01_reload_and_compare", tiny_run, monkeypatch)
    assert _plot_cells_draw(notebook) == 2  # Fig. 4 (iterations, reward) and Fig. 3 (ranking accuracy)
    out = _stdout(notebook)
    assert "trained for 6 steps" in out
    assert "exported model gives the checkpoint's replies: True" in out


def test_results_tables_notebook(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = _execute("02_results_tables", tiny_run, monkeypatch)
    assert _plot_cells_draw(notebook) == 1
    with open(tiny_run / "results" / "table1_hh_rlhf.csv", newline="") as fh:
        table1 = list(csv.DictReader(fh))
    assert [row[""] for row in table1] == [
        "base (zero-shot)", "during fit (6 steps)", "last.ckpt (6 steps)",
        "delta: during fit (6 steps)", "delta: last.ckpt (6 steps)",
    ]
    assert list(table1[0])[1:] == ["harmless-base", "total"]
    delta = float(table1[4]["total"])
    assert delta == pytest.approx(float(table1[2]["total"]) - float(table1[0]["total"]), abs=1e-3)
    if BEAVERTAILS_CSV.is_file():
        with open(tiny_run / "results" / "table8_beavertails.csv", newline="") as fh:
            header = next(csv.reader(fh))
        assert len(header) == 1 + 14 + 1  # index, 14 categories, total
