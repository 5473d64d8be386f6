#!/usr/bin/env python
"""Checkpoint cost: loopkit's atomic, checksummed save and verified restore against plain torch.

The state is an MLP 2048-2048-2048 with Adam moments (about 100 MB of tensors; ``--quick``
uses a tiny one). Every timing is the median of ``--repeats`` interleaved repetitions (after one
untimed warm-up round), each save to a new file, in a temporary directory on the same disk (files are in the page cache when read back):

* save: ``torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f)``
  (the same tensors), ``torch.save`` followed
  by ``fsync``, and ``loopkit.checkpoint.save`` (global RNGs, fsyncs, checksum manifest,
  rename, directory fsync), and the same with ``durable=False`` (no fsync);
* restore: ``torch.load(weights_only=True)``, that plus loading it into the model and
  optimizer, and ``loopkit.restore`` (checksum verification, safe load, a new state);
* the time a training step waits for a save: a step of ``with_checkpointing(every_n_steps=1)``
  minus the same step without it, with synchronous saves and with ``async_save=True``
  (where the step waits only to copy the state; the background write is let finish
  between steps, outside the timing).

Prints a Markdown table. Usage::

    python benchmarks/checkpoint.py              # about 100 MB, 7 repeats: under a minute
    python benchmarks/checkpoint.py --quick      # smoke run: seconds, meaningless numbers
    python benchmarks/checkpoint.py --repeats 9 --dir /scratch
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loopkit  # noqa: E402
from loopkit import checkpoint  # noqa: E402


def build_state(width: int, seed: int = 0) -> loopkit.TrainState:
    """An MLP ``width``-``width``-``width`` with Adam moments filled by one update."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=1e-3), seed=seed)
    state, _ = loopkit.train_step(_loss)(state, torch.randn(8, width))
    return state


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).mean()


def state_bytes(state: loopkit.TrainState) -> int:
    total = 0

    def walk(value: object) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    walk(state.state_dict())
    return total


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def measure(state: loopkit.TrainState, root: Path, repeats: int) -> dict[str, float]:
    """Median seconds of each operation, the repetitions interleaved after one untimed warm-up round.

    Every save writes a new file (plain torch too: ``plain-<i>.pt``) and the previous one is
    deleted outside the timing, as checkpoint rotation does: all contenders meet the same
    file-system work (block allocation, freed blocks).
    """
    ckpts = root / "ckpts"
    fresh = build_state(state.model[0].in_features, seed=1)
    times: dict[str, list[float]] = {}

    def record(name: str, fn: Callable[[], object], keep: bool) -> None:
        elapsed = timed(fn)
        if keep:
            times.setdefault(name, []).append(elapsed)

    def plain_restore(plain: Path) -> None:
        sd = torch.load(plain, weights_only=True)
        fresh.model.load_state_dict(sd["model"])
        fresh.optimizer.load_state_dict(sd["optimizer"])

    for i in range(repeats + 1):
        keep = i > 0
        sd = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict()}
        unsynced, plain = root / f"unsynced-{i}.pt", root / f"plain-{i}.pt"
        record("torch.save", lambda: torch.save(sd, unsynced), keep)
        record("loopkit save, durable=False", lambda: checkpoint.save(state, ckpts, durable=False), keep)
        record("torch.save + fsync", lambda: (torch.save(sd, plain), fsync_file(plain)), keep)
        record("loopkit save", lambda: checkpoint.save(state, ckpts), keep)
        newest = checkpoint.list_checkpoints(ckpts)[-1].path
        record("torch.load", lambda: torch.load(plain, weights_only=True), keep)
        record("torch.load + load_state_dict", lambda: plain_restore(plain), keep)
        record("loopkit restore", lambda: checkpoint.restore(fresh, newest), keep)
        for old in checkpoint.list_checkpoints(ckpts)[:-1]:
            checkpoint.remove(old.path)
        for old in (root / f"unsynced-{i - 1}.pt", root / f"plain-{i - 1}.pt"):
            old.unlink(missing_ok=True)
    return {name: statistics.median(values) for name, values in times.items()}


