"""with_profiler: torch.profiler traces of the scheduled calls, nothing changed in the results, nothing left running."""

from __future__ import annotations

import json
import os

import pytest
import torch

import loopkit


def _traces(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".pt.trace.json"))


def _events(directory) -> list[dict]:
    (trace,) = _traces(directory)
    with open(os.path.join(directory, trace), encoding="utf-8") as f:
        return json.load(f)["traceEvents"]


def _profiling() -> bool:
    return torch.autograd._profiler_enabled()


def test_the_scheduled_calls_are_traced_and_the_results_are_unchanged(tmp_path, make_mlp, make_batches, mse_loss,
                                                                      make_adam_state, take_snapshot, assert_trees_equal):
    data = make_batches(8)
    plain = loopkit.train_step(mse_loss)
    profiled = loopkit.with_profiler(plain, tmp_path, wait=1, warmup=1, active=2)
    reference, state = make_adam_state(make_mlp(0)), make_adam_state(make_mlp(0))
    on_during = []
    for k, batch in enumerate(data):
        reference, _ = plain(reference, batch)
        before = take_snapshot(state)
        new, metrics = profiled(state, batch)
        assert_trees_equal(take_snapshot(state), before)  # pure, as the step it wraps
        state = new
        on_during.append(_profiling())
        if k == 3:
            assert len(_traces(tmp_path)) == 1 and (tmp_path / "summary.txt").exists()
    assert_trees_equal(take_snapshot(state), take_snapshot(reference))
    # profiling ran from the warm-up to the last active call, then stopped for good
    assert on_during == [False, True, True, False, False, False, False, False]
    assert len(_traces(tmp_path)) == 1
    names = [e.get("name", "") for e in _events(tmp_path)]
    assert sum(n.startswith("ProfilerStep#") for n in names) == 2  # the two active calls
    assert names.count("loopkit.step") == 2 and any(n == "aten::addmm" for n in names)
    summary = (tmp_path / "summary.txt").read_text(encoding="utf-8")
    assert "aten::addmm" in summary and "Self CPU" in summary


def test_a_fit_shorter_than_the_schedule_stops_the_profile_and_writes_it(tmp_path, make_mlp, make_batches, mse_loss,
                                                                         make_sgd_state):
    step = loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path, wait=0, warmup=1, active=100)
    loopkit.run_epochs(step, make_sgd_state(make_mlp(0)), make_batches(3), epochs=1, progress=False)
    assert not _profiling()
    assert sum(e.get("name", "").startswith("ProfilerStep#") for e in _events(tmp_path)) >= 2
    assert "aten::" in (tmp_path / "summary.txt").read_text(encoding="utf-8")


def test_close_ends_a_profile_left_open_by_a_loop_of_ones_own(tmp_path, make_mlp, batches, mse_loss, make_sgd_state):
    step = loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path, wait=0, warmup=1, active=100)
    state = make_sgd_state(make_mlp(0))
    for batch in batches[:3]:
        state, _ = step(state, batch)
    assert _profiling()
    step.close()
    assert not _profiling() and len(_traces(tmp_path)) == 1
    state, _ = step(state, batches[3])  # over: the step runs unprofiled
    assert not _profiling() and len(_traces(tmp_path)) == 1


def _failing_at_second_call(loss, error):
    """``loss``, but raising ``error("boom")`` at its second call."""
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) == 2:
            raise error("boom")
        return loss(model, batch)

    return loss_fn


def test_a_failing_call_stops_the_profile(tmp_path, make_mlp, batches, mse_loss, make_sgd_state):
    loss_fn = _failing_at_second_call(mse_loss, RuntimeError)
    step = loopkit.with_profiler(loopkit.train_step(loss_fn), tmp_path, wait=0, warmup=1, active=2)
    state, _ = step(make_sgd_state(make_mlp(0)), batches[0])
    assert _profiling()  # the next call is recorded
    with pytest.raises(RuntimeError, match="boom"):
        step(state, batches[1])
    assert not _profiling()


def _unwritable(directory) -> None:
    """Make ``directory`` impossible to write a trace into (as a full disk would): a file in its place."""
    import shutil

    shutil.rmtree(directory)
    directory.write_text("not a folder")


