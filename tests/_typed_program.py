"""A user's program, fully annotated, that ``tests/test_typing.py`` type-checks with ``mypy --strict``.

It uses loopkit as the README and docs/from_lightning.md do: functions annotated with the user's own
``nn.Module`` subclass, a step re-bound through transforms (``step = loopkit.with_x(step, ...)``), ``predict``'s
outputs given to ``torch.cat``, ``loopkit.tune``. :func:`main` runs it too (the calls are legal at run time).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

import loopkit
from loopkit import ensemble


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


Batch = tuple[torch.Tensor, torch.Tensor]


def loss_fn(model: Net, batch: Batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def metric_fn(model: Net, batch: Batch) -> dict[str, torch.Tensor]:
    return {"mse": loss_fn(model, batch)}


def forward(model: Net, batch: Batch) -> torch.Tensor:
    out: torch.Tensor = model(batch[0])
    return out


def plain_step(state: loopkit.TrainState, batch: Batch) -> tuple[loopkit.TrainState, dict[str, torch.Tensor]]:
    """A step of one's own (a plain function), as examples/gan.py's."""
    return state.evolve(step=state.step + 1), {}


class LatestTrainLoss(loopkit.Callback):
    """docs/from_lightning.md's callback: the latest step's loss (a device tensor) given as a validation metric."""

    def __init__(self) -> None:
        self.latest = torch.zeros(())

    def on_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> None:
        self.latest = metrics["loss"]

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> dict[str, torch.Tensor]:
        return {"val/train_loss": self.latest}

    def on_epoch_end(self, state: Any, metrics: Mapping[str, float]) -> dict[str, torch.Tensor]:
        return {"latest": self.latest}


def fresh_state() -> loopkit.TrainState:
    net = Net()
    return loopkit.TrainState.create(net, torch.optim.SGD(net.parameters(), lr=0.1), seed=0)


def main() -> dict[str, Any]:
    """Build every pattern, fit and predict with the main one; what it made, for the runtime test."""
    tmp = tempfile.mkdtemp()
    data: list[Batch] = [(torch.ones(4, 2), torch.zeros(4, 1))] * 3

    # the documented chain: train_step first, each transform re-bound to the same name
    step = loopkit.train_step(loss_fn)
    step = loopkit.with_grad_clip(step, max_norm=1.0)
    step = loopkit.with_ema(step, 0.9)
    step = loopkit.with_logging(step, loopkit.CSVLogger(tmp), every_n_steps=1)
    step = loopkit.with_checkpointing(step, os.path.join(tmp, "ckpt"), every_n_steps=1)
    evaluator = loopkit.eval_step(metric_fn)
    evaluator = loopkit.with_amp(evaluator)
    state, history = loopkit.run_epochs(step, fresh_state(), data, epochs=1, val=(evaluator, data),
                                        callbacks=[LatestTrainLoss()], progress=False)
    step.save(state)  # CheckpointStep's own method stays reachable after the re-binding

    # a chain that starts with a transform (README's with_fsdp, examples/gan.py's with_logging)
    other = loopkit.with_compile(loopkit.train_step(loss_fn), backend="eager")
    other = loopkit.with_grad_accum(other, every=2)
    other = loopkit.with_pruning(other, 0.5, [1])
    other = loopkit.with_qat(other)
    other = loopkit.with_profiler(other, os.path.join(tmp, "prof"))
    other = loopkit.with_swa(other, 0.05, swa_epoch_start=1)
    other = loopkit.with_step_scheduler(other)
    other = loopkit.with_epoch_scheduler(loopkit.train_step(loss_fn))
    own = loopkit.with_logging(plain_step, loopkit.CSVLogger(tmp), every_n_steps=1)
    own = loopkit.with_checkpointing(own, os.path.join(tmp, "own"), every_n_steps=1)

    # predict: one iterable gives a list, a mapping of named sets a dict
    outputs = torch.cat(loopkit.predict(forward, state, data))
    dtype: torch.dtype = loopkit.predict(forward, state, data)[0].dtype
    named = loopkit.predict(forward, state, {"val": data})
    val_outputs = torch.cat(named["val"])

    # an ensemble's step takes the same loss_fn
    members = [loopkit.TrainState.create(n, torch.optim.SGD(n.parameters(), lr=0.1)) for n in (Net(), Net())]
    stacked, ensemble_metrics = ensemble.train_step(loss_fn)(ensemble.stack(members), data[0])

    # loopkit.tune, a module loaded on first use
    create_study: Callable[..., Any] = loopkit.tune.create_study

    return {"history": history, "outputs": outputs, "dtype": dtype, "named": named, "val_outputs": val_outputs,
            "steps": (step, other, own), "ensemble_metrics": ensemble_metrics, "create_study": create_study}


if __name__ == "__main__":
    print(main()["history"][-1])
