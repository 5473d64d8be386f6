"""Every gradient transform, alone and in every ordered pair with every other, keeps the step contract.

For each pipeline: purity (the input state is unchanged), determinism (two calls give identical
results), exact resume from ``state_dict`` mid-accumulation, float32 parameters stay float32,
``step.applied`` lists the transforms, and a NaN batch never reaches the parameters of a pipeline
that guards against it. Pairs without a meaning are refused with a ``TypeError`` naming both
transforms when the step is built.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import loopkit

TRANSFORMS = {
    "amp_bf16": ("with_amp", lambda s: loopkit.with_amp(s, dtype=torch.bfloat16)),
    "amp_fp16": ("with_amp", lambda s: loopkit.with_amp(s, dtype=torch.float16, init_scale=2.0**10)),
    "grad_accum": ("with_grad_accum", lambda s: loopkit.with_grad_accum(s, every=2)),
    "grad_clip": ("with_grad_clip", lambda s: loopkit.with_grad_clip(s, max_norm=0.3)),
    "nan_guard": ("with_nan_guard", lambda s: loopkit.with_nan_guard(s)),
}
GRADIENT_ONLY = ["grad_accum", "grad_clip", "nan_guard"]  # need gradients: refuse an eval_step


def _refused(inner: str, outer: str) -> bool:
    """Only two pairs have no meaning: a second precision, and accumulating an accumulation."""
    return TRANSFORMS[inner][0] == TRANSFORMS[outer][0] and TRANSFORMS[inner][0] in ("with_amp", "with_grad_accum")


PAIRS = list(itertools.product(TRANSFORMS, repeat=2))
PIPELINES = [(name,) for name in TRANSFORMS] + [pair for pair in PAIRS if not _refused(*pair)]


def _mse(model, batch):
    x, y = batch
    return ((model(x).float() - y) ** 2).mean()


def _build(names):
    step = loopkit.train_step(_mse)
    for name in names:  # innermost first
        step = TRANSFORMS[name][1](step)
    return step


def _nan_batch(batch):
    x, y = batch
    x = x.clone()
    x[:, 0] = float("nan")
    return x, y


@pytest.fixture(params=PIPELINES, ids=lambda names: "(".join(reversed(names)) + ")" * len(names))
def pipeline(request):
    return request.param


@pytest.fixture
def fresh_state(make_bn_dropout, make_adam_state):
    def fresh(model_seed=0):
        return make_adam_state(make_bn_dropout(model_seed), seed=5, scheduler=True)

    return fresh


# --- building ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner, outer", PAIRS, ids=[f"{o}({i})" for i, o in PAIRS])
def test_building_a_pair_works_or_is_refused_naming_both(inner, outer):
    inner_name, outer_name = TRANSFORMS[inner][0], TRANSFORMS[outer][0]
    if _refused(inner, outer):
        with pytest.raises(TypeError) as info:
            _build((inner, outer))
        message = str(info.value)
        assert f"{outer_name} cannot wrap {inner_name}" in message
    else:
        step = _build((inner, outer))
        assert step.applied == ("train_step", inner_name, outer_name)


def test_the_refused_pairs_are_exactly_amp_amp_and_accum_accum():
    refused = {(TRANSFORMS[i][0], TRANSFORMS[o][0]) for i, o in PAIRS if _refused(i, o)}
    assert refused == {("with_amp", "with_amp"), ("with_grad_accum", "with_grad_accum")}
    assert len(PIPELINES) == 5 + 25 - 4 - 1


@pytest.mark.parametrize("name", GRADIENT_ONLY)
def test_gradient_transform_refuses_an_eval_step(name):
    with pytest.raises(TypeError) as info:
        TRANSFORMS[name][1](loopkit.eval_step(lambda m, b: {}))
    message = str(info.value)
    assert TRANSFORMS[name][0] in message and "eval_step" in message


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_gradient_transform_refuses_a_plain_function_step(name):
    def my_custom_step(state, batch):
        return state, {}

    with pytest.raises(TypeError) as info:
        TRANSFORMS[name][1](my_custom_step)
    message = str(info.value)
    assert TRANSFORMS[name][0] in message and "my_custom_step" in message


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_gradient_transform_refuses_a_donated_step(name):
    with pytest.raises(TypeError) as info:
        TRANSFORMS[name][1](loopkit.donate(loopkit.train_step(_mse)))
    assert TRANSFORMS[name][0] in str(info.value) and "donate" in str(info.value)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_refuses_a_non_callable(name):
    with pytest.raises(TypeError) as info:
        TRANSFORMS[name][1]("train_step")
    assert str(info.value).startswith(f"{TRANSFORMS[name][0]}: the step must be callable") and "got str" in str(info.value)


# --- the step contract, for every pipeline --------------------------------------------------------


def test_applied_lists_the_transforms(pipeline):
    assert _build(pipeline).applied == ("train_step",) + tuple(TRANSFORMS[n][0] for n in pipeline)


def test_pure(pipeline, fresh_state, batches, take_snapshot, assert_trees_equal):
    step = _build(pipeline)
    state, _ = step(fresh_state(), batches[0])  # mid-group under accumulation: gradients are held
    before = take_snapshot(state)
    new, _ = step(state, batches[1])
    assert_trees_equal(take_snapshot(state), before)
    assert new.batch_index == state.batch_index + 1
    flushed, _ = step.flush(state)
    assert_trees_equal(take_snapshot(state), before)
    assert flushed.step == state.step + ("grad_accum" in pipeline)


def test_two_calls_give_identical_results(pipeline, fresh_state, batches, take_snapshot, assert_trees_equal):
    step = _build(pipeline)
    state, _ = step(fresh_state(), batches[0])
    a, metrics_a = step(state, batches[1])
    torch.rand(10)  # the global RNG is not the step's
    b, metrics_b = step(state, batches[1])
    assert_trees_equal(take_snapshot(a), take_snapshot(b))
    assert_trees_equal(metrics_a, metrics_b)


def test_state_dict_round_trip_mid_accumulation(pipeline, fresh_state, batches, take_snapshot, assert_trees_equal):
    step = _build(pipeline)
    state, _ = step(fresh_state(), batches[0])
    if "grad_accum" in pipeline:
        assert state.extras["accum/count"] == 1 and state.step == 0
    restored = fresh_state(model_seed=1).load_state_dict(state.state_dict())
    for batch in batches[1:4]:
        state, _ = step(state, batch)
        restored, _ = step(restored, batch)
    assert state.step >= 1
    assert_trees_equal(take_snapshot(restored), take_snapshot(state))


def test_parameter_dtype_is_kept(pipeline, fresh_state, batches):
    step = _build(pipeline)
    state = fresh_state()
    for batch in batches[:3]:
        state, metrics = step(state, batch)
        assert all(v.ndim == 0 for v in metrics.values())
    for p in state.model.parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
    for entry in state.optimizer.state.values():
        assert entry["exp_avg"].dtype == entry["exp_avg_sq"].dtype == torch.float32
    assert all(b.dtype in (torch.float32, torch.int64) for b in state.model.buffers())


def test_run_epochs_matches_calling_the_step(pipeline, fresh_state, batches, take_snapshot, assert_trees_equal):
    step = _build(pipeline)
    by_hand = fresh_state()
    for batch in batches[:5]:
        by_hand, _ = step(by_hand, batch)
    by_hand, _ = step.flush(by_hand)
    driven, _ = loopkit.run_epochs(step, fresh_state(), batches[:5], epochs=1, progress=False, sanity_val_batches=0)
    assert driven.epoch == 1
    assert_trees_equal(take_snapshot(driven)["params"], take_snapshot(by_hand)["params"])
    assert_trees_equal(take_snapshot(driven)["optimizer"], take_snapshot(by_hand)["optimizer"])


GUARDED = [names for names in PIPELINES if {"nan_guard", "amp_fp16"} & set(names)]


@pytest.mark.parametrize("guarded", GUARDED, ids=lambda names: "(".join(reversed(names)) + ")" * len(names))
def test_a_nan_batch_never_reaches_guarded_parameters(guarded, fresh_state, batches, take_snapshot, assert_trees_equal):
    pipeline = guarded
    step = _build(pipeline)
    start = fresh_state()
    state, _ = step(start, _nan_batch(batches[0]))
    if "grad_accum" in pipeline:
        state, _ = step(state, batches[1])  # a clean second micro-batch: the group is dropped anyway
    assert state.step == 0
    assert_trees_equal(take_snapshot(state)["params"], take_snapshot(start)["params"])
    assert all(p.grad is None for p in state.model.parameters())
    state, _ = step(state, batches[2])
    state, _ = step(state, batches[3])
    assert state.step >= 1 and all(bool(torch.isfinite(p).all()) for p in state.model.parameters())


# --- orders that mean the same thing give the same result ----------------------------------------


COMMUTING = [
    pair
    for pair in itertools.combinations(TRANSFORMS, 2)
    if not _refused(*pair) and ({"amp_bf16", "amp_fp16"} & set(pair) or set(pair) == {"grad_clip", "nan_guard"})
]


@pytest.mark.parametrize("pair", COMMUTING, ids=["+".join(p) for p in COMMUTING])
def test_orders_with_one_meaning_give_bitwise_the_same_result(pair, fresh_state, batches, take_snapshot, assert_trees_equal):
    forward, backward = _build(pair), _build(pair[::-1])
    a, b = fresh_state(), fresh_state()
    for batch in batches[:4]:
        a, metrics_a = forward(a, batch)
        b, metrics_b = backward(b, batch)
        assert_trees_equal(metrics_a, metrics_b)
    assert_trees_equal(take_snapshot(a), take_snapshot(b))
