"""with_nan_guard: a non-finite loss or gradient never reaches the parameters ("skip"), or raises."""

from __future__ import annotations

import warnings

import pytest
import torch

import loopkit


def _nan_batch(batch):
    x, y = batch
    x = x.clone()
    x[0, 0] = float("nan")
    return x, y


def _nan_grad_loss(mse_loss, name="2.bias"):
    """A finite loss whose gradient for parameter ``name`` alone is NaN (0 * d/du sqrt(u) at u=0)."""

    def loss_fn(model, batch):
        p = dict(model.named_parameters())[name]
        u = p.sum() - p.sum().detach()  # == 0, with gradient 1 for every element of p
        return mse_loss(model, batch) + 0.0 * torch.sqrt(u)

    return loss_fn


def _finite(state):
    return all(bool(torch.isfinite(p).all()) for p in state.model.parameters())


def test_nan_loss_is_skipped_and_counted(make_mlp, make_batches, mse_loss, make_adam_state, take_snapshot, assert_trees_equal):
    data = make_batches(5)
    data[1], data[3] = _nan_batch(data[1]), _nan_batch(data[3])
    step = loopkit.with_nan_guard(loopkit.train_step(mse_loss))
    state = make_adam_state(make_mlp(0), scheduler=True)
    skipped = []
    for k, batch in enumerate(data):
        before = take_snapshot(state)
        new, metrics = step(state, batch)
        skipped.append(float(metrics["nan_guard/skipped"]))
        if k in (1, 3):
            assert torch.isnan(metrics["loss"])
            assert_trees_equal(take_snapshot(new)["params"], before["params"])
            assert_trees_equal(take_snapshot(new)["optimizer"], before["optimizer"])
            assert new.step == state.step and new.scheduler.last_epoch == state.scheduler.last_epoch
        else:
            assert new.step == state.step + 1
        state = new
    assert skipped == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert state.extras["nan_guard/skipped_total"] == 2
    assert state.step == 3 and state.batch_index == 5 and _finite(state)


def _raw_sgd_without(bad, data, make_mlp, mse_loss):
    """The reference: a raw SGD loop (momentum 0.9) over ``data`` without the batches at the indices in ``bad``."""
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    for k, batch in enumerate(data):
        if k not in bad:
            ref_opt.zero_grad()
            mse_loss(ref_model, batch).backward()
            ref_opt.step()
    return ref_model, ref_opt


def test_skipping_equals_a_raw_loop_without_the_bad_batches(make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal):
    data = make_batches(5)
    bad = {1, 3}
    ref_model, ref_opt = _raw_sgd_without(bad, data, make_mlp, mse_loss)

    state = make_sgd_state(make_mlp(0))
    step = loopkit.with_nan_guard(loopkit.train_step(mse_loss))
    for k, batch in enumerate(data):
        state, _ = step(state, _nan_batch(batch) if k in bad else batch)
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))
    assert_trees_equal(state.optimizer.state_dict(), ref_opt.state_dict())


def test_nan_gradient_with_a_finite_loss_is_skipped(make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal):
    state = make_sgd_state(make_mlp(0))
    state, _ = loopkit.train_step(mse_loss)(state, make_batches(1)[0])
    # without the guard the NaN gradient does reach the parameter
    unguarded, metrics = loopkit.train_step(_nan_grad_loss(mse_loss))(state, make_batches(2)[1])
    assert torch.isfinite(metrics["loss"]) and torch.isnan(unguarded.model[2].bias).all()

    new, metrics = loopkit.with_nan_guard(loopkit.train_step(_nan_grad_loss(mse_loss)))(state, make_batches(2)[1])
    assert torch.isfinite(metrics["loss"]) and float(metrics["nan_guard/skipped"]) == 1.0
    assert_trees_equal(dict(new.model.named_parameters()), dict(state.model.named_parameters()))
    assert new.step == state.step and new.extras["nan_guard/skipped_total"] == 1
    assert all(p.grad is None for p in new.model.parameters())  # the bad gradient does not linger


@pytest.mark.parametrize("inf", [float("inf"), -float("inf")], ids=["+inf", "-inf"])
def test_an_infinite_loss_with_finite_gradients_is_skipped_as_a_raw_loop_without_it(
    inf, make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal
):
    """A loss of +-inf (not NaN) whose gradients are all finite (the infinite part is a constant): only the loss shows
    it, and "skip" skips that update. Reference: a raw loop without those batches."""
    data = make_batches(4)
    bad = {1, 2}
    calls = []

    def loss_fn(model, batch):
        calls.append(None)
        return mse_loss(model, batch) + (torch.tensor(inf) if len(calls) - 1 in bad else 0.0)

    ref_model, ref_opt = _raw_sgd_without(bad, data, make_mlp, mse_loss)
    calls.append(None)  # (the next call is a bad one) without the guard: it updates, its gradients finite
    unguarded, metrics = loopkit.train_step(loss_fn)(make_sgd_state(make_mlp(0)), data[1])
    assert metrics["loss"] == inf and _finite(unguarded) and unguarded.step == 1
    assert not torch.equal(unguarded.model[0].weight, make_mlp(0)[0].weight)
    calls.clear()

    state = make_sgd_state(make_mlp(0))
    step = loopkit.with_nan_guard(loopkit.train_step(loss_fn))
    skipped = []
    for batch in data:
        state, metrics = step(state, batch)
        skipped.append(float(metrics["nan_guard/skipped"]))
    assert skipped == [0.0, 1.0, 1.0, 0.0] and state.step == 2 and state.extras["nan_guard/skipped_total"] == 2
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))
    assert_trees_equal(state.optimizer.state_dict(), ref_opt.state_dict())


def _guarded_accumulation(nesting: str, loss_fn):
    """``with_nan_guard`` and ``with_grad_accum(every=2)`` around ``train_step(loss_fn)``, in the order named."""
    base = loopkit.train_step(loss_fn)
    if nesting == "guard(accum)":
        return loopkit.with_nan_guard(loopkit.with_grad_accum(base, every=2))
    return loopkit.with_grad_accum(loopkit.with_nan_guard(base), every=2)


