"""with_amp: bfloat16 is a raw autocast loop; float16 is a raw torch.amp.GradScaler loop, skips included."""

from __future__ import annotations

import pytest
import torch

import loopkit
from tests.conftest import assert_grad_norms_and_params

INIT_SCALE = 2.0**10  # small enough that the tiny MLP never overflows on its own
BAD = 2  # the batch that carries an inf
MAX_NORM = 0.3


def _raw_autocast_loop(model, data, loss_fn, dtype, scaler=None, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for batch in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(model, batch)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        losses.append(loss.detach())
    return opt, losses


def _with_inf(data, index):
    data = list(data)
    x, y = data[index]
    x = x.clone()
    x[0, 0] = float("inf")
    data[index] = (x, y)
    return data


def test_bfloat16_is_bitwise_a_raw_autocast_loop(make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal):
    data = make_batches(4)
    ref_model = make_mlp(0)
    ref_opt, ref_losses = _raw_autocast_loop(ref_model, data, mse_loss, torch.bfloat16)

    state = make_sgd_state(make_mlp(0))
    step = loopkit.with_amp(loopkit.train_step(mse_loss), dtype=torch.bfloat16)
    losses = []
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
        assert "amp/skipped" not in metrics and "amp/scale" not in state.extras  # no scaler for bfloat16
    assert_trees_equal(losses, ref_losses)
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))
    assert_trees_equal(state.optimizer.state_dict(), ref_opt.state_dict())
    assert all(p.dtype == torch.float32 for p in state.model.parameters())


def test_bfloat16_forward_runs_in_bfloat16(make_mlp, make_batches, make_sgd_state):
    seen = []

    def loss_fn(model, batch):
        out = model(batch[0])
        seen.append(out.dtype)
        return ((out.float() - batch[1]) ** 2).mean()

    loopkit.with_amp(loopkit.train_step(loss_fn), dtype=torch.bfloat16)(make_sgd_state(make_mlp(0)), make_batches(1)[0])
    loopkit.train_step(loss_fn)(make_sgd_state(make_mlp(0)), make_batches(1)[0])
    assert seen == [torch.bfloat16, torch.float32]


def test_float16_is_a_raw_grad_scaler_loop(make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal):
    data = make_batches(5)
    ref_model = make_mlp(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # the default: the first update overflows
    ref_opt, ref_losses = _raw_autocast_loop(ref_model, data, mse_loss, torch.float16, scaler)

    state = make_sgd_state(make_mlp(0))
    step = loopkit.with_amp(loopkit.train_step(mse_loss), dtype=torch.float16)
    losses, skipped = [], []
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
        skipped.append(float(metrics["amp/skipped"]))
    assert skipped[0] == 1.0 and state.step == len(data) - skipped.count(1.0)
    assert_trees_equal(losses, ref_losses)
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))
    assert_trees_equal(state.optimizer.state_dict(), ref_opt.state_dict())
    assert float(state.extras["amp/scale"]) == scaler.get_scale()
    assert int(state.extras["amp/growth_tracker"]) == int(scaler._growth_tracker)


