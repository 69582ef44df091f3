"""Run the default task end to end and print its figures: did the cycle align the white box, and how fast?

    python benchmarks/default_run.py [--out runs/default_run] [--config configs/tiny.yaml] [overrides...]
    python benchmarks/default_run.py --figures ZERO_SHOT.jsonl TRAINED.jsonl [METRICS.csv]

Runs, each in its own process as a user would: ``validate`` (the zero-shot white box), ``fit`` (with the
validation of the trained model at its end), ``validate --ckpt_path <last checkpoint>``; prints the wall
time of each, then the figures of ``cyclealign_pl.demo.report`` on the held-out evaluation prompts with
the targets of the default run. ``--figures`` only reads files of a finished run. Extra arguments go to
every command (e.g. ``--model.judge.init_args.delay 0.2``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(stage: str, config: str, out: Path, extra: list[str]) -> float:
    """One CLI command with its outputs under ``out/<name>``; returns its wall time in seconds."""
    name = stage if "--ckpt_path" not in extra else "validate_trained"
    root = out / name
    command = [
        sys.executable, "-m", "cyclealign_pl", stage, "--config", config,
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        *(["--trainer.callbacks.dirpath", str(root / "checkpoints")] if stage == "fit" else []),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "default_run")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--figures", nargs="+", metavar="FILE", help="zero-shot and trained generations "
                        "(+ metrics.csv) of a finished run: print their figures, run nothing")
    args, extra = parser.parse_known_args()
    from cyclealign_pl.demo.report import compute_figures, format_figures

    if args.figures:
        if len(args.figures) not in (2, 3):
            parser.error("--figures takes ZERO_SHOT.jsonl TRAINED.jsonl [METRICS.csv]")
        print(format_figures(compute_figures(*args.figures)))
        return
    times = {"validate (zero-shot)": run("validate", args.config, args.out, extra)}
    times["fit (+ validation of the trained model)"] = run("fit", args.config, args.out, extra)
    checkpoint = newest(args.out / "fit" / "checkpoints", "last*.ckpt")
    times["validate --ckpt_path last"] = run("validate", args.config, args.out, [*extra, "--ckpt_path", str(checkpoint)])
    zero_shot = newest(args.out / "validate", "**/eval/val_generations.jsonl")
    trained = newest(args.out / "validate_trained", "**/eval/val_generations.jsonl")
    metrics = newest(args.out / "fit", "**/metrics.csv")
    for name, seconds in times.items():
        print(f"wall time, {name}: {seconds:.1f} s")
    print(format_figures(compute_figures(zero_shot, trained, metrics)))


if __name__ == "__main__":
    main()
