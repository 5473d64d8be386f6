"""with_grad_accum: n micro-batches equal one batch n times larger; counters, flush, checkpoints."""

from __future__ import annotations

import pytest
import torch

import loopkit

RTOL = 1e-6  # summing n micro-batch gradients rounds differently from one big batch's


def _cat(batches):
    return tuple(torch.cat(parts) for parts in zip(*batches))


def _optimizer(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=0.01)


def _assert_close(got, want):
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=RTOL * float(want[name].detach().abs().max()))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_four_micro_batches_equal_one_batch_four_times_larger(kind, make_mlp, make_batches, mse_loss):
    every, groups = 4, 3
    data = make_batches(every * groups, batch_size=5)
    ref_model = make_mlp(0)
    ref_opt = _optimizer(kind, ref_model)
    for g in range(groups):
        ref_opt.zero_grad()
        mse_loss(ref_model, _cat(data[g * every : (g + 1) * every])).backward()
        ref_opt.step()

    model = make_mlp(0)
    state = loopkit.TrainState.create(model, _optimizer(kind, model))
    step = loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=every)
    for batch in data:
        state, _ = step(state, batch)
    assert state.step == groups
    want = dict(ref_model.named_parameters())
    got = dict(state.model.named_parameters())
    assert not torch.equal(got["0.weight"], make_mlp(0)[0].weight)
    _assert_close(got, want)


def test_micro_batch_sum_is_bitwise_a_raw_accumulation_loop(make_mlp, make_batches, mse_loss, assert_trees_equal):
    """The usual hand-written accumulation loop: (loss / n).backward() n times, then step."""
    every = 4
    data = make_batches(8)
    ref_model = make_mlp(0)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.01)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, 1, 0.5)
    for k, batch in enumerate(data, start=1):
        (mse_loss(ref_model, batch) / every).backward()
        if k % every == 0:
            ref_opt.step()
            ref_sched.step()
            ref_opt.zero_grad()

    model = make_mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    state = loopkit.TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))
    state, _ = loopkit.run_epochs(
        loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=every),
        state, data, epochs=1, progress=False, sanity_val_batches=0,
    )
    assert_trees_equal(dict(state.model.state_dict()), dict(ref_model.state_dict()))
    assert_trees_equal(state.optimizer.state_dict(), ref_opt.state_dict())
    assert state.scheduler.get_last_lr() == ref_sched.get_last_lr()


def test_step_and_scheduler_advance_once_per_group(make_mlp, make_batches, mse_loss, make_adam_state):
    state = make_adam_state(make_mlp(0), scheduler=True)
    step = loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=4)
    seen = []
    for batch in make_batches(8):
        before = state.model[0].weight.detach().clone()
        state, metrics = step(state, batch)
        moved = not torch.equal(before, state.model[0].weight)
        seen.append((state.step, state.scheduler.last_epoch, moved, state.batch_index, "loss" in metrics))
    assert seen == [
        (0, 0, False, 1, True), (0, 0, False, 2, True), (0, 0, False, 3, True), (1, 1, True, 4, True),
        (1, 1, False, 5, True), (1, 1, False, 6, True), (1, 1, False, 7, True), (2, 2, True, 8, True),
    ]
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.9**2)


def _reference_partial(make_mlp, mse_loss, data, every):
    """One SGD step per full group of ``every`` and one on the concatenated remainder."""
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    for start in range(0, len(data), every):
        ref_opt.zero_grad()
        mse_loss(ref_model, _cat(data[start : start + every])).backward()
        ref_opt.step()
    return dict(ref_model.named_parameters())


def test_flush_updates_with_the_mean_over_the_micro_batches_seen(make_mlp, make_batches, mse_loss, make_sgd_state):
    data = make_batches(6)
    step = loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=4)
    state = make_sgd_state(make_mlp(0))
    for batch in data:
        state, _ = step(state, batch)
    assert (state.step, state.extras["accum/count"]) == (1, 2)
    flushed, metrics = step.flush(state)
    assert flushed.step == 2 and "accum/count" not in flushed.extras
    assert state.step == 1 and state.extras["accum/count"] == 2  # flush is pure too
    assert all(p.grad is None for p in flushed.model.parameters())
    _assert_close(dict(flushed.model.named_parameters()), _reference_partial(make_mlp, mse_loss, data, 4))
    again, _ = step.flush(flushed)  # nothing left: a no-op
    assert again.step == 2 and torch.equal(again.model[0].weight, flushed.model[0].weight)


