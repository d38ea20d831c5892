"""The benchmark scripts run (tiny settings), so the GPU check is never broken on arrival."""

import subprocess
import sys


def test_gpu_smoke_runs_tiny_on_cpu():
    out = subprocess.run(
        [sys.executable, "bench/gpu_smoke.py", "--tiny", "--cpu", "--steps", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert "pruning step:" in out and "plain   step:" in out and "pruning / plain step time:" in out
