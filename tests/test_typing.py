"""loopkit's annotations as its users meet them (it ships ``py.typed``): ``mypy --strict`` accepts a typed user's
program (``tests/_typed_program.py``), and plain ``mypy`` the examples, which use loopkit as the README and docs do.

The errors mypy finds inside loopkit's own modules are not the users' and are not counted; only those in the
checked files are. mypy is pinned in requirements-dev.txt.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loopkit

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = Path("tests") / "_typed_program.py"
EXAMPLES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.py"))


def _mypy(*files: str, strict: bool) -> list[str]:
    """``mypy`` (``--strict`` when ``strict``) on ``files`` (paths from the repository root), with this checkout's
    loopkit; its error lines in those files. sklearn ships no annotations (``import-untyped`` is not the examples'
    error)."""
    env = dict(os.environ, MYPYPATH=str(ROOT))  # (this checkout's loopkit, before any installed one)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *(["--strict"] if strict else []), "--disable-error-code", "import-untyped",
         "--cache-dir", str(ROOT / ".mypy_cache"), "--python-executable", sys.executable, *files],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]  # (2: mypy itself failed)
    assert "source file" in proc.stdout.splitlines()[-1], proc.stdout[-3000:]  # (its summary: it checked them)
    return [line for line in proc.stdout.splitlines() if line.startswith(files) and ": error:" in line]


# (checked apart: a module that one checked file imports, examples/tune_digits.py's loopkit.tune, would be an
# attribute of its package to the others)
# (the examples in mypy's default mode: read as users write scripts, calls into torch's unannotated methods such as
# Tensor.backward are fine; the typed program in --strict mode)
@pytest.mark.slow
@pytest.mark.parametrize("files, strict", [([str(PROGRAM)], True), (EXAMPLES, False)], ids=["program", "examples"])
def test_mypy_passes(files, strict):
    assert _mypy(*files, strict=strict) == []


def test_typed_program_runs():
    """What the program type-checks as is what it gets: predict gives a list for one data set, a dict of lists for
    a mapping of named sets; the re-bound steps are the transforms' own; ``loopkit.tune`` is the module."""
    from tests import _typed_program

    made = _typed_program.main()
    assert made["outputs"].shape == (12, 1) and made["dtype"] == torch.float32
    assert set(made["named"]) == {"val"} and isinstance(made["named"]["val"], list)
    assert made["val_outputs"].shape == (12, 1)
    step, other, own = made["steps"]
    assert step.applied[-1] == "with_checkpointing" and own.applied[-1] == "with_checkpointing"
    assert other.applied[-1] == "with_epoch_scheduler"
    assert made["ensemble_metrics"]["loss"].shape == (2,)
    assert "val/train_loss" in made["history"][-1] and "latest" in made["history"][-1]  # (the callback's tensors, read)
    assert made["create_study"] is loopkit.tune.create_study
    assert "tune" in loopkit.__all__

