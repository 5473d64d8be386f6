"""loopkit.lr_find against a hand-written loop that applies Lightning's range-test rule.

The reference below is raw PyTorch: it sets every group's rate by Lightning's ``_ExponentialLR`` /
``_LinearLR`` formulas (the first update at ``min_lr``, update ``i >= 1`` at ``r = (i + 1) / n``),
runs forward, backward and the optimizer step, and smooths and early-stops as Lightning's
``_LRCallback`` does (``beta=0.98``, bias correction ``1 - beta ** (global_step + 1)``, a stop
once ``global_step > 1`` and the smoothed loss passes ``threshold * best``). Its suggestion is
Lightning 2.6's ``_LRFinder.suggestion``. (The same rule was cross-checked by hand against
Lightning's own ``Tuner.lr_find``; this suite does not import Lightning.)
"""

from __future__ import annotations

import copy
import math
import sys
import warnings

import numpy as np
import pytest
import torch

import loopkit
from loopkit.lr_finder import LRFinderResult
from tests import _ddp_script as ddp
from tests import _driver_helpers as helpers

BETA = 0.98


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def make_model(seed=1, hidden=16, dropout=0.0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(hidden, 1))


def make_data(batches=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches, 8, 4, generator=g)
    y = (x @ torch.randn(4, 1, generator=g)).sin()
    return [(x[i], y[i]) for i in range(batches)]


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


def make_state(opt="sgd", seed=1, dropout=0.0, global_rng=False):
    model = make_model(seed, dropout=dropout)
    return loopkit.TrainState.create(model, OPTIMIZERS[opt](model.parameters()), global_rng=global_rng)


def lightning_lr(i, min_lr, max_lr, num_training, mode):
    """The rate of update ``i`` (0-based), written out from Lightning's _ExponentialLR/_LinearLR."""
    if i == 0:  # the scheduler's initial step: last_epoch 0 gives base_lrs
        return min_lr
    r = (i + 1) / num_training  # last_epoch = i: curr_iter = i + 1
    if mode == "linear":
        return min_lr + r * (max_lr - min_lr)
    return min_lr * (max_lr / min_lr) ** r


def reference(opt, data, *, min_lr=1e-8, max_lr=1.0, num_training=100, mode="exponential",
              early_stop_threshold=4.0, accum=1, dropout=0.0, seed=None):
    """A raw loop with Lightning's rule; ``len(data)`` a multiple of ``accum`` (no partial groups).
    ``seed``: torch's global RNG seeded once the model is built (dropout draws from it)."""
    model = make_model(dropout=dropout)
    if seed is not None:
        torch.manual_seed(seed)
    optimizer = OPTIMIZERS[opt](model.parameters())
    lrs, losses = [], []
    avg, best = 0.0, 0.0
    updates = micro = 0
    while True:
        for batch in data:
            loss = mse(model, batch) / accum  # Lightning's closure loss (and its outputs["loss"])
            loss.backward()
            micro += 1
            if micro % accum:
                continue
            lr = lightning_lr(updates, min_lr, max_lr, num_training, mode)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            lrs.append(lr)
            avg = BETA * avg + (1 - BETA) * loss.item()
            smoothed = avg / (1 - BETA ** (updates + 1))
            stop = early_stop_threshold is not None and updates > 1 and smoothed > early_stop_threshold * best
            if smoothed < best or updates == 1:
                best = smoothed
            losses.append(smoothed)
            if stop or updates == num_training:
                return lrs, losses, stop


def reference_suggestion(lrs, losses, skip_begin=10, skip_end=1):
    """Lightning 2.6's _LRFinder.suggestion, index of the result."""
    loss_t = torch.tensor(losses[skip_begin:-skip_end])
    lr_t = torch.tensor(lrs[skip_begin:-skip_end])
    finite = torch.isfinite(loss_t)
    if int(finite.sum()) < 2:
        return None
    gradients = torch.gradient(loss_t[finite], spacing=[lr_t[finite]])[0]
    return int(torch.arange(len(losses))[skip_begin:-skip_end][finite][int(torch.argmin(gradients))])


