"""``with_ema``: an exponential moving average of the parameters, kept in the state.

>>> from loopkit.steps import train_step
>>> with_ema(train_step(lambda m, b: None), decay=0.99).applied
('train_step', 'with_ema')
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from loopkit.state import TrainState, fork, replace, replace_extras
from loopkit.steps import Metrics, UpdateStep
from loopkit.transforms._compose import refuse_wrapping, require_step

__all__ = ["EMAStep", "ema_state", "with_ema"]

_EMA = "ema/params"


def _parameters(state: TrainState) -> tuple[list[str], list[torch.Tensor]]:
    names, params = [], []
    for name, p in state.model.named_parameters():
        names.append(name)
        params.append(p.detach())
    return names, params


def _averaged(state: TrainState, decay: float) -> dict[str, torch.Tensor]:
    """The new averages after an update: ``ema + (1 - decay) * (param - ema)``, as new tensors.

    The first update copies the parameters (as ``torch.optim.swa_utils.AveragedModel`` does).
    The tensors in ``state.extras`` are never changed in place: an earlier state keeps its own.
    """
    names, params = _parameters(state)
    previous = state.extras.get(_EMA)
    if previous is None:
        return {name: p.clone() for name, p in zip(names, params)}
    ema = [previous[name] for name in names]
    return dict(zip(names, torch._foreach_lerp(ema, params, 1.0 - decay)))


@attrs.frozen(eq=False)
class EMAStep(UpdateStep):
    """The step :func:`with_ema` returns: after each optimizer update, the averages move toward the parameters.

    >>> from loopkit.steps import as_step
    >>> EMAStep(as_step(lambda s, b: (s, {})), decay=0.9).name
    'with_ema'
    """

    decay: float = 0.999

    @property
    def name(self) -> str:
        return "with_ema"

    def after_update(self, state: TrainState, metrics: Metrics) -> TrainState:
        with torch.no_grad():
            averages = _averaged(state, self.decay)
        return replace_extras(state, {**state.extras, _EMA: averages})


def with_ema(step: Any, decay: float) -> EMAStep:
    """Keep an exponential moving average of the model's parameters in ``state.extras``.

    After each optimizer update (once per group under ``with_grad_accum``; not after an
    update that ``with_nan_guard`` or float16 ``with_amp`` skipped) every parameter's
    average moves: ``ema = decay * ema + (1 - decay) * param``. The first update copies the
    parameters. This is ``torch.optim.swa_utils.AveragedModel`` with
    ``get_ema_multi_avg_fn(decay)``, the same arithmetic; buffers (BatchNorm statistics) are
    not averaged, as there. The averages are part of the state: a step stays pure (new
    tensors each update), and checkpoints carry them. :func:`ema_state` gives a state whose
    model holds the averages, to evaluate, predict or export.

    Apply it inside ``with_checkpointing`` and ``with_logging``
    (``with_checkpointing(with_ema(step, 0.999), ...)``) so that a checkpoint holds the
    averages of the update it was taken after.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_ema(train_step(lambda m, b: m(b).pow(2).mean()), decay=0.9)
    >>> for _ in range(3):
    ...     state, _ = step(state, torch.ones(4, 2))
    >>> averaged = ema_state(state)
    >>> bool(torch.equal(averaged.model.weight, state.model.weight))  # the average lags the weights
    False
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"with_ema: decay must be a number in [0, 1), e.g. 0.999, got {decay!r}")
    inner = require_step(step, "with_ema", no_eval="an evaluation step updates no parameters to average")
    refuse_wrapping(inner, "with_ema", {
        "with_ema": "the state holds one set of averages",
        "with_checkpointing": "its checkpoints would miss the averages' last update; apply with_ema first, "
        "e.g. with_checkpointing(with_ema(step, decay), directory)",
    })
    return EMAStep(inner, decay=float(decay))


def ema_state(state: TrainState) -> TrainState:
    """A new state whose model holds the moving averages of :func:`with_ema` (no optimizer).

    Buffers are the model's own; before the first update the averages are the parameters.
    ``state`` is unchanged. Use it to evaluate, predict or export the averaged weights:
    ``loopkit.evaluate(eval_step(metric_fn), ema_state(state), data)``.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> state = TrainState.create(torch.nn.Linear(2, 1))
    >>> averaged = ema_state(state)
    >>> averaged.optimizer is None, bool(torch.equal(averaged.model.weight, state.model.weight))
    (True, True)
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"ema_state: expected a loopkit.TrainState, got {type(state).__qualname__}")
    state.check_usable()
    averages = state.extras.get(_EMA)
    copy = fork(replace(state, optimizer=None, scheduler=None))
    if averages is not None:
        names, params = _parameters(copy)
        missing = [name for name in names if name not in averages]
        if missing:
            raise KeyError(f"ema_state: the state's averages have no entry for parameter '{missing[0]}'")
        with torch.no_grad():
            torch._foreach_copy_(params, [averages[name] for name in names])
    return copy
