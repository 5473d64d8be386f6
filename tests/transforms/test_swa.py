"""with_swa + swa_state against Lightning's recipe written out by hand with torch's own SWA machinery.

The reference (``_raw_swa_loop``) is what ``lightning.pytorch.callbacks.StochasticWeightAveraging``
does, in a plain loop: from epoch ``swa_start`` (0-based) the optimizer's rates come from a
``SWALR`` built as Lightning builds it (``initial_lr`` set to the SWA rates, ``last_epoch=max_epochs``
for "cos") and stepped once per epoch; the model's scheduler is no longer stepped; at the start
of each epoch in ``[swa_start, max_epochs - 1]`` an ``AveragedModel`` averages the weights in; at
the end the averaged weights get BatchNorm statistics from ``update_bn`` over the training data.
On the CPU ``AveragedModel``'s default average is Lightning's arithmetic, so the comparison is bitwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

import loopkit
from loopkit import checkpoint
from loopkit.state import fork
from tests._driver_helpers import FullDisk

EPOCHS, BATCHES = 6, 4


def _model(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _state(optimizer: str, seed: int = 0, *, two_groups: bool = False, step_size: int = 3) -> loopkit.TrainState:
    model = _model(seed)
    if two_groups:
        params = [{"params": model[0].parameters()}, {"params": list(model[1].parameters()) + list(model[3].parameters()),
                                                      "lr": 0.05}]
    else:
        params = model.parameters()
    opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(params, lr=0.02))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.7)  # per update, as loopkit steps it
    return loopkit.TrainState.create(model, opt, sched)


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


@pytest.fixture
def data(make_batches):
    return make_batches(BATCHES)


def _raw_swa_loop(state, data, *, swa_start, swa_lrs, annealing_epochs, strategy, epochs=EPOCHS, interval=None,
                  frequency=1):
    """Lightning's recipe in a plain loop; returns the averaged model (BN updated) and each epoch's rates
    after its first update (in an SWA epoch, the rate of all its updates).

    The model's scheduler steps before SWA as ``interval`` says: None after every update (loopkit's train_step),
    ``"step"`` after the update of every ``frequency``-th batch of an epoch, ``"epoch"`` at the end of every
    ``frequency``-th epoch (Lightning's ``configure_optimizers`` intervals). Once SWALR exists it replaces the
    scheduler: Lightning's ``on_train_epoch_start`` swaps the scheduler config, so the old one never steps again.
    (Checked against Lightning 2.6.6's Trainer: the same weights and rates, bitwise, for each interval.)"""
    model, opt, sched = state.model, state.optimizer, state.scheduler
    averaged = AveragedModel(model)
    swa_sched = None
    rates = []
    for epoch in range(epochs):
        if swa_start <= epoch <= epochs - 1:  # on_train_epoch_start
            if swa_sched is None:
                lrs = swa_lrs if isinstance(swa_lrs, list) else [swa_lrs] * len(opt.param_groups)
                for lr, group in zip(lrs, opt.param_groups):
                    group["initial_lr"] = lr
                swa_sched = SWALR(opt, swa_lr=lrs, anneal_epochs=annealing_epochs, anneal_strategy=strategy,
                                  last_epoch=epochs if strategy == "cos" else -1)
            averaged.update_parameters(model)
        for k, batch in enumerate(data):
            opt.zero_grad()
            _mse(model, batch).backward()
            opt.step()
            if swa_sched is None and (interval is None or (interval == "step" and (k + 1) % frequency == 0)):
                sched.step()
            if k == 0:  # what the callback below sees
                rates.append([g["lr"] for g in opt.param_groups])
        if swa_sched is not None:
            swa_sched.step()
        elif interval == "epoch" and (epoch + 1) % frequency == 0:  # update_lr_schedulers("epoch")
            sched.step()
    update_bn(data, averaged.module)
    return averaged, rates


class _Rates:
    """A callback that records each param group's rate at each epoch's first batch (after its update)."""

    def __init__(self):
        self.rates = []

    def on_batch_end(self, state, metrics):
        if state.batch_index == 1:
            self.rates.append([g["lr"] for g in state.optimizer.param_groups])


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _buffers(model):
    return {k: v.detach() for k, v in model.named_buffers()}


CASES = [  # (optimizer, swa_epoch_start, swa_start 0-based, swa_lrs, annealing_epochs, strategy, two groups)
    ("sgd", 3, 2, 0.01, 2, "cos", False),
    ("sgd", 0.5, 2, 0.01, 3, "linear", False),
    ("adam", 0.7, 3, 0.005, 2, "cos", False),
    ("adam", 1, 0, 0.005, 10, "linear", False),
    ("sgd", 2, 1, [0.02, 0.004], 2, "cos", True),
    ("sgd", 6, 5, 0.01, 0, "cos", False),  # the last epoch only: its start weights, SWALR at swa_lr at once
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[5]}-{c[4]}{'-groups' if c[6] else ''}" for c in CASES])
def test_the_averages_bn_statistics_and_rates_are_lightnings_recipe_bitwise(case, data, assert_trees_equal):
    optimizer, start, swa_start, swa_lrs, anneal, strategy, groups = case
    ref_state = _state(optimizer, two_groups=groups)
    averaged, ref_rates = _raw_swa_loop(ref_state, data, swa_start=swa_start, swa_lrs=swa_lrs,
                                        annealing_epochs=anneal, strategy=strategy)

    step = loopkit.with_swa(loopkit.train_step(_mse), swa_lrs, swa_epoch_start=start, epochs=EPOCHS,
                            annealing_epochs=anneal, annealing_strategy=strategy)
    rates = _Rates()
    state, _ = loopkit.run_epochs(step, _state(optimizer, two_groups=groups), data, epochs=EPOCHS, progress=False,
                                  callbacks=[rates])
    assert rates.rates == ref_rates  # floats, compared exactly
    assert_trees_equal(_params(state.model), _params(ref_state.model))  # the training itself
    assert state.extras["swa/n_averaged"] == EPOCHS - swa_start == int(averaged.n_averaged)
    assert state.extras["swa/latest_update_epoch"] == EPOCHS - 1
    assert state.scheduler.last_epoch == ref_state.scheduler.last_epoch == swa_start * BATCHES  # held still in SWA
    final = loopkit.swa_state(state, data)
    assert_trees_equal(_params(final.model), _params(averaged.module))
    assert_trees_equal(_buffers(final.model), _buffers(averaged.module))
    assert int(final.model[1].num_batches_tracked) == BATCHES and final.model[1].momentum == 0.1


def _scheduled(interval: str, frequency: int, step: loopkit.Step) -> loopkit.Step:
    """``step`` under the scheduler transform of Lightning's ``interval``."""
    if interval == "epoch":
        return loopkit.with_epoch_scheduler(step, frequency=frequency)
    return loopkit.with_step_scheduler(step, frequency=frequency)


SCHEDULED = [  # (interval, frequency, swa_epoch_start, swa_start 0-based, annealing_epochs, strategy, StepLR step_size)
    ("epoch", 1, 3, 2, 1, "cos", 1),  # configure_optimizers -> [opt], [StepLR]: Lightning's most common SWA set-up
    ("epoch", 2, 0.7, 3, 2, "linear", 1),  # the end of epoch 3 is a multiple of 2, but SWALR has taken over there
    ("step", 1, 3, 2, 2, "cos", 3),
    ("step", 2, 2, 1, 1, "cos", 1),
]


@pytest.mark.parametrize("case", SCHEDULED, ids=[f"{c[0]}-every{c[1]}-start{c[2]}" for c in SCHEDULED])
def test_a_scheduler_transform_around_swa_steps_until_swa_start_then_swalr_takes_over_as_in_lightning(
        case, data, assert_trees_equal):
    """Lightning steps the configure_optimizers scheduler (per epoch or per step) in the epochs before swa_start,
    swaps it for SWALR when that epoch starts, and never steps it again; SWALR anneals from the rate it left."""
    interval, frequency, start, swa_start, anneal, strategy, step_size = case
    ref_state = _state("sgd", step_size=step_size)
    averaged, ref_rates = _raw_swa_loop(ref_state, data, swa_start=swa_start, swa_lrs=0.01, annealing_epochs=anneal,
                                        strategy=strategy, interval=interval, frequency=frequency)

    swa = loopkit.with_swa(loopkit.train_step(_mse), 0.01, swa_epoch_start=start, epochs=EPOCHS,
                           annealing_epochs=anneal, annealing_strategy=strategy)
    rates = _Rates()
    state, _ = loopkit.run_epochs(_scheduled(interval, frequency, swa), _state("sgd", step_size=step_size), data,
                                  epochs=EPOCHS, progress=False, callbacks=[rates])
    assert rates.rates == ref_rates  # floats, compared exactly
    assert len(set(r[0] for r in ref_rates[:swa_start + 1])) > 1  # the scheduler did change the rate before SWA
    assert_trees_equal(_params(state.model), _params(ref_state.model))
    assert state.extras["swa/n_averaged"] == EPOCHS - swa_start == int(averaged.n_averaged)
    assert_trees_equal(dict(state.extras["swa/params"]), _params(averaged.module))
    assert state.scheduler.last_epoch == ref_state.scheduler.last_epoch  # not stepped from swa_start on
    final = loopkit.swa_state(state, data)
    assert_trees_equal(_params(final.model), _params(averaged.module))
    assert_trees_equal(_buffers(final.model), _buffers(averaged.module))


@pytest.mark.parametrize("interval", [None, "step", "epoch"])
def test_a_gradient_hook_sees_the_scheduler_before_swa_start_and_one_held_still_from_it(interval, data):
    """A scheduler transform holds the scheduler still in its inner step, where a hook still sees it; from swa_start
    SWALR's rates train, not the scheduler's (Lightning's self.lr_schedulers() is SWALR there): the hook sees the
    scheduler held still, whose step() does nothing (the hook's call below leaves the schedule as without it)."""
    seen = []

    def hook(state):
        seen.append((state.epoch, type(state.scheduler) is loopkit.state.HeldScheduler))
        if state.epoch >= 2:
            state.scheduler.step()

    step = loopkit.with_swa(loopkit.with_grad_hook(loopkit.train_step(_mse), hook), 0.01, swa_epoch_start=3,
                            epochs=EPOCHS)  # SWA from epoch 2 (0-based)
    state, _ = loopkit.run_epochs(step if interval is None else _scheduled(interval, 1, step), _state("sgd"), data,
                                  epochs=EPOCHS, progress=False)
    assert seen == [(epoch, epoch >= 2) for epoch in range(EPOCHS) for _ in range(BATCHES)]
    assert state.scheduler.last_epoch == (2 * BATCHES if interval != "epoch" else 2)


def _stepping_its_scheduler(state, batch):
    """A step of one's own (Lightning's manual optimization): its update, then ``self.lr_schedulers().step()``."""
    state = fork(state)
    state.optimizer.zero_grad()
    loss = _mse(state.model, batch)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    return state.evolve(step=state.step + 1), {"loss": loss.detach()}


@pytest.mark.parametrize("interval", [None, "step", "epoch"])
def test_a_step_of_ones_own_that_steps_its_scheduler_trains_and_averages_as_the_raw_swa_loop(
        interval, data, assert_trees_equal):
    """The migration guide maps a manual ``self.lr_schedulers().step()`` to ``state.scheduler.step()`` in the step:
    before swa_start it steps the schedule per update (or the scheduler transform around holds it and steps it), from
    there it is held still, a step() that does nothing, while SWALR sets the rates, as the raw loop (AveragedModel +
    SWALR) does; it used to find no scheduler there (an AttributeError at the first SWA epoch)."""
    ref_state = _state("sgd")
    averaged, ref_rates = _raw_swa_loop(ref_state, data, swa_start=2, swa_lrs=0.01, annealing_epochs=2,
                                        strategy="cos", interval=interval)
    step = loopkit.with_swa(_stepping_its_scheduler, 0.01, swa_epoch_start=3, epochs=EPOCHS, annealing_epochs=2)
    rates = _Rates()
    state, _ = loopkit.run_epochs(step if interval is None else _scheduled(interval, 1, step), _state("sgd"), data,
                                  epochs=EPOCHS, progress=False, callbacks=[rates])
    assert rates.rates == ref_rates  # floats, compared exactly
    assert_trees_equal(_params(state.model), _params(ref_state.model))
    assert state.extras["swa/n_averaged"] == EPOCHS - 2 == int(averaged.n_averaged)
    assert_trees_equal(dict(state.extras["swa/params"]), _params(averaged.module))
    assert type(state.scheduler) is torch.optim.lr_scheduler.StepLR and state.scheduler.optimizer is state.optimizer
    assert state.scheduler.last_epoch == ref_state.scheduler.last_epoch  # held still from swa_start on


@pytest.mark.parametrize("interval", [None, "step", "epoch"])
def test_an_swa_epochs_update_whose_log_write_failed_inside_is_left_whole_with_the_scheduler(
    interval, data, take_snapshot, assert_trees_equal
):
    """with_logging inside marks the state of an update whose write failed whole (loopkit.state_at_error): with_swa
    gives it back the scheduler it held (it had none), and a scheduler transform around the scheduler itself;
    training on from it ends as the uninterrupted run."""
    def swa(step):
        step = loopkit.with_swa(step, 0.01, swa_epoch_start=3, epochs=EPOCHS)  # SWA from epoch 2 (0-based)
        return step if interval is None else _scheduled(interval, 1, step)

    whole, _ = loopkit.run_epochs(swa(loopkit.train_step(_mse)), _state("sgd"), data, epochs=EPOCHS, progress=False)
    at = 3 * BATCHES + 2
    logged = swa(loopkit.with_logging(loopkit.train_step(_mse), FullDisk(at), every_n_steps=2))
    with pytest.raises(OSError, match="No space left") as caught:
        loopkit.run_epochs(logged, _state("sgd"), data, epochs=EPOCHS, progress=False)
    left = loopkit.state_at_error(caught.value)
    assert left is not None and (left.step, left.epoch, left.batch_index) == (at, 3, 2)
    assert type(left.scheduler) is torch.optim.lr_scheduler.StepLR and left.scheduler.optimizer is left.optimizer
    resumed, _ = loopkit.run_epochs(swa(loopkit.train_step(_mse)), left, data, epochs=EPOCHS, progress=False)
    assert resumed.scheduler.state_dict() == whole.scheduler.state_dict()
    for part in ("params", "optimizer"):  # (its extras keep the unlogged means, for a with_logging to go on with)
        assert_trees_equal(take_snapshot(resumed)[part], take_snapshot(whole)[part])
    assert_trees_equal(dict(resumed.extras["swa/params"]), dict(whole.extras["swa/params"]))


def test_swa_around_a_scheduler_transform_is_refused_naming_the_order_that_works():
    inner = loopkit.train_step(_mse)
    for name in ("with_epoch_scheduler", "with_step_scheduler"):
        scheduled = getattr(loopkit, name)(inner)
        with pytest.raises(TypeError, match=rf"with_swa cannot wrap {name}: .*apply {name} around it, "
                                            rf"{name}\(with_swa\(step, swa_lrs, \.\.\.\)\)"):
            loopkit.with_swa(scheduled, 0.01, swa_epoch_start=3)
        around = getattr(loopkit, name)(loopkit.with_swa(inner, 0.01, swa_epoch_start=3))
        assert around.applied == ("train_step", "with_swa", name) and around.swa_start == 2


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_a_run_resumed_from_a_checkpoint_around_the_switch_to_swalr_ends_as_the_uninterrupted_one(
        interval, tmp_path, data, take_snapshot, assert_trees_equal):
    """Checkpoints mid-epoch before swa_start (epoch 2), at that epoch's last update (the epoch-end flush, and the
    epoch scheduler's last step, still to come), and after the first and second update of the first SWA epoch: each
    restored run ends bitwise as the one that never stopped."""
    def step(directory):
        swa = loopkit.with_swa(loopkit.train_step(_mse), 0.01, swa_epoch_start=3, epochs=EPOCHS, annealing_epochs=2)
        return loopkit.with_checkpointing(_scheduled(interval, 1, swa), directory, every_n_steps=1, keep_last=None)

    uninterrupted, _ = loopkit.run_epochs(step(tmp_path / "a"), _state("sgd", step_size=1), data, epochs=EPOCHS,
                                          progress=False)
    around = [c for c in checkpoint.list_checkpoints(tmp_path / "a")
              if (c.epoch, c.batch_index) in ((1, 2), (1, BATCHES), (2, 1), (2, 2))]
    assert len(around) == 4
    for saved in around:
        restored = loopkit.restore(_state("sgd", seed=1, step_size=1), saved.path)
        resumed, _ = loopkit.run_epochs(step(tmp_path / f"b{saved.seq}"), restored, data, epochs=EPOCHS, progress=False)
        assert_trees_equal(take_snapshot(resumed), take_snapshot(uninterrupted))
        assert_trees_equal(take_snapshot(loopkit.swa_state(resumed, data)),
                           take_snapshot(loopkit.swa_state(uninterrupted, data)))


def test_the_weights_the_last_epoch_trains_are_not_averaged_in_as_in_lightning(data, assert_trees_equal):
    # swa_epoch_start=6 of 6 epochs: one average, of the weights epoch 5 starts from (after epoch 4)
    step = loopkit.with_swa(loopkit.train_step(_mse), 0.01, swa_epoch_start=6, epochs=EPOCHS)
    after_5, _ = loopkit.run_epochs(step, _state("sgd"), data, epochs=5, progress=False)
    start_weights = {k: v.clone() for k, v in _params(after_5.model).items()}  # (run_epochs donates)
    state, _ = loopkit.run_epochs(step, after_5, data, epochs=EPOCHS, progress=False)
    assert state.extras["swa/n_averaged"] == 1
    assert_trees_equal(dict(state.extras["swa/params"]), start_weights)
    assert not torch.equal(state.model[0].weight, start_weights["0.weight"])


@pytest.mark.parametrize("how", ["continued", "state_dict", "mid_epoch"])
def test_a_run_interrupted_mid_swa_resumes_exactly(how, data, take_snapshot, assert_trees_equal):
    def step():
        return loopkit.with_swa(loopkit.train_step(_mse), 0.01, swa_epoch_start=0.4, epochs=EPOCHS, annealing_epochs=3)

    uninterrupted, _ = loopkit.run_epochs(step(), _state("adam"), data, epochs=EPOCHS, progress=False)
    if how == "mid_epoch":  # 3.5 epochs, then on
        part, _ = loopkit.run_epochs(step(), _state("adam"), data, max_steps=3 * BATCHES + 2, progress=False)
        assert (part.epoch, part.batch_index) == (3, 2)
    else:
        part, _ = loopkit.run_epochs(step(), _state("adam"), data, epochs=4, progress=False)
    assert part.extras["swa/n_averaged"] == part.epoch - (part.batch_index == 0)  # swa_start is epoch 1
    if how != "continued":
        part = _state("adam", seed=1).load_state_dict(part.state_dict())
    resumed, _ = loopkit.run_epochs(step(), part, data, epochs=EPOCHS, progress=False)
    assert_trees_equal(take_snapshot(resumed), take_snapshot(uninterrupted))
    assert_trees_equal(take_snapshot(loopkit.swa_state(resumed, data)), take_snapshot(loopkit.swa_state(uninterrupted, data)))


def test_the_step_is_pure_and_swa_state_changes_nothing(data, take_snapshot, assert_trees_equal):
    step = loopkit.with_swa(loopkit.train_step(_mse), 0.01, swa_epoch_start=2, annealing_epochs=1)
    state, _ = loopkit.run_epochs(step, _state("sgd"), data, epochs=2, progress=False)
    assert state.epoch == 2 and state.extras["swa/latest_update_epoch"] == 1
    before = take_snapshot(state)
    first, _ = step(state, data[0])  # the first call of epoch 2: averages, and SWALR's next rate
    second, _ = step(state, data[0])
    assert_trees_equal(take_snapshot(state), before)
    assert_trees_equal(take_snapshot(first), take_snapshot(second))
    assert first.extras["swa/n_averaged"] == 2 and first.optimizer.param_groups[0]["lr"] == 0.01
    averaged = loopkit.swa_state(first, data)
    assert_trees_equal(take_snapshot(first), take_snapshot(second))
    assert averaged.optimizer is None and averaged.model is not first.model
    donated, _ = loopkit.donate(step)(loopkit.TrainState.load_state_dict(_state("sgd", 1), state.state_dict()), data[0])
    assert_trees_equal(take_snapshot(donated), take_snapshot(first))


def test_before_swa_start_the_step_is_the_inner_one(data, take_snapshot, assert_trees_equal):
    swa = loopkit.with_swa(loopkit.train_step(_mse), 0.01, swa_epoch_start=3)
    a, _ = loopkit.run_epochs(swa, _state("sgd"), data, epochs=2, progress=False)
    b, _ = loopkit.run_epochs(loopkit.train_step(_mse), _state("sgd"), data, epochs=2, progress=False)
    assert_trees_equal(take_snapshot(a), take_snapshot(b))
    with pytest.raises(ValueError, match=r"swa_state: the state \(epoch 2\) holds no SWA averages yet"):
        loopkit.swa_state(a, data)


def test_swa_state_mid_run_and_without_batch_norm(data, make_mlp, assert_trees_equal):
    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.with_swa(loopkit.train_step(_mse), 0.05, swa_epoch_start=1)
    ref = AveragedModel(make_mlp(0))
    for epoch in range(3):
        ref.update_parameters(state.model)
        for batch in data:
            state, _ = step(state, batch)
        state = state.evolve(epoch=epoch + 1, batch_index=0)
    averaged = loopkit.swa_state(state)  # no BatchNorm: no data needed
    assert_trees_equal(_params(averaged.model), _params(ref.module))


def test_swa_state_of_a_batch_norm_model_needs_the_data(data):
    step = loopkit.with_swa(loopkit.train_step(_mse), 0.01, swa_epoch_start=1)
    state, _ = step(_state("sgd"), data[0])
    with pytest.raises(ValueError, match=r"swa_state: the model has BatchNorm layers.*swa_state\(state, train_data\)"):
        loopkit.swa_state(state)
    with pytest.raises(TypeError, match="swa_state: expected a loopkit.TrainState"):
        loopkit.swa_state(state.model)


def test_swa_state_names_batches_update_bn_cannot_take_and_refuses_data_without_a_batch(data):
    step = loopkit.with_swa(loopkit.train_step(_mse), 0.01, swa_epoch_start=1)
    state, _ = step(_state("sgd"), data[0])
    with pytest.raises(TypeError, match=r"swa_state: a batch of train_data is a dict; torch's update_bn takes a tensor"):
        loopkit.swa_state(state, [{"x": x, "y": y} for x, y in data])
    with pytest.raises(ValueError, match="swa_state: train_data yielded no batch"):  # update_bn would reset the statistics
        loopkit.swa_state(state, [])
    no_stats = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 2))
    plain = loopkit.TrainState.create(no_stats, torch.optim.SGD(no_stats.parameters(), lr=0.1))
    plain, _ = step(plain, data[0])
    loopkit.swa_state(plain)  # no running statistics to recompute: no data needed


