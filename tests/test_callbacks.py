"""Tests of loopkit.callbacks under run_epochs: hook order, EarlyStopping, LearningRateMonitor.

References: scripted validation values with hand-counted stopping epochs, Lightning 2.6's
EarlyStopping rule written out in float32 torch ops (``lightning_early_stopping``), learning
rates computed by hand from the scheduler's formula (exact powers of two), and what Lightning 2.6.6's
LearningRateMonitor logged (recorded from its runs).
"""

from __future__ import annotations

import copy
import datetime
import os
import re
import warnings

import pytest
import torch
from torch import nn

import loopkit
from loopkit import TrainState, run_epochs, train_step
from tests._driver_helpers import (Counter, CrashAfterStep, LatestTrainLoss, Recorder, counting_eval, make_data, make_state,
                                   mse, scripted_loss)



# --- hooks ---------------------------------------------------------------------------------------


def test_hook_order():
    rec = Recorder()
    ev, _ = counting_eval()
    run_epochs(train_step(mse), make_state(), make_data(3), epochs=2, val=(ev, make_data(2, seed=1)),
               callbacks=[rec], progress=False)
    epoch = ["epoch_start", "batch_end", "batch_end", "batch_end", "validation_end", "epoch_end"]
    assert rec.events == ["fit_start"] + epoch + epoch + ["fit_end"]


def test_hooks_may_be_partial_and_see_the_live_state():
    class OnlyBatches:
        def __init__(self):
            self.steps = []

        def on_batch_end(self, state, metrics):
            self.steps.append((state.step, state.batch_index))

    cb = OnlyBatches()
    run_epochs(train_step(mse), make_state(), make_data(3), epochs=2, callbacks=[cb], progress=False)
    assert cb.steps == [(1, 1), (2, 2), (3, 3), (4, 1), (5, 2), (6, 3)]


def test_on_epoch_end_extras_go_into_the_history():
    class Extra(loopkit.Callback):
        def on_epoch_end(self, state, metrics):
            return {"custom": float(state.epoch) * 10}

    _, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=2, callbacks=[Extra()], progress=False)
    assert [h["custom"] for h in history] == [10.0, 20.0]


# --- EarlyStopping ------------------------------------------------------------------------------


def scripted_val(values_by_epoch: dict[int, float], key: str = "score"):
    """An eval step (a plain function) whose metric is fixed by the state's epoch."""

    def step(state, batch):
        return state, {key: torch.tensor(values_by_epoch.get(state.epoch, 0.0))}

    return step


def run_with_stopper(values: dict[int, float], stopper, epochs: int = 10):
    loss = Counter(mse)
    state, history = run_epochs(train_step(loss), make_state(), make_data(2), epochs=epochs,
                                val=(scripted_val(values), [0]), callbacks=[stopper], progress=False)
    return state, history, loss


def test_early_stopping_after_patience_non_improving_validations():
    stopper = loopkit.EarlyStopping("val/score", patience=2)
    state, history, loss = run_with_stopper({1: 1.0, 2: 0.9, 3: 0.95, 4: 0.91, 5: 0.5}, stopper)
    assert len(history) == 4 and state.epoch == 4 and loss.calls == 8
    assert stopper.best == pytest.approx(0.9) and stopper.should_stop


def test_early_stopping_improvement_resets_patience():
    stopper = loopkit.EarlyStopping("val/score", patience=2)
    _, history, _ = run_with_stopper({1: 1.0, 2: 1.1, 3: 0.9, 4: 1.0, 5: 0.8, 6: 0.85, 7: 0.85}, stopper)
    assert len(history) == 7


def test_early_stopping_min_delta():
    values = {1: 1.0, 2: 0.95, 3: 0.92, 4: 0.5}
    _, history, _ = run_with_stopper(values, loopkit.EarlyStopping("val/score", patience=2, min_delta=0.1))
    assert len(history) == 3
    _, history, _ = run_with_stopper(values, loopkit.EarlyStopping("val/score", patience=2), epochs=4)
    assert len(history) == 4  # without min_delta every value improves


def test_early_stopping_mode_max():
    values = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.7, 5: 0.9}
    _, history, _ = run_with_stopper(values, loopkit.EarlyStopping("val/score", patience=2, mode="max"))
    assert len(history) == 4
    _, history, _ = run_with_stopper(values, loopkit.EarlyStopping("val/score", patience=2, mode="min"))
    assert len(history) == 3


class EpochEndStopping(loopkit.EarlyStopping):
    """docs/from_lightning.md's recipe for Lightning's EarlyStopping(check_on_train_epoch_end=True)."""

    def on_validation_end(self, state, metrics):
        pass

    def on_epoch_end(self, state, record):
        if self.monitor in record:
            self.check(state, record[self.monitor])


def test_the_guides_check_on_train_epoch_end_recipe_checks_each_epochs_latest_validation_once():
    """Lightning's check_on_train_epoch_end=True with validations every 2 of an epoch's 4 updates: one check an
    epoch, of its latest validation's value. Reference: a plain EarlyStopping validated at the epochs' ends alone
    (the same values: 4.0, 3.0, 3.5, 3.75, no improvement twice: stopped after epoch 3); the plain one validated
    mid-epoch too sees the better mid-epoch values and stops in the next epoch."""
    values = {2: 5.0, 4: 4.0, 6: 1.0, 8: 3.0, 10: 0.5, 12: 3.5, 14: 0.25, 16: 3.75}

    def fit(stopper, **every):
        def val(state, batch):
            return state, {"score": torch.tensor(values.get(state.step, 9.0))}

        state, history = run_epochs(train_step(mse), make_state(), make_data(4), epochs=8, val=(val, [0]),
                                    callbacks=[stopper], progress=False, **every)
        return state.epoch, stopper.best, [h.get("val/score") for h in history]

    recipe = fit(EpochEndStopping("val/score", patience=2), val_every_n_steps=2)
    reference = fit(loopkit.EarlyStopping("val/score", patience=2))
    assert recipe == reference == (4, 3.0, [4.0, 3.0, 3.5, 3.75])
    plain = fit(loopkit.EarlyStopping("val/score", patience=2), val_every_n_steps=2)  # best 0.25 (step 14), then
    assert plain == (4, 0.25, [4.0, 3.0, 3.5, 3.75, 9.0])  # 3.75 and 9.0 (step 18): stopped in epoch 4


@pytest.mark.parametrize(("accumulate", "stopped_after"), [(1, 4), (2, 2)])
def test_the_guides_latest_train_loss_recipe_checks_a_train_monitor_after_each_validation_as_lightnings_default(
    accumulate, stopped_after
):
    """Lightning's EarlyStopping(monitor="train_loss") (check_on_train_epoch_end=None) in a fit validating twice an
    epoch (val_check_interval=0.5; 4 batches an epoch) checks after each validation, with the latest step's loss:
    1.0 after batch 2, 1.1 after batch 4, no improvement, so patience=1 stops in epoch 0 (Lightning 2.6.6 measured:
    global_step 4, stopped_epoch 0; under accumulate_grad_batches=2 global_step 2). docs/from_lightning.md's recipe,
    LatestTrainLoss before EarlyStopping("val/train_loss"), stops there; a plain EarlyStopping("train/loss") checks
    the epochs' means at their ends, better each epoch, and trains all 4 epochs (the difference the guide states)."""

    def fit(*callbacks):
        step = train_step(scripted_loss())
        if accumulate > 1:
            step = loopkit.with_grad_accum(step, every=accumulate)
        state, _ = run_epochs(step, make_state(), make_data(4), epochs=4, val=(counting_eval()[0], make_data(1)),
                              val_every_n_steps=2 // accumulate, sanity_val_batches=0, callbacks=list(callbacks),
                              progress=False)
        return state.step, callbacks[-1].stopped_epoch

    assert fit(LatestTrainLoss(), loopkit.EarlyStopping("val/train_loss", patience=1)) == (stopped_after, 0)
    assert fit(loopkit.EarlyStopping("train/loss", patience=1)) == (16 // accumulate, 0)


def test_early_stopping_stops_on_nan():
    stopper = loopkit.EarlyStopping("val/score", patience=5)
    _, history, _ = run_with_stopper({1: 1.0, 2: 0.5, 3: float("nan"), 4: 0.1}, stopper)
    assert len(history) == 3 and stopper.stopped_at == 2 == history[-1]["epoch"]


def test_early_stopping_on_a_train_metric():
    # a learning rate of 0 keeps the loss constant: it never improves after the first epoch
    stopper = loopkit.EarlyStopping("train/loss", patience=2)
    state, history = run_epochs(train_step(mse), make_state(lr=0.0), make_data(2), epochs=10,
                                callbacks=[stopper], progress=False)
    assert len(history) == 3


def test_early_stopping_mid_epoch_with_step_validation():
    stopper = loopkit.EarlyStopping("val/score", patience=1)

    def val(state, batch):  # worse after every update
        return state, {"score": torch.tensor(float(state.step))}

    state, history = run_epochs(train_step(mse), make_state(), make_data(10), epochs=3, val=(val, [0]),
                                val_every_n_steps=2, callbacks=[stopper], progress=False)
    assert state.step == 4 and state.epoch == 0 and len(history) == 1
    assert stopper.stopped_epoch == stopper.stopped_at == 0  # the epoch the validation ran in, as Lightning's


@pytest.mark.parametrize("every_n_steps", [None, 3])
def test_early_stopping_stopped_epoch_is_the_epoch_whose_check_asked_as_lightnings(every_n_steps):
    """Lightning's ``stopped_epoch`` is the trainer's ``current_epoch`` at the check that stops (0 before): the epoch
    a validation at an epoch's end closes, where the state counts that epoch done already (it was one more). With
    validations at step 3, 6, 9 (4 batches an epoch) the third asks, in epoch 2; at the epochs' ends the fourth, of
    epoch 3. ``wait_count``/``best_score`` are Lightning's names of ``wait``/``best``; a checkpoint keeps the epoch."""
    stopper = loopkit.EarlyStopping("val/score", patience=2)
    assert (stopper.stopped_epoch, stopper.stopped_at) == (0, None)
    scores = {1: 1.0, 2: 0.9, 3: 0.95, 4: 0.91, 5: 0.5}

    def val(state, batch):  # the n-th validation's score: n by the step (step validations) or by the epochs done
        n = state.step // 3 if every_n_steps else state.epoch
        return state, {"score": torch.tensor(scores.get(n + (1 if every_n_steps else 0), 0.0))}

    options = {"val_every_n_steps": every_n_steps, "val_every_n_epochs": None} if every_n_steps else {}
    state, history = run_epochs(train_step(mse), make_state(), make_data(4), epochs=6, val=(val, [0]),
                                callbacks=[stopper], progress=False, **options)
    expected = 2 if every_n_steps else 3
    assert stopper.should_stop and stopper.stopped_epoch == stopper.stopped_at == expected == history[-1]["epoch"]
    assert stopper.wait_count == stopper.wait == 2
    assert stopper.best_score.dtype == torch.float32 and float(stopper.best_score) == stopper.best == float(torch.tensor(0.9))
    again = loopkit.EarlyStopping("val/score", patience=2)
    again.load_state_dict(stopper.state_dict())
    assert again.stopped_epoch == expected


def test_early_stopping_stopped_epoch_under_min_epochs_is_the_epoch_the_fit_stopped_at():
    """min_epochs holds a stop off; each later check that asks moves stopped_epoch on, as Lightning's (it kept the
    first check that asked, epoch 1): the epoch of the fit's last record, in an uninterrupted fit and in one resumed
    from a state saved between two checks that ask (the callback's counters travel in the state)."""
    scores = {0: 0.0, 1: 1.0, 2: 1.1, 3: 1.2, 4: 1.3, 5: 1.4}  # (0: the sanity check) worse at every check from the
    # second: each asks

    def val(state, batch):
        return state, {"score": torch.tensor(scores[state.epoch])}

    def fit(state, stopper, **options):
        return run_epochs(train_step(mse), state, make_data(4), epochs=8, min_epochs=4, val=(val, [0]),
                          callbacks=[stopper], progress=False, **options)

    stopper = loopkit.EarlyStopping("val/score", patience=1)
    _, history = fit(make_state(), stopper)
    assert stopper.should_stop and stopper.stopped_epoch == history[-1]["epoch"] == 3
    first = loopkit.EarlyStopping("val/score", patience=1)
    halfway, _ = fit(make_state(), first, max_steps=12)  # (3 epochs: two checks asked, epochs 1 and 2)
    assert first.stopped_epoch == 2
    resumed = loopkit.EarlyStopping("val/score", patience=1)
    _, rest = fit(halfway, resumed)
    assert resumed.stopped_epoch == rest[-1]["epoch"] == 3 and resumed.state_dict() == stopper.state_dict()


def test_early_stopping_missing_monitor_raises_key_error_naming_it():
    stopper = loopkit.EarlyStopping("val/acc", patience=2)
    with pytest.raises(KeyError, match="val/acc") as info, pytest.warns(RuntimeWarning, match="sanity validation did not report"):
        run_with_stopper({1: 1.0}, stopper)
    assert "val/score" in str(info.value)  # lists what there is


@pytest.mark.parametrize("no_val", [dict(), dict(val="given", limit_val_batches=0)], ids=["val=None", "limit 0"])
def test_a_validation_monitor_in_a_fit_without_validation_is_refused_before_training(no_val, tmp_path):
    """As Lightning's strict monitors: an EarlyStopping that would never stop, or a best checkpoint
    never kept, is an error when the fit starts (before, both were silently inert)."""
    if no_val.get("val") == "given":
        no_val = dict(no_val, val=counting_eval()[0:1] + (make_data(2, seed=1),))
    watchers = (
        (dict(callbacks=[loopkit.EarlyStopping("val/loss", patience=1)]), lambda s: s, "EarlyStopping"),
        (dict(), lambda s: loopkit.with_checkpointing(s, tmp_path, monitor="val/loss"), "with_checkpointing"),
    )
    for options, wrap, name in watchers:
        loss = Counter(mse)
        step = wrap(train_step(loss))
        state = make_state()
        with pytest.raises(ValueError, match=f"{name} monitors 'val/loss', but this fit has no validation"):
            run_epochs(step, state, make_data(3), epochs=2, progress=False, **options, **no_val)
        state.check_usable()
        assert loss.calls == 0
    # a train/ metric needs no validation
    run_epochs(train_step(mse), make_state(), make_data(3), epochs=2, progress=False,
               callbacks=[loopkit.EarlyStopping("train/loss", patience=1)])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"mode": "avg"}, "mode"), ({"patience": -1}, "patience"), ({"min_delta": float("nan")}, "min_delta"),
     ({"min_delta": float("-inf")}, "min_delta"), ({"min_delta": "0.1"}, "min_delta")],
)
def test_early_stopping_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        loopkit.EarlyStopping("val/loss", **kwargs)


