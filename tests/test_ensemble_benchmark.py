"""Smoke test of benchmarks/ensemble.py: ``--quick`` runs in a subprocess and prints every row.

No timing is asserted (timings depend on the machine).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "ensemble.py"


@pytest.mark.parametrize("args, message", [
    (("--quick", "--workloads", "tinny"), "--workloads: unknown ['tinny']; choose from ['tiny', 'small']"),
    (("--rounds", "0"), "--members, --rounds and --steps must be at least 1"),
    (("--members", "0", "--workloads", "tiny"), "--members, --rounds and --steps must be at least 1"),
])
def test_bad_options_are_usage_errors(args, message):
    result = subprocess.run([sys.executable, str(BENCHMARK), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and message in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_the_quick_benchmark_prints_every_row():
    result = subprocess.run([sys.executable, str(BENCHMARK), "--quick"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    for workload in ("tiny", "small"):
        for row in ("raw: K PyTorch loops", "loopkit: K donated train_steps", "loopkit: one ensemble.train_step",
                    "raw: torch.func vmap by hand"):
            line = re.search(rf"^\| {workload} \| {re.escape(row)} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$",
                             result.stdout, re.MULTILINE)
            assert line and all(float(v) > 0 for v in line.groups()), (workload, row, result.stdout)