@pytest.mark.parametrize("nesting", ["guard(accum)", "accum(guard)"])
@pytest.mark.parametrize("bad_call", [0, 1])
def test_under_accumulation_a_bad_micro_batch_drops_the_whole_group(
    nesting, bad_call, make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal
):
    data = make_batches(4)
    data[bad_call] = _nan_batch(data[bad_call])
    step = _guarded_accumulation(nesting, mse_loss)
    start = make_sgd_state(make_mlp(0))
    state = start
    for batch in data[:2]:
        state, metrics = step(state, batch)
    assert float(metrics["nan_guard/skipped"]) == 1.0
    assert state.step == 0 and state.extras["nan_guard/skipped_total"] == 1
    assert_trees_equal(dict(state.model.named_parameters()), dict(start.model.named_parameters()))
    assert all(p.grad is None for p in state.model.parameters())

    # the next group is a clean update: exactly one raw step on it
    for batch in data[2:]:
        state, metrics = step(state, batch)
    assert float(metrics["nan_guard/skipped"]) == 0.0 and state.step == 1
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    for batch in data[2:]:
        (mse_loss(ref_model, batch) / 2).backward()
    ref_opt.step()
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(dict(state.model.named_parameters())[name], p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("nesting", ["guard(accum)", "accum(guard)"])
def test_a_group_flagged_mid_way_survives_a_state_dict_round_trip(nesting, make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal):
    data = make_batches(2)
    data[0] = _nan_batch(data[0])
    step = _guarded_accumulation(nesting, mse_loss)
    start = make_sgd_state(make_mlp(0))
    state, _ = step(start, data[0])
    restored = make_sgd_state(make_mlp(1)).load_state_dict(state.state_dict())
    restored, metrics = step(restored, data[1])
    assert float(metrics["nan_guard/skipped"]) == 1.0 and restored.step == 0
    assert_trees_equal(dict(restored.model.named_parameters()), dict(start.model.named_parameters()))


def _bn_net(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def test_a_skipped_update_leaves_batchnorm_statistics_as_a_raw_loop_without_the_bad_batch(
    make_batches, mse_loss, make_sgd_state, assert_trees_equal
):
    data = make_batches(4)
    ref_model = _bn_net()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    for k, batch in enumerate(data):
        if k != 1:
            ref_opt.zero_grad()
            mse_loss(ref_model, batch).backward()
            ref_opt.step()
    # without the guard's restore the NaN batch's statistics stay: the raw forward alone poisons them
    poisoned = _bn_net()
    poisoned(_nan_batch(data[1])[0])
    assert torch.isnan(poisoned[1].running_mean).any()

    state = make_sgd_state(_bn_net())
    step = loopkit.with_nan_guard(loopkit.train_step(mse_loss))
    for k, batch in enumerate(data):
        state, metrics = step(state, _nan_batch(batch) if k == 1 else batch)
        assert "nan_guard/buffers" not in state.extras  # kept only while a group is open
    assert_trees_equal(dict(state.model.named_buffers()), dict(ref_model.named_buffers()))  # num_batches_tracked too
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))
    assert state.model[1].num_batches_tracked.item() == 3


@pytest.mark.parametrize("nesting", ["guard(accum)", "accum(guard)"])
def test_a_dropped_group_puts_back_the_buffers_it_found_even_across_a_state_dict_round_trip(
    nesting, make_batches, mse_loss, make_sgd_state, assert_trees_equal
):
    data = make_batches(2)
    data[1] = _nan_batch(data[1])
    step = _guarded_accumulation(nesting, mse_loss)
    start = make_sgd_state(_bn_net())
    before = {k: v.clone() for k, v in start.model.named_buffers()}
    state, _ = step(start, data[0])  # a clean micro-batch moves the statistics ...
    assert not torch.equal(state.model[1].running_mean, before["1.running_mean"])
    restored = make_sgd_state(_bn_net(1)).load_state_dict(state.state_dict())
    restored, metrics = step(restored, data[1])  # ... and the group's NaN micro-batch drops them with the update
    assert float(metrics["nan_guard/skipped"]) == 1.0 and restored.step == 0
    assert_trees_equal(dict(restored.model.named_buffers()), before)

@pytest.mark.parametrize("error", ["loss_fn's own", "anomaly in the backward"])
def test_an_error_after_the_forward_keeps_its_buffer_writes_unless_a_raising_guard_puts_them_back(
    error, make_batches, mse_loss, make_sgd_state, assert_trees_equal
):
    """The README and the guide's detect_anomaly row said such an error leaves the state whole; its forward has
    written BatchNorm's statistics in place, as a raw loop's does (reference: the raw module after that forward). A
    donated step leaves its state usable with them; with_nan_guard(policy="raise") puts them back, as they were."""
    batch = make_batches(1)[0]

    def raising(model, b):
        model(b[0])
        raise ValueError("bad batch")

    def nan_backward(model, b):  # finite forward, NaN gradient: detect_anomaly raises in the backward
        weight = next(model.parameters())
        return mse_loss(model, b) + (weight.sum() * 0).sqrt()

    loss_fn = raising if error == "loss_fn's own" else nan_backward
    raw = _bn_net()
    raw(batch[0])
    for guard in (False, True):
        step = loopkit.train_step(loss_fn)
        step = loopkit.donate(loopkit.with_nan_guard(step, policy="raise") if guard else step)
        state = make_sgd_state(_bn_net())
        before = {k: v.clone() for k, v in state.model.named_buffers()}
        with warnings.catch_warnings(), pytest.raises((ValueError, RuntimeError)) as info:
            warnings.simplefilter("ignore")
            with torch.autograd.detect_anomaly():
                step(state, batch)
        assert loopkit.state_at_error(info.value) is state
        assert_trees_equal(dict(state.model.named_buffers()), before if guard else dict(raw.named_buffers()))


def test_raise_policy_keeps_no_copy_of_the_buffers(make_batches, mse_loss, make_sgd_state):
    state = make_sgd_state(_bn_net())
    assert loopkit.with_nan_guard(loopkit.train_step(mse_loss)).keeps_buffers
    step = loopkit.with_nan_guard(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=2), policy="raise")
    assert not step.keeps_buffers
    state, _ = step(state, make_batches(1)[0])
    assert "nan_guard/buffers" not in state.extras