def test_float16_inf_skips_exactly_that_update(make_mlp, make_batches, mse_loss, make_adam_state, assert_trees_equal):
    data = _with_inf(make_batches(5), BAD)
    ref_model = make_mlp(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    _raw_autocast_loop(ref_model, data, mse_loss, torch.float16, scaler)

    state = make_adam_state(make_mlp(0), scheduler=True)
    step = loopkit.with_amp(loopkit.train_step(mse_loss), dtype=torch.float16, init_scale=INIT_SCALE)
    for k, batch in enumerate(data):
        before_params = {n: p.detach().clone() for n, p in state.model.named_parameters()}
        before = (state.step, state.scheduler.last_epoch, float(state.extras.get("amp/scale", INIT_SCALE)))
        state, metrics = step(state, batch)
        after_params = dict(state.model.named_parameters())
        if k == BAD:
            assert float(metrics["amp/skipped"]) == 1.0
            assert_trees_equal(after_params, before_params)
            assert (state.step, state.scheduler.last_epoch) == before[:2]
            assert float(state.extras["amp/scale"]) == before[2] / 2
            assert all(torch.isfinite(p).all() for p in state.model.parameters())
        else:
            assert float(metrics["amp/skipped"]) == 0.0
            assert not torch.equal(after_params["0.weight"], before_params["0.weight"])
            assert (state.step, state.scheduler.last_epoch) == (before[0] + 1, before[1] + 1)
            assert float(state.extras["amp/scale"]) == before[2]
    assert state.step == len(data) - 1
    assert state.batch_index == len(data)

    # the same run with SGD and no scheduler is the raw GradScaler loop, bitwise
    model = make_mlp(0)
    sgd = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for batch in data:
        sgd, _ = step(sgd, batch)
    assert_trees_equal(dict(sgd.model.named_parameters()), dict(ref_model.named_parameters()))
    assert float(sgd.extras["amp/scale"]) == scaler.get_scale() == INIT_SCALE / 2


@pytest.mark.parametrize("guard_outside", [True, False], ids=["guard-outside", "guard-inside"])
def test_float16_leaves_the_scale_to_a_guards_skip_of_a_nan_loss_as_a_grad_scaler_loop_skipping_it(
    guard_outside, make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal,
):
    """A NaN loss (bad data, not an overflow) that with_nan_guard skips halved the scale and reset the growth tracker
    (its NaN gradients went into the scaler's found_inf), reported as amp/skipped=1. A raw GradScaler loop that skips a
    non-finite loss before its backward (Lightning's training_step returning None: no scaler.step/update) leaves both
    alone: so does the guard's skip now, amp/skipped 0. The scaler's own overflows (init_scale 2**16: the first
    updates overflow) still back it off, and clean updates grow it (growth_interval=2)."""
    data = make_batches(8)
    bad = (3, 6)
    for k in bad:
        x, y = data[k]
        data[k] = (x, torch.full_like(y, float("nan")))
    options = dict(init_scale=2.0**16, growth_interval=2)
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", **options)
    for batch in data:
        ref_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = mse_loss(ref_model, batch)
        if not torch.isfinite(loss):
            continue
        scaler.scale(loss).backward()
        scaler.step(ref_opt)
        scaler.update()

    amp = lambda s: loopkit.with_amp(s, dtype=torch.float16, **options)  # noqa: E731
    guard = loopkit.with_nan_guard
    step = guard(amp(loopkit.train_step(mse_loss))) if guard_outside else amp(guard(loopkit.train_step(mse_loss)))
    state = make_sgd_state(make_mlp(0))
    skipped = []
    for k, batch in enumerate(data):
        state, metrics = step(state, batch)
        skipped.append((float(metrics["amp/skipped"]), float(metrics["nan_guard/skipped"])))
    assert [skipped[k] for k in bad] == [(0.0, 1.0)] * 2
    assert skipped[0] == (1.0, 0.0)  # the scaler's own overflow
    assert float(state.extras["amp/scale"]) == scaler.get_scale()
    assert int(state.extras["amp/growth_tracker"]) == int(scaler._growth_tracker)
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))


def test_float16_loss_fn_multiplying_by_inf_is_skipped(make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal):
    calls = []

    def sometimes_inf(model, batch):
        calls.append(None)
        loss = mse_loss(model, batch)
        return loss * float("inf") if len(calls) == 2 else loss

    state = make_sgd_state(make_mlp(0))
    step = loopkit.with_amp(loopkit.train_step(sometimes_inf), dtype=torch.float16, init_scale=INIT_SCALE)
    state, first = step(state, make_batches(3)[0])
    new, second = step(state, make_batches(3)[1])
    assert (float(first["amp/skipped"]), float(second["amp/skipped"])) == (0.0, 1.0)
    assert new.step == state.step == 1
    assert_trees_equal(dict(new.model.named_parameters()), dict(state.model.named_parameters()))
    assert float(new.extras["amp/scale"]) == INIT_SCALE / 2


