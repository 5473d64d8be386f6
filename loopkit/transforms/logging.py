"""``with_logging``: hand the loggers the means of each metric over the last n optimizer steps.

>>> from loopkit.loggers import ConsoleLogger
>>> from loopkit.steps import train_step
>>> with_logging(train_step(lambda m, b: None), ConsoleLogger(), every_n_steps=10).applied
('train_step', 'with_logging')
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from loopkit._calls import check_call, takes
from loopkit._numbers import as_int
from loopkit._window import EPOCH, LOGGED, Window, guarded, is_epoch_record, leave_updated, left_metrics
from loopkit.state import TrainState, extras_copy, leave_intact, put_extras, replace_extras, state_at_error
from loopkit.steps import RECORDED, Metrics, Step, WrapperStep, check_metric, flush_of, run_of
from loopkit.transforms._compose import refuse_wrapping, require_step

__all__ = ["LoggingStep", "with_logging"]

#: the window of the last n steps' metric records, in ``state.extras`` (every 32 records summed on the device)
WINDOW = LOGGED

#: in ``state.extras``: a log point's row (the window's means, or a callback's scalars after that update) that a
#: logger's write did not take (it raised), in the state that failure left whole: ``{"step", "epoch",
#: "batch_index"}`` (where it was left), ``"metrics"`` (the row) and ``"from"`` (the first logger that did not take
#: it); a fit resumed from that state logs it first, the next log point drops it
UNLOGGED = "logging/unlogged"

#: in ``state.extras``: the run folder each file logger (one with ``continues_from``) logged the state's rows to,
#: ``{logger's folder family: folder}`` (:func:`_family`: its class and ``root/name``, not its place in the list of
#: loggers, which a later ``with_logging`` may change), set at a fit's first call and at a log point, when it changed
#: (the records of loggers not in this list are kept); a fit going on from the state through a logger now in another
#: folder (another run's, logged since), or one the state records no folder of, moves that logger to a new folder
#: instead of rewinding that run's records (:meth:`loopkit.RunDirLogger.continues_from`). A state saved by an older
#: loopkit records ``{logger index: folder}``: read by the logger's place in the list, as it was written
RUN_DIRS = "logging/run_dirs"

#: the driver events ``with_logging`` writes a row of (:meth:`LoggingStep.notify`: before the inner step is told)
_ROW_EVENTS = frozenset({"validation_end", "epoch_end", "batch_end"})

#: what a log point takes out of the state: the window it logged, and a row an earlier write left unlogged
_LOGGED_KEYS = frozenset(WINDOW.keys) | {UNLOGGED}


def _accumulate(extras: Mapping[str, Any], metrics: Metrics, window: Window = WINDOW) -> Mapping[str, Any]:
    """``extras`` with this call's metrics added to the window (tensors stay on the device).

    The hot path only appends the call's record to an immutable tuple (no tensor arithmetic,
    no host sync); nothing existing is changed in place, so the step stays pure, and a
    checkpoint holds a bounded number of tensors.
    """
    record = dict(metrics)  # the caller may change its dict later: the window keeps its own
    for key, value in record.items():
        if type(value) is not torch.Tensor or value.ndim or value.requires_grad:
            record[key] = check_metric(value, key, "the step wrapped by with_logging")
    return window.add(extras, record)


def _read_means(extras: Mapping[str, Any]) -> dict[str, float]:
    """The window's means, read in one transfer (under torch.distributed: over all ranks, one collective)."""
    return {f"train/{k}": v for k, v in WINDOW.means(extras).items()}


def _left_unlogged(new: TrainState, means: dict[str, float], taken: int) -> TrainState:
    """``new``, the state a log point whose row the loggers from ``taken`` on did not take leaves whole (a write
    that raised, or a failure inside after the update: :func:`loopkit.state_at_error`), with that row
    (:data:`UNLOGGED`), logged first by a fit resumed from it: its rows are the uninterrupted run's. The call's
    metrics go into ``run_epochs``' epoch means by :func:`loopkit._window.leave_updated`. So too a callback's row
    after an update (``LearningRateMonitor("step")``'s rates) whose write raised. Only on a failure."""
    extras = extras_copy(new.extras)
    extras[UNLOGGED] = {"step": new.step, "epoch": new.epoch, "batch_index": new.batch_index,
                        "metrics": dict(means), "from": taken}
    return replace_extras(new, extras)