def test_run_epochs_flushes_a_partial_group_at_epoch_end(make_mlp, make_batches, mse_loss, make_sgd_state):
    data = make_batches(6)
    state = make_sgd_state(make_mlp(0))
    state, history = loopkit.run_epochs(
        loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=4),
        state, data, epochs=1, progress=False, sanity_val_batches=0,
    )
    assert (state.step, state.epoch, state.batch_index) == (2, 1, 0)
    assert "accum/count" not in state.extras
    _assert_close(dict(state.model.named_parameters()), _reference_partial(make_mlp, mse_loss, data, 4))


@pytest.mark.parametrize("skipped", [0, 2, 3, 5, 6])
def test_a_skipped_batch_takes_no_place_in_a_group_as_a_raw_loop_that_skips_it(
    skipped, make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal
):
    """A None batch the loss_fn skips, first, last or mid-group, or the epoch's last (then the flush's group is the
    micro-batches before it): each update is a raw accumulation loop's that leaves the batch out, flush included, over
    two epochs; a run cut at the first update and resumed from it (mid-group past the skip) ends the same."""
    every, data = 3, list(make_batches(7))
    data[skipped] = None
    skipping = lambda model, batch: None if batch is None else mse_loss(model, batch)  # noqa: E731
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)  # (make_sgd_state's)
    for _ in range(2):
        seen = 0
        for batch in (b for b in data if b is not None):
            (mse_loss(ref_model, batch) / every).backward()
            seen += 1
            if seen == every:
                ref_opt.step()
                ref_opt.zero_grad()
                seen = 0
        if seen:  # the epoch's partial group: the mean over the micro-batches seen
            for p in ref_model.parameters():
                p.grad.mul_(every / seen)
            ref_opt.step()
            ref_opt.zero_grad()
    step = lambda: loopkit.with_grad_accum(loopkit.train_step(skipping), every=every)  # noqa: E731
    whole, _ = loopkit.run_epochs(step(), make_sgd_state(make_mlp(0)), data, epochs=2, progress=False)
    assert whole.step == 4
    assert_trees_equal(dict(whole.model.state_dict()), dict(ref_model.state_dict()))
    cut, _ = loopkit.run_epochs(step(), make_sgd_state(make_mlp(0)), data, epochs=2, max_steps=1, progress=False)
    resumed, _ = loopkit.run_epochs(step(), cut, data, epochs=2, progress=False)
    assert_trees_equal(dict(resumed.model.state_dict()), dict(whole.model.state_dict()))


@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_accumulated_gradient_survives_a_state_dict_round_trip(
    stop_after, make_mlp, make_batches, mse_loss, make_adam_state, take_snapshot, assert_trees_equal
):
    data = make_batches(8)
    step = loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=4)
    state = make_adam_state(make_mlp(0), scheduler=True)
    for batch in data[:stop_after]:
        state, _ = step(state, batch)
    assert state.extras["accum/count"] == stop_after
    restored = make_adam_state(make_mlp(1), scheduler=True).load_state_dict(state.state_dict())
    for batch in data[stop_after:]:
        state, _ = step(state, batch)
        restored, _ = step(restored, batch)
    assert state.step == 2
    assert_trees_equal(take_snapshot(restored), take_snapshot(state))


@pytest.mark.parametrize("other", ["plain", "clip"])
def test_a_state_mid_group_is_refused_by_a_step_that_does_not_accumulate(
    other, make_mlp, make_batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """A checkpoint taken half-way through a group holds the micro-batches' summed gradients: a step without
    with_grad_accum would add them to its own update (a raw loop's zero_grad would drop them). It is refused before
    anything changes, and the group's flush ends it, after which that step trains as a raw loop from those weights."""
    data = make_batches(3)
    accum = loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=4)
    state = make_sgd_state(make_mlp(0))
    for batch in data[:2]:
        state, _ = accum(state, batch)
    restored = make_sgd_state(make_mlp(1)).load_state_dict(state.state_dict())
    plain = loopkit.train_step(mse_loss)
    step = plain if other == "plain" else loopkit.with_grad_clip(plain, max_norm=1e6)
    before = take_snapshot(restored)
    with pytest.raises(ValueError, match=r"half-way through a with_grad_accum group \(accum/count=2.*does not accumulate"):
        loopkit.donate(step)(restored, data[2])
    restored.check_usable()
    assert_trees_equal(take_snapshot(restored), before)
    flushed, _ = accum.flush(restored)
    trained, _ = step(flushed, data[2])
    raw = make_mlp(1)
    raw.load_state_dict(flushed.model.state_dict())
    opt = torch.optim.SGD(raw.parameters(), lr=0.1)
    opt.load_state_dict(flushed.optimizer.state_dict())
    mse_loss(raw, data[2]).backward()
    opt.step()
    assert_trees_equal(dict(trained.model.named_parameters()), dict(raw.named_parameters()))


