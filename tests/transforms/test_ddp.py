"""with_ddp: two processes on gloo over loopback, each checked against a single-process reference.

One torchrun launch (module fixture) runs every scenario of tests/_ddp_script.py; each test
then compares what the ranks saw with a run in this process over the two ranks' batches
concatenated (mean losses of equal-size batches, so DDP's averaged gradient is the
big-batch gradient). Equal within 1e-6 (float32; the reduction order differs), and the
ranks bitwise equal to each other.
"""

from __future__ import annotations

import re


import pytest
import torch

import loopkit
from tests import _ddp_script as ddp
from tests._finetune import UNFREEZE_AT, UNFREEZE_EPOCHS, Unfreeze, frozen_state
from tests.conftest import assert_equal_trees, assert_params_close, assert_ranks_identical

TOL = 1e-6
SCENARIOS = ["plain", "accum", "accum_scheduled", "accum_outer", "bucket_views", "static_graph", "flush", "two_heads", "averaged_pruned", "nan_skip",
             "nan_raise", "fp16", "fit", "stop_one_rank", "callbacks_on_rank0", "stop_votes", "uneven", "apart", "signal_one_rank", "signal_apart",
             "signal_in_group", "signal_spaced_votes", "loss_error", "buffers_apart", "sparse_flush", "stop_in_group",
             "export_rank_zero", "uneven_stream", "uneven_sized_stream", "even_stream", "stream_runs_dry", "validating_evaluate", "unfreeze",
             "swa_from_start", "nan_raise_resumed"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory):
    """``ranks(name)``: the two ranks' results of a scenario (one launch for all of them)."""
    out = str(tmp_path_factory.mktemp("ddp"))
    done = ddp.torchrun(out, SCENARIOS, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:]
    return lambda name: ddp.load(out, name)


@pytest.fixture(scope="module")
def pure_ranks(tmp_path_factory: pytest.TempPathFactory):
    """``pure_ranks(name)``: the two ranks' results of a scenario of steps that are not donated (a launch of their own)."""
    out = str(tmp_path_factory.mktemp("ddp_pure"))
    done = ddp.torchrun(out, ["pure", "pure_accum", "pure_two_heads"], timeout=120)
    assert done.returncode == 0, done.stdout[-4000:]
    return lambda name: ddp.load(out, name)


def _reference(batches, step=None, model_seed=0):
    state = ddp.sgd_state(ddp.make_model(model_seed))
    step = loopkit.donate(step or loopkit.train_step(ddp.mse))
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.slow
def test_two_ranks_equal_one_process_over_the_concatenated_batches(ranks):
    results = ranks("plain")
    data = ddp.make_data(ddp.STEPS)
    state, losses = _reference([torch.cat([data[i, 0], data[i, 1]]) for i in range(ddp.STEPS)])
    assert_ranks_identical(results)  # rank 1 started from other weights: DDP broadcast rank 0's
    assert_params_close(results[0]["params"], state.model)
    assert [r["step"] for r in results] == [ddp.STEPS, ddp.STEPS]
    # metrics are each rank's own loss; their mean is the big batch's loss
    for i in range(ddp.STEPS):
        mean = (results[0]["metrics"][i]["loss"] + results[1]["metrics"][i]["loss"]) / 2
        assert abs(mean - losses[i]) <= 1e-5
    assert results[0]["keys"] == list(state.model.state_dict())  # no "module." prefix


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"


def _assert_left_as_given(calls: list[dict]) -> None:
    """Each call's given state (state dict, gradients) as it was before the call."""
    for i, call in enumerate(calls):
        assert_equal_trees(call["before"], call["after"], f"call {i}")


@pytest.mark.slow
def test_a_ddp_step_that_is_not_donated_is_pure_and_trains_as_the_donated_one_and_a_raw_ddp_loop(pure_ranks):
    """SPEC: a step never changes the state it was given; donating is an opt-in. Each pure call trains a copy,
    with its own DDP wrapper (rank 1 started from other weights: the first call's wrapper broadcast rank 0's)."""
    results = pure_ranks("pure")
    assert_ranks_identical(results)
    for r in results:
        _assert_left_as_given(r["calls"])
        _assert_left_as_given(r["wrapped_calls"])  # inside with_logging and with_checkpointing too
        assert r["step"] == ddp.STEPS
        _assert_bitwise(r["params"], r["donated"], "pure vs donated")
        _assert_bitwise(r["params"], r["raw"], "pure vs DistributedDataParallel + SGD")
        _assert_bitwise(r["params"], r["wrapped"], "inside with_logging and with_checkpointing")
        _assert_bitwise(r["params"], r["restored"], "its last checkpoint")
        assert r["restored_step"] == ddp.STEPS
        assert not torch.equal(r["calls"][0]["before"]["state_dict"]["model"]["0.weight"], r["params"]["0.weight"])
    # check_purity's two calls on the final state agree (and would have raised on a changed state)
    assert torch.equal(results[0]["checked"]["0.weight"], results[1]["checked"]["0.weight"])


@pytest.mark.slow
def test_a_pure_ddp_step_under_grad_accum_keeps_the_given_groups_local_gradients_and_trains_as_donated(pure_ranks):
    results = pure_ranks("pure_accum")
    assert_ranks_identical(results)
    for r in results:
        _assert_left_as_given(r["calls"])
        _assert_left_as_given(r["flush_calls"])
        # a group's second call is given the first's local (no_sync) gradients, and leaves them as they were
        assert all(g is not None for g in r["calls"][1]["before"]["grads"].values())
        assert r["step"] == ddp.STEPS
        _assert_bitwise(r["params"], r["donated"], "pure vs donated")
        _assert_bitwise(r["params"], r["raw"], "pure vs DistributedDataParallel with no_sync + SGD")
        _assert_bitwise(r["checked"], r["checked_donated"], "check_purity inside a group vs donated")
        _assert_bitwise(r["flushed"], r["donated_flushed"], "a flush that is not donated vs donated")
        assert r["flushed_step"] == 2
    local = [r["calls"][1]["before"]["grads"]["0.weight"] for r in results]
    assert not torch.equal(local[0], local[1])  # (each rank's own: the check above sees local gradients)


@pytest.mark.slow
def test_pure_calls_with_unused_parameters_average_a_heads_local_gradients_the_synced_micro_batch_skips(pure_ranks):
    """find_unused_parameters: head b's gradients of the group's first micro-batch (local) must be averaged at its
    second, which uses head a on every rank: DDP knows it from the no_sync micro-step, which the pure call's new
    wrapper did not see. A flush that is not donated finds a sparse gradient's layout on the copy it flushes."""
    results = pure_ranks("pure_two_heads")
    assert_ranks_identical(results)
    for r in results:
        _assert_left_as_given(r["calls"])
        _assert_bitwise(r["group"], r["raw"], "the first group vs DistributedDataParallel with no_sync + SGD")
        _assert_bitwise(r["params"], r["donated"], "pure (and a flush) vs donated")
        _assert_bitwise(r["sparse"], r["sparse_donated"], "SparseAdam, pure (and a flush) vs donated")
        assert r["step"] == 2
    assert torch.equal(results[0]["sparse"]["emb.weight"], results[1]["sparse"]["emb.weight"])


@pytest.mark.slow
def test_pruning_and_averages_agree_on_both_ranks_and_with_one_process(ranks):
    results = ranks("averaged_pruned")
    data = ddp.make_data(ddp.STEPS)
    step = loopkit.with_ema(loopkit.with_pruning(loopkit.train_step(ddp.mse), 0.5, [2, ddp.STEPS]), 0.8)
    state, _ = _reference([torch.cat([data[i, 0], data[i, 1]]) for i in range(ddp.STEPS)], step)
    assert_ranks_identical(results)
    for key in ("averages", "masks"):
        assert all(torch.equal(results[0][key][n], results[1][key][n]) for n in results[0][key]), key
    assert_params_close(results[0]["params"], state.model)
    assert_params_close(results[0]["averages"], loopkit.ema_state(state).model)
    assert all(torch.equal(results[0]["masks"][n], m) for n, m in state.extras["pruning/masks"].items())


