"""An MNIST-style auto-encoder on scikit-learn's digits, logged to CSV with ``with_logging``.

As in Lightning's ``LitAutoEncoder``, the module's ``forward`` is what inference needs (the
encoder's 3-number code) while training uses encoder *and* decoder: in loopkit that split is
simply the ``loss_fn``, which reconstructs with ``model.decoder(model(x))``. The script

1. trains with ``run_epochs``, validating the reconstruction error after every epoch,
2. logs the step's metrics to a ``CSVLogger`` through ``with_logging`` (window means every
   ``--log-every`` updates, epoch means and validation means at each epoch's end),
3. reads ``metrics.csv`` back and checks it holds the ``train/loss`` rows and exactly the
   epoch and validation means that ``run_epochs`` returned in its history,
4. embeds the validation images with ``loopkit.predict`` (``forward`` = the encoder),
5. checks that the validation reconstruction loss fell below ``--max-ratio`` (default 0.5)
   of its value after the first epoch.

    python examples/autoencoder.py                 # 40 epochs
    python examples/autoencoder.py --quick         # 20 epochs, for CI
    python examples/autoencoder.py --log-dir runs  # keep the CSV (default: a temporary folder)

The data set ships inside scikit-learn (no download): 1797 images of 8x8 = 64 pixels, scaled
to [0, 1]. The script exits with status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
import time

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import loopkit

PIXELS, CODE = 64, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 40, or 20 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a short run for CI (the same checks)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the initial weights and the data order")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (tensors this small gain nothing from more; on a busy machine they cost)",
    )
    parser.add_argument("--log-every", type=int, default=10, help="with_logging window, in updates")
    parser.add_argument("--log-dir", default=None, help="CSV root folder to keep (default: a temporary folder)")
    parser.add_argument(
        "--max-ratio", type=float, default=0.5,
        help="the check: final val/loss must be below this fraction of the first epoch's",
    )
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 20 if args.quick else 40
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the check compares the last epoch with the first)")
    if args.log_every < 1:
        parser.error("--log-every must be at least 1")
    return args


class AutoEncoder(nn.Module):
    """``forward`` returns the code (what a user of the trained model wants); ``decoder`` maps it back."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(PIXELS, hidden), nn.ReLU(), nn.Linear(hidden, CODE))
        self.decoder = nn.Sequential(nn.Linear(CODE, hidden), nn.ReLU(), nn.Linear(hidden, PIXELS), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code: torch.Tensor = self.encoder(x)
        return code


def load_splits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Digits as (N, 64) floats in [0, 1] with their labels, split 85/15 by a fixed permutation."""
    digits = load_digits()
    pixels = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.85 * len(order))
    train, val = order[:n_train], order[n_train:]
    return TensorDataset(pixels[train], labels[train]), TensorDataset(pixels[val], labels[val])


def loss_fn(model: AutoEncoder, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Lightning's ``training_step``: encode with ``forward``, decode, compare with the input."""
    x, _ = batch  # the labels are not used
    x_hat = model.decoder(model(x))
    return nn.functional.mse_loss(x_hat, x)


def metric_fn(model: AutoEncoder, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Lightning's ``validation_step``: the same reconstruction error, logged as ``val/loss``."""
    return {"loss": loss_fn(model, batch)}


def read_csv(path: str) -> list[dict[str, float]]:
    """``metrics.csv`` as one dict per row, blank cells left out."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def check_csv(path: str, history: list[dict[str, float]], log_every: int) -> list[str]:
    """What is wrong with the CSV the logger wrote (an empty list when it is right)."""
    rows = read_csv(path)
    problems = []
    windows = [r for r in rows if "train/loss" in r]
    if not windows:
        problems.append(f"{path} has no train/loss rows")
    elif any(r["step"] % log_every or not math.isfinite(r["train/loss"]) for r in windows):
        problems.append(f"{path}: a train/loss row at a step that is not a multiple of {log_every}, or not finite")
    epoch_rows = [r for r in rows if "train/loss_epoch" in r]
    if [r["train/loss_epoch"] for r in epoch_rows] != [h["train/loss"] for h in history]:
        problems.append(f"{path}: the train/loss_epoch rows are not the history's train/loss means")
    val_rows = [r for r in rows if "val/loss" in r]
    if [r["val/loss"] for r in val_rows] != [h["val/loss"] for h in history]:
        problems.append(f"{path}: the val/loss rows are not the history's val/loss means")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_set, val_set = load_splits(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)  # order seeded by run_epochs
    val_loader = DataLoader(val_set, batch_size=512)

    torch.manual_seed(args.seed)  # the initial weights
    model = AutoEncoder()
    state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=args.lr), seed=args.seed)
    evaluator = loopkit.eval_step(metric_fn)
    untrained = loopkit.evaluate(evaluator, state, val_loader)["loss"]

    tmp = None
    root = args.log_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="loopkit-autoencoder-")
        root = tmp.name
    try:
        logger = loopkit.CSVLogger(root, name="autoencoder")
        logger.log_hparams({"lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs, "code": CODE})
        step = loopkit.with_logging(loopkit.train_step(loss_fn), logger, every_n_steps=args.log_every)
        state, history = loopkit.run_epochs(
            step, state, train_loader, epochs=args.epochs, val=(evaluator, val_loader), progress=False
        )
        for record in history:
            print(f"epoch {record['epoch']:2d}  step {record['step']:4d}  "
                  f"train/loss {record['train/loss']:.5f}  val/loss {record['val/loss']:.5f}")
        csv_path = os.path.join(logger.log_dir, "metrics.csv")
        problems = check_csv(csv_path, history, args.log_every)
        windows = sum(1 for r in read_csv(csv_path) if "train/loss" in r)
        print(f"CSV log: {csv_path} ({windows} train/loss rows)")
    finally:
        if tmp is not None:
            tmp.cleanup()

    codes = torch.cat(loopkit.predict(lambda m, batch: m(batch[0]), state, val_loader))
    print(f"codes of the validation images: {tuple(codes.shape)} (forward = the encoder)")

    first, final = history[0]["val/loss"], history[-1]["val/loss"]
    ratio = final / first
    elapsed = time.perf_counter() - started
    print(f"reconstruction val/loss: untrained {untrained:.5f}, after epoch 0 {first:.5f}, "
          f"final {final:.5f} (ratio {ratio:.3f}, {elapsed:.1f} s)")
    if tuple(codes.shape) != (len(val_set), CODE):
        problems.append(f"predict returned codes of shape {tuple(codes.shape)}, expected {(len(val_set), CODE)}")
    if not ratio < args.max_ratio:
        problems.append(f"the validation loss fell only to {ratio:.3f} of the first epoch's (bar: {args.max_ratio})")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
