"""Hyper-parameter search: Optuna studies over a step pipeline, pruned on validation metrics.

An objective builds a state and a step from a trial's suggestions and trains them with
:func:`fit`, which runs :func:`loopkit.run_epochs` with a :class:`PruningCallback`: each
validation's ``monitor`` value is reported to the trial, and a trial the study's pruner
judges hopeless stops there (``optuna.TrialPruned``). :func:`create_study` keeps the study
in SQLite by default (``<directory>/<study_name>.db``), so an interrupted search resumes: the
finished trials stay, and a trial whose process died (killed, out of memory) is marked ``FAIL``
and run again with the same parameters (Optuna's heartbeat: see :func:`create_study`;
:func:`retried_trial_number` names the dead trial whose checkpoints the rerun resumes); any
Optuna storage URL (``postgresql://...``, ``mysql://...``) lets processes on many machines
work on one study, each running :func:`optimize` with the same name and URL. Each process
runs its own trials: under a ``torch.distributed`` group of several ranks :func:`optimize`
is refused (see there for DDP trials).
Needs the ``tune`` extra (``pip install loopkit[tune]``, which installs Optuna).

>>> import tempfile, torch, loopkit
>>> from loopkit import tune
>>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
>>> mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
>>> def objective(trial):
...     lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
...     model = torch.nn.Linear(3, 1)
...     state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=lr), seed=trial.number)
...     val = (loopkit.eval_step(lambda m, b: {"loss": mse(m, b)}), data)
...     return tune.fit(trial, loopkit.train_step(mse), state, data, val=val, epochs=2)
>>> tmp = tempfile.TemporaryDirectory()
>>> study = tune.optimize(objective, n_trials=3, study_name="demo", directory=tmp.name)
>>> len(study.trials), sorted(study.best_params)
(3, ['lr'])
>>> tmp.cleanup()
"""

from __future__ import annotations

import contextlib
import math
import os
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from loopkit._collective import rank_and_size
from loopkit._numbers import as_int, as_real
from loopkit.callbacks import MonitorCallback
from loopkit.driver import _check_callbacks, _signal_stop, run_epochs
from loopkit.state import TrainState

try:  # serialises the making of a new SQLite study (POSIX); without it, made as Optuna makes it
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

if TYPE_CHECKING:  # optuna is an optional dependency, imported when used
    import optuna

__all__ = ["PruningCallback", "create_study", "fit", "optimize", "retried_trial_number", "storage_url"]


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("loopkit.tune needs Optuna: pip install 'loopkit[tune]' (or pip install optuna)") from e
    return optuna


def storage_url(study_name: str, directory: str | os.PathLike = ".") -> str:
    """The default storage of a study: an SQLite file ``<directory>/<study_name>.db``.

    >>> storage_url("search", "/tmp")
    'sqlite:////tmp/search.db'
    >>> storage_url("search", "/tmp/a b?")  # the path is quoted: any folder name works
    'sqlite:////tmp/a%20b%3F/search.db'
    """
    if not isinstance(study_name, str) or not study_name or os.sep in study_name:
        raise ValueError(f"loopkit.tune: study_name must be a non-empty name without '{os.sep}', got {study_name!r}")
    folder = os.path.expanduser(os.fspath(directory))
    return "sqlite:///" + urllib.parse.quote(os.path.abspath(os.path.join(folder, f"{study_name}.db")))


def _make_folder(directory: str | os.PathLike) -> None:
    """Make ``directory`` (with its parents) where it is missing, as CSVLogger makes its root; a file in its way is refused.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> _make_folder(os.path.join(tmp.name, "a", "b")); os.path.isdir(os.path.join(tmp.name, "a", "b"))
    True
    >>> open(os.path.join(tmp.name, "f"), "w").close()
    >>> _make_folder(os.path.join(tmp.name, "f", "b"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    NotADirectoryError: loopkit.tune: directory '.../f/b' (where the study's SQLite file goes) cannot be made: '.../f' is a file
    >>> tmp.cleanup()
    """
    folder = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, FileNotFoundError, NotADirectoryError) as e:  # FileNotFoundError: a dangling link
        blocker = folder
        while not os.path.lexists(blocker):
            blocker = os.path.dirname(blocker)
        what = "a link to nothing" if os.path.islink(blocker) and not os.path.exists(blocker) else "a file"
        raise NotADirectoryError(
            f"loopkit.tune: directory {str(directory)!r} (where the study's SQLite file goes) cannot be made: "
            f"{blocker!r} is {what}"
        ) from e


