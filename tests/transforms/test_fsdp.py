"""with_fsdp: two processes on gloo over loopback, each checked against a raw PyTorch loop in one process.

Two torchrun launches (module fixture, about 18 s on two busy cores) run the scenarios of
tests/_fsdp_script.py (the second restarts from the first's checkpoints); each test then compares
what the ranks saw (parameters gathered whole) with a plain PyTorch loop here, no loopkit, over the global batches (both ranks' halves
together, the same initial weights and optimizer): mean losses of equal-size halves, so the
ranks' averaged gradient is the global batch's. Equal within ``TOL`` = 1e-6 (float32, as the
DDP tests): the ranks average two half-batch means (reduce-scatter, then a division by 2) where
the loop takes one mean over the whole batch, so the gradients differ in their last bits; the
largest difference seen after the runs' 4 to 6 updates is 6e-8 (Adam), a few ulps. Not bitwise,
for that reason. The ranks equal each other bitwise, and the crash-resumed run equals the
uninterrupted one bitwise. bfloat16 autocast is compared with the float32 loop within 5e-3 (1e-3
seen). Lightning 2.6.6's ``FSDPStrategy`` refuses the CPU ("requires a GPU accelerator"), so it
is no reference here. The bad inputs are checked in this process (a one-rank group).
"""

from __future__ import annotations

import json
import os
import re
import struct

import pytest
import torch
import torch.distributed as dist

import loopkit
from tests import _fsdp_script as fsdp
from tests._custom_optimizers import EIGHT_BATCHES, CountingSGD, GlobalCountSGD, Lookahead, fresh_state, squares
from tests._finetune import UNFREEZE_AT, UNFREEZE_EPOCHS, frozen_state
from tests.conftest import assert_equal_trees, assert_params_close, assert_ranks_identical, through_a_file

TOL = 1e-6
# resume: a second launch, after cut; stream_val, apart: launches of their own, with a short collective timeout (they
# hung, or gloo aborted)
SCENARIOS = [name for name in fsdp.SCENARIOS if not name.endswith("resume") and name not in ("stream_val", "apart")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory):
    """``ranks(name)``: the two ranks' results of a scenario (one launch for all of them); ``ranks.out``: the folder."""
    from tests._ddp_script import torchrun

    out = str(tmp_path_factory.mktemp("fsdp"))
    for scenarios in (SCENARIOS, ["resume", "bn_resume"]):  # the second: new processes, restarted from checkpoints
        done = torchrun(out, scenarios, timeout=60, script=os.path.abspath(fsdp.__file__))
        assert done.returncode == 0, done.stdout[-4000:]
    load = lambda name: [torch.load(os.path.join(out, f"{name}_rank{r}.pt")) for r in range(2)]  # noqa: E731
    load.out = out  # type: ignore[attr-defined]
    return load


# --- the raw PyTorch reference (no loopkit) ----------------------------------------------------------------


def raw_loop(kind: str, data: torch.Tensor, epochs: int, *, every: int = 1, max_norm: float | None = None,
             skip: frozenset[int] = frozenset(), calls: int | None = None):
    """A plain loop over the global batches: groups of ``every`` batches (an epoch's last group may be
    shorter: its mean is over its own batches), ``clip_grad_norm_`` before each update, batch indices in
    ``skip`` left out. Returns the model, the optimizer and each update's gradient norm."""
    model = fsdp.make_model()
    optimizer, scheduler = fsdp.make_optimizer(kind, model)
    norms = []
    batches = [i for i in range(len(data) if calls is None else calls) if i not in skip]
    for _ in range(epochs):
        for start in range(0, len(batches), every):
            group = batches[start:start + every]
            optimizer.zero_grad()
            for i in group:
                (fsdp.mse(model, fsdp.global_batch(data, i)) / len(group)).backward()
            if max_norm is not None:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return model, optimizer, norms


def _val_mse(model, val):
    with torch.no_grad():
        return sum(float(fsdp.mse(model, fsdp.global_batch(val, i))) for i in range(len(val))) / len(val)


# --- 1. the sharded runs equal the raw loop -----------------------------------------------------------------


def test_sgd_and_adam_equal_a_raw_loop_over_the_global_batches(ranks):
    sgd, adam = ranks("sgd"), ranks("adam")
    for results in (sgd, adam):
        assert_ranks_identical(results)
    model, optimizer, _ = raw_loop("sgd", fsdp.make_data(3), epochs=2)
    assert_params_close(sgd[0]["params"], model)
    assert sgd[0]["step"] == 6
    assert set(sgd[0]["sharded"]) == {"DTensor"}  # sharded, not replicated: 5 rows of the first layer as 3 and 2
    assert sgd[0]["local_shapes"][0] == (3, 3) and sgd[1]["local_shapes"][0] == (2, 3)
    model, optimizer, _ = raw_loop("adam_sched", fsdp.make_data(3), epochs=2)
    assert_params_close(adam[0]["params"], model)
    assert adam[0]["lr"] == optimizer.param_groups[0]["lr"] == 0.05 * 0.5 ** 2  # the scheduler followed the shards


def test_validation_and_evaluate_average_over_the_ranks_and_predict_runs_on_each(ranks):
    sgd = ranks("sgd")
    data, val = fsdp.make_data(3), fsdp.make_data(2, seed=99)
    for epoch in range(2):
        model, _, _ = raw_loop("sgd", data, epochs=epoch + 1)
        for r in range(2):
            assert sgd[r]["history"][epoch]["val/mse"] == pytest.approx(_val_mse(model, val), abs=1e-6)
    logged = [json.loads(line) for line in open(os.path.join(ranks.out, "logs", "default", "version_0", "metrics.jsonl"))]
    losses = [r["train/loss"] for r in logged if "train/loss" in r]
    assert len(losses) == 2 and losses == pytest.approx([h["train/loss"] for h in sgd[0]["history"]], rel=1e-6)
    assert sgd[0]["evaluate"] == sgd[1]["evaluate"]
    assert sgd[0]["evaluate"]["mse"] == pytest.approx(_val_mse(model, val), abs=1e-6)
    with torch.no_grad():  # predict: each rank's own batches through the sharded model
        for r in range(2):
            for i, out in enumerate(sgd[r]["predict"]):
                assert (out - model(val[i, r, :, :fsdp.D_IN])).abs().max() <= 1e-6


def test_reshard_after_forward_false_validates_checkpoints_and_evaluates_as_the_raw_loop(ranks):
    """(SHARD_GRAD_OP: a validation left the parameters whole and unsharded-looking; the next save hung.)"""
    sgo = ranks("shard_grad_op")
    data, val = fsdp.make_data(3), fsdp.make_data(2, seed=99)
    model, _, _ = raw_loop("sgd", data, epochs=2)
    for r in range(2):
        assert_params_close(sgo[r]["params"], model, TOL)
        assert sgo[r]["sharded"] == ["DTensor"] and sgo[r]["state_dict_types"] == ["Tensor"]
        assert sgo[r]["evaluate"]["mse"] == pytest.approx(_val_mse(model, val), abs=1e-6)
        assert [h["val/mse"] for h in sgo[r]["history"]] == [h["val/mse"] for h in ranks("sgd")[r]["history"]]
    saved = sorted(os.listdir(os.path.join(ranks.out, "sgo_ckpt")))
    assert [n.split("-", 2)[2] for n in saved if n.startswith("ckpt-")] == ["step3-epoch1-batch0", "step6-epoch2-batch0"]


def test_validation_data_of_unequal_lengths_is_refused_on_every_rank_naming_the_counts(ranks):
    uneven = ranks("uneven_val")
    for r in range(2):
        for where in ("evaluate", "predict"):
            assert f"{where}: under with_fsdp every rank must read as many batches" in uneven[r]["refused"][where]
            assert "hold [2, 1] batches" in uneven[r]["refused"][where] and "pad=True" in uneven[r]["refused"][where]
    assert uneven[0]["then"] == uneven[1]["then"]


