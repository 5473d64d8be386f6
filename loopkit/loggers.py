"""Loggers: where :func:`loopkit.with_logging` writes metrics.

Every logger has the same small protocol: ``log_metrics(metrics, step)`` (a dict of
floats at a global step), ``log_hparams(hparams, metrics=None)`` (``log_hyperparams``, Lightning's name, on
:class:`Logger`), ``finalize()`` and a ``log_dir`` property. File loggers write each run under
``root/name/version_N/`` (their ``version``: N, once the folder is claimed; ``name=""`` or None: ``root/version_N``,
``name="exp/run"``: ``root/exp/run/version_N``, as Lightning's loggers), N being the next free integer
(an earlier run is never overwritten, two runs starting at once get different folders, and a logger reused
for another fit from a fresh state takes the next N).
Under ``torch.distributed`` only rank 0 writes; other ranks' loggers do nothing and create nothing.

>>> import tempfile
>>> tmp = tempfile.TemporaryDirectory()
>>> first, second = CSVLogger(tmp.name, "demo"), CSVLogger(tmp.name, "demo")
>>> first.log_metrics({"train/loss": 0.5}, step=10)
>>> second.log_metrics({"train/loss": 0.4}, step=10)
>>> os.path.relpath(first.log_dir, tmp.name), os.path.relpath(second.log_dir, tmp.name)
('demo/version_0', 'demo/version_1')
>>> tmp.cleanup()
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import inspect
import io
import json
import logging
import math
import os
import re
import secrets
import socket
import struct
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any, NamedTuple

import numpy as np
import torch

from loopkit import _collective
from loopkit._collective import is_rank_zero
from loopkit._numbers import as_int
from loopkit._window import is_epoch_record
from loopkit.progress import write_line

__all__ = [
    "CSVLogger",
    "ConsoleLogger",
    "JSONLLogger",
    "Logger",
    "RunDirLogger",
    "TensorBoardLogger",
    "claim_version_dir",
    "is_rank_zero",
]

_VERSION = re.compile(r"version_(\d+)$")
_MAX_CLAIMS = 1000


def _next_version(base: str) -> int:
    """One more than the highest ``version_N`` in ``base`` (0 when there is none)."""
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return 0
    found = [int(m.group(1)) for m in map(_VERSION.match, names) if m]
    return max(found) + 1 if found else 0


def claim_version_dir(base: str) -> str:
    """Create and return ``base/version_N`` for the next free N; safe against concurrent runs.

    The folder is created with ``exist_ok=False``: when another process takes N first, the
    next number is tried.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> [os.path.basename(claim_version_dir(tmp.name)) for _ in range(2)]
    ['version_0', 'version_1']
    >>> tmp.cleanup()
    """
    os.makedirs(base, exist_ok=True)
    for _ in range(_MAX_CLAIMS):
        path = os.path.join(base, f"version_{_next_version(base)}")
        try:
            os.makedirs(path, exist_ok=False)
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"could not claim a version_N folder in {base!r} after {_MAX_CLAIMS} tries")


def _check_metrics(metrics: Mapping[str, Any], step: Any, who: str) -> dict[str, float]:
    """``metrics`` as the logger ``who`` writes them, checked: of :meth:`Logger.log_metrics` at ``step``, or, for
    ``step`` None, the metrics of :meth:`Logger.log_hparams` (its errors name it; no step, so a metric may be
    named ``step``).

    >>> _check_metrics({"step": 1}, None, "CSVLogger")
    {'step': 1.0}
    >>> _check_metrics({"best": "n/a"}, None, "CSVLogger")
    Traceback (most recent call last):
    ...
    TypeError: CSVLogger.log_hparams: metric 'best' is a str; expected a number
    """
    call = f"{who}.log_metrics" if step is not None else f"{who}.log_hparams"
    if step is not None and as_int(step) is None:
        raise TypeError(f"{call}: step must be an int, got {step!r}")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{call}: metrics must be a dict of str -> number, got {type(metrics).__qualname__}")
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"{call}: metric names must be strings, got {key!r}")
        if key == "step" and step is not None:
            raise ValueError(f"{call}: a metric named 'step' would take the place of the step; rename it")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
                shape = "x".join(map(str, value.shape)) or "0-dim"
                raise TypeError(
                    f"{call}: metric '{key}' is a {shape} {value.dtype} tensor; expected one real number"
                )
            if value.is_meta:
                raise TypeError(f"{call}: metric '{key}' is a meta tensor, which holds no value; expected one real "
                                "number (a tensor of the model's real device)")
        elif isinstance(value, (bool, np.bool_, np.complexfloating)) or not isinstance(value, (int, float, np.number)):
            raise TypeError(f"{call}: metric '{key}' is a {type(value).__qualname__}; expected a number")
        try:
            number = float(value)
        except OverflowError:  # (an int past the largest float: a counter, a hash; its digits are not printed)
            raise OverflowError(f"{call}: metric '{key}' is an int too large for a float (over "
                                f"{sys.float_info.max:.4g}); log it scaled, or as text in log_hparams") from None
        # (``epoch``, a count: with_logging's, Lightning's ``current_epoch``, as an int when it is a whole number, as
        # Lightning's CSV has it and a logger of one's own is given it)
        out[key] = int(number) if key == "epoch" and number.is_integer() else number
    return out


def _plain_hparams(hparams: Mapping[str, Any] | argparse.Namespace, who: str) -> dict[str, Any]:
    """``hparams`` (a dict, or an ``argparse.Namespace`` as Lightning's ``_convert_params`` takes) as plain values."""
    if isinstance(hparams, argparse.Namespace):
        hparams = vars(hparams)
    if not isinstance(hparams, Mapping):
        raise TypeError(f"{who}.log_hparams: hparams must be a dict or an argparse.Namespace, "
                        f"got {type(hparams).__qualname__}")
    return {str(k): _plain_value(v) for k, v in hparams.items()}


def _fields(value: Any) -> dict[str, Any] | None:
    """A dataclass instance's, a ``NamedTuple``'s or an ``argparse.Namespace``'s fields as a dict (None for anything
    else): nested hyper-parameters, flattened as Lightning's ``_flatten_dict`` does (``opt/lr``), not one string nor
    a list without the names.

    >>> Opt = NamedTuple("Opt", [("lr", float), ("beta", float)])
    >>> _fields(Opt(0.1, 0.99)), _fields((0.1, 0.99))
    ({'lr': 0.1, 'beta': 0.99}, None)
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, argparse.Namespace):
        return vars(value)
    if isinstance(value, tuple) and callable(getattr(value, "_asdict", None)):  # (a NamedTuple, a namedtuple)
        return dict(value._asdict())
    return None


def _plain_value(value: Any) -> Any:
    """A hyper-parameter as JSON can write it: dicts (dataclasses, NamedTuples and Namespaces as dicts) and lists of plain
    values, numbers (numpy's and one-element tensors' as Python's), strings, None; a class or function (method,
    builtin) as its ``__qualname__`` (``"ReLU"``, ``"Net.act"``, ``"make.<locals>.act"``: the same in every run, where
    its repr holds a memory address, and telling nested ones apart; a builtin's ``__name__``, its qualname naming an
    internal holder such as ``_VariableFunctionsClass.tanh``; Lightning's WandbLogger writes ``__name__``), a ``functools.partial`` as
    ``functools.partial(<its function's>, <its arguments>)``; anything else as its ``str``, any memory address
    (``" at 0x7f..."``, a default repr's) taken out.

    >>> import argparse, dataclasses, functools
    >>> Opt = dataclasses.make_dataclass("Opt", [("lr", float), ("betas", tuple)])
    >>> _plain_value({"opt": Opt(0.1, (0.9, 0.99)), "ns": argparse.Namespace(depth=3), "cls": Opt})
    {'opt': {'lr': 0.1, 'betas': [0.9, 0.99]}, 'ns': {'depth': 3}, 'cls': 'Opt'}
    >>> _plain_value([torch.nn.ReLU, torch.tanh, functools.partial(torch.clamp, min=0), object()])
    ['ReLU', 'tanh', 'functools.partial(clamp, min=0)', '<object object>']
    """
    fields = _fields(value)
    if fields is not None:
        value = fields
    if isinstance(value, Mapping):
        return {str(k): _plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (np.bool_, np.integer, np.floating)) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf"
    ):
        return value.item()  # numpy's numbers as Python's: a number in hparams.json and TensorBoard, not a string
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, type) or inspect.isroutine(value):
        names = ("__name__", "__qualname__") if inspect.isbuiltin(value) else ("__qualname__", "__name__")
        return next((n for n in (getattr(value, a, None) for a in names) if isinstance(n, str)), _addressless(value))
    if isinstance(value, functools.partial):
        given = [repr(_plain_value(v)) for v in value.args] + [f"{k}={_plain_value(v)!r}" for k, v in value.keywords.items()]
        return f"functools.partial({', '.join([_plain_value(value.func), *given])})"
    return _addressless(value)


def _addressless(value: Any) -> str:
    """``str(value)`` without the memory addresses a default repr holds (``<Foo object at 0x7f...>``), which differ
    in every run."""
    return _ADDRESS.sub("", str(value))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _flatten(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in hparams.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class _Inert:
    """:attr:`TensorBoardLogger.writer` and the trackers' ``experiment`` on ranks other than 0 (Lightning's
    ``DummyExperiment``): every attribute, call and item is itself, so ``logger.experiment.log(...)`` (or
    ``logger.writer.add_text(...)``) on every rank writes on rank 0 only.

    >>> _Inert().log({"x": 1}).config["lr"]  # doctest: +ELLIPSIS
    <loopkit.loggers._Inert object at ...>
    """

    def __getattr__(self, name: str) -> Any:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def __getitem__(self, key: Any) -> Any:
        return self

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


class Logger:
    """The logger protocol, and a base class that writes only on rank 0.

    Subclasses implement ``_write_metrics``, ``_write_hparams`` and ``_finalize``; the public
    methods check the input and skip everything on ranks other than 0. Optional extras that
    :func:`loopkit.with_logging` uses when present: ``wants_model(step)`` and
    ``log_model(model, step)`` (histograms), ``share_run_dir(other)`` (one folder per run).

    >>> class Recorder(Logger):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.seen = []
    ...     def _write_metrics(self, metrics, step):
    ...         self.seen.append((step, metrics))
    >>> rec = Recorder()
    >>> rec.log_metrics({"train/loss": 0.25}, step=3)
    >>> rec.seen, rec.log_dir
    ([(3, {'train/loss': 0.25})], None)
    """

    #: the statuses :meth:`finalize` takes (``with_logging`` gives ``"killed"`` only to a logger that lists it)
    finalize_statuses: tuple[str, ...] = ("success", "failed", "finished", "killed")

    #: what :meth:`log_hparams` recorded (None: nothing yet); a class default, so that a subclass whose
    #: ``__init__`` does not call ``super().__init__()`` (Lightning's ``Logger`` needs no such call) works alike
    _hparams: dict[str, Any] | None = None

    @property
    def log_dir(self) -> str | None:
        """The run folder this logger writes to (None for loggers that write no files)."""
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Write ``metrics`` (names to numbers) at global step ``step``: ``_write_metrics`` gets them as floats,
        but ``epoch`` as an int when it is a whole number (as :func:`loopkit.with_logging` gives it, and as
        Lightning's logger connector gives its ``current_epoch``)."""
        metrics = _check_metrics(metrics, step, type(self).__name__)
        if metrics and is_rank_zero():
            self._write_metrics(metrics, int(step))  # (a numpy integer step as Python's)

    def log_hparams(
        self, hparams: Mapping[str, Any] | argparse.Namespace, metrics: Mapping[str, float] | None = None
    ) -> None:
        """Record the run's hyper-parameters (and optionally the metrics to compare them by). A later call adds
        to (and updates) those of the earlier ones, as Lightning's loggers' ``log_hyperparams`` do; except
        :class:`loopkit.MLFlowLogger`'s: MLflow params cannot change, so a new value for one the run holds is
        refused with a ``ValueError`` (the same value again is skipped).

        ``hparams`` is a dict or an ``argparse.Namespace`` (an argparse script's ``args``). Nested dicts, and
        dataclass instances, NamedTuples and Namespaces among the values, are kept as dicts (``hparams.json``, wandb's config)
        and flattened with ``/`` where the values must be flat (``opt/lr``: TensorBoard, MLflow), as Lightning's
        ``_flatten_dict`` does; values other than numbers, strings, None and lists of them are written as text: a
        class or function as its ``__qualname__`` (``"ReLU"``; Lightning's WandbLogger writes ``__name__``), never a
        repr with a memory address, which would differ in every run. Only rank 0 writes them; under torchrun before
        ``loopkit.distributed.init()`` (a call at the top of the script) the other ranks keep them, unwarned.

        >>> logger = ConsoleLogger()
        >>> logger.log_hparams({"lr": 0.1, "model": {"hidden": 8}}); logger.log_hparams({"batch_size": 32})
        hparams  lr=0.1  model/hidden=8
        hparams  lr=0.1  model/hidden=8  batch_size=32
        >>> logger.hparams
        {'lr': 0.1, 'model': {'hidden': 8}, 'batch_size': 32}
        """
        who = type(self).__name__
        plain = _plain_hparams(hparams, who)
        final = None if metrics is None else _check_metrics(metrics, None, who)
        before, self._hparams = self._hparams, {**(self._hparams or {}), **plain}
        if is_rank_zero(quiet=True):  # (unwarned: called at the top of a torchrun script, before init(), by design)
            try:
                self._write_hparams(self._hparams, final)
            except BaseException:  # a refused call (MLflow's changed param) records nothing: later calls go on
                self._hparams = before
                raise

    def log_hyperparams(self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        """:meth:`log_hparams` under Lightning's name (its loggers' ``log_hyperparams(params, metrics=None)``).

        >>> ConsoleLogger().log_hyperparams({"lr": 0.1})
        hparams  lr=0.1
        """
        self.log_hparams(params, metrics)

    @property
    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters :meth:`log_hparams` recorded so far (all its calls')."""
        return dict(self._hparams or {})

    def finalize(self, status: str = "success") -> None:
        """Flush and close whatever is open; logging again afterwards reopens it.

        ``status``: ``"success"``, or ``"failed"``, which :func:`loopkit.with_logging`
        gives when an error leaves ``run_epochs`` (an MLflow run is then marked ``FAILED``), or
        ``"killed"``, which it gives when SIGTERM or Ctrl-C stopped the fit (``run_epochs`` saved and
        returned: a resumable stop, not a failure; an MLflow run is marked ``KILLED``, a wandb run
        finished with ``exit_code=1``; Lightning's trainer passes ``"failed"`` then, which
        :func:`loopkit.with_logging` gives a logger that is not loopkit's); ``"finished"`` is
        Lightning's other name for ``"success"``. The file loggers close alike either way.

        >>> ConsoleLogger().finalize("failed")
        """
        if status not in _STATUSES:
            raise ValueError(f"{type(self).__name__}.finalize: status must be one of {', '.join(map(repr, _STATUSES))}, "
                             f"got {status!r}")
        if is_rank_zero():
            self._end(status)

    def _write_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _write_hparams(self, hparams: dict[str, Any], metrics: dict[str, float] | None) -> None:
        pass

    def _finalize(self) -> None:
        pass

    def _end(self, status: str) -> None:
        """:meth:`finalize` on rank 0; loggers that tell a failed run from a finished one override it."""
        self._finalize()


#: the statuses :meth:`Logger.finalize` takes: Lightning's ("finished": as "success"), and "killed" (a fit that a
#: signal stopped, resumable: MLflow's ``KILLED``)
_STATUSES = Logger.finalize_statuses


def _inside(path: str) -> bool:
    """Whether ``path``, joined to a folder, names one inside it (or itself): relative, without a ``..`` part.

    >>> _inside(""), _inside("exp/run"), _inside("../x"), _inside("a/../../b"), _inside("/abs")
    (True, True, False, False, False)
    """
    return not os.path.isabs(path) and ".." not in path.replace(os.sep, "/").split("/")


def _check_root(root: str, who: str, folder: str | None = None) -> None:
    """Refuse now a root, or the run ``folder`` under it (``root/name``, or the one a fixed version names), that the
    first write could not make: a file in its way, or a folder it may not write to.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> open(os.path.join(tmp.name, "run"), "w").close()
    >>> _check_root(tmp.name, "CSVLogger", os.path.join(tmp.name, "run", "version_0"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    NotADirectoryError: CSVLogger: the run folder '.../run/version_0' cannot be made: '.../run' is a file; ...
    >>> tmp.cleanup()
    """
    base = os.path.abspath(root)
    path = base if folder is None else os.path.abspath(folder)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    inside = folder is not None and path.startswith(os.path.join(base, ""))  # (in the run folder's way, under root)
    if not os.path.isdir(path):
        if inside:
            raise NotADirectoryError(f"{who}: the run folder {folder!r} cannot be made: {path!r} is a file; remove "
                                     "it, or give another name (or version)")
        raise NotADirectoryError(f"{who}: root {root!r} cannot be a folder: {path!r} is a file")
    if path != base and not inside and not os.access(path, os.W_OK | os.X_OK):  # (an existing root: the write tells)
        raise PermissionError(f"{who}: root {root!r} cannot be made: {path!r} is not writable")


class RunDirLogger(Logger):
    """A logger that writes files under ``root/name/version_N/`` (see :func:`claim_version_dir`).

    ``name`` is a folder inside ``root``: ``""`` or None for none (``root/version_N``, as Lightning's loggers), or a
    nested one (``"exp/run"``: ``root/exp/run/version_N``); an absolute path or one with ``..`` is refused.
    ``version=None`` claims the next free N when the logger first writes (under :func:`loopkit.with_logging`, at a
    fit's first step; or when ``log_dir`` is first read: a folder it wrote nothing in is given back when
    :func:`loopkit.with_logging` makes it share another logger's), and the next one for each fit from a fresh state
    after one it logged or claimed a folder for (see :meth:`resume_at` and :meth:`claim_for_fit`: each run its own
    ``version_N``; and for a fit going on from a state whose rows went to another folder, :meth:`continues_from`);
    an int uses ``version_<int>``, a string that folder name, and an existing folder is reused (to continue a run).
    Loggers that :meth:`share_run_dir` write to one folder.

    :meth:`log_hparams` writes the hyper-parameters (all its calls') to ``hparams.json`` in the run folder, nested
    as given (as Lightning's ``hparams.yaml``), and the metrics given with them (all its calls', a later one's
    updating an earlier one's) to ``hparams_metrics.json`` beside it, so that no hyper-parameter name can clash
    with them. Both are valid JSON: a non-finite number is written as the string ``"nan"``, ``"inf"`` or ``"-inf"``
    (``float`` reads it back; JSON has no ``NaN``, which jq or JavaScript refuse).

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> os.path.basename(RunDirLogger(tmp.name, "demo", version=7).log_dir)
    'version_7'
    >>> tmp.cleanup()
    """

    def __init__(
        self, root: str | os.PathLike = "runs", name: str | None = "default", version: int | str | None = None
    ) -> None:
        super().__init__()
        who = type(self).__name__
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"{who}: root must be a path, got {type(root).__qualname__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{who}: name must be a folder name or None, got {type(name).__qualname__}")
        name = name or ""  # (None as "": no name folder, as Lightning's loggers)
        if not _inside(name):
            raise ValueError(f"{who}: name is a folder inside root ('' or None for root itself, 'exp/run' nested, as "
                             f"in Lightning), not an absolute path or one with '..', got {name!r}")
        if version is not None and not isinstance(version, str):
            if as_int(version) is None:
                raise TypeError(f"{who}: version must be an int, a folder name or None, got {version!r}")
            version = as_int(version)
        if isinstance(version, int) and version < 0:
            raise ValueError(f"{who}: version must be >= 0, got {version}")
        if isinstance(version, str) and not _inside(version):
            raise ValueError(f"{who}: a version given as a string is a folder inside root/name ('' for root/name "
                             f"itself, 'fold0/seed1' nested, as in Lightning), not an absolute path or one "
                             f"with '..', got {version!r}")
        self.root = os.fspath(root)
        self.name = name
        self._version = version  # the version given (None: the next free version_N, claimed when first needed)
        _check_root(self.root, who, self.fixed_folder() or self._versions_folder())
        self._dir: str | None = None
        self._leader: RunDirLogger | None = None
        self._pending_hparams: dict[str, Any] | None = None  # hparams.json (and _HPARAMS_METRICS) to write
        self._final_metrics: dict[str, float] | None = None  # all the metrics log_hparams gave for this folder
        self._resume_pos: _Position | None = None  # resume_at's position, until the next write applies it
        self._top_records: set[_Written] = set()  # the records written at _top: their metric names and epoch
        self._relog: _Position | None = None  # a fit resumed at _top: a record logged there again rewinds first
        self._relog_records: frozenset[_Written] = frozenset()  # _top_records when _relog was set (before the fit)
        # the records (log_metrics calls) this logger wrote since its fit's resume position was applied, per file:
        # the last ones there, which the fit's own rewind and redo never drop (only the records from before it)
        self._new: dict[str, int] = {}
        self._redo: _Position | None = None  # where a resumed run went on from: its metrics logged again there
        self._redone: set[frozenset[str]] = set()  # the records already replaced at _redo's step
        self._top: int | None = None  # the highest step this logger has written metrics at, in this process
        self._epoch_now: int | None = None  # the epoch this logger's records are logged in (None: not known)
        self._last_record: tuple[int, int | None, bool] | None = None  # its last record: (step, epoch, an epoch's)
        # the folder's last epoch record as this logger knows it (its own, or kept by its last rewind): (step, epoch)
        self._last_epoch: tuple[int, int | None] | None = None
        self._fit_dir: str | None = None  # the run folder of this logger's last fit (claimed at its first step, or
        # its resume_at applied there)
        self._fit_logged = False  # whether a fit claimed it (claim_for_fit), or this logger wrote a record there since

    @property
    def log_dir(self) -> str:
        """``root/name/version_N``; created on first use (on rank 0 only). On the other ranks, rank 0's folder once
        a fit under ``with_logging`` began (:meth:`agree_log_dir`); before that, the folder rank 0 is likely to take."""
        if self._leader is not None:
            return self._leader.log_dir
        if self._dir is not None:
            return self._dir
        base = self._versions_folder()
        if self._version is not None:
            path = self.fixed_folder()
            if not is_rank_zero():
                return path
            os.makedirs(path, exist_ok=True)
        elif not is_rank_zero():  # other ranks never create folders: report the one rank 0 is likely to take
            return os.path.join(base, f"version_{_next_version(base)}")
        else:
            path = claim_version_dir(base)
        self._dir = path
        return path

    @property
    def version(self) -> int | str | None:
        """The run folder's version, as Lightning's ``logger.version``: the ``version`` given, or (``version=None``)
        N of the ``version_N`` folder once it is claimed (at the first write, or when ``log_dir`` is read; the
        folder of the logger it shares one with; a fresh fit after one it logged moves it to the next N), None
        until then (reading it claims nothing).

        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> logger = CSVLogger(tmp.name)
        >>> logger.version is None
        True
        >>> logger.log_metrics({"train/loss": 0.5}, step=1)
        >>> logger.version, CSVLogger(tmp.name, version="fold0").version
        (0, 'fold0')
        >>> tmp.cleanup()
        """
        if self._version is not None:
            return self._version
        if self._leader is not None:
            return self._leader.version
        found = None if self._dir is None else _VERSION.match(os.path.basename(os.path.normpath(self._dir)))
        return None if found is None else int(found.group(1))

    def _versions_folder(self) -> str:
        """``root/name``, the folder the ``version_N`` run folders are made in: ``root`` itself for ``name`` ``""``
        or None (Lightning's loggers' ``root_dir``).

        >>> [CSVLogger("runs", name)._versions_folder() for name in ("demo", "exp/run", "", None)]
        ['runs/demo', 'runs/exp/run', 'runs', 'runs']
        """
        return os.path.join(self.root, self.name) if self.name else self.root

    def fixed_folder(self) -> str | None:
        """The run folder a fixed ``version`` names (``3`` and ``"version_3"`` alike: ``root/name/version_3``),
        without making it; None for ``version=None`` (the folder is claimed when first needed).

        >>> os.path.basename(CSVLogger("runs", version=3).fixed_folder()), CSVLogger("runs").fixed_folder()
        ('version_3', None)
        """
        version = self._version
        if version is None:
            return None
        return os.path.join(self._versions_folder(), f"version_{version}" if isinstance(version, int) else version)

    def share_run_dir(self, other: Any) -> bool:
        """Write to ``other``'s run folder, when both would take the next free version of one root/name.

        Returns whether it did; a logger that already has its folder, or a fixed version, keeps it.
        :func:`loopkit.with_logging` calls this so a TensorBoard and a CSV logger of one run share
        ``version_N``.

        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> tb, csv_ = TensorBoardLogger(tmp.name), CSVLogger(tmp.name)
        >>> csv_.share_run_dir(tb), csv_.log_dir == tb.log_dir
        (True, True)
        >>> tmp.cleanup()
        """
        if not isinstance(other, RunDirLogger) or other is self:
            return False
        if self._leader is not None or self._version is not None:
            return False
        leader = other._leader or other
        if leader is self or leader._version is not None:
            return False
        if os.path.abspath(leader._versions_folder()) != os.path.abspath(self._versions_folder()):
            return False
        if self._dir is not None and (leader._dir is None or not self._free_of_a_folder()):
            return False  # (one that claimed a folder keeps it unless the other has one: that one may follow it)
        self._leader = leader
        return True

    def _free_of_a_folder(self) -> bool:
        """Whether this logger has no run folder, or only one it claimed when ``log_dir`` was read and wrote nothing
        in (then given back, so that it can share another logger's, as Lightning's loggers of one run, whose
        ``log_dir`` claims nothing, do)."""
        if self._dir is None:
            return True
        if self._top is not None or self._pending_hparams is not None:
            return False
        try:
            os.rmdir(self._dir)  # (only an empty folder: one the logger wrote in, or another process, is kept)
        except OSError:
            return False
        self._dir = None
        return True

    def agree_log_dir(self) -> None:
        """Under ``torch.distributed``, take rank 0's run folder as this logger's ``log_dir`` on every rank (rank 0
        claims it now): the other ranks only guess the folder rank 0 takes, which another run may take first. A
        collective every rank calls at the same point (``with_logging`` does as each fit begins); nothing in one
        process.

        >>> CSVLogger("runs").agree_log_dir()
        """
        if not _collective.active():
            return
        owner = self._leader or self
        found = _collective.gather(owner.log_dir if is_rank_zero() else None, who=f"{type(owner).__name__}.agree_log_dir",
                                   what="the gather of rank 0's log folder")
        if not is_rank_zero():  # (each fit: rank 0's may have moved to a new version, see resume_at)
            owner._dir = found[0]  # type: ignore[index]

    def resume_at(
        self, step: int, epoch: int | None = None, batch_index: int | None = None, *, finishes_epoch: bool = False
    ) -> None:
        """Make this logger's folder hold the run as of a state at ``step`` (``state.epoch`` ``epoch``,
        ``state.batch_index`` ``batch_index``), from its next write on.

        ``run_epochs`` calls it through :func:`loopkit.with_logging` as each fit begins, with the state's three (from
        a state in an epoch a fit cut short recorded at its step: at the fit's first row, or its end, once
        ``finishes_epoch`` is known; a validation owed there logs its row before: told then, and again, with
        ``finishes_epoch=True``, when the fit goes on in that epoch, which drops the cut's record and keeps what this
        logger wrote since it was last told). When the folder already holds records (a fixed ``version`` continued after
        ``loopkit.restore``, or this logger's own, in a fit retried from an earlier state), the next write first drops
        those logged after that position (the crashed run logged them after the checkpoint, and the resumed run logs
        them again), and a record logged again at ``step`` itself (a validation or an epoch record the checkpoint was
        saved before: the same metrics) replaces the old one. A fresh state (step 0, epoch 0, batch 0) after a fit
        this logger logged or claimed its folder for (:meth:`claim_for_fit`: a cross-validation fold, a new run with
        the same step, a retry from scratch of a fit that failed before its first row) is another run: a logger of
        ``version=None`` leaves that folder as it is for the next free ``version_N`` (with the loggers sharing its
        folder), writing there as a logger made anew would (its hyper-parameters again, without the earlier run's
        final metrics), and says so at the ``logging`` INFO level (logger ``loopkit.loggers``). Otherwise (a fixed
        ``version``, or records of no fit of this logger) a fresh state replaces the folder's records (and
        TensorBoard's hyper-parameters; ``hparams.json`` is replaced when the new run logs its own), with a warning. A
        fit that goes on from where the last one ended drops nothing, but a record it logs again at that step (a retry
        whose checkpoint was saved before that step's validation or epoch record) replaces the one there. A record is
        logged again when the resumed fit logs the same metrics at that step in the same epoch (when both are told);
        the records the resumed fit writes itself are never dropped by it.

        Epochs that made no update (every batch skipped, or every float16 update overflowed) record at the
        same step as the one before, so records are told apart by their step, their epoch and their metric
        names. An epoch's record holds its epoch (``epoch``) with its epoch means (a metric named ``*_epoch``,
        ``train/loss_epoch``), or its epoch alone (:func:`is_epoch_record`); any other record holding ``epoch`` (each
        row :func:`loopkit.with_logging` writes, as Lightning's) is of that epoch; a record without it is of the epoch
        whose record comes next at its step in the file, else of the last record before it that holds one (of the
        one after, when that is an epoch's record). At ``step``,
        the records of epochs before ``epoch`` are kept and those of later epochs dropped; of ``epoch``
        itself, its record is dropped when ``batch_index`` is 0 or the state is in an epoch a fit cut short
        (``max_steps``, a callback's stop) recorded at ``step`` and the resumed fit goes on in that epoch
        (``finishes_epoch``: it records the epoch whole; a relaunch that trains no further keeps the record, which
        holds the epoch), and the others are dropped when ``batch_index`` is 0 (the epoch had not begun), else kept
        and replaced when logged again. Before ``step``, records are kept, but a record of ``epoch`` when
        ``batch_index`` > 0 (a cut's, that the run went on from). A record whose epoch the file does not tell
        (records logged without ``epoch``), or every record when ``epoch`` is not given, is
        placed by its step alone: at ``step`` it is kept and replaced when logged again (the epoch record too,
        with ``finishes_epoch``: dropped), and step 0 alone is a fresh state. :class:`TensorBoardLogger` rewrites
        its files alike; a TensorBoard already showing the folder purges by step alone, from ``step + 1``.

        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> crashed = CSVLogger(tmp.name, version=0)
        >>> for step in (1, 2, 3):
        ...     crashed.log_metrics({"train/loss": 1 / step}, step)
        >>> resumed = CSVLogger(tmp.name, version=0)
        >>> resumed.resume_at(1)                       # restored from a checkpoint of step 1
        >>> resumed.log_metrics({"train/loss": 0.4}, step=2)
        >>> print(open(os.path.join(resumed.log_dir, "metrics.csv")).read().strip())
        step,train/loss
        1,1.0
        2,0.4
        >>> tmp.cleanup()
        """
        who = type(self).__name__
        for label, value in (("step", step), ("epoch", epoch), ("batch_index", batch_index)):
            if (value is not None or label == "step") and (isinstance(value, bool) or not isinstance(value, int)
                                                           or value < 0):
                raise ValueError(f"{who}.resume_at: {label} must be an int >= 0, got {value!r}")
        pos = _Position(step, epoch, batch_index, bool(finishes_epoch))
        if pos.fresh and self._version is None and self._fit_logged:  # another run, not a retry: a folder of its own
            self._next_version()
        self._resume_pos = pos
        if epoch is not None:  # (the records this logger writes next are of that epoch, until its record)
            self._epoch_now = epoch

    def continues_from(self, log_dir: str | None) -> None:
        """A fit goes on from a state whose rows this logger logged to ``log_dir`` (:func:`loopkit.with_logging`
        records it in the state, by the logger's class and ``root/name``, and calls this as a fit from a state that
        is not fresh begins, before :meth:`resume_at`), or to none of its folders (``log_dir`` None: the state was
        trained without this logger, through another list of loggers). When this logger (``version=None``) last
        fitted in another folder (another run's, logged since: model B trained with the same step after model A, and
        A continued, also with a logger added to or taken from the list), rewinding that folder to the state's step
        would drop the other run's records: it leaves that folder as it is for the next free ``version_N`` instead
        (once for the loggers sharing its folder), with a warning naming both. Nothing for a fixed ``version`` (the
        folder named), nor when it goes on in ``log_dir`` (a retry, a crashed run resumed), nor for a ``log_dir``
        outside this logger's ``root/name`` (another logger's, recorded by an older loopkit at that logger's place
        in the list of loggers).

        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> logger = CSVLogger(tmp.name)
        >>> logger.continues_from(os.path.join(tmp.name, "default", "version_0"))  # (no fit yet: nothing to leave)
        >>> logger.version is None
        True
        >>> tmp.cleanup()
        """
        earlier = self._fit_dir
        if self._version is not None or earlier is None:
            return
        earlier_at = os.path.normpath(os.path.abspath(earlier))
        if log_dir is not None:
            recorded = os.path.normpath(os.path.abspath(log_dir))
            if earlier_at == recorded or os.path.dirname(earlier_at) != os.path.dirname(recorded):
                return  # (the same run; or a folder of another logger's ``root/name``: not this one's to compare)
        owner = self._leader or self
        self._forget_folder()
        if owner._dir == earlier:  # (a logger sharing it moved them both already)
            owner._dir = None
            claimed = owner.log_dir
            logged = "rows were logged to none of this logger's folders" if log_dir is None else (
                f"rows were logged to {log_dir}")
            warnings.warn(
                f"{type(self).__name__}: this fit goes on from a state whose {logged}, but the logger last wrote "
                f"another run's records to {earlier}, which are kept: this run writes to {claimed}",
                UserWarning,
                stacklevel=2,
            )

    def claim_for_fit(self) -> str:
        """The run folder (:attr:`log_dir`, claimed now if need be) that a fit logs to, counted as that fit's:
        :func:`loopkit.with_logging` calls it at a fit's first step, and the state records it
        (``logging/run_dirs``). A fresh fit after it (another run with the same step) takes the next free
        ``version_N`` (see :meth:`resume_at`), as after a fit that wrote a record, also when this one failed before
        its first row: the state that failure left (:func:`loopkit.state_at_error`) goes on from this folder, which
        the other run's records must not have taken, and a retry from a fresh state is another run too (the empty
        folder stays, as a run of Lightning's that crashed leaves its ``version_N``). Nothing more for a fixed
        ``version``, or on ranks other than 0 (they write nothing).

        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> logger = CSVLogger(tmp.name)
        >>> first = logger.claim_for_fit()
        >>> logger.resume_at(0)  # (a fresh fit next: another run)
        >>> [os.path.basename(folder) for folder in (first, logger.log_dir)]
        ['version_0', 'version_1']
        >>> tmp.cleanup()
        """
        folder = self.log_dir
        if self._version is None and is_rank_zero():
            self._fit_dir, self._fit_logged = folder, True
        return folder

    def _next_version(self) -> None:
        """A fresh fit after one this logger (``version=None``) logged: leave the earlier fit's folder, which keeps its
        records, for the next free ``version_N`` (claimed now, once for the loggers sharing the folder; said at the
        ``logging`` INFO level), and write there as a logger made anew would, its hyper-parameters again."""
        owner = self._leader or self
        earlier = self._fit_dir
        self._forget_folder()
        if earlier is not None and owner._dir == earlier:  # (a logger sharing it moved them both already)
            owner._dir = None
            claimed = owner.log_dir  # (now: under torch.distributed, agree_log_dir hands it to the other ranks)
            logging.getLogger(__name__).info(
                "%s: a fresh fit (step 0) after a fit in %s: this run writes to %s (a fixed version= would "
                "replace the earlier run's records instead)", type(self).__name__, earlier, claimed)

    def _forget_folder(self) -> None:
        """Drop what this logger tracks of its run folder's records and files, as a logger made anew has none;
        its hyper-parameters are held back for the next folder (without the earlier run's final metrics)."""
        self._final_metrics = None
        self._new, self._relog, self._relog_records, self._redo, self._redone = {}, None, frozenset(), None, set()
        self._top, self._top_records, self._epoch_now, self._last_record = None, set(), None, None
        self._last_epoch = None
        self._fit_dir, self._fit_logged = None, False
        self._pending_hparams = None if self._hparams is None else dict(self._hparams)

    def _path(self, filename: str) -> str:
        """A file in the run folder (claimed now if need be, writing any hparams held back)."""
        return os.path.join(self._folder(), filename)

    def _folder(self) -> str:
        """The run folder, claimed now if need be; a pending :meth:`resume_at` is applied, and any
        hparams held back are written into it."""
        folder = self.log_dir
        if self._resume_pos is not None:
            pos, self._resume_pos = self._resume_pos, None
            last, cut = self._last_record, self._last_epoch
            place = None if last is None else pos.place(*last)
            # the record of an epoch a fit cut short, written before this logger's last record (the validation a fit
            # from the cut owed there, run first), placed after pos (the fit went on in that epoch): it goes, and
            # what this logger wrote since its last position stays (that validation's row, after the cut's record,
            # which the file takes for the next epoch's)
            finishing = cut is not None and place != _AFTER and pos.place(*cut, True) == _AFTER
            self._new = self._new if finishing else {}  # (an earlier fit's: this one goes on from pos)
            self._relog, self._redo = None, None
            # (a claim of this fit's, or records of an earlier one, stay counted: a fresh fit next takes a new folder)
            self._fit_dir, self._fit_logged = folder, self._fit_logged and self._fit_dir == folder
            # (a fresh state after this logger's own records at step 0: those written before the fit stay, unless
            # logged again, as at any step it goes on from)
            if last is None or (place == _AFTER and not (pos.fresh and last[0] == 0)) or finishing:
                self._resume(folder, pos)  # the folder's records, or this logger's own after pos: a rewind
            elif last[0] == pos.step and place != _BEFORE:  # a fit going on from this logger's last step: nothing
                # to drop, unless it logs again a record it had written at that step (a retry from before it)
                self._relog, self._relog_records = pos, frozenset(self._top_records)
        if self._pending_hparams is not None:
            _write_hparams_files(folder, self._pending_hparams, self._final_metrics)
            self._pending_hparams = None
        return folder

    def _resume(self, folder: str, pos: _Position) -> None:
        """Drop what ``folder`` holds after ``pos`` (all of it for a fresh state; see :meth:`resume_at`)."""
        self._redo, self._redone, self._last_epoch = (None if pos.fresh else pos), set(), None

        def keep(at: int, keys: frozenset[str], epoch: int | None) -> bool:
            closes = is_epoch_record(keys)
            kept = pos.place(at, epoch, closes) != _AFTER
            if kept and closes:  # (read in the order written: the last one kept is the folder's last)
                self._last_epoch = (at, epoch)
            return kept

        dropped = self._drop_records(folder, keep)
        if dropped and pos.fresh:
            warnings.warn(
                f"{type(self).__name__}: {folder} held records of an earlier run (or of this one, restarted from "
                f"step 0); this run replaces them ({dropped} dropped). A logger with version=None, made anew for "
                "each run, gives each run a folder of its own",
                UserWarning,
                stacklevel=2,
            )

    def _make_room(self, metrics: Any, step: int) -> str:
        """The run folder, before ``metrics`` are written at ``step``: at the step a resumed run logs
        again, an earlier record of the same metrics and epoch there is dropped first (once per set of metrics),
        unless it is of an epoch before the resumed one. Only records from before the fit are dropped: never
        one it wrote itself."""
        folder = self._folder()
        self._fit_logged = self._fit_dir is not None
        keys = frozenset(metrics)
        epoch = _epoch_value(metrics["epoch"]) if "epoch" in keys else self._epoch_now
        closes = is_epoch_record(keys)
        relog = self._relog
        if relog is not None and step >= relog.step:
            # logged again (the same metrics, of the same epoch, as a record before the fit): rewound now, and
            # replaced below; another epoch's (epochs without an update share a step) is a new record
            told = None if relog.epoch is None else epoch  # (a position without an epoch: by the metrics alone)
            if step == relog.step and any(_same(written, keys, told) for written in self._relog_records):
                self._relog = None
                self._resume(folder, relog)
            elif step > relog.step:
                self._relog = None
        if self._top is None or step > self._top:
            self._top, self._top_records = step, {_Written(keys, epoch)}
        elif step == self._top:
            self._top_records.add(_Written(keys, epoch))
        self._last_record = (step, epoch, closes)
        if closes:
            self._epoch_now, self._last_epoch = None if epoch is None else epoch + 1, (step, epoch)
        elif epoch is not None:  # (a row of an epoch: the records logged next without ``epoch`` are of it too)
            self._epoch_now = epoch
        redo = self._redo
        if redo is not None and step == redo.step and keys not in self._redone:
            self._redone.add(keys)
            told = None if redo.epoch is None else epoch
            self._drop_records(folder, lambda at, found, was: (
                at != step or not _same(_Written(found, was), keys, told)
                or redo.place(at, was, is_epoch_record(found)) != _AGAIN))
        return folder

    def _drop_records(self, folder: str, keep: Callable[[int, frozenset[str], int | None], bool]) -> int:
        """Drop from ``folder``'s files each record (one :meth:`log_metrics` call) for which ``keep(step,
        its metric names, its epoch)`` is false (its epoch as :func:`_record_epochs` tells it, None when
        unknown); return how many were dropped. The records this logger wrote since its fit's resume position
        was applied (:meth:`_wrote`: the last ones of their file) are kept, unasked: a fit's rewind and redo
        replace the records from before it, never its own. Loggers without files have none."""
        return 0

    def _wrote(self, path: str) -> None:
        """Count a record this logger just wrote (appended) to the file ``path``: one of its fit's own."""
        self._new[path] = self._new.get(path, 0) + 1

    def _old(self, path: str, records: int) -> int:
        """How many of the file ``path``'s ``records`` (its first ones) are from before this logger's fit."""
        return records - self._new.get(path, 0)

    def _write_hparams(self, hparams: dict[str, Any], metrics: dict[str, float] | None) -> None:
        # held back until the run folder is claimed, so that loggers can still share it
        self._pending_hparams = hparams
        if metrics is not None:  # (a later call's add to, and update, the earlier ones', as its hparams do)
            self._final_metrics = {**(self._final_metrics or {}), **metrics}
        if (self._leader or self)._dir is not None:
            self._path("hparams.json")

    def _finalize(self) -> None:
        if self._pending_hparams is not None:
            self._path("hparams.json")


def _int_or_none(value: Any) -> int | None:
    """A record's step as an int (None when it is not one: a line this logger did not write)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class _Written(NamedTuple):
    """A record a logger wrote: its metric names, and the epoch it was logged in (None: not known)."""

    keys: frozenset[str]
    epoch: int | None


def _same(written: _Written, keys: frozenset[str], epoch: int | None) -> bool:
    """Whether a record of ``keys`` logged in ``epoch`` logs ``written`` again: the same metrics, of the same epoch
    (when both epochs are known).

    >>> was = _Written(frozenset({"val/mse"}), 0)
    >>> _same(was, frozenset({"val/mse"}), 0), _same(was, frozenset({"val/mse"}), 1), _same(was, was.keys, None)
    (True, False, True)
    """
    return written.keys == keys and (written.epoch is None or epoch is None or written.epoch == epoch)


#: where a folder's record lies from a resumed fit's position (:meth:`_Position.place`): logged before it (kept),
#: at it (kept, and replaced when the resumed fit logs the same metrics there again), or after it (dropped)
_BEFORE, _AGAIN, _AFTER = 0, 1, 2


class _Position(NamedTuple):
    """Where a resumed fit goes on from (:meth:`RunDirLogger.resume_at`): its state's step, epoch and batch_index
    (None: not told), and whether it goes on in an epoch a fit cut short recorded at that step."""

    step: int
    epoch: int | None
    batch_index: int | None
    finishes_epoch: bool

    @property
    def fresh(self) -> bool:
        """A fresh state's (step 0, epoch 0, batch 0): no record of the folder comes before it."""
        return self.step == 0 and not self.epoch and not self.batch_index

    def place(self, at: int, epoch: int | None, epoch_record: bool) -> int:
        """Where a record at step ``at``, logged in ``epoch`` (None: unknown), an epoch's record when
        ``epoch_record`` (:func:`is_epoch_record`), lies from this position: ``_BEFORE``, ``_AGAIN`` or ``_AFTER``.

        >>> at_epoch_2 = _Position(step=2, epoch=2, batch_index=0, finishes_epoch=False)
        >>> [at_epoch_2.place(2, e, True) for e in (1, 2)], at_epoch_2.place(1, None, False)
        ([0, 2], 0)
        >>> in_epoch_2 = _Position(step=5, epoch=2, batch_index=3, finishes_epoch=False)  # went on from a cut at 4
        >>> in_epoch_2.place(4, 2, True), in_epoch_2.place(4, 2, False), in_epoch_2.place(5, 2, True)
        (2, 0, 1)
        """
        if self.fresh or at > self.step:
            return _AFTER
        if at < self.step:  # (but this epoch's record, before a state in it: a cut's, that the run went on from)
            return _AFTER if epoch_record and self.batch_index and epoch is not None and epoch == self.epoch else _BEFORE
        if self.epoch is None or epoch is None:  # placed by the step alone
            return _AFTER if epoch_record and self.finishes_epoch else _AGAIN
        if epoch < self.epoch:
            return _BEFORE
        if epoch > self.epoch or self.batch_index == 0 or (epoch_record and self.finishes_epoch):
            return _AFTER
        return _AGAIN


def _file_record(metrics: dict[str, float], step: int) -> dict[str, Any]:
    """The record a file logger writes (a CSV row, a JSONL line): ``step``, then the metrics as
    :meth:`Logger.log_metrics` took them (floats, ``epoch`` an int when it is a whole number).

    >>> _file_record(_check_metrics({"epoch": 2.0, "train/loss": 0.5}, 7, "CSVLogger"), 7)
    {'step': 7, 'epoch': 2, 'train/loss': 0.5}
    """
    return {"step": step, **metrics}


def _epoch_value(value: Any) -> int | None:
    """An epoch record's ``epoch`` (a number, or its text in a CSV cell) as an int; None when it is not a count."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() and number >= 0 else None


def _record_epochs(records: list[tuple[int | None, int | None, bool]]) -> list[int | None]:
    """The epoch each of a file's records was logged in, from ``(its step, the epoch it holds (None: none), whether
    it is an epoch's record)`` in file order (:func:`is_epoch_record`): its own when it holds one (an epoch's record,
    a row of ``with_logging``); else that of the first epoch record after it among the records at its step that
    follow it (the record that closed its epoch); else that of the last record before it that holds one (one more
    after an epoch's record); else None (the file does not tell).

    >>> _record_epochs([(1, None, False), (2, None, False), (2, 0, True), (2, None, False), (2, 1, True),
    ...                 (2, None, False)])
    [None, 0, 0, 1, 1, 2]
    >>> _record_epochs([(1, 0, False), (2, None, False), (2, 0, True), (3, 1, False), (3, None, False)])
    [0, 0, 0, 1, 1]
    """
    epochs: list[int | None] = [None] * len(records)
    closing: int | None = None
    for i in range(len(records) - 1, -1, -1):
        at, epoch, closes = records[i]
        if i + 1 < len(records) and records[i + 1][0] != at:
            closing = None
        if closes:
            closing = epoch
        epochs[i] = epoch if epoch is not None else closing
    opened: int | None = None
    for i, (_, epoch, closes) in enumerate(records):
        if closes:
            opened = None if epoch is None else epoch + 1
        elif epoch is not None:
            opened = epoch
        elif epochs[i] is None:
            epochs[i] = opened
    return epochs


#: the file beside ``hparams.json`` that holds the metrics given to ``log_hparams`` (``hparams.json`` holds the
#: hyper-parameters alone, as Lightning's ``hparams.yaml``: a hyper-parameter may be named anything, "metrics" too)
_HPARAMS_METRICS = "hparams_metrics.json"


def _write_hparams_files(folder: str, hparams: dict[str, Any], metrics: dict[str, float] | None) -> None:
    """``hparams.json`` in ``folder``, and :data:`_HPARAMS_METRICS` when ``log_hparams`` was given metrics (else
    one left there by an earlier write is removed: the two files hold what this logger's calls gave)."""
    _write_json(os.path.join(folder, "hparams.json"), hparams)
    path = os.path.join(folder, _HPARAMS_METRICS)
    if metrics is not None:
        _write_json(path, metrics)
    elif os.path.exists(path):
        os.remove(path)


def _write_json(path: str, obj: Any) -> None:
    _replace_file(path, json.dumps(_finite_json(obj), indent=2, sort_keys=True, allow_nan=False))


def _finite_json(value: Any) -> Any:
    """``value`` (plain values: :func:`_plain_value`'s) with each non-finite float as the string ``"nan"``,
    ``"inf"`` or ``"-inf"`` (Python's ``float`` reads them back): JSON (RFC 8259) has no ``NaN`` nor ``Infinity``,
    which jq, JavaScript's ``JSON.parse``, Go's and Rust's readers refuse.

    >>> _finite_json({"wd": float("nan"), "clip": [float("inf"), -float("inf"), 1.5], "n": 3})
    {'wd': 'nan', 'clip': ['inf', '-inf', 1.5], 'n': 3}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Mapping):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    return value


def _replace_file(path: str, content: str | bytes, temporary: str | None = None) -> None:
    """Write ``content`` to ``path`` whole or not at all: into ``temporary`` (``path.tmp``), then renamed."""
    temporary = temporary or f"{path}.tmp"
    with open(temporary, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
    os.replace(temporary, path)


def _unfinished_line(path: str) -> tuple[bytes, int] | None:
    """``path``'s content and where its last line begins, when that line lacks its newline (a run killed
    mid-write); None when the file is empty or ends with one."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return None
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return None
        f.seek(0)
        data = f.read()
    return data, data.rfind(b"\n") + 1


def _end_last_line(path: str, data: bytes, start: int, whole: bool) -> None:
    """Finish the unfinished last line of ``path`` (``data[start:]``): its newline added when ``whole`` (the
    record's text was all written), else cut (a torn fragment), so that the next record starts a line of its own."""
    if whole:
        with open(path, "ab") as f:
            f.write(b"\n")
    else:
        _replace_file(path, data[:start])


def _csv_row_is_whole(line: bytes) -> bool:
    """Whether a CSVLogger row that lacks its newline was written whole: it ends with the ``\\r`` of the csv
    module's ``\\r\\n`` terminator (its cells are numbers, never quoted: a ``\\r`` comes only from the terminator)."""
    return len(line) > 1 and line.endswith(b"\r")


def _cut_torn_row(path: str) -> bool:
    """Drop the torn last row of a run killed mid-write (its file does not end with a newline): the next
    row appended would run on from it. A row torn between the ``\\r`` and the ``\\n`` of its terminator is
    whole: it is kept, its line ended (the header too, when it is the file's only line). A file holding only
    a torn header of a CSVLogger's (``step,...``, or the start of that: no row yet) is emptied, so that a whole header is written; another
    program's is left for the foreign-file check to refuse. Return whether the file was emptied (the only
    change to its header: a kept row's line ended leaves the header's columns as they were)."""
    found = _unfinished_line(path)
    if found is not None:
        data, start = found
        whole = _csv_row_is_whole(data[start:])
        if whole or start > 0:
            _end_last_line(path, data, start, whole)
        elif data.startswith(_CSV_START) or _CSV_START.startswith(data):
            _replace_file(path, b"")
            return True
    return False


#: how every line of a JSONLLogger's file begins (``json.dumps`` of ``{"step": ..., ...}``)
_JSONL_START = b'{"step": '


#: how a CSVLogger's file begins (its header's first column)
_CSV_START = b"step,"


def _is_torn_header_start(path: str) -> bool:
    """Whether the file at ``path`` holds only the start of a CSVLogger's header, torn before its first column
    ended (``s``, ``ste``, ``step``: no line end), as :func:`_jsonl_is_own` takes a torn first record."""
    with open(path, "rb") as f:
        data = f.read(len(_CSV_START) + 1)
    return 0 < len(data) < len(_CSV_START) and _CSV_START.startswith(data)


def _refuse_foreign_csv(path: str) -> list[str]:
    """The columns of the ``metrics.csv`` at ``path`` (``["step"]`` when there is none, or it is empty); one whose
    first column is not ``step`` (another program's) is refused with a ValueError."""
    columns = ["step"]
    if os.path.exists(path):
        with open(path, newline="", encoding="utf-8") as f:
            columns = next(csv.reader(f), None) or ["step"]
    if columns[0] != "step" and not _is_torn_header_start(path):
        raise ValueError(f"CSVLogger: {path} was not written by a CSVLogger (its first column is {columns[0]!r}, not "
                         "'step'); give the logger another name or version")
    return columns


def _jsonl_is_own(path: str) -> bool:
    """Whether ``path`` (a ``metrics.jsonl``) is empty or a JSONLLogger's: its first line begins ``{"step": ``
    (or, unfinished, is the start of that: a first record torn by a kill)."""
    with open(path, "rb") as f:
        first = f.readline()
    return first.startswith(_JSONL_START) or (not first.endswith(b"\n") and _JSONL_START.startswith(first))


def _jsonl_line_is_whole(line: bytes) -> bool:
    """Whether a JSONL line that lacks its newline was written whole: it reads as a JSON object (no proper
    start of one does: the object closes with its last character)."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # (a torn fragment; UnicodeDecodeError too, torn inside a character)
        return False


def _cut_torn_line(path: str) -> None:
    """End the last line of a JSONLLogger's file that a run killed mid-write left without its newline: a whole
    record is kept, its line ended; a torn fragment is dropped (the next record would run on from it)."""
    found = _unfinished_line(path)
    if found is not None:
        data, start = found
        _end_last_line(path, data, start, _jsonl_line_is_whole(data[start:]))


def _tensorflow_bins() -> tuple[float, ...]:
    """TensorBoard's default histogram buckets (what ``SummaryWriter.add_histogram`` uses): +-1e-12 * 1.1**k up to 1e20."""
    buckets = []
    v = 1e-12
    while v < 1e20:
        buckets.append(v)
        v *= 1.1
    return tuple([-b for b in reversed(buckets)] + [0.0] + buckets)


_TENSORFLOW_BINS = _tensorflow_bins()


class _EventFile:
    """One TensorBoard event file (TFRecord framing), written in the calling thread.

    tensorboardX's ``SummaryWriter`` hands every event to a ``multiprocessing.Queue`` whose
    feeder thread pickles it for a writer thread, and its flush fsyncs; with a few scalars
    every n steps that machinery costs the training thread more than the bytes do. Here each
    event is framed into a buffered file; :meth:`flush` (once per logging call) hands it to
    the OS, so a killed run keeps what it logged, and :meth:`close` also fsyncs.
    """

    def __init__(self, log_dir: str, suffix: str, after: str | None = None) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self._event = Event
        seconds = int(time.time())
        name = f"events.out.tfevents.{seconds}.{socket.gethostname()}{suffix}"
        if after is not None and name <= os.path.basename(after):  # TensorBoard reads a folder's files in name order
            seconds = max(seconds, _file_seconds(after)) + 1
            name = f"events.out.tfevents.{seconds}.{socket.gethostname()}{suffix}"
        self.path = os.path.join(log_dir, name)
        for again in range(1, _MAX_CLAIMS):  # never another's: a logger made where a collected one was has its id
            try:
                self._file = open(self.path, "xb")
                break
            except FileExistsError:
                self.path = os.path.join(log_dir, f"{name}.{again}")
        else:
            raise RuntimeError(f"TensorBoardLogger: no free event file name in {log_dir!r} after {_MAX_CLAIMS} tries")
        # a logger never finalized still leaves a complete file at exit
        self._at_exit = weakref.finalize(self, _close_event_file, self._file)
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, summary: Any, step: int) -> None:
        self._write(self._event(summary=summary, step=int(step), wall_time=time.time()))

    def session_start(self, step: int) -> None:
        """A restart at ``step``: TensorBoard drops what it read before of steps ``>= step`` (a resumed run's)."""
        from tensorboardX.proto.event_pb2 import SessionLog

        self._write(self._event(step=int(step), wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))

    def _write(self, event: Any) -> None:
        self._file.write(_record(event.SerializeToString()))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._at_exit()


def _record(data: bytes) -> bytes:
    """``data`` framed as one TFRecord: its length, the length's CRC, the data, the data's CRC."""
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _records(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Each whole TFRecord of an event file's bytes, as ``(framed record, event bytes)``; a torn end
    (a run killed mid-write) ends it."""
    from tensorboardX.record_writer import masked_crc32c

    at = 0
    while at + 12 <= len(data):
        header = data[at:at + 8]
        end = at + 16 + struct.unpack("<Q", header)[0]
        if struct.unpack("<I", data[at + 8:at + 12])[0] != masked_crc32c(header) or end > len(data):
            return
        yield data[at:end], data[at + 12:end - 4]
        at = end


def _events(data: bytes) -> Iterator[tuple[bytes, Any]]:
    """Each whole event of an event file's bytes, as ``(framed record, Event)``; one that does not decode ends it."""
    from google.protobuf.message import DecodeError
    from tensorboardX.proto.event_pb2 import Event

    for framed, body in _records(data):
        try:
            yield framed, Event.FromString(body)
        except DecodeError:
            return


def _holds_scalars(event: Any) -> bool:
    """Whether ``event`` is one :meth:`TensorBoardLogger.log_metrics` call's (scalars only): a record."""
    return event.HasField("summary") and bool(event.summary.value) and all(
        v.HasField("simple_value") for v in event.summary.value)


def _scalar_records(path: str) -> list[tuple[int, int | None, bool]]:
    """The event file ``path``'s records (:func:`_holds_scalars`), in order, as :func:`_record_epochs` reads them."""
    with open(path, "rb") as f:
        data = f.read()
    out = []
    for _, event in _events(data):
        if _holds_scalars(event):
            held = [v.simple_value for v in event.summary.value if v.tag == "epoch"]
            out.append((event.step, _epoch_value(held[0]) if held else None,
                        is_epoch_record(v.tag for v in event.summary.value)))
    return out


def _filter_event_file(
    path: str, keep: Callable[[int, frozenset[str], int | None], bool], last: dict[str, tuple[int, float]] | None = None,
    epochs: Iterator[int | None] | None = None, old: int | None = None,
) -> int:
    """Rewrite the event file ``path`` without the events for which ``keep(step, their tags, their epoch)`` is
    false (the file's version header is always kept); return how many were dropped. ``epochs`` gives, in order, the
    epoch of each record (:func:`_scalar_records`); other events' is None. The records after the first ``old``
    (None: all of them) are kept unasked, and the events after them. ``last`` collects the newest scalar kept of
    each tag, ``tag: (step, value)``."""
    with open(path, "rb") as f:
        data = f.read()
    out, dropped, read, records = [], 0, 0, 0
    for framed, event in _events(data):
        read += len(framed)
        tags = frozenset(v.tag for v in event.summary.value) if event.HasField("summary") else frozenset()
        record = _holds_scalars(event)
        epoch = next(epochs) if epochs is not None and record else None
        records += record
        own = old is not None and records > old  # (a record past the first old ones, or an event after it)
        if not event.HasField("file_version") and not own and not keep(event.step, tags, epoch):
            dropped += 1
            continue
        if last is not None:
            for value in event.summary.value:
                if value.HasField("simple_value") and event.step >= last.get(value.tag, (event.step, 0.0))[0]:
                    last[value.tag] = (event.step, value.simple_value)
        out.append(framed)
    if dropped or read < len(data):  # (a torn end is cut off too)
        _replace_file(path, b"".join(out), _rewrite_path(path))  # (no "tfevents" in the temporary's name)
    return dropped


def _rewrite_path(path: str) -> str:
    """Where an event file is rewritten before it replaces ``path``."""
    return os.path.join(os.path.dirname(path), f".rewrite-{os.path.basename(path).replace('tfevents', 'tfev')}")


#: the tag prefix of tensorboardX's hparams summaries
_HPARAMS = "_hparams_/"


def _file_seconds(path: str) -> int:
    """The time in an event file's name (``events.out.tfevents.<seconds>.<host>...``), 0 if none."""
    parts = os.path.basename(path).split(".")
    return (_int_or_none(parts[3]) if len(parts) > 3 else None) or 0


def _event_files(folder: str) -> list[str]:
    """The TensorBoard event files in ``folder``."""
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("events.out.tfevents"))


def _scalars(metrics: Mapping[str, float]) -> Any:
    """One TensorBoard ``Summary`` holding each metric as a scalar (as ``tf.summary`` writes them)."""
    from tensorboardX.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()])


def _close_event_file(file: IO[bytes]) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()


def _tensorboard_value(value: Any) -> bool | float | str:
    """A flattened hyper-parameter as TensorBoard's HPARAMS summary holds it: a bool or a string as it is, a number
    as a float (TensorBoard's ``number_value``: an int outside int64 too, a 128-bit seed, which tensorboardX's
    ``make_np`` cannot take, as Lightning's summary, by ``torch.utils.tensorboard``, writes it), and anything else,
    an int beyond any float included, as text (Lightning's raises ``OverflowError`` there).

    >>> [_tensorboard_value(v) for v in (True, 3, 2**100, 10**400 // 10**399, "adam", None, [4, 8])]
    [True, 3.0, 1.2676506002282294e+30, 10.0, 'adam', 'None', '[4, 8]']
    >>> _tensorboard_value(10**400)[:5]
    '10000'
    """
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            pass
    return str(value)


class TensorBoardLogger(RunDirLogger):
    """Scalars (and optionally histograms) as TensorBoard event files in ``root/name/version_N``.

    Hyper-parameters given to :meth:`log_hparams` are written at :meth:`finalize` (at once when
    given after it, as after ``run_epochs``, metrics logged or the :attr:`writer` used since or not) with the
    final metrics (the last value of every logged tag but ``epoch``, or the ``metrics`` given), so
    TensorBoard's HPARAMS tab compares runs by them (numbers as floats, an int outside int64 too, as Lightning's;
    lists and other values as text). ``histogram_every_n_steps=m`` writes
    histograms of every parameter (``params/<name>``) and gradient (``grads/<name>``) on
    each m-th optimizer update, as the optimizer sees them (after clipping and unscaling).
    Events are encoded by tensorboardX and written in the calling thread, flushed at every
    call (no background threads); :attr:`writer` is a ``tensorboardX.SummaryWriter`` on the
    same folder for anything else (on rank 0; other ranks get one that writes nothing).

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> logger = TensorBoardLogger(tmp.name, "demo")
    >>> logger.log_metrics({"train/loss": 0.5}, step=1)
    >>> logger.finalize()
    >>> any(f.startswith("events.out.tfevents") for f in os.listdir(logger.log_dir))
    True
    >>> tmp.cleanup()
    """

    def __init__(
        self,
        root: str | os.PathLike = "runs",
        name: str | None = "default",
        version: int | str | None = None,
        histogram_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(root, name, version)
        m = histogram_every_n_steps
        if m is not None and (as_int(m) or 0) < 1:
            raise ValueError(f"TensorBoardLogger: histogram_every_n_steps must be a positive int or None, got {m!r}")
        self.histogram_every_n_steps = None if m is None else as_int(m)
        self._file: _EventFile | None = None
        self._writer: Any = None
        self._opened = 0
        self._last: dict[str, float] = {}
        self._last_step = 0
        self._hparams_written = False
        self._summaries = 0  # the hyper-parameter summaries this logger wrote
        self._finished = False  # finalized (a fit's end), and no fit begun since (resume_at): hparams go out at once
        self._earlier: list[str] = []  # the folder's event files when resume_at was last applied
        self._kept: dict[str, tuple[int, float]] = {}  # the newest scalar of each tag _drop_records kept there
        self._own: set[str] = set()  # the event files this logger made, in this process
        self._token = secrets.token_hex(4)  # in its files' names (an id is reused once its logger is collected)
        self._purge_step: int | None = None  # a resumed run's new event file tells a live TensorBoard to drop from here

    def resume_at(
        self, step: int, epoch: int | None = None, batch_index: int | None = None, *, finishes_epoch: bool = False
    ) -> None:
        """:meth:`RunDirLogger.resume_at`; a fit begins, so hyper-parameters given from now on wait for its
        :meth:`finalize` (to be written with its final metrics)."""
        super().resume_at(step, epoch, batch_index, finishes_epoch=finishes_epoch)
        self._finished = False

    def _suffix(self) -> str:
        # event files are named by the second: one reopened within it would clobber the last
        self._opened += 1
        return f".{os.getpid()}.{self._token}.{self._opened}"

    def open(self) -> None:
        """Open the event file now (it is otherwise opened by the first write); on ranks other than 0, nothing."""
        if not is_rank_zero():
            return
        folder = self._folder()  # (first: a pending resume_at rewrites the files there, closing this logger's)
        if self._file is None:
            files = _event_files(folder)
            self._file = _EventFile(folder, self._suffix(), max(files, key=os.path.basename) if files else None)
            self._own.add(self._file.path)
            if self._purge_step is not None:  # (what tensorboardX's purge_step writes)
                self._file.session_start(self._purge_step)
                self._purge_step = None

    @property
    def writer(self) -> Any:
        """A ``tensorboardX.SummaryWriter`` on this run's folder (opened on first use, closed by
        :meth:`finalize`), for anything else to log: images, text, graphs. On ranks other than 0, an object whose
        every attribute and call does nothing (Lightning's ``DummyExperiment``), so that code calling
        ``logger.writer.add_text(...)`` on every rank writes on rank 0 only."""
        if not is_rank_zero():
            return _Inert()
        if self._writer is None:
            from tensorboardX import SummaryWriter

            folder = self._folder()
            before = set(_event_files(folder))
            self._writer = SummaryWriter(folder, filename_suffix=self._suffix())
            self._own.update(set(_event_files(folder)) - before)
        return self._writer

    def _add(self, summary: Any, step: int) -> None:
        if self._file is None or self._resume_pos is not None:
            self.open()
        self._file.add(summary, step)  # type: ignore[union-attr]

    def _add_record(self, metrics: Mapping[str, float], step: int) -> None:
        """``metrics`` as one event of scalars at ``step``: a record (:func:`_holds_scalars`)."""
        self._add(_scalars(metrics), step)
        self._wrote(self._file.path)  # type: ignore[union-attr]

    def _forget_folder(self) -> None:
        super()._forget_folder()
        self._close_files()
        self._last, self._last_step, self._hparams_written = {}, 0, False
        self._summaries, self._finished, self._earlier, self._kept, self._own = 0, False, [], {}, set()
        self._purge_step = None

    def _close_files(self) -> None:
        """Close this logger's event file and writer (the next write opens new ones)."""
        for handle in (self._file, self._writer):
            if handle is not None:
                handle.close()
        self._file = self._writer = None

    def _resume(self, folder: str, pos: _Position) -> None:
        for stale in os.listdir(folder):  # a rewrite a crash left unfinished (its file is whole: it was not replaced)
            if stale.startswith(".rewrite-"):
                os.remove(os.path.join(folder, stale))
        if self._top is None:  # nothing logged by this logger yet: what it wrote (text, hparams) stays as it is
            self._earlier = [path for path in _event_files(folder) if path not in self._own]
        else:  # a rewind: this logger's own files are rewritten too, closed first
            self._close_files()
            self._earlier = _event_files(folder)
        super()._resume(folder, pos)
        last = self._kept  # the newest value of each tag kept: the HPARAMS tab's metrics, as in the run unresumed
        self._last = {tag: value for tag, (_, value) in last.items() if not tag.startswith(_HPARAMS)}
        self._last_step = max((at for at, _ in last.values()), default=0)
        self._purge_step = 0 if pos.fresh else pos.step + 1  # (TensorBoard purges by step alone)

    def _drop_records(self, folder: str, keep: Callable[[int, frozenset[str], int | None], bool]) -> int:
        """Drop from the event files of :meth:`_resume` (:attr:`_earlier`) the records ``keep`` refuses (their
        epochs read over all the folder's files in name order, TensorBoard's, as they were written: those opened
        since, with the fit's records after them, tell the epochs of the records before them at their step)."""
        self._kept = {}
        files = sorted({*self._earlier, *_event_files(folder)}, key=os.path.basename)
        records = {path: _scalar_records(path) for path in files}
        epochs = _record_epochs([record for path in files for record in records[path]])
        dropped, at = 0, 0
        for path in files:
            told, at = epochs[at:at + len(records[path])], at + len(records[path])
            if path in self._earlier:
                dropped += _filter_event_file(path, keep, self._kept, iter(told), self._old(path, len(told)))
        return dropped

    def _write_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._make_room(metrics, step)
        self._add_record(metrics, step)  # one event for the call's scalars, handed to the OS at once
        self._file.flush()  # type: ignore[union-attr]
        self._last.update(metrics)
        self._last_step = max(self._last_step, step)

    def _write_hparams(self, hparams: dict[str, Any], metrics: dict[str, float] | None) -> None:
        super()._write_hparams(hparams, metrics)  # hparams.json in the run folder, as the other file loggers write
        self._hparams_written = False
        if self._finished:  # given after the fit was finalized (run_epochs does at its end), even with a test
            # evaluation logged (or the writer used) since: no later finalize would come, so they are written now
            self._finalize()  # (and the files closed: a later summary goes to a new file, the earlier one dropped)

    def wants_model(self, step: int) -> bool:
        """Whether :meth:`log_model` should be called for the update that reaches ``step``."""
        m = self.histogram_every_n_steps
        return m is not None and step % m == 0 and is_rank_zero()

    def log_model(self, model: torch.nn.Module, step: int) -> None:
        """Histograms of ``model``'s parameters and of the gradients they hold, at ``step``.

        >>> import tempfile, torch
        >>> tmp = tempfile.TemporaryDirectory()
        >>> logger = TensorBoardLogger(tmp.name, histogram_every_n_steps=1)
        >>> logger.log_model(torch.nn.Linear(2, 1), step=1); logger.finalize()
        >>> tmp.cleanup()
        """
        if not is_rank_zero():
            return
        from tensorboardX.summary import histogram

        bins = _TENSORFLOW_BINS
        for name, p in model.named_parameters():
            self._add(histogram(f"params/{name}", p.detach().float().cpu().numpy(), bins), step)
            if p.grad is not None:
                self._add(histogram(f"grads/{name}", p.grad.detach().float().cpu().numpy(), bins), step)
        self._file.flush()  # type: ignore[union-attr]

    def _finalize(self) -> None:
        super()._finalize()
        if self._hparams is not None and not self._hparams_written:
            self._write_hparams_summary()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._finished = True

    def _write_hparams_summary(self) -> None:
        from tensorboardX.summary import hparams as hparams_summary

        # (the last value of every tag but ``epoch``, the counter with_logging logs on every row: no result to compare
        # runs by; Lightning's hparams hold the metrics given alone, never its logged ``epoch``)
        metrics = {k: v for k, v in self._last.items() if k != "epoch"} if self._final_metrics is None else dict(
            self._final_metrics)
        unlogged = {k: v for k, v in metrics.items() if k not in self._last}
        if unlogged:  # final metrics never logged as scalars: add them, for the HPARAMS tab
            self._add_record(unlogged, self._last_step)
        # a resumed run's hyper-parameters replace those of its part before the resume, and a summary written again
        # (log_hparams after the fit, when it was given before too) the one before: TensorBoard reads the first
        earlier = list(self._earlier)
        if self._summaries:
            current = None if self._file is None else self._file.path
            earlier += [path for path in sorted(self._own) if path != current and path not in earlier and os.path.exists(path)]
        for path in earlier:
            _filter_event_file(path, lambda step, tags, _: not any(t.startswith(_HPARAMS) for t in tags))
        self._summaries += 1
        flat = {k: _tensorboard_value(v) for k, v in _flatten(self._hparams).items()}
        for summary in hparams_summary(flat, metrics):
            self._add(summary, 0)
        self._hparams_written = True


class CSVLogger(RunDirLogger):
    """``metrics.csv`` (a ``step`` column, then one column per metric), ``hparams.json`` and
    ``hparams_metrics.json`` (see :class:`RunDirLogger`).

    Columns grow as new metrics appear: the file is rewritten with the wider header, so it
    always has one header row, and a row leaves blank the metrics it does not have. Rows are
    written as they come, each ending ``\\r\\n`` (nothing is lost if the run dies; a row torn by a kill mid-write
    is dropped when the folder is written to again, with or without :meth:`resume_at`; one torn between the
    ``\\r`` and the ``\\n`` holds all its cells: it is kept, its line ended). Floats are written exactly. A
    ``metrics.csv`` another program wrote (its first column is not ``step``) is refused and left as it is, before
    the logger changes anything: once it is moved away, the logger writes as if the refused call never happened.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> logger = CSVLogger(tmp.name)
    >>> logger.log_metrics({"train/loss": 0.5}, step=1)
    >>> logger.log_metrics({"val/acc": 0.75}, step=2)
    >>> print(open(os.path.join(logger.log_dir, "metrics.csv")).read().strip())
    step,train/loss,val/acc
    1,0.5,
    2,,0.75
    >>> tmp.cleanup()
    """

    filename = "metrics.csv"

    def __init__(
        self, root: str | os.PathLike = "runs", name: str | None = "default", version: int | str | None = None
    ) -> None:
        super().__init__(root, name, version)
        self._columns: list[str] | None = None
        self._known: set[str] = set()  # (_columns as a set, for the new metrics of a row: one look-up each)

    def _forget_folder(self) -> None:
        super()._forget_folder()
        self._columns = None  # (the next folder's file has its own)

    def _check_file(self) -> None:
        """Before a record is written (and anything of this logger changes: its pending :meth:`resume_at`, what
        it tracks of its records): refuse a file of the run folder another program wrote, left as it is."""
        _refuse_foreign_csv(os.path.join(self.log_dir, self.filename))

    def _load(self) -> list[str]:
        """The columns, read back from an existing file's header when continuing a run in its folder."""
        if self._columns is None:
            path = self._path(self.filename)
            columns = _refuse_foreign_csv(path)  # (read once: cutting a torn row leaves the header as it is)
            # a file of its own: a row a killed run tore is dropped before the next; a torn header goes with its file
            if os.path.exists(path) and _cut_torn_row(path):
                columns = ["step"]
            self._columns, self._known = columns, set(columns)
        return self._columns

    def _drop_records(self, folder: str, keep: Callable[[int, frozenset[str], int | None], bool]) -> int:
        path = os.path.join(folder, self.filename)
        if not os.path.exists(path):
            return 0
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
        header, *rows = list(csv.reader(io.StringIO(text))) or [[]]
        if not header or header[0] != "step":  # not a file this logger wrote: left as it is (_load refuses it)
            return 0
        dropped = 0
        if rows and not text.endswith("\n") and not _csv_row_is_whole(text[text.rfind("\n") + 1:].encode()):
            rows, dropped = rows[:-1], 1  # the torn last row of a killed run (one torn inside "\r\n" is whole)
        records = []
        for row in rows:
            keys = frozenset(header[i] for i, v in enumerate(row[1:len(header)], 1) if v != "")
            epoch = _epoch_value(row[header.index("epoch")]) if "epoch" in keys else None
            records.append((_int_or_none(row[0] if row else ""), keys, epoch))
        kept, old = [], self._old(path, len(rows))
        epochs = _record_epochs([(at, epoch, is_epoch_record(keys)) for at, keys, epoch in records])
        for i, (row, (at, keys, _), epoch) in enumerate(zip(rows, records, epochs, strict=True)):
            if i < old and at is not None and not keep(at, keys, epoch):
                dropped += 1
            else:
                kept.append(row)
        if dropped:
            self._columns = None  # (read again from the file, or from the rows to come)
            if not kept:  # nothing left: the columns come again as the metrics do
                os.remove(path)
                return dropped
            # the columns the kept rows use, in the order they first appear there (as a run that never logged the
            # dropped rows has them; the resumed run's own columns come after them as its metrics do)
            used = ["step"]
            for row in kept:
                used.extend(header[i] for i, v in enumerate(row[1:len(header)], 1) if v != "" and header[i] not in used)
            where = [header.index(name) for name in used]
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(used)
            writer.writerows([row[i] if i < len(row) else "" for i in where] for row in kept)
            _replace_file(path, buffer.getvalue())
        return dropped

    def _write_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._columns is None:  # (a foreign file is refused before _make_room changes anything)
            self._check_file()
        self._make_room(metrics, step)
        columns = self._load()
        row = _file_record(metrics, step)
        new = [k for k in metrics if k not in self._known]
        if new:
            columns.extend(new)
            self._known.update(new)
            self._rewrite(row)
        else:
            with open(self._path(self.filename), "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, columns, restval="").writerow(row)
        self._wrote(self._path(self.filename))  # (the last row, rewritten or appended)

    def _rewrite(self, row: dict[str, float]) -> None:
        """The file again under the wider header: its rows as written (read back, not kept in
        memory: a long run's rows would grow without bound), then ``row``."""
        path = self._path(self.filename)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self._columns, restval="")  # type: ignore[arg-type]
        writer.writeheader()
        if os.path.exists(path):
            with open(path, newline="", encoding="utf-8") as f:
                writer.writerows(csv.DictReader(f))
        writer.writerow(row)
        _replace_file(path, buffer.getvalue())


class JSONLLogger(RunDirLogger):
    """``metrics.jsonl``: one JSON object per :meth:`log_metrics`, ``{"step": ..., <metric>: ...}``.

    Also writes ``hparams.json`` and ``hparams_metrics.json`` (see :class:`RunDirLogger`). Non-finite values
    are written as JSON's ``NaN`` / ``Infinity`` (Python's ``json`` reads them back). Lines are written as they come: a line torn by a kill mid-write
    is dropped when the folder is written to again, with or without :meth:`resume_at` (one whose record was
    written whole, only its newline missing, is kept). A ``metrics.jsonl`` another program wrote (its first
    line does not begin ``{"step": ``) is refused and left as it is, before the logger changes anything.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> logger = JSONLLogger(tmp.name)
    >>> logger.log_metrics({"train/loss": 0.5}, step=1)
    >>> print(open(os.path.join(logger.log_dir, "metrics.jsonl")).read().strip())
    {"step": 1, "train/loss": 0.5}
    >>> tmp.cleanup()
    """

    filename = "metrics.jsonl"

    def __init__(
        self, root: str | os.PathLike = "runs", name: str | None = "default", version: int | str | None = None
    ) -> None:
        super().__init__(root, name, version)
        self._checked = False  # whether the file was checked (its own, its last line ended) before a first write

    def _forget_folder(self) -> None:
        super()._forget_folder()
        self._checked = False  # (the next folder's file is checked before its first record)

    def _check_file(self) -> None:
        """Before this logger's first record: refuse a file of the run folder another program wrote (left as it
        is), and end the last line a killed run left without its newline (see :func:`_cut_torn_line`)."""
        if self._checked:
            return
        path = os.path.join(self.log_dir, self.filename)
        if os.path.exists(path):
            if not _jsonl_is_own(path):
                raise ValueError(f"JSONLLogger: {path} was not written by a JSONLLogger (its first line does not "
                                 "begin '{\"step\": '); give the logger another name or version")
            _cut_torn_line(path)
        self._checked = True

    def _drop_records(self, folder: str, keep: Callable[[int, frozenset[str], int | None], bool]) -> int:
        path = os.path.join(folder, self.filename)
        if not os.path.exists(path) or not _jsonl_is_own(path):  # (a foreign file: left as it is, the write refuses it)
            return 0
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        records, dropped = [], 0
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # the torn last line of a killed run
                dropped += 1
                continue
            if not isinstance(record, dict):  # (a line this logger did not write: kept as it is)
                records.append((line, None, frozenset(), None))
                continue
            keys = frozenset(record) - {"step"}
            records.append((line, _int_or_none(record.get("step")), keys,
                            _epoch_value(record["epoch"]) if "epoch" in keys else None))
        kept, old = [], self._old(path, len(records))
        epochs = _record_epochs([(at, epoch, is_epoch_record(keys)) for _, at, keys, epoch in records])
        for i, ((line, at, keys, _), epoch) in enumerate(zip(records, epochs, strict=True)):
            if i < old and at is not None and not keep(at, keys, epoch):
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            _replace_file(path, "".join(line + "\n" for line in kept))
        return dropped

    def _write_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._check_file()
        self._make_room(metrics, step)
        path = self._path(self.filename)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_file_record(metrics, step)) + "\n")
        self._wrote(path)


