"""Running means of metric tensors kept in ``state.extras``, so that a checkpoint carries them.

``with_logging``'s window (the last n steps) and ``run_epochs``' epoch means are both one
:class:`Window`: each call's metrics dict is appended to an immutable tuple (no tensor work,
no host sync), every ``fold_every`` records are summed on the device into one float32 sum per
metric, and the means are read in one transfer when asked for.

>>> import torch
>>> w = Window("demo/sums", "demo/counts", "demo/pending")
>>> extras = w.add({}, {"loss": torch.tensor(1.0)})
>>> w.means(w.add(extras, {"loss": torch.tensor(3.0)}))
{'loss': 2.0}
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import attrs

from loopkit import _collective
from loopkit.state import extras_copy

__all__ = ["EPOCH", "LOGGED", "OVER_RANKS", "Window", "over_ranks", "own_share"]

Metrics = Mapping[str, Any]


@attrs.frozen
class Window:
    """The extras keys of one window of running means, and how often it folds."""

    sums: str
    counts: str
    pending: str
    fold_every: int = 32

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
            new[self.sums], new[self.counts] = self._fold(extras, pending)
            new[self.pending] = ()
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
        return _collective.means(sums, counts, reduce=reduce)

    def _fold(self, extras: Mapping[str, Any], pending: tuple[Metrics, ...]) -> tuple[dict[str, Any], dict[str, int]]:
        return _collective.fold(extras.get(self.sums, {}), extras.get(self.counts, {}), pending)


#: ``run_epochs``' epoch means, kept in ``state.extras`` while an epoch runs: a checkpoint taken
#: mid-epoch carries them, so a resumed run's epoch means are the uninterrupted run's
EPOCH = Window("run_epochs/epoch_sums", "run_epochs/epoch_counts", "run_epochs/epoch", fold_every=32)

#: ``with_logging``'s window of the calls since its last log
LOGGED = Window("logging/window", "logging/counts", "logging/pending", fold_every=32)

#: an extras key: the windows hold every rank's records, summed (a checkpoint written under DDP)
OVER_RANKS = "windows/over_ranks"


def over_ranks(extras: Mapping[str, Any]) -> Mapping[str, Any]:
    """``extras`` for a checkpoint under DDP: each window's records of every rank, summed (a collective
    every rank must call at the same point). Only rank 0 writes checkpoints, and its own records alone
    would stand for every rank's in a resumed run's means; :func:`own_share` undoes it on restore.

    >>> import torch
    >>> extras = EPOCH.add({}, {"loss": torch.tensor(2.0)})
    >>> EPOCH.means(over_ranks(extras))  # (one process: its own records)
    {'loss': 2.0}
    """
    held = [w for w in (EPOCH, LOGGED) if w.holds(extras)]
    if not held or not _collective.active():
        return extras
    new = extras_copy(extras)
    for window in held:
        sums, counts = window._fold(extras, window.records(extras))
        new[window.sums], new[window.counts] = _collective.total_over_ranks(sums, counts)
        new[window.pending] = ()
    new[OVER_RANKS] = True
    return types.MappingProxyType(new)


def own_share(extras: Mapping[str, Any], rank_zero: bool) -> Mapping[str, Any]:
    """``extras`` as restored from a checkpoint :func:`over_ranks` wrote: rank 0 keeps the summed windows
    (so each record counts once when the means are reduced over the ranks), the other ranks start theirs
    empty; ``extras`` itself when no such checkpoint."""
    if OVER_RANKS not in extras:
        return extras
    new = extras_copy(extras)
    del new[OVER_RANKS]
    shared: Mapping[str, Any] = types.MappingProxyType(new)
    if not rank_zero:
        for window in (EPOCH, LOGGED):
            if window.holds(shared):
                shared = window.start(window.clear(shared))
    return shared