@pytest.mark.parametrize("overflow", [True, False], ids=["overflowing-call", "clean-call"])
def test_float16_leaves_the_given_states_loss_scale_and_growth_tracker_as_they_were(
    overflow, make_mlp, make_batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """Purity of the scaler's state: a call (not donated) that backs the scale off (an overflow) or counts a clean
    update gives the new state new tensors; the given state keeps its own scale and growth tracker, so it can be
    stepped again, as the first time. Reference: the given state's snapshot before the call."""
    data = make_batches(2)
    step = loopkit.with_amp(loopkit.train_step(mse_loss), dtype=torch.float16, init_scale=INIT_SCALE)
    given, _ = step(make_sgd_state(make_mlp(0)), data[0])
    assert int(given.extras["amp/growth_tracker"]) == 1  # (a clean update counted: an overflow resets it to 0)
    before = take_snapshot(given)
    batch = _with_inf(data, 1)[1] if overflow else data[1]
    new, metrics = step(given, batch)
    assert float(metrics["amp/skipped"]) == float(overflow)
    scale, growth = (INIT_SCALE / 2, 0) if overflow else (INIT_SCALE, 2)
    assert (float(new.extras["amp/scale"]), int(new.extras["amp/growth_tracker"])) == (scale, growth)
    assert_trees_equal(take_snapshot(given), before)
    again, _ = step(given, batch)
    assert_trees_equal(take_snapshot(again), take_snapshot(new))


def _raw_per_micro_clip_scaler_loop(model, data, loss_fn, every, max_norm):
    """Float16 loss scaling written out by hand, with each micro-batch's own unscaled gradient clipped: a group
    whose micro-batches' gradients held an inf/NaN anywhere is skipped and backs the scale off (as GradScaler). The
    backward runs on (loss / every) * scale, as GradScaler's accumulation recipe does; unscaling gives the `every` back."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = list(model.parameters())
    scale, skipped = INIT_SCALE, []
    for start in range(0, len(data), every):
        total, overflow = None, False
        for batch in data[start : start + every]:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = loss_fn(model, batch)
            (loss / every * scale).backward()
            grads = [p.grad * (every / scale) for p in params]
            overflow = overflow or not all(torch.isfinite(g).all() for g in grads)
            for p, g in zip(params, grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            share = [p.grad / every for p in params]
            total = share if total is None else [t + s for t, s in zip(total, share)]
        skipped.append(float(overflow))
        if overflow:
            scale /= 2
            continue
        for p, g in zip(params, total):
            p.grad = g
        opt.step()
    return skipped, scale


@pytest.mark.parametrize("bad", [0, 1], ids=["first-micro-batch", "last-micro-batch"])
def test_float16_inside_accumulation_skips_a_group_whose_earlier_micro_batch_alone_overflowed(
    bad, make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal
):
    """With a per-micro-batch transform (a clip inside with_grad_accum) each micro-batch is unscaled and checked on its
    own: an overflow in the group's first micro-batch, the later ones clean, still skips the group's update (the flags
    of the group's micro-batches are or-ed, not the last one's taken). Reference: the loss scaling by hand."""
    data = _with_inf(make_batches(4), bad)
    ref_model = make_mlp(0)
    ref_skipped, ref_scale = _raw_per_micro_clip_scaler_loop(ref_model, data, mse_loss, 2, MAX_NORM)
    assert ref_skipped == [1.0, 0.0]

    inner = loopkit.with_grad_clip(loopkit.with_amp(loopkit.train_step(mse_loss), torch.float16, init_scale=INIT_SCALE),
                                   max_norm=MAX_NORM)
    step = loopkit.with_grad_accum(inner, every=2)
    state = make_sgd_state(make_mlp(0))
    state, skipped = _skips_per_update(step, state, data, every=2)
    assert skipped == ref_skipped and state.step == 1
    assert float(state.extras["amp/scale"]) == ref_scale == INIT_SCALE / 2
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))


def _skips_per_update(step, state, data, every):
    """Train ``step`` over ``data`` in groups of ``every`` batches: the final state and each update's amp/skipped."""
    skipped = []
    for k, batch in enumerate(data):
        state, metrics = step(state, batch)
        if k % every == every - 1:
            skipped.append(float(metrics["amp/skipped"]))
    return state, skipped


OUTLIER = 3  # the second micro-batch of the second group: one target far off, its gradient large


def _with_outlier(data, index, offset=768.0):
    """One target moved by ``offset``: at INIT_SCALE its float16 output gradient (scale * (out - y) / 8) overflows
    float16 when the loss is scaled whole, and stays finite when the loss is halved first (with_grad_accum(every=2))."""
    data = list(data)
    x, y = data[index]
    y = y.clone()
    y[0, 0] -= offset
    data[index] = (x, y)
    return data


def _raw_accumulating_scaler_loop(model, data, loss_fn, every, divide=True):
    """torch's GradScaler accumulation recipe: scaler.scale(loss / every).backward() per micro-batch, one
    step/update per group (``divide=False``: loss not divided, the workload's check). Returns skips and the scaler."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    skipped = []
    for start in range(0, len(data), every):
        opt.zero_grad()
        for batch in data[start : start + every]:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = loss_fn(model, batch)
            scaler.scale(loss / every if divide else loss).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(float(scaler.get_scale() < before))
    return skipped, scaler


@pytest.mark.parametrize(
    "inner",
    [
        loopkit.with_nan_guard,
        loopkit.with_grad_clip,  # no limit: it reports grad_norm only
        loopkit.with_grad_norm,
        lambda s: loopkit.with_grad_hook(s, lambda state: None),
    ],
    ids=["nan_guard", "grad_clip_no_limit", "grad_norm", "grad_hook_identity"],
)
def test_float16_with_a_transform_inside_accumulation_overflows_where_the_raw_grad_scaler_loop_does(
    inner, make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal
):
    """A transform inside with_grad_accum sees each micro-batch's gradient on its own, yet the backward runs on
    (loss / every) * scale as the raw GradScaler loop's scaler.scale(loss / every).backward(): an overflow of loss * scale
    that (loss / every) * scale does not reach skips nothing. The backward once ran on loss * scale: that group was
    skipped, the scale halved, the parameters left behind. Reference: the raw loop, bitwise (every and the scale are
    powers of two: the per-micro-batch unscaling rounds as the raw loop's unscaling of the sum)."""
    data = _with_outlier(make_batches(6), OUTLIER)
    assert _raw_accumulating_scaler_loop(make_mlp(0), data, mse_loss, 2, divide=False)[0] == [0.0, 1.0, 0.0]  # workload
    ref_model = make_mlp(0)
    ref_skipped, scaler = _raw_accumulating_scaler_loop(ref_model, data, mse_loss, 2)
    assert ref_skipped == [0.0, 0.0, 0.0]

    amp = loopkit.with_amp(loopkit.train_step(mse_loss), torch.float16, init_scale=INIT_SCALE)
    step = loopkit.with_grad_accum(inner(amp), every=2)
    state = make_sgd_state(make_mlp(0))
    state, skipped = _skips_per_update(step, state, data, every=2)
    assert skipped == ref_skipped and state.step == 3
    assert float(state.extras["amp/scale"]) == scaler.get_scale() == INIT_SCALE
    assert int(state.extras["amp/growth_tracker"]) == int(scaler._growth_tracker)
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))