def test_raise_policy_names_the_step_and_the_loss(make_mlp, make_batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal):
    data = make_batches(4)
    step = loopkit.with_nan_guard(loopkit.train_step(mse_loss), policy="raise")
    state = make_sgd_state(make_mlp(0))
    for batch in data[:3]:
        state, metrics = step(state, batch)
    assert "nan_guard/skipped" not in metrics
    before = take_snapshot(state)
    with pytest.raises(loopkit.NonFiniteError) as info:
        step(state, _nan_batch(data[3]))
    message = str(info.value)
    assert "with_nan_guard" in message and "non-finite loss" in message and "step 3" in message
    assert_trees_equal(take_snapshot(state), before)  # nothing lost


def test_raise_policy_names_the_parameter_with_the_bad_gradient(make_mlp, make_batches, mse_loss, make_sgd_state):
    data = make_batches(2)
    state = make_sgd_state(make_mlp(0))
    state, _ = loopkit.with_nan_guard(loopkit.train_step(mse_loss), policy="raise")(state, data[0])
    step = loopkit.with_nan_guard(loopkit.train_step(_nan_grad_loss(mse_loss, "2.bias")), policy="raise")
    with pytest.raises(loopkit.NonFiniteError) as info:
        step(state, data[1])
    message = str(info.value)
    assert "non-finite gradient" in message and "'2.bias'" in message and "step 1" in message
    assert "'0.weight'" not in message and "'2.weight'" not in message


def test_raise_policy_under_accumulation_raises_on_the_bad_micro_batch(make_mlp, make_batches, mse_loss, make_sgd_state):
    data = make_batches(2)
    step = loopkit.with_grad_accum(loopkit.with_nan_guard(loopkit.train_step(mse_loss), policy="raise"), every=2)
    state, _ = step(make_sgd_state(make_mlp(0)), data[0])
    with pytest.raises(loopkit.NonFiniteError, match="non-finite loss.*step 0"):
        step(state, _nan_batch(data[1]))


@pytest.mark.parametrize("accumulated", [False, True])
def test_a_second_guard_is_refused_naming_both_policies(mse_loss, accumulated):
    """Two guards were accepted, and the inner one acted alone ('raise' inside 'skip' raised at the first NaN);
    refused, as with_amp and with_grad_accum twice are, across with_grad_accum and with_grad_clip too."""
    inner = loopkit.with_nan_guard(loopkit.train_step(mse_loss), policy="raise")
    between = loopkit.with_grad_clip(loopkit.with_grad_accum(inner, every=2) if accumulated else inner, max_norm=1.0)
    with pytest.raises(TypeError, match=r"with_nan_guard cannot wrap with_nan_guard: the one inside \(policy='raise'\) "
                                        r".*this one \(policy='skip'\) would never see one; apply with_nan_guard once"):
        loopkit.with_nan_guard(between, policy="skip")


def test_nonfinite_error_is_a_floating_point_error():
    assert issubclass(loopkit.NonFiniteError, FloatingPointError)


@pytest.mark.parametrize("policy", ["ignore", "SKIP", None, 1])
def test_unknown_policy_is_refused(policy, mse_loss):
    with pytest.raises(ValueError) as info:
        loopkit.with_nan_guard(loopkit.train_step(mse_loss), policy=policy)
    assert "with_nan_guard: policy must be 'skip' or 'raise'" in str(info.value) and repr(policy) in str(info.value)


def test_an_fp16_overflow_skip_is_not_counted_as_a_guard_skip(make_mlp, make_batches, mse_loss, make_sgd_state):
    """The loss scaler's own overflow skips the update, but the guard saw nothing: its total stays 0."""
    step = loopkit.with_nan_guard(loopkit.with_amp(loopkit.train_step(mse_loss), dtype=torch.float16, init_scale=1e38))
    state, metrics = step(make_sgd_state(make_mlp()), make_batches(1)[0])
    assert float(metrics["amp/skipped"]) == 1.0 and float(metrics["nan_guard/skipped"]) == 0.0
    assert state.step == 0 and state.extras.get("nan_guard/skipped_total", 0) == 0


def _sparse_loss(model, batch):
    idx, bad = batch
    out = model(idx)
    loss = out.pow(2).mean()
    if bad:  # a finite loss (0 added) with NaN gradients: sqrt's slope at 0 is inf, times 0
        loss = loss + (out * 0).sqrt().sum()
    return loss


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_sparse_gradients_are_guarded_like_dense_ones(policy, assert_trees_equal):
    """nn.Embedding(sparse=True) with SparseAdam: a NaN in a sparse gradient's values is caught;
    the clean batches give the raw SparseAdam loop's weights."""
    data = [(torch.tensor([[1, 2, 2]]), bad) for bad in (False, True, False)]

    def make():
        torch.manual_seed(0)
        model = torch.nn.Embedding(10, 3, sparse=True)
        return model, torch.optim.SparseAdam(model.parameters(), lr=0.1)

    ref, ref_opt = make()
    for batch in (data[0], data[2]):
        ref_opt.zero_grad()
        _sparse_loss(ref, batch).backward()
        ref_opt.step()
    step = loopkit.with_nan_guard(loopkit.train_step(_sparse_loss), policy=policy)
    state = loopkit.TrainState.create(*make())
    state, _ = step(state, data[0])
    if policy == "raise":
        with pytest.raises(loopkit.NonFiniteError, match="non-finite gradient of 'weight'"):
            step(state, data[1])
    else:
        state, metrics = step(state, data[1])
        assert float(metrics["loss"]) < float("inf") and float(metrics["nan_guard/skipped"]) == 1.0
        assert state.step == 1
    state, _ = step(state, data[2])
    assert_trees_equal(state.model.weight, ref.weight)


# --- policy="raise" leaves the state whole ---------------------------------------------------


class _BadAt:
    """``loss_fn``, except that its call number ``at`` (counted from 1) returns a NaN loss (``bad="loss"``)
    or a finite loss whose gradient is NaN (``bad="gradient"``), once."""

    def __init__(self, loss_fn, at, bad):
        self.loss_fn, self.at, self.calls = loss_fn, at, 0
        self.bad = _nan_grad_loss(loss_fn) if bad == "gradient" else (lambda m, b: loss_fn(m, b) * float("nan"))

    def __call__(self, model, batch):
        self.calls += 1
        return (self.bad if self.calls == self.at else self.loss_fn)(model, batch)