# --- the strong test: the reference, bitwise ----------------------------------------------------------------------


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize(
    "options",
    [
        dict(num_training=60),
        dict(num_training=40, mode="linear", min_lr=1e-3, max_lr=0.5),
        dict(num_training=50, min_lr=1e-5, max_lr=1e-1, early_stop_threshold=None),
    ],
    ids=["exponential", "linear", "no-early-stop"],
)
def test_rates_losses_and_suggestion_equal_the_reference(opt, options):
    data = make_data(12)  # shorter than num_training: both go round the data again
    result = loopkit.lr_find(loopkit.train_step(mse), make_state(opt), data, **options)
    lrs, losses, stopped = reference(opt, data, **options)
    assert result.results["lr"] == lrs  # exactly the same floats
    assert result.results["loss"] == losses  # bitwise
    assert all(type(v) is float for v in result.results["lr"] + result.results["loss"])
    assert result.stopped_early == stopped
    assert len(lrs) == options["num_training"] or stopped
    index = reference_suggestion(lrs, losses)
    assert index is not None
    assert result.suggestion_index() == index
    assert result.suggestion() == lrs[index]


def test_with_dropout_drawing_from_the_global_rng_equals_the_reference():
    """A state with ``global_rng=True`` draws dropout from torch's global RNG, as the raw loop (and Lightning) do."""
    data = make_data(12)
    options = dict(num_training=30, min_lr=1e-4, max_lr=1.0)
    state = make_state("adam", dropout=0.3, global_rng=True)
    torch.manual_seed(11)
    result = loopkit.lr_find(loopkit.train_step(mse), state, data, **options)
    lrs, losses, stopped = reference("adam", data, dropout=0.3, seed=11, **options)
    assert result.results["lr"] == lrs and result.results["loss"] == losses and result.stopped_early == stopped


def test_the_schedule_follows_lightnings_index_convention():
    result = loopkit.lr_find(loopkit.train_step(mse), make_state(), make_data(), min_lr=1e-4, max_lr=1.0,
                             num_training=4, early_stop_threshold=None)
    # update 0 at min_lr, then r = 2/4, 3/4, 4/4: the rate of r = 1/4 is never used, the last is max_lr
    assert result.results["lr"] == [1e-4, 1e-4 * (1.0 / 1e-4) ** 0.5, 1e-4 * (1.0 / 1e-4) ** 0.75, 1.0]
    linear = loopkit.lr_find(loopkit.train_step(mse), make_state(), make_data(), min_lr=0.0, max_lr=1.0,
                             num_training=4, mode="linear", early_stop_threshold=None)
    assert linear.results["lr"] == [0.0, 0.5, 0.75, 1.0]


def test_every_param_group_gets_the_rate():
    model = make_model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.3},
                                 {"params": model[2].parameters(), "lr": 0.02}])
    state = loopkit.TrainState.create(model, optimizer)
    seen = []
    inner = loopkit.train_step(mse)

    def step(s, batch):  # a plain step that records each group's rate before its update
        seen.append([g["lr"] for g in s.optimizer.param_groups])
        return inner(s, batch)

    result = loopkit.lr_find(step, state, make_data(), num_training=5, early_stop_threshold=None)
    assert [a for a, _ in seen] == [b for _, b in seen] == result.results["lr"]
    assert [g["lr"] for g in state.optimizer.param_groups] == [0.3, 0.02]


# --- early stop -----------------------------------------------------------------------------------------------------


def test_a_diverging_search_stops_where_the_reference_does():
    data = make_data(10)
    options = dict(min_lr=1e-3, max_lr=100.0, num_training=80)
    result = loopkit.lr_find(loopkit.train_step(mse), make_state("sgd"), data, **options)
    lrs, losses, stopped = reference("sgd", data, **options)
    assert stopped and result.stopped_early
    assert 2 < len(result.results["lr"]) < 80
    assert result.results["lr"] == lrs and result.results["loss"] == losses
    # the last point is recorded and is the one past the threshold
    assert result.results["loss"][-1] > 4.0 * min(result.results["loss"][:-1])


