"""Crash and stop tests in real subprocesses: SIGKILL at random moments, SIGTERM, then resume.

Reference: the same script run once without interruption, in its own process. A run
killed (several times, some kills inside a save or inside the deletion of an old
checkpoint) and resumed from its checkpoints must end with a ``state_dict()`` bitwise equal
to it: parameters, optimizer and scheduler state, counters, RNG. The pipeline has dropout,
a shuffled DataLoader, a scheduler and ``with_grad_accum(every=2)`` (tests/_resume_script.py).
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from loopkit import checkpoint

SCRIPT = Path(__file__).with_name("_resume_script.py")
BATCHES = 24  # 2 epochs of 12 batches
TIMEOUT = 60.0  # seconds any one subprocess may take


class Run:
    """One run of the script, its output lines read by a thread (so every wait is bounded)."""

    def __init__(self, directory: Path, out: Path, **env: str) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(directory), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env},
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next_line(self) -> str | None:
        try:
            line = self._queue.get(timeout=TIMEOUT)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"no output for {TIMEOUT}s; so far: {self.lines[-20:]}") from None
        if line is not None:
            self.lines.append(line)
        return line

    def wait_for(self, prefix: str, count: int = 1) -> None:
        seen = 0
        while seen < count:
            line = self.next_line()
            if line is None:
                raise AssertionError(f"the run ended before {count} lines starting {prefix!r}: {self.lines[-30:]}")
            seen += line.startswith(prefix)

    def finish(self) -> int:
        while self.next_line() is not None:
            pass
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)


def _position(run: Run) -> int:
    """Batches already done when the run started (from its ``start`` line)."""
    run.wait_for("start")
    _, step, epoch, batch = run.lines[-1].split()
    return int(epoch) * (BATCHES // 2) + int(batch)


def _complete(directory: Path, out: Path) -> list[str]:
    run = Run(directory, out)
    code = run.finish()
    assert code == 0, f"exit {code}: {run.lines[-30:]}"
    assert run.lines[-1].startswith("done"), run.lines[-5:]
    return run.lines


def _final(out: Path) -> dict:
    return torch.load(out, weights_only=True)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith((".tmp-", ".trash-")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("reference")
    lines = _complete(root / "ckpt", root / "out.pt")
    assert sum(line.startswith("batch") for line in lines) == BATCHES
    return _final(root / "out.pt")


def _kill_once(directory: Path, out: Path, rng: random.Random, phase: str) -> str:
    """Start a run and SIGKILL it at a moment of ``phase``; return what was done, for messages."""
    if phase == "batch":
        run = Run(directory, out)
        remaining = BATCHES - _position(run)
        run.wait_for("batch", rng.randint(1, max(1, remaining - 3)))
    else:  # hang in the n-th save (one per 2 batches) or deletion, and kill it there
        found = checkpoint.list_checkpoints(directory)
        done = found[-1].epoch * (BATCHES // 2) + found[-1].batch_index if found else 0
        n = rng.randint(1, max(1, (BATCHES - done) // 2 - 3))
        run = Run(directory, out, LOOPKIT_TEST_HANG=f"{phase}:{n}")
        _position(run)
        run.wait_for(phase, n)
    run.kill()
    run.finish()
    assert run.proc.returncode == -signal.SIGKILL, (phase, run.lines[-5:])
    assert not any(line.startswith("done") for line in run.lines), "the run finished before the kill"
    if phase == "saving":  # the kill hit between the payload and the manifest
        assert any(name.startswith(".tmp-") for name in _leftovers(directory)), _leftovers(directory)
    if phase == "pruning":  # the kill hit between hiding an old checkpoint and deleting it
        assert any(name.startswith(".trash-") for name in _leftovers(directory)), _leftovers(directory)
    return f"{phase} kill after batch {[line for line in run.lines if line.startswith('batch')][-1:]}"


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(
    tmp_path: Path, reference: dict, trial: int, assert_trees_equal
) -> None:
    rng = random.Random(1000 + trial)
    phases = [("saving", "batch"), ("batch", "pruning"), ("pruning", "saving")][trial]
    directory, out = tmp_path / "ckpt", tmp_path / "out.pt"
    story = [_kill_once(directory, out, rng, phase) for phase in phases]
    lines = _complete(directory, out)
    assert _leftovers(directory) == [], story  # stale temporaries and trash were cleaned
    assert_trees_equal(_final(out), reference)  # parameters, optimizer, scheduler, counters, RNG
    assert lines[0].startswith("start") and lines[0] != "start 0 0 0", (story, lines[0])


@pytest.mark.slow
def test_sigterm_saves_and_a_resumed_run_ends_the_same(tmp_path: Path, reference: dict, assert_trees_equal) -> None:
    directory, out = tmp_path / "ckpt", tmp_path / "out.pt"
    sent = tmp_path / "signal-sent"
    run = Run(directory, out, LOOPKIT_TEST_WAIT=f"7:{sent}")
    run.wait_for("batch", 7)  # the script holds still after batch 7 (mid-accumulation) until...
    run.kill(signal.SIGTERM)
    sent.touch()  # ...the signal has been sent
    code = run.finish()
    assert code == 0, run.lines[-10:]
    assert run.lines[-1].startswith("stopped"), run.lines[-5:]
    stopped_at = [line for line in run.lines if line.startswith("batch")][-1].split()
    newest = checkpoint.list_checkpoints(directory)[-1]
    saved = checkpoint.load(newest.path)
    assert saved["meta"]["reason"] == "stop"
    assert newest.batch_index == 7 and saved["state"]["extras"]["accum/count"] == 1  # half a group
    assert len(saved["state"]["grads"]) == 4  # the partial gradient sum is saved too
    assert [newest.epoch, newest.batch_index, newest.step] == [int(v) for v in stopped_at[1:]]
    assert _leftovers(directory) == []
    lines = _complete(directory, out)
    assert lines[0] == f"start {newest.step} {newest.epoch} {newest.batch_index}"
    assert_trees_equal(_final(out), reference)
