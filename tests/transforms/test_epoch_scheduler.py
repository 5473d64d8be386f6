"""with_epoch_scheduler against Lightning's default "interval": "epoch" written out: a raw loop that steps the
scheduler after each epoch's last update when (epoch + 1) % frequency == 0 (Lightning's update_lr_schedulers)."""

from __future__ import annotations

import warnings

import pytest
import torch

import loopkit
from tests._driver_helpers import FullDisk, forking_step

EPOCHS, BATCHES = 5, 4


def _state(make_mlp):
    model = make_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.9)
    return loopkit.TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))


def _raw_loop(state, data, mse_loss, frequency=1, epochs=EPOCHS):
    model, opt, sched = state.model, state.optimizer, state.scheduler
    rates = []
    for epoch in range(epochs):
        rates.append(opt.param_groups[0]["lr"])
        for batch in data:
            opt.zero_grad()
            mse_loss(model, batch).backward()
            opt.step()
        if (epoch + 1) % frequency == 0:
            sched.step()
    return rates


class _Rates(loopkit.Callback):
    """The rate each epoch's first update used."""

    def __init__(self):
        self.rates = []

    def on_batch_end(self, state, metrics):
        if state.batch_index == 1:
            self.rates.append(state.optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("frequency", [1, 2])
def test_the_scheduler_steps_at_each_epochs_end_as_lightnings_default_interval(
        frequency, make_mlp, make_batches, mse_loss, assert_trees_equal):
    data = make_batches(BATCHES)
    ref = _state(make_mlp)
    expected = _raw_loop(ref, data, mse_loss, frequency)
    rates = _Rates()
    step = loopkit.with_epoch_scheduler(loopkit.train_step(mse_loss), frequency=frequency)
    state, _ = loopkit.run_epochs(step, _state(make_mlp), data, epochs=EPOCHS, callbacks=[rates], progress=False)
    assert rates.rates == expected
    assert_trees_equal(dict(state.model.state_dict()), dict(ref.model.state_dict()))
    assert state.scheduler.state_dict() == ref.scheduler.state_dict()
    assert state.extras["epoch_scheduler/epochs"] == EPOCHS


def test_a_loop_of_ones_own_without_flush_steps_it_at_the_next_epochs_first_call(make_mlp, make_batches, mse_loss,
                                                                                  assert_trees_equal):
    data = make_batches(BATCHES)
    ref = _state(make_mlp)
    _raw_loop(ref, data, mse_loss, epochs=3)
    step = loopkit.with_epoch_scheduler(loopkit.train_step(mse_loss))
    state = _state(make_mlp)
    for epoch in range(3):
        state = state.evolve(epoch=epoch, batch_index=0)
        for batch in data:
            state, _ = step(state, batch)
    assert_trees_equal(dict(state.model.state_dict()), dict(ref.model.state_dict()))
    assert state.scheduler.last_epoch == 2  # epochs 0 and 1's ends, stepped at epochs 1 and 2's first calls
    flushed, _ = step.flush(state)  # epoch 2's end, as the raw loop stepped after its last epoch
    assert flushed.scheduler.last_epoch == 3 == ref.scheduler.last_epoch


def test_around_swa_a_loop_of_ones_own_steps_it_before_swalr_reads_its_start_rates(make_mlp, make_batches, mse_loss,
                                                                                    assert_trees_equal):
    """Without flushes, the end of the last epoch before SWA is stepped at the first SWA epoch's first call, before
    with_swa's SWALR takes the optimizer's rates to anneal from; no end is stepped after that. Reference: run_epochs
    (checked against a raw loop and Lightning in tests/transforms/test_swa.py)."""
    data = make_batches(BATCHES)
    step = loopkit.with_epoch_scheduler(loopkit.with_swa(loopkit.train_step(mse_loss), 0.01, swa_epoch_start=3,
                                                         annealing_epochs=2))
    ref, _ = loopkit.run_epochs(step, _state(make_mlp), data, epochs=EPOCHS, progress=False)
    state = _state(make_mlp)
    for epoch in range(EPOCHS):
        state = state.evolve(epoch=epoch, batch_index=0)
        for batch in data:
            state, _ = step(state, batch)
    assert_trees_equal(dict(state.model.state_dict()), dict(ref.model.state_dict()))
    assert_trees_equal(dict(state.extras["swa/params"]), dict(ref.extras["swa/params"]))
    assert state.extras["swa/lr_start"] == ref.extras["swa/lr_start"] == (0.2,)  # StepLR(step_size=2): one halving
    assert state.scheduler.last_epoch == ref.scheduler.last_epoch == 2  # the ends of epochs 0 and 1 only


def test_a_crash_mid_epoch_resumes_exactly(tmp_path, make_mlp, make_batches, mse_loss, take_snapshot, assert_trees_equal):
    data = make_batches(BATCHES)
    step = loopkit.with_checkpointing(loopkit.with_epoch_scheduler(loopkit.train_step(mse_loss)), tmp_path,
                                      every_n_steps=3, keep_last=None)
    whole, _ = loopkit.run_epochs(loopkit.with_epoch_scheduler(loopkit.train_step(mse_loss)), _state(make_mlp), data,
                                  epochs=EPOCHS, progress=False)

    class Crash(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            if state.step == 10:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        loopkit.run_epochs(step, _state(make_mlp), data, epochs=EPOCHS, callbacks=[Crash()], progress=False)
    restored = loopkit.restore(_state(make_mlp), tmp_path)
    assert (restored.step, restored.batch_index) == (9, 1)  # mid-epoch 2
    resumed, _ = loopkit.run_epochs(step, restored, data, epochs=EPOCHS, progress=False)
    assert_trees_equal(dict(resumed.model.state_dict()), dict(whole.model.state_dict()))
    assert resumed.scheduler.state_dict() == whole.scheduler.state_dict()


def test_an_epoch_cut_short_does_not_step_it_and_the_step_is_pure(make_mlp, make_batches, mse_loss, take_snapshot,
                                                                  assert_trees_equal):
    step = loopkit.with_epoch_scheduler(loopkit.train_step(mse_loss))
    state, _ = loopkit.run_epochs(step, _state(make_mlp), make_batches(BATCHES), max_steps=6, progress=False)
    assert state.scheduler.last_epoch == 1  # epoch 0's end only, as Lightning at max_steps mid-epoch
    before = take_snapshot(state)
    step(state, make_batches(1)[0])
    assert_trees_equal(take_snapshot(state), before)


def test_what_it_cannot_do_is_refused(tmp_path, make_mlp, make_batches, mse_loss):
    inner = loopkit.train_step(mse_loss)
    with pytest.raises(ValueError, match="frequency must be a positive int"):
        loopkit.with_epoch_scheduler(inner, frequency=0)
    with pytest.raises(TypeError, match="with_epoch_scheduler cannot wrap with_checkpointing"):
        loopkit.with_epoch_scheduler(loopkit.with_checkpointing(inner, tmp_path))
    with pytest.raises(TypeError, match=r"with_swa cannot wrap with_epoch_scheduler: .*with_epoch_scheduler\(with_swa\("):
        loopkit.with_swa(loopkit.with_epoch_scheduler(inner), 0.1, swa_epoch_start=1)
    with pytest.raises(ValueError, match="lr_find: the step has with_epoch_scheduler"):
        loopkit.lr_find(loopkit.with_epoch_scheduler(inner), _state(make_mlp), make_batches(2))
    model = make_mlp(0)
    plain = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="the state has no scheduler"):
        loopkit.with_epoch_scheduler(inner)(plain, make_batches(1)[0])
    plain.check_usable()


def test_a_relaunch_from_the_checkpoint_of_an_epochs_flushed_update_steps_it_once(tmp_path, make_mlp, make_batches,
                                                                                   mse_loss, assert_trees_equal):
    """5 batches in groups of 2: each epoch's last update is the flush's, and step 3's checkpoint is of it (the state
    still in epoch 0, its batches used up). The relaunch flushes that epoch again: the scheduler stepped twice."""
    data = make_batches(5)
    inner = loopkit.with_epoch_scheduler(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=2))
    whole, _ = loopkit.run_epochs(inner, _state(make_mlp), data, epochs=3, progress=False)
    step = loopkit.with_checkpointing(inner, tmp_path, every_n_steps=3, keep_last=None)

    class Crash(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            if state.step == 4:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        loopkit.run_epochs(step, _state(make_mlp), data, epochs=3, callbacks=[Crash()], progress=False)
    restored = loopkit.restore(_state(make_mlp), tmp_path / "ckpt-000001-step3-epoch0-batch5")
    assert (restored.epoch, restored.scheduler.last_epoch) == (0, 1)
    resumed, _ = loopkit.run_epochs(inner, restored, data, epochs=3, progress=False)
    assert resumed.scheduler.state_dict() == whole.scheduler.state_dict()
    assert_trees_equal(dict(resumed.model.state_dict()), dict(whole.model.state_dict()))


def _raw_scheduled(transform, reference, data, loss_fn):
    """A raw loop over ``data`` for EPOCHS epochs stepping ``reference``'s scheduler where ``transform`` does
    (after every update, or at every epoch's end): its model, optimizer and scheduler after."""
    model, opt, sched = reference.model, reference.optimizer, reference.scheduler
    for _ in range(EPOCHS):
        for batch in data:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
            if transform == "with_step_scheduler":
                sched.step()
        if transform == "with_epoch_scheduler":
            sched.step()
    return model, opt, sched


@pytest.mark.parametrize("transform", ["with_epoch_scheduler", "with_step_scheduler"])
def test_a_step_of_ones_own_that_forks_the_state_trains_at_the_scheduled_rates(
    transform, make_mlp, make_batches, mse_loss, assert_trees_equal
):
    """The held scheduler given back to the forked state steps that state's optimizer (it stepped the first call's
    stale one: the rate never changed), as in a raw loop."""
    data = make_batches(4)
    model, opt, sched = _raw_scheduled(transform, _state(make_mlp), data, mse_loss)
    step = getattr(loopkit, transform)(forking_step(mse_loss))
    final, _ = loopkit.run_epochs(step, _state(make_mlp), data, epochs=EPOCHS, progress=False)
    assert final.scheduler.optimizer is final.optimizer
    assert final.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] < 0.4
    assert_trees_equal(dict(final.model.named_parameters()), dict(model.named_parameters()))


