"""Step time of loopkit's ``with_ddp`` against a raw DDP loop written by hand, with 1 and 2 processes.

    python benchmarks/ddp.py                 # 1 and 2 processes, 10 rounds x 100 steps each
    python benchmarks/ddp.py --quick         # smoke run (2 rounds x 5 steps); numbers meaningless
    python benchmarks/ddp.py --nprocs 2 --rounds 20 --steps 200 --json out.json

For each process count the script starts itself under ``torchrun --standalone`` (gloo on the
CPU, one intra-op thread per process). Every rank trains an MLP 784-256-256-10 (Adam,
cross-entropy, batch 64 per rank, 64 synthetic batches cycled) with each contender in turn,
rounds interleaved so that load drifts hit all contenders alike:

- raw DDP loop: ``ddp = DistributedDataParallel(model)``; ``opt.zero_grad(); loss =
  F.cross_entropy(ddp(x), y); loss.backward(); opt.step()`` (the reference);
- loopkit donated step: ``donate(with_ddp(train_step(loss_fn)))`` in a Python loop;
- loopkit run_epochs: ``run_epochs(with_ddp(train_step(loss_fn)), ...)``, one epoch of ``steps`` batches.

Reported: the median over rounds of rank 0's mean step time (a barrier before and after
each round), and the ratio to the raw loop of the same process count (target: <= 1.05x). The loops
are timed around the loop (the closing barrier included); ``run_epochs`` from its own epoch-start to
its epoch-end hook (a callback with only those two hooks), as ``overhead.py`` times its drivers:
what a call does outside its epoch (checking its options, the fit's start and end on every rank)
is a fixed cost per call, reported in a row of its own (median ms per call), not in ms/step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CONTENDERS = ("raw DDP loop", "loopkit donated step", "loopkit run_epochs")
FIXED = "loopkit run_epochs, fixed cost per call"  # seconds a call, outside its epoch (not in ms/step)


class _EpochClock:
    """``run_epochs`` callback timing the epoch (only epoch hooks: the per-batch path is untouched)."""

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_epoch_start(self, state: Any) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, state: Any, record: Any) -> None:
        self.end = time.perf_counter()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(rank)
    return [(torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen)) for _ in range(64)]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _worker(steps: int, rounds: int, out: str) -> None:
    import loopkit
    from loopkit import distributed
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    distributed.init(timeout=120)
    rank = distributed.rank()
    data = _batches(rank)
    feed = [data[i % len(data)] for i in range(steps)]

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ddp = DistributedDataParallel(model)

    def raw() -> None:
        for x, y in feed:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()

    m2 = _model()
    holder = {"state": loopkit.TrainState.create(m2, torch.optim.Adam(m2.parameters(), lr=1e-3))}
    step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(_loss)))

    def donated() -> None:
        state = holder["state"]
        for batch in feed:
            state, _ = step(state, batch)
        holder["state"] = state

    m3 = _model()
    fit = {"state": loopkit.TrainState.create(m3, torch.optim.Adam(m3.parameters(), lr=1e-3))}
    fit_step = loopkit.with_ddp(loopkit.train_step(_loss))

    clock = _EpochClock()

    def run_epochs() -> float:
        state = fit["state"]
        fit["state"], _ = loopkit.run_epochs(fit_step, state, feed, epochs=state.epoch + 1, progress=False,
                                             sanity_val_batches=0, callbacks=[clock])
        return clock.end - clock.start

    runs = dict(zip(CONTENDERS, (raw, donated, run_epochs)))
    for fn in runs.values():  # warm up (builds DDP, allocates Adam state)
        fn()
    times: dict[str, list[float]] = {name: [] for name in (*runs, FIXED)}
    for _ in range(rounds):
        for name, fn in runs.items():
            torch.distributed.barrier() if distributed.world_size() > 1 else None
            start = time.perf_counter()
            window = fn()  # run_epochs: its epoch, from its epoch-start to its epoch-end hook
            torch.distributed.barrier() if distributed.world_size() > 1 else None
            total = time.perf_counter() - start
            times[name].append((total if window is None else window) / steps)
            if window is not None:
                times[FIXED].append(total - window)
    if distributed.is_rank_zero():
        with open(out, "w") as f:
            json.dump(times, f)
    distributed.shutdown()


def _launch(nprocs: int, steps: int, rounds: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}",
               os.path.abspath(__file__), "--worker", out, "--steps", str(steps), "--rounds", str(rounds)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun with {nprocs} processes failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def table(results: dict[int, dict[str, list[float]]]) -> str:
    counts = sorted(results)
    lines = ["| contender | " + " | ".join(f"{n} proc: ms/step (x raw)" for n in counts) + " |",
             "| --- |" + " --- |" * len(counts)]
    for name in CONTENDERS:
        cells = []
        for n in counts:
            med = statistics.median(results[n][name]) * 1e3
            ref = statistics.median(results[n]["raw DDP loop"]) * 1e3
            cells.append(f"{med:.3f} ({med / ref:.3f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [f"{statistics.median(results[n][FIXED]) * 1e3:.3f} ms/call" if results[n].get(FIXED) else "—"
             for n in counts]
    lines.append(f"| {FIXED} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds x 5 steps: a smoke run")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--nprocs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--json", default=None, help="also write the raw per-round times here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 5
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    counts = [n.strip() for n in args.nprocs.split(",")]
    if not all(n.isdecimal() and int(n) >= 1 for n in counts):
        parser.error(f"--nprocs: give comma-separated process counts of at least 1, got {args.nprocs!r}")
    if args.worker:
        _worker(args.steps, args.rounds, args.worker)
        return
    results: dict[int, Any] = {}
    for n in map(int, counts):
        results[n] = _launch(n, args.steps, args.rounds)
    print(f"# with_ddp step time (gloo, CPU, {args.rounds} rounds x {args.steps} steps; median of rounds)\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in results.items()}, f)


if __name__ == "__main__":
    main()