def test_pure_mid_group(make_mlp, make_batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal):
    data = make_batches(3)
    step = loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=4)
    state, _ = step(make_sgd_state(make_mlp(0)), data[0])
    before = take_snapshot(state)
    a, _ = step(state, data[1])
    b, _ = step(state, data[1])
    assert_trees_equal(take_snapshot(state), before)  # the accumulated gradient of the input is untouched
    assert_trees_equal(take_snapshot(a), take_snapshot(b))
    assert not torch.equal(a.model[0].weight.grad, state.model[0].weight.grad)


@pytest.mark.parametrize("every", [0, -2, 1.5, "4", True, None])
def test_every_must_be_a_positive_int(every, mse_loss):
    with pytest.raises(ValueError) as info:
        loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=every)
    assert "with_grad_accum: every must be a positive int" in str(info.value) and repr(every) in str(info.value)


# --- a schedule by epoch (Lightning's GradientAccumulationScheduler) ------------------------------------------------


def _scheduled_raw_loop(model, opt, sched, data, epochs, factor_of, mse_loss):
    """The hand-written loop: epoch e accumulates factor_of(e) batches as (loss / n).backward(); a partial group at
    the epoch's end is applied with the mean gradient of the batches it saw (run_epochs' flush)."""
    for epoch in range(epochs):
        n, seen = factor_of(epoch), 0
        for batch in data:
            loss = mse_loss(model, batch)
            (loss / n if n > 1 else loss).backward()
            seen += 1
            if seen == n:
                opt.step()
                sched.step()
                opt.zero_grad()
                seen = 0
        if seen:
            for p in model.parameters():
                p.grad.mul_(n / seen)
            opt.step()
            sched.step()
            opt.zero_grad()


