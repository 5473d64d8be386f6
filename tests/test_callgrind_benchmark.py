"""benchmarks/callgrind.sh: its arithmetic and its reading of callgrind's files, with a stand-in valgrind.

The real count takes minutes under valgrind; here a ``valgrind`` script first on ``PATH`` writes, as
``--separate-threads=yes`` would, one file per thread with known totals, so that the instructions per
step the script prints can be computed by hand.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "callgrind.sh"

# A stand-in valgrind: main thread = 5e8 + steps * per-step Ir of the contender; a second thread, never counted.
FAKE_VALGRIND = r"""#!/usr/bin/env bash
for arg in "$@"; do
    case "$arg" in --callgrind-out-file=*) out="${arg#*=}" ;; esac
done
steps="${@: -1}"; key="${@: -2:1}"
case "$key" in raw) per=2000000 ;; donated) per=2060000 ;; *) exit 3 ;; esac
printf 'events: Ir\nfn=main\n0 1\ntotals: %d\n' $((500000000 + steps * per)) > "$out-01"
printf 'events: Ir\ntotals: %d\n' $((steps * 999)) > "$out-02"
"""


def _run(tmp_path: Path, *keys: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "valgrind"
    fake.write_text(FAKE_VALGRIND)
    fake.chmod(0o755)
    environ = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(SCRIPT), *keys], capture_output=True, text=True, timeout=60, env=environ)


def test_instructions_per_step_are_the_main_threads_difference_over_the_steps(tmp_path):
    proc = _run(tmp_path, "raw", "donated")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| :")]
    assert rows[1:] == ["| raw | 2.000 | 1.000× |", "| donated | 2.060 | 1.030× |"], proc.stdout
    assert "(300-step fit − 100-step fit) / 200 steps" in proc.stdout


def test_step_counts_are_checked_and_a_failed_run_is_reported(tmp_path):
    proc = _run(tmp_path, "raw", LO="300", HI="100")
    assert proc.returncode == 2 and "need 1 <= LO < HI" in proc.stderr
    proc = _run(tmp_path, "lightspeed")
    assert proc.returncode == 1 and "the 300-step run of lightspeed failed" in proc.stderr