@pytest.mark.parametrize("transform", ["with_epoch_scheduler", "with_step_scheduler"])
def test_a_step_of_ones_own_that_gives_the_state_a_new_optimizer_is_told_to_pass_its_scheduler_and_trains_so(
    transform, make_mlp, make_batches, mse_loss, assert_trees_equal
):
    """A step that trains a copy of the optimizer (an instance of its own) and gives it to the state alone is refused
    (as outside a scheduler transform), told that the scheduler is the transform's held one and what to pass; passing
    it (scheduler_for) trains at the transform's schedule, as a raw loop stepping the scheduler where it does, with no
    torch warning that the optimizer's step was overridden (scheduler_for wraps it as a torch scheduler would)."""
    data = make_batches(BATCHES)
    model, opt, sched = _raw_scheduled(transform, _state(make_mlp), data, mse_loss)

    def own(with_scheduler):
        def step(state, batch):
            optimizer = torch.optim.SGD(state.model.parameters(), lr=0.4, momentum=0.9)
            optimizer.load_state_dict(state.optimizer.state_dict())
            optimizer.zero_grad()
            mse_loss(state.model, batch).backward()
            optimizer.step()
            changes = {"scheduler": loopkit.state.scheduler_for(state.scheduler, optimizer)} if with_scheduler else {}
            return state.evolve(optimizer=optimizer, step=state.step + 1, **changes), {}
        return step

    with pytest.raises(ValueError, match=r"held still by the with_step_scheduler or with_epoch_scheduler around this "
                                         r"step.*scheduler=loopkit\.state\.scheduler_for\(state\.scheduler, new\)"):
        loopkit.run_epochs(getattr(loopkit, transform)(own(False)), _state(make_mlp), data, epochs=1, progress=False)
    with warnings.catch_warnings():  # (nor does torch warn that the new optimizer's step was overridden)
        warnings.filterwarnings("error", message=r".*optimizer\.step\(\)")
        final, _ = loopkit.run_epochs(getattr(loopkit, transform)(own(True)), _state(make_mlp), data, epochs=EPOCHS,
                                      progress=False)
    assert type(final.scheduler) is torch.optim.lr_scheduler.StepLR and final.scheduler.optimizer is final.optimizer
    assert final.scheduler.state_dict() == sched.state_dict()
    assert final.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] < 0.4
    assert_trees_equal(dict(final.model.named_parameters()), dict(model.named_parameters()))