def test_a_trace_that_cannot_be_written_leaves_the_updated_state_whole_to_train_on(
    tmp_path, make_mlp, make_batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """Reference: the uninterrupted run of the plain step. The trace's write at the end of the active window (call 3)
    fails after that call's update: the error leaves that update's state (loopkit.state_at_error, as with_logging's
    failed write does), and the fit given it, with the same step (its profile over), ends as the reference."""
    data = make_batches(6)
    reference, _ = loopkit.run_epochs(loopkit.train_step(mse_loss), make_sgd_state(make_mlp(0)), data, epochs=1,
                                      progress=False)
    step = loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path / "prof", wait=0, warmup=1, active=2)
    _unwritable(tmp_path / "prof")
    with pytest.raises(RuntimeError) as error:
        loopkit.run_epochs(step, make_sgd_state(make_mlp(0)), data, epochs=1, progress=False)
    kept = loopkit.state_at_error(error.value)
    assert kept is not None and (kept.step, kept.batch_index) == (3, 3)
    assert not _profiling()
    assert any("with_profiler: writing the profile" in note for note in error.value.__notes__)
    resumed, _ = loopkit.run_epochs(step, kept, data, epochs=1, progress=False)
    assert resumed.step == 6
    assert_trees_equal(take_snapshot(resumed), take_snapshot(reference))


class _Rows:
    """A logger that keeps the rows it is given: ``rows`` is a list of ``(step, metrics)``."""

    def __init__(self):
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def log_hparams(self, *args, **kwargs):
        pass

    def finalize(self, *args):
        pass


@pytest.mark.parametrize("every_n_steps", [1, 2, 3])
def test_a_trace_that_cannot_be_written_keeps_that_calls_metrics_in_the_epoch_means_and_the_logged_rows(
    tmp_path, make_mlp, make_batches, mse_loss, make_sgd_state, every_n_steps
):
    """Reference: the uninterrupted run of with_logging around the plain step. The trace's write fails after call 3's
    update (a log point, or not, by every_n_steps): the fit given loopkit.state_at_error's state logs the rows and
    records the epoch means of the reference, call 3's metrics among them."""
    data = make_batches(6)
    ref_rows = _Rows()
    _, ref_history = loopkit.run_epochs(loopkit.with_logging(loopkit.train_step(mse_loss), ref_rows,
                                                             every_n_steps=every_n_steps),
                                        make_sgd_state(make_mlp(0)), data, epochs=1, progress=False)
    rows = _Rows()
    profiled = loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path / "prof", wait=0, warmup=1, active=2)
    step = loopkit.with_logging(profiled, rows, every_n_steps=every_n_steps)
    _unwritable(tmp_path / "prof")
    with pytest.raises(RuntimeError) as error:
        loopkit.run_epochs(step, make_sgd_state(make_mlp(0)), data, epochs=1, progress=False)
    kept = loopkit.state_at_error(error.value)
    assert kept is not None and kept.step == 3
    _, history = loopkit.run_epochs(step, kept, data, epochs=1, progress=False)
    assert [s for s, _ in rows.rows] == [s for s, _ in ref_rows.rows]
    for (_, got), (_, want) in zip(rows.rows, ref_rows.rows):
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(want[k], rel=1e-6) for k in want)
    assert history[0]["train/loss"] == pytest.approx(ref_history[0]["train/loss"], rel=1e-6)


def test_a_trace_that_cannot_be_written_after_a_failing_call_leaves_that_calls_error(tmp_path, make_mlp, batches,
                                                                                      mse_loss, make_sgd_state):
    """The loss_fn's error is the one raised (state_at_error: the state before it), the failed write a note on it."""
    loss_fn = _failing_at_second_call(mse_loss, ValueError)
    step = loopkit.with_profiler(loopkit.train_step(loss_fn), tmp_path / "prof", wait=0, warmup=1, active=2)
    _unwritable(tmp_path / "prof")
    with pytest.raises(ValueError, match="boom") as error:
        loopkit.run_epochs(step, make_sgd_state(make_mlp(0)), batches, epochs=1, progress=False)
    assert not _profiling()
    assert any("stopping the profile after this error failed too" in note for note in error.value.__notes__)
    assert loopkit.state_at_error(error.value).step == 1


def test_an_eval_step_can_be_profiled(tmp_path, make_mlp, batches, mse_loss, make_sgd_state):
    evaluator = loopkit.with_profiler(loopkit.eval_step(lambda m, b: {"mse": mse_loss(m, b)}), tmp_path, wait=0, warmup=1, active=2)
    state = make_sgd_state(make_mlp(0))
    plain = loopkit.evaluate(loopkit.eval_step(lambda m, b: {"mse": mse_loss(m, b)}), state, batches)
    assert loopkit.evaluate(evaluator, state, batches) == plain
    assert not _profiling() and len(_traces(tmp_path)) == 1