class _Given:
    """The rows each appending logger (one without ``resume_at``, which cannot replace a record it was given: an
    experiment tracker, the console, a logger of one's own) took at the latest step an event's row was logged, by
    the row's event, state (epoch, batch_index) and metric names, so that a fit retried from a state a failure left
    before those rows (a write, a save or a callback failing at an epoch's end or in a validation: the retry
    validates, and records the epoch, again) gives each of them each row once. Shared by the step's donated copies,
    as its loggers are; only read and changed when a row is logged, never on the hot path."""

    __slots__ = ("rows", "step")

    def __init__(self) -> None:
        self.step: int | None = None
        self.rows: dict[tuple[Any, ...], set[int]] = {}

    def begin(self, state: TrainState) -> None:
        """A fit begins from ``state``: what was taken stays only when it goes on at that step (a retry), and not
        from a fresh state (another run: a cross-validation fold logs its rows anew)."""
        fresh = state.step == 0 and state.epoch == 0 and state.batch_index == 0
        if fresh or state.step != self.step:
            self.step, self.rows = None, {}

    def taken(self, step: int, row: tuple[Any, ...]) -> set[int]:
        """The indices of the appending loggers that took ``row`` at ``step`` (to be added to as they take it)."""
        if step != self.step:
            self.step, self.rows = step, {}
        return self.rows.setdefault(row, set())


class _Held:
    """Where a fit began, not yet told to the loggers that rewind their records (``resume_at``): its state's step,
    epoch and batch_index, held when that state is in an epoch a fit cut short (``max_steps``, a callback's stop)
    recorded at that step. Whether this fit goes on in that epoch (its record then replaced by the whole epoch's) or
    trains no further (a relaunch from the end of a finished run: the record stays) is known once it logs a row, or
    ends: they are told then. A validation owed at that step (``val_every_n_steps``, run first) logs its row there
    before it is known: they are told at that row that the fit goes on from there (``told``), and told again, once
    known, when it goes on in that epoch. Shared by the step's donated copies; only read when a row is logged, or a
    fit ends."""

    __slots__ = ("at", "finalized", "first", "stopped", "told")

    def __init__(self) -> None:
        self.at: tuple[int, int, int] | None = None
        self.first = False  # (no call made since the fit began: its first records the run folders, RUN_DIRS)
        self.told = False  # (the loggers were told ``at``, finishes_epoch=False, at a validation's row there)
        self.stopped = False  # (the fit was told ``"stop"``: a signal stopped it, and it ends ``"killed"``)
        self.finalized = False  # (a finalize raised at ``"fit_end"``: the ``"abort"`` that error brings finalizes none)


def _with_epoch(row: dict[str, float], epoch: int) -> dict[str, float]:
    """A row with ``epoch``, the epoch of its step, added (as Lightning's logger connector adds its ``current_epoch``
    to every row; a metric of the row's own named ``epoch`` is kept). Not to an empty row (none is written), nor to a
    row that would then read as an epoch's record (a metric named ``*_epoch``: see
    :func:`is_epoch_record`), which the file loggers would take for one when a run is resumed.

    >>> _with_epoch({"train/loss": 0.5}, 2), _with_epoch({"train/loss_epoch": 0.5}, 2), _with_epoch({}, 2)
    ({'epoch': 2, 'train/loss': 0.5}, {'train/loss_epoch': 0.5}, {})
    """
    if "epoch" in row or is_epoch_record({*row, "epoch"}):
        return row
    return {"epoch": epoch, **row}  # (first, as in the epoch's record: a CSV's columns in one order, however resumed)


def _validation_epoch(state: TrainState) -> int:
    """The epoch a validation's row is of (Lightning's ``current_epoch`` there): ``state.epoch``, but the one before
    after an epoch that ended (``batch_index`` 0: ``run_epochs`` validates an epoch's end once the state is at the
    next epoch, and a step validation follows an update of the epoch, ``batch_index`` > 0)."""
    return state.epoch - 1 if state.batch_index == 0 and state.epoch > 0 else state.epoch


def _epoch_scalars(record: Mapping[str, float]) -> dict[str, float]:
    """An epoch's history record as scalars: ``train/<m>_epoch``, ``epoch`` and callback extras (``val/auroc`` of an
    ``on_epoch_end`` too; the validation's means were logged at its ``validation_end``)."""
    out: dict[str, float] = {"epoch": record["epoch"]} if "epoch" in record else {}
    validated = getattr(record, "validated", None)  # (a record of run_epochs: an EpochRecord)
    for key, value in record.items():
        if key in ("epoch", "step") or (key.startswith("val/") and (validated is None or key in validated)):
            continue
        out[f"{key}_epoch" if key.startswith("train/") else key] = value
    return out


