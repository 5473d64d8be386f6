"""loopkit.ThroughputMonitor against Lightning 2.6.6's, and the ``on_batch_start`` hook it counts samples in.

The references below are what Lightning 2.6.6's ``ThroughputMonitor`` logged in a ``Trainer`` fit of the
same model and data (``num_sanity_val_steps=2``, ``max_epochs=2``, ``window_size=3``, ``batch_size_fn``
the batch's rows, ``length_fn`` three items a row, ``flops_per_batch = 10``), its ``time.perf_counter``
replaced by the same fake clock as here: 0.5 s per training forward and 2 s per validation forward. Lightning
is not a test dependency; it was run once and its values are kept here (its ``step`` is 0-based,
loopkit's ``state.step`` 1-based, so only the values are compared). The clock makes every value exact: the
time between two batches is 0.5 s whatever runs between them, validation's 6 s is taken out of the
training clock (``train/time`` goes on from 2.0 to 2.5 across the epoch's validation), and the rates are
the window's differences.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import loopkit
import loopkit.throughput as throughput_module
from loopkit import ThroughputMonitor, TrainState, eval_step, measure_flops, run_epochs, train_step, with_grad_accum, with_logging

_RATES = {"train/device/batches_per_sec": 2.0, "train/device/items_per_sec": 12.0, "train/device/flops_per_sec": 20.0,
          "train/device/samples_per_sec": 4.0}
_PARTIAL = {**_RATES, "train/device/samples_per_sec": 3.0, "train/device/items_per_sec": 9.0}  # a window with the 1-row batch


def _row(time: float, batches: int, samples: int, rates: dict | None = None) -> dict:
    row = {"train/time": time, "train/batches": batches, "train/samples": samples, "train/lengths": 3 * samples}
    return {**row, **(rates or {})}


# (accumulate_grad_batches, log_every_n_steps, samples): Lightning 2.6.6's logged values, in order
LIGHTNING = {
    (1, 1, 7): [
        _row(0.5, 1, 2), _row(1.0, 2, 4), _row(1.5, 3, 6, _RATES), _row(2.0, 4, 7, _PARTIAL),
        _row(2.5, 5, 9, _PARTIAL), _row(3.0, 6, 11, _RATES), _row(3.5, 7, 13, _RATES), _row(4.0, 8, 14, _PARTIAL),
    ],
    (1, 2, 7): [_row(1.0, 2, 4), _row(2.0, 4, 7, _PARTIAL), _row(3.0, 6, 11, _RATES), _row(4.0, 8, 14, _PARTIAL)],
    (2, 1, 7): [_row(1.0, 2, 4), _row(2.0, 4, 7, _PARTIAL), _row(3.0, 6, 11, _RATES), _row(4.0, 8, 14, _PARTIAL)],
    (2, 2, 7): [_row(2.0, 4, 7, _PARTIAL), _row(4.0, 8, 14, _PARTIAL)],
    # 5 batches an epoch: the partial group's update (Lightning's at the last batch; loopkit's flush) logs too
    (2, 1, 9): [
        _row(1.0, 2, 4), _row(2.0, 4, 8, _RATES), _row(2.5, 5, 9, _PARTIAL), _row(3.5, 7, 13, _RATES),
        _row(4.5, 9, 17, _RATES), _row(5.0, 10, 18, _PARTIAL),
    ],
}


class _Capture:
    """A logger keeping what it is given."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hparams(self, params: dict, metrics: dict | None = None) -> None:
        pass

    def finalize(self) -> None:
        pass