def test_early_stopping_state_dict_round_trip():
    a = loopkit.EarlyStopping("val/loss", patience=3)
    a.on_validation_end(None, {"val/loss": 1.0})
    a.on_validation_end(None, {"val/loss": 2.0})
    b = loopkit.EarlyStopping("val/loss", patience=3)
    b.load_state_dict(a.state_dict())
    assert (b.best, b.wait, b.should_stop) == (1.0, 1, False)


def lightning_early_stopping(values, *, mode, patience, min_delta, check_finite=True, stopping_threshold=None,
                             divergence_threshold=None):
    """Lightning 2.6's ``EarlyStopping._evaluate_stopping_criteria``, written out:
    the metric is the float32 tensor ``self.log`` makes of it, ``min_delta`` is negated for "min",
    improved is ``monitor_op(current - min_delta, best)``, all in float32, and an improvement makes
    ``current`` the best; before that, a non-finite value (``check_finite``), one past
    ``stopping_threshold`` (``monitor_op(current, threshold)``) or past ``divergence_threshold``
    (``monitor_op(-current, -threshold)``) stops. Returns ``(should_stop, wait, best)`` after each check, up to the stop."""
    monitor_op = torch.lt if mode == "min" else torch.gt
    signed_delta = min_delta * (1 if monitor_op == torch.gt else -1)
    best = torch.tensor(torch.inf) if monitor_op == torch.lt else -torch.tensor(torch.inf)
    wait, trace = 0, []
    for value in values:
        current = torch.tensor(value)  # float32, as Lightning logs a Python float
        assert current.dtype == torch.float32 and best.dtype == torch.float32
        should_stop = False
        if check_finite and not torch.isfinite(current):
            should_stop = True
        elif stopping_threshold is not None and monitor_op(current, stopping_threshold):
            should_stop = True
        elif divergence_threshold is not None and monitor_op(-current, -divergence_threshold):
            should_stop = True
        elif monitor_op(current - signed_delta, best):
            best, wait = current, 0
        else:
            wait += 1
            should_stop = wait >= patience
        trace.append((should_stop, wait, float(best)))
        if should_stop:
            break
    return trace


def loopkit_early_stopping_trace(stopper, values):
    trace = []
    for value in values:
        stopper.on_validation_end(None, {stopper.monitor: value})
        trace.append((stopper.should_stop, stopper.wait, stopper.best))
        if stopper.should_stop:
            break
    return trace


def boundary_sequences(mode):
    """Runs of values whose changes are nominally min_delta (and 2 * min_delta, and none): the
    boundary where float64 and Lightning's float32 arithmetic disagree."""
    sign = -1.0 if mode == "min" else 1.0
    for min_delta in (0.1, 0.3, 0.05, 0.2, 0.25, 0.7, 1e-3, 0.15):
        for start in (1.0, 0.0, -0.5, 3.7, 0.123, 100.0):
            yield min_delta, [start + sign * k * min_delta for k in range(6)]  # start, start -/+ d, ...
            yield min_delta, [start + sign * k * 2 * min_delta for k in range(6)]  # twice the margin: all improve
            steps = [0.0, min_delta, 2 * min_delta, min_delta, 0.0, min_delta]
            values = [start]
            for step in steps:
                values.append(values[-1] + sign * step)
            yield min_delta, values


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("patience", [0, 1, 2])  # (0, accepted by Lightning: stop at the first check without improvement)
def test_early_stopping_decides_improvement_as_lightning_does_at_the_min_delta_boundary(mode, patience):
    """A change of nominally min_delta is no improvement when Lightning's float32 arithmetic says so
    (1.0 then 0.9 with min_delta=0.1 in "min": 0.9 + 0.1 is 1.0 in float32, not below it); loopkit
    decided in float64 (0.9 < 1.0 - 0.1) and trained longer."""
    compared = 0
    for min_delta, values in boundary_sequences(mode):
        expected = lightning_early_stopping(values, mode=mode, patience=patience, min_delta=min_delta)
        # the values as given, and as run_epochs hands a validation's float32 mean over (a Python float)
        for given in (values, [float(torch.tensor(v)) for v in values]):
            stopper = loopkit.EarlyStopping("val/loss", patience=patience, mode=mode, min_delta=min_delta)
            assert loopkit_early_stopping_trace(stopper, given) == expected, (min_delta, given)
        compared += 1
    assert compared == 8 * 6 * 3
    # the tester's cases, by hand: both stop at the second check
    for values, mode_, min_delta in (([1.0, 0.9, 0.8, 0.7], "min", 0.1), ([0.0, 0.1, 0.2, 0.3], "max", 0.1)):
        stopper = loopkit.EarlyStopping("val/loss", patience=1, mode=mode_, min_delta=min_delta)
        assert [s for s, _, _ in loopkit_early_stopping_trace(stopper, values)] == [False, True]
        assert stopper.best == float(torch.tensor(values[0]))


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_negative_min_delta_is_a_tolerance_as_in_lightning(mode):
    """Lightning accepts min_delta < 0: a value up to -min_delta worse still improves (and becomes the best).
    loopkit refused it, so a ported EarlyStopping(min_delta=-0.5) failed to construct."""
    losses = [5.0, 4.0, 4.3, 4.2, 4.6, 4.9, 5.5, 6.0]
    values = losses if mode == "min" else [-v for v in losses]
    expected = lightning_early_stopping(values, mode=mode, patience=1, min_delta=-0.5)
    stopper = loopkit.EarlyStopping("val/loss", patience=1, mode=mode, min_delta=-0.5)
    assert loopkit_early_stopping_trace(stopper, values) == expected
    # by hand: 4.3 (0.3 worse than 4.0) ... 4.9 each improve within the tolerance; 5.5 (0.6 worse) is the first
    # that does not, so the 7th check stops with 4.9 the best
    assert len(expected) == 7 and expected[-1] == (True, 1, float(torch.tensor(values[5])))
    state, history, _ = run_with_stopper({i + 1: v for i, v in enumerate(values)},
                                         loopkit.EarlyStopping("val/score", patience=1, mode=mode, min_delta=-0.5),
                                         epochs=len(values))
    assert len(history) == state.epoch == 7


def test_run_epochs_with_early_stopping_trains_as_many_epochs_as_lightning():
    """The tester's runs (Lightning 2.6.6 trained 2 epochs in each; loopkit 3, 3, 5 and 2): the same
    values through a validation (a float32 metric, its mean a Python float) stop at Lightning's epoch."""
    runs = [([1.0, 0.9, 0.8, 0.7, 0.6], "min", 0.1), ([1.0, 0.7, 0.4, 0.1, -0.2], "min", 0.3),
            ([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], "max", 0.1),
            ([0.5, 0.75, 1.0, 1.25], "max", 0.25)]  # exactly representable: the two always agreed
    for values, mode, min_delta in runs:
        expected = lightning_early_stopping(values, mode=mode, patience=1, min_delta=min_delta)
        stopper = loopkit.EarlyStopping("val/score", patience=1, mode=mode, min_delta=min_delta)
        state, history, _ = run_with_stopper({i + 1: v for i, v in enumerate(values)}, stopper, epochs=len(values))
        assert len(expected) == 2 and expected[-1][0]  # Lightning: the second validation stops it
        assert (len(history), state.epoch, stopper.should_stop) == (2, 2, True), values
        assert (stopper.wait, stopper.best) == expected[-1][1:]


def test_an_early_stopping_state_from_an_older_checkpoint_loads_and_decides_as_lightning():
    """Older runs kept ``best`` as the float64 value they compared; it still loads (the same keys), and
    the checks after it compare with its float32 rounding, as Lightning's float32 ``best_score``."""
    def f32(value):  # a validation's float32 mean, as run_epochs hands it over
        return float(torch.tensor(value))

    old = {"best": 1.0, "wait": 0, "should_stop": False}  # a state_dict as older versions wrote it
    stopper = loopkit.EarlyStopping("val/loss", patience=2, min_delta=0.1)
    stopper.load_state_dict(old)
    assert stopper.state_dict() == old
    stopper.on_validation_end(None, {"val/loss": f32(0.9)})  # 0.9 + 0.1 == 1.0 in float32: no improvement
    assert (stopper.best, stopper.wait, stopper.should_stop) == (1.0, 1, False)
    stopper.on_validation_end(None, {"val/loss": f32(0.8)})
    assert (stopper.best, stopper.wait, stopper.should_stop) == (f32(0.8), 0, False)
    assert isinstance(stopper.state_dict()["best"], float)

    for best, value in ((0.9, 0.8), (0.3, 0.2), (0.7, 0.4), (0.123, 0.023)):  # float64 bests, not float32 values
        stopper = loopkit.EarlyStopping("val/loss", patience=2, min_delta=0.1)
        stopper.load_state_dict({"best": best, "wait": 0, "should_stop": False})
        stopper.on_validation_end(None, {"val/loss": value})
        expected = lightning_early_stopping([best, value], mode="min", patience=2, min_delta=0.1)[-1]
        assert (stopper.should_stop, stopper.wait) == expected[:2], (best, value)


class _CrashAtEpoch(loopkit.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_start(self, state):
        if state.epoch == self.epoch:
            raise RuntimeError("simulated crash")


class _Tally(loopkit.Callback):
    def __init__(self, value=0):
        self.value = value

    def on_epoch_end(self, state, metrics):
        self.value += 1

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, sd):
        self.value = int(sd["value"])


def test_early_stopping_resumed_from_a_checkpoint_stops_where_the_uninterrupted_run_stops(tmp_path):
    values = {1: 1.0, 2: 0.9, 3: 0.95, 4: 0.93, 5: 0.92, 6: 0.1, 7: 0.05}  # best at 2; patience 3 ends it at 5
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_epochs=1)

    whole, whole_history, _ = run_with_stopper(values, loopkit.EarlyStopping("val/score", patience=3))
    assert (len(whole_history), whole.epoch) == (5, 5)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_epochs(step, make_state(), make_data(2), epochs=10, val=(scripted_val(values), [0]),
                   callbacks=[loopkit.EarlyStopping("val/score", patience=3), _CrashAtEpoch(3)], progress=False)
    restored = loopkit.restore(make_state(), tmp_path)
    assert restored.epoch == 3
    best = torch.tensor(0.9).item()  # the validation's float32 mean
    assert dict(restored.extras["callbacks/EarlyStopping[val/score,min]"]) == {"best": best, "wait": 1, "should_stop": False}
    fresh = loopkit.EarlyStopping("val/score", patience=3)
    resumed, history = run_epochs(step, restored, make_data(2), epochs=10, val=(scripted_val(values), [0]),
                                  callbacks=[fresh], progress=False)
    assert (resumed.epoch, len(history)) == (5, 2)  # the same stop as the uninterrupted run
    assert (fresh.best, fresh.wait, fresh.should_stop) == (best, 3, True)
    assert torch.equal(resumed.model[0].weight, whole.model[0].weight)