@attrs.frozen(eq=False)
class LoggingStep(WrapperStep):
    """The step :func:`with_logging` returns: the window's metric tensors live in ``state.extras``.

    >>> from loopkit.steps import as_step
    >>> LoggingStep(as_step(lambda s, b: (s, {})), loggers=(), every_n_steps=5).name
    'with_logging'
    """

    loggers: tuple[Any, ...] = ()
    every_n_steps: int = 50
    #: what the appending loggers took of the rows logged at the latest step (shared with the step's copies)
    given: _Given = attrs.field(factory=_Given, repr=False, kw_only=True)
    #: where the fit began, until the loggers with ``resume_at`` are told (shared with the step's copies)
    held: _Held = attrs.field(factory=_Held, repr=False, kw_only=True)
    #: the loggers that may want the model (``wants_model``/``log_model``), found once
    watchers: tuple[Any, ...] = attrs.field(init=False, default=(), repr=False)
    #: the indices of the loggers that cannot replace a record logged again (no ``resume_at``), found once
    appending: frozenset[int] = attrs.field(init=False, default=frozenset(), repr=False)
    #: the window and run_epochs' epoch means as the inner step's records need them (:func:`loopkit._window.guarded`)
    windows: tuple[Window, Window] = attrs.field(init=False, default=(WINDOW, EPOCH), repr=False)

    def __attrs_post_init__(self) -> None:
        watchers = tuple(lg for lg in self.loggers if callable(getattr(lg, "wants_model", None)))
        object.__setattr__(self, "watchers", watchers)
        object.__setattr__(self, "windows", (guarded(WINDOW, self.inner), guarded(EPOCH, self.inner)))
        appending = frozenset(i for i, lg in enumerate(self.loggers) if not callable(getattr(lg, "resume_at", None)))
        object.__setattr__(self, "appending", appending)

    @property
    def name(self) -> str:
        return "with_logging"

    @property
    def agreed_options(self) -> Mapping[str, Any]:
        """A log point's means are a collective, made every ``every_n_steps`` updates (see :attr:`Step.rank_agreed`)."""
        return {"every_n_steps": self.every_n_steps}

    @property
    def returns_fresh_state(self) -> bool:  # type: ignore[override]
        return self.inner.returns_fresh_state  # its own new states are fresh; its loggers keep none

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        return self._logged(run_of(self.inner), state, batch)

    def flush_(self, state: TrainState) -> tuple[TrainState, Metrics]:
        return self._logged(flush_of(self.inner), state)

    def _logged(self, run: Callable[..., tuple[TrainState, Metrics]], state: TrainState, *args: Any):
        before = state.step
        due = [lg for lg in self.watchers if lg.wants_model(before + 1)] if self.watchers else None
        try:
            if due:
                watch = _ModelWatch(due, state, before + 1)
                try:
                    new, metrics = run(state, *args)
                finally:
                    watch.close()
                if new.step != before:
                    watch.after(new)
            else:
                new, metrics = run(state, *args)
        except BaseException as error:
            self._left_inside(error, state, before)
            raise
        if metrics:
            extras = _accumulate(new.extras, metrics, self.windows[0])
            if self.inner.returns_fresh_state:  # the inner step's new state: nobody else has it yet
                put_extras(new, extras)
            else:
                new = replace_extras(new, extras)
        if new.step != before and new.step % self.every_n_steps == 0 and WINDOW.holds(new.extras):
            new, means = self._taken(new)
            taken = 0
            try:
                for logger in self.loggers:
                    logger.log_metrics(means, new.step)
                    taken += 1
            except BaseException as error:  # a full disk: the update is done, its state whole (loopkit.state_at_error)
                raise leave_updated(error, _left_unlogged(new, means, taken), metrics, self.windows[1])
            new = _with_run_dirs(new, _run_dirs(self.loggers), fresh=True)  # (new: by _taken)
            self.held.first = False
        elif self.held.first:  # (a fit's first call: the folders it goes on in, though no log point is reached)
            try:
                folders = _run_dirs(self.loggers, claim=True)
            except BaseException as error:  # (a folder that cannot be made): the update is done, its state whole
                raise leave_updated(error, new, metrics, self.windows[1])
            new = _with_run_dirs(new, folders, self.inner.returns_fresh_state)
            self.held.first = False
        return new, metrics

    def _taken(self, new: TrainState) -> tuple[TrainState, dict[str, float]]:
        """At a log point: ``new`` without the window (and a row left unlogged before), and the window's means."""
        means = _with_epoch(_read_means(new.extras), new.epoch)
        new = replace_extras(new, {k: v for k, v in new.extras.items() if k not in _LOGGED_KEYS})
        if self.held.at is not None:  # (the fit's first row: it went on from where it began)
            self._release(new)
        return new, means

    def _left_inside(self, error: BaseException, state: TrainState, before: int) -> None:
        """An inner step's call from ``state`` that raised after its update (``with_profiler``'s trace write failed:
        :func:`loopkit._window.leave_updated`): the state it left whole is left with its metrics in the window and,
        at a log point, the row not logged (:func:`_left_unlogged`, logged first by a fit resumed from it), as the
        uninterrupted run has them. Nothing for any other error."""
        metrics, whole = left_metrics(error), state_at_error(error)
        if metrics is None or whole is None or whole is state:
            return
        whole = replace_extras(whole, _accumulate(whole.extras, metrics, self.windows[0])) if metrics else whole
        if whole.step != before and whole.step % self.every_n_steps == 0 and WINDOW.holds(whole.extras):
            whole, means = self._taken(whole)
            whole = _left_unlogged(whole, means, 0)
        leave_intact(error, whole)

    def notify(self, event: str, state: TrainState, metrics: Mapping[str, float]) -> None:
        """An event whose row it writes (:data:`_ROW_EVENTS`) is logged before the transforms inside are told of it,
        and not told them when a write raised: a ``with_checkpointing`` inside (against its advice: outermost) saves
        at an epoch's end or a validation once the loggers hold its rows, as it does outside, and a relaunch from
        that checkpoint does not go on without them. Other events: the inner step first (:meth:`WrapperStep.notify`)."""
        if event not in _ROW_EVENTS:
            super().notify(event, state, metrics)
            return
        self.on_event(event, state, metrics)
        self.inner.notify(event, state, metrics)

    def on_event(self, event: str, state: TrainState, metrics: Mapping[str, float]) -> None:
        if event == "fit_begin":  # the step a fit continues the run from: what a folder holds after it goes
            at = (state.step, state.epoch, state.batch_index)
            # (in an epoch a cut recorded at this step: told once it is known whether this fit goes on in it)
            self.held.at = at if state.batch_index > 0 and state.extras.get(RECORDED) == state.step else None
            self.held.told = False
            self.held.stopped = False
            self.held.finalized = False
            self.held.first = True
            if at != (0, 0, 0):  # (first: a logger now in another run's folder moves to a new one, before any rewind)
                _continue_from(self.loggers, state.extras.get(RUN_DIRS))
            if self.held.at is None:  # (first: a fresh fit after one a logger logged moves it to a new folder)
                self._resume(at, finishes=False)
            for logger in self.loggers:
                agree = getattr(logger, "agree_log_dir", None)
                if agree is not None:  # (under DDP, every rank's log_dir is rank 0's folder)
                    agree()
            self.given.begin(state)
            self._log_unlogged(state)
            return
        if event == "validation_end":
            scalars = _with_epoch(dict(metrics), _validation_epoch(state))
        elif event == "batch_end":  # a callback's scalars after an update (the rates of LearningRateMonitor("step"))
            if state.step % self.every_n_steps:
                return
            scalars = _with_epoch(dict(metrics), state.epoch)
        elif event == "epoch_end":
            scalars = _epoch_scalars(metrics)
        elif event == "stop":  # a graceful stop on SIGTERM/SIGINT: "fit_end" follows, and finalizes "killed"
            self.held.stopped = True
            return
        elif event in ("fit_end", "abort"):  # on abort, what was logged is flushed and closed
            self._release(state if event == "fit_end" else None)  # (abort: the state may be donated, unread)
            if event == "abort" and self.held.finalized:  # (the error is a finalize's at "fit_end": each was told)
                return
            status = "failed" if event == "abort" else "killed" if self.held.stopped else "success"
            self._finalize_all(status, at_end=event == "fit_end")
            return
        else:
            return
        step = int(metrics.get("step", state.step)) if event == "epoch_end" else state.step
        if event == "validation_end" and (state.step, state.epoch, state.batch_index) == self.held.at:
            if not self.held.told:  # (a validation owed where the fit began: its row is placed there, and the fit
                self.held.told = True  # may still go on in the cut epoch: held until it is known, see _Held)
                self._resume(self.held.at, finishes=False)
        else:
            self._release(state)
        self._log_row(scalars, step, (event, state.epoch, state.batch_index, frozenset(scalars)),
                      owed_by=state if event == "batch_end" else None)

    def _finalize_all(self, status: str, at_end: bool) -> None:
        """Finalize every logger, each once, even when one raises (a tracker's network call: the loggers after it are
        flushed and closed all the same, as Lightning's trainer finalizes each), then raise the first error. At the
        fit's end (``at_end``) the ``"abort"`` that error brings out of ``run_epochs`` finalizes none again."""
        first: Exception | None = None
        for logger in self.loggers:
            try:
                _finalize(logger, status)
            except Exception as error:
                first = first or error
        if first is not None:
            self.held.finalized = at_end
            raise first

    def _resume(self, at: tuple[int, int, int], finishes: bool) -> None:
        """Tell each logger with ``resume_at`` that the fit goes on from ``at`` (step, epoch, batch_index), and whether
        it goes on in an epoch a cut recorded there (``finishes``: that record goes, replaced by the whole epoch's)."""
        for logger in self.loggers:
            resume_at = getattr(logger, "resume_at", None)
            if resume_at is not None:
                _resume_at(resume_at, at, finishes)

    def _release(self, state: TrainState | None) -> None:
        """Tell the loggers where the fit began, when that was held at ``"fit_begin"`` (:class:`_Held`): before the
        fit's first row, or at its end. It went on in the cut epoch when ``state`` (where it logs, or ends) has moved
        from there; a relaunch that trains no further keeps the cut's record, which holds that epoch. At an abort
        (``state`` None: the state is not read) it is told it did not: a fit that went on, failed before a row and
        is resumed past the cut is placed after that record, which :meth:`loopkit.RunDirLogger.resume_at` drops.
        Loggers told already that it did not (at a validation's row there, :class:`_Held`) are told only that it did."""
        at = self.held.at
        if at is None:
            return
        self.held.at = None
        finishes = state is not None and (state.step, state.epoch, state.batch_index) != at
        if finishes or not self.held.told:
            self._resume(at, finishes=finishes)

    def _log_row(self, scalars: dict[str, float], step: int, row: tuple[Any, ...],
                 owed_by: TrainState | None = None) -> None:
        """Log an event's row at ``step`` to each logger, but not again to an appending one that took it already
        (in a fit whose epoch's end, or validation, failed after it: :class:`_Given`). A logger that rewinds its
        records (``resume_at``: the file loggers) is given it again, and replaces the one it holds. A write that
        raises in a callback's row after an update (``owed_by``, the state the row is of: a fit from it goes on at
        the next batch and makes no row of that update again) leaves that state holding the row
        (:func:`_left_unlogged`), logged first by a fit resumed from it, to the loggers from the failed one on."""
        taken = self.given.taken(step, row)
        for i, logger in enumerate(self.loggers):
            if i in taken:
                continue
            try:
                logger.log_metrics(scalars, step)
            except BaseException as error:
                if owed_by is not None:
                    leave_intact(error, _left_unlogged(owed_by, scalars, i))
                raise
            if i in self.appending:
                taken.add(i)

    def _log_unlogged(self, state: TrainState) -> None:
        """Log the row a failed write left unlogged (:func:`_left_unlogged`) to the loggers that did not take it,
        when ``state`` is where that failure left the fit: before anything the resumed fit logs (the validation
        due at that update), as in the uninterrupted run. Not from a state that went on since (a batch, or the
        epoch's record: a fit that logged the row and made no update after it returns a state still holding it).
        Once: the row is marked taken by every logger, in the state, whose fit may fail before it moves (a
        ``state_at_error`` of that state again, which a further fit must not log twice)."""
        owed = state.extras.get(UNLOGGED)
        if owed is None or state.extras.get(RECORDED) == state.step:
            return
        if (owed["step"], owed["epoch"], owed["batch_index"]) == (state.step, state.epoch, state.batch_index):
            for logger in self.loggers[owed["from"]:]:
                logger.log_metrics(owed["metrics"], state.step)
                owed["from"] += 1


