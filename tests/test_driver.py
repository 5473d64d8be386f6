"""Tests of loopkit.driver: run_epochs (every option), evaluate, predict.

References: a hand-written computation over the whole data set, a raw PyTorch forward in
eval mode, an uninterrupted run (for resume), hand-computed counts and scheduler values.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import loopkit
from loopkit import TrainState, eval_step, evaluate, predict, run_epochs, train_step, with_grad_accum
from loopkit.rng import create_rng
from tests._driver_helpers import (
    Counter, CrashAfterStep, Recorder, Watched, alive, counting_eval, forking_step, gc_off, make_data, make_state, mse,
    raw_loop_frees_its_model, stream,
)


def params_of(state: TrainState) -> list[torch.Tensor]:
    return [p.detach().clone() for p in state.model.parameters()]


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# --- epochs and max_steps ---------------------------------------------------------------------


def test_epochs_run_every_batch_of_every_epoch():
    loss = Counter(mse)
    state, history = run_epochs(train_step(loss), make_state(), make_data(5), epochs=3, progress=False)
    assert loss.calls == 15
    assert (state.step, state.epoch, state.batch_index) == (15, 3, 0)
    assert [(h["epoch"], h["step"]) for h in history] == [(0, 5), (1, 10), (2, 15)]


def test_no_state_handed_out_changes_afterwards(tmp_path):
    """run_epochs and with_logging add their windows to a step's new state in place (no second state per
    batch): only before anyone sees it. Every state a callback saw keeps the extras it had, and a pure
    call's input and output keep theirs through later calls."""
    seen = []

    class Keep(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            seen.append((state, dict(state.extras), state.step, len(state.extras.get("run_epochs/epoch", ()))))

    logger = loopkit.CSVLogger(str(tmp_path), "keep")
    for step in (train_step(mse), loopkit.with_logging(train_step(mse), logger, every_n_steps=3)):
        seen.clear()
        run_epochs(step, make_state(), make_data(5), epochs=2, callbacks=[Keep()], progress=False)
        assert [n for *_, n in seen] == [1, 2, 3, 4, 5] * 2  # the window grew in each state handed out
        for state, extras, number, _ in seen:
            assert dict(state.extras) == extras and state.step == number
        first = make_state()
        a, _ = step(first, make_data(1)[0])
        kept = (dict(first.extras), dict(a.extras))
        b, _ = step(a, make_data(1)[0])
        step(a, make_data(1)[0])
        assert (dict(first.extras), dict(a.extras)) == kept
        if "with_logging" in step.applied:  # its window grew in the new state only
            assert len(b.extras["logging/pending"]) == len(a.extras["logging/pending"]) + 1


def test_max_steps_stops_mid_epoch():
    loss = Counter(mse)
    state, history = run_epochs(train_step(loss), make_state(), make_data(5), max_steps=7, progress=False)
    assert loss.calls == 7
    assert (state.step, state.epoch, state.batch_index) == (7, 1, 2)
    assert [(h["epoch"], h["step"]) for h in history] == [(0, 5), (1, 7)]


def test_epochs_and_max_steps_whichever_comes_first():
    state, _ = run_epochs(train_step(mse), make_state(), make_data(5), epochs=1, max_steps=100, progress=False)
    assert (state.step, state.epoch) == (5, 1)
    state, _ = run_epochs(train_step(mse), make_state(), make_data(5), epochs=10, max_steps=3, progress=False)
    assert (state.step, state.epoch, state.batch_index) == (3, 0, 3)


def test_epochs_and_max_steps_are_absolute_counts():
    data = make_data(5)
    state, _ = run_epochs(train_step(mse), make_state(), data, epochs=1, progress=False)
    loss = Counter(mse)
    state, history = run_epochs(train_step(loss), state, data, epochs=2, progress=False)
    assert loss.calls == 5 and state.epoch == 2 and len(history) == 1
    state, history = run_epochs(train_step(loss), state, data, epochs=2, progress=False)
    assert loss.calls == 5 and history == []  # already done
    state, _ = run_epochs(train_step(loss), state, data, max_steps=12, progress=False)
    assert loss.calls == 7 and state.step == 12


@pytest.mark.parametrize(
    "data, message",
    [([], r"train_data is empty \(len\(\) is 0; epoch 0\)"), (iter(()), "train_data yielded no batches in epoch 0")],
    ids=["an-empty-list", "an-empty-iterator"],
)
def test_empty_train_data_is_refused_before_the_state_is_touched(data, message):
    state = make_state()
    with pytest.raises(ValueError, match=message):
        run_epochs(train_step(mse), state, data, max_steps=3, progress=False)
    state.check_usable()  # not donated: nothing ran


class _NothingStream(torch.utils.data.IterableDataset):
    """Yields nothing (a filter that dropped every sample, an empty shard)."""

    def __iter__(self):
        return iter(())


@pytest.mark.parametrize("epoch", [0, 3])
def test_a_fresh_dataloader_yielding_nothing_is_refused_as_empty_not_as_used_up(epoch):
    """A DataLoader in the fit's first epoch was refused with the advice for a used-up iterator (pass a DataLoader)."""
    state = make_state() if epoch == 0 else make_state().evolve(epoch=epoch)
    with pytest.raises(ValueError, match=f"train_data yielded no batches in epoch {epoch}: it is empty$"):
        run_epochs(train_step(mse), state, DataLoader(_NothingStream(), batch_size=4), epochs=5, progress=False)


def test_a_used_up_iterator_ends_the_fit_with_a_warning_instead_of_looping():
    data = make_data(5)
    loss = Counter(mse)
    with pytest.warns(RuntimeWarning, match="yielded no batches in epoch 1.*stopping"):
        state, history = run_epochs(train_step(loss), make_state(), iter(data), max_steps=10, progress=False)
    assert loss.calls == 5 and (state.step, state.epoch) == (5, 1) and len(history) == 1
    reference, _ = run_epochs(train_step(mse), make_state(), data, epochs=1, progress=False)
    assert_bitwise(params_of(state), params_of(reference))


def test_max_steps_counts_updates_under_grad_accum():
    loss = Counter(mse)
    step = with_grad_accum(train_step(loss), every=2)
    state, _ = run_epochs(step, make_state(), make_data(8), max_steps=3, progress=False)
    assert loss.calls == 6
    assert (state.step, state.batch_index) == (3, 6)


def test_partial_accumulation_group_is_flushed_at_epoch_end():
    step = with_grad_accum(train_step(mse), every=2)
    state, history = run_epochs(step, make_state(), make_data(5), epochs=2, progress=False)
    # 5 batches: two full groups and one flushed partial group per epoch
    assert [h["step"] for h in history] == [3, 6]
    assert "accum/count" not in state.extras


# --- min_epochs and min_steps ----------------------------------------------------------------------


class _AsksToStop(loopkit.Callback):
    """Sets ``should_stop`` after update ``at_step`` or at the end of epoch ``at_epoch`` (0-based), and takes it
    back at the end of epoch ``clear_epoch``: the callback of the Lightning runs the expectations below come from."""

    def __init__(self, at_step=None, at_epoch=None, clear_epoch=None):
        self.at_step, self.at_epoch, self.clear_epoch = at_step, at_epoch, clear_epoch

    def on_batch_end(self, state, metrics):
        if state.step == self.at_step:
            self.should_stop = True

    def on_epoch_end(self, state, record):
        if record["epoch"] == self.at_epoch:
            self.should_stop = True
        if record["epoch"] == self.clear_epoch:
            self.should_stop = False


# (callback, run_epochs' minimum) -> (the updates made, the updates each validation saw), measured with Lightning
# 2.6.6: Trainer(max_epochs=10, min_epochs=/min_steps=, num_sanity_val_steps=0), 4 batches an epoch, a callback
# setting trainer.should_stop as _AsksToStop does (on_train_batch_end at global_step, on_train_epoch_end at
# current_epoch); the updates at each on_validation_end
_LIGHTNING_MINIMUM_RUNS = [
    (dict(at_epoch=1), {}, 8, [4, 8]),
    (dict(at_epoch=1), dict(min_epochs=4), 16, [4, 8, 12, 16]),
    (dict(at_epoch=1, clear_epoch=2), dict(min_epochs=4), 40, [4 * k for k in range(1, 11)]),  # taken back: no stop
    (dict(at_step=2), dict(min_steps=3), 4, [4]),  # min_steps alone: one epoch at least
    (dict(at_step=5), dict(min_steps=7), 7, [4, 7]),  # met mid-epoch: stops after that batch, validated there
    (dict(at_step=5), dict(min_steps=7, min_epochs=0), 7, [4, 7]),
    (dict(at_step=2), dict(min_steps=9), 9, [4, 8, 9]),
]


@pytest.mark.parametrize("asks, minimum, updates, validated", _LIGHTNING_MINIMUM_RUNS)
def test_min_epochs_and_min_steps_hold_off_a_stop_as_lightnings_do(asks, minimum, updates, validated):
    recorder = Recorder()
    state, history = run_epochs(train_step(mse), make_state(), make_data(4), epochs=10, **minimum,
                                val=(counting_eval()[0], make_data(1)), sanity_val_batches=0,
                                callbacks=[_AsksToStop(**asks), recorder], progress=False)
    assert state.step == updates
    assert [s for _, s, _ in recorder.val_metrics] == validated
    assert history[-1]["step"] == updates and "val/mse" in history[-1]
    reference, _ = run_epochs(train_step(mse), make_state(), make_data(4), max_steps=updates, progress=False)
    assert_bitwise(params_of(state), params_of(reference))  # the same updates as a fit that ends there


def test_a_callback_asking_to_stop_from_the_start_is_held_off_by_min_epochs_and_warned_about_as_such():
    asks = _AsksToStop()
    asks.should_stop = True
    with pytest.warns(RuntimeWarning, match="should_stop is already set when the fit starts .* so this fit stops as "
                                            "soon as min_epochs/min_steps are met"):
        state, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=10, min_epochs=2,
                                    callbacks=[asks], progress=False)
    assert (state.epoch, len(history)) == (2, 2)


@pytest.mark.parametrize("minimum, match", [
    (dict(min_epochs=11), r"min_epochs=11 is more than epochs=10"),
    (dict(min_steps=41, max_steps=40), r"min_steps=41 is more than max_steps=40"),
    (dict(min_epochs=-1), r"min_epochs must be an int >= 0 or None, got -1"),
    (dict(min_steps=2.5), r"min_steps must be an int >= 0 or None, got 2.5"),
    (dict(min_epochs=True), r"min_epochs must be an int >= 0 or None, got True"),
])
def test_a_bad_minimum_is_refused_before_training(minimum, match):
    state = make_state()
    with pytest.raises(ValueError, match=match):
        run_epochs(train_step(mse), state, make_data(2), epochs=10, **minimum, progress=False)
    run_epochs(train_step(mse), state, make_data(2), epochs=1, progress=False)  # the state is still usable


def test_a_numpy_minimum_is_taken():
    state, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=np.int64(6), min_epochs=np.int64(3),
                                callbacks=[_AsksToStop(at_epoch=0)], progress=False)
    assert state.epoch == 3


# --- validation -------------------------------------------------------------------------------


def test_validation_every_n_epochs():
    ev, counter = counting_eval()
    rec = Recorder()
    _, history = run_epochs(
        train_step(mse), make_state(), make_data(3), epochs=5, val=(ev, make_data(4, seed=1)),
        val_every_n_epochs=2, sanity_val_batches=0, callbacks=[rec], progress=False,
    )
    assert [epoch for epoch, _, _ in rec.val_metrics] == [2, 4]  # after the 2nd and 4th epochs
    assert counter.calls == 2 * 4
    assert ["val/mse" in h for h in history] == [False, True, False, True, False]


def test_validation_every_n_steps():
    ev, counter = counting_eval()
    rec = Recorder()
    run_epochs(
        train_step(mse), make_state(), make_data(5), epochs=2, val=(ev, make_data(2, seed=1)),
        val_every_n_epochs=100, val_every_n_steps=3, sanity_val_batches=0, callbacks=[rec], progress=False,
    )
    assert [s for _, s, _ in rec.val_metrics] == [3, 6, 9]
    assert counter.calls == 3 * 2


def test_validation_every_n_steps_and_every_epoch():
    ev, _ = counting_eval()
    rec = Recorder()
    run_epochs(
        train_step(mse), make_state(), make_data(5), epochs=2, val=(ev, make_data(2, seed=1)),
        val_every_n_steps=3, sanity_val_batches=0, callbacks=[rec], progress=False,
    )
    assert [s for _, s, _ in rec.val_metrics] == [3, 5, 6, 9, 10]


def test_validation_every_n_steps_counts_updates_not_batches():
    ev, _ = counting_eval()
    rec = Recorder()
    run_epochs(
        with_grad_accum(train_step(mse), every=2), make_state(), make_data(8), epochs=1,
        val=(ev, make_data(2, seed=1)), val_every_n_epochs=100, val_every_n_steps=2,
        sanity_val_batches=0, callbacks=[rec], progress=False,
    )
    # updates land on batches 2, 4, 6, 8; validation after updates 2 and 4 only
    assert [s for _, s, _ in rec.val_metrics] == [2, 4]


def test_a_step_validation_on_the_epochs_last_update_stands_for_the_epoch_end_one():
    ev, counter = counting_eval()
    rec = Recorder()
    _, history = run_epochs(
        train_step(mse), make_state(), make_data(4), epochs=2, val=(ev, make_data(2, seed=1)),
        val_every_n_steps=2, sanity_val_batches=0, callbacks=[rec], progress=False,
    )
    # the same parameters are not validated twice (nor reported twice to EarlyStopping)
    assert [s for _, s, _ in rec.val_metrics] == [2, 4, 6, 8]
    assert counter.calls == 4 * 2
    assert [h["val/mse"] for h in history] == [rec.val_metrics[1][2]["val/mse"], rec.val_metrics[3][2]["val/mse"]]


@pytest.mark.parametrize(("limit", "every", "fraction", "expected"), [
    (12, 2, 0.5, [3, 6, 9, 12]),  # b = 12: validations every 6 batches, 3 updates
    (0.5, 1, 0.5, [4, 8, 12, 16]),  # b = int(16 * 0.5) = 8: every 4 batches
    (0.75, 2, 0.5, [3, 6, 9, 12]),  # b = 12
    (12, 1, 0.25, [3, 6, 9, 12, 15, 18, 21, 24]),  # every int(12 * 0.25) = 3 batches
    (None, 2, 0.5, [4, 8, 12, 16]),  # b = 16: every 8 batches, 4 updates
])
def test_the_guides_val_check_interval_fraction_row_validates_where_lightning_does(limit, every, fraction, expected):
    """docs/from_lightning.md: val_check_interval=f (a fraction) is val_every_n_steps=max(1, int(b * f)) // n, b an
    epoch's training batches after limit_train_batches (Lightning's val_check_batch = int(num_training_batches * f),
    batches counted afresh each epoch). Reference: the updates after which Lightning 2.6.6 validated on 16 batches an
    epoch over 2 epochs (measured, hand-copied); the guide's formula without the limit (len(train_loader) // (2 * n))
    validated after updates 4, 8 where Lightning, limited to 12 batches under accumulation 2, validates after 3, 6, 9."""
    guide = (Path(__file__).resolve().parent.parent / "docs" / "from_lightning.md").read_text(encoding="utf-8")
    row = next(line for line in guide.splitlines() if line.startswith("| `val_check_interval=0.25` (a fraction)"))
    assert "`max(1, int(b * 0.25)) // n`" in row and "after `limit_train_batches`" in row  # the formula tested here
    data = make_data(16)
    b = len(data) if limit is None else min(len(data), limit) if isinstance(limit, int) else int(len(data) * limit)
    step = train_step(mse) if every == 1 else with_grad_accum(train_step(mse), every=every)
    rec = Recorder()
    run_epochs(step, make_state(), data, epochs=2, limit_train_batches=1.0 if limit is None else limit,
               val=(counting_eval()[0], make_data(1, seed=1)), val_every_n_steps=max(1, int(b * fraction)) // every,
               sanity_val_batches=0, callbacks=[rec], progress=False)
    assert [s for _, s, _ in rec.val_metrics] == expected


def test_the_epoch_end_validation_still_runs_after_a_flushed_update():
    ev, _ = counting_eval()
    rec = Recorder()
    # accumulation over 3 of 4 batches: update 1 at batch 3, update 2 from the end-of-epoch flush
    run_epochs(
        with_grad_accum(train_step(mse), every=3), make_state(), make_data(4), epochs=1,
        val=(ev, make_data(2, seed=1)), val_every_n_steps=1, sanity_val_batches=0, callbacks=[rec], progress=False,
    )
    assert [s for _, s, _ in rec.val_metrics] == [1, 2]


def test_sanity_validation_runs_two_batches_before_training_and_is_not_recorded():
    order: list[str] = []

    def metric(m, b):
        order.append("val")
        return {"mse": mse(m, b)}

    def loss(m, b):
        order.append("train")
        return mse(m, b)

    rec = Recorder()
    _, history = run_epochs(
        train_step(loss), make_state(), make_data(3), epochs=1, val=(eval_step(metric), make_data(5, seed=1)),
        val_every_n_epochs=2, callbacks=[rec], progress=False,
    )
    assert order == ["val", "val", "train", "train", "train"]
    assert "validation_end" not in rec.events
    assert all(not k.startswith("val/") for h in history for k in h)


def test_sanity_validation_count_is_configurable_and_zero_disables():
    for sanity, expected in ((0, 5), (1, 6), (3, 8)):
        ev, counter = counting_eval()
        rec = Recorder()
        run_epochs(
            train_step(mse), make_state(), make_data(2), epochs=1, val=(ev, make_data(5, seed=1)),
            sanity_val_batches=sanity, callbacks=[rec], progress=False,
        )
        assert counter.calls == expected, sanity
        assert rec.events.count("validation_end") == 1


@pytest.mark.parametrize("limit, expected", [(None, 5), (3, 3), (0.4, 2)])
def test_sanity_validation_of_minus_one_reads_every_validation_batch_as_lightnings(limit, expected):
    """Lightning's num_sanity_val_steps=-1: the whole validation set (within limit_val_batches)."""
    ev, counter = counting_eval()
    run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, val=(ev, make_data(5, seed=1)),
               sanity_val_batches=-1, limit_val_batches=limit, progress=False)
    assert counter.calls == 2 * expected  # the sanity pass, then the epoch's validation


def test_val_every_n_epochs_none_validates_only_every_n_steps_as_lightnings_check_val_every_n_epoch_none():
    recorder = Recorder()
    state, history = run_epochs(train_step(mse), make_state(), make_data(4), epochs=2, val=(counting_eval()[0], make_data(2)),
                                val_every_n_epochs=None, val_every_n_steps=3, callbacks=[recorder], progress=False)
    assert [s for _, s, _ in recorder.val_metrics] == [3, 6]  # not at the epochs' ends (4, 8)
    # a stop mid-epoch is validated, as Lightning's (with check_val_every_n_epoch=None, val_check_interval=2, a
    # callback stopping after update 7 of 4-batch epochs: validations at 2, 4, 6 and 7)
    recorder = Recorder()
    run_epochs(train_step(mse), make_state(), make_data(4), epochs=3, val=(counting_eval()[0], make_data(2)),
               val_every_n_epochs=None, val_every_n_steps=2, callbacks=[_AsksToStop(at_step=7), recorder], progress=False)
    assert [s for _, s, _ in recorder.val_metrics] == [2, 4, 6, 7]
    with pytest.raises(ValueError, match="val_every_n_epochs=None validates only every val_every_n_steps updates"):
        run_epochs(train_step(mse), state, make_data(4), epochs=3, val=(counting_eval()[0], make_data(2)),
                   val_every_n_epochs=None, progress=False)


def test_sanity_validation_does_not_change_training():
    data, val_data = make_data(4), make_data(3, seed=1)
    ev, _ = counting_eval()
    a, _ = run_epochs(train_step(mse), make_state(dropout=True), data, epochs=1, progress=False)
    b, _ = run_epochs(train_step(mse), make_state(dropout=True), data, epochs=1, val=(ev, val_data),
                      val_every_n_epochs=5, sanity_val_batches=3, progress=False)
    assert_bitwise(params_of(a), params_of(b))
    assert torch.equal(a.rng["cpu"], b.rng["cpu"])


# --- several validation sets ---------------------------------------------------------------------


def hand_weighted_mse(model: nn.Module, batches) -> float:
    """The reference: the mean squared error over every sample of ``batches``, in float64, by hand."""
    with torch.no_grad():
        errors = torch.cat([((model(x) - y) ** 2).double().flatten() for x, y in batches])
    return float(errors.mean())