def test_no_threshold_runs_every_update():
    result = loopkit.lr_find(loopkit.train_step(mse), make_state(), make_data(10), min_lr=1e-3, max_lr=100.0,
                             num_training=80, early_stop_threshold=None)
    assert len(result.results["lr"]) == 80 and not result.stopped_early


# --- under a process group -----------------------------------------------------------------------------------------


def rank_zeros_reference(data, *, min_lr, max_lr, num_training, threshold=4.0):
    """Raw PyTorch over ``data[call, rank]`` (2 ranks): each update from the mean of the ranks' losses (DDP's averaged
    gradient), each rank's loss smoothed and early-stopped by Lightning's rule on its own. Rank 0's rates, losses and
    stop (what Lightning's broadcast gives every rank), and the update after which each rank alone would stop."""
    model = ddp.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    raw = [[], []]
    for i in range(num_training):
        for group in optimizer.param_groups:
            group["lr"] = lightning_lr(i, min_lr, max_lr, num_training, "exponential")
        losses = [ddp.mse(model, data[i, rank]) for rank in range(2)]
        ((losses[0] + losses[1]) / 2).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for rank in range(2):
            raw[rank].append(losses[rank].item())
    curves, stops = [], []
    for rank in range(2):
        avg, best, curve, stop = 0.0, 0.0, [], None
        for updates, loss in enumerate(raw[rank], 1):
            avg = BETA * avg + (1 - BETA) * loss
            curve.append(avg / (1 - BETA ** (updates + 1)))
            if stop is None and updates > 1 and curve[-1] > threshold * best:
                stop = updates
            if curve[-1] < best or updates == 1:
                best = curve[-1]
        curves.append(curve)
        stops.append(stop)
    n = stops[0] or num_training
    lrs = [lightning_lr(i, min_lr, max_lr, num_training, "exponential") for i in range(n)]
    return lrs, curves[0][:n], stops[0] is not None, stops


@pytest.mark.slow
def test_two_ranks_get_rank_zeros_search_and_the_same_suggestion(tmp_path):
    """As Lightning's, under DDP (and FSDP) the search stops when rank 0's loss diverges and every rank gets rank 0's
    rates, losses and suggestion: ``apply`` then gives every rank the same rate, and the fit trains (with_ddp's check
    that the ranks' optimizers agree refused it when each rank suggested from its own losses)."""
    done = ddp.torchrun(str(tmp_path), ["lr_find_ranks"], timeout=120)
    assert done.returncode == 0, done.stdout[-4000:]
    ranks = ddp.load(str(tmp_path), "lr_find_ranks")
    lrs, losses, stopped, stops = rank_zeros_reference(ddp.lr_find_data(), **ddp.LR_FIND)
    assert stops[1] < stops[0] < ddp.LR_FIND["num_training"]  # rank 1's own losses would stop the search sooner
    index = reference_suggestion(lrs, losses)
    for name in ("ddp", "fsdp"):
        zero, one = ranks[0][name], ranks[1][name]
        assert zero == one, name  # the same floats on every rank
        assert zero["lr"] == lrs and zero["stopped"] == stopped and len(zero["loss"]) == stops[0], name
        assert np.allclose(zero["loss"], losses, rtol=1e-5, atol=0), name  # (DDP's all-reduce sums in another order)
        assert zero["suggestion"] == lrs[index], name
        assert zero["fit"] == (2, lrs[index]), name


# --- the given state ------------------------------------------------------------------------------------------------