def test_early_stopping_held_off_by_min_epochs_stops_there_though_the_monitor_improved_and_so_does_a_resumed_run(tmp_path):
    """Lightning's EarlyStopping sets ``trainer.should_stop = trainer.should_stop or should_stop``: once asked, the
    stop stands through later improvements, and the fit ends when ``min_epochs`` is met."""
    # asked at 3 (patience 2); better at 4, worse at 5 (one check without improvement: not yet patience's 2)
    values = {1: 1.0, 2: 1.1, 3: 1.2, 4: 0.5, 5: 0.6, 6: 0.4, 7: 0.3, 8: 0.2, 9: 0.1, 10: 0.05}
    options = dict(epochs=10, min_epochs=6, val=(scripted_val(values), [0]), progress=False)
    stopper = loopkit.EarlyStopping("val/score", patience=2)
    whole, whole_history = run_epochs(train_step(mse), make_state(), make_data(2), callbacks=[stopper], **options)
    assert (whole.epoch, len(whole_history)) == (6, 6)
    assert stopper.should_stop and stopper.best == pytest.approx(0.4) and stopper.wait == 0

    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_epochs(step, make_state(), make_data(2), callbacks=[loopkit.EarlyStopping("val/score", patience=2),
                                                                _CrashAtEpoch(4)], **options)
    restored = loopkit.restore(make_state(), tmp_path)
    assert restored.epoch == 4 and restored.extras["callbacks/EarlyStopping[val/score,min]"]["should_stop"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "asks to stop at once": min_epochs holds it off)
        resumed, history = run_epochs(step, restored, make_data(2),
                                      callbacks=[loopkit.EarlyStopping("val/score", patience=2)], **options)
    assert (resumed.epoch, [r["epoch"] for r in history]) == (6, [4, 5])
    assert torch.equal(resumed.model[0].weight, whole.model[0].weight)


class _CrashInValidation:
    """An eval step whose ``crash_at``-th call raises: a crash after a step checkpoint, before its validation."""

    def __init__(self, crash_at=None):
        self.crash_at, self.calls, self.steps = crash_at, 0, []

    def __call__(self, state, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        self.steps.append(state.step)
        return state, {"score": torch.tensor([1.0, 0.9, 0.95, 0.93, 0.92, 0.1][state.step // 2 - 1])}


@pytest.mark.parametrize("crash_at", [1, 2, 4])  # 4: the resumed validation itself stops the run
def test_a_run_resumed_from_a_step_checkpoint_runs_that_steps_validation_first(tmp_path, crash_at):
    """A step checkpoint is written inside the step, before the driver's validation at that step."""
    options = dict(epochs=4, val_every_n_steps=2, val_every_n_epochs=100, sanity_val_batches=0, progress=False)
    whole_val = _CrashInValidation()
    stopper = loopkit.EarlyStopping("val/score", patience=2)
    whole, _ = run_epochs(train_step(mse), make_state(), make_data(3), val=(whole_val, [0]), callbacks=[stopper], **options)
    assert whole_val.steps == [2, 4, 6, 8] and whole.step == 8  # best at 4, stopped by the validations at 6 and 8

    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=2, keep_last=10)
    crashing = _CrashInValidation(crash_at)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_epochs(step, make_state(), make_data(3), val=(crashing, [0]),
                   callbacks=[loopkit.EarlyStopping("val/score", patience=2)], **options)
    restored = loopkit.restore(make_state(), tmp_path)
    assert restored.step == 2 * crash_at  # the checkpoint of the step whose validation crashed
    resumed_val = _CrashInValidation()
    fresh = loopkit.EarlyStopping("val/score", patience=2)
    resumed, history = run_epochs(step, restored, make_data(3), val=(resumed_val, [0]), callbacks=[fresh], **options)
    assert crashing.steps + resumed_val.steps == whole_val.steps  # that validation first, none repeated
    assert (fresh.best, fresh.wait, fresh.should_stop) == (stopper.best, stopper.wait, True)
    assert (resumed.step, resumed.epoch, resumed.batch_index) == (whole.step, whole.epoch, whole.batch_index)
    assert torch.equal(resumed.model[0].weight, whole.model[0].weight)
    assert history[-1]["val/score"] == pytest.approx(0.93) and history[-1]["step"] == 8


def test_a_run_resumed_after_its_validation_does_not_repeat_it(tmp_path):
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, monitor="val/score", mode="max")
    first = _CrashInValidation()
    options = dict(val_every_n_steps=2, val_every_n_epochs=100, sanity_val_batches=0, progress=False)
    run_epochs(step, make_state(), make_data(3), val=(first, [0]), max_steps=2, **options)
    restored = loopkit.restore(make_state(), tmp_path)  # saved for the monitor, after the validation at step 2
    assert restored.step == 2 and first.steps == [2]
    again = _CrashInValidation()
    run_epochs(train_step(mse), restored, make_data(3), val=(again, [0]), max_steps=4, **options)
    assert again.steps == [4]


@pytest.mark.parametrize("crash_at", [8, 10], ids=["mid-epoch", "after-the-epochs-last-batch"])
def test_epoch_means_and_a_train_loss_monitor_resume_as_the_uninterrupted_run(tmp_path, crash_at):
    """The epoch's running means travel in the state: a step checkpoint taken mid-epoch (or on the
    epoch's last batch, before its end) gives the resumed run the uninterrupted run's epoch record."""
    options = dict(epochs=3, progress=False)
    step = loopkit.with_checkpointing(train_step(mse), tmp_path / "ckpt", every_n_steps=2, keep_last=None)
    stopper = loopkit.EarlyStopping("train/loss", patience=5)
    whole, whole_history = run_epochs(train_step(mse), make_state(), make_data(5), callbacks=[stopper], **options)

    with pytest.raises(RuntimeError, match="simulated crash"):  # 5 batches an epoch: step 8 is epoch 1's 3rd
        run_epochs(step, make_state(), make_data(5), callbacks=[loopkit.EarlyStopping("train/loss", patience=5),
                                                                  CrashAfterStep(crash_at)], **options)
    restored = loopkit.restore(make_state(), tmp_path / "ckpt")
    assert restored.step == crash_at
    fresh = loopkit.EarlyStopping("train/loss", patience=5)
    resumed, history = run_epochs(step, restored, make_data(5), callbacks=[fresh], **options)
    assert history == whole_history[1:]  # epoch 1's means over all its batches, bit for bit
    assert (fresh.best, fresh.wait) == (stopper.best, stopper.wait)
    assert torch.equal(resumed.model[0].weight, whole.model[0].weight)
    assert not any(k.startswith("run_epochs/epoch") for k in resumed.extras)  # gone with the epoch's end


def test_a_resumed_runs_sanity_validation_leaves_the_global_rng_as_the_uninterrupted_run_has_it(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    val_data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4, shuffle=True)
    evaluator = loopkit.eval_step(lambda m, b: {"mse": mse(m, b)})
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=4)
    loopkit.seed_everything(0)
    run_epochs(step, make_state(), make_data(4), epochs=2, val=(evaluator, val_data), progress=False)
    whole = torch.get_rng_state()
    [first_epoch] = [c.path for c in loopkit.checkpoint.list_checkpoints(tmp_path) if c.step == 4]
    restored = loopkit.restore(make_state(), first_epoch)  # and the global RNG saved with it
    run_epochs(train_step(mse), restored, make_data(4), epochs=2, val=(evaluator, val_data), progress=False)
    assert torch.equal(torch.get_rng_state(), whole)


def test_stateful_callbacks_are_kept_under_distinct_keys_and_loaded_back():
    a, b, plain = _Tally(), _Tally(10), Recorder()
    state, _ = run_epochs(train_step(mse), make_state(), make_data(2), epochs=2, callbacks=[a, plain, b], progress=False)
    kept = {k: dict(v) for k, v in state.extras.items() if k.startswith("callbacks/")}
    assert kept == {"callbacks/_Tally": {"value": 2}, "callbacks/_Tally#2": {"value": 12}}
    c, d = _Tally(), _Tally()
    state, _ = run_epochs(train_step(mse), state, make_data(2), epochs=3, callbacks=[c, d], progress=False)
    assert (c.value, d.value) == (3, 13)


def test_checkpoints_at_validation_and_epoch_end_hold_every_callbacks_counters(tmp_path):
    """The step hears of an epoch's validation after the epoch's callbacks ran: a checkpoint saved for
    the validation (monitor) holds what on_epoch_end changed too, though the epoch-end save is skipped
    at the same position."""
    values = {1: 1.0, 2: 0.9, 3: 0.8}  # each validation the best so far: saved for the monitor
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, monitor="val/score", every_n_epochs=1)
    tally, stopper = _Tally(), loopkit.EarlyStopping("train/loss", patience=5)
    run_epochs(step, make_state(), make_data(2), epochs=3, val=(scripted_val(values), [0]),
               callbacks=[tally, stopper], progress=False)
    restored = loopkit.restore(make_state(), tmp_path)
    assert restored.epoch == 3
    assert dict(restored.extras["callbacks/_Tally"]) == {"value": 3}
    assert restored.extras["callbacks/EarlyStopping[train/loss,min]"]["best"] == stopper.best


def test_a_callback_state_that_is_not_plain_is_named(tmp_path):
    class Holder(_Tally):
        def state_dict(self):
            return {"when": object()}

    with pytest.raises(TypeError, match=r"Holder.state_dict\(\) must hold numbers, strings and tensors only"):
        run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, callbacks=[Holder()], progress=False)


def test_a_restored_stop_warns_and_trains_nothing():
    stopper = loopkit.EarlyStopping("val/score", patience=1)
    state = make_state().evolve(extras={"callbacks/" + stopper.state_key:
                                        {"best": 0.5, "wait": 1, "should_stop": True}})
    with pytest.warns(UserWarning, match=r"EarlyStopping restored from state.extras\['callbacks/EarlyStopping\[val/score,min\]'\] asks to stop"):
        final, history = run_epochs(train_step(mse), state, make_data(2), epochs=3, val=(scripted_val({}), [0]),
                                    callbacks=[stopper], progress=False)
    assert (final.epoch, history) == (0, [])


def test_one_early_stopping_reused_for_the_next_fold_starts_it_afresh():
    """k-fold or tune reuses one instance: its stop (and best, and patience count) from the last fit must
    not end the next fit before its first batch, which then trained nothing without a word."""
    values = {1: 1.0, 2: 0.9, 3: 0.95, 4: 0.91, 5: 0.5}
    reused = loopkit.EarlyStopping("val/score", patience=2)
    run_with_stopper(values, reused)
    assert reused.should_stop
    state, history, loss = run_with_stopper(values, reused)
    fresh_state, fresh_history, fresh_loss = run_with_stopper(values, loopkit.EarlyStopping("val/score", patience=2))
    assert history == fresh_history and loss.calls == fresh_loss.calls == 8 and state.epoch == fresh_state.epoch


def test_a_callback_of_ones_own_still_stopping_from_an_earlier_fit_is_warned_about():
    class Stopped(loopkit.Callback):
        should_stop = True

    with pytest.warns(RuntimeWarning, match=r"Stopped.should_stop is already set when the fit starts"):
        state, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=2, callbacks=[Stopped()],
                                    progress=False)
    assert (state.step, history) == (0, [])


# --- LearningRateMonitor ------------------------------------------------------------------------


def lr_state(two_groups: bool = False) -> TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    if two_groups:
        groups = [{"params": model[0].parameters(), "lr": 0.25}, {"params": model[1].parameters(), "lr": 0.75}]
    else:
        groups = [{"params": model.parameters(), "lr": 0.25}]
    opt = torch.optim.SGD(groups)
    return TrainState.create(model, opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5))


def test_learning_rate_monitor_epoch_values_in_history():
    monitor = loopkit.LearningRateMonitor()
    _, history = run_epochs(train_step(mse), lr_state(), make_data(3), epochs=3, callbacks=[monitor], progress=False)
    # the scheduler halves the lr after every update: 3 updates per epoch; an epoch's value is the rate it starts with
    assert [h["lr-SGD"] for h in history] == [0.25, 0.25 * 0.5**3, 0.25 * 0.5**6]
    assert monitor.history == [(0, {"lr-SGD": 0.25}), (3, {"lr-SGD": 0.25 * 0.5**3}), (6, {"lr-SGD": 0.25 * 0.5**6})]


@pytest.mark.parametrize("crash_at", [4, 5], ids=["after-its-first-batch", "after-its-second-batch"])
def test_learning_rate_monitor_resumed_mid_epoch_records_what_the_uninterrupted_run_records(tmp_path, crash_at):
    """The rate an epoch starts with travels in the state: a run resumed from a checkpoint taken
    mid-epoch records that rate for the epoch, not the one at the resume point."""
    whole = loopkit.LearningRateMonitor()
    _, whole_history = run_epochs(train_step(mse), lr_state(), make_data(3), epochs=3, callbacks=[whole], progress=False)
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=1, keep_last=None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_epochs(step, lr_state(), make_data(3), epochs=3, callbacks=[loopkit.LearningRateMonitor(), CrashAfterStep(crash_at)],
                   progress=False)
    restored = loopkit.restore(lr_state(), tmp_path)
    assert restored.step == crash_at
    resumed = loopkit.LearningRateMonitor()
    _, history = run_epochs(train_step(mse), restored, make_data(3), epochs=3, callbacks=[resumed], progress=False)
    assert history == whole_history[1:]
    assert resumed.history == whole.history[1:]  # (the step the epoch started at, its rates)