class _ModelWatch:
    """Calls ``log_model`` of the loggers ``due`` (those that want the model at ``step``), from the
    optimizer's step pre-hook (gradients present, as the optimizer sees them), or after the call
    when the step updates without the state's optimizer."""

    __slots__ = ("due", "handle", "step")

    def __init__(self, due: list[Any], state: TrainState, step: int) -> None:
        self.due = due
        self.handle = None
        self.step = step
        if self.due and state.optimizer is not None:
            model = state.model
            self.handle = state.optimizer.register_step_pre_hook(lambda *_: self.log(model))

    def log(self, model: torch.nn.Module) -> None:
        due, self.due = self.due, []
        for logger in due:
            logger.log_model(model, self.step)

    def close(self) -> None:
        if self.handle is not None:  # the hook dict may be shared with the caller's optimizer
            self.handle.remove()

    def after(self, new: TrainState) -> None:
        if self.due and new.step == self.step:
            self.log(new.model)


def _resume_at(resume_at: Callable[..., Any], at: tuple[int, int, int], finishes: bool) -> None:
    """Tell a logger where a fit goes on from, ``at`` (its state's step, epoch and batch_index): ``resume_at(step,
    epoch, batch_index, finishes_epoch=...)`` (epochs that made no update record at one step: the file loggers tell
    their records apart by epoch too), or, to a logger of one's own that takes no epoch, ``resume_at(step)``
    (``finishes_epoch=True`` when it is so and it takes that), as :func:`loopkit._calls.takes` reads its signature
    (one it cannot read is given the first). :func:`_check_calls` refused at build one that takes neither.

    >>> told = []
    >>> _resume_at(lambda step, finishes_epoch=False: told.append((step, finishes_epoch)), (4, 0, 4), True)
    >>> _resume_at(lambda step: told.append(step), (4, 0, 4), True); told
    [(4, True), 4]
    """
    step, epoch, batch_index = at
    if takes(resume_at, step, epoch, batch_index, finishes_epoch=finishes):
        resume_at(step, epoch, batch_index, finishes_epoch=finishes)
    elif finishes and takes(resume_at, step, finishes_epoch=True):
        resume_at(step, finishes_epoch=True)
    else:
        resume_at(step)


