"""Time the embedded CPU default: ``fit --config configs/tiny.yaml``; print steps/s and peak memory.

Usage: python benchmarks/tiny_fit.py [--batches 24] [extra CLI overrides...]
A "step" is one training step (one batch of prompts through the whole cycle); optimizer steps are printed too.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=24)
    args, overrides = parser.parse_known_args()
    from cyclealign_pl.cli import main as cli_main

    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        cli = cli_main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                "--trainer.limit_train_batches",
                str(args.batches),
                "--trainer.limit_val_batches",
                "0",
                "--trainer.default_root_dir",
                run_dir,
                "--trainer.enable_progress_bar",
                "false",
                *overrides,
            ]
        )
        elapsed = time.perf_counter() - start
    module = cli.model
    steps = module.counters.steps
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"tiny fit: {steps} steps, {module.counters.optimizer_steps} optimizer steps, "
        f"{module.counters.iterations / max(steps, 1):.2f} iterations/step"
    )
    print(f"wall time (incl. model build and data load): {elapsed:.1f} s")
    print(
        f"steps/s: {steps / elapsed:.2f}   optimizer steps/s: {module.counters.optimizer_steps / elapsed:.2f}"
    )
    print(f"peak RSS: {peak_mib:.0f} MiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