def test_swa_state_keeps_pruned_weights_pruned_as_lightnings_averages_under_the_mask(data, assert_trees_equal):
    """Lightning averages a pruned module's weight_orig and puts it back under the mask: its weights stay sparse."""
    step = loopkit.with_swa(loopkit.with_pruning(loopkit.train_step(_mse), 0.6, [2, 6, 10]), 0.01, swa_epoch_start=1)
    state, _ = loopkit.run_epochs(step, _state("sgd"), data, epochs=3, progress=False)
    masks = state.extras["pruning/masks"]
    averaged = loopkit.swa_state(state, data)
    for name, mask in masks.items():
        weight = averaged.model.get_parameter(name)
        expected = state.extras["swa/params"][name] * mask
        assert_trees_equal(weight.detach(), expected)
        assert int((weight == 0).sum()) >= int((mask == 0).sum()) > 0


def test_each_epochs_rate_is_set_at_the_previous_epochs_end_as_lightning_steps_swalr(data):
    """What reads the optimizer between epochs (LearningRateMonitor's epoch records) sees the rate that epoch's updates
    use. Reference: the rates the updates used, read after each epoch's first update."""
    used = _Rates()
    monitor = loopkit.LearningRateMonitor()
    step = loopkit.with_swa(loopkit.train_step(_mse), 0.01, swa_epoch_start=2, epochs=EPOCHS, annealing_epochs=2,
                            annealing_strategy="linear")
    _, history = loopkit.run_epochs(step, _state("sgd"), data, epochs=EPOCHS, progress=False, callbacks=[monitor, used])
    assert [r["lr-SGD"] for r in history] == [rates[0] for rates in used.rates]