def test_several_named_validation_sets_are_each_validated_and_named_by_their_set():
    sets = {"small": make_data(3, batch_size=2, seed=1), "big": make_data(2, batch_size=6, seed=2)}
    recorder = Recorder()
    state, history = run_epochs(train_step(mse), make_state(), make_data(4), epochs=2,
                                val=(counting_eval()[0], sets), callbacks=[recorder], progress=False)
    assert [sorted(k for k in r if k.startswith("val/")) for r in history] == [["val/mse/big", "val/mse/small"]] * 2
    for name, data in sets.items():
        assert history[-1][f"val/mse/{name}"] == pytest.approx(hand_weighted_mse(state.model, data), rel=1e-6)
    assert [sorted(m) for _, _, m in recorder.val_metrics] == [["val/mse/big", "val/mse/small"]] * 2  # one hook call
    assert loopkit.evaluate(counting_eval()[0], state, sets) == {
        f"mse/{name}": loopkit.evaluate(counting_eval()[0], state, data)["mse"] for name, data in sets.items()}


def test_the_sanity_check_and_the_val_limit_apply_to_each_set_as_lightnings_do():
    """Lightning 2.6.6 with val_dataloaders=[a, b], num_sanity_val_steps=2, limit_val_batches=2 runs batches 0 and 1
    of a, then of b, in the sanity check and in each validation."""
    seen = []

    def metric(model, batch):
        seen.append(batch[0][0, 0].item())
        return {"mse": mse(model, batch)}

    a, b = make_data(4, seed=1), make_data(3, seed=2)
    firsts = lambda data, n: [x[0, 0].item() for x, _ in data[:n]]  # noqa: E731
    run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, val=(eval_step(metric), {"a": a, "b": b}),
               limit_val_batches=2, progress=False)
    assert seen == (firsts(a, 2) + firsts(b, 2)) * 2
    seen.clear()
    run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, val=(eval_step(metric), {"a": a, "b": b}),
               sanity_val_batches=1, limit_val_batches=0.5, progress=False)
    assert seen == firsts(a, 1) + firsts(b, 1) + firsts(a, 2) + firsts(b, 1)  # 0.5 of 4 and of 3 batches: 2 and 1


def test_a_list_of_dataloaders_is_named_as_lightning_names_them():
    loaders = [DataLoader(TensorDataset(*make_data(1, batch_size=8, seed=s)[0]), batch_size=4) for s in (1, 2)]
    state, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, val=(counting_eval()[0], loaders),
                                progress=False)
    for i, loader in enumerate(loaders):
        assert history[0][f"val/mse/dataloader_idx_{i}"] == pytest.approx(hand_weighted_mse(state.model, loader), rel=1e-6)
    _, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, val=(counting_eval()[0], loaders[:1]),
                            progress=False)
    assert "val/mse" in history[0]  # one alone has no suffix, as in Lightning


@pytest.mark.parametrize("monitor, kept", [("val/score/b", [2]), ("val/score/a", [6])])
def test_a_monitor_on_one_validation_set_drives_early_stopping_checkpoints_and_the_logs(tmp_path, monitor, kept):
    def metric(model, batch):  # set "b" gets worse every epoch, "a" better
        sign = 1.0 if batch[1].shape[0] == 3 else -1.0
        return {"score": torch.tensor(sign * (state_epoch[0] + 1.0))}

    state_epoch = [0]

    class Epoch(loopkit.Callback):
        def on_epoch_start(self, state):
            state_epoch[0] = state.epoch

    sets = {"a": make_data(1, batch_size=2), "b": make_data(1, batch_size=3)}
    logger = loopkit.CSVLogger(str(tmp_path / "logs"), "sets")
    step = loopkit.with_logging(loopkit.with_checkpointing(train_step(mse), tmp_path / "ckpt", monitor=monitor,
                                                           keep_best=1, keep_last=1), logger, every_n_steps=1)
    stopper = loopkit.EarlyStopping("val/score/b", patience=2)
    state, history = run_epochs(step, make_state(), make_data(2), epochs=10, val=(eval_step(metric), sets),
                                callbacks=[Epoch(), stopper], progress=False)
    assert len(history) == 3 and [r["val/score/b"] for r in history] == [1.0, 2.0, 3.0]
    assert [r["val/score/a"] for r in history] == [-1.0, -2.0, -3.0]
    import csv
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/score/b")]
    assert [(float(r["val/score/a"]), float(r["val/score/b"])) for r in rows] == [(-1.0, 1.0), (-2.0, 2.0), (-3.0, 3.0)]
    # the one checkpoint kept is the best validation's of the monitored set: the first for "b", the last for "a"
    assert [c.step for c in loopkit.checkpoint.list_checkpoints(tmp_path / "ckpt")] == kept


def test_evaluate_names_an_empty_set_and_refuses_what_run_epochs_refuses():
    state = make_state()
    with pytest.warns(RuntimeWarning, match=r"evaluate: no means for data\['a'\]"):
        means = loopkit.evaluate(counting_eval()[0], state, {"a": [], "b": make_data(1)})
    assert list(means) == ["mse/b"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loopkit.evaluate(counting_eval()[0], state, {"a": []}) == {}
    assert [str(w.message)[:38] for w in caught] == ["evaluate: no means for data['a']: it y"]  # once
    with pytest.raises(ValueError, match=r"each name must be a non-empty string without '/'"):
        loopkit.evaluate(counting_eval()[0], state, {"a/b": make_data(1)})
    loader = DataLoader(TensorDataset(*make_data(1, batch_size=4)[0]), batch_size=2)
    with pytest.raises(TypeError, match=r"evaluate: data is a list mixing DataLoaders with other items \(DataLoader, list\)"):
        loopkit.evaluate(counting_eval()[0], state, [loader, make_data(1)])


@pytest.mark.parametrize("sets, error, match", [
    ({}, ValueError, r"val's data is an empty mapping"),
    ({"": make_data(1)}, ValueError, r"each name must be a non-empty string without '/'"),
    ({"a/b": make_data(1)}, ValueError, r"got 'a/b'"),
    ({1: make_data(1)}, ValueError, r"got 1"),
    ({"a": make_data(1), "b": []}, ValueError, r"val's data\['b'\] is empty"),
    ({"a": iter(make_data(1))}, TypeError, r"val's data\['a'\] is an iterator"),
    ({"a": make_data(1), "b": 3}, TypeError, r"val's data\['b'\] must be an iterable of batches"),
    ([DataLoader(TensorDataset(torch.zeros(2, 3), torch.zeros(2, 1))), make_data(1)], TypeError,
     r"val's data is a list mixing DataLoaders with other items \(DataLoader, list\)"),
])
def test_bad_validation_sets_are_refused_naming_the_set(sets, error, match):
    state = make_state()
    with pytest.raises(error, match=match):
        run_epochs(train_step(mse), state, make_data(2), epochs=1, val=(counting_eval()[0], sets), progress=False)
    run_epochs(train_step(mse), state, make_data(2), epochs=1, progress=False)  # the state is still usable


# --- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("limit, expected", [(3, 3), (0.5, 5), (0.25, 2), (1.0, 10), (50, 10)])
def test_limit_train_batches(limit, expected):
    loss = Counter(mse)
    state, history = run_epochs(train_step(loss), make_state(), make_data(10), epochs=2,
                                limit_train_batches=limit, progress=False)
    assert loss.calls == 2 * expected
    assert state.step == 2 * expected and state.epoch == 2


def test_limit_train_batches_takes_the_first_batches_of_an_unshuffled_list():
    data = make_data(10)
    seen: list[torch.Tensor] = []

    def loss(m, b):
        seen.append(b[0])
        return mse(m, b)

    run_epochs(train_step(loss), make_state(), data, epochs=1, limit_train_batches=3, progress=False)
    assert len(seen) == 3 and all(s is d[0] for s, d in zip(seen, data))


@pytest.mark.parametrize("limit, expected", [(2, 2), (0.5, 2), (0.75, 3), (1.0, 4), (10, 4)])
def test_limit_val_batches(limit, expected):
    ev, counter = counting_eval()
    run_epochs(train_step(mse), make_state(), make_data(2), epochs=3, val=(ev, make_data(4, seed=1)),
               sanity_val_batches=0, limit_val_batches=limit, progress=False)
    assert counter.calls == 3 * expected


def test_limit_val_batches_bounds_the_sanity_check():
    ev, counter = counting_eval()
    run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, val=(ev, make_data(4, seed=1)),
               val_every_n_epochs=5, limit_val_batches=1, progress=False)
    assert counter.calls == 1


@pytest.mark.parametrize("limit, expected", [(0.25, 1), (0.5, 2), (1, 1)])
def test_a_val_fraction_bounds_the_sanity_check_too(limit, expected):
    """Sanity validation never runs more batches than the limited validation would (Lightning's rule)."""
    ev, counter = counting_eval()
    run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, val=(ev, make_data(4, seed=1)),
               val_every_n_epochs=5, limit_val_batches=limit, progress=False)
    assert counter.calls == expected


@pytest.mark.parametrize("zero", [0, 0.0])
@pytest.mark.parametrize("stop", [dict(max_steps=5), dict(epochs=3)])
def test_limit_train_batches_zero_turns_training_off(stop, zero):
    """As in Lightning: no epoch runs (with max_steps alone it ran empty epochs forever); the sanity
    validation still runs, and the state comes back as given, still usable."""
    loss = Counter(mse)
    ev, counter = counting_eval()
    state = make_state()
    before = params_of(state)
    out, history = run_epochs(train_step(loss), state, make_data(4), val=(ev, make_data(4, seed=1)),
                              limit_train_batches=zero, progress=False, **stop)
    assert loss.calls == 0 and history == [] and counter.calls == 2  # the sanity batches alone
    assert (out.step, out.epoch, out.batch_index) == (0, 0, 0)
    assert_bitwise(params_of(out), before)
    state.check_usable()


@pytest.mark.parametrize("zero", [0, 0.0], ids=["int", "float (Lightning takes it as 0)"])
def test_limit_val_batches_zero_disables_validation(zero):
    ev, counter = counting_eval()
    rec = Recorder()
    _, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=2, val=(ev, make_data(4, seed=1)),
                            limit_val_batches=zero, callbacks=[rec], progress=False)
    assert counter.calls == 0 and "validation_end" not in rec.events
    assert all("val/mse" not in h for h in history)


# --- estimated_stepping_batches ------------------------------------------------------------------


@pytest.mark.parametrize(("options", "expected"), [
    ({"epochs": 6, "max_steps": 20, "limit_train_batches": 12, "accumulate_every": 2}, 20),  # min(20, 6 * 6)
    ({"epochs": 6, "limit_train_batches": 12, "accumulate_every": 2}, 36),
    ({"epochs": 3, "accumulate_every": 3}, 18),  # ceil(16 / 3) = 6: the partial group's update counts
    ({"epochs": 4, "limit_train_batches": 0.5, "accumulate_every": 3}, 12),  # int(16 * 0.5) = 8, ceil(8 / 3) = 3
    ({"epochs": 2, "limit_train_batches": 0.3}, 8),  # int(16 * 0.3) = 4
    ({"epochs": 2, "limit_train_batches": 20}, 32),  # min(16, 20)
    ({"epochs": 2, "limit_train_batches": 0}, 0),  # training off (Lightning answers max_steps, -1: no count set)
    ({"epochs": 2, "limit_train_batches": 1.0, "max_steps": -1}, 32),  # max_steps=-1: no limit
    ({"max_steps": 50}, 50),  # max_epochs None with max_steps: Lightning's max_epochs=-1
    ({"epochs": -1, "max_steps": 7}, 7),
    ({"epochs": -1, "max_steps": -1}, math.inf),  # infinite training
    ({"epochs": 3, "max_steps": 100}, 48),
])
def test_estimated_stepping_batches_is_lightnings_count(options, expected):
    """Lightning 2.6.6's Trainer.estimated_stepping_batches: max_epochs=-1 gives max_steps (inf if -1); else
    min(max_steps, ceil(num_training_batches / accumulate_grad_batches) * max_epochs), num_training_batches
    min(len, limit) for an int limit, int(len * limit) for a fraction. Reference: computed by hand from those rules
    for a loader of 16 batches, and checked against Lightning 2.6.6 (which answers the same but for training off)."""
    assert loopkit.estimated_stepping_batches(DataLoader(torch.zeros(128, 3), batch_size=8), **options) == expected


def test_estimated_stepping_batches_of_data_without_len_counts_an_int_limit_or_is_unbounded():
    """Lightning: data of infinite length limited by an int counts the limit; unlimited, max_steps (here inf
    without one, where Lightning answers max_steps=-1)."""
    data = stream(make_data(16))
    assert loopkit.estimated_stepping_batches(data, epochs=3, limit_train_batches=5, accumulate_every=2) == 9
    assert loopkit.estimated_stepping_batches(data, epochs=3, max_steps=10) == 10
    assert loopkit.estimated_stepping_batches(data, epochs=3) == math.inf
    with pytest.raises(ValueError, match="limit_train_batches=0.5 is a fraction, but the data has no len"):
        loopkit.estimated_stepping_batches(data, epochs=3, limit_train_batches=0.5)


@pytest.mark.parametrize("options", [
    {"epochs": 3, "limit_train_batches": 12, "accumulate_every": 2},
    {"epochs": 2, "limit_train_batches": 0.5, "accumulate_every": 3},
    {"epochs": 5, "max_steps": 13, "accumulate_every": 2},
    {"max_steps": 9, "limit_train_batches": 3},
])
def test_estimated_stepping_batches_sizes_a_one_cycle_schedule_to_the_fits_updates(options):
    """Reference: the fit itself. run_epochs with the same options makes that many updates, and a OneCycleLR in the
    state sized by it steps to its end at the fit's last update (a step more is refused, as torch refuses one past
    total_steps), where epochs * len(train_data) would leave it mid-schedule."""
    data = make_data(16)
    total = loopkit.estimated_stepping_batches(data, **options)
    every = options.get("accumulate_every", 1)
    model = make_state().model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=total)
    step = train_step(mse) if every == 1 else with_grad_accum(train_step(mse), every=every)
    fit = {k: v for k, v in options.items() if k != "accumulate_every"}
    state, _ = run_epochs(step, TrainState.create(model, optimizer, schedule), data, progress=False, **fit)
    assert state.step == total
    assert state.scheduler.last_epoch == total
    with pytest.raises(ValueError, match=f"Tried to step {total + 1} times"):  # its end: one more is refused
        state.scheduler.step()


def test_estimated_stepping_batches_refuses_what_run_epochs_and_with_grad_accum_refuse():
    data = make_data(4)
    for options, match in [({"epochs": 0}, "epochs must be a positive int, None or -1, got 0"),
                           ({"epochs": 2, "max_steps": 0}, "max_steps must be a positive int"),
                           ({"epochs": 2, "accumulate_every": 0}, "accumulate_every must be a positive int"),
                           ({"epochs": 2, "limit_train_batches": 1.5}, "a fraction must be in"),
                           ({"epochs": 2, "limit_train_batches": 0.1}, "limit_train_batches=0.1 of 4 batches is 0")]:
        with pytest.raises(ValueError, match=match):
            loopkit.estimated_stepping_batches(data, **options)
    with pytest.raises(TypeError, match="pass the data it makes"):
        loopkit.estimated_stepping_batches(lambda epoch: data, epochs=2)


# --- history ------------------------------------------------------------------------------------


def test_history_train_loss_is_the_mean_of_the_step_losses():
    rec = Recorder()

    def loss(m, b):
        err = m(b[0]) - b[1]
        return (err**2).mean(), {"mae": err.abs().mean()}

    _, history = run_epochs(train_step(loss), make_state(), make_data(6), epochs=2, callbacks=[rec], progress=False)
    assert len(history) == 2
    for e in range(2):
        seen = rec.batch_metrics[6 * e : 6 * (e + 1)]
        for key in ("loss", "mae"):
            expected = math.fsum(float(m[key]) for m in seen) / 6
            assert history[e][f"train/{key}"] == pytest.approx(expected, rel=1e-6, abs=0)
        assert history[e] == rec.epoch_metrics[e]  # on_epoch_end sees the record


def test_history_val_metrics_equal_evaluate_on_the_same_state():
    ev, _ = counting_eval(lambda m, b: {"mse": mse(m, b), "mean_pred": m(b[0]).mean()})
    val_data = make_data(3, seed=1)
    seen: list[dict] = []

    class EvaluateNow:
        def on_epoch_end(self, state, metrics):
            seen.append(evaluate(ev, state, val_data))

    state, history = run_epochs(train_step(mse), make_state(), make_data(4), epochs=3, val=(ev, val_data),
                                callbacks=[EvaluateNow()], progress=False)
    assert len(history) == 3
    for h, ref in zip(history, seen):
        assert {k: h[k] for k in ("val/mse", "val/mean_pred")} == {f"val/{k}": v for k, v in ref.items()}
    # and against a hand computation over the whole validation set with the final model
    x = torch.cat([b[0] for b in val_data])
    y = torch.cat([b[1] for b in val_data])
    with torch.no_grad():
        expected = ((state.model(x) - y) ** 2).mean().item()
    assert history[-1]["val/mse"] == pytest.approx(expected, rel=1e-6)


# --- evaluate and predict -----------------------------------------------------------------------


def test_evaluate_weights_by_batch_size():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    data = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4)]  # 4, 4, 2
    step = eval_step(lambda m, b: {"mse": mse(m, b), "mae": (m(b[0]) - b[1]).abs().mean()})
    got = evaluate(step, TrainState.create(model), data)
    with torch.no_grad():
        err = model(x) - y
    assert got["mse"] == pytest.approx((err**2).mean().item(), rel=1e-6)
    assert got["mae"] == pytest.approx(err.abs().mean().item(), rel=1e-6)
    unweighted = sum(((model(b[0]) - b[1]) ** 2).mean().item() for b in data) / 3
    assert abs(got["mse"] - unweighted) > 1e-4  # the check can tell the two apart


def test_float64_and_int64_metrics_keep_their_precision_in_every_mean():
    """Sums of float64 and int64 metrics are taken in float64 (float32 has 24 bits: 1 + 1e-9 and a
    count past 2**24 were rounded); the reference is the same mean in Python's own floats."""
    tiny = [1.0 + 1e-9 * (i + 1) for i in range(4)]
    big = [2**25 + 1 + i for i in range(4)]
    metric_calls = iter(range(100))

    def metrics(m, b):
        i = next(metric_calls) % 4
        return {"tiny": torch.tensor(tiny[i], dtype=torch.float64), "tokens": torch.tensor(big[i]),
                "count": big[i], "np_tiny": np.float64(tiny[i]), "np_count": np.int64(big[i])}

    def loss_fn(m, b):
        return mse(m, b), metrics(m, b)

    want = {"tiny": sum(tiny) / 4, "tokens": sum(big) / 4, "count": sum(big) / 4, "np_tiny": sum(tiny) / 4,
            "np_count": sum(big) / 4}  # numbers too: Python ints and numpy's float64 and int64
    assert evaluate(eval_step(metrics), make_state(), make_data(4)) == want
    _, history = run_epochs(train_step(loss_fn), make_state(), make_data(4), epochs=1, progress=False)
    assert {k: history[0][f"train/{k}"] for k in want} == want


def test_evaluate_with_a_dict_batch():
    x = torch.arange(7.0)
    data = [{"x": x[:5]}, {"x": x[5:]}]
    got = evaluate(eval_step(lambda m, b: {"mean": b["x"].mean()}), TrainState.create(nn.Identity()), data)
    assert got["mean"] == pytest.approx(x.mean().item(), rel=1e-7)


@dataclasses.dataclass
class _Tagged:
    note: str
    scale: torch.Tensor  # 0-dim: not a batch dimension
    x: torch.Tensor


@pytest.mark.parametrize(
    "collate",
    [
        lambda names, x: (names, x),  # DataLoader's default collate of (str, tensor) samples
        lambda names, x: {"text": names, "x": x},
        lambda names, x: _Tagged(names[0], torch.tensor(2.0), x),
    ],
    ids=["tuple-of-strings-first", "dict-of-strings-first", "dataclass-with-a-scalar-first"],
)
def test_evaluate_weights_by_the_first_tensor_with_a_batch_dimension(collate):
    x = torch.arange(7.0)
    data = [collate([f"s{i}" for i in range(n)], part) for n, part in ((5, x[:5]), (2, x[5:]))]

    def mean_x(m, b):
        return {"mean": (b[1] if isinstance(b, tuple) else b["x"] if isinstance(b, dict) else b.x).mean()}

    got = evaluate(eval_step(mean_x), TrainState.create(nn.Identity()), data)
    assert got["mean"] == pytest.approx(x.mean().item(), rel=1e-7)  # 3.0; equal weights would give 4.25