def test_float16_inside_accumulation_a_transform_still_sees_the_micro_batchs_whole_loss_gradient(
    make_mlp, make_batches, mse_loss, make_sgd_state
):
    """The loss is divided before it is scaled, and the unscaling gives the factor back: with_grad_norm inside the
    accumulation reports the norm of each micro-batch's own (undivided) loss gradient, the outlier's included.
    Reference: the float32 gradient of that micro-batch's loss at the raw loop's parameters (float16 forward: 1e-2)."""
    data = _with_outlier(make_batches(4), OUTLIER)
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    expected = []
    for start in range(0, len(data), 2):
        for batch in data[start : start + 2]:  # (the parameters change only once per group)
            grads = torch.autograd.grad(mse_loss(ref_model, batch), list(ref_model.parameters()))
            expected.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        ref_opt.zero_grad()
        for batch in data[start : start + 2]:
            (mse_loss(ref_model, batch) / 2).backward()
        ref_opt.step()

    amp = loopkit.with_amp(loopkit.train_step(mse_loss), torch.float16, init_scale=INIT_SCALE)
    step = loopkit.with_grad_accum(loopkit.with_grad_norm(amp), every=2)
    state = make_sgd_state(make_mlp(0))
    seen = []
    for batch in data:
        state, metrics = step(state, batch)
        seen.append(metrics["grad_2.0_norm_total"])
    assert float(expected[OUTLIER]) > 10 * float(expected[OUTLIER - 1])  # (the outlier's own gradient, not half of it)
    torch.testing.assert_close(torch.stack(seen), torch.stack(expected), rtol=1e-2, atol=0)


