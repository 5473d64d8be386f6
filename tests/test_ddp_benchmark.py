"""Smoke test of benchmarks/ddp.py: ``--quick`` with 2 processes runs end to end; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ddp.py"


@pytest.mark.parametrize("args, message", [
    (("--rounds", "0"), "--rounds and --steps must be at least 1"),
    (("--nprocs", "2,x"), "--nprocs: give comma-separated process counts of at least 1, got '2,x'"),
    (("--quick", "--nprocs", "0"), "--nprocs: give comma-separated process counts of at least 1, got '0'"),
])
def test_bad_options_are_usage_errors_before_any_launch(args, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_process_counts_may_be_given_with_spaces():
    """'--nprocs "1, 2"' launches 1 then 2 processes (torchrun stubbed: only the parse is tested)."""
    stub = ("import sys; sys.path.insert(0, sys.argv[1]); import ddp\n"
            "ddp._launch = lambda n, steps, rounds: print('launch', n) or sys.exit(0) if n == 2 else print('launch', n) or {}\n"
            "ddp.main(['--nprocs', '1, 2', '--quick'])")
    proc = subprocess.run([sys.executable, "-c", stub, str(SCRIPT.parent)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout.split() == ["launch", "1", "launch", "2"], proc.stdout + proc.stderr


@pytest.mark.slow
def test_quick_run_reports_every_contender_with_a_time(tmp_path):
    out = tmp_path / "times.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--nprocs", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    times = json.loads(out.read_text())["2"]
    for row in ("raw DDP loop", "loopkit donated step", "loopkit run_epochs"):
        assert len(times[row]) == 2 and all(t > 0 for t in times[row]), row
        assert f"| {row} | " in proc.stdout
    # run_epochs is timed from its epoch hooks: its per-call set-up and tear-down is a row of its own
    fixed = times["loopkit run_epochs, fixed cost per call"]
    assert len(fixed) == 2 and all(t > 0 for t in fixed), fixed
    assert "| loopkit run_epochs, fixed cost per call | " in proc.stdout and " ms/call |" in proc.stdout