def test_a_param_group_added_mid_swa_is_refused_saying_so(data):
    step = loopkit.with_swa(loopkit.train_step(_mse), 0.01, swa_epoch_start=1)
    state = _state("sgd")
    state, _ = step(state, data[0])
    state.optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1})
    with pytest.raises(ValueError, match="SWA began .* with 1 param groups, and the optimizer has 2 now"):
        step(state, data[1])


def test_numpy_options_are_taken(data, assert_trees_equal):
    a = loopkit.with_swa(loopkit.train_step(_mse), np.float32(0.25), swa_epoch_start=np.float64(0.5),
                         epochs=np.int64(4), annealing_epochs=np.int64(2))
    b = loopkit.with_swa(loopkit.train_step(_mse), 0.25, swa_epoch_start=0.5, epochs=4, annealing_epochs=2)
    assert (a.swa_lrs, a.swa_start, a.swa_end, a.annealing_epochs) == (b.swa_lrs, b.swa_start, b.swa_end, 2)
    assert a.swa_start == 1 and loopkit.with_swa(loopkit.train_step(_mse), [0.1], swa_epoch_start=np.int64(4)).swa_start == 3


@pytest.mark.parametrize("options, match", [
    (dict(swa_lrs=0.0, swa_epoch_start=1), "swa_lrs must be a positive number"),
    (dict(swa_lrs=-0.1, swa_epoch_start=1), "swa_lrs must be a positive number"),
    (dict(swa_lrs=[0.1, "x"], swa_epoch_start=1), "swa_lrs must be a positive number"),
    (dict(swa_lrs=[], swa_epoch_start=1), "swa_lrs must be a positive number"),
    (dict(swa_lrs=True, swa_epoch_start=1), "swa_lrs must be a positive number"),
    (dict(swa_lrs=0.1, swa_epoch_start=0), "an int swa_epoch_start counts epochs from 1"),
    (dict(swa_lrs=0.1, swa_epoch_start=7, epochs=6), r"must be >= 1 and at most epochs=6, got 7"),
    (dict(swa_lrs=0.1, swa_epoch_start=1.5, epochs=6), r"swa_epoch_start must be an int >= 1 .* or a float in \[0, 1\]"),
    (dict(swa_lrs=0.1, swa_epoch_start="1"), r"swa_epoch_start must be an int"),
    (dict(swa_lrs=0.1), r"a float swa_epoch_start \(0\.8\) is a fraction of the run's epochs: pass epochs="),
    (dict(swa_lrs=0.1, swa_epoch_start=0.5), "pass epochs="),
    (dict(swa_lrs=0.1, swa_epoch_start=1, epochs=0), "epochs must be an int >= 1"),
    (dict(swa_lrs=0.1, swa_epoch_start=1, annealing_epochs=-1), "annealing_epochs must be an int >= 0"),
    (dict(swa_lrs=0.1, swa_epoch_start=1, annealing_epochs=2.0), "annealing_epochs must be an int >= 0"),
    (dict(swa_lrs=0.1, swa_epoch_start=1, annealing_strategy="exp"), "annealing_strategy must be 'cos' or 'linear'"),
])
def test_bad_options_are_refused_when_built(options, match):
    with pytest.raises(ValueError, match="with_swa: (.*)?" + match):
        loopkit.with_swa(loopkit.train_step(_mse), **options)


