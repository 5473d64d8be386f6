"""WandbLogger and MLFlowLogger: real runs under ``with_logging``, read back with each tracker's own
reader and compared with a CSVLogger written in the same run (an independent record of the same
values), plus resume, failure status, rank 0 only and bad input.

wandb runs offline (the root conftest.py keeps it quiet and off the network); its offline run is the
transaction log ``run-<id>.wandb``, read record by record (LevelDB log framing, wandb's own protobuf
``Record``). MLflow writes to an SQLite store in ``tmp_path``, read with ``MlflowClient``.
"""

from __future__ import annotations

import copy
import csv
import glob
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import loopkit
from loopkit import CSVLogger, MLFlowLogger, WandbLogger, eval_step, run_epochs, train_step, with_logging
from tests.conftest import loss_with_mae, mse_metric, sgd_state, synthetic_batches, tiny_mlp

HPARAMS = {"lr": np.float64(0.05), "hidden": np.int64(8), "model": {"depth": 2, "act": "tanh"}, "tags": ("a", "b")}
PLAIN = {"lr": 0.05, "hidden": 8, "model": {"depth": 2, "act": "tanh"}, "tags": ["a", "b"]}


def fit(logger, root, *, epochs=2, state=None, loss=loss_with_mae, **options):
    """Two epochs of 5 batches, validation each epoch, logged every 2 steps to ``logger`` and a CSVLogger."""
    csv_logger = CSVLogger(root, "csv")
    step = with_logging(train_step(loss), logger, csv_logger, every_n_steps=2)
    state = state if state is not None else sgd_state(tiny_mlp(), lr=0.05)
    val = (eval_step(mse_metric), synthetic_batches(2, seed=5))
    state, _ = run_epochs(step, state, synthetic_batches(5), epochs=epochs, val=val, progress=False, **options)
    return state, csv_rows(csv_logger.log_dir)


def csv_rows(log_dir):
    """The CSV's records: ``(step, {metric: value})`` in the order written."""
    with open(os.path.join(log_dir, "metrics.csv"), newline="") as f:
        return [(int(r.pop("step")), {k: float(v) for k, v in r.items() if v != ""}) for r in csv.DictReader(f)]


# --- reading an offline wandb run ------------------------------------------------------------------

