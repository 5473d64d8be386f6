"""Train STEPS steps of one ``overhead.py`` contender on the tiny MLP: the program ``callgrind.sh`` counts.

    python benchmarks/_callgrind_fit.py donated 300

The contender is built as ``overhead.py`` builds it (``overhead.BY_KEY``) and runs one pass over
``STEPS`` batches; everything but the steps (imports, the model, the data, the first calls' set-up)
is the same for any ``STEPS``, so the difference of two counts is the steps' own.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import overhead  # noqa: E402
from _workloads import WORKLOADS, setup_process  # noqa: E402


def main(argv: list[str]) -> None:
    """Run ``STEPS`` steps of contender ``KEY`` (``argv``: KEY STEPS)."""
    key, steps = argv[0], int(argv[1])
    setup_process()
    workload = WORKLOADS["tiny"]
    runner = overhead.BY_KEY[key].build(workload, workload.model())
    try:
        runner.run(workload.batches(steps))
    finally:
        overhead._close(runner)


if __name__ == "__main__":
    main(sys.argv[1:])