def _snapshot(state):
    return {
        "params": {k: v.detach().clone() for k, v in state.model.state_dict().items()},
        "optimizer": copy.deepcopy(state.optimizer.state_dict()),
        "scheduler": copy.deepcopy(state.scheduler.state_dict()) if state.scheduler is not None else None,
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in state.optimizer.param_groups],
        "counters": (state.step, state.epoch, state.batch_index),
        "rng": {k: v.clone() for k, v in state.rng.items()},
        "extras": dict(state.extras),
        "global_rng": (torch.get_rng_state(), np.random.get_state()[1].copy()),
    }


def _same_tree(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


def _assert_same(a, b):
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert _same_tree(a["optimizer"], b["optimizer"])
    assert a["scheduler"] == b["scheduler"]
    assert a["groups"] == b["groups"]
    assert a["counters"] == b["counters"]
    assert a["rng"].keys() == b["rng"].keys() and all(torch.equal(a["rng"][k], b["rng"][k]) for k in a["rng"])
    assert a["extras"] == b["extras"]
    assert torch.equal(a["global_rng"][0], b["global_rng"][0]) and np.array_equal(a["global_rng"][1], b["global_rng"][1])


@pytest.mark.parametrize("global_rng", [False, True], ids=["own-rng", "global-rng"])
def test_the_given_state_is_left_as_it_was_and_still_trains(global_rng):
    """With ``global_rng=True`` the state's RNG is torch's global one: the search puts it back."""
    model = make_model(dropout=0.2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    state = loopkit.TrainState.create(model, optimizer, scheduler, seed=7, global_rng=global_rng)
    step = loopkit.train_step(mse)
    data = make_data(6)
    state, _ = loopkit.run_epochs(step, state, data, max_steps=4, progress=False)  # optimizer state, mid-epoch
    before = _snapshot(state)
    assert before["optimizer"]["state"]  # (Adam's moments, compared after the search)
    twin = copy.deepcopy(state)

    result = loopkit.lr_find(step, state, data, num_training=30)
    assert len(result.results["lr"]) > 2
    _assert_same(before, _snapshot(state))

    # it trains on, as its untouched twin does
    global_state = torch.get_rng_state()  # (drawn from with global_rng=True)
    trained, _ = loopkit.run_epochs(step, state, data, max_steps=8, progress=False)
    torch.set_rng_state(global_state)
    expected, _ = loopkit.run_epochs(step, twin, data, max_steps=8, progress=False)
    for a, b in zip(trained.model.parameters(), expected.model.parameters()):
        assert torch.equal(a, b)
    assert trained.optimizer.param_groups[0]["lr"] == expected.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("stream", [False, True], ids=["list", "stream"])
def test_a_loss_fn_closing_over_the_given_model_is_refused_leaving_the_given_state_as_it_was(stream):
    """The search trains a copy; a loss_fn using the model it closes over (the given state's), not the one it is
    given, is refused at the first step, and its backward wrote the given state's gradients: they are given back,
    and the given state (parameters, gradients, optimizer state) is as a snapshot taken before, and trains on as
    its untouched twin does."""
    model = make_model()
    state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.01), seed=7)
    step, data = loopkit.train_step(mse), make_data(6)
    state, _ = loopkit.run_epochs(step, state, data, max_steps=2, progress=False)  # optimizer state, mid-epoch
    before, twin = _snapshot(state), copy.deepcopy(state)
    grads = [None if p.grad is None else p.grad.clone() for p in state.model.parameters()]  # (None: run_epochs' end)
    search_data = helpers.stream(data) if stream else data
    with pytest.raises(ValueError, match="does it use the model it is given"):
        loopkit.lr_find(loopkit.train_step(lambda m, b: mse(state.model, b)), state, search_data, num_training=5)
    for p, g in zip(state.model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    _assert_same(before, _snapshot(state))
    trained, _ = loopkit.run_epochs(step, state, data, max_steps=6, progress=False)
    expected, _ = loopkit.run_epochs(step, twin, data, max_steps=6, progress=False)
    for a, b in zip(trained.model.parameters(), expected.model.parameters()):
        assert torch.equal(a, b)


def test_the_copy_the_search_trains_is_freed_with_the_result_without_a_gc():
    """As a raw loop's model and optimizer are, by reference counting alone (no cycle of the fit's holds the copy
    until Python's cyclic gc runs; on a GPU, device memory)."""
    with helpers.gc_off():
        assert helpers.raw_loop_frees_its_model()
        model = helpers.Watched(3, 1)
        state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters()))
        result = loopkit.lr_find(loopkit.train_step(helpers.mse), state, helpers.make_data(4), num_training=6)
        assert len(result.results["lr"]) == 6
        del result, state, model
        assert helpers.alive() == 0


