"""How long ``--help`` takes, next to the floor: ``python -c "import lightning.pytorch"``.

Target (issue 13): ``python -m cyclealign_pl --help`` at most ~1 s above the floor; it is below it, as it
imports neither Lightning nor the package's models, data or judges (``commands.py``); so is ``compare
--help``. ``fit --help`` needs every class signature, so it imports them.

    python benchmarks/cli_help.py [--repeat 3]

Prints the median wall time of each command over ``--repeat`` fresh processes, and which heavy modules the
top-level help imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HEAVY = (
    "lightning",
    "cyclealign_pl.module",
    "transformers.modeling_utils",
    "datasets",
    "deepspeed",
    "openai",
)
COMMANDS = {
    'python -c "import lightning.pytorch"': [sys.executable, "-c", "import lightning.pytorch"],
    "python -m cyclealign_pl --help": [sys.executable, "-m", "cyclealign_pl", "--help"],
    "python -m cyclealign_pl compare --help": [sys.executable, "-m", "cyclealign_pl", "compare", "--help"],
    "python -m cyclealign_pl fit --help": [sys.executable, "-m", "cyclealign_pl", "fit", "--help"],
}


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def heavy_modules_of_top_level_help() -> list[str]:
    probe = (
        "import sys\nfrom cyclealign_pl.commands import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n"
        f"    pass\nprint([m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return eval(done.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    wall_time(COMMANDS['python -c "import lightning.pytorch"'])  # warm the file cache once
    medians = {
        name: statistics.median(wall_time(cmd) for _ in range(args.repeat)) for name, cmd in COMMANDS.items()
    }
    floor = medians['python -c "import lightning.pytorch"']
    for name, seconds in medians.items():
        print(f"{name:40s} {seconds:6.2f} s  ({seconds - floor:+.2f} s over the floor)")
    print(f"heavy modules imported by the top-level help: {heavy_modules_of_top_level_help() or 'none'}")


if __name__ == "__main__":
    main()
