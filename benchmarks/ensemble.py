#!/usr/bin/env python
"""Ensemble cost: K members trained by one vmapped ``loopkit.ensemble`` step against K loops.

Each round trains K members of one architecture (each with its own initial weights and Adam
learning rate) on the same batches, four ways, interleaved, one thread:

* raw: K hand-written PyTorch loops, one after the other for every batch;
* loopkit, K donated ``train_step`` s: the same with loopkit's step;
* loopkit ensemble: one donated ``ensemble.train_step`` (``torch.func.vmap`` over the members'
  forward and backward, then each member's optimizer);
* raw vmap: the same vmapped gradient and optimizer steps written with torch.func by hand.

Prints the median time per batch (all K members) and the ratios to the raw loops. Usage::

    python benchmarks/ensemble.py                   # K = 8, the tiny and small MLPs
    python benchmarks/ensemble.py --members 4 --rounds 20
    python benchmarks/ensemble.py --quick           # smoke run: numbers meaningless
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import loopkit  # noqa: E402
from loopkit import ensemble  # noqa: E402

WORKLOADS = {"tiny": (32, 64, 10, 32), "small": (784, 256, 10, 64)}  # in, hidden, out, batch


def make_model(sizes: tuple[int, int, int, int], seed: int) -> nn.Module:
    d_in, hidden, d_out, _ = sizes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def lr_of(k: int) -> float:
    return 1e-3 * (1.5**k)


def contenders(sizes: tuple[int, int, int, int], k: int) -> dict[str, Callable[[list], None]]:
    """Each contender: a function training its K members over a list of batches."""
    raw_models = [make_model(sizes, s) for s in range(k)]
    raw_opts = [torch.optim.Adam(m.parameters(), lr=lr_of(i)) for i, m in enumerate(raw_models)]

    def raw(batches: list) -> None:
        for x, y in batches:
            for model, opt in zip(raw_models, raw_opts):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

    def states() -> list[loopkit.TrainState]:
        out = []
        for i in range(k):
            model = make_model(sizes, i)
            out.append(loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=lr_of(i)), seed=i))
        return out

    solo_states = states()
    solo_step = loopkit.donate(loopkit.train_step(loss_fn))

    def solo(batches: list) -> None:
        for batch in batches:
            for i in range(k):
                solo_states[i], _ = solo_step(solo_states[i], batch)

    holder = {"ens": ensemble.stack(states())}
    ens_step = ensemble.train_step(loss_fn, donated=True)

    def vmapped(batches: list) -> None:
        ens = holder["ens"]
        for batch in batches:
            ens, _ = ens_step(ens, batch)
        holder["ens"] = ens

    models = [make_model(sizes, s) for s in range(k)]
    skeleton = models[0]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n, _ in skeleton.named_parameters()}
    views = [{n: nn.Parameter(p[i]) for n, p in params.items()} for i in range(k)]
    opts = [torch.optim.Adam(v.values(), lr=lr_of(i)) for i, v in enumerate(views)]

    def compute(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(torch.func.functional_call(skeleton, p, (x,)), y)

    grad_all = torch.func.vmap(torch.func.grad(compute), in_dims=(0, None, None))

    def raw_vmap(batches: list) -> None:
        for x, y in batches:
            grads = grad_all(params, x, y)
            for i, (view, opt) in enumerate(zip(views, opts)):
                for n, g in grads.items():
                    view[n].grad = g[i]
                opt.step()
                opt.zero_grad(set_to_none=True)

    return {
        "raw: K PyTorch loops": raw,
        "loopkit: K donated train_steps": solo,
        "loopkit: one ensemble.train_step": vmapped,
        "raw: torch.func vmap by hand": raw_vmap,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20, help="batches per timed pass")
    parser.add_argument("--workloads", default="tiny,small", help="comma-separated, from: " + ", ".join(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 batches, K = 3")
    args = parser.parse_args(argv)
    if args.quick:
        args.members, args.rounds, args.steps = 3, 2, 3
    if min(args.members, args.rounds, args.steps) < 1:
        parser.error("--members, --rounds and --steps must be at least 1")
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if unknown:
        parser.error(f"--workloads: unknown {unknown}; choose from {list(WORKLOADS)}")
    torch.set_num_threads(1)
    print("# loopkit ensemble benchmark\n")
    print(f"- cpu: {platform.processor() or platform.machine()}; torch {torch.__version__}; 1 thread")
    print(f"- K = {args.members} members (Adam, each its own learning rate), {args.steps} batches per pass, "
          f"{args.rounds} rounds, order shuffled per round; time per batch for all K members\n")
    print("| workload | contender | ms per batch (K members) | × K raw loops | × K loopkit steps |")
    print("| :--- | :--- | ---: | ---: | ---: |")
    for name in args.workloads.split(","):
        sizes = WORKLOADS[name]
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randn(sizes[3], sizes[0], generator=gen), torch.randint(0, sizes[2], (sizes[3],), generator=gen))
                   for _ in range(args.steps)]
        runs = contenders(sizes, args.members)
        for run in runs.values():  # warm-up
            run(batches[:2])
        samples: dict[str, list[float]] = {key: [] for key in runs}
        order, shuffle = list(runs), random.Random(0)
        for _ in range(args.rounds):
            shuffle.shuffle(order)
            for key in order:
                gc.collect()
                t0 = time.perf_counter()
                runs[key](batches)
                samples[key].append((time.perf_counter() - t0) / len(batches))
        raw, solo = samples["raw: K PyTorch loops"], samples["loopkit: K donated train_steps"]
        for key, values in samples.items():
            vs_raw = statistics.median([v / r for v, r in zip(values, raw)])
            vs_solo = statistics.median([v / s for v, s in zip(values, solo)])
            print(f"| {name} | {key} | {statistics.median(values) * 1e3:.2f} | {vs_raw:.2f} | {vs_solo:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
