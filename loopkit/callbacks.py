"""Callbacks: objects whose hooks ``run_epochs`` calls at documented points.

Every hook is optional; a callback need not subclass :class:`Callback`. The driver calls:

========================================  ===================================================
hook                                      when
========================================  ===================================================
``on_fit_start(state)``                   once, before sanity validation and training
``on_epoch_start(state)``                 before the first batch of each epoch
``on_batch_start(state, batch)``          before each training step, with the batch it is given
                                          (on the step's device); Lightning's
                                          ``on_train_batch_start``; returns None (a value, as
                                          Lightning's -1 that skips the rest of the epoch, is
                                          refused before the update: set ``should_stop``, or
                                          pass ``limit_train_batches``)
``on_batch_end(state, metrics)``          after each training step; metrics are device tensors;
                                          may return a dict of numbers (or 1-element
                                          tensors, read only when logged), which
                                          ``with_logging`` writes after an update, at its
                                          ``every_n_steps`` (returns other than a dict are
                                          ignored; a dict holding anything else is refused)
``on_flush_end(state, metrics)``          after the update ``run_epochs`` makes at an epoch's end
                                          for a partial accumulation group (``with_grad_accum``'s
                                          flush, after the last batch's ``on_batch_end``); may
                                          return scalars for the loggers, as ``on_batch_end``
``on_validation_end(state, metrics)``     after each (non-sanity) validation, ``val/...`` floats;
                                          may return a dict of numbers named ``val/<name>`` (a
                                          metric over the whole validation set: AUROC, F1) added
                                          to the metrics, which
                                          the callbacks after it, the loggers, a checkpoint's
                                          ``monitor`` and the history then see
``on_epoch_end(state, metrics)``          after each epoch (and its validation); may return a
                                          dict of extra floats to record in the history
``on_fit_end(state, history)``            once, after training
========================================  ===================================================

A callback with ``set_log_interval(every_n_steps)`` is told, before ``on_fit_start``, the ``every_n_steps`` of the
step's ``with_logging`` (None without one), as Lightning's callbacks read ``trainer.log_every_n_steps``:
``LearningRateMonitor("step")`` reads the rates at those updates only.

A callback that sets ``should_stop = True`` ends training after the current hook (once
``run_epochs``' ``min_epochs``/``min_steps`` are met, unless the callback's
``stops_before_minimum`` is True, as ``loopkit.tune.PruningCallback``'s is); a stop asked at an
epoch's last update (its last ``on_batch_end``, its ``on_flush_end``) still gets that epoch's
validation, as Lightning's ``should_stop`` does. Under DDP the ranks agree on the stop (one all-reduce and a read)
after each batch when any rank has a batch hook (``on_batch_start``/``on_batch_end``) that may ask: a callback
whose class sets ``never_stops = True`` (:class:`LearningRateMonitor`, ``ThroughputMonitor``) declares that its
batch hooks set no ``should_stop``, its own or another callback's, and makes no such vote (a subclass's own batch
hooks may ask again). Asked in ``on_epoch_start``, no batch of that epoch
is trained and, unlike Lightning (whose ``on_train_epoch_end`` still runs for the empty epoch, which
it counts finished), no ``on_epoch_end`` is called for it nor record made: the epoch is not counted
done (``state.epoch`` stays at it), and the state keeps the callbacks' counters from before that
``on_epoch_start``: a run resumed from it calls it for the epoch once more and ends with the uninterrupted
run's counters. The ``state`` a hook is handed shares the model and optimizer
with the fit's later states: once the fit trains on (its next step, or an epoch's flush), a state
a callback kept is used up (using it raises ``loopkit.DonatedStateError``), never holding weights
of later updates; keep ``copy.deepcopy(state)`` for a snapshot. A callback
with ``state_dict()`` and ``load_state_dict(d)`` (numbers, strings and tensors) has its counters
kept in ``state.extras["callbacks/<state_key or class name>"]`` at each epoch's start, after
each validation and epoch, and after the hooks of a batch whose update has a step checkpoint due
(before the step hears of them, so checkpoints hold them), and loaded
back (after ``on_fit_start``) when ``run_epochs`` starts from a state that has them: a run
resumed from a checkpoint continues the patience count.

>>> stopper = EarlyStopping("val/loss", patience=1)
>>> stopper.on_validation_end(None, {"val/loss": 1.0}); stopper.should_stop
False
>>> stopper.on_validation_end(None, {"val/loss": 2.0}); stopper.should_stop
True
"""

from __future__ import annotations

import datetime
import enum
import functools
import math
import numbers
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from loopkit._numbers import as_int, as_real
from loopkit import _collective
from loopkit._collective import is_rank_zero
from loopkit.progress import write_line
from loopkit.state import TrainState
from loopkit.steps import owed_hooks

__all__ = ["Callback", "EarlyStopping", "EarlyStoppingReason", "LearningRateMonitor", "MonitorCallback", "Timer", "may_change_state_early"]