@pytest.mark.parametrize("cut_at", [4, 5])
def test_learning_rate_monitor_of_a_cut_fit_that_goes_on_records_that_fits_epochs_once(cut_at):
    """The same monitor through a fit cut by max_steps mid-epoch and the fit that goes on: the second fit starts the
    history afresh (as Lightning's on_train_start does) and records the cut epoch once, with the rate it started with
    (from the state). Reference: the uninterrupted run's monitor, from the cut epoch (1) on."""
    whole = loopkit.LearningRateMonitor()
    run_epochs(train_step(mse), lr_state(), make_data(3), epochs=3, callbacks=[whole], progress=False)
    monitor = loopkit.LearningRateMonitor()
    cut, _ = run_epochs(train_step(mse), lr_state(), make_data(3), max_steps=cut_at, callbacks=[monitor],
                        progress=False)
    assert monitor.history == whole.history[:2]
    run_epochs(train_step(mse), cut, make_data(3), epochs=3, callbacks=[monitor], progress=False)
    assert monitor.history == whole.history[1:]


# LearningRateMonitor(logging_interval="epoch").lrs of Lightning 2.6.6, one monitor object through two fits:
# SGD(lr=0.25) with ExponentialLR(gamma=0.5) stepped per update ("interval": "step"), 3 batches an epoch;
# Trainer(max_epochs=2).fit(model), then Trainer(max_epochs=3).fit(model, ckpt_path=<the first fit's end>)
_LIGHTNING_LRS_AFTER_FIRST_FIT = {"lr-SGD": [0.25, 0.03125]}
_LIGHTNING_LRS_AFTER_SECOND_FIT = {"lr-SGD": [0.00390625]}  # on_train_start reset the first fit's values


@pytest.mark.parametrize("resumed", [False, True], ids=["same-state", "restored-from-state-dict"])
def test_learning_rate_monitor_starts_each_fit_afresh_as_lightnings_does(resumed):
    """Its history grew across fits; Lightning's LearningRateMonitor resets its lrs at on_train_start. Reference:
    Lightning 2.6.6's recorded values (above)."""
    monitor = loopkit.LearningRateMonitor()
    first, _ = run_epochs(train_step(mse), lr_state(), make_data(3), epochs=2, callbacks=[monitor], progress=False)

    def lrs() -> dict[str, list[float]]:
        return {"lr-SGD": [rates["lr-SGD"] for _, rates in monitor.history]}

    assert lrs() == _LIGHTNING_LRS_AFTER_FIRST_FIT
    if resumed:
        first = lr_state().load_state_dict(first.state_dict())
    run_epochs(train_step(mse), first, make_data(3), epochs=3, callbacks=[monitor], progress=False)
    assert lrs() == _LIGHTNING_LRS_AFTER_SECOND_FIT
    assert monitor.history == [(6, {"lr-SGD": 0.00390625})]


def test_learning_rate_monitor_per_step():
    monitor = loopkit.LearningRateMonitor(logging_interval="step")
    run_epochs(train_step(mse), lr_state(), make_data(3), epochs=2, callbacks=[monitor], progress=False)
    assert monitor.history == [(s, {"lr-SGD": 0.25 * 0.5**s}) for s in range(1, 7)]


def test_learning_rate_monitor_per_step_under_accumulation_records_each_update_once():
    """Its history had an entry per micro-batch (step 0 before any update, each update twice); a hand count:
    4 batches an epoch in groups of 2 make updates 1, 2 (epoch 0) and 3, 4 (epoch 1), the rate halved after each."""
    monitor = loopkit.LearningRateMonitor(logging_interval="step")
    run_epochs(loopkit.with_grad_accum(train_step(mse), every=2), lr_state(), make_data(4), epochs=2,
               callbacks=[monitor], progress=False)
    assert monitor.history == [(s, {"lr-SGD": 0.25 * 0.5**s}) for s in range(1, 5)]


class _Recording(loopkit.Logger):
    """A logger that keeps its rows: ``(step, metrics)``."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def _write_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def test_learning_rate_monitor_per_step_reaches_the_loggers_at_their_interval():
    """As Lightning's (which logs it every log_every_n_steps): with_logging writes the rate after each
    n-th update, at that step; micro-batches of an accumulation group log nothing of their own."""
    logger = _Recording()
    step = loopkit.with_logging(loopkit.with_grad_accum(train_step(mse), every=2), logger, every_n_steps=2)
    run_epochs(step, lr_state(), make_data(6), epochs=2, callbacks=[loopkit.LearningRateMonitor("step")],
               progress=False)
    logged = [(s, {"lr-SGD": r["lr-SGD"]}) for s, r in logger.rows if "lr-SGD" in r]
    # 3 updates an epoch, 6 in all; the epoch records carry no rate (the epoch's start rate at its
    # last step would put the curve back, and Lightning logs none)
    assert logged == [(s, {"lr-SGD": 0.25 * 0.5**s}) for s in (2, 4, 6)]


def test_other_returns_of_on_batch_end_are_ignored_as_before(tmp_path):
    """Only a dict of numbers reaches the loggers: a callback returning True, its metrics (handed back)
    or a tensor logs nothing and fails nothing."""

    class Returns(loopkit.Callback):
        def __init__(self, make):
            self.make = make

        def on_batch_end(self, state, metrics):
            return self.make(metrics)

    for make in (lambda m: True, lambda m: m, lambda m: torch.ones(3), lambda m: {}):
        logger = loopkit.CSVLogger(tmp_path, "r")  # (a run of its own each: version_0, version_1, ...)
        step = loopkit.with_logging(train_step(mse), logger, every_n_steps=1)
        run_epochs(step, make_state(), make_data(2), epochs=1, callbacks=[Returns(make)], progress=False)
        with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
            header = f.readline().strip().split(",")
        assert "train/loss" in header and "loss" not in header


def test_tensors_returned_by_on_batch_end_are_logged_as_numbers(tmp_path):
    """A 0-dim tensor (twice the step's loss) was dropped silently with the whole dict. Reference: the loss the
    step returned, read after the fit, at each logged step."""
    losses = {}

    class Doubler(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            losses[state.step] = metrics["loss"]
            return {"double_loss": metrics["loss"] * 2, "const": 7.0}

    logger = loopkit.CSVLogger(tmp_path)
    run_epochs(loopkit.with_logging(train_step(mse), logger, every_n_steps=2), make_state(), make_data(4), epochs=1,
               callbacks=[Doubler()], progress=False)
    import csv
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("double_loss")]
    assert [(int(r["step"]), float(r["double_loss"]), float(r["const"])) for r in rows] == [
        (s, float(losses[s] * 2), 7.0) for s in (2, 4)]


@pytest.mark.parametrize("returned, match", [
    ({"note": "hello"}, "'note': str"),
    ({"v": torch.ones(2)}, "'v': a tensor of shape \\(2,\\)"),
    ({1: 0.5}, "the name 1"),
])
def test_a_dict_on_batch_end_returns_that_holds_no_number_is_named(returned, match):
    class Bad(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            return returned

    with pytest.raises(TypeError, match="Bad.on_batch_end returned " + match):
        run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, callbacks=[Bad()], progress=False)


def test_on_epoch_end_extras_are_numbers_in_the_history():
    """A 0-dim tensor stayed a tensor in the history (json.dumps of it failed); a string was taken in, and a
    logger failed on it later, naming the logger. Reference: what on_validation_end's returns become."""
    import json

    class Extra(loopkit.Callback):
        def __init__(self, value):
            self.value = value

        def on_epoch_end(self, state, metrics):
            return {"extra/score": self.value}

    _, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=1,
                            callbacks=[Extra(torch.tensor(1.5))], progress=False)
    assert type(history[0]["extra/score"]) is float and history[0]["extra/score"] == 1.5 and json.dumps(history)
    with pytest.raises(TypeError, match="Extra.on_epoch_end returned 'extra/score': str"):
        run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, callbacks=[Extra("hello")], progress=False)


def test_learning_rate_monitor_two_param_groups():
    monitor = loopkit.LearningRateMonitor()
    _, history = run_epochs(train_step(mse), lr_state(two_groups=True), make_data(2), epochs=2,
                            callbacks=[monitor], progress=False)
    for e, h in enumerate(history):
        steps = 2 * e  # updates before the epoch
        assert h["lr-SGD/pg1"] == 0.25 * 0.5**steps and h["lr-SGD/pg2"] == 0.75 * 0.5**steps
        assert "lr-SGD" not in h


def test_learning_rate_monitor_bad_interval():
    with pytest.raises(ValueError, match="logging_interval"):
        loopkit.LearningRateMonitor(logging_interval="batch")


# LearningRateMonitor(logging_interval, log_momentum=True, log_weight_decay=True) of Lightning 2.6.6: what its
# log_metrics calls held, by name, at steps 0..5, for the model of lr_state and the optimizer and scheduler of
# momentum_state(case) below (configure_optimizers returning them with "interval": "step"; make_data(3), mse,
# Trainer(max_epochs=2, log_every_n_steps=1), a logger keeping log_metrics calls). Per step it logged at steps 0..5
# (before updates 1..6), per epoch at steps 0 and 3 the values of those steps here; with one flag alone, these
# rows without the other flag's names.
_LIGHTNING_MOMENTUM_AND_WEIGHT_DECAY = {
    "sgd-onecycle": {
        "lr-SGD/pg1": [0.010000000000000009, 0.24860385886272793, 0.20293641348744074, 0.11565927566674376,
                       0.03336938254720765, 1e-06],
        "lr-SGD/pg1-momentum": [0.95, 0.8505584586887436, 0.8688255099070633, 0.9037365046793212, 0.9366525935914912,
                                0.95],
        "lr-SGD/pg1-weight_decay": [0.0001] * 6,
        "lr-SGD/pg2": [0.030000000000000027, 0.7458115765881839, 0.6088092404623222, 0.3469778270002313,
                       0.10010814764162296, 3e-06],
        "lr-SGD/pg2-momentum": [0.95, 0.8505584586887436, 0.8688255099070633, 0.9037365046793212, 0.9366525935914912,
                                0.95],
        "lr-SGD/pg2-weight_decay": [0.0001] * 6,
    },
    "adam-onecycle": {
        "lr-Adam/pg1": [0.010000000000000009, 0.24860385886272793, 0.20293641348744074, 0.11565927566674376,
                        0.03336938254720765, 1e-06],
        "lr-Adam/pg1-momentum": [0.9, 0.8005584586887436, 0.8188255099070634, 0.8537365046793213, 0.8866525935914913,
                                 0.9],
        "lr-Adam/pg1-weight_decay": [0.0001] * 6,
        "lr-Adam/pg2": [0.030000000000000027, 0.7458115765881839, 0.6088092404623222, 0.3469778270002313,
                        0.10010814764162296, 3e-06],
        "lr-Adam/pg2-momentum": [0.9, 0.8005584586887436, 0.8188255099070634, 0.8537365046793213, 0.8866525935914913,
                                 0.9],
        "lr-Adam/pg2-weight_decay": [0.01] * 6,
    },
    "sgd-steplr": {
        "lr-SGD": [0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625],
        "lr-SGD-momentum": [0.9] * 6,
        "lr-SGD-weight_decay": [0.0001] * 6,
    },
    "adagrad": {  # (no momentum: Lightning warned and logged 0)
        "lr-Adagrad": [0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625],
        "lr-Adagrad-momentum": [0] * 6,
        "lr-Adagrad-weight_decay": [0.0001] * 6,
    },
}


def momentum_state(case: str) -> TrainState:
    """lr_state's model with the optimizer and scheduler of the Lightning runs above: two groups (0.25, 0.75) under
    OneCycleLR (cycling SGD's momentum, Adam's betas[0]), or one group under StepLR."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    two = [{"params": model[0].parameters(), "lr": 0.25}, {"params": model[1].parameters(), "lr": 0.75}]
    one = [{"params": model.parameters(), "lr": 0.25}]
    if case == "sgd-onecycle":
        opt = torch.optim.SGD(two, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.25, 0.75], total_steps=6)
    elif case == "adam-onecycle":
        two[1]["weight_decay"] = 1e-2
        opt = torch.optim.Adam(two, betas=(0.9, 0.99), weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.25, 0.75], total_steps=6, base_momentum=0.8,
                                                    max_momentum=0.9)
    else:
        opt = (torch.optim.SGD(one, momentum=0.9, weight_decay=1e-4) if case == "sgd-steplr"
               else torch.optim.Adagrad(one, weight_decay=1e-4))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return TrainState.create(model, opt, sched)


def lightning_momentum_rows(case: str, names=lambda name: True) -> dict[int, dict[str, float]]:
    """The Lightning reference of ``case`` by step, with the names ``names`` keeps."""
    reference = _LIGHTNING_MOMENTUM_AND_WEIGHT_DECAY[case]
    return {s: {n: values[s] for n, values in reference.items() if names(n)} for s in range(6)}


def run_momentum_monitor(case: str, interval: str, **flags):
    """A fit of momentum_state(case) (2 epochs of 3 updates) with the monitor, its loggers' rows of lr- names."""
    logger = _Recording()
    monitor = loopkit.LearningRateMonitor(interval, **flags)
    _, history = run_epochs(loopkit.with_logging(train_step(mse), logger, every_n_steps=1), momentum_state(case),
                            make_data(3), epochs=2, callbacks=[monitor], progress=False)
    logged = [(s, {k: v for k, v in r.items() if k.startswith("lr-")}) for s, r in logger.rows]
    return monitor, history, [(s, r) for s, r in logged if r]


