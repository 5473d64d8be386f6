"""Experiment trackers as loggers: :class:`WandbLogger` (Weights & Biases) and :class:`MLFlowLogger` (MLflow).

They follow the :class:`loopkit.Logger` protocol, so :func:`loopkit.with_logging` writes to them as
to the file loggers: the window means at each log point (``train/m``), each validation's ``val/m``,
each epoch's ``train/m_epoch``, every row with its ``epoch`` (as Lightning's); only rank 0 writes under
``torch.distributed`` (under torchrun before ``loopkit.distributed.init()`` too: the environment's ``RANK``
says which). Each
starts its run lazily, at its first write on rank 0 (or when :attr:`experiment` is first read);
``run_epochs`` calls ``finalize`` as the fit ends (``"success"``, ``"failed"`` when an error
leaves the fit, ``"killed"`` when SIGTERM or Ctrl-C stopped it, where Lightning's trainer passes
``"failed"``): :class:`MLFlowLogger` then sets the run's status
(a later write goes into the run and leaves it), :class:`WandbLogger` leaves a successful run open
for later writes (wandb finishes it at exit; ``logger.experiment.finish()`` ends it now) and
finishes a failed or killed one. The arguments mirror Lightning 2.6's loggers of the same names.

Both are optional extras, imported only when a logger is made: ``pip install 'loopkit[wandb]'``,
``pip install 'loopkit[mlflow]'``. Neither can drop what a run recorded after a checkpoint that a
later fit resumes from (the file loggers do: see :meth:`loopkit.RunDirLogger.resume_at`): a resumed
run shows both the crashed run's records after that step and the resumed run's, as with Lightning.

>>> logger = WandbLogger(project="demo", offline=True)  # nothing is started yet: no run, no folder
>>> logger.version, logger.name
(None, 'demo')
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
import re
import time
import warnings
from collections.abc import Mapping
from typing import Any

from loopkit.loggers import Logger, _Inert, is_rank_zero

__all__ = ["MLFlowLogger", "WandbLogger"]

#: the characters dropped from a metric name: all but letters, digits (of any script: MLflow's ``\w``), ``_ / . -``
#: and space, which MLflow takes on every platform (Lightning's MLFlowLogger drops non-ASCII letters too, leaving
#: nothing of a name such as "точность"; ``:``, which MLflow refuses on Windows, is dropped as Lightning drops it)
_MLFLOW_NAME_DROPS = re.compile(r"[^\w/. -]+")


def _mlflow_refuses(name: str) -> bool:
    """Whether MLflow refuses the (cleaned) metric name: empty, or not its own ``posixpath.normpath`` (MLflow treats
    names as paths: an empty part, ``train/``, ``a//b``, ``./a``), or starting with ``/`` or ``..``.

    >>> [_mlflow_refuses(n) for n in ("train/loss", "train/точность", "train/", "", "a//b", "../a")]
    [False, False, True, True, True, True]
    """
    norm = posixpath.normpath(name) if name else "."
    return norm != name or norm == "." or norm.startswith("..") or norm.startswith("/")


def _require(module: str, extra: str, who: str) -> None:
    """Refuse now, naming the extra to install, when ``module`` is not installed (it is imported only when used)."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"{who} needs the {module} package, an optional extra: pip install 'loopkit[{extra}]' "
            f"(or pip install {'mlflow-skinny' if extra == 'mlflow' else extra})"
        )


def _refuse_log_model(log_model: Any, who: str) -> None:
    if log_model:
        raise ValueError(
            f"{who}: log_model={log_model!r} is not supported (Lightning uploads its ModelCheckpoint files; loopkit "
            "has with_checkpointing): upload a checkpoint yourself through logger.experiment, or pass log_model=False"
        )


def _check_prefix(prefix: Any, who: str) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"{who}: prefix must be a string, got {type(prefix).__qualname__}")
    return prefix