def _fit(monkeypatch, every: int, log_every: int, samples: int, update_seconds: float = 0.0):
    """The monitored fit of the module's docstring on the fake clock (each ``optimizer.step`` adding
    ``update_seconds``): the train/ values logged, in order, and the monitor."""
    ticks = {"train": 0, "val": 0, "update": 0}
    clock = types.SimpleNamespace(
        perf_counter=lambda: 0.5 * ticks["train"] + 2.0 * ticks["val"] + update_seconds * ticks["update"])
    monkeypatch.setattr(throughput_module, "time", clock)

    class SGD(torch.optim.SGD):
        def step(self, closure=None):
            ticks["update"] += 1
            return super().step(closure)

    def loss_fn(model, batch):
        ticks["train"] += 1
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    def metric_fn(model, batch):
        ticks["val"] += 1
        return {"loss": nn.functional.mse_loss(model(batch[0]), batch[1])}

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(samples, 3), torch.randn(samples, 1))
    model = nn.Linear(3, 1)
    state = TrainState.create(model, SGD(model.parameters(), lr=0.1))
    capture = _Capture()
    step = train_step(loss_fn)
    if every > 1:
        step = with_grad_accum(step, every=every)
    monitor = ThroughputMonitor(lambda b: len(b[0]), lambda b: 3 * len(b[0]), flops_per_batch=10, window_size=3)
    run_epochs(
        with_logging(step, capture, every_n_steps=log_every), state,
        torch.utils.data.DataLoader(data, batch_size=2), epochs=2,
        val=(eval_step(metric_fn), torch.utils.data.DataLoader(data, batch_size=3)),
        callbacks=[monitor], progress=False,
    )
    logged = [{k: v for k, v in row.items() if k.startswith("train/") and not k.startswith("train/loss")} for _, row in capture.rows]
    return [row for row in logged if row], monitor


@pytest.mark.parametrize(("every", "log_every", "samples"), sorted(LIGHTNING))
def test_throughput_equals_lightnings(monkeypatch, every, log_every, samples):
    logged, monitor = _fit(monkeypatch, every, log_every, samples)
    assert logged == LIGHTNING[(every, log_every, samples)]
    assert monitor.latest == LIGHTNING[(every, log_every, samples)][-1]


def test_the_update_of_an_epochs_partial_group_counts_in_the_training_time(monkeypatch):
    """Each optimizer.step takes 1 s too. Lightning makes the partial group's update in the epoch's last batch, so
    that batch's time holds it; loopkit's flush makes it after that batch's end, and the time goes on to it (not
    into the validation's, taken out). By hand, an epoch of 5 batches of 0.5 s and 3 updates is 5.5 s; the window
    of 3 batch ends at the flush is 2.5, 4.0, 5.5 (Lightning 2.6.6 logged the same, with the same clock)."""
    slow = {"train/device/batches_per_sec": 1.0, "train/device/samples_per_sec": 2.0,
            "train/device/items_per_sec": 6.0, "train/device/flops_per_sec": 10.0}
    partial = {"train/device/batches_per_sec": 2 / 3, "train/device/samples_per_sec": 1.0,
               "train/device/items_per_sec": 3.0, "train/device/flops_per_sec": 20 / 3}
    expected = [_row(2.0, 2, 4), _row(4.0, 4, 8, slow), _row(5.5, 5, 9, partial), _row(7.5, 7, 13, slow),
                _row(9.5, 9, 17, slow), _row(11.0, 10, 18, partial)]
    logged, monitor = _fit(monkeypatch, 2, 1, 9, update_seconds=1.0)
    assert logged == [pytest.approx(row) for row in expected]
    assert monitor.latest == pytest.approx(expected[-1])


def test_on_batch_start_sees_each_batch_before_its_step():
    """The hook gets the very batch the step gets, with the state before it (a raw loop's order)."""
    model = nn.Linear(2, 1)
    state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    data = [(torch.full((2, 2), float(i)), torch.zeros(2, 1)) for i in range(5)]
    given: list = []
    seen: list = []

    def loss_fn(model, batch):
        given.append(batch)
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    class Hook:
        def on_batch_start(self, state, batch):
            seen.append((state.epoch, state.step, state.batch_index, batch))

    run_epochs(train_step(loss_fn), state, data, epochs=2, callbacks=[Hook()], progress=False)
    assert [(e, s, i) for e, s, i, _ in seen] == [(e, 5 * e + i, i) for e in range(2) for i in range(5)]
    assert all(b is g for (*_, b), g in zip(seen, given, strict=True))
    assert all(b is data[i % 5] for i, (*_, b) in enumerate(seen))


