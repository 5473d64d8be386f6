"""loopkit.tune: values reported to Optuna, pruning that stops training, and shared SQLite studies."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import loopkit
from loopkit import tune
from tests._driver_helpers import Watched, alive, gc_off, make_data, mse, raw_loop_frees_its_model

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)

EPOCHS, BATCHES = 4, 3


def _pipeline(lr, make_mlp, make_batches, mse_loss, seed=0):
    """A small regression pipeline: (step, state, train data, val) for SGD at ``lr``."""
    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=lr), seed=seed)
    val = (loopkit.eval_step(lambda m, b: {"loss": mse_loss(m, b)}), make_batches(2, seed=9))
    return loopkit.train_step(mse_loss), state, make_batches(BATCHES), val


class _CountBatches(loopkit.Callback):
    def __init__(self):
        self.batches = 0

    def on_batch_end(self, state, metrics):
        self.batches += 1


@pytest.mark.parametrize("report_step", ["count", "global"])
def test_fit_reports_each_validation_in_order_or_at_the_global_step(report_step, make_mlp, make_batches, mse_loss):
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1)})
    step, state, data, val = _pipeline(trial.params["lr"], make_mlp, make_batches, mse_loss)
    value = tune.fit(trial, step, state, data, val=val, epochs=EPOCHS, progress=False, report_step=report_step)

    # the reference: the same pipeline run by run_epochs alone
    step, state, data, val = _pipeline(trial.params["lr"], make_mlp, make_batches, mse_loss)
    _, history = loopkit.run_epochs(step, state, data, val=val, epochs=EPOCHS, progress=False)
    assert [record["step"] for record in history] == [BATCHES * (e + 1) for e in range(EPOCHS)]
    at = (lambda i, record: i + 1) if report_step == "count" else (lambda i, record: record["step"])
    frozen = study.tell(trial, value)
    assert frozen.intermediate_values == {at(i, record): record["val/loss"] for i, record in enumerate(history)}
    assert value == history[-1]["val/loss"]
    assert frozen.user_attrs["step"] == EPOCHS * BATCHES
    assert frozen.user_attrs["history"] == history


def test_train_metric_is_reported_at_each_epoch_end(make_mlp, make_batches, mse_loss):
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    step, state, data, _ = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    value = tune.fit(trial, step, state, data, monitor="train/loss", epochs=2, progress=False)
    frozen = study.tell(trial, value)
    history = frozen.user_attrs["history"]
    assert frozen.intermediate_values == {1: history[0]["train/loss"], 2: history[1]["train/loss"]}
    assert value == history[-1]["train/loss"]


def test_a_second_validation_at_the_same_update_is_reported_once(make_mlp, make_batches, mse_loss):
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    # validations after every 3 updates and at each epoch end (also after 3 updates): one report per update
    tune.fit(trial, step, state, data, val=val, epochs=2, val_every_n_steps=BATCHES, progress=False, report_step="global")
    assert list(study.tell(trial, 0.0).intermediate_values) == [BATCHES, 2 * BATCHES]


class _CrashAt(loopkit.Callback):
    """Raise after the update ``step``'s batch, before its step checkpoint: a process that died there."""

    def __init__(self, step):
        self.step = step

    def on_batch_end(self, state, metrics):
        if state.step == self.step:
            raise RuntimeError(f"died at step {state.step}")


# (validation options, the update at which the first fit dies, the count of the validation the resumed fit runs
# again): the newest checkpoint is of the update before, saved before its due validation (the epoch's end; every
# second update), which the first fit reported before it died; per epoch at updates 3, 6 (2nd), ...; every 2
# updates at 2, 3 (the epoch's end), 4 (3rd), 6, ...
_RESUMES = {"per epoch": ({}, 2 * BATCHES + 1, 2), "every 2 updates": ({"val_every_n_steps": 2}, 5, 3)}


@pytest.mark.parametrize("resumed_in", ["a new trial", "the same trial"])
@pytest.mark.parametrize("scheme", sorted(_RESUMES))
def test_a_fit_resumed_from_a_checkpoint_reports_each_validation_at_the_uninterrupted_trials_step(
    scheme, resumed_in, make_mlp, make_batches, mse_loss, tmp_path
):
    options, crash, again = _RESUMES[scheme]
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    # the reference: the same trial's fit run without interruption
    reference = study.ask()
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    tune.fit(reference, step, state, data, val=val, epochs=EPOCHS, progress=False, **options)
    full = study.tell(reference, 0.0).intermediate_values
    assert len(full) == {"per epoch": EPOCHS, "every 2 updates": 8}[scheme]

    trial = study.ask()
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    step = loopkit.with_checkpointing(step, tmp_path / "ckpt", every_n_steps=1)
    with pytest.raises(RuntimeError, match=f"died at step {crash}"):
        tune.fit(trial, step, state, data, val=val, epochs=EPOCHS, progress=False, callbacks=[_CrashAt(crash)],
                 **options)
    died = study.trials[trial.number].intermediate_values  # what the first fit reported
    assert died == pytest.approx({k: v for k, v in full.items() if k <= again}, rel=1e-6, abs=0)
    if resumed_in == "a new trial":  # the rerun of a trial whose process died: Optuna's heartbeat makes a new one
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        trial = study.ask()
    restored = loopkit.restore(_pipeline(0.05, make_mlp, make_batches, mse_loss)[1], tmp_path / "ckpt")
    assert restored.step == crash - 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tune.fit(trial, step, restored, data, val=val, epochs=EPOCHS, progress=False, **options)
    assert not [str(w.message) for w in caught if "already reported" in str(w.message)]  # no step reported twice
    resumed = study.tell(trial, 0.0).intermediate_values

    # the resumed fit validates the restored state again (its validation was due), then the rest: every value
    # at the step the uninterrupted trial reported it at (the same trial keeps the values it had)
    expected = {k: v for k, v in full.items() if k >= again} if resumed_in == "a new trial" else full
    assert resumed == pytest.approx(expected, rel=1e-6, abs=0)
    assert sorted(resumed) == sorted(expected)


