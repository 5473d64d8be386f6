"""``with_checkpointing``: atomic checkpoints of the whole state, for exact resume.

>>> import tempfile
>>> tmp = tempfile.TemporaryDirectory()
>>> from loopkit.steps import train_step
>>> step = with_checkpointing(train_step(lambda m, b: None), tmp.name, every_n_steps=100)
>>> step.applied
('train_step', 'with_checkpointing')
>>> tmp.cleanup()
"""

from __future__ import annotations

import concurrent.futures
import datetime
import errno
import itertools
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from loopkit import checkpoint
from loopkit import _collective
from loopkit._collective import is_rank_zero
from loopkit._numbers import as_float32, as_int, as_real
from loopkit._sharded import is_sharded
from loopkit._window import over_ranks
from loopkit.errors import CheckpointCorruptError, CheckpointLoadError, StateMismatchError
from loopkit.state import (
    TrainState, _uninitialized, core_module, extras_copy, full_state_dict_on_rank_zero, leave_intact, replace_extras,
)
from loopkit.steps import (
    RECORDED, SAVE_DUE, VALIDATED, VALIDATES, VALIDATES_AT_EPOCH_ENDS, Metrics, UpdateStep, WrapperStep,
)
from loopkit.transforms._compose import require_step

__all__ = ["CheckpointStep", "with_checkpointing"]

Position = tuple[int, int, int]

_NO_SAVE, _SAVE, _FAILED = 0, 1, 2  # rank 0's word to the other ranks on a save of a sharded state (_persist)
_WORD = "the broadcast of rank 0's word on whether it saves the sharded state"  # (named where it fails)


def _worst(mode: str) -> float:
    """The value a NaN score is ranked as (Lightning's ``ModelCheckpoint`` does the same): the worst one."""
    return math.inf if mode == "min" else -math.inf


class _Saver:
    """The mutable side of a :class:`CheckpointStep`: what was saved, the scores, the background writer.

    Shared by the copies ``donate`` makes of the step. In the background mode one thread
    writes, in order, and at most one save is pending: the next save waits for it.

    A copy (``copy.deepcopy``, or pickle: a step handed to ``torch.multiprocessing.spawn``) is a fresh one, as a
    new ``with_checkpointing`` of the directory has: the directory holds what was saved and scored, and what a
    relaunch reads back; a pending save is waited for first, its error raised as at the next save.

    >>> import copy
    >>> saver = _Saver()
    >>> saver.names[(2, 0, 2)] = "ckpt-1-step2-epoch0-batch2"
    >>> copy.deepcopy(saver).names
    {}
    """

    def __init__(self) -> None:
        self.names: dict[Position, str] = {}  # checkpoints this process saved, by position (those still kept)
        self.scores: dict[str, float] | None = None  # loaded from scores.json on first use
        self.lock = threading.Lock()
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.pending: concurrent.futures.Future | None = None
        self.last: Position | None = None  # the last position saved or being saved
        self.last_recorded = False  # whether that save holds its epoch's record (:func:`_recorded`)
        self.looked = False  # whether the directory was looked at for another run's checkpoints
        self.checked = False  # whether its newest checkpoint was found to be of this model (or there was none)
        self.defer = False  # under run_epochs: a step save waits for the batch's callbacks ("save_due")
        self.due: str | None = None  # the reason of the step save deferred at this update
        self.epoch_val: dict[str, float] | None = None  # an epoch's validation means, scored at its "epoch_end"
        self.at_validations = False  # this fit's saves are its validations' (the default in a fit that validates
        # other than once at every epoch's end)
        self.start: Position | None = None  # where the fit under run_epochs began (a relaunch: its checkpoint's)
        self.began: Position | None = None  # where this fit, or a loop of your own (its first call), began: a
        # checkpoint already at a first save's position is this run's own only if it began there
        self.start_recorded = False  # whether the state it began from held its epoch's record (:func:`_recorded`)
        self.told_shared = False  # whether the warning that another writer shares the directory was given
        self.timed_from: float | None = None  # train_time_interval's clock: the fit's start, then its last time save

    def __reduce__(self) -> tuple[type, tuple[()]]:
        self.wait()  # (its checkpoint on disk, for the copy to find; a lock and a thread do not pickle)
        return _Saver, ()

    def run(self, task: Callable[[], None], background: bool) -> None:
        if not background:
            task()
            return
        self.wait()
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loopkit-checkpoint")
        self.pending = self.executor.submit(task)

    def wait(self, *, close: bool = False) -> None:
        """Wait for the pending background save; raise its error, if it failed."""
        pending, self.pending = self.pending, None
        try:
            if pending is not None:
                pending.result()
        finally:
            if close and self.executor is not None:
                self.executor.shutdown(wait=True)
                self.executor = None


