"""Smoke tests of benchmarks/overhead.py: ``--quick`` runs end to end in a subprocess.

No timing is asserted (timings depend on the machine and its load). The quick run must
exit 0, print a row of the main table for every contender with a time for each workload
(or ``n/a`` where an optional framework is not installed), have timed every round, and
have measured the peak memory of every contender in its own child process.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "overhead.py"

# The rows the benchmark must report (its labels, written out here independently).
CONTENDER_ROWS = {
    "raw": "raw PyTorch loop",
    "run_epochs": "loopkit run_epochs",
    "pure": "loopkit pure step, plain loop",
    "donated": "loopkit donated step, plain loop",
    "clip": "+ with_grad_clip(max_norm=1)",
    "accum": "+ with_grad_accum(every=4), per call",
    "nan_guard": "+ with_nan_guard",
    "amp": "+ with_amp(bf16)",
    "trainer": "Lightning Trainer",
    "fabric": "Lightning Fabric",
    "ignite": "Ignite Engine",
}
OPTIONAL = {"trainer", "fabric", "ignite"}  # n/a where Lightning or Ignite is not installed
WORKLOADS = ("tiny", "small")
QUICK_ROUNDS = 2


def _main_table(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = lines.index("## Time per training step and peak memory")
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("| :---") and not line.startswith("| contender"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_quick_run_reports_every_contender(tmp_path):
    results_file = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(results_file)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {row[0]: row for row in _main_table(proc.stdout)}
    results = json.loads(results_file.read_text())["results"]
    for key, label in CONTENDER_ROWS.items():
        assert label in rows, f"no table row for {label!r}; rows: {sorted(rows)}"
        row = rows[label]
        for i, workload in enumerate(WORKLOADS):
            us_cell = row[1 + 3 * i]
            record = results[workload][key]
            if us_cell.startswith("n/a"):
                assert key in OPTIONAL, f"{label} on {workload}: {us_cell}"
                continue
            assert math.isfinite(float(us_cell)) and float(us_cell) > 0, f"{label} on {workload}: {us_cell!r}"
            assert record["error"] is None
            assert len(record["per_step_s"]) == QUICK_ROUNDS, f"{label} on {workload}: not timed every round"
            memory = record["memory"]
            assert isinstance(memory, dict), f"{label} on {workload}: memory not measured: {memory!r}"
            assert memory["peak_kb"] >= memory["baseline_kb"] > 0
    # Adam's moments alone (2 x 1 MiB for the small MLP) must show in the raw loop's growth.
    assert results["small"]["raw"]["memory"]["growth_kb"] > 2 * 1024


def test_bad_options_are_refused_by_name():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--rounds", "0"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "--rounds must be >= 1" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "raw,lightspeed"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "lightspeed" in proc.stderr