def test_evaluate_warns_when_the_batchs_tensors_disagree_on_its_size_as_lightning_does():
    """A ``lengths`` tensor of 2 before 3 samples weighted the batch by 2 with no word (Lightning's
    extract_batch_size warns of an ambiguous collection). The mean is still the first tensor's weighting, now
    with a warning naming the sizes (once an evaluate: see the next test); a batch whose tensors agree gets none."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)
    data = [{"lens": torch.tensor([1, 2]), "x": x[:3], "y": y[:3]}, {"lens": torch.tensor([1, 2]), "x": x[3:], "y": y[3:]}]
    step = eval_step(lambda m, b: {"mse": mse(m, (b["x"], b["y"]))})
    state = make_state()
    with pytest.warns(UserWarning, match=r"the batch's tensors differ in their first dimension \(first seen: \[2, 3\]\): "
                                         r".* taken from its first tensor \(2\)"):
        got = evaluate(step, state, data)
    with torch.no_grad():
        per_batch = [((state.model(b["x"]) - b["y"]) ** 2).mean().item() for b in data]
    assert got["mse"] == pytest.approx((per_batch[0] * 2 + per_batch[1] * 2) / 4, rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(step, state, [{"x": b["x"], "y": b["y"]} for b in data])


def _ragged_batches(n: int) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """``n`` batches of (4 labels, 4 token sequences whose lengths vary from batch to batch): the size is the
    labels' (4), and the sequences' first dimensions make another set of sizes in nearly every batch."""
    g = torch.Generator().manual_seed(5)
    lens = [[3 + (i * 7 + j * 3) % 11 for j in range(4)] for i in range(n)]
    return [(torch.randn(4, generator=g), [torch.randn(k, generator=g) for k in ls]) for ls in lens]


def _size_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "differ in their first dimension" in str(w.message)]


def test_one_evaluate_over_batches_of_varying_shapes_warns_once_and_weights_by_the_first_tensor():
    """The warning held each batch's set of sizes, so Python's once-per-message filter let one through per
    distinct shape: 20 batches of varying token lengths gave 11 (Lightning warns once of an ambiguous batch).
    Under the "always" filter, which repeats every warning given, one evaluate gives exactly one; so does a
    mapping of two sets (one evaluate). The means stay the labels-weighted means computed by hand."""
    data = _ragged_batches(20)
    data[3] = (torch.randn(2), data[3][1])  # a smaller batch: the weighting is seen
    step = eval_step(lambda m, b: {"mean": b[0].mean(), "first": b[1][0].sum()})
    weights = [float(len(b[0])) for b in data]
    want = {"mean": sum(b[0].sum().item() for b in data) / sum(weights),
            "first": sum(w * b[1][0].sum().item() for w, b in zip(weights, data)) / sum(weights)}
    for given, names in ((data, ("mean", "first")), ({"a": data, "b": data[:5]}, ("mean/a", "first/a"))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = evaluate(step, TrainState.create(nn.Identity()), given)
        assert len(_size_warnings(caught)) == 1, _size_warnings(caught)
        assert _size_warnings(caught)[0].startswith("evaluate: ")
        assert [got[n] for n in names] == pytest.approx([want["mean"], want["first"]], rel=1e-6)
    with warnings.catch_warnings(record=True) as caught:  # each evaluate says it anew
        warnings.simplefilter("always")
        for _ in range(2):
            evaluate(step, TrainState.create(nn.Identity()), data[:2])
    assert len(_size_warnings(caught)) == 2


def test_a_fit_whose_validation_batches_vary_in_shape_warns_once():
    """The sanity check and every epoch's validation (and a validation every n steps) read the same ragged
    set: one fit warns once, not once per batch or per distinct shape; the validation means stay the
    labels-weighted mean."""
    val = _ragged_batches(6)
    step = eval_step(lambda m, b: {"label": b[0].mean()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, history = run_epochs(train_step(mse), make_state(), make_data(3), epochs=3, val=(step, val),
                                val_every_n_steps=2, progress=False)
    assert len(_size_warnings(caught)) == 1, _size_warnings(caught)
    assert _size_warnings(caught)[0].startswith("run_epochs: a validation: ")
    assert history[-1]["val/label"] == pytest.approx(torch.cat([b[0] for b in val]).mean().item(), rel=1e-6)


@pytest.mark.parametrize("limit, batches", [(2, 2), (0.5, 2), (0.75, 3), (None, 4)])
def test_evaluate_limit(limit, batches):
    data = make_data(4)
    counter = Counter(lambda m, b: {"mse": mse(m, b)})
    state = make_state()
    got = evaluate(eval_step(counter), state, data, limit=limit)
    assert counter.calls == batches
    x = torch.cat([b[0] for b in data[:batches]])
    y = torch.cat([b[1] for b in data[:batches]])
    with torch.no_grad():
        assert got["mse"] == pytest.approx(((state.model(x) - y) ** 2).mean().item(), rel=1e-6)


def test_evaluate_leaves_the_state_unchanged():
    state = make_state(dropout=True)
    before = params_of(state)
    rng = state.rng["cpu"].clone()
    evaluate(eval_step(lambda m, b: {"mse": mse(m, b)}), state, make_data(3))
    assert_bitwise(before, params_of(state))
    assert torch.equal(rng, state.rng["cpu"]) and state.model.training


@pytest.mark.parametrize("global_rng", [False, True])
def test_each_batch_of_an_evaluation_draws_fresh_numbers_the_same_for_the_same_state(global_rng):
    """A stochastic evaluation (MC dropout, a diffusion model's random timesteps) averages over draws, as a raw
    loop's and Lightning's batches draw anew (every batch drew the first batch's numbers). Its first batch draws
    what the step called on the state draws; two evaluations of one state draw alike; nothing global moves."""
    drawn: list[torch.Tensor] = []
    step = eval_step(lambda m, b: {"u": drawn.append(torch.rand(())) or drawn[-1]})
    state = TrainState.create(nn.Linear(2, 1), seed=3, global_rng=global_rng)
    data = [torch.zeros(1, 2)] * 60
    torch.manual_seed(11)
    start = torch.get_rng_state()
    means = evaluate(step, state, data)
    first, again = drawn[:], (drawn.clear(), evaluate(step, state, data), drawn[:])[2]
    assert len({float(u) for u in first}) == 60 and 0.35 < means["u"] < 0.65  # 60 uniforms: sd 0.037
    assert means["u"] == pytest.approx(float(torch.stack(first).double().mean()), rel=1e-6)
    assert [float(u) for u in again] == [float(u) for u in first]
    assert float(step(state, data[0])[1]["u"]) == float(first[0])
    assert torch.equal(torch.get_rng_state(), start) and (global_rng or torch.equal(state.rng["cpu"], create_rng(3)["cpu"]))


def test_a_validation_draws_as_evaluate_on_the_state_it_validates():
    """run_epochs' validations are evaluate's (reference: evaluate called on the state each one saw)."""
    noise = eval_step(lambda m, b: {"u": torch.rand(()) + 0 * mse(m, b)})
    val_data = make_data(5, seed=1)
    drawn: list[float] = []

    class EvaluateNow:
        def on_epoch_end(self, state, metrics):
            drawn.append(evaluate(noise, state, val_data)["u"])

    _, history = run_epochs(train_step(mse), make_state(dropout=True), make_data(4), epochs=2, val=(noise, val_data),
                            callbacks=[EvaluateNow()], progress=False)
    assert [h["val/u"] for h in history] == drawn and drawn[0] != drawn[1]


@pytest.mark.parametrize("call", [
    lambda state, data: evaluate(eval_step(lambda m, b: {"mse": mse(m, b)}), state, data, device="cpu"),
    lambda state, data: predict(lambda m, b: m(b[0]), state, data, device="cpu"),
], ids=["evaluate", "predict"])
def test_a_device_other_than_the_models_is_refused_before_a_batch_is_read(call):
    """device= places the batches only (the state is left as it is); a model elsewhere met them in its first forward
    with torch's 'not on the expected device'. (A meta model stands for a CUDA one, as this machine has no GPU.)"""
    read = []
    data = (read.append(b) or b for b in make_data(2))
    state = TrainState.create(nn.Linear(3, 1, device="meta"))
    with pytest.raises(ValueError, match=r"device='cpu' places the batches, but the model is on 'meta'.*"
                                         r"state\.model\.to\('cpu'\)"):
        call(state, data)
    assert not read
    assert evaluate(eval_step(lambda m, b: {"n": torch.ones(())}), TrainState.create(nn.Identity()),
                    make_data(1), device="cpu") == {"n": 1.0}  # (a model of no parameter is anywhere)


class _SpareFirst(nn.Module):
    """A spare head on meta, registered first, beside the CPU body its forward uses."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(3, 1, device="meta")
        torch.manual_seed(0)
        self.body = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("device", ["cpu", None])
def test_a_model_spread_over_devices_is_evaluated_where_a_part_of_it_is(device):
    """Its first parameter (on meta) is not where it runs: device='cpu' was refused (the model 'on meta'), and
    device=None moved the batches to meta. Reference: a raw loop of its forward."""
    model, data = _SpareFirst(), make_data(3)
    with torch.no_grad():
        raw = sum(float(((model(x) - y) ** 2).mean()) * len(x) for x, y in data) / sum(len(x) for x, _ in data)
    means = evaluate(eval_step(lambda m, b: {"mse": mse(m, b)}), TrainState.create(model), data, device=device)
    assert means["mse"] == pytest.approx(raw, rel=1e-6)


def test_a_donated_eval_step_evaluates_and_validates_as_the_undonated_one():
    """evaluate and the validations call one state for every batch: a donated eval step is called undonated
    (an eval step changes nothing in place), and the caller's state, or the training's, stays usable."""
    metric = lambda m, b: {"mse": mse(m, b)}  # noqa: E731
    state = make_state()
    expected = evaluate(eval_step(metric), state, make_data(3))
    assert evaluate(loopkit.donate(eval_step(metric)), state, make_data(3)) == expected
    state.check_usable()
    _, expected_history = run_epochs(train_step(mse), make_state(), make_data(4), epochs=2,
                                     val=(eval_step(metric), make_data(3, seed=1)), progress=False)
    _, history = run_epochs(train_step(mse), make_state(), make_data(4), epochs=2,
                            val=(loopkit.donate(eval_step(metric)), make_data(3, seed=1)), progress=False)
    assert history == expected_history


def test_predict_over_several_sets_gives_each_sets_outputs_and_training_refuses_them():
    """As evaluate takes several sets (Lightning's trainer.predict(dataloaders=[a, b]) gives a list per loader);
    run_epochs' train data of several sets was iterated as batches (a key, a loader) into the loss_fn."""
    state = make_state()
    a = DataLoader(TensorDataset(torch.randn(6, 3), torch.randn(6, 1)), batch_size=4)
    b = DataLoader(TensorDataset(torch.randn(3, 3), torch.randn(3, 1)), batch_size=2)
    fn = lambda m, batch: m(batch[0])  # noqa: E731
    each = [predict(fn, state, a), predict(fn, state, b)]
    for got in (predict(fn, state, [a, b]), list(predict(fn, state, {"a": a, "b": b}).values())):
        assert len(got) == 2 and all(len(g) == len(e) for g, e in zip(got, each))
        assert all(torch.equal(x, y) for g, e in zip(got, each) for x, y in zip(g, e))
    for several, named in (({"a": a, "b": b}, "a mapping of data sets"), ([a, b], "a list of DataLoaders")):
        with pytest.raises(TypeError, match=f"run_epochs: train_data is {named}: training takes one data set"):
            run_epochs(train_step(mse), make_state(), several, epochs=1, progress=False)
    one = predict(fn, state, [a])  # one set in a list: that set, as evaluate takes it
    assert len(one) == len(each[0]) and all(torch.equal(x, y) for x, y in zip(one, each[0]))
    with pytest.raises(TypeError, match="run_epochs: train_data is a list holding one DataLoader .* pass the DataLoader"):
        run_epochs(train_step(mse), make_state(), [a], epochs=1, progress=False)


def test_predict_equals_the_model_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 2))
    model.train()
    for _ in range(3):  # move the running statistics away from their defaults
        model(torch.randn(8, 3) * 3 + 1)
    model[1].eval()  # a submodule in its own mode: predict must restore it as it was
    data = [torch.randn(4, 3), torch.randn(3, 3)]
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = [reference(x) for x in data]
    outputs = predict(lambda m, b: m(b), TrainState.create(model), data)
    assert len(outputs) == 2
    for out, exp in zip(outputs, expected):
        assert torch.equal(out, exp) and not out.requires_grad
    assert model.training and model[0].training and not model[1].training and model[2].training


def test_a_sampling_predict_draws_as_evaluate_does_whatever_the_global_seed_and_moves_nothing_global():
    """predict's fn drew from (and advanced) torch's global RNG, where evaluate's metric_fn draws from state.rng.
    Reference: a hand loop that installs each batch's RNG as evaluate does (the first batch the state's own, each
    later one a generator seeded with the next number of a generator started at it), and evaluate's own draws."""
    state = TrainState.create(nn.Linear(2, 1), seed=3)
    data = [torch.ones(3, 2)] * 4
    sample = lambda m, b: m(b) + torch.randn(b.shape[0], 1)  # noqa: E731  (a sampling prediction)

    def predicted(seed):
        torch.manual_seed(seed)
        start = torch.get_rng_state()
        outputs = predict(sample, state, data)
        assert torch.equal(torch.get_rng_state(), start)  # the global RNG untouched
        return outputs

    torch.manual_seed(1)
    start = state.rng["cpu"]
    seeds, expected = torch.Generator(), []
    seeds.set_state(start)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for i, batch in enumerate(data):
            if i == 0:
                torch.set_rng_state(start)
            else:
                torch.manual_seed(int(torch.randint(2**62, (), generator=seeds)))
            expected.append(sample(state.model, batch))
    drawn: list[torch.Tensor] = []
    torch.manual_seed(1)
    evaluate(eval_step(lambda m, b: {"s": drawn.append(sample(m, b)) or drawn[-1].mean()}), state, data)
    outputs = predicted(1)
    assert all(torch.equal(o, e) for o, e in zip(outputs, expected)) and len(outputs) == len(data)
    assert all(torch.equal(o, d) for o, d in zip(outputs, drawn))
    assert len({float(o[0]) for o in outputs}) == len(data)  # each batch draws anew
    assert all(torch.equal(a, b) for a, b in zip(outputs, predicted(999)))
    assert torch.equal(state.rng["cpu"], create_rng(3)["cpu"])
    other = predict(sample, state.evolve(rng=create_rng(4)), data)  # (the docstring's recipe for another MC sample)
    assert not any(torch.equal(a, b) for a, b in zip(outputs, other))


def test_a_global_rng_states_sampling_predict_draws_on_from_the_global_rng_as_a_plain_loop():
    """A global_rng=True state's predict drew from a copy of the global RNG and put it back, so repeated calls (MC
    dropout) gave the same samples. Reference: a raw no_grad loop over the eval-mode model after the same seed,
    two passes (as Lightning's trainer.predict, called twice), and the global RNG where that loop leaves it."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    state = TrainState.create(model, global_rng=True)
    data = [torch.ones(2, 4)] * 3
    mc = lambda m, b: torch.nn.functional.dropout(m(b), 0.5, training=True)  # noqa: E731  (MC dropout)
    torch.manual_seed(1)
    first, second = predict(mc, state, data), predict(mc, state, data)
    after = torch.get_rng_state()
    torch.manual_seed(1)
    with torch.no_grad():
        model.eval()
        raw = [[mc(model, b) for b in data] for _ in range(2)]
        model.train()
    assert all(torch.equal(a, b) for a, b in zip(first + second, raw[0] + raw[1]))
    assert torch.equal(after, torch.get_rng_state())
    assert not all(torch.equal(a, b) for a, b in zip(first, second))  # each call a new sample


@pytest.mark.parametrize("limit, taken", [(2, 2), (0.5, 3), (10, 6), (0, 0)])
def test_predict_limit_takes_the_first_batches(limit, taken):
    """As Lightning's limit_predict_batches: the first batches, a count or a fraction of len(data); a loop
    over the same batches is the reference, and a generator past the limit is not drawn from."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    data = [torch.randn(2, 3) for _ in range(6)]
    outputs = predict(lambda m, b: m(b), TrainState.create(model), data, limit=limit)
    with torch.no_grad():
        expected = [model(x) for x in data[:taken]]
    assert len(outputs) == taken and all(torch.equal(o, e) for o, e in zip(outputs, expected))
    drawn = []

    def stream():
        for x in data:
            drawn.append(x)
            yield x

    if not isinstance(limit, float):  # (a fraction needs a len())
        predict(lambda m, b: m(b), TrainState.create(model), stream(), limit=limit)
        assert len(drawn) == taken


def test_a_limit_of_one_as_a_fraction_takes_all_of_data_without_a_len():
    """As Lightning's default limit_*_batches=1.0: all batches, no len() needed (it was refused as a fraction)."""
    data = make_data(3)
    state = make_state()
    step = eval_step(lambda m, b: {"mse": mse(m, b)})
    assert evaluate(step, state, iter(data), limit=1.0) == evaluate(step, state, data)
    assert len(predict(lambda m, b: m(b[0]), state, iter(data), limit=1.0)) == 3
    _, history = run_epochs(train_step(mse), make_state(), stream(data), epochs=1, limit_train_batches=1.0,
                            limit_val_batches=1.0, val=(step, stream(data)), progress=False)
    _, reference = run_epochs(train_step(mse), make_state(), data, epochs=1, val=(step, data), progress=False)
    assert history == reference


@pytest.mark.parametrize("limit, error", [(1.5, ValueError), (-1, ValueError), ("2", TypeError), (0.01, ValueError)])
def test_predict_refuses_a_bad_limit(limit, error):
    with pytest.raises(error, match="limit"):
        predict(lambda m, b: m(b), TrainState.create(nn.Linear(3, 2)), [torch.ones(1, 3)] * 4, limit=limit)


def test_predict_restores_training_mode_after_an_error():
    model = nn.Sequential(nn.Linear(3, 1))

    def boom(m, b):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        predict(boom, TrainState.create(model), [torch.ones(1, 3)])
    assert model.training and model[0].training


# --- the caller's state -------------------------------------------------------------------------


def test_run_epochs_donates_the_callers_state_by_default():
    """No copy: the model trained is the caller's, and the given state may not be used again."""
    state = make_state(dropout=True, scheduler=True)
    reference, _ = run_epochs(train_step(mse), state, make_data(7), epochs=1, progress=False, donate=False)
    new, _ = run_epochs(train_step(mse), state, make_data(7), epochs=1, progress=False)
    assert new.model is state.model and new.optimizer is state.optimizer  # the same storage, trained in place
    with pytest.raises(loopkit.DonatedStateError):
        state.check_usable()
    with pytest.raises(loopkit.DonatedStateError):
        run_epochs(train_step(mse), state, make_data(7), epochs=1, progress=False)
    assert_bitwise(params_of(new), params_of(reference))  # the same arithmetic as the copying run


def test_run_epochs_with_donate_false_leaves_the_callers_state_unchanged():
    state = make_state(dropout=True, scheduler=True)
    state, _ = train_step(mse)(state, make_data(1)[0])  # momentum buffers exist
    params = params_of(state)
    momentum = [state.optimizer.state[p]["momentum_buffer"].clone() for p in state.model.parameters()]
    rng = state.rng["cpu"].clone()
    lr, sched_epoch = state.optimizer.param_groups[0]["lr"], state.scheduler.last_epoch
    counters = (state.step, state.epoch, state.batch_index)

    new, _ = run_epochs(train_step(mse), state, make_data(7), epochs=1, progress=False, donate=False)

    state.check_usable()  # not consumed
    assert new.model is not state.model
    assert_bitwise(params, params_of(state))
    assert_bitwise(momentum, [state.optimizer.state[p]["momentum_buffer"] for p in state.model.parameters()])
    assert torch.equal(rng, state.rng["cpu"])
    assert (state.optimizer.param_groups[0]["lr"], state.scheduler.last_epoch) == (lr, sched_epoch)
    assert (state.step, state.epoch, state.batch_index) == counters
    # the run resumes at batch_index 1: 6 more batches
    assert new.step == 7 and not torch.equal(params[0], new.model[0].weight)
    # the old state still trains to the same result
    again, _ = run_epochs(train_step(mse), state, make_data(7), epochs=1, progress=False, donate=False)
    assert_bitwise(params_of(new), params_of(again))


def test_run_epochs_result_equals_a_raw_pytorch_loop():
    data = make_data(5)
    state, _ = run_epochs(train_step(mse), make_state(scheduler=True), data, epochs=2, progress=False)
    ref = make_state(scheduler=True)
    model, opt, sched = ref.model, ref.optimizer, ref.scheduler
    for _ in range(2):
        for x, y in data:
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    assert_bitwise(params_of(state), [p.detach() for p in model.parameters()])


# --- data order and resume ----------------------------------------------------------------------


def shuffled_loader(*, generator: bool = False, n: int = 20, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    dataset = TensorDataset(torch.arange(n), torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g))
    gen = torch.Generator().manual_seed(555) if generator else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen)