class Callback:
    """A base with every hook as a no-op; subclass and override what you need.

    A hook under Lightning's name (``on_train_epoch_end``, ``on_train_batch_end``, ``on_train_start``,
    ``on_validation_epoch_end``, ``setup(trainer, pl_module, stage)``, ``on_exception``, ``on_save_checkpoint``,
    ... every hook of Lightning 2.6.6's ``Callback`` but the ones that share loopkit's names) is never called by
    loopkit. So that a callback ported by changing its base does not lose such a hook silently, ``run_epochs``
    (and ``loopkit.tune.fit``) refuses, when the fit starts and before anything changes, a callback whose
    class (or the object itself) defines one, naming each with the loopkit hook to rename it to
    (``on_train_epoch_end -> on_epoch_end``) or saying that none exists. Hooks inherited from this class or
    from a Lightning base class (one from the ``lightning``/``pytorch_lightning``/``lightning_fabric`` packages) are
    not the callback's own and are not counted. A callback of Lightning's own (``EarlyStopping``, ``ModelCheckpoint``,
    ``LearningRateMonitor``, ...), or one deriving from a Lightning class, is refused too, naming loopkit's
    counterpart (:class:`EarlyStopping`, ``with_checkpointing``, :class:`LearningRateMonitor`, :class:`Timer`,
    ``with_swa``, ``with_pruning``, ``with_grad_accum``, ``summarize``, ...): its hooks take
    ``(trainer, pl_module)``; a subclass of this class that puts it ahead of the Lightning base
    (``class C(loopkit.Callback, L.Callback)``: loopkit's hooks are the ones called) is taken. One exception to the
    refusal of Lightning-named hooks and bases: a callback written for both trainers, whose class
    defines, besides each Lightning-named hook that has a loopkit counterpart, that counterpart too (and has
    one such pair at least, e.g. ``on_train_epoch_end`` and ``on_epoch_end``), runs, with a ``UserWarning``
    naming the Lightning-named hooks loopkit will not call. Lightning's Trainer calls every hook of its
    ``Callback``, so such a callback subclasses it, ahead of this class if at all (``class C(L.Callback)``;
    with this class ahead, the Trainer calls :meth:`on_fit_start` with ``(trainer, pl_module)`` and fails).
    loopkit never calls a hook a Lightning class defines, those under loopkit's names included (Lightning's
    ``on_fit_start``, ``on_fit_end``, ``on_validation_end``, ``state_dict``, ``load_state_dict``); a loopkit hook
    of the callback's own that takes Lightning's ``(trainer, pl_module)`` is refused when the fit starts, and so is a
    hook that is not callable or cannot take the arguments above (``on_epoch_end(self, state)``), by its signature.

    >>> class Counter(Callback):
    ...     def __init__(self):
    ...         self.batches = 0
    ...     def on_batch_end(self, state, metrics):
    ...         self.batches += 1
    >>> Counter().should_stop
    False
    """

    should_stop: bool = False
    #: its ``should_stop`` ends the fit even before ``run_epochs``' ``min_epochs``/``min_steps`` are met
    stops_before_minimum: bool = False
    #: its ``on_batch_start``/``on_batch_end`` never set a ``should_stop`` (its own or another callback's): under DDP
    #: ``run_epochs`` makes no per-batch vote on the stop for them (see :func:`_never_stops`)
    never_stops: bool = False

    def on_fit_start(self, state: Any) -> None:
        """Once, before sanity validation and the first step, with the state the fit trains."""

    def on_epoch_start(self, state: Any) -> None:
        """Before each epoch's first batch (``state.batch_index`` > 0 in a run resumed mid-epoch)."""

    def on_batch_start(self, state: Any, batch: Any) -> None:
        """Before each train step, with the state and the batch it is given (moved to the step's device).

        Returns None: ``run_epochs`` refuses a value (Lightning's ``on_train_batch_start`` returns -1 to skip the rest
        of the epoch, which loopkit does not do) with a ``ValueError`` before the batch's update."""

    def on_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> Mapping[str, float | torch.Tensor] | None:
        """After each train step, with its state and metrics (device tensors: reading one syncs).

        May return a dict of numbers (or 1-element tensors) for ``with_logging``'s loggers; setting ``should_stop``
        stops the fit after this batch."""

    def on_flush_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> Mapping[str, float | torch.Tensor] | None:
        """After the update a partial accumulation group makes at an epoch's end (``with_grad_accum``'s flush, which
        no batch's ``on_batch_end`` sees), with its state and metrics; may return numbers for the loggers."""

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> Mapping[str, float | torch.Tensor] | None:
        """After each validation (not the sanity one), with its ``val/...`` means; may return more ``val/<name>``
        numbers or 0-dim tensors (a metric over the whole validation set)."""

    def on_epoch_end(self, state: Any, metrics: Mapping[str, float]) -> Mapping[str, float | torch.Tensor] | None:
        """After each epoch, with its history record; a returned dict of numbers (or 0-dim tensors, read then) joins
        the record."""
        return None

    def on_fit_end(self, state: Any, history: list[dict[str, float]]) -> None:
        """Once, when the fit ends (a graceful stop included), with the final state and the history."""


#: the hooks that may run before ``run_epochs``' first step (and so change the state before it)
_EARLY_HOOKS = ("on_fit_start", "on_epoch_start", "on_batch_start", "on_validation_end")
_LIGHTNING_PACKAGES = ("lightning", "pytorch_lightning", "lightning_fabric")  # told by module name, never imported


def _from_lightning(cls: type | None) -> bool:
    """Whether the class ``cls`` is defined in a Lightning package (told by its module's name)."""
    return cls is not None and str(getattr(cls, "__module__", "")).split(".")[0] in _LIGHTNING_PACKAGES


def _loopkit_hook(callback: Any, name: str) -> Any:
    """The hook ``name`` that ``run_epochs`` calls on ``callback`` (its attribute of that name), or None: it has
    none, or the one it has is inherited from a class of a Lightning package. Lightning's ``Callback`` defines
    ``on_fit_start``, ``on_fit_end``, ``on_validation_end`` (taking ``(trainer, pl_module)``), ``state_dict`` and
    ``load_state_dict`` under loopkit's names: a callback written for both trainers subclasses it, and loopkit
    calls only the hooks of its own.

    >>> _loopkit_hook(Callback(), "on_fit_start") is not None, _loopkit_hook(Callback(), "on_train_start")
    (True, None)
    """
    if name not in getattr(callback, "__dict__", {}):  # (one set on the object itself is its own)
        owner = next((c for c in type(callback).__mro__ if name in c.__dict__), None)
        if _from_lightning(owner):
            return None
    return getattr(callback, name, None)


def _declared_by(callback: Any, flag: str) -> type | None:
    """The class of ``callback``'s that declares ``flag`` (``reads_only``, ``batch_end_unused``, ``never_stops``)
    where the flag reads ``True`` (a real bool: a ``unittest.mock.MagicMock``'s made-up attribute is no such flag),
    else None.

    >>> from unittest import mock
    >>> _declared_by(LearningRateMonitor(), "never_stops").__name__, _declared_by(mock.MagicMock(), "never_stops")
    ('LearningRateMonitor', None)
    """
    if getattr(callback, flag, False) is not True:
        return None
    return next((c for c in type(callback).__mro__ if flag in c.__dict__), None)


def may_change_state_early(callback: Any) -> bool:
    """Whether ``callback`` has a hook that runs before the first step and may change the model or optimizer
    in place (a learning rate set in ``on_fit_start``); loopkit's own callbacks only read.

    >>> may_change_state_early(EarlyStopping("val/loss")), may_change_state_early(Callback())
    (False, False)
    """
    owner = _declared_by(callback, "reads_only")
    if owner is not None:
        if all(getattr(type(callback), hook, None) is getattr(owner, hook, None) for hook in _EARLY_HOOKS):
            return False  # (a subclass's own early hooks are judged as any callback's)
    return any(
        getattr(type(callback), hook, None) is not getattr(Callback, hook) or hook in getattr(callback, "__dict__", {})
        for hook in _EARLY_HOOKS if _loopkit_hook(callback, hook) is not None
    )