_BLOCK = 32768  # the LevelDB log's block; a record header (crc32, length, type) never straddles one
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path):
    """Every ``wandb_internal_pb2.Record`` of the transaction log ``path``, in order."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a wandb transaction log"
    at, pending, out = 7, b"", []
    while at + 7 <= len(data):
        if _BLOCK - at % _BLOCK < 7:  # the block's zero-filled tail
            at += _BLOCK - at % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[at:at + 7])
        chunk, at = data[at + 7:at + 7 + length], at + 7 + length
        assert len(chunk) == length and kind in (_FULL, _FIRST, _MIDDLE, _LAST), f"{path}: torn record"
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            out.append(wandb_internal_pb2.Record.FromString(pending))
    return out


def _value(item):
    return json.loads(item.value_json)


def _key(item):
    return "/".join(item.nested_key) if item.nested_key else item.key


def finished_log(folder, timeout=30.0):
    """The records of the run folder's transaction log once they end with the exit record: ``run.finish()`` returns
    when wandb's service has the exit record, and the service writes the file a moment later."""
    (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path) if os.path.getsize(path) >= 7 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def wandb_runs(save_dir):
    """Each offline run folder under ``save_dir/wandb``, oldest first: ``{"id", "rows", "config", "exit_code",
    "metrics", "summary"}``; ``rows`` holds each history row as ``{key: value}`` (``_step``, ``trainer/global_step``
    and the metrics; wandb's ``_runtime`` and ``_timestamp`` left out)."""
    runs = []
    for folder in sorted(glob.glob(os.path.join(save_dir, "wandb", "offline-run-*"))):  # (a resumed id: -1, -2 after)
        run = {"id": None, "rows": [], "config": {}, "exit_code": None, "metrics": [], "summary": {}}
        for record in finished_log(folder):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                run["config"].update({_key(i): _value(i) for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({_key(i): _value(i) for i in record.config.update})
            elif kind == "history":
                row = {_key(i): _value(i) for i in record.history.item}
                run["rows"].append({k: v for k, v in row.items() if k not in ("_runtime", "_timestamp")})
            elif kind == "metric":
                m = record.metric
                run["metrics"].append((m.name or m.glob_name, m.step_metric, m.options.step_sync))
            elif kind == "summary":
                run["summary"].update({_key(i): _value(i) for i in record.summary.update})
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        run["config"].pop("_wandb", None)
        runs.append(run)
    return runs


def as_records(rows):
    """wandb's history rows as the CSV's records: ``(trainer/global_step, {metric: value})``."""
    out = []
    for row in rows:
        metrics = {k: float(v) for k, v in row.items() if k not in ("_step", "trainer/global_step")}
        out.append((row["trainer/global_step"], metrics))
    return out


# --- wandb -------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_wandb_run_left_open():
    """A run a test leaves open (a successful fit's stays open, as Lightning's) would be the next logger's run; so would
    one a logger resumed beside another run."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    from wandb.sdk import wandb_setup

    while (run := wandb_setup.singleton().most_recent_active_run) is not None:  # wandb.run and any open beside it
        run.finish()


@pytest.fixture(scope="module")
def wandb_fit(tmp_path_factory):
    """One real offline run shared by the wandb assertions (a run costs about a second): the fit, then a test
    metric and a row of the user's own after it (the run stays open), then the run finished explicitly."""
    import wandb

    root = tmp_path_factory.mktemp("wandb_fit")
    logger = WandbLogger(project="loopkit-tests", name="fit", save_dir=root / "w", offline=True)
    logger.log_hparams(HPARAMS)
    state, rows = fit(logger, root)
    open_after_fit = wandb.run is logger.experiment and not logger.experiment._is_finished
    logger.log_metrics({"test/acc": 0.5}, step=state.step)  # Lightning's fit-then-test habit
    logger.experiment.log({"samples": 3.0, "trainer/global_step": state.step})  # wandb finished it: UsageError
    logger.experiment.finish()
    return logger, rows, wandb_runs(root / "w"), open_after_fit


def test_wandb_rows_hold_exactly_what_the_csv_holds_at_the_same_steps(wandb_fit):
    logger, csv_records, runs, _ = wandb_fit
    (run,) = runs
    assert run["id"] == logger.version and run["exit_code"] == 0
    assert as_records(run["rows"][:len(csv_records)]) == csv_records  # every value bitwise, every step, in order
    assert [row["_step"] for row in run["rows"]] == list(range(len(csv_records) + 2))  # wandb's row counter
    keys = set().union(*(m for _, m in csv_records))
    assert {"train/loss", "train/mae", "val/mse", "train/loss_epoch", "epoch"} <= keys
    assert [s for s, m in csv_records if "train/loss" in m] == [2, 4, 6, 8, 10]


def test_wandb_plots_every_metric_against_trainer_global_step_as_lightning_does(wandb_fit):
    _, _, (run,), _ = wandb_fit
    assert ("trainer/global_step", "", False) in run["metrics"]
    assert ("*", "trainer/global_step", True) in run["metrics"]


def test_wandb_config_holds_the_hparams_as_numbers_and_nested_dicts(wandb_fit):
    _, _, (run,), _ = wandb_fit
    assert run["config"] == PLAIN
    assert type(run["config"]["lr"]) is float and type(run["config"]["hidden"]) is int


def test_wandb_config_holds_a_class_or_function_hparam_by_name_as_lightnings_without_an_address(tmp_path):
    def init_fn(x):
        return x

    logger = WandbLogger(project="p", save_dir=tmp_path / "w", offline=True)
    logger.log_hparams({"activation": torch.nn.ReLU, "init": init_fn, "model": {"norm": torch.nn.LayerNorm}})
    logger.experiment.finish()
    (run,) = wandb_runs(tmp_path / "w")
    assert run["config"] == {"activation": "ReLU", "init": init_fn.__qualname__, "model": {"norm": "LayerNorm"}}
    assert init_fn.__qualname__.endswith("<locals>.init_fn")


def test_wandb_a_successful_fit_leaves_the_run_open_and_writes_after_it_go_on_in_the_same_run(wandb_fit):
    """As Lightning's WandbLogger (its finalize never finishes the run; wandb does at exit): the fit's end finished
    the run, and a later write resumed the id in a second offline folder, its ``_step`` from 0 again (wandb's offline
    resume, wandb issue #3841), and ``logger.experiment.log`` raised wandb's UsageError ("Run ... is finished")."""
    logger, csv_records, (run,), open_after_fit = wandb_fit
    import wandb

    assert open_after_fit and wandb.run is None  # (finished by logger.experiment.finish())
    assert run["rows"][len(csv_records):] == [
        {"test/acc": 0.5, "trainer/global_step": 10, "_step": len(csv_records)},
        {"samples": 3.0, "trainer/global_step": 10, "_step": len(csv_records) + 1},
    ]
    assert logger.experiment.id == logger.version and logger.name == "loopkit-tests"  # the finished run: readable


def test_wandb_hparams_metrics_go_to_the_summary_and_a_write_after_finish_resumes_the_id(tmp_path):
    logger = WandbLogger(project="p", save_dir=tmp_path, offline=True)
    logger.log_hparams({"lr": 0.1}, metrics={"val/acc": 0.75})
    logger.finalize()
    logger.experiment.finish()
    logger.log_metrics({"test/acc": 0.5}, step=3)  # the logger's own run, finished by hand: the id resumed
    logger.experiment.finish()
    first, second = wandb_runs(tmp_path)
    assert first["config"] == {"lr": 0.1} and first["summary"]["val/acc"] == 0.75 and first["rows"] == []
    assert second["id"] == first["id"] == logger.version
    assert second["rows"] == [{"test/acc": 0.5, "trainer/global_step": 3, "_step": 0}]  # offline: a part of its own


def test_wandb_a_failed_fit_then_a_resumed_one_continue_one_run_id_and_keep_the_crashed_rows(tmp_path):
    calls = []

    def crashing(model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return loss_with_mae(model, batch)

    logger = WandbLogger(project="p", save_dir=tmp_path / "w", offline=True)
    step = with_logging(train_step(loss_with_mae), logger, every_n_steps=1)
    state, _ = run_epochs(step, sgd_state(tiny_mlp()), synthetic_batches(5), epochs=1, max_steps=2, progress=False)
    checkpoint = copy.deepcopy(state.state_dict())  # the state at step 2, as loopkit.restore would give it
    crash = with_logging(train_step(crashing), logger, every_n_steps=1)
    with pytest.raises(RuntimeError, match="boom"):
        run_epochs(crash, state, synthetic_batches(5), epochs=1, progress=False)
    resumed_logger = WandbLogger(project="p", id=logger.version, save_dir=tmp_path / "w", offline=True)
    restored = sgd_state(tiny_mlp(seed=1)).load_state_dict(checkpoint)
    step = with_logging(train_step(loss_with_mae), resumed_logger, every_n_steps=1)
    run_epochs(step, restored, synthetic_batches(5), epochs=1, max_steps=4, progress=False)

    resumed_logger.experiment.finish()

    runs = wandb_runs(tmp_path / "w")
    assert [r["id"] for r in runs] == [logger.version] * 2  # one run id (offline: two folders)
    assert [r["exit_code"] for r in runs] == [1, 0]  # the crashed fit finished its run as failed
    steps = [[row["trainer/global_step"] for row in r["rows"] if "train/loss" in row] for r in runs]
    assert steps == [[1, 2, 3, 4], [3, 4]]  # the first fit's run went on; the crashed rows after the checkpoint stay
    assert [row["_step"] for row in runs[0]["rows"]] == list(range(len(runs[0]["rows"])))
    assert [row["_step"] for row in runs[1]["rows"]][:1] == [0]  # offline, wandb's row counter starts again


def test_wandb_a_finished_loggers_write_resumes_its_own_run_beside_another_loggers_open_run(tmp_path):
    """Logger A's fit failed (its run finished, exit code 1), a retry's logger B succeeded (its run left open, as
    Lightning's): A's later write went into B's run (B's config got A's keys, A.version became B's id). It resumes
    A's own id beside B's run (wandb's ``reinit="create_new"``), B's run and ``wandb.run`` left as they were."""
    import wandb

    a = WandbLogger(project="p", save_dir=tmp_path, offline=True)
    a.log_metrics({"train/loss": 1.0}, step=1)
    a.finalize("failed")
    a_id = a.version
    b = WandbLogger(project="p", save_dir=tmp_path, offline=True)
    b.log_metrics({"train/loss": 2.0}, step=1)
    b.finalize("success")  # left open
    a.log_hparams({"a_only": 1})
    a.log_metrics({"test/acc": 0.5}, step=1)
    assert a.version == a_id != b.version and wandb.run is b.experiment and a.experiment is not b.experiment
    with pytest.warns(UserWarning, match=f"a wandb run \\({b.version}\\) is already in progress"):
        late = WandbLogger(project="p", save_dir=tmp_path, offline=True)  # never started: Lightning's adoption
        late.log_hparams({"late": 1})
    assert late.version == b.version
    b.experiment.finish()  # wandb.run is None now; a's resumed run is still open beside
    fresh = WandbLogger(project="p", save_dir=tmp_path, offline=True)
    fresh.log_metrics({"x": 3.0}, step=1)  # a run of its own (a plain wandb.init would hand back a's)
    assert fresh.version not in (a_id, b.version)
    for logger in (a, fresh):
        logger.experiment.finish()
    runs = {(r["id"], r["exit_code"]): r for r in wandb_runs(tmp_path)}
    assert sorted(runs, key=str) == sorted([(a_id, 1), (a_id, 0), (b.version, 0), (fresh.version, 0)], key=str)
    assert runs[a_id, 0]["config"] == {"a_only": 1} and runs[b.version, 0]["config"] == {"late": 1}
    assert runs[a_id, 0]["rows"] == [{"test/acc": 0.5, "trainer/global_step": 1, "_step": 0}]
    assert [row["train/loss"] for row in runs[b.version, 0]["rows"]] == [2.0]
    assert [row["x"] for row in runs[fresh.version, 0]["rows"]] == [3.0]


def test_wandb_tune_fit_finishes_each_trials_run_so_each_trial_has_its_own(tmp_path):
    """``loopkit.tune.fit`` with a WandbLogger in each trial's step: a successful trial's run stayed open, and the next
    trial's logger wrote into it (with only a warning): one run held every trial."""
    optuna = pytest.importorskip("optuna")
    from loopkit import tune

    loggers = []

    def objective(trial):
        logger = WandbLogger(project="p", save_dir=tmp_path, offline=True)
        loggers.append(logger)
        logger.log_hparams({"trial": trial.number})
        step = with_logging(train_step(loss_with_mae), logger, every_n_steps=1)
        return tune.fit(trial, step, sgd_state(tiny_mlp()), synthetic_batches(2), monitor="train/loss", epochs=1,
                        progress=False)

    import wandb

    study = optuna.create_study()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (no "a wandb run is already in progress")
        study.optimize(objective, n_trials=2)
    assert wandb.run is None and len({lg.version for lg in loggers}) == 2
    runs = wandb_runs(tmp_path)
    assert sorted((r["id"], r["exit_code"], r["config"]["trial"]) for r in runs) == sorted(
        (lg.version, 0, i) for i, lg in enumerate(loggers))
    assert all([row["trainer/global_step"] for row in r["rows"] if "train/loss" in row] == [1, 2] for r in runs)


# --- MLflow ------------------------------------------------------------------------------------------


def mlflow_records(logger):
    """The run's metrics as the CSV's records: each step's values, steps ascending (MLflow keeps no call order)."""
    client = logger.experiment
    run = client.get_run(logger.run_id)
    by_step: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(logger.run_id, key):
            held = by_step.setdefault(m.step, {})  # (``epoch``, on every row, is logged again by each row of a step)
            assert key not in held or key == "epoch" and held[key] == m.value, f"{key} logged twice at step {m.step}"
            by_step[m.step][key] = m.value
    return sorted(by_step.items())


def merged_by_step(records):
    out: dict[int, dict[str, float]] = {}
    for step, metrics in records:
        out.setdefault(step, {}).update(metrics)
    return sorted(out.items())


@pytest.fixture(scope="module")
def mlflow_fit(tmp_path_factory, _mlflow_template):
    root = tmp_path_factory.mktemp("mlflow_fit")
    os.makedirs(root / "m")
    shutil.copyfile(_mlflow_template, root / "m" / "mlflow.db")  # (see the mlflow_dir fixture)
    logger = MLFlowLogger("loopkit-tests", run_name="fit", save_dir=root / "m", tags={"team": "x"})
    logger.log_hparams(HPARAMS)
    _, rows = fit(logger, root)
    return logger, rows


def test_mlflow_metrics_hold_exactly_what_the_csv_holds_at_the_same_steps(mlflow_fit):
    logger, csv_records = mlflow_fit
    assert mlflow_records(logger) == merged_by_step(csv_records)
    assert [m.step for m in logger.experiment.get_metric_history(logger.run_id, "train/loss")] == [2, 4, 6, 8, 10]


def test_mlflow_params_are_the_flattened_hparams_as_text_and_the_run_is_finished(mlflow_fit):
    logger, _ = mlflow_fit
    run = logger.experiment.get_run(logger.run_id)
    assert run.data.params == {"lr": "0.05", "hidden": "8", "model/depth": "2", "model/act": "tanh", "tags": "['a', 'b']"}
    assert run.info.status == "FINISHED" and run.info.run_name == "fit"
    assert run.data.tags["team"] == "x" and run.data.tags["mlflow.source.type"] == "LOCAL"
    experiment = logger.experiment.get_experiment(logger.experiment_id)
    assert experiment.name == "loopkit-tests" and logger.save_dir == str(logger._save_dir)
    assert experiment.artifact_location.endswith(os.path.join("m", "artifacts"))


def test_mlflow_a_failed_fit_is_marked_failed_and_run_id_continues_the_run(tmp_path, mlflow_dir):
    def crashing(model, batch):
        if crashing.calls == 2:
            raise RuntimeError("boom")
        crashing.calls += 1
        return loss_with_mae(model, batch)

    crashing.calls = 0
    logger = MLFlowLogger(save_dir=mlflow_dir(tmp_path))
    step = with_logging(train_step(crashing), logger, every_n_steps=1)
    with pytest.raises(RuntimeError, match="boom"):
        run_epochs(step, sgd_state(tiny_mlp()), synthetic_batches(5), epochs=1, progress=False)
    client = logger.experiment
    assert client.get_run(logger.run_id).info.status == "FAILED"

    resumed = MLFlowLogger(run_id=logger.run_id, save_dir=tmp_path)
    resumed.log_metrics({"train/loss": 0.25}, step=2)  # a resumed fit logs step 2 again
    assert client.get_run(logger.run_id).info.status == "RUNNING"
    resumed.finalize()
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    assert resumed.experiment_id == logger.experiment_id
    history = [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "train/loss")]
    assert [s for s, _ in history] == [1, 2, 2] and history[-1] == (2, 0.25)  # the crashed run's step 2 stays

    resumed.log_metrics({"train/loss": 0.125}, step=3)  # a write after finalize leaves the status (see below)
    assert client.get_run(logger.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_fit_stopped_by_a_signal_is_finalized_killed_mlflow_killed_wandb_exit_code_1(tmp_path, mlflow_dir, signum):
    """A graceful stop (``run_epochs`` saves and returns) is no success: MLflow's ``KILLED``, a wandb run finished with
    exit code 1, and ``"failed"`` (what Lightning's trainer passes after SIGTERM or Ctrl-C) to a Lightning-style logger."""
    import signal

    class LightningStyle:
        statuses = []

        def log_metrics(self, metrics, step):
            pass

        def log_hparams(self, hparams, metrics=None):
            pass

        def finalize(self, status):
            self.statuses.append(status)

    def preempted(model, batch):
        preempted.calls += 1
        if preempted.calls == 3:
            os.kill(os.getpid(), getattr(signal, signum))
        return loss_with_mae(model, batch)

    preempted.calls = 0
    mlflow_logger = MLFlowLogger(save_dir=mlflow_dir(tmp_path / "m"))
    wandb_logger, other = WandbLogger(project="p", save_dir=tmp_path / "w", offline=True), LightningStyle()
    step = with_logging(train_step(preempted), mlflow_logger, wandb_logger, other, every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the driver's note that it stops after the current step)
        state, _ = run_epochs(step, sgd_state(tiny_mlp()), synthetic_batches(5), epochs=2, progress=False)
    assert state.step == 3
    assert mlflow_logger.experiment.get_run(mlflow_logger.run_id).info.status == "KILLED"
    assert [r["exit_code"] for r in wandb_runs(tmp_path / "w")] == [1]
    assert other.statuses == ["failed"]

    ended = []  # a fit after it, with the same step, ends "success" again
    mlflow_logger.finalize = lambda status="success": ended.append(status)
    run_epochs(step, state, synthetic_batches(5), epochs=1, max_steps=4, progress=False)
    assert ended == ["success"] and other.statuses == ["failed", "success"]


def test_mlflow_run_id_logs_hparams_metrics_at_the_runs_last_step(tmp_path, mlflow_dir):
    """``MLFlowLogger(run_id=<a finished run>).log_hparams(cfg, {"test/loss": x})`` (an evaluation adding its results):
    logged at step 0; at the run's last step (the highest, not the last written), as through the fit's own logger."""
    fit_logger = MLFlowLogger(save_dir=mlflow_dir(tmp_path))
    for step in (1, 5, 3):
        fit_logger.log_metrics({"train/loss": 1.0 / step}, step=step)
    fit_logger.log_metrics({"val/loss": 0.5}, step=2)
    fit_logger.finalize()
    evaluation = MLFlowLogger(save_dir=tmp_path, run_id=fit_logger.run_id)
    evaluation.log_hparams({"lr": 0.1}, {"test/loss": 0.25})
    evaluation.finalize()  # (else the run stays RUNNING: see the docs)
    client = evaluation.experiment
    assert [(m.step, m.value) for m in client.get_metric_history(fit_logger.run_id, "test/loss")] == [(5, 0.25)]
    assert client.get_run(fit_logger.run_id).info.status == "FINISHED"


def test_mlflow_names_it_would_refuse_are_cleaned_as_lightning_does_and_clashes_refused(tmp_path, mlflow_dir):
    logger = MLFlowLogger(save_dir=mlflow_dir(tmp_path))
    with pytest.warns(RuntimeWarning, match="'val/acc@1' is logged as 'val/acc1'"):
        logger.log_metrics({"val/acc@1": 0.5}, step=1)
    with pytest.raises(ValueError, match="'val/acc1' and 'val/acc@1' would both be written as 'val/acc1'"):
        logger.log_metrics({"val/acc1": 0.5, "val/acc@1": 0.25}, step=2)
    logger.finalize()
    assert [m.value for m in logger.experiment.get_metric_history(logger.run_id, "val/acc1")] == [0.5]


def test_mlflow_a_metric_named_in_another_script_is_logged_as_named_and_one_with_nothing_left_is_refused_by_name(
    tmp_path, mlflow_dir
):
    """Lightning's rule (ASCII letters only) left ``"train/"`` of ``"точность"``, which MLflow refuses: the fit died at
    its first log point with MLflow's error. Letters of any script are kept (MLflow takes them), the values as the
    CSVLogger's of the same fit; a name with nothing left of a part is refused naming the metric and the logger."""

    def loss_in_russian(model, batch):
        x, y = batch
        err = model(x) - y
        return (err**2).mean(), {"точность": err.abs().mean()}

    logger = MLFlowLogger(save_dir=mlflow_dir(tmp_path / "m"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (kept as named: no renaming warning)
        _, rows = fit(logger, tmp_path, epochs=1, loss=loss_in_russian)
    assert mlflow_records(logger) == merged_by_step(rows)
    assert {"train/точность", "train/точность_epoch"} <= set(logger.experiment.get_run(logger.run_id).data.metrics)
    with pytest.raises(ValueError, match="MLFlowLogger.log_metrics: metric 'train/🔥' cannot be logged to MLflow, "
                                         "which without them is 'train/'.*rename the metric"):
        logger.log_metrics({"train/🔥": 1.0}, step=11)
    with pytest.raises(ValueError, match="metric 'a//b' cannot be logged to MLflow: MLflow refuses an empty name"):
        logger.log_metrics({"a//b": 1.0}, step=11)


def test_mlflow_long_params_are_cut_at_mlflows_limit_and_many_go_in_batches(tmp_path, mlflow_dir):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    logger = MLFlowLogger(save_dir=mlflow_dir(tmp_path), prefix="fold0")
    logger.log_hparams({"long": "x" * (MAX_PARAM_VAL_LENGTH + 10), **{f"p{i}": i for i in range(150)}},
                       metrics={"val/acc": 0.5})
    logger.finalize()
    run = logger.experiment.get_run(logger.run_id)
    assert run.data.params["long"] == "x" * MAX_PARAM_VAL_LENGTH and len(run.data.params) == 151
    assert run.data.metrics == {"fold0-val/acc": 0.5}  # the prefix, joined with '-' as Lightning's


def test_mlflow_a_later_log_hparams_adds_params_skips_unchanged_and_refuses_a_changed_value_by_name(
    tmp_path, mlflow_dir
):
    """MLflow params cannot change: a new value is refused with a ValueError naming it (old and new), before anything
    is sent, also in a run continued with ``run_id=``; the same values again and new names go in."""
    logger = MLFlowLogger(save_dir=mlflow_dir(tmp_path))
    logger.log_hparams({"lr": 0.1, "bs": 4})
    logger.log_hparams({"lr": 0.1, "opt": {"name": "sgd"}})  # the same value again, and a new param
    with pytest.raises(ValueError, match=r"MLflow params cannot change.*lr='0\.1' \(now '0\.2'\)"):
        logger.log_hparams({"lr": 0.2, "wd": 0.01})
    assert logger.hparams == {"lr": 0.1, "bs": 4, "opt": {"name": "sgd"}}  # the refused call recorded nothing
    logger.log_hparams({"lr_new": 0.2})  # so a later call goes in (it re-sent the refused lr=0.2 and failed again)
    resumed = MLFlowLogger(run_id=logger.run_id, save_dir=tmp_path)
    with pytest.raises(ValueError, match=r"bs='4' \(now '8'\)"):
        resumed.log_hparams({"bs": 8, "lr": 0.1})
    resumed.log_hparams({"bs": 4, "seed": 1})
    resumed.finalize()
    params = logger.experiment.get_run(logger.run_id).data.params
    assert params == {"lr": "0.1", "bs": "4", "opt/name": "sgd", "lr_new": "0.2", "seed": "1"}  # none of the refused


def test_mlflow_params_flatten_dataclass_and_namespace_values_as_lightnings_do(tmp_path, mlflow_dir):
    """A dataclass or argparse.Namespace value was one param ("Opt(lr=0.1, wd=0.0)"); Lightning's _flatten_dict
    makes them opt/lr, opt/wd; and log_hparams(Namespace) itself was refused."""
    import argparse
    import dataclasses

    @dataclasses.dataclass
    class Opt:
        lr: float = 0.1
        wd: float = 0.0

    logger = MLFlowLogger(save_dir=mlflow_dir(tmp_path))
    logger.log_hparams({"opt": Opt(), "ns": argparse.Namespace(depth=3), "layers": [{"w": Opt(lr=0.2)}]})
    logger.log_hparams(argparse.Namespace(batch=32))
    logger.finalize()
    params = logger.experiment.get_run(logger.run_id).data.params
    assert params == {"opt/lr": "0.1", "opt/wd": "0.0", "ns/depth": "3", "layers/0/w/lr": "0.2",
                      "layers/0/w/wd": "0.0", "batch": "32"}


def test_mlflow_writes_after_the_fit_go_into_the_run_and_leave_its_status(tmp_path, mlflow_dir):
    """``log_hparams(cfg, {"best/loss": ...})`` or ``log_metrics`` after ``run_epochs``: logged into the finished (or
    failed) run, whose status stays, as Lightning's MLFlowLogger does; they marked it RUNNING, and nothing ended it."""
    logger = MLFlowLogger(save_dir=mlflow_dir(tmp_path))
    step = with_logging(train_step(loss_with_mae), logger, every_n_steps=2)
    state, history = run_epochs(step, sgd_state(tiny_mlp()), synthetic_batches(4), epochs=1, progress=False)
    client = logger.experiment
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    logger.log_hparams({"lr": 0.05}, {"best/loss": history[-1]["train/loss"]})
    logger.log_metrics({"test/mae": 0.5}, step=state.step)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.05"}
    assert run.data.metrics["best/loss"] == history[-1]["train/loss"] and run.data.metrics["test/mae"] == 0.5
    assert [m.step for m in client.get_metric_history(logger.run_id, "test/mae")] == [4]
    logger.finalize("failed")  # a later finalize sets the status again (Lightning's does)
    logger.log_metrics({"test/mae": 0.25}, step=5)
    assert client.get_run(logger.run_id).info.status == "FAILED"


def test_mlflow_asynchronous_logging_is_flushed_by_finalize_and_a_write_after_it_leaves_the_status(
    tmp_path, mlflow_dir
):
    logger = MLFlowLogger(save_dir=mlflow_dir(tmp_path), synchronous=False)
    for step in (1, 2):
        logger.log_metrics({"train/loss": 1 / step}, step)
    logger.finalize()
    logger.log_metrics({"train/loss": 0.25}, 4)
    assert logger.experiment.get_run(logger.run_id).info.status == "FINISHED"
    logger.finalize()  # (flushes the asynchronous write; MLflow's own atexit hook would too)
    history = logger.experiment.get_metric_history(logger.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (4, 0.25)]
    assert logger.experiment.get_run(logger.run_id).info.status == "FINISHED"


# --- both --------------------------------------------------------------------------------------------


def make_wandb(path):
    return WandbLogger(project="p", save_dir=path, offline=True)


def make_mlflow(path):
    return MLFlowLogger(save_dir=path)


@pytest.mark.parametrize("make", [make_wandb, make_mlflow], ids=["wandb", "mlflow"])
def test_bad_metrics_are_refused_before_any_run_starts(tmp_path, make):
    logger = make(tmp_path)
    name = type(logger).__name__
    with pytest.raises(TypeError, match=f"{name}.log_metrics: metric 'loss' is a str; expected a number"):
        logger.log_metrics({"loss": "0.5"}, step=1)
    with pytest.raises(TypeError, match=f"{name}.log_metrics: step must be an int"):
        logger.log_metrics({"loss": 0.5}, step=1.5)
    with pytest.raises(ValueError, match=f"{name}.finalize: status must be one of"):
        logger.finalize("crashed")
    logger.finalize()  # nothing started, nothing to end
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("make", [make_wandb, make_mlflow], ids=["wandb", "mlflow"])
def test_only_rank_zero_starts_a_run(tmp_path, monkeypatch, make):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    logger = make(tmp_path)
    logger.log_hparams({"lr": 0.1})
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.experiment.log({"x": 1})  # Lightning's DummyExperiment: does nothing
    logger.finalize("failed")
    assert os.listdir(tmp_path) == []


TORCHRUN_RANK_1 = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}


@pytest.mark.parametrize("make", [make_wandb, make_mlflow], ids=["wandb", "mlflow"])
@pytest.mark.filterwarnings("ignore:loopkit. this process is rank:RuntimeWarning")
def test_a_process_torchrun_says_is_rank_1_starts_no_run_before_the_process_group_exists(tmp_path, monkeypatch, make,
                                                                                         mlflow_dir):
    """Under torchrun, ``logger.log_hparams(cfg)`` before ``loopkit.distributed.init()``: torchrun's ``RANK`` says
    which process writes, as Lightning's ``rank_zero_only.rank`` (read from the environment); it started a run on
    every rank, and rank 1's was never finished."""
    assert not torch.distributed.is_initialized()
    for name, value in TORCHRUN_RANK_1.items():
        monkeypatch.setenv(name, value)
    logger = make(tmp_path)
    logger.log_hparams({"lr": 0.1})
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.experiment.log({"x": 1})  # Lightning's DummyExperiment: does nothing
    logger.finalize()
    assert os.listdir(tmp_path) == [] and logger.version is None
    monkeypatch.setenv("RANK", "0")  # rank 0 of the same torchrun job writes
    if isinstance(logger, MLFlowLogger):
        mlflow_dir(tmp_path)  # (an empty store, made once a session)
    logger.log_hparams({"lr": 0.1})
    assert logger.version is not None and logger.experiment is not None
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()
    else:
        logger.finalize()


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda p: WandbLogger(save_dir=p, offline=True, log_model=True), ValueError, "WandbLogger: log_model=True is not supported"),
        (lambda p: WandbLogger(version="a", id="b"), ValueError, "WandbLogger: version and id both name the run id"),
        (lambda p: WandbLogger(id=7), TypeError, "WandbLogger: id \\(version\\) must be a non-empty string"),
        (lambda p: WandbLogger(prefix=1), TypeError, "WandbLogger: prefix must be a string"),
        (lambda p: MLFlowLogger(log_model="all"), ValueError, "MLFlowLogger: log_model='all' is not supported"),
        (lambda p: MLFlowLogger(experiment_name=""), ValueError, "MLFlowLogger: experiment_name must be a non-empty"),
        (lambda p: MLFlowLogger(tags=["a"]), TypeError, "MLFlowLogger: tags must be a dict"),
        (lambda p: MLFlowLogger(save_dir=None), ValueError, "MLFlowLogger: give a tracking_uri"),
    ],
)
def test_bad_options_are_refused_by_name(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        make(tmp_path)


@pytest.mark.parametrize("cls, module, extra", [(WandbLogger, "wandb", "wandb"), (MLFlowLogger, "mlflow", "mlflow")])
def test_a_missing_package_names_the_extra_to_install(monkeypatch, cls, module, extra):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ImportError, match=f"{cls.__name__} needs the {module} package.*pip install 'loopkit\\[{extra}\\]'"):
        cls()


def test_importing_loopkit_imports_neither_tracker():
    code = "import sys, loopkit; print(sorted(m for m in ('wandb', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_public_names():
    assert loopkit.WandbLogger is WandbLogger and loopkit.MLFlowLogger is MLFlowLogger
    assert {"WandbLogger", "MLFlowLogger"} <= set(loopkit.__all__)
    assert isinstance(WandbLogger(offline=True), loopkit.Logger) and isinstance(MLFlowLogger(), loopkit.Logger)


class _EpochRecordFailsOnce(loopkit.Logger):
    """A logger of one's own whose first write of an epoch's record fails, as on a full disk."""

    def __init__(self):
        super().__init__()
        self.failed = False

    def _write_metrics(self, metrics, step):
        if "epoch" in metrics and not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")


def test_mlflow_a_fit_retried_after_a_failed_epoch_record_write_holds_each_validation_once(tmp_path, mlflow_dir):
    """The write of epoch 0's record fails at a logger before the MLflow one, after both took its validation; the fit
    retried from state_at_error validates and records epoch 0 again. Reference: the uninterrupted fit's MLflow
    history, every metric's (val/mse held epoch 0's validation twice at its step)."""

    def histories(failing, root):
        logger = MLFlowLogger(save_dir=mlflow_dir(root))
        step = with_logging(train_step(loss_with_mae), *failing, logger, every_n_steps=2)
        val = (eval_step(mse_metric), synthetic_batches(2, seed=5))
        try:
            run_epochs(step, sgd_state(tiny_mlp(), lr=0.05), synthetic_batches(5), epochs=2, val=val, progress=False)
        except OSError as error:
            run_epochs(step, loopkit.state_at_error(error), synthetic_batches(5), epochs=2, val=val, progress=False)
        client = logger.experiment
        return {key: [(m.step, m.value) for m in client.get_metric_history(logger.run_id, key)]
                for key in ("train/loss", "val/mse", "train/loss_epoch", "epoch")}

    failing = _EpochRecordFailsOnce()
    straight = histories((), tmp_path / "a")
    assert [s for s, _ in straight["val/mse"]] == [5, 10]
    assert histories((failing,), tmp_path / "b") == straight and failing.failed