@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("case", ["sgd-onecycle", "adam-onecycle", "sgd-steplr"])
def test_learning_rate_monitor_logs_momentum_and_weight_decay_as_lightning(case, interval):
    """LearningRateMonitor took no log_momentum or log_weight_decay (TypeError). Reference: Lightning 2.6.6's logs
    (above), the same names in its order and the same values: per step at the steps both log (loopkit's rows are at
    1..6, after each update, Lightning's at 0..5, before it: at step s both hold what update s + 1 uses); per epoch
    the values the epoch starts with, in the epoch's record and history entry (Lightning logs them at its first step,
    loopkit with the record, at its last)."""
    monitor, history, logged = run_momentum_monitor(case, interval, log_momentum=True, log_weight_decay=True)
    lightning = lightning_momentum_rows(case)
    if interval == "step":
        assert [s for s, _ in monitor.history] == [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
        assert all(rates == logged_rates for (_, rates), (_, logged_rates) in zip(monitor.history, logged))
        assert [(s, r) for s, r in monitor.history if s in lightning] == [(s, lightning[s]) for s in range(1, 6)]
        assert all(list(rates) == list(lightning[0]) for _, rates in monitor.history)  # Lightning's order of names
        assert all(not any(k.startswith("lr-") for k in record) for record in history)
    else:
        assert monitor.history == [(0, lightning[0]), (3, lightning[3])]
        assert [{k: v for k, v in h.items() if k.startswith("lr-")} for h in history] == [lightning[0], lightning[3]]
        assert logged == [(3, lightning[0]), (6, lightning[3])]
    assert all(type(v) is float for _, rates in monitor.history for v in rates.values())


@pytest.mark.parametrize("flag", ["log_momentum", "log_weight_decay"])
def test_learning_rate_monitor_logs_one_flags_values_alone_as_lightning(flag):
    """Reference: Lightning 2.6.6 with that flag alone logged the rows above without the other flag's names."""
    other = "-weight_decay" if flag == "log_momentum" else "-momentum"
    monitor, _, logged = run_momentum_monitor("sgd-onecycle", "step", **{flag: True})
    lightning = lightning_momentum_rows("sgd-onecycle", lambda name: not name.endswith(other))
    assert [(s, r) for s, r in logged if s < 6] == [(s, lightning[s]) for s in range(1, 6)]
    assert all(list(rates) == list(lightning[0]) for _, rates in monitor.history)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_learning_rate_monitor_warns_once_of_an_optimizer_without_momentum_and_logs_0_as_lightning(interval):
    """Lightning warns when log_momentum is set and no optimizer has 'momentum' or 'betas' among its defaults, and
    logs 0 for the momentum. Reference: its logs of Adagrad (above); no warning for SGD (momentum 0 included) and
    Adam, nor without log_momentum."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor, _, _ = run_momentum_monitor("adagrad", interval, log_momentum=True, log_weight_decay=True)
    said = [w for w in caught if "momentum" in str(w.message)]
    assert len(said) == 1 and said[0].category is RuntimeWarning
    assert str(said[0].message).startswith("LearningRateMonitor: log_momentum=True, but Adagrad has no momentum")
    lightning = lightning_momentum_rows("adagrad")
    expected = [(s, lightning[s]) for s in range(1, 6)] if interval == "step" else [(0, lightning[0]), (3, lightning[3])]
    assert [(s, r) for s, r in monitor.history if s < 6] == expected

    def warnings_of(optimizer, **flags):
        model = nn.Linear(3, 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_epochs(train_step(mse), TrainState.create(model, optimizer(model.parameters())), make_data(2),
                       epochs=1, callbacks=[loopkit.LearningRateMonitor(interval, **flags)], progress=False)
        return [str(w.message) for w in caught if "momentum" in str(w.message)]

    assert warnings_of(lambda p: torch.optim.SGD(p, lr=0.1), log_momentum=True) == []
    assert warnings_of(lambda p: torch.optim.Adam(p), log_momentum=True) == []
    assert warnings_of(lambda p: torch.optim.Adagrad(p), log_weight_decay=True) == []


@pytest.mark.parametrize("crash_at", [4, 5], ids=["after-its-first-batch", "after-its-second-batch"])
def test_learning_rate_monitor_resumed_mid_epoch_keeps_the_momentum_the_epoch_started_with(tmp_path, crash_at):
    """OneCycleLR moves the momentum at every update: a run resumed from a checkpoint taken mid-epoch records the
    momentum (and rate) epoch 1 started with, kept in the state, not the one at the resume point. Reference: the
    uninterrupted run, and Lightning 2.6.6's record of epoch 1 (above, at step 3)."""
    def monitor():
        return loopkit.LearningRateMonitor(log_momentum=True, log_weight_decay=True)

    whole = monitor()
    _, whole_history = run_epochs(train_step(mse), momentum_state("sgd-onecycle"), make_data(3), epochs=2,
                                  callbacks=[whole], progress=False)
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=1, keep_last=None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_epochs(step, momentum_state("sgd-onecycle"), make_data(3), epochs=2,
                   callbacks=[monitor(), CrashAfterStep(crash_at)], progress=False)
    restored = loopkit.restore(momentum_state("sgd-onecycle"), tmp_path)
    assert restored.step == crash_at
    resumed = monitor()
    _, history = run_epochs(train_step(mse), restored, make_data(3), epochs=2, callbacks=[resumed], progress=False)
    assert history == whole_history[1:]
    assert resumed.history == whole.history[1:] == [(3, lightning_momentum_rows("sgd-onecycle")[3])]
    assert resumed.state_dict() == {}  # (the epoch is over)


@pytest.mark.parametrize("flags, error, match", [
    ({"log_momentum": 1}, TypeError, "LearningRateMonitor: log_momentum must be True or False, got 1"),
    ({"log_weight_decay": "yes"}, TypeError, "LearningRateMonitor: log_weight_decay must be True or False, got 'yes'"),
    ({"log_momentum": None}, TypeError, "LearningRateMonitor: log_momentum must be True or False, got None"),
])
def test_learning_rate_monitor_refuses_flags_that_are_not_bools(flags, error, match):
    with pytest.raises(error, match=match):
        loopkit.LearningRateMonitor("step", **flags)


def test_learning_rate_monitor_refuses_weight_decay_of_groups_without_one_before_any_step():
    """Rprop's groups have no weight_decay (Lightning's monitor fails with a KeyError at its first record)."""
    model = nn.Linear(3, 1)
    loss = Counter(mse)
    with pytest.raises(ValueError, match="LearningRateMonitor: log_weight_decay=True, but Rprop's parameter group 0 "
                                         "has no 'weight_decay'"):
        run_epochs(train_step(loss), TrainState.create(model, torch.optim.Rprop(model.parameters())), make_data(2),
                   epochs=1, callbacks=[loopkit.LearningRateMonitor(log_weight_decay=True)], progress=False)
    assert loss.calls == 0


def test_early_stopping_patience_counts_validations_not_epochs():
    stopper = loopkit.EarlyStopping("val/score", patience=1)
    loss = Counter(mse)
    _, history = run_epochs(train_step(loss), make_state(), make_data(2), epochs=10,
                            val=(scripted_val({2: 1.0, 4: 1.0, 6: 0.5}), [0]), val_every_n_epochs=2,
                            callbacks=[stopper], progress=False)
    assert len(history) == 4 and loss.calls == 8


# --- any callback can stop training ---------------------------------------------------------------


def test_a_callback_setting_should_stop_ends_training_after_that_hook():
    class StopAtThree(loopkit.Callback):
        def __init__(self):
            self.ended = False

        def on_batch_end(self, state, metrics):
            self.should_stop = state.step == 3

        def on_fit_end(self, state, history):
            self.ended = True

    cb = StopAtThree()
    state, history = run_epochs(train_step(mse), make_state(), make_data(5), epochs=4, callbacks=[cb], progress=False)
    assert (state.step, state.epoch, state.batch_index) == (3, 0, 3)
    assert len(history) == 1 and history[0]["step"] == 3 and cb.ended


@pytest.mark.parametrize("every", [1, 2], ids=["a-validation-epoch", "not-a-validation-epoch"])
def test_a_stop_asked_for_mid_epoch_still_validates_that_epoch_as_lightning_does(every):
    """Lightning runs an epoch's validation when should_stop is set in a batch hook; the reference
    for the means is loopkit.evaluate on the state the fit ended with."""
    class StopAtThree(loopkit.Callback):
        def __init__(self):
            self.events = []

        def on_batch_end(self, state, metrics):
            self.should_stop = state.step == 3

        def on_validation_end(self, state, metrics):
            self.events.append(("validation_end", state.step))

        def on_epoch_end(self, state, record):
            self.events.append(("epoch_end", state.step))

    ev, _ = counting_eval()
    val_data = make_data(2, seed=1)
    for max_steps in (None, 3):  # also when the stop comes with the update that reaches max_steps
        cb = StopAtThree()
        state, history = run_epochs(train_step(mse), make_state(), make_data(5), epochs=4, max_steps=max_steps,
                                    val=(ev, val_data), val_every_n_epochs=every, sanity_val_batches=0, callbacks=[cb],
                                    progress=False)
        assert (state.step, state.batch_index, len(history)) == (3, 3, 1)
        if every == 1:
            assert cb.events == [("validation_end", 3), ("epoch_end", 3)]
            assert history[0]["val/mse"] == loopkit.evaluate(ev, state, val_data)["mse"]
        else:  # epoch 0 is not one that validates
            assert cb.events == [("epoch_end", 3)] and "val/mse" not in history[0]
    state, history = run_epochs(train_step(mse), make_state(), make_data(5), epochs=4, max_steps=3, val=(ev, val_data),
                                sanity_val_batches=0, progress=False)
    assert "val/mse" not in history[0]  # max_steps alone mid-epoch: no validation (only a stop asked for)


@pytest.mark.parametrize("also_batch_hook", [False, True])
def test_should_stop_set_in_on_epoch_start_trains_no_batch_of_that_epoch(also_batch_hook):
    class StopAtEpochOne(loopkit.Callback):
        def on_epoch_start(self, state):
            self.should_stop = state.epoch == 1

    callbacks = [StopAtEpochOne()] + ([Recorder()] if also_batch_hook else [])
    loss = Counter(mse)
    state, history = run_epochs(train_step(loss), make_state(), make_data(5), epochs=3, callbacks=callbacks, progress=False)
    assert (state.step, state.epoch, loss.calls) == (5, 1, 5)  # as Lightning's on_train_epoch_start: no batch trained
    assert len(history) == 1


class _EpochCounter(loopkit.Callback):
    """Counts its epoch starts and ends (its state_dict); asks to stop at ``stop_at``'s start."""

    def __init__(self, stop_at=None):
        self.stop_at, self.starts, self.ends = stop_at, 0, 0

    def on_epoch_start(self, state):
        self.starts += 1
        self.should_stop = state.epoch == self.stop_at

    def on_epoch_end(self, state, record):
        self.ends += 1

    def state_dict(self):
        return {"starts": self.starts, "ends": self.ends}

    def load_state_dict(self, sd):
        self.starts, self.ends = int(sd["starts"]), int(sd["ends"])


def test_a_run_resumed_from_a_stop_asked_in_on_epoch_start_ends_with_the_uninterrupted_runs_counters(
        assert_trees_equal):
    """The stopped state keeps the counters from before that on_epoch_start (the resumed run calls it again for the
    epoch, once, as the uninterrupted run did), as an epoch cut short keeps those from before its on_epoch_end."""
    ev, _ = counting_eval()
    fit = dict(epochs=3, val=(ev, make_data(2, seed=1)), progress=False)
    whole_cb = _EpochCounter()
    whole, whole_history = run_epochs(train_step(mse), make_state(), make_data(3), callbacks=[whole_cb], **fit)
    stopped_cb = _EpochCounter(stop_at=1)
    stopped, history = run_epochs(train_step(mse), make_state(), make_data(3), callbacks=[stopped_cb], **fit)
    assert (stopped.epoch, stopped.step, len(history), stopped_cb.starts, stopped_cb.ends) == (1, 3, 1, 2, 1)
    assert stopped.extras["callbacks/_EpochCounter"] == {"starts": 1, "ends": 1}  # epoch 1's start not counted
    resumed_cb = _EpochCounter()
    resumed, rest = run_epochs(train_step(mse), stopped, make_data(3), callbacks=[resumed_cb], **fit)
    assert (resumed_cb.starts, resumed_cb.ends) == (whole_cb.starts, whole_cb.ends) == (3, 3)
    assert history + rest == whole_history
    assert_trees_equal(resumed.model.state_dict(), whole.model.state_dict())


def test_the_callback_base_has_every_hook_as_a_no_op():
    rec = Recorder()
    ev, _ = counting_eval()
    base = loopkit.Callback()
    state, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=2, val=(ev, make_data(1, seed=1)),
                                callbacks=[base, rec], progress=False)
    assert not base.should_stop and len(history) == 2
    assert rec.events.count("batch_end") == 4  # the base did not interfere with the others


