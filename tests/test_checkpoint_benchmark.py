"""Smoke test of benchmarks/checkpoint.py: ``--quick`` runs in a subprocess and prints its table.

No timing is asserted (timings depend on the machine); the test checks that every row is
there with a positive time, and that the benchmark leaves no files behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "checkpoint.py"


@pytest.mark.parametrize("args", [("--repeats", "0", "--width", "64"), ("--quick", "--width", "0")])
def test_bad_options_are_usage_errors(args, tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARK), *args, "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "--repeats and --width must be at least 1" in result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_quick_benchmark_prints_every_row(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for row in ("| save, no fsync |", "| save, durable (the default) |", "| restore |", "| restore into model + optimizer |"):
        line = next(line for line in out.splitlines() if line.startswith(row))
        base, ours, ratio = re.findall(r"(\d+\.\d+) ms \| (\d+\.\d+) ms \| (\d+\.\d+)x", line)[0]
        assert float(base) > 0 and float(ours) > 0 and float(ratio) > 0
    for row in ("the step alone", "extra wait, synchronous save", "extra wait, `async_save=True`"):
        assert re.search(rf"\| {re.escape(row)}.* \| -?\d+\.\d+ ms \|", out), row
    assert list(tmp_path.iterdir()) == []