def test_gradient_clipping_under_float16_sees_unscaled_gradients(make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal):
    """The documented GradScaler recipe: scale, backward, unscale_, clip, step, update."""
    data = make_batches(3)
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    ref_norms = []
    for batch in data:
        ref_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = mse_loss(ref_model, batch)
        scaler.scale(loss).backward()
        scaler.unscale_(ref_opt)
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.3))
        scaler.step(ref_opt)
        scaler.update()

    for nest in ("clip(amp)", "amp(clip)"):
        base = loopkit.train_step(mse_loss)
        if nest == "clip(amp)":
            step = loopkit.with_grad_clip(loopkit.with_amp(base, torch.float16, init_scale=INIT_SCALE), max_norm=0.3)
        else:
            step = loopkit.with_amp(loopkit.with_grad_clip(base, max_norm=0.3), torch.float16, init_scale=INIT_SCALE)
        assert_grad_norms_and_params(step, make_sgd_state(make_mlp(0)), data, ref_norms, ref_model)


def test_amp_on_eval_step_autocasts_the_forward(make_mlp, make_batches, make_sgd_state):
    seen = []

    def metric_fn(model, batch):
        out = model(batch[0])
        seen.append(out.dtype)
        return {"mse": ((out.float() - batch[1]) ** 2).mean()}

    state = make_sgd_state(make_mlp(0))
    step = loopkit.with_amp(loopkit.eval_step(metric_fn), dtype=torch.bfloat16)
    assert step.applied == ("eval_step", "with_amp")
    same, metrics = step(state, make_batches(1)[0])
    assert same is state and seen == [torch.bfloat16] and metrics["mse"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8, "bfloat16"])
def test_dtype_must_be_bfloat16_or_float16(dtype, mse_loss):
    with pytest.raises(ValueError) as info:
        loopkit.with_amp(loopkit.train_step(mse_loss), dtype=dtype)
    assert "with_amp: dtype must be torch.bfloat16 or torch.float16" in str(info.value) and str(dtype) in str(info.value)


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"init_scale": 0.0}, "init_scale > 0"),
        ({"init_scale": float("inf")}, "finite init_scale > 0"),  # (it would never come down: no update ever)
        ({"growth_factor": 1.0}, "growth_factor > 1"),
        ({"growth_factor": float("inf")}, "finite growth_factor > 1"),
        ({"backoff_factor": 1.5}, "0 < backoff_factor < 1"),
        ({"growth_interval": 0}, "growth_interval must be a positive int, got 0"),
    ],
)
def test_scaler_options_out_of_range_are_refused(options, fragment, mse_loss):
    with pytest.raises(ValueError, match="with_amp") as info:
        loopkit.with_amp(loopkit.train_step(mse_loss), dtype=torch.float16, **options)
    assert fragment in str(info.value)