class _BatchCounter(loopkit.Callback):
    """Counts batches in on_batch_end; its counter is its state_dict."""

    def __init__(self):
        self.n = 0

    def on_batch_end(self, state, metrics):
        self.n += 1

    def on_epoch_end(self, state, metrics):
        return {"batches_seen": float(self.n)}

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = int(sd["n"])


@pytest.mark.parametrize("crash_at", [2, 5, 7])
def test_a_counter_a_callback_keeps_per_batch_resumes_from_a_step_checkpoint_as_it_was(tmp_path, crash_at):
    """As Lightning's checkpoint (written after the batch's callbacks): a step checkpoint holds each
    stateful callback's state_dict after that batch's on_batch_end."""
    _, whole = run_epochs(train_step(mse), make_state(), make_data(5), epochs=2, callbacks=[_BatchCounter()], progress=False)
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_epochs(step, make_state(), make_data(5), epochs=2, callbacks=[_BatchCounter(), CrashAfterStep(crash_at)],
                   progress=False)
    restored = loopkit.restore(make_state(), tmp_path)
    assert restored.step == crash_at
    _, history = run_epochs(step, restored, make_data(5), epochs=2, callbacks=[_BatchCounter()], progress=False)
    assert history == whole[len(whole) - len(history):] and [r["batches_seen"] for r in whole] == [5.0, 10.0]


@pytest.mark.parametrize("cut", ["max_steps", "stop_in_on_batch_end"])
def test_on_epoch_end_of_a_cut_epoch_sees_the_record_epoch_and_an_unfinished_state(cut):
    """docs/from_lightning.md: the record's "epoch" is Lightning's current_epoch in on_train_epoch_end
    (0, then 1 here, as Lightning's hook sees); state.epoch counts finished epochs, so an epoch cut short
    (13 updates of 10-batch epochs; a stop asked for at update 13) leaves it at 1 in its on_epoch_end."""

    class Seen(loopkit.Callback):
        def __init__(self):
            self.seen = []

        def on_batch_end(self, state, metrics):
            if cut == "stop_in_on_batch_end" and state.step == 13:
                self.should_stop = True

        def on_epoch_end(self, state, metrics):
            self.seen.append((metrics["epoch"], state.epoch, state.step))

    seen = Seen()
    seen.should_stop = False
    options = {"max_steps": 13} if cut == "max_steps" else {"epochs": 5}
    final, history = run_epochs(train_step(mse), make_state(), make_data(10), callbacks=[seen], progress=False, **options)
    assert seen.seen == [(0, 1, 10), (1, 1, 13)]
    assert [h["epoch"] for h in history] == [0, 1] and (final.epoch, final.batch_index) == (1, 3)


# --- a run cut by max_steps, saved and resumed (the README's recipe) ---------------------------------------


def _cut_and_resumed(make, data, callback, *, epochs: int, max_steps: int):
    """The uninterrupted run, and the run cut at ``max_steps``, saved with state_dict() and resumed with
    ``epochs=``: (final state, history, callback) of each, and the cut run's history."""
    whole_cb = callback()
    whole, whole_history = run_epochs(train_step(mse), make(), data, epochs=epochs, callbacks=[whole_cb], progress=False)
    partial, cut_history = run_epochs(train_step(mse), make(), data, max_steps=max_steps, callbacks=[callback()],
                                      progress=False)
    restored = make().load_state_dict(partial.state_dict())
    resumed_cb = callback()
    resumed, history = run_epochs(train_step(mse), restored, data, epochs=epochs, callbacks=[resumed_cb], progress=False)
    return (whole, whole_history, whole_cb), (resumed, history, resumed_cb), cut_history


def test_learning_rate_monitor_resumed_after_a_max_steps_cut_records_the_epochs_starting_rate():
    """Lightning calls on_train_epoch_end for an epoch max_steps cuts, and so does loopkit (the cut run records
    it); the run that finishes that epoch calls it again, so the state keeps the counters from before the cut's
    on_epoch_end. Reference: the uninterrupted run (rates halved at every update: exact powers of two)."""
    (whole, whole_history, whole_cb), (resumed, history, resumed_cb), cut = _cut_and_resumed(
        lr_state, make_data(3), loopkit.LearningRateMonitor, epochs=3, max_steps=4)
    assert [(r["epoch"], r["step"], r["lr-SGD"]) for r in cut] == [(0, 3, 0.25), (1, 4, 0.25 * 0.5**3)]
    assert history == whole_history[1:]
    assert [h["lr-SGD"] for h in history] == [0.25 * 0.5**3, 0.25 * 0.5**6]
    assert resumed_cb.history == whole_cb.history[1:]
    assert torch.equal(resumed.model[0].weight, whole.model[0].weight)


def test_early_stopping_on_a_train_metric_counts_an_epoch_cut_by_max_steps_once_when_resumed():
    """lr=0 and one batch repeated: train/loss never improves; patience 2 stops the uninterrupted run after epoch 2
    (epochs 0, 1, 2 checked). The run cut at update 7 (in epoch 1) and resumed checks epoch 1 once, at its end."""
    batch = make_data(1)[0]
    (whole, whole_history, whole_cb), (resumed, history, resumed_cb), cut = _cut_and_resumed(
        lambda: make_state(lr=0.0), [batch] * 5, lambda: loopkit.EarlyStopping("train/loss", patience=2),
        epochs=6, max_steps=7)
    assert [r["epoch"] for r in cut] == [0, 1]  # the cut run records its cut epoch
    assert (whole.step, whole.epoch, [r["epoch"] for r in whole_history]) == (15, 3, [0, 1, 2])
    assert (resumed.step, resumed.epoch) == (whole.step, whole.epoch)
    assert history == whole_history[1:]
    assert resumed_cb.state_dict() == whole_cb.state_dict()


class _WholeSetError(loopkit.Callback):
    """A metric over the whole validation set (not a mean of batch means): the largest absolute error, from
    loopkit.predict, returned from on_validation_end as Lightning's on_validation_epoch_end would self.log it."""

    def __init__(self, val_data):
        self.val_data = val_data

    def on_validation_end(self, state, metrics):
        outputs = loopkit.predict(lambda m, b: (m(b[0]) - b[1]).abs(), state, self.val_data)
        return {"val/max_error": torch.cat(outputs).max()}  # (a tensor: taken as the float it holds)


def test_a_metric_returned_by_on_validation_end_reaches_the_next_callbacks_the_history_and_the_logs(tmp_path):
    """The reference: the same metric computed by hand from the returned state's model (one validation per epoch,
    at its end), and EarlyStopping's decision on those values."""
    train, val = make_data(4), make_data(3, seed=1)
    stopper = loopkit.EarlyStopping("val/max_error", patience=1, mode="min")
    seen = []

    class Sees(loopkit.Callback):
        def on_validation_end(self, state, metrics):
            seen.append(metrics["val/max_error"])

    logger = loopkit.CSVLogger(tmp_path, "r")
    step = loopkit.with_logging(train_step(mse), logger, every_n_steps=100)
    states = []

    class Keep(loopkit.Callback):
        def on_epoch_end(self, state, record):
            states.append(copy.deepcopy(state.model))

    _, history = run_epochs(step, make_state(), train, epochs=6, val=(loopkit.eval_step(lambda m, b: {"mse": mse(m, b)}), val),
                            callbacks=[_WholeSetError(val), Sees(), stopper, Keep()], progress=False, sanity_val_batches=0)
    expected = []
    for model in states:
        with torch.no_grad():
            expected.append(float(torch.cat([(model(x) - y).abs() for x, y in val]).max()))
    assert [h["val/max_error"] for h in history] == expected == seen
    best, waited, stop_at = float("inf"), 0, None
    for epoch, value in enumerate(expected):
        best, waited = (value, 0) if value < best else (best, waited + 1)
        if waited >= 1:
            stop_at = epoch
            break
    assert len(history) == (stop_at + 1 if stop_at is not None else 6)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [line for line in f.read().splitlines()]
    assert "val/max_error" in rows[0].split(",")


@pytest.mark.parametrize("returned, error, match", [
    ({"val/mse": 1.0}, ValueError, "returned 'val/mse', which the validation's metrics has already"),
    ({"val/x": "high"}, TypeError, "returned 'val/x': str; a metric is a number"),
    # other names would overwrite the epoch record's own (its train/ means, step, epoch) or be logged twice
    ({"train/loss": 0.5}, ValueError, "returned 'train/loss'; a validation's metrics are named 'val/<name>'"),
    ({"step": 3}, ValueError, "returned 'step'; a validation's metrics are named"),
    ({"auroc": 0.9}, ValueError, "returned 'auroc'; a validation's metrics are named"),
])
def test_a_bad_return_of_on_validation_end_is_named(returned, error, match):
    class Bad(loopkit.Callback):
        def on_validation_end(self, state, metrics):
            return returned

    with pytest.raises(error, match=match):
        run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, callbacks=[Bad()], progress=False,
                   val=(loopkit.eval_step(lambda m, b: {"mse": mse(m, b)}), make_data(2)))


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("options", [
    {"stopping_threshold": 0.5}, {"divergence_threshold": 2.0}, {"stopping_threshold": 0.1, "divergence_threshold": 3.0},
    {"check_finite": False}, {"stopping_threshold": 0.30000001192092896},
])
def test_early_stopping_thresholds_and_check_finite_decide_as_lightning(mode, options):
    """Lightning's stopping_threshold (the goal reached), divergence_threshold (no hope) and check_finite=False
    (a NaN counts as no improvement), against its rule written out, over sequences that cross each threshold."""
    sign = 1.0 if mode == "min" else -1.0
    threshold = options.get("stopping_threshold", options.get("divergence_threshold", 0.0))
    sequences = [
        [sign * v for v in (1.0, 0.8, 0.6, 0.4, 0.2, 0.1)],
        [sign * v for v in (1.0, 1.5, 2.5, 3.5)],
        [sign * v for v in (1.0, float("nan"), 0.9, float("nan"), float("nan"), 0.8)],
        [sign * threshold, sign * threshold] if mode == "min" else [-threshold, -threshold],
        [sign * v for v in (0.3, 0.30000001192092896, 0.29, 2.0, 2.0000001)],
    ]
    reference_options = dict(options)
    if mode == "max":  # the same thresholds, mirrored
        reference_options = {k: (-v if isinstance(v, float) else v) for k, v in options.items()}
    for values in sequences:
        expected = lightning_early_stopping(values, mode=mode, patience=2, min_delta=0.0, **reference_options)
        stopper = loopkit.EarlyStopping("val/loss", patience=2, mode=mode, **reference_options)
        got = loopkit_early_stopping_trace(stopper, values)
        assert [(s, w) for s, w, _ in got] == [(s, w) for s, w, _ in expected], (values, reference_options)
        assert all(a == b or (a != a and b != b) for (_, _, a), (_, _, b) in zip(got, expected))


@pytest.mark.parametrize("option, value", [("stopping_threshold", "0.1"), ("divergence_threshold", float("nan")),
                                           ("check_finite", 1)])
def test_early_stopping_refuses_bad_thresholds(option, value):
    with pytest.raises((TypeError, ValueError), match=f"EarlyStopping: {option}"):
        loopkit.EarlyStopping("val/loss", **{option: value})


def test_what_on_validation_end_returned_before_it_could_add_metrics_is_still_ignored():
    """A callback returning True or the metrics it was given trained on before on_validation_end could add any;
    its returns are ignored still (the history is the run without it)."""
    class Returns(loopkit.Callback):
        def __init__(self, make):
            self.make = make

        def on_validation_end(self, state, metrics):
            return self.make(metrics)

    val = (loopkit.eval_step(lambda m, b: {"mse": mse(m, b)}), make_data(2))
    _, reference = run_epochs(train_step(mse), make_state(), make_data(2), epochs=2, val=val, progress=False)
    for make in (lambda m: True, lambda m: m, lambda m: "done", lambda m: [1.0]):
        _, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=2, val=val,
                                callbacks=[Returns(make)], progress=False)
        assert history == reference


def test_early_stopping_takes_numpy_thresholds_as_lightning_does():
    import numpy as np

    stopper = loopkit.EarlyStopping("val/loss", stopping_threshold=np.float32(0.5), divergence_threshold=np.int64(10))
    assert (stopper.stopping_threshold, stopper.divergence_threshold) == (0.5, 10.0)
    assert [s for s, _, _ in loopkit_early_stopping_trace(stopper, [1.0, 0.4])] == [False, True]


# --- Timer (Lightning's Timer / max_time) --------------------------------------------------------------