@pytest.mark.parametrize("schedule, factor_of", [
    ({0: 2, 2: 4, 3: 1}, lambda e: [2, 2, 4, 1][e]),  # 6 batches: 3 groups, 3, 1 whole and 1 partial of 2, 6
    ({1: 4}, lambda e: 1 if e == 0 else 4),  # epoch 0 not given: 1, as Lightning fills it in
])
def test_a_schedule_by_epoch_is_bitwise_a_raw_loop_changing_its_factor_each_epoch(
        schedule, factor_of, make_mlp, make_batches, mse_loss, assert_trees_equal):
    data, epochs = make_batches(6), 4
    ref_model = make_mlp(0)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.01)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, 1, 0.9)
    _scheduled_raw_loop(ref_model, ref_opt, ref_sched, data, epochs, factor_of, mse_loss)

    model = make_mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    state = loopkit.TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, 0.9))
    step = loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=schedule)
    state, history = loopkit.run_epochs(step, state, data, epochs=epochs, progress=False)
    assert [r["step"] for r in history] == [sum(-(-6 // factor_of(k)) for k in range(e + 1)) for e in range(epochs)]
    assert_trees_equal(dict(state.model.state_dict()), dict(ref_model.state_dict()))
    assert_trees_equal(state.optimizer.state_dict(), ref_opt.state_dict())
    assert [step.every_at(e) for e in range(6)] == [factor_of(min(e, 3)) for e in range(6)]


def test_a_scheduled_group_resumes_from_a_state_dict_mid_group_as_the_uninterrupted_loop(
        make_mlp, make_batches, mse_loss, make_adam_state, assert_trees_equal):
    """A loop of one's own: the epoch set at each epoch's start, the partial group flushed at its end."""
    data = make_batches(5)
    step = loopkit.with_grad_accum(loopkit.train_step(mse_loss), every={0: 2, 1: 3})

    def train(state, start=(0, 0), stop=None):
        for epoch in range(start[0], 2):
            if (epoch, 0) != start or start == (0, 0):
                state = state.evolve(epoch=epoch, batch_index=0)
            for i in range(start[1] if epoch == start[0] else 0, len(data)):
                if (epoch, i) == stop:
                    return state
                state, _ = step(state, data[i])
            state, _ = step.flush(state)
        return state

    whole = train(make_adam_state(make_mlp(0)))
    cut = train(make_adam_state(make_mlp(0)), stop=(1, 1))  # one micro-batch into epoch 1's first group of 3
    assert cut.extras["accum/count"] == 1
    template = make_adam_state(make_mlp(7))
    resumed = train(template.load_state_dict(cut.state_dict()), start=(1, 1))
    assert resumed.step == whole.step == 3 + 2
    assert_trees_equal(dict(resumed.model.state_dict()), dict(whole.model.state_dict()))
    assert_trees_equal(resumed.optimizer.state_dict(), whole.optimizer.state_dict())


@pytest.mark.parametrize("every, match", [
    ({}, "every is an empty schedule"),
    ({-1: 2}, r"every's epochs must be ints >= 0 \(0 is the first epoch\), got -1"),
    ({0: 0}, "every's factors must be positive ints, got 0 for epoch 0"),
    ({0: 2.5}, "every's factors must be positive ints, got 2.5 for epoch 0"),
    ({"1": 2}, "every's epochs must be ints >= 0"),
])
def test_a_bad_schedule_is_refused_naming_the_entry(every, match, mse_loss):
    with pytest.raises(ValueError, match=match):
        loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=every)


def test_a_schedule_takes_numpy_numbers_and_one_of_ones_accumulates_nothing(mse_loss):
    import numpy as np

    step = loopkit.with_grad_accum(loopkit.train_step(mse_loss), every={np.int64(0): np.int64(1), np.int64(2): np.int64(3)})
    assert [step.every_at(e) for e in range(4)] == [1, 1, 3, 3]
    assert loopkit.with_grad_accum(loopkit.train_step(mse_loss), every={0: 1, 5: 1}).plain
    with pytest.raises(TypeError, match="with_grad_accum cannot wrap with_grad_accum"):
        loopkit.with_grad_accum(step, every=2)



@pytest.mark.parametrize("inner", [1, {0: 1}, {0: 1, 5: 1}])
def test_with_grad_accum_twice_is_refused_whatever_the_inner_factor(inner, mse_loss):
    """An inner every=1 (or a schedule of ones) accumulates nothing, but twice is refused in either order (it was
    accepted this way round only)."""
    step = loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=inner)
    with pytest.raises(TypeError, match="with_grad_accum cannot wrap with_grad_accum"):
        loopkit.with_grad_accum(step, every=3)


class _LossRecorder(loopkit.Callback):
    """Each batch's loss, as the step returned it."""

    def __init__(self, losses):
        self.losses = losses

    def on_batch_end(self, state, metrics):
        self.losses.append(metrics["loss"].detach().clone())


@pytest.mark.parametrize("every", [1, {0: 1, 1: 1}])
def test_every_one_is_bitwise_a_raw_loop_without_accumulation_and_checkpoints_as_no_accumulation(
    every, make_mlp, make_batches, mse_loss, make_adam_state, assert_trees_equal, tmp_path
):
    """with_grad_accum(every=1) (or a schedule of ones) accumulates nothing: each call's loss, the parameters, the
    optimizer and scheduler, and each checkpoint's content are bitwise those of a raw loop (zero_grad, backward,
    step) and of the same run without with_grad_accum."""
    data, epochs = make_batches(5), 2
    ref_model = make_mlp(0)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.01)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, 1, 0.9)  # (make_adam_state's)
    ref_losses = []
    for _ in range(epochs):
        for batch in data:
            ref_opt.zero_grad()
            loss = mse_loss(ref_model, batch)
            loss.backward()
            ref_opt.step()
            ref_sched.step()
            ref_losses.append(loss.detach())

    runs = {}
    for name, step in (("accum", loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=every)),
                       ("plain", loopkit.train_step(mse_loss))):
        losses = []
        step = loopkit.with_checkpointing(step, tmp_path / name, every_n_steps=3, keep_last=None)
        state, _ = loopkit.run_epochs(step, make_adam_state(make_mlp(0), scheduler=True), data, epochs=epochs,
                                      progress=False, callbacks=[_LossRecorder(losses)])
        runs[name] = (state, losses, loopkit.checkpoint.list_checkpoints(tmp_path / name))
    state, losses, saved = runs["accum"]
    assert_trees_equal(losses, ref_losses)
    assert_trees_equal(dict(state.model.state_dict()), dict(ref_model.state_dict()))
    assert_trees_equal(state.optimizer.state_dict(), ref_opt.state_dict())
    assert state.scheduler.get_last_lr() == ref_sched.get_last_lr() and state.step == epochs * len(data)
    plain_saved = runs["plain"][2]
    assert [c.path.name for c in saved] == [c.path.name for c in plain_saved] and len(saved) == 3
    for ours, plain in zip(saved, plain_saved):
        assert_trees_equal(torch.load(ours.path / "state.pt", weights_only=False),
                           torch.load(plain.path / "state.pt", weights_only=False))