def test_a_search_from_a_trained_state_counts_its_updates_from_zero():
    state, _ = loopkit.run_epochs(loopkit.train_step(mse), make_state(), make_data(12), max_steps=12, progress=False)
    result = loopkit.lr_find(loopkit.train_step(mse), state, make_data(12), num_training=20, early_stop_threshold=None)
    assert len(result.results["lr"]) == 20 and result.results["lr"][0] == 1e-8 and result.results["lr"][-1] == 1.0
    assert state.step == 12


# --- gradient accumulation ------------------------------------------------------------------------------------------


def test_under_grad_accum_one_record_per_update():
    data = make_data(12)  # whole groups of 2
    options = dict(num_training=20, early_stop_threshold=None)
    step = loopkit.with_grad_accum(loopkit.train_step(mse), every=2)
    result = loopkit.lr_find(step, make_state("adam"), data, **options)
    lrs, losses, _ = reference("adam", data, accum=2, **options)
    assert len(result.results["lr"]) == 20  # 40 micro-batches, 20 updates
    assert result.results["lr"] == [lightning_lr(i, 1e-8, 1.0, 20, "exponential") for i in range(20)]
    assert result.results["lr"] == lrs and result.results["loss"] == losses  # Lightning's loss / every, bitwise


def test_under_grad_accum_a_partial_group_moves_the_rate_unrecorded():
    step = loopkit.with_grad_accum(loopkit.train_step(mse), every=2)
    # 5 batches an epoch: two whole groups, then run_epochs' flush of the fifth batch (an update)
    result = loopkit.lr_find(step, make_state(), make_data(5), num_training=9, early_stop_threshold=None)
    expected = [lightning_lr(i, 1e-8, 1.0, 9, "exponential") for i in range(9) if i % 3 != 2]
    assert result.results["lr"] == expected  # as Lightning: the epoch's last (partial) update is not recorded


def test_a_skipped_batch_makes_no_record():
    def loss_fn(model, batch):
        return None if batch[0][0, 0] > 0.5 else mse(model, batch)

    data = make_data(12)
    skipped = sum(1 for b in data if b[0][0, 0] > 0.5)
    assert 0 < skipped < 12
    result = loopkit.lr_find(loopkit.train_step(loss_fn), make_state(), data, num_training=15,
                             early_stop_threshold=None)
    assert result.results["lr"] == [lightning_lr(i, 1e-8, 1.0, 15, "exponential") for i in range(15)]
    assert all(math.isfinite(v) for v in result.results["loss"])


# --- a real problem -------------------------------------------------------------------------------------------------


def test_the_suggestion_on_a_small_mlp_is_sane():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g)
    y = torch.tanh(x @ torch.randn(4, 1, generator=g)) + 0.05 * torch.randn(512, 1, generator=g)
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 512, 32)]
    model = make_model(3, hidden=32)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    result = loopkit.lr_find(loopkit.train_step(mse), state, data, min_lr=1e-5, max_lr=10.0, num_training=100)
    lrs, losses = result.results["lr"], result.results["loss"]
    suggestion = result.suggestion()
    assert suggestion is not None
    # (not the minimum over all points: Lightning's bias correction is one update off, which halves the first)
    best_lr = lrs[10 + int(np.nanargmin(losses[10:]))]
    assert 1e-5 < suggestion < best_lr < 10.0
    # training with it makes progress
    tuned = result.apply(state)
    trained, history = loopkit.run_epochs(loopkit.train_step(mse), tuned, data, epochs=3, progress=False)
    assert history[-1]["train/loss"] < history[0]["train/loss"]