class OrderRecorder:
    """A loss_fn that records the sample indices of each batch it sees."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def __call__(self, model, batch):
        idx, x, y = batch
        self.seen.append(idx.clone())
        return ((model(x) - y) ** 2).mean()

    def epochs(self, per_epoch: int) -> list[list[int]]:
        flat = [int(i) for t in self.seen for i in t]
        size = len(flat) // len(self.seen) * per_epoch
        return [flat[i : i + size] for i in range(0, len(flat), size)]


def order_of(seed: int, torch_seed: int, *, generator: bool = False, epochs: int = 2) -> list[list[int]]:
    rec = OrderRecorder()
    torch.manual_seed(torch_seed)
    run_epochs(train_step(rec), make_state(seed), shuffled_loader(generator=generator), epochs=epochs, progress=False)
    return rec.epochs(5)


@pytest.mark.parametrize("generator", [False, True])
def test_shuffled_order_depends_only_on_seed_and_epoch(generator):
    a = order_of(0, 123, generator=generator)
    b = order_of(0, 999, generator=generator)
    assert a == b  # whatever the global RNG did before
    assert len(a) == 2 and all(sorted(e) == list(range(20)) for e in a)
    assert a[0] != a[1]  # different across epochs
    assert a[0] != list(range(20))  # actually shuffled
    assert order_of(1, 123, generator=generator) != a  # different across seeds


def test_a_sampler_with_its_own_generator_gives_a_resumed_run_the_same_order():
    from torch.utils.data import RandomSampler

    dataset = TensorDataset(torch.arange(16.0).reshape(16, 1))

    def loader():  # built afresh, as a resumed process builds it
        return DataLoader(dataset, batch_size=4, sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))

    seen: list[list[float]] = []

    def record(state, batch):
        seen.append(batch[0][:, 0].tolist())
        return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {}

    run_epochs(record, TrainState.create(nn.Linear(1, 1)), loader(), epochs=2, progress=False)
    uninterrupted, seen[:] = list(seen), []
    first, _ = run_epochs(record, TrainState.create(nn.Linear(1, 1)), loader(), epochs=1, progress=False)
    run_epochs(record, first, loader(), epochs=2, progress=False)
    assert seen == uninterrupted and seen[:4] != seen[4:]  # the same order, epoch by epoch; epochs differ


def test_shuffled_order_does_not_disturb_the_global_rng():
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    run_epochs(train_step(OrderRecorder()), make_state(), shuffled_loader(), epochs=1, progress=False)
    assert torch.equal(torch.rand(3), expected)


def resume_variants():
    return [
        pytest.param(dict(dropout=False, accum=False, generator=False, stop=3), id="plain-mid-epoch0"),
        pytest.param(dict(dropout=True, accum=False, generator=False, stop=7), id="dropout-mid-epoch1"),
        pytest.param(dict(dropout=True, accum=True, generator=False, stop=2), id="dropout-accum-mid-epoch0"),
        pytest.param(dict(dropout=True, accum=True, generator=True, stop=4), id="accum-generator-mid-epoch1"),
        pytest.param(dict(dropout=True, accum=False, generator=True, stop=2), id="dropout-generator-mid-epoch0"),
    ]


def build_resume_parts(variant: dict):
    rec = OrderRecorder()
    step = train_step(rec)
    if variant["accum"]:
        step = with_grad_accum(step, every=2)
    state = make_state(seed=3, dropout=variant["dropout"], scheduler=True)
    return rec, step, state


@pytest.mark.parametrize("variant", resume_variants())
@pytest.mark.parametrize("via_state_dict", [False, True], ids=["state", "state_dict"])
def test_resume_mid_epoch_equals_an_uninterrupted_run(variant, via_state_dict):
    # 20 samples in batches of 4 = 5 batches per epoch (odd: the accumulation variant flushes)
    gen = variant["generator"]
    rec_a, step_a, state_a = build_resume_parts(variant)
    torch.manual_seed(1)
    final_a, _ = run_epochs(step_a, state_a, shuffled_loader(generator=gen), epochs=2, progress=False)

    rec_b, step_b, state_b = build_resume_parts(variant)
    torch.manual_seed(2)
    mid, _ = run_epochs(step_b, state_b, shuffled_loader(generator=gen), max_steps=variant["stop"], progress=False)
    assert 0 < mid.batch_index < 5 and mid.step == variant["stop"]  # really mid-epoch
    if via_state_dict:
        sd = mid.state_dict()
        _, _, fresh = build_resume_parts(variant)
        mid = fresh.load_state_dict(sd)
    torch.manual_seed(3)
    final_b, _ = run_epochs(step_b, mid, shuffled_loader(generator=gen), epochs=2, progress=False)

    assert len(rec_a.seen) == 10
    assert [t.tolist() for t in rec_b.seen] == [t.tolist() for t in rec_a.seen]
    assert_bitwise(params_of(final_a), params_of(final_b))
    assert (final_a.step, final_a.epoch, final_a.batch_index) == (final_b.step, final_b.epoch, final_b.batch_index)
    assert torch.equal(final_a.rng["cpu"], final_b.rng["cpu"])
    assert final_a.scheduler.last_epoch == final_b.scheduler.last_epoch


def test_resume_with_validation_and_sanity_check_equals_an_uninterrupted_run():
    ev, _ = counting_eval(lambda m, b: {"mse": mse(m, b[1:])})
    val_data = [(torch.zeros(2), torch.randn(2, 3), torch.randn(2, 1)) for _ in range(3)]
    rec_a, rec_b = OrderRecorder(), OrderRecorder()
    a, hist_a = run_epochs(train_step(rec_a), make_state(dropout=True), shuffled_loader(), epochs=2,
                           val=(ev, val_data), progress=False)
    mid, _ = run_epochs(train_step(rec_b), make_state(dropout=True), shuffled_loader(), max_steps=3,
                        val=(ev, val_data), progress=False)
    b, hist_b = run_epochs(train_step(rec_b), mid, shuffled_loader(), epochs=2, val=(ev, val_data), progress=False)
    assert [t.tolist() for t in rec_a.seen] == [t.tolist() for t in rec_b.seen]
    assert_bitwise(params_of(a), params_of(b))
    assert hist_a[-1]["val/mse"] == hist_b[-1]["val/mse"]


# --- the hot path never syncs -------------------------------------------------------------------

def count_conversions(counts, loss_fn, n_batches: int, **options) -> int:
    data = make_data(n_batches)
    state = make_state()
    rec = Recorder()
    start = counts["n"]
    run_epochs(train_step(loss_fn), state, data, epochs=1, callbacks=[rec], progress=False, **options)
    used = counts["n"] - start
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for m in rec.batch_metrics for v in m.values())
    return used


def aux_loss(m, b):
    err = m(b[0]) - b[1]
    return (err**2).mean(), {"mae": err.abs().mean()}


def test_run_epochs_never_syncs_between_log_points(conversions):
    small = count_conversions(conversions, aux_loss, 10)
    large = count_conversions(conversions, aux_loss, 40)
    assert small == large
    assert large <= 4  # the epoch-end read of two means, and nothing per batch


def test_run_epochs_with_validation_and_accumulation_never_syncs_per_batch(conversions):
    ev, _ = counting_eval()
    opts = dict(val=(ev, make_data(2, seed=1)), val_every_n_steps=1000)
    step = with_grad_accum(train_step(aux_loss), every=2)
    counts = []
    for n in (10, 40):
        start = conversions["n"]
        run_epochs(step, make_state(), make_data(n), epochs=1, progress=False, **opts)
        counts.append(conversions["n"] - start)
    assert counts[0] == counts[1]


def test_the_sync_counter_sees_a_per_batch_item(conversions):
    def syncing_loss(m, b):
        loss = mse(m, b)
        loss.item()
        return loss

    assert count_conversions(conversions, syncing_loss, 40) - count_conversions(conversions, syncing_loss, 10) == 30


# --- devices ------------------------------------------------------------------------------------


def test_run_epochs_on_an_explicit_cpu_device_equals_the_default():
    data = make_data(4)
    a, _ = run_epochs(train_step(mse), make_state(), data, epochs=1, progress=False)
    b, _ = run_epochs(train_step(mse), make_state(), data, epochs=1, device="cpu", progress=False)
    c, _ = run_epochs(train_step(mse), make_state(), data, epochs=1, device=torch.device("cpu"), progress=False)
    assert_bitwise(params_of(a), params_of(b))
    assert_bitwise(params_of(a), params_of(c))
    assert all(p.device.type == "cpu" for p in b.model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_epochs_moves_batches_and_state_to_cuda():
    data = make_data(4)
    seen = []

    def loss(m, b):
        seen.append(b[0].device.type)
        return mse(m, b)

    ev, _ = counting_eval()
    a, _ = run_epochs(train_step(mse), make_state(), data, epochs=1, progress=False)
    b, hist = run_epochs(train_step(loss), make_state(), data, epochs=1, device="cuda", val=(ev, data), progress=False)
    assert seen == ["cuda"] * 4 and all(p.device.type == "cuda" for p in b.model.parameters())
    for x, y in zip(params_of(a), params_of(b)):
        torch.testing.assert_close(x, y.cpu(), rtol=1e-5, atol=1e-6)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(limit_train_batches=1.5), ValueError, "limit_train_batches=1.5"),
        (dict(limit_train_batches=-1), ValueError, "limit_train_batches=-1"),
        (dict(limit_train_batches="all"), TypeError, "limit_train_batches"),
        (dict(limit_train_batches=0.05), ValueError, "limit_train_batches=0.05 of 10 batches is 0 batches"),
        (dict(limit_val_batches=1.01), ValueError, "limit_val_batches=1.01: a fraction must be in \\(0, 1\\] \\(0 turns it off\\)"),
        (dict(limit_val_batches=-1), ValueError, "limit_val_batches=-1"),
        (dict(epochs=0), ValueError, "epochs must be a positive int"),
        (dict(epochs=None), ValueError, "epochs=, max_steps="),
        (dict(max_steps=0), ValueError, "max_steps must be a positive int"),
        (dict(val=lambda s, b: (s, {})), TypeError, "val must be a pair"),
        (dict(val=(make_data(1),)), TypeError, "val must be a pair"),
        (dict(val_every_n_epochs=0), ValueError, "val_every_n_epochs"),
        (dict(val_every_n_steps=0), ValueError, "val_every_n_steps"),
        (dict(sanity_val_batches=-2), ValueError, "sanity_val_batches must be an int >= 0, or -1 for every batch, got -2"),
    ],
)
def test_bad_options_raise_before_any_step(options, error, match):
    loss = Counter(mse)
    kwargs = dict(epochs=1, progress=False)
    kwargs.update(options)
    with pytest.raises(error, match=match):
        run_epochs(train_step(loss), make_state(), make_data(10), **kwargs)
    assert loss.calls == 0


@pytest.mark.parametrize("sets, named", [
    (lambda: {"a": make_data(4), "noisy": make_data(2)}, "'noisy'"),
    (lambda: {"a": make_data(4), "noisy": lambda epoch: make_data(2)}, "'noisy'"),  # a factory's: at the validation
    (lambda: [lambda epoch: make_data(4), lambda epoch: make_data(2)], "'dataloader_idx_1'"),
])
def test_a_val_fraction_of_zero_batches_names_the_set_among_several(sets, named):
    ev, _ = counting_eval()
    with pytest.raises(ValueError, match=f"limit_val_batches=0.3 of 2 batches of the validation set {named} is 0"):
        run_epochs(train_step(mse), make_state(), make_data(3), epochs=1, val=(ev, sets()),
                   limit_val_batches=0.3, progress=False)


def test_a_val_fraction_of_zero_batches_raises_before_training():
    loss = Counter(mse)
    ev, _ = counting_eval()
    with pytest.raises(ValueError, match="limit_val_batches=0.1 of 4 batches is 0 batches"):
        run_epochs(train_step(loss), make_state(), make_data(3), epochs=1, val=(ev, make_data(4)),
                   limit_val_batches=0.1, progress=False)
    assert loss.calls == 0


def test_a_fraction_of_data_without_len_raises():
    with pytest.raises(ValueError, match="no len"):
        run_epochs(train_step(mse), make_state(), iter(make_data(4)), epochs=1, limit_train_batches=0.5,
                   progress=False)


def _bad_loss_at(call: int):
    """mse, except that call number ``call`` (from 1) returns a loss of shape [4, 1]."""
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        out = (m(b[0]) - b[1]) ** 2
        return out if len(calls) == call else out.mean()

    return loss_fn


def test_an_error_before_the_first_step_changed_anything_leaves_the_given_state_usable():
    """Bad input gets its error before anything is lost: a loss refused at the first batch, a loss_fn
    that raises there, or a callback failing before any batch leave the given state as it was, and
    a second run_epochs from it equals a run from an untouched state (bitwise)."""

    class FailsAtEpochStart(loopkit.Callback):
        def on_epoch_start(self, state):
            raise RuntimeError("callback")

    def raising(m, b):
        m(b[0])
        raise RuntimeError("loss_fn")

    failures = (
        (dict(step=train_step(_bad_loss_at(1))), ValueError, "scalar"),
        (dict(step=train_step(raising)), RuntimeError, "loss_fn"),
        (dict(step=loopkit.with_grad_clip(train_step(_bad_loss_at(1)), max_norm=1.0)), ValueError, "scalar"),
        (dict(step=train_step(mse), callbacks=[FailsAtEpochStart()]), RuntimeError, "callback"),
    )
    reference, _ = run_epochs(train_step(mse), make_state(dropout=True), make_data(4), epochs=2, progress=False)
    for options, error, match in failures:
        state = make_state(dropout=True)
        with pytest.raises(error, match=match):
            run_epochs(options["step"], state, make_data(4), epochs=2, callbacks=options.get("callbacks", ()),
                       progress=False)
        state.check_usable()
        again, _ = run_epochs(train_step(mse), state, make_data(4), epochs=2, progress=False)
        assert_bitwise(params_of(again), params_of(reference))
        assert torch.equal(again.rng["cpu"], reference.rng["cpu"])


_SLIP_PATHS = {
    "plain": lambda loss_fn: train_step(loss_fn),
    "clip": lambda loss_fn: loopkit.with_grad_clip(train_step(loss_fn), max_norm=1.0),
    "accum": lambda loss_fn: with_grad_accum(train_step(loss_fn), every=2),
}


@pytest.mark.parametrize("sized", [True, False])
@pytest.mark.parametrize("path", list(_SLIP_PATHS))
def test_donate_false_refusing_a_loss_fn_that_closes_over_the_given_model_leaves_the_given_state_as_it_was(
    path, sized, take_snapshot, assert_trees_equal
):
    """run_epochs(donate=False) trains a copy; a loss_fn using the model it closes over (the given state's), not the
    one it is given, is refused at the first step, and its backward wrote the given state's gradients: they are
    given back, and the given state (parameters, gradients, optimizer state: a snapshot taken before) comes out as
    it was, usable, and trains on as an untouched twin does. The data a list, or a stream without len()."""
    data = make_data(3) if sized else stream(make_data(3))
    given, _ = run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, progress=False)  # (momentum held)
    twin, _ = run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, progress=False)
    before = take_snapshot(given)
    with pytest.raises(ValueError, match="does it use the model it is given") as info:
        run_epochs(_SLIP_PATHS[path](lambda m, b: mse(given.model, b)), given, data, epochs=2, progress=False,
                   donate=False)
    given.check_usable()
    assert_trees_equal(take_snapshot(given), before)
    assert all(p.grad is None for p in given.model.parameters())
    trained, _ = run_epochs(_SLIP_PATHS[path](mse), given, data, epochs=2, progress=False, donate=False)
    reference, _ = run_epochs(_SLIP_PATHS[path](mse), twin, data, epochs=2, progress=False)
    assert_trees_equal(take_snapshot(trained), take_snapshot(reference))


def test_an_error_after_a_callback_hook_ran_before_the_first_step_uses_the_given_state_up():
    """A hook that runs before the first step may change the model or optimizer in place (here the
    learning rate): the given state is then not as it was, and is not handed back as usable."""

    class TenfoldLR(loopkit.Callback):
        def on_fit_start(self, state):
            for group in state.optimizer.param_groups:
                group["lr"] *= 10

    state = make_state()
    with pytest.raises(ValueError, match="scalar"):
        run_epochs(train_step(_bad_loss_at(1)), state, make_data(4), epochs=1, callbacks=[TenfoldLR()], progress=False)
    with pytest.raises(loopkit.DonatedStateError):
        state.check_usable()
    reading = make_state()  # loopkit's own callbacks only read: the state stays usable with them
    with pytest.raises(ValueError, match="scalar"):
        run_epochs(train_step(_bad_loss_at(1)), reading, make_data(4), epochs=1, progress=False,
                   callbacks=[loopkit.EarlyStopping("train/loss"), loopkit.LearningRateMonitor()])
    reading.check_usable()


def test_an_error_after_a_step_has_trained_uses_the_given_state_up():
    """After the first update the given state's model has changed in place: its handle is done."""
    state = make_state()
    with pytest.raises(ValueError, match="scalar"):
        run_epochs(train_step(_bad_loss_at(3)), state, make_data(4), epochs=1, progress=False)
    with pytest.raises(loopkit.DonatedStateError):
        state.check_usable()


def test_the_state_a_failed_fit_used_up_names_the_ways_back_not_a_returned_state():
    """A fit that raised returned nothing: the used-up state's DonatedStateError said "use the state that step
    returned" (a notebook cell run again with the same state). It names state_at_error, a fresh state or a
    checkpoint, and donate=False; following it goes on. A state a fit that returned used up names the returned one."""
    state = make_state()
    with pytest.raises(ValueError, match="scalar") as caught:
        run_epochs(train_step(_bad_loss_at(3)), state, make_data(4), epochs=1, progress=False)
    for use in (state.check_usable, lambda: run_epochs(train_step(mse), state, make_data(4), epochs=1, progress=False)):
        with pytest.raises(loopkit.DonatedStateError, match=r"given to run_epochs, which trained it in place .* and "
                           r"then raised, so it returned no state: .*loopkit\.state_at_error\(error\).*fresh state, "
                           r"or from a checkpoint restored into one \(loopkit\.restore\(<a new TrainState>, path\)\)"
                           r".*donate=False"):
            use()
    whole = loopkit.state_at_error(caught.value)
    assert whole is not None and whole.step == 2
    run_epochs(train_step(mse), whole, make_data(4), epochs=1, progress=False)  # the way back it names
    done = make_state()
    run_epochs(train_step(mse), done, make_data(4), epochs=1, progress=False)
    with pytest.raises(loopkit.DonatedStateError, match="use the state that step returned"):
        done.check_usable()


def test_resuming_with_fresh_persistent_workers_is_warned_about():
    """Persistent workers keep their random streams across epochs; a resumed process's new ones cannot
    continue them (the README's exact-resume rule), which run_epochs says when it resumes so."""
    data = TensorDataset(torch.randn(8, 3), torch.randn(8, 1))

    def loader(persistent):
        return DataLoader(data, batch_size=4, num_workers=1, persistent_workers=persistent)

    resumed = make_state().evolve(epoch=1)
    with pytest.warns(RuntimeWarning, match="persistent_workers=True"):
        run_epochs(train_step(mse), resumed, loader(True), epochs=1, progress=False)  # nothing left to train
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_epochs(train_step(mse), make_state().evolve(epoch=1), loader(False), epochs=1, progress=False)
        run_epochs(train_step(mse), make_state(), loader(True), max_steps=1, progress=False)  # not a resume


@pytest.mark.parametrize("options", [{"epochs": 1}, {"max_steps": 3}, {"epochs": 2, "max_steps": 4}])
def test_a_state_past_the_end_trains_nothing_and_says_so(options):
    """A resume from a longer run's checkpoint (epochs and max_steps count from the run's start): the state
    comes back as it was, with an empty history and a warning; a state exactly at the end is not warned of."""
    longer, _ = run_epochs(train_step(mse), make_state(), make_data(4), epochs=2, progress=False)
    assert (longer.epoch, longer.step) == (2, 8)
    before = [p.detach().clone() for p in longer.model.parameters()]
    with pytest.warns(RuntimeWarning, match=r"already past the end asked for \(epoch 2, batch 0, step 8"):
        state, history = run_epochs(train_step(mse), longer, make_data(4), progress=False, **options)
    assert history == [] and (state.epoch, state.step) == (2, 8)
    assert all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_epochs(train_step(mse), state, make_data(4), epochs=2, max_steps=8, progress=False)


def test_a_state_that_is_not_a_train_state_is_refused():
    model = nn.Linear(3, 1)
    with pytest.raises(TypeError, match="loopkit.TrainState.*Linear"):
        run_epochs(train_step(mse), model, make_data(2), epochs=1, progress=False)


def test_a_donated_state_is_refused():
    state = make_state()
    loopkit.donate(train_step(mse))(state, make_data(1)[0])
    with pytest.raises(loopkit.DonatedStateError):
        run_epochs(train_step(mse), state, make_data(2), epochs=1, progress=False)


def test_evaluate_bad_limit():
    with pytest.raises(ValueError, match="limit=2.0"):
        evaluate(eval_step(lambda m, b: {}), make_state(), make_data(2), limit=2.0)


def test_limit_val_batches_0_turns_off_validation_every_n_steps_too(make_mlp, make_batches, mse_loss, make_sgd_state):
    """limit_val_batches=0 means no validation at all: not at epoch ends, not every n steps, no callback call."""
    seen = []

    class Recorder(loopkit.Callback):
        def on_validation_end(self, state, metrics):
            seen.append(dict(metrics))

    data = make_batches(4)
    val = (loopkit.eval_step(lambda m, b: {"mse": mse_loss(m, b)}), data)
    state, history = loopkit.run_epochs(
        loopkit.train_step(mse_loss), make_sgd_state(make_mlp()), data, epochs=1, val=val, val_every_n_steps=2,
        limit_val_batches=0, callbacks=[Recorder()], progress=False,
    )  # (a val/ monitor here is refused when the fit starts: test_callbacks.py)
    assert seen == [] and state.step == 4 and not any(k.startswith("val/") for k in history[0])


def test_an_error_out_of_the_fit_releases_the_profiler_the_loggers_and_the_saves(tmp_path):
    class Memory:
        def __init__(self):
            self.records, self.finalized = [], 0

        def log_metrics(self, metrics, step):
            self.records.append((step, dict(metrics)))

        def log_hparams(self, hparams, metrics=None):
            pass

        def finalize(self):
            self.finalized += 1

    def failing_validation(model, batch):
        raise RuntimeError("validation failed")

    logger = Memory()
    step = loopkit.with_profiler(
        loopkit.with_logging(
            loopkit.with_checkpointing(train_step(mse), tmp_path / "ckpt", every_n_steps=1, async_save=True),
            logger, every_n_steps=1,
        ),
        tmp_path / "profile", wait=0, warmup=1, active=50,
    )
    with pytest.raises(RuntimeError, match="validation failed"):
        run_epochs(step, make_state(), make_data(4), epochs=2, val=(eval_step(failing_validation), make_data(2)),
                   sanity_val_batches=0, progress=False)
    assert not torch.autograd._profiler_enabled()  # the profile was stopped and written
    assert any(f.name.endswith(".pt.trace.json") for f in (tmp_path / "profile").iterdir())
    assert logger.finalized == 1 and [s for s, _ in logger.records] == [1, 2, 3, 4]
    assert step.inner.inner.saver.executor is None  # the background saves finished, the thread is gone
    assert [c.step for c in loopkit.checkpoint.list_checkpoints(tmp_path / "ckpt")] == [2, 3, 4]


# --- a crash between an epoch's last validation or update and its record ---------------------------


class _CrashAt:
    """Raises in on_epoch_end at ``step``: after that update's checkpoint, before the epoch's record is returned."""

    def __init__(self, step: int):
        self.step = step

    def on_epoch_end(self, state, metrics):
        if state.step == self.step:
            raise RuntimeError("crash")


def _crash_then_resume(tmp_path, crash_at: int, **options):
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=1)
    with pytest.raises(RuntimeError, match="crash"):
        run_epochs(step, make_state(), make_data(5), callbacks=[_CrashAt(crash_at)], progress=False, **options)
    restored = loopkit.restore(make_state(), tmp_path)
    assert restored.step == crash_at
    return run_epochs(step, restored, make_data(5), progress=False, **options)


