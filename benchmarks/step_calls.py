#!/usr/bin/env python
"""Exact per-step accounting of what loopkit adds to a raw PyTorch loop: calls, not time.

Timing a 400 µs step to the microsecond is at the mercy of the machine's load; counting is not.
For each loopkit form this trains the tiny MLP of ``benchmarks/overhead.py`` twice, ``--short``
and ``--long`` steps, and reports the difference divided by the difference in steps (what a
fit's set-up and end cost cancels out), minus the raw loop's own counts:

* Python-level calls (``sys.setprofile``): each Python function entered (``py``) and each
  builtin or C method called from Python (``c``: ``Generator.get_state``, ``Tensor.detach``,
  ``dict.copy`` ...); slot setters and attribute getters are not calls to it;
* torch operator events (``torch.profiler``, CPU): each ``aten::`` op and its sub-ops.

A fraction is work done every n steps (``0.031``: every 32, a window's fold; ``0.02``: every
50, a log point). The rows are ``donated`` (``loopkit.donate(train_step(...))`` in a plain
loop), ``donated_global`` (the same, ``global_rng=True``), ``run_epochs`` and
``run_epochs_global``, and ``logging`` (``run_epochs`` of ``with_logging(..., TensorBoardLogger,
every_n_steps=50)``). ``run_epochs`` gets its batches from a generator, as the step-pair
table's does, so its one-off check of a list's items is not counted per batch.

Usage::

    python benchmarks/step_calls.py                  # every row, 500 and 1500 steps (about a minute)
    python benchmarks/step_calls.py --only donated --short 50 --long 150
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _workloads import WORKLOADS, loss_fn, setup_process  # noqa: E402

Counts = dict[tuple[str, str], float]
ROWS = ("donated", "donated_global", "run_epochs", "run_epochs_global", "logging")


def python_calls(run: Callable[[], None]) -> collections.Counter:
    """``(kind, name)`` -> how many times ``run()`` entered it: ``py`` functions (file:line:name), ``c`` builtins."""
    counts: collections.Counter = collections.Counter()

    def profiler(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            counts["py", f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}:{code.co_name}"] += 1
        elif event == "c_call":
            counts["c", getattr(arg, "__qualname__", None) or repr(arg)] += 1

    sys.setprofile(profiler)
    try:
        run()
    finally:
        sys.setprofile(None)
    return counts


def torch_ops(run: Callable[[], None]) -> collections.Counter:
    """``("op", name)`` -> how many torch operator events ``run()`` recorded (CPU profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return collections.Counter(("op", event.name) for event in prof.events())


def trainer(row: str, steps: int) -> Callable[[], None]:
    """A fresh model, optimizer and data, and a function training ``steps`` steps of ``row`` on them."""
    import loopkit

    workload = WORKLOADS["tiny"]
    model = workload.model()
    optimizer = workload.optimizer(model)
    batches = workload.batches(steps)
    if row == "raw":
        def raw() -> None:
            for x, y in batches:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
        return raw
    state = loopkit.TrainState.create(model, optimizer, global_rng=row.endswith("_global"))
    if row.startswith("donated"):
        step = loopkit.donate(loopkit.train_step(loss_fn))

        def loop() -> None:
            s = state
            for batch in batches:
                s, _ = step(s, batch)
        return loop
    step = loopkit.train_step(loss_fn)
    folder = None
    if row == "logging":
        folder = tempfile.mkdtemp(prefix="loopkit-calls-")
        logger = loopkit.TensorBoardLogger(root=folder, name="calls")
        step = loopkit.with_logging(step, logger, every_n_steps=50)

    def fit() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (an epoch shorter than the logging interval)
                loopkit.run_epochs(step, state, (b for b in batches), epochs=1, progress=False, sanity_val_batches=0)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    return fit


def per_step(row: str, count: Callable[[Callable[[], None]], collections.Counter], short: int, long: int) -> Counts:
    """What one step of ``row`` counts: the counts of ``long`` steps minus those of ``short``, per step."""
    trainer(row, 8)()  # first-use costs (lazy imports, torch's kernels) out of the counts
    a, b = count(trainer(row, short)), count(trainer(row, long))
    return {k: (b[k] - a[k]) / (long - short) for k in set(a) | set(b) if b[k] != a[k]}


def added(row: Counts, raw: Counts) -> Counts:
    """``row``'s counts over the raw loop's (those that differ by at least one in a thousand steps)."""
    diff = {k: row.get(k, 0.0) - raw.get(k, 0.0) for k in set(row) | set(raw) if not k[1].startswith(_OWN)}
    return {k: v for k, v in diff.items() if abs(v) >= 1e-3}


_OWN = os.path.basename(__file__) + ":"  # this script's frames: the generator run_epochs' batches come from


def report(name: str, extra: Counts) -> list[str]:
    rows = sorted(extra.items(), key=lambda kv: (kv[0][0], -abs(kv[1]), kv[0][1]))
    totals = {kind: sum(v for (k, _), v in extra.items() if k == kind) for kind in ("py", "c", "op")}
    out = [f"## {name}: per step over the raw loop", "",
           f"Python functions {totals['py']:+.3f}, builtin calls {totals['c']:+.3f}, torch op events {totals['op']:+.3f}",
           "", "| kind | call | per step |", "| :--- | :--- | ---: |"]
    out += [f"| {kind} | `{call}` | {v:+.3f} |" for (kind, call), v in rows]
    return out + [""]


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    parser.add_argument("--short", type=int, default=500, help="steps of the shorter run (default 500)")
    parser.add_argument("--long", type=int, default=1500, help="steps of the longer run (default 1500)")
    args = parser.parse_args(None if argv is None else list(argv))
    rows = [r for r in args.only.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown or not 0 < args.short < args.long:
        parser.error(f"unknown rows {unknown}" if unknown else "--short must be positive and below --long")
    setup_process()
    raw = {**per_step("raw", python_calls, args.short, args.long), **per_step("raw", torch_ops, args.short, args.long)}
    for row in rows:
        counts = {**per_step(row, python_calls, args.short, args.long), **per_step(row, torch_ops, args.short, args.long)}
        print("\n".join(report(row, added(counts, raw))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