# (run_epochs options, the update at which the first fit dies after its newest checkpoint, the rerun's epochs
# left): every epoch validated, the process died after the fit's last checkpoint (post-fit work); or validations
# every 2 epochs, died in the 3rd, whose checkpoint (after epoch 2) leaves an epoch without validation
_RESTORED_LATE = {"at its end": ({}, None), "before an epoch without validation": ({"val_every_n_epochs": 2}, 2 * BATCHES + 1)}


@pytest.mark.parametrize("case", sorted(_RESTORED_LATE))
def test_a_rerun_with_no_validation_left_returns_and_reports_the_uninterrupted_value(
    case, make_mlp, make_batches, mse_loss, tmp_path
):
    """A trial that died after its fit's last checkpoint: the rerun restored a finished state and tune.fit raised
    ValueError "no epoch recorded 'val/loss' (history keys: [])". The run's last value is kept in the state's extras
    beside the pruning count; the reference is the same trial's fit run without interruption."""
    options, crash = _RESTORED_LATE[case]
    epochs = 3
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    reference = study.ask()
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    value = tune.fit(reference, step, state, data, val=val, epochs=epochs, progress=False, **options)
    full = study.tell(reference, value).intermediate_values

    first = study.ask()
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    step = loopkit.with_checkpointing(step, tmp_path / "ckpt", every_n_epochs=1)
    if crash is None:  # the fit ends; the objective's work after it dies
        assert tune.fit(first, step, state, data, val=val, epochs=epochs, progress=False, **options) == value
    else:
        with pytest.raises(RuntimeError, match=f"died at step {crash}"):
            tune.fit(first, step, state, data, val=val, epochs=epochs, progress=False, callbacks=[_CrashAt(crash)],
                     **options)
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    rerun = study.ask()
    restored = loopkit.restore(_pipeline(0.05, make_mlp, make_batches, mse_loss)[1], tmp_path / "ckpt")
    assert restored.epoch == (epochs if crash is None else 2)
    assert tune.fit(rerun, step, restored, data, val=val, epochs=epochs, progress=False, **options) == value
    last = max(full)
    assert study.tell(rerun, value).intermediate_values == {last: full[last]}  # at the uninterrupted trial's step

    # the rerun asks the pruner as the uninterrupted trial did at that validation
    pruning = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    restored = loopkit.restore(_pipeline(0.05, make_mlp, make_batches, mse_loss)[1], tmp_path / "ckpt")
    with pytest.raises(optuna.TrialPruned, match=f"pruned at step {last}: val/loss"):
        tune.fit(pruning.ask(), step, restored, data, val=val, epochs=epochs, progress=False, **options)


def test_the_count_is_kept_in_the_state_and_starts_afresh_without_it(make_mlp, make_batches, mse_loss):
    trial = optuna.create_study(pruner=optuna.pruners.NopPruner()).ask()
    callback = tune.PruningCallback(trial)
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    state, history = loopkit.run_epochs(step, state, data, val=val, epochs=2, progress=False, callbacks=[callback])
    kept = {"count": 2, "step": 2, "value": history[-1]["val/loss"]}
    assert state.extras["callbacks/PruningCallback[val/loss]"] == kept and list(callback.reported) == [1, 2]
    # the same callback in another fit: the count goes on from the state's, or starts at 1 without it
    state, _ = loopkit.run_epochs(step, state, data, val=val, epochs=3, progress=False, callbacks=[callback])
    assert list(callback.reported) == [3]
    fresh = _pipeline(0.05, make_mlp, make_batches, mse_loss)[1]
    trial = optuna.create_study(pruner=optuna.pruners.NopPruner()).ask()
    callback = tune.PruningCallback(trial)
    loopkit.run_epochs(step, fresh, data, val=val, epochs=1, progress=False, callbacks=[callback])
    assert list(callback.reported) == [1]


def test_a_pruned_trial_stops_training_after_logging_and_checkpointing_that_validation(make_mlp, make_batches, mse_loss, tmp_path):
    study = tune.create_study("prune", directory=tmp_path, pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    counter = _CountBatches()
    logger = loopkit.CSVLogger(tmp_path, "pruned")

    def objective(trial):
        step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
        step = loopkit.with_checkpointing(loopkit.with_logging(step, logger, every_n_steps=1), tmp_path / "ckpt",
                                          monitor="val/loss")
        return tune.fit(trial, step, state, data, val=val, epochs=EPOCHS, callbacks=[counter], progress=False)

    tune.optimize(objective, n_trials=1, study=study)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]  # one validation, after the first epoch
    assert counter.batches == BATCHES  # nothing trained after it
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert logged == [pytest.approx(trial.intermediate_values[1], rel=1e-6)]  # the pruned validation was logged
    restored = loopkit.restore(_pipeline(0.05, make_mlp, make_batches, mse_loss)[1], tmp_path / "ckpt")
    assert restored.step == BATCHES  # and checkpointed
    assert trial.user_attrs["history"][0]["val/loss"] == trial.intermediate_values[1]