def test_swa_from_the_first_epoch_averages_rank_zeros_broadcast_weights(ranks):
    """with_swa(with_ddp(...)) whose first average is taken at the run's first call, rank 1 starting from other
    weights: both ranks' averages are the one-process run's over the global batches (rank 1's took its own untrained
    weights in: the average was read before the wrapper's build broadcast rank 0's)."""
    results = ranks("swa_from_start")
    data = ddp.make_data(2)
    step = loopkit.with_swa(loopkit.train_step(ddp.mse), swa_lrs=0.02, swa_epoch_start=1, annealing_epochs=1)
    state, _ = loopkit.run_epochs(step, ddp.sgd_state(ddp.make_model(0)), [torch.cat([data[i, 0], data[i, 1]])
                                                                           for i in range(2)], epochs=3, progress=False)
    assert_ranks_identical(results)
    assert all(torch.equal(results[0]["averages"][n], results[1]["averages"][n]) for n in results[0]["averages"])
    assert_params_close(results[0]["params"], state.model)
    assert_params_close(results[0]["averages"], loopkit.swa_state(state).model)


def _accum_reference(step=None):
    data = ddp.make_data(2 * ddp.STEPS)
    big = [torch.cat([data[2 * k, 0], data[2 * k, 1], data[2 * k + 1, 0], data[2 * k + 1, 1]]) for k in range(ddp.STEPS)]
    return _reference(big, step)


@pytest.mark.slow
def test_grad_accum_under_ddp_equals_the_big_batch_and_skips_the_first_all_reduce(ranks):
    results = ranks("accum")
    state, _ = _accum_reference()
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], state.model)
    for r in results:
        # all-reduces seen by the comm hook after each call: none in a group's first micro-step
        assert r["counts"] == [0, 1, 1, 2, 2, 3, 3, 4]
        assert r["steps"] == [0, 1, 1, 2, 2, 3, 3, 4]


@pytest.mark.slow
def test_a_scheduled_accumulation_under_ddp_equals_its_big_batches_and_skips_each_groups_first_all_reduces(ranks):
    results = ranks("accum_scheduled")
    data = ddp.make_data(2 * ddp.STEPS)
    calls = [torch.cat([data[i, 0], data[i, 1]]) for i in range(2 * ddp.STEPS)]
    big = [torch.cat(calls[0:2]), torch.cat(calls[2:4]), torch.cat(calls[4:8])]  # every 2 in epoch 0, 4 in epoch 1
    state, _ = _reference(big)
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], state.model)
    for r in results:
        assert r["counts"] == [0, 1, 1, 2, 2, 2, 2, 3]
        assert r["steps"] == [0, 1, 1, 2, 2, 2, 2, 3]


@pytest.mark.slow
def test_ddp_outside_accum_and_clip_equals_the_big_batch_clipped(ranks):
    results = ranks("accum_outer")
    state, _ = _accum_reference(loopkit.with_grad_clip(loopkit.train_step(ddp.mse), max_norm=0.3))
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], state.model)
    assert all(m["grad_norm"] > 0.3 for m in results[0]["metrics"][1::2])  # clipping acted at every update
    for r in results:  # with_grad_hook saw the averaged gradient (the clip's), before the clipping, on each rank
        assert [m["hook/norm"] for m in r["metrics"][1::2]] == pytest.approx([m["grad_norm"] for m in r["metrics"][1::2]], rel=1e-6)


def _per_micro_clipped_reference(max_norm):
    """One process: each micro-batch's gradient over both ranks (2b samples) clipped, the group's mean applied."""
    data = ddp.make_data(2 * ddp.STEPS)
    state = ddp.sgd_state(ddp.make_model())
    step = loopkit.donate(loopkit.with_grad_accum(loopkit.with_grad_clip(loopkit.train_step(ddp.mse), max_norm=max_norm), every=2))
    for i in range(2 * ddp.STEPS):
        state, _ = step(state, torch.cat([data[i, 0], data[i, 1]]))
    return state


@pytest.mark.slow
def test_per_micro_batch_transforms_with_gradients_as_bucket_views_keep_every_micro_batch(ranks):
    results = ranks("bucket_views")
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], _per_micro_clipped_reference(0.3).model)


@pytest.mark.slow
def test_a_static_graph_trains_under_accumulation_as_the_big_batch(ranks):
    results = ranks("static_graph")
    state, _ = _accum_reference()
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], state.model)


@pytest.mark.slow
def test_flushing_a_partial_group_averages_its_local_gradients_over_the_ranks(ranks):
    results = ranks("flush")
    data = ddp.make_data(4)
    groups = [torch.cat([data[i, r] for i in range(3) for r in (0, 1)]), torch.cat([data[3, 0], data[3, 1]])]
    state, _ = _reference(groups)
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], state.model)
    assert [r["step"] for r in results] == [2, 2]


def test_a_flushed_sparse_gradient_keeps_its_layout_and_equals_one_process(ranks):
    """An Embedding(sparse=True) under SGD with momentum: the flush made a 2-sparse-dim gradient of a 1-sparse-dim
    one, and the momentum's add refused it at the epoch's end. Reference: one process over the global batches."""
    results = ranks("sparse_flush")
    data = ddp.make_data(3)
    groups = [torch.cat([data[i, r] for i in range(2) for r in (0, 1)]), torch.cat([data[2, 0], data[2, 1]])]
    state = ddp.sgd_state(ddp.SparseNet(), momentum=0.9)
    step = loopkit.donate(loopkit.train_step(ddp.mse))
    for _ in range(2):
        for group in groups:
            state, _ = step(state, group)
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], state.model)
    assert [r["step"] for r in results] == [4, 4]
    # SparseAdam, rank 1's flushed micro-batch not using the embedding: its gradient came dense there and SparseAdam
    # refused it on that rank alone (the other waited in the next collective)
    assert torch.equal(results[0]["sparse_adam"]["emb.weight"], results[1]["sparse_adam"]["emb.weight"])
    assert [r["sparse_adam_step"] for r in results] == [2, 2]


def test_a_callbacks_stop_inside_a_group_waits_for_the_groups_end(ranks):
    """Asked at batch 4 of groups of 3: the fit ends at batch 6, with every rank's gradients in the update (a
    checkpoint there is exact; mid-group it held rank 0's partial gradients alone)."""
    results = ranks("stop_in_group")
    data = ddp.make_data(8)
    groups = [torch.cat([data[i, r] for i in range(k, k + 3) for r in (0, 1)]) for k in (0, 3)]
    state, _ = _reference(groups)
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], state.model)
    assert [(r["step"], r["batch_index"], r["epochs"]) for r in results] == [(2, 6, 1), (2, 6, 1)]  # (the flag dropped)
    for r in results:  # asked at the last batch: the flush ends the group, and the stop validates
        assert [(rec["step"], "val/mse" in rec) for rec in r["last"]] == [(2, True)]


def _two_heads_reference(groups, big_b=False, momentum=0.9):
    """One process, by hand: for each update, the sum of ``weight * mse`` over its (batch, weight) pairs."""
    state = ddp.sgd_state(ddp.TwoHeads(big_b), momentum=momentum)
    model, optimizer = state.model, state.optimizer
    for group in groups:
        optimizer.zero_grad(set_to_none=True)
        sum(weight * ddp.mse(model, batch) for batch, weight in group).backward()
        optimizer.step()
    return model


def _two_heads_global_groups(heads_of_batch=None):
    """The concatenated batches of both ranks: the full group (batches 0 and 1), then the flushed one (batch 2)."""
    data = ddp.two_head_data() if heads_of_batch is None else ddp.two_head_data(heads_of_batch)
    both = [torch.cat([data[i, 0], data[i, 1]]) for i in range(3)]
    return [[(torch.cat(both[:2]), 1.0)], [(both[2], 1.0)]], data