def test_what_only_the_state_tells_is_refused_before_anything_changes(data, take_snapshot, assert_trees_equal):
    three = loopkit.with_swa(loopkit.train_step(_mse), [0.1, 0.2, 0.3], swa_epoch_start=1)
    state = _state("sgd", two_groups=True)
    before = take_snapshot(state)
    with pytest.raises(ValueError, match="with_swa: swa_lrs has 3 rates, but the optimizer has 2 param groups"):
        loopkit.donate(three)(state, data[0])
    state.check_usable()  # a donated call refused before anything changed leaves the state usable
    assert_trees_equal(take_snapshot(state), before)
    bare = loopkit.TrainState.create(_model())
    with pytest.raises(ValueError, match="with_swa: the state has no optimizer"):
        loopkit.with_swa(loopkit.train_step(_mse), 0.1, swa_epoch_start=1)(bare, data[0])
    with pytest.raises(ValueError, match="with_swa: swa_lrs has 3 rates"):  # long before swa_start: at the first call
        loopkit.with_swa(loopkit.train_step(_mse), [0.1, 0.2, 0.3], swa_epoch_start=50)(state, data[0])


def test_averages_of_another_model_are_refused_naming_the_parameter(data, make_mlp):
    step = loopkit.with_swa(loopkit.train_step(_mse), 0.1, swa_epoch_start=1)
    state, _ = loopkit.run_epochs(step, _state("sgd"), data, epochs=1, progress=False)
    other = make_mlp(0)
    bad = state.evolve(model=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1), scheduler=None)
    with pytest.raises(ValueError, match=r"with_swa: the average of parameter '3\.weight'|with_swa: the state's averages"):
        loopkit.donate(step)(bad, data[0])
    bad.check_usable()
    with pytest.raises(ValueError, match=r"swa_state: .*drop the 'swa/' entries"):
        loopkit.swa_state(bad)


