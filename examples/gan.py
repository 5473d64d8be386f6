"""A GAN with two optimizers, written by hand as a plain step function, logged and checkpointed.

In Lightning this is "manual optimization" (``automatic_optimization = False``, two
optimizers from ``configure_optimizers``, ``toggle_optimizer``, ``manual_backward``). In
loopkit it is a plain function ``gan_step(state, batch) -> (state, metrics)`` that does
both updates itself; ``with_logging`` and ``with_checkpointing`` wrap it like any other
step, and ``run_epochs`` drives it. The target is a 2-D Gaussian with mean (2, -1) and
standard deviations (0.5, 1.5); the generator maps 4-D standard noise onto it.

Where the two optimizers live
-----------------------------
A ``TrainState`` has one ``optimizer``, and ``state.extras`` holds only tensors, numbers and
strings, so a second optimizer object cannot hide there. The clean answer is ONE
``torch.optim.Adam`` with TWO parameter groups, the generator's and the discriminator's,
each with its own learning rate. Each update gives gradients to one network only
(``loss.backward(inputs=<that network's parameters>)``) and calls ``optimizer.step()``:
torch's optimizers skip every parameter whose ``.grad`` is ``None`` (that is what
``zero_grad(set_to_none=True)`` is for), so the other group's weights, Adam moments and
step counts are untouched. The result is the same, bit for bit, as two separate Adam
optimizers (``tests/test_examples_more.py`` checks it against a raw PyTorch loop), and
the one optimizer's ``state_dict`` -- both groups -- is what the checkpoints save.
(Toggling a group's learning rate to 0 instead would be wrong: Adam with ``lr=0`` still
advances that group's moments and step count with whatever gradients it holds.)

What a plain-function step must do itself
-----------------------------------------
``train_step`` does these for you; a hand-written step does them explicitly:

* purity: ``state = fork(state)`` first, then change the copy in place (``fork`` copies
  parameters, gradients, buffers and optimizer state; the caller's state stays as it was);
* errors: loopkit cannot tell an error of a plain function that came before any change of
  the state it was given from one half-way through an update, so it counts that state used
  up (``run_epochs`` donates it: the fit's updates would be lost). ``with leaving_intact(state):``
  around the work that changes nothing of the given state (here all of it: only the copy
  changes) marks its errors, and the state stays usable: after an error in ``run_epochs``,
  ``loopkit.state_at_error(error)`` is the fit's newest state, with every update before it;
* randomness: the driver installs no RNG around a plain function. To draw from the state's
  own RNG (so a seed, or a restored checkpoint, reproduces the noise), open
  ``RNGScope(state.rng, cuda_index)``, draw, and put ``scope.close()`` -- the advanced RNG --
  in the new state;
* counters: advance ``state.step`` (here one per batch: one discriminator update and one
  generator update; ``with_logging`` and ``with_checkpointing(every_n_steps=...)`` act on
  it) and ``state.batch_index`` (a resumed run finds its place in the epoch by it: ``run_epochs``
  counts the batches it hands a step that leaves it alone, a loop of one's own must);
* metrics: 0-dim tensors, detached, never read on the host.

    python examples/gan.py            # 30 epochs
    python examples/gan.py --quick    # 12 epochs, for CI

It trains, restores the newest checkpoint and checks it holds the final generator, resumes
from an earlier checkpoint and checks the run ends on the same weights bit for bit, and
checks that the errors of the generated mean and standard deviation fell below half of
the untrained generator's (``--max-error``). It exits with status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce
from torch.utils.data import DataLoader

import loopkit
from loopkit.checkpoint import list_checkpoints
from loopkit.rng import RNGScope
from loopkit.state import fork
from loopkit.steps import leaving_intact

NOISE = 4
TARGET_MEAN = torch.tensor([2.0, -1.0])
TARGET_STD = torch.tensor([0.5, 1.5])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 30, or 12 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a short run for CI (the same checks)")
    parser.add_argument("--samples", type=int, default=4096, help="training samples drawn from the target")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr-g", type=float, default=1e-3, help="the generator group's learning rate")
    parser.add_argument("--lr-d", type=float, default=1e-3, help="the discriminator group's learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the weights, the noise and the data order")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (tensors this small gain nothing from more; on a busy machine they cost)",
    )
    parser.add_argument(
        "--max-error", type=float, default=0.5,
        help="the check: the generated mean's and std's errors must fall below this fraction of the untrained ones",
    )
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 12 if args.quick else 30
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the resume check restarts after epoch 1)")
    return args


def make_state(seed: int, lr_g: float, lr_d: float) -> loopkit.TrainState:
    """Both networks in one ``ModuleDict``, both parameter groups in one Adam (see the module docstring)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights
        generator = nn.Sequential(nn.Linear(NOISE, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2),
                                  nn.Linear(32, 2))
        discriminator = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2),
                                      nn.Linear(32, 1))
    model = nn.ModuleDict({"generator": generator, "discriminator": discriminator})
    optimizer = torch.optim.Adam([
        {"params": generator.parameters(), "lr": lr_g, "betas": (0.5, 0.999)},
        {"params": discriminator.parameters(), "lr": lr_d, "betas": (0.5, 0.999)},
    ])
    return loopkit.TrainState.create(model, optimizer, seed=seed)