@pytest.mark.slow
@pytest.mark.parametrize("order", ["inner", "outer"])
def test_a_flushed_group_with_a_different_head_on_each_rank_equals_one_process(ranks, order):
    """find_unused_parameters, the partial group's micro-batch using head a on rank 0 and head b on rank 1:
    the flush averaged each rank's own list of gradients, a's onto b's (the ranks drifted apart for good)."""
    results = [r[order] for r in ranks("two_heads")]
    groups, _ = _two_heads_global_groups()
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], _two_heads_reference(groups))
    assert [r["step"] for r in results] == [2, 2]


@pytest.mark.slow
def test_the_synced_backward_after_a_flushed_group_with_unused_heads_equals_one_process(ranks):
    """The next epoch's first synced backward failed on both ranks ("Encountered gradient which is undefined, but
    still allreduced by DDP reducer"): DDP's reducer still counted the flushed group's heads used, whose gradients
    the flush (outside the reducer) had cleared. (Plain SGD: such a head, unused by every rank in the next group,
    updates with a zero gradient there, where one process skips it: with momentum the two differ.)"""
    results = [r["two_epochs"] for r in ranks("two_heads")]
    groups, _ = _two_heads_global_groups(ddp.A_THEN_B)
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], _two_heads_reference(groups + groups, momentum=0.0))
    assert [r["step"] for r in results] == [4, 4]


@pytest.mark.slow
def test_a_flushed_group_whose_gradients_have_another_size_on_each_rank_equals_one_process(ranks):
    """Head b larger than head a: the flush's flattened gradients differed in size (gloo aborted the process)."""
    results = [r["big_b"] for r in ranks("two_heads")]
    groups, _ = _two_heads_global_groups()
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], _two_heads_reference(groups, big_b=True))
    assert [r["step"] for r in results] == [2, 2]


@pytest.mark.slow
def test_a_flushed_group_with_no_gradient_on_one_rank_joins_the_all_reduce(ranks):
    """Rank 1's partial group left no gradient: it skipped the flush's all-reduce (rank 0 waited in it); now
    it contributes zeros, and gets the mean as its gradients, as DDP's own all-reduce would give it."""
    results = [r["none_on_rank1"] for r in ranks("two_heads")]
    groups, data = _two_heads_global_groups()
    groups[1] = [(data[2, 0], 0.5)]  # rank 0's micro-batch alone, averaged with rank 1's zeros
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], _two_heads_reference(groups))
    assert [r["step"] for r in results] == [2, 2]


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_by_both(ranks):
    results = ranks("nan_skip")
    data = ddp.make_data(ddp.STEPS + 1)
    kept = [0, 2, 4]  # rank 1 had NaN inputs at call 1 and a NaN loss (finite gradients) at call 3
    state, _ = _reference([torch.cat([data[i, 0], data[i, 1]]) for i in kept])
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], state.model)
    for r in results:
        assert [m["nan_guard/skipped"] for m in r["metrics"]] == [0.0, 1.0, 0.0, 1.0, 0.0]
        assert r["step"] == 3 and r["skipped_total"] == 2


@pytest.mark.slow
def test_raise_policy_raises_on_every_rank(ranks):
    results = ranks("nan_raise")
    assert [r["calls"] for r in results] == [1, 1]
    assert "non-finite loss (nan) at step 1" in results[1]["raised"]
    assert "on another rank" in results[0]["raised"]


def test_a_raising_guards_refusal_leaves_the_state_whole_on_every_rank(ranks):
    """A NaN batch on one rank, refused by every rank outside an accumulation group: state_at_error is the state the
    refused call was given (its gradients None, its buffers as they were), and training on from it is the run that
    never saw the batch, bitwise (it was used up: state_at_error None)."""
    results = ranks("nan_raise_resumed")
    data = ddp.make_data(4)
    state, _ = _reference([torch.cat([data[i, 0], data[i, 1]]) for i in range(4)])
    for r in results:
        assert r["left_at"] == (2, 2)
        _assert_bitwise(r["resumed"], r["clean"], "the resumed fit")
        assert_params_close(r["resumed"], state.model)
        assert r["kept"]["step"] == r["before"]["step"] == 1 and r["kept"]["grads"] == [None] * 6  # (BatchNorm's too)
        _assert_bitwise(r["kept"]["model"], r["before"]["model"], "the refused call's state")
        assert r["after"]["step"] == 2
        _assert_bitwise(r["after"]["model"], r["skipped"]["model"], "the call after the refused one")
    assert_ranks_identical([{"params": r["resumed"]} for r in results])


@pytest.mark.slow
def test_fp16_overflow_on_one_rank_is_skipped_by_both(ranks):
    results = ranks("fp16")
    assert_ranks_identical(results)
    for r in results:
        assert [m["amp/skipped"] for m in r["metrics"]] == [0.0, 1.0, 0.0, 0.0]
        assert r["step"] == 3
    assert results[0]["scale"] == results[1]["scale"] == 2.0**15
    data = ddp.make_data(ddp.STEPS)
    state, _ = _reference([torch.cat([data[i, 0], data[i, 1]]) for i in (0, 2, 3)],
                          loopkit.with_amp(loopkit.train_step(ddp.mse), dtype=torch.float16))
    assert_params_close(results[0]["params"], state.model, tol=1e-3)  # float16 forward: rounding differs by batch


def _shard_batches(dataset, seed, epoch, rank, batch=ddp.BATCH, pad=True):
    if pad:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = loopkit.distributed._ShardSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [dataset[idx[i:i + batch]] for i in range(0, len(idx), batch)]


@pytest.mark.slow
def test_run_epochs_and_evaluate_under_ddp(ranks):
    results = ranks("fit")
    train_set, val_set = ddp.make_dataset(23, 1), ddp.make_dataset(7, 2)
    state = ddp.sgd_state(ddp.make_model(), seed=5)
    step = loopkit.donate(loopkit.train_step(ddp.mse))
    evaluator = loopkit.eval_step(lambda m, b: {"mse": ddp.mse(m, b)})
    means, vals = [], []
    for epoch in range(2):
        r0, r1 = (_shard_batches(train_set, 5, epoch, r) for r in (0, 1))
        losses = []
        for (x0, y0), (x1, y1) in zip(r0, r1):
            state, metrics = step(state, (torch.cat([x0, x1]), torch.cat([y0, y1])))
            losses.append(float(metrics["loss"]))
        means.append(sum(losses) / len(losses))
        vals.append(loopkit.evaluate(evaluator, state, [val_set[:]])["mse"])  # every sample once
    assert_ranks_identical(results)
    assert_params_close(results[0]["params"], state.model)
    assert [r["train_len"] for r in results] == [12, 12]  # 23 samples padded to 24
    assert [r["val_len"] for r in results] == [4, 3]  # 7 samples, each on one rank
    for r in results:
        assert [h["step"] for h in r["history"]] == [3, 6]
        for h, mean, val in zip(r["history"], means, vals):
            assert abs(h["train/loss"] - mean) <= 1e-5  # the mean over both ranks, read on each
            assert abs(h["val/mse"] - val) <= 1e-5
        assert abs(r["evaluate"]["mse"] - vals[-1]) <= 1e-5
    assert results[0]["local"] != results[1]["local"]  # reduce=False: each rank's own mean


# --- in one process --------------------------------------------------------------------------


def test_a_stop_asked_on_one_rank_stops_every_rank_at_the_same_step(ranks):
    """Lightning reduces should_stop: a time limit reached on one rank first must not leave the other
    waiting in the next all-reduce (it hung until the timeout)."""
    results = ranks("stop_one_rank")
    assert [r["step"] for r in results] == [3, 3]
    assert_ranks_identical(results)


