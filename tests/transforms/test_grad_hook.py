"""with_grad_hook against raw loops that call the same function where Lightning calls its hooks:
``on_before_optimizer_step`` (once per update, after unscaling, before clipping) and, inside accumulation,
on each micro-batch's own gradient; the gradients it changes are the ones the update uses."""

from __future__ import annotations

import pytest
import torch

import loopkit


def _surgery(model):
    """Halve the first layer's weight gradient, zero the last bias's: what the update must then use."""
    model[0].weight.grad.mul_(0.5)
    model[2].bias.grad.zero_()


def _recording_hook(seen):
    def hook(state):
        seen.append([p.grad.clone() for p in state.model.parameters()])
        _surgery(state.model)
        return {"hook/step": state.step, "hook/w0": state.model[0].weight.grad.abs().sum()}

    return hook


def _assert_grads_equal(seen, expected):
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_outside_accumulation_and_inside_clipping_it_is_on_before_optimizer_step(make_mlp, make_batches, mse_loss):
    data = make_batches(6)
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    expected = []
    for k, batch in enumerate(data, start=1):
        (mse_loss(ref_model, batch) / 2).backward()
        if k % 2 == 0:  # Lightning: on_before_optimizer_step on the summed gradient, then the clipping
            expected.append([p.grad.clone() for p in ref_model.parameters()])
            _surgery(ref_model)
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
            ref_opt.step()
            ref_opt.zero_grad()

    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    seen = []
    step = loopkit.train_step(mse_loss)
    step = loopkit.with_grad_clip(loopkit.with_grad_hook(loopkit.with_grad_accum(step, every=2), _recording_hook(seen)), max_norm=0.05)
    reported = []
    for batch in data:
        state, metrics = step(state, batch)
        if "hook/step" in metrics:
            reported.append((int(metrics["hook/step"]), float(metrics["hook/w0"])))
    _assert_grads_equal(seen, expected)
    for a, b in zip(state.model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    assert [r[0] for r in reported] == [0, 1, 2]  # updates before this one, as Lightning's global_step in its hook
    assert all(r[1] > 0 for r in reported)


def test_inside_accumulation_it_sees_each_micro_batchs_own_gradient(make_mlp, make_batches, mse_loss):
    data = make_batches(4)
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    expected, total = [], None
    for k, batch in enumerate(data, start=1):
        ref_opt.zero_grad()
        mse_loss(ref_model, batch).backward()
        expected.append([p.grad.clone() for p in ref_model.parameters()])
        _surgery(ref_model)
        shares = [p.grad / 2 for p in ref_model.parameters()]
        total = shares if total is None else [t + s for t, s in zip(total, shares)]
        if k % 2 == 0:
            for p, g in zip(ref_model.parameters(), total):
                p.grad = g
            ref_opt.step()
            total = None

    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    seen = []
    step = loopkit.with_grad_accum(loopkit.with_grad_hook(loopkit.train_step(mse_loss), _recording_hook(seen)), every=2)
    for batch in data:
        state, metrics = step(state, batch)
        assert "hook/w0" in metrics  # every call reports it
    _assert_grads_equal(seen, expected)
    for a, b in zip(state.model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # the sum of the halves in another order


def test_under_float16_it_sees_the_unscaled_gradients_of_a_raw_grad_scaler_loop(make_mlp, make_batches, mse_loss):
    data = make_batches(3)
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    expected = []
    for batch in data:
        ref_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = mse_loss(ref_model, batch)
        scaler.scale(loss).backward()
        scaler.unscale_(ref_opt)
        expected.append([p.grad.clone() for p in ref_model.parameters()])
        _surgery(ref_model)
        scaler.step(ref_opt)
        scaler.update()

    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    seen = []
    step = loopkit.with_grad_hook(loopkit.train_step(mse_loss), _recording_hook(seen))
    step = loopkit.with_amp(step, dtype=torch.float16, init_scale=2.0**10)
    for batch in data:
        state, _ = step(state, batch)
    _assert_grads_equal(seen, expected)
    for a, b in zip(state.model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_the_given_state_is_unchanged_by_a_pure_step(make_mlp, make_batches, mse_loss, take_snapshot, assert_trees_equal):
    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.with_grad_hook(loopkit.train_step(mse_loss), lambda s: _surgery(s.model))
    before = take_snapshot(state)
    batch = make_batches(1)[0]
    first, _ = step(state, batch)
    assert_trees_equal(take_snapshot(state), before)
    second, _ = step(state, batch)
    assert_trees_equal(take_snapshot(first), take_snapshot(second))
    assert torch.equal(first.model[2].bias, model[2].bias)  # its gradient was zeroed: plain SGD leaves it


def test_under_logging_its_metrics_are_logged_as_train_metrics(make_mlp, make_batches, mse_loss):
    class Memory:
        def __init__(self):
            self.records = []

        def log_metrics(self, metrics, step):
            self.records.append((step, dict(metrics)))

        def log_hparams(self, hparams, metrics=None):
            pass

        def finalize(self):
            pass

    memory = Memory()
    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    values = []

    def hook(state):
        value = state.model[0].weight.grad.norm()
        values.append(float(value))
        return {"w0_norm": value}

    step = loopkit.with_logging(loopkit.with_grad_hook(loopkit.train_step(mse_loss), hook), memory, every_n_steps=2)
    loopkit.run_epochs(step, state, make_batches(4), epochs=1, progress=False)
    rows = [(s, m["train/w0_norm"]) for s, m in memory.records if "train/w0_norm" in m]
    assert rows[:2] == [(2, pytest.approx((values[0] + values[1]) / 2)), (4, pytest.approx((values[2] + values[3]) / 2))]


def test_bad_hooks_are_named(make_mlp, make_batches, mse_loss):
    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    batch = make_batches(1)[0]

    def two_args(state, extra):
        return None

    with pytest.raises(TypeError, match="with_grad_hook: fn .*two_args must take one argument, the state"):
        loopkit.with_grad_hook(loopkit.train_step(mse_loss), two_args)
    with pytest.raises(TypeError, match="with_grad_hook: fn must be callable as fn\\(state\\), got int"):
        loopkit.with_grad_hook(loopkit.train_step(mse_loss), 3)
    with pytest.raises(TypeError, match="with_grad_hook cannot wrap eval_step"):
        loopkit.with_grad_hook(loopkit.eval_step(lambda m, b: {}), lambda s: None)

    def gives_loss(state):
        return {"loss": 1.0}

    with pytest.raises(ValueError, match="with_grad_hook's fn .*gives_loss returned a metric named 'loss', which the step reports too"):
        loopkit.with_grad_hook(loopkit.train_step(mse_loss), gives_loss)(state, batch)

    def gives_list(state):
        return [1.0]

    with pytest.raises(TypeError, match="with_grad_hook's fn .*gives_list returned a list; expected a dict of metrics or None"):
        loopkit.with_grad_hook(loopkit.train_step(mse_loss), gives_list)(state, batch)
    with pytest.raises(TypeError, match="returned a Tensor; expected a dict of metrics or None .an in-place op"):
        loopkit.with_grad_hook(loopkit.train_step(mse_loss), lambda s: s.model[0].weight.grad.mul_(0.5))(state, batch)

    def gives_text(state):
        return {"note": "high"}

    with pytest.raises(TypeError, match="metric 'note' from with_grad_hook's fn .*gives_text is a str"):
        loopkit.with_grad_hook(loopkit.train_step(mse_loss), gives_text)(state, batch)


@pytest.mark.parametrize(
    ("outer", "owner"),
    [
        (lambda s: loopkit.with_grad_clip(s, max_norm=1.0), "with_grad_clip"),
        (lambda s: loopkit.with_nan_guard(s), "with_nan_guard"),
        (lambda s: loopkit.with_amp(s, dtype=torch.float16), "with_amp"),
    ],
)
def test_a_metric_name_a_transform_outside_it_reports_is_refused(outer, owner, make_mlp, make_batches, mse_loss):
    """(Those transforms write their metric after the hook: the hook's value would be lost without a word.)"""
    name = {"with_grad_clip": "grad_norm", "with_nan_guard": "nan_guard/skipped", "with_amp": "amp/skipped"}[owner]
    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = outer(loopkit.with_grad_hook(loopkit.train_step(mse_loss), lambda s: {name: 1.0}))
    with pytest.raises(ValueError, match=f"returned a metric named '{name}', which {owner} reports too"):
        step(state, make_batches(1)[0])


class _WithUnused(torch.nn.Module):
    """A layer, and a parameter no forward uses: no gradient until a hook gives it one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 2)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.layer(x)


def _pull(state):  # an L2 pull on every parameter: gives `unused` a gradient where it had none
    for p in state.model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(p.detach(), alpha=0.5)


def _raw_pulled(data, loss_fn, every=1, clip=None):
    model = _WithUnused()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    total = None
    for k, batch in enumerate(data, start=1):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        _pull(type("State", (), {"model": model})())
        shares = [p.grad / every for p in model.parameters()]
        total = shares if total is None else [t + s for t, s in zip(total, shares)]
        if k % every == 0:
            for p, g in zip(model.parameters(), total):
                p.grad = g
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            total = None
    return model


@pytest.mark.parametrize(
    ("build", "every", "clip"),
    [
        (lambda s: loopkit.with_grad_clip(loopkit.with_grad_hook(s, _pull), max_norm=0.1), 1, 0.1),
        (lambda s: loopkit.with_grad_accum(loopkit.with_grad_hook(s, _pull), every=2), 2, None),
    ],
    ids=["clip_after_it", "inside_accumulation"],
)
def test_a_gradient_the_hook_gives_is_clipped_and_shared_as_the_others(build, every, clip, make_batches, mse_loss):
    data = make_batches(4, d_out=2)
    reference = _raw_pulled(data, mse_loss, every, clip)
    model = _WithUnused()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = build(loopkit.train_step(mse_loss))
    for batch in data:
        state, _ = step(state, batch)
    for a, b in zip(state.model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(state.model.unused, torch.ones(3))


def test_a_guard_outside_it_sees_a_non_finite_gradient_it_gives(make_batches, mse_loss):
    model = _WithUnused()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))

    def poison(state):
        state.model.unused.grad = torch.full((3,), float("nan"))

    step = loopkit.with_nan_guard(loopkit.with_grad_hook(loopkit.train_step(mse_loss), poison))
    state, metrics = step(state, make_batches(1)[0])
    assert float(metrics["nan_guard/skipped"]) == 1.0 and state.step == 0
    assert torch.equal(state.model.unused, torch.ones(3))


@pytest.mark.parametrize(
    "build",
    [
        lambda s, fn: loopkit.with_grad_accum(loopkit.with_grad_hook(s, fn), every=2),
        lambda s, fn: loopkit.with_nan_guard(loopkit.with_grad_hook(s, fn)),
        lambda s, fn: loopkit.with_grad_clip(loopkit.with_grad_hook(loopkit.with_grad_accum(s, every=2), fn), max_norm=0.1),
    ],
    ids=["inside_accumulation", "guard_outside", "outside_accumulation_clip_outside"],
)
def test_a_gradient_the_hook_takes_away_leaves_that_parameter_out_of_the_update(build, make_mlp, make_batches, mse_loss):
    """p.grad = None, the usual way to hold a parameter still for one update (torch's optimizers skip it)."""
    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    bias, weight = model[2].bias.detach().clone(), model[2].weight.detach().clone()

    def hold_bias(state):
        state.model[2].bias.grad = None

    step = build(loopkit.train_step(mse_loss), hold_bias)
    for batch in make_batches(4):
        state, _ = step(state, batch)
    assert state.step == (4 if "guard" in step.applied[-1] else 2)
    assert torch.equal(state.model[2].bias, bias) and not torch.equal(state.model[2].weight, weight)


def test_a_hook_metric_named_loss_is_refused_at_an_epochs_flush_too(make_mlp, make_batches, mse_loss):
    """(A flush reports no loss: without the check the hook's value would go into train/loss, mixed with the losses.)"""
    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.with_grad_hook(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=4), lambda s: {"loss": 123.0})
    with pytest.raises(ValueError, match="returned a metric named 'loss', which the step reports too"):
        loopkit.run_epochs(step, state, make_batches(1), epochs=1, progress=False)


class _RefusedAt:
    """A hook that returns a metric loopkit refuses (a str), or raises, at its ``at``-th call; else nothing."""

    def __init__(self, at, how):
        self.at, self.how, self.calls = at, how, 0

    def __call__(self, state):
        self.calls += 1
        if self.calls != self.at:
            return None
        if self.how == "raises":
            raise RuntimeError("the hook's own failure")
        return {"grad_max": "not a number"}


def _hooked(nesting, hook, loss_fn):
    base = loopkit.train_step(loss_fn)
    if nesting == "plain":
        return loopkit.with_grad_hook(base, hook)
    if nesting == "clip(hook)":
        return loopkit.with_grad_clip(loopkit.with_grad_hook(base, hook), max_norm=0.5)
    return loopkit.with_grad_accum(loopkit.with_grad_hook(base, hook), every=2)  # per micro-batch


@pytest.mark.parametrize("how", ["refused metric", "raises"])
@pytest.mark.parametrize("nesting, at, whole_step", [("plain", 1, 0), ("plain", 5, 4), ("clip(hook)", 5, 4), ("accum(hook)", 5, 2)])
def test_a_hook_that_fails_leaves_the_newest_whole_state_and_a_relaunch_ends_as_the_uninterrupted_run(
    how, nesting, at, whole_step, make_mlp, make_batches, mse_loss, make_adam_state, take_snapshot, assert_trees_equal
):
    """The hook fails after the backward, before the update (under every=2 at the first micro-batch of a group): the
    failing call's gradients are dropped, and the fit's state before that batch is whole, as a raw loop keeps the
    model its earlier updates trained; nothing is lost (SPEC: a metric that is not a number, before anything is lost)."""
    data = make_batches(8)
    whole, whole_history = loopkit.run_epochs(
        _hooked(nesting, lambda s: None, mse_loss), make_adam_state(make_mlp(0)), data, epochs=1, progress=False
    )
    given = make_adam_state(make_mlp(0))
    with pytest.raises((TypeError, RuntimeError), match="is a str|the hook's own failure") as caught:
        loopkit.run_epochs(_hooked(nesting, _RefusedAt(at, how), mse_loss), given, data, epochs=1, progress=False)
    left = loopkit.state_at_error(caught.value)
    assert left is not None
    assert (left.step, left.batch_index) == (whole_step, at - 1)
    assert all(p.grad is None for p in left.model.parameters())  # the failing call's gradients are not kept
    by_hand = take_snapshot(loopkit.run_epochs(
        _hooked(nesting, lambda s: None, mse_loss), make_adam_state(make_mlp(0)), data, epochs=1, max_steps=whole_step,
        progress=False,
    )[0]) if whole_step else take_snapshot(make_adam_state(make_mlp(0)))
    assert_trees_equal(take_snapshot(left)["params"], by_hand["params"])
    assert_trees_equal(take_snapshot(left)["optimizer"], by_hand["optimizer"])
    resumed, history = loopkit.run_epochs(_hooked(nesting, lambda s: None, mse_loss), left, data, epochs=1, progress=False)
    assert history == whole_history
    assert_trees_equal(take_snapshot(resumed)["params"], take_snapshot(whole)["params"])
    assert_trees_equal(take_snapshot(resumed)["optimizer"], take_snapshot(whole)["optimizer"])


@pytest.mark.parametrize("how", ["refused metric", "raises"])
@pytest.mark.parametrize("at", [3, 6])
def test_a_hook_inside_accumulation_that_fails_at_a_groups_last_micro_batch_leaves_the_group_so_far_whole(
    how, at, make_mlp, make_batches, mse_loss, make_adam_state, take_snapshot, assert_trees_equal
):
    """Inside with_grad_accum(every=3) the hook sees each micro-batch's own gradient, set apart from the group's sum:
    failing at a group's last micro-batch (before the update), it leaves the state before that batch, the group's
    first two micro-batches summed (as the same step takes them by hand), and a relaunch from it ends as the
    uninterrupted run (a raw loop whose hook never fails)."""
    def hooked(hook):
        return loopkit.with_grad_accum(loopkit.with_grad_hook(loopkit.train_step(mse_loss), hook), every=3)

    data = make_batches(6)
    whole, whole_history = loopkit.run_epochs(
        hooked(lambda s: None), make_adam_state(make_mlp(0)), data, epochs=2, progress=False)
    with pytest.raises((TypeError, RuntimeError), match="is a str|the hook's own failure") as caught:
        loopkit.run_epochs(hooked(_RefusedAt(at, how)), make_adam_state(make_mlp(0)), data, epochs=2, progress=False)
    left = loopkit.state_at_error(caught.value)
    assert left is not None
    assert (left.step, left.batch_index, left.extras["accum/count"]) == (at // 3 - 1, at - 1, 2)
    _assert_left_as_by_hand_and_resumes_whole(hooked, data[:at - 1], data, left, whole, whole_history,
                                              make_adam_state(make_mlp(0)), take_snapshot, assert_trees_equal)


def test_a_hook_outside_accumulation_that_fails_at_a_groups_last_micro_batch_leaves_no_whole_state(
    make_mlp, make_batches, mse_loss, make_adam_state
):
    """Outside with_grad_accum the hook runs on the summed gradient after the group's last backward, which added into
    the group's sum in place (no second set of gradients is kept, as in a raw loop): no state of the fit is whole
    then, and the error says so (with_grad_hook's docstring: put the hook inside, or relaunch from a checkpoint)."""
    step = loopkit.with_grad_hook(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=3), _RefusedAt(1, "raises"))
    with pytest.raises(RuntimeError, match="the hook's own failure") as caught:
        loopkit.run_epochs(step, make_adam_state(make_mlp(0)), make_batches(6), epochs=1, progress=False)
    assert loopkit.state_at_error(caught.value) is None
    assert any("no state of the fit is known whole" in note for note in caught.value.__notes__)


@pytest.mark.parametrize("how", ["refused metric", "raises"])
@pytest.mark.parametrize("clipped", [False, True], ids=["hook(accum)", "clip(hook(accum))"])
def test_a_hook_that_fails_at_an_epochs_flush_leaves_the_state_before_it_and_a_relaunch_ends_as_the_uninterrupted_run(
    how, clipped, make_mlp, make_batches, mse_loss, make_adam_state, take_snapshot, assert_trees_equal
):
    """Outside accumulation the hook sees the mean of an epoch's partial last group at run_epochs' flush (no
    backward there adds into the group's sums): its failure leaves the state as the flush found it, the sums kept."""
    def hooked(hook):
        step = loopkit.with_grad_hook(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=3), hook)
        return loopkit.with_grad_clip(step, max_norm=0.5) if clipped else step

    data = make_batches(4)  # a group of 3, then the flush of a group of 1: the hook's 2nd call (and 4th)
    whole, whole_history = loopkit.run_epochs(
        hooked(lambda s: None), make_adam_state(make_mlp(0)), data, epochs=2, progress=False
    )
    with pytest.raises((TypeError, RuntimeError), match="is a str|the hook's own failure") as caught:
        loopkit.run_epochs(hooked(_RefusedAt(2, how)), make_adam_state(make_mlp(0)), data, epochs=2, progress=False)
    left = loopkit.state_at_error(caught.value)
    assert left is not None
    assert (left.step, left.epoch, left.batch_index, left.extras["accum/count"]) == (1, 0, 4, 1)
    # (by hand: the group of 3's update, then batch 3's share of the sums)
    _assert_left_as_by_hand_and_resumes_whole(hooked, data, data, left, whole, whole_history,
                                              make_adam_state(make_mlp(0)), take_snapshot, assert_trees_equal)


def _assert_left_as_by_hand_and_resumes_whole(hooked, done, data, left, whole, whole_history, fresh, take_snapshot,
                                              assert_trees_equal):
    """``left`` (a failing hook's state_at_error) is ``fresh`` stepped by hand over ``done`` with a hook that does
    nothing (parameters, optimizer, gradients), and a fit from it over ``data`` ends as ``whole``, the uninterrupted
    fit of history ``whole_history``."""
    by_hand = fresh
    for batch in done:
        by_hand, _ = hooked(lambda s: None)(by_hand, batch)
    assert_trees_equal(take_snapshot(left)["params"], take_snapshot(by_hand)["params"])
    assert_trees_equal(take_snapshot(left)["optimizer"], take_snapshot(by_hand)["optimizer"])
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(left.model.parameters(), by_hand.model.parameters()))
    resumed, history = loopkit.run_epochs(hooked(lambda s: None), left, data, epochs=2, progress=False)
    assert history == whole_history
    assert_trees_equal(take_snapshot(resumed)["params"], take_snapshot(whole)["params"])
    assert_trees_equal(take_snapshot(resumed)["optimizer"], take_snapshot(whole)["optimizer"])


@pytest.mark.parametrize("donated", [True, False], ids=["donated", "pure"])
@pytest.mark.parametrize("every", [1, 2], ids=["hook", "hook(accum)"])
@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_under_a_scheduler_transform_it_sees_the_held_scheduler_as_a_raw_loops_hook_sees_the_loops(
    interval, every, donated, make_mlp, make_batches, mse_loss
):
    """Lightning's self.lr_schedulers() in on_before_optimizer_step: the scheduler, at the rate of the update to come
    (the transform holds it still in the inner step, and steps it after); at the epoch's flush too (every=2). The
    scheduler itself, not the held stand-in the inner step has: on the pure path, the copy that steps the call's
    copied optimizer (and the given state's stays as it was)."""
    data = make_batches(5)
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    expected = []
    for _ in range(3):
        for k, batch in enumerate(data, start=1):
            (mse_loss(ref_model, batch) / every).backward()
            if k % every and k < len(data):
                continue
            if k % every:  # the epoch's partial group: its mean
                for p in ref_model.parameters():
                    p.grad.mul_(every / (k % every))
            expected.append((ref_sched.get_last_lr(), ref_sched.last_epoch))
            ref_opt.step()
            ref_opt.zero_grad()
            if interval == "step" and k % 2 == 0:  # frequency=2: (batch_idx + 1) % 2 == 0
                ref_sched.step()
        if interval == "epoch":
            ref_sched.step()

    model = make_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = []

    def hook(state):
        assert type(state.scheduler) is torch.optim.lr_scheduler.StepLR
        assert state.scheduler is scheduler if donated else state.scheduler.optimizer is state.optimizer is not opt
        seen.append((state.scheduler.get_last_lr(), state.scheduler.last_epoch))

    step = loopkit.with_grad_hook(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=every), hook)
    step = loopkit.with_step_scheduler(step, frequency=2) if interval == "step" else loopkit.with_epoch_scheduler(step)
    state = loopkit.TrainState.create(model, opt, scheduler)
    if donated:
        state, _ = loopkit.run_epochs(step, state, data, epochs=3, progress=False)
    else:  # run_epochs' calls, made by hand with the step as it is (not donated: each call on a copy)
        for epoch in range(3):
            for batch in data:
                given = state.scheduler.state_dict()
                new, _ = step(state, batch)
                assert state.scheduler.state_dict() == given
                state = new
            state, _ = step.flush(state)
            state = state.evolve(epoch=epoch + 1, batch_index=0)
    assert seen == expected and len({tuple(lr) for lr, _ in seen}) > 1  # floats, compared exactly; the rate changed
    assert (state.scheduler is scheduler) is donated and state.scheduler.last_epoch == ref_sched.last_epoch
    for a, b in zip(state.model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
