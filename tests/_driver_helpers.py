"""Helpers shared by the driver, callback and progress tests: a tiny model, data, recorders.

Also ``CONVERSIONS``: the tensor methods that move a value to the host, which the
``conversions`` fixture in conftest.py counts.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch
from torch import nn

import loopkit
from loopkit import TrainState, eval_step

CONVERSIONS = ("item", "__float__", "__int__", "__bool__", "tolist", "__index__")

def forking_step(loss_fn):
    """A step of one's own, pure as the guide writes one (examples/gan.py): it forks the state, so its optimizer is
    a new object at every call, and updates the copy."""

    def step(state, batch):
        state = loopkit.state.fork(state)
        state.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(state.model, batch)
        loss.backward()
        state.optimizer.step()
        return state.evolve(step=state.step + 1), {"loss": loss.detach()}

    return step


def make_state(seed: int = 0, *, dropout: bool = False, scheduler: bool = False, lr: float = 0.1) -> TrainState:
    with torch.random.fork_rng():  # the same initial weights every time; the global RNG untouched
        torch.manual_seed(1234)
        return _build_state(seed, dropout, scheduler, lr)


def _build_state(seed: int, dropout: bool, scheduler: bool, lr: float) -> TrainState:
    layers: list[nn.Module] = [nn.Linear(3, 8), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(8, 1))
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if scheduler else None
    return TrainState.create(model, opt, sched, seed=seed)


def make_data(n_batches: int, batch_size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, generator=g), torch.randn(batch_size, 1, generator=g)) for _ in range(n_batches)]


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


#: a loss per training batch, 4 batches an epoch over 4 epochs: each epoch's 2nd and 4th batch worse than the epoch
#: before's (1.0, 1.1, then 1.2, 1.3, ...), the epochs' means better (10.525, 8.125, 5.725, 3.325)
SCRIPTED_LOSSES = [v for e in range(4) for v in (20.0 - 5 * e, 1.0 + 0.2 * e, 20.0 - 5 * e, 1.1 + 0.2 * e)]


def scripted_loss(values=SCRIPTED_LOSSES):
    """A ``loss_fn`` whose i-th call gives ``values[i]`` (plus the model's mse times 0, so that it has a gradient)."""
    calls = iter(values)
    return lambda model, batch: mse(model, batch) * 0 + next(calls)


class LatestTrainLoss(loopkit.Callback):
    """docs/from_lightning.md's recipe for Lightning's check (EarlyStopping) and ranking (ModelCheckpoint) of a train
    monitor after each validation: the latest step's loss, given as the validation metric ``val/train_loss``."""

    def on_batch_end(self, state, metrics):
        self.latest = metrics["loss"]

    def on_validation_end(self, state, metrics):
        return {"val/train_loss": self.latest}


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def counting_eval(fn=None):
    counter = Counter(fn or (lambda m, b: {"mse": mse(m, b)}))
    return eval_step(counter), counter


class Recorder:
    """A callback (not subclassing Callback) that records every hook call."""

    def __init__(self):
        self.events: list[str] = []
        self.batch_metrics: list[dict] = []
        self.val_metrics: list[tuple[int, int, dict]] = []
        self.epoch_metrics: list[dict] = []

    def on_fit_start(self, state):
        self.events.append("fit_start")

    def on_epoch_start(self, state):
        self.events.append("epoch_start")

    def on_batch_end(self, state, metrics):
        self.events.append("batch_end")
        self.batch_metrics.append(dict(metrics))

    def on_validation_end(self, state, metrics):
        self.events.append("validation_end")
        self.val_metrics.append((state.epoch, state.step, dict(metrics)))

    def on_epoch_end(self, state, metrics):
        self.events.append("epoch_end")
        self.epoch_metrics.append(dict(metrics))

    def on_fit_end(self, state, history):
        self.events.append("fit_end")


class CrashAfterStep(loopkit.Callback):
    """Crashes in the batch after update ``step``: that update's checkpoint (written once its batch's
    hooks have run) is the newest."""

    def __init__(self, step):
        self.step = step

    def on_batch_end(self, state, metrics):
        if state.step == self.step + 1:
            raise RuntimeError("simulated crash")


class FullDisk(loopkit.Logger):
    """A logger whose write at update ``at`` fails, as on a full disk (``with_logging`` writes after the update, so
    ``loopkit.state_at_error`` gives that update's state)."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def _write_metrics(self, metrics, step):
        if step == self.at:
            raise OSError(28, "No space left on device")


class Stream(torch.utils.data.IterableDataset):
    """The given batches as an IterableDataset: a loader over it has no len(), as a streamed dataset's has none."""

    def __init__(self, batches):
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)


def stream(batches) -> torch.utils.data.DataLoader:
    """A DataLoader (already batched) over ``batches`` without len()."""
    return torch.utils.data.DataLoader(Stream(batches), batch_size=None)


@contextlib.contextmanager
def gc_off() -> Iterator[None]:
    """No cyclic garbage collection inside (collected once before): an object left alive there is held by a
    reference or a reference cycle, where a raw loop's are freed by reference counting alone."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Watched(nn.Linear):
    """A model whose live instances :func:`alive` counts (the copies a finder trains included)."""


def alive() -> int:
    """How many :class:`Watched` models are alive."""
    return sum(type(o) is Watched for o in gc.get_objects())


def raw_loop_frees_its_model() -> bool:
    """The reference: a raw PyTorch loop's model (and Adam's moments) are freed once its names are dropped."""
    model = Watched(3, 1)
    opt = torch.optim.Adam(model.parameters())
    for batch in make_data(3):
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()
    del model, opt
    return alive() == 0
