"""Data-parallel training with torchrun: scikit-learn's digits, one shard of the data per process.

    torchrun --nproc-per-node 2 examples/ddp.py            # two processes on this machine
    torchrun --nproc-per-node 2 examples/ddp.py --quick    # a short run for CI

On two machines, run on each (HOST: the first machine's address, any free PORT)::

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id digits examples/ddp.py

``python examples/ddp.py`` runs it in one process (no DDP). Each rank trains on its shard
(``loopkit.distributed.shard``), DDP averages the gradients, the epoch means and the
validation numbers are over all ranks, and only rank 0 prints and writes checkpoints
(under ``--checkpoints DIR``: a restarted run, e.g. with ``torchrun --max-restarts 1``,
resumes from the newest one). Exits with status 1 when the test accuracy is below the bar, and with
143 when a signal (SIGTERM, Ctrl-C) stopped it before the end (saved under ``--checkpoints``, not
finished: a scheduler that requeues failed jobs relaunches it, and it resumes).
"""

from __future__ import annotations

import argparse
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import loopkit
from loopkit import distributed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs; checks test accuracy >= 80%%")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 15, or 3 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--checkpoints", default=None, help="directory for checkpoints (resumed from if present)")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 15)
    if epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be at least 1")
    bar = 0.80 if args.quick else 0.95

    distributed.init(timeout=120)  # from torchrun's environment; nothing in a single process
    torch.set_num_threads(1)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_idx, val_idx, test_idx = order[:1200], order[1200:1500], order[1500:]

    torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    state = loopkit.TrainState.create(model, optimizer, seed=0)
    if args.checkpoints:
        state = loopkit.restore(state, args.checkpoints)  # every rank reads the same newest checkpoint

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(m(inputs), targets)

    def metrics(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs, targets = batch
        logits = m(inputs)
        return {"loss": nn.functional.cross_entropy(logits, targets), "acc": (logits.argmax(1) == targets).float().mean()}

    step = loopkit.train_step(loss_fn)
    if distributed.world_size() > 1:
        step = loopkit.with_ddp(step)
    if args.checkpoints:
        step = loopkit.with_checkpointing(step, args.checkpoints, every_n_epochs=1)  # written by rank 0 only
    train = distributed.shard(TensorDataset(x[train_idx], y[train_idx]), state, batch_size=args.batch_size)
    val = distributed.shard(TensorDataset(x[val_idx], y[val_idx]), state, batch_size=256, pad=False)
    test = distributed.shard(TensorDataset(x[test_idx], y[test_idx]), state, batch_size=256, pad=False)
    evaluator = loopkit.eval_step(metrics)
    state, history = loopkit.run_epochs(step, state, train, epochs=epochs, val=(evaluator, val), progress=False)
    if state.epoch < epochs:  # preempted (SIGTERM) or Ctrl-C (no callback stops this fit): saved, not finished
        if distributed.is_rank_zero():
            print(f"stopped by a signal at epoch {state.epoch} step {state.step}: relaunch to resume")
        distributed.shutdown()
        return 143  # (128 + SIGTERM, as a shell reports it: a scheduler that requeues failed jobs relaunches it)

    result = loopkit.evaluate(evaluator, state, test)  # the same numbers on every rank, each sample once
    if distributed.is_rank_zero():
        for record in history:
            print(f"epoch {record['epoch']:>2} step {record['step']:>4} train/loss {record['train/loss']:.4f} "
                  f"val/acc {record['val/acc']:.4f}")
        print(f"world size: {distributed.world_size()}")
        print(f"test accuracy: {result['acc']:.4f}")
    distributed.shutdown()
    return 0 if result["acc"] >= bar else 1


if __name__ == "__main__":
    sys.exit(main())