def test_the_callback_alone_raises_trial_pruned_when_the_fit_ends(make_mlp, make_batches, mse_loss):
    trial = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0)).ask()
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    counter = _CountBatches()
    with pytest.raises(optuna.TrialPruned, match="pruned at step 1: val/loss"):
        loopkit.run_epochs(step, state, data, val=val, epochs=EPOCHS, progress=False,
                           callbacks=[tune.PruningCallback(trial), counter])
    assert counter.batches == BATCHES


@pytest.mark.parametrize("pruned", [False, True])
def test_a_trials_model_and_optimizer_are_freed_as_its_fit_ends_without_a_gc(pruned):
    """As a raw loop's are, by reference counting alone: a study's trials do not pile up (on a GPU, in device memory)
    until Python's cyclic gc runs. (Optuna's study.optimize keeps a pruned trial's TrialPruned, whose traceback holds
    the objective's frame, in a cycle of its own, a raw loop's objective's too: its gc_after_trial=True frees it.)"""
    pruner = optuna.pruners.ThresholdPruner(upper=-1.0) if pruned else optuna.pruners.NopPruner()
    with gc_off():
        assert raw_loop_frees_its_model()
        trial = optuna.create_study(pruner=pruner).ask()
        model = Watched(3, 1)
        state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters()))
        val = (loopkit.eval_step(lambda m, b: {"loss": mse(m, b)}), make_data(2))
        try:
            tune.fit(trial, loopkit.train_step(mse), state, make_data(3), val=val, epochs=2, progress=False)
        except optuna.TrialPruned:
            assert pruned
        else:
            assert not pruned
        del state, model
        assert alive() == 0


def test_min_epochs_does_not_hold_off_a_pruned_trial_while_early_stopping_waits_for_it(make_mlp, make_batches, mse_loss):
    """optuna-integration's Lightning callback raises TrialPruned in on_validation_end, whatever Trainer's min_epochs."""
    trial = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0)).ask()
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    counter = _CountBatches()
    stopper = loopkit.EarlyStopping("val/loss", patience=1, stopping_threshold=1e9)  # asks at once, waits for min
    with pytest.raises(optuna.TrialPruned, match="pruned at step 1: val/loss"):
        loopkit.run_epochs(step, state, data, val=val, epochs=EPOCHS, min_epochs=EPOCHS - 1, progress=False,
                           callbacks=[stopper, tune.PruningCallback(trial), counter])
    assert counter.batches == BATCHES  # one epoch, not min_epochs
    trial = optuna.create_study(pruner=optuna.pruners.NopPruner()).ask()
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    state, history = loopkit.run_epochs(step, state, data, val=val, epochs=EPOCHS, min_epochs=EPOCHS - 1, progress=False,
                                        callbacks=[loopkit.EarlyStopping("val/loss", patience=1, stopping_threshold=1e9),
                                                   tune.PruningCallback(trial)])
    assert len(history) == EPOCHS - 1  # the early stop waited for the minimum


def test_history_extras_that_json_cannot_hold_are_read(make_mlp, make_batches, mse_loss, tmp_path):
    """A 0-dim tensor a callback adds to the epoch's record is a number in the trial's history (run_epochs reads it;
    a string there is refused by run_epochs, naming the callback)."""
    class Extras(loopkit.Callback):
        def on_epoch_end(self, state, metrics):
            return {"w_norm": state.model[0].weight.norm().detach()}

    def objective(trial):
        step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
        return tune.fit(trial, step, state, data, val=val, epochs=1, callbacks=[Extras()], progress=False)

    study = tune.optimize(objective, n_trials=1, study_name="attrs", directory=tmp_path)
    (record,) = study.trials[0].user_attrs["history"]
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert isinstance(record["w_norm"], float)


def test_a_non_finite_value_prunes_at_once(make_mlp, make_batches, mse_loss):
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())

    def objective(trial):
        step, state, data, _ = _pipeline(0.05, make_mlp, make_batches, mse_loss)
        nan_val = (loopkit.eval_step(lambda m, b: {"loss": torch.tensor(float("nan"))}), data)
        return tune.fit(trial, step, state, data, val=nan_val, epochs=EPOCHS, progress=False)

    tune.optimize(objective, n_trials=1, study=study)
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    assert len(study.trials[0].intermediate_values) == 1


def test_optimize_passes_optunas_own_options_on_as_study_optimize_takes_them(tmp_path):
    """``callbacks`` (MaxTrialsCallback caps a study shared by processes), ``gc_after_trial`` and ``show_progress_bar``
    went to create_study, which refused them naming itself. The reference is plain Optuna's study.optimize."""
    objective = lambda t: t.suggest_float("x", 0, 1)  # noqa: E731
    seen = []
    plain = optuna.create_study()
    plain.optimize(objective, n_trials=5, callbacks=[optuna.study.MaxTrialsCallback(2)])
    study = tune.optimize(objective, n_trials=5, directory=tmp_path, gc_after_trial=True, show_progress_bar=False,
                          callbacks=[optuna.study.MaxTrialsCallback(2), lambda s, trial: seen.append(trial.number)])
    assert len(study.trials) == len(plain.trials) == 2 and seen == [0, 1]