def test_streamed_validation_data_ends_on_every_rank_with_the_shortest_shard(tmp_path):
    """Data that streams 3 batches on rank 0 and 2 on rank 1, with a ``len()`` of 3 (torch's estimate) or without
    one: ``evaluate``, ``predict`` and a fit's validations end after 2 batches on both ranks (a vote before each
    batch), rank 0's third dropped with a warning. They hung (rank 0's third forward waited in its all-gather):
    a collective timeout of 5 s makes a hang a failure in seconds. A list on rank 0 and a stream on rank 1, of 2
    batches each: every rank votes (rank 1's votes crossed rank 0's all-gathers, both waiting until the timeout)."""
    from tests._ddp_script import load, torchrun

    done = torchrun(str(tmp_path), ["stream_val"], timeout=90, script=os.path.abspath(fsdp.__file__),
                    env={"LOOPKIT_TEST_TIMEOUT": "5"})
    assert done.returncode == 0, done.stdout[-4000:]
    results = load(str(tmp_path), "stream_val")
    val = fsdp.make_data(3, seed=99)[:2]  # the batches both ranks read
    model, _, _ = raw_loop("sgd", fsdp.make_data(1), epochs=1)
    dropped = "another rank's data ended after 2 batches, this rank's has more"
    for r, result in enumerate(results):
        for kind in ("sized", "unsized"):
            assert result[f"evaluate_{kind}"]["mse"] == pytest.approx(_val_mse(model, val), abs=1e-6)
            assert len(result[f"predict_{kind}"]) == 2
            with torch.no_grad():
                for i, out in enumerate(result[f"predict_{kind}"]):
                    assert (out - model(val[i, r, :, :fsdp.D_IN])).abs().max() <= 1e-6
            for where in ("evaluate", "predict"):
                warned = [w for w in result[f"{where}_{kind}_warnings"] if dropped in w]
                assert len(warned) == (1 - r), (r, kind, where, result[f"{where}_{kind}_warnings"])
                assert all(w.startswith(f"{where}: ") and "with_fsdp" in w for w in warned)
        # a list on rank 0 and a stream on rank 1, 2 batches each: rank 0 votes too (the collectives crossed)
        assert result["evaluate_mixed"]["mse"] == pytest.approx(_val_mse(model, val), abs=1e-6)
        assert len(result["predict_mixed"]) == 2 and not result["evaluate_mixed_warnings"]
        assert result["fit"][0]["val/mse"] == pytest.approx(_val_mse(model, val), abs=1e-6)
        warned = [w for w in result["fit_warnings"] if dropped in w]  # (the sanity check reads 2 batches: no warning)
        assert len(warned) == 1 - r and all(w.startswith("run_epochs' validation: ") for w in warned)
    assert results[0]["evaluate_sized"] == results[1]["evaluate_sized"] and results[0]["then"] == results[1]["then"]


def test_a_fit_validating_on_uneven_data_is_refused_at_its_start_before_any_update(ranks):
    """Validation data of 3 batches on rank 0 and 2 on rank 1, and of 1 and none (an empty shard, which with_ddp
    takes): the fit refuses it on every rank before the first update, naming the set, the counts and
    limit_val_batches= (it trained a whole epoch, then its validation refused, naming evaluate and limit=); the
    state given is untouched, and the same fit with limit_val_batches the fewest equals the raw loop. Data a factory
    makes is refused by its validation, naming run_epochs and limit_val_batches=; a stream whose len() says 3 and 2
    (an estimate) is read while both ranks have a batch (it was refused, the lengths taken as counts)."""
    results = ranks("uneven_val_fit")
    data, val = fsdp.make_data(3), fsdp.make_data(3, seed=99)
    model, _, _ = raw_loop("sgd", data, epochs=1)
    untouched = dict(fsdp.make_model().named_parameters())
    for r, result in enumerate(results):
        for case, counts in (("uneven", (3, 2)), ("empty", (1, 0))):
            refused = result[f"{case}_refused"]
            assert refused.startswith("RuntimeError: run_epochs: "), refused
            assert (f"""rank 1 has {{'val batches': {{"val's data": {counts[1]}}}}}, """
                    f"""rank 0 has {{'val batches': {{"val's data": {counts[0]}}}}}""") in refused
            assert "under with_fsdp" in refused and "pad=True" in refused and "limit_val_batches=" in refused
            (step, params), error = result[f"{case}_before"]
            assert error is None and step == 0
            assert all(torch.equal(params[n], p) for n, p in untouched.items())
            assert result[f"{case}_retry_error"] is None
            assert_params_close(result[f"{case}_params"], model, TOL)
        assert result["uneven_history"][0]["val/mse"] == pytest.approx(_val_mse(model, val[:2]), abs=1e-6)
        assert "val/mse" not in result["empty_history"][0]  # (limit_val_batches=0: no validation)
        refused = result["factory_refused"]
        assert refused.startswith("ValueError: run_epochs' validation: under with_fsdp every rank must read as many")
        assert "hold [3, 2] batches" in refused and "pass limit_val_batches= no larger" in refused
        assert result["stream_error"] is None
        assert result["stream_history"][0]["val/mse"] == pytest.approx(_val_mse(model, val[:2]), abs=1e-6)
        dropped = [w for w in result["stream_warnings"] if "another rank's data ended after 2 batches" in w]
        assert len(dropped) == 1 - r
    assert_ranks_identical([{"params": result["uneven_params"]} for result in results])


def test_grad_accum_with_a_partial_group_flushed_at_each_epoch_end(ranks):
    accum, outer = ranks("accum"), ranks("accum_outer")
    assert_ranks_identical(accum)
    assert_ranks_identical(outer)
    model, _, _ = raw_loop("adam_sched", fsdp.make_data(5), epochs=2, every=2)  # groups of 2, 2, 1 each epoch
    assert_params_close(accum[0]["params"], model)
    assert accum[0]["step"] == 6
    model, _, _ = raw_loop("adam", fsdp.make_data(3), epochs=1, every=2)  # 2, then 1 flushed by hand
    assert_params_close(outer[0]["params"], model)
    assert outer[0]["step"] == 2
    assert outer[0]["unreduced_after_first"] and outer[1]["unreduced_after_first"]  # no reduce-scatter mid-group


def test_grad_clip_and_grad_norm_take_the_global_norm_over_every_shard(ranks):
    clip = ranks("clip")
    assert_ranks_identical(clip)
    model, _, norms = raw_loop("adam", fsdp.make_data(4), epochs=1, max_norm=0.05)
    assert min(norms) > 0.05  # every update was clipped
    assert_params_close(clip[0]["params"], model)
    for r in range(2):
        assert clip[r]["grad_norms"] == pytest.approx(norms, rel=1e-5)
        assert clip[r]["norm_totals"] == pytest.approx(norms, rel=1e-5)  # with_grad_norm: over every shard too
        assert clip[r]["hook_norms"] == pytest.approx(norms, rel=1e-5)  # with_grad_hook's metric: gathered
        assert clip[r]["plain_metrics"]
    model = fsdp.make_model()
    fsdp.mse(model, fsdp.global_batch(fsdp.make_data(4), 0)).backward()
    first = {f"grad_2.0_norm/{n}": float(p.grad.norm()) for n, p in model.named_parameters()}
    assert clip[0]["first_norms"] == pytest.approx(first, rel=1e-5)


