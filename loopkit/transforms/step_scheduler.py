"""``with_step_scheduler``: the state's scheduler steps after every ``frequency``-th batch's update, as Lightning's
``{"interval": "step", "frequency": n}``.

>>> from loopkit.steps import train_step
>>> with_step_scheduler(train_step(lambda m, b: None), frequency=2).applied
('train_step', 'with_step_scheduler')
"""

from __future__ import annotations

from typing import Any

import attrs

from loopkit.state import TrainState, extras_copy, replace_extras, scheduler_held, state_at_error
from loopkit.steps import Metrics, Step, WrapperStep, flush_of, run_of
from loopkit.transforms.epoch_scheduler import scheduler_of, scheduler_transform, step_quietly
from loopkit.transforms.swa import swa_start_inside

__all__ = ["StepSchedulerStep", "with_step_scheduler"]

#: the state's extras: ``{"epoch": e, "count": n}``, the batches of epoch e the inner step skipped (its loss_fn gave
#: None): with_grad_accum counts no group place for them, so neither does the schedule's count of batches
_SKIPPED = "step_scheduler/skipped"


@attrs.frozen(eq=False)
class StepSchedulerStep(WrapperStep):
    """The step :func:`with_step_scheduler` returns: the inner step runs with the scheduler held still, and the
    scheduler steps after an update whose batch is a multiple of ``frequency`` in its epoch.

    >>> from loopkit.steps import as_step
    >>> StepSchedulerStep(as_step(lambda s, b: (s, {})), frequency=2).name
    'with_step_scheduler'
    """

    frequency: int = 1
    #: the first SWA epoch of a ``with_swa`` inside (None: none), from which SWALR sets the rates: the scheduler
    #: steps in the epochs before it only, as Lightning swaps it for SWALR when that epoch starts
    swa_start: int | None = attrs.field(init=False, repr=False)

    @swa_start.default
    def _swa_start(self) -> int | None:
        return swa_start_inside(self.inner)

    @property
    def name(self) -> str:
        return "with_step_scheduler"

    @property
    def agreed_options(self) -> dict[str, Any]:
        """``frequency``: a rank whose scheduler stepped otherwise would update its replica at other learning rates
        (see :attr:`loopkit.steps.Step.rank_agreed`)."""
        return {"frequency": self.frequency}

    @property
    def changes_state(self) -> bool:  # type: ignore[override]
        return True  # it steps the state's scheduler, whatever the inner step does

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        # this call consumes the epoch's (batch_index + 1)-th batch: Lightning's batch_idx + 1 (read from the given
        # state: a step of one's own may leave the count to the driver), less the batches skipped before it
        skipped = _skipped(state)
        new, metrics = self._stepped(run_of(self.inner), state, state.batch_index + 1 - skipped, batch)
        if not metrics and new.step == state.step:  # the loss_fn skipped this batch
            extras = extras_copy(new.extras)
            extras[_SKIPPED] = {"epoch": state.epoch, "count": skipped + 1}
            new = replace_extras(new, extras)
        return new, metrics

    def flush_(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """The epoch's end (``run_epochs`` flushes there): a partial accumulation group's update is the epoch's last
        batch's in Lightning, whose ``batch_idx + 1`` is the batches consumed, ``state.batch_index``."""
        return self._stepped(flush_of(self.inner), state, state.batch_index - _skipped(state))

    def _stepped(self, call: Any, state: TrainState, consumed: int, *args: Any) -> tuple[TrainState, Metrics]:
        """``call`` on ``state`` with its scheduler held still (the inner step would step it per update), given back
        after and stepped as :meth:`_step_after` says."""
        scheduler_of(state, "with_step_scheduler")
        try:
            new, metrics = scheduler_held(call, state, *args)
        except BaseException as error:
            whole = state_at_error(error)
            if whole is not None:  # (an update done, its state whole: a logger's failed write) stepped as it would be
                self._step_after(state, whole, consumed)
            raise
        self._step_after(state, new, consumed)
        return new, metrics

    def _step_after(self, state: TrainState, new: TrainState, consumed: int) -> None:
        """Step ``new``'s scheduler if the inner call from ``state`` to ``new`` made an update and ``consumed``
        (batches of the epoch) is a multiple of ``frequency``, in an epoch before the first SWA epoch of a ``with_swa``
        inside (SWALR's schedule from there)."""
        before_swa = self.swa_start is None or state.epoch < self.swa_start
        if new.step != state.step and consumed % self.frequency == 0 and before_swa:
            step_quietly(new.scheduler)  # (quietly: a step of one's own may count an update made without the optimizer)


def _skipped(state: TrainState) -> int:
    """The batches of the state's epoch that the inner step skipped so far (see :data:`_SKIPPED`)."""
    found = state.extras.get(_SKIPPED)
    return int(found["count"]) if found is not None and int(found["epoch"]) == state.epoch else 0


def with_step_scheduler(step: Any, *, frequency: int = 1) -> Step:
    """Step the state's scheduler after an optimizer update only every ``frequency`` batches, as Lightning does with
    ``{"scheduler": ..., "interval": "step", "frequency": n}``, instead of after every update.

    The inner step runs with the scheduler held still (its state's scheduler is a
    :class:`loopkit.state.HeldScheduler`: ``step()`` does nothing, also called by a step of one's
    own); after a call that made an update (``state.step`` advanced), the scheduler steps if the
    batches consumed in the epoch (``state.batch_index`` after
    the call) are a multiple of ``frequency``, as Lightning's ``(batch_idx + 1) % frequency == 0``
    (``batch_idx`` counts from 0 within each epoch). Under ``with_grad_accum`` (apply this one around
    it) that is the batch that ends a group; the epoch's partial group, updated by the flush at the
    epoch's end (``run_epochs`` calls it), counts as the epoch's last batch, as in Lightning. So with
    an epoch length not divisible by ``frequency`` the count starts over each epoch, as there. A
    call without an update (a micro-batch, a skipped batch or update) does not step it. A batch the
    ``loss_fn`` skips (returns None) is not counted: ``with_grad_accum`` gives it no place in a group,
    so the groups' ends stay on the count's multiples (Lightning counts it, and steps the schedule
    even on it: with such batches the two step it at other updates). Nothing but
    the scheduler is kept: checkpoints resume it exactly. ``frequency=1`` is ``train_step``'s own
    stepping.

    Apply it inside ``with_checkpointing`` (whose checkpoints must see the scheduler). Around
    ``with_swa`` (``with_step_scheduler(with_swa(step, swa_lrs, swa_epoch_start=n))``, Lightning's
    ``"interval": "step"`` scheduler with ``StochasticWeightAveraging``) it steps the scheduler in the
    epochs before the first SWA epoch only: from there SWALR sets the rates, begun from the ones the
    scheduler left, as Lightning swaps the scheduler for SWALR when that epoch starts; inside
    ``with_swa`` it is refused. Refused with ``with_epoch_scheduler`` (both step the one scheduler).

    >>> import torch
    >>> from loopkit.driver import run_epochs
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
    >>> state = TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    >>> step = with_step_scheduler(train_step(lambda m, b: m(b).pow(2).mean()), frequency=2)
    >>> state, _ = run_epochs(step, state, [torch.ones(4, 2)] * 5, epochs=2, progress=False)
    >>> state.scheduler.last_epoch  # after batches 2 and 4 of each epoch: 4 steps for 10 updates
    4
    """
    inner, count = scheduler_transform(step, "with_step_scheduler", frequency, "batches", "with_epoch_scheduler")
    return StepSchedulerStep(inner, frequency=count)