# --- suggestion, apply, plot ----------------------------------------------------------------------------------------


def test_suggestion_leaves_out_non_finite_losses_and_too_few_points():
    lrs = [10.0 ** (i / 4 - 4) for i in range(16)]
    losses = [2.0] * 4 + [2.0, 1.9, float("nan"), 1.0, 0.5, 0.45, float("inf"), 0.4, 0.41, 0.42, 3.0, 9.0]
    result = LRFinderResult({"lr": lrs, "loss": losses})
    assert result.suggestion_index(skip_begin=4) == reference_suggestion(lrs, losses, skip_begin=4)
    assert math.isfinite(losses[result.suggestion_index(skip_begin=4)])
    assert result.suggestion_index() == reference_suggestion(lrs, losses)  # (defaults: points 10..14)
    nearly_all_nan = LRFinderResult({"lr": lrs, "loss": [float("nan")] * 15 + [1.0]})
    with pytest.warns(RuntimeWarning, match="no suggestion: 1 finite"):
        assert nearly_all_nan.suggestion(skip_begin=0, skip_end=0) is None


def test_suggestion_with_too_few_points_warns_and_gives_none():
    result = LRFinderResult({"lr": [1e-3, 1e-2, 1e-1], "loss": [1.0, 0.5, 0.2]})
    with pytest.warns(RuntimeWarning, match="no suggestion"):
        assert result.suggestion() is None
    assert result.suggestion(skip_begin=0, skip_end=0) is not None  # skip_end=0 keeps the end
    with pytest.raises(ValueError, match="skip_begin"):
        result.suggestion(skip_begin=-1)
    with pytest.raises(ValueError, match="skip_end"):
        result.suggestion(skip_end=1.5)


def test_apply_returns_a_copy_at_the_suggested_rate():
    state = make_state("adam")
    result = LRFinderResult({"lr": [1e-3, 1e-2, 1e-1], "loss": [1.0, 0.2, 5.0]})
    new = result.apply(state, skip_begin=0, skip_end=0)
    assert [g["lr"] for g in new.optimizer.param_groups] == [1e-3]
    assert state.optimizer.param_groups[0]["lr"] == 0.01
    assert new.model is not state.model
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduled = loopkit.TrainState.create(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1))
    with pytest.raises(ValueError, match="scheduler"):
        result.apply(scheduled, skip_begin=0, skip_end=0)


def test_plot_returns_a_figure():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = loopkit.lr_find(loopkit.train_step(mse), make_state(), make_data(), num_training=30)
    fig = result.plot(suggest=True)
    try:
        ax = fig.axes[0]
        assert ax.get_xscale() == "log" and ax.get_xlabel() == "Learning rate" and ax.get_ylabel() == "Loss"
        assert len(ax.lines) == 2  # the curve and the suggestion's point
        assert list(ax.lines[0].get_xdata()) == result.results["lr"]
    finally:
        plt.close(fig)
    fig, ax = plt.subplots()
    try:
        assert LRFinderResult(result.results, mode="linear").plot(ax=ax) is fig
        assert ax.get_xscale() == "linear"
    finally:
        plt.close(fig)


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"loopkit\[plot\]"):
        LRFinderResult({"lr": [1.0], "loss": [1.0]}).plot()


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(min_lr=1.0, max_lr=1.0), "min_lr must be below max_lr"),
        (dict(min_lr=0.5, max_lr=0.1), "min_lr must be below max_lr"),
        (dict(min_lr=0.0), "min_lr must be a finite number > 0"),
        (dict(min_lr=-1e-3), "min_lr"),
        (dict(min_lr=-1e-3, mode="linear"), "min_lr must be a finite number >= 0"),
        (dict(max_lr=float("inf")), "max_lr"),
        (dict(max_lr=float("nan")), "max_lr"),
        (dict(max_lr="1"), "max_lr"),
        (dict(num_training=1), "num_training must be an int >= 2"),
        (dict(num_training=10.0), "num_training"),
        (dict(num_training=True), "num_training"),
        (dict(mode="log"), "mode must be 'exponential' or 'linear'"),
        (dict(early_stop_threshold=0.0), "early_stop_threshold"),
        (dict(early_stop_threshold=-4.0), "early_stop_threshold"),
        (dict(early_stop_threshold=float("inf")), "early_stop_threshold"),
        (dict(early_stop_threshold="4"), "early_stop_threshold"),
        (dict(device="nowhere"), "device"),
    ],
)
def test_bad_options_are_named_before_anything_runs(options, match):
    state = make_state()
    before = _snapshot(state)
    with pytest.raises(ValueError, match=match):
        loopkit.lr_find(loopkit.train_step(mse), state, make_data(), **options)
    _assert_same(before, _snapshot(state))