def test_nan_guard_skips_on_every_rank_when_one_rank_sees_nan(ranks):
    nan = ranks("nan")
    assert_ranks_identical(nan)
    assert nan[0]["skipped"] == nan[1]["skipped"] == [0.0, 1.0, 0.0, 0.0]
    assert nan[0]["step"] == nan[1]["step"] == 3
    model, _, _ = raw_loop("sgd", fsdp.make_data(4), epochs=1, skip=frozenset({1}))
    assert_params_close(nan[0]["params"], model)


def test_a_raising_guards_refusal_leaves_the_state_whole_on_every_rank(ranks):
    """A NaN batch on rank 1, refused by every rank outside an accumulation group: state_at_error is the state at
    that batch on both (it was used up: None), and the fit resumed from it, the batch mended, is the fit that never
    saw it, bitwise."""
    results = ranks("nan_raise")
    model, _, _ = raw_loop("sgd", fsdp.make_data(4), epochs=1)
    for r in results:
        assert r["left_at"] == (2, 2)
        for name, value in r["clean"].items():
            assert torch.equal(r["resumed"][name], value), name
        assert_params_close(r["resumed"], model)
    assert_ranks_identical([{"params": r["resumed"]} for r in results])


def test_unequal_batch_counts_are_refused_on_every_rank_naming_with_fsdp(ranks):
    for result in ranks("uneven"):
        assert "epoch 0 has another number of batches on each rank, and with_fsdp needs one step per batch on every " \
               "rank" in result["error"] and "DDP" not in result["error"], result["error"]


def test_bfloat16_autocast_trains_close_to_float32(ranks):
    bf16 = ranks("bf16")
    assert_ranks_identical(bf16)
    model, _, _ = raw_loop("sgd", fsdp.make_data(4), epochs=1)
    assert_params_close(bf16[0]["params"], model, tol=5e-3)  # bfloat16 matmuls: 8 bits of mantissa


def test_buffers_are_rank_zeros_before_each_group_as_under_ddp(ranks):
    """BatchNorm's running statistics: every rank's forward that starts a group starts from rank 0's buffers (the
    ranks' data differ, so without the broadcast rank 1's drift away), and each rank ends with what with_ddp (its
    broadcast_buffers=True) leaves on it; validation reads rank 0's, as DDP's: its means equal DDP's (each rank's
    own were read, where with_ddp reads rank 0's, as Lightning's validation through the DDP wrapper)."""
    bn, ddp, off = ranks("bn"), ranks("bn_ddp"), ranks("bn_nobroadcast")
    assert_ranks_identical(bn)
    assert len(bn[0]["seen"]) == 8
    for call in range(0, 8, 2):  # the first call of each group of 2
        for a, b in zip(bn[0]["seen"][call], bn[1]["seen"][call]):
            assert torch.equal(a, b), f"call {call}: the ranks' buffers differ before the forward"
    assert not torch.equal(bn[0]["seen"][1][0], bn[1]["seen"][1][0])  # mid-group: each rank's own update
    for r in range(2):
        assert_params_close(bn[r]["params"], _as_model(ddp[r]["params"]))
        for name, b in ddp[r]["buffers"].items():
            assert (bn[r]["buffers"][name].double() - b.double()).abs().max() <= TOL, (r, name)
        for mine, theirs in zip(bn[r]["history"], ddp[r]["history"]):
            assert mine["val/mse"] == pytest.approx(theirs["val/mse"], abs=TOL)
    assert not torch.equal(bn[0]["buffers"]["1.running_mean"], bn[1]["buffers"]["1.running_mean"])  # (after a forward)
    # broadcast_buffers=False: each rank's own, from the second call on
    assert torch.equal(off[0]["seen"][0][0], off[1]["seen"][0][0])  # (rank 0's when the model was sharded)
    assert not torch.equal(off[0]["seen"][1][0], off[1]["seen"][1][0])


def test_without_broadcast_buffers_each_rank_validates_with_its_own_buffers(ranks):
    """with_fsdp(broadcast_buffers=False): ``with step.validating(state): evaluate(...)`` leaves each rank's own
    running statistics in place (no broadcast), and each rank's evaluation equals its own model (the gathered
    parameters, its buffers) evaluated in one process, by hand."""
    off = ranks("bn_nobroadcast")
    assert not torch.equal(off[0]["own"]["1.running_mean"], off[1]["own"]["1.running_mean"])  # (the test can tell)
    for rank, r in enumerate(off):
        for name, b in r["own"].items():
            assert torch.equal(r["inside_buffers"][name], b), (rank, name)
        model = fsdp.make_bn_model()
        model.load_state_dict({**r["params"], **r["own"]})
        model.eval()
        with torch.no_grad():
            expected = float(fsdp.mse(model, fsdp.make_bn_data(1, seed=7)[0, rank]))
        assert r["inside"]["mse"] == pytest.approx(expected, abs=TOL)


def test_crash_resume_of_a_batchnorm_model_equals_the_uninterrupted_run_bitwise(ranks):
    """Cut after update 3 (mid-epoch 1), resumed in new processes: parameters, each rank's buffers and the
    resumed epoch's validation means equal the uninterrupted run's, bit for bit."""
    resumed, uninterrupted, cut = ranks("bn_resume"), ranks("bn"), ranks("bn_cut")
    assert cut[0]["step"] == 3 and resumed[0]["step"] == uninterrupted[0]["step"] == 4
    for r in range(2):
        for name, p in uninterrupted[r]["params"].items():
            assert torch.equal(resumed[r]["params"][name], p), name
        for name, b in uninterrupted[r]["buffers"].items():
            assert torch.equal(resumed[r]["buffers"][name], b), (r, name)
        assert [h["epoch"] for h in resumed[r]["history"]] == [1]
        assert resumed[r]["history"][0] == uninterrupted[r]["history"][1]
        assert cut[r]["history"][0] == uninterrupted[r]["history"][0]


def test_a_layer_unfrozen_mid_fit_trains_on_every_rank_as_a_raw_loop_and_resumes_across_the_unfreeze(ranks):
    """docs/from_lightning.md's BackboneFinetuning recipe (``requires_grad_(True)`` and ``add_param_group`` at epoch
    1's start): the added group holds the sharded parameters, the ranks agree, the run equals a raw loop that unfreezes
    likewise, and runs stopped before and after the unfreeze then resumed equal the uninterrupted one bitwise."""
    results = ranks("unfreeze")
    assert_ranks_identical(results)
    model = fsdp.make_model()
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    data = fsdp.make_data(2)
    for epoch in range(UNFREEZE_EPOCHS):
        if epoch == UNFREEZE_AT:
            model[0].requires_grad_(True)
            optimizer.add_param_group({"params": list(model[0].parameters()), "lr": 0.05})
        for i in range(len(data)):
            optimizer.zero_grad()
            fsdp.mse(model, fsdp.global_batch(data, i)).backward()
            optimizer.step()
    assert not torch.equal(model[0].weight, fsdp.make_model()[0].weight)  # (the layer trained)
    assert_params_close(results[0]["params"], model)
    for result in results:
        assert result["holds_shards"] and result["groups"] == 2 and result["step"] == 6
        for cut, params in result["resumed"].items():
            for name, p in result["params"].items():
                assert torch.equal(params[name], p), (cut, name)


