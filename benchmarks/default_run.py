"""Run the default task end to end and print its figures: did the cycle align the white box, and how fast?

    python benchmarks/default_run.py [--out runs/default_run] [--config configs/tiny.yaml] [overrides...]
    python benchmarks/default_run.py --figures ZERO_SHOT.jsonl TRAINED.jsonl [METRICS.csv]

Runs, each in its own process and run directory as a user would: ``fit`` (which evaluates the zero-shot
white box before its first step and the trained one at its end), ``validate`` without a checkpoint (the
zero-shot white box) and ``validate --ckpt_path <the fit's last checkpoint>``; prints the wall time of each,
then the figures of ``cyclealign_pl.demo.report`` on the held-out evaluation prompts (the two ``validate``
runs) with the targets of the default run, and checks that the fit's own evaluations gave the same rewards.
``--figures`` only reads the files of a finished run. Extra arguments go to every command (e.g.
``--model.judge.init_args.delay 0.2``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(stage: str, root: Path, config: str, extra: list[str]) -> float:
    """One CLI command with every output under ``root``; returns its wall time in seconds."""
    command = [
        sys.executable,
        "-m",
        "cyclealign_pl",
        stage,
        "--config",
        config,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - started


def newest(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {pattern} under {root}")
    return found[-1]


def write_json(path: Path | None, figures, extra: dict | None = None) -> None:
    if path is not None:
        path.write_text(json.dumps({**figures.as_dict(), **(extra or {})}, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "default_run")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument(
        "--figures",
        nargs="+",
        metavar="FILE",
        help="zero-shot and trained generations "
        "(+ metrics.csv) of a finished run: print their figures, run nothing",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args, extra = parser.parse_known_args()
    from cyclealign_pl.demo.report import compute_figures, format_figures

    if args.figures:
        if len(args.figures) not in (2, 3):
            parser.error("--figures takes ZERO_SHOT.jsonl TRAINED.jsonl [METRICS.csv]")
        figures = compute_figures(*args.figures)
        print(format_figures(figures))
        write_json(args.json, figures)
        return
    if args.out.exists():
        parser.error(f"{args.out} exists: give a new --out (a run directory holds one run)")
    times = {
        "fit (zero-shot and trained evaluations included)": run("fit", args.out / "fit", args.config, extra)
    }
    times["validate (zero-shot)"] = run("validate", args.out / "zero_shot", args.config, extra)
    checkpoint = newest(args.out / "fit" / "checkpoints", "last*.ckpt")
    times["validate --ckpt_path last"] = run(
        "validate", args.out / "trained", args.config, [*extra, "--ckpt_path", str(checkpoint)]
    )
    figures = compute_figures(
        newest(args.out / "zero_shot", "**/eval/val_generations.jsonl"),
        newest(args.out / "trained", "**/eval/val_generations.jsonl"),
        newest(args.out / "fit", "**/metrics.csv"),
    )
    in_fit = compute_figures(
        newest(args.out / "fit", "**/eval/zero_shot_generations.jsonl"),
        newest(args.out / "fit", "**/eval/val_generations.jsonl"),
    )
    for name, seconds in times.items():
        print(f"wall time, {name}: {seconds:.1f} s")
    print(format_figures(figures))
    write_json(args.json, figures, {"wall_time_s": times})
    same = abs(in_fit.reward_gain - figures.reward_gain) < 1e-6
    print(
        f"the fit's own zero-shot and final evaluations give the same gain: {'yes' if same else 'NO'} "
        f"({in_fit.reward_gain:+.2f})"
    )


if __name__ == "__main__":
    main()
