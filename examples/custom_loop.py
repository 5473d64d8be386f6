"""A loopkit step inside your own for-loop: no driver, no callbacks, nothing hidden.

The step is a value: ``state, metrics = step(state, batch)``. This script

1. builds a step from ``train_step`` and three transforms,
2. trains a small regression MLP with a plain Python loop, reading the loss on the host
   only every ``--log-every`` calls (metrics are device tensors until you ask),
3. evaluates with an ``eval_step`` by hand,
4. shows purity: the initial state is untouched by training and still gives the initial
   validation loss,
5. trains again from that same initial state with ``donate(step)`` (no copies, the input
   state's storage is reused) and checks it lands on exactly the same weights and losses,
6. shows that the donated initial state can no longer be used.

    python examples/custom_loop.py

It exits with status 1 (printing what failed) if the validation loss does not fall by at least
80% or the two runs differ; the checks are explicit, so they hold under ``python -O`` too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import torch
from torch import nn

import loopkit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=50, help="read the loss on the host every k calls")
    parser.add_argument("--quick", action="store_true", help="accepted for symmetry with digits.py (this run is short)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (tensors this small gain nothing from more; on a busy machine they cost)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.log_every < 1:
        parser.error("--epochs and --log-every must be at least 1")
    return args


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth nonlinear target in 8 dimensions, from a fixed random teacher, plus a little noise."""
    gen = torch.Generator().manual_seed(1234)  # the teacher is the same for every split
    w1, w2 = torch.randn(8, 16, generator=gen) / 8**0.5, torch.randn(16, 1, generator=gen) / 16**0.5
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = torch.sin(x @ w1) @ w2 + 0.01 * torch.randn(n, 1, generator=gen)
    return x, y


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of one epoch; shuffled by ``seed`` when given (your loop, your data order)."""
    order = torch.arange(len(x)) if seed is None else torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(x), batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"mse": loss_fn(model, batch)}


def failed(problem: str) -> int:
    """Report a failed check on stderr; the exit status for it (``assert`` would vanish under ``python -O``)."""
    print(f"FAILED: {problem}", file=sys.stderr)
    return 1


def validate(evaluator: loopkit.Step, state: loopkit.TrainState, x: torch.Tensor, y: torch.Tensor) -> float:
    """``eval_step`` by hand: a batch-size-weighted mean, summed on the device and read once."""
    total, count = torch.zeros(()), 0
    for batch in batches(x, y, 128):
        _, metrics = evaluator(state, batch)  # eval mode, no_grad; the state comes back unchanged
        total += metrics["mse"] * len(batch[0])
        count += len(batch[0])
    return float(total / count)


def train(
    step: loopkit.Step, state: loopkit.TrainState, data: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace,
    label: str,
) -> tuple[loopkit.TrainState, list[float]]:
    """Your own loop. Returns the final state and the losses read every ``log_every`` calls."""
    x, y = data
    logged: list[float] = []
    calls = 0
    for epoch in range(args.epochs):
        for batch in batches(x, y, args.batch_size, seed=epoch):
            state, metrics = step(state, batch)
            calls += 1
            if calls % args.log_every == 0:  # the only host reads: one float every k calls
                logged.append(float(metrics["loss"]))
                print(f"  [{label}] epoch {epoch} call {calls:4d} update {state.step:4d} loss {logged[-1]:.5f}")
        # With with_grad_accum, an epoch whose batch count is not a multiple of `every` leaves a
        # partial group (here 25 batches, every=2): flush applies it with the mean gradient over
        # the micro-batches seen, as run_epochs does. Without a partial group it does nothing.
        state, _ = step.flush(state)
        state = state.evolve(epoch=state.epoch + 1, batch_index=0)
    return state, logged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train_data, (val_x, val_y) = make_data(1000, seed=0), make_data(512, seed=1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Dropout(0.05), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    initial = loopkit.TrainState.create(model, optimizer, seed=0)  # dropout draws from initial.rng

    # Innermost first: the NaN guard checks each micro-batch, accumulation sums two micro-batches,
    # and the clip acts on the summed gradient once per update.
    step = loopkit.train_step(loss_fn)
    step = loopkit.with_nan_guard(step, policy="skip")
    step = loopkit.with_grad_accum(step, every=2)
    step = loopkit.with_grad_clip(step, max_norm=1.0)
    evaluator = loopkit.eval_step(mse)
    print("step:", " -> ".join(step.applied))

    before = validate(evaluator, initial, val_x, val_y)
    print(f"validation mse before training: {before:.5f}")

    trained, pure_losses = train(step, initial, train_data, args, "pure")
    after = validate(evaluator, trained, val_x, val_y)
    print(f"validation mse after training:  {after:.5f} ({trained.step} updates)")
    if not after < 0.2 * before:
        return failed(f"validation mse fell only from {before:.5f} to {after:.5f}")

    # Purity: every call copied what it changed, so `initial` is still the untrained model.
    again = validate(evaluator, initial, val_x, val_y)
    if not (again == before and initial.step == 0):
        return failed("the initial state changed")
    print(f"initial state untouched: step {initial.step}, validation mse {again:.5f}")

    # donate: the same step, allowed to reuse the input state's storage (no copies). Same
    # arithmetic, same RNG stream, same data order: the same weights, bit for bit.
    donated_state, donated_losses = train(loopkit.donate(step), initial, train_data, args, "donated")
    if donated_losses != pure_losses:
        return failed("the donated run logged different losses")
    if not all(torch.equal(a, b) for a, b in zip(trained.model.parameters(), donated_state.model.parameters())):
        return failed("the donated run ended on different weights")
    print("donated run: the same logged losses and the same weights as the pure run, bit for bit")

    # The donated initial state gave up its storage: using it again is refused.
    try:
        step(initial, next(batches(val_x, val_y, 8)))
    except loopkit.DonatedStateError as err:
        print(f"reusing the donated state is refused: {err}")
    else:
        return failed("using a donated state did not raise DonatedStateError")

    print(f"custom loop OK: validation mse {before:.5f} -> {after:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
