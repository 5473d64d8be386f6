"""with_step_scheduler against Lightning's {"interval": "step", "frequency": n}: a raw loop that steps the scheduler
after an update when (batch_idx + 1) % n == 0 (batch_idx from 0 within each epoch), Lightning 2.6's training loop
written out under gradient accumulation (an epoch's partial group included), exact resume, purity and what it
refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loopkit

EPOCHS, BATCHES = 2, 7  # 7 batches an epoch: divisible by neither frequency


def _state(make_mlp, step_size=1):
    model = make_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.9)
    return loopkit.TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.5))


def _raw_loop(state, data, mse_loss, frequency):
    """Lightning's update_lr_schedulers("step") written out; the rate after each batch."""
    model, opt, sched = state.model, state.optimizer, state.scheduler
    rates = []
    for _ in range(EPOCHS):
        for batch_idx, batch in enumerate(data):
            opt.zero_grad()
            mse_loss(model, batch).backward()
            opt.step()
            if (batch_idx + 1) % frequency == 0:
                sched.step()
            rates.append(opt.param_groups[0]["lr"])
    return rates


class _Rates(loopkit.Callback):
    def __init__(self):
        self.rates = []

    def on_batch_end(self, state, metrics):
        self.rates.append(state.optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("frequency", [2, 3])
def test_the_scheduler_steps_every_frequency_batches_of_each_epoch_as_a_raw_loop(
        frequency, make_mlp, make_batches, mse_loss, assert_trees_equal):
    data = make_batches(BATCHES)
    ref = _state(make_mlp, step_size=2)
    expected = _raw_loop(ref, data, mse_loss, frequency)
    rates = _Rates()
    step = loopkit.with_step_scheduler(loopkit.train_step(mse_loss), frequency=frequency)
    state, _ = loopkit.run_epochs(step, _state(make_mlp, step_size=2), data, epochs=EPOCHS, callbacks=[rates],
                                  progress=False)
    assert rates.rates == expected
    assert state.scheduler.last_epoch == EPOCHS * (BATCHES // frequency)  # the count starts over each epoch
    assert_trees_equal(dict(state.model.state_dict()), dict(ref.model.state_dict()))
    assert state.scheduler.state_dict() == ref.scheduler.state_dict()


# (samples, frequency): 17 samples in batches of 2 are 9 batches, the last one of 1 sample; with every=2 the 9th is
# a partial group, updated by the epoch's flush, which is Lightning's batch_idx 8: a step with frequency 3 (at 6, 9).
# 20 samples: 10 batches, no partial group; frequency 4 steps at batches 4 and 8 of each epoch.
@pytest.mark.parametrize("samples, frequency", [(17, 3), (20, 4)])
def test_under_grad_accum_it_matches_lightnings_loop(samples, frequency, make_mlp, assert_trees_equal):
    """Two scheduler steps an epoch either way: the flush's update steps it at batch 9 of 9; batch 8 of 10 does.
    The reference is Lightning 2.6's training epoch loop written out (its Trainer with accumulate_grad_batches=2 and
    this scheduler configuration gave the same rates, global_step and weights, bitwise, when this was written)."""
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(samples, 4, generator=gen), torch.randn(samples, 2, generator=gen)
    data = [(x[i:i + 2], y[i:i + 2]) for i in range(0, samples, 2)]

    def lightning_loss(model, batch):
        xb, yb = batch
        return ((model(xb) - yb) ** 2).mean()

    def loss_fn(model, batch):  # the partial group: Lightning divides its one batch's loss by 2 as any, loopkit's
        # flush takes the mean over the batches seen (x2): halved here, the two updates are bitwise the same
        loss = lightning_loss(model, batch)
        return loss * 0.5 if len(batch[0]) == 1 else loss

    def made():
        model = make_mlp(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return loopkit.TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7))

    ref = made()
    model, opt, sched = ref.model, ref.optimizer, ref.scheduler
    updates = 0
    for _ in range(2):  # training_epoch_loop: _should_accumulate, then _update_learning_rates("step")
        for batch_idx, batch in enumerate(data):
            (lightning_loss(model, batch) / 2).backward()
            if (batch_idx + 1) % 2 == 0 or batch_idx == len(data) - 1:  # a group's end, or the epoch's last batch
                opt.step()
                opt.zero_grad()
                updates += 1
                if (batch_idx + 1) % frequency == 0:
                    sched.step()
    step = loopkit.with_step_scheduler(loopkit.with_grad_accum(loopkit.train_step(loss_fn), every=2),
                                       frequency=frequency)
    state, _ = loopkit.run_epochs(step, made(), data, epochs=2, progress=False)
    assert state.step == updates
    assert state.scheduler.last_epoch == sched.last_epoch == 4
    assert state.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert_trees_equal(dict(state.model.state_dict()), dict(model.state_dict()))


def test_a_crash_resumes_exactly_from_mid_epoch_and_from_a_flushs_update(
        tmp_path, make_mlp, make_batches, mse_loss, assert_trees_equal):
    """9 batches in groups of 2, frequency 3: updates at batches 2, 4, 6, 8 and the flush's at 9; steps at 6 and 9."""
    data = make_batches(9)
    inner = loopkit.with_step_scheduler(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=2), frequency=3)
    whole, _ = loopkit.run_epochs(inner, _state(make_mlp), data, epochs=3, progress=False)
    assert whole.scheduler.last_epoch == 6
    step = loopkit.with_checkpointing(inner, tmp_path, every_n_steps=1, keep_last=None)

    class Crash(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            if state.step == 9:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        loopkit.run_epochs(step, _state(make_mlp), data, epochs=3, callbacks=[Crash()], progress=False)
    cuts = {"mid-epoch": ("ckpt-000007-step7-epoch1-batch4", (7, 1, 4, 2)),
            "the flush's": ("ckpt-000005-step5-epoch0-batch9", (5, 0, 9, 2))}
    for name, (directory, position) in cuts.items():
        restored = loopkit.restore(_state(make_mlp), tmp_path / directory)
        assert (restored.step, restored.epoch, restored.batch_index, restored.scheduler.last_epoch) == position, name
        resumed, _ = loopkit.run_epochs(inner, restored, data, epochs=3, progress=False)
        assert resumed.scheduler.state_dict() == whole.scheduler.state_dict(), name
        assert_trees_equal(dict(resumed.model.state_dict()), dict(whole.model.state_dict()))


def test_the_step_and_the_flush_are_pure(make_mlp, make_batches, mse_loss, take_snapshot, assert_trees_equal):
    step = loopkit.with_step_scheduler(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=2), frequency=2)
    state = _state(make_mlp)
    for batch in make_batches(3):  # batch 2's update steps it; batch 3 starts a group
        before = take_snapshot(state)
        scheduler = state.scheduler.state_dict()
        new, _ = step(state, batch)
        assert_trees_equal(take_snapshot(state), before)
        assert state.scheduler.state_dict() == scheduler
        state = new
    assert (state.step, state.scheduler.last_epoch) == (1, 1)
    state = state.evolve(batch_index=4)  # as if its epoch's 4th batch: the flush's update steps it
    before = take_snapshot(state)
    flushed, _ = step.flush(state)
    assert_trees_equal(take_snapshot(state), before)
    assert (flushed.step, flushed.scheduler.last_epoch, state.scheduler.last_epoch) == (2, 2, 1)


