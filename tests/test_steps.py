"""loopkit.steps: train_step and eval_step against a hand-written PyTorch loop; purity; donation; RNG."""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import warnings

import pytest
import torch
from torch import nn

import loopkit
from loopkit.steps import as_step

N_STEPS = 5


def _optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=0.01)


def _parts(kind: str, with_scheduler: bool, model: torch.nn.Module):
    opt = _optimizer(kind, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8) if with_scheduler else None
    return opt, sched


def _raw_loop(model, opt, sched, data, loss_fn, seed=None):
    """The reference: a plain PyTorch training loop (global RNG seeded once if ``seed`` is given)."""
    if seed is not None:
        torch.manual_seed(seed)
    losses = []
    for batch in data:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.detach())
    return losses


# --- equivalence with the raw loop --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("with_scheduler", [False, True], ids=["no_sched", "sched"])
def test_train_step_is_bitwise_the_raw_loop(kind, with_scheduler, make_mlp, make_batches, mse_loss, assert_trees_equal):
    data = make_batches(N_STEPS)
    ref_model = make_mlp(0)
    ref_opt, ref_sched = _parts(kind, with_scheduler, ref_model)
    ref_losses = _raw_loop(ref_model, ref_opt, ref_sched, data, mse_loss)

    model = make_mlp(0)
    state = loopkit.TrainState.create(model, *_parts(kind, with_scheduler, model))
    step = loopkit.train_step(mse_loss)
    losses = []
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])

    assert_trees_equal(dict(state.model.state_dict()), dict(ref_model.state_dict()))
    assert_trees_equal(state.optimizer.state_dict(), ref_opt.state_dict())
    assert_trees_equal(losses, ref_losses)
    assert state.step == N_STEPS and state.batch_index == N_STEPS
    if with_scheduler:
        assert state.scheduler.last_epoch == ref_sched.last_epoch == N_STEPS
        assert state.scheduler.get_last_lr() == ref_sched.get_last_lr()
        assert state.optimizer.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("with_scheduler", [False, True], ids=["no_sched", "sched"])
def test_run_epochs_is_bitwise_the_raw_loop(kind, with_scheduler, make_mlp, make_batches, mse_loss, assert_trees_equal):
    data = make_batches(3)
    epochs = 2
    ref_model = make_mlp(0)
    ref_opt, ref_sched = _parts(kind, with_scheduler, ref_model)
    _raw_loop(ref_model, ref_opt, ref_sched, data * epochs, mse_loss)

    model = make_mlp(0)
    state = loopkit.TrainState.create(model, *_parts(kind, with_scheduler, model))
    state, history = loopkit.run_epochs(
        loopkit.train_step(mse_loss), state, data, epochs=epochs, progress=False, sanity_val_batches=0
    )
    assert_trees_equal(dict(state.model.state_dict()), dict(ref_model.state_dict()))
    assert_trees_equal(state.optimizer.state_dict(), ref_opt.state_dict())
    assert (state.step, state.epoch, len(history)) == (3 * epochs, epochs, epochs)
    if with_scheduler:
        assert state.scheduler.last_epoch == 3 * epochs
        assert state.scheduler.get_last_lr() == ref_sched.get_last_lr()


@pytest.mark.parametrize("via", ["step", "run_epochs"])
def test_dropout_and_batchnorm_match_a_raw_loop_seeded_once(via, make_bn_dropout, make_batches, mse_loss, assert_trees_equal):
    """The state's RNG is a CPU generator seeded with ``seed``: the raw loop's ``torch.manual_seed(seed)``."""
    seed = 11
    data = make_batches(4)
    ref_model = make_bn_dropout(0)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.01)
    ref_losses = _raw_loop(ref_model, ref_opt, None, data, mse_loss, seed=seed)

    model = make_bn_dropout(0)
    state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.01), seed=seed)
    step = loopkit.train_step(mse_loss)
    if via == "step":
        losses = []
        for batch in data:
            state, metrics = step(state, batch)
            losses.append(metrics["loss"])
        assert_trees_equal(losses, ref_losses)
    else:
        state, _ = loopkit.run_epochs(step, state, data, epochs=1, progress=False, sanity_val_batches=0)
    # BatchNorm running stats and num_batches_tracked included
    assert_trees_equal(dict(state.model.state_dict()), dict(ref_model.state_dict()))
    assert_trees_equal(state.optimizer.state_dict(), ref_opt.state_dict())
    assert int(state.model[1].num_batches_tracked) == 4


def test_metrics_are_the_loss_and_aux_metrics_as_0dim_tensors(make_mlp, batches, make_sgd_state):
    def loss_fn(model, batch):
        x, y = batch
        err = model(x) - y
        return (err**2).mean(), {"mae": err.abs().mean(), "count": 8}

    model = make_mlp(0)
    ref = make_mlp(0)
    x, y = batches[0]
    expected_mae = (ref(x) - y).abs().mean().detach()
    _, metrics = loopkit.train_step(loss_fn)(make_sgd_state(model), batches[0])
    assert sorted(metrics) == ["count", "loss", "mae"]
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in metrics.values())
    assert torch.equal(metrics["mae"], expected_mae)
    assert torch.equal(metrics["loss"], ((ref(x) - y) ** 2).mean().detach())
    assert float(metrics["count"]) == 8.0


class _Scaled(nn.Module):
    """``x * scale``, counting its calls in a buffer changed in place (as BatchNorm's running statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(()))
        nn.init.ones_(self.scale)  # (initialised in place, as torch's layers' are: check_metric's documented gap aside)
        self.register_buffer("calls", torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1.0)
        return x * self.scale


def _reporting_the_state(model, batch):
    """A loss_fn whose aux metrics are the state's own tensors: a parameter, a view of one, one detached, a buffer."""
    loss = model(batch).pow(2).mean()
    return loss, {"scale": model.scale, "view": model.scale.view(1)[0], "detached": model.scale.detach(),
                  "calls": model.calls}


def test_aux_metrics_that_are_the_states_tensors_keep_the_values_the_loss_fn_saw():
    """By hand: loss = scale**2 on ones, so SGD(lr=0.1) makes scale 0.8 * scale each step; the buffer counts the
    calls. Lightning's self.log("scale", self.scale) logs the epoch's mean of the values its training_step saw.
    Before: a metric shared the parameter's storage, reporting it after the update (0.8, not 1.0), and under
    run_epochs every step's metric was the live tensor: the history held the last value for each step."""
    seen = [0.8**k for k in range(4)]  # the scale each loss_fn call saw
    model = _Scaled()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    # (donated: a forked state's tensors are fresh copies, which check_metric's documented gap does not copy detached)
    new, metrics = loopkit.donate(loopkit.train_step(_reporting_the_state))(state, torch.ones(4))
    assert float(new.model.scale.detach()) == pytest.approx(0.8)
    assert {k: float(v) for k, v in metrics.items()} == pytest.approx(
        {"loss": 1.0, "scale": 1.0, "view": 1.0, "detached": 1.0, "calls": 1.0})
    assert all(not v.requires_grad for v in metrics.values())

    model = _Scaled()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _, history = loopkit.run_epochs(loopkit.train_step(_reporting_the_state), state, [torch.ones(4)] * 4, epochs=1,
                                    progress=False, sanity_val_batches=0)
    mean = sum(seen) / 4
    assert {k: history[0][f"train/{k}"] for k in ("scale", "view", "detached", "calls")} == pytest.approx(
        {"scale": mean, "view": mean, "detached": mean, "calls": 2.5}, rel=1e-6)


def test_metrics_of_a_function_step_that_are_the_states_tensors_keep_their_values():
    """A function used as a step reporting its new state's parameter, which the next (donated) update changes in
    place: each step's value, as by hand (0.8 ** k after the k-th update). Before: the live parameter, its last
    value for every step."""
    inner = loopkit.donate(loopkit.train_step(lambda m, b: m(b).pow(2).mean()))

    def step_fn(state, batch):
        new, metrics = inner(state, batch)
        return new, {**metrics, "scale": new.model.scale.detach()}

    model = _Scaled()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _, history = loopkit.run_epochs(step_fn, state, [torch.ones(4)] * 4, epochs=1, progress=False,
                                    sanity_val_batches=0)
    assert history[0]["train/scale"] == pytest.approx(sum(0.8**k for k in range(1, 5)) / 4, rel=1e-6)


def test_fresh_metrics_are_taken_as_they_are_not_copied():
    """check_metric copied every leaf metric (loss.detach(), an accuracy under no_grad): an aten clone per metric
    per step, though none shares the state's storage. Reference: the very tensors the step returned (their
    data_ptr), one per metric, for a function step and a loss_fn's aux metrics."""
    returned = {}

    def step_fn(state, batch):
        loss = state.model(batch).pow(2).mean()
        with torch.no_grad():
            acc = (state.model(batch) > 0).float().mean()
        returned.update(loss=loss.detach(), acc=acc, double=loss.detach() * 2)
        return state, dict(returned)

    model = _Scaled()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _, metrics = as_step(step_fn)(state, torch.ones(4))
    assert {k: v.data_ptr() for k, v in metrics.items()} == {k: v.data_ptr() for k, v in returned.items()}

    def loss_fn(m, b):
        out = m(b)
        returned["acc"] = (out > 0).float().mean().detach()
        return out.pow(2).mean(), {"acc": returned["acc"]}

    _, metrics = loopkit.train_step(loss_fn)(state, torch.ones(4))
    assert metrics["acc"].data_ptr() == returned["acc"].data_ptr()


def test_a_function_steps_syncs_ranks_is_read_through_partials():
    """A step given as functools.partial(fn, ...) whose fn says syncs_ranks = True said False (only the partial's own
    attribute was read). Reference: the flag as set, on the function or on the partial itself."""
    def fn(state, batch, scale):
        return state, {}

    assert not as_step(functools.partial(fn, scale=1.0)).syncs_ranks
    fn.syncs_ranks = True
    assert as_step(functools.partial(fn, scale=1.0)).syncs_ranks
    bound = functools.partial(lambda state, batch, scale: (state, {}), scale=1.0)
    bound.syncs_ranks = True
    assert as_step(bound).syncs_ranks


def test_a_function_step_given_as_a_partial_is_named_by_its_function():
    """A step given as functools.partial(my_step, ...) was named "partial" (the partial's class), in run_epochs'
    warning of ranks apart and wherever ``applied`` names it. Reference: the function's own name, as a plain step's."""
    def my_step(state, batch, scale=1.0):
        return state, {}

    assert as_step(functools.partial(functools.partial(my_step, scale=1.0))).applied == as_step(my_step).applied
    assert as_step(my_step).applied == (my_step.__qualname__,)


def test_loss_fn_returning_none_skips_the_update(make_mlp, batches, make_sgd_state, take_snapshot, assert_trees_equal):
    state = make_sgd_state(make_mlp(0))
    before = take_snapshot(state)
    new, metrics = loopkit.train_step(lambda model, batch: None)(state, batches[0])
    assert metrics == {}
    assert new.step == 0 and new.batch_index == 1
    assert_trees_equal(take_snapshot(new)["params"], before["params"])
    assert_trees_equal(take_snapshot(new)["optimizer"], before["optimizer"])


def test_scheduler_steps_once_per_optimizer_update(make_mlp, batches, make_adam_state):
    state = make_adam_state(make_mlp(0), scheduler=True)
    step = loopkit.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    lrs = []
    for k, batch in enumerate(batches[:3], start=1):
        state, _ = step(state, batch)
        assert state.scheduler.last_epoch == k == state.step
        lrs.append(state.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.01 * 0.9, 0.01 * 0.9**2, 0.01 * 0.9**3])