def _prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``metrics`` with ``prefix-`` before each name (Lightning's ``prefix``, joined with ``-``)."""
    return {f"{prefix}-{k}": v for k, v in metrics.items()} if prefix else dict(metrics)


def _beside_open() -> bool:
    """Whether a wandb run other than ``wandb.run`` is open in this process (one started beside another with
    ``reinit="create_new"``): a plain ``wandb.init`` would hand it back, so a logger's new run is started beside
    too (a run of each logger's own, never another's). wandb keeps the open runs itself (its setup singleton)."""
    import wandb
    from wandb.sdk import wandb_setup

    recent = wandb_setup.singleton().most_recent_active_run
    return recent is not None and recent is not wandb.run


class WandbLogger(Logger):
    """Writes to a Weights & Biases run, as Lightning's ``WandbLogger`` does.

    The run starts at the first write on rank 0 (``wandb.init(project=, name=, dir=save_dir, id=,
    resume="allow", **init_kwargs)``), or when :attr:`experiment` is read; ``offline=True`` runs it
    offline (``wandb sync`` uploads it later). Each :meth:`log_metrics` is one ``run.log`` row
    holding the metrics and ``trainer/global_step``, the step, which every metric is plotted
    against (``define_metric("*", step_metric="trainer/global_step")``): what Lightning writes. The
    run's own ``_step`` only counts rows, so a resumed run's rows are never refused for a lower step.
    :meth:`log_hparams` updates ``run.config`` (nested dicts kept nested, numpy and 0-dim tensor
    numbers as numbers), and its ``metrics`` the run's summary.

    :meth:`finalize` (``run_epochs``' end) leaves the run open, as Lightning's: a write after the fit
    (a test evaluation's metrics, ``log_hparams(cfg, {"best/loss": ...})``, ``logger.experiment.log``)
    goes on in the same run, its ``_step`` counting on; wandb finishes the run when the process exits
    (its ``atexit`` hook), or end it yourself with ``logger.experiment.finish()`` (before another run
    in the same process: a new logger, never started, while a run is open writes to that run, with a
    warning naming it, as Lightning's; :func:`loopkit.tune.fit` finishes each trial's run).
    ``finalize("failed")`` (an error left the fit) and ``finalize("killed")`` (SIGTERM or Ctrl-C stopped
    it: ``run_epochs`` saved and returned) finish the run with ``exit_code=1``
    (Lightning's does nothing then), so the run shows failed, and a new logger in a process that goes on
    (a notebook, a retry loop) starts a run of its own rather than writing into the failed one. wandb's service writes the last
    records of an offline run's ``.wandb`` file a moment after ``finish()`` returns. A write after
    the logger's run was finished resumes the logger's own run id (never another logger's run): online,
    the same run; offline, a folder of its own (``offline-run-...-<id>``, its ``_step`` from 0 again;
    wandb's offline resume is not reliable, wandb issue #3841). With another run open in the process
    (a retry's logger whose fit succeeded), wandb would hand that run back (it holds one run at a time
    by default), so the logger's run is resumed beside it (wandb's ``reinit="create_new"``): the other
    run, and ``wandb.run``, stay as they were; while such a run is open, new loggers start their runs
    beside too (a plain ``wandb.init`` would hand it back). A run given ``id=`` (or ``version=``) of an earlier one continues it
    (``resume="allow"``): the rows that run logged after the checkpoint stay (wandb cannot drop them;
    Lightning does not either).

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> logger = WandbLogger(project="demo", save_dir=tmp.name, offline=True)
    >>> logger.log_hparams({"lr": 0.1, "model": {"width": 8}})
    >>> logger.log_metrics({"train/loss": 0.5}, step=10)
    >>> dict(logger.experiment.config)
    {'lr': 0.1, 'model': {'width': 8}}
    >>> logger.finalize()  # (run_epochs' end): the run stays open for later writes
    >>> logger.experiment.finish()  # ends it now (else wandb does at exit)
    >>> tmp.cleanup()
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | os.PathLike = ".",
        version: str | None = None,
        offline: bool = False,
        dir: str | os.PathLike | None = None,
        id: str | None = None,
        anonymous: bool | None = None,
        project: str | None = None,
        log_model: bool | str = False,
        experiment: Any = None,
        prefix: str = "",
        **init_kwargs: Any,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        _require("wandb", "wandb", who)
        _refuse_log_model(log_model, who)
        if version is not None and id is not None and version != id:
            raise ValueError(f"{who}: version and id both name the run id; got version={version!r}, id={id!r}")
        run_id = version if version is not None else id
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise TypeError(f"{who}: id (version) must be a non-empty string, got {run_id!r}")
        for key, value in (("save_dir", save_dir), ("dir", dir)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{who}: {key} must be a path, got {type(value).__qualname__}")
        folder = os.fspath(dir) if dir is not None else os.fspath(save_dir) if save_dir is not None else None
        self._init: dict[str, Any] = {
            "name": name,
            "project": project or os.environ.get("WANDB_PROJECT", "lightning_logs"),
            "dir": folder,
            "id": run_id,
            "resume": "allow",
        }
        if offline:
            self._init["mode"] = "offline"
        if anonymous:
            self._init["anonymous"] = "allow"
        self._init.update(init_kwargs)
        self._prefix = _check_prefix(prefix, who)
        self._experiment = experiment
        self._owned = experiment is None  # a run given to the logger is the caller's to finish
        self._finished = False  # the run was finished by finalize("failed") (still readable; a write resumes it)
        self._run_id: str | None = getattr(experiment, "id", None) or run_id

    @property
    def name(self) -> str | None:
        """The project (Lightning's ``name``)."""
        return self._init.get("project")

    @property
    def version(self) -> str | None:
        """The run id: the started run's, else the one given."""
        return self._run_id

    @property
    def save_dir(self) -> str | None:
        """The folder ``wandb/`` is written in."""
        return self._init.get("dir")

    @property
    def experiment(self) -> Any:
        """The ``wandb`` run (started now if need be) for anything else to log: images, tables, artifacts;
        ``logger.experiment.finish()`` ends it. Once finished (by that, or :meth:`finalize` of a failed fit), the
        finished run (its id, config, folder), until the logger's next write resumes it. On ranks other than 0, an
        object whose every call does nothing (Lightning's ``DummyExperiment``)."""
        if not is_rank_zero():
            return _Inert()
        if self._experiment is None:
            self._experiment = self._start()
        return self._experiment

    def _live(self) -> Any:
        """The run to write to: the logger's own run, once finished (by :meth:`finalize` of a failed fit, or
        ``logger.experiment.finish()``), is resumed (the same id); wandb would refuse a finished run's writes."""
        run = self._experiment
        if self._finished or (run is not None and self._owned and getattr(run, "_is_finished", False) is True):
            self._experiment = self._resume()  # (refused: the finished run stays, readable)
            self._finished = False
        return self.experiment

    def _start(self) -> Any:
        import wandb

        if wandb.run is not None:  # (as Lightning: a run already open is written to, and left to its owner)
            given = f", not the run {self._run_id!r} it was given," if self._run_id not in (None, wandb.run.id) else ""
            warnings.warn(
                f"WandbLogger: a wandb run ({wandb.run.id}) is already in progress; this logger writes to it{given} and "
                "leaves it open, as Lightning's. Finish it first (wandb.finish(), or its logger's "
                "experiment.finish()) for a run of the logger's own",
                UserWarning,
                stacklevel=3,
            )
            self._owned = False
            run = wandb.run
        else:
            kwargs = dict(self._init, id=self._run_id or self._init.get("id"))
            if "reinit" not in kwargs and _beside_open():  # (wandb.init would hand back a run resumed beside)
                kwargs["reinit"] = "create_new"
            if kwargs.get("dir") is not None:
                os.makedirs(kwargs["dir"], exist_ok=True)
            run = wandb.init(**kwargs)
            self._owned = True
        return self._started(run)

    def _resume(self) -> Any:
        """``wandb.init`` of the logger's own run id again (its own run, finished). wandb holds one run at a time by
        default: with another run open (another logger's, left open by a successful fit), a plain ``wandb.init``
        would hand back that run (in a notebook: finish it), so the logger's run is resumed beside it
        (``reinit="create_new"``: ``wandb.run`` stays the other run) and the other run is left as it is."""
        import wandb

        kwargs = dict(self._init, id=self._run_id)
        if "reinit" not in kwargs:  # (one given to the logger is used as given)
            other = wandb.run is not None and wandb.run.id != self._run_id
            kwargs["reinit"] = "create_new" if other or _beside_open() else "return_previous"
        if kwargs.get("dir") is not None:
            os.makedirs(kwargs["dir"], exist_ok=True)
        run = wandb.init(**kwargs)
        if run.id != self._run_id:  # (wandb handed back a run open beside wandb.run: one the user started)
            raise RuntimeError(
                f"WandbLogger: cannot write to this logger's run {self._run_id!r} (finished; a write resumes it): "
                f"wandb.init handed back another open run, {run.id!r} (the write would go into it). Finish that run "
                "first (its experiment.finish()), or give this logger reinit='create_new'"
            )
        return self._started(run)

    def _started(self, run: Any) -> Any:
        self._run_id = run.id
        if callable(getattr(run, "define_metric", None)):
            if self._init.get("sync_tensorboard"):
                run.define_metric("*", step_metric="global_step")
            else:
                run.define_metric("trainer/global_step")
                run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        return run

    def _finish_run(self) -> None:
        """Finish the logger's own run now, if open (``loopkit.tune.fit`` at a trial's end); a run given to the
        logger, or found open, is left to its owner. A later write resumes the run id, as after ``finish()``."""
        run = self._experiment
        if run is not None and self._owned and not self._finished and getattr(run, "_is_finished", False) is not True:
            run.finish()

    def _write_metrics(self, metrics: dict[str, float], step: int) -> None:
        metrics = _prefixed(metrics, self._prefix)
        if self._init.get("sync_tensorboard"):  # (as Lightning: TensorBoard's own step is the axis)
            self._live().log(metrics)
        else:
            self._live().log({**metrics, "trainer/global_step": step})

    def _write_hparams(self, hparams: dict[str, Any], metrics: dict[str, float] | None) -> None:
        run = self._live()
        run.config.update(hparams, allow_val_change=True)
        if metrics:
            run.summary.update(_prefixed(metrics, self._prefix))

    def _end(self, status: str) -> None:
        # a successful fit's run stays open, as Lightning's (its finalize never finishes the run): later writes go
        # on in it, and wandb finishes it at exit; a run given (or found open) is the caller's to finish
        if status not in ("failed", "killed") or self._experiment is None or self._finished or not self._owned:
            return
        if getattr(self._experiment, "_is_finished", False) is not True:
            self._experiment.finish(exit_code=1)
        self._finished = True


class MLFlowLogger(Logger):
    """Writes to an MLflow run, as Lightning's ``MLFlowLogger`` does.

    The run is created at the first write on rank 0 (or when :attr:`experiment`, :attr:`run_id` or
    :attr:`experiment_id` is first read) in the experiment ``experiment_name`` (created if need
    be), tagged with ``tags``, ``run_name`` (``mlflow.runName``) and MLflow's own context tags
    (user, source, git commit); ``run_id=`` of an existing run continues that run (marked running
    again until :meth:`finalize`, as a crashed run's resume wants), from its last step (the highest
    step of its metrics, read from the run). To add results to a finished run outside ``run_epochs``
    (an evaluation script: ``MLFlowLogger(run_id=...).log_hparams(cfg, {"test/loss": ...})``), call
    ``logger.finalize()`` when done, or the run stays ``RUNNING``. Each :meth:`log_metrics` is one ``MlflowClient.log_batch`` of the
    metrics at the step; a metric name MLflow would refuse loses the characters other than letters
    and digits (of any script: ``"train/точность"`` is kept, as MLflow takes it), ``_ / . -`` and
    space, with a warning (Lightning also drops non-ASCII letters, so a name such as ``"точность"``
    is left empty and MLflow refuses it); a name that MLflow would refuse even so (nothing left
    of a part: ``"train/🔥"``) is refused with a ``ValueError`` naming it, at its first log point.
    :meth:`log_hparams` logs the hyper-parameters as params (nested dicts flattened with ``/``,
    values as strings cut at MLflow's length limit, 100 a batch; those the run holds already, with the same
    value, are skipped). MLflow params cannot change, so unlike the other loggers a later call cannot update a
    value the run holds (an earlier call's, or for a run continued with ``run_id=`` the crashed run's): it raises a
    ``ValueError`` naming each such param, its old and new value, before anything is sent. Its ``metrics`` are logged as metrics at
    the last step logged (the run's, for a run continued with ``run_id=``). :meth:`finalize` sets the run's status: ``FINISHED``, ``FAILED`` when
    the fit failed, or ``KILLED`` when SIGTERM or Ctrl-C stopped it (``run_epochs`` saved and returned: MLflow's
    status for a killed run, as a resumable stop is no failure; Lightning's trainer marks it ``FAILED``). A write after it (``log_hparams(cfg, {"best/loss": ...})`` after ``run_epochs``)
    goes into the run and leaves its status as it is (MLflow takes writes to a finished run), as
    Lightning's; with ``synchronous=False`` MLflow flushes such writes at exit, or call
    :meth:`finalize` again (it sets the status again, with the time it ends). The records a resumed run logged after its
    checkpoint stay (MLflow cannot drop them; Lightning does not either).

    ``tracking_uri`` defaults to ``$MLFLOW_TRACKING_URI``, else an SQLite database in ``save_dir``
    (``sqlite:///<save_dir>/mlflow.db``, artifacts in ``<save_dir>/artifacts``; MLflow's own default
    backend). Lightning's default, the file store ``file:./mlruns``, is refused by MLflow 3.18 unless
    ``MLFLOW_ALLOW_FILE_STORE=true``; pass ``tracking_uri="file:./mlruns"`` for it.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> logger = MLFlowLogger("demo", run_name="first", save_dir=tmp.name)
    >>> logger.log_hparams({"lr": 0.1, "model": {"width": 8}})
    >>> logger.log_metrics({"train/loss": 0.5}, step=10)
    >>> logger.finalize()
    >>> run = logger.experiment.get_run(logger.run_id)
    >>> run.info.status, run.info.run_name, run.data.params, run.data.metrics
    ('FINISHED', 'first', {'lr': '0.1', 'model/width': '8'}, {'train/loss': 0.5})
    >>> tmp.cleanup()
    """

    def __init__(
        self,
        experiment_name: str = "lightning_logs",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        save_dir: str | os.PathLike | None = "./mlruns",
        log_model: bool | str = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        _require("mlflow", "mlflow", who)
        _refuse_log_model(log_model, who)
        if not isinstance(experiment_name, str) or not experiment_name:
            raise ValueError(f"{who}: experiment_name must be a non-empty string, got {experiment_name!r}")
        for key, value in (("run_name", run_name), ("tracking_uri", tracking_uri), ("run_id", run_id),
                           ("artifact_location", artifact_location)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{who}: {key} must be a string or None, got {type(value).__qualname__}")
        if tags is not None and not isinstance(tags, Mapping):
            raise TypeError(f"{who}: tags must be a dict of str -> value, got {type(tags).__qualname__}")
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise TypeError(f"{who}: save_dir must be a path, got {type(save_dir).__qualname__}")
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self._save_dir = None if save_dir is None else os.path.abspath(os.fspath(save_dir))
        if not tracking_uri:
            if self._save_dir is None:
                raise ValueError(f"{who}: give a tracking_uri (or set MLFLOW_TRACKING_URI), or a save_dir")
            tracking_uri = "sqlite:///" + os.path.join(self._save_dir, "mlflow.db")
            if artifact_location is None:
                artifact_location = os.path.join(self._save_dir, "artifacts")
        self._experiment_name = experiment_name
        self._run_name = run_name
        self._tracking_uri = tracking_uri
        self.tags = dict(tags) if tags is not None else None
        self._prefix = _check_prefix(prefix, who)
        self._artifact_location = artifact_location
        self._run_id = run_id
        self._experiment_id: str | None = None
        self._batch_kwargs = {} if synchronous is None else {"synchronous": bool(synchronous)}
        self._client: Any = None
        self._started = False  # the run was created (or the one of run_id found) in this process
        self._renamed: dict[str, str] = {}  # metric names MLflow would refuse -> the names written
        self._last_step = 0

    @property
    def experiment(self) -> Any:
        """The ``mlflow.tracking.MlflowClient`` (the run created now if need be) for anything else to log:
        ``logger.experiment.log_artifact(logger.run_id, path)``. On ranks other than 0, an object whose every
        call does nothing."""
        if not is_rank_zero():
            return _Inert()
        if self._client is None:
            self._client = self._connect()
        if not self._started:
            self._begin()
        return self._client

    @property
    def run_id(self) -> str | None:
        """The run's id (the run created now if need be; None on ranks other than 0 unless given)."""
        _ = self.experiment
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        """The experiment's id (created now if need be)."""
        _ = self.experiment
        return self._experiment_id

    @property
    def name(self) -> str | None:
        """The experiment's id (Lightning's ``name``)."""
        return self.experiment_id

    @property
    def version(self) -> str | None:
        """The run's id (Lightning's ``version``)."""
        return self.run_id

    @property
    def save_dir(self) -> str | None:
        """The folder of a local tracking store (``file:`` or ``sqlite:``), else None."""
        for scheme in ("file:", "sqlite:///"):
            if self._tracking_uri.startswith(scheme):
                path = self._tracking_uri[len(scheme):]
                return path if scheme == "file:" else os.path.dirname(path)
        return None

    def _connect(self) -> Any:
        from mlflow.tracking import MlflowClient

        if self._tracking_uri.startswith("sqlite:///") and self._save_dir is not None:
            os.makedirs(os.path.dirname(self._tracking_uri[len("sqlite:///"):]), exist_ok=True)
        return MlflowClient(self._tracking_uri)

    def _begin(self) -> None:
        """Create the run (or mark the one of ``run_id`` running again)."""
        client = self._client
        if self._run_id is not None:
            run = client.get_run(self._run_id)
            self._experiment_id = run.info.experiment_id
            # the run's last step: MLflow keeps each metric's latest value, the one at its highest step (and its
            # step), so log_hparams' metrics go after what the run holds, as through the logger that wrote it
            steps = [m.step for m in run.data.to_proto().metrics]
            self._last_step = max([self._last_step, *steps])
            if run.info.status != "RUNNING":  # (Lightning leaves a continued run's status as it was)
                client.update_run(self._run_id, status="RUNNING")
        else:
            self._experiment_id = self._find_experiment()
            tags = dict(self.tags or {})
            if self._run_name is not None:
                tags["mlflow.runName"] = self._run_name
            from mlflow.tracking.context.registry import resolve_tags

            run = client.create_run(experiment_id=self._experiment_id, tags=resolve_tags(tags))
            self._run_id = run.info.run_id
        self._started = True

    def _find_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self._client
        found = client.get_experiment_by_name(self._experiment_name)
        if found is not None and found.lifecycle_stage != "deleted":
            return found.experiment_id
        try:
            return client.create_experiment(self._experiment_name, artifact_location=self._artifact_location)
        except MlflowException:  # another process created it first
            found = client.get_experiment_by_name(self._experiment_name)
            if found is None or found.lifecycle_stage == "deleted":
                raise
            return found.experiment_id

    def _key(self, name: str) -> str:
        """The name MLflow is given for metric ``name``, warning once per renamed metric; a name MLflow would refuse
        even so is refused here, naming it (MLflow's own error would not name the logger or the metric given)."""
        if name not in self._renamed:
            new = _MLFLOW_NAME_DROPS.sub("", name)
            if _mlflow_refuses(new):
                without = f", which without them is '{new}'" if new != name else ""
                raise ValueError(
                    f"MLFlowLogger.log_metrics: metric '{name}' cannot be logged to MLflow{without}: MLflow refuses "
                    "an empty name or an empty part between '/'s or at the end (its names are paths) and "
                    "characters other than letters, digits, '_', '/', '.', '-' and ' '; rename the metric"
                )
            if new != name:
                warnings.warn(
                    f"MLFlowLogger: MLflow allows only letters, digits, '_', '/', '.', '-' and ' ' in a metric name: "
                    f"'{name}' is logged as '{new}'",
                    RuntimeWarning,
                    stacklevel=5,
                )
            self._renamed[name] = new
        return self._renamed[name]

    def _write_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        client = self.experiment
        stamp = int(time.time() * 1000)
        written: dict[str, str] = {}
        batch = []
        for name, value in _prefixed(metrics, self._prefix).items():
            key = self._key(name)
            if key in written:
                raise ValueError(
                    f"MLFlowLogger.log_metrics: metrics '{written[key]}' and '{name}' would both be written as "
                    f"'{key}' (MLflow refuses their other characters); rename one"
                )
            written[key] = name
            batch.append(Metric(key=key, value=value, timestamp=stamp, step=step))
        client.log_batch(run_id=self._run_id, metrics=batch, **self._batch_kwargs)
        self._last_step = max(self._last_step, step)

    def _write_hparams(self, hparams: dict[str, Any], metrics: dict[str, float] | None) -> None:
        from mlflow.entities import Param

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
        except ImportError:  # pragma: no cover - an MLflow without it: its limit since 1.28
            limit = 500
        client = self.experiment
        logged = client.get_run(self._run_id).data.params  # (MLflow refuses a param's value to change)
        values = {k: str(v)[:limit] for k, v in _flatten_lists(hparams).items()}
        changed = {k: (logged[k], v) for k, v in values.items() if k in logged and logged[k] != v}
        if changed:
            raise ValueError(
                f"MLFlowLogger.log_hparams: MLflow params cannot change once logged, and run {self._run_id} holds "
                + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
                + "; log the new values under other names, or start a new run (no run_id=)"
            )
        params = [Param(key=k, value=v) for k, v in values.items() if k not in logged]
        for at in range(0, len(params), 100):  # (MLflow takes at most 100 params a batch)
            client.log_batch(run_id=self._run_id, params=params[at:at + 100], **self._batch_kwargs)
        if metrics:
            self._write_metrics(metrics, self._last_step)

    def _end(self, status: str) -> None:
        if not self._started:
            return
        # (each finalize sets the status and end time, as Lightning's; and waits for asynchronous writes)
        self._client.set_terminated(self._run_id, {"failed": "FAILED", "killed": "KILLED"}.get(status, "FINISHED"))


def _flatten_lists(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened with ``/``, and lists of dicts with their index (``layers/0/width``), as Lightning's
    ``_flatten_dict`` does for MLflow's params.

    >>> _flatten_lists({"opt": {"lr": 0.1}, "layers": [{"width": 8}], "sizes": [1, 2]})
    {'opt/lr': 0.1, 'layers/0/width': 8, 'sizes': [1, 2]}
    """
    flat: dict[str, Any] = {}
    for key, value in hparams.items():
        if isinstance(value, Mapping):
            flat.update(_flatten_lists(value, f"{prefix}{key}/"))
        elif isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
            for i, item in enumerate(value):
                flat.update(_flatten_lists(item, f"{prefix}{key}/{i}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