def test_evaluate_shorter_than_the_schedule_stops_the_profile_and_writes_it(tmp_path, make_mlp, batches, mse_loss,
                                                                         make_sgd_state):
    """evaluate tells the step it ended: a profile it left open would crash the interpreter at exit."""
    evaluator = loopkit.with_profiler(loopkit.eval_step(lambda m, b: {"mse": mse_loss(m, b)}), tmp_path)
    loopkit.evaluate(evaluator, make_sgd_state(make_mlp(0)), batches[:3])  # 3 calls of a 5-call schedule
    assert not _profiling() and len(_traces(tmp_path)) == 1


_SHORT_LOOP = """
import sys, torch, loopkit
model = torch.nn.Linear(2, 1)
state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
step = loopkit.with_profiler(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), sys.argv[1])
for _ in range(3):  # a 5-call schedule, and no close()
    if sys.argv[2] == "donated":  # each call on a new donated copy of the step, gone after it
        state, _ = loopkit.donate(step)(state, torch.ones(4, 2))
    else:
        state, _ = step(state, torch.ones(4, 2))
"""


@pytest.mark.parametrize("how", ["held", "donated"])
def test_a_loop_of_ones_own_that_ends_mid_schedule_without_close_exits_cleanly_with_its_trace(tmp_path, how):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SHORT_LOOP, str(tmp_path), how], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # a profiler still running at shutdown crashed it (rc -11)
    assert len(_traces(tmp_path)) == 1


def test_a_profiled_step_cannot_be_profiled_again(tmp_path, mse_loss):
    """Nested profiles overlap, which torch.profiler cannot do (it raises, then crashes): refused when built."""
    inner = loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path / "a")
    with pytest.raises(TypeError, match="with_profiler cannot wrap with_profiler"):
        loopkit.with_profiler(inner, tmp_path / "b")
    with pytest.raises(TypeError, match="with_profiler cannot wrap with_profiler"):
        loopkit.with_profiler(loopkit.with_logging(inner, loopkit.ConsoleLogger()), tmp_path / "c")  # at any depth


def test_a_profiled_validation_step_is_closed_when_the_fit_ends(tmp_path, make_mlp, batches, mse_loss, make_sgd_state):
    evaluator = loopkit.with_profiler(loopkit.eval_step(lambda m, b: {"mse": mse_loss(m, b)}), tmp_path,
                                      wait=0, warmup=1, active=100)
    loopkit.run_epochs(loopkit.train_step(mse_loss), make_sgd_state(make_mlp(0)), batches[:4], epochs=1,
                       val=(evaluator, batches[4:]), sanity_val_batches=0, progress=False)
    assert not _profiling() and len(_traces(tmp_path)) == 1  # the schedule was not done: fit_end stopped it


def test_profiling_both_the_train_and_the_validation_step_is_refused(tmp_path, make_mlp, batches, mse_loss, make_sgd_state):
    state = make_sgd_state(make_mlp(0))
    step = loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path / "train")
    evaluator = loopkit.with_profiler(loopkit.eval_step(lambda m, b: {"mse": mse_loss(m, b)}), tmp_path / "val")
    with pytest.raises(ValueError, match="profile one of them"):
        loopkit.run_epochs(step, state, batches, epochs=1, val=(evaluator, batches), progress=False)
    state.check_usable()  # refused before anything ran


def test_a_fit_inside_another_torch_profiler_is_refused_leaving_the_state_usable(tmp_path, make_mlp, batches,
                                                                                   mse_loss, make_sgd_state):
    state = make_sgd_state(make_mlp(0))
    step = loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path)
    with torch.profiler.profile():
        with pytest.raises(RuntimeError, match="another torch profiler is running") as error:
            loopkit.run_epochs(step, state, batches, epochs=1, progress=False)
    state.check_usable()  # refused before the step ran
    assert loopkit.state_at_error(error.value) is state


@pytest.mark.parametrize(
    "options, match",
    [({"wait": -1}, "wait"), ({"warmup": 1.5}, "warmup"), ({"active": 0}, "active"), ({"active": True}, "active")],
)
def test_bad_options_are_refused_by_name(tmp_path, mse_loss, options, match):
    with pytest.raises(ValueError, match=f"with_profiler: {match} must be"):
        loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path, **options)