@attrs.frozen(eq=False, kw_only=True)
class CheckpointStep(UpdateStep):
    """The step :func:`with_checkpointing` returns; see there.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from loopkit.steps import as_step
    >>> CheckpointStep(inner=as_step(lambda s, b: (s, {})), directory=Path(tmp.name)).name
    'with_checkpointing'
    >>> tmp.cleanup()
    """

    directory: Path
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    train_time_interval: float | None = None  # seconds
    keep_last: int | None = 3
    monitor: str | None = None
    mode: str = "min"
    keep_best: int = 1
    async_save: bool = False
    durable: bool = True
    on_validation: bool = False  # (no trigger given) in a fit that validates other than once at every epoch's end:
    # saves after each validation, not every_n_epochs' epoch ends (Lightning's not _should_save_on_train_epoch_end)
    saver: _Saver = attrs.field(factory=_Saver, repr=False)

    @property
    def name(self) -> str:
        return "with_checkpointing"

    @property
    def agreed_options(self) -> Mapping[str, Any]:
        """What decides where it saves: under DDP a save gathers every rank's running means, a collective (see
        :attr:`loopkit.steps.Step.rank_agreed`)."""
        return {"every_n_steps": self.every_n_steps, "every_n_epochs": self.every_n_epochs,
                "train_time_interval": self.train_time_interval, "monitor": self.monitor,
                "on_validation": self.on_validation}

    # Saving after steps -------------------------------------------------------------------

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if not self.saver.checked:  # the first call in a loop of your own (run_epochs checks at "fit_start")
            if self.saver.began is None:  # (run_epochs sets it at "fit_begin"; nothing a call once checked)
                self.saver.began = (state.step, state.epoch, state.batch_index)
            try:
                self._check_directory(state, agreed=True)
            except StateMismatchError as error:
                raise leave_intact(error, state)  # before the step: nothing of the state changed
            self._finish_rotation((state.step, state.epoch, state.batch_index))
            if self.saver.timed_from is None:  # train_time_interval's clock starts with the loop
                self.saver.timed_from = time.monotonic()
            if ((self.every_n_epochs or self.monitor is not None) and self.every_n_steps is None
                    and self.train_time_interval is None and is_rank_zero()):
                warnings.warn(
                    "with_checkpointing: in a loop of your own only every_n_steps saves by itself: every_n_epochs and "
                    "monitor act at the epoch ends and validations run_epochs tells the step of "
                    "(step.notify('epoch_end', state, record), step.notify('validation_end', state, means)), so "
                    "unless your loop tells it, nothing will be saved; pass every_n_steps=, or call step.save(state) "
                    "at your epoch's end (with every_n_epochs=0 and no monitor: no saves but step.save's, no warning)",
                    RuntimeWarning, stacklevel=4)
        return super().run_(state, batch)

    def after_left_update(self, state: TrainState, metrics: Metrics) -> TrainState:
        """After an inner call that raised after its update (a ``with_logging`` inside whose write failed at a log
        point): under ``run_epochs``, the state marked with the save due at that update (:data:`loopkit.steps.SAVE_DUE`),
        as :meth:`after_update` marks it, so that the fit given that state makes it, after that update's hooks.
        Nothing in a loop of your own. No collective: the failing rank alone is here."""
        if not self.saver.defer or SAVE_DUE in state.extras:
            return state
        if self._due_at_update(state, agreed=False) is None:  # (the reason: found again at the next "fit_begin")
            return state
        return replace_extras(state, {**state.extras, SAVE_DUE: True})

    def after_update(self, state: TrainState, metrics: Metrics) -> TrainState:
        reason = self._due_at_update(state)  # once per update, not per micro-batch
        if reason is not None:
            if self.saver.defer:  # under run_epochs: saved on "save_due", once the callbacks and the outer
                self.saver.due = reason  # transforms (with_logging) have had this call
                extras = extras_copy(state.extras)
                extras[SAVE_DUE] = True
                return replace_extras(state, extras)
            self._save_all_ranks(state, reason, score=None)
        return state

    def _due_at_update(self, state: TrainState, agreed: bool = True) -> str | None:
        """Why a save is due after this update, if one is: ``every_n_steps`` divides the step, or
        ``train_time_interval`` has passed since the fit's start or the last save it made (its clock then restarts,
        as Lightning's ``_last_time_checked``; under DDP rank 0's clock decides: one broadcast an update, but not
        ``agreed``: this rank's own clock, on a failure)."""
        n = self.every_n_steps
        reason = f"every_n_steps={n}" if n and state.step % n == 0 else None
        interval = self.train_time_interval
        if interval is not None:
            now = time.monotonic()
            if self.saver.timed_from is None:
                self.saver.timed_from = now
            due = int(now - self.saver.timed_from >= interval)
            if agreed:
                due = _collective.from_rank_zero(due, who="with_checkpointing",
                                                 what="the broadcast of rank 0's clock (whether train_time_interval passed)")
            if due:
                self.saver.timed_from = now
                reason = reason or f"train_time_interval={interval:g}s"
        return reason

    # Saving on driver events --------------------------------------------------------------

    def on_event(self, event: str, state: TrainState, metrics: Mapping[str, float]) -> None:
        if event == "fit_begin":  # (before a validation a resumed run owes, which may save at this position)
            self.saver.start = self.saver.began = (state.step, state.epoch, state.batch_index)
            self.saver.start_recorded = _recorded(state)
            self.saver.at_validations = (self.on_validation and bool(metrics.get(VALIDATES))
                                         and not metrics.get(VALIDATES_AT_EPOCH_ENDS))
            n = self.every_n_steps
            if SAVE_DUE in state.extras and n and state.step % n == 0:  # a step save this update was due and the run
                self.saver.due = f"every_n_steps={n}"  # that left the state never made: made on the fit's "save_due"
            elif SAVE_DUE in state.extras and self.train_time_interval is not None:  # (a time save, then)
                self.saver.due = f"train_time_interval={self.train_time_interval:g}s"
        elif event == "fit_start":
            self._check_directory(state, agreed=True)  # before the first step: a refused run has lost nothing
            self.saver.timed_from = time.monotonic()  # train_time_interval's clock starts (a resumed fit's afresh)
            self._finish_rotation(self.saver.start)
            self.saver.defer = True
        elif event == "save_due":
            reason, self.saver.due = self.saver.due, None
            if reason is not None:
                self._save_all_ranks(state, reason, score=None)
        elif event == "validation_end":
            if (self.monitor is not None and self.monitor.startswith("val/")) or self.saver.at_validations:
                # an epoch's own validation (the state past the epoch, or a stopped epoch's, recorded at this step):
                # "epoch_end" follows, after which the loggers hold the epoch's rows: scored and saved then
                if (state.batch_index == 0 and state.epoch > 0) or state.extras.get(RECORDED) == state.step:
                    self.saver.epoch_val = dict(metrics)
                elif self.monitor is not None:
                    self._score(state, metrics)
                else:  # a validation mid-epoch (or a resumed run's owed one), as Lightning's on_validation_end saves
                    self._save_all_ranks(state, "validation", score=None)
        elif event == "epoch_end":
            n = self.every_n_epochs
            completed = state.batch_index == 0 and state.epoch > 0  # not a partial epoch cut by max_steps
            due = f"every_n_epochs={n}" if n and completed and state.epoch % n == 0 else None
            if self.saver.at_validations:  # saved if its last update was validated (by its own validation, or by a
                # step validation that stands for it, whose checkpoint this one replaces: the epoch recorded in it)
                due = "validation" if state.extras.get(VALIDATED) == state.step else None
            no_steps = not any(k.startswith("train/") for k in metrics)  # e.g. resumed right at its end
            validated, self.saver.epoch_val = self.saver.epoch_val, None
            if validated is not None and self.monitor is not None:
                self._score(state, validated, due=due)  # one save, after the epoch's rows are written
            elif self.monitor is not None and not self.monitor.startswith("val/") and not no_steps:
                self._score(state, metrics, due=due)  # one save, its score in its meta.json (a kill loses none)
            elif due is not None:
                self._save_all_ranks(state, due, score=None)
        elif event == "stop":
            self._save_all_ranks(state, "stop", score=None)
            self._wait_on_every_rank(self.saver.wait)
        elif event in ("fit_end", "abort"):  # on abort: the saves already started finish
            if event == "fit_end" and state.batch_index != 0 and (
                    self.every_n_steps or self.train_time_interval is not None
                    or (self.every_n_epochs and not self.saver.at_validations)):
                # a fit that ended mid-epoch (max_steps, a callback's stop at a step validation): its end is the
                # newest checkpoint, as Lightning's last one holds it (its epoch-end save comes at such an end; saving
                # at validations, it saves none there: nor does the default then, the epoch's end saved if validated)
                self._save_all_ranks(state, "fit_end", score=None)
            elif event == "fit_end" and state.batch_index != 0 and self.monitor is not None and _recorded(state):
                # the monitor alone saves (keep_last=0, or no every_n_*): a checkpoint its validation took at this
                # update before the epoch was recorded here is replaced by the recorded state, with its score; no
                # checkpoint is added where there was none
                self._save_all_ranks(state, "fit_end", score=None, rerecord_only=True)
            self.saver.defer, self.saver.due, self.saver.epoch_val, self.saver.start = False, None, None, None
            self.saver.began = None
            self.saver.at_validations = False
            self.saver.last, self.saver.last_recorded = None, False  # a later run with this step saves afresh, even
            # at the same position
            self.saver.looked = False  # and its first save looks at the directory again
            self.saver.checked = False
            self.saver.timed_from = None
            if event == "fit_end":
                self._wait_on_every_rank(lambda: self.saver.wait(close=True))
            else:
                self.saver.wait(close=True)

    @staticmethod
    def _wait_on_every_rank(wait: Callable[[], None]) -> None:
        """``wait`` for rank 0's writes, and under DDP have every rank wait for it too (as Lightning's save ends in a
        barrier): a ``restore`` on any rank after the fit then finds its newest checkpoint. A failed write fails
        every rank."""
        failed = False
        try:
            wait()
        except BaseException:
            failed = True
            if not _collective.active():
                raise
            _collective.any_rank(True)
            raise
        if _collective.any_rank(failed):
            raise RuntimeError("with_checkpointing: rank 0 failed to write a checkpoint (its error is in its output)")

    def save(self, state: TrainState, *, reason: str = "manual") -> None:
        """Save ``state`` now (unless this process already saved this very position).

        In the background mode the state is copied at once and written by a thread; call
        :meth:`wait` (or let ``run_epochs`` end) to be sure it is on disk. (Under DDP the saves
        this transform makes itself hold every rank's running means; one you call holds rank 0's. Under
        ``with_fsdp`` every rank must call it: rank 0 tells the others whether it saves, and then the sharded
        state is gathered into its CPU memory, collectives.)
        """
        self._persist(state, reason, score=None)

    def wait(self) -> None:
        """Wait until every save this step started is on disk; raise the error of one that failed."""
        self.saver.wait()

    def _score(self, state: TrainState, metrics: Mapping[str, float], *, due: str | None = None) -> None:
        """Save ``state`` scored by the monitor if the score ranks among the best, or anyway when a save is
        ``due`` (its reason) at this point."""
        if self.monitor not in metrics:
            raise KeyError(f"with_checkpointing: monitor '{self.monitor}' is not among the metrics {sorted(metrics)}")
        value = as_float32(metrics[self.monitor])  # ranked in float32, as Lightning's ModelCheckpoint (and EarlyStopping)
        if math.isnan(value):  # ranked as the worst value, as Lightning's ModelCheckpoint ranks it
            value = _worst(self.mode)
        self._save_all_ranks(state, due or f"monitor {self.monitor}", score=value, due=due is not None)

    def _save_all_ranks(
        self, state: TrainState, reason: str, score: float | None, *, due: bool = True, rerecord_only: bool = False
    ) -> None:
        """A save this transform makes itself, which every rank reaches at the same point: under DDP the
        running sums and records of every rank go into it (:func:`loopkit._window.over_ranks`, a collective), then
        rank 0 writes it (``rerecord_only``: only where it replaces a checkpoint taken before the record,
        :meth:`_plan`)."""
        if not self.saver.checked:  # (a lazy module's shapes are known once a step ran)
            self._check_directory(state, agreed=True)
        extras = over_ranks(state.extras, state.rng, state.model, who="with_checkpointing")
        # the mark of a step save due: only in a checkpoint of an epoch not recorded yet, taken while the save of the
        # fit's last update is held for that record (a relaunch from it makes that save once it records the epoch)
        owed = (self.saver.due is not None and state.batch_index > 0 and state.extras.get(RECORDED) != state.step)
        if owed != (SAVE_DUE in extras):
            extras = {k: v for k, v in extras.items() if k != SAVE_DUE}
            if owed:
                extras[SAVE_DUE] = True
        state = state if extras is state.extras else replace_extras(state, extras)
        self._persist(state, reason, score, due=due, rerecord_only=rerecord_only)

    def _persist(
        self, state: TrainState, reason: str, score: float | None, *, due: bool = True, rerecord_only: bool = False
    ) -> None:
        """Save ``state`` (rank 0) with ``score`` if given; a scored save that is not ``due`` otherwise is
        made only if the score ranks among the best. A fit's first save at the position it began from, which
        the directory's newest checkpoint holds (a relaunch from it: its step save made before the validation
        of that step, or the fit's end), takes that checkpoint as its own, as the uninterrupted run holds it:
        a score goes to it, and the rotation runs. So does its first save of the update it began at, at the
        newest checkpoint's position (a fit given :func:`loopkit.state_at_error` of an epoch's end that failed
        after its save there, a callback's or an outer step's of your own: it records that epoch again): no second
        checkpoint of one position, counted twice by ``keep_best``. (Another run that reaches that position is
        saved anew.) A save
        of a state that holds its epoch's record (max_steps or a stop mid-epoch, recorded at the fit's end) where
        the checkpoint at its position was taken before that record (a graceful stop's, a step validation's, the
        fit's own step save) replaces that checkpoint, carrying its score (:meth:`_rerecorded`): a relaunch from
        it would record the epoch again.

        A state whose model ``with_fsdp`` sharded reaches this on every rank: rank 0 decides first whether it
        writes a checkpoint (the ranking, the position: what it alone knows) and tells the others (one
        broadcast), and only then, only for a save, the state is gathered, into rank 0's CPU memory alone
        (:func:`loopkit.state.full_state_dict_on_rank_zero`): a validation whose score does not rank, or a
        position already saved, gathers nothing. A decision that fails on rank 0 fails every rank."""
        writer = is_rank_zero()
        sharded = is_sharded(core_module(state.model))
        plan: tuple[Position, float | None, str | None, bool] | None = None
        try:
            plan = self._plan(state, reason, score, due, rerecord_only) if writer else None
        except BaseException:
            if sharded and _collective.active():
                _collective.from_rank_zero(_FAILED, who="with_checkpointing", what=_WORD)  # (the others wait for it)
            raise
        state_dict = None
        if sharded:
            word = _collective.from_rank_zero(_SAVE if plan is not None and plan[3] else _NO_SAVE, who="with_checkpointing",
                                              what=_WORD)
            if word == _FAILED:
                raise RuntimeError("with_checkpointing: rank 0 failed to prepare a checkpoint (its error is in its output)")
            if word == _SAVE:
                state_dict = full_state_dict_on_rank_zero(state)  # (a collective: None on the other ranks)
        if plan is None:
            return
        saver = self.saver
        position, score, superseded, fresh = plan
        snap = None
        if fresh:
            snap = self._snapshot(state, reason, score, state_dict)
            saver.last, saver.last_recorded = position, _recorded(state)

        def task() -> None:
            if snap is not None:
                try:
                    saver.names[position] = checkpoint.write(snap, self.directory, durable=self.durable).name
                except BaseException:
                    saver.last, saver.last_recorded = None, False  # let a later save at this position try again
                    raise
            if score is not None and position in saver.names:
                kept = snap is not None or checkpoint.write_late_score(  # written before this score (a step checkpoint
                    self.directory / saver.names[position],  # at the validation's update): kept with it too
                    {"monitor": self.monitor, "mode": self.mode, "value": score}, durable=self.durable,
                )
                if kept:  # (one removed meanwhile, by hand or another writer, has nothing left to score)
                    with saver.lock:
                        self._scores()[saver.names[position]] = score
            # (keep_last=0: an unscored save, a graceful stop's or one of save()'s, stays until the next one)
            protect = saver.names.get(position) if score is None and self.keep_last == 0 else None
            self._prune(write_scores=score is not None, superseded=superseded, protect=protect)

        saver.run(task, self.async_save)

    def _plan(
        self, state: TrainState, reason: str, score: float | None, due: bool, rerecord_only: bool = False
    ) -> tuple[Position, float | None, str | None, bool] | None:
        """Rank 0's decision on a save of ``state`` (see :meth:`_persist`): None for none at all (a lazy model),
        else its position, its score (one carried over from the checkpoint it supersedes), that checkpoint
        and whether a new checkpoint is written (False: the position is saved already, or the score does not
        rank; a score may still go to the position's checkpoint). Nothing is gathered or written here.
        ``rerecord_only`` (a fit's end where only the monitor saves): None unless the save replaces the
        position's checkpoint taken before the epoch's record (:meth:`_rerecorded`)."""
        lazy = _uninitialized(state.model)
        if lazy:  # (nothing trained yet: nothing is lost; checkpoint.save itself refuses such a state)
            warnings.warn(f"with_checkpointing: no checkpoint at step {state.step} ({reason}): the model's lazy "
                          f"modules have not run a forward yet ({', '.join(sorted(lazy)[:3])})", RuntimeWarning,
                          stacklevel=4)
            return None
        position = (state.step, state.epoch, state.batch_index)
        saver = self.saver
        if saver.last is None and saver.began is not None and position[0] == saver.began[0]:
            found = checkpoint.list_checkpoints(self.directory)  # (a first save of the update the fit began at)
            if found and (found[-1].step, found[-1].epoch, found[-1].batch_index) == position:
                saver.last, saver.names[position] = position, found[-1].name
                # (it holds the state the fit began from; or that update's epoch end, which records the epoch)
                saver.last_recorded = saver.start_recorded if position == saver.began else position[2] == 0
        if not saver.checked:  # a save of your own (on rank 0 alone, perhaps: no collective)
            self._check_directory(state, agreed=False)
        if not saver.looked:
            saver.looked = True
            self._warn_of_another_run(position)
        if saver.last == position:
            if saver.last_recorded or not _recorded(state):
                return None if rerecord_only else (position, score, None, False)
            return self._rerecorded(position, score)
        if rerecord_only:
            return None
        if score is not None:
            saver.wait()  # a pending save's score counts in the ranking, as it does without async_save
        if score is not None and not due and not self._ranks(score):
            return None  # not among the best: no need for a checkpoint here
        superseded, carried = self._same_update(position)
        return position, carried if score is None else score, superseded, True

    def _rerecorded(self, position: Position, score: float | None) -> tuple[Position, float | None, str | None, bool]:
        """The plan of a save at ``position`` whose checkpoint (this fit's, or the one it began from) was taken
        before the epoch was recorded there (:func:`_recorded`): the save held for that record (max_steps mid-epoch),
        or the fit's end after a monitored step validation or a graceful stop there. A relaunch from that
        checkpoint would record the epoch again (its ``on_epoch_end``, its history row): a new checkpoint holding
        the record replaces it, with its score (a new one wins), as the uninterrupted run's end holds it."""
        self.saver.wait()  # (its name and score are known once it is written)
        name = self.saver.names.get(position)
        carried = None
        if name is not None and self.monitor is not None:
            with self.saver.lock:
                carried = self._scores().get(name)
        return position, carried if score is None else score, name, True

    def _snapshot(
        self, state: TrainState, reason: str, score: float | None, state_dict: Mapping[str, Any] | None = None
    ) -> checkpoint.Snapshot:
        """The checkpoint of ``state``; a scored one records its score in its ``meta.json`` (written before
        the checkpoint is renamed into place), so a run killed before ``scores.json`` was rewritten loses
        no score: :meth:`_scores` reads it back."""
        snap = checkpoint.snapshot(state, reason=reason, copy=self.async_save, state_dict=state_dict)
        if score is None:
            return snap
        meta = {**snap.meta, "score": {"monitor": self.monitor, "mode": self.mode, "value": score}}
        return attrs.evolve(snap, meta=meta)

    def _same_update(self, position: Position) -> tuple[str | None, float | None]:
        """The checkpoint this run saved of the same update one position earlier (a step save on an epoch's
        last batch, when the epoch's end is saved too), which the save at ``position`` (the next epoch's
        start, what a resumed run continues from) replaces, and the score it carries over; (None, None)
        when there is none. One update is saved once: keep_last counts training points. A fit that has not
        saved yet and began at the directory's newest checkpoint takes that one: a run killed between the two
        saves resumes from the step save and makes the epoch save; one killed after the epoch save, before the
        step save was deleted, resumes from the epoch save and deletes it then (:meth:`_finish_rotation`)."""
        last = self.saver.last
        step, epoch, batch = position
        if batch != 0:
            return None, None
        if last is None:
            found = checkpoint.list_checkpoints(self.directory)
            newest = found[-1] if found else None
            if newest is None or (newest.step, newest.epoch, newest.batch_index) != self.saver.start:
                return None, None
            last, name = self.saver.start, newest.name
        else:
            name = None
        if last[0] != step or last[1] != epoch - 1 or last[2] == 0:
            return None, None
        if name is None:
            self.saver.wait()  # (its name and score are known once it is written)
            name = self.saver.names.get(last)
        if name is None or self.monitor is None:
            return name, None
        with self.saver.lock:
            return name, self._scores().get(name)

    def _check_directory(self, state: TrainState, *, agreed: bool) -> None:
        """Refuse a directory whose newest readable checkpoint is of another model or optimizer (another
        experiment's, given this directory by mistake): keep_last and keep_best would delete it, and
        ``restore`` could no longer load it. Compared by :func:`loopkit.checkpoint.structure` (names and
        shapes of the model's parameters and buffers, the optimizer's class; not the scheduler's: a run may switch
        schedulers between its phases in one folder), read from the
        checkpoint's ``meta.json`` without loading its tensors (an older checkpoint without it: from its payload's keys
        and shapes, memory-mapped). Rank 0, which alone writes, reads the directory; with ``agreed`` (a
        point every rank reaches) every rank raises on its word, so none is left waiting in a collective.
        A model with lazy modules not yet initialised is compared again, shapes and all, later."""
        problem = self._directory_problem(state) if is_rank_zero() else None
        if agreed and _collective.active():
            problem = _collective.gather(problem, who="with_checkpointing", what="the gather of rank 0's check of its directory")[0]
        if problem is not None:
            raise problem
        model = state.model
        self.saver.checked = not any(
            torch.nn.parameter.is_lazy(t) for t in itertools.chain(model.parameters(), model.buffers())
        )

    def _directory_problem(self, state: TrainState) -> Exception | None:
        """Why the newest readable checkpoint in the directory does not fit ``state`` (the error to raise); None when
        it does. One this loopkit cannot read (a newer loopkit's), which restore refuses too, is no fit either."""
        for info in reversed(checkpoint.list_checkpoints(self.directory)):
            try:
                theirs = checkpoint.read_structure(info.path)
            except CheckpointCorruptError:  # an incomplete or damaged one: restore skips it too
                continue
            except CheckpointLoadError as error:
                return CheckpointLoadError(f"with_checkpointing: {self.directory} holds a checkpoint this loopkit "
                                           f"cannot read, which keep_last/keep_best would delete: {error}")
            differs = checkpoint.structure_mismatch(theirs, checkpoint.structure(state), scheduler=False)
            if differs is not None:
                prepared = self.inner.prepare(state)  # a step that reshapes the model at its first call (with_qat)
                if prepared is not state:
                    differs = checkpoint.structure_mismatch(theirs, checkpoint.structure(prepared), scheduler=False)
            if differs is None:
                return None
            return StateMismatchError(
                f"with_checkpointing: {self.directory} holds checkpoints of another model or optimizer: "
                f"the newest, {info.name}, does not fit this state ({differs}); this run's checkpoints would be "
                "mixed with them, and keep_last/keep_best would delete them. Give this run a directory of its "
                "own, or delete the old checkpoints (that directory) if they are no longer needed"
            )
        return None

    def _warn_of_another_run(self, position: Position) -> None:
        """A first save behind the newest checkpoint already there, or at its very position when this run did not
        begin from it (a fresh run of as many steps): those are another run's (the same script run again), which
        keep_last, keep_best and ``restore`` would mix with this one's. (A run resumed from that checkpoint began
        there, and is not warned about, nor one that began at its update, whose epoch's end it saves again
        (:meth:`_persist`: a retry from ``state_at_error``); nor is a save of your own before any step, which may
        be of the state just restored.) Or a first save beside another trainer's checkpoints
        (:func:`loopkit.checkpoint._foreign_checkpoints`), which restore does not load."""
        foreign = checkpoint._foreign_checkpoints(self.directory)
        if foreign is not None:
            warnings.warn(
                f"with_checkpointing: {self.directory} holds {foreign}, which look like checkpoints of another kind "
                "(Lightning's *.ckpt, a torch.save file), and no loopkit checkpoint: this run saves its own beside "
                "them (loopkit.restore does not load those); give each run a directory of its own",
                RuntimeWarning,
                stacklevel=2,
            )
        found = checkpoint.list_checkpoints(self.directory)
        newest = max(found, key=lambda c: (c.step, c.epoch, c.batch_index), default=None)
        if newest is None:
            return
        theirs = (newest.step, newest.epoch, newest.batch_index)
        if theirs > position:
            where = f"checkpoints further along ({newest.name}) than this run (step {position[0]})"
        elif theirs == position and self.saver.began is not None and self.saver.began[0] != position[0]:
            where = (f"a checkpoint at this run's first save ({newest.name}, step {position[0]}), which this run "
                     f"did not begin from (it began at step {self.saver.began[0]})")
        else:
            return
        warnings.warn(
            f"with_checkpointing: {self.directory} holds {where}: another run's, or a later point of this one it "
            "went back from; keep_last and keep_best rank this run's checkpoints with them, and loopkit.restore "
            "may return theirs: give each run a directory of its own, or empty it",
            RuntimeWarning,
            stacklevel=2,
        )

    # Which checkpoints to keep -------------------------------------------------------------

    def _finish_rotation(self, start: Position | None) -> None:
        """Finish the rotation a kill cut short, when a fit begins at ``start``, the position of the
        directory's newest checkpoint (a relaunch from it: what ``restore`` returned). The save that wrote that
        checkpoint was followed by its :meth:`_prune`, which a kill may have stopped anywhere after the rename:
        before ``scores.json`` was rewritten, or before or between the deletions. Run again here, on the same
        checkpoints and scores (a scored checkpoint holds its score in its ``meta.json``), it leaves the folder
        the uninterrupted run left, before this fit ranks or saves anything: the step save of the same update
        that the newest replaced (:meth:`_same_update`; left there, it would tie with the newest's carried
        score and, the older, outrank it, then keep_last would remove the newest instead), and what keep_last
        and keep_best no longer keep (which stayed for good when the relaunch saved nothing more), are removed;
        ``scores.json`` is rewritten where that save's rewrite was lost (the newest is scored and it is not
        recorded there). The newest stays (under ``keep_last=0`` an unscored one stays until the next save, as
        :meth:`_persist` keeps it). Rank 0 only; not for a lazy model not compared yet (:meth:`_check_directory`),
        nor a fit that begins elsewhere (a fresh run, or one restored from an older checkpoint): its first save
        rotates, as before. Run where a fit starts (``"fit_start"``; in a loop of your own, at the first call)."""
        if start is None or not is_rank_zero() or not self.saver.checked:
            return
        self.saver.wait()  # (a save the owed validation made here, in the background: its rotation first)
        found = checkpoint.list_checkpoints(self.directory)
        if not found or (found[-1].step, found[-1].epoch, found[-1].batch_index) != start:
            return
        newest = found[-1]
        step, epoch, batch = start
        superseded = next((c.name for c in found[:-1] if batch == 0 and c.step == step and c.epoch == epoch - 1
                           and c.batch_index != 0), None)
        unwritten = False
        if self.monitor is not None:
            with self.saver.lock:
                value = self._scores().get(newest.name)
            recorded = checkpoint.read_scores(self.directory).get("scores", {})
            unwritten = value is not None and recorded.get(newest.name) != value
        self._prune(write_scores=unwritten, superseded=superseded, protect=newest.name)

    def _scores(self) -> dict[str, float]:
        """The scores of the checkpoints in the directory (loaded on first use: :func:`loopkit.checkpoint.scores`)."""
        saver = self.saver
        if saver.scores is None:
            saver.scores = checkpoint.scores(self.directory, self.monitor, self.mode)  # type: ignore[arg-type]
        return saver.scores

    def _ranks(self, score: float) -> bool:
        """Whether ``score`` would be among the best ``keep_best`` recorded so far."""
        if self.keep_best == 0:
            return False
        there = {c.name for c in checkpoint.list_checkpoints(self.directory)}  # (not one removed meanwhile)
        with self.saver.lock:
            values = sorted(v for n, v in self._scores().items() if n in there and checkpoint._ranked(v))
        if self.mode == "max":
            values.reverse()
        if len(values) < self.keep_best:
            return True
        worst = values[self.keep_best - 1]
        return score < worst if self.mode == "min" else score > worst

    def _prune(self, *, write_scores: bool, superseded: str | None = None, protect: str | None = None) -> None:
        """Remove what keep_last and keep_best do not keep (and ``superseded``, a checkpoint of the same update);
        ``protect`` stays (a graceful stop's save under ``keep_last=0``). The saver's names of the checkpoints that
        do not stay go too: it holds those kept, however many saves a long fit makes.

        ``scores.json`` is rewritten first, then checkpoints are removed: a run killed anywhere in between
        has lost no checkpoint that it keeps (the scores of those still there are also in their
        ``meta.json``; those of checkpoints already gone are dropped on the next load).
        """
        found = [c for c in checkpoint.list_checkpoints(self.directory) if c.name != superseded]
        names = [c.name for c in found]
        keep = set(names if self.keep_last is None else names[max(len(names) - self.keep_last, 0):])
        if protect is not None:
            keep.add(protect)
        if self.monitor is not None:
            keep.update(self._kept_by_score(names))
        doomed = [c for c in found if c.name not in keep]
        with self.saver.lock:  # (the positions of those gone: no later score or rotation looks them up)
            saved = self.saver.names
            for position in [p for p, name in saved.items() if name not in keep]:
                del saved[position]
        if self.monitor is not None:
            with self.saver.lock:
                scores = self._scores()
                stale = [n for n in scores if n not in keep]
                for name in stale:
                    del scores[name]
                data = {"monitor": self.monitor, "mode": self.mode, "scores": dict(scores)}
            if write_scores or stale:
                checkpoint.write_scores(self.directory, data)
        if superseded is not None:
            self._remove(self.directory / superseded)
        for info in doomed:
            self._remove(info.path)

    def _kept_by_score(self, names: list[str]) -> list[str]:
        """The ``keep_best`` checkpoints among ``names`` with the best scores (ties: the older first)."""
        with self.saver.lock:
            scores = self._scores()
            ranked = sorted((v, n) for n, v in scores.items() if n in names and checkpoint._ranked(v))
        if self.mode == "max":
            ranked.sort(key=lambda item: -item[0])
        return [n for _, n in ranked[: self.keep_best]]

    def _remove(self, path: Path) -> None:
        """Remove one checkpoint; one already gone was removed by another writer of this directory (told once), and
        an entry named like one that is none (a stray file, which restore skips too) is left, with a warning."""
        try:
            removed = checkpoint.remove(path, missing_ok=True)
        except ValueError as error:  # (checkpoint.remove deletes nothing that is no checkpoint)
            warnings.warn(f"with_checkpointing: leaving {path.name} in {self.directory}, which keep_last/keep_best "
                          f"would remove: {error}", RuntimeWarning, stacklevel=2)
            return
        if removed or self.saver.told_shared:
            return
        self.saver.told_shared = True
        warnings.warn(
            f"with_checkpointing: checkpoint {path.name} was already removed from {self.directory}: another "
            "process seems to write checkpoints there too; give each run a directory of its own (its "
            "rotation and this one's delete each other's checkpoints)",
            RuntimeWarning,
            stacklevel=2,
        )