def test_monitors_that_never_stop_make_no_vote_on_the_stop_after_each_batch_and_a_stop_still_stops_every_rank(ranks):
    """A per-step LearningRateMonitor (and a ThroughputMonitor), which never ask to stop, made every batch end with
    the ranks' vote on should_stop (an all-reduce and its read: on NCCL a device sync a step): they now vote no more
    than a fit without callbacks; a callback that stops on rank 0 alone beside them (one of its own, or a
    LearningRateMonitor subclass whose on_batch_end stops) is still voted on after each batch and stops both ranks
    at step 3, as the uninterrupted run over the concatenated batches."""
    results = ranks("stop_votes")
    for r in results:
        assert r["monitors"]["votes"] <= r["none"]["votes"] < 12, r  # (12 batches: a vote each before)
        assert r["monitors"]["step"] == r["none"]["step"] == 12
        assert [r[name]["step"] for name in ("stop", "stopping_monitor")] == [3, 3]  # (rank 1 was told: a vote)
    data = ddp.make_data(6)
    batches = [torch.cat([data[i, 0], data[i, 1]]) for i in range(6)]
    for name, count in (("none", 12), ("monitors", 12), ("stop", 3), ("stopping_monitor", 3)):
        assert_ranks_identical([r[name] for r in results])
        state, _ = _reference((batches * 2)[:count], model_seed=0)
        assert_params_close(results[0][name]["params"], state.model)


@pytest.mark.parametrize("name, stopped", [("signal_one_rank", 4), ("signal_apart", 3)])
def test_a_stop_signal_stops_every_rank_after_the_same_step_and_the_resumed_run_ends_as_one_process(ranks, name, stopped):
    """SIGTERM reaches one rank alone, or each rank at another step: every rank stops one step after the
    first signal, saves, and the run resumed from that checkpoint ends as the uninterrupted run over the
    concatenated batches (the rank that stopped alone returned, and the other waited in its next all-reduce
    until the timeout)."""
    results = ranks(name)
    assert [r["stopped"] for r in results] == [stopped, stopped]
    assert [r["restored"] for r in results] == [stopped, stopped]
    assert all(r["handler_restored"] for r in results)
    assert_ranks_identical(results)
    data = ddp.make_data(ddp.SIGNAL_STEPS)
    batches = [torch.cat([data[i, 0], data[i, 1]]) for i in range(ddp.SIGNAL_STEPS)]
    state, _ = _reference(batches * 2, model_seed=0)
    assert [r["step"] for r in results] == [2 * ddp.SIGNAL_STEPS] * 2
    assert_params_close(results[0]["params"], state.model)
    assert [[r["epoch"] for r in result["history"]] for result in results] == [[0, 1], [0, 1]]


def test_votes_spaced_in_time_still_stop_every_rank_at_one_step_soon_after_the_signal(ranks):
    """A vote each step cost a collective each step (3% of a 7 ms CPU step here); spaced votes (each agrees on
    the steps to the next, from the ranks' step times) stop every rank at one step within two intervals."""
    results = ranks("signal_spaced_votes")
    stopped = results[0]["stopped"]
    assert [r["stopped"] for r in results] == [stopped, stopped] and 3 < stopped <= 3 + 2 * 16  # (max_vote_steps)
    assert stopped < 2 * ddp.SPACED_STEPS  # (it stopped: the run had steps left)
    assert_ranks_identical(results)
    data = ddp.make_data(ddp.SPACED_STEPS)
    state, _ = _reference([torch.cat([data[i, 0], data[i, 1]]) for i in range(ddp.SPACED_STEPS)] * 2)
    assert [r["step"] for r in results] == [2 * ddp.SPACED_STEPS] * 2
    assert_params_close(results[0]["params"], state.model, tol=1e-4)  # (200 steps of float32 sums in another order)


def test_a_stop_signal_inside_an_accumulation_group_stops_every_rank_at_its_end(ranks):
    """The checkpoint holds rank 0's partial gradients alone (each rank's stay local under no_sync): a stop
    inside a group resumed rank 1 from rank 0's, and the run ended elsewhere. The ranks now finish the group."""
    results = ranks("signal_in_group")
    assert [r["stopped"] for r in results] == [2, 2]  # after call 4: the vote agreed after call 3, mid-group
    assert [r["restored"] for r in results] == [2, 2]
    assert_ranks_identical(results)
    data = ddp.make_data(ddp.SIGNAL_STEPS)
    big = [torch.cat([data[i, 0], data[i, 1], data[i + 1, 0], data[i + 1, 1]]) for i in range(0, ddp.SIGNAL_STEPS, 2)]
    state, _ = _reference(big * 2)
    assert [r["step"] for r in results] == [ddp.SIGNAL_STEPS] * 2
    assert_params_close(results[0]["params"], state.model)


def test_a_loss_fn_error_under_ddp_leaves_the_newest_whole_state_but_at_the_call_that_built_the_wrapper(ranks):
    """state_at_error was None under with_ddp whatever the call (only the call that builds the wrapper
    changes the parameters before the backward: it broadcasts rank 0's)."""
    results = ranks("loss_error")
    assert [r["first"] for r in results] == [True, True]
    assert [r["position"] for r in results] == [(3, 0, 3), (3, 0, 3)]
    assert_ranks_identical(results)
    data = ddp.make_data(6)
    state, _ = _reference([torch.cat([data[i, 0], data[i, 1]]) for i in range(6)])
    assert [r["step"] for r in results] == [6, 6]
    assert_params_close(results[0]["params"], state.model)


def test_callbacks_on_one_rank_only_do_not_hang_the_others(ranks):
    results = ranks("callbacks_on_rank0")
    assert results[0]["step"] == results[1]["step"] > 0
    assert_ranks_identical(results)


def test_unequal_batch_counts_and_unequal_starts_are_refused_on_every_rank(ranks):
    """Before: a hang until the timeout, or (under accumulation) two replicas silently drifting apart."""
    for name, message in (("uneven", "epoch 0 has another number of batches on each rank, and with_ddp needs one step per batch on "
                                     "every rank .*: rank 1 has {'batches': 2}, rank 0 has {'batches': 3}"),
                          ("apart", "the ranks start from different states .*: rank 1 has {'step': 2")):
        for result in ranks(name):
            assert re.search(message, result["error"]), result["error"]


@pytest.mark.slow
def test_buffers_that_differ_between_ranks_are_refused_on_every_rank(ranks):
    """Before: every rank waited for the process group's timeout in DDP's broadcast of rank 0's buffers."""
    for result in ranks("buffers_apart"):
        assert re.search(r"buffers differ between ranks.*rank 0 has 0 buffers, rank 1 has 1: \['counts'\]", result["extra"])
        assert re.search(r"rank 0 has \('counts', \(3,\), 'torch.float32'\), rank 1 has \('counts', \(4,\)", result["shape"])