_STALE_PATHS = {  # name: (wrap, micro-batches per update, clip)
    "plain": (lambda s: s, 1, False),
    "clip": (lambda s: loopkit.with_grad_clip(s, max_norm=0.5), 1, True),
    "accum": (lambda s: loopkit.with_grad_accum(s, every=2), 2, False),
    "clip, accum inside": (lambda s: loopkit.with_grad_clip(loopkit.with_grad_accum(s, every=2), max_norm=0.5), 2, True),
}


def _raw_update(model, opt, micro, loss_fn, clip):
    """A raw loop's update: zero_grad first, each micro-batch's loss / n backward, the clip, the step."""
    opt.zero_grad()
    for batch in micro:
        (loss_fn(model, batch) / len(micro)).backward()
    if clip:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 0.5)
    opt.step()


@pytest.mark.parametrize("donated", [False, True])
@pytest.mark.parametrize("path", list(_STALE_PATHS))
def test_gradients_left_on_the_parameters_between_updates_are_not_added_into_the_next(
    path, donated, make_mlp, batches, mse_loss, assert_trees_equal
):
    """A loss.backward() of one's own between updates (an input-saliency map) left gradients on the parameters,
    and the next train_step added them into its update (it zeroed only after): a raw loop zeroes before the
    backward, as Lightning does. Reference: that raw loop, bitwise; the gradients found are dropped at an update's
    first micro-batch only (inside a group the parameters hold the group's sum)."""
    wrap, every, clip = _STALE_PATHS[path]
    x_saliency = batches[5][0].clone().requires_grad_()

    def saliency(model):
        mse_loss(model, (x_saliency, batches[5][1])).backward()

    raw = make_mlp(0)
    raw_opt = torch.optim.SGD(raw.parameters(), lr=0.1, momentum=0.9)
    step = wrap(loopkit.train_step(mse_loss))
    step = loopkit.donate(step) if donated else step
    state = loopkit.TrainState.create(model := make_mlp(0), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    saliency(raw)
    saliency(state.model)  # (before the first update too: TrainState.create was given none)
    for start in range(0, 4, every):
        micro = batches[start:start + every]
        _raw_update(raw, raw_opt, micro, mse_loss, clip)
        saliency(raw)
        for batch in micro:
            state, _ = step(state, batch)
        saliency(state.model)
    assert state.step == 4 // every
    assert_trees_equal(dict(state.model.named_parameters()), dict(raw.named_parameters()))


@pytest.mark.parametrize("path", list(_STALE_PATHS))
def test_two_states_with_optimizers_over_two_parts_of_one_model_alternated_train_as_a_raw_loop(
    path, make_mlp, batches, mse_loss, assert_trees_equal
):
    """Two donated states over one model, each with an optimizer of its own part (encoder, head), alternated: each
    one's backward also wrote the other part's gradients, which the other state's next update added into its own.
    Reference: a raw loop zeroing each optimizer before its backward, bitwise."""
    wrap, every, clip = _STALE_PATHS[path]

    def parts():
        model = make_mlp(0)
        return model, torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.SGD(model[2].parameters(), lr=0.1)

    raw, raw_a, raw_b = parts()
    model, a, b = parts()
    states = [loopkit.TrainState.create(model, a), loopkit.TrainState.create(model, b)]
    step = loopkit.donate(wrap(loopkit.train_step(mse_loss)))
    for start in range(0, 6, every):
        micro = batches[start:start + every]
        for k, opt in enumerate((raw_a, raw_b)):
            _raw_update(raw, opt, micro, mse_loss, clip)
            for batch in micro:
                states[k], _ = step(states[k], batch)
    assert_trees_equal(dict(model.named_parameters()), dict(raw.named_parameters()))



def test_metrics_made_under_inference_mode_are_taken_as_a_raw_loop_computes_them(make_mlp, batches, mse_loss,
                                                                               make_sgd_state):
    """Inference tensors keep no version counter: the metric check read it and raised torch's 'Inference tensors do
    not track version counter' for eval_step and evaluate called inside the user's torch.inference_mode() (a raw
    eval loop works there) and for a loss_fn's accuracy computed under inference_mode. Reference: the raw values;
    the train metric comes back a normal tensor (the copy is made outside inference mode)."""
    state = make_sgd_state(make_mlp(0))
    raw = copy.deepcopy(state.model).eval()
    metric_fn = lambda m, b: {"mse": mse_loss(m, b)}  # noqa: E731
    with torch.inference_mode():
        expected = [mse_loss(raw, batch) for batch in batches[:2]]
        _, metrics = loopkit.eval_step(metric_fn)(state, batches[0])
        means = loopkit.evaluate(loopkit.eval_step(metric_fn), state, batches[:2])
    assert torch.equal(metrics["mse"], expected[0])
    assert means["mse"] == pytest.approx(float((expected[0] + expected[1]) / 2))

    def loss_with_acc(m, b):
        out = m(b[0])
        with torch.inference_mode():
            acc = ((out > 0) == (b[1] > 0)).float().mean()
        return nn.functional.mse_loss(out, b[1]), {"acc": acc}

    out = raw.train()(batches[0][0])
    _, metrics = loopkit.train_step(loss_with_acc)(state, batches[0])
    assert torch.equal(metrics["acc"], ((out > 0) == (batches[0][1] > 0)).float().mean())
    assert not metrics["acc"].is_inference()


# --- purity ---------------------------------------------------------------------------------------


def _warm_state(make_bn_dropout, batches, mse_loss, make_adam_state):
    """A BatchNorm+Dropout model with Adam and a scheduler, two updates in (optimizer state exists)."""
    state = make_adam_state(make_bn_dropout(0), seed=5, scheduler=True)
    step = loopkit.train_step(mse_loss)
    for batch in batches[:2]:
        state, _ = step(state, batch)
    return state


def test_train_step_leaves_its_input_state_unchanged(make_bn_dropout, batches, mse_loss, make_adam_state, take_snapshot, assert_trees_equal):
    state = _warm_state(make_bn_dropout, batches, mse_loss, make_adam_state)
    before = take_snapshot(state)
    step = loopkit.train_step(mse_loss)
    new, _ = step(state, batches[2])
    after = take_snapshot(state)
    assert_trees_equal(after, before)
    # ...while the new state did move on: otherwise the comparison proves nothing
    moved = take_snapshot(new)
    assert not torch.equal(moved["params"]["0.weight"], before["params"]["0.weight"])
    assert not torch.equal(moved["buffers"]["1.running_mean"], before["buffers"]["1.running_mean"])
    assert int(moved["buffers"]["1.num_batches_tracked"]) == int(before["buffers"]["1.num_batches_tracked"]) + 1
    assert not torch.equal(moved["rng"]["cpu"], before["rng"]["cpu"])
    assert moved["scheduler"]["last_epoch"] == before["scheduler"]["last_epoch"] + 1
    assert moved["counters"] != before["counters"]


def test_same_state_and_batch_give_identical_results(make_bn_dropout, batches, mse_loss, make_adam_state, take_snapshot, assert_trees_equal):
    state = _warm_state(make_bn_dropout, batches, mse_loss, make_adam_state)
    step = loopkit.train_step(mse_loss)
    a, metrics_a = step(state, batches[2])
    torch.rand(100)  # the global RNG does not feed the step
    b, metrics_b = step(state, batches[2])
    assert_trees_equal(take_snapshot(a), take_snapshot(b))
    assert_trees_equal(metrics_a, metrics_b)


def test_eval_step_restores_every_modules_training_mode(make_bn_dropout, batches, make_sgd_state, take_snapshot, assert_trees_equal):
    model = make_bn_dropout(0)
    model.train()
    model[3].eval()  # the Dropout submodule individually in eval mode
    modes = [m.training for m in model.modules()]
    assert modes == [True, True, True, True, False, True]
    state = make_sgd_state(model)
    before = take_snapshot(state)
    seen = {}

    def metric_fn(m, batch):
        seen["modes"] = [sub.training for sub in m.modules()]
        seen["grad_enabled"] = torch.is_grad_enabled()
        out = m(batch[0])
        return {"mse": ((out - batch[1]) ** 2).mean()}

    same, metrics = loopkit.eval_step(metric_fn)(state, batches[0])
    assert same is state
    assert seen == {"modes": [False] * len(list(model.modules())), "grad_enabled": False}
    assert [m.training for m in model.modules()] == modes
    assert_trees_equal(take_snapshot(state), before)  # BatchNorm stats untouched: it ran in eval mode
    with torch.no_grad():
        model.eval()
        expected = ((model(batches[0][0]) - batches[0][1]) ** 2).mean()
    assert torch.equal(metrics["mse"], expected)


class _RunningNorm(nn.Module):
    """An input normaliser whose statistics a forward updates in any mode (as in RL), and a replaced buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            n = x.shape[0]
            self.mean += (x.mean(0) - self.mean) * n / (self.count + n)
            self.count += n
            self.calls = self.calls + 1  # a new tensor in the buffer's place
        return self.lin(x - self.mean)


def test_a_buffer_a_forward_writes_in_eval_mode_stays_written_as_in_a_plain_loop_and_check_purity_names_it(
    make_sgd_state, batches
):
    """eval_step copies nothing (a calibration pass writes observers' buffers on purpose): such a write stays, as
    in a raw evaluation, and check_purity finds it."""
    state = make_sgd_state(_RunningNorm())
    reference = copy.deepcopy(state.model).eval()
    with torch.no_grad():
        for batch in batches[:2]:
            reference(batch[0])
    step = loopkit.eval_step(lambda m, b: {"out": m(b[0]).mean()})
    for batch in batches[:2]:
        step(state, batch)
    assert torch.equal(state.model.mean, reference.mean) and float(state.model.count) == float(reference.count) > 0
    with pytest.raises(loopkit.ImpurityError, match="mean|count"):
        loopkit.check_purity(step, state, batches[0])


def test_eval_step_restores_training_mode_when_metric_fn_raises(make_bn_dropout, make_sgd_state, batches):
    model = make_bn_dropout(0)
    model[1].eval()
    state = make_sgd_state(model)

    def broken(m, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        loopkit.eval_step(broken)(state, batches[0])
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]


# --- donation -------------------------------------------------------------------------------------


def test_donated_state_cannot_be_used_again(make_mlp, batches, mse_loss, make_sgd_state):
    state = make_sgd_state(make_mlp(0))
    step = loopkit.donate(loopkit.train_step(mse_loss))
    new, _ = step(state, batches[0])
    with pytest.raises(loopkit.DonatedStateError, match="donated"):
        step(state, batches[1])
    with pytest.raises(loopkit.DonatedStateError):
        loopkit.train_step(mse_loss)(state, batches[1])
    with pytest.raises(loopkit.DonatedStateError):
        state.evolve(step=3)
    with pytest.raises(loopkit.DonatedStateError):
        state.state_dict()
    with pytest.raises(loopkit.DonatedStateError):
        state.load_state_dict(new.state_dict())
    new2, _ = step(new, batches[1])  # the returned state is the one to use
    assert new2.step == 2


def _step_paths(loss_fn):
    """The plain CPU step's own call path, the general path (a transform) and a wrapper."""
    plain = loopkit.train_step(loss_fn)
    return {
        "plain": plain,
        "clip": loopkit.with_grad_clip(plain, max_norm=1.0),
        "accum": loopkit.with_grad_accum(plain, every=2),
        "logging": loopkit.with_logging(plain, loopkit.ConsoleLogger(), every_n_steps=5),
    }


def _draws_then(fail):
    def loss_fn(m, b):
        torch.rand(3)  # draws from the step's RNG before failing
        return fail(m, b)

    return loss_fn


def _raise_boom(m, b):
    m(b[0])  # a forward first
    raise RuntimeError("boom")


_FAILS_BEFORE_BACKWARD = {  # the loss_fn's own exception, and each loss loopkit refuses
    "loss_fn raises": (_raise_boom, RuntimeError, "boom"),
    "non-scalar loss": (lambda m, b: (m(b[0]) - b[1]) ** 2, ValueError, "scalar"),
    "loss without grad": (lambda m, b: ((m(b[0]) - b[1]) ** 2).mean().detach(), ValueError, "without a gradient"),
    # the natural "fix" of the error above: a leaf whose backward reaches no parameter (it trained nothing)
    "leaf loss": (lambda m, b: torch.tensor(((m(b[0]) - b[1]) ** 2).mean().item(), requires_grad=True), ValueError,
                  "a leaf tensor"),
    "complex loss": (lambda m, b: ((m(b[0]) - b[1]) ** 2).mean() * (1 + 1j), ValueError, "a complex loss"),
    "bad aux metric": (lambda m, b: (((m(b[0]) - b[1]) ** 2).mean(), {"acc": "high"}), TypeError, "'acc'"),
}


@pytest.mark.parametrize("path", ["plain", "clip", "accum", "logging"])
@pytest.mark.parametrize("failure", list(_FAILS_BEFORE_BACKWARD))
def test_a_donated_step_that_fails_before_its_backward_leaves_its_state_usable_and_as_it_was(
    path, failure, make_mlp, batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """Bad input gets its error before anything is lost: nothing of the state changed in place
    before the backward, so the donated state stays usable, and training it then gives what an
    untouched state gives (bitwise), its RNG included (the failed call drew from it)."""
    fail, error, match = _FAILS_BEFORE_BACKWARD[failure]
    state, untouched = make_sgd_state(make_mlp(0)), make_sgd_state(make_mlp(0))
    if path == "accum":  # mid-group: the first micro-batch's gradients are in place already
        state, _ = loopkit.donate(_step_paths(mse_loss)[path])(state, batches[1])
        untouched, _ = loopkit.donate(_step_paths(mse_loss)[path])(untouched, batches[1])
    global_rng = torch.get_rng_state()
    with pytest.raises(error, match=match):
        loopkit.donate(_step_paths(_draws_then(fail))[path])(state, batches[0])
    assert torch.equal(torch.get_rng_state(), global_rng)
    state.check_usable()
    good = loopkit.donate(_step_paths(mse_loss)[path])
    (new, metrics), (reference, expected) = good(state, batches[0]), good(untouched, batches[0])
    assert_trees_equal(take_snapshot(new), take_snapshot(reference))
    assert torch.equal(metrics["loss"], expected["loss"])


def test_a_scalar_parameter_returned_as_the_loss_is_a_loss(make_sgd_state):
    """A leaf loss is refused, but a parameter is a leaf that the backward reaches: it trains as in a raw loop."""
    model = nn.Module()
    model.t = nn.Parameter(torch.tensor(2.0))
    state = make_sgd_state(model, momentum=0.0)
    state, metrics = loopkit.train_step(lambda m, b: m.t)(state, None)
    raw = torch.tensor(2.0).add(torch.tensor(1.0), alpha=-0.1)  # SGD's update with the gradient 1
    assert torch.equal(state.model.t.detach(), raw) and float(metrics["loss"]) == 2.0


def _fail_in_backward(grad):
    raise RuntimeError("backward boom")


def _nan_in_backward(fail):
    """A loss whose forward is finite (its value is mse's) and whose backward makes a NaN: sqrt(0)'s gradient is
    inf, times the 0 it came through. Under torch.autograd.detect_anomaly() that backward raises."""

    def loss_fn(m, b):
        weight = next(m.parameters())
        return fail(m, b) + (weight.sum() * 0).sqrt()

    return loss_fn


def _backward_paths(loss_fn):
    """Each path of train_step that runs a backward in one process: _step_paths' and the loss scaler's, the
    per-micro-batch accumulation's (a gradient transform inside) and a raising guard's (it holds the gradients)."""
    plain = loopkit.train_step(loss_fn)
    return {
        **_step_paths(loss_fn),
        "accum, clip inside": loopkit.with_grad_accum(loopkit.with_grad_clip(plain, max_norm=1.0), every=2),
        "amp float16": loopkit.with_amp(plain, dtype=torch.float16),
        "accum, amp float16": loopkit.with_grad_accum(loopkit.with_amp(plain, dtype=torch.float16), every=2),
        "nan guard raise": loopkit.with_nan_guard(plain, policy="raise"),
    }


@contextlib.contextmanager
def _failing_backward(kind, model):
    """The backward of the calls inside fails: a raising hook on the first parameter (the last gradient the backward
    reaches: the others are written by then), or anomaly mode finding the NaN that _nan_in_backward's loss makes."""
    if kind == "hook":
        handle = next(model.parameters()).register_hook(_fail_in_backward)
        try:
            yield "backward boom"
        finally:
            handle.remove()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anomaly mode's own warnings, and the traceback of the forward it prints
            with torch.autograd.detect_anomaly():
                yield "returned nan values"


@pytest.mark.parametrize("kind", ["hook", "anomaly"])
@pytest.mark.parametrize("path", list(_backward_paths(lambda m, b: None)))
def test_a_donated_step_that_fails_in_its_backward_leaves_its_state_usable_and_as_it_was(
    path, kind, make_mlp, batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """The backward changes nothing of the state but the gradients, which the step gives back as the call found
    them (none; or, half-way through a with_grad_accum group whose inner transform sets the group's sum apart,
    that sum, bitwise): the donated state stays usable and is state_at_error's, equal to an untouched twin (RNG
    included: the failed call drew from it), and training it on gives what the twin gives. (It was used up.)
    A plain accumulation's backward past the group's first adds into the sum in place, as a raw loop does (no
    second set of gradients held): there the error uses the state up."""
    state, untouched = make_sgd_state(make_mlp(0)), make_sgd_state(make_mlp(0))
    if path.startswith("accum"):  # the failing call is the group's second: the first one's gradients are held
        first = loopkit.donate(_backward_paths(mse_loss)[path])
        (state, _), (untouched, _) = first(state, batches[1]), first(untouched, batches[1])
    bad = _draws_then(mse_loss if kind == "hook" else _nan_in_backward(mse_loss))
    global_rng = torch.get_rng_state()
    with _failing_backward(kind, state.model) as match, pytest.raises(RuntimeError, match=match) as info:
        loopkit.donate(_backward_paths(bad)[path])(state, batches[0])
    assert torch.equal(torch.get_rng_state(), global_rng)
    if path in ("accum", "accum, amp float16"):  # added into the group's sum in place
        assert loopkit.state_at_error(info.value) is None
        with pytest.raises(loopkit.DonatedStateError):
            state.check_usable()
        return
    _assert_left_as_untouched_and_trains_on(info.value, state, untouched, _backward_paths(mse_loss)[path], batches[0],
                                            take_snapshot, assert_trees_equal)


def _assert_left_as_untouched_and_trains_on(error, state, untouched, good, batch, take_snapshot, assert_trees_equal):
    """``error`` left ``state`` usable and as its ``untouched`` twin, and the ``good`` step trains both alike."""
    assert loopkit.state_at_error(error) is state
    state.check_usable()
    assert_trees_equal(take_snapshot(state), take_snapshot(untouched))
    (new, metrics), (reference, expected) = loopkit.donate(good)(state, batch), loopkit.donate(good)(untouched, batch)
    assert_trees_equal(take_snapshot(new), take_snapshot(reference))
    assert torch.equal(metrics["loss"], expected["loss"])


@pytest.mark.parametrize("path", ["plain", "clip", "accum"])
def test_gradients_found_and_dropped_are_given_back_after_an_error_in_the_backward(
    path, make_mlp, batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """The gradients an update's first backward drops (left there by a backward of one's own) are those a failing
    backward gives back, the same tensors with their values: the donated state is as its untouched twin, usable,
    and trains on as it does (from none: dropped again)."""
    state, untouched = make_sgd_state(make_mlp(0)), make_sgd_state(make_mlp(0))
    for s in (state, untouched):
        mse_loss(s.model, batches[5]).backward()  # (a gradient of one's own)
    found = [p.grad for p in state.model.parameters()]
    with _failing_backward("hook", state.model) as match, pytest.raises(RuntimeError, match=match) as info:
        loopkit.donate(_step_paths(mse_loss)[path])(state, batches[0])
    assert all(p.grad is g for p, g in zip(state.model.parameters(), found))
    _assert_left_as_untouched_and_trains_on(info.value, state, untouched, _step_paths(mse_loss)[path], batches[0],
                                            take_snapshot, assert_trees_equal)


@pytest.mark.parametrize("path", ["plain", "accum", "amp float16", "accum, amp float16"])
def test_a_step_called_under_no_grad_whose_loss_fn_enables_grad_trains_as_one_called_outside(
    path, make_mlp, batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """A loss_fn that turns grad on itself (torch.enable_grad() inside), called in the caller's torch.no_grad(),
    returns a loss with a graph: the plain step trained, but with_grad_accum's loss / n and with_amp(float16)'s
    loss * scale ran under the caller's no_grad, and the backward died with torch's bare 'element 0 of tensors does
    not require grad'. Reference: the same step called outside no_grad, bitwise."""
    def enabling(m, b):
        with torch.enable_grad():
            return mse_loss(m, b)

    step = loopkit.donate(_backward_paths(enabling)[path])
    state, reference = make_sgd_state(make_mlp(0)), make_sgd_state(make_mlp(0))
    for batch in batches[:4]:
        with torch.no_grad():
            state, metrics = step(state, batch)
        reference, expected = step(reference, batch)
        assert torch.equal(metrics["loss"], expected["loss"])
    assert state.step == reference.step > 0
    assert_trees_equal(take_snapshot(state), take_snapshot(reference))


@pytest.mark.parametrize("path", ["plain", "clip", "accum"])
def test_a_loss_fn_calling_backward_itself_is_told_so_leaving_the_state_as_it_was(
    path, make_mlp, batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """A loss_fn that runs loss.backward() itself (Lightning's manual optimization) met torch's 'backward through the
    graph a second time ... Specify retain_graph=True' (which would add the gradient twice), naming no loss_fn; and
    the plain donated step used its state up (it recorded the gradients to give back after the loss_fn's backward)
    where the general path left it usable. Now both name the loss_fn and give back the gradients as found: the
    state is as an untouched twin and trains on as it does; pure, the given state is as it was."""
    def backward_itself(m, b):
        loss = mse_loss(m, b)
        loss.backward()
        return loss

    state, untouched = make_sgd_state(make_mlp(0)), make_sgd_state(make_mlp(0))
    told = "loss_fn test_a_loss_fn_calling_backward_itself.*<locals>.backward_itself: .* call loss.backward"
    with pytest.raises(RuntimeError, match=told) as info:
        loopkit.donate(_step_paths(backward_itself)[path])(state, batches[0])
    _assert_left_as_untouched_and_trains_on(info.value, state, untouched, _step_paths(mse_loss)[path], batches[0],
                                            take_snapshot, assert_trees_equal)
    given = make_sgd_state(make_mlp(1))
    before = take_snapshot(given)
    with pytest.raises(RuntimeError, match=told):
        _step_paths(backward_itself)[path](given, batches[1])
    assert_trees_equal(take_snapshot(given), before)


_UNREACHED = ("its backward reached none of the optimizer's parameters, nor any of the model's: does it use the model it "
              "is given")


@pytest.mark.parametrize("path", list(_backward_paths(lambda m, b: None)))
def test_a_loss_that_reaches_none_of_the_optimizers_parameters_is_refused_leaving_the_state_as_it_was(
    path, make_mlp, batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """A loss_fn using the model it closes over, not the one it is given (a slip porting self(x)), trained nothing:
    the update was taken as normal (state.step counting, the loss flat, no error). It is refused after the backward,
    naming the loss_fn: donated, the state is state_at_error's, usable and as an untouched twin, and trains on as it;
    a pure call leaves the given state as it was, though the slip's backward wrote its model's gradients."""
    state, untouched = make_sgd_state(make_mlp(0)), make_sgd_state(make_mlp(0))
    foreign = make_mlp(1)
    elsewhere = _draws_then(lambda m, b: mse_loss(foreign, b))
    global_rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=f"loss_fn _draws_then.<locals>.loss_fn: {_UNREACHED}") as info:
        loopkit.donate(_backward_paths(elsewhere)[path])(state, batches[0])
    assert torch.equal(torch.get_rng_state(), global_rng)
    _assert_left_as_untouched_and_trains_on(info.value, state, untouched, _backward_paths(mse_loss)[path], batches[0],
                                            take_snapshot, assert_trees_equal)

    given = make_sgd_state(make_mlp(2))
    before = take_snapshot(given)
    closing_over_the_given_model = _backward_paths(lambda m, b: mse_loss(given.model, b))[path]
    with pytest.raises(ValueError, match=_UNREACHED):
        closing_over_the_given_model(given, batches[1])  # (pure: a copy trains; given.model's weights got grads)
    assert_trees_equal(take_snapshot(given), before)


@pytest.mark.parametrize("donated", [False, True])
def test_a_micro_step_reaching_nothing_inside_a_group_whose_sum_is_set_apart_is_refused_giving_the_sum_back(
    donated, make_mlp, batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """A gradient transform inside the accumulation sets the group's sum apart at each micro-step's backward (which
    so finds no gradients): a later micro-step reaching none of the optimizer's parameters is refused, the sum given
    back, and the group goes on as its untouched twin. Pure, the loss_fn closes over the given state's model: its
    backward added into the given state's sum in place, which is given back too. (A plain accumulation adds into the
    sum in place: only the group's first micro-step finds no gradients to tell by; see the test above.)"""
    foreign = make_mlp(1)

    def build(loss_fn):
        step = loopkit.with_grad_accum(loopkit.with_grad_clip(loopkit.train_step(loss_fn), max_norm=1.0), every=3)
        return loopkit.donate(step) if donated else step

    state, _ = build(mse_loss)(make_sgd_state(make_mlp(0)), batches[0])
    untouched, _ = build(mse_loss)(make_sgd_state(make_mlp(0)), batches[0])
    before = take_snapshot(state)
    with pytest.raises(ValueError, match=_UNREACHED) as info:
        build(lambda m, b: mse_loss(foreign if donated else state.model, b))(state, batches[1])
    assert loopkit.state_at_error(info.value) is state or not donated
    state.check_usable()
    assert_trees_equal(take_snapshot(state), before)
    for batch in batches[1:3]:
        (state, metrics), (untouched, expected) = build(mse_loss)(state, batch), build(mse_loss)(untouched, batch)
        assert torch.equal(metrics["loss"], expected["loss"])
    assert state.step == untouched.step == 1
    assert_trees_equal(take_snapshot(state), take_snapshot(untouched))


class _TwoHeads(nn.Module):
    """A model whose loss may reach one head only; its first parameter may be frozen (left in the optimizer)."""

    def __init__(self, frozen_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.unused, self.used = nn.Linear(4, 2), nn.Linear(4, 2)
        self.unused.weight.requires_grad_(not frozen_first)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("frozen_first", [False, True])
@pytest.mark.parametrize("path", ["plain", "clip", "accum", "plain, pure"])
def test_a_loss_that_reaches_some_of_the_optimizers_parameters_trains_as_a_raw_loop(
    path, frozen_first, batches, mse_loss, assert_trees_equal
):
    """Legal, and not refused: a loss that reaches part of the optimizer's parameters (the first one among those it
    does not reach, or frozen). Reference: a raw loop over the same model and optimizer."""
    model, reference = _TwoHeads(frozen_first), _TwoHeads(frozen_first)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    raw = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    step = _step_paths(mse_loss)[path.split(",")[0]]
    state = loopkit.TrainState.create(model, optimizer)
    step = step if path.endswith("pure") else loopkit.donate(step)
    every = 2 if path == "accum" else 1
    for i, batch in enumerate(batches):
        state, metrics = step(state, batch)
        loss = mse_loss(reference, batch)
        assert torch.equal(metrics["loss"], loss.detach())
        (loss / every if every > 1 else loss).backward()
        if (i + 1) % every == 0:
            if path == "clip":
                torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.grad is not None], 1.0)
            raw.step()
            raw.zero_grad(set_to_none=True)
    assert state.step == (len(batches) // 2 if path == "accum" else len(batches))
    assert_trees_equal(dict(state.model.named_parameters()), dict(reference.named_parameters()))
    assert state.model.unused.weight.grad is None and torch.equal(state.model.unused.weight, reference.unused.weight)


@pytest.mark.parametrize("path", ["plain", "clip", "accum", "plain, pure"])
def test_a_frozen_first_parameter_skips_the_scan_for_an_unreached_loss(path, batches, mse_loss, monkeypatch):
    """A frozen backbone first in the optimizer's parameters (fine-tuning) leaves the first parameter without a
    gradient at every step: the check is skipped there, so no step scans the frozen parameters, while a trainable
    first parameter the backward missed is still checked. Reference: a spy on the scan, counting its calls."""
    calls = []
    scan = loopkit.steps._refuse_unreached
    monkeypatch.setattr(loopkit.steps, "_refuse_unreached", lambda *a: calls.append(1) or scan(*a))
    for frozen_first, expected in [(True, 0), (False, 4)]:
        calls.clear()
        state = loopkit.TrainState.create(model := _TwoHeads(frozen_first), torch.optim.SGD(model.parameters(), lr=0.1))
        step = _step_paths(mse_loss)[path.split(",")[0]]
        step = step if path.endswith("pure") else loopkit.donate(step)
        for batch in batches[:4]:
            state, _ = step(state, batch)
        assert len(calls) == expected


@pytest.mark.parametrize("path", ["plain", "accum"])
def test_a_batch_routed_to_a_part_the_optimizer_does_not_train_is_not_refused(path, batches, mse_loss):
    """Its loss reaches the model's parameters, none of the optimizer's: an update of nothing, as a raw loop's (the
    state's own model reached: not a loss_fn using another one)."""
    model = _TwoHeads(frozen_first=False)
    optimizer = torch.optim.SGD(model.unused.parameters(), lr=0.1, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = loopkit.TrainState.create(model, optimizer)
    step = loopkit.donate(_step_paths(mse_loss)[path])
    for batch in batches[:4]:
        state, metrics = step(state, batch)
        assert torch.equal(metrics["loss"], mse_loss(model, batch).detach())
    assert state.step == (2 if path == "accum" else 4)
    assert all(torch.equal(p, before[n]) for n, p in state.model.named_parameters())


def _sgd_in_backward(param):
    with torch.no_grad():
        param.add_(param.grad, alpha=-0.1)
    param.grad = None


@pytest.mark.parametrize("path", ["plain", "clip"])
def test_an_optimizer_stepping_in_the_backward_leaving_no_gradient_is_not_refused(path, make_mlp, batches, mse_loss):
    """Post-accumulate-grad hooks that update each parameter in the backward and drop its gradient leave none: that
    is not a loss reaching nothing. Reference: a raw loop with the same hooks."""
    model, reference = make_mlp(0), make_mlp(0)
    for p in (*model.parameters(), *reference.parameters()):
        p.register_post_accumulate_grad_hook(_sgd_in_backward)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.donate(_step_paths(mse_loss)[path])
    for batch in batches:
        state, metrics = step(state, batch)
        loss = mse_loss(reference, batch)
        loss.backward()
        assert torch.equal(metrics["loss"], loss.detach())
    assert state.step == len(batches)
    assert all(torch.equal(p, q) for p, q in zip(state.model.parameters(), reference.parameters()))


def _moves_in_backward(param):
    with torch.no_grad():
        param.add_(1.0)


def test_a_backward_error_under_an_optimizer_stepping_in_the_backward_uses_the_state_up(
    make_mlp, batches, mse_loss, make_sgd_state
):
    """A post-accumulate-grad hook (an optimizer stepping in the backward) may have moved a parameter before the
    backward failed: giving the gradients back would not make the state whole, so it is used up."""
    state = make_sgd_state(make_mlp(0))
    params = list(state.model.parameters())
    params[-1].register_post_accumulate_grad_hook(_moves_in_backward)
    with _failing_backward("hook", state.model), pytest.raises(RuntimeError, match="backward boom") as info:
        loopkit.donate(loopkit.train_step(mse_loss))(state, batches[0])
    assert loopkit.state_at_error(info.value) is None
    with pytest.raises(loopkit.DonatedStateError):
        state.evolve(step=1)


def test_a_custom_step_that_raises_has_consumed_its_state_unless_it_says_otherwise(make_mlp, batches, make_sgd_state):
    """loopkit cannot know what a plain function changed before it raised; one that knows says so
    with leave_intact."""

    def changes_then_fails(state, batch):
        raise RuntimeError("custom")

    def fails_first(state, batch):
        raise loopkit.steps.leave_intact(RuntimeError("checked"), state)

    for fn, usable in ((changes_then_fails, False), (fails_first, True)):
        state = make_sgd_state(make_mlp(0))
        with pytest.raises(RuntimeError):
            loopkit.donate(fn)(state, batches[0])
        if usable:
            state.check_usable()
        else:  # (it returned no state: the error says so, not "use the state that step returned")
            with pytest.raises(loopkit.DonatedStateError, match=r"given to a donated step, which changed it in place "
                               r"and then raised, so it returned no state: go on from loopkit\.state_at_error\(error\) "
                               r".*None when .*fresh state.*loopkit\.restore\(<a new TrainState>, path\)"):
                state.check_usable()


def test_a_donated_eval_step_that_raises_leaves_its_state_usable(make_mlp, batches, make_sgd_state):
    state = make_sgd_state(make_mlp(0))
    with pytest.raises(TypeError, match="'acc'"):
        loopkit.donate(loopkit.eval_step(lambda m, b: {"acc": "high"}))(state, batches[0])
    state.check_usable()


def test_a_donated_step_refusing_an_unusable_optimizer_has_consumed_its_state(make_mlp, batches, mse_loss):
    """The plain step's own call path reads the optimizer before it runs: a failure there uses the state up,
    as every other path does."""
    for spoil, error in ((lambda opt: opt.param_groups.clear(), IndexError), (None, AttributeError)):
        model = make_mlp(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        state = loopkit.TrainState.create(model, opt)
        if spoil is None:
            state = loopkit.state.replace(state, optimizer=object())  # past create()'s checks
        else:
            spoil(opt)
        with pytest.raises(error):
            loopkit.donate(loopkit.train_step(mse_loss))(state, batches[0])
        with pytest.raises(loopkit.DonatedStateError):
            state.evolve(step=1)


def test_donate_reuses_the_storage(make_mlp, batches, mse_loss, make_adam_state):
    state = make_adam_state(make_mlp(0))
    params = list(state.model.parameters())
    data_ptrs = [p.data_ptr() for p in params]
    new, _ = loopkit.donate(loopkit.train_step(mse_loss))(state, batches[0])
    assert all(a is b for a, b in zip(new.model.parameters(), params, strict=True))
    assert [p.data_ptr() for p in new.model.parameters()] == data_ptrs
    assert new.optimizer is state.optimizer and new.model is state.model
    # a plain (undonated) step copies instead
    other, _ = loopkit.train_step(mse_loss)(new, batches[1])
    assert not any(a is b for a, b in zip(other.model.parameters(), params))


@pytest.mark.parametrize("transform", ["plain", "clip", "accum"])
def test_a_donated_step_keeps_the_gradient_accumulators_alive_as_a_loop_does(transform, monkeypatch, make_mlp, batches, mse_loss, make_sgd_state):
    """A loop's ``loss`` variable keeps its graph, and so each parameter's gradient accumulator,
    until the next forward; the new state keeps the step's loss so. A hook put on the accumulator
    between two calls (and held by nothing else) runs in the second call's backward only if that
    call reused the accumulator rather than making a new one."""

    def hook_runs_in_next_call(step) -> bool:
        state, _ = step(make_sgd_state(make_mlp(0)), batches[0])
        calls = []
        param = next(state.model.parameters())
        param.view_as(param).grad_fn.next_functions[0][0].register_hook(lambda *_: calls.append(1))
        state, _ = step(state, batches[1])
        return calls == [1]

    step = loopkit.train_step(mse_loss)
    if transform == "clip":
        step = loopkit.with_grad_clip(step, max_norm=1.0)
    elif transform == "accum":
        step = loopkit.with_grad_accum(step, every=2)
    assert hook_runs_in_next_call(loopkit.donate(step))
    # the reference: a raw loop whose loss dies with each iteration makes new accumulators
    monkeypatch.setattr(loopkit.steps, "keep_graph", lambda state, loss: state)
    assert not hook_runs_in_next_call(loopkit.donate(step))


# --- the step's RNG -----------------------------------------------------------------------------


def _dropout_run(seed, make_bn_dropout, batches, mse_loss, disturb):
    model = make_bn_dropout(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=seed)
    step = loopkit.train_step(mse_loss)
    masks = []

    def keep_mask(module, inputs, output):
        masks.append(output == 0)

    for batch in batches[:3]:
        handle = state.model[3].register_forward_hook(keep_mask)
        state, _ = step(state, batch)
        handle.remove()
        disturb()
    return state, masks


@pytest.mark.parametrize("donated", [False, True])
def test_plain_cpu_fast_path_equals_the_general_path(donated, monkeypatch, make_bn_dropout, batches, make_adam_state, take_snapshot, assert_trees_equal):
    """A plain step on the CPU takes a one-frame path; the general path (taken here because the
    state's RNG holds a second generator) must give bitwise the same states, metrics and RNG."""

    def loss_fn(model, batch):
        x, y = batch
        err = model(x) - y  # dropout draws, also on the skipped batch
        if x[0, 0] > 10:  # the marked batch is skipped
            return None
        return (err**2).mean(), {"mae": err.abs().mean()}

    data = [batches[0], (batches[1][0] + 100, batches[1][1]), batches[2], batches[3]]
    fast_calls = []
    original = loopkit.TrainStep._run_plain_cpu

    def counted(self, state, *args):
        fast_calls.append(len(state.rng))
        return original(self, state, *args)

    monkeypatch.setattr(loopkit.TrainStep, "_run_plain_cpu", counted)
    step = loopkit.train_step(loss_fn)
    step = loopkit.donate(step) if donated else step
    fast = make_adam_state(make_bn_dropout(0), seed=5, scheduler=True)
    general = make_adam_state(make_bn_dropout(0), seed=5, scheduler=True)
    general = general.evolve(rng={**general.rng, "spare": torch.zeros(1, dtype=torch.uint8)})
    for batch in data:
        fast, fast_metrics = step(fast, batch)
        general, general_metrics = step(general, batch)
        assert_trees_equal(fast_metrics, general_metrics)
    assert (fast.step, fast.batch_index) == (general.step, general.batch_index) == (3, 4)
    assert torch.equal(fast.rng["cpu"], general.rng["cpu"]) and "spare" in general.rng
    assert_trees_equal(take_snapshot(fast)["params"], take_snapshot(general)["params"])
    assert_trees_equal(take_snapshot(fast)["optimizer"], take_snapshot(general)["optimizer"])
    assert fast.scheduler.last_epoch == general.scheduler.last_epoch == 3
    assert fast_calls == [1] * len(data)  # the fast path ran for the one-generator state only


def test_dropout_masks_do_not_depend_on_the_global_rng(make_bn_dropout, batches, mse_loss, take_snapshot, assert_trees_equal):
    loader = torch.utils.data.DataLoader(torch.arange(10.0), batch_size=2, shuffle=True)

    def disturb():
        torch.rand(100)
        next(iter(loader))  # a shuffling DataLoader iterator draws from the global RNG

    torch.manual_seed(123)
    quiet_state, quiet_masks = _dropout_run(7, make_bn_dropout, batches, mse_loss, lambda: None)
    torch.manual_seed(456)
    noisy_state, noisy_masks = _dropout_run(7, make_bn_dropout, batches, mse_loss, disturb)
    assert any(m.any() for m in quiet_masks)  # dropout did drop something
    assert_trees_equal(noisy_masks, quiet_masks)
    assert_trees_equal(take_snapshot(noisy_state)["params"], take_snapshot(quiet_state)["params"])


def test_different_seeds_draw_different_dropout_masks(make_bn_dropout, batches, mse_loss):
    state_a, masks_a = _dropout_run(7, make_bn_dropout, batches, mse_loss, lambda: None)
    state_b, masks_b = _dropout_run(8, make_bn_dropout, batches, mse_loss, lambda: None)
    assert not all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    assert not torch.equal(state_a.model[0].weight, state_b.model[0].weight)


def test_step_restores_the_callers_global_rng(make_bn_dropout, batches, mse_loss, make_sgd_state):
    state = make_sgd_state(make_bn_dropout(0), seed=3)
    torch.manual_seed(99)
    expected = torch.rand(5)
    torch.manual_seed(99)
    loopkit.train_step(mse_loss)(state, batches[0])
    assert torch.equal(torch.rand(5), expected)


# --- bad input ------------------------------------------------------------------------------------


def _run(loss_fn, make_mlp, make_sgd_state, batch):
    return loopkit.train_step(loss_fn)(make_sgd_state(make_mlp(0)), batch)


def test_non_scalar_loss_is_refused(make_mlp, make_sgd_state, batches):
    def per_sample_loss(model, batch):
        return (model(batch[0]) - batch[1]) ** 2

    with pytest.raises(ValueError) as info:
        _run(per_sample_loss, make_mlp, make_sgd_state, batches[0])
    message = str(info.value)
    assert "per_sample_loss" in message and "shape (8, 2)" in message and "scalar" in message


@pytest.mark.parametrize("how", ["no_grad", "detached"])
def test_loss_without_gradient_is_refused(how, make_mlp, make_sgd_state, batches):
    def gradless_loss(model, batch):
        if how == "no_grad":
            with torch.no_grad():
                return ((model(batch[0]) - batch[1]) ** 2).mean()
        return ((model(batch[0]) - batch[1]) ** 2).mean().detach()

    with pytest.raises(ValueError) as info:
        _run(gradless_loss, make_mlp, make_sgd_state, batches[0])
    assert "gradless_loss" in str(info.value) and "without a gradient" in str(info.value)


@pytest.mark.parametrize(
    "value, fragment",
    [("high", "is a str"), (torch.ones(3), "shape (3,)"), (torch.ones(2, 2), "shape (2, 2)")],
    ids=["string", "vector", "matrix"],
)
def test_non_numeric_aux_metric_is_refused(value, fragment, make_mlp, make_sgd_state, batches):
    def loss_with_aux(model, batch):
        return ((model(batch[0]) - batch[1]) ** 2).mean(), {"quality": value}

    with pytest.raises(TypeError) as info:
        _run(loss_with_aux, make_mlp, make_sgd_state, batches[0])
    message = str(info.value)
    assert "'quality'" in message and "loss_with_aux" in message and fragment in message


def test_numpy_numbers_are_metrics_as_python_numbers_are(make_mlp, make_sgd_state, batches):
    """np.float32, np.int64 and 1-element arrays are numbers (np.float64 already was: it subclasses float);
    numpy's booleans and longer arrays are not."""
    import numpy as np

    state = make_sgd_state(make_mlp(0))
    values = {"f32": np.float32(0.25), "i64": np.int64(3), "array": np.array(0.5), "one": np.array([2.0]), "f64": np.float64(1.5)}
    _, metrics = loopkit.eval_step(lambda m, b: values)(state, batches[0])
    assert {k: v.item() for k, v in metrics.items()} == {k: float(v.reshape(())) for k, v in values.items()}
    assert all(v.dim() == 0 for v in metrics.values())
    for bad in (np.bool_(True), np.array([1.0, 2.0]), np.array("a")):
        with pytest.raises(TypeError, match="metric 'bad'"):
            loopkit.eval_step(lambda m, b, bad=bad: {"bad": bad})(state, batches[0])


def test_loss_fn_returning_a_non_tensor_is_refused(make_mlp, make_sgd_state, batches):
    def float_loss(model, batch):
        return 1.0

    with pytest.raises(TypeError, match="float_loss returned a float"):
        _run(float_loss, make_mlp, make_sgd_state, batches[0])


def test_loss_fn_returning_none_with_metrics_is_refused_saying_a_skip_is_none_alone(make_mlp, make_sgd_state, batches):
    """(None, metrics) is not a skip (as before); the message says the pair's loss is None and a skip is None alone.
    Before: "returned a NoneType; expected ..., or None to skip the batch", which it had returned, in a pair."""
    def skipping(model, batch):
        return None, {"skipped": 1}

    with pytest.raises(TypeError) as info:
        _run(skipping, make_mlp, make_sgd_state, batches[0])
    message = str(info.value)
    assert "skipping returned (loss, metrics_dict) whose loss is None" in message
    assert "return None alone" in message and "NoneType" not in message

    def float_in_pair(model, batch):
        return 1.0, {}

    with pytest.raises(TypeError, match=r"float_in_pair returned \(loss, metrics_dict\) whose loss is a float"):
        _run(float_in_pair, make_mlp, make_sgd_state, batches[0])


def test_non_numeric_eval_metric_is_refused(make_mlp, make_sgd_state, batches):
    def metric_fn(model, batch):
        return {"label": "cat"}

    with pytest.raises(TypeError, match="metric 'label' from metric_fn .*metric_fn is a str"):
        loopkit.eval_step(metric_fn)(make_sgd_state(make_mlp(0)), batches[0])


def test_train_step_needs_an_optimizer(make_mlp, mse_loss, batches):
    with pytest.raises(ValueError, match="needs a state with an optimizer"):
        loopkit.train_step(mse_loss)(loopkit.TrainState.create(make_mlp(0)), batches[0])


@pytest.mark.parametrize("case", ["no optimizer", "no parameters"])
@pytest.mark.parametrize("how", ["donated", "run_epochs"])
def test_a_missing_optimizer_leaves_the_given_state_usable(make_mlp, mse_loss, batches, case, how):
    # refused before anything changed: the state passed in stays usable, to be fixed with evolve
    model = make_mlp(0)
    optimizer = None if case == "no optimizer" else torch.optim.SGD([{"params": []}], lr=0.1)
    state = loopkit.TrainState.create(model, optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="optimizer"):
        if how == "donated":
            loopkit.donate(loopkit.train_step(mse_loss))(state, batches[0])
        else:
            loopkit.run_epochs(loopkit.train_step(mse_loss), state, batches, epochs=1, progress=False)
    state.check_usable()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fixed = state.evolve(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    new, _ = loopkit.donate(loopkit.train_step(mse_loss))(fixed, batches[0])
    assert new.step == 1


def test_steps_refuse_non_callables_and_non_states(mse_loss, batches):
    with pytest.raises(TypeError, match="train_step: loss_fn must be callable"):
        loopkit.train_step("mse")
    with pytest.raises(TypeError, match="eval_step: metric_fn must be callable"):
        loopkit.eval_step(3)
    with pytest.raises(TypeError, match="a step takes a loopkit.TrainState, got dict"):
        loopkit.train_step(mse_loss)({}, batches[0])


def test_failed_step_leaves_the_state_usable(make_mlp, make_sgd_state, batches, mse_loss, take_snapshot, assert_trees_equal):
    state = make_sgd_state(make_mlp(0))
    before = take_snapshot(state)
    torch.manual_seed(0)
    global_rng = torch.get_rng_state()

    def exploding(model, batch):
        torch.rand(3)
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        loopkit.train_step(exploding)(state, batches[0])
    assert torch.equal(torch.get_rng_state(), global_rng)
    assert_trees_equal(take_snapshot(state), before)
    new, _ = loopkit.train_step(mse_loss)(state, batches[0])
    assert new.step == 1


# --- optimizers whose step needs a closure (LBFGS) ---------------------------------------------------


def _lbfgs_net():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2)
        )  # BatchNorm: each forward updates its statistics, so a forward too many shows
    return model, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)


def _raw_closure_loop(model, opt, data, loss_fn) -> list[torch.Tensor]:
    """The reference: a hand-written loop handing the optimizer its closure; the losses step() returns."""
    losses = []
    for batch in data:
        def closure(batch=batch):
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            return loss

        losses.append(opt.step(closure))
    return losses


@pytest.mark.parametrize("how", ["donated", "pure", "run_epochs"])
def test_lbfgs_trains_as_a_raw_loop_that_hands_it_a_closure(how, batches, mse_loss):
    """As Lightning's automatic optimization does: the closure re-runs the loss_fn (dropout drawing
    from the state's RNG, as the raw loop's from the global one seeded alike), bitwise."""
    model, opt = _lbfgs_net()
    torch.manual_seed(7)
    raw_losses = _raw_closure_loop(model, opt, batches[:4], mse_loss)
    net, lbfgs = _lbfgs_net()
    state = loopkit.TrainState.create(net, lbfgs, seed=7)
    step = loopkit.train_step(mse_loss)
    losses = []
    if how == "run_epochs":
        state, _ = loopkit.run_epochs(step, state, batches[:4], epochs=1, progress=False,
                                      callbacks=[_LossRecorder(losses)])
    else:
        call = loopkit.donate(step) if how == "donated" else step
        for batch in batches[:4]:
            state, metrics = call(state, batch)
            losses.append(metrics["loss"])
    raw_sd, sd = model.state_dict(), state.model.state_dict()
    assert all(torch.equal(raw_sd[k], sd[k]) for k in raw_sd)  # parameters and BatchNorm statistics
    assert torch.equal(torch.stack(losses), torch.stack(raw_losses))  # the loss before each update
    assert state.step == 4


class _LossRecorder:
    def __init__(self, into):
        self.into = into

    def on_batch_end(self, state, metrics):
        self.into.append(metrics["loss"])


def test_a_closure_optimizer_under_a_gradient_transform_is_named(batches, mse_loss):
    """A closure would re-run the backward past the transform's work on the gradients: refused, by name."""
    net, lbfgs = _lbfgs_net()
    step = loopkit.with_grad_clip(loopkit.train_step(mse_loss), max_norm=1.0)
    with pytest.raises(TypeError, match="LBFGS.step\\(\\) needs a closure.*with_grad_clip"):
        step(loopkit.TrainState.create(net, lbfgs), batches[0])


def test_a_pure_lbfgs_call_leaves_the_given_state_as_it_was(batches, mse_loss, take_snapshot, assert_trees_equal):
    """LBFGS keeps its parameter list a second time (``_params``): a copy of the state must point it at the
    copy's parameters, or the pure call updates the given model in place."""
    net, lbfgs = _lbfgs_net()
    state = loopkit.train_step(mse_loss)(loopkit.TrainState.create(net, lbfgs), batches[0])[0]  # history in its state
    before = take_snapshot(state)
    first, _ = loopkit.train_step(mse_loss)(state, batches[1])
    assert_trees_equal(take_snapshot(state), before)
    again, _ = loopkit.train_step(mse_loss)(state, batches[1])
    assert_trees_equal(take_snapshot(again), take_snapshot(first))


class _ClosureSGD(torch.optim.SGD):
    """An optimizer of one's own whose step needs a closure (found out when its step() refuses)."""

    def step(self, closure):
        loss = closure()
        super().step()
        return loss


def test_another_closure_optimizer_is_handed_a_closure_too(make_mlp, batches, mse_loss):
    model = make_mlp(0)
    _raw_closure_loop(model, _ClosureSGD(model.parameters(), lr=0.1), batches[:3], mse_loss)
    mine = make_mlp(0)
    state = loopkit.TrainState.create(mine, _ClosureSGD(mine.parameters(), lr=0.1))
    step = loopkit.donate(loopkit.train_step(mse_loss))
    for batch in batches[:3]:
        state, _ = step(state, batch)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), state.model.parameters(), strict=True))
    assert state.step == 3


class _SAM(torch.optim.Optimizer):
    """A sharpness-aware optimizer: its step moves the parameters (the ascent) before it asks for the loss."""

    def __init__(self, params, lr=0.1, rho=0.5):
        super().__init__(params, {"lr": lr, "rho": rho})

    def step(self, closure):
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.state[p]["e"] = group["rho"] * p.grad / (p.grad.norm() + 1e-12)
                        p.add_(self.state[p]["e"])
        closure()
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.sub_(self.state[p]["e"]).sub_(group["lr"] * p.grad)


@pytest.mark.parametrize("fails_at", [1, 2])
def test_a_closure_optimizer_whose_loss_fails_is_intact_only_if_nothing_moved(make_mlp, batches, mse_loss, fails_at):
    """The loss_fn's call 1 (before any backward) leaves the state whole; call 2 comes after SAM's ascent moved
    the parameters in place, which state_at_error called intact."""
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) == fails_at:
            raise FloatingPointError("the loss check failed")
        return mse_loss(model, batch)

    model = make_mlp(0)
    state = loopkit.TrainState.create(model, _SAM(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError) as info:
        loopkit.donate(loopkit.train_step(loss_fn))(state, batches[0])
    moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert moved == (fails_at == 2)
    if moved:
        assert loopkit.state_at_error(info.value) is None
        with pytest.raises(loopkit.DonatedStateError):
            state.check_usable()
    else:
        assert loopkit.state_at_error(info.value) is state
        state.check_usable()


class _FailingOnCall:
    """A gradient hook that raises at its ``at``-th call (the ``at``-th backward that reaches its parameter)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, grad):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("backward boom")


@pytest.mark.parametrize("optimizer, fails_at", [("lbfgs", 1), ("closure sgd", 1), ("closure sgd", 2)])
def test_a_closure_optimizer_whose_first_backward_fails_leaves_its_state_as_it_was(
    make_mlp, batches, mse_loss, take_snapshot, assert_trees_equal, optimizer, fails_at
):
    """LBFGS runs the backward in its closure; an optimizer found to need one (_ClosureSGD) runs the step's own
    backward (call 1) and then the closure's (call 2). A failure in either, before the optimizer moved anything,
    gives the gradients back as the call found them: the state is whole, and trains on as an untouched twin."""

    def make(model):
        if optimizer == "lbfgs":
            return loopkit.TrainState.create(model, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3))
        return loopkit.TrainState.create(model, _ClosureSGD(model.parameters(), lr=0.1))

    step = loopkit.donate(loopkit.train_step(mse_loss))
    state, untouched = make(make_mlp(0)), make(make_mlp(0))
    handle = next(state.model.parameters()).register_hook(_FailingOnCall(fails_at))
    with pytest.raises(RuntimeError, match="backward boom") as info:
        step(state, batches[0])
    handle.remove()
    assert loopkit.state_at_error(info.value) is state
    assert_trees_equal(take_snapshot(state), take_snapshot(untouched))
    (new, _), (reference, _) = step(state, batches[0]), step(untouched, batches[0])
    assert_trees_equal(take_snapshot(new), take_snapshot(reference))


def test_an_lbfgs_loss_fn_failing_in_its_first_forward_gives_back_the_gradients_held(
    make_mlp, batches, mse_loss, take_snapshot, assert_trees_equal
):
    """The closure's zero_grad sets the gradients aside before the loss_fn runs: a forward that fails then (before
    any backward) hands the state back whole, the gradients it held (a backward of one's own before the call)
    among it, as a snapshot taken before the call."""

    def failing(model, batch):
        raise RuntimeError("forward boom")

    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3))
    mse_loss(model, batches[1]).backward()  # gradients held by the state before the call
    before = take_snapshot(state)
    with pytest.raises(RuntimeError, match="forward boom") as info:
        loopkit.donate(loopkit.train_step(failing))(state, batches[0])
    assert loopkit.state_at_error(info.value) is state
    assert all(p.grad is not None for p in state.model.parameters())
    assert_trees_equal(take_snapshot(state), before)


def test_an_lbfgs_run_resumes_from_a_file_as_the_uninterrupted_run(batches, mse_loss):
    """LBFGS keeps lists of tensors (and None) in its state: a state dict written to a file and loaded
    back must give them back as lists (they came back as {'0': ...} dicts, and the next step failed)."""
    from tests.conftest import through_a_file

    step = loopkit.donate(loopkit.train_step(mse_loss))

    def fresh():
        net, lbfgs = _lbfgs_net()
        return loopkit.TrainState.create(net, lbfgs, seed=3)

    whole = fresh()
    for batch in batches[:5]:
        whole, _ = step(whole, batch)
    first = fresh()
    for batch in batches[:2]:
        first, _ = step(first, batch)
    resumed = fresh().load_state_dict(through_a_file(first.state_dict()))
    for batch in batches[2:5]:
        resumed, _ = step(resumed, batch)
    whole_sd, resumed_sd = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(whole_sd[k], resumed_sd[k]) for k in whole_sd)


def test_donate_refuses_an_ensemble_step_and_names_donated_true():
    """It built, and the first call failed with "a step takes a loopkit.TrainState, got Ensemble"."""
    from loopkit import ensemble

    step = ensemble.train_step(lambda m, b: m(b).pow(2).mean())
    with pytest.raises(TypeError, match=r"donate cannot wrap ensemble.train_step.*donated=True"):
        loopkit.donate(step)


@pytest.mark.parametrize(
    "wrap, name",
    [
        (lambda s: loopkit.with_grad_clip(s, max_norm=1.0), "grad_norm"),
        (lambda s: loopkit.with_amp(s, dtype=torch.float16), "amp/skipped"),
        (lambda s: loopkit.with_nan_guard(s), "nan_guard/skipped"),
        (lambda s: loopkit.with_grad_accum(loopkit.with_nan_guard(s), every=2), "nan_guard/skipped"),
    ],
    ids=["clip", "amp-fp16", "nan-guard", "guard-under-accum"],
)
def test_an_aux_metric_a_transform_reports_too_is_refused_before_anything_changes(make_mlp, make_sgd_state, batches,
                                                                                   wrap, name):
    # the transform would replace the aux value silently; a donated state stays usable
    def loss_fn(model, batch):
        x, y = batch
        loss = ((model(x).float() - y) ** 2).mean()
        return loss, {name: loss.detach() * 0 + 7}

    state = make_sgd_state(make_mlp(0))
    before = [p.detach().clone() for p in state.model.parameters()]
    with pytest.raises(ValueError, match=f"aux metric named '{name}', which with_.* reports too"):
        loopkit.donate(wrap(loopkit.train_step(loss_fn)))(state, batches[0])
    state.check_usable()
    assert all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))
    # without the transform the name is the loss_fn's to use
    _, metrics = loopkit.train_step(loss_fn)(state, batches[0])
    assert float(metrics[name]) == 7


def test_an_evaluation_of_a_lazy_model_before_its_first_forward_and_of_inference_tensors_runs(batches, mse_loss):
    """The sanity validation meets a lazy module's buffers uninitialised; a model built under inference_mode has
    buffers without a version counter: an evaluation that copied or versioned buffers failed on both."""
    lazy = nn.Sequential(nn.LazyLinear(3), nn.LazyBatchNorm1d(), nn.Linear(3, 2))
    state = loopkit.TrainState.create(lazy, torch.optim.SGD(lazy.parameters(), lr=0.1))
    val = (loopkit.eval_step(lambda m, b: {"mse": mse_loss(m, b)}), batches[:2])
    state, history = loopkit.run_epochs(loopkit.train_step(mse_loss), state, batches[:3], epochs=1, val=val,
                                        progress=False)
    assert state.step == 3 and "val/mse" in history[0]
    with torch.inference_mode():
        served = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    outputs = loopkit.predict(lambda m, b: m(b[0]), loopkit.TrainState.create(served), batches[:2])
    with torch.inference_mode():
        expected = served.eval()(batches[0][0])
    assert torch.equal(outputs[0], expected)


def test_a_bfloat16_model_trains_as_a_raw_bfloat16_loop_lightnings_bf16_true(tmp_path):
    """Lightning's precision="bf16-true": the weights, the optimizer state and the data in bfloat16, no autocast.
    The model as a raw loop trains it, bitwise, through run_epochs and a checkpoint restored into a fresh template."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(torch.bfloat16)

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g).bfloat16(), torch.randn(8, 2, generator=g).bfloat16()) for _ in range(6)]

    def mse(model, batch):
        return ((model(batch[0]) - batch[1]) ** 2).mean()

    reference = make()
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for batch in data:
        opt.zero_grad()
        mse(reference, batch).backward()
        opt.step()

    model = make()
    state = loopkit.TrainState.create(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    step = loopkit.with_checkpointing(loopkit.train_step(mse), tmp_path, every_n_epochs=1)
    state, history = loopkit.run_epochs(step, state, data, epochs=1, progress=False)
    template = make()
    restored = loopkit.restore(loopkit.TrainState.create(template, torch.optim.AdamW(template.parameters(), lr=1e-2)), tmp_path)
    for trained in (state, restored):
        for a, b in zip(trained.model.parameters(), reference.parameters()):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert restored.optimizer.state_dict()["state"][0]["exp_avg"].dtype == torch.bfloat16
    assert history[-1]["step"] == 6


def test_rank_agreed_lists_each_transforms_options_that_decide_its_collectives(tmp_path):
    """What run_epochs compares over the ranks when a fit starts (a rank whose log point or save falls at other steps
    would wait in a collective the others never reach; a rank clipping otherwise would update by other gradients):
    each transform's own, innermost first; a transform that makes no collective and leaves the training alone
    (with_profiler) adds none, so a rank may apply it alone."""
    core = loopkit.with_nan_guard(loopkit.with_grad_accum(loopkit.with_amp(
        loopkit.train_step(lambda m, b: m(b).sum()), torch.bfloat16), every={0: 2, 3: 4}), policy="raise")
    step = loopkit.with_checkpointing(loopkit.with_logging(loopkit.with_grad_clip(core, max_norm=1.0),
                                                           loopkit.ConsoleLogger(), every_n_steps=7),
                                      tmp_path, every_n_epochs=2, monitor="val/loss")
    assert step.rank_agreed == (
        ("with_grad_accum every", {0: 2, 3: 4}), ("with_amp dtype", "torch.bfloat16"),
        ("with_nan_guard policy", "raise"),
        ("with_grad_clip max_norm", 1.0), ("with_grad_clip max_value", None), ("with_grad_clip norm_type", 2.0),
        ("with_logging every_n_steps", 7),
        ("with_checkpointing every_n_steps", None), ("with_checkpointing every_n_epochs", 2),
        ("with_checkpointing train_time_interval", None), ("with_checkpointing monitor", "val/loss"),
        ("with_checkpointing on_validation", False))
    profiled = loopkit.with_profiler(step, tmp_path / "prof", wait=0, warmup=0, active=1)
    assert profiled.rank_agreed == step.rank_agreed
    assert loopkit.train_step(lambda m, b: m(b).sum()).rank_agreed == ()
    assert as_step(lambda s, b: (s, {})).rank_agreed == ()


@pytest.mark.parametrize("one, other", [
    (2, {0: 2}), ({0: 2}, {0: 2, 1: 2, 5: 2}), ({0: 1, 2: 4}, {1: 1, 2: 4, 3: 4}), ({0: 1}, 1)])
def test_rank_agreed_takes_an_accumulation_as_the_epochs_see_it(one, other):
    """with_grad_accum(every=2) and every={0: 2} accumulate alike in every epoch, and so does a schedule with entries
    repeating the factor before them (or giving epoch 0 the factor 1 it has anyway): run_epochs refused such ranks as
    having other options. One description each now; every_at, what the step acts on, is the reference."""
    steps = [loopkit.with_grad_accum(loopkit.train_step(lambda m, b: m(b).sum()), every=e) for e in (one, other)]
    assert [steps[0].every_at(epoch) for epoch in range(8)] == [steps[1].every_at(epoch) for epoch in range(8)]
    assert steps[0].rank_agreed == steps[1].rank_agreed


def test_rank_agreed_tells_accumulations_that_act_otherwise_apart():
    """Schedules whose factors differ in some epoch stay apart, the description naming the epochs where it changes."""
    base = loopkit.train_step(lambda m, b: m(b).sum())
    accum = lambda every: loopkit.with_grad_accum(base, every=every)  # noqa: E731
    described = {str(accum(e).rank_agreed) for e in (2, 3, {0: 2, 1: 3}, {0: 2, 2: 3}, {1: 2})}
    assert len(described) == 5
    assert accum({0: 2, 1: 2, 4: 3, 6: 3}).rank_agreed == (("with_grad_accum every", {0: 2, 4: 3}),)


def test_evaluating_puts_plain_quantization_observers_back():
    """An observer-only qconfig's plain observers have no observer_enabled flag: an evaluation moved them (the
    fake-quantizers' flags were all evaluating paused). Reference: the observers' buffers before the evaluation."""
    import warnings

    from loopkit.steps import evaluating, kept_observers

    q = torch.ao.quantization
    torch.manual_seed(0)
    model = nn.Sequential(q.QuantStub(), nn.Linear(4, 3), q.DeQuantStub())
    model.qconfig = q.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.prepare_qat(model, inplace=True)
    model(torch.randn(5, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with evaluating(model), torch.no_grad():
        model(torch.randn(5, 4) * 10)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    fresh = q.PerChannelMinMaxObserver()  # its ranges are empty until its first input, then one per channel
    with pytest.raises(RuntimeError, match="boom"), kept_observers([fresh]):
        fresh(torch.randn(3, 2))
        assert fresh.min_val.shape == (3,)
        raise RuntimeError("boom")
    assert fresh.min_val.shape == (0,) and fresh.max_val.shape == (0,)


def test_a_donated_step_that_raises_after_its_update_points_its_used_up_state_to_state_at_error():
    """A donated step whose logger write failed after the update leaves the updated state whole
    (``state_at_error``); the given state's DonatedStateError had said that state_at_error of that error is None."""

    class FullDisk(loopkit.Logger):
        def log_metrics(self, metrics, step):
            raise OSError("disk full")

        def log_hparams(self, params):
            pass

        def finalize(self, status="success"):
            pass

    model = nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.donate(loopkit.with_logging(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), FullDisk(), every_n_steps=1))
    with pytest.raises(OSError, match="disk full") as caught:
        step(state, torch.ones(4, 2))
    assert loopkit.state_at_error(caught.value).step == 1
    with pytest.raises(loopkit.DonatedStateError) as used:
        state.check_usable()
    assert "state_at_error(error) of that error is None" not in str(used.value)
    assert "go on from loopkit.state_at_error(error)" in str(used.value)


# --- a function used as a step: its signature -------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [lambda state: (state, {}), lambda s, b, extra: (s, {})], ids=["one", "three"])
@pytest.mark.parametrize("build, where", [(as_step, "a step"), (loopkit.donate, "donate: step")], ids=["as_step", "donate"])
def test_a_function_that_cannot_take_state_and_batch_is_refused_when_it_becomes_a_step(fn, build, where):
    with pytest.raises(TypeError, match=rf"^{where} must take \(state, batch\); .*<lambda>\(.*\) cannot"):
        build(fn)


class _StepObject:
    def __call__(self, state, batch):
        return state, {}


def _step_of(scale, state, batch):
    return state, {}


@pytest.mark.parametrize("fn", [
    lambda state, batch, scale=1.0: (state, {}), lambda *args: (args[0], {}), _StepObject(),
    __import__("functools").partial(_step_of, 2.0), lambda state, batch, **kwargs: (state, {}),
], ids=["default", "*args", "callable-instance", "partial", "**kwargs"])
def test_a_function_that_can_take_state_and_batch_runs_as_the_step(fn):
    model = nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert fn(state, torch.ones(1, 2))[1] == {}  # (the call itself runs)
    new, metrics = loopkit.donate(fn)(state, torch.ones(1, 2))
    assert isinstance(new, loopkit.TrainState) and metrics == {}


@pytest.mark.parametrize("module", [nn.MSELoss(), nn.Linear(3, 1)], ids=["criterion", "model"])
@pytest.mark.parametrize("build, where", [(loopkit.train_step, "train_step: loss_fn"), (loopkit.eval_step, "eval_step: metric_fn")],
                         ids=["train_step", "eval_step"])
def test_a_module_given_as_the_function_of_model_and_batch_is_refused_with_the_wrapping(module, build, where):
    with pytest.raises(TypeError, match=rf"^{where} must take \(model, batch\), and it is a torch.nn.Module "
                                        rf"\({type(module).__qualname__}\).*lambda model, batch: criterion\(model\(batch\[0\]\), batch\[1\]\)"):
        build(module)


class _LossModule(nn.Module):
    """A loss of one's own as a Module (a buffer moves with ``.to()``): ``forward(model, batch)``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.tensor(2.0))

    def forward(self, model, batch):
        return self.weight * ((model(batch[0]) - batch[1]) ** 2).mean()


class _MetricModule(_LossModule):
    def forward(self, model, batch):  # type: ignore[override]
        return {"mse": super().forward(model, batch)}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def forward(self, x):
        return self.layer(x)


def test_a_module_of_ones_own_whose_forward_takes_model_and_batch_is_a_loss_fn_and_a_metric_fn():
    """A Module of one's own whose forward takes (model, batch) worked (it is called as any function) until the
    refusal of every Module; it trains as a raw loop calling it does, and evaluates. A model of one's own (forward
    of its input) is still refused, naming its forward."""
    torch.manual_seed(0)
    model, reference = nn.Linear(2, 1), nn.Linear(2, 1)
    reference.load_state_dict(model.state_dict())
    batches = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(3)]
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state, _ = loopkit.run_epochs(loopkit.train_step(_LossModule()), state, batches, epochs=1, progress=False)
    optimizer, loss = torch.optim.SGD(reference.parameters(), lr=0.1), _LossModule()
    for batch in batches:
        optimizer.zero_grad()
        loss(reference, batch).backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(state.model.parameters(), reference.parameters()))
    means = loopkit.evaluate(loopkit.eval_step(_MetricModule()), state, batches[:1])
    assert means["mse"] == pytest.approx(loss(reference, batches[0]).item(), rel=1e-6)
    with pytest.raises(TypeError, match=r"^train_step: loss_fn must take \(model, batch\), and it is a torch.nn.Module: "
                                        r"its forward must take them; _Net.forward\(x\) cannot"):
        loopkit.train_step(_Net())


# --- what a step of one's own returns: checked as train_step's metrics are --------------------------------------------


def _refusal(metrics):
    """The reference: check_metric's refusal of the first of ``metrics`` it refuses (train_step's aux metrics and
    eval_step's metrics go through it), with the source's name cut off."""
    with pytest.raises(TypeError) as info:
        for key, value in metrics.items():
            loopkit.steps.check_metric(value, key, "SOURCE")
    return str(info.value).split("SOURCE")[-1]


_BAD_METRICS = {
    "complex": {"x": torch.tensor(1 + 2j)},
    "bool": {"x": torch.tensor(True)},
    "int-key": {1: torch.tensor(1.0)},
    "vector": {"x": torch.ones(3)},
}


class _Quiet(loopkit.Logger):
    def log_metrics(self, metrics, step):
        pass

    def log_hparams(self, params):
        pass

    def finalize(self, status="success"):
        pass


@pytest.mark.parametrize("metrics", list(_BAD_METRICS.values()), ids=list(_BAD_METRICS))
@pytest.mark.parametrize("kind", ["call", "flush", "subclass-call", "subclass-flush", "subclass-in-a-wrapper"])
def test_a_step_of_ones_own_has_its_metrics_checked_as_check_metric_checks_them(kind, metrics):
    """0-dim complex and bool tensors and names that are no strings passed a plain function's call unchecked (the
    imaginary part dropped from the epoch's mean); a plain function's flush and a Step subclass's run_ and flush_ were
    not checked at all (a (3,) metric summed to 3.0 in the history). Reference: check_metric's refusal of each."""
    state = loopkit.TrainState.create(nn.Linear(2, 1))

    def plain(s, b):
        return s.evolve(step=s.step + 1), ({} if kind == "flush" else metrics)

    plain.flush = lambda s: (s, metrics if kind == "flush" else {})

    class Own(loopkit.Step):
        def run_(self, s, b):
            return s.evolve(step=s.step + 1), ({} if kind == "subclass-flush" else metrics)

        def flush_(self, s):
            return s, (metrics if kind == "subclass-flush" else {})

    step = {"call": plain, "flush": plain, "subclass-call": Own(), "subclass-flush": Own(),
            "subclass-in-a-wrapper": loopkit.with_logging(Own(), _Quiet(), every_n_steps=1)}[kind]
    where = {"call": "step .*plain", "flush": "step .*plain's flush", "subclass-call": "step .*Own",
             "subclass-flush": "step .*Own's flush", "subclass-in-a-wrapper": "step .*Own"}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a fit of two batches: its warnings are not the point)
        with pytest.raises(TypeError) as info:
            loopkit.run_epochs(step, state, [torch.ones(2, 2)] * 2, epochs=1, progress=False, donate=False)
    message = str(info.value)
    assert re.search(f"from {where}", message) and message.endswith(_refusal(metrics)), message


@pytest.mark.parametrize("kind", ["flush", "subclass-call", "subclass-flush"])
def test_a_step_of_ones_own_returning_numbers_and_int_tensors_has_them_as_a_plain_calls_are(kind):
    """A float metric (taken from a plain function's call) crashed in the epoch's sum with torch's message when a flush
    or a Step subclass returned it. Reference: the same metrics from a plain function's call."""
    state = loopkit.TrainState.create(nn.Linear(2, 1))
    metrics = {"fit": 2.5, "seen": torch.tensor(3), "mean": torch.tensor(0.5)}

    def reference(s, b):
        return s.evolve(step=s.step + 1), metrics

    def plain(s, b):
        return s.evolve(step=s.step + 1), {}

    plain.flush = lambda s: (s, metrics)

    class Own(loopkit.Step):
        def run_(self, s, b):
            return s.evolve(step=s.step + 1), ({} if kind == "subclass-flush" else metrics)

        def flush_(self, s):
            return s, (metrics if kind == "subclass-flush" else {})

    step = plain if kind == "flush" else Own()
    options = dict(epochs=1, progress=False, donate=False)
    _, expected = loopkit.run_epochs(reference, state, [torch.ones(2, 2)], **options)
    _, history = loopkit.run_epochs(step, state, [torch.ones(2, 2)], **options)
    assert {k: history[0][k] for k in expected[0] if k.startswith("train/")} == {
        k: v for k, v in expected[0].items() if k.startswith("train/")} == {"train/fit": 2.5, "train/seen": 3.0,
                                                                          "train/mean": 0.5}


@pytest.mark.parametrize("kind", ["flush", "subclass-call", "subclass-flush"])
def test_a_step_of_ones_own_returning_the_state_alone_is_named_as_a_plain_call_is(kind):
    """A flush returning only the state failed with 'cannot unpack non-iterable TrainState object'. Reference: the
    plain call's refusal ('returned a TrainState; a step returns (new_state, metrics)')."""
    state = loopkit.TrainState.create(nn.Linear(2, 1))

    def plain(s, b):
        return s.evolve(step=s.step + 1), {}

    plain.flush = lambda s: s

    class Own(loopkit.Step):
        def run_(self, s, b):
            return s if kind == "subclass-call" else (s.evolve(step=s.step + 1), {})

        def flush_(self, s):
            return s if kind == "subclass-flush" else (s, {})

    step = plain if kind == "flush" else Own()
    with pytest.raises(TypeError, match=r"step .*(plain|Own)('s flush)? returned a TrainState; a (step|flush) returns "
                                        r"\(new_state, metrics\)"):
        loopkit.run_epochs(step, state, [torch.ones(2, 2)], epochs=1, progress=False, donate=False)


def test_only_step_classes_of_ones_own_check_their_results_and_each_once_when_made():
    """The check is chosen per class when it is made: loopkit's own steps (which make checked metrics) run as they
    are; a class of one's own, an attrs one too (attrs makes the class anew), checks at one level."""
    import attrs

    from loopkit.steps import EvalStep, FnStep, Step, TrainStep, UpdateStep, WrapperStep, run_of

    logging = type(loopkit.with_logging(lambda s, b: (s, {}), _Quiet()))
    for own in (Step, FnStep, TrainStep, EvalStep, WrapperStep, UpdateStep, logging):
        assert not own._checks_results, own

    @attrs.frozen
    class Mine(Step):
        factor: float = 2.0

        def run_(self, s, b):
            return s, {"x": self.factor}

    class Below(Mine):
        pass

    for cls in (Mine, Below):
        assert cls._checks_results and cls.run_ is Mine.__dict__["run_"]  # (the method itself, not a wrapper)
    state = loopkit.TrainState.create(nn.Linear(2, 1))
    assert Below()(state, None)[1] == {"x": torch.tensor(2.0)}
    assert run_of(Below())(state, None)[1] == {"x": torch.tensor(2.0)}


@pytest.mark.parametrize("donated", [False, True])
@pytest.mark.parametrize("around", ["alone", "with_logging", "with_epoch_scheduler"])
def test_an_attrs_step_of_ones_own_calling_super_run_trains_as_the_step_it_extends(around, donated, batches, mse_loss):
    """attrs (slots=True, its default) makes a class anew and fixes the __class__ cell of the methods in its dict:
    run_ and flush_ replaced by checking wrappers when the class was made hid the method's own cell, and
    super().run_(...) inside it raised 'super(type, obj): obj must be an instance or subtype of type'. Reference:
    the step it extends (train_step; a whole-step transform forwarding to its inner step), its metric doubled; a bad
    metric of its own is still refused."""
    import attrs

    from loopkit.steps import TrainStep, WrapperStep

    @attrs.frozen(eq=False)
    class Doubled(TrainStep):
        def run_(self, state, batch):
            new, metrics = super().run_(state, batch)
            return new, {**metrics, "double": metrics["loss"] * 2}

        def flush_(self, state):
            return super().flush_(state)

    @attrs.frozen(eq=False)
    class Forwarding(WrapperStep):
        def run_(self, state, batch):
            return super().run_(state, batch)

        def flush_(self, state):
            return super().flush_(state)

    def wrap(step):
        if around == "with_logging":
            step = loopkit.with_logging(step, _Quiet(), every_n_steps=1)
        elif around == "with_epoch_scheduler":
            step = loopkit.with_epoch_scheduler(step)
        return loopkit.donate(step) if donated else step

    def train(step):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        state = loopkit.TrainState.create(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5))
        seen = []
        for batch in batches[:3]:
            state, metrics = step(state, batch)
            seen.append(metrics)
        state, _ = step.flush(state)
        return state, seen

    reference, expected = train(wrap(loopkit.train_step(mse_loss)))
    doubled, got = train(wrap(Doubled(mse_loss)))
    forwarded, forwarded_metrics = train(wrap(Forwarding(loopkit.train_step(mse_loss))))
    for state in (doubled, forwarded):
        assert state.step == reference.step == 3
        assert torch.equal(state.model.weight, reference.model.weight)
    assert [m["loss"] for m in got] == [m["loss"] for m in expected] == [m["loss"] for m in forwarded_metrics]
    assert all(torch.equal(m["double"], m["loss"] * 2) for m in got)

    @attrs.frozen(eq=False)
    class Vector(TrainStep):
        def run_(self, state, batch):
            new, metrics = super().run_(state, batch)
            return new, {**metrics, "bad": torch.ones(3)}

    with pytest.raises(TypeError, match="metric 'bad' from step .*Vector"):
        train(wrap(Vector(mse_loss)))


def test_leaving_intact_marks_what_raises_inside_and_nothing_after():
    """Reference: leave_intact called by hand (test_a_custom_step_that_raises_has_consumed_its_state_unless_it_says_
    otherwise): the donated state stays usable after an error inside; an error outside uses it up."""
    from loopkit.steps import leaving_intact

    def step(state, batch, fail_inside):
        with leaving_intact(state):
            if fail_inside:
                raise RuntimeError("inside")
        raise RuntimeError("outside")

    for inside in (True, False):
        state = loopkit.TrainState.create(nn.Linear(2, 1))
        with pytest.raises(RuntimeError) as info:
            loopkit.donate(lambda s, b: step(s, b, inside))(state, None)
        assert (loopkit.state_at_error(info.value) is state) is inside
        if inside:
            state.check_usable()
        else:
            with pytest.raises(loopkit.DonatedStateError):
                state.check_usable()