def test_meaningless_orders_are_refused_when_built(tmp_path):
    swa = loopkit.with_swa(loopkit.train_step(_mse), 0.1, swa_epoch_start=1)
    with pytest.raises(TypeError, match="with_swa cannot wrap with_swa"):
        loopkit.with_swa(swa, 0.1, swa_epoch_start=1)
    with pytest.raises(TypeError, match=r"with_swa cannot wrap with_checkpointing.*with_checkpointing\(with_swa\("):
        loopkit.with_swa(loopkit.with_checkpointing(loopkit.train_step(_mse), tmp_path), 0.1, swa_epoch_start=1)
    with pytest.raises(TypeError, match="with_swa cannot wrap eval_step"):
        loopkit.with_swa(loopkit.eval_step(lambda m, b: {}), 0.1, swa_epoch_start=1)
    with pytest.raises(TypeError, match="with_grad_clip cannot wrap with_swa"):
        loopkit.with_grad_clip(swa, max_norm=1.0)
    with pytest.raises(TypeError, match="with_swa: avg_fn must be callable"):
        loopkit.with_swa(loopkit.train_step(_mse), 0.1, swa_epoch_start=1, avg_fn=3)
    with pytest.raises(TypeError, match="with_swa cannot wrap the ensemble step"):
        loopkit.with_swa(loopkit.ensemble.train_step(_mse), 0.1, swa_epoch_start=1)
    both = loopkit.with_checkpointing(loopkit.with_ema(swa, 0.9), tmp_path)
    assert both.applied == ("train_step", "with_swa", "with_ema", "with_checkpointing")