def _batch_end_unused(callback: Any) -> bool:
    """Whether ``callback``'s ``on_batch_end`` does nothing under its current settings, so that ``run_epochs`` need
    not call it after each batch: its ``batch_end_unused`` says so (a per-epoch :class:`LearningRateMonitor`, a
    :class:`Timer` per epoch or without a duration), and its ``on_batch_end`` is the one of the class that defines
    that flag (a subclass's own ``on_batch_end``, or one set on the object, is called as any callback's).

    >>> class Counting(LearningRateMonitor):
    ...     def on_batch_end(self, state, metrics):
    ...         pass
    >>> _batch_end_unused(LearningRateMonitor()), _batch_end_unused(Counting()), _batch_end_unused(Timer(60))
    (True, False, False)
    """
    owner = _declared_by(callback, "batch_end_unused")
    if owner is None or "on_batch_end" in getattr(callback, "__dict__", {}):
        return False
    return getattr(type(callback), "on_batch_end", None) is getattr(owner, "on_batch_end", None)


#: the hooks ``run_epochs`` calls at each batch
_BATCH_HOOKS = ("on_batch_start", "on_batch_end")


def _never_stops(callback: Any) -> bool:
    """Whether ``callback``'s batch hooks never ask to stop, so that under DDP ``run_epochs`` need not make a vote on
    ``should_stop`` after each batch for them: its ``never_stops`` says so (:class:`LearningRateMonitor`,
    ``ThroughputMonitor``; not :class:`Timer`, which stops), and its batch hooks are the ones of the class that
    declares that flag (a subclass's own ``on_batch_start``/``on_batch_end``, or one set on the object, may set
    ``should_stop``: it is voted on as any callback's).

    >>> class Stopping(LearningRateMonitor):
    ...     def on_batch_end(self, state, metrics):
    ...         self.should_stop = True
    >>> _never_stops(LearningRateMonitor("step")), _never_stops(Stopping("step")), _never_stops(Timer(60))
    (True, False, False)
    """
    owner = _declared_by(callback, "never_stops")
    if owner is None or any(h in getattr(callback, "__dict__", {}) for h in _BATCH_HOOKS):
        return False
    return all(getattr(type(callback), hook, None) is getattr(owner, hook, None) for hook in _BATCH_HOOKS)


class MonitorCallback(Callback):
    """Base of callbacks that watch one metric: :meth:`check` gets its value after each
    validation for a ``val/...`` metric, after each epoch for any other (``train/loss``).

    >>> class Seen(MonitorCallback):
    ...     def check(self, state, value):
    ...         print(value)
    >>> Seen("train/loss").on_epoch_end(None, {"train/loss": 0.5})
    0.5
    """

    def __init__(self, monitor: str) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"{type(self).__name__}: monitor must be a metric name such as 'val/loss', got {monitor!r}")
        self.monitor = monitor

    def check(self, state: Any, value: float) -> None:
        """React to the monitored metric's latest value."""

    #: False: a missing monitor skips the check (Lightning's ``strict=False``) where it raises ``KeyError``
    strict: bool = True

    def _watch(self, state: Any, metrics: Mapping[str, float]) -> None:
        if self.monitor not in metrics:
            message = f"{type(self).__name__}: monitor '{self.monitor}' is not among the metrics {sorted(metrics)}"
            if self.strict:
                raise KeyError(message)
            if getattr(self, "verbose", False):
                warnings.warn(message + " (strict=False: not checked)", RuntimeWarning, stacklevel=3)
            return
        self.check(state, float(metrics[self.monitor]))

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        """Check a ``val/...`` monitor after each validation."""
        if self.monitor.startswith("val/"):
            self._watch(state, metrics)

    def on_epoch_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        """Check any other monitor (``train/loss``) after each epoch, in its history record."""
        # an epoch without a step of its own (a run resumed at its very end from a checkpoint
        # without the epoch's means) has no train/ means to check
        if not self.monitor.startswith("val/") and any(k.startswith("train/") for k in metrics):
            self._watch(state, metrics)


class EarlyStoppingReason(enum.Enum):
    """Why an :class:`EarlyStopping` asked to stop (Lightning 2.6's enum of that name).

    >>> EarlyStopping("val/loss").stopping_reason
    <EarlyStoppingReason.NOT_STOPPED: 0>
    """

    NOT_STOPPED = 0
    STOPPING_THRESHOLD = 1
    DIVERGENCE_THRESHOLD = 2
    PATIENCE_EXHAUSTED = 3
    NON_FINITE_METRIC = 4