@pytest.fixture
def group():
    """A one-rank gloo process group in this process (destroyed afterwards)."""
    dist = torch.distributed
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_without_a_process_group_under_torchrun_the_error_says_how_to_start(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's word that there are others: init() was forgotten
    with pytest.raises(RuntimeError, match=r"torchrun --nproc-per-node 2 .*loopkit\.distributed\.init\(\)"):
        loopkit.with_ddp(loopkit.train_step(ddp.mse))


@pytest.mark.parametrize("world_size", [None, "1"])
@pytest.mark.parametrize("accum", [1, 2])
def test_in_one_process_without_a_group_with_ddp_trains_as_the_plain_step_bitwise(monkeypatch, world_size, accum):
    """A torchrun script run as ``python script.py``: init() is a no-op, and with_ddp then changes nothing."""
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        assert loopkit.distributed.init() is False
    else:  # (a WORLD_SIZE of 1 without a group: with_ddp has no other process to wait for)
        monkeypatch.setenv("WORLD_SIZE", world_size)
    data = ddp.make_data(6)
    batches = [data[i, 0] for i in range(6)]

    def build(parallel: bool):
        step = loopkit.train_step(ddp.mse)
        step = loopkit.with_ddp(step) if parallel else step
        return loopkit.with_grad_accum(step, every=accum) if accum > 1 else step

    assert build(True).applied[:2] == ("train_step", "with_ddp")
    for donated in (True, False):
        wrap = loopkit.donate if donated else (lambda s: s)
        ref, ref_losses = _reference(batches, wrap(build(False)))
        state, losses = _reference(batches, wrap(build(True)))
        for (n, a), b in zip(ref.model.named_parameters(), state.model.parameters()):
            assert torch.equal(a, b), (donated, n)
        assert losses == ref_losses and state.step == ref.step == 6 // accum
    given = ddp.sgd_state(ddp.make_model())
    loopkit.check_purity(build(True), given, batches[0])
    fitted, _ = loopkit.run_epochs(build(True), ddp.sgd_state(ddp.make_model()), batches, epochs=1, progress=False)
    plain, _ = loopkit.run_epochs(build(False), ddp.sgd_state(ddp.make_model()), batches, epochs=1, progress=False)
    for (n, a), b in zip(plain.model.named_parameters(), fitted.model.parameters()):
        assert torch.equal(a, b), n
    assert not torch.distributed.is_initialized()  # no process group was made
    with pytest.raises(TypeError, match="apply with_ddp once"):
        loopkit.with_ddp(loopkit.with_ddp(loopkit.train_step(ddp.mse)))


def test_meaningless_orders_raise_at_build_time(group):
    step = loopkit.with_ddp(loopkit.train_step(ddp.mse))
    with pytest.raises(TypeError, match="with_ddp cannot wrap with_ddp"):
        loopkit.with_ddp(step)
    with pytest.raises(TypeError, match="with_ddp cannot wrap eval_step"):
        loopkit.with_ddp(loopkit.eval_step(lambda m, b: {}))
    with pytest.raises(TypeError, match="with_ddp cannot wrap with_logging"):
        loopkit.with_ddp(loopkit.with_logging(loopkit.train_step(ddp.mse), loopkit.ConsoleLogger()))
    with pytest.raises(TypeError, match="cannot wrap a donated step"):
        loopkit.with_ddp(loopkit.donate(loopkit.train_step(ddp.mse)))
    # the meaningful orders build, with every gradient transform on either side
    loopkit.with_grad_clip(loopkit.with_nan_guard(loopkit.with_amp(step, dtype=torch.float16)), max_norm=1.0)
    loopkit.with_ddp(loopkit.with_grad_accum(loopkit.with_grad_clip(loopkit.train_step(ddp.mse), max_norm=1.0), every=2))


def test_a_step_that_is_not_donated_is_pure_and_trains_as_the_donated_one(group):
    step = loopkit.with_ddp(loopkit.train_step(ddp.mse))
    batches = [b[0] for b in ddp.make_data(3)]
    state = ddp.sgd_state(ddp.make_model())
    new, _ = loopkit.check_purity(step, state, batches[0])  # the given state unchanged, two calls alike
    logged = loopkit.with_logging(step, loopkit.ConsoleLogger(), every_n_steps=1)
    given, pure = state, None
    for stepper in (step, logged):
        pure = state
        for batch in batches:
            pure, _ = stepper(pure, batch)
    donated, _ = _reference(batches, step)
    for (n, a), b in zip(donated.model.named_parameters(), pure.model.parameters()):
        assert torch.equal(a, b), n
    assert given.step == 0 and new.step == 1 and pure.step == 3


def test_one_rank_matches_the_plain_step_bitwise(group):
    """World size 1: DDP's gradient averaging is the identity, so the trajectory is the plain one."""
    data = ddp.make_data(3)
    batches = [data[i, 0] for i in range(3)]
    ref, _ = _reference(batches)
    state, _ = _reference(batches, loopkit.with_ddp(loopkit.train_step(ddp.mse)))
    for (n, a), b in zip(ref.model.named_parameters(), state.model.parameters()):
        assert torch.equal(a, b), n


def _spying(step):
    """``step`` with its loss_fn recording the module it is given (the DDP wrapper), and the list it records in."""
    import attrs

    seen: list = []
    loss_fn = step.loss_fn

    def spy(model, batch):
        seen.append(model)
        return loss_fn(model, batch)

    return attrs.evolve(step, loss_fn=spy), seen


def test_the_ddp_wrapper_is_built_once_per_model(group):
    step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(ddp.mse)))
    state = ddp.sgd_state(ddp.make_model())
    step, seen = _spying(step)
    batch = ddp.make_data(1)[0, 0]
    state, _ = step(state, batch)
    state, _ = step(state, batch)
    assert seen[0] is seen[1] and isinstance(seen[0], torch.nn.parallel.DistributedDataParallel)
    assert seen[0].module is state.model


@pytest.mark.slow
def test_a_layer_unfrozen_mid_fit_is_reduced_over_the_ranks_and_resumes_as_the_uninterrupted_run(ranks):
    """docs/from_lightning.md's BackboneFinetuning recipe under with_ddp: DDP reduces only the parameters that
    required gradients when its wrapper was built; the wrapper kept the frozen layer out, each rank trained it on
    its own gradient, and a resumed run (a wrapper built after the unfreeze) trained another model."""
    results = ranks("unfreeze")
    assert_ranks_identical(results)
    data = ddp.make_data(2)
    batches = [torch.cat([data[i, 0], data[i, 1]]) for i in range(2)]
    state, _ = loopkit.run_epochs(loopkit.train_step(ddp.mse), frozen_state(ddp.make_model()), batches,
                                  epochs=UNFREEZE_EPOCHS, callbacks=[Unfreeze()], progress=False)
    assert state.model[0].weight.requires_grad and len(state.optimizer.param_groups) == 2
    assert not torch.equal(state.model[0].weight, ddp.make_model()[0].weight)  # (the layer trained)
    assert_params_close(results[0]["params"], state.model)
    for result in results:
        for cut, params in result["resumed"].items():
            _assert_bitwise(params, result["params"], f"resumed after epoch {cut}")


@pytest.fixture(scope="module")
def flags_apart(tmp_path_factory: pytest.TempPathFactory):
    """The two ranks' results of the ``flags_apart`` scenario (a launch of its own: gloo aborted it)."""
    out = str(tmp_path_factory.mktemp("ddp_flags_apart"))
    done = ddp.torchrun(out, ["flags_apart"], timeout=120)
    assert done.returncode == 0, done.stdout[-4000:]
    return ddp.load(out, "flags_apart")


def test_requires_grad_set_otherwise_on_each_rank_is_refused_on_every_rank_leaving_the_state_usable(flags_apart):
    """Before: each rank built its wrapper with its own flags, and gloo aborted both processes (DDP's check of the
    parameters' shapes): now every rank refuses the build, naming the parameters whose flags differ and the ranks."""
    refused = r"^with_ddp: requires_grad or the optimizer differs between the ranks .*alike on every rank\): "
    for result in flags_apart:
        assert re.search(refused + re.escape("rank 1 has {'0.weight': False, '0.bias': True}, "
                                             "rank 0 has {'0.weight': True, '0.bias': False}") + "$", result["mid_fit"])
        assert re.search(refused + re.escape("rank 1 has {'2.bias': False}, rank 0 has {'2.bias': True}") + "$",
                         result["first_call"])
        assert result["intact"]
    assert_ranks_identical(flags_apart)
    data = ddp.make_data(ddp.FLAGS_APART_STEPS)
    state = ddp.sgd_state(ddp.make_model())
    state.model[0].requires_grad_(False)
    step = loopkit.donate(loopkit.train_step(ddp.mse))
    for i in range(ddp.FLAGS_APART_STEPS):  # the refused call changed nothing: one process, unfrozen after step 0
        state, _ = step(state, torch.cat([data[i, 0], data[i, 1]]))
        state.model[0].requires_grad_(True)
    assert [r["step"] for r in flags_apart] == [ddp.FLAGS_APART_STEPS] * 2
    assert_params_close(flags_apart[0]["params"], state.model)


@pytest.fixture(scope="module")
def flags_apart_epoch(tmp_path_factory: pytest.TempPathFactory):
    """The two ranks' results of the ``flags_apart_epoch`` scenario (a launch of its own, with a short timeout of
    the process group: before, rank 1 waited in it)."""
    out = str(tmp_path_factory.mktemp("ddp_flags_apart_epoch"))
    done = ddp.torchrun(out, ["flags_apart_epoch"], timeout=90, env={"LOOPKIT_TEST_TIMEOUT": "10"})
    assert done.returncode == 0, done.stdout[-4000:]
    return ddp.load(out, "flags_apart_epoch")