def test_a_checkpoint_taken_mid_swa_restores_and_resumes_exactly(tmp_path, data, take_snapshot, assert_trees_equal):
    def step(directory):
        swa = loopkit.with_swa(loopkit.with_grad_accum(loopkit.train_step(_mse), every=2), 0.01, swa_epoch_start=2,
                               annealing_epochs=2)
        return loopkit.with_checkpointing(swa, directory, every_n_epochs=1, keep_last=10)

    uninterrupted, _ = loopkit.run_epochs(step(tmp_path / "a"), _state("sgd"), data, epochs=5, progress=False)
    saved = [c for c in checkpoint.list_checkpoints(tmp_path / "a") if c.epoch == 3]
    assert saved
    restored = loopkit.restore(_state("sgd", seed=1), saved[0].path)
    assert restored.extras["swa/n_averaged"] == 2
    resumed, _ = loopkit.run_epochs(step(tmp_path / "b"), restored, data, epochs=5, progress=False)
    assert_trees_equal(take_snapshot(resumed), take_snapshot(uninterrupted))


def test_a_custom_avg_fn_is_used(data, assert_trees_equal):
    def last(averaged, param, n):  # keeps the newest weights
        return param.clone()

    step = loopkit.with_swa(loopkit.train_step(_mse), 0.01, swa_epoch_start=1, avg_fn=last)
    state, _ = loopkit.run_epochs(step, _state("sgd"), data, epochs=3, progress=False)
    before_last = loopkit.run_epochs(step, _state("sgd"), data, epochs=2, progress=False)[0]
    assert_trees_equal(dict(state.extras["swa/params"]), _params(before_last.model))


