"""``with_logging``: what the loggers receive, checked against the metrics the steps returned."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import loopkit
from loopkit import (
    ConsoleLogger,
    CSVLogger,
    JSONLLogger,
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
    eval_step,
    run_epochs,
    train_step,
    with_amp,
    with_grad_accum,
    with_grad_clip,
    with_logging,
)
from loopkit.state import replace_extras
from tests.conftest import loss_with_mae, mse_metric


class MemoryLogger(Logger):
    """Keeps what it is given: ``logged`` is a list of ``(step, metrics)``."""

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.finalized = 0

    def _write_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def _finalize(self):
        self.finalized += 1

    def series(self, tag):
        return [(step, m[tag]) for step, m in self.logged if tag in m]


class Recorder:
    """A callback that records each training call's metrics (as floats) and the step after it."""

    def __init__(self):
        self.calls: list[tuple[int, dict[str, float]]] = []

    def on_batch_end(self, state, metrics):
        self.calls.append((state.step, {k: float(v) for k, v in metrics.items()}))


def scalars(log_dir, tag):
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def csv_series(log_dir, tag):
    with open(os.path.join(log_dir, "metrics.csv"), newline="") as f:
        return [(int(r["step"]), float(r[tag])) for r in csv.DictReader(f) if r.get(tag)]


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def assert_series(actual, expected, rel):
    assert [s for s, _ in actual] == [s for s, _ in expected]
    for (step, got), (_, want) in zip(actual, expected):
        assert got == pytest.approx(want, rel=rel), f"step {step}"


# --- what is logged, read back ---------------------------------------------------------------------