def test_the_default_storage_is_sqlite_and_a_study_resumes(tmp_path):
    study = tune.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2, study_name="resume", directory=tmp_path)
    assert (tmp_path / "resume.db").exists()
    again = tune.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3, study_name="resume", directory=tmp_path)
    assert len(again.trials) == 5 and len(study.trials) == 5
    assert tune.storage_url("resume", tmp_path) == f"sqlite:///{tmp_path}/resume.db"
    with pytest.raises(ValueError, match="was made to minimize; it cannot be resumed to maximize"):
        tune.create_study("resume", directory=tmp_path, direction="maximize")


def test_optunas_study_direction_enum_is_taken_as_optuna_create_study_takes_it(tmp_path):
    made = tune.create_study("up", directory=tmp_path, direction=optuna.study.StudyDirection.MAXIMIZE)
    assert made.direction == optuna.create_study(direction=optuna.study.StudyDirection.MAXIMIZE).direction
    assert made.direction == optuna.study.StudyDirection.MAXIMIZE
    study = tune.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2, study_name="up", directory=tmp_path,
                          direction=optuna.study.StudyDirection.MAXIMIZE)  # (resumed: the stored direction agrees)
    assert study.best_value == max(t.value for t in study.trials)
    with pytest.raises(ValueError, match="was made to maximize; it cannot be resumed to minimize"):
        tune.create_study("up", directory=tmp_path, direction=optuna.study.StudyDirection.MINIMIZE)
    with pytest.raises(ValueError, match="direction must be 'minimize' or 'maximize'"):
        tune.create_study("x", directory=tmp_path, direction=optuna.study.StudyDirection.NOT_SET)


def test_a_missing_directory_is_made_and_a_file_in_its_way_is_refused(tmp_path):
    directory = tmp_path / "new" / "deeper"
    tune.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1, study_name="s", directory=directory)
    assert (directory / "s.db").is_file()
    assert len(tune.create_study("s", directory=directory).trials) == 1  # the study made there, resumed
    (tmp_path / "file").write_text("x")
    for under_file in (tmp_path / "file", tmp_path / "file" / "deeper"):
        with pytest.raises(NotADirectoryError, match=rf"cannot be made: '{re.escape(str(tmp_path / 'file'))}' is a file"):
            tune.create_study("s", directory=under_file)
    assert (tmp_path / "file").read_text() == "x"


def test_a_storage_optuna_would_fail_on_inside_is_refused_naming_what_is_wrong(tmp_path):
    """A URL of an SQLite file in a missing folder gave SQLAlchemy's "unable to open database file" (no path), an
    unknown scheme its "Can't load plugin", a non-URL Optuna's AttributeError: each is named at the call, and nothing
    is made; a URL in an existing folder, and a storage object, still make the study."""
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError, match=rf"loopkit.tune: storage '.*' is an SQLite file in "
                                                rf"'{re.escape(str(missing))}', which does not exist"):
        tune.create_study("s", storage=f"sqlite:///{missing}/s.db")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"is an SQLite file in '{re.escape(str(tmp_path / 'file'))}', which is "
                                                 "a file"):
        tune.create_study("s", storage=f"sqlite:///{tmp_path}/file/s.db")
    with pytest.raises(ValueError, match=r"loopkit.tune: storage 'sqllite:///.*' is not a database URL SQLAlchemy can "
                                         r"open \(Can't load plugin: sqlalchemy.dialects:sqllite\)"):
        tune.create_study("s", storage=f"sqllite:///{tmp_path}/s.db")
    for bad in (3, tmp_path / "s.db"):
        with pytest.raises(TypeError, match=r"loopkit.tune: storage must be a database URL .* or an optuna storage"):
            tune.create_study("s", storage=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert tune.create_study("s", storage=f"sqlite:///{tmp_path}/s.db").study_name == "s"
    assert tune.create_study("m", storage=optuna.storages.InMemoryStorage()).study_name == "m"


def test_a_directory_under_home_is_expanded_and_a_dangling_link_named(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    tune.create_study("s", directory="~/studies")
    assert (home / "studies" / "s.db").is_file() and not (work / "~").exists()  # not a folder named '~'
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match=rf"'{re.escape(str(tmp_path / 'gone'))}' is a link to nothing"):
        tune.create_study("s", directory=tmp_path / "gone" / "deeper")


@pytest.mark.parametrize("folder", ["a b", "q?x", "pct%20x", "h#1"])
def test_any_folder_name_holds_the_default_storage(folder, tmp_path):
    directory = tmp_path / folder
    directory.mkdir()
    tune.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1, study_name="s", directory=directory)
    assert sorted(p.name for p in tmp_path.rglob("*.db")) == ["s.db"] and (directory / "s.db").exists()