_HEARTBEAT_INTERVAL = 60  # seconds between a running trial's heartbeats in the storage create_study makes
_MAX_RETRY = 2  # reruns of one configuration whose process died (three tries in all)


def create_study(
    study_name: str = "loopkit",
    *,
    storage: Any = None,
    directory: str | os.PathLike = ".",
    direction: str | None = None,
    sampler: Any = None,
    pruner: Any = None,
    load_if_exists: bool = True,
    heartbeat_interval: int | None = _HEARTBEAT_INTERVAL,
    grace_period: int | None = None,
    max_retry: int | None = _MAX_RETRY,
) -> optuna.Study:
    """An Optuna study kept in ``storage`` (default: SQLite in ``directory``), resumed if it exists.

    ``directory`` is made (with its parents) when it does not exist yet; a file in its way is a
    ``NotADirectoryError``. A ``storage=`` is a database URL or an Optuna storage object: anything else, a URL of a
    database kind SQLAlchemy does not know, or an SQLite file whose folder does not exist (it is not made: leave
    ``storage`` out for that) is refused at the call, naming it.

    ``direction`` is ``"minimize"`` (the default for a new study) or ``"maximize"`` (or Optuna's
    ``StudyDirection`` of either); a study resumed with the other direction is refused (Optuna would
    keep the stored one).

    ``pruner`` defaults to Optuna's ``MedianPruner`` (a trial stops when its reported value
    is worse than the median of earlier trials at the same step, after 5 complete trials).

    The storage made from a URL (the default SQLite file, or a ``storage=`` URL string) is an
    ``optuna.storages.RDBStorage`` with Optuna's heartbeat: a running trial records a heartbeat
    every ``heartbeat_interval`` seconds (default 60). A ``RUNNING`` trial whose last heartbeat
    is older than ``grace_period`` seconds (default ``2 * heartbeat_interval``) belongs to a
    process that died; the next trial started on the study (by this process or any other, in
    ``optimize``) first marks it ``FAIL`` and queues a copy with the same parameters, which is
    the trial it then runs, up to ``max_retry`` times for one configuration (default 2; ``None``:
    no limit, ``0``: no rerun). So a search resumed at once (before ``grace_period`` has passed)
    leaves the dead trial ``RUNNING`` until a later trial's start finds it stale. Only trials
    that recorded a heartbeat are checked (not those of a study run before heartbeats were on).
    ``heartbeat_interval=None`` turns the heartbeat off (Optuna's default: a dead process's
    trial stays ``RUNNING``). A ``storage=`` storage object is used as it was made; configure
    its heartbeat there (these three options are then refused).

    Several processes may make (or resume) one SQLite study at once (a job array's workers, each
    calling :func:`optimize`): they take turns on an exclusive lock of ``<file>.lock``, a file left
    next to the SQLite file (``fcntl.flock``), while the storage and the study are made, since
    Optuna's schema creation is not safe against a second process doing the same (``table ...
    already exists``, optuna/optuna#4621). Where ``fcntl`` is missing (Windows) there is no lock:
    start one process first there. Other storages (``postgresql://``, a storage object) are made
    as Optuna makes them.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> study = create_study("s", directory=tmp.name)
    >>> study.study_name, os.path.exists(os.path.join(tmp.name, "s.db"))
    ('s', True)
    >>> tmp.cleanup()
    """
    optuna = _optuna()
    if isinstance(direction, optuna.study.StudyDirection) and direction.name in ("MINIMIZE", "MAXIMIZE"):
        direction = direction.name.lower()  # (optuna.create_study takes its enum too)
    if direction not in (None, "minimize", "maximize"):
        raise ValueError(f"loopkit.tune: direction must be 'minimize' or 'maximize', got {direction!r}")
    if sampler is not None and not isinstance(sampler, optuna.samplers.BaseSampler):
        raise TypeError(f"loopkit.tune: sampler must be an optuna sampler (optuna.samplers.TPESampler()), got {sampler!r}")
    if pruner is not None and not isinstance(pruner, optuna.pruners.BasePruner):
        raise TypeError(f"loopkit.tune: pruner must be an optuna pruner (optuna.pruners.MedianPruner()), got {pruner!r}")
    _check_heartbeat(heartbeat_interval, grace_period, max_retry)
    if storage is None:
        storage = storage_url(study_name, directory)
        _make_folder(directory)
    else:
        _check_storage(optuna, storage)
    where = storage
    if not isinstance(storage, str):
        if (heartbeat_interval, grace_period, max_retry) != (_HEARTBEAT_INTERVAL, None, _MAX_RETRY):
            raise TypeError(
                "loopkit.tune: heartbeat_interval, grace_period and max_retry configure the storage made from a URL; "
                "the given storage object has its own (optuna.storages.RDBStorage(url, heartbeat_interval=...))"
            )
    with _creation_lock(where):  # (Optuna's schema creation races in SQLite: optuna/optuna#4621)
        if isinstance(storage, str) and heartbeat_interval is not None:
            storage = _heartbeat_storage(optuna, storage, heartbeat_interval, grace_period, max_retry)
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            direction=direction or "minimize",
            sampler=sampler,
            pruner=pruner if pruner is not None else optuna.pruners.MedianPruner(),
            load_if_exists=load_if_exists,
        )
    stored = study.direction.name.lower()
    if direction is not None and stored != direction:
        raise ValueError(
            f"loopkit.tune: study '{study_name}' in {where} was made to {stored}; it cannot be resumed to {direction}"
        )
    return study