@pytest.mark.parametrize("donated", [True, False], ids=["donated", "pure"])
@pytest.mark.parametrize("transform", ["with_epoch_scheduler", "with_step_scheduler"])
def test_a_step_of_ones_own_that_steps_the_states_scheduler_leaves_it_to_the_transform(
    transform, donated, make_mlp, make_batches, mse_loss, assert_trees_equal
):
    """A raw loop's step written as a step of one's own (``state.scheduler.step()`` after its update): the transform
    holds the scheduler still in it (its state had no scheduler: AttributeError), so the rates are the transform's
    schedule alone, as in a raw loop that steps the scheduler where the transform does; on the pure path (a fork of
    the held scheduler in each call) the given state's scheduler stays as it was."""
    data = make_batches(BATCHES)
    model, opt, sched = _raw_scheduled(transform, _state(make_mlp), data, mse_loss)

    def own(state, batch):
        state.optimizer.zero_grad()
        loss = mse_loss(state.model, batch)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {"loss": loss.detach()}

    step = getattr(loopkit, transform)(own)
    if donated:
        final, _ = loopkit.run_epochs(step, _state(make_mlp), data, epochs=EPOCHS, progress=False)
    else:
        final = _state(make_mlp)
        for epoch in range(EPOCHS):
            for batch in data:
                given = final.scheduler.state_dict()
                final, _ = step(final, batch)
            final, _ = step.flush(final)
            final = final.evolve(epoch=epoch + 1, batch_index=0)
        assert given["last_epoch"] < final.scheduler.last_epoch  # (the last call's given state: stepped only after)
    assert type(final.scheduler) is torch.optim.lr_scheduler.StepLR and final.scheduler.optimizer is final.optimizer
    assert final.scheduler.state_dict() == sched.state_dict()
    assert final.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] < 0.4
    assert_trees_equal(dict(final.model.named_parameters()), dict(model.named_parameters()))


_SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=2 * EPOCHS * BATCHES),
}


@pytest.mark.parametrize("kind", list(_SCHEDULERS))
@pytest.mark.parametrize("transform", ["with_epoch_scheduler", "with_step_scheduler"])
def test_a_step_of_ones_own_that_checks_the_schedulers_class_sees_the_held_ones(
    transform, kind, make_mlp, make_batches, mse_loss, assert_trees_equal
):
    """A Lightning user's stepping written in a step of one's own (``isinstance(sch, ReduceLROnPlateau)``: step on
    the loss, else ``sch.step()``): the held scheduler is an instance of the scheduler's class (it was not: the step
    never stepped it), and of no other, and still steps nothing there; the rates are the transform's schedule, as
    in a raw loop that steps the scheduler where the transform does."""
    plateau, cls = torch.optim.lr_scheduler.ReduceLROnPlateau, getattr(torch.optim.lr_scheduler, kind)

    def made():
        model = make_mlp(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.9)
        return loopkit.TrainState.create(model, opt, _SCHEDULERS[kind](opt))

    data = make_batches(BATCHES)
    model, opt, sched = _raw_scheduled(transform, made(), data, mse_loss)
    seen = []

    def own(state, batch):
        state.optimizer.zero_grad()
        loss = mse_loss(state.model, batch)
        loss.backward()
        state.optimizer.step()
        scheduler, before = state.scheduler, state.scheduler.state_dict()
        if isinstance(scheduler, plateau):
            scheduler.step(loss.detach())
        elif isinstance(scheduler, cls):
            scheduler.step()
        seen.append((isinstance(scheduler, cls), isinstance(scheduler, plateau), scheduler.state_dict() == before))
        return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {}

    final, _ = loopkit.run_epochs(getattr(loopkit, transform)(own), made(), data, epochs=EPOCHS, progress=False)
    assert seen == [(True, False, True)] * (EPOCHS * BATCHES)
    assert type(final.scheduler) is cls and final.scheduler.state_dict() == sched.state_dict()
    assert final.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert_trees_equal(dict(final.model.named_parameters()), dict(model.named_parameters()))


@pytest.mark.parametrize("transform", ["with_epoch_scheduler", "with_step_scheduler"])
def test_an_update_whose_log_write_failed_inside_is_left_whole_with_the_scheduler_stepped_as_it_would_be(
    transform, make_mlp, make_batches, mse_loss, take_snapshot, assert_trees_equal
):
    """with_logging inside marks the state of an update whose write failed whole (loopkit.state_at_error): the
    transform gives it the scheduler back (it had none, then the held stand-in) and, with_step_scheduler, steps it
    for that update as it would have (batch 2 of epoch 1, frequency 2); training on from it ends as the
    uninterrupted run."""
    def scheduled(step):
        return getattr(loopkit, transform)(step, frequency=2 if transform == "with_step_scheduler" else 1)

    data = make_batches(BATCHES)
    whole, _ = loopkit.run_epochs(scheduled(loopkit.train_step(mse_loss)), _state(make_mlp), data, epochs=EPOCHS,
                                  progress=False)
    logged = scheduled(loopkit.with_logging(loopkit.train_step(mse_loss), FullDisk(at=BATCHES + 2), every_n_steps=2))
    with pytest.raises(OSError, match="No space left") as caught:
        loopkit.run_epochs(logged, _state(make_mlp), data, epochs=EPOCHS, progress=False)
    left = loopkit.state_at_error(caught.value)
    assert left is not None and (left.step, left.epoch, left.batch_index) == (BATCHES + 2, 1, 2)
    assert type(left.scheduler) is torch.optim.lr_scheduler.StepLR and left.scheduler.optimizer is left.optimizer
    assert left.scheduler.last_epoch == (3 if transform == "with_step_scheduler" else 1)  # (2 a epoch, and this one)
    resumed, _ = loopkit.run_epochs(scheduled(loopkit.train_step(mse_loss)), left, data, epochs=EPOCHS, progress=False)
    assert resumed.scheduler.state_dict() == whole.scheduler.state_dict()
    for part in ("params", "optimizer"):  # (its extras keep the unlogged means, for a with_logging to go on with)
        assert_trees_equal(take_snapshot(resumed)[part], take_snapshot(whole)[part])