class _WorkClock:
    """A clock that advances one second per batch of work (a train or eval call): runs are then timed
    exactly, whatever the machine's speed."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def train_loss(self, model, batch):
        self.now += 1.0
        return mse(model, batch)

    def evaluator(self):
        def metric_fn(model, batch):
            self.now += 1.0
            return {"mse": mse(model, batch)}
        return loopkit.eval_step(metric_fn)


@pytest.mark.parametrize("duration", [7, "00:00:00:07", {"seconds": 7}, __import__("datetime").timedelta(seconds=7)])
def test_timer_stops_after_the_batch_that_spends_the_time_as_max_steps_would(duration):
    """Reference: the same fit cut by max_steps at the 5th update (bitwise the same parameters). As Lightning's
    Timer counts (from on_train_start to on_train_end): the sanity validation's 2 batches are not counted, epoch
    0's validation is: 3 + 2 s after epoch 0, 7 s after update 5."""
    clock = _WorkClock()
    timer = loopkit.Timer(duration, clock=clock, verbose=False)
    state, history = run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=10,
                                val=(clock.evaluator(), make_data(2, seed=1)), callbacks=[timer], progress=False)
    ref, _ = run_epochs(train_step(mse), make_state(), make_data(3), max_steps=5, progress=False)
    assert timer.should_stop and state.step == 5
    assert all(torch.equal(a, b) for a, b in zip(state.model.parameters(), ref.model.parameters()))
    # the stopped epoch (1) is still validated and recorded, as for any stop; the clock stops with the fit
    assert [r["epoch"] for r in history] == [0, 1] and "val/mse" in history[-1]
    assert timer.time_elapsed() == clock.now - 2 == 9 and timer.time_remaining() == -2


def test_timer_per_epoch_lets_the_epoch_finish():
    clock = _WorkClock()
    timer = loopkit.Timer(4, interval="epoch", clock=clock, verbose=False)
    state, history = run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=10,
                                callbacks=[timer], progress=False)
    assert state.step == 6 and state.epoch == 2 and len(history) == 2  # 3 s after epoch 0, 6 s after epoch 1


def test_timer_resumed_from_a_checkpoint_counts_on_from_the_time_spent(tmp_path):
    """Reference: the uninterrupted run with the same limit. The crashed run spent 4 s (4 batches) before its
    checkpoint at step 4; the relaunch (a fresh clock at another origin) trains 3 s more."""
    clock = _WorkClock()
    _, whole = run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=10,
                          callbacks=[loopkit.Timer(7, clock=clock, verbose=False)], progress=False)
    step = loopkit.with_checkpointing(train_step(clock.train_loss), tmp_path, every_n_steps=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_epochs(step, make_state(), make_data(3), epochs=10, progress=False,
                   callbacks=[loopkit.Timer(7, clock=clock, verbose=False), CrashAfterStep(4)])
    restored = loopkit.restore(make_state(), tmp_path)
    assert restored.step == 4
    clock.now = 1000.0
    timer = loopkit.Timer(7, clock=clock, verbose=False)
    state, history = run_epochs(step, restored, make_data(3), epochs=10, callbacks=[timer], progress=False)
    assert state.step == 7 and timer.time_elapsed() == 7
    assert history == whole[len(whole) - len(history):]


def test_timer_resumed_with_its_time_spent_trains_nothing(tmp_path):
    clock = _WorkClock()
    step = loopkit.with_checkpointing(train_step(clock.train_loss), tmp_path, every_n_epochs=1)
    stopped, _ = run_epochs(step, make_state(), make_data(3), epochs=10, progress=False,
                            callbacks=[loopkit.Timer(3, interval="epoch", clock=clock, verbose=False)])
    restored = loopkit.restore(make_state(), tmp_path)
    assert stopped.step == restored.step == 3
    before = clock.now
    with pytest.warns(RuntimeWarning, match="Timer restored from .* has already spent its duration"):
        state, history = run_epochs(step, restored, make_data(3), epochs=10, progress=False,
                                    callbacks=[loopkit.Timer(3, interval="epoch", clock=clock, verbose=False)])
    assert state.step == 3 and history == [] and clock.now == before


def test_a_timer_reused_to_train_on_from_a_fits_returned_state_counts_on_and_warns_when_its_time_is_spent():
    """A fit's returned state holds its Timer's time spent, as a checkpoint does: "train on" with it counts on
    (Lightning's ckpt_path resume; its fit called again times afresh). The second fit stopped at once with only
    the Timer's usual line; it warns, naming the key to drop, and dropping it times the fit afresh. Reference: time
    left, the continued fits stop where the uninterrupted one does, without a warning."""
    clock = _WorkClock()
    timer = loopkit.Timer(3, interval="epoch", clock=clock, verbose=False)  # 1 s a batch, 3 batches an epoch
    state, _ = run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=10, callbacks=[timer],
                          progress=False)
    assert state.step == 3 and state.extras["callbacks/Timer"] == {"time_elapsed": 3.0}
    with pytest.warns(RuntimeWarning, match=re.escape(
            "Timer restored from state.extras['callbacks/Timer'] has already spent its duration (0:00:03 of "
            "0:00:03, ") + r".*a fit continued from a returned state or a checkpoint counts on\), so this fit stops "
            r"before its first batch; .*if k != 'callbacks/Timer'.*timer\.duration"):
        again, history = run_epochs(train_step(clock.train_loss), state, make_data(3), epochs=10, callbacks=[timer],
                                    progress=False)
    assert again.step == 3 and history == []
    fresh = again.evolve(extras={k: v for k, v in again.extras.items() if k != "callbacks/Timer"})
    more, _ = run_epochs(train_step(clock.train_loss), fresh, make_data(3), epochs=10, callbacks=[timer],
                         progress=False)  # the advice: timed afresh, 3 s more
    assert more.step == 6 and timer.time_elapsed() == 3

    clock = _WorkClock()
    _, whole = run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=10, progress=False,
                          callbacks=[loopkit.Timer(10, interval="epoch", clock=clock, verbose=False)])
    timer = loopkit.Timer(10, interval="epoch", clock=clock, verbose=False)
    state, first = run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=1, callbacks=[timer],
                              progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 3 s of 10 spent: no warning
        state, rest = run_epochs(train_step(clock.train_loss), state, make_data(3), epochs=10, callbacks=[timer],
                                 progress=False)
    assert state.step == 12 and first + rest == whole and timer.time_elapsed() == 12


def test_one_timer_reused_for_the_next_fit_starts_afresh():
    clock = _WorkClock()
    timer = loopkit.Timer(2, clock=clock, verbose=False)
    for _ in range(2):
        state, _ = run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=5,
                              callbacks=[timer], progress=False)
        assert state.step == 2 and timer.time_elapsed() == 2


def test_timer_without_a_duration_only_measures():
    clock = _WorkClock()
    timer = loopkit.Timer(clock=clock)
    state, _ = run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=2, callbacks=[timer],
                          progress=False)
    assert state.step == 6 and timer.time_elapsed() == 6 and timer.time_remaining() is None


def test_timer_says_when_it_stops(capsys):
    clock = _WorkClock()
    run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=5,
               callbacks=[loopkit.Timer(2, clock=clock)], progress=False)
    assert "Timer: time limit reached (0:00:02 spent); stopping at step 2" in capsys.readouterr().err


@pytest.mark.parametrize("duration", [4.0, "00:00:00:04", datetime.timedelta(seconds=4), {"seconds": 4}])
@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_a_timer_given_its_duration_after_construction_stops_as_one_given_it_at_construction(interval, duration):
    """Reference: a Timer constructed with the duration (each on a work clock of its own): both stop after the same
    update (4 per step; 6, epoch 1's end, per epoch)."""
    ref_clock, clock = _WorkClock(), _WorkClock()
    expected, _ = run_epochs(train_step(ref_clock.train_loss), make_state(), make_data(3), epochs=5, progress=False,
                             callbacks=[loopkit.Timer(4, interval=interval, clock=ref_clock, verbose=False)])
    timer = loopkit.Timer(clock=clock, verbose=False)  # measure-only when constructed
    timer.duration, timer.interval = duration, interval  # (any form the constructor takes: "DD:HH:MM:SS" too)
    state, _ = run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=5, callbacks=[timer],
                          progress=False)
    assert timer.should_stop and state.step == expected.step == {"step": 4, "epoch": 6}[interval]
    with pytest.raises(ValueError, match="Timer"):
        timer.duration = "four seconds"
    assert timer.duration == 4.0  # (a refused value leaves it as it was)


def test_a_timer_refuses_a_bad_interval_set_after_construction_and_a_good_one_takes_effect():
    """A typo set after construction ("epochs") is refused as the constructor refuses it, leaving the interval as it
    was; a valid change takes effect. Reference: a Timer constructed with that interval (on a work clock of its own)
    stops after the same update (4, per step, where per epoch it would be 6)."""
    ref_clock, clock = _WorkClock(), _WorkClock()
    expected, _ = run_epochs(train_step(ref_clock.train_loss), make_state(), make_data(3), epochs=5, progress=False,
                             callbacks=[loopkit.Timer(4, interval="step", clock=ref_clock, verbose=False)])
    timer = loopkit.Timer(4, interval="epoch", clock=clock, verbose=False)
    with pytest.raises(ValueError, match="Timer: interval must be 'step' or 'epoch', got 'epochs'"):
        timer.interval = "epochs"
    assert timer.interval == "epoch"  # (a refused value leaves it as it was)
    timer.interval = "step"
    state, _ = run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=5, callbacks=[timer],
                          progress=False)
    assert timer.should_stop and state.step == expected.step == 4


@pytest.mark.parametrize("base, kwargs", [
    (loopkit.Timer, {}), (loopkit.Timer, {"duration": 60, "interval": "epoch"}), (loopkit.LearningRateMonitor, {}),
])
def test_a_subclass_of_a_callback_whose_batch_hook_is_unused_has_its_own_on_batch_end_called_per_batch(base, kwargs):
    """A measure-only Timer, a per-epoch one, a per-epoch LearningRateMonitor: their own on_batch_end does nothing
    and is not called, but a subclass's own is. Reference: a plain Callback counting batches (5 per epoch, 2 epochs)."""

    class Counting(base):
        def __init__(self):
            super().__init__(**kwargs)
            self.batches = 0

        def on_batch_end(self, state, metrics):
            super().on_batch_end(state, metrics)
            self.batches += 1

    class Reference(loopkit.Callback):
        batches = 0

        def on_batch_end(self, state, metrics):
            self.batches += 1

    counting, reference = Counting(), Reference()
    run_epochs(train_step(mse), make_state(), make_data(5), epochs=2, callbacks=[counting, reference], progress=False)
    assert counting.batches == reference.batches == 10


def test_loopkits_callbacks_whose_batch_hook_does_nothing_are_not_called_per_batch(monkeypatch):
    """The per-epoch LearningRateMonitor and a measure-only Timer cost the loop no call per batch; per step they are
    called after each one."""
    calls = []
    for cls in (loopkit.LearningRateMonitor, loopkit.Timer):
        original = cls.on_batch_end
        monkeypatch.setattr(cls, "on_batch_end", lambda self, state, metrics, _f=original: calls.append(type(self)) or
                            _f(self, state, metrics))
    run_epochs(train_step(mse), make_state(), make_data(3), epochs=1, progress=False,
               callbacks=[loopkit.LearningRateMonitor(), loopkit.Timer(), loopkit.Timer(60, interval="epoch")])
    assert calls == []
    run_epochs(train_step(mse), make_state(), make_data(3), epochs=1, progress=False,
               callbacks=[loopkit.LearningRateMonitor("step"), loopkit.Timer(60)])
    assert calls == [loopkit.LearningRateMonitor, loopkit.Timer] * 3


def test_timer_takes_lightnings_stage_argument_and_has_its_start_and_end_times():
    """Lightning's Timer API: time_elapsed(stage), time_remaining(stage), start_time(stage), end_time(stage).
    Reference: the work clock's readings (the sanity validation's 2 s before the start, then 3 s of training and 2
    of validation per epoch)."""
    clock = _WorkClock()
    timer = loopkit.Timer(60, clock=clock, verbose=False)
    assert timer.start_time("train") is None and timer.end_time() is None
    run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=2,
               val=(clock.evaluator(), make_data(2, seed=1)), callbacks=[timer], progress=False)
    assert (timer.start_time("train"), timer.end_time("train"), clock.now) == (2.0, 12.0, 12.0)
    assert timer.time_elapsed("train") == timer.time_elapsed() == 10.0
    assert timer.time_remaining("train") == timer.time_remaining() == 50.0
    for stage in ("validate", "test", "predict", "sanity_check", "fit", None):
        for method in (timer.time_elapsed, timer.time_remaining, timer.start_time, timer.end_time):
            with pytest.raises(ValueError, match="loopkit's Timer times the fit only"):
                method(stage)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"duration": "12:00:00"}, ValueError, "DD:HH:MM:SS"),
    ({"duration": -1}, ValueError, ">= 0 seconds"),
    ({"duration": float("inf")}, ValueError, "finite"),
    ({"duration": {"hourz": 1}}, ValueError, "timedelta's arguments"),
    ({"duration": [1]}, TypeError, "got list"),
    ({"duration": 1, "interval": "batch"}, ValueError, "interval must be 'step' or 'epoch'"),
    ({"duration": 1, "verbose": 1}, TypeError, "verbose"),
    ({"duration": 1, "clock": 3.0}, TypeError, "clock"),
])
def test_timer_refuses_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        loopkit.Timer(**kwargs)