def test_requires_grad_changed_on_one_rank_alone_is_refused_at_the_epochs_start_leaving_the_state_usable(
        flags_apart_epoch):
    """A callback unfreezing a layer on rank 1 alone in on_epoch_start (and a change of rank 1 alone between fits):
    rank 1 built its wrapper alone at the epoch's first step, its check of the flags waiting for the others until the
    process group's timeout, while rank 0 trained on. Now run_epochs' check of the epoch's start compares the flags
    too, in the same gather: every rank refuses before any step of the epoch, naming the parameters and the ranks,
    and the state left goes on, the flags put alike, as the one-process run that unfroze the layer at that epoch."""
    refused = (r"^run_epochs: the parameters' requires_grad differs between the ranks at the start of epoch {} "
               r"\(changed on some ranks only: in on_epoch_start, or before the fit\), and with_ddp reduces .*"
               r"\(change requires_grad alike on every rank\): ")
    for result in flags_apart_epoch:
        assert re.search(refused.format(UNFREEZE_AT) + re.escape(
            "rank 1 has {'requires_grad off': []}, rank 0 has {'requires_grad off': ['0.weight', '0.bias']}") + "$",
            result["epoch"]), result["epoch"]
        assert result["at"] == (UNFREEZE_AT, 0, 2 * UNFREEZE_AT)  # before any step of the epoch
        assert re.search(refused.format(0) + re.escape(
            "rank 1 has {'requires_grad off': ['0.weight', '0.bias', '2.bias']}, "
            "rank 0 has {'requires_grad off': ['0.weight', '0.bias']}") + "$", result["before_fit"]), \
            result["before_fit"]
        assert result["before_fit_at"] == (0, 0, 0)
    assert_ranks_identical(flags_apart_epoch)
    data = ddp.make_data(2)
    batches = [torch.cat([data[i, 0], data[i, 1]]) for i in range(2)]
    state, _ = loopkit.run_epochs(loopkit.train_step(ddp.mse), frozen_state(ddp.make_model()), batches,
                                  epochs=UNFREEZE_EPOCHS, callbacks=[Unfreeze()], progress=False)
    assert [r["step"] for r in flags_apart_epoch] == [2 * UNFREEZE_EPOCHS] * 2
    assert_params_close(flags_apart_epoch[0]["params"], state.model)


def test_optimizers_apart_are_refused_on_every_rank_at_the_wrappers_build_then_mended_train_as_a_raw_loop(flags_apart):
    """Rank 1's SGD with lr 0.0, an Adam, or a group without the last bias: before, each rank updated the averaged
    gradients with its own optimizer, the replicas apart, unwarned; now every rank refuses the wrapper's build (in
    the flags' gather), naming the optimizer's class or the param group and the ranks, the state left usable.
    Mended (rank 1's lr put to 0.1), the fit equals a raw loop over the global batches."""
    refused = r"^with_ddp: requires_grad or the optimizer differs between the ranks .*alike on every rank\): rank 1 has "
    for result in flags_apart:
        assert re.search(refused + r"\{'optimizer param group 0': \{'params': 4, 'lr': 0\.0, .*\}\}, rank 0 has "
                         r"\{'optimizer param group 0': \{'params': 4, 'lr': 0\.1, ", result["lr"])
        assert re.search(refused + re.escape("{'optimizer class': 'torch.optim.adam.Adam', ") + ".* rank 0 has "
                         + re.escape("{'optimizer class': 'torch.optim.sgd.SGD', "), result["class"])
        assert re.search(refused + r"\{'optimizer param group 0': \{'params': 3, .*\}\}, rank 0 has "
                         r"\{'optimizer param group 0': \{'params': 4, ", result["group"])
        assert not any(result[kind].endswith("(the state changed)") for kind in ("lr", "class", "group"))
    assert_ranks_identical([{"params": result["mended"]} for result in flags_apart])
    model = ddp.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = ddp.make_data(ddp.FLAGS_APART_STEPS)
    for i in range(ddp.FLAGS_APART_STEPS):
        optimizer.zero_grad()
        ddp.mse(model, torch.cat([data[i, 0], data[i, 1]])).backward()
        optimizer.step()
    assert_params_close(flags_apart[0]["mended"], model)


def test_a_ranks_lone_rebuild_says_in_its_error_that_every_rank_must_change_requires_grad_alike(group, monkeypatch):
    """A rank that changed requires_grad alone builds its wrapper alone: its check of the flags waits for the
    others until the timeout, and its error said only that another rank had probably died."""
    from loopkit import _collective

    step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(ddp.mse)))
    state, _ = step(ddp.sgd_state(ddp.make_model()), ddp.make_data(1)[0, 0])
    state.model[0].requires_grad_(False)

    def timed_out(*args, **kwargs):
        raise RuntimeError("Timed out waiting 1800000ms for send operation to complete")  # (gloo's, at the timeout)

    monkeypatch.setattr(_collective, "active", lambda: True)  # (as in a group of several ranks)
    monkeypatch.setattr(torch.distributed, "all_gather_object", timed_out)
    with pytest.raises(RuntimeError, match=r"^with_ddp: the gather that checks every rank agrees with rank 0 failed on "
                                           r"rank 0 of 1: every rank must reach it at the same point \(a change of "
                                           r"requires_grad builds the wrapper anew at the next call: a rank that changed "
                                           r"it alone builds it alone; change it alike on every rank\), or another"):
        step(state, ddp.make_data(1)[0, 0])


def test_a_requires_grad_change_builds_the_wrapper_anew_and_freezing_inside_a_group_is_refused(group):
    """One rank: the wrapper is built again when a flag changes (and only then); a parameter frozen while it holds
    an accumulation group's gradient is refused (DDP would not reduce it), one unfrozen there is not."""
    step = loopkit.donate(loopkit.with_grad_accum(loopkit.with_ddp(loopkit.train_step(ddp.mse)), every=2))
    state = ddp.sgd_state(ddp.make_model())
    state.model[0].requires_grad_(False)
    step, seen = _spying(step)
    batches = ddp.make_data(6)[:, 0]
    plain = loopkit.donate(loopkit.with_grad_accum(loopkit.train_step(ddp.mse), every=2))
    reference = ddp.sgd_state(ddp.make_model())
    reference.model[0].requires_grad_(False)
    for i, batch in enumerate(batches[:4]):
        if i == 3:  # inside a group: unfrozen, it trains on the group's second micro-batch
            state.model[0].requires_grad_(True)
            reference.model[0].requires_grad_(True)
        state, _ = step(state, batch)
        reference, _ = plain(reference, batch)
    assert seen[0] is seen[2] and seen[3] is not seen[2]
    _assert_bitwise(ddp._params(state.model), ddp._params(reference.model), "unfrozen inside a group")
    wrapped = dict(seen[3].named_parameters())
    assert all(p.requires_grad for p in wrapped.values()) and seen[3].module is state.model
    state, _ = step(state, batches[4])
    state.model[2].requires_grad_(False)  # inside a group, holding its gradient
    with pytest.raises(ValueError, match=r"requires_grad of 2\.weight, 2\.bias was turned off inside an accumulation") \
            as refused:
        step(state, batches[5])
    assert loopkit.state_at_error(refused.value) is state  # refused before anything ran: the state is usable
    state.model[2].requires_grad_(True)  # the flag put back: the group goes on, as the plain accumulation's
    state, _ = step(state, batches[5])
    for batch in batches[4:]:
        reference, _ = plain(reference, batch)
    _assert_bitwise(ddp._params(state.model), ddp._params(reference.model), "after the refusal")