def test_lightnings_on_train_batch_start_is_named():
    class Ported:
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pass

    model = nn.Linear(2, 1)
    state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="on_train_batch_start -> on_batch_start"):
        run_epochs(train_step(lambda m, b: m(b).sum()), state, [torch.ones(1, 2)], epochs=1, callbacks=[Ported()])


def test_a_stop_asked_in_on_batch_start_ends_the_fit_after_that_batch():
    model = nn.Linear(2, 1)
    state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))

    class StopAtThird(loopkit.Callback):
        def on_batch_start(self, state, batch):
            self.should_stop = state.batch_index == 2

    state, _ = run_epochs(train_step(lambda m, b: m(b).sum()), state, [torch.ones(1, 2)] * 5, epochs=3,
                          callbacks=[StopAtThird()], progress=False)
    assert state.step == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size_fn": 3}, TypeError, "batch_size_fn must be callable"),
        ({"batch_size_fn": len, "window_size": 1}, ValueError, "window_size must be an int >= 2"),
        ({"batch_size_fn": len, "flops_per_batch": 0}, ValueError, "flops_per_batch must be a number > 0"),
        ({"batch_size_fn": len, "length_fn": "rows"}, TypeError, "length_fn must be callable"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ThroughputMonitor(**kwargs)


def test_a_batch_size_that_is_not_a_count_is_named():
    model = nn.Linear(2, 1)
    state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    monitor = ThroughputMonitor(lambda batch: 2.5)
    with pytest.raises(TypeError, match=r"batch_size_fn must return a whole number >= 0, got 2\.5"):
        run_epochs(train_step(lambda m, b: m(b).sum()), state, [torch.ones(1, 2)], epochs=1, callbacks=[monitor],
                   progress=False)


def test_measure_flops_counts_a_linear_layer_by_hand():
    """2 * rows * in * out for the forward's product; the backward's weight gradient as much again, and the
    input's gradient (only when the input needs one) as much again."""
    with torch.device("meta"):
        model = nn.Linear(16, 5)
        x = torch.randn(3, 16)
        x_grad = torch.randn(3, 16, requires_grad=True)
    product = 2 * 3 * 16 * 5
    assert measure_flops(model, lambda: model(x)) == product
    assert measure_flops(model, lambda: model(x), loss_fn=torch.Tensor.sum) == 2 * product
    assert measure_flops(model, lambda: model(x_grad), loss_fn=torch.Tensor.sum) == 3 * product


def test_measure_flops_gives_the_models_gradients_back_as_it_found_them():
    """The backward's gradients were left on the parameters, and the next train_step added them into its update (a
    raw loop zeroes before its backward). Reference: a raw SGD loop without the measurement; gradients found there
    (an accumulation's) given back, the same tensors with the same values, after a backward that raised too."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert measure_flops(state.model, lambda: state.model(x), loss_fn=torch.Tensor.sum) == 2 * 2 * 4 * 3
    assert [p.grad for p in state.model.parameters()] == [None, None]
    trained, _ = train_step(loss)(state, x)
    torch.manual_seed(0)
    raw_model = nn.Linear(3, 1)
    raw = torch.optim.SGD(raw_model.parameters(), lr=0.1)
    raw.zero_grad()
    loss(raw_model, x).backward()
    raw.step()
    assert torch.equal(trained.model.weight, raw_model.weight) and torch.equal(trained.model.bias, raw_model.bias)

    model.weight.grad = held = torch.full_like(model.weight, 0.5)
    measure_flops(model, lambda: model(x), loss_fn=torch.Tensor.sum)
    assert model.weight.grad is held and torch.equal(held, torch.full_like(held, 0.5)) and model.bias.grad is None
    with pytest.raises(ZeroDivisionError):
        measure_flops(model, lambda: model(x), loss_fn=lambda out: out.sum().backward() or 1 / 0)
    assert model.weight.grad is held and torch.equal(held, torch.full_like(held, 0.5)) and model.bias.grad is None


def _monitored(monkeypatch, world: int, rank: int = 0) -> list[dict | None]:
    """What ThroughputMonitor hands the loggers after each of 4 batches of 4 samples, ending at 1.0, 3.0, 4.5 and
    5.0 s on a fake clock (training starts at 0.0), as rank ``rank`` of a world of ``world`` (faked)."""
    monkeypatch.setattr(throughput_module._collective, "rank_and_size", lambda: (rank, world))
    monkeypatch.setattr(throughput_module._collective, "is_rank_zero", lambda: rank == 0)
    now = [0.0]
    monkeypatch.setattr(throughput_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monitor = ThroughputMonitor(lambda batch: 4, flops_per_batch=7, available_flops=50, window_size=3)
    state = TrainState.create(nn.Linear(1, 1))
    monitor.on_fit_start(state)
    monitor.on_epoch_start(state)
    given = []
    for end in (1.0, 3.0, 4.5, 5.0):
        monitor.on_batch_start(state, None)
        now[0] = end
        state = state.evolve(step=state.step + 1)
        given.append(monitor.on_batch_end(state, {}))
    return given


@pytest.mark.parametrize("world", [1, 2])
def test_flops_and_mfu_are_per_device_as_lightnings(monkeypatch, world):
    """Lightning's Throughput: each batch adds flops_per_batch * world (all ranks' work); the window's rate is
    flops_per_sec (logged over several ranks), device/flops_per_sec = flops_per_sec / world and
    device/mfu = flops_per_sec / world / available_flops. Worked by hand from the clock: the window of the 3rd
    batch spans 1.0 -> 4.5 s (3.5 s, 2 batches after its first), that of the 4th 3.0 -> 5.0 s (2 s)."""
    given = _monitored(monkeypatch, world)
    assert given[0] == {"train/time": 1.0, "train/batches": 1, "train/samples": 4}  # (no full window yet)
    for out, elapsed, batches in ((given[2], 3.5, 3), (given[3], 2.0, 4)):
        per_device = 2 * 7 / elapsed  # 2 batches' flops on one device over the window
        expected = {
            "train/time": {3: 4.5, 4: 5.0}[batches], "train/batches": batches, "train/samples": 4 * batches,
            "train/device/batches_per_sec": 2 / elapsed, "train/device/samples_per_sec": 8 / elapsed,
            "train/device/flops_per_sec": per_device, "train/device/mfu": per_device / 50,
        }
        if world > 1:  # the global rates
            expected |= {"train/batches_per_sec": 2 * 2 / elapsed, "train/samples_per_sec": 2 * 8 / elapsed,
                         "train/flops_per_sec": 2 * per_device}
        assert out == pytest.approx(expected, rel=1e-12)
    assert given[3]["train/device/mfu"] == pytest.approx(0.14)  # (7 flops/s of a device's 50)
    if world == 2:
        assert given[3]["train/flops_per_sec"] == pytest.approx(14.0)


def test_a_rank_other_than_zero_measures_nothing(monkeypatch):
    assert _monitored(monkeypatch, world=2, rank=1) == [None] * 4


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size_fn": lambda: 4}, r"^ThroughputMonitor: batch_size_fn must take \(batch\); .*<lambda>\(\) cannot"),
    ({"batch_size_fn": len, "length_fn": lambda b, n: 1}, r"^ThroughputMonitor: length_fn must take \(batch\); .*missing"),
], ids=["batch_size_fn", "length_fn"])
def test_a_counting_function_that_cannot_take_the_batch_is_refused_when_the_monitor_is_built(kwargs, match):
    with pytest.raises(TypeError, match=match):
        ThroughputMonitor(**kwargs)
    ThroughputMonitor(len, lambda batch, *rest: 1)  # (one that can: a builtin, *args)