def _recorded(state: TrainState) -> bool:
    """Whether ``state`` holds its epoch's record: at an epoch's start (the epoch before it done), or mid-epoch once
    ``run_epochs`` recorded the epoch at this update (:data:`loopkit.steps.RECORDED`: max_steps, a stop)."""
    return state.batch_index == 0 or state.extras.get(RECORDED) == state.step


def _check_count(name: str, value: Any, *, allow_none: bool, minimum: int = 1) -> int | None:
    """``value`` as a Python int (numpy's too), refused below ``minimum``."""
    if value is None and allow_none:
        return None
    count = as_int(value)
    if count is None or count < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"with_checkpointing: {name} must be {what}{' or None' if allow_none else ''}, got {value!r}")
    return count


def _check_interval(value: Any) -> float | None:
    """``train_time_interval`` in seconds: a positive ``datetime.timedelta`` or number, or None.

    >>> _check_interval(datetime.timedelta(minutes=30)), _check_interval(90), _check_interval(None)
    (1800.0, 90.0, None)
    """
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else as_real(value)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("with_checkpointing: train_time_interval must be a positive datetime.timedelta or number of "
                         f"seconds, or None, got {value!r}")
    return float(seconds)


def _prepare_directory(directory: Path) -> None:
    """Create the directory now, so that a bad path fails when the step is built, not hours later."""
    if not is_rank_zero():
        return
    try:
        checkpoint.make_directory(directory)
    except OSError as error:  # (a file on the path, a read-only file system: named as with_checkpointing's)
        raise type(error)(error.errno, f"with_checkpointing: cannot make the folder {str(directory)!r} for its "
                          f"checkpoints: {error.strerror or error}") from error
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, f"with_checkpointing: cannot write checkpoints in {directory}: permission denied"
        )