@pytest.mark.parametrize("transform", ["with_epoch_scheduler", "with_step_scheduler"])
def test_its_checkpoints_hold_the_scheduler_itself(transform, tmp_path, make_mlp, make_batches, mse_loss):
    """with_checkpointing around the transform saves the state it returns: the StepLR given back (not the held
    stand-in its inner step sees, which a gradient hook reads here), whose state restores as it was saved."""
    seen = []
    inner = loopkit.with_grad_hook(loopkit.train_step(mse_loss), lambda s: seen.append(type(s.scheduler)))
    step = loopkit.with_checkpointing(getattr(loopkit, transform)(inner), tmp_path, every_n_steps=1, keep_last=None)

    class Saved(loopkit.Callback):
        def __init__(self):
            self.schedulers = {}

        def on_batch_end(self, state, metrics):
            self.schedulers[state.step] = state.scheduler.state_dict()

    saved = Saved()
    loopkit.run_epochs(step, _state(make_mlp), make_batches(BATCHES), epochs=2, callbacks=[saved], progress=False)
    assert set(seen) == {torch.optim.lr_scheduler.StepLR}
    infos = loopkit.checkpoint.list_checkpoints(tmp_path)
    assert [info.step for info in infos] == list(range(1, 2 * BATCHES + 1))  # (one save at each update)
    for info in infos:
        assert loopkit.checkpoint.read_structure(info.path)["scheduler"] == {"type": "StepLR"}
        restored = loopkit.restore(_state(make_mlp), info.path)
        assert type(restored.scheduler) is torch.optim.lr_scheduler.StepLR
        assert restored.scheduler.state_dict() == saved.schedulers[info.step]


@pytest.mark.parametrize("transform", ["with_epoch_scheduler", "with_step_scheduler"])
def test_a_step_of_ones_own_that_sets_its_own_scheduler_or_replaces_the_optimizer_is_heard(transform, make_mlp,
                                                                                            make_batches, mse_loss):
    """A step that sets a scheduler of its own keeps it (it was replaced by the held one, copied onto an optimizer it
    does not fit: OneCycleLR raised KeyError 'max_lr' after the update); one that replaces the optimizer with one of
    other groups and no scheduler is warned that the held scheduler steps the old one."""
    def own_optimizer(with_scheduler):
        def step(state, batch):
            state = loopkit.state.fork(state)
            optimizer = torch.optim.Adam(state.model.parameters(), lr=0.01)
            mse_loss(state.model, batch).backward()
            optimizer.step()
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1) if with_scheduler else None
            return state.evolve(step=state.step + 1, optimizer=optimizer, scheduler=scheduler), {}
        return step

    model = make_mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = loopkit.TrainState.create(model, optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, 1.0, total_steps=9))
    batch = make_batches(1)[0]
    new, _ = getattr(loopkit, transform)(own_optimizer(True))(state, batch)
    assert isinstance(new.scheduler, torch.optim.lr_scheduler.StepLR) and new.scheduler.optimizer is new.optimizer
    with pytest.warns(RuntimeWarning, match="replaced the state's optimizer with one of other parameter groups"):
        getattr(loopkit, transform)(own_optimizer(False))(state, batch)


def test_frequency_is_agreed_over_the_ranks():
    """A rank whose scheduler steps every 2 epochs and one every epoch update their replicas at other rates: run_epochs
    compared no option of with_epoch_scheduler. frequency is now among those the ranks must share."""
    base = loopkit.train_step(lambda m, b: m(b).sum())
    assert loopkit.with_epoch_scheduler(base, frequency=2).rank_agreed == (("with_epoch_scheduler frequency", 2),)
    assert loopkit.with_epoch_scheduler(base).rank_agreed == (("with_epoch_scheduler frequency", 1),)