@pytest.mark.parametrize("options", [
    {"init_scale": 1024.0}, {"growth_factor": 2.0}, {"backoff_factor": 0.5}, {"growth_interval": 10},
    {"init_scale": 2.0**16, "growth_interval": 2000},  # (the float16 defaults, given: still refused)
])
@pytest.mark.parametrize("make_step", [loopkit.train_step, lambda f: loopkit.eval_step(lambda m, b: {"loss": f(m, b)})])
def test_bfloat16_refuses_the_scaler_options_it_would_ignore(options, make_step, mse_loss):
    """bfloat16 runs no loss scaler: its options would be silently dropped (Lightning's bf16-mixed refuses a scaler)."""
    with pytest.raises(ValueError, match="with_amp: dtype=torch.bfloat16 runs no loss scaler") as info:
        loopkit.with_amp(make_step(mse_loss), dtype=torch.bfloat16, **options)
    assert all(f"{k}={v!r}" in str(info.value) for k, v in options.items())


def test_float16_takes_grad_scalers_defaults_for_the_options_not_given(mse_loss):
    defaults = torch.amp.GradScaler("cpu")
    amp = loopkit.with_amp(loopkit.train_step(mse_loss), dtype=torch.float16, growth_interval=7).precision
    assert (amp.init_scale, amp.growth_factor, amp.backoff_factor, amp.growth_interval) == (
        defaults.get_scale(), defaults.get_growth_factor(), defaults.get_backoff_factor(), 7
    )
    assert loopkit.with_amp(loopkit.train_step(mse_loss), dtype=torch.float16).precision.growth_interval == (
        defaults.get_growth_interval()
    )


def _sparse_embedding_state(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Embedding(10, 3, sparse=True)
    return model, torch.optim.SparseAdam(model.parameters(), lr=0.1)


def _sparse_loss(model, batch):
    idx, scale = batch
    return (model(idx) * scale).pow(2).mean()


def test_float16_with_sparse_gradients_is_the_raw_grad_scaler_loop(assert_trees_equal):
    """An nn.Embedding(sparse=True) under SparseAdam: GradScaler unscales (and checks) the
    coalesced values; with_amp does the same, the overflowing batch included."""
    data = [(torch.tensor([[1, 2, 2], [3, 1, 0]]), torch.tensor(s)) for s in (1.0, 2.0, float("inf"), 0.5)]
    ref, ref_opt = _sparse_embedding_state()
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    _raw_autocast_loop(ref, data, _sparse_loss, torch.float16, scaler, ref_opt)
    state = loopkit.TrainState.create(*_sparse_embedding_state())
    step = loopkit.with_amp(loopkit.train_step(_sparse_loss), dtype=torch.float16, init_scale=INIT_SCALE)
    skipped = []
    for batch in data:
        state, metrics = step(state, batch)
        skipped.append(float(metrics["amp/skipped"]))
    assert skipped == [0.0, 0.0, 1.0, 0.0]
    assert_trees_equal(state.model.weight, ref.weight)
    assert float(state.extras["amp/scale"]) == scaler.get_scale()


def test_float16_and_the_guard_do_not_depend_on_the_callers_default_dtype(make_mlp, make_batches, mse_loss, assert_trees_equal):
    """A float32 model trained in a process whose default dtype is float64 (a scientific notebook):
    the scaler's flags stay float32, as GradScaler's do."""
    data = make_batches(3)
    ref_model = make_mlp(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    step = loopkit.with_nan_guard(loopkit.with_amp(loopkit.train_step(mse_loss), dtype=torch.float16, init_scale=INIT_SCALE))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _raw_autocast_loop(ref_model, data, mse_loss, torch.float16, scaler)
        for batch in data:
            state, metrics = step(state, batch)
        guard_only, _ = loopkit.with_nan_guard(loopkit.train_step(mse_loss))(state, data[0])
    finally:
        torch.set_default_dtype(default)
    assert float(metrics["amp/skipped"]) == 0.0 and guard_only.step == state.step + 1
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))


