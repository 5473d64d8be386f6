"""A learning-rate and width search on scikit-learn's digits with ``loopkit.tune`` (Optuna).

Each trial trains a small MLP with the suggested learning rate and hidden width; its
validation loss is reported after every epoch, and Optuna's median pruner stops a trial
that is worse than the others at the same epoch. The study is kept in SQLite
(``<directory>/digits_search.db``; a temporary folder unless ``--directory`` names one): run the
script again with the same ``--directory`` and it adds trials to the same study. The sampler's seed
is offset by the trials the study holds, so a new study is reproducible and a resumed one draws
new trials rather than replaying the first run's.
Two trials are queued first with hopeless learning rates, so that pruning shows up even in a
short run. The best trial's model is retrained and evaluated on the test split.

    python examples/tune_digits.py                 # 16 trials
    python examples/tune_digits.py --quick         # 7 trials, fewer epochs (CI)

Needs the ``tune`` extra (Optuna). Exits with status 1 when the best trial's test accuracy is
below the bar or no trial was pruned.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import optuna
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import loopkit
from loopkit import tune

HOPELESS_LR = 1e-6
SEED = 0  # the sampler's seed for a new study


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short search for CI")
    parser.add_argument("--trials", type=int, default=None, help="trials to add (default 16, or 7 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 8, or 4 with --quick)")
    parser.add_argument("--directory", default=None, help="where the study's SQLite file lives (made if missing; default: a temporary folder)")
    parser.add_argument("--min-acc", type=float, default=0.9, help="the best trial's test accuracy must reach this")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (tensors this small gain nothing from more; on a busy machine they cost)",
    )
    args = parser.parse_args(argv)
    if args.trials is None:
        args.trials = 7 if args.quick else 16
    if args.epochs is None:
        args.epochs = 4 if args.quick else 8
    if args.trials < 1 or args.epochs < 1:
        parser.error("--trials and --epochs must be at least 1")
    return args


def load_splits() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Digits as flat 64-pixel vectors in [0, 1], split 70/15/15 with a fixed permutation."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train, n_val = int(0.70 * len(y)), int(0.15 * len(y))
    parts = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    return tuple(TensorDataset(x[idx], y[idx]) for idx in parts)  # type: ignore[return-value]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def metric_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    x, y = batch
    logits = model(x)
    return {"loss": nn.functional.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}


def build(lr: float, hidden: int, seed: int) -> loopkit.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    return loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=lr), seed=seed)


def sampler_for(study: optuna.Study, seed: int = SEED) -> optuna.samplers.TPESampler:
    """TPE seeded with ``seed`` plus the number of trials ``study`` holds: a new study gets ``seed`` (the same
    trials each time), a resumed one another seed, so its random start-up draws are not the earlier run's."""
    return optuna.samplers.TPESampler(seed=seed + len(study.trials))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    train_set, val_set, test_set = load_splits()
    train = DataLoader(train_set, batch_size=64, shuffle=True)
    val = (loopkit.eval_step(metric_fn), DataLoader(val_set, batch_size=256))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-6, 3e-2, log=True)
        hidden = trial.suggest_categorical("hidden", [32, 64, 128])
        state = build(lr, hidden, seed=trial.number)
        return tune.fit(trial, loopkit.train_step(loss_fn), state, train, val=val, epochs=args.epochs, progress=False)

    with tempfile.TemporaryDirectory() as scratch:
        study = tune.create_study(
            "digits_search", directory=args.directory or scratch,
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3),
        )
        study.sampler = sampler_for(study)  # (made once the study is loaded: its seed depends on the trials there)
        if not study.trials:  # a new study: three sound starts, then two hopeless learning rates
            for lr in (3e-3, 1e-2, 1e-3, HOPELESS_LR, HOPELESS_LR):
                study.enqueue_trial({"lr": lr, "hidden": 64})
        tune.optimize(objective, n_trials=args.trials, study=study)
        trials = study.trials

    finished = [t for t in trials if t.state.is_finished()]
    for t in finished:
        last = f"{t.value:.4f}" if t.value is not None else "-"
        print(f"trial {t.number:2d}  {t.state.name:8s}  lr {t.params['lr']:.2e}  hidden {t.params['hidden']:3d}  "
              f"reports {len(t.intermediate_values)}  val/loss {last}")
    pruned = [t for t in finished if t.state == optuna.trial.TrialState.PRUNED]
    print(f"{len(finished)} trials, {len(pruned)} pruned; best: {study.best_params} (val/loss {study.best_value:.4f})")

    best = build(study.best_params["lr"], study.best_params["hidden"], seed=study.best_trial.number)
    best, _ = loopkit.run_epochs(loopkit.train_step(loss_fn), best, train, epochs=args.epochs, progress=False)
    test = loopkit.evaluate(val[0], best, DataLoader(test_set, batch_size=256))
    print(f"best trial retrained: test accuracy {test['acc']:.4f}")
    if test["acc"] < args.min_acc or not pruned:
        print(f"FAILED: test accuracy {test['acc']:.4f} (bar {args.min_acc}) with {len(pruned)} pruned trials", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