def _family(logger: Any) -> str:
    """What a file logger's record in :data:`RUN_DIRS` is keyed by: its class and the folder its run folders are
    made in (``root/name``; its run folder itself for a fixed ``version``), which no other logger of one
    ``with_logging`` shares (:func:`_refuse_one_file_twice`), whatever its place in the list of loggers.

    >>> from loopkit.loggers import CSVLogger
    >>> _family(CSVLogger("/runs", "demo")), _family(CSVLogger("/runs", "demo", version=3))
    ('loopkit.loggers.CSVLogger:/runs/demo', 'loopkit.loggers.CSVLogger:/runs/demo/version_3')
    """
    fixed_folder = _method(logger, "fixed_folder")
    folder = fixed_folder() if fixed_folder is not None else None
    root, name = getattr(logger, "root", None), getattr(logger, "name", None)
    if folder is None and isinstance(root, (str, os.PathLike)) and isinstance(name, str):
        folder = os.path.join(root, name)
    kind = f"{type(logger).__module__}.{type(logger).__qualname__}"
    return kind if folder is None else f"{kind}:{os.path.normpath(os.path.abspath(folder))}"


def _run_dirs(loggers: tuple[Any, ...], claim: bool = False) -> dict[str, str]:
    """The run folder (``log_dir``) of each logger that can be told it (``continues_from``: the file loggers), by
    its folder family (:func:`_family`): where the rows of the state it logs are (:data:`RUN_DIRS`). Read at each
    log point, and at a fit's first call, which ``claim``s them (:meth:`loopkit.RunDirLogger.claim_for_fit`: the
    folder of a logger with ``version=None`` is claimed then, not at its first write, so that a fit that logs only
    its epochs' records records it too, and it is counted as the fit's, so that a fresh fit next, another run, takes
    a folder of its own even when this one fails before its first row: the state that failure left goes on in it)."""
    folders = {}
    for logger in loggers:
        if _method(logger, "continues_from") is not None:
            claim_for_fit = _method(logger, "claim_for_fit") if claim else None
            folder = claim_for_fit() if claim_for_fit is not None else getattr(logger, "log_dir", None)
            if isinstance(folder, (str, os.PathLike)):
                folders[_family(logger)] = os.path.normpath(os.path.abspath(folder))
    return folders