def gan_step(state: loopkit.TrainState, real: torch.Tensor) -> tuple[loopkit.TrainState, dict[str, torch.Tensor]]:
    """One discriminator update, then one generator update, on a batch of real samples."""
    # Only the copy below changes: an error anywhere in it leaves the given state as it was, and
    # leaving_intact(state) (the given one) marks it so, keeping that state usable (under run_epochs,
    # loopkit.state_at_error(error) is then the fit's newest state, with every update before the failure).
    with leaving_intact(state):
        state = fork(state)  # purity: everything below changes this copy, never the caller's state
        generator, discriminator = state.model.get_submodule("generator"), state.model.get_submodule("discriminator")
        optimizer = state.optimizer
        assert optimizer is not None  # (make_state gives one; for a type checker)
        ones = torch.ones(real.shape[0], 1, device=real.device)
        zeros = torch.zeros_like(ones)
        # The state's RNG becomes torch's global RNG until close(): the noise (and any dropout)
        # draws from it. On a GPU pass the CUDA device index instead of None.
        scope = RNGScope(state.rng, None)
        try:
            z = torch.randn(real.shape[0], NOISE, device=real.device)
            fake = generator(z)

            # The discriminator: real -> 1, fake -> 0. Gradients reach its parameters only, so
            # optimizer.step() moves only its group (parameters without .grad are skipped).
            optimizer.zero_grad(set_to_none=True)
            d_real, d_fake = discriminator(real), discriminator(fake.detach())
            d_loss = bce(d_real, ones) + bce(d_fake, zeros)
            d_loss.backward(inputs=list(discriminator.parameters()))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # The generator: make the (just updated) discriminator say 1 on the same fakes.
            # backward(inputs=...) leaves the discriminator's .grad None, so its group stays still.
            g_loss = bce(discriminator(fake), ones)
            g_loss.backward(inputs=list(generator.parameters()))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        except BaseException:
            scope.discard()  # put the caller's global RNG back
            raise
        rng = scope.close()  # the advanced RNG state, for the new train state
        metrics = {
            "d_loss": d_loss.detach(),
            "g_loss": g_loss.detach(),
            "d_real": torch.sigmoid(d_real).mean().detach(),  # D's belief that real samples are real
            "d_fake": torch.sigmoid(d_fake).mean().detach(),  # ... and that the fakes are
        }
        return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1, rng=rng), metrics


