"""The examples and the README run as documented, and fail when their results are wrong.

Each example runs in a fresh interpreter (``sys.executable``), as a user would run it, with a
timeout; the tests check the exit status and the results the scripts print. The README's
``python`` blocks run in order in one namespace, and its quick-start commands are the ones
``.ci/run`` executes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loopkit

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def run_example(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python examples/<name> args...`` from the repository root; this checkout's loopkit first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def printed_accuracy(proc: subprocess.CompletedProcess[str]) -> float:
    found = re.search(r"^test accuracy: ([0-9.]+)", proc.stdout, re.MULTILINE)
    assert found, f"no 'test accuracy:' line\n{output_of(proc)}"
    return float(found.group(1))




# --- examples/digits.py ---------------------------------------------------------------------


def test_digits_quick_run_trains_validates_and_passes_its_bar():
    proc = run_example("digits.py", "--quick", timeout=300)
    assert proc.returncode == 0, output_of(proc)
    assert printed_accuracy(proc) >= 0.80, output_of(proc)
    epochs = re.findall(r"^epoch\s+(\d+)\s+step\s+(\d+)\s+lr .* val/acc ([0-9.]+)$", proc.stdout, re.MULTILINE)
    assert [int(e) for e, _, _ in epochs] == [0, 1, 2, 3], output_of(proc)  # --quick: 4 epochs, validated each
    steps = [int(s) for _, s, _ in epochs]
    assert steps == sorted(steps) and steps[0] > 0, output_of(proc)


def test_digits_exits_nonzero_when_accuracy_is_below_the_bar():
    """The check is real: one epoch cannot reach 99%, and the script says so with status 1."""
    proc = run_example("digits.py", "--epochs", "1", "--min-acc", "0.99", timeout=300)
    assert proc.returncode == 1, output_of(proc)
    assert printed_accuracy(proc) < 0.99
    assert "FAILED: test accuracy" in proc.stderr, output_of(proc)


@pytest.mark.slow
def test_digits_default_run_reaches_95_percent():
    proc = run_example("digits.py", timeout=600)
    assert proc.returncode == 0, output_of(proc)
    assert printed_accuracy(proc) >= 0.95, output_of(proc)


# --- examples/custom_loop.py ----------------------------------------------------------------


def test_custom_loop_learns_keeps_the_initial_state_and_donation_matches():
    proc = run_example("custom_loop.py", timeout=300)
    assert proc.returncode == 0, output_of(proc)
    found = re.search(r"^custom loop OK: validation mse ([0-9.]+) -> ([0-9.]+)$", proc.stdout, re.MULTILINE)
    assert found, output_of(proc)
    before, after = map(float, found.groups())
    assert after < 0.2 * before, output_of(proc)
    # the losses read every k calls: the same values, in the same places, in both runs
    pure = re.findall(r"^  \[pure\] (.*)$", proc.stdout, re.MULTILINE)
    donated = re.findall(r"^  \[donated\] (.*)$", proc.stdout, re.MULTILINE)
    assert pure and pure == donated, output_of(proc)
    assert re.search(rf"^initial state untouched: step 0, validation mse {before:.5f}$", proc.stdout, re.MULTILINE)
    assert "reusing the donated state is refused" in proc.stdout, output_of(proc)


def test_custom_loop_exits_nonzero_when_the_loss_does_not_fall_even_under_python_O(monkeypatch):
    """One update (one epoch of one batch) cannot cut the loss by 80%; the check holds without asserts."""
    monkeypatch.setenv("PYTHONOPTIMIZE", "1")
    proc = run_example("custom_loop.py", "--epochs", "1", "--batch-size", "1000", "--log-every", "1", timeout=120)
    assert proc.returncode == 1, output_of(proc)
    assert "FAILED: validation mse fell only from" in proc.stderr and "Traceback" not in proc.stderr, output_of(proc)
    assert "custom loop OK" not in proc.stdout, output_of(proc)


# --- examples/ddp.py -----------------------------------------------------------------------
# (its run under torchrun is tests/test_distributed.py's)


@pytest.mark.parametrize("args", [("--epochs", "0"), ("--quick", "--epochs", "-1"), ("--batch-size", "0")])
def test_ddp_example_refuses_options_it_cannot_run_with_a_usage_error(args):
    """An explicit 0 is refused, not replaced by the default (``--epochs 0`` trained 15 epochs)."""
    proc = run_example("ddp.py", *args, timeout=300)
    assert proc.returncode == 2, output_of(proc)
    assert "error: --epochs and --batch-size must be at least 1" in proc.stderr, output_of(proc)
    assert proc.stdout == "", output_of(proc)


# --- README.md ------------------------------------------------------------------------------


def fenced_blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    """The example, the donation snippet and the resume snippet are real code with real asserts."""
    blocks = fenced_blocks("python")
    assert len(blocks) >= 3, "the README should hold the example, the donation and the resume blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    with torch.random.fork_rng(devices=[]):
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "'val/mse'" in out and "new_state was donated; use s1" in out
    assert isinstance(namespace["resumed"], loopkit.TrainState)
    assert namespace["resumed"].step == namespace["trained"].step


def test_readme_quick_start_is_what_ci_runs():
    commands = fenced_blocks("bash")
    assert len(commands) >= 2, "the quick start should be two bash blocks"
    run_main, run_tests = (c.strip() for c in commands[:2])
    assert "\n" not in run_main and "\n" not in run_tests, "each quick-start step is one command"
    assert run_main.endswith("examples/digits.py")
    assert run_tests.endswith("-m pytest")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_lines = [line.strip() for line in ci.splitlines()]
    position = 0
    for part in (p.strip() for p in run_tests.split("&&")):
        matching = [i for i, line in enumerate(ci_lines) if i >= position and line.startswith(part)]
        assert matching, f".ci/run does not run {part!r} (after line {position + 1}) as the README says"
        position = matching[0] + 1
    requirements = (ROOT / "requirements-dev.txt").read_text(encoding="utf-8").splitlines()
    assert "torch==2.13.0" in requirements and "-e ." in requirements


def test_pyproject_minimum_python_is_the_one_the_readme_states():
    """``requires-python`` is the README's Python, and is one loopkit's code runs on (``add_note`` is 3.11+)."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        requires = tomllib.load(f)["project"]["requires-python"]
    declared = re.fullmatch(r">=\s*3\.(\d+)", requires)
    assert declared, f"pyproject.toml requires-python {requires!r} is not of the form '>=3.N'"
    stated = re.search(r"\bwith Python 3\.(\d+)\b", README.read_text(encoding="utf-8"))
    assert stated, "README.md's quick start should name the Python it needs ('with Python 3.N')"
    assert int(declared.group(1)) == int(stated.group(1)), (requires, stated.group(0))
    uses_add_note = any("add_note(" in p.read_text(encoding="utf-8") for p in (ROOT / "loopkit").rglob("*.py"))
    assert not uses_add_note or int(declared.group(1)) >= 11, "BaseException.add_note needs Python 3.11"


def test_readme_names_only_transforms_that_exist():
    named = set(re.findall(r"\bwith_[a-z_]+\b", README.read_text(encoding="utf-8")))
    assert {"with_amp", "with_grad_accum", "with_grad_clip", "with_nan_guard"} <= named
    missing = sorted(n for n in named if not hasattr(loopkit, n))
    assert not missing, f"README.md names transforms loopkit does not have: {missing}"