def _check_storage(optuna: Any, storage: Any) -> None:
    """Refuse a ``storage=`` that Optuna would fail on inside (an ``AttributeError`` for a non-storage, SQLAlchemy's
    "unable to open database file" naming no path), naming it: a URL that is none, of a database kind SQLAlchemy does
    not know, or an SQLite file whose folder is missing.

    >>> import optuna
    >>> _check_storage(optuna, "sqlite:////no/such/folder/s.db")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: loopkit.tune: storage 'sqlite:////no/such/folder/s.db' is an SQLite file in '/no/such/folder', ...
    """
    if isinstance(storage, optuna.storages.BaseStorage):
        return
    if not isinstance(storage, str):
        path = ("; for an SQLite file at a path, leave storage out and give directory= (the file is "
                "<directory>/<study_name>.db), or give storage=loopkit.tune.storage_url(study_name, directory)"
                if isinstance(storage, os.PathLike) else "")
        raise TypeError(f"loopkit.tune: storage must be a database URL ('sqlite:///search.db', 'postgresql://...') or "
                        f"an optuna storage (optuna.storages.RDBStorage(url)), or None, got {storage!r}{path}")
    from sqlalchemy.engine import make_url  # (Optuna's RDB storage is SQLAlchemy's)
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(storage).get_dialect()  # (loads the dialect, not its driver)
    except ArgumentError as error:  # (NoSuchModuleError, an unknown database kind, is one)
        raise ValueError(f"loopkit.tune: storage {storage!r} is not a database URL SQLAlchemy can open ({error}): "
                         "give one such as 'sqlite:///search.db' or 'postgresql://user@host/db'") from None
    path = _sqlite_file(storage)
    folder = None if path is None else os.path.dirname(path)
    if folder is not None and not os.path.isdir(folder):
        if os.path.exists(folder):
            raise NotADirectoryError(f"loopkit.tune: storage {storage!r} is an SQLite file in {folder!r}, which is a "
                                     "file, not a folder")
        raise FileNotFoundError(f"loopkit.tune: storage {storage!r} is an SQLite file in {folder!r}, which does not "
                                "exist; make the folder first, or leave storage out for one in directory= (made for "
                                "you)")


def _check_heartbeat(heartbeat_interval: Any, grace_period: Any, max_retry: Any) -> None:
    def positive_int(value: Any) -> bool:
        return (as_int(value) or 0) > 0

    if heartbeat_interval is not None and not positive_int(heartbeat_interval):
        raise ValueError(f"loopkit.tune: heartbeat_interval must be a positive int (seconds) or None, got {heartbeat_interval!r}")
    if grace_period is not None:
        if heartbeat_interval is None:
            raise ValueError("loopkit.tune: grace_period needs a heartbeat (heartbeat_interval is None)")
        if not positive_int(grace_period) or grace_period <= heartbeat_interval:
            raise ValueError(
                f"loopkit.tune: grace_period must be an int (seconds) above heartbeat_interval ({heartbeat_interval}), "
                f"or None, got {grace_period!r}"
            )
    if max_retry is not None and (as_int(max_retry) is None or as_int(max_retry) < 0):
        raise ValueError(f"loopkit.tune: max_retry must be an int >= 0 or None (no limit), got {max_retry!r}")


