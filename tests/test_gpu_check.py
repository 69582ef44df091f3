"""benchmarks/gpu_check.sh, the GPU check of issue 14, end to end on the CPU: the same steps with a tiny white
box and no DeepSpeed (CPU=1), so the script a GPU session runs once is known to work before it gets there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_script_runs_every_step_on_the_cpu(tmp_path):
    env = {**os.environ, "CPU": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "prompts/hour" in output and "per round (ms): generate" in output  # the figures it exists to print
    assert "Restored all states from the checkpoint" in output  # the resume took the first fit's checkpoint
    assert "(LlamaForCausalLM, " in output and "it loads with AutoModelForCausalLM.from_pretrained" in output
    assert (tmp_path / "out" / "exported" / "config.json").is_file()