@pytest.mark.parametrize("names, expected", [
    (["backbone", "head"], ["lr-SGD/backbone", "lr-SGD/head"]),
    (["backbone", None], ["lr-SGD/backbone", "lr-SGD/pg2"]),
    (["all"], ["lr-SGD/all"]),
])
def test_learning_rate_monitor_names_groups_by_their_name_as_lightning(names, expected):
    """Lightning's LearningRateMonitor (2.6, _add_suffix) names a group by its "name" where it has one; loopkit
    named every group pgN. Reference: the names Lightning logged for these optimizers (run side by side)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    parts = [model.parameters()] if len(names) == 1 else [model[0].parameters(), model[1].parameters()]
    groups = [{"params": p, **({"name": n} if n else {})} for p, n in zip(parts, names)]
    state = TrainState.create(model, torch.optim.SGD(groups, lr=0.5))
    _, history = run_epochs(train_step(mse), state, make_data(2), epochs=1,
                            callbacks=[loopkit.LearningRateMonitor()], progress=False)
    assert [k for k in history[0] if k.startswith("lr-")] == expected


def test_learning_rate_monitor_refuses_two_groups_of_one_name_before_any_step():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    groups = [{"params": model[0].parameters(), "name": "x"}, {"params": model[1].parameters(), "name": "x"}]
    state = TrainState.create(model, torch.optim.SGD(groups, lr=0.5))
    loss = Counter(mse)
    with pytest.raises(ValueError, match="several parameter groups of one 'name'"):
        run_epochs(train_step(loss), state, make_data(2), epochs=1, callbacks=[loopkit.LearningRateMonitor()],
                   progress=False)
    assert loss.calls == 0


def test_the_hooks_that_may_return_metrics_say_so_in_their_hints():
    """on_batch_end and on_validation_end were hinted -> None, so a type checker refused a subclass returning the
    documented dict ([override])."""
    import typing

    for hook in (loopkit.Callback.on_batch_end, loopkit.Callback.on_validation_end, loopkit.Callback.on_epoch_end):
        returned = typing.get_type_hints(hook)["return"]
        assert type(None) in typing.get_args(returned) and len(typing.get_args(returned)) == 2


def test_learning_rate_monitor_per_step_records_and_logs_the_update_of_a_flushed_group():
    """7 batches in groups of 2: updates 1-3 from groups, 4 from the flush of the 7th batch; the flush's update
    (made after the last batch's hooks) was missing from the history and the logs (steps 4 and 8 of 8). Reference:
    the rate halved by hand after each update, logged at every second update as any other."""
    logger = _Recording()
    monitor = loopkit.LearningRateMonitor(logging_interval="step")
    step = loopkit.with_logging(loopkit.with_grad_accum(train_step(mse), every=2), logger, every_n_steps=2)
    state, _ = run_epochs(step, lr_state(), make_data(7), epochs=2, callbacks=[monitor], progress=False)
    assert state.step == 8
    assert monitor.history == [(s, {"lr-SGD": 0.25 * 0.5**s}) for s in (2, 4, 6, 8)]  # (what was logged)
    assert [(s, r["lr-SGD"]) for s, r in logger.rows if "lr-SGD" in r] == [(s, 0.25 * 0.5**s) for s in (2, 4, 6, 8)]


def test_learning_rate_monitor_per_step_reads_and_records_the_rates_at_the_log_points_only(conversions):
    """A tensor rate (a capturable or compiled optimizer's) was read (float(), a device sync on a GPU) after every
    update, and ``history`` grew by one entry an update, although with_logging writes the rate every n updates;
    Lightning's monitor reads and records at its log points only (its ``lrs``: one entry each). Reference: the rate
    halved by hand after each update; reads counted: 8 updates more make only their 2 log points' reads more."""

    def fit(batches: int) -> tuple[int, loopkit.LearningRateMonitor, list]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.25))
        state = TrainState.create(model, opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5))
        logger, monitor = _Recording(), loopkit.LearningRateMonitor("step")
        step = loopkit.with_logging(train_step(mse), logger, every_n_steps=4)
        before = conversions["n"]
        run_epochs(step, state, make_data(batches), epochs=1, callbacks=[monitor], progress=False)
        return conversions["n"] - before, monitor, logger.rows

    reads_8, _, _ = fit(8)
    reads_16, monitor, rows = fit(16)
    assert monitor.history == [(s, {"lr-SGD": 0.25 * 0.5**s}) for s in (4, 8, 12, 16)]
    assert [(s, r["lr-SGD"]) for s, r in rows if "lr-SGD" in r] == [(s, 0.25 * 0.5**s) for s in (4, 8, 12, 16)]
    # 8 updates more, 2 log points more, each reading the window's means (one transfer) and the rate: 4 reads
    assert reads_16 - reads_8 == 2 * 2


def test_learning_rate_monitor_per_step_without_with_logging_records_every_update():
    """No loggers, no log points: the history (its only output then) holds the rate after every update."""
    monitor = loopkit.LearningRateMonitor(logging_interval="step")
    run_epochs(train_step(mse), lr_state(), make_data(3), epochs=2, callbacks=[monitor], progress=False)
    assert monitor.history == [(s, {"lr-SGD": 0.25 * 0.5**s}) for s in range(1, 7)]
    monitor.set_log_interval(3)  # (told again at each fit's start: the next fit's with_logging, or none)
    run_epochs(train_step(mse), lr_state(), make_data(3), epochs=2, callbacks=[monitor], progress=False)
    assert len(monitor.history) == 6


def test_on_flush_end_hears_of_the_update_a_flushed_group_makes():
    """Reference: a hand count. 5 batches in groups of 2 make updates 1, 2 from groups and 3 from the flush."""
    class Seen(loopkit.Callback):
        def __init__(self):
            self.batch_steps, self.flush_steps = [], []

        def on_batch_end(self, state, metrics):
            self.batch_steps.append(state.step)

        def on_flush_end(self, state, metrics):
            self.flush_steps.append((state.step, sorted(metrics)))

    seen = Seen()
    run_epochs(loopkit.with_grad_accum(train_step(mse), every=2), make_state(), make_data(5), epochs=1,
               callbacks=[seen], progress=False)
    assert seen.batch_steps == [0, 1, 1, 2, 2] and seen.flush_steps == [(3, [])]


@pytest.mark.parametrize("interval, stop_step", [("step", 4), ("epoch", 3)])
def test_timer_checks_where_lightnings_does_not_at_each_epoch_start(interval, stop_step):
    """The time runs out in epoch 0's validation (3 + 2 s of 5): loopkit stopped at epoch 1's start (step 3);
    Lightning's Timer checks after each batch only, so it trains one more batch; per epoch it checks after the
    epoch's validation, so it stops there (step 3)."""
    clock = _WorkClock()
    timer = loopkit.Timer(5, interval=interval, clock=clock, verbose=False)
    state, _ = run_epochs(train_step(clock.train_loss), make_state(), make_data(3), epochs=10,
                          val=(clock.evaluator(), make_data(2, seed=1)), sanity_val_batches=0, callbacks=[timer],
                          progress=False)
    assert state.step == stop_step


# Lightning 2.6.6's EarlyStopping(verbose=True): the messages its _evaluate_stopping_criteria logged for these
# values (an improvement, a check without one: nothing, a stop) and its stopping_reason, measured once (Lightning
# is not a test dependency)
_LIGHTNING_VERBOSE = {
    "patience": ({"monitor": "val/loss", "patience": 2, "min_delta": 0.1}, [1.0, 0.5, 0.45, 0.47], [
        "Metric val/loss improved. New best score: 1.000",
        "Metric val/loss improved by 0.500 >= min_delta = 0.1. New best score: 0.500",
        "Monitored metric val/loss did not improve in the last 2 records. Best score: 0.500. Signaling Trainer to stop.",
    ], "PATIENCE_EXHAUSTED"),
    "max": ({"monitor": "val/acc", "mode": "max", "patience": 1}, [0.5, 0.75, 0.7], [
        "Metric val/acc improved. New best score: 0.500",
        "Metric val/acc improved by 0.250 >= min_delta = 0.0. New best score: 0.750",
        "Monitored metric val/acc did not improve in the last 1 records. Best score: 0.750. Signaling Trainer to stop.",
    ], "PATIENCE_EXHAUSTED"),
    "nonfinite": ({"monitor": "val/loss", "patience": 3}, [1.0, float("nan")], [
        "Metric val/loss improved. New best score: 1.000",
        "Monitored metric val/loss = nan is not finite. Previous best value was 1.000. Signaling Trainer to stop.",
    ], "NON_FINITE_METRIC"),
    "stopping_threshold": ({"monitor": "val/loss", "patience": 3, "stopping_threshold": 0.3}, [1.0, 0.25], [
        "Metric val/loss improved. New best score: 1.000",
        "Stopping threshold reached: val/loss = 0.25 < 0.3. Signaling Trainer to stop.",
    ], "STOPPING_THRESHOLD"),
    "divergence_threshold": ({"monitor": "val/loss", "patience": 3, "divergence_threshold": 5.0}, [1.0, 6.0], [
        "Metric val/loss improved. New best score: 1.000",
        "Divergence threshold reached: val/loss = 6.0 < 5.0. Signaling Trainer to stop.",
    ], "DIVERGENCE_THRESHOLD"),
}


@pytest.mark.parametrize("case", sorted(_LIGHTNING_VERBOSE))
def test_verbose_early_stopping_says_what_lightnings_says(case, capsys):
    options, values, messages, reason = _LIGHTNING_VERBOSE[case]
    stopper = loopkit.EarlyStopping(verbose=True, **options)
    for value in values:
        stopper.on_validation_end(None, {options["monitor"]: value})
    assert capsys.readouterr().err.splitlines() == messages
    assert stopper.should_stop and stopper.stopping_reason is loopkit.EarlyStoppingReason[reason]
    assert stopper.stopping_reason_message == messages[-1]
    restored = loopkit.EarlyStopping(**options)  # a checkpoint keeps the reason (Lightning's state_dict does)
    restored.load_state_dict(stopper.state_dict())
    assert (restored.stopping_reason, restored.stopping_reason_message) == (stopper.stopping_reason, messages[-1])


def test_quiet_early_stopping_says_nothing(capsys):
    stopper = loopkit.EarlyStopping("val/loss", patience=1)
    for value in (1.0, 2.0):
        stopper.on_validation_end(None, {"val/loss": value})
    assert stopper.should_stop and capsys.readouterr().err == ""


def test_a_non_strict_monitor_that_is_missing_skips_the_check_where_a_strict_one_raises():
    """Lightning's strict=False: no error when the fit starts without validation, nor at a check without the metric."""
    model = torch.nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.train_step(lambda m, b: m(b).pow(2).mean())
    data = [torch.ones(2, 2)] * 3
    with pytest.raises(ValueError, match="monitors 'val/loss', but this fit has no validation"):
        loopkit.run_epochs(step, state, data, epochs=1, callbacks=[loopkit.EarlyStopping("val/loss")], progress=False)
    lenient = loopkit.EarlyStopping("val/loss", patience=0, strict=False)
    _, history = loopkit.run_epochs(step, state, data, epochs=3, callbacks=[lenient], progress=False)
    assert len(history) == 3 and not lenient.should_stop
    with pytest.raises(KeyError, match="monitor 'train/acc' is not among the metrics"):
        loopkit.EarlyStopping("train/acc").on_epoch_end(None, {"train/loss": 1.0})
    loopkit.EarlyStopping("train/acc", strict=False).on_epoch_end(None, {"train/loss": 1.0})


def test_early_stopping_refuses_flags_that_are_not_bools():
    with pytest.raises(TypeError, match="EarlyStopping: verbose must be True or False, got 1"):
        loopkit.EarlyStopping("val/loss", verbose=1)


def test_a_magicmock_callback_is_refused_naming_it_before_any_step():
    """A bare ``unittest.mock.MagicMock`` as a callback (its every attribute a made-up callable, its flags truthy
    mocks) died before any step with Python's "generator raised StopIteration" (its ``reads_only`` looked set, no
    class declaring it); it is judged as a callback of one's own now, and refused with a message naming it (its
    state_dict holds mocks), the state left as it was."""
    from unittest import mock

    model = nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (its should_stop, a mock, reads as set)
        with pytest.raises(TypeError, match=r"^run_epochs: MagicMock\.state_dict\(\) must hold numbers"):
            loopkit.run_epochs(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), state, [torch.ones(3, 2)] * 2,
                               epochs=1, progress=False, callbacks=[mock.MagicMock()])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert loopkit.callbacks._declared_by(mock.MagicMock(), "never_stops") is None