def sample_stats(state: loopkit.TrainState, n: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``n`` generated samples, from fixed noise."""
    z = torch.randn(n, NOISE, generator=torch.Generator().manual_seed(12345))
    with torch.no_grad():
        x = state.model.get_submodule("generator")(z)
    return x.mean(0), x.std(0)


def errors(state: loopkit.TrainState) -> tuple[float, float]:
    """The largest per-coordinate error of the generated mean and of the generated std."""
    mean, std = sample_stats(state)
    return float((mean - TARGET_MEAN).abs().max()), float((std - TARGET_STD).abs().max())


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def count_rows(csv_path: str, column: str) -> int:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return sum(1 for row in csv.DictReader(f) if row.get(column))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data_gen = torch.Generator().manual_seed(args.seed)
    samples = TARGET_MEAN + TARGET_STD * torch.randn(args.samples, 2, generator=data_gen)
    loader: DataLoader[torch.Tensor] = DataLoader(
        samples,  # type: ignore[arg-type]  # (a tensor is a map-style data set; torch's annotation asks for a Dataset)
        batch_size=args.batch_size, shuffle=True, drop_last=True,
    )

    initial = make_state(args.seed, args.lr_g, args.lr_d)
    mean_err0, std_err0 = errors(initial)
    problems: list[str] = []

    with tempfile.TemporaryDirectory(prefix="loopkit-gan-") as tmp:
        ckpt_dir, log_root = os.path.join(tmp, "checkpoints"), os.path.join(tmp, "logs")
        logger = loopkit.CSVLogger(log_root, name="gan")
        step = loopkit.with_logging(gan_step, logger, every_n_steps=16)
        step = loopkit.with_checkpointing(step, ckpt_dir, every_n_epochs=1, keep_last=None)
        final, history = loopkit.run_epochs(step, initial, loader, epochs=args.epochs, progress=False)
        for record in history[:: max(1, len(history) // 6)] + history[-1:]:
            print(f"epoch {record['epoch']:2d}  step {record['step']:4d}  d_loss {record['train/d_loss']:.3f}  "
                  f"g_loss {record['train/g_loss']:.3f}  D(real) {record['train/d_real']:.3f}  "
                  f"D(fake) {record['train/d_fake']:.3f}")
        csv_path = os.path.join(logger.log_dir, "metrics.csv")
        logged = count_rows(csv_path, "train/g_loss")
        print(f"with_logging wrote {logged} train/g_loss rows to {os.path.relpath(csv_path, tmp)}")
        if logged != final.step // 16:
            problems.append(f"expected {final.step // 16} logged windows (one per 16 steps), found {logged}")

        # The newest checkpoint is the final state: same step, same generator, same RNG.
        template = make_state(args.seed, args.lr_g, args.lr_d)
        restored = loopkit.restore(template, ckpt_dir)
        ok = (restored.step == final.step and same_weights(restored.model, final.model)
              and torch.equal(restored.rng["cpu"], final.rng["cpu"]))
        print(f"restored the newest checkpoint (step {restored.step}): "
              f"{'equals' if ok else 'DIFFERS FROM'} the final state")
        if not ok:
            problems.append("the restored checkpoint is not the final state")

        # Resume from the checkpoint after epoch 1, as after a crash: the noise comes from the
        # state's RNG, so the resumed run ends on the same weights as the uninterrupted one.
        early = list_checkpoints(ckpt_dir)[0]
        resumed = loopkit.restore(make_state(args.seed, args.lr_g, args.lr_d), early.path)
        resumed, _ = loopkit.run_epochs(gan_step, resumed, loader, epochs=args.epochs, progress=False)
        same = same_weights(resumed.model, final.model) and resumed.step == final.step
        print(f"resumed from {early.path.name}: {'the same' if same else 'DIFFERENT'} final weights, bit for bit")
        if not same:
            problems.append("the run resumed from a checkpoint ended on different weights")

    mean_err, std_err = errors(final)
    mean, std = sample_stats(final)
    elapsed = time.perf_counter() - started
    print(f"generated mean {[round(v, 3) for v in mean.tolist()]} std {[round(v, 3) for v in std.tolist()]}; "
          f"target mean {TARGET_MEAN.tolist()} std {TARGET_STD.tolist()}")
    print(f"GAN errors: mean {mean_err0:.3f} -> {mean_err:.3f}, std {std_err0:.3f} -> {std_err:.3f} "
          f"({final.step} steps, {elapsed:.1f} s)")
    if not mean_err < args.max_error * mean_err0:
        problems.append(f"the generated mean's error {mean_err:.3f} is not below {args.max_error} x {mean_err0:.3f}")
    if not std_err < args.max_error * std_err0:
        problems.append(f"the generated std's error {std_err:.3f} is not below {args.max_error} x {std_err0:.3f}")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