def test_a_resumed_epoch_records_the_validation_run_before_the_crash(tmp_path):
    """Validations at steps 2 and 4 (none at the epoch's end); a crash after step 5: the resumed
    run's record of the epoch holds step 4's means, as the uninterrupted run's does."""
    options = dict(epochs=1, val=(eval_step(lambda m, b: {"mse": mse(m, b)}), make_data(2, seed=1)),
                   val_every_n_steps=2, val_every_n_epochs=100, sanity_val_batches=0)
    _, whole = run_epochs(train_step(mse), make_state(), make_data(5), progress=False, **options)
    assert "val/mse" in whole[0]
    _, resumed = _crash_then_resume(tmp_path, 5, **options)
    assert resumed == whole


def test_a_run_stopped_during_its_last_update_at_max_steps_records_its_partial_epoch_when_resumed(tmp_path):
    """max_steps=7 ends epoch 1 after its second batch; SIGTERM during update 7 stops the run before
    that epoch's record (a graceful stop leaves it to the resumed run): the resumed run makes that
    record (and trains nothing), once."""
    import os
    import signal

    class Term:
        def on_batch_end(self, state, metrics):
            if state.step == 7:
                os.kill(os.getpid(), signal.SIGTERM)

    final, whole = run_epochs(train_step(mse), make_state(), make_data(5), max_steps=7, progress=False)
    assert [r["epoch"] for r in whole] == [0, 1]
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=1)
    _, first = run_epochs(step, make_state(), make_data(5), max_steps=7, callbacks=[Term()], progress=False)
    assert first == whole[:1]
    restored = loopkit.restore(make_state(), tmp_path)
    assert (restored.step, restored.epoch, restored.batch_index) == (7, 1, 2)
    state, resumed = run_epochs(step, restored, make_data(5), max_steps=7, progress=False)
    assert resumed == whole[1:]
    assert_bitwise(params_of(state), params_of(final))
    _, again = run_epochs(train_step(mse), state, make_data(5), max_steps=7, progress=False)
    assert again == []  # recorded already: a further run at max_steps adds nothing


def test_a_finished_run_relaunched_from_its_newest_checkpoint_records_nothing_again(tmp_path):
    """A requeued job (SLURM, a torchrun restart) of a run that ended at max_steps mid-epoch: the
    checkpoint of the last update was written with the epoch's record made."""
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=1)
    final, whole = run_epochs(step, make_state(), make_data(5), max_steps=7, progress=False)
    assert [r["epoch"] for r in whole] == [0, 1]
    relaunched = loopkit.restore(make_state(), tmp_path)
    assert (relaunched.step, relaunched.epoch, relaunched.batch_index) == (7, 1, 2)
    state, again = run_epochs(step, relaunched, make_data(5), max_steps=7, progress=False)
    assert again == [] and state.step == 7
    assert_bitwise(params_of(state), params_of(final))


def test_a_validation_of_an_earlier_fit_stays_out_of_a_later_fit_without_validation():
    options = dict(val=(eval_step(lambda m, b: {"mse": mse(m, b)}), make_data(2, seed=1)), val_every_n_steps=2,
                   sanity_val_batches=0, progress=False)
    cut, history = run_epochs(train_step(mse), make_state(), make_data(5), max_steps=3, **options)
    assert "val/mse" in history[-1]
    _, later = run_epochs(train_step(mse), cut, make_data(5), epochs=1, progress=False)
    assert [sorted(r) for r in later] == [["epoch", "step", "train/loss"]]


def test_a_state_saved_after_an_epochs_last_batch_reads_none_of_that_epoch_again(tmp_path):
    """Nothing is left to skip to: the resumed run starts no iterator over the finished epoch (with
    num_workers=0, re-reading would draw a Dataset's augmentation from the global RNG again)."""

    class Reads(torch.utils.data.Dataset):
        def __init__(self):
            self.reads = 0
            self.data = make_data(5, batch_size=1)

        def __len__(self):
            return 5

        def __getitem__(self, i):
            self.reads += 1
            return self.data[i][0][0], self.data[i][1][0]

    data = Reads()
    loader = DataLoader(data, batch_size=1, shuffle=True)
    whole, history = run_epochs(train_step(mse), make_state(), loader, epochs=2, progress=False)
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=1)
    with pytest.raises(RuntimeError, match="crash"):
        run_epochs(step, make_state(), loader, epochs=2, callbacks=[_CrashAt(5)], progress=False)
    mid = loopkit.restore(make_state(), tmp_path)
    assert (mid.step, mid.epoch, mid.batch_index) == (5, 0, 5)  # saved in the step, before the epoch's end
    data.reads = 0
    resumed, rest = run_epochs(step, mid, loader, epochs=2, progress=False)
    assert data.reads == 5  # epoch 1's batches only
    assert rest == history
    assert_bitwise(params_of(resumed), params_of(whole))


class _Augmented(torch.utils.data.Dataset):
    """Noise drawn from torch's, numpy's and Python's global RNGs in ``__getitem__``, as a transform read in
    the main process does."""

    def __init__(self):
        self.data = make_data(8, batch_size=1, seed=3)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        x, y = self.data[i]
        noise = 0.1 * torch.rand(3) + 0.01 * torch.from_numpy(np.random.rand(3)).float() + 0.001 * random.random()
        return x[0] + noise, y[0]


def _crashed_and_restored(tmp_path, loader, crash_after, whole_step, crashing_step):
    """A 2-epoch run of ``whole_step`` (4 batches an epoch) from ``seed_everything(11)``, then one of ``crashing_step``
    under ``with_checkpointing`` from the same seed that crashes after ``crash_after`` steps, and its newest
    checkpoint restored in what stands for another process (the global RNGs seeded otherwise: the checkpoint's are
    what count): ``(whole, history, checkpointing step, restored state)``."""
    loopkit.seed_everything(11)
    whole, history = run_epochs(whole_step, make_state(), loader, epochs=2, progress=False)
    step = loopkit.with_checkpointing(crashing_step, tmp_path, every_n_steps=1)
    loopkit.seed_everything(11)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_epochs(step, make_state(), loader, epochs=2, callbacks=[CrashAfterStep(crash_after)], progress=False)
    loopkit.seed_everything(99)
    mid = loopkit.restore(make_state(), tmp_path)
    assert mid.batch_index == crash_after % 4 and mid.batch_index > 0
    return whole, history, step, mid


@pytest.mark.parametrize("crash_after", [1, 2, 6])
def test_augmentation_from_the_global_rng_in_the_main_process_resumes_mid_epoch_exactly(tmp_path, crash_after):
    """The batches a resumed run skips are read without drawing from the global RNG the checkpoint put
    back (they drew from it, so every later batch of the epoch had other noise than the uninterrupted run's)."""
    loader = DataLoader(_Augmented(), batch_size=2, shuffle=True, num_workers=0)
    whole, history, step, mid = _crashed_and_restored(tmp_path, loader, crash_after, train_step(mse), train_step(mse))
    resumed, rest = run_epochs(step, mid, loader, epochs=2, progress=False)
    assert rest == history[crash_after // 4:]
    assert_bitwise(params_of(resumed), params_of(whole))


class _GlobalRNGSampler(torch.utils.data.Sampler):
    """Shuffles with numpy's and Python's global RNGs when the epoch's iterator starts, as bucketing samplers do."""

    def __len__(self):
        return 8

    def __iter__(self):
        order = np.random.permutation(8).tolist()
        random.shuffle(order)
        return iter(order)


class _ShuffleBuffer(torch.utils.data.IterableDataset):
    """Yields the samples through a buffer of 4, drawing which one leaves from torch's, numpy's and Python's global
    RNGs at each sample (an IterableDataset's shuffle buffer read in this process)."""

    def __init__(self):
        self.data = make_data(8, batch_size=1, seed=3)

    def __iter__(self):
        buffer = []
        for x, y in self.data:
            buffer.append((x[0], y[0]))
            if len(buffer) == 4:
                yield buffer.pop((int(torch.randint(4, ())) + np.random.randint(4) + random.randrange(4)) % 4)
        while buffer:
            yield buffer.pop(0)


@pytest.mark.parametrize("kind", ["sampler", "shuffle_buffer"])
@pytest.mark.parametrize("crash_after", [1, 3, 6])
def test_data_drawing_its_order_from_the_global_rngs_resumes_mid_epoch_exactly(tmp_path, kind, crash_after):
    """A sampler drawing from numpy's and Python's global RNGs at the epoch's start (only torch's was seeded there),
    and an iterable drawing from all three as it goes (the batches a resumed run skipped were read under the
    epoch's seeded RNG, the uninterrupted run read them under the caller's): the resumed run's batches and
    parameters are the uninterrupted run's."""
    if kind == "sampler":
        data = make_data(8, batch_size=1, seed=3)
        loader = DataLoader([(x[0], y[0]) for x, y in data], batch_size=2, sampler=_GlobalRNGSampler())
    else:
        loader = DataLoader(_ShuffleBuffer(), batch_size=2)
    seen: dict[str, list] = {"whole": [], "resumed": []}

    def recording(key):
        def loss_fn(model, batch):
            seen[key].append(batch[0].sum().item())
            if kind == "sampler":  # (the step draws too: the sampler's draws at an epoch's start come from its seeds)
                np.random.rand()
                random.random()
            return mse(model, batch)
        return loss_fn

    whole, history, step, mid = _crashed_and_restored(
        tmp_path, loader, crash_after, train_step(recording("whole")), train_step(recording("resumed")))
    seen["resumed"] = seen["resumed"][:crash_after]
    resumed, rest = run_epochs(step, mid, loader, epochs=2, progress=False)
    assert seen["resumed"] == seen["whole"]
    assert rest == history[crash_after // 4:]
    assert_bitwise(params_of(resumed), params_of(whole))


def test_validation_data_drawing_from_the_global_rngs_leaves_a_resumed_run_exact(tmp_path):
    """A resumed run's sanity validation read augmented val data, drawing from numpy's and Python's global RNGs
    (only torch's was put back): the training augmentation after it differed from the uninterrupted run's."""
    train = DataLoader(_Augmented(), batch_size=2, shuffle=True, num_workers=0)
    val = (eval_step(lambda m, b: {"mse": mse(m, b)}), DataLoader(_Augmented(), batch_size=4))
    loopkit.seed_everything(11)
    whole, history = run_epochs(train_step(mse), make_state(), train, epochs=2, val=val, progress=False)
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=1)
    loopkit.seed_everything(11)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_epochs(step, make_state(), train, epochs=2, val=val, callbacks=[CrashAfterStep(2)], progress=False)
    loopkit.seed_everything(99)
    resumed, rest = run_epochs(step, loopkit.restore(make_state(), tmp_path), train, epochs=2, val=val, progress=False)
    assert rest == history
    assert_bitwise(params_of(resumed), params_of(whole))


@pytest.mark.slow
def test_persistent_workers_shuffle_a_resumed_epoch_as_the_uninterrupted_run_does():
    """A fresh DataLoader iterator draws its workers' base seed before the sampler draws the order; a persistent
    one, reset for the next epoch, does not: a resumed process's epoch 1 came in another order."""
    from loopkit.driver import _epoch_batches

    def loader():
        return DataLoader(TensorDataset(torch.arange(20)), batch_size=5, shuffle=True, num_workers=2,
                          persistent_workers=True)

    going_on = loader()
    epoch_0 = [b[0].tolist() for b in _epoch_batches(going_on, 7, 0, 0, 4)]
    epoch_1 = [b[0].tolist() for b in _epoch_batches(going_on, 7, 1, 0, 4)]
    assert [b[0].tolist() for b in _epoch_batches(loader(), 7, 1, 0, 4)] == epoch_1 != epoch_0
    assert [b[0].tolist() for b in _epoch_batches(loader(), 7, 1, 2, 4)] == epoch_1[2:]  # resumed mid-epoch


@pytest.mark.slow
@pytest.mark.parametrize("own_generator", [False, True])
def test_one_process_workers_draw_as_a_raw_loader_seeded_with_the_epochs_order_seed(own_generator):
    """Under DDP each rank's workers mix the rank into their seeds (test_distributed); in one process they are
    seeded as torch seeds them: each epoch's batches, augmentation included, are a raw DataLoader's whose generator
    (or torch's global one, for a loader without one) is seeded with ``epoch_order_seed(state.seed, epoch)``."""
    from loopkit.rng import epoch_order_seed

    def loader(generator=None):
        return DataLoader(_Augmented(), batch_size=2, shuffle=True, num_workers=2, generator=generator)

    seen = []

    def loss(model, batch):
        seen.append(batch)
        return mse(model, batch)

    run_epochs(train_step(loss), make_state(seed=4), loader(torch.Generator() if own_generator else None), epochs=2,
               progress=False)
    reference = []
    with torch.random.fork_rng():
        for epoch in range(2):
            order = torch.Generator().manual_seed(epoch_order_seed(4, epoch))
            if not own_generator:
                torch.manual_seed(epoch_order_seed(4, epoch))
            reference += list(loader(order if own_generator else None))
    assert len(seen) == len(reference) == 8
    for got, want in zip(seen, reference):
        assert_bitwise(list(got), list(want))


def test_a_batch_samplers_epoch_is_set_so_each_epoch_has_its_own_order():
    """set_epoch was called on a DataLoader's sampler only: a DistributedSampler inside a batch_sampler (and a
    bucketing batch sampler's own set_epoch) gave every epoch the first one's order."""
    dataset = TensorDataset(torch.randn(20, 3), torch.randn(20, 1), torch.arange(20))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
    seen = []

    class Bucketing(torch.utils.data.BatchSampler):
        epochs: list[int] = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    def loss(model, batch):
        seen.append(batch[2].tolist())
        return mse(model, batch[:2])

    batches = Bucketing(sampler, 5, False)
    run_epochs(train_step(loss), make_state(), DataLoader(dataset, batch_sampler=batches), epochs=3, progress=False)
    reference = []
    for epoch in range(3):  # what DistributedSampler gives with its epoch set, as Lightning sets it
        sampler.set_epoch(epoch)
        order = list(sampler)
        reference += [order[i:i + 5] for i in range(0, 20, 5)]
    assert seen == reference and seen[0] != seen[4]
    assert Bucketing.epochs == [0, 1, 2]


def test_evaluate_warns_when_it_has_no_means_and_counts_a_batch_without_a_tensor_as_one():
    """Lightning warns of an empty validation loader; evaluate returned {} silently."""
    means_of = eval_step(lambda m, b: {"n": torch.tensor(float(len(b)))})
    with pytest.warns(RuntimeWarning, match="evaluate: no means: data yielded no batch"):
        assert evaluate(means_of, make_state(), []) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate(means_of, make_state(), make_data(2), limit=0) == {}  # none asked for
    assert evaluate(means_of, make_state(), [["a", "b"], ["c", "d", "e", "f"]]) == {"n": 3.0}  # each weighs one


def test_a_run_resumed_mid_epoch_with_data_of_another_length_is_warned_about(tmp_path):
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_epochs(step, make_state(), make_data(8), epochs=2, callbacks=[CrashAfterStep(3)], progress=False)
    for n in (12, 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_epochs(train_step(mse), loopkit.restore(make_state(), tmp_path), make_data(n), epochs=1, progress=False)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert any(f"saved in epoch 0 of 8 batches, after 3 of them, but train_data has {n} batches now" in m
                   for m in messages), messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same data: nothing to say
        run_epochs(train_step(mse), loopkit.restore(make_state(), tmp_path), make_data(8), epochs=1, progress=False)


def test_max_steps_with_a_step_that_never_advances_state_step_stops_after_an_epoch_with_a_warning():
    def no_update(state, batch):  # e.g. an evaluation-like step of one's own
        return state.evolve(batch_index=state.batch_index + 1), {"n": torch.tensor(1.0)}

    with pytest.warns(RuntimeWarning, match="without state.step advancing, so max_steps=3 would never be reached"):
        state, history = run_epochs(no_update, make_state(), make_data(4), max_steps=3, progress=False)
    assert len(history) == 1 and state.step == 0 and state.epoch == 1


def test_a_custom_steps_numbers_become_metrics_and_a_metric_that_is_not_one_is_named_at_the_first_call():
    train = train_step(mse)

    def with_lr(state, batch):
        new, metrics = train(state, batch)
        return new, {**metrics, "lr": state.optimizer.param_groups[0]["lr"], "seen": 1}

    _, history = run_epochs(with_lr, make_state(), make_data(3), epochs=1, progress=False)
    assert history[0]["train/lr"] == pytest.approx(0.1) and history[0]["train/seen"] == 1.0

    calls = []

    def per_class(state, batch):
        calls.append(1)
        new, metrics = train(state, batch)
        return new, {**metrics, "per_class": torch.tensor([1.0, 2.0])}

    with pytest.raises(TypeError, match=r"metric 'per_class' from step .*per_class is a tensor of shape \(2,\)"):
        run_epochs(per_class, make_state(), make_data(3), epochs=1, progress=False)
    assert len(calls) == 1


def test_a_step_subclass_of_ones_own_is_donated_and_runs_under_run_epochs():
    class MyStep(loopkit.Step):  # not an attrs class
        def run_(self, state, batch):
            return train_step(mse).run_(state, batch)

    final, history = run_epochs(MyStep(), make_state(), make_data(3), epochs=1, progress=False)
    reference, _ = run_epochs(train_step(mse), make_state(), make_data(3), epochs=1, progress=False)
    assert len(history) == 1 and final.step == 3
    assert_bitwise(params_of(final), params_of(reference))
    assert loopkit.donate(MyStep()).donated and not MyStep().donated


def test_a_shuffled_validation_loader_validates_a_resumed_run_in_the_uninterrupted_runs_order(tmp_path):
    """The order comes from (state.seed, state.step), not from the global RNG of the process: the resumed
    run's val means equal the uninterrupted run's to the last bit (summed in the same order)."""
    g = torch.Generator().manual_seed(3)
    val_set = TensorDataset(torch.randn(40, 3, generator=g) * 100, torch.randn(40, 1, generator=g) * 100)
    val = (eval_step(lambda m, b: {"mse": mse(m, b)}), DataLoader(val_set, batch_size=3, shuffle=True))
    options = dict(epochs=2, val=val, val_every_n_steps=2, sanity_val_batches=0, progress=False)
    torch.manual_seed(0)
    _, whole = run_epochs(train_step(mse), make_state(), make_data(5), **options)
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=1)
    torch.manual_seed(1)
    with pytest.raises(RuntimeError, match="crash"):
        run_epochs(step, make_state(), make_data(5), callbacks=[_CrashAt(5)], **options)
    restored = loopkit.restore(make_state(), tmp_path)
    torch.manual_seed(2)  # another process: another global RNG
    caller = torch.get_rng_state()
    _, resumed = run_epochs(step, restored, make_data(5), **options)
    assert resumed == whole[len(whole) - len(resumed):] and len(resumed) >= 1
    assert torch.equal(torch.get_rng_state(), caller)  # the validations drew nothing from it


def test_a_step_that_leaves_batch_index_alone_resumes_at_the_uninterrupted_runs_batch():
    """run_epochs counts the batches it consumed: a step of one's own that advances only ``state.step`` (as most do)
    used to resume a run cut mid-epoch at the epoch's first batch, training on batches twice."""
    seen: list[int] = []

    def own(state, batch):
        seen.append(int(batch))
        return state.evolve(step=state.step + 1), {"x": torch.tensor(float(batch))}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_epochs(own, make_state(), list(range(6)), epochs=2, progress=False)
        whole, seen[:] = list(seen), []
        cut, _ = run_epochs(own, make_state(), list(range(6)), max_steps=3, progress=False)
        assert (cut.epoch, cut.batch_index) == (0, 3)
        resumed, _ = run_epochs(own, cut, list(range(6)), epochs=2, progress=False)
    assert seen == whole == [*range(6), *range(6)] and (resumed.epoch, resumed.batch_index, resumed.step) == (2, 0, 12)


def test_a_state_no_checkpoint_can_hold_is_refused_before_training(tmp_path):
    state = make_state()
    state = state.evolve(extras={"teacher": nn.Linear(1, 1)})
    calls = []
    step = loopkit.with_checkpointing(lambda s, b: (calls.append(1), train_step(mse)(s, b))[1], tmp_path, every_n_steps=1)
    with pytest.raises(TypeError, match=r"with_checkpointing could not save this state: .*extras.*teacher.*Linear"):
        run_epochs(step, state, make_data(3), epochs=1, progress=False)
    assert calls == [] and state.check_usable() is None


def test_modules_in_eval_mode_at_the_start_of_training_are_warned_about_as_lightning_does():
    state = make_state(dropout=True)
    state.model[2].eval()  # the Dropout: it would train switched off
    with pytest.warns(RuntimeWarning, match=r"1 module\(s\) of the model are in eval mode .*\('2'\).*model.train\(\)"):
        run_epochs(train_step(mse), state, make_data(2), epochs=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all in train mode (or nothing left to train): no warning
        run_epochs(train_step(mse), make_state(dropout=True), make_data(2), epochs=1, progress=False)
        trained = make_state(dropout=True).evolve(epoch=1)
        trained.model.eval()
        run_epochs(train_step(mse), trained, make_data(2), epochs=1, progress=False)


@pytest.mark.parametrize("monitor", ["val_loss", "train_loss"])
def test_a_monitor_named_in_lightnings_style_is_warned_about_before_training(monitor):
    """EarlyStopping('val_loss') would otherwise raise only after a whole epoch (loopkit's names are 'val/loss')."""
    loss = Counter(mse)
    stopper = loopkit.EarlyStopping(monitor, patience=2)
    ev, _ = counting_eval(lambda m, b: {"loss": mse(m, b)})
    expected = monitor.replace("_", "/", 1)
    with pytest.warns(RuntimeWarning, match=f"EarlyStopping monitors '{monitor}'.*did you mean '{expected}'"):
        with pytest.raises(KeyError, match=monitor):
            run_epochs(train_step(loss), make_state(), make_data(2), epochs=1, val=(ev, make_data(1)),
                       callbacks=[stopper], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, val=(ev, make_data(1)),
                   callbacks=[loopkit.EarlyStopping(expected, patience=2)], progress=False)


def test_a_non_strict_monitor_named_in_lightnings_style_is_warned_about_too():
    """strict=False lets the metric be missing, so EarlyStopping('val_loss', strict=False) would silently never
    check: the name is warned about all the same (and the fit runs, its checks skipped)."""
    ev, _ = counting_eval(lambda m, b: {"loss": mse(m, b)})
    stopper = loopkit.EarlyStopping("val_loss", patience=0, strict=False)
    with pytest.warns(RuntimeWarning, match="EarlyStopping monitors 'val_loss'.*did you mean 'val/loss'"):
        _, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=2, val=(ev, make_data(1)),
                                callbacks=[stopper], progress=False)
    assert len(history) == 2 and not stopper.should_stop


# --- the newest whole state after an error (loopkit.state_at_error) -------------------------------------


class _FailingOnce:
    """``mse``, except that call ``at`` raises (a loss the step refuses, once)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            return torch.ones(2, requires_grad=True)  # not a scalar: refused before the update
        return mse(model, batch)


def test_after_a_refused_loss_mid_fit_the_newest_whole_state_trains_on_as_the_uninterrupted_run():
    data = make_data(6)
    whole, whole_history = run_epochs(train_step(mse), make_state(), data, epochs=2, progress=False)
    given = make_state()
    with pytest.raises(ValueError, match="scalar") as caught:
        run_epochs(train_step(_FailingOnce(4)), given, data, epochs=2, progress=False)
    with pytest.raises(loopkit.DonatedStateError):
        given.check_usable()  # run_epochs trained it in place
    left = loopkit.state_at_error(caught.value)
    assert (left.step, left.epoch, left.batch_index) == (3, 0, 3)
    resumed, history = run_epochs(train_step(mse), left, data, epochs=2, progress=False)
    assert_bitwise(params_of(resumed), params_of(whole))
    assert history == whole_history  # the first epoch's means kept the 3 batches before the failure


def test_after_a_callback_fails_the_newest_whole_state_holds_that_batchs_update():
    class Boom(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            if state.step == 2:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom") as caught:
        run_epochs(train_step(mse), make_state(), make_data(5), epochs=1, callbacks=[Boom()], progress=False)
    left = loopkit.state_at_error(caught.value)
    reference, _ = run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, progress=False)
    assert (left.step, left.batch_index) == (2, 2)
    assert_bitwise(params_of(left), params_of(reference))


def test_an_on_batch_start_that_returns_minus_one_is_refused_before_that_batchs_update():
    """Lightning's on_train_batch_start returns -1 to skip the rest of the epoch; loopkit does not skip it, so a
    ported callback that does is refused (it trained every batch, silently), naming the callback and the hook,
    before the batch's update: the newest whole state is that of a fit over the batches before it (reference)."""

    class SkipRest:
        def on_batch_start(self, state, batch):
            if state.batch_index >= 2:
                return -1

    with pytest.raises(ValueError, match=r"SkipRest\.on_batch_start returned .* does not skip the rest of an epoch "
                                         r"on -1 .*should_stop.*limit_train_batches") as caught:
        run_epochs(train_step(mse), make_state(), make_data(5), epochs=2, callbacks=[SkipRest()], progress=False)
    left = loopkit.state_at_error(caught.value)
    reference, _ = run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, progress=False)
    assert (left.step, left.epoch, left.batch_index) == (2, 0, 2)
    assert_bitwise(params_of(left), params_of(reference))