def test_an_avg_fn_that_cannot_take_three_arguments_is_refused_when_built():
    """avg_fn(avg, w) was accepted and raised Python's bare TypeError at the first SWA epoch's average, the run's state
    lost; its signature is checked at build now (one Python cannot read is left to the call)."""
    with pytest.raises(TypeError, match=r"with_swa: avg_fn must be callable as avg_fn\(averaged, param, n_averaged\); "
                                        r".*<lambda>\(avg, w\) cannot"):
        loopkit.with_swa(loopkit.train_step(_mse), 0.1, swa_epoch_start=1, avg_fn=lambda avg, w: avg)
    for fine in (lambda avg, w, n: avg, lambda *args: args[0], torch.lerp):
        loopkit.with_swa(loopkit.train_step(_mse), 0.1, swa_epoch_start=1, avg_fn=fine)


def test_an_avg_fns_own_error_leaves_the_state_the_epoch_started_from(data, take_snapshot, assert_trees_equal):
    """An avg_fn raising (not a ValueError) lost the run's state (state_at_error None), though the averages are new
    tensors and nothing had changed: the state the failing epoch started from is given back, the same as a run of the
    epochs before it, and a run on from it with a working avg_fn ends as the uninterrupted run."""
    def failing(averaged, param, n):
        raise RuntimeError("avg_fn failed")

    def step(avg_fn=None):
        return loopkit.with_swa(loopkit.train_step(_mse), 0.01, swa_epoch_start=1, avg_fn=avg_fn)  # SWA from epoch 0

    with pytest.raises(RuntimeError, match="avg_fn failed") as caught:  # (epoch 0's average copies, calling no avg_fn)
        loopkit.run_epochs(step(failing), _state("sgd"), data, epochs=3, progress=False)
    left = loopkit.state_at_error(caught.value)
    assert left is not None and (left.epoch, left.step) == (1, BATCHES)
    one, _ = loopkit.run_epochs(step(), _state("sgd"), data, epochs=1, progress=False)
    for part in ("params", "optimizer"):  # (its extras hold run_epochs' place in the run too)
        assert_trees_equal(take_snapshot(left)[part], take_snapshot(one)[part])
    assert_trees_equal(dict(left.extras["swa/params"]), dict(one.extras["swa/params"]))
    whole, _ = loopkit.run_epochs(step(), _state("sgd"), data, epochs=3, progress=False)
    resumed, _ = loopkit.run_epochs(step(), left, data, epochs=3, progress=False)
    assert_trees_equal(take_snapshot(resumed), take_snapshot(whole))
    assert_trees_equal(dict(resumed.extras["swa/params"]), dict(whole.extras["swa/params"]))


def test_the_rates_and_the_averaging_are_agreed_over_the_ranks():
    """A rank with other SWA rates, start or annealing updates its replica at other rates: run_epochs compared no option
    of with_swa. Each is now among those the ranks must share (swa_epoch_start as the 0-based epoch it names)."""
    base = loopkit.train_step(lambda m, b: m(b).sum())
    def agreed(**kw):
        return dict(loopkit.with_swa(base, **{"swa_lrs": 0.05, "swa_epoch_start": 2, **kw}).rank_agreed)

    assert agreed() == {"with_swa swa_lrs": (0.05,), "with_swa swa_start": 1, "with_swa swa_end": None,
                        "with_swa annealing_epochs": 10, "with_swa annealing_strategy": "cos", "with_swa avg_fn": None}
    for option, value in (("swa_lrs", 0.1), ("swa_epoch_start", 3), ("annealing_epochs", 2),
                          ("annealing_strategy", "linear")):
        assert agreed(**{option: value}) != agreed(), option
