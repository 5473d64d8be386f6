"""Running means of metric tensors kept in ``state.extras``, so that a checkpoint carries them.

``with_logging``'s window (the last n steps) and ``run_epochs``' epoch means are both one
:class:`Window`: each call's metrics dict is appended to an immutable tuple (no tensor work,
no host sync), every ``fold_every`` records are summed on the device into one float32 sum per
metric, and the means are read in one transfer when asked for. A record carrying ``with_nan_guard``'s skip flag
(:data:`SKIPPED`) weighs ``1 - flag``: a call the guard skipped adds nothing to the means (its NaN loss, its
gradient norm), nor do the micro-batches of an accumulation group whose update it skipped (the records before the
flagged one, held back from a fold until it comes), weighed on the device (:func:`loopkit._collective.fold`); the
flag's own mean is the fraction of updates skipped.

>>> import torch
>>> w = Window("demo/sums", "demo/counts", "demo/pending", "demo")
>>> extras = w.add({}, {"loss": torch.tensor(1.0)})
>>> w.means(w.add(extras, {"loss": torch.tensor(3.0)}))
{'loss': 2.0}
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch

from loopkit import _collective
from loopkit.state import TrainState, extras_copy, leave_intact, persistent_buffers, replace_extras
from loopkit.tree import to_device

__all__ = [
    "EPOCH", "LOGGED", "OVER_RANKS", "SKIPPED", "Window", "guarded", "is_epoch_record", "leave_updated",
    "left_metrics", "over_ranks", "own_buffers", "own_rng", "own_share",
]

Metrics = Mapping[str, Any]

#: the metric of a call's skip flag (``with_nan_guard``'s): a record carrying it weighs ``1 - flag`` in the means
SKIPPED = "nan_guard/skipped"


@attrs.frozen
class Window:
    """The extras keys of one window of running means, how often it folds, and ``owner``, the transform or
    driver that keeps it (named where its means over the ranks fail), with ``advice`` on calling it on every rank."""

    sums: str
    counts: str
    pending: str
    owner: str
    advice: str = ""
    fold_every: int = 32
    #: the records are a ``with_nan_guard``-ed step's (:func:`guarded`): at a fold, the records after the last one
    #: carrying the skip flag are held back, all of them where none does (an accumulation group longer than
    #: ``fold_every``, whose update, which flags them all, is to come)
    holds_open_groups: bool = False

    @property
    def keys(self) -> tuple[str, str, str]:
        return (self.sums, self.counts, self.pending)

    def holds(self, extras: Mapping[str, Any]) -> bool:
        """Whether ``extras`` has this window (records or sums), empty or not."""
        return self.pending in extras or self.sums in extras

    def records(self, extras: Mapping[str, Any]) -> tuple[Metrics, ...]:
        """The records not yet summed (a checkpoint gives them back as a mapping ``"0"``, ``"1"``, ...)."""
        pending = extras.get(self.pending, ())
        if type(pending) is tuple:
            return pending
        return tuple(pending[k] for k in sorted(pending, key=int))

    def add(self, extras: Mapping[str, Any], record: Metrics) -> Mapping[str, Any]:
        """``extras`` (a new read-only mapping) with ``record`` added; nothing existing is changed."""
        pending = extras.get(self.pending, ())
        pending = (pending if type(pending) is tuple else self.records(extras)) + (record,)
        new = extras_copy(extras)
        if len(pending) < self.fold_every:
            new[self.pending] = pending
        else:
            folded, held = _groups_ended(pending, self.holds_open_groups)
            new[self.sums], new[self.counts] = self._fold(extras, folded)
            new[self.pending] = held
        return types.MappingProxyType(new)

    def start(self, extras: Mapping[str, Any]) -> Mapping[str, Any]:
        """``extras`` with this window present (empty if it was not there)."""
        if self.holds(extras):
            return extras
        new = extras_copy(extras)
        new[self.pending] = ()
        return types.MappingProxyType(new)

    def clear(self, extras: Mapping[str, Any]) -> Mapping[str, Any]:
        """``extras`` without this window."""
        return types.MappingProxyType({k: v for k, v in extras.items() if k not in self.keys})

    def means(self, extras: Mapping[str, Any], *, reduce: bool = True) -> dict[str, float]:
        """Each metric's mean over the window, read in one transfer (over all ranks when ``reduce``)."""
        sums, counts = self._fold(extras, self.records(extras))
        return _collective.means(sums, counts, who=self.owner, advice=self.advice, reduce=reduce)

    def _fold(self, extras: Mapping[str, Any], pending: tuple[Metrics, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
        return _collective.fold(extras.get(self.sums, {}), extras.get(self.counts, {}), pending, skip_flag=SKIPPED)


def _groups_ended(
    pending: tuple[Metrics, ...], holds_open_groups: bool = False
) -> tuple[tuple[Metrics, ...], tuple[Metrics, ...]]:
    """``pending`` split into the records to fold now and those held back: after the last record carrying the skip
    flag, those without it (the micro-batches of an accumulation group whose update, which flags them all, is to come);
    where none carries it, all of them with ``holds_open_groups`` (a guarded step's group longer than the fold),
    else none.

    >>> _groups_ended(({"loss": 1, SKIPPED: 0}, {"loss": 2}))
    (({'loss': 1, 'nan_guard/skipped': 0},), ({'loss': 2},))
    >>> _groups_ended(({"loss": 1}, {"loss": 2}))[1]  # (no flag: nothing held)
    ()
    >>> _groups_ended(({"loss": 1}, {"loss": 2}), holds_open_groups=True)[0]  # (a guarded step's open group: all held)
    ()
    """
    last = next((i for i in range(len(pending) - 1, -1, -1) if SKIPPED in pending[i]), None)
    if last is None:
        return ((), pending) if holds_open_groups else (pending, ())
    return pending[: last + 1], pending[last + 1:]


def guarded(window: Window, step: Any) -> Window:
    """``window`` as ``step``'s records need it: holding open accumulation groups back from its folds where the step
    is ``with_nan_guard(policy="skip")``-ed (a skipped group's micro-batches are left out of the means with it, however
    long); ``policy="raise"`` reports no skip flag, so nothing would ever fold.

    >>> from loopkit import train_step, with_nan_guard
    >>> guarded(EPOCH, with_nan_guard(train_step(lambda m, b: None))).holds_open_groups, guarded(EPOCH, None) is EPOCH
    (True, True)
    >>> guarded(EPOCH, with_nan_guard(train_step(lambda m, b: None), policy="raise")) is EPOCH
    True
    """
    if ("with_nan_guard policy", "skip") in getattr(step, "rank_agreed", ()):
        return attrs.evolve(window, holds_open_groups=True)
    return window


#: ``run_epochs``' epoch means, kept in ``state.extras`` while an epoch runs: a checkpoint taken
#: mid-epoch carries them, so a resumed run's epoch means are the uninterrupted run's
EPOCH = Window("run_epochs/epoch_sums", "run_epochs/epoch_counts", "run_epochs/epoch", "run_epochs", fold_every=32)

#: ``with_logging``'s window of the calls since its last log
LOGGED = Window("logging/window", "logging/counts", "logging/pending", "with_logging",
                " (call the step with_logging wraps on every rank, as many times)", fold_every=32)

#: the attribute an error carries with the metrics of the call whose updated state it left whole (:func:`leave_updated`)
_LEFT_METRICS = "_loopkit_left_metrics"


def leave_updated(error: BaseException, new: TrainState, metrics: Metrics, epoch: Window = EPOCH) -> BaseException:
    """Mark ``error``, raised by a step call after its update (a logger's write, a profiler's trace failed), as leaving
    ``new``, that update's state, whole (:func:`loopkit.state_at_error`); returns ``error``. The call's ``metrics``,
    returned to no one, are kept as a returned call's are: under ``run_epochs`` (its epoch means in
    ``new``'s extras, ``epoch``: :func:`guarded` for the step that made them) added to those means, as the driver adds
    them once a step returns, and carried on ``error`` (:func:`left_metrics`) for a ``with_logging`` outside, which
    adds them to its window. A fit given the state goes on at the next batch; its epoch means and rows are the
    uninterrupted run's. Only on a failure.

    >>> import torch
    >>> state = TrainState.create(torch.nn.Linear(1, 1)).evolve(extras=EPOCH.start({}))
    >>> error = leave_updated(OSError("disk full"), state, {"loss": torch.tensor(2.0)})
    >>> from loopkit.state import state_at_error
    >>> EPOCH.means(state_at_error(error).extras), sorted(left_metrics(error))
    ({'loss': 2.0}, ['loss'])
    """
    if metrics and epoch.holds(new.extras):
        new = replace_extras(new, epoch.add(new.extras, metrics))
    leave_intact(error, new)
    try:
        setattr(error, _LEFT_METRICS, dict(metrics) if metrics else {})
    except AttributeError:  # (an exception type without attributes: leave_intact could mark nothing either)
        pass
    return error


def left_metrics(error: BaseException) -> Metrics | None:
    """The metrics of the call whose updated state ``error`` left whole (:func:`leave_updated`), or None.

    >>> left_metrics(ValueError("x")) is None
    True
    """
    return getattr(error, _LEFT_METRICS, None)


#: an extras key of a checkpoint written under DDP: the windows of the ranks other than 0 (rank 0's are
#: its own), ``{"world_size": n, "ranks": {"1": {window key: value}, ...}}``; in the earlier form, ``True``:
#: rank 0's windows held every rank's records, summed
OVER_RANKS = "windows/over_ranks"


def over_ranks(
    extras: Mapping[str, Any], rng: Mapping[str, torch.Tensor] | None = None, model: torch.nn.Module | None = None,
    *, who: str = "a checkpoint's save",
) -> Mapping[str, Any]:
    """``extras`` for a checkpoint, with every other rank's windows, RNG (``state.rng``) and ``model``'s
    persistent buffers as they are under DDP (a collective every rank must call at the same point). Only
    rank 0 writes checkpoints: with its own windows alone a resumed run's means would lose the other
    ranks' records, with its own RNG a rank seeded otherwise (``seed=s + rank``) would draw rank 0's
    dropout masks, and with its own buffers a validation before the next training forward (which
    broadcasts rank 0's) would read rank 0's BatchNorm statistics; :func:`own_share`, :func:`own_rng` and
    :func:`own_buffers` give each rank its own back on restore, so the resumed run is the uninterrupted
    one, bit for bit. In one process the windows are marked as one rank's, so that a run resumed on
    several ranks takes their records once (rank 0 takes them, weighed as its updates are, the others start empty).
    A failed gather (another rank died) raises :func:`loopkit._collective.failure`'s error naming ``who`` saves.

    >>> import torch
    >>> extras = EPOCH.add({}, {"loss": torch.tensor(2.0)})
    >>> over_ranks(extras)[OVER_RANKS]
    {'world_size': 1, 'ranks': {}}
    >>> over_ranks({"other": 1})  # (nothing to mark)
    {'other': 1}
    """
    held = [w for w in (EPOCH, LOGGED) if w.holds(extras)]
    if not _collective.active():
        if not held:
            return extras
        new = extras_copy(extras)
        new[OVER_RANKS] = {"world_size": 1, "ranks": {}}
        return types.MappingProxyType(new)
    mine: dict[str, Any] | None = None  # rank 0 keeps its own in place: it sends nothing
    if not _collective.is_rank_zero():
        mine = {}
        for window in held:
            for key in (window.sums, window.counts):
                if key in extras:
                    mine[key] = to_device(extras[key], "cpu")
            mine[window.pending] = to_device(window.records(extras), "cpu")
        if rng:
            mine[_RNG] = dict(rng)
        if model is not None:
            mine[_BUFFERS] = {name: b.detach().cpu() for name, b in persistent_buffers(model)}
    gathered = _collective.gather(mine, who=who, what="the save's gather of every rank's running means, RNG and buffers",
                                  to_rank_zero=True)
    if gathered is None:  # not rank 0, which alone writes checkpoints
        return extras
    new = extras_copy(extras)
    new[OVER_RANKS] = {"world_size": len(gathered), "ranks": {str(r): part for r, part in enumerate(gathered) if r}}
    return types.MappingProxyType(new)


#: the keys of a rank's RNG (its ``state.rng``) and persistent buffers among its saved parts in :data:`OVER_RANKS`
_RNG, _BUFFERS = "rng", "buffers"


def own_buffers(extras: Mapping[str, Any], rank: int, world_size: int) -> Mapping[str, torch.Tensor] | None:
    """This rank's persistent buffers as saved by :func:`over_ranks` (None for rank 0, whose buffers are the
    checkpoint's model's, and when the checkpoint has none for it: another number of ranks, an older one).

    >>> own_buffers({OVER_RANKS: {"world_size": 2, "ranks": {"1": {"buffers": {"bn.running_mean": 0.5}}}}}, 1, 2)
    {'bn.running_mean': 0.5}
    """
    part = _own_part(extras, rank, world_size)
    return dict(part[_BUFFERS]) if _BUFFERS in part else None


def own_rng(extras: Mapping[str, Any], rank: int, world_size: int) -> Mapping[str, torch.Tensor] | None:
    """This rank's ``state.rng`` as saved by :func:`over_ranks` (None for rank 0, whose RNG is the
    state's own, and when the checkpoint has none for it: another number of ranks, or an older checkpoint).

    >>> own_rng({OVER_RANKS: {"world_size": 2, "ranks": {"1": {"rng": {"cpu": "state"}}}}}, 1, 2)
    {'cpu': 'state'}
    """
    part = _own_part(extras, rank, world_size)
    return dict(part[_RNG]) if _RNG in part else None


def _own_part(extras: Mapping[str, Any], rank: int, world_size: int) -> Mapping[str, Any]:
    """What :func:`over_ranks` saved of this rank (nothing for rank 0 and for another number of ranks)."""
    saved = extras.get(OVER_RANKS)
    if rank == 0 or not isinstance(saved, Mapping) or int(saved["world_size"]) != world_size:
        return {}
    return saved["ranks"].get(str(rank), {})


def own_share(extras: Mapping[str, Any], rank: int, world_size: int, device: torch.device | str | None) -> Mapping[str, Any]:
    """``extras`` as restored from a checkpoint :func:`over_ranks` wrote: each rank's own windows (rank 0's
    are there already; another's come from the saved parts, onto ``device``). With another number of ranks
    than the run that saved it, rank 0's windows take every saved rank's records and the others start
    empty, the saved records weighed so that each update counts as one of this run's (:func:`_scale`).
    ``extras`` itself when no such checkpoint."""
    if OVER_RANKS not in extras:
        return extras
    saved = extras[OVER_RANKS]
    new = extras_copy(extras)
    del new[OVER_RANKS]
    windows = [w for w in (EPOCH, LOGGED) if w.holds(new)]
    same = isinstance(saved, Mapping) and int(saved["world_size"]) == world_size
    if rank != 0:
        for window in windows:  # start empty, then take this rank's own (when the ranks are the same)
            new = extras_copy(window.start(window.clear(new)))
        if same:
            new.update(to_device(_windows_only(saved["ranks"].get(str(rank), {})), device))
    elif isinstance(saved, Mapping) and not same:
        for part in saved["ranks"].values():
            for window in windows:
                _merge_into(new, window, to_device(_windows_only(part), device))
        for window in windows:  # each update counts as much as one of this run's, which has world_size records
            _scale(new, window, world_size / int(saved["world_size"]))
    return types.MappingProxyType(new)


def _scale(extras: dict[str, Any], window: Window, factor: float) -> None:
    """``window``'s records in ``extras``, summed, weighing ``factor`` each: a run saved on W ranks made W
    records an update, one resumed on W' makes W', so the saved ones weigh W'/W (the means weigh each update
    alike, as in an uninterrupted run on either number of ranks)."""
    if factor == 1:
        return
    sums, counts = window._fold(extras, window.records(extras))
    extras[window.sums] = {key: total * factor for key, total in sums.items()}
    extras[window.counts] = {key: count * factor for key, count in counts.items()}
    extras[window.pending] = ()


def _windows_only(part: Mapping[str, Any]) -> dict[str, Any]:
    """A rank's saved part without its RNG and buffers (:func:`own_rng`, :func:`own_buffers` take those)."""
    return {k: v for k, v in part.items() if k not in (_RNG, _BUFFERS)}


def _merge_into(extras: dict[str, Any], window: Window, part: Mapping[str, Any]) -> None:
    """Add the records of ``part`` (another rank's saved window) to ``window``'s sums in ``extras``."""
    if not window.holds(part):
        return
    sums, counts = window._fold(part, window.records(part))
    own_sums, own_counts = dict(extras.get(window.sums, {})), dict(extras.get(window.counts, {}))
    for key, total in sums.items():
        own_sums[key] = own_sums[key] + total.to(own_sums[key].device) if key in own_sums else total
        own_counts[key] = own_counts.get(key, 0) + counts[key]
    extras[window.sums], extras[window.counts] = own_sums, own_counts


def is_epoch_record(keys: Iterable[str]) -> bool:
    """Whether a record of metrics ``keys`` is an epoch's record, as the file loggers tell a resumed run's records
    apart: it holds ``epoch`` with the epoch's means (a name ending ``_epoch``, ``train/loss_epoch``, as Lightning
    names its ``on_epoch`` means), or ``epoch`` alone. Any other record holding ``epoch`` is a row of that epoch:
    :func:`loopkit.with_logging` puts it on every row (as Lightning's), but not on one with a name ending ``_epoch``
    (a step metric so named), which would read as an epoch's record. An epoch's record without such a name (a step that
    returns no metrics, with a callback's ``on_epoch_end`` extras) is read as a row: a fit resumed in an epoch cut
    short then keeps the cut's record beside the whole epoch's.

    >>> is_epoch_record({"epoch", "train/loss_epoch"}), is_epoch_record({"epoch"})
    (True, True)
    >>> is_epoch_record({"epoch", "train/loss"}), is_epoch_record({"train/loss_epoch"})
    (False, False)
    """
    keys = frozenset(keys)
    return "epoch" in keys and (len(keys) == 1 or any(key.endswith("_epoch") for key in keys))