@pytest.mark.parametrize("flag", ["record_shapes", "profile_memory", "with_stack"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_flag_that_is_not_a_bool_is_refused_by_name(tmp_path, mse_loss, flag, value):
    """(Any value was taken as its truth: record_shapes="no" recorded them.)"""
    with pytest.raises(TypeError, match=f"with_profiler: {flag} must be True or False, got {value!r}"):
        loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path, **{flag: value})


def test_a_directory_under_a_file_is_refused_naming_with_profiler_and_the_file(tmp_path, mse_loss):
    """(It was pathlib's bare NotADirectoryError, naming neither.)"""
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"with_profiler: cannot make the folder '.*prof' for its traces: "
                                                 rf"'{tmp_path / 'file'}' is a file"):
        loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path / "file" / "deeper" / "prof")


def test_bad_steps_and_directories_are_refused(tmp_path, mse_loss):
    with pytest.raises(TypeError, match="directory must be a path"):
        loopkit.with_profiler(loopkit.train_step(mse_loss), 3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path / "file")
    with pytest.raises(TypeError, match="with_profiler cannot wrap a donated step"):
        loopkit.with_profiler(loopkit.donate(loopkit.train_step(mse_loss)), tmp_path)
    with pytest.raises(TypeError, match="with_grad_clip cannot wrap with_profiler"):
        loopkit.with_grad_clip(loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path), max_norm=1.0)


def _profile_two_calls(directory, **options) -> tuple[list[dict], str]:
    """One warm-up call and one recorded call of a linear layer on a (4, 2) batch: the trace's events and the summary."""
    model = torch.nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.with_profiler(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), directory, wait=0, warmup=1,
                                 active=1, **options)
    for _ in range(2):
        state, _ = step(state, torch.ones(4, 2))
    assert not _profiling()
    return _events(directory), (directory / "summary.txt").read_text(encoding="utf-8")


def _shows(option: str, events: list[dict], summary: str) -> bool:
    """Whether the trace (and summary) show what ``option`` asks torch.profiler to record."""
    if option == "record_shapes":  # each operator's input shapes: addmm(bias, x, weight.T)
        return any(e.get("name") == "aten::addmm" and e.get("args", {}).get("Input Dims", [])[:3] == [[1], [4, 2], [2, 1]]
                   for e in events)
    if option == "profile_memory":  # allocation events, and the summary's memory columns
        return any(e.get("name") == "[memory]" and "Bytes" in e.get("args", {}) for e in events) and "CPU Mem" in summary
    return any(e.get("cat") == "python_function" for e in events)  # with_stack: the Python calls


@pytest.mark.parametrize("option", ["record_shapes", "profile_memory", "with_stack"])
def test_each_recording_option_reaches_torch_profiler_and_is_off_by_default(tmp_path, option):
    events, summary = _profile_two_calls(tmp_path / "on", **{option: True})
    assert _shows(option, events, summary)
    assert any(e.get("name") == "aten::addmm" for e in events)  # (the recorded call is there either way)
    events, summary = _profile_two_calls(tmp_path / "off")
    assert any(e.get("name") == "aten::addmm" for e in events)
    assert not _shows(option, events, summary)
    events, summary = _profile_two_calls(tmp_path / "false", **{option: False})
    assert not _shows(option, events, summary)


@pytest.mark.parametrize(("wait", "warmup", "calls", "summary"),
                         [(0, 1, 1, False), (1, 1, 1, False), (1, 1, 2, False), (1, 1, 3, True), (0, 1, 2, True)])
def test_a_summary_is_written_only_when_a_call_was_recorded(tmp_path, make_mlp, batches, mse_loss, make_sgd_state,
                                                            wait, warmup, calls, summary):
    """Stopped in the wait or the warm-up (close() in a loop of one's own): no call was recorded, no summary."""
    step = loopkit.with_profiler(loopkit.train_step(mse_loss), tmp_path, wait=wait, warmup=warmup, active=3)
    state = make_sgd_state(make_mlp(0))
    for batch in batches[:calls]:
        state, _ = step(state, batch)
    step.close()
    assert not _profiling()
    assert (tmp_path / "summary.txt").exists() == summary
    if summary:
        assert "aten::addmm" in (tmp_path / "summary.txt").read_text(encoding="utf-8")
