"""What a search over copies of a state (``lr_find``, ``scale_batch_size``) checks before its first trial.

>>> import torch
>>> from loopkit.state import TrainState, refuse_copy_if_sharded
>>> from loopkit.steps import train_step
>>> model = torch.nn.Linear(1, 1)
>>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
>>> search_step(train_step(lambda m, b: None), state, "lr_find", (), "").applied
('train_step',)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loopkit.driver import _check_state
from loopkit.state import TrainState, refuse_copy_if_sharded
from loopkit.steps import Step, as_step

__all__ = ["search_step"]


def search_step(step: Any, state: TrainState, where: str, refused: Sequence[str], why: str) -> Step:
    """``step`` as a loopkit step once ``state`` (with an optimizer) and ``step`` (a train step without any of the
    ``refused`` transforms, for the reason ``why``) are fit for the search ``where``; else the error naming them."""
    _check_state(state, where)
    refuse_copy_if_sharded(state, where, f"Run {where} on the unsharded state, before training under with_fsdp (as "
                           "TrainState.create or loopkit.restore made it: the search shards copies of it and leaves it "
                           "unsharded), then give that state to the with_fsdp step")
    if state.optimizer is None:
        raise ValueError(f"{where}: the state has no optimizer (TrainState.create(model, optimizer)): the search "
                         "trains copies of it")
    if not callable(step):
        raise TypeError(f"{where}: step must be a step, train_step(loss_fn) or a function (state, batch) -> "
                        f"(state, metrics), got {type(step).__qualname__}")
    step = as_step(step, f"{where}: step")
    if "eval_step" in step.applied:
        raise TypeError(f"{where}: the step is an eval_step, which trains nothing; pass train_step(loss_fn)")
    found = [name for name in refused if name in step.applied]
    if found:
        raise ValueError(f"{where}: the step has {' and '.join(found)}, which would {why} (Lightning turns its "
                         "loggers and callbacks off during the search): pass the step without them")
    return step
