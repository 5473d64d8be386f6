"""``with_grad_accum``: sum gradients over ``every`` calls, then update once.

>>> from loopkit.steps import train_step
>>> with_grad_accum(train_step(lambda m, b: None), every=4).accum_every
4
"""

from __future__ import annotations

from typing import Any

from loopkit._numbers import as_int
from loopkit.steps import TrainStep
from loopkit.transforms._compose import require_train_step

__all__ = ["with_grad_accum"]


def with_grad_accum(step: Any, every: int) -> TrainStep:
    """Accumulate gradients over ``every`` consecutive calls as if one batch ``every`` times larger.

    Each call's loss is divided by ``every``; the optimizer, the scheduler, and
    ``state.step`` advance once per ``every`` calls, and so do the gradient transforms
    applied *outside* this one (``with_grad_clip(with_grad_accum(s))`` clips the summed
    gradient). Transforms applied *inside* (``with_grad_accum(with_grad_clip(s))``) act on
    each micro-batch's gradient. The partial sum and counter live in the state (gradients on
    the parameters, ``accum/count`` in extras), so purity and checkpoints keep them.
    ``run_epochs`` flushes a partial group at the end of an epoch: that update uses the mean
    over the micro-batches actually seen.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_grad_accum(train_step(lambda m, b: m(b).pow(2).mean()), every=2)
    >>> state, _ = step(state, torch.ones(3, 2)); state.step
    0
    >>> state, _ = step(state, torch.ones(3, 2)); state.step
    1
    """
    if callable(every) and not callable(step):
        raise TypeError("with_grad_accum: the step comes first: with_grad_accum(step, every=n)")
    every_ = as_int(every)
    if every_ is None or every_ < 1:
        raise ValueError(f"with_grad_accum: every must be a positive int, got {every!r}")
    every = every_
    base = require_train_step(step, "with_grad_accum")
    if base.accum_every > 1:
        raise TypeError(
            f"with_grad_accum cannot wrap with_grad_accum: accumulate once, with every={base.accum_every * every}"
        )
    return base.with_transform("with_grad_accum", accum_every=every)