def test_event_files_and_csv_hold_the_window_epoch_and_validation_means(tmp_path, make_mlp, make_batches, make_sgd_state):
    data, val_data = make_batches(7, seed=1), make_batches(3, seed=2)
    tb, csv_logger, jsonl = TensorBoardLogger(tmp_path), CSVLogger(tmp_path), JSONLLogger(tmp_path)
    recorder = Recorder()
    step = with_logging(train_step(loss_with_mae), tb, csv_logger, jsonl, every_n_steps=3)
    state, history = run_epochs(
        step, make_sgd_state(make_mlp(), lr=0.05), data, epochs=2,
        val=(eval_step(mse_metric), val_data), callbacks=[recorder], progress=False,
    )
    assert tb.log_dir == csv_logger.log_dir == jsonl.log_dir == str(tmp_path / "default" / "version_0")
    calls = recorder.calls
    assert [s for s, _ in calls] == list(range(1, 15))
    # windows of 3 updates, one crossing the epoch boundary (steps 7..9); step 14 ends no window
    windows = {
        tag: [(end, mean(m[name] for _, m in calls[end - 3:end])) for end in (3, 6, 9, 12)]
        for tag, name in (("train/loss", "loss"), ("train/mae", "mae"))
    }
    per_epoch = {
        "train/loss_epoch": [(7 * (e + 1), history[e]["train/loss"]) for e in range(2)],
        "val/mse": [(7 * (e + 1), history[e]["val/mse"]) for e in range(2)],
    }
    # every row holds the epoch of its step: windows at 3, 6 (epoch 0), 9, 12 (epoch 1); validation and record at 7, 14
    per_epoch["epoch"] = [(s, float((s - 1) // 7)) for s in (3, 6, 7, 7, 9, 12, 14, 14)]
    # the epoch means are the driver's too: the reference of the reference
    assert history[0]["train/loss"] == pytest.approx(mean(m["loss"] for _, m in calls[:7]), rel=1e-6)
    for tag, expected in {**windows, **per_epoch}.items():
        assert_series(scalars(tb.log_dir, tag), expected, rel=1e-6)  # TensorBoard keeps float32
        assert_series(csv_series(csv_logger.log_dir, tag), expected, rel=1e-6 if tag in windows else 0)
    lines = [json.loads(line) for line in open(os.path.join(jsonl.log_dir, "metrics.jsonl"))]
    assert [line["step"] for line in lines if "train/loss" in line] == [3, 6, 9, 12]
    assert not any("val/mse_epoch" in line or "train/loss" in line and "train/loss_epoch" in line for line in lines)


def test_under_grad_accum_a_window_is_n_updates_and_flush_counts(tmp_path, make_mlp, make_batches, make_sgd_state):
    batches = make_batches(7)
    inner = with_grad_clip(with_grad_accum(train_step(loss_with_mae), every=2), max_norm=0.5)
    # the reference: the bare step called by hand, then the end-of-epoch flush (a partial group)
    state, calls = make_sgd_state(make_mlp()), []
    for batch in batches:
        state, metrics = inner(state, batch)
        calls.append({k: float(v) for k, v in metrics.items()})
    state, flushed = inner.flush(state)
    calls.append({k: float(v) for k, v in flushed.items()})
    assert state.step == 4  # updates after calls 2, 4, 6, and the flush after call 7
    memory = MemoryLogger()
    logged_state, _ = run_epochs(
        with_logging(inner, memory, every_n_steps=2), make_sgd_state(make_mlp()), batches, epochs=1, progress=False
    )
    assert logged_state.step == 4
    assert_series(memory.series("train/loss"), [(2, mean(m["loss"] for m in calls[:4])), (4, mean(m["loss"] for m in calls[4:7]))], 1e-6)
    # grad_norm comes with updates only (calls 2, 4, 6 and the flush): its means are over updates, not calls
    norms = [m["grad_norm"] for m in calls if "grad_norm" in m]
    assert len(norms) == 4 and "grad_norm" in calls[-1]
    assert_series(memory.series("train/grad_norm"), [(2, mean(norms[:2])), (4, mean(norms[2:]))], 1e-6)


def test_logged_by_hand_equals_the_bare_steps_metrics_and_training_is_unchanged(make_mlp, make_batches, make_adam_state):
    """Without the driver: the wrapped step called by hand, against the bare step called by hand."""
    batches = make_batches(9)
    bare = with_amp(train_step(loss_with_mae), dtype=torch.bfloat16)
    memory = MemoryLogger()
    logged = with_logging(bare, memory, every_n_steps=4)
    a, b = make_adam_state(make_mlp(), scheduler=True), make_adam_state(make_mlp(), scheduler=True)
    reference = []
    for batch in batches:
        a, ma = logged(a, batch)
        b, mb = bare(b, batch)
        assert {k: float(v) for k, v in ma.items()} == {k: float(v) for k, v in mb.items()}
        reference.append({k: float(v) for k, v in mb.items()})
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    expected = [(4, mean(m["loss"] for m in reference[:4])), (8, mean(m["loss"] for m in reference[4:8]))]
    assert_series(memory.series("train/loss"), expected, 1e-6)
    assert [s for s, _ in memory.logged] == [4, 8]
    opened = a.extras["logging/pending"]  # call 9 opened the next window
    assert len(opened) == 1 and sorted(opened[0]) == ["loss", "mae"] and "logging/window" not in a.extras


def test_a_plain_function_step_is_logged_when_it_advances_state_step(tmp_path):
    def count_step(state, batch):
        return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {"value": batch.sum()}

    memory = MemoryLogger()
    step = with_logging(count_step, memory, every_n_steps=2)
    state = loopkit.TrainState.create(torch.nn.Linear(1, 1))
    state, history = run_epochs(step, state, [torch.tensor([float(i)]) for i in range(1, 6)], epochs=1, progress=False)
    assert memory.series("train/value") == [(2, 1.5), (4, 3.5)]
    assert memory.series("train/value_epoch") == [(5, 3.0)]
    assert memory.finalized == 1


def _same_state(state, batch):
    return state, {"value": batch.sum()}


def _advancing(state, batch):
    return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {"value": batch.sum()}


@pytest.mark.parametrize("fn", [_same_state, _advancing], ids=["returns-its-input", "evolves-it"])
def test_a_plain_function_steps_given_state_keeps_its_extras(fn, take_snapshot, assert_trees_equal):
    """A function of one's own may return the state it was given (or one sharing its extras): the metrics window goes
    into the new state's own extras, never into the caller's. Reference: the given state's snapshot before the call."""
    step = with_logging(fn, MemoryLogger(), every_n_steps=5)
    given = loopkit.TrainState.create(torch.nn.Linear(1, 1))
    before = take_snapshot(given)
    new, _ = step(given, torch.tensor([2.0]))
    assert_trees_equal(take_snapshot(given), before)
    assert "logging/pending" not in given.extras
    again, _ = step(new, torch.tensor([3.0]))
    assert len(new.extras["logging/pending"]) == 1 and len(again.extras["logging/pending"]) == 2


def test_long_windows_keep_a_bounded_number_of_tensors_and_exact_means():
    """A long window: the state holds at most 32 records and one 0-dim sum per metric, whatever its length."""

    def count_step(state, batch):
        return state.evolve(step=state.step + 1), {"value": torch.tensor(float(batch))}

    memory = MemoryLogger()
    step = with_logging(count_step, memory, every_n_steps=300)
    state = loopkit.TrainState.create(torch.nn.Linear(1, 1))
    for i in range(1, 601):
        state, _ = step(state, i)
        kept = state.extras.get("logging/window", {}).get("value")
        assert kept is None or (kept.ndim == 0 and kept.dtype == torch.float32)
        assert len(state.extras.get("logging/pending", ())) < 32
    assert memory.series("train/value") == [(300, 150.5), (600, 450.5)]  # integer sums, exact in float32


def test_a_window_split_by_a_state_dict_round_trip_logs_the_uninterrupted_mean(round_trip):
    """40 calls (one fold of 32, then 8 kept records) saved and restored mid-window: the window's mean is exact."""

    def count_step(state, batch):
        return state.evolve(step=state.step + 1), {"value": torch.tensor(float(batch))}

    uninterrupted, resumed = MemoryLogger(), MemoryLogger()
    step_a, step_b = with_logging(count_step, uninterrupted, every_n_steps=50), with_logging(count_step, resumed, every_n_steps=50)
    a = loopkit.TrainState.create(torch.nn.Linear(1, 1))
    for i in range(1, 41):
        a, _ = step_a(a, i)
    assert "logging/window" in a.extras and len(a.extras["logging/pending"]) == 8
    b = loopkit.TrainState.create(torch.nn.Linear(1, 1)).load_state_dict(round_trip(a.state_dict()))
    for i in range(41, 51):
        a, _ = step_a(a, i)
        b, _ = step_b(b, i)
    assert uninterrupted.series("train/value") == resumed.series("train/value") == [(50, 25.5)]


def test_loggers_share_one_run_folder_even_when_a_later_ones_log_dir_was_read_first(tmp_path, make_mlp, make_batches, make_sgd_state):
    tb, csv_logger = loopkit.TensorBoardLogger(tmp_path, "demo"), loopkit.CSVLogger(tmp_path, "demo")
    claimed = csv_logger.log_dir  # e.g. printed by the user before training
    step = loopkit.with_logging(loopkit.train_step(loss_with_mae), tb, csv_logger, every_n_steps=2)
    run_epochs(step, make_sgd_state(make_mlp(0)), make_batches(4), epochs=1, progress=False)
    assert tb.log_dir == csv_logger.log_dir == claimed
    assert os.listdir(tmp_path / "demo") == ["version_0"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(claimed))


def test_two_loggers_of_one_class_in_one_run_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="loggers 1 and 2 are both CSVLoggers of one run folder"):
        loopkit.with_logging(loopkit.train_step(loss_with_mae), loopkit.TensorBoardLogger(tmp_path), loopkit.CSVLogger(tmp_path),
                             loopkit.CSVLogger(tmp_path))
    with pytest.raises(ValueError, match="loggers 0 and 1 are both JSONLLoggers"):
        loopkit.with_logging(loopkit.train_step(loss_with_mae), loopkit.JSONLLogger(tmp_path, version=3),
                             loopkit.JSONLLogger(tmp_path, version=3))
    # other names or versions are other folders
    loopkit.with_logging(loopkit.train_step(loss_with_mae), loopkit.CSVLogger(tmp_path, "a"), loopkit.CSVLogger(tmp_path, "b"),
                         loopkit.CSVLogger(tmp_path, "a", version=1))


def test_a_numpy_number_a_callback_adds_to_the_epoch_record_is_logged(tmp_path, make_mlp, make_batches, make_sgd_state):
    import numpy as np

    class Extra:
        def on_epoch_end(self, state, metrics):
            return {"custom": np.float32(0.5)}

    logger = loopkit.JSONLLogger(tmp_path)
    step = loopkit.with_logging(loopkit.train_step(loss_with_mae), logger, every_n_steps=2)
    _, history = run_epochs(step, make_sgd_state(make_mlp(0)), make_batches(4), epochs=1, callbacks=[Extra()],
                            progress=False)
    with open(os.path.join(logger.log_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records[-1]["custom"] == 0.5 == history[0]["custom"]


def test_a_val_metric_a_callback_adds_at_the_epochs_end_is_logged_and_the_validations_once(
    tmp_path, make_mlp, make_batches, make_sgd_state
):
    """A whole-set metric an on_epoch_end computes (``val/auroc``, as self.log in Lightning's on_train_epoch_end) is
    logged with the epoch's row, as the history holds it; the validation's own means are logged once, at its end
    (here mid-epoch, at update 2: not again at the epoch's end, update 3)."""

    class WholeSet:
        def on_epoch_end(self, state, metrics):
            return {"val/auroc": 0.75 + metrics["epoch"]}

    logger = loopkit.JSONLLogger(tmp_path)
    step = loopkit.with_logging(loopkit.train_step(loss_with_mae), logger, every_n_steps=100)
    evaluator = loopkit.eval_step(lambda m, b: {"loss": loss_with_mae(m, b)[0]})
    _, history = run_epochs(step, make_sgd_state(make_mlp(0)), make_batches(3), epochs=2, callbacks=[WholeSet()],
                            val=(evaluator, make_batches(2)), val_every_n_steps=2, val_every_n_epochs=None,
                            sanity_val_batches=0, progress=False)
    with open(os.path.join(logger.log_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    auroc = [(r["step"], r["val/auroc"]) for r in records if "val/auroc" in r]
    assert auroc == [(h["step"], h["val/auroc"]) for h in history] == [(3, 0.75), (6, 1.75)]
    assert [r["step"] for r in records if "val/loss" in r] == [2, 4, 6]  # each validation's, once


def test_two_runs_land_in_version_0_and_version_1(tmp_path, make_mlp, make_batches, make_sgd_state):
    snapshots = []
    for run in range(2):
        tb, csv_logger = TensorBoardLogger(tmp_path, "exp"), CSVLogger(tmp_path, "exp")
        step = with_logging(train_step(loss_with_mae), tb, csv_logger, every_n_steps=2)
        run_epochs(step, make_sgd_state(make_mlp(seed=run)), make_batches(4), epochs=1, progress=False)
        assert tb.log_dir == csv_logger.log_dir == str(tmp_path / "exp" / f"version_{run}")
        files = sorted(os.listdir(tb.log_dir))
        assert "metrics.csv" in files and any(f.startswith("events.out.tfevents") for f in files)
        snapshots.append({f: open(os.path.join(tb.log_dir, f), "rb").read() for f in files})
    assert sorted(os.listdir(tmp_path / "exp")) == ["version_0", "version_1"]
    version_0 = tmp_path / "exp" / "version_0"
    assert {f: open(version_0 / f, "rb").read() for f in os.listdir(version_0)} == snapshots[0]
    assert csv_series(version_0, "train/loss") != csv_series(tmp_path / "exp" / "version_1", "train/loss")


def _run_with_sanity_validation(root, val_every_n_epochs, make_mlp, make_batches, make_sgd_state, mlflow_dir):
    validations = []

    def counted_mse(model, batch):
        validations.append(1)
        return mse_metric(model, batch)

    os.makedirs(root)
    console = os.path.join(root, "console.txt")
    trackers = (WandbLogger(save_dir=os.path.join(root, "wandb"), offline=True),
                MLFlowLogger(save_dir=mlflow_dir(os.path.join(root, "mlflow"))))
    with open(console, "w") as stream:
        loggers = (TensorBoardLogger(root), CSVLogger(root), JSONLLogger(root), ConsoleLogger(stream=stream))
        step = with_logging(train_step(loss_with_mae), *loggers, *trackers, every_n_steps=1)
        run_epochs(
            step, make_sgd_state(make_mlp()), make_batches(3), epochs=1, sanity_val_batches=2,
            val=(eval_step(counted_mse), make_batches(2, seed=5)), val_every_n_epochs=val_every_n_epochs,
            progress=False,
        )
    return len(validations), loggers[0].log_dir, console, _tracked_names(*trackers)


def _tracked_names(wandb_logger, mlflow_logger):
    """The metric names each tracker's run holds, read back (wandb's offline transaction log, MLflow's store)."""
    from tests.test_trackers import wandb_runs

    wandb_logger.experiment.finish()  # (a successful fit's run stays open, as Lightning's)
    (run,) = wandb_runs(wandb_logger.save_dir)
    in_wandb = set().union(*run["rows"]) - {"_step", "trainer/global_step"}
    in_mlflow = set(mlflow_logger.experiment.get_run(mlflow_logger.run_id).data.metrics)
    return in_wandb, in_mlflow


def test_sanity_validation_leaves_no_trace_in_any_logger(tmp_path, make_mlp, make_batches, make_sgd_state, mlflow_dir):
    # one epoch, validation every 2nd epoch: the only validation that runs is the sanity check
    ran, log_dir, console, tracked = _run_with_sanity_validation(tmp_path / "a", 2, make_mlp, make_batches, make_sgd_state, mlflow_dir)
    assert ran == 2  # the sanity check did run its two batches
    files = [os.path.join(log_dir, f) for f in os.listdir(log_dir)] + [console]
    assert len(files) == 4  # event file, metrics.csv, metrics.jsonl, console output
    for path in files:
        content = open(path, "rb").read()
        assert b"train/loss" in content, path  # each logger did write
        assert b"val" not in content, path
    assert "val/mse" not in EventAccumulator(log_dir).Reload().Tags()["scalars"]
    for names in tracked:  # wandb's run, MLflow's run
        assert "train/loss" in names and not any(name.startswith("val") for name in names), names
    # the control: a real validation is found by the same checks
    ran, log_dir, console, tracked = _run_with_sanity_validation(tmp_path / "b", 1, make_mlp, make_batches, make_sgd_state, mlflow_dir)
    assert ran == 4
    for path in [os.path.join(log_dir, f) for f in os.listdir(log_dir)] + [console]:
        assert b"val/mse" in open(path, "rb").read(), path
    for names in tracked:
        assert "val/mse" in names, names


def test_hparams_are_written_with_the_final_metrics(tmp_path, make_mlp, make_batches, make_sgd_state):
    from tensorboard.plugins.hparams import plugin_data_pb2

    tb, csv_logger = TensorBoardLogger(tmp_path), CSVLogger(tmp_path)
    for logger in (tb, csv_logger):
        logger.log_hparams({"lr": 0.05, "hidden": 8})
    step = with_logging(train_step(loss_with_mae), tb, csv_logger, every_n_steps=2)
    run_epochs(step, make_sgd_state(make_mlp(), lr=0.05), make_batches(4), epochs=1,
               val=(eval_step(mse_metric), make_batches(2)), progress=False)
    assert tb.log_dir == csv_logger.log_dir
    assert json.load(open(os.path.join(csv_logger.log_dir, "hparams.json"))) == {"lr": 0.05, "hidden": 8}
    acc = EventAccumulator(tb.log_dir)
    acc.Reload()
    content = {t: plugin_data_pb2.HParamsPluginData.FromString(c) for t, c in acc.PluginTagToContent("hparams").items()}
    start = content["_hparams_/session_start_info"].session_start_info.hparams
    assert (start["lr"].number_value, start["hidden"].number_value) == (0.05, 8)
    tags = {m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos}
    assert {"val/mse", "train/loss", "train/loss_epoch"} <= tags and "epoch" not in tags  # (a counter: no result)


def test_histograms_hold_the_gradients_the_optimizer_used(tmp_path, make_mlp, make_batches):
    """Compared with a raw PyTorch loop: clip, record the gradient, step."""
    batches = make_batches(4)
    reference_model = make_mlp()
    opt = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    expected = {}
    for i, (x, y) in enumerate(batches, start=1):
        opt.zero_grad()
        ((reference_model(x) - y) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(reference_model.parameters(), 0.5)
        if i % 2 == 0:
            expected[i] = (reference_model[0].weight.detach().clone(), reference_model[0].weight.grad.clone())
        opt.step()
    model = make_mlp()
    tb = TensorBoardLogger(tmp_path, histogram_every_n_steps=2)
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    step = with_logging(with_grad_clip(train_step(loss), max_norm=0.5), tb, every_n_steps=4)
    run_epochs(step, loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1)), batches,
               epochs=1, progress=False)
    acc = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    assert {"params/0.weight", "grads/0.weight", "params/2.bias", "grads/2.bias"} <= set(acc.Tags()["histograms"])
    for tag, index in (("params/0.weight", 0), ("grads/0.weight", 1)):
        events = acc.Histograms(tag)
        assert [e.step for e in events] == [2, 4]
        for event in events:
            h, t = event.histogram_value, expected[event.step][index].double()
            assert (h.num, h.min, h.max) == (t.numel(), pytest.approx(t.min().item()), pytest.approx(t.max().item()))
            assert h.sum == pytest.approx(t.sum().item(), rel=1e-5, abs=1e-7)
            assert h.sum_squares == pytest.approx(t.pow(2).sum().item(), rel=1e-5)


def test_a_partial_window_survives_a_state_dict_round_trip(make_mlp, make_batches, make_sgd_state):
    batches = make_batches(8)
    straight, resumed = MemoryLogger(), MemoryLogger()
    state = make_sgd_state(make_mlp())
    step = with_logging(train_step(loss_with_mae), straight, every_n_steps=4)
    for batch in batches:
        state, _ = step(state, batch)
    step = with_logging(train_step(loss_with_mae), resumed, every_n_steps=4)
    state = make_sgd_state(make_mlp())
    for batch in batches[:5]:
        state, _ = step(state, batch)
    state = make_sgd_state(make_mlp(seed=9)).load_state_dict(state.state_dict())  # mid-window
    for batch in batches[5:]:
        state, _ = step(state, batch)
    assert resumed.logged == straight.logged and [s for s, _ in straight.logged] == [4, 8]


class _CrashAfter:
    """Crashes in the batch after update ``step`` (that update's checkpoint is then the newest)."""

    def __init__(self, step):
        self.step = step

    def on_batch_end(self, state, metrics):
        if state.step == self.step + 1:
            raise RuntimeError("crash")


@pytest.mark.parametrize("order", ["checkpointing outside", "checkpointing inside"])
def test_a_run_resumed_from_a_step_checkpoint_logs_what_the_uninterrupted_run_logs(order, tmp_path, make_mlp, make_batches,
                                                                                  make_sgd_state):
    """Under run_epochs a step checkpoint is written after the whole call, so it holds the logging
    window with that call's record in either order: every window of the resumed run is exact."""

    def pipeline(logger, directory):
        if order == "checkpointing outside":
            return loopkit.with_checkpointing(with_logging(train_step(loss_with_mae), logger, every_n_steps=4), directory, every_n_steps=3)
        return with_logging(loopkit.with_checkpointing(train_step(loss_with_mae), directory, every_n_steps=3), logger, every_n_steps=4)

    batches = make_batches(6)
    straight, first, resumed = MemoryLogger(), MemoryLogger(), MemoryLogger()
    loopkit.run_epochs(pipeline(straight, tmp_path / "a"), make_sgd_state(make_mlp()), batches, epochs=2, progress=False)
    with pytest.raises(RuntimeError, match="crash"):
        loopkit.run_epochs(pipeline(first, tmp_path / "b"), make_sgd_state(make_mlp()), batches, epochs=2,
                           callbacks=[_CrashAfter(9)], progress=False)
    state = loopkit.restore(make_sgd_state(make_mlp()), tmp_path / "b")
    assert state.step == 9  # mid-window (windows end at 4, 8, 12) and mid-epoch
    loopkit.run_epochs(pipeline(resumed, tmp_path / "b"), state, batches, epochs=2, progress=False)
    assert first.logged + resumed.logged == straight.logged


def _logged_files(folder):
    """What a run folder's three file loggers hold: the CSV and JSONL text, and each TensorBoard scalar series."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    with open(os.path.join(folder, "metrics.csv")) as f, open(os.path.join(folder, "metrics.jsonl")) as g:
        return f.read(), g.read(), scalars


@pytest.mark.parametrize(
    "saved_every, crash_after, saved_at",
    [
        (5, 8, 5),  # mid-epoch: the crashed run logged steps 6 and 8, and epoch 0's record and validation (step 6)
        (6, 7, 6),  # at epoch 0's last batch, saved before its record: the resumed run validates and records it again
        (4, 9, 8),  # mid-epoch 1: epoch 0's record (step 6) stays (it was dropped); the crashed run logged step 10
    ],
)
def test_a_run_resumed_into_its_pinned_version_folder_logs_what_the_uninterrupted_run_logs(
    saved_every, crash_after, saved_at, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """Reference: the uninterrupted run's files. The crashed run logged past its newest checkpoint;
    resumed into the same version folders, those records are dropped (and the ones it logs again at the
    checkpoint's step replace the old), so each file reads as the uninterrupted run's."""

    def fit(root, directory, state, callbacks=()):
        loggers = [TensorBoardLogger(root, "run", version=0), CSVLogger(root, "run", version=0),
                   JSONLLogger(root, "run", version=0)]
        step = loopkit.with_checkpointing(with_logging(train_step(loss_with_mae), *loggers, every_n_steps=2),
                                          directory, every_n_steps=saved_every)
        evaluator = eval_step(lambda m, b: {"mse": torch.nn.functional.mse_loss(m(b[0]), b[1])})
        run_epochs(step, state, batches, epochs=2, val=(evaluator, batches[:2]), callbacks=list(callbacks),
                   progress=False)

    batches = make_batches(6)
    fit(tmp_path / "a", tmp_path / "ca", make_sgd_state(make_mlp()))
    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path / "b", tmp_path / "cb", make_sgd_state(make_mlp()), [_CrashAfter(crash_after)])
    crashed = _logged_files(tmp_path / "b" / "run" / "version_0")
    assert max(step for step, _ in crashed[2]["train/loss"]) > saved_at  # there is something to drop
    state = loopkit.restore(make_sgd_state(make_mlp()), tmp_path / "cb")
    assert state.step == saved_at
    fit(tmp_path / "b", tmp_path / "cb", state)
    assert _logged_files(tmp_path / "b" / "run" / "version_0") == _logged_files(tmp_path / "a" / "run" / "version_0")


@pytest.mark.parametrize("version", [0, None])
def test_a_retry_with_the_same_loggers_from_a_checkpoint_saved_before_its_steps_records_logs_them_once(
    version, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """A try/except retry in one process, the same step (and loggers): the newest checkpoint (update 6) was saved
    before update 6's validation and epoch 0's record, which the crashed fit had logged and the retry logs again.
    They were written twice (the logger took a fit from its own last step for one going on). Reference: the
    uninterrupted run's files. With ``version=None`` too: the checkpoint's state records the folder its rows went to
    (the crashed fit's), so the retry goes on there, unwarned, and claims no new version."""
    batches = make_batches(6)
    evaluator = eval_step(lambda m, b: {"mse": torch.nn.functional.mse_loss(m(b[0]), b[1])})

    def pipeline(root, directory):
        loggers = [TensorBoardLogger(root, "run", version=version), CSVLogger(root, "run", version=version),
                   JSONLLogger(root, "run", version=version)]
        return loopkit.with_checkpointing(with_logging(train_step(loss_with_mae), *loggers, every_n_steps=2),
                                          directory, every_n_steps=1)

    def fit(step, state, callbacks=()):
        run_epochs(step, state, batches, epochs=2, val=(evaluator, batches[:2]), val_every_n_steps=3,
                   callbacks=list(callbacks), progress=False)

    fit(pipeline(tmp_path / "a", tmp_path / "ca"), make_sgd_state(make_mlp()))
    step = pipeline(tmp_path / "b", tmp_path / "cb")
    with pytest.raises(RuntimeError, match="crash"):
        fit(step, make_sgd_state(make_mlp()), [_CrashAfter(6)])
    state = loopkit.restore(make_sgd_state(make_mlp()), tmp_path / "cb")
    assert state.step == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(step, state)
    assert os.listdir(tmp_path / "b" / "run") == ["version_0"]
    assert _logged_files(tmp_path / "b" / "run" / "version_0") == _logged_files(tmp_path / "a" / "run" / "version_0")


class _Positioned(MemoryLogger):
    """A logger of one's own that rewinds: ``told`` is what its ``resume_at`` was told last, ``tells`` all of it."""

    def __init__(self):
        super().__init__()
        self.told, self.tells = None, []

    def resume_at(self, step, epoch=None, batch_index=None, *, finishes_epoch=False):
        self.told = (step, epoch, batch_index, finishes_epoch)
        self.tells.append(self.told)


@pytest.mark.filterwarnings("ignore:run_epochs. an epoch has 6 training batches, fewer than the logging interval")
@pytest.mark.parametrize("every_n_steps", [2, 100])
@pytest.mark.parametrize("same_process", [False, True])
def test_a_run_cut_by_max_steps_and_resumed_into_its_folder_logs_what_the_uninterrupted_run_logs(
    same_process, every_n_steps, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """Reference: the uninterrupted run's files. A fit cut by max_steps mid-epoch records that epoch (its means so
    far) at the cut step and saves there; the resumed fit records the epoch whole at its end: the cut record went
    (it stayed, a second epoch-0 point), and the CSV's columns come in the uninterrupted run's order. A logger of
    one's own is told that the fit goes on in that epoch: resume_at(4, 0, 4, finishes_epoch=True). With no train/
    row (every_n_steps=100), the resumed fit's first row is its epoch's validation: they are told there."""
    batches = make_batches(6)
    evaluator = eval_step(lambda m, b: {"mse": torch.nn.functional.mse_loss(m(b[0]), b[1])})
    loggers = {}

    def fit(root, directory, state, **budget):
        if root not in loggers or not same_process:
            loggers[root] = [TensorBoardLogger(root, "run", version=0), CSVLogger(root, "run", version=0),
                             JSONLLogger(root, "run", version=0), _Positioned()]
        logged = with_logging(train_step(loss_with_mae), *loggers[root], every_n_steps=every_n_steps)
        step = loopkit.with_checkpointing(logged, directory, every_n_steps=2)
        return run_epochs(step, state, batches, val=(evaluator, batches[:2]), progress=False, **budget)[0]

    fit(tmp_path / "a", tmp_path / "ca", make_sgd_state(make_mlp()), epochs=2)
    cut = fit(tmp_path / "b", tmp_path / "cb", make_sgd_state(make_mlp()), epochs=2, max_steps=4)
    state = cut if same_process else loopkit.restore(make_sgd_state(make_mlp()), tmp_path / "cb")
    assert (state.step, state.batch_index) == (4, 4)
    fit(tmp_path / "b", tmp_path / "cb", state, epochs=2)
    assert _logged_files(tmp_path / "b" / "run" / "version_0") == _logged_files(tmp_path / "a" / "run" / "version_0")
    assert loggers[tmp_path / "b"][-1].told == (4, 0, 4, True)


@pytest.mark.parametrize("same_process", [False, True])
@pytest.mark.parametrize("ended_by", ["max_steps", "early_stopping"])
def test_a_relaunch_from_the_end_of_a_fit_ended_mid_epoch_leaves_its_files_as_they_were(
    ended_by, same_process, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """Reference: the files as the fit left them. A fit ended mid-epoch (max_steps, or EarlyStopping at a step
    validation) records that epoch at its last update and saves there; a relaunch from that checkpoint (the script
    run again, hyper-parameters logged first) trains no further, and its writes dropped the epoch's record (the CSV
    row and its columns, TensorBoard's epoch and train/*_epoch points) as if it went on to record the epoch whole.
    A logger of one's own is told so: resume_at(4, 0, 4, finishes_epoch=False)."""
    batches = make_batches(6)
    evaluator = eval_step(lambda m, b: {"mse": torch.nn.functional.mse_loss(m(b[0]), b[1])})
    root, directory = tmp_path / "logs", tmp_path / "ckpt"
    made = {}

    def fit(state):
        if not made or not same_process:
            made["loggers"] = [TensorBoardLogger(root, "run", version=0), CSVLogger(root, "run", version=0),
                               JSONLLogger(root, "run", version=0), _Positioned()]
        for logger in made["loggers"]:
            logger.log_hparams({"lr": 0.1})
        step = loopkit.with_checkpointing(with_logging(train_step(loss_with_mae), *made["loggers"], every_n_steps=1),
                                          directory, every_n_steps=2)
        if ended_by == "max_steps":
            budget = {"max_steps": 4}
        else:  # (the validation at update 4 is no better by 100 than update 2's: a stop there, 2 batches early)
            stopping = loopkit.EarlyStopping("val/mse", patience=1, min_delta=100.0)
            budget = {"val_every_n_steps": 2, "callbacks": [stopping]}
        return run_epochs(step, state, batches, epochs=2, val=(evaluator, batches[:2]), sanity_val_batches=0,
                          progress=False, **budget)[0]

    ended = fit(make_sgd_state(make_mlp()))
    assert (ended.step, ended.epoch, ended.batch_index) == (4, 0, 4)
    folder = root / "run" / "version_0"
    left = _logged_files(folder)
    assert {"epoch", "train/loss_epoch"} <= set(left[0].splitlines()[0].split(","))
    assert [step for step, _ in left[2]["train/loss_epoch"]] == [4]  # (the epoch's record, at the last update)
    state = ended if same_process else loopkit.restore(make_sgd_state(make_mlp()), directory)
    with warnings.catch_warnings():  # (the restored EarlyStopping asks to stop at once: said, as it should be)
        warnings.filterwarnings("ignore", "run_epochs: EarlyStopping restored", UserWarning)
        fit(state)
    assert _logged_files(folder) == left
    assert made["loggers"][-1].told == (4, 0, 4, False)


def _records(files):
    """What ``_logged_files`` read, as sets of records (each a row's or line's metrics): the records, whatever order
    they were logged in at a step (a cut's epoch record, then the validation a relaunch owed there)."""
    text, lines, scalars = files
    rows = {frozenset((k, v) for k, v in row.items() if v != "") for row in csv.DictReader(text.splitlines())}
    return rows, {frozenset(json.loads(line).items()) for line in lines.splitlines()}, scalars


@pytest.mark.parametrize("same_process", [False, True])
@pytest.mark.parametrize("goes_on", [True, False])
def test_a_relaunch_from_a_cut_that_first_validates_there_logs_what_the_uninterrupted_run_logs(
    goes_on, same_process, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """Reference: the uninterrupted run's files (of step validations, every 3 updates). A fit cut by max_steps at
    update 3 mid-epoch records epoch 0 there, without a validation; relaunched with val_every_n_steps=3, the fit
    first runs the validation owed at update 3, logging its row there, then goes on to record the epoch whole at
    update 6. The cut's epoch-0 record stayed beside the whole epoch's (the validation's row, where the fit began,
    was taken for a fit that trains no further). A relaunch that trains no further (max_steps=3 again) keeps it:
    its files hold the uninterrupted run's records of max_steps=3 (the validation's after the epoch's). A logger of
    one's own is told resume_at(3, 0, 3, finishes_epoch=False) at the validation's row, and finishes_epoch=True
    once the fit goes on."""
    batches = make_batches(6)
    evaluator = eval_step(lambda m, b: {"mse": torch.nn.functional.mse_loss(m(b[0]), b[1])})
    loggers = {}
    budget = {} if goes_on else {"max_steps": 3}

    def fit(root, state, **options):
        if root not in loggers or not same_process:
            loggers[root] = [TensorBoardLogger(root, "run", version=0), CSVLogger(root, "run", version=0),
                             JSONLLogger(root, "run", version=0), _Positioned()]
        step = with_logging(train_step(loss_with_mae), *loggers[root], every_n_steps=1)
        return run_epochs(step, state, batches, epochs=1, val=(evaluator, batches[:2]), sanity_val_batches=0,
                          progress=False, **options)[0]

    fit(tmp_path / "a", make_sgd_state(make_mlp()), val_every_n_steps=3, **budget)
    cut = fit(tmp_path / "b", make_sgd_state(make_mlp()), max_steps=3)
    assert (cut.step, cut.epoch, cut.batch_index) == (3, 0, 3)
    loggers[tmp_path / "b"][-1].tells.clear()  # (the cut's fit's, in one process)
    fit(tmp_path / "b", cut, val_every_n_steps=3, **budget)
    logged, expected = (_logged_files(tmp_path / root / "run" / "version_0") for root in ("b", "a"))
    if goes_on:
        assert logged == expected
    else:
        assert _records(logged) == _records(expected)
    assert loggers[tmp_path / "b"][-1].tells == [(3, 0, 3, False)] + [(3, 0, 3, True)] * goes_on


def _logged_fit(made, resumed_by, root, directory, state, batches, callbacks, **options):
    """run_epochs of a step logged to TensorBoard, CSV and JSONL in ``root/run/version_0`` (a row every 6 updates),
    checkpointed every 2 updates in ``directory``: the loggers are made once per root, or anew for each fit when
    the run is ``resumed_by`` restore (a new process's)."""
    if root not in made or resumed_by == "restore":
        made[root] = [TensorBoardLogger(root, "run", version=0), CSVLogger(root, "run", version=0),
                      JSONLLogger(root, "run", version=0)]
    step = loopkit.with_checkpointing(with_logging(train_step(loss_with_mae), *made[root], every_n_steps=6),
                                      directory, every_n_steps=2)
    return run_epochs(step, state, batches, callbacks=list(callbacks), progress=False, **options)[0]


@pytest.mark.parametrize("resumed_by", ["state_at_error", "restore"])
def test_a_fit_that_went_on_from_a_cut_and_failed_before_a_row_leaves_no_cut_record_to_its_resume(
    resumed_by, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """Reference: the uninterrupted run's files. A fit cut by max_steps at update 2 records epoch 0 there; the fit
    going on from it fails at update 5, before its first row (every 6 updates), its newest checkpoint update 4's.
    Resumed from either (past the cut, in that epoch), the folder kept the cut's epoch-0 record at step 2 beside
    the whole epoch's: the resumed fit was placed after it, and nothing dropped it."""
    batches = make_batches(6)
    made = {}

    def fit(root, directory, state, callbacks=(), **budget):
        return _logged_fit(made, resumed_by, root, directory, state, batches, callbacks, epochs=2, **budget)

    fit(tmp_path / "a", tmp_path / "ca", make_sgd_state(make_mlp()))
    cut = fit(tmp_path / "b", tmp_path / "cb", make_sgd_state(make_mlp()), max_steps=2)
    with pytest.raises(RuntimeError, match="crash") as error:
        fit(tmp_path / "b", tmp_path / "cb", cut, [_CrashAfter(4)])
    if resumed_by == "state_at_error":
        state = loopkit.state_at_error(error.value)
    else:
        state = loopkit.restore(make_sgd_state(make_mlp()), tmp_path / "cb")
    assert (state.step, state.epoch) == ((5, 0) if resumed_by == "state_at_error" else (4, 0))
    fit(tmp_path / "b", tmp_path / "cb", state)
    assert _logged_files(tmp_path / "b" / "run" / "version_0") == _logged_files(tmp_path / "a" / "run" / "version_0")


@pytest.mark.parametrize("resumed_by", ["state_at_error", "restore"])
def test_a_fit_that_validated_at_a_cut_went_on_and_failed_before_a_row_leaves_no_cut_record_to_its_resume(
    resumed_by, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """Reference: the uninterrupted run's files (of step validations, every 2 updates). A fit cut by max_steps at
    update 2 records epoch 0 there, without a validation; the fit going on from it (val_every_n_steps=2) first runs
    the validation owed there, then fails at update 3, before a row. Resumed with the same loggers from the state
    the failure left (update 3), the folder kept the cut's epoch-0 record beside the whole epoch's (the loggers' last
    record was that validation's, before the resumed fit); from the cut's checkpoint, it is a relaunch again."""
    batches = make_batches(6)
    evaluator = eval_step(lambda m, b: {"mse": torch.nn.functional.mse_loss(m(b[0]), b[1])})
    made = {}

    def fit(root, directory, state, callbacks=(), **budget):
        return _logged_fit(made, resumed_by, root, directory, state, batches, callbacks, epochs=1,
                           val=(evaluator, batches[:2]), sanity_val_batches=0, **budget)

    fit(tmp_path / "a", tmp_path / "ca", make_sgd_state(make_mlp()), val_every_n_steps=2)
    cut = fit(tmp_path / "b", tmp_path / "cb", make_sgd_state(make_mlp()), max_steps=2)
    with pytest.raises(RuntimeError, match="crash") as error:
        fit(tmp_path / "b", tmp_path / "cb", cut, [_CrashAfter(2)], val_every_n_steps=2)
    if resumed_by == "state_at_error":
        state = loopkit.state_at_error(error.value)
    else:
        state = loopkit.restore(make_sgd_state(make_mlp()), tmp_path / "cb")
    assert (state.step, state.epoch) == ((3, 0) if resumed_by == "state_at_error" else (2, 0))
    fit(tmp_path / "b", tmp_path / "cb", state, val_every_n_steps=2)
    assert _logged_files(tmp_path / "b" / "run" / "version_0") == _logged_files(tmp_path / "a" / "run" / "version_0")


class _Skipping:
    """A loss_fn that skips the batches of the epochs in ``skipped`` (returns None: no update, as the step documents
    for a skipped batch); the others get :func:`loss_with_mae`. Also a callback: the epoch, from ``on_epoch_start``."""

    def __init__(self, skipped):
        self.skipped, self.epoch = skipped, None

    def on_epoch_start(self, state):
        self.epoch = state.epoch

    def __call__(self, model, batch):
        return None if self.epoch in self.skipped else loss_with_mae(model, batch)


class _CrashAtEpochEnd:
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, state, metrics):
        if metrics["epoch"] == self.epoch:
            raise RuntimeError("crash")


@pytest.mark.parametrize(
    "skipped, crash, restored_at",
    [
        # epoch 0 makes no update: its record is at step 0; the resumed fit starts at (step 0, epoch 1), no fresh run
        ((0,), _CrashAfter(0), (0, 1)),
        # epochs 1 and 2 make no update: epochs 0, 1 and 2 record at step 2; resumed at (step 2, epoch 2), epoch 1's
        # record and validation there stay (they were dropped as epoch 2's, of the same metrics, were logged again)
        ((1, 2), _CrashAtEpochEnd(2), (2, 2)),
    ],
)
def test_a_run_resumed_at_a_step_its_epochs_share_logs_what_the_uninterrupted_run_logs(
    skipped, crash, restored_at, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """Reference: the uninterrupted run's files. Epochs that make no update record at the step of the epoch before:
    the loggers tell the resumed position by (step, epoch), keeping the records of the epochs before it at that step,
    and a resume at step 0 past epoch 0 is no fresh run (no warning, nothing of epoch 0 dropped)."""
    batches = make_batches(2)
    evaluator = eval_step(mse_metric)

    def fit(root, directory, state, callbacks=()):
        loggers = [TensorBoardLogger(root, "run", version=0), CSVLogger(root, "run", version=0),
                   JSONLLogger(root, "run", version=0)]
        loss = _Skipping(skipped)
        step = loopkit.with_checkpointing(with_logging(train_step(loss), *loggers, every_n_steps=1),
                                          directory, every_n_epochs=1, keep_last=3)
        run_epochs(step, state, batches, epochs=4, val=(evaluator, batches[:1]), callbacks=[loss, *callbacks],
                   progress=False)

    fit(tmp_path / "a", tmp_path / "ca", make_sgd_state(make_mlp()))
    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path / "b", tmp_path / "cb", make_sgd_state(make_mlp()), [crash])
    state = loopkit.restore(make_sgd_state(make_mlp()), tmp_path / "cb")
    assert (state.step, state.epoch, state.batch_index) == (*restored_at, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "earlier run" replaced)
        fit(tmp_path / "b", tmp_path / "cb", state)
    straight = _logged_files(tmp_path / "a" / "run" / "version_0")
    assert _logged_files(tmp_path / "b" / "run" / "version_0") == straight
    records = [json.loads(line) for line in straight[1].splitlines()]
    epochs_at = [r["epoch"] for r in records if not {"train/loss", "val/mse"} & set(r)]  # (rows hold epoch too)
    assert epochs_at == [0, 1, 2, 3]  # (each epoch's record is there once)


class _CrashOnce:
    """Crashes once, at the end of epoch 0's validation (``"validation"``) or of epoch 0 (``"epoch"``)."""

    def __init__(self, hook):
        self.hook, self.done = hook, False

    def _crash(self, hook):
        if hook == self.hook and not self.done:
            self.done = True
            raise RuntimeError("crash")

    def on_validation_end(self, state, metrics):
        self._crash("validation")

    def on_epoch_end(self, state, metrics):
        self._crash("epoch")


@pytest.mark.parametrize("resumed_by", ["state_at_error", "restore"])
@pytest.mark.parametrize(
    "crash, val_every_n_steps",
    [
        ("validation", None),  # epoch 0's validation: the retry logs it, and epoch 1's dropped it (the retry's own)
        ("epoch", 2),  # epoch 0's, due at step 4 before its end: the crashed fit's, that the retry does not log again
    ],
)
def test_a_fit_retried_with_the_same_loggers_at_a_step_its_epochs_share_keeps_what_it_logs_there(
    crash, val_every_n_steps, resumed_by, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """Reference: the uninterrupted run's files. Epoch 1 makes no update: epochs 0 and 1 both validate and record at
    step 4. The fit crashes at the end of epoch 0's validation (or of epoch 0) and is retried in the same process,
    with the same loggers, from ``state_at_error`` or a ``restore`` of its checkpoint at step 4. The loggers took
    epoch 1's validation at step 4 (the same metrics as epoch 0's) for epoch 0's logged again and dropped epoch 0's
    validation there."""
    batches = make_batches(4)
    evaluator = eval_step(mse_metric)

    def pipeline(root, directory):
        loggers = [TensorBoardLogger(root, "run", version=0), CSVLogger(root, "run", version=0),
                   JSONLLogger(root, "run", version=0)]
        loss = _Skipping({1})
        step = loopkit.with_checkpointing(with_logging(train_step(loss), *loggers, every_n_steps=1), directory,
                                          every_n_steps=1)
        return step, loss

    def fit(pipe, state, callbacks=()):
        step, loss = pipe
        run_epochs(step, state, batches, epochs=2, val=(evaluator, batches[:1]), callbacks=[loss, *callbacks],
                   progress=False, sanity_val_batches=0, val_every_n_steps=val_every_n_steps)

    fit(pipeline(tmp_path / "a", tmp_path / "ca"), make_sgd_state(make_mlp()))
    pipe = pipeline(tmp_path / "b", tmp_path / "cb")
    with pytest.raises(RuntimeError, match="crash") as error:
        fit(pipe, make_sgd_state(make_mlp()), [_CrashOnce(crash)])
    if resumed_by == "state_at_error":
        state = loopkit.state_at_error(error.value)
    else:
        state = loopkit.restore(make_sgd_state(make_mlp()), tmp_path / "cb")
    assert state.step == 4
    fit(pipe, state)
    straight = _logged_files(tmp_path / "a" / "run" / "version_0")
    assert _logged_files(tmp_path / "b" / "run" / "version_0") == straight
    at_4 = [json.loads(line) for line in straight[1].splitlines() if json.loads(line)["step"] == 4]
    kinds = ["val" if "val/mse" in r else "train" if "train/loss" in r else "epoch %d" % r["epoch"] for r in at_4]
    assert kinds == ["train", "val", "epoch 0", "val", "epoch 1"]  # (both epochs validate and record there)


def test_with_logging_tells_a_logger_of_ones_own_the_step_alone_when_its_resume_at_takes_no_epoch(
    make_mlp, make_batches, make_sgd_state
):
    """A logger's ``resume_at(step)`` of one's own still works; the file loggers' get the epoch and batch too."""

    class StepOnly(MemoryLogger):
        def resume_at(self, step):
            self.told = (step,)

    class Positioned(MemoryLogger):
        def resume_at(self, step, epoch=None, batch_index=None, *, finishes_epoch=False):
            self.told = (step, epoch, batch_index, finishes_epoch)

    state = make_sgd_state(make_mlp()).evolve(step=3, epoch=1)
    loggers = StepOnly(), Positioned()
    run_epochs(with_logging(train_step(loss_with_mae), *loggers), state, make_batches(2), epochs=2, progress=False)
    assert [lg.told for lg in loggers] == [(3,), (3, 1, 0, False)]


def test_a_logger_whose_resume_at_takes_the_step_alone_is_told_it_where_a_fit_goes_on_in_a_cut_epoch(
    make_mlp, make_batches, make_sgd_state
):
    """A fit cut by max_steps mid-epoch, then one going on in that epoch: a ``resume_at(step)`` of one's own (which
    with_logging takes) was called resume_at(4, finishes_epoch=True) and raised a TypeError when that fit logged its
    first row; it is told resume_at(4), one that takes ``finishes_epoch`` resume_at(4, finishes_epoch=True), one
    that takes the epoch too all of it. Reference: the rows of the same fits through a logger without resume_at."""

    class StepOnly(MemoryLogger):
        def resume_at(self, step):
            self.told = (step,)

    class Finishing(MemoryLogger):
        def resume_at(self, step, finishes_epoch=False):
            self.told = (step, finishes_epoch)

    loggers = StepOnly(), Finishing(), _Positioned(), MemoryLogger()
    step = with_logging(train_step(loss_with_mae), *loggers, every_n_steps=2)
    cut, _ = run_epochs(step, make_sgd_state(make_mlp()), make_batches(6), epochs=2, max_steps=4, progress=False)
    assert (cut.step, cut.batch_index) == (4, 4)
    run_epochs(step, cut, make_batches(6), epochs=2, progress=False)
    assert [lg.told for lg in loggers[:3]] == [(4,), (4, True), (4, 0, 4, True)]
    assert all(lg.logged == loggers[3].logged for lg in loggers[:3])


class _Unreadable:
    """A callable whose signature Python cannot read (as some builtins and C callables): it records its calls."""

    __signature__ = "unreadable"  # (inspect.signature raises a TypeError)

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


def test_resume_at_and_finalize_are_called_as_their_signatures_read_partials_mocks_and_unreadable_ones_too():
    """with_logging asks loopkit._calls.takes which call a logger's resume_at and finalize take: a functools.partial
    and a MagicMock as Python binds them; one whose signature cannot be read is given the first call (the file
    loggers', Lightning's finalize(status)), as the build's check takes it."""
    import functools
    from unittest import mock

    from loopkit.transforms.logging import _finalize, _resume_at

    told = []
    _resume_at(functools.partial(lambda tag, step: told.append((tag, step)), "own"), (4, 0, 4), True)
    _resume_at(functools.partial(lambda tag, step, finishes_epoch=False: told.append((tag, step, finishes_epoch)),
                                 "own"), (4, 0, 4), True)
    mocked, unreadable = mock.MagicMock(), _Unreadable()
    _resume_at(mocked, (4, 0, 4), False)
    _resume_at(unreadable, (4, 0, 4), True)
    assert told == [("own", 4), ("own", 4, True)]
    mocked.assert_called_once_with(4, 0, 4, finishes_epoch=False)
    assert unreadable.calls == [((4, 0, 4), {"finishes_epoch": True})]

    logger = mock.MagicMock()
    logger.finalize = functools.partial(lambda tag, status: told.append((tag, status)), "own")
    _finalize(logger, "failed")
    logger.finalize = functools.partial(lambda tag: told.append((tag,)), "own")
    _finalize(logger, "success")
    logger.finalize = unreadable
    _finalize(logger, "success")
    assert told[2:] == [("own", "failed"), ("own",)] and unreadable.calls[1:] == [(("success",), {})]


def test_hyper_parameters_logged_before_a_fit_stay_and_a_new_folder_is_not_warned_about(tmp_path, make_mlp,
                                                                                      make_batches, make_sgd_state):
    """The README's way: TensorBoard's hparams logged, then with_logging(step, tb, csv): the CSV logger's rewind at
    step 0 took the hparams.json the TensorBoard logger had written for an earlier run's, and warned."""
    for version in (None, 0):
        tb, csv_logger = TensorBoardLogger(tmp_path / str(version), version=version), CSVLogger(tmp_path / str(version), version=version)
        tb.log_hparams({"lr": 0.1})
        assert tb.log_dir  # (read before the fit: the folder is claimed and hparams.json written at once)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run_epochs(with_logging(train_step(loss_with_mae), tb, csv_logger, every_n_steps=2),
                       make_sgd_state(make_mlp()), make_batches(4), epochs=1, progress=False)
        with open(os.path.join(tb.log_dir, "hparams.json")) as f:
            assert json.load(f)["lr"] == 0.1


def test_a_fresh_run_into_a_pinned_version_folder_replaces_the_earlier_run_with_a_warning(tmp_path, make_mlp,
                                                                                        make_batches, make_sgd_state):
    def fit(lr):
        logger = CSVLogger(tmp_path, "run", version=0)
        run_epochs(with_logging(train_step(loss_with_mae), logger, every_n_steps=2), make_sgd_state(make_mlp(), lr=lr),
                   make_batches(4), epochs=1, progress=False)
        with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
            return f.read()

    first = fit(0.1)
    with pytest.warns(UserWarning, match="replaces"):
        second = fit(0.01)
    assert second != first and second.splitlines()[0] == first.splitlines()[0]
    assert len(second.splitlines()) == len(first.splitlines())  # not appended: the same rows, new values
    fresh = tmp_path / "fresh"
    logger = CSVLogger(fresh, "run")
    run_epochs(with_logging(train_step(loss_with_mae), logger, every_n_steps=2), make_sgd_state(make_mlp(), lr=0.01),
               make_batches(4), epochs=1, progress=False)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        assert f.read() == second


def test_one_step_reused_for_cross_validation_folds_gives_each_fold_a_version_of_its_own(
    tmp_path, make_mlp, make_batches, make_sgd_state, caplog
):
    """One with_logging step (TensorBoard, CSV and JSONL loggers of one folder) built once and run for 3 folds,
    each from a fresh state: each fold's fit dropped the earlier folds' records, warning that it "replaces them",
    so version_0 ended with the last fold alone (Lightning's CSVLogger reused over 3 Trainers keeps all 24 rows).
    Now each fold is a run of its own, version_0..2, said once a fold at INFO and not warned about. Reference: each
    fold run alone, with loggers made anew."""
    evaluator = eval_step(mse_metric)

    def loggers(root):
        tb, csv_logger, jsonl = TensorBoardLogger(root, "cv"), CSVLogger(root, "cv"), JSONLLogger(root, "cv")
        tb.log_hparams({"lr": 0.1, "folds": 3})
        return tb, csv_logger, jsonl

    def fold(step, k):
        batches = make_batches(6, seed=k)
        train, val = batches[:4], batches[4:]
        run_epochs(step, make_sgd_state(make_mlp(seed=k)), train, epochs=2, val=(evaluator, val), progress=False)

    reused = loggers(tmp_path / "reused")
    step = with_logging(train_step(loss_with_mae), *reused, every_n_steps=2)
    with caplog.at_level("INFO", logger="loopkit.loggers"), warnings.catch_warnings():
        warnings.simplefilter("error")  # (no earlier fold replaced)
        for k in range(3):
            fold(step, k)
            assert {lg.log_dir for lg in reused} == {str(tmp_path / "reused" / "cv" / f"version_{k}")}
    assert len([r for r in caplog.records if r.name == "loopkit.loggers"]) == 2  # (once a move, not once a logger)
    assert sorted(os.listdir(tmp_path / "reused" / "cv")) == ["version_0", "version_1", "version_2"]
    for k in range(3):
        alone = loggers(tmp_path / f"alone{k}")
        fold(with_logging(train_step(loss_with_mae), *alone, every_n_steps=2), k)
        folder, reference = tmp_path / "reused" / "cv" / f"version_{k}", alone[0].log_dir
        assert _logged_files(folder) == _logged_files(reference)
        with open(os.path.join(folder, "hparams.json")) as f, open(os.path.join(reference, "hparams.json")) as g:
            assert json.load(f) == json.load(g) == {"lr": 0.1, "folds": 3}
        assert _hparams_tab(folder) == _hparams_tab(reference)  # (once, with the fold's own final metrics)


@pytest.mark.filterwarnings("ignore:run_epochs. an epoch has 4 training batches, fewer than the logging interval")
@pytest.mark.parametrize("every_n_steps", [2, 100])
@pytest.mark.parametrize("kinds", [(CSVLogger,), (TensorBoardLogger,), (TensorBoardLogger, CSVLogger, JSONLLogger)])
def test_a_state_continued_after_another_run_logged_with_the_same_step_leaves_that_runs_records(
    kinds, every_n_steps, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """One with_logging step trains model A for an epoch (version_0), then a fresh model B for three (version_1), then
    A goes on from its returned state: A's fit rewound version_1 to A's step, deleting B's later records and writing
    A's there. Now B's folder holds what it held before A went on, and A goes on in a folder of its own (version_2),
    with a warning naming both; a further fit of A from there goes on in version_2. Also when the fits log only
    their epochs' and validations' rows (``every_n_steps`` past them). Reference: B's files read before; A run
    uninterrupted, with loggers made anew."""
    batches = make_batches(4)
    evaluator = eval_step(mse_metric)

    def fit(step, state, epochs):
        return run_epochs(step, state, batches, epochs=epochs, val=(evaluator, batches[:2]), progress=False)[0]

    def rows(folder):
        tags = ("train/loss", "val/mse", "train/loss_epoch")
        if kinds[0] is CSVLogger:
            return {tag: csv_series(folder, tag) for tag in tags}
        return {tag: scalars(str(folder), tag) for tag in tags}

    run = tmp_path / "reused" / "r"
    step = with_logging(train_step(loss_with_mae), *[kind(tmp_path / "reused", "r") for kind in kinds],
                        every_n_steps=every_n_steps)
    a = fit(step, make_sgd_state(make_mlp(seed=0)), 1)
    fit(step, make_sgd_state(make_mlp(seed=1)), 3)
    files = _logged_files if len(kinds) == 3 else rows
    before = {k: files(run / f"version_{k}") for k in (0, 1)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = fit(step, a, 3)
    assert {k: files(run / f"version_{k}") for k in (0, 1)} == before  # (B's records, and A's first epoch's)
    assert sorted(os.listdir(run)) == ["version_0", "version_1", "version_2"]
    assert len([w for w in caught if "version_0" in str(w.message) and "version_1" in str(w.message)]) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(step, a, 4)
    assert sorted(os.listdir(run)) == ["version_0", "version_1", "version_2"]
    assert not [w for w in caught if "version_" in str(w.message)]
    assert {k: files(run / f"version_{k}") for k in (0, 1)} == before
    alone = tmp_path / "alone" / "r"
    fit(with_logging(train_step(loss_with_mae), *[kind(tmp_path / "alone", "r") for kind in kinds],
                     every_n_steps=every_n_steps), make_sgd_state(make_mlp(seed=0)), 4)
    a_first, a_then, reference = rows(run / "version_0"), rows(run / "version_2"), rows(alone / "version_0")
    assert all(a_then[tag] for tag in reference if reference[tag])
    for tag in reference:
        assert_series(a_first[tag] + a_then[tag], reference[tag], rel=1e-6)


@pytest.mark.filterwarnings("ignore:run_epochs. an epoch has 4 training batches, fewer than the logging interval")
@pytest.mark.parametrize("change", ["added in front", "removed", "reordered"])
def test_a_state_continued_through_another_list_of_loggers_leaves_another_runs_records(
    change, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """Model A is fitted through one list of loggers (a CSVLogger ``exp``, with or before a TensorBoardLogger
    ``tb``), then a fresh model B through the same step, then A goes on through another list of the same loggers: a
    TensorBoardLogger added in front, the TensorBoardLogger taken out, or the two swapped. The state recorded each
    logger's folder by its place in the list, so the CSVLogger, now at another place, was told no folder (or
    TensorBoard's, ignored) and went on in B's folder, rewinding B's records to A's step, unwarned. Now each logger
    finds its own record: B's folders keep what they held, A goes on in the next version_N with a warning naming
    both. Reference: B alone and A uninterrupted (3 epochs), with loggers made anew."""
    batches = make_batches(4)
    evaluator = eval_step(mse_metric)
    root = tmp_path / "reused"
    csv_logger, tb = CSVLogger(root, "exp"), TensorBoardLogger(root, "tb")
    first, then = {"added in front": ([csv_logger], [tb, csv_logger]), "removed": ([tb, csv_logger], [csv_logger]),
                   "reordered": ([csv_logger, tb], [tb, csv_logger])}[change]

    def fit(loggers, state, epochs):
        step = with_logging(train_step(loss_with_mae), *loggers, every_n_steps=2)
        return run_epochs(step, state, batches, epochs=epochs, val=(evaluator, batches[:2]), progress=False)[0]

    def rows(folder):
        return {tag: csv_series(folder, tag) for tag in ("train/loss", "val/mse", "train/loss_epoch")}

    step = with_logging(train_step(loss_with_mae), *first, every_n_steps=2)
    a = run_epochs(step, make_sgd_state(make_mlp(seed=0)), batches, epochs=1, val=(evaluator, batches[:2]),
                   progress=False)[0]
    run_epochs(step, make_sgd_state(make_mlp(seed=1)), batches, epochs=2, val=(evaluator, batches[:2]),
               progress=False)
    before = {k: open(root / "exp" / f"version_{k}" / "metrics.csv").read() for k in (0, 1)}
    tb_before = {k: scalars(str(root / "tb" / f"version_{k}"), "train/loss") for k in (0, 1) if tb in first}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = with_logging(train_step(loss_with_mae), *then, every_n_steps=2)
        run_epochs(step, a, batches, epochs=3, val=(evaluator, batches[:2]), progress=False)
    assert {k: open(root / "exp" / f"version_{k}" / "metrics.csv").read() for k in (0, 1)} == before
    assert sorted(os.listdir(root / "exp")) == ["version_0", "version_1", "version_2"]
    moved = [w for w in caught if "version_0" in str(w.message) and "version_1" in str(w.message)]
    assert len(moved) == 1 + (change == "reordered")  # (the TensorBoardLogger too, when it logged A and B)
    if tb_before:
        assert {k: scalars(str(root / "tb" / f"version_{k}"), "train/loss") for k in (0, 1)} == tb_before
    fit([CSVLogger(tmp_path / "b", "exp")], make_sgd_state(make_mlp(seed=1)), 2)
    fit([CSVLogger(tmp_path / "a", "exp")], make_sgd_state(make_mlp(seed=0)), 3)
    a_first, a_then = rows(root / "exp" / "version_0"), rows(root / "exp" / "version_2")
    b_alone, a_alone = rows(tmp_path / "b" / "exp" / "version_0"), rows(tmp_path / "a" / "exp" / "version_0")
    assert all(b_alone.values()) and all(a_then.values())
    for tag, reference in a_alone.items():
        assert_series(rows(root / "exp" / "version_1")[tag], b_alone[tag], rel=1e-6)
        assert_series(a_first[tag] + a_then[tag], reference, rel=1e-6)
    if tb in then and tb in first:  # (its own record: A's TensorBoard rows go on in a folder of their own too)
        assert sorted(os.listdir(root / "tb")) == ["version_0", "version_1", "version_2"]
        assert_series(scalars(str(root / "tb" / "version_0"), "train/loss")
                      + scalars(str(root / "tb" / "version_2"), "train/loss"), a_alone["train/loss"], rel=1e-6)


@pytest.mark.filterwarnings("ignore:run_epochs. an epoch has 4 training batches, fewer than the logging interval")
def test_a_logger_the_state_records_no_folder_of_leaves_the_run_it_last_logged(
    tmp_path, make_mlp, make_batches, make_sgd_state
):
    """Model A is fitted through a CSVLogger alone, model B (fresh) through it and a TensorBoardLogger, then A goes on
    through both: A's state records no TensorBoard folder, and the TensorBoardLogger last wrote B's (version_0), which
    it rewound to A's step. Now it leaves B's records as they are for version_1, with a warning naming both; A's
    TensorBoard rows there are those of A uninterrupted from the step it went on from."""
    batches = make_batches(4)
    csv_logger, tb = CSVLogger(tmp_path, "exp"), TensorBoardLogger(tmp_path, "tb")

    def fit(step, state, epochs):
        return run_epochs(step, state, batches, epochs=epochs, progress=False)[0]

    a = fit(with_logging(train_step(loss_with_mae), csv_logger, every_n_steps=2), make_sgd_state(make_mlp(seed=0)), 1)
    both = with_logging(train_step(loss_with_mae), tb, csv_logger, every_n_steps=2)
    fit(both, make_sgd_state(make_mlp(seed=1)), 2)
    b_rows = scalars(str(tmp_path / "tb" / "version_0"), "train/loss")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(both, a, 3)
    assert scalars(str(tmp_path / "tb" / "version_0"), "train/loss") == b_rows and len(b_rows) == 4
    assert sorted(os.listdir(tmp_path / "tb")) == ["version_0", "version_1"]
    assert len([w for w in caught if "TensorBoardLogger" in str(w.message) and "version_0" in str(w.message)
                and "version_1" in str(w.message)]) == 1
    alone = TensorBoardLogger(tmp_path / "alone", "tb")
    fit(with_logging(train_step(loss_with_mae), alone, every_n_steps=2), make_sgd_state(make_mlp(seed=0)), 3)
    reference = [row for row in scalars(alone.log_dir, "train/loss") if row[0] > a.step]
    assert_series(scalars(str(tmp_path / "tb" / "version_1"), "train/loss"), reference, rel=1e-6)


def test_an_older_checkpoints_run_dirs_by_logger_index_are_read(tmp_path, make_mlp, make_batches, make_sgd_state):
    """A state saved by an older loopkit records ``logging/run_dirs`` by the loggers' places in the list: read so, a
    logger that last fitted another run goes on from the state in a new folder, with a warning, and the state then
    records its folder by the logger's folder family (the index's record dropped)."""
    batches = make_batches(4)
    logger = CSVLogger(tmp_path, "exp")
    step = with_logging(train_step(loss_with_mae), logger, every_n_steps=2)
    a = run_epochs(step, make_sgd_state(make_mlp(seed=0)), batches, epochs=1, progress=False)[0]
    run_epochs(step, make_sgd_state(make_mlp(seed=1)), batches, epochs=2, progress=False)
    b_rows = open(tmp_path / "exp" / "version_1" / "metrics.csv").read()
    (key, folder), = a.extras["logging/run_dirs"].items()
    assert os.path.basename(folder) == "version_0" and key.endswith("exp")
    a = replace_extras(a, {**a.extras, "logging/run_dirs": {0: folder}})  # (as the older loopkit saved it)
    with pytest.warns(UserWarning, match="version_1.*version_2"):
        a = run_epochs(step, a, batches, epochs=2, progress=False)[0]
    assert open(tmp_path / "exp" / "version_1" / "metrics.csv").read() == b_rows
    assert os.path.basename(logger.log_dir) == "version_2"
    assert list(a.extras["logging/run_dirs"].items()) == [(key, logger.log_dir)]


@pytest.mark.filterwarnings("ignore:run_epochs. an epoch has 4 training batches, fewer than the logging interval")
@pytest.mark.parametrize("kinds", [(CSVLogger,), (TensorBoardLogger,), (TensorBoardLogger, CSVLogger, JSONLLogger)])
def test_a_fit_that_failed_before_its_first_row_keeps_its_folder_from_the_next_fresh_fit(
    kinds, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """One with_logging step: model A's fit claims version_0 at its first step and fails at its third, before any
    row (rows every 100 steps, validations at epochs' ends); then a fresh model B trains with the same step; then A
    goes on from the state its failure left. B wrote into version_0 (A had logged nothing there) and A's state
    recorded version_0, so A's fit rewound it to A's step: B's later records were deleted, A's written there. Now
    A's claim counts as its fit's: B takes version_1, A goes on in a folder of its own (version_2, warned), and
    version_0 is left without a record (its hyper-parameters only); a plain retry of A from a fresh state after
    such a failure also takes a folder of its own, unwarned. Reference: B's files read before A went on; A and B
    each run uninterrupted, with loggers made anew."""
    batches = make_batches(4)
    evaluator = eval_step(mse_metric)
    calls = [None]  # (the loss's calls since armed with 0: the third fails, once)

    def loss(model, batch):
        if calls[0] is not None:
            calls[0] += 1
            if calls[0] == 3:
                calls[0] = None
                raise RuntimeError("boom")
        return loss_with_mae(model, batch)

    def fit(step, state):
        return run_epochs(step, state, batches, epochs=2, val=(evaluator, batches[:2]), progress=False)[0]

    def fails(step, state):
        calls[0] = 0
        with pytest.raises(RuntimeError, match="boom") as error:
            fit(step, state)
        return loopkit.state_at_error(error.value)

    def step_of(root):
        loggers = [kind(root, "r") for kind in kinds]
        loggers[0].log_hparams({"lr": 0.1})  # (written into the folder as the failed fit ends)
        return with_logging(train_step(loss), *loggers, every_n_steps=100)

    def no_records(folder):
        return not scalars(str(folder), "train/loss_epoch") and not {"metrics.csv", "metrics.jsonl"} & {
            *os.listdir(folder)}

    def rows(folder):
        tags = ("val/mse", "train/loss_epoch", "train/mae_epoch")  # (no window's row: every 100 steps)
        if kinds[0] is CSVLogger:
            return {tag: csv_series(folder, tag) for tag in tags}
        return {tag: scalars(str(folder), tag) for tag in tags}

    run = tmp_path / "reused" / "r"
    step = step_of(tmp_path / "reused")
    a = fails(step, make_sgd_state(make_mlp(seed=0)))
    assert (a.step, a.epoch) == (2, 0) and sorted(os.listdir(run)) == ["version_0"]
    fit(step, make_sgd_state(make_mlp(seed=1)))  # B
    files = _logged_files if len(kinds) == 3 else rows
    b = files(run / "version_1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(step, a)
    assert sorted(os.listdir(run)) == ["version_0", "version_1", "version_2"]
    assert no_records(run / "version_0") and files(run / "version_1") == b  # (B's records kept)
    assert len([w for w in caught if "version_0" in str(w.message) and "version_1" in str(w.message)]) == 1
    fit(step_of(tmp_path / "a"), make_sgd_state(make_mlp(seed=0)))
    fit(step_of(tmp_path / "b"), make_sgd_state(make_mlp(seed=1)))
    a_alone, b_alone = rows(tmp_path / "a" / "r" / "version_0"), rows(tmp_path / "b" / "r" / "version_0")
    assert all(a_alone.values()) and all(b_alone.values())
    for folder, reference in ((run / "version_1", b_alone), (run / "version_2", a_alone)):
        for tag, series in rows(folder).items():
            assert_series(series, reference[tag], rel=1e-6)
    fails(step, make_sgd_state(make_mlp(seed=0)))  # (in version_3, which it leaves without a record)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(step, make_sgd_state(make_mlp(seed=0)))  # (retried from a fresh state)
    assert not [w for w in caught if "version_" in str(w.message) or "replaces" in str(w.message)]
    assert sorted(os.listdir(run)) == [f"version_{k}" for k in range(5)] and no_records(run / "version_3")
    for tag, series in rows(run / "version_4").items():
        assert_series(series, a_alone[tag], rel=1e-6)


def _hparams_tab(folder):
    """What TensorBoard's HPARAMS tab shows of a run folder: its summaries' tags, hyper-parameters and metrics."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(folder))
    events.Reload()
    content = {tag: plugin_data_pb2.HParamsPluginData.FromString(c)
               for tag, c in events.PluginTagToContent("hparams").items()}
    start = content["_hparams_/session_start_info"].session_start_info.hparams
    metrics = [m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos]
    return sorted(content), {k: v.number_value for k, v in start.items()}, metrics


# --- purity, host syncs, composition ------------------------------------------------------------


def test_the_step_is_pure(make_mlp, make_batches, make_sgd_state, take_snapshot, assert_trees_equal):
    step = with_logging(train_step(loss_with_mae), MemoryLogger(), every_n_steps=3)
    batches = make_batches(3)
    state = make_sgd_state(make_mlp())
    state, _ = step(state, batches[0])  # the window now holds sums in extras
    before = take_snapshot(state)
    first, m1 = step(state, batches[1])
    second, m2 = step(state, batches[1])
    assert_trees_equal(take_snapshot(state), before)
    assert_trees_equal(take_snapshot(first), take_snapshot(second))
    assert_trees_equal(m1, m2)
    kept = state.extras["logging/pending"]  # the window grew by this call's metrics, on the new state only
    assert len(kept) == 1 and len(first.extras["logging/pending"]) == 2
    assert first.extras["logging/pending"][0] is kept[0] and torch.equal(first.extras["logging/pending"][1]["loss"], m1["loss"])


def _count_conversions(monkeypatch):
    count = [0]
    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return count


def test_metrics_are_read_once_per_log_point_not_per_batch(tmp_path, monkeypatch, make_mlp, make_batches, make_sgd_state):
    count = _count_conversions(monkeypatch)

    def conversions(n_batches, log):
        step = train_step(loss_with_mae)
        if log:
            step = with_logging(step, CSVLogger(tmp_path), every_n_steps=10)
        state = make_sgd_state(make_mlp())
        data = make_batches(n_batches)
        count[0] = 0
        run_epochs(step, state, data, epochs=1, progress=False)
        return count[0]

    plain_40, plain_80 = conversions(40, False), conversions(80, False)
    logged_40, logged_80 = conversions(40, True), conversions(80, True)
    assert plain_40 == plain_80  # the driver reads the epoch means only
    extra_40, extra_80 = logged_40 - plain_40, logged_80 - plain_80
    assert 0 < extra_40 <= 4 * 2  # 4 log points, 2 metrics: at most one read per metric per log point
    assert extra_80 == 2 * extra_40  # twice the log points, twice the reads; nothing per batch


@pytest.mark.parametrize("transform", [with_grad_clip, with_grad_accum, with_amp])
def test_a_gradient_transform_cannot_wrap_with_logging(transform):
    logged = with_logging(train_step(loss_with_mae), MemoryLogger())
    options = {"with_grad_clip": {"max_norm": 1.0}, "with_grad_accum": {"every": 2}, "with_amp": {}}[transform.__name__]
    with pytest.raises(TypeError, match=rf"{transform.__name__} cannot wrap with_logging"):
        transform(logged, **options)
    assert logged.applied == ("train_step", "with_logging")


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((MemoryLogger(),), {"every_n_steps": 0}, ValueError, "every_n_steps must be a positive int"),
        ((MemoryLogger(),), {"every_n_steps": 2.5}, ValueError, "every_n_steps must be a positive int"),
        ((MemoryLogger(),), {"every_n_steps": True}, ValueError, "every_n_steps must be a positive int"),
        ((), {}, ValueError, "at least one logger"),
        ((MemoryLogger(), object()), {}, TypeError, r"logger 1 \(object\) has no log_metrics\(\)"),
    ],
)
def test_bad_arguments_are_refused(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        with_logging(train_step(loss_with_mae), *args, **kwargs)


def test_a_list_of_loggers_is_taken_as_lightnings_logger_list(tmp_path):
    """``with_logging(step, [tb, csv])``, as Lightning's ``Trainer(logger=[tb, csv])``, is
    ``with_logging(step, tb, csv)``; a tuple too, and a list beside a logger."""
    tb, csv_logger, jsonl = TensorBoardLogger(tmp_path), CSVLogger(tmp_path), JSONLLogger(tmp_path)
    assert with_logging(train_step(loss_with_mae), [tb, csv_logger]).loggers == (tb, csv_logger)
    assert with_logging(train_step(loss_with_mae), (tb, csv_logger), jsonl).loggers == (tb, csv_logger, jsonl)
    with pytest.raises(ValueError, match="at least one logger"):
        with_logging(train_step(loss_with_mae), [])
    with pytest.raises(TypeError, match=r"logger 1 \(object\) has no log_metrics\(\)"):
        with_logging(train_step(loss_with_mae), [MemoryLogger(), object()])


def test_every_row_holds_the_epoch_of_its_step_as_lightnings_in_every_file_logger(
    tmp_path, make_mlp, make_batches, make_sgd_state
):
    """Lightning's logger connector adds ``epoch`` (its current_epoch) to every row; so does with_logging: train
    windows, validations (mid-epoch, and at an epoch's end, where state.epoch is already the next one), the learning
    rate rows and the epoch records, in the CSV, the JSONL lines and TensorBoard's ``epoch`` series. Reference: by
    hand, 5 updates an epoch, a row at step s is of epoch (s - 1) // 5 (epoch 2 is cut at 13 by max_steps), written
    as an int in the CSV and the JSONL."""
    tb, csv_logger, jsonl = TensorBoardLogger(tmp_path), CSVLogger(tmp_path), JSONLLogger(tmp_path)
    step = with_logging(train_step(loss_with_mae), tb, csv_logger, jsonl, every_n_steps=2)
    run_epochs(step, make_sgd_state(make_mlp()), make_batches(5), epochs=3, max_steps=13,
               val=(eval_step(mse_metric), make_batches(2)), val_every_n_steps=3, val_every_n_epochs=1,
               callbacks=[loopkit.LearningRateMonitor("step")], progress=False)
    rows = list(csv.DictReader(open(os.path.join(csv_logger.log_dir, "metrics.csv"))))
    assert {k for row in rows for k, v in row.items() if v} >= {"train/loss", "val/mse", "lr-SGD", "train/loss_epoch"}
    steps = [int(row["step"]) for row in rows]
    assert [s for s, row in zip(steps, rows) if row["val/mse"]] == [3, 5, 6, 9, 10, 12]  # (at 5, 10: epochs' ends)
    assert [s for s, row in zip(steps, rows) if row["train/loss"]] == [2, 4, 6, 8, 10, 12]  # (10: epoch 1's last)
    assert [s for s, row in zip(steps, rows) if row["train/loss_epoch"]] == [5, 10, 13]  # (13: the cut's record)
    assert [row["epoch"] for row in rows] == [f"{(s - 1) // 5}" for s in steps]  # (an int, as Lightning's CSV)
    lines = [json.loads(line) for line in open(os.path.join(jsonl.log_dir, "metrics.jsonl"))]
    assert [(line["step"], line["epoch"]) for line in lines] == [(s, (s - 1) // 5) for s in steps]
    assert scalars(tb.log_dir, "epoch") == [(s, float((s - 1) // 5)) for s in steps]


def test_a_donated_step_and_a_bad_metric_are_refused(make_mlp, make_sgd_state):
    with pytest.raises(TypeError, match="donated"):
        with_logging(loopkit.donate(train_step(loss_with_mae)), MemoryLogger())
    step = with_logging(lambda s, b: (s.evolve(step=s.step + 1), {"acc": "high"}), MemoryLogger())
    with pytest.raises(TypeError, match=r"metric 'acc' from step .*<lambda> is a str"):  # (the plain step names itself)
        step(make_sgd_state(make_mlp()), None)


@pytest.mark.parametrize("rank", [0, 1])
def test_under_ddp_only_rank_zero_writes(tmp_path, monkeypatch, rank, make_mlp, make_batches, make_sgd_state):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)  # no real peers: no collectives
    loggers = (TensorBoardLogger(tmp_path, histogram_every_n_steps=1), CSVLogger(tmp_path), JSONLLogger(tmp_path))
    step = with_logging(train_step(loss_with_mae), *loggers, every_n_steps=1)
    state, _ = run_epochs(step, make_sgd_state(make_mlp()), make_batches(3), epochs=1,
                          val=(eval_step(mse_metric), make_batches(2)), progress=False)
    assert state.step == 3
    written = [f for _, _, files in os.walk(tmp_path) for f in files]
    if rank == 0:
        assert {"metrics.csv", "metrics.jsonl"} <= set(written) and any("tfevents" in f for f in written)
    else:
        assert written == [] and os.listdir(tmp_path) == []


class _FullDisk(MemoryLogger):
    """A logger whose write at update ``at`` fails, as on a full disk."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def _write_metrics(self, metrics, step):
        if step == self.at:
            raise OSError(28, "No space left on device")
        super()._write_metrics(metrics, step)


def test_a_failed_write_at_a_log_point_leaves_that_update_whole(make_mlp, make_batches, make_sgd_state, mse_loss):
    """The update is done before the write: state_at_error gives it, and training on from it ends as the
    uninterrupted run (the reference, trained without logging)."""
    data = make_batches(8)
    whole, _ = run_epochs(train_step(mse_loss), make_sgd_state(make_mlp()), data, epochs=2, progress=False)
    with pytest.raises(OSError, match="No space left") as caught:
        run_epochs(with_logging(train_step(mse_loss), _FullDisk(at=10), every_n_steps=5),
                   make_sgd_state(make_mlp()), data, epochs=2, progress=False)
    left = loopkit.state_at_error(caught.value)
    assert left is not None and (left.step, left.epoch, left.batch_index) == (10, 1, 2)
    resumed, _ = run_epochs(train_step(mse_loss), left, data, epochs=2, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True))


def test_a_run_folder_that_cannot_be_claimed_at_the_first_call_leaves_that_update_whole(
    tmp_path, make_mlp, make_batches, make_sgd_state, mse_loss
):
    """A file put where the logger's root/name folder goes after it was built: the fit's first call claims the folder
    after its update (no log point yet) and raised os.makedirs' error with the state lost; state_at_error gives that
    update, and a fit on from it, the file gone, logs and trains as the uninterrupted run."""
    data = make_batches(8)

    def fit(root, state):
        logger = CSVLogger(root, name="run")
        if root == tmp_path / "failing":
            (root / "run").write_text("in the way")
        return run_epochs(with_logging(train_step(mse_loss), logger, every_n_steps=5), state, data, epochs=2,
                          progress=False)[0], logger

    whole, whole_logger = fit(tmp_path / "whole", make_sgd_state(make_mlp()))
    (tmp_path / "failing").mkdir()
    with pytest.raises(FileExistsError) as caught:
        fit(tmp_path / "failing", make_sgd_state(make_mlp()))
    left = loopkit.state_at_error(caught.value)
    assert left is not None and (left.step, left.epoch, left.batch_index) == (1, 0, 1)
    (tmp_path / "failing" / "run").unlink()
    logger = CSVLogger(tmp_path / "failing", name="run")
    resumed, _ = run_epochs(with_logging(train_step(mse_loss), logger, every_n_steps=5), left, data, epochs=2,
                            progress=False)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True))
    with open(os.path.join(logger.log_dir, "metrics.csv")) as got, \
            open(os.path.join(whole_logger.log_dir, "metrics.csv")) as expected:
        assert list(csv.DictReader(got)) == list(csv.DictReader(expected))


class _CSVFailingOnce(CSVLogger):
    """A CSVLogger whose first write at update ``at`` fails, as on a full disk (the next write there goes through)."""

    def __init__(self, *args, at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.at = at

    def _write_metrics(self, metrics, step):
        if step == self.at:
            self.at = None
            raise OSError(28, "No space left on device")
        super()._write_metrics(metrics, step)


@pytest.mark.parametrize("relaunch", [False, True])
@pytest.mark.parametrize("at", [4, 6])  # mid-epoch, where a step validation is due; epoch 0's last update
def test_a_fit_retried_after_a_failed_write_at_a_log_point_logs_and_records_what_the_uninterrupted_fit_does(
    at, relaunch, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """A logger's write raises at a log point: state_at_error is that update, done, holding the row not written and
    the call's share of the epoch means. run_epochs from it (in this process with the same loggers, or relaunched from
    its state dict into the same folder) logs the row first, to the loggers from the failed one on, and goes on at the
    next batch. Reference: the uninterrupted fit's rows, files, history and parameters. (The row was lost, and the
    epoch means lacked that batch: the history's train/loss and the CSV's train/loss_epoch were off.)"""
    batches, val = make_batches(6), make_batches(2, seed=3)
    evaluator = eval_step(mse_metric)

    def pipeline(root, at=None):
        before, after = MemoryLogger(), MemoryLogger()  # (the loggers before the failing one and after it)
        loggers = (before, _CSVFailingOnce(root, "run", version=0, at=at), JSONLLogger(root, "run", version=0), after)
        return with_logging(train_step(loss_with_mae), *loggers, every_n_steps=2), before, after

    def fit(step, state):
        return run_epochs(step, state, batches, epochs=2, val=(evaluator, val), val_every_n_steps=4, progress=False)

    def files(root):
        folder = os.path.join(root, "run", "version_0")
        with open(os.path.join(folder, "metrics.csv")) as f, open(os.path.join(folder, "metrics.jsonl")) as g:
            return f.read(), g.read()

    step, before, after = pipeline(tmp_path / "a")
    whole, history = fit(step, make_sgd_state(make_mlp()))
    straight = before.logged
    assert after.logged == straight and at in [s for s, m in straight if "train/loss" in m]  # a log point

    step, before, after = pipeline(tmp_path / "b", at=at)
    with pytest.raises(OSError, match="No space left") as caught:
        fit(step, make_sgd_state(make_mlp()))
    left = loopkit.state_at_error(caught.value)
    assert left is not None and (left.step, left.epoch, left.batch_index) == (at, 0, at)
    assert before.logged[-1][0] == at and after.logged[-1][0] < at  # the row: taken by the one before the failing one
    first = before.logged, after.logged
    if relaunch:
        left = make_sgd_state(make_mlp(seed=9)).load_state_dict(left.state_dict())
        step, before, after = pipeline(tmp_path / "b")
    else:
        first = [], []
    resumed, resumed_history = fit(step, left)
    assert first[0] + before.logged == straight and first[1] + after.logged == straight  # that row once, in its place
    assert files(tmp_path / "b") == files(tmp_path / "a")
    assert resumed_history == history
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True))
    assert "logging/unlogged" not in resumed.extras  # (dropped at the next log point)


def test_a_row_left_unlogged_is_logged_once_when_the_retry_fails_before_it_moves(tmp_path, make_mlp, make_batches,
                                                                                  make_sgd_state):
    """The retry logs the row at its start, then fails at its first batch: its state_at_error is the state it was
    given, still holding the row; a further retry does not log it again. Reference: the uninterrupted fit's rows."""
    batches = make_batches(6)
    transient = {"fail": False}

    def loss(model, batch):
        if transient["fail"]:
            transient["fail"] = False
            raise RuntimeError("a transient failure at the first batch")
        return loss_with_mae(model, batch)

    reference = MemoryLogger()
    run_epochs(with_logging(train_step(loss), reference, every_n_steps=2), make_sgd_state(make_mlp()), batches, epochs=1,
               progress=False)
    after = MemoryLogger()
    step = with_logging(train_step(loss), _CSVFailingOnce(tmp_path, at=2), after, every_n_steps=2)
    with pytest.raises(OSError, match="No space left") as full:
        run_epochs(step, make_sgd_state(make_mlp()), batches, epochs=1, progress=False)
    transient["fail"] = True
    with pytest.raises(RuntimeError, match="transient") as failed:
        run_epochs(step, loopkit.state_at_error(full.value), batches, epochs=1, progress=False)
    run_epochs(step, loopkit.state_at_error(failed.value), batches, epochs=1, progress=False)
    assert after.logged == reference.logged


class _FailingOnce(MemoryLogger):
    """A logger of one's own (no ``resume_at``: it cannot replace a record) whose first write of ``key`` at ``step``
    fails, as on a full disk; it keeps what it took."""

    def __init__(self, key, step):
        super().__init__()
        self.at = (key, step)

    def _write_metrics(self, metrics, step):
        if self.at is not None and self.at[0] in metrics and self.at[1] == step:
            self.at = None
            raise OSError(28, "No space left on device")
        super()._write_metrics(metrics, step)


@pytest.mark.parametrize(
    "key, at",
    [
        ("val/mse", 4),  # a step validation mid-epoch
        ("val/mse", 6),  # epoch 0's validation, at its end
        ("epoch", 6),  # epoch 0's record, after its validation was logged
        ("epoch", 12),  # epoch 1's record, after the step validation at its last update
    ],
)
def test_a_fit_retried_after_a_write_failed_at_an_epochs_end_gives_each_logger_each_row_once(
    key, at, make_mlp, make_batches, make_sgd_state
):
    """A logger's write raises in a validation's row or an epoch's record; the fit retried from state_at_error (as the
    README advises) validates and records again, and the loggers that cannot replace a record (a tracker, a logger of
    one's own) must not take again the rows they took: each logger's rows are the uninterrupted fit's. (The ones
    before the failing logger took the validation's row, or the epoch's, a second time.)"""
    batches, val = make_batches(6), make_batches(2, seed=3)

    def fit(step, state):
        return run_epochs(step, state, batches, epochs=2, val=(eval_step(mse_metric), val), val_every_n_steps=4,
                          progress=False)

    reference = MemoryLogger()
    fit(with_logging(train_step(loss_with_mae), reference, every_n_steps=2), make_sgd_state(make_mlp()))
    straight = reference.logged
    assert (at, key) in [(s, k) for s, m in straight for k in m]

    loggers = MemoryLogger(), _FailingOnce(key, at), MemoryLogger()
    step = with_logging(train_step(loss_with_mae), *loggers, every_n_steps=2)
    with pytest.raises(OSError, match="No space left") as caught:
        fit(step, make_sgd_state(make_mlp()))
    assert loggers[0].logged[-1][0] == at and key in loggers[0].logged[-1][1]  # took the row the next one did not
    fit(step, loopkit.state_at_error(caught.value))
    for logger in loggers:
        assert logger.logged == straight


@pytest.mark.parametrize("relaunch", [False, True])
def test_a_fit_retried_after_a_failed_write_of_the_learning_rates_row_logs_it_once_in_its_place(
    relaunch, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """``LearningRateMonitor("step")``'s row at a log point (handed to the loggers after the update's own row) whose
    write raises: state_at_error is that update, holding the row, and run_epochs from it (in this process, or
    relaunched from its state dict into the same folder) logs it first, to the loggers from the failed one on. (The
    row was lost: the fit went on at the next batch, and that update's on_batch_end is not called again.) Reference: the
    uninterrupted fit's rows and CSV file."""
    batches = make_batches(6)

    def pipeline(root, fails=True):
        loggers = (MemoryLogger(), _FailingOnce("lr-SGD", 4) if fails else MemoryLogger(),
                   CSVLogger(root, "run", version=0), MemoryLogger())
        return with_logging(train_step(loss_with_mae), *loggers, every_n_steps=2), loggers

    def fit(step, state):
        return run_epochs(step, state, batches, epochs=2, callbacks=[loopkit.LearningRateMonitor("step")],
                          progress=False)

    def csv_file(root):
        with open(os.path.join(root, "run", "version_0", "metrics.csv")) as f:
            return f.read()

    step, loggers = pipeline(tmp_path / "a", fails=False)
    whole, _ = fit(step, make_sgd_state(make_mlp()))
    straight = loggers[0].logged
    assert (4, "lr-SGD") in [(s, k) for s, m in straight for k in m]

    step, loggers = pipeline(tmp_path / "b")
    with pytest.raises(OSError, match="No space left") as caught:
        fit(step, make_sgd_state(make_mlp()))
    left = loopkit.state_at_error(caught.value)
    assert (left.step, left.epoch, left.batch_index) == (4, 0, 4)
    assert "lr-SGD" in loggers[0].logged[-1][1] and loggers[3].logged[-1][0] == 4  # (the update's own row)
    memories = [logger for logger in loggers if isinstance(logger, MemoryLogger)]
    first = [logger.logged for logger in memories]
    if relaunch:
        left = make_sgd_state(make_mlp(seed=9)).load_state_dict(left.state_dict())
        step, loggers = pipeline(tmp_path / "b", fails=False)
        memories = [logger for logger in loggers if isinstance(logger, MemoryLogger)]
    else:
        first = [[] for _ in memories]
    resumed, _ = fit(step, left)
    for taken, logger in zip(first, memories, strict=True):
        assert taken + logger.logged == straight  # that row once, in its place
    assert csv_file(tmp_path / "b") == csv_file(tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True))


class _BatchCounter(loopkit.Callback):
    """A stateful callback counting the batches it was told of (kept in the state) and noting each one's metrics."""

    def __init__(self):
        self.batches, self.seen = 0, []

    def on_batch_end(self, state, metrics):
        self.batches += 1
        self.seen.append((state.step, {k: float(v) for k, v in metrics.items()}))

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, loaded):
        self.batches = loaded["batches"]


@pytest.mark.parametrize("relaunch", [False, True])
@pytest.mark.parametrize("outside", [True, False], ids=["checkpointing_outside", "checkpointing_inside"])
@pytest.mark.parametrize("at", [4, 6])  # mid-epoch, where a step validation is due; epoch 0's last update
def test_a_fit_retried_after_a_failed_write_at_a_log_point_runs_that_updates_batch_end_hooks_once(
    at, outside, relaunch, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """The update's own row fails to be written at a log point: the fit given state_at_error (in this process, or
    relaunched from its state dict) runs that update's on_batch_end hooks once, with its metrics (the state carries
    them), before the save due there, which it makes with with_checkpointing outside with_logging too. Reference: the
    uninterrupted fit's callback count and losses, checkpoints, logged rows (the learning rates' row included) and CSV
    file. (The hooks were never called for that update: the counter ended one batch short, LearningRateMonitor's row
    was missing, and with with_checkpointing outside, the save of that update was never made.)"""
    batches, val = make_batches(6), make_batches(2, seed=3)

    def pipeline(root, fails=None):
        memory = MemoryLogger()
        loggers = (memory, _CSVFailingOnce(root, "run", version=0, at=fails))
        if outside:
            step = loopkit.with_checkpointing(with_logging(train_step(loss_with_mae), *loggers, every_n_steps=2),
                                              root / "ckpt", every_n_steps=2, keep_last=None, every_n_epochs=0)
        else:
            step = with_logging(loopkit.with_checkpointing(train_step(loss_with_mae), root / "ckpt", every_n_steps=2,
                                                           keep_last=None, every_n_epochs=0), *loggers, every_n_steps=2)
        return step, memory, _BatchCounter()

    def fit(step, state, counter):
        return run_epochs(step, state, batches, epochs=2, val=(eval_step(mse_metric), val), val_every_n_steps=4,
                          callbacks=[counter, loopkit.LearningRateMonitor("step")], progress=False)

    def files(root):
        with open(os.path.join(root, "run", "version_0", "metrics.csv")) as f:
            positions = [(c.step, c.epoch, c.batch_index) for c in loopkit.checkpoint.list_checkpoints(root / "ckpt")]
            return f.read(), positions

    step, memory, counter = pipeline(tmp_path / "a")
    whole, history = fit(step, make_sgd_state(make_mlp()), counter)
    straight, straight_seen = memory.logged, counter.seen
    assert counter.batches == 12 and (at, "lr-SGD") in [(s, k) for s, m in straight for k in m]
    assert (at, 0, at) in files(tmp_path / "a")[1]

    step, memory, counter = pipeline(tmp_path / "b", fails=at)
    with pytest.raises(OSError, match="No space left") as caught:
        fit(step, make_sgd_state(make_mlp()), counter)
    left = loopkit.state_at_error(caught.value)
    assert (left.step, left.epoch, left.batch_index) == (at, 0, at)
    first, first_seen = memory.logged, counter.seen
    if relaunch:
        left = make_sgd_state(make_mlp(seed=9)).load_state_dict(left.state_dict())
        step, memory, counter = pipeline(tmp_path / "b")
    else:
        first, first_seen = [], []
    resumed, resumed_history = fit(step, left, counter)
    assert counter.batches == 12  # (restored from the state, then told of that update once)
    assert first_seen + counter.seen == straight_seen  # (with that update's own metrics)
    assert first + memory.logged == straight
    assert files(tmp_path / "b") == files(tmp_path / "a")
    assert resumed_history == history
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True))


class _FlushCounter(_BatchCounter):
    """A stateful callback counting the flushes' updates it was told of, noting each one's metrics."""

    def on_batch_end(self, state, metrics):
        pass

    def on_flush_end(self, state, metrics):
        super().on_batch_end(state, metrics)


def test_a_fit_retried_after_a_failed_write_at_a_flushs_log_point_runs_its_flush_end_hooks_once(
    tmp_path, make_mlp, make_batches, make_sgd_state
):
    """As at a batch's update: the write fails at the log point of the update an epoch's flush made (with_grad_accum's
    partial group), and the fit given state_at_error calls on_flush_end once, with that update's metrics, then makes
    the save due there (with_checkpointing outside with_logging). Reference: the uninterrupted fit."""
    batches = make_batches(3)  # (with every=2: updates at the 2nd batch and at the epoch's flush, steps 2 and 4)

    def pipeline(root, fails=None):
        memory = MemoryLogger()
        step = with_logging(with_grad_accum(train_step(loss_with_mae), every=2), memory,
                            _CSVFailingOnce(root, "run", version=0, at=fails), every_n_steps=2)
        return loopkit.with_checkpointing(step, root / "ckpt", every_n_steps=2, keep_last=None, every_n_epochs=0), memory

    def fit(step, state, counter):
        return run_epochs(step, state, batches, epochs=2, callbacks=[counter, loopkit.LearningRateMonitor("step")],
                          progress=False)

    def positions(root):
        return [(c.step, c.epoch, c.batch_index) for c in loopkit.checkpoint.list_checkpoints(root / "ckpt")]

    step, memory = pipeline(tmp_path / "a")
    reference = _FlushCounter()
    whole, history = fit(step, make_sgd_state(make_mlp()), reference)
    assert reference.batches == 2 and (2, 0, 3) in positions(tmp_path / "a")
    step, memory = pipeline(tmp_path / "b", fails=2)
    counter = _FlushCounter()
    with pytest.raises(OSError, match="No space left") as caught:
        fit(step, make_sgd_state(make_mlp()), counter)
    left = loopkit.state_at_error(caught.value)
    assert (left.step, left.epoch, left.batch_index) == (2, 0, 3)
    resumed, resumed_history = fit(step, left, counter)
    assert counter.batches == 2 and counter.seen == reference.seen
    assert positions(tmp_path / "b") == positions(tmp_path / "a")
    assert resumed_history == history
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True))


def test_a_fresh_fit_with_the_same_step_logs_its_rows_though_an_earlier_fit_logged_the_same_there(
    make_mlp, make_batches, make_sgd_state
):
    """Cross-validation folds through one step, each fit from a fresh state, whose first epoch makes no update (its
    validation and record at step 0, as the earlier fold's): every fold's rows reach a logger that cannot replace a
    record, those at the step an earlier fold ended at included."""
    batches, val = make_batches(4), make_batches(2, seed=3)
    logger = MemoryLogger()
    loss = _Skipping({0})
    step = with_logging(train_step(loss), logger, every_n_steps=2)
    for _ in range(2):
        run_epochs(step, make_sgd_state(make_mlp()), batches, epochs=1, val=(eval_step(mse_metric), val),
                   callbacks=[loss], progress=False)
    half = len(logger.logged) // 2
    assert half == 2 and {s for s, _ in logger.logged} == {0} and logger.logged[:half] == logger.logged[half:]

def test_an_error_out_of_the_fit_finalizes_with_failed_the_loggers_that_take_a_status(make_mlp, make_batches, make_sgd_state):
    """Lightning's protocol: ``finalize("success")``, or ``finalize("failed")`` when an error leaves the fit (an
    MLflow run is then marked FAILED), to every logger whose ``finalize`` takes a status: Lightning's own signature
    ``finalize(self, status)`` has no default (its trainer always passes one), and a successful fit finalizes it
    with "success" (it raised a TypeError at the fit's end); a logger whose ``finalize`` takes none gets ``finalize()``."""

    class Statuses(MemoryLogger):
        def __init__(self):
            super().__init__()
            self.statuses = []

        def finalize(self, status="success"):
            self.statuses.append(status)
            super().finalize(status)

    class Plain:
        def __init__(self):
            self.finalized = 0

        def log_metrics(self, metrics, step):
            pass

        def log_hparams(self, hparams, metrics=None):
            pass

        def finalize(self):
            self.finalized += 1

    class LightningStyle(Plain):  # lightning.fabric.loggers.Logger.finalize(self, status: str)
        def __init__(self):
            super().__init__()
            self.statuses = []

        def finalize(self, status):
            self.statuses.append(status)

    def failing(model, batch):
        if failing.calls == 2:
            raise RuntimeError("boom")
        failing.calls += 1
        return loss_with_mae(model, batch)

    for fn, expected in ((loss_with_mae, "success"), (failing, "failed")):
        failing.calls = 0
        statuses, plain, lightning_style = Statuses(), Plain(), LightningStyle()
        step = with_logging(train_step(fn), statuses, plain, lightning_style, every_n_steps=1)
        try:
            run_epochs(step, make_sgd_state(make_mlp()), make_batches(4), epochs=1, progress=False)
        except RuntimeError as error:
            assert str(error) == "boom" and expected == "failed"
        else:
            assert expected == "success"
        assert statuses.statuses == [expected] and statuses.finalized == 1 and plain.finalized == 1
        assert lightning_style.statuses == [expected] and lightning_style.finalized == 0


def test_a_state_trained_on_with_fewer_loggers_goes_on_in_each_loggers_own_folder(
    tmp_path, make_mlp, make_batches, make_sgd_state
):
    """The run folders a state records are by the loggers' places in ``with_logging``'s list: going on with
    TensorBoard dropped (``tb, csv`` then ``csv`` alone) told the CSV logger TensorBoard's folder, and it moved the
    same run to a new version with a warning of another run. Now it goes on in its own folder, unwarned, and its
    records equal an uninterrupted fit's."""
    batches = make_batches(4)

    def fit(*loggers, state, epochs):
        return run_epochs(with_logging(train_step(loss_with_mae), *loggers, every_n_steps=2), state, batches,
                          epochs=epochs, progress=False)[0]

    csv = CSVLogger(tmp_path / "csv", "r")
    state = fit(TensorBoardLogger(tmp_path / "tb", "r"), csv, state=make_sgd_state(make_mlp(seed=0)), epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(csv, state=state, epochs=2)
    assert sorted(os.listdir(tmp_path / "csv" / "r")) == ["version_0"]
    fit(CSVLogger(tmp_path / "whole", "r"), state=make_sgd_state(make_mlp(seed=0)), epochs=2)
    for tag in ("train/loss", "train/loss_epoch"):
        got, want = csv_series(tmp_path / "csv" / "r" / "version_0", tag), csv_series(
            tmp_path / "whole" / "r" / "version_0", tag)
        assert got and [s for s, _ in got] == [s for s, _ in want]
        assert_series(got, want, rel=1e-6)


class _MetricsOnly(Logger):
    def log_metrics(self, metrics):  # (with_logging calls log_metrics(metrics, step))
        pass


class _FinalizesTwice(MemoryLogger):
    def finalize(self, status, reason):
        pass


class _ResumesAtNothing(MemoryLogger):
    def resume_at(self):  # (with_logging calls resume_at(step, epoch, batch_index, finishes_epoch=...) or (step))
        pass


class _ResumesAtFive(MemoryLogger):
    def resume_at(self, a, b, c, d, e):
        pass


_RESUME_AT = r"its resume_at must take \(step, epoch, batch_index, finishes_epoch=\.\.\.\) or \(step\), as with_logging calls it; "


@pytest.mark.parametrize("logger, match", [
    (_MetricsOnly(), r"its log_metrics must take \(metrics, step\), as with_logging calls it; .*log_metrics\(metrics\) cannot"),
    (_FinalizesTwice(), r"its finalize must take \(status\) or \(\), as with_logging calls it; .*missing a required argument"),
    (_ResumesAtNothing(), _RESUME_AT + r"_ResumesAtNothing\.resume_at\(\) cannot: too many positional arguments$"),
    (_ResumesAtFive(), _RESUME_AT + r"_ResumesAtFive\.resume_at\(a, b, c, d, e\) cannot: "),
], ids=["log_metrics", "finalize", "resume_at_none", "resume_at_five"])
def test_a_logger_whose_methods_cannot_take_with_loggings_calls_is_refused_when_the_step_is_built(logger, match):
    """Each is refused naming the logger, its method, the calls with_logging makes and why; a resume_at that takes
    neither of its calls was taken, and failed where a fit began (at its first step)."""
    with pytest.raises(TypeError, match=rf"^with_logging: logger 1 \({type(logger).__qualname__}\): {match}"):
        with_logging(train_step(lambda m, b: m(b).sum()), MemoryLogger(), logger)


class _OwnFinalize(MemoryLogger):
    def log_metrics(self, metrics, step, *rest):
        super().log_metrics(metrics, step)

    def finalize(self):  # (a logger of one's own may take no status)
        self.finalized += 1


def test_a_logger_whose_methods_take_with_loggings_calls_logs():
    logger = _OwnFinalize()
    model = torch.nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    run_epochs(with_logging(train_step(lambda m, b: m(b).pow(2).mean()), logger, every_n_steps=1), state,
               [torch.ones(2, 2)] * 2, epochs=1, progress=False)
    assert [step for step, _ in logger.logged][:2] == [1, 2] and logger.finalized == 1


def test_a_magicmock_logger_is_a_plain_logger_getting_the_rows():
    """A ``unittest.mock.MagicMock`` as a logger (as tests of one's own use) made with_logging loop forever while
    built (its made-up ``_leader`` chain, followed as a file logger's); it is a plain logger now: its log_metrics
    gets the windows' means, as a raw loop's losses give them, and finalize the status."""
    from unittest import mock

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    reference = torch.nn.Linear(2, 1)
    reference.load_state_dict(model.state_dict())
    batches = [torch.randn(3, 2) for _ in range(4)]
    logger = mock.MagicMock()
    step = with_logging(train_step(lambda m, b: m(b).pow(2).mean()), logger, every_n_steps=2)
    run_epochs(step, state, batches, epochs=1, progress=False)
    optimizer, losses = torch.optim.SGD(reference.parameters(), lr=0.1), []
    for batch in batches:
        optimizer.zero_grad()
        loss = reference(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    rows = [c.args for c in logger.log_metrics.call_args_list if "train/loss" in c.args[0]]
    assert [(step, row["epoch"]) for row, step in rows] == [(2, 0), (4, 0)]
    assert [row["train/loss"] for row, _ in rows] == pytest.approx(
        [sum(losses[:2]) / 2, sum(losses[2:]) / 2], rel=1e-6)
    logger.finalize.assert_called_once_with("success")


class _FullOnce(CSVLogger):
    """A CSVLogger whose write of the first row holding ``key`` raises (a full disk), once."""

    def __init__(self, key, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key = key

    def log_metrics(self, metrics, step):
        if self.key is not None and self.key in metrics:
            self.key = None
            raise OSError("No space left on device")
        return super().log_metrics(metrics, step)


@pytest.mark.parametrize("resumed_by", ["state_at_error", "restore"])
@pytest.mark.parametrize("order", ["checkpointing outside", "checkpointing inside"])
@pytest.mark.parametrize("row, val_every_n_steps", [("train/loss_epoch", None), ("val/mse", 3)])
def test_a_failed_write_of_a_row_leaves_no_checkpoint_that_counts_it_written(
    row, val_every_n_steps, order, resumed_by, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """Reference: the uninterrupted run's CSV, checkpoint folder (names and scores) and parameters. The write of
    epoch 0's record (or of the first validation's row, at update 3 mid-epoch) raises. No checkpoint is saved at
    that event, with with_checkpointing outside with_logging or inside it: one saved there would count the row
    written, so a relaunch from the newest checkpoint would go on past it and never write it, and a retry from
    ``state_at_error``, which validates and records that epoch again, would save that position a second time
    (``keep_best`` counting it twice). Resumed either way, the run ends as the uninterrupted one."""
    batches = make_batches(4)
    made = {}

    def fit(root, state, fails=None):
        if root not in made or resumed_by == "restore":  # (restore: a relaunch, with a new step and logger)
            logger = _FullOnce(fails, root, "run", version=0)

            def checkpointed(step):
                return loopkit.with_checkpointing(step, root / "ckpt", monitor="val/mse", mode="max", keep_best=2,
                                                  keep_last=1, every_n_steps=2)

            made[root] = (with_logging(checkpointed(train_step(loss_with_mae)), logger, every_n_steps=2)
                          if order == "checkpointing inside"
                          else checkpointed(with_logging(train_step(loss_with_mae), logger, every_n_steps=2)))
        return run_epochs(made[root], state, batches, epochs=3, val=(eval_step(mse_metric), batches[:2]),
                          val_every_n_steps=val_every_n_steps, sanity_val_batches=0, progress=False)[0]

    def folder(root):
        names = sorted(c.name for c in loopkit.checkpoint.list_checkpoints(root / "ckpt"))
        with open(root / "run" / "version_0" / "metrics.csv") as f:
            return f.read(), names, loopkit.checkpoint.read_scores(root / "ckpt").get("scores")

    expected = fit(tmp_path / "a", make_sgd_state(make_mlp()))
    with pytest.raises(OSError, match="No space left") as error:
        fit(tmp_path / "b", make_sgd_state(make_mlp()), fails=row)
    if resumed_by == "state_at_error":
        state = loopkit.state_at_error(error.value)
    else:
        state = loopkit.restore(make_sgd_state(make_mlp()), tmp_path / "b" / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "another run's" checkpoint at its first save)
        final = fit(tmp_path / "b", state)
    assert folder(tmp_path / "b") == folder(tmp_path / "a")
    assert all(torch.equal(p, q) for p, q in zip(final.model.parameters(), expected.model.parameters()))


@pytest.mark.parametrize("failing", [False, True], ids=["fit_end", "abort"])
def test_a_finalize_that_raises_keeps_no_other_logger_from_its_finalize_and_is_called_once(
    tmp_path, make_mlp, make_batches, make_sgd_state, failing
):
    """A logger whose finalize raises (a tracker's network call) kept every logger after it from being finalized
    (TensorBoard's HPARAMS never written, its files open), and was finalized again with "failed" by the abort its
    error brought. Each logger is finalized once, as Lightning's trainer finalizes every logger, and the first
    error is raised; the TensorBoard folder then holds what a fit without the failing logger writes."""

    class Told:
        def __init__(self, error=None):
            self.statuses, self.error = [], error

        def log_metrics(self, metrics, step):
            pass

        def log_hparams(self, hparams, metrics=None):
            pass

        def finalize(self, status):
            self.statuses.append(status)
            if self.error is not None:
                raise self.error

    def loss(model, batch):
        if failing and loss.calls == 3:
            raise RuntimeError("boom")
        loss.calls += 1
        return loss_with_mae(model, batch)

    def fit(*loggers):
        loss.calls = 0
        step = with_logging(train_step(loss), *loggers, every_n_steps=1)
        run_epochs(step, make_sgd_state(make_mlp(seed=0)), make_batches(4), epochs=1, progress=False)

    status = "failed" if failing else "success"
    first, second, after = Told(OSError("tracker unreachable")), Told(OSError("also down")), Told()
    tb = TensorBoardLogger(tmp_path, "a")
    tb.log_hparams({"lr": 0.1})
    released = pytest.warns(UserWarning, match="releasing the step failed too") if failing else contextlib.nullcontext()
    with pytest.raises(RuntimeError if failing else OSError, match="boom" if failing else "tracker unreachable"):
        with released:  # (run_epochs warns of the abort's error, raising the fit's own)
            fit(first, tb, second, after)
    assert first.statuses == second.statuses == after.statuses == [status]
    alone = TensorBoardLogger(tmp_path, "b")
    alone.log_hparams({"lr": 0.1})
    with pytest.raises(RuntimeError) if failing else contextlib.nullcontext():
        fit(alone)
    got, want = EventAccumulator(tb.log_dir).Reload(), EventAccumulator(alone.log_dir).Reload()
    assert got.PluginTagToContent("hparams") and got.PluginTagToContent("hparams") == want.PluginTagToContent("hparams")
    assert scalars(tb.log_dir, "train/loss") == scalars(alone.log_dir, "train/loss") != []


class _LightningShaped:
    """A logger of the shape of Lightning's ``Logger`` (``lightning.pytorch.loggers.Logger``): ``log_metrics(metrics,
    step)``, ``log_hyperparams(params)``, ``finalize(status)`` (no default: its trainer always gives one), ``save()``;
    no ``log_hparams``, no ``resume_at``."""

    def __init__(self):
        self.rows, self.params, self.statuses = [], {}, []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        self.params.update(params)

    def finalize(self, status):
        self.statuses.append(status)
        self.save()

    def save(self):
        pass


class _Plain:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def log_hparams(self, hparams, metrics=None):
        pass

    def finalize(self):
        pass


class _SigtermAt:
    """Sends SIGTERM to this process after update ``at``: ``run_epochs`` stops there, gracefully."""

    def __init__(self, at):
        self.at = at

    def on_batch_end(self, state, metrics):
        if state.step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("end", ["success", "failed", "killed"])
def test_a_logger_shaped_as_lightnings_is_taken_given_every_row_and_finalized_with_lightnings_statuses(
    make_mlp, make_batches, make_sgd_state, end
):
    """with_logging required a log_hparams it never calls, so Lightning's loggers (whose name is log_hyperparams)
    were refused, the error telling to pass loopkit's. Such a logger is taken: it is given the rows a plain logger is
    given, finalized "success", "failed" when an error leaves the fit, and "failed" (what Lightning's trainer
    gives, knowing no "killed") when SIGTERM stopped it; having no resume_at, it appends."""

    def loss(model, batch):
        if end == "failed" and loss.calls == 3:
            raise RuntimeError("boom")
        loss.calls += 1
        return loss_with_mae(model, batch)

    loss.calls = 0
    shaped, plain = _LightningShaped(), _Plain()
    shaped.log_hyperparams({"lr": 0.1})
    step = with_logging(train_step(loss), shaped, plain, every_n_steps=1)
    assert step.appending == {0, 1}
    callbacks = [_SigtermAt(2)] if end == "killed" else []
    with pytest.raises(RuntimeError, match="boom") if end == "failed" else contextlib.nullcontext():
        run_epochs(step, make_sgd_state(make_mlp()), make_batches(4), epochs=2, callbacks=callbacks, progress=False)
    assert shaped.rows == plain.rows and len(shaped.rows) == {"success": 10, "failed": 3, "killed": 2}[end]
    assert shaped.statuses == ["success" if end == "success" else "failed"] and shaped.params == {"lr": 0.1}


@pytest.mark.parametrize("relaunch", [False, True])
@pytest.mark.parametrize("outer", ["ema", "pruning"])
def test_a_per_update_transform_outside_a_failed_write_does_its_work_on_that_update(
    outer, relaunch, tmp_path, make_mlp, make_batches, make_sgd_state
):
    """The update's own row fails to be written at a log point under with_ema or with_pruning (whole-step transforms
    acting once per update): the state the error leaves has their work of that update done (the average moved, the
    pruning point pruned), so the fit given it ends as the uninterrupted fit. Reference: the uninterrupted fit's
    parameters and extras (averages, masks). (The work was skipped: the averages missed that update.)"""
    batches = make_batches(6)
    at = 4

    def pipeline(root, fails=None):
        inner = with_logging(train_step(loss_with_mae), _CSVFailingOnce(root, "run", version=0, at=fails),
                             every_n_steps=2)
        if outer == "ema":
            return loopkit.with_ema(inner, decay=0.5)
        return loopkit.with_pruning(inner, 0.5, lambda step: 0.5 if step >= at else 0.0)

    def fit(step, state):
        return run_epochs(step, state, batches, epochs=2, progress=False)[0]

    whole = fit(pipeline(tmp_path / "a"), make_sgd_state(make_mlp()))
    step = pipeline(tmp_path / "b", fails=at)
    with pytest.raises(OSError, match="No space left") as caught:
        fit(step, make_sgd_state(make_mlp()))
    left = loopkit.state_at_error(caught.value)
    assert (left.step, left.batch_index) == (at, at)
    if relaunch:
        left = make_sgd_state(make_mlp(seed=9)).load_state_dict(left.state_dict())
        step = pipeline(tmp_path / "b")
    resumed = fit(step, left)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values(),
                                                 strict=True))
    kept = sorted(k for k in whole.extras if k.startswith(outer[:3]))
    assert kept and sorted(k for k in resumed.extras if k.startswith(outer[:3])) == kept
    for key in kept:
        got, expected = loopkit.tree.tensors(resumed.extras[key]), loopkit.tree.tensors(whole.extras[key])
        assert got and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


class _RaisingOnce(loopkit.Callback):
    """A callback whose on_batch_end raises once, at update ``at`` (set later)."""

    def __init__(self):
        self.at = None

    def on_batch_end(self, state, metrics):
        if state.step == self.at:
            self.at = None
            raise RuntimeError("owed hook failed")


def test_an_owed_batch_end_hook_that_raises_on_the_retry_leaves_no_hook_to_call_twice(
    tmp_path, make_mlp, make_batches, make_sgd_state
):
    """The update's row fails to be written at a log point; on the retry a callback's owed on_batch_end raises after
    another's counted that update: the state the error leaves owes no hook any more (as a batch's failing hook leaves
    it), so a second retry calls none again. Reference: the uninterrupted fit's counts, checkpoints and parameters.
    (The mark stayed while the counters held the first callback's owed call: it counted that update twice.)"""
    batches, at = make_batches(6), 4

    def pipeline(root, fails=None):
        inner = with_logging(train_step(loss_with_mae), _CSVFailingOnce(root, "run", version=0, at=fails), every_n_steps=2)
        return loopkit.with_checkpointing(inner, root / "ckpt", every_n_steps=2, keep_last=None, every_n_epochs=0)

    def fit(step, state, *callbacks):
        return run_epochs(step, state, batches, epochs=2, callbacks=list(callbacks), progress=False)[0]

    def positions(root):
        return [(c.step, c.epoch, c.batch_index) for c in loopkit.checkpoint.list_checkpoints(root / "ckpt")]

    straight = _BatchCounter()
    whole = fit(pipeline(tmp_path / "a"), make_sgd_state(make_mlp()), straight, _RaisingOnce())
    counter, raising = _BatchCounter(), _RaisingOnce()
    step = pipeline(tmp_path / "b", fails=at)
    with pytest.raises(OSError, match="No space left") as caught:
        fit(step, make_sgd_state(make_mlp()), counter, raising)
    raising.at, left = at, loopkit.state_at_error(caught.value)
    with pytest.raises(RuntimeError, match="owed hook failed") as caught:
        fit(step, left, counter, raising)
    resumed = fit(step, loopkit.state_at_error(caught.value), counter, raising)
    assert (counter.batches, counter.seen) == (straight.batches, straight.seen)
    assert positions(tmp_path / "b") == positions(tmp_path / "a")
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True))
