"""A small CNN on scikit-learn's handwritten digits (8x8 images, 10 classes), trained with loopkit.

Everything here is loopkit alone: a pure ``train_step`` with two gradient transforms, a
learning-rate schedule stepped once per update, the ``run_epochs`` driver with validation,
early stopping and a learning-rate monitor, then ``evaluate`` on a held-out test split.

    python examples/digits.py            # the full run: test accuracy must reach 95%
    python examples/digits.py --quick    # a short run for CI: test accuracy must reach 80%

The data set ships inside scikit-learn (no download). The script exits with status 1 when
the test accuracy is below the bar.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import loopkit

FULL_BAR = 0.95
QUICK_BAR = 0.80


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 30, or 4 with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"short run for CI; checks test accuracy >= {QUICK_BAR:.0%}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the initial weights, dropout and data order")
    parser.add_argument("--min-acc", type=float, default=None, help="override the accuracy bar")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (tensors this small gain nothing from more; on a busy machine they cost)",
    )
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 4 if args.quick else 30
    if args.min_acc is None:
        args.min_acc = QUICK_BAR if args.quick else FULL_BAR
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return args


def load_splits(seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Digits as (N, 1, 8, 8) float images in [0, 1], split 70/15/15 with a fixed permutation."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.70 * len(order)), int(0.15 * len(order))
    parts = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    return tuple(TensorDataset(images[idx], labels[idx]) for idx in parts)  # type: ignore[return-value]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(128, 10),
    )


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images, labels = batch
    logits = model(images)
    loss = nn.functional.cross_entropy(logits, labels)
    acc = (logits.argmax(dim=1) == labels).float().mean()
    return loss, {"acc": acc}  # aux metrics stay tensors: the step never reads them on the host


def metric_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    images, labels = batch
    logits = model(images)
    return {
        "loss": nn.functional.cross_entropy(logits, labels),
        "acc": (logits.argmax(dim=1) == labels).float().mean(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_set, val_set, test_set = load_splits(args.seed)
    # run_epochs seeds the shuffling from (state.seed, epoch): the same order on every run,
    # and on a resumed run.
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)
    test_loader = DataLoader(test_set, batch_size=256)

    torch.manual_seed(args.seed)  # the initial weights
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    # A per-update schedule: train_step calls scheduler.step() after every optimizer update.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * len(train_loader)
    )
    state = loopkit.TrainState.create(model, optimizer, scheduler, seed=args.seed)

    step = loopkit.with_grad_clip(loopkit.with_nan_guard(loopkit.train_step(loss_fn)), max_norm=1.0)
    evaluator = loopkit.eval_step(metric_fn)
    stopper = loopkit.EarlyStopping("val/loss", patience=5, mode="min")
    lr_monitor = loopkit.LearningRateMonitor()

    state, history = loopkit.run_epochs(
        step,
        state,
        train_loader,
        epochs=args.epochs,
        val=(evaluator, val_loader),
        callbacks=[stopper, lr_monitor],
    )
    for record in history:
        print(
            f"epoch {record['epoch']:2d}  step {record['step']:4d}  lr {record['lr-AdamW']:.2e}  "
            f"train/loss {record['train/loss']:.4f}  train/acc {record['train/acc']:.3f}  "
            f"val/loss {record['val/loss']:.4f}  val/acc {record['val/acc']:.3f}"
        )
    if stopper.should_stop:
        print(f"stopped early after {len(history)} epochs (best val/loss {stopper.best:.4f})")

    test = loopkit.evaluate(evaluator, state, test_loader)
    elapsed = time.perf_counter() - started
    print(f"test accuracy: {test['acc']:.4f} (loss {test['loss']:.4f}, {len(test_set)} images, {elapsed:.1f} s)")
    if test["acc"] < args.min_acc:
        print(f"FAILED: test accuracy {test['acc']:.4f} is below {args.min_acc:.2f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