def _raising(loss_fn, nesting="plain", every=4):
    base = loopkit.train_step(loss_fn)
    if nesting == "guard(accum)":
        return loopkit.with_nan_guard(loopkit.with_grad_accum(base, every=every), policy="raise")
    if nesting == "accum(guard)":
        return loopkit.with_grad_accum(loopkit.with_nan_guard(base, policy="raise"), every=every)
    return loopkit.with_nan_guard(base, policy="raise")


def _run(step, state, batches):
    for batch in batches:
        state, _ = step(state, batch)
    return state


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_a_raise_leaves_a_donated_state_whole_as_a_run_without_the_bad_batch(
    bad, make_mlp, make_batches, mse_loss, make_adam_state, take_snapshot, assert_trees_equal
):
    data = make_batches(6)
    failing = _BadAt(mse_loss, 4, bad)
    step = loopkit.donate(_raising(failing))
    state = _run(step, make_adam_state(make_mlp(0), scheduler=True), data[:3])
    before = take_snapshot(state)
    with pytest.raises(loopkit.NonFiniteError, match=f"non-finite {bad}.*at step 3 \\(epoch 0, batch 3\\)") as info:
        step(state, data[3])
    state.check_usable()  # no DonatedStateError: the guard stopped the update, and put the gradients back
    assert loopkit.state_at_error(info.value) is state
    assert_trees_equal(take_snapshot(state), before)  # gradients (none) included
    # it is the state of a run that never saw the bad batch, and trains on as that run does
    reference = _run(loopkit.train_step(mse_loss), make_adam_state(make_mlp(0), scheduler=True), data[:3])
    assert_trees_equal(take_snapshot(state), take_snapshot(reference))
    state = _run(step, state, data[3:])
    reference = _run(loopkit.train_step(mse_loss), reference, data[3:])
    assert_trees_equal(take_snapshot(state), take_snapshot(reference))