def test_module_says_whether_it_built_and_wraps_is_a_question_that_module_does_not_trust(group, monkeypatch):
    """wraps() left a note that the next module() trusted without comparing the flags: after a wraps() whose
    module() never came, a flag changed, the next module() returned the wrapper built with the old flags."""
    from loopkit.transforms import ddp as ddp_module

    model = ddp.make_model()
    sync = ddp_module.DDPSync({})
    first, built = sync.module(model)
    assert built and first.module is model
    assert sync.wraps(model) and sync.module(model) == (first, False)
    assert sync.wraps(model)  # (a question alone: no module() follows it)
    model[0].requires_grad_(False)
    second, built = sync.module(model)
    assert built and second is not first and not any(p.requires_grad for p in second.module[0].parameters())
    reads = []  # a donated step's call reads each flag once (one comparison: the hot path of every DDP step)
    monkeypatch.setattr(ddp_module, "_REQUIRES_GRAD", lambda p: reads.append(p) or p.requires_grad)
    step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(ddp.mse)))
    state = ddp.sgd_state(model)
    batch = ddp.make_data(1)[0, 0]
    state, _ = step(state, batch)  # (builds the step's own wrapper: the flags are read to compare, then recorded)
    reads.clear()
    state, _ = step(state, batch)
    assert len(reads) == len(list(model.parameters()))


def test_reducing_a_flushed_group_on_one_rank_keeps_the_gradients_and_creates_none(group):
    """World size 1: the mean is the gradient; a parameter without one (on every rank) keeps none."""
    from loopkit.transforms.ddp import DDPSync

    sync = DDPSync({"find_unused_parameters": True})
    model = ddp.TwoHeads()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sync.reduce_grads(optimizer)  # no gradients (and no wrapper yet): every rank joins all the same
    assert all(p.grad is None for p in model.parameters())
    ddp.mse(model, ddp.two_head_data()[0, 0]).backward()  # head a only
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    sync.reduce_grads(optimizer)
    assert len(before) == 4 and all(torch.equal(model.get_parameter(n).grad, g) for n, g in before.items())
    assert model.b.weight.grad is None and model.b.bias.grad is None


def test_export_weights_under_ddp_writes_rank_zeros_weights_alone(ranks):
    """Rank 1 exported after rank 0 (and its BatchNorm statistics differ): the file still holds rank 0's, as the
    ``safetensors`` package reads it."""
    from safetensors.torch import load

    results = ranks("export_rank_zero")
    mean = "1.running_mean"
    assert not torch.equal(results[0]["buffers"][mean], results[1]["buffers"][mean])  # (the test can tell them apart)
    exported = load(results[1]["file"])  # (read after both ranks were done)
    for name, value in {**results[0]["buffers"], **results[0]["params"]}.items():
        assert torch.equal(exported[name], value), name


def _raw_mse(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], samples: slice) -> float:
    """The BatchNorm model of ``params`` and ``buffers`` in eval mode over ``samples`` of the validation set, in one
    process, by hand (no loopkit)."""
    model = ddp.make_bn_model()
    model.load_state_dict({**params, **buffers})
    model.eval()
    x, y = ddp.make_dataset(16, 3)[samples]
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


def test_evaluate_inside_validating_reads_rank_zeros_buffers_and_leaves_each_ranks_own_after(ranks):
    """The pattern the README gives for an evaluation of one's own under with_ddp, ``with step.validating(state):
    loopkit.evaluate(...)``: inside, every rank evaluates with rank 0's running statistics (the means over both
    ranks, and each rank's own, equal rank 0's model evaluated in one process); after the block each rank holds its
    own buffers again, bit for bit, and evaluates with them."""
    results = ranks("validating_evaluate")
    assert_ranks_identical(results)
    params, rank_zeros = results[0]["params"], results[0]["own"]
    assert not torch.equal(rank_zeros["1.running_mean"], results[1]["own"]["1.running_mean"])  # (the test can tell)
    whole = _raw_mse(params, rank_zeros, slice(0, 16))
    for rank, r in enumerate(results):
        half = slice(8 * rank, 8 * rank + 8)
        assert r["inside"]["reduced"]["mse"] == pytest.approx(whole, abs=TOL)
        assert r["inside"]["local"]["mse"] == pytest.approx(_raw_mse(params, rank_zeros, half), abs=TOL)
        _assert_bitwise(r["inside_buffers"], rank_zeros, f"rank {rank} inside")
        _assert_bitwise(r["after_buffers"], r["own"], f"rank {rank} after")
        assert r["after"]["mse"] == pytest.approx(_raw_mse(params, r["own"], half), abs=TOL)
    assert abs(results[1]["after"]["mse"] - results[1]["inside"]["local"]["mse"]) > 1e-3  # (rank 1's own differ)


@pytest.mark.parametrize("scenario", ["uneven_stream", "uneven_sized_stream"])
def test_data_ending_sooner_on_one_rank_than_its_length_says_ends_the_epoch_on_every_rank(ranks, scenario):
    """``uneven_stream``: data without a length, rank 0's third batch of each epoch dropped (it is warned of there).
    ``uneven_sized_stream``: a DataLoader over an IterableDataset whose len() (torch's estimate) says 3 batches on both
    ranks, rank 1's yielding 2. Each run equals the run whose data left the batch out, on both ranks (each hung until
    the process group's timeout)."""
    uneven, even = ranks(scenario), ranks("even_stream")
    for got, want in zip(uneven, even, strict=True):
        assert got["step"] == want["step"] == 4
        assert got["history"] == want["history"]
        for name, value in want["params"].items():
            assert torch.equal(got["params"][name], value), name
    assert len(uneven[0]["warnings"]) == 2 and "ended after 2 batches" in uneven[0]["warnings"][0]
    assert uneven[1]["warnings"] == [] and even[0]["warnings"] == []


def test_data_without_a_length_yielding_nothing_on_one_rank_stops_every_rank(ranks):
    results = ranks("stream_runs_dry")
    assert "train_data yielded no batches in epoch 0" in results[1]["refused"]
    assert "another rank's train_data yielded no batches in epoch 0" in results[0]["refused"]
    for r in results:
        assert (r["step"], r["epochs"]) == (2, 1) and len(r["warnings"]) == 1 and "epoch 1" in r["warnings"][0]
    for name, value in results[0]["params"].items():
        assert torch.equal(results[1]["params"][name], value), name