def step_waits(state: loopkit.TrainState, root: Path, repeats: int) -> dict[str, float]:
    """Median extra seconds a step takes when it saves, synchronously and in the background."""
    batch = torch.randn(8, state.model[0].in_features)
    plain = loopkit.donate(loopkit.train_step(_loss))
    steps = {
        "sync": loopkit.donate(loopkit.with_checkpointing(loopkit.train_step(_loss), root / "sync", every_n_steps=1,
                                                          keep_last=1)),
        "async": loopkit.donate(loopkit.with_checkpointing(loopkit.train_step(_loss), root / "async", every_n_steps=1,
                                                           keep_last=1, async_save=True)),
    }
    current = loopkit.state.fork(state)
    times: dict[str, list[float]] = {"plain": [], "sync": [], "async": []}
    for _ in range(repeats):
        for name in ("plain", "sync", "async"):
            step = plain if name == "plain" else steps[name]
            start = time.perf_counter()
            current, _ = step(current, batch)
            times[name].append(time.perf_counter() - start)
            if name == "async":
                steps["async"].wait()  # let the background write finish, outside the timing
    base = statistics.median(times["plain"])
    return {
        "step": base,
        "sync": statistics.median(times["sync"]) - base,
        "async": statistics.median(times["async"]) - base,
    }


def table(size: int, ops: dict[str, float], waits: dict[str, float]) -> str:
    ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
    rows = [
        ("save, no fsync", "torch.save", "loopkit save, durable=False"),
        ("save, durable (the default)", "torch.save + fsync", "loopkit save"),
        ("restore", "torch.load", "loopkit restore"),
        ("restore into model + optimizer", "torch.load + load_state_dict", "loopkit restore"),
    ]
    lines = [
        f"State: {size / 1e6:.1f} MB of tensors. torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "",
        "| operation | plain torch | time | loopkit | ratio |",
        "|---|---|--:|--:|--:|",
    ]
    for label, base, ours in rows:
        lines.append(f"| {label} | `{base}` | {ms(ops[base])} | {ms(ops[ours])} | {ops[ours] / ops[base]:.2f}x |")
    lines += [
        "",
        "| a training step waits for a save | time |",
        "|---|---|",
        f"| the step alone (no checkpointing) | {ms(waits['step'])} |",
        f"| extra wait, synchronous save | {ms(waits['sync'])} |",
        f"| extra wait, `async_save=True` (copy only) | {ms(waits['async'])} |",
    ]
    return "\n".join(lines)


def fresh_memory_per_load() -> bool:
    """Pin glibc's mmap threshold so that every large tensor gets fresh memory; True where that worked.

    glibc raises its threshold after a large block is freed, after which a load may reuse the
    memory the previous load freed (no page faults) or not, by luck: torch.load of 100 MB then
    takes 12 or 55 ms from one repetition to the next. Pinned, every load pays for fresh
    memory, as a restore in a new process does, and the timings are stable.
    """
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny state and 1 repeat: a smoke run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--width", type=int, default=2048, help="the MLP's width (2048: about 100 MB)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.width < 1:
        parser.error("--repeats and --width must be at least 1")
    width, repeats = (128, 1) if args.quick else (args.width, args.repeats)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    pinned = fresh_memory_per_load()
    root = Path(tempfile.mkdtemp(prefix="loopkit-bench-", dir=args.dir))
    try:
        state = build_state(width)
        ops = measure(state, root, repeats)
        waits = step_waits(state, root, max(3, repeats))
        print(table(state_bytes(state), ops, waits))
        print("\nMemory: " + ("fresh for every load (glibc mmap threshold pinned)." if pinned else
                              "allocator defaults (timings of loads vary with memory reuse)."))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