def test_what_it_cannot_do_is_refused(tmp_path, make_mlp, make_batches, mse_loss):
    inner = loopkit.train_step(mse_loss)
    assert loopkit.with_step_scheduler(inner, frequency=np.int64(2)).frequency == 2
    for frequency in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="with_step_scheduler: frequency must be a positive int"):
            loopkit.with_step_scheduler(inner, frequency=frequency)
    with pytest.raises(TypeError, match="with_step_scheduler cannot wrap with_epoch_scheduler"):
        loopkit.with_step_scheduler(loopkit.with_epoch_scheduler(inner))
    with pytest.raises(TypeError, match="with_epoch_scheduler cannot wrap with_step_scheduler"):
        loopkit.with_epoch_scheduler(loopkit.with_step_scheduler(inner))
    with pytest.raises(TypeError, match="with_step_scheduler cannot wrap with_step_scheduler"):
        loopkit.with_step_scheduler(loopkit.with_step_scheduler(inner))
    with pytest.raises(TypeError, match="with_step_scheduler cannot wrap with_checkpointing"):
        loopkit.with_step_scheduler(loopkit.with_checkpointing(inner, tmp_path))
    with pytest.raises(TypeError, match=r"with_swa cannot wrap with_step_scheduler: .*with_step_scheduler\(with_swa\("):
        loopkit.with_swa(loopkit.with_step_scheduler(inner), 0.1, swa_epoch_start=1)
    with pytest.raises(TypeError, match="with_grad_accum cannot wrap with_step_scheduler"):
        loopkit.with_grad_accum(loopkit.with_step_scheduler(inner), every=2)
    with pytest.raises(TypeError, match="with_step_scheduler cannot wrap eval_step"):
        loopkit.with_step_scheduler(loopkit.eval_step(lambda m, b: {}))
    with pytest.raises(ValueError, match="lr_find: the step has with_step_scheduler"):
        loopkit.lr_find(loopkit.with_step_scheduler(inner), _state(make_mlp), make_batches(2))
    model = make_mlp(0)
    plain = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for call in (lambda s: loopkit.with_step_scheduler(inner)(s, make_batches(1)[0]),
                 lambda s: loopkit.with_step_scheduler(inner).flush(s)):
        with pytest.raises(ValueError, match="with_step_scheduler: the state has no scheduler"):
            call(plain)
        plain.check_usable()