def _with_run_dirs(new: TrainState, folders: dict[str, str], fresh: bool) -> TrainState:
    """``new`` recording ``folders`` (:data:`RUN_DIRS`) when it records other ones (in place when ``fresh``: nobody
    holds ``new`` yet). The records of loggers not in this ``with_logging`` stay (a logger left out for a fit goes on
    in its folder when it comes back); an older loopkit's (by index) go."""
    if not folders:
        return new
    recorded = new.extras.get(RUN_DIRS)
    if isinstance(recorded, Mapping):
        folders = {**{k: v for k, v in recorded.items() if isinstance(k, str)}, **folders}
    if recorded == folders:
        return new
    extras = extras_copy(new.extras)
    extras[RUN_DIRS] = folders
    if fresh:
        put_extras(new, extras)
        return new
    return replace_extras(new, extras)


def _continue_from(loggers: tuple[Any, ...], folders: Any) -> None:
    """A fit begins from a state that is not fresh, whose rows were logged to ``folders`` (:data:`RUN_DIRS`; None for
    a state no logger logged, or an older checkpoint): each logger with ``continues_from`` is told its own (found by
    its folder family, :func:`_family`; in an older loopkit's record, by its place in the list), or None when the
    state records none of its, and leaves a folder of another run rather than rewind that run's records to this
    state's step."""
    folders = folders if isinstance(folders, Mapping) else {}
    for i, logger in enumerate(loggers):
        continues_from = _method(logger, "continues_from")
        if continues_from is not None:
            folder = folders.get(_family(logger), folders.get(i))
            continues_from(folder if isinstance(folder, str) else None)


def _finalize(logger: Any, status: str) -> None:
    """``logger.finalize(status)`` when it takes a status, ``"success"`` included (Lightning's protocol: its trainer
    always passes one, so ``def finalize(self, status)`` has no default), else ``logger.finalize()`` (a logger of
    one's own may take none). ``"killed"`` (a fit a signal stopped) goes only to a logger whose ``finalize_statuses``
    lists it (loopkit's); any other is given ``"failed"``, what Lightning's trainer passes after a SIGTERM or Ctrl-C
    (its loggers know no other)."""
    if status == "killed" and status not in getattr(logger, "finalize_statuses", ()):
        status = "failed"
    if takes(logger.finalize, status):  # (one whose signature cannot be read is given the status)
        logger.finalize(status)
    else:
        logger.finalize()


def _method(logger: Any, name: str) -> Any:
    """``logger``'s method ``name`` where its class defines one (a file logger's: ``continues_from``,
    ``share_run_dir``, ...), else None: a ``unittest.mock.MagicMock`` logger, whose every attribute is a made-up
    callable, is a plain logger here (its made-up leaders went on forever).

    >>> from unittest import mock
    >>> from loopkit.loggers import CSVLogger
    >>> _method(CSVLogger("/runs"), "share_run_dir") is not None, _method(mock.MagicMock(), "share_run_dir")
    (True, None)
    """
    return getattr(logger, name) if callable(getattr(type(logger), name, None)) else None


def _shares(follower: Any, leader: Any) -> bool:
    share = _method(follower, "share_run_dir")
    return bool(share is not None and share(leader))