def test_after_a_raise_in_a_pure_call_the_given_state_is_unchanged_and_is_the_state_at_error(
    make_mlp, make_batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    data = make_batches(3)
    step = _raising(_BadAt(mse_loss, 3, "gradient"))
    state = _run(step, make_sgd_state(make_mlp(0)), data[:2])
    before = take_snapshot(state)
    with pytest.raises(loopkit.NonFiniteError) as info:
        step(state, data[2])
    assert_trees_equal(take_snapshot(state), before)
    assert_trees_equal(take_snapshot(loopkit.state_at_error(info.value)), before)  # the call's copy, put back


@pytest.mark.parametrize("nesting, bad", [
    ("accum(guard)", "loss"), ("accum(guard)", "gradient"), ("guard(accum)", "loss"),
])
def test_under_accumulation_a_raise_at_the_third_micro_batch_keeps_the_sum_of_the_first_two(
    nesting, bad, make_mlp, make_batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """every=4, the NaN in the 3rd micro-batch of the second group: the state the call got comes back, its
    accumulated gradient (micro-batches 1-2) bit for bit, and finishing the group gives the clean run's update.
    (A guard outside with_grad_accum checks each call's loss, and the summed gradient only at the update.)"""
    data = make_batches(8)
    step = loopkit.donate(_raising(_BadAt(mse_loss, 7, bad), nesting))
    state = _run(step, make_sgd_state(make_mlp(0)), data[:6])
    assert state.step == 1 and state.extras["accum/count"] == 2
    before = take_snapshot(state)
    assert all(g is not None for g in before["grads"].values())  # the group's running sum
    with pytest.raises(loopkit.NonFiniteError, match=f"non-finite {bad}.*at step 1 \\(epoch 0, batch 6\\)") as info:
        step(state, data[6])
    assert loopkit.state_at_error(info.value) is state
    assert_trees_equal(take_snapshot(state), before)
    reference = _run(loopkit.donate(_raising(mse_loss, nesting)), make_sgd_state(make_mlp(0)), data[:6])
    assert_trees_equal(take_snapshot(state), take_snapshot(reference))
    state = _run(step, state, data[6:])
    reference = _run(loopkit.donate(_raising(mse_loss, nesting)), reference, data[6:])
    assert state.step == 2
    assert_trees_equal(take_snapshot(state), take_snapshot(reference))


def test_a_guard_outside_accumulation_that_finds_the_summed_gradient_bad_claims_no_whole_state(
    make_mlp, make_batches, mse_loss, make_sgd_state
):
    """The NaN gradient of micro-batch 3 is found in the sum at the update (call 4), whose backward added
    into the sum in place: the state the call got cannot be put back without a copy, so none is claimed."""
    data = make_batches(4)
    step = loopkit.donate(_raising(_BadAt(mse_loss, 3, "gradient"), "guard(accum)"))
    state = _run(step, make_sgd_state(make_mlp(0)), data[:3])
    with pytest.raises(loopkit.NonFiniteError, match="non-finite gradient.*at step 0 \\(epoch 0, batch 3\\)") as info:
        step(state, data[3])
    assert loopkit.state_at_error(info.value) is None
    with pytest.raises(loopkit.DonatedStateError):
        state.check_usable()


def test_a_parameter_outside_the_optimizer_that_takes_gradients_leaves_no_whole_state(make_mlp, make_batches, mse_loss):
    """Its gradient gathers every backward's, the failing one's too, and was not kept: no state is claimed
    whole after a refused gradient. A refused loss comes before the backward: the state is whole then."""
    for bad, whole in (("gradient", False), ("loss", True)):
        model = make_mlp(0)
        state = loopkit.TrainState.create(model, torch.optim.SGD(model[2].parameters(), lr=0.1))  # not model[0]
        step = loopkit.donate(_raising(_BadAt(mse_loss, 2, bad)))
        state = _run(step, state, make_batches(1))
        outside = model[0].weight.grad.clone()
        with pytest.raises(loopkit.NonFiniteError) as info:
            step(state, make_batches(2)[1])
        assert (loopkit.state_at_error(info.value) is state) is whole
        assert torch.equal(model[0].weight.grad, outside) is whole  # the refused backward added into it


@pytest.mark.parametrize("dtype, bad", [(torch.bfloat16, "loss"), (torch.bfloat16, "gradient"), (torch.float16, "loss")])
@pytest.mark.parametrize("order", ["guard(amp)", "amp(guard)"])
def test_under_amp_a_raise_leaves_the_donated_state_whole(
    order, dtype, bad, make_mlp, make_batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """(Under float16 the loss scaler owns non-finite gradients: the guard checks the loss only.)"""
    scaler = {"init_scale": 2.0**10} if dtype == torch.float16 else {}  # (bfloat16 refuses a scaler's options)

    def build(loss_fn):
        base = loopkit.train_step(loss_fn)
        if order == "guard(amp)":
            return loopkit.donate(loopkit.with_nan_guard(loopkit.with_amp(base, dtype=dtype, **scaler), policy="raise"))
        return loopkit.donate(loopkit.with_amp(loopkit.with_nan_guard(base, policy="raise"), dtype=dtype, **scaler))

    data = make_batches(4)
    step = build(_BadAt(mse_loss, 3, bad))
    state = _run(step, make_sgd_state(make_mlp(0)), data[:2])
    before = take_snapshot(state)
    with pytest.raises(loopkit.NonFiniteError, match=f"non-finite {bad}.*\\(epoch 0, batch 2\\)") as info:
        step(state, data[2])
    assert loopkit.state_at_error(info.value) is state
    assert_trees_equal(take_snapshot(state), before)  # the loss scale too, under float16
    state = _run(step, state, data[2:])
    reference = _run(build(mse_loss), make_sgd_state(make_mlp(0)), data)
    assert_trees_equal(take_snapshot(state), take_snapshot(reference))


@pytest.mark.parametrize("nesting, bad", [
    ("plain", "loss"), ("plain", "gradient"), ("guard(accum)", "loss"), ("accum(guard)", "loss"), ("accum(guard)", "gradient"),
])
def test_under_run_epochs_state_at_error_is_the_newest_whole_state_and_a_relaunch_ends_as_the_uninterrupted_run(
    nesting, bad, make_mlp, make_batches, mse_loss, make_adam_state, take_snapshot, assert_trees_equal
):
    """One bad batch (the 7th: under every=4 the 3rd micro-batch of the second group) in a fit of two epochs."""
    data = make_batches(10)
    whole, whole_history = loopkit.run_epochs(
        _raising(mse_loss, nesting), make_adam_state(make_mlp(0)), data, epochs=2, progress=False
    )
    given = make_adam_state(make_mlp(0))
    with pytest.raises(loopkit.NonFiniteError, match=f"non-finite {bad}") as caught:
        loopkit.run_epochs(_raising(_BadAt(mse_loss, 7, bad), nesting), given, data, epochs=2, progress=False)
    left = loopkit.state_at_error(caught.value)
    assert left is not None
    assert (left.step, left.epoch, left.batch_index) == ((6 if nesting == "plain" else 1), 0, 6)
    # the state the 6 batches before the bad one give (by hand): under every=4 the gradients hold the sum of two
    by_hand = take_snapshot(_run(_raising(mse_loss, nesting), make_adam_state(make_mlp(0)), data[:6]))
    for part in ("params", "grads", "optimizer", "rng"):
        assert_trees_equal(take_snapshot(left)[part], by_hand[part])
    assert left.extras.get("accum/count") == by_hand["extras"].get("accum/count")
    resumed, history = loopkit.run_epochs(_raising(mse_loss, nesting), left, data, epochs=2, progress=False)
    assert history == whole_history  # the first epoch's means kept the 6 batches before the failure
    assert_trees_equal(take_snapshot(resumed)["params"], take_snapshot(whole)["params"])
    assert_trees_equal(take_snapshot(resumed)["optimizer"], take_snapshot(whole)["optimizer"])


def test_a_raising_guard_changes_nothing_on_clean_batches(
    make_mlp, make_batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """Outside with_grad_accum, the loss of a call with a group under way is checked before its backward: the
    arithmetic is the unguarded step's, bit for bit."""
    data = make_batches(7)
    guarded = _run(_raising(mse_loss, "guard(accum)"), make_sgd_state(make_mlp(0)), data)
    plain = _run(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=4), make_sgd_state(make_mlp(0)), data)
    assert_trees_equal(take_snapshot(guarded), take_snapshot(plain))


def test_errors_of_the_loss_fn_checked_before_the_backward_still_name_it(make_mlp, make_batches, mse_loss, make_sgd_state):
    def vector_loss(model, batch):
        return (model(batch[0]) - batch[1]) ** 2

    calls = iter([mse_loss, vector_loss])
    step = _raising(lambda m, b: next(calls)(m, b), "guard(accum)")
    state, _ = step(make_sgd_state(make_mlp(0)), make_batches(1)[0])
    with pytest.raises(ValueError, match="loss_fn .*<lambda> returned a loss of shape"):
        step(state, make_batches(2)[1])


class _ComplexModel(torch.nn.Module):
    """A complex weight (a spectral layer's) beside a real one; ``sqrt(|w x|)`` has an infinite slope where
    ``w x`` is 0, so a batch with a zero gives a finite loss and a non-finite complex gradient."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5 + 0.25j, 1 + 1j, -0.5j], dtype=torch.complex64))
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x).pow(2).mean() + (self.w * x[0]).abs().sqrt().sum()


_COMPLEX_BATCHES = [torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([[2.0, 1.0, 1.0]])]


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_complex_parameters_nonfinite_gradient_is_caught(policy, assert_trees_equal):
    """The guard checks a complex gradient by its real and imaginary parts: the bad batch's update is
    skipped (or refused, naming the parameter), and the rest equals a raw loop without that batch."""

    def make():
        torch.manual_seed(0)
        model = _ComplexModel()
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    ref, ref_opt = make()
    for x in (_COMPLEX_BATCHES[0], _COMPLEX_BATCHES[2]):
        ref_opt.zero_grad()
        ref(x).backward()
        ref_opt.step()
    step = loopkit.with_nan_guard(loopkit.train_step(lambda m, x: m(x)), policy=policy)
    state, _ = step(loopkit.TrainState.create(*make()), _COMPLEX_BATCHES[0])
    if policy == "raise":
        with pytest.raises(loopkit.NonFiniteError, match="non-finite gradient of 'w'"):
            step(state, _COMPLEX_BATCHES[1])
    else:
        state, metrics = step(state, _COMPLEX_BATCHES[1])
        assert torch.isfinite(metrics["loss"]) and float(metrics["nan_guard/skipped"]) == 1.0
    state, _ = step(state, _COMPLEX_BATCHES[2])
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref.named_parameters()))


def _inf_grad_loss(mse_loss, name="2.bias"):
    """A finite loss whose gradient for parameter ``name`` alone is +inf (d/du sqrt(u) at u=0)."""

    def loss_fn(model, batch):
        p = dict(model.named_parameters())[name]
        u = p.sum() - p.sum().detach()  # == 0, with gradient 1 for every element of p
        return mse_loss(model, batch) + torch.sqrt(u)

    return loss_fn


@pytest.mark.parametrize("accumulate", [False, True])
def test_a_guard_outside_a_value_clip_still_skips_an_infinite_gradient(
    accumulate, make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal
):
    """clip_grad_value_ clamps inf to +max_value: the guard outside checks the gradients before that clamping
    (without it the update went through with the clamped gradient), and the result is a raw loop that skips the
    bad update (the group of it, under accumulation) and then makes the clean one, clipped."""
    data = make_batches(4)
    bad = _inf_grad_loss(mse_loss)
    calls = [(bad, data[0]), (mse_loss, data[1])] if accumulate else [(bad, data[0])]
    clean = [(mse_loss, data[2]), (mse_loss, data[3])] if accumulate else [(mse_loss, data[2])]

    def stepped(loss_fn):
        step = loopkit.with_grad_clip(loopkit.train_step(loss_fn), max_value=0.01)
        return loopkit.with_nan_guard(loopkit.with_grad_accum(step, every=2) if accumulate else step)

    # without the guard, the clamped infinite gradient moves the parameter, as a raw clip_grad_value_ loop's
    unguarded = loopkit.with_grad_clip(loopkit.train_step(bad), max_value=0.01)(make_sgd_state(make_mlp(0)), data[0])[0]
    assert unguarded.step == 1 and _finite(unguarded)

    start = make_sgd_state(make_mlp(0))
    state = start
    for loss_fn, batch in calls:
        state, metrics = stepped(loss_fn)(state, batch)
    assert float(metrics["nan_guard/skipped"]) == 1.0 and state.step == 0
    assert_trees_equal(dict(state.model.named_parameters()), dict(start.model.named_parameters()))
    for loss_fn, batch in clean:
        state, metrics = stepped(loss_fn)(state, batch)
    assert float(metrics["nan_guard/skipped"]) == 0.0 and state.step == 1

    # the raw loop: the bad update never made; the clean one with each batch's gradient clamped, then its share
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    params = list(ref_model.parameters())
    for _, batch in clean:
        grads = torch.autograd.grad(mse_loss(ref_model, batch), params)
        for p, g in zip(params, grads):
            g = g.clamp(-0.01, 0.01) / len(clean) if accumulate else g.clamp(-0.01, 0.01)
            p.grad = g if p.grad is None else p.grad + g
    ref_opt.step()
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(dict(state.model.named_parameters())[name], p, rtol=0, atol=0)


@pytest.mark.parametrize("accumulate", [False, True])
def test_a_raising_guard_outside_a_value_clip_names_the_infinite_gradient(
    accumulate, make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal
):
    step = loopkit.with_grad_clip(loopkit.train_step(_inf_grad_loss(mse_loss)), max_value=0.01)
    step = loopkit.with_nan_guard(loopkit.with_grad_accum(step, every=2) if accumulate else step, policy="raise")
    start = make_sgd_state(make_mlp(0))
    with pytest.raises(loopkit.NonFiniteError, match="non-finite gradient of '2.bias' at step 0"):
        step(start, make_batches(1)[0])
    assert all(p.grad is None for p in start.model.parameters())


def test_a_guard_outside_a_value_clip_scans_the_gradients_once_an_update(monkeypatch, make_mlp, make_batches, mse_loss,
                                                                          make_sgd_state):
    """Checked before the clamp, the guard does not scan the clamped (finite) gradients again at its own turn."""
    scans = []
    real = torch._amp_foreach_non_finite_check_and_unscale_

    def counting(*args):
        scans.append(1)
        return real(*args)

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", counting)
    step = loopkit.with_nan_guard(loopkit.with_grad_clip(loopkit.train_step(mse_loss), max_value=0.01))
    step(make_sgd_state(make_mlp(0)), make_batches(1)[0])
    assert len(scans) == 1


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_raising_guard_puts_back_what_the_refused_forward_wrote_into_the_buffers(every, where, assert_trees_equal):
    """A NaN batch's forward wrote into BatchNorm's running statistics, in place, before the guard refused it (NaN
    for a NaN input): the state left whole (state_at_error) then evaluated to NaN for good. Its buffers are now those
    of the calls before the batch (the reference: the donated step over them), mid-group too, for a NaN loss and for
    a NaN gradient of a finite loss."""
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(6)]
    bad = data[3][0].clone()
    bad[0, 0] = float("nan") if where == "loss" else 1e3  # ("gradient": a finite batch the loss below marks bad)
    poisoned = data[:3] + [(bad, data[3][1])] + data[4:]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
            self.scale = torch.nn.Parameter(torch.ones(()))

    def loss_fn(model, batch):
        x, y = batch
        value = ((model.body(x) - y) ** 2).mean()
        marked = (x.abs().max() > 100).float()  # sqrt(scale * 0): a 0 term whose gradient is inf * 0, NaN
        return value + torch.sqrt(model.scale * (1 - marked)) - torch.sqrt(model.scale.detach() * (1 - marked))

    def fresh():
        model = Net()
        return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))

    step = loopkit.with_nan_guard(loopkit.train_step(loss_fn), policy="raise")
    if every > 1:
        step = loopkit.with_grad_accum(step, every=every)
    reference = fresh()
    for batch in data[:3]:
        reference, _ = loopkit.donate(step)(reference, batch)
    with pytest.raises(loopkit.NonFiniteError, match=where) as info:
        loopkit.run_epochs(step, fresh(), poisoned, epochs=1, progress=False)
    whole = loopkit.state_at_error(info.value)
    assert whole is not None and whole.batch_index == 3 and whole.step == reference.step
    assert torch.isfinite(whole.model.body[1].running_mean).all()
    kept, expected = whole.state_dict(), reference.state_dict()
    assert_trees_equal({k: kept[k] for k in ("model", "grads", "optimizer", "step", "batch_index")},
                       {k: expected[k] for k in ("model", "grads", "optimizer", "step", "batch_index")})
    assert whole.extras.get("accum/count") == reference.extras.get("accum/count")


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_guard_trains_a_model_with_a_lazy_module_as_the_plain_step(policy, assert_trees_equal):
    """The buffers a guard keeps (raise: before each forward; skip: at a group's start) were copied before a lazy
    module's first forward made them: torch refused the copy of an uninitialized buffer, and the state was lost."""
    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LazyBatchNorm1d(), torch.nn.Linear(3, 1))
        return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))

    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(3)]
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    guarded, _ = loopkit.run_epochs(loopkit.with_nan_guard(loopkit.train_step(loss_fn), policy=policy), fresh(), data,
                                    epochs=1, progress=False)
    plain, _ = loopkit.run_epochs(loopkit.train_step(loss_fn), fresh(), data, epochs=1, progress=False)
    assert_trees_equal(guarded.state_dict()["model"], plain.state_dict()["model"])