def test_a_failure_half_way_through_an_update_leaves_no_whole_state():
    class BrokenSGD(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("optimizer failed")

    state = make_state()
    state = TrainState.create(state.model, BrokenSGD(state.model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="optimizer failed") as caught:
        run_epochs(train_step(mse), state, make_data(3), epochs=1, progress=False)
    assert loopkit.state_at_error(caught.value) is None
    assert any("no state of the fit is known whole" in note and "model and optimizer objects hold" in note
               for note in caught.value.__notes__)  # (the traceback says where the training went)


@pytest.mark.parametrize("where", ["validation", "on_epoch_end"])
def test_after_a_failure_at_an_epochs_end_the_relaunch_still_validates_and_records_that_epoch(where):
    """The reference is the uninterrupted run: its history holds every epoch's record and validation."""
    failing = {"on": False}

    def metric_fn(model, batch):
        if failing["on"] and where == "validation":
            raise RuntimeError("failed at the epoch's end")
        return {"mse": mse(model, batch)}

    class FailingEpochEnd(loopkit.Callback):
        def on_epoch_end(self, state, record):
            if failing["on"] and where == "on_epoch_end":
                raise RuntimeError("failed at the epoch's end")

    options = dict(epochs=2, val=(eval_step(metric_fn), make_data(1, seed=1)), sanity_val_batches=0,
                   callbacks=[FailingEpochEnd()], progress=False)
    whole, whole_history = run_epochs(train_step(mse), make_state(), make_data(3), **options)
    failing["on"] = True
    with pytest.raises(RuntimeError, match="failed at the epoch's end") as caught:
        run_epochs(train_step(mse), make_state(), make_data(3), **options)
    failing["on"] = False
    left = loopkit.state_at_error(caught.value)
    assert (left.step, left.epoch, left.batch_index) == (3, 0, 3)  # after the epoch's last batch, not past its record
    resumed, history = run_epochs(train_step(mse), left, make_data(3), **options)
    assert history == whole_history
    assert_bitwise(params_of(resumed), params_of(whole))


class _FailsInBackward:
    """``mse``, whose call ``at`` makes a backward that raises: a tensor hook on the hidden layer's output that
    raises (the last layer's gradients are written by then), or a NaN that only the backward makes (its forward adds
    sqrt(0)), which torch.autograd.detect_anomaly() reports, as the guide's detect_anomaly recipe runs it."""

    def __init__(self, at: int, kind: str) -> None:
        self.at, self.kind, self.calls = at, kind, 0

    def __call__(self, model, batch):
        self.calls += 1
        x, y = batch
        hidden = model[0](x)
        if self.calls == self.at and self.kind == "hook":
            hidden.register_hook(self._raise)
        loss = ((model[2](model[1](hidden)) - y) ** 2).mean()
        if self.calls == self.at and self.kind == "anomaly":
            loss = loss + (model[0].weight.sum() * 0).sqrt()
        return loss

    @staticmethod
    def _raise(grad):
        raise RuntimeError("backward boom")


def _raw_accumulating_loop(state: TrainState, data, every: int) -> None:
    """The reference: a hand-written loop over ``state``'s model and optimizer, each loss divided by ``every`` and
    the optimizer stepping after every ``every`` backwards (the gradients of a partial last group stay on)."""
    for i, batch in enumerate(data):
        (mse(state.model, batch) / every if every > 1 else mse(state.model, batch)).backward()
        if (i + 1) % every == 0:
            state.optimizer.step()
            state.optimizer.zero_grad()


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("kind", ["hook", "anomaly"])
def test_after_an_error_in_a_backward_mid_fit_the_newest_whole_state_is_the_raw_loops_and_trains_on(
    kind, every, assert_trees_equal
):
    """The backward changes only the gradients, which the step gives back: state_at_error is the state before the
    failing batch, bitwise a raw loop's after the batches before it (under with_grad_accum the failing batch is a
    group's first), and training it on ends as the uninterrupted run. (It was None: the whole fit was lost, though
    no parameter had changed.) A plain accumulation's backward past a group's first adds into the group's sum in
    place, as a raw loop does: there the error uses the state up."""
    data = make_data(6)
    fail_at = 4 if every == 1 else 5  # (the 5th batch starts the third group of 2)

    def pipeline(loss_fn):
        step = train_step(loss_fn)
        return step if every == 1 else with_grad_accum(step, every=every)

    whole, whole_history = run_epochs(pipeline(mse), make_state(), data, epochs=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode's warnings
        with torch.autograd.detect_anomaly(), pytest.raises(RuntimeError) as caught:
            run_epochs(pipeline(_FailsInBackward(fail_at, kind)), make_state(), data, epochs=2, progress=False)
        if every > 1:  # the 4th batch, a group's second
            with torch.autograd.detect_anomaly(), pytest.raises(RuntimeError) as mid_group:
                run_epochs(pipeline(_FailsInBackward(4, kind)), make_state(), data, epochs=2, progress=False)
            assert loopkit.state_at_error(mid_group.value) is None
    assert "backward boom" in str(caught.value) or "returned nan values" in str(caught.value)
    left = loopkit.state_at_error(caught.value)
    assert left is not None
    assert (left.step, left.epoch, left.batch_index) == ((fail_at - 1) // every, 0, fail_at - 1)
    raw = make_state()
    _raw_accumulating_loop(raw, data[:fail_at - 1], every)
    for mine, theirs in zip(left.model.parameters(), raw.model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
        assert (mine.grad is None and theirs.grad is None) or torch.equal(mine.grad, theirs.grad)
    assert_trees_equal(left.optimizer.state_dict(), raw.optimizer.state_dict())
    resumed, history = run_epochs(pipeline(mse), left, data, epochs=2, progress=False)
    assert_bitwise(params_of(resumed), params_of(whole))
    assert history == whole_history


class _StopAndCount(loopkit.Callback):
    """Counts batches (its state_dict, so kept in the state), asks to stop after update ``stop_at`` and
    fails once in ``fail_in`` at the update ``fail_at``."""

    def __init__(self, stop_at=None, fail_in=None, fail_at=None):
        self.n, self.validations, self.stop_at, self.fail_in, self.fail_at = 0, 0, stop_at, fail_in, fail_at

    def state_dict(self):
        return {"n": self.n, "validations": self.validations, "should_stop": self.should_stop}

    def load_state_dict(self, sd):
        self.n, self.validations, self.should_stop = sd["n"], sd["validations"], sd["should_stop"]

    def on_fit_start(self, state):
        self._maybe_fail("on_fit_start", state)

    def _maybe_fail(self, hook, state):
        if hook == self.fail_in and state.step == self.fail_at:
            self.fail_in = None  # once
            raise RuntimeError(f"failed in {hook}")

    def on_batch_end(self, state, metrics):
        self.n += 1
        self.should_stop = self.should_stop or state.step == self.stop_at
        self._maybe_fail("on_batch_end", state)

    def on_validation_end(self, state, metrics):
        self.validations += 1
        self._maybe_fail("on_validation_end", state)

    def on_epoch_end(self, state, record):
        self._maybe_fail("on_epoch_end", state)
        return {"seen": float(self.n), "validations": float(self.validations)}


@pytest.mark.parametrize(
    "stop_at, fail_in, fail_at, every",
    [(7, "on_validation_end", 7, None), (7, "on_epoch_end", 7, None), (None, "on_batch_end", 7, None),
     (None, "on_epoch_end", 5, None), (None, "on_validation_end", 4, 2)],
    ids=["stop-then-validation-fails", "stop-then-epoch-end-fails", "a-batch-hook-fails", "an-epoch-end-fails",
         "a-step-validation-fails"],
)
def test_a_relaunch_from_state_at_error_ends_as_the_uninterrupted_run(stop_at, fail_in, fail_at, every):
    """The uninterrupted run is the reference: the epoch a callback stopped short is validated and recorded once,
    and a stateful callback's counters (of batches, of validations) continue as if nothing had failed."""
    options = dict(epochs=3, val=(eval_step(lambda m, b: {"mse": mse(m, b)}), make_data(1, seed=1)),
                   val_every_n_steps=every, sanity_val_batches=0, progress=False)
    whole, whole_history = run_epochs(train_step(mse), make_state(), make_data(5), callbacks=[_StopAndCount(stop_at)],
                                      **options)
    failing = _StopAndCount(stop_at, fail_in, fail_at)
    with pytest.raises(RuntimeError, match=f"failed in {fail_in}") as caught:
        run_epochs(train_step(mse), make_state(), make_data(5), callbacks=[failing], **options)
    left = loopkit.state_at_error(caught.value)
    resumed, history = run_epochs(train_step(mse), left, make_data(5), callbacks=[failing], **options)
    assert_bitwise(params_of(resumed), params_of(whole))
    assert history == whole_history[len(whole_history) - len(history):] and history


def test_a_failure_in_on_fit_start_leaves_the_restored_counters_in_the_state():
    """A relaunch whose on_fit_start fails (before the counters are loaded) hands back the state's own counters,
    not the fresh callback's."""
    left, _ = run_epochs(train_step(mse), make_state(), make_data(5), epochs=1, callbacks=[_StopAndCount()],
                         progress=False)
    saved = dict(left.extras["callbacks/_StopAndCount"])
    assert saved["n"] == 5
    with pytest.raises(RuntimeError, match="failed in on_fit_start") as caught:
        run_epochs(train_step(mse), left, make_data(5), epochs=2,
                   callbacks=[_StopAndCount(fail_in="on_fit_start", fail_at=5)], progress=False)
    again = loopkit.state_at_error(caught.value)
    assert dict(again.extras["callbacks/_StopAndCount"]) == saved


# --- train data without len() (an IterableDataset), and the flushed update's validation --------------


def _val_options(**more):
    return dict(val=(eval_step(lambda m, b: {"mse": mse(m, b)}), make_data(2, seed=1)), sanity_val_batches=0,
                progress=False, **more)


def _driver_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("run_epochs")]


def test_max_steps_reached_on_an_iterables_last_batch_finishes_its_epoch():
    """Lightning looks one batch ahead of an IterableDataset (its data fetcher knows is_last_batch): max_steps=7
    reached on the 7th and last batch ends epoch 0 (validated, state.epoch advanced), and a run with max_steps=14
    from that state trains epoch 1, as the uninterrupted max_steps=14 run does. Reference: hand-counted epochs
    and steps, and the uninterrupted run's parameters and history."""
    data = make_data(7)
    whole, whole_history = run_epochs(train_step(mse), make_state(), stream(data), max_steps=14, **_val_options())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut, first = run_epochs(train_step(mse), make_state(), stream(data), max_steps=7, **_val_options())
        assert (cut.step, cut.epoch, cut.batch_index) == (7, 1, 0)  # epoch 0 over: 7 of 7 batches
        assert [(r["epoch"], r["step"], "val/mse" in r) for r in first] == [(0, 7, True)]
        final, second = run_epochs(train_step(mse), cut, stream(data), max_steps=14, **_val_options())
    assert _driver_warnings(caught) == []
    assert [(r["epoch"], r["step"]) for r in second] == [(1, 14)]
    assert first + second == whole_history
    assert_bitwise(params_of(final), params_of(whole))


@pytest.mark.parametrize("limit", [None, 10], ids=["no-limit", "limit-above-its-length"])
def test_a_run_resumed_from_a_checkpoint_at_an_iterables_last_batch_equals_the_uninterrupted_run(tmp_path, limit):
    """A step checkpoint at update 7, the 7th and last batch of a stream without len(): the resumed epoch has no
    batch left, so it ends (recorded, validated) and the run trains on to max_steps=20 as the uninterrupted run."""
    data = make_data(7)
    options = _val_options(max_steps=20, limit_train_batches=limit)
    whole, whole_history = run_epochs(train_step(mse), make_state(), stream(data), **options)
    assert [(r["epoch"], r["step"]) for r in whole_history] == [(0, 7), (1, 14), (2, 20)]
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, every_n_steps=7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_epochs(step, make_state(), stream(data), callbacks=[CrashAfterStep(7)], **options)
    restored = loopkit.restore(make_state(), tmp_path)
    assert (restored.step, restored.epoch, restored.batch_index) == (7, 0, 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, history = run_epochs(step, restored, stream(data), **options)
    assert _driver_warnings(caught) == []
    assert history == whole_history
    assert_bitwise(params_of(resumed), params_of(whole))


def test_an_iterable_shorter_than_limit_train_batches_is_not_warned_about():
    """As Lightning, min(limit, available) batches, silently: the data ended, the step did nothing wrong.
    Reference: a hand count, 2 epochs of min(10, 7) updates."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, history = run_epochs(train_step(mse), make_state(), stream(make_data(7)), epochs=2,
                                    limit_train_batches=10, progress=False)
    assert _driver_warnings(caught) == []
    assert [r["step"] for r in history] == [7, 14] and (state.step, state.epoch) == (14, 2)


def _updates_validated(batches: int, every: int, epochs: int, val_every: int) -> list[int]:
    """A hand-written count: the updates of ``epochs`` epochs of ``batches`` batches accumulated over ``every``
    (a partial group flushed at the epoch's end) that fall on a multiple of ``val_every``."""
    due, step = [], 0
    for _ in range(epochs):
        for k in range(1, batches + 1):
            if k % every == 0 or k == batches:  # a full group's update, or the flush of the partial one
                step += 1
                if step % val_every == 0:
                    due.append(step)
    return due


@pytest.mark.parametrize("val_every_n_epochs", [1, 10])
def test_the_update_of_an_epoch_end_flush_gets_its_step_validation_once(val_every_n_epochs):
    """7 batches accumulated over 2: updates 4, 8, 12 are flushes of the 7th batch, each on a multiple of
    val_every_n_steps=4: validated once each (an epoch-end validation due there is that same one)."""
    ev, counter = counting_eval()
    rec = Recorder()
    _, history = run_epochs(
        with_grad_accum(train_step(mse), every=2), make_state(), make_data(7), epochs=3, val=(ev, make_data(2, seed=1)),
        val_every_n_steps=4, val_every_n_epochs=val_every_n_epochs, sanity_val_batches=0, callbacks=[rec],
        progress=False,
    )
    expected = _updates_validated(7, 2, 3, 4)
    assert expected == [4, 8, 12]
    assert [s for _, s, _ in rec.val_metrics] == expected
    assert counter.calls == 2 * len(expected)
    assert [h["val/mse"] for h in history] == [m["val/mse"] for _, _, m in rec.val_metrics]


def test_a_run_resumed_from_the_flushed_updates_checkpoint_validates_as_the_uninterrupted_run(tmp_path):
    """The flush's update 4 is checkpointed before its step validation; a crash in on_epoch_end after it: the
    resumed run runs that validation first, and its history and validations are the uninterrupted run's."""
    options = dict(epochs=3, val_every_n_steps=4, val_every_n_epochs=10, sanity_val_batches=0, progress=False)
    ev, _ = counting_eval()
    whole_rec = Recorder()
    whole, whole_history = run_epochs(with_grad_accum(train_step(mse), every=2), make_state(), make_data(7),
                                      val=(ev, make_data(2, seed=1)), callbacks=[whole_rec], **options)
    step = loopkit.with_checkpointing(with_grad_accum(train_step(mse), every=2), tmp_path, every_n_steps=4)
    with pytest.raises(RuntimeError, match="crash"):
        run_epochs(step, make_state(), make_data(7), val=(ev, make_data(2, seed=1)), callbacks=[_CrashAt(4)], **options)
    restored = loopkit.restore(make_state(), tmp_path)
    assert (restored.step, restored.epoch, restored.batch_index) == (4, 0, 7)
    rec = Recorder()
    resumed, history = run_epochs(step, restored, make_data(7), val=(ev, make_data(2, seed=1)), callbacks=[rec],
                                  **options)
    assert history == whole_history
    assert rec.val_metrics == whole_rec.val_metrics
    assert_bitwise(params_of(resumed), params_of(whole))


def test_a_finished_run_whose_last_update_is_a_flush_relaunched_from_its_newest_checkpoint_records_nothing_again(
        tmp_path):
    """max_steps=3 is the flush of the 5th batch (accumulation over 2): its step checkpoint is held until the
    epoch is recorded (as a batch's last update's is), so a requeued job of the finished run trains, validates
    and records nothing."""
    options = dict(max_steps=3, val_every_n_steps=3, **_val_options())
    step = loopkit.with_checkpointing(with_grad_accum(train_step(mse), every=2), tmp_path, every_n_steps=1)
    final, history = run_epochs(step, make_state(), make_data(5), **options)
    assert [(r["epoch"], r["step"], "val/mse" in r) for r in history] == [(0, 3, True)]
    relaunched = loopkit.restore(make_state(), tmp_path)
    assert (relaunched.step, relaunched.epoch, relaunched.batch_index) == (3, 1, 0)
    rec = Recorder()
    state, again = run_epochs(step, relaunched, make_data(5), callbacks=[rec], **options)
    assert again == [] and rec.val_metrics == []
    assert_bitwise(params_of(state), params_of(final))


def test_device_auto_is_the_accelerator_torch_finds_else_the_cpu(monkeypatch):
    """Lightning's accelerator="auto"; this machine has no accelerator: the CPU, and the fit equals device=None's."""
    state, _ = run_epochs(train_step(mse), make_state(), make_data(3), epochs=1, device="auto", progress=False)
    reference, _ = run_epochs(train_step(mse), make_state(), make_data(3), epochs=1, progress=False)
    assert_bitwise(params_of(state), params_of(reference))
    assert loopkit.evaluate(counting_eval()[0], state, make_data(2), device="auto") == loopkit.evaluate(
        counting_eval()[0], state, make_data(2))
    from loopkit import driver

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    assert driver._check_device("auto", "run_epochs") == torch.device("cuda")


def test_donate_false_leaves_the_state_usable_for_a_pure_step_of_ones_own():
    """run_epochs(donate=False) ran a step that changes nothing in place (a function of one's own that forks first)
    donated without copying: its first call marked the caller's state used up."""
    from loopkit.state import fork

    def own(state, batch):
        state = fork(state)
        mse(state.model, batch).backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {}

    state, _ = run_epochs(own, make_state(), make_data(2), epochs=1, progress=False)
    again, _ = run_epochs(own, state, make_data(2), epochs=2, progress=False, donate=False)
    state.check_usable()
    assert (state.epoch, again.epoch) == (1, 2)


def test_a_one_shot_iterator_given_to_a_state_part_way_through_an_epoch_is_refused():
    """It went on by skipping state.batch_index batches of what the iterator had left (and the cut fit had read one
    past its stop): 3 of 7 batches trained, the epoch recorded as done, silently."""
    data = make_data(7)
    batches = iter(data)
    cut, _ = run_epochs(train_step(mse), make_state(), batches, max_steps=3, progress=False)
    with pytest.raises(TypeError, match=r"train_data is an iterator \(list_iterator\), and the state is 3 batch\(es\) "
                                        r"into epoch 0"):
        run_epochs(train_step(mse), cut, batches, epochs=1, progress=False)
    assert cut.check_usable() is None
    whole, _ = run_epochs(train_step(mse), make_state(), data, epochs=1, progress=False)
    resumed, _ = run_epochs(train_step(mse), cut, data, epochs=1, progress=False)  # the data itself, as the fix says
    assert_bitwise(params_of(resumed), params_of(whole))


class _OwnShuffle(torch.utils.data.Sampler):
    """Shuffles with a generator of its own, kept under a name of its own."""

    def __init__(self, n: int) -> None:
        self.n, self.rng = n, torch.Generator().manual_seed(0)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.rng).tolist())

    def __len__(self) -> int:
        return self.n


def test_a_sampler_s_generator_under_a_name_of_its_own_resumes_in_the_uninterrupted_order():
    """Only a holder's ``generator`` was seeded per epoch: a sampler with ``self.rng`` redrew a resumed epoch from
    where its generator happened to be (some samples twice, some never)."""
    dataset = TensorDataset(torch.arange(10.0).reshape(10, 1), torch.zeros(10, 1))
    seen: list[list[float]] = []

    def loss(model, batch):
        seen.append(batch[0].flatten().tolist())
        return mse(model, (batch[0].expand(-1, 3), batch[1]))

    def loader():
        return DataLoader(dataset, batch_size=3, sampler=_OwnShuffle(10))

    run_epochs(train_step(loss), make_state(), loader(), epochs=2, progress=False)
    whole, seen[:] = list(seen), []
    cut, _ = run_epochs(train_step(loss), make_state(), loader(), max_steps=6, progress=False)  # into epoch 1
    restored = make_state().load_state_dict(cut.state_dict())  # another process: a fresh loader, a fresh sampler
    run_epochs(train_step(loss), restored, loader(), epochs=2, progress=False)
    assert seen == whole and whole[4:] != whole[:4]


class _OwnShuffleBuffer(torch.utils.data.IterableDataset):
    """Yields its 8 samples in an order drawn from its own ``generator`` (a shuffle buffer read in this process)."""

    def __init__(self):
        self.data, self.generator = make_data(8, batch_size=1, seed=3), torch.Generator().manual_seed(0)

    def __iter__(self):
        return iter([(self.data[i][0][0], self.data[i][1][0]) for i in torch.randperm(8, generator=self.generator)])


class _OwnAugmented(_Augmented):
    """Noise drawn in ``__getitem__`` from a generator of its own, kept under a name of its own."""

    def __init__(self):
        super().__init__()
        self.noise = torch.Generator().manual_seed(0)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x[0] + torch.rand(3, generator=self.noise), y[0]


@pytest.mark.parametrize("kind", ["shuffle_buffer", "augmented"])
@pytest.mark.parametrize("crash_after", [2, 6])
def test_a_dataset_s_generator_of_its_own_resumes_mid_epoch_exactly(tmp_path, kind, crash_after):
    """Only the loader's and its samplers' generators were seeded per epoch, not its dataset's: a process resumed
    in epoch 1 drew that epoch from a fresh dataset's generator, where the uninterrupted run's had drawn epoch 0
    already (other batches). Each run has a fresh loader and dataset, as another process would."""
    seen: list[float] = []

    def loader():
        if kind == "shuffle_buffer":
            return DataLoader(_OwnShuffleBuffer(), batch_size=2)
        return DataLoader(_OwnAugmented(), batch_size=2, shuffle=True)

    def loss(model, batch):
        seen.append(batch[0].sum().item())
        return mse(model, batch)

    whole_state, history = run_epochs(train_step(loss), make_state(), loader(), epochs=2, progress=False)
    whole, seen[:] = list(seen), []
    step = loopkit.with_checkpointing(train_step(loss), tmp_path, every_n_steps=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_epochs(step, make_state(), loader(), epochs=2, callbacks=[CrashAfterStep(crash_after)], progress=False)
    mid = loopkit.restore(make_state(), tmp_path)
    assert (mid.epoch, mid.batch_index) == (crash_after // 4, crash_after % 4)
    seen[crash_after:] = []
    resumed, rest = run_epochs(step, mid, loader(), epochs=2, progress=False)
    assert seen == whole and whole[4:] != whole[:4]
    assert rest == history[crash_after // 4:]
    assert_bitwise(params_of(resumed), params_of(whole_state))


def _train_and_val_sharing(what: str) -> tuple[DataLoader, DataLoader]:
    """A train and a validation loader (4 batches an epoch) that share a generator: one augmenting dataset under
    both, or one ``torch.Generator`` given to both, the train loader's sampler drawing its indices from it as it
    goes (``RandomSampler(replacement=True)`` draws them 32 at a time: past the 32nd of 40, mid-epoch)."""
    if what == "dataset":
        dataset = _OwnAugmented()
        return DataLoader(dataset, batch_size=2, shuffle=True), DataLoader(dataset, batch_size=2)
    generator = torch.Generator()
    dataset = TensorDataset(*(torch.cat(t) for t in zip(*make_data(40, batch_size=1, seed=3))))
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, generator=generator)
    return (DataLoader(dataset, batch_size=10, sampler=sampler),
            DataLoader(_OwnAugmented(), batch_size=2, shuffle=True, generator=generator))


@pytest.mark.parametrize("shared", ["dataset", "generator"])
@pytest.mark.parametrize("crash_after", [3, 7])
def test_a_validation_sharing_the_train_data_s_generator_leaves_its_stream_as_it_was(tmp_path, shared, crash_after):
    """A validation seeded the generators its data holds (from the state's seed and step) and left them so: one the
    train data shares (one dataset, or one ``torch.Generator``, under both loaders) drew the rest of the epoch
    from that seed, so the train batches after a mid-epoch validation were not those of the same fit without
    validation, and a run resumed in that epoch (which skips the batches it trained without validating) trained on
    others than the uninterrupted run. Validations at updates 3 (the checkpoint of a crash after it is saved before
    it) and 6 (the one a crash after 7 resumes after). Each run has fresh loaders, as another process would."""
    seen: list[float] = []

    def loss(model, batch):
        seen.append(batch[0].sum().item())
        return mse(model, batch)

    def fit(step, state, **kw):
        train, val = _train_and_val_sharing(shared)
        return run_epochs(step, state, train, epochs=2, val=(eval_step(lambda m, b: {"mse": mse(m, b)}), val),
                          val_every_n_steps=3, sanity_val_batches=0, progress=False, **kw)

    train, _ = _train_and_val_sharing(shared)
    unvalidated, _ = run_epochs(train_step(loss), make_state(), train, epochs=2, progress=False)
    reference, seen[:] = list(seen), []
    whole_state, history = fit(train_step(loss), make_state())
    whole, seen[:] = list(seen), []
    assert whole == reference and "val/mse" in history[0]
    assert_bitwise(params_of(whole_state), params_of(unvalidated))
    step = loopkit.with_checkpointing(train_step(loss), tmp_path, every_n_steps=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(step, make_state(), callbacks=[CrashAfterStep(crash_after)])
    mid = loopkit.restore(make_state(), tmp_path)
    assert (mid.epoch, mid.batch_index) == (crash_after // 4, crash_after % 4)
    seen[crash_after:] = []
    resumed, rest = fit(step, mid)
    assert seen == whole
    assert rest == history[crash_after // 4:]
    assert_bitwise(params_of(resumed), params_of(whole_state))


class _Batch:
    """A collate_fn's batch of one's own class."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def to(self, device):
        return _Batch(self.x.to(device), self.y.to(device))


def test_validation_means_of_batches_of_one_s_own_class_are_weighted_by_their_size():
    """No tensor was found in such a batch, so each counted as one sample: the mean of the batch means."""
    ys = [torch.full((4, 1), 1.0), torch.full((1, 1), 10.0)]
    batches = [_Batch(torch.zeros(len(y), 3), y) for y in ys]
    means = evaluate(eval_step(lambda m, b: {"y": b.y.mean()}), make_state(), batches)
    assert means["y"] == pytest.approx((4 * 1.0 + 1 * 10.0) / 5)


def test_going_on_mid_epoch_with_started_persistent_workers_is_warned_about():
    """Their workers read ahead of the stop, and the skipped batches are read again: the rest differs, silently."""
    loader = DataLoader(TensorDataset(torch.randn(12, 3), torch.randn(12, 1)), batch_size=2, num_workers=2,
                        persistent_workers=True)
    cut, _ = run_epochs(train_step(mse), make_state(), loader, max_steps=2, progress=False)
    with pytest.warns(RuntimeWarning, match="going on mid-epoch with a DataLoader of persistent_workers=True"):
        run_epochs(train_step(mse), cut, loader, epochs=1, progress=False)


class _TwoStreams(torch.utils.data.Sampler):
    """Keeps two generators of its own: one for the order, one for a subsample."""

    def __init__(self, n: int) -> None:
        self.n, self.order, self.keep, self.drawn = n, torch.Generator(), torch.Generator(), []

    def __iter__(self):
        first = (torch.rand(3, generator=self.order), torch.rand(3, generator=self.keep))
        self.drawn.append(first)
        keep = torch.rand(self.n, generator=self.keep) < 0.7
        return iter(torch.randperm(self.n, generator=self.order)[keep].tolist())

    def __len__(self) -> int:
        return self.n


def test_a_sampler_s_generators_of_its_own_get_a_seed_each_the_same_from_run_to_run():
    """Seeded alike, its order and its subsample drew the same numbers."""
    runs = []
    for _ in range(2):
        sampler = _TwoStreams(8)
        loader = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=8, sampler=sampler)
        run_epochs(train_step(mse), make_state(), loader, epochs=2, progress=False)
        runs.append(sampler.drawn)
    for order, keep in runs[0]:
        assert not torch.equal(order, keep)
    assert all(torch.equal(a, b) for first, again in zip(*runs) for a, b in zip(first, again))
    assert not torch.equal(runs[0][0][0], runs[0][1][0])  # (another epoch, other numbers)


def test_a_batch_of_one_s_own_class_counts_by_its_len_or_by_the_size_its_tensors_agree_on():
    class Weighted(_Batch):
        def __init__(self, x, y):
            super().__init__(x, y)
            self.class_weights = torch.ones(10)  # (before nothing: no size of the batch's)

    class Sized(Weighted):
        def __len__(self):
            return len(self.y)

    class Empty(Weighted):
        def __len__(self):
            return 0

    class Lazy(_Batch):
        def __len__(self):
            raise TypeError("no len before it is materialized")

    from loopkit.driver import _batch_size

    assert _batch_size(_Batch(torch.zeros(4, 3), torch.zeros(4, 1))) == 4
    assert _batch_size(Weighted(torch.zeros(4, 3), torch.zeros(4, 1))) == 1  # 10 and 4 disagree: counted once
    assert _batch_size(Sized(torch.zeros(4, 3), torch.zeros(4, 1))) == 4
    assert _batch_size(Empty(torch.zeros(4, 3), torch.zeros(4, 1))) == 1  # (a len of 0 says nothing)
    assert _batch_size(Lazy(torch.zeros(4, 3), torch.zeros(4, 1))) == 4  # the tensors agree: its len is not asked


# --- the states hooks were handed at an epoch's end, and its flushed update ----------------------------------


class _KeepsEveryState(loopkit.Callback):
    """Keeps each state a hook is handed, with a copy of its weights then; ``counting``: a stateful callback
    (its counters kept in the state, which makes the driver replace the states the hooks saw once more)."""

    def __init__(self, counting: bool = False) -> None:
        self.kept: list[tuple[str, TrainState, list[torch.Tensor]]] = []
        if counting:
            self.state_dict = lambda: {"kept": len(self.kept)}
            self.load_state_dict = lambda sd: None

    def _keep(self, hook, state):
        self.kept.append((hook, state, [p.detach().clone() for p in state.model.parameters()]))

    def on_fit_start(self, state):
        self._keep("on_fit_start", state)

    def on_epoch_start(self, state):
        self._keep("on_epoch_start", state)

    def on_batch_start(self, state, batch):
        self._keep("on_batch_start", state)

    def on_batch_end(self, state, metrics):
        self._keep("on_batch_end", state)

    def on_flush_end(self, state, metrics):
        self._keep("on_flush_end", state)

    def on_validation_end(self, state, metrics):
        self._keep("on_validation_end", state)

    def on_epoch_end(self, state, record):
        self._keep("on_epoch_end", state)


@pytest.mark.parametrize("every", [1, 3], ids=["plain", "accumulated"])
@pytest.mark.parametrize("counting", [False, True], ids=["stateless", "stateful"])
def test_a_state_a_hook_kept_never_holds_weights_of_later_updates(every, counting):
    """Every state a hook was handed is either used up (DonatedStateError) or still holds the weights it had
    then: the epoch's end rebuilds the state several times (its counters, the validation's mark, the callbacks'
    counters), and each of those the next epoch trains in place. Reference: the weights at the hook's call."""
    keeper = _KeepsEveryState(counting)
    step = with_grad_accum(train_step(mse), every=every) if every > 1 else train_step(mse)
    final, history = run_epochs(step, make_state(), make_data(7), epochs=2, callbacks=[keeper],
                                **_val_options(val_every_n_steps=3))
    stale = [(hook, state.step) for hook, state, then in keeper.kept
             if not state._consumed and not all(torch.equal(a, b) for a, b in zip(then, state.model.parameters()))]
    assert stale == []
    hooks = {hook for hook, _, _ in keeper.kept}
    assert hooks >= {"on_epoch_start", "on_validation_end", "on_epoch_end"} | ({"on_flush_end"} if every > 1 else set())
    ev = eval_step(lambda m, b: {"mse": mse(m, b)})
    first_epoch_end = next(state for hook, state, _ in keeper.kept if hook == "on_epoch_end")
    with pytest.raises(loopkit.DonatedStateError):  # trained in place by epoch 1
        evaluate(ev, first_epoch_end, make_data(2, seed=1))
    # nothing trains after the fit's last validation: its state (a best model kept by reference) is still usable,
    # and evaluates as that validation did
    last = [state for hook, state, _ in keeper.kept if hook == "on_validation_end"][-1]
    assert last.step == final.step
    assert evaluate(ev, last, make_data(2, seed=1))["mse"] == history[-1]["val/mse"]
    final.check_usable()


class _RaisesInFlushEnd(loopkit.Callback):
    """Raises once in ``on_flush_end`` at the update ``at``; counts batches (a stateful callback)."""

    def __init__(self, at=None):
        self.at, self.n = at, 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]

    def on_batch_end(self, state, metrics):
        self.n += 1

    def on_flush_end(self, state, metrics):
        if state.step == self.at:
            self.at = None
            raise RuntimeError("failed in on_flush_end")

    def on_epoch_end(self, state, record):
        return {"seen": float(self.n)}


@pytest.mark.parametrize("every_n_steps", [None, 2], ids=["epoch-validation", "step-validation"])
def test_after_on_flush_end_fails_the_flushed_state_trains_on_as_the_uninterrupted_run(tmp_path, every_n_steps):
    """7 batches with every=3: updates after batches 3 and 6 and the epoch's flush of batch 7 (step 3). A callback
    raising in on_flush_end leaves that flushed update's state as state_at_error's, as one raising in on_batch_end
    leaves the batch's; relaunched from it the fit ends as the uninterrupted run (parameters, history). Under
    with_checkpointing(every_n_steps=1) the flushed update's checkpoint is made once its hooks have run: the last
    one is step 2's, and a relaunch from it ends as the uninterrupted run too."""
    options = dict(epochs=2, **_val_options(val_every_n_steps=every_n_steps))
    whole, whole_history = run_epochs(with_grad_accum(train_step(mse), every=3), make_state(), make_data(7),
                                      callbacks=[_RaisesInFlushEnd()], **options)
    step = loopkit.with_checkpointing(with_grad_accum(train_step(mse), every=3), tmp_path, every_n_steps=1)
    with pytest.raises(RuntimeError, match="failed in on_flush_end") as caught:
        run_epochs(step, make_state(), make_data(7), callbacks=[_RaisesInFlushEnd(at=3)], **options)
    left = loopkit.state_at_error(caught.value)
    assert left is not None and (left.step, left.epoch, left.batch_index) == (3, 0, 7)
    assert dict(left.extras["callbacks/_RaisesInFlushEnd"]) == {"n": 7}
    restored = loopkit.restore(make_state(), tmp_path)
    assert restored.step == 2
    for relaunch in (left, restored):
        resumed, history = run_epochs(with_grad_accum(train_step(mse), every=3), relaunch, make_data(7),
                                      callbacks=[_RaisesInFlushEnd()], **options)
        assert_bitwise(params_of(resumed), params_of(whole))
        assert history == whole_history


class _StopsInFlushEnd(loopkit.Callback):
    """Asks to stop in ``on_flush_end`` (kept in its state_dict); records the updates validated; fails once in
    ``on_validation_end`` at the update ``fail_at``."""

    def __init__(self, fail_at=None):
        self.validated: list[int] = []
        self.fail_at = fail_at

    def state_dict(self):
        return {"should_stop": self.should_stop}

    def load_state_dict(self, sd):
        self.should_stop = sd["should_stop"]

    def on_flush_end(self, state, metrics):
        self.should_stop = True

    def on_validation_end(self, state, metrics):
        if state.step == self.fail_at:
            self.fail_at = None
            raise RuntimeError("failed in on_validation_end")
        self.validated.append(state.step)


def test_a_stop_asked_in_on_flush_end_gets_its_validation_as_in_lightning():
    """Lightning 2.6.6 (accumulate_grad_batches=3, 7 batches, check_val_every_n_epoch=None, val_check_interval=6
    batches, should_stop set after the last batch's update) validates at global steps [2, 3] and stops at 3: a
    stop at the epoch's last update gets its validation, as one asked in on_batch_end there does (written out)."""
    stopper = _StopsInFlushEnd()
    state, history = run_epochs(with_grad_accum(train_step(mse), every=3), make_state(), make_data(7), epochs=3,
                                callbacks=[stopper], val_every_n_epochs=None, **_val_options(val_every_n_steps=2))
    assert stopper.validated == [2, 3]
    assert (state.step, state.epoch) == (3, 1)
    assert [(r["epoch"], r["step"]) for r in history] == [(0, 3)] and "val/mse" in history[0]


def test_a_crash_in_the_validation_of_a_stop_asked_in_on_flush_end_resumes_as_the_uninterrupted_run(tmp_path):
    """The flushed update's checkpoint (with the stop in the callback's counters) is made before its validation;
    a crash in that validation, relaunched from the checkpoint, validates step 3, records the epoch and stops, as
    the uninterrupted run. Reference: that run's validations, history and parameters."""
    options = dict(epochs=3, val_every_n_epochs=None, **_val_options(val_every_n_steps=2))
    whole_stopper = _StopsInFlushEnd()
    whole, whole_history = run_epochs(with_grad_accum(train_step(mse), every=3), make_state(), make_data(7),
                                      callbacks=[whole_stopper], **options)
    step = loopkit.with_checkpointing(with_grad_accum(train_step(mse), every=3), tmp_path, every_n_steps=1)
    failing = _StopsInFlushEnd(fail_at=3)
    with pytest.raises(RuntimeError, match="failed in on_validation_end"):
        run_epochs(step, make_state(), make_data(7), callbacks=[failing], **options)
    restored = loopkit.restore(make_state(), tmp_path)
    assert (restored.step, restored.batch_index) == (3, 7)
    resumed, history = run_epochs(step, restored, make_data(7), callbacks=[failing], **options)
    assert failing.validated == whole_stopper.validated == [2, 3]
    assert history == whole_history
    assert_bitwise(params_of(resumed), params_of(whole))


class _KeepsValidationStates(loopkit.Callback):
    """Keeps, by reference, each state on_validation_end is handed, with the value the validation saw."""

    def __init__(self):
        self.kept = []

    def on_validation_end(self, state, metrics):
        self.kept.append((state, metrics["val/mse"]))


@pytest.mark.parametrize("case", ["last validation on the fit's last update", "a step of one's own that forks"])
def test_a_state_kept_from_a_hook_stays_usable_while_nothing_trained_it_in_place(case):
    """A kept state is used up only once the fit trains in place after it: not by an epoch's flush without an update
    (the fit's last step validation was on its last update; a counting callback, EarlyStopping, makes the driver
    replace that state), and never under a step of one's own that forks (it trains copies). Reference: each kept
    state evaluates as its validation did."""
    keep = _KeepsValidationStates()
    evaluator = eval_step(lambda m, b: {"mse": mse(m, b)})
    if case == "a step of one's own that forks":
        step, options = forking_step(mse), {"epochs": 3}
    else:
        step, options = train_step(mse), {"epochs": 1, "val_every_n_steps": 5}
    run_epochs(step, make_state(), make_data(10), val=(evaluator, make_data(2)), sanity_val_batches=0, progress=False,
               callbacks=[loopkit.EarlyStopping("val/mse", patience=100), keep], **options)
    stale = keep.kept if case == "a step of one's own that forks" else keep.kept[-1:]
    assert stale
    for state, value in stale:
        assert evaluate(evaluator, state, make_data(2))["mse"] == pytest.approx(value, rel=1e-6, abs=1e-7)


class _KeepsFirstValidatedState(loopkit.Callback):
    """The guide's recipe for keeping a model for later: a deep copy of the state a validation was handed (here the
    first's), and, beside it, that state itself kept by reference (as a Lightning user keeps ``trainer.model``)."""

    def __init__(self):
        self.copied = self.by_reference = None

    def on_validation_end(self, state, metrics):
        if self.copied is None:
            self.copied, self.by_reference = copy.deepcopy(state), state


def test_a_deep_copy_kept_from_a_hook_holds_its_epochs_model_and_a_kept_reference_is_the_live_one():
    """The guide's row on keeping a model for later: ``copy.deepcopy(state)`` in the hook holds the weights of its
    epoch (reference: a fit of that one epoch); the state kept by reference is refused by loopkit once the fit trained
    on, while its ``.model`` attribute is the fit's live model, holding the final weights (as documented)."""
    evaluator = eval_step(lambda m, b: {"mse": mse(m, b)})
    keep = _KeepsFirstValidatedState()
    final, _ = run_epochs(train_step(mse), make_state(), make_data(4), epochs=3, val=(evaluator, make_data(2)),
                          sanity_val_batches=0, progress=False, callbacks=[keep])
    one_epoch, _ = run_epochs(train_step(mse), make_state(), make_data(4), epochs=1, progress=False)
    assert_bitwise(params_of(keep.copied), params_of(one_epoch))
    assert keep.copied.step == 4 < final.step
    with pytest.raises(loopkit.DonatedStateError):
        keep.by_reference.state_dict()
    assert keep.by_reference.model is final.model
    assert_bitwise(params_of(final), [p.detach() for p in keep.by_reference.model.parameters()])
# --- nothing of a fit outlives it but what it returns (a raw loop's objects are freed by reference counting) ----


class _FailsAtSecondEpoch(loopkit.Callback):
    """Fails at the second epoch's first batch, while the states the first epoch's end handed to hooks wait."""

    def on_batch_start(self, state, batch):
        if state.step == 3:
            raise RuntimeError("fails at the second epoch")


@pytest.mark.parametrize("case", ["plain", "validated, logged, checkpointed, with callbacks", "raised",
                                  "raised, logged, checkpointed", "evaluate", "predict"])
def test_a_fits_model_and_optimizer_are_freed_once_its_state_is_dropped_without_a_gc(tmp_path, case):
    """Once the state returned (or ``state_at_error``) is dropped, the fit's model and optimizer (Adam's moments) are
    freed at once, as a raw loop's are: no cycle holds them until Python's cyclic gc runs (on a GPU a study's trials
    piled up in device memory). Reference: the raw loop, under the same disabled gc."""
    evaluator = eval_step(lambda m, b: {"mse": mse(m, b)})
    with gc_off():
        assert raw_loop_frees_its_model()
        model = Watched(3, 1)
        state = TrainState.create(model, torch.optim.Adam(model.parameters()))
        freed = weakref.ref(model)
        del model
        step = train_step(mse)
        options = {"epochs": 2, "progress": False}
        if "logged" in case:
            logger = loopkit.CSVLogger(str(tmp_path / "logs"))
            step = loopkit.with_checkpointing(loopkit.with_logging(step, logger, every_n_steps=1), tmp_path / "ckpt",
                                              every_n_steps=2, keep_last=2)
            options.update(val=(evaluator, make_data(2)), val_every_n_steps=2,
                           callbacks=[loopkit.EarlyStopping("val/mse", patience=100), Recorder()])
        if case.startswith("raised"):
            options["callbacks"] = [*options.get("callbacks", ()), _FailsAtSecondEpoch()]
            try:
                run_epochs(step, state, make_data(3), **options)
            except RuntimeError as error:
                assert loopkit.state_at_error(error) is not None
        elif case == "evaluate":
            evaluate(evaluator, state, make_data(2))
        elif case == "predict":
            predict(lambda m, b: m(b[0]), state, make_data(2))
        else:
            returned, history = run_epochs(step, state, make_data(3), **options)
            assert len(history) == 2
            del returned
        del state
        assert freed() is None
        assert alive() == 0


class _RowRecorder(loopkit.Logger):
    """A logger of one's own that keeps the steps of the training rows (``train/<m>``, not the epoch means)."""

    def __init__(self):
        super().__init__()
        self.train_steps = []

    def _write_metrics(self, metrics, step):
        if any(k.startswith("train/") and not k.endswith("_epoch") for k in metrics):
            self.train_steps.append(step)


def _interval_warnings(caught):
    return [w for w in caught if "every_n_steps" in str(w.message) and "logging interval" in str(w.message)]


@pytest.mark.parametrize(
    "batches, accumulate, every_n_steps",
    [
        (8, 1, 50),  # with_logging's default: no row in a fit of 16 updates
        (8, 1, 8),  # a row at each epoch's last update
        (8, 4, 3),  # 2 updates an epoch (Lightning compares the 8 batches, and would not warn)
        (8, 2, 4),  # 4 updates an epoch: a row at each epoch's end
    ],
)
def test_a_logging_interval_longer_than_an_epochs_updates_is_warned_of_once(batches, accumulate, every_n_steps):
    """Reference: the training rows the logger got. The fit warns once, at its start, exactly when its first epoch
    got no row (every_n_steps more than an epoch's updates), naming the epoch's batches and every_n_steps. (No
    warning came: with with_logging's default every_n_steps=50, 8 batches an epoch logged no training row at all.)"""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = train_step(lambda m, b: m(b).pow(2).mean())
    if accumulate > 1:
        step = with_grad_accum(step, every=accumulate)
    logger = _RowRecorder()
    data = [torch.randn(4, 3) for _ in range(batches)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, _ = run_epochs(loopkit.with_logging(step, logger, every_n_steps=every_n_steps), state, data, epochs=3,
                              progress=False)
    first_epoch = state.step // 3
    row_in_first_epoch = any(s <= first_epoch for s in logger.train_steps)
    warned = _interval_warnings(caught)
    assert len(warned) == (0 if row_in_first_epoch else 1)
    if warned:
        assert f"{batches} training batches" in str(warned[0].message)
        assert f"every_n_steps={every_n_steps}" in str(warned[0].message)
        assert warned[0].filename == __file__  # (at the caller's run_epochs)


def test_a_logging_interval_is_found_through_the_transforms_wrapping_with_logging(tmp_path):
    """with_logging under with_checkpointing (the usual order: the checkpoint saves what the logger saw): its
    every_n_steps=50 over epochs of 4 batches is warned of as it is with with_logging outermost. Reference: the
    training rows the logger got (none in the first epoch)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    logger = _RowRecorder()
    logged = loopkit.with_logging(train_step(lambda m, b: m(b).pow(2).mean()), logger, every_n_steps=50)
    step = loopkit.with_checkpointing(logged, tmp_path, every_n_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, _ = run_epochs(step, state, [torch.randn(4, 3) for _ in range(4)], epochs=2, progress=False)
    assert state.step == 8 and not any(s <= 4 for s in logger.train_steps)
    warned = _interval_warnings(caught)
    assert len(warned) == 1 and "4 training batches" in str(warned[0].message)
    assert "every_n_steps=50" in str(warned[0].message)


def test_no_logging_interval_warning_without_with_logging_or_a_known_length():
    """Nothing to warn of: no with_logging (the interval is its), or data without a length (an epoch's updates are
    not known)."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([torch.ones(4, 3)] * 2)

    model = nn.Linear(3, 1)
    loss = train_step(lambda m, b: m(b).pow(2).mean())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
        state, _ = run_epochs(loss, state, [torch.ones(4, 3)] * 2, epochs=1, progress=False)
        run_epochs(loopkit.with_logging(loss, _RowRecorder()), state,
                   DataLoader(Stream(), batch_size=None), epochs=2, progress=False)
    assert not _interval_warnings(caught)


class _AugmentsFromTheGlobalRng(torch.utils.data.Dataset):
    """Each item plus noise drawn from torch's global RNG as it is read (an augmentation, ``num_workers=0``)."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((2,), float(i)) + torch.rand(2)


def test_evaluate_and_predict_read_their_data_as_a_raw_loop_does():
    """A shuffling loader without a generator of its own and a Dataset augmenting from the global RNG: predict's
    batches, evaluate's mean and the global RNG after each equal a raw loop's from the same global RNG (a version
    that seeded the iterator's start privately drew the first batch's noise from a stream of its own)."""
    loader = DataLoader(_AugmentsFromTheGlobalRng(), batch_size=2, shuffle=True)
    state = TrainState.create(nn.Identity())
    torch.manual_seed(123)
    raw = [batch.clone() for batch in loader]
    raw_after = torch.get_rng_state()
    torch.manual_seed(123)
    got = predict(lambda m, b: b.clone(), state, loader)
    assert all(torch.equal(a, b) for a, b in zip(got, raw, strict=True))
    assert torch.equal(torch.get_rng_state(), raw_after)
    torch.manual_seed(123)
    metrics = evaluate(eval_step(lambda m, b: {"mean": b.mean()}), state, loader)
    assert metrics["mean"] == pytest.approx(float(torch.stack([b.mean() for b in raw]).mean()), rel=1e-6)
    assert torch.equal(torch.get_rng_state(), raw_after)


@pytest.mark.parametrize("fn", [lambda state: (state, {}), lambda s, b, extra: (s, {})], ids=["one", "three"])
def test_a_step_function_of_the_wrong_signature_is_refused_before_any_step_and_the_state_is_kept(fn):
    state = make_state()
    before = [p.clone() for p in params_of(state)]
    with pytest.raises(TypeError, match=r"^run_epochs: step must take \(state, batch\); .*<lambda>"):
        run_epochs(fn, state, make_data(2), epochs=1, progress=False)
    state.check_usable()
    assert_bitwise(params_of(state), before)
    with pytest.raises(TypeError, match=r"^run_epochs: val's step must take \(state, batch\)"):
        run_epochs(train_step(mse), state, make_data(2), epochs=1, progress=False, val=(fn, make_data(1)))
    state.check_usable()
    with pytest.raises(TypeError, match=r"^evaluate: eval_step must take \(state, batch\)"):
        evaluate(fn, state, make_data(1))
    state.check_usable()
    assert_bitwise(params_of(state), before)


def test_the_model_given_to_predict_as_its_function_is_refused_naming_predict():
    state = make_state()
    with pytest.raises(TypeError, match=r"^predict: fn must take \(model, batch\), and it is a torch.nn.Module"):
        predict(state.model, state, make_data(1))
    state.check_usable()


class _EpochEndOfState:
    def on_epoch_end(self, state):  # (run_epochs calls on_epoch_end(state, metrics))
        pass


class _ValidationEndOfState(loopkit.Callback):
    def on_validation_end(self, state):
        pass


class _BatchStartOfThree:
    def on_batch_start(self, state, batch, index):
        pass


class _NotCallableHook:
    on_epoch_end = 5


class _LoadsNothing:
    def on_epoch_end(self, state, metrics):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self):
        pass


@pytest.mark.parametrize("callback, match", [
    (_EpochEndOfState(), r"on_epoch_end must take \(state, metrics\), as run_epochs calls it; .*on_epoch_end\(state\) cannot"),
    (_ValidationEndOfState(), r"on_validation_end must take \(state, metrics\).*cannot"),
    (_BatchStartOfThree(), r"on_batch_start must take \(state, batch\).*missing a required argument: 'index'"),
    (_NotCallableHook(), r"on_epoch_end must take \(state, metrics\), as run_epochs calls it; a int is not callable"),
    (_LoadsNothing(), r"load_state_dict must take \(sd\)"),
], ids=["epoch_end", "validation_end", "batch_start", "not-callable", "load_state_dict"])
def test_a_callback_hook_that_cannot_take_its_call_is_refused_before_any_step(callback, match):
    steps = []

    def counted(model, batch):
        steps.append(1)
        return mse(model, batch)

    state = make_state()
    with pytest.raises(TypeError, match=rf"^run_epochs: callbacks\[1\] \({type(callback).__qualname__}\): its {match}"):
        run_epochs(train_step(counted), state, make_data(2), epochs=1, val=(eval_step(lambda m, b: {"mse": mse(m, b)}), make_data(1)),
                   sanity_val_batches=0, progress=False, callbacks=[loopkit.Callback(), callback])
    assert steps == []
    state.check_usable()


class _HooksOfEveryKind:
    def on_batch_end(self, state, *rest):
        pass

    def on_epoch_end(self, state, metrics=None, **kwargs):
        pass

    on_fit_end = staticmethod(lambda state, history: None)
    on_epoch_start = id  # (a builtin)


def test_hooks_that_can_take_their_call_run():
    run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, progress=False, callbacks=[_HooksOfEveryKind()])