def _run_folder(logger: Any) -> Any:
    """What names a file logger's run folder without claiming it: its last leader's, as the path its fixed version
    (``3`` or ``"version_3"``) or the folder it claimed already make, else the leader itself."""
    while getattr(logger, "_leader", None) is not None:
        logger = logger._leader
    folder = logger.fixed_folder() or getattr(logger, "_dir", None)
    return id(logger) if folder is None else os.path.normpath(os.path.abspath(folder))


def _refuse_one_file_twice(loggers: tuple[Any, ...]) -> None:
    """Two loggers of one class in one run folder would write the same files over each other."""
    seen: dict[tuple[type, Any], int] = {}
    for i, logger in enumerate(loggers):
        if _method(logger, "share_run_dir") is None:
            continue
        key = (type(logger), _run_folder(logger))
        if key in seen:
            raise ValueError(
                f"with_logging: loggers {seen[key]} and {i} are both {type(logger).__name__}s of one run folder, "
                "and would write the same files over each other; pass one, or give them other names or versions"
            )
        seen[key] = i


def _flat_loggers(loggers: tuple[Any, ...]) -> tuple[Any, ...]:
    """The loggers given, a list or tuple of them (Lightning's ``Trainer(logger=[tb, csv])``) taken as its loggers.

    >>> _flat_loggers((["a", "b"], "c"))
    ('a', 'b', 'c')
    """
    return tuple(lg for given in loggers for lg in (given if isinstance(given, (list, tuple)) else (given,)))


def _check_calls(logger: Any, who: str) -> None:
    """Refuse a logger whose ``log_metrics`` cannot take ``(metrics, step)``, whose ``finalize`` can take
    neither ``(status)`` nor ``()`` (:func:`_finalize`), or whose ``resume_at`` (where it has one) can take neither
    ``(step, epoch, batch_index, finishes_epoch=...)`` nor ``(step)`` (:func:`_resume_at`): the calls with_logging
    makes, which would fail at the first log point, where a fit begins, or at the fit's end."""
    check_call(logger.log_metrics, f"{who}: its log_metrics must take (metrics, step), as with_logging calls it", {}, 0)
    if not takes(logger.finalize):
        check_call(logger.finalize, f"{who}: its finalize must take (status) or (), as with_logging calls it", "success")
    resume_at = getattr(logger, "resume_at", None)
    if resume_at is not None and not takes(resume_at, 0):
        check_call(resume_at, f"{who}: its resume_at must take (step, epoch, batch_index, finishes_epoch=...) or "
                   "(step), as with_logging calls it", 0, 0, 0, finishes_epoch=False)