def test_flags_or_optimizers_apart_are_refused_on_every_rank_before_anything_changed_then_mended_train_as_a_raw_loop(
        tmp_path):
    """The ranks' requires_grad apart at the first call (before: gloo aborted rank 1 at the first backward), their
    optimizers apart (an lr, a class, a group without a parameter; before: each rank updated its own shard with its
    own, a mixed model, unwarned), and a group added mid-fit with another lr and flag on rank 1: each is refused on
    every rank, naming what differs and the ranks, the state left as it was (unsharded at a first call); mended,
    the fits equal raw loops over the global batches. A launch of its own, with a short collective timeout."""
    from tests._ddp_script import load, torchrun

    done = torchrun(str(tmp_path), ["apart"], timeout=90, script=os.path.abspath(fsdp.__file__),
                    env={"LOOPKIT_TEST_TIMEOUT": "5"})
    assert done.returncode == 0, done.stdout[-4000:]
    results = load(str(tmp_path), "apart")
    refused = (r"^with_fsdp: requires_grad or the optimizer differs between the ranks \(.*change requires_grad and "
               r"the optimizer alike on every rank\): rank 1 has ")

    def group(index: int, **settings):  # a param group's settings in the error, as a pattern
        return "'optimizer param group %d': \\{%s, " % (index, ", ".join(f"'{k}': {re.escape(repr(v))}"
                                                                      for k, v in settings.items()))

    for result in results:
        assert re.search(refused + re.escape("{'0.weight': False}, rank 0 has {'0.weight': True}") + "$", result["flags"])
        assert re.search(refused + "{" + group(0, params=4, lr=0.0) + ".*}}, rank 0 has {" + group(0, params=4, lr=0.1),
                         result["lr"])
        assert re.search(refused + re.escape("{'optimizer class': 'torch.optim.adam.Adam', ") + ".*rank 0 has "
                         + re.escape("{'optimizer class': 'torch.optim.sgd.SGD', "), result["class"])
        assert re.search(refused + "{" + group(0, params=3) + ".*}}, rank 0 has {" + group(0, params=4), result["group"])
        assert re.search(refused + "{'0.bias': False, " + group(1, params=2, lr=0.01) + ".*}}, rank 0 has {'0.bias': "
                         "True, " + group(1, params=2, lr=0.05), result["added"])
        assert "(the state changed)" not in "".join(result[k] for k in ("flags", "lr", "class", "group", "added"))
    assert_ranks_identical(results)
    data = fsdp.make_data(fsdp.APART_CALLS)
    model, _, _ = raw_loop("sgd", data, epochs=1)  # the first state, its flags and lr mended after the refusals
    assert_params_close(results[0]["params"], model, TOL)
    model = fsdp.make_model()  # the group added mid-fit, mended
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    for i in range(fsdp.APART_CALLS):
        if i == 1:
            model[0].requires_grad_(True)
            optimizer.add_param_group({"params": list(model[0].parameters()), "lr": 0.05})
        optimizer.zero_grad()
        fsdp.mse(model, fsdp.global_batch(data, i)).backward()
        optimizer.step()
    assert not torch.equal(model[0].weight, fsdp.make_model()[0].weight)  # (the added group trained)
    assert_params_close(results[0]["added_params"], model, TOL)


def _as_model(params):
    """``params`` (name -> tensor) as an object with ``named_parameters``, for :func:`_assert_close`."""
    return type("Params", (), {"named_parameters": lambda self: params.items()})()


# --- 3. full checkpoints: crash-resume, a plain template, state_dict, export_weights ---------------------------


def test_crash_resume_equals_the_uninterrupted_run_bitwise(ranks):
    resumed, uninterrupted, cut = ranks("resume"), ranks("accum"), ranks("cut")
    assert cut[0]["step"] == 4
    assert resumed[0]["start"] == resumed[1]["start"] == (4, 1, 2)
    for r in range(2):
        for name, p in uninterrupted[r]["params"].items():
            assert torch.equal(resumed[r]["params"][name], p), name


def test_the_checkpoints_restore_into_a_plain_one_process_template(ranks):
    resumed, cut = ranks("resume"), ranks("cut")
    directory = os.path.join(ranks.out, "ckpt")
    at_cut = next(c for c in loopkit.checkpoint.list_checkpoints(directory) if c.step == 4)
    for path, expected in ((at_cut.path, cut[0]["params"]), (directory, resumed[0]["params"])):
        template = fsdp.make_state("adam_sched")
        state = loopkit.restore(template, path)
        assert type(state.model[0].weight) is torch.nn.Parameter  # a plain model, whole weights
        for name, p in state.model.named_parameters():
            assert torch.equal(p.detach(), expected[name]), name
        assert state.optimizer.state[state.model[0].weight]["exp_avg"].shape == (5, 3)  # the full moments