def test_float16_unscales_and_checks_complex_gradients(assert_trees_equal):
    """A complex parameter's gradient is unscaled and checked by its real view (torch's GradScaler refuses
    complex gradients): the reference is a raw loop scaling the loss by hand, by powers of two (exact), and
    skipping the update whose complex gradient is non-finite, then halving the scale as GradScaler does."""
    from tests.transforms.test_nan_guard import _COMPLEX_BATCHES, _ComplexModel

    def make():
        torch.manual_seed(0)
        model = _ComplexModel()
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    ref, ref_opt = make()
    scale = INIT_SCALE
    for x in _COMPLEX_BATCHES:
        ref_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ref(x)
        (loss.float() * scale).backward()
        grads = [p.grad for p in ref.parameters()]
        for g in grads:
            g.mul_(1.0 / scale)
        if all(torch.isfinite(torch.view_as_real(g) if g.is_complex() else g).all() for g in grads):
            ref_opt.step()
        else:
            scale *= 0.5
    state = loopkit.TrainState.create(*make())
    step = loopkit.with_amp(loopkit.train_step(lambda m, x: m(x)), dtype=torch.float16, init_scale=INIT_SCALE)
    skipped = []
    for x in _COMPLEX_BATCHES:
        state, metrics = step(state, x)
        skipped.append(float(metrics["amp/skipped"]))
    assert skipped == [0.0, 1.0, 0.0] and float(state.extras["amp/scale"]) == scale
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref.named_parameters()))


