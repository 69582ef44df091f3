import os

# Idle OpenMP threads sleep instead of spinning: on a machine that is busy with other work, spinning threads
# of a small CPU model slow the run several-fold (docs/default_task.md). Set before torch is imported; a
# user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cyclealign_pl.commands import main

if __name__ == "__main__":
    main()