def test_state_dict_and_export_weights_are_full(ranks):
    sgd = ranks("sgd")
    for r in range(2):
        sd = sgd[r]["state_dict"]
        assert list(sd["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        for name, p in sgd[r]["params"].items():
            assert torch.equal(sd["model"][name], p), name
        buffers = [entry["momentum_buffer"] for entry in sd["optimizer"]["state"].values()]
        assert [tuple(b.shape) for b in buffers] == [(5, 3), (5,), (2, 5), (2,)]
    _, optimizer, _ = raw_loop("sgd", fsdp.make_data(3), epochs=2)
    for mine, theirs in zip(buffers, (optimizer.state[p]["momentum_buffer"] for p in optimizer.param_groups[0]["params"])):
        assert (mine - theirs).abs().max() <= TOL
    raw = open(os.path.join(ranks.out, "sgd.safetensors"), "rb").read()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    for name, p in sgd[0]["params"].items():
        begin, end = header[name]["data_offsets"]
        saved = torch.frombuffer(bytearray(raw[8 + size + begin:8 + size + end]), dtype=torch.float32)
        assert torch.equal(saved.reshape(header[name]["shape"]), p), name
    assert sgd[0]["exported"] and sgd[1]["exported"]


def test_saves_gather_into_rank_zeros_cpu_memory_alone(ranks):
    """Rank 1 takes part in every gather of the checkpoints and the export (a collective) but drops each whole
    tensor at once: it never holds two, nor one after the saves (it used to hold the whole state dict until the
    save had passed it by). The checkpoints are one process's: they restore into a plain template bitwise."""
    results = ranks("gather_to_rank_zero")
    assert_ranks_identical(results)
    one, zero = results[1], results[0]
    assert one["gathers"] == zero["gathers"] > 0
    assert set(one["alive_at_gather"]) == {0} and one["alive_after"] == 0
    assert max(zero["alive_at_gather"]) > 0  # (rank 0 keeps each until the checkpoint is written: the watch sees it)
    directory = os.path.join(ranks.out, "gather_ckpt")
    assert [c.step for c in loopkit.checkpoint.list_checkpoints(directory)] == [1, 2]
    state = loopkit.restore(fsdp.make_state("adam"), directory)
    assert type(state.model[0].weight) is torch.nn.Parameter
    for name, p in state.model.named_parameters():
        assert torch.equal(p.detach(), zero["params"][name]), name


def test_grad_norm_and_grad_clip_take_one_all_reduce_a_norm(ranks):
    """with_grad_norm used to make one all-reduce a parameter (4 here) and with_grad_clip two for an inf norm;
    now one a norm (two with max_value and max_norm: the norm is taken again after the value clipping, as torch
    does). The values are those of the gathered gradients, by torch's formulas on whole tensors."""
    results = ranks("norm_collectives")
    for r in range(2):
        seen = results[r]
        for name, p in (("norm_2", 2.0), ("norm_inf", float("inf")), ("norm_3", 3.0)):
            case = seen[name]
            assert case["collectives"] == 1, (name, case["collectives"])
            prefix = f"grad_{p}_norm"
            expected = {f"{prefix}/{n}": g.norm(p) for n, g in case["before"].items()}
            expected[f"{prefix}_total"] = torch.stack(list(expected.values())).norm(p)
            assert set(case["metrics"]) == set(expected)
            for key, value in expected.items():
                kind, dtype, got = case["metrics"][key]
                assert kind == "Tensor" and dtype == torch.float32
                assert got == pytest.approx(float(value), rel=1e-6), (name, key)
        for name, p, max_value in (("clip_2", 2.0, None), ("clip_inf", float("inf"), None), ("clip_1", 1.0, None),
                                   ("clip_both", 2.0, 0.02)):
            case = seen[name]
            assert case["collectives"] == (2 if max_value else 1), (name, case["collectives"])
            grads = {n: g.clone() for n, g in case["before"].items()}
            params = []
            for n, g in grads.items():
                params.append(torch.nn.Parameter(torch.zeros_like(g)))
                params[-1].grad = g
            norm = torch.nn.utils.get_total_norm(list(grads.values()), p)
            if max_value is not None:
                torch.nn.utils.clip_grad_value_(params, max_value)
            torch.nn.utils.clip_grad_norm_(params, 0.05, p)
            kind, _, got = case["metrics"]["grad_norm"]
            assert kind == "Tensor" and got == pytest.approx(float(norm), rel=1e-6), name
            assert float(norm) > 0.05
            for (n, g), q in zip(grads.items(), params):
                assert (case["after"][n] - q.grad).abs().max() <= 1e-7, (name, n)


# --- 4. bad input, in this process --------------------------------------------------------------------------


@pytest.fixture
def one_rank():
    """A one-rank gloo group in this process (in memory), destroyed after the test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():  # (a test may destroy it)
            dist.destroy_process_group()


def _step():
    return loopkit.train_step(fsdp.mse)


def test_without_a_process_group_the_error_says_how_to_start():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"torchrun --nproc-per-node 2 .*loopkit\.distributed\.init\(\)"):
        loopkit.with_fsdp(_step())


def test_a_step_that_is_not_donated_is_refused(one_rank):
    state = fsdp.make_state("sgd")
    with pytest.raises(TypeError, match=r"with_fsdp: the step must be donated: call loopkit\.donate"):
        loopkit.with_fsdp(_step())(state, fsdp.make_data(1)[0, 0])
    assert type(state.model[0].weight) is torch.nn.Parameter  # refused before anything was sharded


@pytest.mark.parametrize("build, message", [
    (lambda s: loopkit.with_ema(loopkit.with_fsdp(s), decay=0.9), "with_ema cannot wrap with_fsdp: the averages"),
    (lambda s: loopkit.with_fsdp(loopkit.with_ema(s, decay=0.9)), "with_fsdp cannot wrap with_ema: the averages"),
    (lambda s: loopkit.with_swa(loopkit.with_fsdp(s), 0.01, swa_epoch_start=1), "with_swa cannot wrap with_fsdp"),
    (lambda s: loopkit.with_fsdp(loopkit.with_swa(s, 0.01, swa_epoch_start=1)), "with_fsdp cannot wrap with_swa"),
    (lambda s: loopkit.with_pruning(loopkit.with_fsdp(s), 0.5, [1]), "with_pruning cannot wrap with_fsdp"),
    (lambda s: loopkit.with_fsdp(loopkit.with_pruning(s, 0.5, [1])), "with_fsdp cannot wrap with_pruning"),
    (lambda s: loopkit.with_qat(loopkit.with_fsdp(s)), "with_qat cannot wrap with_fsdp"),
    (lambda s: loopkit.with_fsdp(loopkit.with_qat(s)), "with_fsdp cannot wrap with_qat"),
    (lambda s: loopkit.with_compile(loopkit.with_fsdp(s)), "with_compile cannot wrap with_fsdp"),
    (lambda s: loopkit.with_fsdp(loopkit.with_compile(s)), "with_fsdp cannot wrap with_compile"),
    (lambda s: loopkit.with_ddp(loopkit.with_fsdp(s)), "with_ddp cannot wrap with_fsdp: both make the step data-parallel"),
    (lambda s: loopkit.with_fsdp(loopkit.with_ddp(s)), "with_fsdp cannot wrap with_ddp: both make the step data-parallel"),
    (lambda s: loopkit.with_fsdp(loopkit.with_fsdp(s)), "with_fsdp cannot wrap with_fsdp: the model is sharded once"),
    (lambda s: loopkit.with_amp(loopkit.with_fsdp(s), dtype=torch.float16), "with_amp.float16. cannot wrap with_fsdp: float16"),
    (lambda s: loopkit.with_fsdp(loopkit.with_amp(s, dtype=torch.float16)), "with_fsdp cannot wrap float16 with_amp"),
    (lambda s: loopkit.with_fsdp(s, offload_policy=object()), "with_fsdp: offload_policy=: CPU offload"),
    (lambda s: loopkit.with_fsdp(s, shard=torch.nn.Linear), "with_fsdp: shard must be a collection of module classes"),
    (lambda s: loopkit.with_fsdp(s, shard=[len]), "with_fsdp: shard must hold torch.nn.Module subclasses"),
    (lambda s: loopkit.with_fsdp(s, broadcast_buffers=1), "with_fsdp: broadcast_buffers must be True or False"),
])
def test_refused_pairs_and_options_name_both(one_rank, build, message):
    with pytest.raises(TypeError, match=message):
        build(_step())


@pytest.mark.parametrize("options, message", [
    ({"reshard_after_foward": True}, r"^with_fsdp: reshard_after_foward= is not an option of with_fsdp nor of "
                                     r"fully_shard; did you mean reshard_after_forward=\?$"),
    ({"shard_placement": None}, r"^with_fsdp: shard_placement= is not .*; did you mean shard_placement_fn=\?$"),
    ({"mp_policy": "bf16"}, r"^with_fsdp: mp_policy must be a torch\.distributed\.fsdp\.MixedPrecisionPolicy .*'bf16'$"),
    ({"mesh": "cpu"}, r"^with_fsdp: mesh must be a torch\.distributed\.device_mesh\.DeviceMesh or None, got 'cpu'$"),
    ({"shard_placement_fn": 0}, r"^with_fsdp: shard_placement_fn must be callable"),
])
def test_options_fully_shard_refuses_at_the_first_call_are_refused_at_build(options, message):
    """They were accepted: the first call, after rank 0's weights were broadcast (and some submodules sharded),
    raised fully_shard's own error (an unexpected keyword; 'str' object has no attribute 'param_dtype'), the
    donated state used up. Checked before the process group is looked for: in one process too."""
    assert not dist.is_initialized()
    with pytest.raises(TypeError, match=message):
        loopkit.with_fsdp(_step(), **options)


def test_options_fully_shard_takes_are_accepted(one_rank):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    step = loopkit.with_fsdp(_step(), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16), mesh=None,
                             shard_placement_fn=None, reshard_after_forward=False)
    assert step.sync.options["mp_policy"].param_dtype is torch.bfloat16 and step.sync.options["mesh"] is None


def test_loading_into_a_sharded_state_is_refused_and_the_optimizer_follows_the_shards(one_rank):
    state = fsdp.make_state("adam_sched")
    plain = state.state_dict()
    step = loopkit.donate(loopkit.with_fsdp(_step(), shard=fsdp.SHARD))
    state, _ = step(state, fsdp.make_data(1)[0, 0])
    params = list(state.model.parameters())
    assert state.optimizer.param_groups[0]["params"] == params and all(p in state.optimizer.state for p in params)
    with pytest.raises(TypeError, match=r"load_state_dict: this state's model is sharded \(with_fsdp\); load into an unsharded"):
        state.load_state_dict(plain)


def test_a_group_added_with_parameters_taken_before_the_sharding_is_refused(one_rank):
    """fully_shard replaces the model's parameters at the first call: a group added later with the ones taken before
    (which would never train) is refused at the next call, naming the group (the recipe's group, taken from the model
    when it is added, trains: test_a_layer_unfrozen_mid_fit_...)."""
    state = frozen_state(fsdp.make_model())
    kept = list(state.model[0].parameters())
    step = loopkit.donate(loopkit.with_fsdp(_step(), shard=fsdp.SHARD))
    batch = fsdp.make_data(1)[0, 0]
    state, _ = step(state, batch)
    state.model[0].requires_grad_(True)
    state.optimizer.add_param_group({"params": kept, "lr": 0.05})
    with pytest.raises(ValueError, match=r"with_fsdp: the optimizer's param group 1 trains a parameter of shape \(5, 3\) "
                                         r"that is not one of the model's; a parameter taken before the step's first "
                                         r"call, which fully_shard replaced") as refused:
        step(state, batch)
    assert loopkit.state_at_error(refused.value) is state  # refused before anything ran: the state is usable
    state.check_usable()
    state.optimizer.param_groups[1]["params"] = list(state.model[0].parameters())  # the group as the recipe adds it
    before = {n: p.full_tensor().clone() for n, p in state.model[0].named_parameters()}
    state, _ = step(state, batch)
    assert all(not torch.equal(p.full_tensor(), before[n]) for n, p in state.model[0].named_parameters())


def test_one_rank_equals_the_plain_step_and_carries_the_optimizer_state_over(one_rank):
    """Sharded after two plain updates (Adam's moments in the optimizer): the moments are carried over, so
    the sharded run of one rank equals the plain one bitwise."""
    data = fsdp.make_data(4)
    batches = [fsdp.global_batch(data, i) for i in range(4)]
    plain, sharded = loopkit.donate(_step()), loopkit.donate(loopkit.with_fsdp(_step(), shard=fsdp.SHARD))
    a = b = None
    for which in ("plain", "sharded"):
        state = fsdp.make_state("adam_sched")
        for i, batch in enumerate(batches):
            state, _ = (plain if which == "plain" or i < 2 else sharded)(state, batch)
        if which == "plain":
            a = state
        else:
            b = state
    assert type(b.model[0].weight).__name__ == "DTensor"
    full = b.state_dict()
    for name, p in a.model.named_parameters():
        assert torch.equal(full["model"][name], p.detach()), name


@pytest.mark.parametrize("optimizer_class", [CountingSGD, GlobalCountSGD, Lookahead])
def test_an_optimizers_own_state_dict_entries_and_layout_are_gathered_whole(one_rank, optimizer_class):
    """An optimizer's own entries beside torch's (a counter, ``state["global"]``) and a wrapper's own layout (a
    Lookahead's ``{"fast", "slow"}``, whose moments are DTensors here): the state dict of the sharded state is the
    unsharded run's, every tensor whole (through ``torch.load(weights_only=True)``)."""
    results = []
    for step in (loopkit.train_step(squares), loopkit.donate(loopkit.with_fsdp(loopkit.train_step(squares)))):
        state = fresh_state(optimizer_class)
        for batch in EIGHT_BATCHES[:3]:
            state, _ = step(state, batch)
        results.append(through_a_file(state.state_dict()))
    assert_equal_trees(results[1], results[0])


def test_a_save_that_writes_nothing_gathers_nothing(one_rank, tmp_path, monkeypatch):
    """with_checkpointing decides before it gathers: a monitored validation whose score does not rank, and a save
    at a position already saved, gather nothing (they used to gather the whole state on every rank); a save
    that writes gathers, into CPU memory, and its checkpoint is the plain state's."""
    from torch.distributed.tensor import DTensor

    gathers = []
    original = DTensor.full_tensor
    monkeypatch.setattr(DTensor, "full_tensor", lambda self, *a, **k: gathers.append(1) or original(self, *a, **k))
    sharded = loopkit.with_fsdp(_step(), shard=fsdp.SHARD)
    inner, ckpt = loopkit.donate(sharded), loopkit.with_checkpointing(sharded, tmp_path, monitor="val/score", keep_last=None)
    data = fsdp.make_data(3)
    state, _ = inner(fsdp.make_state("adam"), fsdp.global_batch(data, 0))
    ckpt.on_event("validation_end", state, {"val/score": 1.0})  # the first score ranks: a checkpoint
    assert len(gathers) > 0 and len(loopkit.checkpoint.list_checkpoints(tmp_path)) == 1
    state, _ = inner(state, fsdp.global_batch(data, 1))
    del gathers[:]
    ckpt.on_event("validation_end", state, {"val/score": 2.0})  # worse (keep_best=1): no checkpoint, no gather
    assert gathers == [] and len(loopkit.checkpoint.list_checkpoints(tmp_path)) == 1
    ckpt.save(state)
    assert len(gathers) > 0 and len(loopkit.checkpoint.list_checkpoints(tmp_path)) == 2
    del gathers[:]
    ckpt.save(state)  # this position is saved already
    assert gathers == [] and len(loopkit.checkpoint.list_checkpoints(tmp_path)) == 2
    monkeypatch.undo()
    restored = loopkit.restore(fsdp.make_state("adam"), tmp_path)
    whole = fsdp.full_params(state.model)
    for name, p in restored.model.named_parameters():
        assert torch.equal(p.detach(), whole[name]), name
    assert restored.optimizer.state[restored.model[0].weight]["exp_avg"].shape == (5, 3)


# --- 5. what a sharded state cannot do: a copy, a state dict mid-group, tied weights split by shard= ----------


def _sharded_state(every: int = 1):
    """A one-rank state sharded by one call of a donated with_fsdp step (in groups of ``every``), and the step."""
    inner = loopkit.with_fsdp(_step(), shard=fsdp.SHARD)
    step = loopkit.donate(inner if every == 1 else loopkit.with_grad_accum(inner, every=every))
    state, _ = step(fsdp.make_state("adam"), fsdp.global_batch(fsdp.make_data(1), 0))
    return state, step


def test_what_copies_a_sharded_state_refuses_it_naming_itself_and_what_to_do(one_rank):
    """lr_find and scale_batch_size work on the unsharded state (they shard copies of it); on a sharded one each
    caller of a copy refuses, naming itself, with_fsdp and what to do, and leaves the state as it was."""
    from loopkit.debug import check_purity
    from loopkit.state import fork

    data = [fsdp.global_batch(fsdp.make_data(4), i) for i in range(4)]
    fsdp_step = loopkit.with_fsdp(_step(), shard=fsdp.SHARD)
    unsharded = fsdp.make_state("sgd")
    found = loopkit.lr_find(fsdp_step, unsharded, data, num_training=3)  # works: the search shards its copies
    assert type(unsharded.model[0].weight) is torch.nn.Parameter
    state, _ = _sharded_state()
    before = fsdp.full_params(state.model)
    calls = {
        "lr_find": (lambda: loopkit.lr_find(fsdp_step, state, data, num_training=3),
                    r"Run lr_find on the unsharded state, before training under with_fsdp"),
        "scale_batch_size": (lambda: loopkit.scale_batch_size(fsdp_step, state, lambda n: data[:2], max_trials=2),
                             r"Run scale_batch_size on the unsharded state"),
        r"run_epochs\(\.\.\., donate=False\)": (
            lambda: loopkit.run_epochs(fsdp_step, state, data, epochs=2, progress=False, donate=False),
            r"leave donate=True"),
        r"LRFinderResult\.apply": (lambda: found.apply(state), r"group\['lr'\] = result\.suggestion\(\)"),
        r"a step that is not donated \(train_step\)": (lambda: _step()(state, data[0]), r"loopkit\.donate\(step\)"),
        "check_purity": (lambda: check_purity(_step(), state, data[0]), r"without with_fsdp"),
        r"loopkit\.state\.fork": (lambda: fork(state), r"load_state_dict\(state\.state_dict\(\)\)"),
    }
    for where, (call, advice) in calls.items():
        with pytest.raises(TypeError, match=rf"^{where}: the state's model is sharded \(with_fsdp\).*{advice}"):
            call()
        assert not state._consumed
        after = fsdp.full_params(state.model)
        assert all(torch.equal(after[n], p) for n, p in before.items()), where


def test_a_state_dict_mid_group_is_refused_and_a_graceful_stop_waits_for_the_group_end(one_rank, tmp_path):
    """Inside a with_grad_accum group fully_shard holds the partial gradients unsharded (no p.grad): state_dict,
    checkpoint.save and with_checkpointing(...).save() refuse, naming the flush; after the flush they work, and
    the flushed update equals the plain one-process step's. A SIGTERM in a group's first call (one rank) stops
    after the group's end: its checkpoint resumes to the uninterrupted run, bitwise."""
    import signal

    state, step = _sharded_state(every=2)
    message = r"state_dict: this state's model is sharded \(with_fsdp\) and inside a with_grad_accum group.*step\.flush"
    with pytest.raises(RuntimeError, match=message):
        state.state_dict()
    with pytest.raises(RuntimeError, match=message):
        loopkit.checkpoint.save(state, tmp_path / "direct")
    with pytest.raises(RuntimeError, match=message):
        loopkit.with_checkpointing(_step(), tmp_path / "ckpt").save(state)
    state, _ = step.flush(state)
    plain = loopkit.donate(loopkit.with_grad_accum(_step(), every=2))
    reference, _ = plain(fsdp.make_state("adam"), fsdp.global_batch(fsdp.make_data(1), 0))
    reference, _ = plain.flush(reference)
    full = state.state_dict()
    for name, p in reference.model.named_parameters():
        assert torch.equal(full["model"][name], p.detach()), name

    calls = [0]

    def loss(model, batch):
        calls[0] += 1
        if calls[0] == 3:  # the first micro-batch of the second group
            os.kill(os.getpid(), signal.SIGTERM)
        return fsdp.mse(model, batch)

    def fit(state, directory=None, loss_fn=fsdp.mse):
        inner = loopkit.with_grad_accum(loopkit.with_fsdp(loopkit.train_step(loss_fn), shard=fsdp.SHARD), every=2)
        step = inner if directory is None else loopkit.with_checkpointing(inner, directory, every_n_epochs=0)
        return fsdp._fit(step, state, fsdp.make_data(6, world=1), 0, 1)

    uninterrupted, _ = fit(fsdp.make_state("adam"))
    stopped, _ = fit(fsdp.make_state("adam"), tmp_path / "stop", loss)
    assert (stopped.step, stopped.batch_index) == (2, 4)  # the group's end, not its first call
    restored = loopkit.restore(fsdp.make_state("adam"), tmp_path / "stop")
    assert (restored.step, restored.batch_index) == (2, 4)
    resumed, _ = fit(restored)
    a, b = fsdp.full_params(uninterrupted.model), fsdp.full_params(resumed.model)
    for name, p in a.items():
        assert torch.equal(b[name], p), name


def test_a_tied_weight_split_by_shard_is_refused_naming_both_places(one_rank):
    """An embedding tied to the output layer: shard= picking either module puts the weight into two groups (torch
    refuses at the first forward); refused before anything is sharded, naming both and the fix, the donated state
    left usable (it was used up before): with shard=() it trains as a raw loop."""
    def tied():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            emb, out = torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7, bias=False)
        out.weight = emb.weight
        model = torch.nn.Sequential(emb, torch.nn.Tanh(), out)
        return loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.05))

    ce = loopkit.train_step(lambda m, b: torch.nn.functional.cross_entropy(m(b[:, 0]), b[:, 1]))
    batch = torch.randint(0, 7, (8, 2), generator=torch.Generator().manual_seed(0))
    for shard, places in (({torch.nn.Embedding, torch.nn.Linear}, r"'0' \(Embedding, picked by shard=\) and '2' "
                                                                  r"\(Linear, picked by shard=\)"),
                          ({torch.nn.Linear}, r"the model's own group and '2' \(Linear, picked by shard=\)")):
        state = tied()
        with pytest.raises(ValueError, match=rf"with_fsdp: the parameter '0\.weight' is tied to '2\.weight'.*{places}"
                                             r".*Leave every module that holds the tied weight out of shard=") as refused:
            loopkit.donate(loopkit.with_fsdp(ce, shard=shard))(state, batch)
        assert loopkit.state_at_error(refused.value) is state
        assert type(state.model[0].weight) is torch.nn.Parameter  # nothing sharded
    step = loopkit.donate(loopkit.with_fsdp(ce))
    for _ in range(2):
        state, metrics = step(state, batch)
    assert state.model[0].weight is state.model[2].weight and torch.isfinite(metrics["loss"])
    raw = tied()
    for _ in range(2):
        raw.optimizer.zero_grad()
        torch.nn.functional.cross_entropy(raw.model(batch[:, 0]), batch[:, 1]).backward()
        raw.optimizer.step()
    assert_params_close(fsdp.full_params(state.model), raw.model, TOL)