def test_bad_state_step_and_data_are_named():
    step = loopkit.train_step(mse)
    with pytest.raises(ValueError, match="no optimizer"):
        loopkit.lr_find(step, loopkit.TrainState.create(make_model()), make_data())
    with pytest.raises(TypeError, match="state must be a loopkit.TrainState"):
        loopkit.lr_find(step, make_model(), make_data())
    with pytest.raises(TypeError, match="eval_step"):
        loopkit.lr_find(loopkit.eval_step(lambda m, b: {"loss": mse(m, b)}), make_state(), make_data())
    with pytest.raises(TypeError, match="train_data"):
        loopkit.lr_find(step, make_state(), 3)
    with pytest.raises(ValueError, match="with_logging"):
        loopkit.lr_find(loopkit.with_logging(step, loopkit.ConsoleLogger()), make_state(), make_data())
    with pytest.raises(ValueError, match="lr_find: train_data is empty"):
        loopkit.lr_find(step, make_state(), [])
    with pytest.raises(TypeError, match="lr_find: step must be a step"):
        loopkit.lr_find(3, make_state(), make_data())


@pytest.mark.parametrize("transform", [lambda s: loopkit.with_swa(s, 0.05, swa_epoch_start=1),
                                       lambda s: loopkit.with_pruning(s, 0.5, [2])], ids=["swa", "pruning"])
def test_what_lightning_turns_off_during_the_search_is_refused(transform):
    """Lightning's search runs without the user's callbacks: with SWA the range's rates stood still, with pruning
    the weights were pruned mid-search."""
    state = make_state()
    before = _snapshot(state)
    with pytest.raises(ValueError, match="pass the step without them"):
        loopkit.lr_find(transform(loopkit.train_step(mse)), state, make_data())
    _assert_same(before, _snapshot(state))


def test_a_search_that_makes_no_update_in_a_pass_says_so_in_its_own_words():
    calls = [0]

    def skips_after_a_while(model, batch):
        calls[0] += 1
        return None if calls[0] > 3 else mse(model, batch)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = loopkit.lr_find(loopkit.train_step(skips_after_a_while), make_state(), make_data(), num_training=40)
    messages = [str(w.message) for w in caught]
    assert len(result.results["lr"]) == 3 and not result.stopped_early
    assert any("lr_find: the search ended after 3 of num_training=40 updates" in m for m in messages)
    assert not any(m.startswith("run_epochs:") for m in messages)


def test_numpy_numbers_are_accepted():
    options = dict(min_lr=np.float32(1e-4), max_lr=np.float64(1.0), num_training=np.int64(12),
                   early_stop_threshold=np.float32(4.0))
    result = loopkit.lr_find(loopkit.train_step(mse), make_state(), make_data(), **options)
    plain = loopkit.lr_find(loopkit.train_step(mse), make_state(), make_data(), min_lr=float(np.float32(1e-4)),
                            max_lr=1.0, num_training=12, early_stop_threshold=4.0)
    assert result.results == plain.results
    assert result.num_training == 12 and type(result.num_training) is int