def test_batches_the_loss_fn_skips_are_not_counted_so_updates_of_groups_still_step_it(make_mlp, make_batches, mse_loss):
    """Under with_grad_accum a skipped batch takes no place in a group: the groups' ends moved off the batch count's
    multiples, and with every=2, frequency=2 the schedule never stepped. Reference: a raw loop that accumulates the
    batches it trains on and counts them, not the skipped one, in the epoch."""
    data = make_batches(BATCHES)
    skip = {1, 4}  # (batch indices of each epoch whose loss_fn gives None)

    def loss_fn(model, batch):
        return None if any(batch[0] is data[i][0] for i in skip) else mse_loss(model, batch)

    ref = _state(make_mlp)
    model, opt, sched = ref.model, ref.optimizer, ref.scheduler
    for _ in range(EPOCHS):
        counted = 0
        for batch_idx, batch in enumerate(data):
            if batch_idx in skip:
                continue
            counted += 1
            (mse_loss(model, batch) / 2).backward()
            if counted % 2 == 0 or batch_idx == BATCHES - 1:  # a group's end, or the epoch's partial group
                if counted % 2:  # (the flush: the mean over the one micro-batch seen)
                    for p in model.parameters():
                        p.grad.mul_(2)
                opt.step()
                opt.zero_grad()
                if counted % 2 == 0:
                    sched.step()
    step = loopkit.with_step_scheduler(loopkit.with_grad_accum(loopkit.train_step(loss_fn), every=2), frequency=2)
    state, _ = loopkit.run_epochs(step, _state(make_mlp), data, epochs=EPOCHS, progress=False)
    assert state.scheduler.last_epoch == sched.last_epoch == EPOCHS * 2
    for p, q in zip(state.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_batches_skipped_in_one_epoch_do_not_shift_the_count_of_the_next(make_mlp, make_batches, mse_loss):
    """The skipped batches are counted per epoch: an odd number skipped in epoch 0 leaves epoch 1's count of batches
    from its first batch (Lightning's batch_idx starts over), else the schedule would step at the odd batches there.
    Reference: a raw loop that counts, in each epoch, the batches it trained on; the rate after each batch."""
    data = make_batches(BATCHES)
    skip = {1, 4, 5, BATCHES + 2}  # (the calls whose loss_fn gives None: three in epoch 0, one in epoch 1)
    calls = []

    def loss_fn(model, batch):
        calls.append(None)
        return None if len(calls) - 1 in skip else mse_loss(model, batch)

    ref = _state(make_mlp)
    model, opt, sched = ref.model, ref.optimizer, ref.scheduler
    expected = []
    for epoch in range(EPOCHS):
        counted = 0
        for batch_idx, batch in enumerate(data):
            if epoch * BATCHES + batch_idx not in skip:
                counted += 1
                opt.zero_grad()
                mse_loss(model, batch).backward()
                opt.step()
                if counted % 2 == 0:
                    sched.step()
            expected.append(opt.param_groups[0]["lr"])
    rates = _Rates()
    step = loopkit.with_step_scheduler(loopkit.train_step(loss_fn), frequency=2)
    state, _ = loopkit.run_epochs(step, _state(make_mlp), data, epochs=EPOCHS, callbacks=[rates], progress=False)
    assert rates.rates == expected and state.scheduler.last_epoch == sched.last_epoch == 2 + 3
    for p, q in zip(state.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_frequency_is_agreed_over_the_ranks():
    """A rank whose scheduler steps every 2 batches and one every batch update their replicas at other rates: run_epochs
    compared no option of with_step_scheduler. frequency is now among those the ranks must share."""
    base = loopkit.train_step(lambda m, b: m(b).sum())
    assert loopkit.with_step_scheduler(base, frequency=2).rank_agreed == (("with_step_scheduler frequency", 2),)
    assert loopkit.with_step_scheduler(base).rank_agreed == (("with_step_scheduler frequency", 1),)
