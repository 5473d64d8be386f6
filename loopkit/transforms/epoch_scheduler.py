"""``with_epoch_scheduler``: the state's scheduler steps once per epoch, as Lightning's default ``"interval": "epoch"``.

>>> from loopkit.steps import train_step
>>> with_epoch_scheduler(train_step(lambda m, b: None)).applied
('train_step', 'with_epoch_scheduler')
"""

from __future__ import annotations

import warnings
from typing import Any

import attrs

from loopkit._numbers import as_int
from loopkit.state import TrainState, extras_copy, leave_intact, replace_extras, scheduler_held
from loopkit.steps import Metrics, Step, WrapperStep, flush_of, run_of
from loopkit.transforms._compose import refuse_wrapping, require_step
from loopkit.transforms.swa import swa_start_inside

__all__ = [
    "EpochSchedulerStep", "scheduler_of", "scheduler_transform", "step_quietly", "with_epoch_scheduler",
]

#: the state's extras: how many epochs' ends the scheduler has seen
_EPOCHS = "epoch_scheduler/epochs"


@attrs.frozen(eq=False)
class EpochSchedulerStep(WrapperStep):
    """The step :func:`with_epoch_scheduler` returns: the inner step runs with the scheduler held still, and the
    scheduler steps at each epoch's end (every ``frequency`` epochs).

    >>> from loopkit.steps import as_step
    >>> EpochSchedulerStep(as_step(lambda s, b: (s, {})), frequency=2).name
    'with_epoch_scheduler'
    """

    frequency: int = 1
    #: the first SWA epoch of a ``with_swa`` inside (None: none), from which SWALR sets the rates: the scheduler
    #: steps at the ends of the epochs before it only, as Lightning swaps it for SWALR when that epoch starts
    swa_start: int | None = attrs.field(init=False, repr=False)

    @swa_start.default
    def _swa_start(self) -> int | None:
        return swa_start_inside(self.inner)

    @property
    def name(self) -> str:
        return "with_epoch_scheduler"

    @property
    def agreed_options(self) -> dict[str, Any]:
        """``frequency``: a rank whose scheduler stepped otherwise would update its replica at other learning rates
        (see :attr:`loopkit.steps.Step.rank_agreed`)."""
        return {"frequency": self.frequency}

    @property
    def changes_state(self) -> bool:  # type: ignore[override]
        return True  # it steps the state's scheduler, whatever the inner step does

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        state = self._caught_up(state, state.epoch)  # (a loop of one's own that did not flush the last epoch)
        return self._held(run_of(self.inner), state, batch)

    def flush_(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """The epoch's end (``run_epochs`` flushes there): after the inner flush's update, the scheduler's step."""
        state = self._caught_up(state, state.epoch)
        new, metrics = self._held(flush_of(self.inner), state)
        return self._caught_up(new, new.epoch + 1), metrics

    def _caught_up(self, state: TrainState, finished: int) -> TrainState:
        """``state`` with the scheduler stepped for the ends of epochs up to ``finished`` (those not stepped yet), and
        none from the first SWA epoch of a ``with_swa`` inside on (SWALR's schedule then)."""
        scheduler = scheduler_of(state, "with_epoch_scheduler", " at each epoch's end")
        if self.swa_start is not None:
            finished = min(finished, self.swa_start)
        recorded = state.extras.get(_EPOCHS)
        if recorded is not None and int(recorded) >= finished:  # (stepped for this epoch's end already: a flushed
            return state  # state flushed again, as a relaunch from a checkpoint of the flush's update does)
        # (a state from before this transform: its scheduler is where it is, for its epoch)
        done = finished if recorded is None else int(recorded)
        step_quietly(scheduler, finished // self.frequency - done // self.frequency)
        extras = extras_copy(state.extras)
        extras[_EPOCHS] = finished
        return replace_extras(state, extras)

    def _held(self, call: Any, state: TrainState, *args: Any) -> tuple[TrainState, Metrics]:
        return scheduler_held(call, state, *args)


def scheduler_of(state: TrainState, name: str, when: str = "") -> Any:
    """The state's scheduler, which transform ``name`` steps (``when``); a state without one refused, left whole.

    >>> import torch
    >>> model = torch.nn.Linear(1, 1)
    >>> scheduler_of(TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1)), "with_epoch_scheduler")
    Traceback (most recent call last):
    ...
    ValueError: with_epoch_scheduler: the state has no scheduler to step; create the state with one, TrainState.create(model, optimizer, scheduler)
    """
    if state.scheduler is None:
        raise leave_intact(ValueError(
            f"{name}: the state has no scheduler to step{when}; create the state with one, "
            "TrainState.create(model, optimizer, scheduler)"), state)
    return state.scheduler


def step_quietly(scheduler: Any, times: int = 1) -> None:
    """``scheduler.step()`` ``times`` times (none when not positive), without torch's warning that it stepped before
    the optimizer: a scheduler transform's step after an epoch or a count of batches without an update of its own, or
    after a step of one's own that updated without ``optimizer.step()``.

    >>> import torch
    >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    >>> step_quietly(scheduler, 2); opt.param_groups[0]["lr"]
    0.25
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        for _ in range(max(times, 0)):
            scheduler.step()


def scheduler_transform(step: Any, name: str, frequency: Any, unit: str, rival: str) -> tuple[Any, int]:
    """The inner step and the frequency of scheduler transform ``name`` (counting ``unit``), checked: a positive int,
    an inner train step, and no transform around it that steps the state's scheduler (``rival``, the other scheduler
    transform) or checkpoints the state while it is held. (A ``with_swa`` inside is taken: ``name`` stops stepping at
    its first SWA epoch.)

    >>> from loopkit.steps import train_step
    >>> scheduler_transform(train_step(lambda m, b: None), "with_epoch_scheduler", 0, "epochs", "with_step_scheduler")
    Traceback (most recent call last):
    ...
    ValueError: with_epoch_scheduler: frequency must be a positive int (epochs), got 0
    """
    inner = require_step(step, name, no_eval="an evaluation step has no schedule")
    count = as_int(frequency)
    if count is None or count < 1:
        raise ValueError(f"{name}: frequency must be a positive int ({unit}), got {frequency!r}")
    refuse_wrapping(inner, name, {
        name: f"the state has one scheduler, which one {name} steps",
        rival: "both step the state's one scheduler; use one of them",
        "with_checkpointing": f"{name} hands its inner step the state with its scheduler held still, stepped "
        f"after, so those checkpoints would not resume exactly; apply it first, with_checkpointing({name}(step), "
        "directory)",
    })
    return inner, count


def with_epoch_scheduler(step: Any, *, frequency: int = 1) -> Step:
    """Step the state's scheduler once per epoch, at its end, as Lightning does with its default
    ``{"scheduler": ..., "interval": "epoch", "frequency": n}``, instead of once per optimizer update.

    The inner step runs with the scheduler held still (its state's scheduler is a
    :class:`loopkit.state.HeldScheduler`: ``step()`` does nothing, also called by a step of one's
    own); at each epoch's end (``run_epochs`` flushes the step there, after the epoch's last
    update) the scheduler steps if the epochs done are a
    multiple of ``frequency``, as Lightning's ``(current_epoch + 1) % frequency == 0``. So epoch ``e``
    trains at the rate after ``e // frequency`` steps: ``StepLR(opt, step_size=30)`` counts epochs, as
    it does in Lightning. An epoch cut short (``max_steps``, a stop) does not step it, as in
    Lightning. It steps after the epoch's last update's callbacks (and a step validation on that
    update), which still see the epoch's rate; Lightning steps it before them. In a loop of one's own, call ``step.flush(state)`` at each epoch's end before advancing
    ``state.epoch``, or the first call of the next epoch steps it. How many epochs it has stepped for
    is kept in ``state.extras`` (``epoch_scheduler/epochs``): checkpoints resume it exactly.

    ``ReduceLROnPlateau`` steps on a metric: see the guide's callback for it. Apply it inside
    ``with_checkpointing`` (whose checkpoints must see the scheduler). Around ``with_swa``
    (``with_epoch_scheduler(with_swa(step, swa_lrs, swa_epoch_start=n))``, Lightning's
    ``[opt], [scheduler]`` with ``StochasticWeightAveraging``) it steps the scheduler at the ends of
    the epochs before the first SWA epoch only: from there SWALR sets the rates, begun from the ones
    the scheduler left, as Lightning swaps the scheduler for SWALR when that epoch starts; inside
    ``with_swa`` it is refused. Refused with ``with_step_scheduler`` (both step the one scheduler).

    >>> import torch
    >>> from loopkit.driver import run_epochs
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
    >>> state = TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1))
    >>> step = with_epoch_scheduler(train_step(lambda m, b: m(b).pow(2).mean()))
    >>> state, _ = run_epochs(step, state, [torch.ones(4, 2)] * 3, epochs=3, progress=False)
    >>> round(state.optimizer.param_groups[0]["lr"], 6)  # stepped after each epoch: 1.0, 1.0, 0.1, then 0.1
    0.1
    """
    inner, count = scheduler_transform(step, "with_epoch_scheduler", frequency, "epochs", "with_step_scheduler")
    return EpochSchedulerStep(inner, frequency=count)