def _good_losses(bad, data, make_mlp, mse_loss, epochs):
    """A raw loop's epochs that leave out the bad batches: each epoch's losses of the good batches (before their update)
    and of the gradient norms, the model and optimizer."""
    torch.manual_seed(0)
    model = make_mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    per_epoch = []
    for _ in range(epochs):
        losses, norms = [], []
        for k, batch in enumerate(data):
            if k in bad:
                continue
            optimizer.zero_grad()
            loss = mse_loss(model, batch)
            loss.backward()
            norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
            optimizer.step()
            losses.append(float(loss.detach()))
        per_epoch.append((sum(losses) / len(losses), sum(norms) / len(norms)))
    return per_epoch


def test_a_skipped_batch_adds_nothing_to_the_epoch_means_and_early_stopping_on_train_loss_goes_on(
    make_mlp, make_batches, mse_loss, make_sgd_state,
):
    """The skipped call's NaN loss (and NaN gradient norm) went into the epoch means: train/loss was NaN, and
    EarlyStopping("train/loss") (check_finite) stopped the fit at once. As Lightning's training_step returning None
    for a non-finite loss before self.log: the means are those of the other batches, the raw loop's without them."""
    data = make_batches(6)
    data = [_nan_batch(b) if k == 2 else b for k, b in enumerate(data)]
    expected = _good_losses({2}, data, make_mlp, mse_loss, epochs=3)
    step = loopkit.with_nan_guard(loopkit.with_grad_norm(loopkit.train_step(mse_loss)))
    state, history = loopkit.run_epochs(step, make_sgd_state(make_mlp(0)), data, epochs=3, progress=False,
                                        callbacks=[loopkit.EarlyStopping("train/loss", patience=5)])
    assert len(history) == 3 and state.extras["nan_guard/skipped_total"] == 3
    for record, (loss, norm) in zip(history, expected):
        assert record["train/loss"] == pytest.approx(loss, rel=1e-6)
        assert record["train/grad_2.0_norm_total"] == pytest.approx(norm, rel=1e-5)
        assert record["train/nan_guard/skipped"] == pytest.approx(1 / 6)  # still the fraction of calls skipped