class EarlyStopping(MonitorCallback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` checks.

    A ``val/...`` metric is checked after each validation, any other (``train/loss``) after
    each epoch. A NaN or infinite value stops at once (and leaves ``best`` and ``wait`` as
    they were; with ``check_finite=False`` a NaN counts as no improvement and an infinite value is
    compared as any other, as in Lightning). ``mode`` is
    ``"min"`` or ``"max"``. As Lightning's options of those names: ``stopping_threshold`` stops
    at once when the value is better than it (the goal is reached), ``divergence_threshold``
    when the value is worse than it (no hope left); neither changes ``best`` or ``wait``.

    "Improved" is decided as Lightning's ``EarlyStopping`` decides it, in float32 as its
    logged metrics are: the value is rounded to float32 and, in float32 arithmetic,
    ``value + min_delta < best`` (``"min"``) or ``value - min_delta > best`` (``"max"``);
    an improvement then makes the value (its float32 rounding) the new ``best``. So a
    change of nominally ``min_delta`` (1.0 then 0.9 with ``min_delta=0.1``) counts as an
    improvement exactly when it does in Lightning (here it does not: in float32,
    0.9 + 0.1 is 1.0). The metrics reach the callback as Python floats, so this costs no
    device sync. (A metric Lightning logs in float64 it compares in float64; loopkit's
    callbacks see Python floats and always use float32.) A negative ``min_delta`` is a tolerance, as
    in Lightning: a value up to ``-min_delta`` worse than ``best`` still counts as an improvement
    (and becomes ``best``).

    >>> stopper = EarlyStopping("train/loss", patience=2, mode="min", min_delta=0.1)
    >>> for loss in (1.0, 0.95, 0.92):
    ...     _ = stopper.on_epoch_end(None, {"train/loss": loss})
    >>> stopper.should_stop, stopper.best
    (True, 1.0)
    >>> stopper = EarlyStopping("val/loss", patience=1, min_delta=0.1)
    >>> stopper.on_validation_end(None, {"val/loss": 1.0})
    >>> stopper.on_validation_end(None, {"val/loss": 0.9}); stopper.should_stop
    True
    """

    #: its hooks read the metrics and the state, and change neither (see :func:`may_change_state_early`)
    reads_only = True

    def __init__(
        self,
        monitor: str,
        patience: int = 3,
        mode: str = "min",
        min_delta: float = 0.0,
        *,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        verbose: bool = False,
        strict: bool = True,
        log_rank_zero_only: bool = False,
    ) -> None:
        for name, flag in (("verbose", verbose), ("strict", strict), ("log_rank_zero_only", log_rank_zero_only)):
            if not isinstance(flag, bool):
                raise TypeError(f"EarlyStopping: {name} must be True or False, got {flag!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        patience_, min_delta_ = as_int(patience), as_real(min_delta)
        if patience_ is None or patience_ < 0:  # (0, as in Lightning: stop at the first check without improvement)
            raise ValueError(f"EarlyStopping: patience must be an int >= 0, got {patience!r}")
        if min_delta_ is None or not math.isfinite(min_delta_):  # (< 0, as in Lightning: a tolerance of a worse value)
            raise ValueError(f"EarlyStopping: min_delta must be a finite number, got {min_delta!r}")
        patience, min_delta = patience_, min_delta_
        if not isinstance(check_finite, bool):
            raise TypeError(f"EarlyStopping: check_finite must be True or False, got {check_finite!r}")
        for name, value in (("stopping_threshold", stopping_threshold), ("divergence_threshold", divergence_threshold)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value):
                raise ValueError(f"EarlyStopping: {name} must be a number or None, got {value!r}")
        super().__init__(monitor)
        self.patience = patience
        self.mode = mode
        self.min_delta = float(min_delta)
        self.check_finite = check_finite
        self.stopping_threshold = None if stopping_threshold is None else float(stopping_threshold)
        self.divergence_threshold = None if divergence_threshold is None else float(divergence_threshold)
        self.verbose, self.strict, self.log_rank_zero_only = verbose, strict, log_rank_zero_only
        self._reset()

    def _reset(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.wait = 0
        self.should_stop = False
        #: the epoch (from 0) of the last check that asked to stop (under ``min_epochs``/``min_steps``, which hold
        #: the stop off, the epoch the fit stopped at): an epoch-end check's is the epoch just finished (the state's
        #: ``epoch`` counts it done already), a step validation's the epoch it ran in; None until it asks
        self.stopped_at: int | None = None
        #: why it asked to stop, as Lightning 2.6's ``stopping_reason`` and ``stopping_reason_message``
        self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
        self.stopping_reason_message: str | None = None

    def on_fit_start(self, state: Any) -> None:
        """Start each fit afresh: one instance reused for the next fold or trial must not stop it at once.
        A resumed run's counters come back from ``state.extras`` right after (``run_epochs`` kept them there)."""
        self._reset()

    def _improved(self, current: torch.Tensor) -> bool:
        # Lightning's rule (EarlyStopping._evaluate_stopping_criteria): monitor_op(current - min_delta, best),
        # min_delta negated for "min", all in float32 0-dim tensors (on the CPU: no device sync); ``best``
        # is a float32 value but for one loaded from an older checkpoint, rounded here as Lightning's was
        best = torch.tensor(self.best, dtype=torch.float32, device="cpu")
        if self.mode == "min":
            return bool(torch.lt(current - (-self.min_delta), best))
        return bool(torch.gt(current - self.min_delta, best))

    def check(self, state: Any, value: float) -> None:
        """Count ``value`` (a check of the monitored metric) as an improvement or not, and stop when
        ``patience`` checks in a row were none, or at once when it is not finite (in float32).

        >>> stopper = EarlyStopping("val/acc", patience=1, mode="max", min_delta=0.1)
        >>> stopper.check(None, 0.0); stopper.check(None, 0.1); stopper.should_stop
        True
        """
        current = torch.tensor(value, dtype=torch.float32, device="cpu")  # as Lightning's logged float32 metric
        better = torch.lt if self.mode == "min" else torch.gt  # (Lightning's monitor_op; thresholds in float32 too)
        sign = "<" if self.mode == "min" else ">"
        stop = None  # (reason, message) of a stop asked now
        message = None
        if self.check_finite and not torch.isfinite(current):
            stop = (EarlyStoppingReason.NON_FINITE_METRIC, f"Monitored metric {self.monitor} = {current} is not finite. "
                    f"Previous best value was {self.best:.3f}. Signaling Trainer to stop.")
        elif self.stopping_threshold is not None and bool(better(current, self.stopping_threshold)):
            stop = (EarlyStoppingReason.STOPPING_THRESHOLD, f"Stopping threshold reached: {self.monitor} = {current} "
                    f"{sign} {self.stopping_threshold}. Signaling Trainer to stop.")
        elif self.divergence_threshold is not None and bool(better(-current, -self.divergence_threshold)):
            stop = (EarlyStoppingReason.DIVERGENCE_THRESHOLD, f"Divergence threshold reached: {self.monitor} = "
                    f"{current} {sign} {self.divergence_threshold}. Signaling Trainer to stop.")
        elif self._improved(current):
            if math.isfinite(self.best):
                message = (f"Metric {self.monitor} improved by {abs(self.best - float(current)):.3f} >= min_delta = "
                           f"{abs(self.min_delta)}. New best score: {float(current):.3f}")
            else:
                message = f"Metric {self.monitor} improved. New best score: {float(current):.3f}"
            self.best, self.wait = float(current), 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                stop = (EarlyStoppingReason.PATIENCE_EXHAUSTED, f"Monitored metric {self.monitor} did not improve in "
                        f"the last {self.wait} records. Best score: {self.best:.3f}. Signaling Trainer to stop.")
            # (asked, it stays asked: Lightning's trainer.should_stop, which a fit's min_epochs/min_steps hold
            # off, is not taken back by an improvement)
        if stop is not None:  # (each check that asks, as Lightning's: one held off by min_epochs is not where it
            self.should_stop = True  # stopped, the last one is)
            self.stopping_reason, message = stop
            self.stopping_reason_message = message
            self.stopped_at = _epoch_checked(state)
        if message is not None and self.verbose:
            self._say(message)

    def stop_record(self) -> tuple[int | None, int, str | None]:
        """Why it asked to stop (``stopped_at``, the reason's value, its message): what ``run_epochs`` hands the other
        ranks' copies under DDP (see :meth:`stop_agreed`).

        >>> EarlyStopping("val/loss").stop_record()
        (None, 0, None)
        """
        return self.stopped_at, self.stopping_reason.value, self.stopping_reason_message

    def stop_agreed(self, state: Any, record: tuple[int | None, int, str | None] | None) -> None:
        """Stop as another rank's copy asked to (``record``: its :meth:`stop_record`), as Lightning's ``EarlyStopping``
        reduces its decision over the ranks: every rank's copy then says it stopped, and why.

        >>> stopper = EarlyStopping("val/loss")
        >>> stopper.stop_agreed(None, (2, EarlyStoppingReason.PATIENCE_EXHAUSTED.value, "no better"))
        >>> stopper.should_stop, stopper.stopped_epoch, stopper.stopping_reason.name
        (True, 2, 'PATIENCE_EXHAUSTED')
        """
        self.should_stop = True
        if record is None:
            record = (_epoch_checked(state), EarlyStoppingReason.NOT_STOPPED.value, None)
        stopped_at, reason, message = record
        self.stopped_at = _epoch_checked(state) if stopped_at is None else int(stopped_at)
        self.stopping_reason = EarlyStoppingReason(int(reason))
        self.stopping_reason_message = message

    @property
    def stopped_epoch(self) -> int:
        """Lightning's name: the epoch (from 0) of the last check that asked to stop, 0 until one asks (see
        :attr:`stopped_at`).

        >>> stopper = EarlyStopping("train/loss", patience=0)
        >>> _ = stopper.on_epoch_end(None, {"train/loss": 1.0}); stopper.stopped_epoch
        0
        """
        return 0 if self.stopped_at is None else self.stopped_at

    @property
    def wait_count(self) -> int:
        """Lightning's name of :attr:`wait`: the checks in a row without improvement.

        >>> EarlyStopping("val/loss").wait_count
        0
        """
        return self.wait

    @property
    def best_score(self) -> torch.Tensor:
        """Lightning's name of :attr:`best`, as its type: a float32 0-dim tensor (on the CPU).

        >>> EarlyStopping("val/loss").best_score
        tensor(inf)
        """
        return torch.tensor(self.best, dtype=torch.float32)

    def _say(self, message: str) -> None:
        """Print ``message`` as Lightning's ``verbose=True`` logs it: prefixed with the rank under several ranks
        (each rank says it, or rank 0 alone with ``log_rank_zero_only``)."""
        rank, world = _collective.rank_and_size()
        if world > 1:
            if self.log_rank_zero_only and rank != 0:
                return
            message = f"[rank: {rank}] {message}"
        write_line(message, sys.stderr)  # (through tqdm: an open progress bar is drawn again below it)

    @property
    def state_key(self) -> str:
        """The name ``run_epochs`` keeps this callback's counters under in ``state.extras``.

        >>> EarlyStopping("val/loss").state_key
        'EarlyStopping[val/loss,min]'
        """
        return f"EarlyStopping[{self.monitor},{self.mode}]"

    def state_dict(self) -> dict[str, Any]:
        """The counters, for checkpoints (``run_epochs`` keeps them in ``state.extras``).

        >>> EarlyStopping("val/loss").state_dict()["wait"]
        0
        """
        sd: dict[str, Any] = {"best": self.best, "wait": self.wait, "should_stop": self.should_stop}
        if self.stopping_reason is not EarlyStoppingReason.NOT_STOPPED:  # (older versions' keys otherwise)
            sd["stopping_reason"] = self.stopping_reason.value
        if self.stopping_reason_message is not None:
            sd["stopping_reason_message"] = self.stopping_reason_message
        if self.stopped_at is not None:
            sd["stopped_epoch"] = self.stopped_at
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Continue from what :meth:`state_dict` returned (a resumed run's patience goes on)."""
        self.best, self.wait, self.should_stop = float(sd["best"]), int(sd["wait"]), bool(sd["should_stop"])
        self.stopping_reason = EarlyStoppingReason(int(sd.get("stopping_reason", 0)))  # (older checkpoints: none)
        message = sd.get("stopping_reason_message")
        self.stopping_reason_message = None if message is None else str(message)
        stopped = sd.get("stopped_epoch")  # (older checkpoints: none)
        self.stopped_at = None if stopped is None else int(stopped)


def _epoch_checked(state: Any) -> int | None:
    """The epoch (from 0) a check of ``state`` belongs to, Lightning's ``current_epoch`` there: at an epoch's end (its
    validation, ``on_epoch_end``) the state counts the epoch done (``batch_index`` 0), so it is the one before."""
    epoch = getattr(state, "epoch", None)
    if epoch is None:
        return None
    return epoch - 1 if epoch > 0 and getattr(state, "batch_index", None) == 0 else epoch


class LearningRateMonitor(Callback):
    """Record each parameter group's learning rate, per epoch (default) or per step.

    As Lightning's: an epoch's value is the rate the epoch starts with (what its first update
    uses; a scheduler that steps at the end of the epoch shows in the next one), added to the
    epoch's ``run_epochs`` history record; per step, the rate after each ``every_n_steps``-th update of the fit's
    ``with_logging`` (``run_epochs`` tells it, :meth:`set_log_interval`), at ``state.step``: the rate the next update
    uses, handed to its loggers and not to the epoch records, read then only, as Lightning's monitor reads at its
    ``log_every_n_steps`` (a tensor rate, of a capturable or compiled optimizer, costs no read between log points);
    without a ``with_logging``, after every update. Names follow Lightning: ``lr-SGD`` for
    one group, ``lr-SGD/pg1``, ``lr-SGD/pg2`` for several, and a group's ``"name"`` in place of
    ``pgN`` where it has one (``lr-SGD/backbone``; one named group: ``lr-SGD/backbone`` too). Every recorded value is also kept
    in ``self.history`` as ``(step, {name: lr})``: the values of the latest fit, as Lightning's ``lrs``, which its
    ``on_train_start`` resets; ``on_fit_start`` starts the monitor afresh (a fit resumed from a checkpoint, or one
    that goes on from a fit cut short, with the same monitor records its own epochs; what a resumed epoch needs, the
    rates it started with, comes from the state).

    ``log_momentum=True`` and ``log_weight_decay=True`` (Lightning's) add, after each rate, its group's momentum
    (``betas[0]`` for an optimizer with ``betas`` among its defaults, as Adam; else the group's ``momentum``, 0 where
    it has none, which ``on_fit_start`` warns of) and weight decay, as ``<name>-momentum`` and
    ``<name>-weight_decay`` (``lr-SGD-momentum``, ``lr-Adam/pg2-weight_decay``), recorded wherever the rates are.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> model = torch.nn.Linear(1, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.5))
    >>> monitor = LearningRateMonitor()
    >>> monitor.on_epoch_start(state)
    >>> monitor.on_epoch_end(state, {})
    {'lr-SGD': 0.5}
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    >>> monitor = LearningRateMonitor(log_momentum=True)
    >>> monitor.on_epoch_start(state)
    >>> monitor.on_epoch_end(state, {})
    {'lr-SGD': 0.5, 'lr-SGD-momentum': 0.9}
    """

    reads_only = True
    #: it logs and never asks to stop: under DDP a batch makes no vote on ``should_stop`` for it (:func:`_never_stops`)
    never_stops = True

    def __init__(self, logging_interval: str = "epoch", log_momentum: bool = False,
                 log_weight_decay: bool = False) -> None:
        if logging_interval not in ("epoch", "step"):
            raise ValueError(f"LearningRateMonitor: logging_interval must be 'epoch' or 'step', got {logging_interval!r}")
        self.logging_interval = logging_interval
        self.log_momentum, self.log_weight_decay = log_momentum, log_weight_decay
        self._read = self._reader()  # what each record reads: the rates alone unless a flag asks for more
        self.history: list[tuple[int, dict[str, float]]] = []
        self._epoch_start: dict[str, float] | None = None
        self._epoch_start_step = 0
        self._step_seen: int | None = None  # per step: the update whose rates were recorded last
        self._log_every: int | None = None  # per step: with_logging's every_n_steps (None: every update)

    @property
    def batch_end_unused(self) -> bool:
        """Per epoch, its ``on_batch_end`` does nothing: ``run_epochs`` calls no batch hook for it (under DDP no
        per-batch agreement on ``should_stop`` is made for it either way: it ``never_stops``), as read from ``logging_interval`` when the
        fit starts; a subclass's own ``on_batch_end`` is called (see :func:`_batch_end_unused`)."""
        return self.logging_interval == "epoch"

    def on_fit_start(self, state: Any) -> None:
        """Start afresh, as Lightning's ``on_train_start`` does: ``history`` empty, no epoch under way (a resumed
        one's start rates come from the state, loaded after this hook). Per step, take the fit's starting update
        as seen: rates are recorded after each update that follows (and after that one when its hooks are owed, a
        logger's write having failed there: :func:`loopkit.steps.owed_hooks`, called first). Groups of one name
        are refused now, before any step (and, with ``log_weight_decay``, groups without a ``weight_decay``); with
        ``log_momentum``, an optimizer without momentum is warned of (its momentum is logged as 0, as Lightning's
        warning says)."""
        self.history = []
        self._epoch_start, self._epoch_start_step = None, 0
        self._step_seen = getattr(state, "step", None)
        if isinstance(state, TrainState) and owed_hooks(state) is not None:
            self._step_seen = None
        self._read = self._reader()
        optimizer = getattr(state, "optimizer", None)
        if optimizer is not None:
            self._read(state)
            if self.log_momentum and "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults \
                    and is_rank_zero():
                warnings.warn(f"LearningRateMonitor: log_momentum=True, but {type(optimizer).__name__} has no momentum "
                              "(neither 'momentum' nor 'betas' among its defaults): its momentum is logged as 0, "
                              "as Lightning does", RuntimeWarning, stacklevel=2)

    def set_log_interval(self, every_n_steps: int | None) -> None:
        """The ``every_n_steps`` of the fit's ``with_logging`` (None without one), which ``run_epochs`` tells before
        :meth:`on_fit_start`: per step, the rates are read and recorded at those updates only, where the loggers
        write them (Lightning's monitor reads its trainer's ``log_every_n_steps``).

        >>> import torch
        >>> from loopkit.state import TrainState
        >>> model = torch.nn.Linear(1, 1)
        >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.5))
        >>> monitor = LearningRateMonitor("step")
        >>> monitor.set_log_interval(2)
        >>> [monitor.on_batch_end(state.evolve(step=s), {}) for s in (1, 2)]
        [None, {'lr-SGD': 0.5}]
        >>> monitor.history
        [(2, {'lr-SGD': 0.5})]
        """
        self._log_every = every_n_steps

    def _reader(self) -> Callable[[Any], dict[str, float]]:
        """The function each record reads the state with: :meth:`learning_rates` when both flags are off (the
        values and the cost of the monitor without them), else one that adds each group's momentum and weight
        decay after its rate, in Lightning's order."""
        for option in ("log_momentum", "log_weight_decay"):
            flag = getattr(self, option)
            if not isinstance(flag, bool):
                raise TypeError(f"LearningRateMonitor: {option} must be True or False, got {flag!r}")
        if not (self.log_momentum or self.log_weight_decay):
            return self.learning_rates
        return functools.partial(_rates_and_more, self.learning_rates, momentum=self.log_momentum,
                                 weight_decay=self.log_weight_decay)

    @staticmethod
    def learning_rates(state: Any) -> dict[str, float]:
        """The current learning rate of each of the state's parameter groups."""
        optimizer = state.optimizer
        if optimizer is None:
            return {}
        name = f"lr-{type(optimizer).__name__}"
        groups = optimizer.param_groups
        if len(groups) == 1:
            own = groups[0].get("name")
            return {f"{name}/{own}" if own else name: float(groups[0]["lr"])}
        rates = {f"{name}/{g.get('name', f'pg{i + 1}')}": float(g["lr"]) for i, g in enumerate(groups)}
        if len(rates) < len(groups):
            raise ValueError(f"LearningRateMonitor: {type(optimizer).__name__} has several parameter groups of one "
                             f"'name' ({[g.get('name') for g in groups]}); give each a name of its own, as Lightning asks")
        return rates

    def on_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> dict[str, float] | None:
        """Per step, the rates after this batch's update when the loggers write it (:meth:`set_log_interval`;
        nothing after a micro-batch of ``with_grad_accum`` that made no update, nothing read between log points);
        per epoch, nothing."""
        if self.logging_interval == "step" and state.step != self._step_seen:
            self._step_seen = state.step
            if self._log_every is not None and state.step % self._log_every:
                return None  # not a log point: nothing read (a tensor rate would sync), nothing recorded
            lrs = self._read(state)
            self.history.append((state.step, lrs))
            return dict(lrs)  # to the loggers (with_logging writes them at this update, as Lightning does)
        return None

    def on_flush_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> dict[str, float] | None:
        """Per step, the rates after the update of a partial accumulation group flushed at an epoch's end, as
        after a batch's update; per epoch, nothing."""
        return self.on_batch_end(state, metrics)

    def on_epoch_start(self, state: Any) -> None:
        """Take the rates the epoch starts with (kept from before the crash in a resumed epoch); per step, nothing."""
        if self.logging_interval == "step":
            return
        if self._epoch_start is not None and getattr(state, "batch_index", 0) > 0:
            lrs, step = self._epoch_start, self._epoch_start_step  # resumed mid-epoch: the rates it started with
        else:
            lrs, step = self._read(state), state.step
            self._epoch_start, self._epoch_start_step = lrs, step
        self.history.append((step, lrs))

    def on_epoch_end(self, state: Any, metrics: Mapping[str, float]) -> dict[str, float]:
        """Per epoch, the rates the epoch started with, for its history record (and the loggers);
        per step, nothing: the loggers have the rates after each update, and the epoch's start
        rate at the epoch's last step would put the curve back (Lightning logs none either)."""
        lrs, self._epoch_start = self._epoch_start, None
        if self.logging_interval == "step":
            return {}
        return dict(self._read(state) if lrs is None else lrs)

    def state_dict(self) -> dict[str, Any]:
        """The rates the running epoch started with, for checkpoints (``run_epochs`` keeps them in
        ``state.extras``): a run resumed mid-epoch records the epoch's own rates, not those at the
        resume point, as the uninterrupted run does.

        >>> LearningRateMonitor().state_dict()
        {}
        """
        if self._epoch_start is None:
            return {}
        return {"epoch_start": dict(self._epoch_start), "epoch_start_step": self._epoch_start_step}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Continue from what :meth:`state_dict` returned."""
        if "epoch_start" in sd:
            self._epoch_start = {k: float(v) for k, v in sd["epoch_start"].items()}
            self._epoch_start_step = int(sd["epoch_start_step"])
        else:
            self._epoch_start = None


def _rates_and_more(learning_rates: Callable[[Any], dict[str, float]], state: Any, momentum: bool,
                    weight_decay: bool) -> dict[str, float]:
    """The rates ``learning_rates`` reads with, after each group's, its momentum and/or weight decay, as Lightning's
    ``_get_optimizer_stats``: ``betas[0]`` where the optimizer's defaults have ``betas``, else the group's
    ``momentum`` (0 without one)."""
    rates = learning_rates(state)
    if not rates:
        return rates
    optimizer = state.optimizer
    use_betas = "betas" in optimizer.defaults
    values: dict[str, float] = {}
    for i, ((name, lr), group) in enumerate(zip(rates.items(), optimizer.param_groups)):
        values[name] = lr
        if momentum:
            values[f"{name}-momentum"] = float(group["betas"][0] if use_betas else group.get("momentum", 0))
        if weight_decay:
            if "weight_decay" not in group:
                raise ValueError(f"LearningRateMonitor: log_weight_decay=True, but {type(optimizer).__name__}'s "
                                 f"parameter group {i} has no 'weight_decay' (Lightning's monitor fails on it too)")
            values[f"{name}-weight_decay"] = float(group["weight_decay"])
    return values


def _duration_seconds(duration: Any) -> float | None:
    """``Timer``'s duration in seconds: "DD:HH:MM:SS", a ``timedelta``, a dict of ``timedelta``'s
    arguments, a number of seconds, or None (no limit)."""
    if duration is None:
        return None
    if isinstance(duration, str):
        match = re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", duration.strip())
        if match is None:
            raise ValueError(f"Timer: duration {duration!r} is not a string of the form DD:HH:MM:SS (days, hours, "
                             "minutes, seconds: '00:12:00:00' is 12 hours)")
        days, hours, minutes, seconds = (int(g) for g in match.groups())
        duration = datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    elif isinstance(duration, Mapping):
        try:
            duration = datetime.timedelta(**duration)
        except TypeError as error:
            raise ValueError(f"Timer: duration {dict(duration)!r} is not a dict of timedelta's arguments "
                             f"(weeks, days, hours, minutes, seconds, ...): {error}") from None
    if isinstance(duration, datetime.timedelta):
        seconds = duration.total_seconds()
    else:
        seconds = as_real(duration)
        if seconds is None:
            raise TypeError(f"Timer: duration must be 'DD:HH:MM:SS', a timedelta, a dict of timedelta's arguments, "
                            f"a number of seconds or None, got {type(duration).__qualname__}")
    if not 0 <= seconds < math.inf:
        raise ValueError(f"Timer: duration must be finite and >= 0 seconds, got {duration!r}")
    return float(seconds)


class Timer(Callback):
    """Stop the fit once its training has run for ``duration`` (Lightning's ``Timer`` and ``max_time``).

    ``duration``: ``"DD:HH:MM:SS"``, a ``datetime.timedelta``, a dict of ``timedelta``'s
    arguments (``dict(hours=11, minutes=30)``), a number of seconds, or None (only measure).
    The clock runs from the fit's first epoch start (after the sanity validation) to its end,
    validations included, as Lightning's training time does. ``interval="step"`` checks after
    every batch (the fit stops mid-epoch; that epoch is still validated and recorded, as for any
    stop), ``"epoch"`` after each epoch. The time spent is kept in checkpoints (``run_epochs``
    keeps it in ``state.extras["callbacks/Timer"]``), so a run resumed from one counts on from there, and one
    resumed with its time already spent stops before its first batch, as Lightning's ``ckpt_path`` resume does.
    A fit's returned state holds it too: a fit continued from it ("train 10 more epochs") counts on as well, the
    budget covering every fit the state went through (Lightning's ``fit`` called again times itself afresh);
    ``run_epochs`` warns when the restored time already spends the whole ``duration``. To time a fit afresh,
    drop that key (``state.evolve(extras={k: v for k, v in state.extras.items() if k != "callbacks/Timer"})``),
    or give a longer ``duration``. A new fit from a fresh state starts at zero, with this Timer or another.
    Under DDP every rank stops at the same batch (the first rank whose clock runs out decides).
    ``clock`` is the time source in seconds (``time.monotonic``; a test may pass its own).
    ``duration`` (in any of those forms) and ``interval`` may be changed between fits, checked as the constructor
    checks them: each fit reads them when it starts.
    :meth:`time_elapsed`, :meth:`time_remaining`, :meth:`start_time` and :meth:`end_time` take Lightning's
    ``stage`` argument, ``"train"`` alone (this Timer times the fit).

    >>> ticks = iter(range(0, 100, 10))                    # a clock that moves 10 s a reading
    >>> timer = Timer(duration="00:00:00:25", clock=lambda: next(ticks))
    >>> timer.on_fit_start(None); timer.on_epoch_start(None)
    >>> timer.on_batch_end(None, {}); timer.should_stop   # 10 s spent
    False
    >>> timer.on_batch_end(None, {}); timer.should_stop   # 20 s
    False
    >>> timer.on_batch_end(None, {}); timer.should_stop   # 30 s: past 25
    True
    """

    #: its hooks read the clock and change nothing of the state (see :func:`may_change_state_early`)
    reads_only = True

    def __init__(
        self,
        duration: str | datetime.timedelta | Mapping[str, float] | float | None = None,
        interval: str = "step",
        verbose: bool = True,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        if not isinstance(verbose, bool):
            raise TypeError(f"Timer: verbose must be True or False, got {verbose!r}")
        if not callable(clock):
            raise TypeError(f"Timer: clock must be a function returning seconds, got {clock!r}")
        self.duration = duration
        self.verbose = verbose
        self.clock = clock
        self._reset()

    @property
    def duration(self) -> float | None:
        """The training time after which the fit stops, in seconds (None: none); set it as the constructor's
        ``duration`` (``"DD:HH:MM:SS"``, a ``timedelta``, a dict, seconds), checked and turned into seconds as there.

        >>> timer = Timer(); timer.duration = "00:01:00:00"; timer.duration
        3600.0
        """
        return self._duration

    @duration.setter
    def duration(self, value: str | datetime.timedelta | Mapping[str, float] | float | None) -> None:
        self._duration = _duration_seconds(value)

    @property
    def interval(self) -> str:
        """When the time is checked: ``"step"`` (after every batch) or ``"epoch"`` (after each epoch); set it as the
        constructor's ``interval``, checked as there.

        >>> timer = Timer(60); timer.interval = "epoch"; timer.interval
        'epoch'
        >>> timer.interval = "epochs"
        Traceback (most recent call last):
        ...
        ValueError: Timer: interval must be 'step' or 'epoch', got 'epochs'
        """
        return self._interval

    @interval.setter
    def interval(self, value: str) -> None:
        if value not in ("step", "epoch"):
            raise ValueError(f"Timer: interval must be 'step' or 'epoch', got {value!r}")
        self._interval = value

    @property
    def batch_end_unused(self) -> bool:
        """Per epoch, or without a duration, its ``on_batch_end`` does nothing: ``run_epochs`` calls no batch hook
        for it, as read from ``interval`` and ``duration`` when the fit starts (a ``duration`` or ``interval``
        set after construction is checked); a subclass's own ``on_batch_end`` is called (see :func:`_batch_end_unused`)."""
        return self.interval == "epoch" or self.duration is None

    def _reset(self) -> None:
        self.should_stop = False
        self._offset = 0.0  # the time spent before this fit (a resumed run's, from its checkpoint)
        self._start: float | None = None
        self._end: float | None = None

    @staticmethod
    def _check_stage(stage: Any) -> None:
        """Refuse a ``stage`` other than ``"train"`` (Lightning's ``RunningStage.TRAINING``, a ``str`` enum, equals it):
        loopkit's Timer times the fit alone."""
        if not isinstance(stage, str) or stage != "train":
            raise ValueError(f"Timer: stage {stage!r}: loopkit's Timer times the fit only (stage 'train', its "
                             "validations included); time evaluate() or predict() around the call")

    def start_time(self, stage: str = "train") -> float | None:
        """The ``clock``'s reading when this fit's clock started (its first epoch's start), or None before; as
        Lightning's ``start_time``, for ``stage="train"`` only (see :meth:`time_elapsed`)."""
        self._check_stage(stage)
        return self._start

    def end_time(self, stage: str = "train") -> float | None:
        """The ``clock``'s reading when this fit ended, or None while it runs (or before); as Lightning's
        ``end_time``, for ``stage="train"`` only."""
        self._check_stage(stage)
        return self._end

    def time_elapsed(self, stage: str = "train") -> float:
        """Seconds of training so far (the fit's, and a resumed run's before it). ``stage``: Lightning's argument;
        only ``"train"``, its default, is taken (a ``ValueError`` for ``"validate"``, ``"test"``, ...: this Timer
        times the fit, its validations included).

        >>> Timer(60).time_elapsed("train")
        0.0
        >>> Timer(60).time_elapsed("validate")
        Traceback (most recent call last):
        ...
        ValueError: Timer: stage 'validate': loopkit's Timer times the fit only (stage 'train', its validations included); time evaluate() or predict() around the call
        """
        self._check_stage(stage)
        if self._start is None:
            return self._offset
        end = self.clock() if self._end is None else self._end
        return self._offset + (end - self._start)

    def time_remaining(self, stage: str = "train") -> float | None:
        """Seconds left of ``duration`` (None without one); below 0 once it is spent. ``stage``: as for
        :meth:`time_elapsed`."""
        self._check_stage(stage)
        return None if self.duration is None else self.duration - self.time_elapsed()

    def _check(self, state: Any) -> None:
        if self.duration is None or self.should_stop:
            return
        elapsed = self.time_elapsed()  # (one reading of the clock)
        if elapsed >= self.duration:
            self.should_stop = True
            if self.verbose and is_rank_zero():
                write_line(f"Timer: time limit reached ({datetime.timedelta(seconds=int(elapsed))} spent); stopping "
                           f"at step {getattr(state, 'step', '?')}", sys.stderr)

    def on_fit_start(self, state: Any) -> None:
        """Start each fit afresh; a resumed run's time spent comes back from ``state.extras`` right after."""
        self._reset()

    def on_epoch_start(self, state: Any) -> None:
        """Start the clock at the fit's first epoch, and stop before any batch when a resumed run's time is already
        spent (Lightning checks then, in on_fit_start); later epochs start unchecked, as in Lightning."""
        if self._start is None:
            self._start = self.clock()  # (then the time spent is the offset: no second reading)
            self._end = self._start
            self._check(state)
            self._end = None

    def on_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> None:
        """With ``interval="step"``, stop once the time is spent."""
        if self.interval == "step":
            self._check(state)

    def on_epoch_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        """With ``interval="epoch"``, stop once the time is spent."""
        if self.interval == "epoch":
            self._check(state)

    def on_fit_end(self, state: Any, history: list[dict[str, float]]) -> None:
        """Stop the clock: :meth:`time_elapsed` keeps the fit's time."""
        if self._start is not None and self._end is None:
            self._end = self.clock()

    def state_dict(self) -> dict[str, Any]:
        """The time spent, for checkpoints (``run_epochs`` keeps it in ``state.extras``).

        >>> Timer(60).state_dict()
        {'time_elapsed': 0.0}
        """
        return {"time_elapsed": float(self.time_elapsed())}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Count on from the time spent that :meth:`state_dict` returned."""
        self._offset = float(sd["time_elapsed"])