class ConsoleLogger(Logger):
    """Prints one compact line per :meth:`log_metrics`: ``step 50  train/loss=0.1234 ...``.

    Writes to ``stream`` (default: standard output at the time of writing), through tqdm when
    it is installed so that progress bars stay intact.

    >>> ConsoleLogger(digits=3).log_metrics({"train/loss": 0.123456, "epoch": 0}, step=50)
    step 50  train/loss=0.123  epoch=0
    """

    def __init__(self, stream: IO[str] | None = None, digits: int = 4) -> None:
        super().__init__()
        if (as_int(digits) or 0) < 1:
            raise ValueError(f"ConsoleLogger: digits must be a positive int, got {digits!r}")
        digits = as_int(digits)
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise TypeError(f"ConsoleLogger: stream must be a text stream (sys.stdout, a file), got {type(stream).__qualname__}")
        self.stream = stream
        self.digits = digits

    def _print(self, line: str) -> None:
        write_line(line, self.stream if self.stream is not None else sys.stdout)

    def _format(self, value: float) -> str:
        if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.{self.digits}g}"

    def _write_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._print(f"step {step}  " + "  ".join(f"{k}={self._format(v)}" for k, v in metrics.items()))

    def _write_hparams(self, hparams: dict[str, Any], metrics: dict[str, float] | None) -> None:
        self._print("hparams  " + "  ".join(f"{k}={v}" for k, v in _flatten(hparams).items()))