def test_a_skipped_batch_adds_nothing_to_the_logged_window(make_mlp, make_batches, mse_loss, make_sgd_state):
    """with_logging's window of the calls since its last row leaves the skipped call out too (its row the mean of
    the other calls); a window of skipped calls alone has no train/loss mean."""
    from loopkit._window import LOGGED
    from tests.transforms.test_logging import MemoryLogger

    data = make_batches(6)
    bad = {1, 4, 5}
    losses = [float(mse_loss(make_mlp(0), b).detach()) for b in data]  # (lr=0: every call sees the first model)
    logger = MemoryLogger()
    step = loopkit.with_logging(loopkit.with_nan_guard(loopkit.train_step(mse_loss)), logger, every_n_steps=1)
    state = make_sgd_state(make_mlp(0), lr=0.0)
    for k, batch in enumerate(data):
        state, _ = step(state, _nan_batch(batch) if k in bad else batch)
    assert [v for _, v in logger.series("train/loss")] == pytest.approx([losses[0], losses[2], losses[3]])
    assert [v for _, v in logger.series("train/nan_guard/skipped")] == [0.0, 0.5, 0.0]
    assert LOGGED.means(state.extras) == {"nan_guard/skipped": 1.0}  # the two skipped calls at the end, not logged yet


@pytest.mark.parametrize("via", ["state_dict", "checkpoint"])
def test_a_resume_mid_epoch_with_a_skipped_batch_in_the_window_gives_the_uninterrupted_epoch_means(
    tmp_path, via, make_mlp, make_batches, mse_loss, make_sgd_state,
):
    """The epoch's window, saved mid-epoch with a skipped call's record in it (its count a device tensor), comes
    back whole: the resumed fit's epoch means are the uninterrupted fit's."""
    data = make_batches(7)
    data = [_nan_batch(b) if k == 1 else b for k, b in enumerate(data)]
    step = loopkit.with_nan_guard(loopkit.train_step(mse_loss))
    _, whole = loopkit.run_epochs(step, make_sgd_state(make_mlp(0)), data, epochs=2, progress=False)
    mid, _ = loopkit.run_epochs(step, make_sgd_state(make_mlp(0)), data, max_steps=3, progress=False)
    assert mid.batch_index == 4 and mid.extras["nan_guard/skipped_total"] == 1
    template = make_sgd_state(make_mlp(5))
    if via == "state_dict":
        resumed = template.load_state_dict(mid.state_dict())
    else:
        resumed = loopkit.restore(template, loopkit.checkpoint.save(mid, tmp_path))
    _, rest = loopkit.run_epochs(step, resumed, data, epochs=2, progress=False)
    assert rest == whole