def _options(step: CheckpointStep) -> str:
    """A checkpointer's saving and keeping options, as given (``every_n_steps=1, keep_last=1``).

    >>> _options(CheckpointStep(inner=None, directory=Path("ck"), every_n_steps=5, keep_last=1))
    'every_n_steps=5, keep_last=1'
    """
    given = {"every_n_steps": step.every_n_steps, "every_n_epochs": None if step.on_validation else step.every_n_epochs,
             "train_time_interval": step.train_time_interval, "monitor": step.monitor,
             "keep_best": step.keep_best if step.monitor is not None else None}
    return ", ".join([f"{k}={v!r}" for k, v in given.items() if v is not None] + [f"keep_last={step.keep_last!r}"])


def _refuse_one_directory_twice(inner: Any, path: Path, options: str) -> None:
    """A ``with_checkpointing`` inside ``inner`` saving into ``path`` too: each one's rotation (``keep_last``,
    ``keep_best``) would delete the other's checkpoints, the best-scored among them; refused naming both."""
    here = os.path.realpath(path)
    while isinstance(inner, WrapperStep):
        if isinstance(inner, CheckpointStep) and os.path.realpath(inner.directory) == here:
            raise ValueError(
                f"with_checkpointing: this one ({options}) and the with_checkpointing inside it ({_options(inner)}) "
                f"both save into {str(path)!r}, and each one's keep_last/keep_best would delete the other's "
                "checkpoints (the best-scored among them); a directory belongs to one checkpointer. For Lightning's "
                "two ModelCheckpoints (the newest every N steps, and the best by a metric) use one: "
                "with_checkpointing(step, directory, every_n_steps=N, keep_last=1, monitor='val/loss', keep_best=1) "
                "keeps the newest and the best; or give each its own directory"
            )
        inner = inner.inner