def test_an_sqlite_uri_filename_storage_holds_the_study_and_leaves_no_stray_lock_file(tmp_path, monkeypatch):
    """sqlite:///file:study.db?uri=true names its file by an SQLite URI, not a path: no lock file is made beside
    "file:study.db" (a path no database is at, which guards nothing); the study is in SQLite's study.db (reference:
    Optuna's load_study of that URL)."""
    monkeypatch.chdir(tmp_path)
    url = "sqlite:///file:study.db?uri=true"
    study = tune.create_study("s", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert sorted(os.listdir(tmp_path)) == ["study.db"]
    assert [t.params for t in optuna.load_study(study_name="s", storage=url).trials] == [study.trials[0].params]


_KILLED = textwrap.dedent(
    """
    import pathlib, sys, time, optuna
    from loopkit import tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    inside = pathlib.Path(sys.argv[1]) / "inside"

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 1:  # the second trial waits to be killed
            inside.write_text(repr(x))
            time.sleep(60)
        return x

    tune.optimize(objective, n_trials=3, study_name="killed", directory=sys.argv[1])  # loopkit's default storage
    """
)


def test_a_trial_whose_process_was_killed_fails_and_reruns_with_its_parameters_on_resume(tmp_path):
    worker = subprocess.Popen([sys.executable, "-c", _KILLED, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "inside").exists():
            assert worker.poll() is None, worker.communicate()[0]
            assert time.monotonic() < deadline, "the worker never reached its second trial"
            time.sleep(0.05)
        time.sleep(0.2)  # let the trial's first heartbeat land (it is recorded as the trial starts)
    finally:
        worker.kill()  # SIGKILL: no cleanup, the trial stays RUNNING in the SQLite file
        worker.communicate(timeout=30)
    url = tune.storage_url("killed", tmp_path)
    before = optuna.load_study(study_name="killed", storage=url).trials
    assert [t.state for t in before] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]
    time.sleep(3.5)  # the dead trial's heartbeat is now older than the resume's grace period (SQLite keeps whole seconds)

    def objective(trial):
        trial.set_user_attr("rerun_of", tune.retried_trial_number(trial))  # (where its checkpoints would be)
        return trial.suggest_float("x", 0, 1)

    study = tune.optimize(objective, n_trials=2, study_name="killed", directory=tmp_path, heartbeat_interval=1,
                          grace_period=2)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    dead, retry = study.trials[1], study.trials[2]
    assert retry.params == dead.params == {"x": float((tmp_path / "inside").read_text())}
    assert retry.system_attrs["failed_trial"] == 1
    assert [t.user_attrs.get("rerun_of", "-") for t in study.trials[2:]] == [1, None]
    assert states.count("COMPLETE") == 3  # the search's n_trials=3, as if it had never been killed


def test_retried_trial_number_names_the_trial_that_died_first_for_live_and_frozen_trials():
    """Optuna 5's RetryFailedTrialCallback.retried_trial_number(trial) raised AttributeError on the objective's (live)
    trial; the reference is the WAITING copy Optuna's heartbeat callback queues for a dead trial."""
    study = optuna.create_study()
    died = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert tune.retried_trial_number(died) is None
    frozen = study.tell(died, state=optuna.trial.TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        requeue = optuna.storages.RetryHeartbeatStaleTrialCallback()
    requeue(study, frozen)
    rerun = study.ask()
    assert (rerun.params, tune.retried_trial_number(rerun)) == (died.params, died.number)
    requeue(study, study.tell(rerun, state=optuna.trial.TrialState.FAIL))  # the rerun dies too
    again = study.ask()
    assert tune.retried_trial_number(again) == died.number  # the first of the series: one folder of checkpoints
    assert [tune.retried_trial_number(t) for t in study.trials] == [None, died.number, died.number]
    with pytest.raises(TypeError, match="retried_trial_number: trial must be an optuna trial"):
        tune.retried_trial_number("trial 3")


def test_the_heartbeat_is_on_for_the_storages_made_from_urls_and_a_storage_object_is_used_as_made(tmp_path):
    def backend(study):
        return getattr(study._storage, "_backend", study._storage)

    default = tune.create_study("d", directory=tmp_path)
    assert backend(default).get_heartbeat_interval() == 60 and backend(default).grace_period is None  # Optuna: 2 * 60
    given_url = tune.create_study("u", storage=tune.storage_url("u", tmp_path), heartbeat_interval=5, grace_period=30,
                                  max_retry=None)
    assert (backend(given_url).get_heartbeat_interval(), backend(given_url).grace_period) == (5, 30)
    off = tune.create_study("off", directory=tmp_path, heartbeat_interval=None)
    assert backend(off).get_heartbeat_interval() is None
    made = optuna.storages.RDBStorage(tune.storage_url("o", tmp_path))
    assert backend(tune.create_study("o", storage=made)) is made
    with pytest.raises(TypeError, match="the given storage object has its own"):
        tune.create_study("o", storage=made, heartbeat_interval=5)
    with pytest.raises(ValueError, match="heartbeat_interval must be a positive int"):
        tune.create_study("x", directory=tmp_path, heartbeat_interval=0)
    with pytest.raises(ValueError, match=r"grace_period must be an int \(seconds\) above heartbeat_interval \(60\)"):
        tune.create_study("x", directory=tmp_path, grace_period=60)
    with pytest.raises(ValueError, match="grace_period needs a heartbeat"):
        tune.create_study("x", directory=tmp_path, heartbeat_interval=None, grace_period=10)
    with pytest.raises(ValueError, match="max_retry must be an int >= 0 or None"):
        tune.create_study("x", directory=tmp_path, max_retry=-1)
    assert not (tmp_path / "x.db").exists()


_WORKER = textwrap.dedent(
    """
    import sys, torch, optuna, loopkit
    from loopkit import tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(3)]
    mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        model = torch.nn.Linear(3, 1)
        state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=lr), seed=trial.number)
        val = (loopkit.eval_step(lambda m, b: {"loss": mse(m, b)}), data)
        trial.set_user_attr("worker", sys.argv[2])
        return tune.fit(trial, loopkit.train_step(mse), state, data, val=val, epochs=2, progress=False)

    tune.optimize(objective, n_trials=3, study_name="shared", storage=sys.argv[1], pruner=optuna.pruners.NopPruner())
    """
)


@pytest.mark.slow
def test_two_processes_share_one_study_through_its_storage(tmp_path):
    url = tune.storage_url("shared", tmp_path)
    tune.create_study("shared", storage=url)  # made once, as a coordinator would; workers load it
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, url, str(i)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    try:
        outputs = [w.communicate(timeout=240)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=url)
    assert len(study.trials) == 6
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert sorted(t.user_attrs["worker"] for t in study.trials) == ["0"] * 3 + ["1"] * 3


_AT_ONCE = textwrap.dedent(
    """
    import pathlib, sys, time, optuna
    from optuna.storages._rdb import storage as rdb
    from loopkit import tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stamp = rdb._VersionManager._set_alembic_revision
    folder = pathlib.Path(sys.argv[1])

    def slow_stamp(self, revision):  # found no schema version: the race's window, held open until the other worker
        (folder / f"window{sys.argv[2]}").touch()  # has found none too (or 2 s have passed: it waits on the lock)
        deadline = time.monotonic() + 2
        while len(list(folder.glob("window*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        stamp(self, revision)

    rdb._VersionManager._set_alembic_revision = slow_stamp
    (folder / f"ready{sys.argv[2]}").touch()
    deadline = time.monotonic() + 60
    while not (folder / "go").exists() and time.monotonic() < deadline:  # all start together
        time.sleep(0.005)
    tune.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2, study_name="new", directory=folder)
    """
)


@pytest.mark.slow
def test_processes_making_one_new_sqlite_study_at_once_take_turns(tmp_path):
    """Several workers starting a new SQLite study at the same moment died 10-40% of the time in Optuna's schema
    creation ("table studies already exists", "UNIQUE constraint failed: alembic_version"). The race is made
    certain here: the workers start within milliseconds of each other, and each worker's Optuna, having found no
    schema version, waits for the other to find none too before writing it; they now take turns on a lock file beside
    the database (the first then waits 2 s in vain)."""
    workers = [subprocess.Popen([sys.executable, "-c", _AT_ONCE, str(tmp_path), str(i)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready*"))) < len(workers):
            assert all(w.poll() is None for w in workers), [w.communicate()[0] for w in workers if w.poll() is not None]
            assert time.monotonic() < deadline, "the workers never got ready"
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outputs = [w.communicate(timeout=120)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-1500:] for o in outputs)
    trials = optuna.load_study(study_name="new", storage=tune.storage_url("new", tmp_path)).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4


_TWO_RANKS = textwrap.dedent(
    """
    import json, pathlib, sys, torch, optuna, loopkit
    from loopkit import distributed, tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder, rank = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    distributed.init(init_method=(folder / "rendezvous").as_uri(), rank=rank, world_size=2, timeout=60)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(2)]
    mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    val = (loopkit.eval_step(lambda m, b: {"loss": mse(m, b)}), data)

    def fit(trial):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=trial.suggest_float("lr", 1e-3, 1e-1)))
        return tune.fit(trial, loopkit.with_ddp(loopkit.train_step(mse)), state, data, val=val, epochs=1, progress=False)

    out = {}
    for name, call in [("optimize", lambda: tune.optimize(fit, n_trials=1, study_name="ddp", directory=folder)),
                       ("fit", lambda: fit(optuna.create_study().ask()))]:
        try:
            call()
            out[name] = "ran"
        except RuntimeError as e:
            out[name] = str(e)
    value = fit(optuna.trial.FixedTrial({"lr": 0.05}))  # a trial the ranks share
    values = [None, None]
    torch.distributed.all_gather_object(values, value)
    out["shared"] = values
    (folder / f"rank{rank}.json").write_text(json.dumps(out))
    distributed.shutdown()
    """
)


@pytest.mark.slow
def test_a_search_under_a_process_group_of_several_ranks_is_refused(tmp_path):
    """Under torchrun each rank asked the study for a trial of its own: one DDP job trained its replicas with two
    learning rates, and two COMPLETE trials recorded the value of a mix. Now tune.optimize, and tune.fit given a
    trial of the study's own, refuse; a trial the ranks share (here a FixedTrial) trains as one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    ranks = [subprocess.Popen([sys.executable, "-c", _TWO_RANKS, str(tmp_path), str(r)], env={**env, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outputs = [r.communicate(timeout=180)[0] for r in ranks]
    finally:
        for r in ranks:
            r.kill()
    assert [r.returncode for r in ranks] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in ("optimize", "fit"):
            assert out[name].startswith(f"loopkit.tune.{name}: this process is rank {rank} of a torch.distributed "
                                        "process group of 2"), out[name]
            assert "TorchDistributedTrial" in out[name] and "one process per trial" in out[name]
        assert out["shared"][0] == out["shared"][1]  # one model, the same value on both ranks
    assert not list(tmp_path.glob("*.db"))  # no study made, no trial asked for


def test_bad_input_is_named(make_mlp, make_batches, mse_loss, tmp_path):
    trial = optuna.create_study().ask()
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    with pytest.raises(ValueError, match="monitor 'val/loss' is a validation metric; pass val="):
        tune.fit(trial, step, state, data, epochs=1, progress=False)
    with pytest.raises(KeyError, match=r"monitor 'val/acc' is not among the metrics \['val/loss'\]"), pytest.warns(
        RuntimeWarning, match="sanity validation did not report"
    ):
        tune.fit(trial, step, state, data, val=val, monitor="val/acc", epochs=1, progress=False)
    for monitor in (None, 3, ""):
        with pytest.raises(ValueError, match=f"loopkit.tune.fit: monitor must be a metric name .* got {monitor!r}"):
            tune.fit(trial, step, state, data, val=val, monitor=monitor, epochs=1, progress=False)
    with pytest.raises(ValueError, match="n_trials must be a positive int"):
        tune.optimize(lambda t: 0.0, n_trials=0, directory=tmp_path)
    with pytest.raises(ValueError, match="give n_trials or timeout"):
        tune.optimize(lambda t: 0.0, directory=tmp_path)
    with pytest.raises(ValueError, match="timeout must be positive seconds or None, got -1"):
        tune.optimize(lambda t: 0.0, n_trials=3, timeout=-1, directory=tmp_path)  # (it ran 0 trials)
    with pytest.raises(ValueError, match="direction must be 'minimize' or 'maximize'"):
        tune.create_study("x", directory=tmp_path, direction="down")
    with pytest.raises(TypeError, match="configure a new study"):
        tune.optimize(lambda t: 0.0, n_trials=1, study=optuna.create_study(), direction="maximize")
    with pytest.raises(ValueError, match="PruningCallback: monitor must be a metric name"):
        tune.PruningCallback(trial, "")
    with pytest.raises(ValueError, match="report_step must be 'count' or 'global'"):
        tune.PruningCallback(trial, report_step="epoch")
    with pytest.raises(ValueError, match="study_name must be a non-empty name"):
        tune.storage_url("a/b", tmp_path)
    assert not list(tmp_path.glob("*.db"))  # nothing was made by a refused call


def test_a_trial_a_signal_stopped_is_not_recorded_as_finished(make_mlp, make_batches, mse_loss, tmp_path):
    """SIGTERM during a trial's fit: run_epochs stops gracefully (history.stopped_by), and tune.fit returned the
    half-trained value, which Optuna recorded COMPLETE before going on. Now the trial fails and the study stops, as
    on Ctrl-C."""
    import signal

    class TermAt(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            if state.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    def objective(trial):
        step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
        return tune.fit(trial, step, state, data, val=val, epochs=2, callbacks=[TermAt()], progress=False)

    study = optuna.create_study()
    with pytest.raises(KeyboardInterrupt, match=r"loopkit.tune.fit: a signal \(SIGTERM\) stopped the trial's fit at step 2"):
        study.optimize(objective, n_trials=2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]


@contextlib.contextmanager
def _no_keyboard_interrupt():
    """A KeyboardInterrupt out of the block fails the test (rather than ending pytest's session)."""
    try:
        yield
    except KeyboardInterrupt as e:
        pytest.fail(f"KeyboardInterrupt though no signal came: {e}")


def test_a_fit_short_of_its_epochs_without_a_signal_is_no_signals_stop(make_mlp, make_batches, mse_loss):
    """tune.fit took any fit that ended short of its epochs with no callback's stop for a signal's, and raised
    KeyboardInterrupt ("a signal (SIGTERM, Ctrl-C) stopped the trial's fit"), which optimize's catch=(Exception,)
    does not catch: the search stopped. Now it asks run_epochs' signal handler whether a signal came. Data used up
    after one epoch: run_epochs warns and returns (the reference), and tune.fit returns that value."""
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    with pytest.warns(RuntimeWarning, match="yielded no batches in epoch 1"):
        _, history = loopkit.run_epochs(step, state, iter(data), val=val, epochs=EPOCHS, progress=False)
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    with pytest.warns(RuntimeWarning, match="yielded no batches in epoch 1"), _no_keyboard_interrupt():
        value = tune.fit(optuna.create_study().ask(), step, state, iter(data), val=val, epochs=EPOCHS, progress=False)
    assert len(history) == 1 and value == history[0]["val/loss"]

    # training turned off: no epoch runs, so there is no value: named before the fit (not a signal)
    step, state, data, val = _pipeline(0.05, make_mlp, make_batches, mse_loss)
    counter = _CountBatches()
    for off in (0, 0.0):
        with pytest.raises(ValueError, match=rf"limit_train_batches={off} turns training off.*loopkit.evaluate"), (
            _no_keyboard_interrupt()
        ):
            tune.fit(optuna.create_study().ask(), step, state, data, val=val, epochs=EPOCHS, limit_train_batches=off,
                     callbacks=[counter], progress=False)
    assert counter.batches == 0 and state.step == 0


def test_loopkit_tune_is_an_attribute_of_the_package():
    assert loopkit.tune is tune


# --- examples/tune_digits.py ---------------------------------------------------------------------


def test_tune_digits_example_prunes_and_its_study_holds_what_it_printed(tmp_path):
    from tests.test_examples_more import found, output_of, run_example

    directory = tmp_path / "new" / "study"  # (a folder that does not exist yet is made)
    proc = run_example("tune_digits.py", "--quick", "--directory", str(directory))
    assert proc.returncode == 0, output_of(proc)
    study = optuna.load_study(study_name="digits_search", storage=tune.storage_url("digits_search", directory))
    printed = re.findall(r"^trial +(\d+)  (\w+) +lr ([0-9.e+-]+)  hidden +(\d+)  reports (\d+)", proc.stdout, re.MULTILINE)
    assert [(int(n), state, int(r)) for n, state, _, _, r in printed] == [
        (t.number, t.state.name, len(t.intermediate_values)) for t in study.trials
    ], output_of(proc)
    hopeless = [t for t in study.trials if t.params["lr"] == 1e-6 and t.number in (3, 4)]
    assert [t.state for t in hopeless] == [optuna.trial.TrialState.PRUNED] * 2, output_of(proc)
    (acc,) = found(r"^best trial retrained: test accuracy ([0-9.]+)$", proc)
    assert float(acc) >= 0.9


@pytest.mark.slow
def test_tune_digits_example_resumed_adds_new_trials_and_a_new_study_is_reproducible(tmp_path, capsys):
    from tests.test_examples_more import load_example

    example = load_example("tune_digits")
    short = ["--epochs", "1", "--min-acc", "0", "--directory", str(tmp_path)]
    assert example.main([*short, "--trials", "6"]) == 0  # the five queued trials, and one sampled
    assert example.main([*short, "--trials", "2"]) == 0  # resumed: two more
    capsys.readouterr()
    trials = optuna.load_study(study_name="digits_search", storage=tune.storage_url("digits_search", tmp_path)).trials
    assert len(trials) == 8 and all(t.state.is_finished() for t in trials)
    params = [(t.params["lr"], t.params["hidden"]) for t in trials]

    # the reference: what Optuna's TPE sampler seeded with 0 (a new study's seed) draws first (queued trials draw none)
    reference = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    drawn = reference.ask()
    first_draw = (drawn.suggest_float("lr", 1e-6, 3e-2, log=True), drawn.suggest_categorical("hidden", [32, 64, 128]))
    assert params[5] == first_draw  # a new study is reproducible
    assert not set(params[6:]) & set(params[:6]), params  # the resumed run's trials are new ones


def test_tune_digits_example_fails_below_its_bar():
    from tests.test_examples_more import output_of, run_example

    proc = run_example("tune_digits.py", "--quick", "--trials", "3", "--min-acc", "1.01")
    assert proc.returncode == 1, output_of(proc)
    assert "FAILED: test accuracy" in proc.stderr, output_of(proc)


@pytest.mark.parametrize("args", [("--trials", "0"), ("--quick", "--epochs", "0"), ("--epochs", "-2")])
def test_tune_digits_example_refuses_counts_below_one_rather_than_taking_the_default(args, capsys):
    from tests.test_examples_more import load_example

    example = load_example("tune_digits")
    assert (example.parse_args(["--quick"]).trials, example.parse_args([]).epochs) == (7, 8)  # the defaults
    with pytest.raises(SystemExit) as exit:
        example.parse_args(list(args))
    assert exit.value.code == 2
    assert "error: --trials and --epochs must be at least 1" in capsys.readouterr().err


def test_fit_takes_one_callback_alone_as_run_epochs_does(make_mlp, make_batches, mse_loss):
    """tune.fit(callbacks=monitor) failed with Python's "Value after * must be an iterable"; run_epochs, whose
    options tune.fit passes on, takes one callback alone and None as none (as Lightning does). Reference: the
    value of the same fit without callbacks."""
    step, state, data, _ = _pipeline(0.1, make_mlp, make_batches, mse_loss)
    monitor = loopkit.LearningRateMonitor()
    tune.fit(optuna.create_study().ask(), step, state, data, monitor="train/loss", epochs=1,
             progress=False, callbacks=monitor)
    assert len(monitor.history) == 1
    values = []
    for callbacks in (None, ()):
        step, state, data, _ = _pipeline(0.1, make_mlp, make_batches, mse_loss)
        values.append(tune.fit(optuna.create_study().ask(), step, state, data, monitor="train/loss", epochs=1,
                               progress=False, callbacks=callbacks))
    assert values[0] == values[1]


class _ForBothTrainers(loopkit.Callback):
    """A callback written for both trainers: Lightning's on_train_epoch_end beside loopkit's on_epoch_end."""

    def on_train_epoch_end(self, trainer, pl_module):
        pass

    def on_epoch_end(self, state, record):
        pass


def test_fit_warns_of_a_callback_for_both_trainers_once_as_run_epochs_does(make_mlp, make_batches, mse_loss):
    """tune.fit checks the callbacks itself (before run_epochs does) and leaves the warning to run_epochs: the
    warning naming the Lightning hooks loopkit never calls comes once, as from run_epochs alone (the reference)."""
    counts = []
    for fit in ("run_epochs", "tune.fit"):
        step, state, data, val = _pipeline(0.1, make_mlp, make_batches, mse_loss)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if fit == "tune.fit":
                tune.fit(optuna.create_study().ask(), step, state, data, val=val, epochs=1, progress=False,
                         callbacks=[_ForBothTrainers()])
            else:
                loopkit.run_epochs(step, state, data, val=val, epochs=1, progress=False, callbacks=[_ForBothTrainers()])
        counts.append(sum("never calls on_train_epoch_end" in str(w.message) for w in caught))
    assert counts == [1, 1]


def test_optimize_refuses_trials_in_threads(tmp_path):
    """n_jobs failed deep in create_study with "unexpected keyword argument 'n_jobs'"; trials in threads share torch's
    one generator, which each step installs its state's RNG into, so they would draw each other's masks."""
    with pytest.raises(TypeError, match="n_jobs \\(trials in threads\\) is not supported.*parallel processes"):
        tune.optimize(lambda t: 0.0, n_trials=2, directory=str(tmp_path), n_jobs=2)