def test_a_skipped_record_is_left_out_of_folded_sums_across_a_resume(make_mlp, make_batches, mse_loss, make_sgd_state):
    """Past the window's fold (32 records summed on the device, the skipped ones weighing 0): a state dict round trip
    mid-epoch keeps the weighed counts, and the epoch's mean is the uninterrupted one."""
    data = make_batches(40, batch_size=2)
    data = [_nan_batch(b) if k in (3, 33) else b for k, b in enumerate(data)]
    step = loopkit.with_nan_guard(loopkit.train_step(mse_loss))
    _, whole = loopkit.run_epochs(step, make_sgd_state(make_mlp(0), lr=0.01), data, epochs=1, progress=False)
    mid, _ = loopkit.run_epochs(step, make_sgd_state(make_mlp(0), lr=0.01), data, max_steps=35, progress=False)
    assert mid.batch_index == 37
    resumed = make_sgd_state(make_mlp(5), lr=0.01).load_state_dict(mid.state_dict())
    _, rest = loopkit.run_epochs(step, resumed, data, epochs=1, progress=False)
    assert rest == whole and whole[0]["train/loss"] == whole[0]["train/loss"]  # (not NaN)


def test_under_accumulation_the_skipped_groups_micro_batches_add_nothing_to_the_epoch_means(
    make_mlp, make_batches, mse_loss, make_sgd_state,
):
    """Under with_grad_accum the guard drops the whole group; its flag comes with the call that ends it. The group's
    earlier micro-batches (one with the NaN loss) are left out too, also when the group spans the window's fold (32
    records: the group of batches 30-32 is held back until its flag comes), and the epoch's partial group, flushed at
    its end. (lr=0: every loss is the first model's, the mean a plain one over the kept groups' batches.)"""
    data = make_batches(40, batch_size=2)
    bad = {4, 30, 39}  # groups of 3: (3, 4, 5), (30, 31, 32), and the flushed (39,)
    data = [_nan_batch(b) if k in bad else b for k, b in enumerate(data)]
    model = make_mlp(0)
    kept = [float(mse_loss(model, b).detach()) for k, b in enumerate(data) if k // 3 not in {k // 3 for k in bad}]
    step = loopkit.with_nan_guard(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=3))
    state, history = loopkit.run_epochs(step, make_sgd_state(make_mlp(0), lr=0.0), data, epochs=1, progress=False)
    assert state.extras["nan_guard/skipped_total"] == 3
    assert history[0]["train/loss"] == pytest.approx(sum(kept) / len(kept), rel=1e-6)
    assert history[0]["train/nan_guard/skipped"] == pytest.approx(3 / 14)  # 14 updates (13 groups, one flushed)


@pytest.mark.parametrize("nesting", ["guard(accum)", "accum(guard)"])
def test_a_skipped_group_longer_than_the_windows_fold_adds_nothing_to_the_means(
    nesting, make_mlp, make_batches, mse_loss, make_sgd_state,
):
    """Groups of 40 micro-batches, more than a window folds at once (32): the first fold came before the group's
    flag, so its NaN loss was summed as a plain record (train/loss NaN in the epoch means and the logged row).
    Reference: the plain mean of the kept group's losses (lr=0: every loss is the first model's)."""
    every = 40
    data = make_batches(2 * every, batch_size=2)
    data[5] = _nan_batch(data[5])  # group 0 (batches 0-39) skipped
    model = make_mlp(0)
    kept = [float(mse_loss(model, b).detach()) for b in data[every:]]
    base = loopkit.train_step(mse_loss)
    inner = (loopkit.with_nan_guard(loopkit.with_grad_accum(base, every=every)) if nesting == "guard(accum)"
             else loopkit.with_grad_accum(loopkit.with_nan_guard(base), every=every))
    rows: list[dict] = []

    class Rows(loopkit.Logger):
        def _write_metrics(self, metrics, step):
            rows.append(dict(metrics))

    step = loopkit.with_logging(inner, Rows(), every_n_steps=1)
    state, history = loopkit.run_epochs(step, make_sgd_state(make_mlp(0), lr=0.0), data, epochs=1, progress=False)
    assert state.extras["nan_guard/skipped_total"] == 1
    assert history[0]["train/loss"] == pytest.approx(sum(kept) / len(kept), rel=1e-6)
    logged = [row["train/loss"] for row in rows if "train/loss" in row]
    assert logged == [pytest.approx(sum(kept) / len(kept), rel=1e-6)]  # the kept group's row alone (step 1)


@pytest.mark.parametrize("policy, nesting", [("raise", "guard"), ("raise", "accum(guard)"), ("skip", "guard")])
def test_a_guarded_steps_windows_still_fold_every_32_records_where_records_carry_no_open_group(
    policy, nesting, make_mlp, make_batches, mse_loss, make_sgd_state,
):
    """policy="raise" reports no skip flag: its windows held every record back from their folds (the whole epoch's
    records kept, in every mid-epoch checkpoint). Reference: the fold size, 32 records, as a step without a guard's;
    and the epoch mean is the plain mean of the calls' losses (lr=0)."""
    data = make_batches(100, batch_size=2)
    inner = loopkit.with_nan_guard(loopkit.train_step(mse_loss), policy=policy)
    if nesting == "accum(guard)":
        inner = loopkit.with_grad_accum(inner, every=2)
    longest = {"run_epochs/epoch": 0, "logging/pending": 0}

    class Pending(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            for key in longest:
                longest[key] = max(longest[key], len(state.extras.get(key, ())))

    class Quiet(loopkit.Logger):
        def _write_metrics(self, metrics, step):
            pass

    step = loopkit.with_logging(inner, Quiet(), every_n_steps=1000)
    model = make_mlp(0)
    expected = sum(float(mse_loss(model, b).detach()) for b in data) / len(data)
    with pytest.warns(UserWarning, match="fewer than the logging interval"):
        _, history = loopkit.run_epochs(step, make_sgd_state(make_mlp(0), lr=0.0), data, epochs=1,
                                        callbacks=[Pending()], progress=False)
    assert 0 < max(longest.values()) < 32, longest
    assert history[0]["train/loss"] == pytest.approx(expected, rel=1e-6)