@contextlib.contextmanager
def _creation_lock(storage: Any) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``<file>.lock`` beside the file of an SQLite storage URL while a study is
    made in it, so that processes making one new study at once take turns in Optuna's schema creation; nothing for
    another storage, an in-memory SQLite, a folder one cannot write to (made as Optuna makes it; one that does not
    exist is refused before, :func:`_check_storage`) or without ``fcntl``."""
    path = _sqlite_file(storage) if fcntl is not None else None
    handle = None
    if path is not None:
        with contextlib.suppress(OSError):  # (a folder one cannot write to: made as Optuna makes it)
            handle = open(path + ".lock", "a")  # noqa: SIM115 - closed below
    if handle is None:
        yield
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # (releases the lock)


def _sqlite_file(storage: Any) -> str | None:
    """The absolute path of the database file an SQLite storage URL names, or None (another storage, in memory).

    >>> _sqlite_file("sqlite:////tmp/a%20b/s.db"), _sqlite_file("sqlite://"), _sqlite_file("postgresql://h/db")
    ('/tmp/a b/s.db', None, None)
    """
    if not isinstance(storage, str) or not storage.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url  # (Optuna's RDB storage is SQLAlchemy's)

    database = make_url(storage).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return os.path.abspath(database)


def _heartbeat_storage(optuna: Any, url: str, heartbeat_interval: int, grace_period: int | None, max_retry: int | None) -> Any:
    """``RDBStorage(url)`` whose dead trials fail and are rerun with the same parameters."""
    with warnings.catch_warnings():  # the heartbeat is an experimental Optuna feature (since 2.9)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
        )


def optimize(
    objective: Callable[[optuna.Trial], float],
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    study: optuna.Study | None = None,
    catch: tuple[type[Exception], ...] = (),
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] | None = None,
    gc_after_trial: bool = False,
    show_progress_bar: bool = False,
    **study_options: Any,
) -> optuna.Study:
    """Run ``objective`` for ``n_trials`` more trials (or until ``timeout`` seconds) and return the study.

    Without ``study``, one is made (or resumed) by :func:`create_study` from
    ``study_options`` (``study_name``, ``storage``, ``directory``, ``direction``, ``sampler``,
    ``pruner``, ``heartbeat_interval``, ``grace_period``, ``max_retry``). Several processes may
    run this on one storage at once: each trial is claimed by one of them. Pruned trials end
    as ``PRUNED``; an exception in ``catch`` marks its trial ``FAIL`` and the search goes on;
    any other exception stops it. ``callbacks``, ``gc_after_trial`` and ``show_progress_bar`` are
    Optuna's ``study.optimize`` options, passed on (``optuna.study.MaxTrialsCallback(n)`` caps the
    study's trials over all the processes that share it). A trial's model and optimizer are freed once its objective
    returns, as a raw loop's, but a pruned (or failed) one's: Optuna keeps its exception, whose traceback holds the
    objective's frame, in a reference cycle until Python's gc runs (``gc_after_trial=True`` frees each trial's device
    memory at its end). Before each trial, a trial whose process died is marked
    ``FAIL`` and rerun with its parameters (see :func:`create_study`); the rerun counts as one
    of the ``n_trials`` (:func:`retried_trial_number` tells its objective which trial's checkpoints to resume).

    Under a ``torch.distributed`` process group of more than one process (torchrun) it is refused:
    each rank would ask the study for a trial of its own, and the ranks of one DDP job would train
    their replicas with other hyper-parameters. Run the search with one process per trial (workers
    without a process group, each calling this with the same study name and storage), or train each
    trial under DDP with a trial the ranks share: Optuna's ``TorchDistributedTrial``
    (``optuna-integration``): on rank 0 ``create_study(...).optimize(lambda t:
    objective(TorchDistributedTrial(t)), n_trials=n)``, on the others ``objective(TorchDistributedTrial(None))``
    ``n`` times; :func:`fit` takes that trial.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> study = optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.5) ** 2, n_trials=4, directory=tmp.name)
    >>> len(study.trials)
    4
    >>> tmp.cleanup()
    """
    if n_trials is not None and (as_int(n_trials) or 0) < 1:
        raise ValueError(f"loopkit.tune.optimize: n_trials must be a positive int or None, got {n_trials!r}")
    if timeout is not None and not (as_real(timeout) or 0) > 0:
        raise ValueError(f"loopkit.tune.optimize: timeout must be positive seconds or None, got {timeout!r}")
    n_trials, timeout = (None if v is None else as_real(v) for v in (n_trials, timeout))
    if n_trials is None and timeout is None:
        raise ValueError("loopkit.tune.optimize: give n_trials or timeout (or both); without either it never ends")
    if not callable(objective):
        raise TypeError(f"loopkit.tune.optimize: objective must be callable as objective(trial), got {type(objective).__qualname__}")
    if "n_jobs" in study_options:
        raise TypeError(
            "loopkit.tune.optimize: n_jobs (trials in threads) is not supported: a loopkit step installs its state's "
            "RNG into torch's one process-wide generator for the call, so trials in threads would draw each other's "
            "dropout masks and their values could not be reproduced; run trials in parallel processes instead, "
            "each calling optimize with the same study_name and storage"
        )
    _refuse_process_group("loopkit.tune.optimize")
    if study is None:
        study = create_study(**study_options)
    elif study_options:
        raise TypeError(f"loopkit.tune.optimize: {sorted(study_options)} configure a new study; the given study has its own")
    study.optimize(
        objective, n_trials=n_trials, timeout=timeout, catch=catch, callbacks=callbacks, gc_after_trial=gc_after_trial,
        show_progress_bar=show_progress_bar,
    )
    return study


def _refuse_process_group(who: str) -> None:
    """Refuse a search (or a fit of one process's own trial) under a ``torch.distributed`` group of several ranks."""
    rank, size = rank_and_size()
    if size > 1:
        raise RuntimeError(
            f"{who}: this process is rank {rank} of a torch.distributed process group of {size}: each rank would ask "
            "the study for a trial of its own, and the ranks of one DDP job would train their replicas with other "
            "hyper-parameters (DDP averages their gradients: the replicas drift apart and each trial records a mix). "
            "Run the search with one process per trial (workers without a process group, each calling "
            "tune.optimize with the same study_name and storage), or share each trial over the ranks with "
            "optuna_integration.TorchDistributedTrial: on rank 0 tune.create_study(...).optimize(lambda t: "
            "objective(TorchDistributedTrial(t)), n_trials=n), on the others objective(TorchDistributedTrial(None)) "
            "n times (tune.fit takes that trial)"
        )


def retried_trial_number(trial: Any) -> int | None:
    """The number of the trial whose process died that ``trial`` reruns with its parameters, or None (not a rerun).

    Optuna's heartbeat (see :func:`create_study`) marks a trial whose process died ``FAIL`` and
    queues a copy; the objective of that rerun finds the dead trial's checkpoints by this number
    (the first trial of the series: a rerun of a rerun gives the trial that died first, so every
    rerun resumes from the one folder). ``trial`` is the objective's argument (or a
    ``FrozenTrial``); Optuna's ``RetryFailedTrialCallback.retried_trial_number`` takes a frozen
    trial only (Optuna 5's live trial has no ``system_attrs``)::

        def objective(trial):
            died = tune.retried_trial_number(trial)
            folder = f"checkpoints/trial-{trial.number if died is None else died}"  # (not `died or`: trial 0)
            step = loopkit.with_checkpointing(loopkit.train_step(loss_fn), folder, every_n_epochs=1)
            state = loopkit.restore(build(trial), folder)  # (the built state itself where nothing was saved)
            return tune.fit(trial, step, state, train, val=val, epochs=10)

    >>> import optuna
    >>> study = optuna.create_study()
    >>> retried_trial_number(study.ask())
    """
    system_attrs = getattr(trial, "system_attrs", None)  # a FrozenTrial's
    if system_attrs is None:
        study, number = getattr(trial, "study", None), getattr(trial, "number", None)
        if number is None or not callable(getattr(study, "get_trials", None)):
            raise TypeError(f"loopkit.tune.retried_trial_number: trial must be an optuna trial (the objective's argument), "
                            f"got {type(trial).__qualname__}")
        system_attrs = next((t.system_attrs for t in study.get_trials(deepcopy=False) if t.number == number), {})
    number = system_attrs.get("failed_trial")
    return None if number is None else int(number)


class PruningCallback(MonitorCallback):
    """A ``run_epochs`` callback reporting ``monitor`` to an Optuna trial and pruning it when told.

    A ``val/...`` metric is reported after each validation, any other (``train/loss``) after
    each epoch. ``report_step="count"`` (the default) reports the n-th value at step n, so
    trials with other batch sizes or accumulation compare at the same validation (with one
    validation per epoch, step n is epoch n); ``"global"`` reports at ``state.step``.

    The count is the run's, not the fit's: ``run_epochs`` keeps it in the state's extras
    (``state_dict``, under ``callbacks/PruningCallback[<monitor>]``), so a fit resumed from a
    loopkit checkpoint (the rerun of a trial whose process died) goes on with it and reports
    each validation at the step the uninterrupted run reports it at; a validation the resumed
    fit runs again (its state was saved before it) keeps its step. A step the trial already
    holds (an earlier fit of this same trial reported that validation) is not reported again:
    Optuna would ignore the value with a warning. A state without the count (trained
    without this callback) starts it at 1. The extras keep the run's last value and the step it
    was reported at too (``last``, a ``(step, value)`` pair): a fit with no validation left to run
    (the rerun of a trial that died after its fit's last checkpoint, or whose remaining epochs
    do not validate) gives :func:`fit` the value the uninterrupted fit returns.

    When the study's pruner says so (or the value is NaN or infinite) the callback asks
    ``run_epochs`` to stop (``should_stop``): that validation is still logged and checkpointed,
    the fit ends as usual, and then ``on_fit_end`` raises ``optuna.TrialPruned`` (:func:`fit`
    raises it itself, after recording the history). ``reported`` holds what this fit reported.
    ``signal`` is the signal that stopped the fit gracefully (``"SIGTERM"``; see
    :func:`loopkit.run_epochs`), read at ``on_fit_end``, or None.

    >>> import optuna, torch
    >>> trial = optuna.create_study().ask()
    >>> callback = PruningCallback(trial, "val/loss")
    >>> callback.on_validation_end(TrainState.create(torch.nn.Linear(1, 1)), {"val/loss": 0.5})
    >>> callback.reported, callback.pruned
    ({1: 0.5}, False)
    """

    reads_only = True  # it reports to the trial and changes nothing of the state
    #: a pruned trial's result is dropped: run_epochs' min_epochs/min_steps do not hold its stop off (as
    #: optuna-integration's Lightning callback raises TrialPruned in on_validation_end, whatever Trainer's min_epochs)
    stops_before_minimum = True

    def __init__(self, trial: optuna.Trial, monitor: str = "val/loss", *, report_step: str = "count") -> None:
        super().__init__(monitor)
        if report_step not in ("count", "global"):
            raise ValueError(f"PruningCallback: report_step must be 'count' or 'global', got {report_step!r}")
        if not (callable(getattr(trial, "report", None)) and callable(getattr(trial, "should_prune", None))):
            raise TypeError(f"PruningCallback: trial must be an optuna trial (the objective's argument), got {type(trial).__qualname__}")
        self.trial = trial
        self.report_step = report_step
        self.reported: dict[int, float] = {}
        self.count = 0  # the values checked in the run so far (a resumed fit's state holds the earlier ones)
        self.last: tuple[int, float] | None = None  # the run's last value checked and the step it was reported at
        self.signal: str | None = None  # the signal that stopped the fit (on_fit_end reads it)
        self.should_stop = False
        self.pruned = False
        self.raise_at_fit_end = True

    @property
    def state_key(self) -> str:
        """The name ``run_epochs`` keeps the count under in ``state.extras`` (after ``callbacks/``).

        >>> import optuna
        >>> PruningCallback(optuna.create_study().ask(), "val/acc").state_key
        'PruningCallback[val/acc]'
        """
        return f"PruningCallback[{self.monitor}]"

    def state_dict(self) -> dict[str, Any]:
        """The count of values checked so far and the last one (``step``, ``value``; None before the first), for
        checkpoints (``run_epochs`` keeps it in ``state.extras``)."""
        step, value = self.last if self.last is not None else (None, None)
        return {"count": self.count, "step": step, "value": value}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Continue the count :meth:`state_dict` returned (a fit resumed from a checkpoint), and its last value (a
        state saved by a loopkit that kept only the count has none)."""
        self.count = int(sd["count"])
        step, value = sd.get("step"), sd.get("value")
        self.last = None if step is None or value is None else (int(step), float(value))

    def on_fit_start(self, state: TrainState) -> None:
        """Start each fit afresh; a resumed run's count comes back from ``state.extras`` right after."""
        self.count = 0
        self.last = self.signal = None
        self.reported = {}
        self.should_stop = self.pruned = False

    def on_fit_end(self, state: TrainState, history: list[dict[str, float]]) -> None:
        """Note the signal that stopped the fit, if one did; raise ``optuna.TrialPruned`` now if the trial was pruned
        (and ``raise_at_fit_end``)."""
        self.signal = _signal_stop()
        if self.pruned and self.raise_at_fit_end:
            self.raise_if_pruned()

    def report_last(self) -> None:
        """Report the run's last value (``last``, from the state) at its step, as :meth:`check` did, and ask the
        pruner: for a fit that checked none (nothing left to validate), whose trial (a rerun) holds none yet."""
        if self.last is None:
            raise ValueError("PruningCallback.report_last: the run has checked no value yet")
        step, value = self.last
        if not _holds_step(self.trial, step):
            self.trial.report(value, step)
        self.reported[step] = value
        if not math.isfinite(value) or self.trial.should_prune():
            self.pruned = True

    def raise_if_pruned(self) -> None:
        """Raise ``optuna.TrialPruned`` if the pruner stopped this trial."""
        if self.pruned:
            step, value = next(reversed(self.reported.items()))
            raise _optuna().TrialPruned(f"trial {self.trial.number} pruned at step {step}: {self.monitor} = {value:.6g}")

    def check(self, state: TrainState, value: float) -> None:
        """Report ``value`` at its step (unless the trial holds that step already) and ask the pruner."""
        self.count += 1
        step = int(state.step) if self.report_step == "global" else self.count
        if not _holds_step(self.trial, step):
            self.trial.report(value, step)
        self.reported[step] = value
        self.last = step, float(value)
        if not math.isfinite(value) or self.trial.should_prune():
            self.pruned = self.should_stop = True


def _holds_step(trial: Any, step: int) -> bool:
    """Whether ``trial`` has a value reported at ``step`` already (by an earlier fit of the same trial, whose
    validation a fit resumed from a state saved before it runs again); Optuna would ignore it with a warning.
    Read from the study's running trials (Optuna's public API); a trial without a study holds none."""
    study = getattr(trial, "study", None)
    number = getattr(trial, "number", None)
    if number is None or not callable(getattr(study, "get_trials", None)):
        return False
    running = (_optuna().trial.TrialState.RUNNING,)
    trials = study.get_trials(deepcopy=False, states=running)
    return any(t.number == number and step in t.intermediate_values for t in trials)


def fit(
    trial: optuna.Trial,
    step: Any,
    state: TrainState,
    train_data: Iterable,
    *,
    monitor: str = "val/loss",
    report_step: str = "count",
    callbacks: Iterable[Any] | None = (),
    **run_epochs_options: Any,
) -> float:
    """Train with :func:`loopkit.run_epochs` under a :class:`PruningCallback`; return the last ``monitor`` value.

    ``run_epochs_options`` are ``run_epochs``'s (``epochs``, ``val``, ``max_steps``, ...).
    The trial's user attributes get ``history`` (run_epochs' list of epoch records, numbers
    only: 0-dim tensors a callback added are read, other values left out) and ``step`` (the
    updates done). The run of a :class:`loopkit.WandbLogger` in ``step`` (which ``run_epochs`` leaves
    open after a successful fit, as Lightning's) is finished as the trial's fit ends, pruned or
    not, so each trial has a run of its own (a write through that logger after this resumes its
    run: log a trial's hyper-parameters before ``fit``). A pruned trial raises ``optuna.TrialPruned`` out of here,
    which ``study.optimize`` records. A fit a signal stopped gracefully (SIGTERM, Ctrl-C: ``run_epochs`` agreed to
    stop on one, short of its ``epochs`` or ``max_steps``, with no callback's stop) raises ``KeyboardInterrupt``: the
    trial is not finished (Optuna marks it failed and stops the study, as it does on Ctrl-C). A fit that ends short
    of its budget otherwise (the data ran out) returns its last value, as ``run_epochs`` returns (with a warning).
    ``limit_train_batches=0`` (training off: no epoch, no value) is refused; a baseline's value is
    ``loopkit.evaluate(eval_step, state, val_data)``. Use it as an objective's last line (see the module).
    A ``state`` restored from a checkpoint of an earlier fit (the rerun of a trial whose
    process died: :func:`retried_trial_number` names the trial whose checkpoints to restore)
    reports its validations at the steps the uninterrupted fit would (see :class:`PruningCallback`);
    one restored at its fit's end (the process died after the last checkpoint), or with no
    validation left to run, reports the run's last value (kept in the state's extras) at its
    step, asks the pruner, and returns it: the uninterrupted fit's value.

    Under a ``torch.distributed`` process group of several ranks, a trial of the study's own
    (``optuna.trial.Trial``, which each rank would have asked for itself) is refused (see
    :func:`optimize`); a trial the ranks share (``TorchDistributedTrial``) is taken.

    >>> import optuna, torch, loopkit
    >>> model = torch.nn.Linear(2, 1)
    >>> state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> data = [torch.ones(4, 2)] * 3
    >>> trial = optuna.create_study().ask()
    >>> value = fit(trial, loopkit.train_step(lambda m, b: m(b).pow(2).mean()), state, data,
    ...             monitor="train/loss", epochs=2, progress=False)
    >>> trial.user_attrs["step"], value == trial.user_attrs["history"][-1]["train/loss"]
    (6, True)
    """
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"loopkit.tune.fit: monitor must be a metric name such as 'val/loss', got {monitor!r}")
    if monitor.startswith("val/") and run_epochs_options.get("val") is None:
        raise ValueError(f"loopkit.tune.fit: monitor '{monitor}' is a validation metric; pass val=(eval_step, val_data)")
    if isinstance(trial, _optuna().trial.Trial):
        _refuse_process_group("loopkit.tune.fit")
    limit = run_epochs_options.get("limit_train_batches")
    if limit is not None and not isinstance(limit, bool) and as_real(limit) == 0:
        raise ValueError(f"loopkit.tune.fit: limit_train_batches={limit!r} turns training off: run_epochs runs no "
                         f"epoch, so the trial would have no '{monitor}' to report or return; for a baseline's value "
                         "use loopkit.evaluate(eval_step, state, val_data)")
    callbacks = _check_callbacks(callbacks, warn=False)  # (run_epochs' rule: one callback alone is taken too; it warns)
    pruning = PruningCallback(trial, monitor, report_step=report_step)
    pruning.raise_at_fit_end = False  # raised below, once the history is recorded
    try:
        final, history = run_epochs(step, state, train_data, callbacks=[*callbacks, pruning], **run_epochs_options)
    except BaseException:
        with contextlib.suppress(Exception):  # (the fit's own error is the one to see)
            _finish_tracker_runs(step)
        raise
    _finish_tracker_runs(step)
    trial.set_user_attr("history", [_numbers(record) for record in history])
    trial.set_user_attr("step", final.step)
    if pruning.signal is not None and _stopped_short(final, run_epochs_options, [*callbacks, pruning]):
        raise KeyboardInterrupt(f"loopkit.tune.fit: a signal ({pruning.signal}) stopped the trial's fit at step "
                                f"{final.step}; it is not finished, so it reports no value")
    pruning.raise_if_pruned()
    values = [record[monitor] for record in history if monitor in record]
    if values:
        return float(values[-1])
    if pruning.last is None:
        raise ValueError(f"loopkit.tune.fit: no epoch recorded '{monitor}' (history keys: {sorted(history[-1]) if history else []})")
    if not pruning.reported:  # nothing left to validate: the run's last value, kept in the state, as the whole fit's
        pruning.report_last()
        pruning.raise_if_pruned()
    return pruning.last[1]


