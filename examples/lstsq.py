"""Linear least squares in closed form: a step with no optimizer and no gradient, run by ``run_epochs``.

Not every "training" is gradient descent. Here the state has no optimizer
(``TrainState.create(model, optimizer=None)``) and the step is a plain function that only
accumulates the sufficient statistics of a linear least-squares fit over the batches,

    A = X^T X,    B = X^T Y,    C = Y^T Y      (X with a column of ones for the bias),

as float64 tensors in ``state.extras`` (which holds tensors, numbers and strings, and goes
into checkpoints with the rest of the state). At the end of the epoch ``run_epochs`` calls
the step's ``flush``; a plain function gets one by having a ``flush`` attribute, and ours
solves ``A W = B`` and writes ``W`` into the model's ``weight`` and ``bias``. The step
never changes the state it is given: ``state.evolve`` returns a new state with new extras,
and ``flush`` works on ``fork(state)``. So an error in either leaves the given state as it was,
which ``with leaving_intact(state):`` around their work says (``run_epochs``, which donates the
state it trains, then keeps it: ``loopkit.state_at_error(error)`` holds every update before the
failure).

    python examples/lstsq.py            # 20,000 rows
    python examples/lstsq.py --quick    # 4,000 rows, for CI

The check: the weights equal ``torch.linalg.lstsq`` on the whole data set (float64) within
``--tol`` (default 1e-9, largest absolute difference). The script exits with status 1 when
they do not (try ``--limit-train-batches 3``: the fit then sees only part of the data).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import loopkit
from loopkit.state import fork
from loopkit.steps import leaving_intact

FEATURES, OUTPUTS = 8, 2
NOISE_STD = 0.1
_A, _B, _C, _ROWS = "lstsq/xtx", "lstsq/xty", "lstsq/yty", "lstsq/rows"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="training rows (default 20000, or 4000 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a short run for CI (the same check)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=2, help="each epoch accumulates afresh and solves again")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (tensors this small gain nothing from more; on a busy machine they cost)",
    )
    parser.add_argument("--tol", type=float, default=1e-9, help="largest allowed |W - lstsq| (float64)")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="fit on the first k batches only")
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = 4000 if args.quick else 20000
    if args.rows < 2 * (FEATURES + 1) or args.epochs < 1:
        parser.error("--rows must be at least twice the number of features + 1, and --epochs at least 1")
    return args


def make_data(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated, off-centre features and a noisy linear target (the same teacher for every seed), in float64."""
    f64 = torch.float64
    teacher = torch.Generator().manual_seed(1234)
    mixing = torch.eye(FEATURES, dtype=f64) + 0.5 * torch.randn(FEATURES, FEATURES, generator=teacher, dtype=f64)
    w_true = torch.randn(FEATURES, OUTPUTS, generator=teacher, dtype=f64)
    b_true = torch.randn(OUTPUTS, generator=teacher, dtype=f64)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, FEATURES, generator=gen, dtype=f64) @ mixing + 3.0  # off-centre: the bias matters
    y = x @ w_true + b_true + NOISE_STD * torch.randn(rows, OUTPUTS, generator=gen, dtype=f64)
    return x, y


def with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def lstsq_step(
    state: loopkit.TrainState, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[loopkit.TrainState, dict[str, torch.Tensor]]:
    """Add this batch's ``X^T X``, ``X^T Y`` and ``Y^T Y`` to the sums in ``state.extras``.

    Also reports the current model's squared error on the batch (the previous epoch's fit;
    the initial weights in the first epoch). New tensors, a new state: nothing is changed
    in place, so the caller's state stays as it was without a copy.
    """
    with leaving_intact(state):  # nothing below changes the state in place: an error leaves it usable
        x, y = batch
        x1 = with_ones(x)
        extras = state.extras
        sums = {
            _A: x1.T @ x1 + extras.get(_A, 0.0),
            _B: x1.T @ y + extras.get(_B, 0.0),
            _C: y.T @ y + extras.get(_C, 0.0),
            _ROWS: extras.get(_ROWS, 0) + x.shape[0],
        }
        with torch.no_grad():
            mse = nn.functional.mse_loss(state.model(x), y)
        return state.evolve(batch_index=state.batch_index + 1, extras={**extras, **sums}), {"mse": mse}


def solve(state: loopkit.TrainState) -> tuple[loopkit.TrainState, dict[str, torch.Tensor]]:
    """End of the epoch: solve the normal equations, write the weights, clear the sums.

    ``run_epochs`` calls it through the step's ``flush``. ``state.step`` counts solves (the
    only updates this "training" makes). Reports the fit's mean squared error over the
    epoch's rows, computed from the sums alone: ``(tr C - 2 tr W^T B + tr W^T A W) / (rows * outputs)``.
    """
    if _A not in state.extras:  # no batch since the last solve
        return state, {}
    with leaving_intact(state):  # only the copy below changes: an error leaves the given state usable
        state = fork(state)  # the weights are written in place: into a copy
        extras = dict(state.extras)
        a, b, c, rows = extras.pop(_A), extras.pop(_B), extras.pop(_C), extras.pop(_ROWS)
        w = torch.linalg.solve(a, b)  # (features + 1, outputs); A is symmetric positive definite
        model = state.model
        assert isinstance(model, nn.Linear)  # (for a type checker: state.model is an nn.Module)
        with torch.no_grad():
            model.weight.copy_(w[:-1].T)
            model.bias.copy_(w[-1])
        sse = torch.trace(c) - 2 * torch.trace(w.T @ b) + torch.trace(w.T @ a @ w)
        metrics = {"fit_mse": sse / (rows * w.shape[1])}
        return state.evolve(step=state.step + 1, extras=extras), metrics


lstsq_step.flush = solve  # type: ignore[attr-defined]  # FnStep calls fn.flush(state) at the end of each epoch


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    x, y = make_data(args.rows, args.seed)
    x_val, y_val = make_data(2000, args.seed + 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)

    torch.manual_seed(args.seed)
    model = nn.Linear(FEATURES, OUTPUTS, dtype=torch.float64)
    state = loopkit.TrainState.create(model, optimizer=None, seed=args.seed)
    state, history = loopkit.run_epochs(
        lstsq_step, state, loader, epochs=args.epochs, limit_train_batches=args.limit_train_batches, progress=False
    )
    for record in history:
        print(f"epoch {record['epoch']}  solves {record['step']}  batch mse before the solve "
              f"{record['train/mse']:.6f}  fit mse {record['train/fit_mse']:.6f}")

    evaluator = loopkit.eval_step(lambda m, batch: {"mse": nn.functional.mse_loss(m(batch[0]), batch[1])})
    val = loopkit.evaluate(evaluator, state, [(x_val, y_val)])
    print(f"validation mse {val['mse']:.6f} (noise variance {NOISE_STD ** 2:.6f})")

    reference = torch.linalg.lstsq(with_ones(x), y).solution  # the whole data set, float64
    fit = state.model
    assert isinstance(fit, nn.Linear)
    fitted = torch.cat([fit.weight.detach().T, fit.bias.detach()[None]])
    diff = float((fitted - reference).abs().max())
    elapsed = time.perf_counter() - started
    print(f"closed-form weights vs torch.linalg.lstsq: max abs difference {diff:.3e} "
          f"(tolerance {args.tol:.0e}, {args.rows} rows, {elapsed:.1f} s)")
    if not diff <= args.tol:
        print(f"FAILED: the weights differ from torch.linalg.lstsq by {diff:.3e} > {args.tol:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