class _Block(torch.nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x))


def test_one_block_reused_in_two_places_is_one_group_and_trains_as_a_raw_loop(one_rank):
    """ALBERT-style sharing, ModuleList([block, block]): one module object is one fully_shard group, so shard={Block}
    trains it (as a raw PyTorch loop does); a weight tied between two different Block objects is still refused."""
    def shared_model():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            block = _Block()
            return torch.nn.Sequential(torch.nn.Linear(3, 4), *[block, block], torch.nn.Linear(4, 1))

    batches = [torch.randn(6, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    raw = shared_model()
    optimizer = torch.optim.SGD(raw.parameters(), lr=0.1)
    for batch in batches:
        optimizer.zero_grad()
        loss_fn(raw, batch).backward()
        optimizer.step()
    model = shared_model()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.donate(loopkit.with_fsdp(loopkit.train_step(loss_fn), shard={_Block}))
    for batch in batches:
        state, _ = step(state, batch)
    assert state.model[1] is state.model[2] and type(state.model[1].lin.weight).__name__ == "DTensor"
    full = state.state_dict()["model"]
    assert set(full) == set(raw.state_dict())
    for name, p in raw.state_dict().items():
        assert (full[name] - p).abs().max() <= TOL, name

    first, second = _Block(), _Block()
    second.lin = first.lin  # one Linear in two different Block objects: two groups
    split = torch.nn.Sequential(first, second)
    state = loopkit.TrainState.create(split, torch.optim.SGD(split.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"the parameter '0\.lin\.weight' is tied to '1\.lin\.weight'.*'0' \(_Block, "
                                         r"picked by shard=\) and '1' \(_Block, picked by shard=\)"):
        loopkit.donate(loopkit.with_fsdp(loopkit.train_step(loss_fn), shard={_Block}))(state, torch.ones(2, 4))
    assert type(split[0].lin.weight) is torch.nn.Parameter  # nothing sharded


def test_a_callbacks_stop_inside_an_accumulation_group_waits_for_the_groups_end(ranks):
    """(fully_shard holds the group's gradients: a fit ended mid-group had no state dict to save at its end.)"""
    results = ranks("stop_mid_group")
    assert_ranks_identical(results)
    model, _, _ = raw_loop("sgd", fsdp.make_data(8), 1, every=3, calls=6)  # asked at batch 4: the group ends at 6
    assert_params_close(results[0]["params"], model)
    for r in results:
        assert (r["step"], r["batch_index"]) == (2, 6)
        assert r["saved"][-1] == (2, 6)


def test_a_layer_with_fewer_rows_than_ranks_has_its_inf_norm_and_export_errors_are_raised_on_every_rank(ranks):
    """Rank 1's shards of Linear(., 1) are empty: the inf norms (with_grad_norm's, with_grad_clip's) raised there
    alone and left rank 0 in the all-reduce. Reference: torch's norms of the gathered gradients."""
    results = ranks("empty_shard")
    for r in results:
        grads = r["grads"]
        expected = {f"grad_inf_norm/{n}": float(g.norm(float("inf"))) for n, g in grads.items()}
        total = max(expected.values())
        for key, value in expected.items():
            assert r["metrics"][key] == pytest.approx(value, rel=1e-6)
        assert r["metrics"]["grad_inf_norm_total"] == pytest.approx(total, rel=1e-6)
        assert r["metrics"]["grad_norm"] == pytest.approx(total, rel=1e-6)
        assert r["export_refused"] is not None and "metadata must map str to str" in r["export_refused"]


def test_shard_and_mp_policy_are_agreed_as_they_act(one_rank):
    """shard (which submodules are fully_shard groups, each with its gathers) and mp_policy (the dtypes they gather and
    reduce in) were not compared over the ranks: a rank with others aborted in gloo. They are now, as they act: shard's
    classes whatever the collection, mp_policy's gather and reduce dtypes (torch reduces in param_dtype when
    reduce_dtype is None; output_dtype acts on the forward alone)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    def agreed(**kw):
        return dict(loopkit.with_fsdp(_step(), **kw).rank_agreed)

    linear, bf16 = torch.nn.Linear, torch.bfloat16
    assert agreed(shard={linear})["with_fsdp shard"] == ("torch.nn.modules.linear.Linear",)
    assert agreed(shard=[linear, linear]) == agreed(shard=(linear,)) and agreed(shard=set()) == agreed()
    assert agreed(shard={linear}) != agreed() != agreed(shard={torch.nn.Sequential})
    assert agreed(mp_policy=MixedPrecisionPolicy(param_dtype=bf16)) == agreed(
        mp_policy=MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16))
    assert agreed(mp_policy=MixedPrecisionPolicy(output_dtype=bf16)) == agreed(mp_policy=MixedPrecisionPolicy())
    assert agreed(mp_policy=MixedPrecisionPolicy()) == agreed()
    kinds = [agreed(), agreed(mp_policy=MixedPrecisionPolicy(param_dtype=bf16)),
             agreed(mp_policy=MixedPrecisionPolicy(reduce_dtype=bf16)),
             agreed(mp_policy=MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=torch.float32))]
    assert all(a != b for i, a in enumerate(kinds) for b in kinds[i + 1:])


def _connection_reset(*args, **kwargs):
    raise RuntimeError("Connection reset by peer")  # (gloo's word when the other rank died)


def test_a_rank_dying_at_the_check_of_the_models_names_it(one_rank, monkeypatch):
    """The first call's all-gather of every rank's parameter and buffer names (gloo's raw error before)."""
    monkeypatch.setattr(dist, "all_gather_object", _connection_reset)
    state = fsdp.make_state("sgd")
    with pytest.raises(RuntimeError, match=r"^with_fsdp: the all-gather of every rank's parameters and buffers \(names, "
                                           r"shapes, dtypes\) failed on rank 0 of 1: another rank has probably died"):
        loopkit.donate(loopkit.with_fsdp(_step()))(state, fsdp.make_data(1)[0, 0])
    assert type(state.model[0].weight) is torch.nn.Parameter  # nothing sharded


def test_a_rank_dying_at_the_broadcast_of_rank_zeros_weights_names_it(one_rank, monkeypatch):
    """The first call's broadcast of rank 0's weights (gloo's raw error before), as a second rank sees it: the
    group reports two ranks that agree on the model (its tensors, flags and optimizer), and the broadcast fails."""
    monkeypatch.setattr(loopkit._collective, "differs_from_rank_zero", lambda *args, **kwargs: None)
    monkeypatch.setattr(loopkit._collective, "check_same", lambda *args, **kwargs: None)
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 2)
    monkeypatch.setattr(dist, "broadcast", _connection_reset)
    state = fsdp.make_state("sgd")
    with pytest.raises(RuntimeError, match=r"with_fsdp: the broadcast of rank 0's parameters and buffers failed on "
                                           r"rank 0 of 2: another rank has probably died") as failed:
        loopkit.donate(loopkit.with_fsdp(_step()))(state, fsdp.make_data(1)[0, 0])
    assert type(state.model[0].weight) is torch.nn.Parameter
    assert loopkit.state_at_error(failed.value) is None  # (the broadcast may have changed some tensors: used up)


def _no_group(monkeypatch):
    dist.destroy_process_group()  # (built under a group, called after it went: the step's first call refuses)
    return RuntimeError, r"^with_fsdp needs a torch\.distributed process group", lambda: dist.init_process_group(
        "gloo", store=dist.HashStore(), rank=0, world_size=1)


def _tensors_apart(monkeypatch):  # (as rank 1 sees rank 0's model of other shapes)
    monkeypatch.setattr(loopkit._collective, "differs_from_rank_zero", lambda *args, **kwargs: "rank 1 has ...")
    return ValueError, r"^with_fsdp: the model's parameters or buffers differ between ranks", monkeypatch.undo


def _check_failed(monkeypatch):  # (another rank died at the all-gather of the models' names)
    monkeypatch.setattr(dist, "all_gather_object", _connection_reset)
    return RuntimeError, r"^with_fsdp: the all-gather of every rank's parameters and buffers", monkeypatch.undo


@pytest.mark.parametrize("cause", [_no_group, _tensors_apart, _check_failed])
def test_an_error_before_the_broadcast_leaves_the_donated_state_usable_then_mended_trains_as_a_raw_loop(
        one_rank, monkeypatch, cause):
    """No process group (any more), the ranks' tensors apart, a failed all-gather of the check: raised by the first
    call before rank 0's weights are broadcast and fully_shard runs (the state used up before, though nothing of it
    changed). The donated state is loopkit.state_at_error's, unsharded; the cause mended, it trains as a raw loop."""
    data = fsdp.make_data(2)
    state = fsdp.make_state("sgd")
    step = loopkit.donate(loopkit.with_fsdp(_step(), shard=fsdp.SHARD))
    error, message, mend = cause(monkeypatch)
    with pytest.raises(error, match=message) as refused:
        step(state, fsdp.global_batch(data, 0))
    assert loopkit.state_at_error(refused.value) is state
    state.check_usable()
    assert type(state.model[0].weight) is torch.nn.Parameter  # nothing sharded
    mend()
    for i in range(2):
        state, _ = step(state, fsdp.global_batch(data, i))
    model, _, _ = raw_loop("sgd", data, epochs=1)
    assert_params_close(fsdp.full_params(state.model), model, TOL)


def test_a_state_without_an_optimizer_is_refused_before_anything_changed(one_rank):
    state = loopkit.TrainState.create(fsdp.make_model())
    with pytest.raises(ValueError, match=r"with_fsdp needs a state with an optimizer") as refused:
        loopkit.with_fsdp(_step()).wrap_parallel(state)
    assert loopkit.state_at_error(refused.value) is state
    assert type(state.model[0].weight) is torch.nn.Parameter


def test_an_error_of_fully_shard_leaves_the_state_used_up(one_rank):
    """fully_shard raising (a 0-dim parameter) comes after the broadcast of rank 0's weights (several ranks) and the
    sharding of the groups before it: the model may be changed half-way, and the state is not given back."""
    model = torch.nn.Linear(2, 1)
    model.scale = torch.nn.Parameter(torch.tensor(1.0))
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="fully_shard doesn.t support scalar parameters") as failed:
        step = loopkit.donate(loopkit.with_fsdp(loopkit.train_step(lambda m, b: (m(b) * m.scale).sum())))
        step(state, torch.ones(2, 2))
    assert loopkit.state_at_error(failed.value) is None