def test_ddp_options_are_agreed_as_torch_takes_them():
    """An option given as torch's default is the option not given (broadcast_buffers=None where torch's default is
    None, static_graph=False); the options that decide DDP's collectives and were not compared are now
    (init_sync, forward_sync_buffers, bucket_cap_mb_list, skip_all_reduce_unused_params). bucket_cap_mb=25 is not the
    default: torch gives the default's first bucket 1 MiB (an explicit 25, 25 MiB), and under find_unused_parameters
    the ranks' all-reduces then differ in size (gloo aborts), so the two stay apart."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    from loopkit.transforms.ddp import DDPSync

    def agreed(**options):
        return DDPSync(options).agreed_options

    assert agreed(static_graph=False, find_unused_parameters=False, init_sync=True) == agreed()
    assert agreed(broadcast_buffers=True) == agreed(forward_sync_buffers=True) == agreed()
    none_is_default = inspect.signature(DistributedDataParallel).parameters["broadcast_buffers"].default is None
    assert (agreed(broadcast_buffers=None) == agreed()) is none_is_default
    assert agreed(bucket_cap_mb=25) != agreed()
    kinds = [agreed(), agreed(init_sync=False), agreed(broadcast_buffers=False), agreed(forward_sync_buffers=False),
             agreed(bucket_cap_mb_list=[1, 25]), agreed(skip_all_reduce_unused_params=True)]
    assert all(a != b for i, a in enumerate(kinds) for b in kinds[i + 1:])


def test_ddp_bucket_options_are_agreed_as_torch_builds_the_buckets():
    """Before: agreed_options held bucket_cap_mb and bucket_cap_mb_list as given, so ranks whose DDP buckets are
    alike were refused at the fit's start. Reference: torch's own _BucketCapacityConfig for each spelling (a
    non-empty list sizes the buckets and bucket_cap_mb is ignored; an empty list is no list)."""
    from torch.nn.parallel.distributed import _BucketCapacityConfig

    from loopkit.transforms.ddp import DDPSync

    def torch_buckets(options):
        return _BucketCapacityConfig.create(options.get("bucket_cap_mb"), options.get("bucket_cap_mb_list"), False)

    spellings = [{}, {"bucket_cap_mb_list": []}, {"bucket_cap_mb": 25}, {"bucket_cap_mb": 25, "bucket_cap_mb_list": []},
                 {"bucket_cap_mb": 10}, {"bucket_cap_mb_list": [5, 10]}, {"bucket_cap_mb_list": (5, 10)},
                 {"bucket_cap_mb": 25, "bucket_cap_mb_list": [5, 10]}, {"bucket_cap_mb": 1, "bucket_cap_mb_list": [5, 10]},
                 {"bucket_cap_mb_list": [10, 5]}, {"bucket_cap_mb_list": [10]}]
    for i, a in enumerate(spellings):
        for b in spellings[i + 1:]:
            alike = torch_buckets(a) == torch_buckets(b)
            assert (DDPSync(a).agreed_options == DDPSync(b).agreed_options) is alike, (a, b, alike)
    assert torch_buckets({"bucket_cap_mb": 25}) != torch_buckets({})  # (the two stay apart: first bucket 25 MiB, 1)


def test_a_rank_dying_at_the_check_of_the_buffers_names_it(group, monkeypatch):
    """The first call's all-gather of every rank's buffer names, before DDP wraps the model (gloo's raw error
    before); the state is left as it was."""
    def connection_reset(*args, **kwargs):
        raise RuntimeError("Connection reset by peer")  # (gloo's word when the other rank died)

    monkeypatch.setattr(torch.distributed, "all_gather_object", connection_reset)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"^with_ddp: the all-gather of every rank's buffers \(names, shapes, dtypes\) "
                                           r"failed on rank 0 of 1: another rank has probably died"):
        loopkit.donate(loopkit.with_ddp(loopkit.train_step(lambda m, b: m(b).sum())))(state, torch.ones(4, 2))
    assert_equal_trees(model.state_dict(), before)


def _hook_of_an_int_bucket(state, bucket: int):
    return bucket


@pytest.mark.parametrize("options, error, message", [
    ({"find_unused_parameter": True}, TypeError,
     r"^with_ddp: find_unused_parameter= is not an option of with_ddp nor of DistributedDataParallel; "
     r"did you mean find_unused_parameters=\?$"),
    ({"comm_hok": None}, TypeError, r"^with_ddp: comm_hok= is not .*; did you mean comm_hook=\?$"),
    ({"comm_hook": lambda bucket: bucket}, TypeError,
     r"^with_ddp: comm_hook must be callable as hook\(state, bucket\), got .*<lambda>\(bucket\)$"),
    ({"comm_hook": lambda state, grads: grads}, TypeError, r"^with_ddp: comm_hook's second parameter must be named bucket"),
    ({"comm_hook": _hook_of_an_int_bucket}, ValueError, r"^with_ddp: comm_hook's bucket annotation must be"),
    ({"comm_hook": "allreduce"}, TypeError, r"^with_ddp: comm_hook must be callable as hook\(state, bucket\), got str"),
])
def test_ddp_options_torch_refuses_at_the_first_step_are_refused_at_build_also_in_one_process(
        monkeypatch, options, error, message):
    """They were accepted (and, in one process, ignored): the first step under a process group then raised torch's
    own error (DistributedDataParallel.__init__'s unexpected keyword, the hook's call), the donated state used up."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = torch.distributed
    for grouped in (False, True):
        if grouped:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            with pytest.raises(error, match=message):
                loopkit.with_ddp(loopkit.train_step(ddp.mse), **options)
        finally:
            if grouped:
                dist.destroy_process_group()


def test_ddp_options_and_hooks_torch_takes_are_accepted(group):
    import functools

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    step = loopkit.with_ddp(loopkit.train_step(ddp.mse), comm_hook=allreduce_hook, find_unused_parameters=True,
                            bucket_cap_mb=5, gradient_as_bucket_view=True)
    assert step.sync.options == {"find_unused_parameters": True, "bucket_cap_mb": 5, "gradient_as_bucket_view": True}
    with pytest.raises(TypeError, match=r"reads the comm_hook's __name__ and __qualname__, and partial has none"):
        loopkit.with_ddp(loopkit.train_step(ddp.mse), comm_hook=functools.partial(allreduce_hook))  # (torch: AttributeError)


def test_an_error_building_the_wrapper_before_its_first_collective_leaves_the_state_usable(group, monkeypatch):
    """torch's refusal of the model in DistributedDataParallel.__init__ before its broadcast, loopkit's refusal of
    buffers that differ, a process group gone since the build: nothing changed, and the state was used up (state_at_error
    None). An error after the broadcast (torch refusing SyncBatchNorm on the CPU) still uses it up."""
    dist = torch.distributed
    step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(ddp.mse)))
    batch = ddp.make_data(1)[0, 0]

    frozen = ddp.sgd_state(ddp.make_model())
    frozen.model.requires_grad_(False)
    with pytest.raises(RuntimeError, match="DistributedDataParallel is not needed when a module doesn't have any") as e:
        step(frozen, batch)
    assert loopkit.state_at_error(e.value) is frozen
    frozen.check_usable()
    with pytest.raises(RuntimeError, match="DistributedDataParallel is not needed") as e:  # run_epochs' own call
        loopkit.run_epochs(loopkit.with_ddp(loopkit.train_step(ddp.mse)), frozen, [batch], epochs=1, progress=False)
    assert loopkit.state_at_error(e.value) is frozen
    frozen.check_usable()
    assert frozen.step == 0

    from loopkit.transforms import ddp as ddp_module
    with monkeypatch.context() as patch:
        patch.setattr(ddp_module._collective, "differs_from_rank_zero", lambda *args, **kwargs: "rank 1 has 1 buffer")
        state = ddp.sgd_state(ddp.make_model())
        with pytest.raises(ValueError, match="with_ddp: the model's buffers differ between ranks") as e:
            step(state, batch)
        assert loopkit.state_at_error(e.value) is state
    state, _ = step(state, batch)  # the cause gone, it trains on
    assert state.step == 1

    state = ddp.sgd_state(ddp.make_model())
    dist.destroy_process_group()
    try:
        with pytest.raises(RuntimeError, match="with_ddp needs a torch.distributed process group") as e:
            step(state, batch)
        assert loopkit.state_at_error(e.value) is state
        state.check_usable()
    finally:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.SyncBatchNorm(2))
    used = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules") as e:
        step(used, torch.ones(4, 4))
    assert loopkit.state_at_error(e.value) is None  # (raised after the broadcast of rank 0's weights)


@pytest.mark.slow
@pytest.mark.parametrize("where, gather", [
    ("build", "the gather that checks every rank agrees with rank 0"),
    ("rebuild", "the all-gather of every rank's buffers"),
    ("run_epochs", "the gather that checks every rank agrees with rank 0"),
])
def test_a_gather_of_the_wrappers_build_failing_for_a_rank_that_left_leaves_the_state_usable(where, gather, tmp_path):
    """Two gloo processes; rank 1 leaves before its first call (``build``), at the check of the buffers of a wrapper
    built anew for a frozen layer after a step (``rebuild``), or at run_epochs' first step (``run_epochs``): rank 0's
    gather before DDP wraps the model fails, nothing of the model changed, and the state was used up
    (state_at_error None). It is the state given, as it was before the call."""
    from tests import _ddp_die_script as die_script

    codes, outputs = die_script.launch(["build", where, str(tmp_path)], timeout=5)
    assert codes == [0, 3], outputs
    record = torch.load(tmp_path / "rank0.pt")
    assert f"with_ddp: {gather}" in record["error"] and "another rank has probably died" in record["error"]
    assert record["left_is_state"], record["error"]
    assert_equal_trees(record["left"], record["before"])
