"""``with_grad_accum``: sum gradients over ``every`` calls, then update once.

>>> from loopkit.steps import train_step
>>> with_grad_accum(train_step(lambda m, b: None), every=4).accum_every
4
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loopkit._numbers import as_int
from loopkit.steps import Step
from loopkit.transforms._compose import require_train_step

__all__ = ["with_grad_accum"]


def _schedule(every: Mapping[Any, Any]) -> tuple[tuple[int, int], ...]:
    """``{epoch: factor}`` as ascending ``(epoch, factor)`` pairs from epoch 0 (factor 1 before the first given,
    as Lightning's ``GradientAccumulationScheduler`` fills it in)."""
    if not every:
        raise ValueError("with_grad_accum: every is an empty schedule; give {epoch: factor, ...} (from epoch 0), "
                         "or an int")
    pairs = {}
    for epoch, factor in every.items():
        first, count = as_int(epoch), as_int(factor)
        if first is None or first < 0:
            raise ValueError(f"with_grad_accum: every's epochs must be ints >= 0 (0 is the first epoch), got {epoch!r}")
        if count is None or count < 1:
            raise ValueError(f"with_grad_accum: every's factors must be positive ints, got {factor!r} for epoch {first}")
        pairs[first] = count
    pairs.setdefault(0, 1)
    return tuple(sorted(pairs.items()))


def with_grad_accum(step: Any, every: int | Mapping[int, int]) -> Step:
    """Accumulate gradients over ``every`` consecutive calls as if one batch ``every`` times larger.

    Each call's loss is divided by ``every``; the optimizer, the scheduler, and
    ``state.step`` advance once per ``every`` calls, and so do the gradient transforms
    applied *outside* this one (``with_grad_clip(with_grad_accum(s))`` clips the summed
    gradient). Transforms applied *inside* (``with_grad_accum(with_grad_clip(s))``) act on
    each micro-batch's gradient. The partial sum and counter live in the state (gradients on
    the parameters, ``accum/count`` in extras), so purity and checkpoints keep them. A
    micro-batch's backward adds into that sum in place, as a raw accumulation loop does (no second
    set of gradients at its peak), so an error in it (``torch.autograd.detect_anomaly()``, a hook,
    out of memory) past a group's first micro-batch uses the state up; with a gradient transform
    inside the accumulation (``with_grad_clip``, ``with_nan_guard``, ``with_grad_norm``,
    ``with_grad_hook``), which sets the sum apart for each micro-batch anyway, the state stays whole
    (:func:`loopkit.state_at_error`); ``with_amp`` inside sets nothing apart.
    ``run_epochs`` flushes a partial group at the end of an epoch: that update uses the mean
    over the micro-batches actually seen. The flush runs no backward: a gradient transform outside
    that refuses its update (a hook's error, a raising guard) leaves the state as the flush found
    it, the group's sums kept, and a relaunch from it flushes again. A call whose ``loss_fn``
    skips its batch (returns None) takes no place in a group: a group is ``every`` batches that gave a loss, so every update
    averages ``every`` gradients. Lightning counts such a batch in its group (it steps at each
    ``every``-th batch, with the gradients of the others, each divided by ``every``), so with
    skipped batches the two update at other batches.

    ``every`` may be a schedule by epoch, ``{0: 8, 4: 4}`` (8 in epochs 0-3, then 4; 1 before
    the first epoch given), as Lightning's ``GradientAccumulationScheduler(scheduling=...)``:
    each epoch's groups use its factor, and as ``run_epochs`` flushes each epoch's last group,
    no group spans two factors (in a loop of your own, call ``step.flush(state)`` at an epoch's
    end before advancing ``state.epoch``).

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
    schedule: tuple[tuple[int, int], ...] = ()
    if isinstance(every, Mapping):
        schedule = _schedule(every)
        every_: int | None = max(factor for _, factor in schedule)
        if every_ == 1:  # (accumulating nothing in any epoch)
            schedule = ()
    else:
        every_ = as_int(every)
        if every_ is None or every_ < 1:
            raise ValueError(f"with_grad_accum: every must be a positive int or a {{epoch: factor}} schedule, got {every!r}")
    base = require_train_step(step, "with_grad_accum")
    if "with_grad_accum" in base.transforms:  # (an inner every=1 too: twice is refused, whatever the factors)
        raise TypeError("with_grad_accum cannot wrap with_grad_accum: accumulate once"
                        + ("" if schedule or base.accum_schedule else f", with every={base.accum_every * every_}"))
    return base.with_transform("with_grad_accum", accum_every=every_, accum_schedule=schedule)
