"""with_pruning: the weights equal a raw loop pruned with torch.nn.utils.prune.global_unstructured, bitwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import loopkit
from loopkit import checkpoint
from loopkit.transforms.pruning import cubic_sparsity, default_prunable

AMOUNT = 0.7
POINTS = [2, 4, 6]


def _wide_mlp(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _pruned_weight_count(model) -> int:
    return sum(int((getattr(model, i).weight == 0).sum()) for i in ("0", "2"))


def _raw_pruned_loop(model, opt, data, loss_fn):
    """The reference: torch.nn.utils.prune's reparametrisation (weight = weight_orig * weight_mask), pruned
    globally by L1 after the updates in POINTS, each time by the count that brings the total to the ramp."""
    targets = [(model[0], "weight"), (model[2], "weight")]
    total = sum(m.weight.numel() for m, _ in targets)
    pruned = 0
    for k, batch in enumerate(data, start=1):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        if k in POINTS:
            want = round(cubic_sparsity(AMOUNT, POINTS, k) * total)
            # rank by the weights as they are now (a pruned module's .weight is the stale one of the last forward)
            current = {(m, n): m.weight_orig * m.weight_mask for m, n in targets if prune.is_pruned(m)}
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=want - pruned,
                                      importance_scores=current or None)
            pruned = want
    return {name: (m.weight_orig * m.weight_mask).detach() for name, m in (("0.weight", model[0]), ("2.weight", model[2]))}


def test_weights_are_bitwise_global_unstructured_l1_in_a_raw_loop(make_batches, mse_loss, make_adam_state, assert_trees_equal):
    data = make_batches(8, d_in=4, d_out=2)
    ref_model = _wide_mlp(0)
    expected = _raw_pruned_loop(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.01), data, mse_loss)

    state = make_adam_state(_wide_mlp(0))
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, POINTS)
    state, _ = loopkit.run_epochs(step, state, data, epochs=1, progress=False)
    got = {name: p.detach() for name, p in state.model.named_parameters() if name.endswith("weight")}
    assert_trees_equal(got, expected)
    assert_trees_equal(state.model[0].bias.detach(), ref_model[0].bias.detach())
    assert _pruned_weight_count(state.model) == round(AMOUNT * (64 + 32))


def test_sparsity_follows_the_cubic_ramp_and_pruned_weights_stay_zero(make_batches, mse_loss, make_adam_state):
    data = make_batches(9, d_in=4, d_out=2)
    state = make_adam_state(_wide_mlp(0))
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, POINTS)
    counts, zero_masks = [], None
    for batch in data:
        state, _ = step(state, batch)
        counts.append(_pruned_weight_count(state.model))
        if zero_masks is not None:  # once pruned, a weight stays zero although Adam keeps moving it
            assert all(bool((getattr(state.model, i).weight[zero_masks[i]] == 0).all()) for i in ("0", "2"))
        if state.step == POINTS[0]:
            zero_masks = {i: getattr(state.model, i).weight == 0 for i in ("0", "2")}
    assert counts == [0] + [round(cubic_sparsity(AMOUNT, POINTS, s) * 96) for s in range(2, 10)]
    assert counts[1] < counts[3] < counts[5] == counts[-1]
    assert state.extras["pruning/sparsity"] == pytest.approx(AMOUNT)


def test_a_function_schedule_prunes_once_and_parameters_choose_the_tensors(make_batches, mse_loss, make_sgd_state):
    data = make_batches(5, d_in=4, d_out=2)
    state = make_sgd_state(_wide_mlp(0))
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), 0.5, lambda s: 1.0 if s >= 3 else 0.0, parameters=["0.weight"])
    zeros = []
    for batch in data:
        state, _ = step(state, batch)
        zeros.append((int((state.model[0].weight == 0).sum()), int((state.model[2].weight == 0).sum())))
    assert zeros == [(0, 0), (0, 0), (32, 0), (32, 0), (32, 0)]


def test_the_step_is_pure_and_donation_reproduces_it(make_batches, mse_loss, make_adam_state, take_snapshot, assert_trees_equal):
    data = make_batches(5, d_in=4, d_out=2)
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, POINTS)
    pure, donated = make_adam_state(_wide_mlp(0)), make_adam_state(_wide_mlp(0))
    for batch in data:
        before = take_snapshot(pure)
        new, _ = step(pure, batch)
        assert_trees_equal(take_snapshot(pure), before)
        pure = new
        donated, _ = loopkit.donate(step)(donated, batch)
    assert_trees_equal(take_snapshot(pure), take_snapshot(donated))


def test_a_restored_checkpoint_resumes_with_its_masks(tmp_path, make_batches, mse_loss, make_adam_state, take_snapshot,
                                                      assert_trees_equal):
    data = make_batches(8, d_in=4, d_out=2)
    step = loopkit.with_checkpointing(loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, POINTS), tmp_path,
                                      every_n_steps=3)
    uninterrupted = make_adam_state(_wide_mlp(0))
    for batch in data:
        uninterrupted, _ = step(uninterrupted, batch)
    resumed = loopkit.restore(make_adam_state(_wide_mlp(1)), checkpoint.list_checkpoints(tmp_path)[0].path)
    assert resumed.step == 3 and sorted(resumed.extras["pruning/masks"]) == ["0.weight", "2.weight"]
    for batch in data[3:]:
        resumed, _ = step(resumed, batch)
    assert_trees_equal(take_snapshot(resumed), take_snapshot(uninterrupted))


def test_default_prunable_takes_linear_and_conv_weights():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    assert default_prunable(model) == ["0.weight", "3.weight"]
    assert default_prunable(nn.Linear(2, 2)) == ["weight"]


@pytest.mark.parametrize(
    "amount, schedule, error, match",
    [
        (0.0, [1], ValueError, "amount must be a fraction"),
        (1.0, [1], ValueError, "amount must be a fraction"),
        ("0.5", [1], ValueError, "amount must be a fraction"),
        (0.5, [], TypeError, "schedule must be a non-empty list"),
        (0.5, [3, 2], ValueError, "schedule must be increasing"),
        (0.5, [0, 2], ValueError, "schedule must be increasing"),
        (0.5, "10", TypeError, "schedule must be"),
    ],
)
def test_bad_options_are_refused_by_name(mse_loss, amount, schedule, error, match):
    with pytest.raises(error, match=f"with_pruning: {match}"):
        loopkit.with_pruning(loopkit.train_step(mse_loss), amount, schedule)


def test_a_schedule_out_of_range_or_a_missing_parameter_is_named(make_batches, mse_loss, make_sgd_state):
    batch = make_batches(1, d_in=4, d_out=2)[0]
    state = make_sgd_state(_wide_mlp(0))
    with pytest.raises(ValueError, match=r"schedule\(1\) must be a fraction in \[0, 1\], got 2"):
        loopkit.with_pruning(loopkit.train_step(mse_loss), 0.5, lambda s: 2)(state, batch)
    with pytest.raises(KeyError, match="no parameter 'head.weight'"):
        loopkit.with_pruning(loopkit.train_step(mse_loss), 0.5, [1], parameters=["head.weight"])(state, batch)


def test_meaningless_orders_are_refused_when_built(tmp_path, mse_loss):
    base = loopkit.train_step(mse_loss)
    for inner, name in [(loopkit.with_pruning(base, 0.5, [1]), "with_pruning"), (loopkit.with_ema(base, 0.9), "with_ema"),
                        (loopkit.with_checkpointing(base, tmp_path), "with_checkpointing")]:
        with pytest.raises(TypeError, match=f"with_pruning cannot wrap {name}"):
            loopkit.with_pruning(inner, 0.5, [1])
    with pytest.raises(TypeError, match="with_pruning cannot wrap eval_step"):
        loopkit.with_pruning(loopkit.eval_step(lambda m, b: {}), 0.5, [1])
    with pytest.raises(TypeError, match="with_grad_clip cannot wrap with_pruning"):
        loopkit.with_grad_clip(loopkit.with_pruning(base, 0.5, [1]), max_norm=1.0)
    assert loopkit.with_ema(loopkit.with_pruning(base, 0.5, [1]), 0.9).applied == ("train_step", "with_pruning", "with_ema")