def _finish_tracker_runs(step: Any) -> None:
    """Finish the run of each :class:`loopkit.WandbLogger` of ``step``'s ``with_logging`` layers, which a successful
    (or pruned) fit leaves open, as Lightning's: the next trial's logger would write into it (wandb holds one run
    at a time); each trial its own run. MLflow's runs are ended by ``finalize`` already."""
    from loopkit.trackers import WandbLogger
    from loopkit.transforms.logging import LoggingStep
    from loopkit.steps import WrapperStep

    while isinstance(step, WrapperStep):
        if isinstance(step, LoggingStep):
            for logger in step.loggers:
                if isinstance(logger, WandbLogger):
                    logger._finish_run()
        step = step.inner


def _stopped_short(final: TrainState, options: Mapping[str, Any], callbacks: list[Any]) -> bool:
    """Whether ``run_epochs`` returned before its budget (``epochs``, ``max_steps``) with no callback asking to stop:
    after a graceful stop on a signal (which the caller checks), the fit is then not finished."""
    if any(getattr(cb, "should_stop", False) for cb in callbacks):
        return False
    epochs, max_steps = options.get("epochs"), options.get("max_steps")
    return not ((epochs is not None and final.epoch >= epochs) or (max_steps is not None and final.step >= max_steps))


def _numbers(record: Mapping[str, Any]) -> dict[str, float]:
    """A history record as JSON numbers (Optuna's storages keep user attributes as JSON)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
        elif isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            out[key] = float(value)
    return out