class _Recurrent(torch.nn.Module):
    """An LSTM over a packed batch of sequences of several lengths (on the CPU, one kernel per time step)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.head = torch.nn.LSTM(4, 16, batch_first=True), torch.nn.Linear(16, 1)

    def forward(self, x):
        lengths = torch.tensor([x.shape[1] - i % 4 for i in range(x.shape[0])])
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(packed)[1][0][-1]).float()


@pytest.mark.parametrize("cache_enabled", [True, False])
def test_bfloat16_with_the_autocast_cache_on_or_off_is_the_raw_loop_so_autocast(cache_enabled, assert_trees_equal):
    """Lightning's bf16-mixed autocasts with cache_enabled=False: with_amp(cache_enabled=False) is that raw loop,
    bitwise; on an LSTM (weights used at every time step) the two settings train differently."""
    data = [(torch.randn(8, 9, 4, generator=torch.Generator().manual_seed(i)), torch.randn(8, 1)) for i in range(3)]

    def loss_fn(model, batch):
        return (model(batch[0]) - batch[1]).pow(2).mean()

    ref = _Recurrent()
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for batch in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache_enabled):
            loss = loss_fn(ref, batch)
        loss.backward()
        opt.step()
    runs = {}
    for cache in (True, False):
        model = _Recurrent()
        state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.01))
        step = loopkit.with_amp(loopkit.train_step(loss_fn), dtype=torch.bfloat16, cache_enabled=cache)
        for batch in data:
            state, _ = step(state, batch)
        runs[cache] = dict(state.model.named_parameters())
    assert_trees_equal(runs[cache_enabled], dict(ref.named_parameters()))
    assert not torch.equal(runs[True]["rnn.weight_hh_l0"], runs[False]["rnn.weight_hh_l0"])


def test_cache_enabled_must_be_a_bool(mse_loss):
    with pytest.raises(TypeError, match="cache_enabled must be True or False"):
        loopkit.with_amp(loopkit.train_step(mse_loss), cache_enabled="no")


def test_float16_refuses_float16_parameters_as_torchs_grad_scaler_does_leaving_the_state_whole(
    make_mlp, make_batches, mse_loss, take_snapshot, assert_trees_equal
):
    """A model.half() under float16 with_amp: torch's GradScaler raises "Attempting to unscale FP16 gradients" (so
    does Lightning's "16-mixed"); loopkit trained on, its scaled float16 gradients overflowing. Refused before the
    forward, naming the parameter; a model half in float16 is refused at the unscaling."""
    batch = make_batches(1)[0]
    model = make_mlp(0).half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = mse_loss(model, (batch[0].half(), batch[1].half()))
    scaler.scale(loss).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(optimizer)

    step = loopkit.with_amp(loopkit.train_step(mse_loss), torch.float16)
    half = make_mlp(0).half()
    state = loopkit.TrainState.create(half, torch.optim.SGD(half.parameters(), lr=0.1))
    before = take_snapshot(state)
    with pytest.raises(ValueError, match=r"with_amp\(torch.float16\): parameter '0.weight' is float16") as info:
        loopkit.run_epochs(step, state, [(batch[0].half(), batch[1].half())], epochs=1, progress=False)
    assert_trees_equal(take_snapshot(loopkit.state_at_error(info.value)), before)

    mixed = make_mlp(0)
    mixed[2].half()
    state = loopkit.TrainState.create(mixed, torch.optim.SGD(mixed.parameters(), lr=0.1))
    half_loss = lambda m, b: mse_loss(m, b).float()  # noqa: E731
    with pytest.raises(ValueError, match=r"parameter '2.weight' is float16"):
        loopkit.with_amp(loopkit.train_step(half_loss), torch.float16)(state, batch)


def test_float16_trains_a_frozen_float16_part_as_torchs_grad_scaler_does_and_refuses_a_trained_one_before_the_forward(
    make_batches, take_snapshot, assert_trees_equal
):
    """Only float16 gradients are refused (torch's GradScaler unscales the others): a frozen .half() backbone first in
    the optimizer trains as the raw GradScaler loop; a trained float16 part after float32 ones is refused before the
    forward, the state whole (it came at the unscaling, after the backward: the state was lost)."""
    x = make_batches(1)[0][0]
    loss_fn = lambda m, b: m(b).float().pow(2).mean()  # noqa: E731

    def backbone_frozen():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        model[0].half().requires_grad_(False)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    model, optimizer = backbone_frozen()
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = loss_fn(model, x)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    state, _ = loopkit.with_amp(loopkit.train_step(loss_fn), torch.float16)(loopkit.TrainState.create(*backbone_frozen()), x)
    assert_trees_equal(dict(state.model.named_parameters()), dict(model.named_parameters()))

    torch.manual_seed(0)
    mixed = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1).half())
    state = loopkit.TrainState.create(mixed, torch.optim.SGD(mixed.parameters(), lr=0.1))
    before = take_snapshot(state)
    with pytest.raises(ValueError, match=r"parameter '1.weight' is float16") as info:
        loopkit.run_epochs(loopkit.with_amp(loopkit.train_step(loss_fn), torch.float16), state, [x], epochs=1,
                           progress=False)
    assert_trees_equal(take_snapshot(loopkit.state_at_error(info.value)), before)


def test_a_float16_scalers_options_are_agreed_over_the_ranks():
    """The ranks' scaled gradients are averaged, and each rank unscales the mean by its own scale: a rank with another
    init_scale (or growth) updated by other gradients, and run_epochs compared the dtype alone. bfloat16 has no
    scaler."""
    base = loopkit.train_step(lambda m, b: m(b).sum())
    agreed = lambda **kw: dict(loopkit.with_amp(base, torch.float16, **kw).rank_agreed)  # noqa: E731
    assert agreed()["with_amp init_scale"] == 2.0 ** 16 and agreed()["with_amp growth_interval"] == 2000
    for option, value in (("init_scale", 1024.0), ("growth_factor", 4.0), ("backoff_factor", 0.25),
                          ("growth_interval", 10)):
        assert agreed(**{option: value}) != agreed(), option
    assert dict(loopkit.with_amp(base, torch.bfloat16).rank_agreed) == {"with_amp dtype": "torch.bfloat16"}