def with_logging(step: Any, *loggers: Any, every_n_steps: int = 50) -> Step:
    """Log the means of the step's metrics over each ``every_n_steps`` optimizer updates.

    The loggers go as separate arguments, ``with_logging(step, tb, csv)``, or as a list, ``with_logging(step, [tb,
    csv])`` (as Lightning's ``Trainer(logger=[tb, csv])`` takes them). A logger whose ``log_metrics`` cannot take
    ``(metrics, step)``, whose ``finalize`` takes neither ``(status)`` nor ``()``, or whose ``resume_at`` takes
    neither ``(step, epoch, batch_index, finishes_epoch=...)`` nor ``(step)``, is refused here. Those are the
    calls it makes (and ``resume_at``, ``log_model`` where a logger has them): a logger of one's own needs no
    ``log_hparams``, and Lightning's loggers (``log_metrics(metrics, step)``, ``finalize(status)``; their
    ``log_hyperparams`` called by the user) are taken too, as loggers without ``resume_at``.

    Each call's metric tensors are kept in ``state.extras`` (``logging/pending``; every 32
    calls summed on the device into ``logging/window``), so the step stays pure and a
    checkpoint carries a partial window. When ``state.step`` reaches a multiple of
    ``every_n_steps`` they are summed and read once (the only host sync), and every logger's ``log_metrics`` gets ``train/m``, the mean over the
    calls since the last log (under ``with_grad_accum`` a window is n updates), at the global
    step (``run_epochs`` warns at a fit's start when an epoch of known length makes fewer updates than
    ``every_n_steps``, as Lightning warns of its ``log_every_n_steps``). The ``run_epochs`` events add each validation's ``val/m`` means, and at the end of
    each epoch ``train/m_epoch`` (the epoch means) and the callbacks' extras. Every row holds ``epoch``, the epoch of
    its step, as Lightning's logger connector adds its ``current_epoch`` to each (a validation at an epoch's end, and
    the epoch's record, hold that epoch; the file loggers tell the epoch's record apart by its means when a run is
    resumed, :func:`is_epoch_record`); at the
    end of the fit every logger is finalized: ``finalize("success")``, ``finalize("failed")`` when an
    error leaves the fit, or ``finalize("killed")`` when SIGTERM or Ctrl-C stopped it (``run_epochs`` saved and
    returned: a resumable stop, an MLflow run ``KILLED``; a logger not of loopkit's gets ``"failed"``, as
    Lightning's trainer gives), for loggers whose ``finalize`` takes a status (as Lightning's trainer always
    passes one), ``finalize()`` for one that takes none; each logger is finalized once, also when one before it
    raises (the first error is raised once all are); call ``finalize()`` yourself in a loop of your own. Sanity validation is never logged. A custom step is logged per window only if it
    advances ``state.step``. Loggers with ``wants_model``/``log_model``
    (``TensorBoardLogger(histogram_every_n_steps=m)``) get the model when due, from the
    optimizer's step pre-hook; loggers of one root and name share one ``version_N`` folder. A write that
    raises at a log point (a full disk) leaves that update whole (:func:`loopkit.state_at_error`), holding the
    row not written and the call's metrics: ``run_epochs`` from it logs the row first, to the loggers that did
    not take it, calls that update's ``on_batch_end`` hooks once (their rows, ``LearningRateMonitor("step")``'s
    rates, logged), makes the save a ``with_checkpointing`` outside or inside has due at that update, and goes
    on at the next batch (its calls, rows, checkpoints, history and parameters those of the uninterrupted run);
    so does a layer inside that raises after its update (``with_profiler``'s trace write), that call's metrics
    kept in the window and its row, if due, held for the fit resumed from the state it left. A write that raises
    in a callback's row after that update (``LearningRateMonitor("step")``'s rates) leaves the state holding that
    row: the fit from it logs that row first, to the loggers from the failed one on. A fit
    retried, through the same step, from the state a failure in a validation or at an epoch's end left (it
    validates, and records the epoch, again) gives each logger each row once: a logger with ``resume_at`` (the file
    loggers) replaces the row it is given again, and one without (a tracker, ``ConsoleLogger``, a logger of one's own)
    is not given again a row it took. The state records the folder each file logger logs its rows to
    (``logging/run_dirs``, claimed at a fit's first step, by each logger's class and ``root/name``, not its place in
    the list): a fit going on from a state a logger logged to another folder than its last fit's (model A trained
    further after model B went on, fresh, with the same step, or through another list of the same loggers: one
    added, taken out or reordered), or to none of its folders while it last logged another run, goes on
    in the next ``version_N``, with a warning naming both, and leaves the other run's records as they are; a retry,
    or a run resumed from a checkpoint, goes on in its folder, as before. The folder claimed is the fit's even when
    it fails before its first row: a fresh fit next (another model, or the same again from scratch) takes the next
    ``version_N``, so that the state the failure left goes on in a folder no other run wrote to.

    >>> import os, tempfile, torch
    >>> from loopkit import TrainState, train_step, run_epochs
    >>> from loopkit.loggers import CSVLogger
    >>> tmp = tempfile.TemporaryDirectory()
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> logger = CSVLogger(tmp.name, "demo")
    >>> step = with_logging(train_step(lambda m, b: m(b).pow(2).mean()), logger, every_n_steps=2)
    >>> state, _ = run_epochs(step, state, [torch.ones(4, 2)] * 4, epochs=1, progress=False)
    >>> print(open(os.path.join(logger.log_dir, "metrics.csv")).readline().strip())
    step,epoch,train/loss,train/loss_epoch
    >>> tmp.cleanup()
    """
    if (as_int(every_n_steps) or 0) < 1:
        raise ValueError(f"with_logging: every_n_steps must be a positive int, got {every_n_steps!r}")
    every_n_steps = as_int(every_n_steps)
    loggers = _flat_loggers(loggers)
    if not loggers:
        raise ValueError("with_logging needs at least one logger, e.g. with_logging(step, TensorBoardLogger())")
    for i, logger in enumerate(loggers):
        if isinstance(logger, type):
            raise TypeError(f"with_logging: logger {i} is the class {logger.__qualname__}; pass an instance, {logger.__qualname__}(...)")
        # (the calls it makes; log_hparams, Lightning's log_hyperparams, is the user's: Lightning's loggers are taken)
        for method in ("log_metrics", "finalize"):
            if not callable(getattr(logger, method, None)):
                raise TypeError(
                    f"with_logging: logger {i} ({type(logger).__qualname__}) has no {method}() method; "
                    "pass loggers such as loopkit.TensorBoardLogger() or loopkit.CSVLogger()"
                )
        _check_calls(logger, f"with_logging: logger {i} ({type(logger).__qualname__})")
        # one run folder per root/name: this logger follows an earlier one, or one whose folder is
        # not claimed yet follows this one (when this one's log_dir was read first)
        any(_shares(logger, earlier) or _shares(earlier, logger) for earlier in loggers[:i])
    _refuse_one_file_twice(loggers)
    inner = require_step(step, "with_logging")
    refuse_wrapping(inner, "with_logging", {  # one window per state: a second layer would count twice
        "with_logging": "the window lives in the state once; pass every logger to one "
        "with_logging(step, logger_a, logger_b, ...)",
    })
    return LoggingStep(inner, loggers=tuple(loggers), every_n_steps=every_n_steps)