def with_checkpointing(
    step: Any,
    directory: str | os.PathLike,
    *,
    every_n_steps: int | None = None,
    every_n_epochs: int | None = None,
    train_time_interval: datetime.timedelta | float | None = None,
    keep_last: int | None = 3,
    monitor: str | None = None,
    mode: str = "min",
    keep_best: int = 1,
    async_save: bool = False,
    durable: bool = True,
) -> CheckpointStep:
    """Save atomic checkpoints of the whole state into ``directory`` while ``step`` trains.

    A checkpoint holds everything an exact resume needs: model, optimizer, scheduler,
    step / epoch / batch index, the step's RNG, every transform's extras (loss scale,
    accumulation counter and partial gradients, ...) and the global RNGs (torch, CUDA,
    NumPy, Python). :func:`loopkit.restore` loads the newest intact one; ``run_epochs``
    given the restored state continues mid-epoch with the same batches, and the run ends
    bitwise equal to one that never stopped.

    * ``every_n_steps``: save when ``state.step`` (optimizer updates) reaches a multiple of
      n — once per update, so under ``with_grad_accum`` not on every micro-batch. Under
      ``run_epochs`` the save is made after the call and the batch's callbacks (the driver
      sends ``"save_due"``), so it holds what every outer transform and stateful callback kept
      of that batch; in a loop of your own, inside the call. A call that raises after its update (a
      ``with_logging`` inside whose write failed at a log point) leaves the save due there marked in
      :func:`loopkit.state_at_error`'s state: ``run_epochs`` given that state makes it, after that update's hooks.
    * ``every_n_epochs``: save after every n-th completed epoch (driver's ``epoch_end``).
      ``every_n_epochs=0`` saves at no epoch's end (only :meth:`CheckpointStep.save` and a graceful stop
      then save).
    * Without ``every_n_steps``, ``train_time_interval`` and ``monitor``, and ``every_n_epochs`` 1 or not given, it
      saves as Lightning's
      ``ModelCheckpoint()`` does: under ``run_epochs`` after every validation of a fit that validates other than
      once at every epoch's end (``val_every_n_steps``, or ``val_every_n_epochs`` other than 1: a
      mid-epoch one where it ran, an epoch's own once the epoch is recorded; an
      epoch whose last update a step validation saw is saved at its end too, that checkpoint replaced; the end of
      a fit ``max_steps`` cuts mid-epoch is saved only if validated there), and after every epoch of a fit that
      validates only at every epoch's end, or not at all (an epoch ``max_steps`` cuts short included, at the fit's
      end), as Lightning's ``_should_save_on_train_epoch_end`` decides (in a loop of your own: ``every_n_epochs=1``).
    * ``train_time_interval`` (a ``datetime.timedelta``, or seconds): save after the first update at which
      that much time (``time.monotonic``) has passed since the fit started or since the last save it made, as
      Lightning's ``ModelCheckpoint(train_time_interval=...)`` (for long epochs). The clock starts at the fit's
      start (a resumed fit's too: time before a relaunch does not count) or, in a loop of your own, at the first
      call. Checked at updates, as ``every_n_steps`` (Lightning checks at every batch's end, micro-batches of an
      accumulation included); it may be combined with the other triggers (Lightning refuses that). Under DDP rank
      0's clock decides (one small broadcast each update, as Lightning's).
    * ``monitor`` (e.g. ``"val/loss"``), ``mode`` (``"min"``/``"max"``): also keep the
      ``keep_best`` checkpoints with the best value, besides the last ``keep_last``
      (None keeps all; 0 keeps the best alone, as Lightning's ``ModelCheckpoint(monitor=...,
      save_top_k=k)`` without ``save_last``: then an unscored save, a graceful stop's (what a
      relaunch resumes from) or one of :meth:`CheckpointStep.save`, is kept until the next save; a fit ending
      mid-epoch at an update its validation saved replaces that checkpoint, score kept, by the state holding the
      epoch's record, so a relaunch from it does not record the epoch again). A ``val/`` metric is read after each validation, any other
      (``train/loss``) after each epoch; a validation at a position not yet saved saves
      one only when it ranks among the best. Scores are rounded to float32 (as Lightning's logged metrics, and
      :class:`loopkit.EarlyStopping`'s checks, are) before they are ranked and recorded: 0.2999999999 after 0.3
      is no better, and the older checkpoint stays the best. With a monitor, ``keep_best`` is at least 1
      (0 would keep nothing for the score: leave ``monitor`` out instead); without one it
      is unused.
    * On a graceful stop (SIGTERM/SIGINT under ``run_epochs``) it saves the current state.
    * ``async_save``: copy the state to CPU memory at once and write it in a background
      thread; the step then waits only for the copy (and for the previous save, if still
      running). Errors of a background save are raised at the next save or at the end.
    * ``durable=False``: no fsync (see :func:`loopkit.checkpoint.save`): a save costs about a
      bare ``torch.save``, and a checkpoint survives a killed process but not a power loss.

    Apply it outermost (``with_checkpointing(with_logging(...), ...)``): what it saves is
    the state after every transform inside it has done its part of the step (under
    ``run_epochs`` its step saves see the outer ones' part too). The directory
    belongs to one run and one checkpointer: old checkpoints there are pruned by the same rules, and a second
    ``with_checkpointing`` of it inside is refused (each one's rotation would delete the other's checkpoints): for
    Lightning's two ``ModelCheckpoint`` callbacks, the newest and the best, one
    ``with_checkpointing(step, directory, every_n_steps=n, keep_last=1, monitor="val/loss", keep_best=1)`` keeps
    both, or give each its own directory. A directory whose
    newest checkpoint is of another model or optimizer (other parameter or buffer names
    or shapes, another optimizer class; a scheduler switched between phases of a run is not) is refused with a
    :class:`loopkit.StateMismatchError` naming it and the first difference, before the first
    step (under ``run_epochs`` when the fit starts, in a loop of your own at the first call),
    so that nothing of the other run's is deleted. Only rank 0
    writes under ``torch.distributed``. The directory is created now, so a path without
    permission fails here, naming it.

    The step pickles and deep-copies, as every transform's does (a whole pipeline may go to
    ``torch.multiprocessing.spawn`` in ``args=``). A copy starts as a new ``with_checkpointing`` of the same
    directory and options would, none of this process's bookkeeping carried over (the checkpoints it saved, their
    scores, the last position saved): the directory is what it knows, so one taken mid-fit and run in another
    process (restoring from the directory) saves, rotates and ranks as a relaunch of the run does. A pending
    ``async_save`` is waited for first (its error, if it failed, raised by the copy, as by the next save).

    >>> import tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> from loopkit.checkpoint import list_checkpoints, restore
    >>> root = tmp.name
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_checkpointing(train_step(lambda m, b: m(b).pow(2).mean()), root, every_n_steps=2, keep_last=2)
    >>> for _ in range(6):
    ...     state, _ = step(state, torch.ones(4, 2))
    >>> [c.step for c in list_checkpoints(root)]
    [4, 6]
    >>> fresh = TrainState.create(torch.nn.Linear(2, 1))
    >>> fresh = TrainState.create(fresh.model, torch.optim.SGD(fresh.model.parameters(), lr=0.1))
    >>> resumed = restore(fresh, root)
    >>> resumed.step, bool(torch.equal(resumed.model.weight, state.model.weight))
    (6, True)
    >>> tmp.cleanup()
    """
    every_n_steps = _check_count("every_n_steps", every_n_steps, allow_none=True)
    every_n_epochs = _check_count("every_n_epochs", every_n_epochs, allow_none=True, minimum=0)
    seconds = _check_interval(train_time_interval)
    # Lightning's ModelCheckpoint() (every_n_epochs=1 given or not) saves after each validation of a fit that
    # validates other than once at every epoch's end, else after each epoch (no trigger saved nothing in a whole fit)
    on_validation = every_n_steps is None and every_n_epochs in (None, 1) and seconds is None and monitor is None
    if on_validation:
        every_n_epochs = 1
    every_n_epochs = every_n_epochs or None  # 0: no epoch saves, as Lightning's every_n_epochs=0
    keep_last = _check_count("keep_last", keep_last, allow_none=True, minimum=0)
    keep_best = _check_count("keep_best", keep_best, allow_none=False, minimum=0)
    if mode not in ("min", "max"):
        raise ValueError(f"with_checkpointing: mode must be 'min' or 'max', got {mode!r}")
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise ValueError(f"with_checkpointing: monitor must be a metric name such as 'val/loss', got {monitor!r}")
    if keep_last == 0 and monitor is None:
        raise ValueError("with_checkpointing: keep_last=0 keeps only the best-scored checkpoints, and without a "
                         "monitor none is scored: give monitor= (Lightning's save_top_k with its monitor), or keep_last >= 1")
    if keep_last == 0 and (every_n_steps or every_n_epochs or seconds is not None):
        trigger = "every_n_steps" if every_n_steps else "every_n_epochs" if every_n_epochs else "train_time_interval"
        raise ValueError(
            f"with_checkpointing: keep_last=0 keeps only the best-scored checkpoints, so the saves of "
            f"{trigger} (unscored) would be removed as soon as written: "
            "leave it out (the monitor's validations save what ranks), or keep the newest with keep_last >= 1"
        )
    if monitor is not None and keep_best == 0:
        raise ValueError(
            f"with_checkpointing: keep_best=0 with monitor={monitor!r} keeps no checkpoint for its score, so the "
            "monitor would do nothing; give keep_best >= 1, or leave monitor out (keep_last alone decides what stays)"
        )
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"with_checkpointing: directory must be a path, got {type(directory).__qualname__}")
    inner = require_step(step, "with_checkpointing", no_eval="an evaluation step changes no state to save")
    path = Path(directory)
    made = CheckpointStep(
        inner=inner,
        directory=path,
        every_n_steps=every_n_steps,
        every_n_epochs=every_n_epochs,
        train_time_interval=seconds,
        keep_last=keep_last,
        monitor=monitor,
        mode=mode,
        keep_best=keep_best,
        async_save=bool(async_save),
        durable=bool(durable),
        on_validation=on_validation,
    )
    _refuse_one_directory_twice(inner, path, _options(made))
    _prepare_directory(path)
    return made

