"""Training throughput: Lightning's ``ThroughputMonitor`` callback and ``measure_flops``.

``run_epochs(..., callbacks=[ThroughputMonitor(batch_size_fn=lambda b: len(b[0]))])`` hands
``with_logging``'s loggers, at its ``every_n_steps``, the same values under the same names as
Lightning 2.6's ``ThroughputMonitor``: ``train/time``, ``train/batches``, ``train/samples`` (totals
since training started) and, once ``window_size`` batches are seen, the rolling rates
``train/device/batches_per_sec`` and ``train/device/samples_per_sec`` (with ``length_fn``,
``train/lengths`` and ``train/device/items_per_sec``; with ``flops_per_batch``,
``train/device/flops_per_sec`` and, given ``available_flops``, ``train/device/mfu``; over several
ranks also the global rates ``train/batches_per_sec`` ...).

>>> import torch
>>> from loopkit import TrainState, run_epochs, train_step
>>> model = torch.nn.Linear(2, 1)
>>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
>>> data = [(torch.ones(4, 2), torch.zeros(4, 1))] * 3
>>> step = train_step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
>>> monitor = ThroughputMonitor(batch_size_fn=lambda batch: len(batch[0]), window_size=2)
>>> _ = run_epochs(step, state, data, epochs=1, callbacks=[monitor], progress=False)
>>> monitor.latest["train/samples"], "train/device/samples_per_sec" in monitor.latest
(12, True)
"""

from __future__ import annotations

import collections
import numbers
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from loopkit import _collective
from loopkit._calls import check_call
from loopkit.callbacks import Callback

__all__ = ["ThroughputMonitor", "measure_flops"]


def measure_flops(
    model: torch.nn.Module,
    forward_fn: Callable[[], torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """The FLOPs of ``forward_fn()`` (and, given ``loss_fn``, of its loss and backward), counted by torch's
    ``FlopCounterMode``, as Lightning's ``measure_flops``. Build the model on the ``meta`` device to count
    without computing; ``model`` is the module the count is for (kept for Lightning's signature). The backward
    leaves ``model``'s gradients as it found them (each parameter's ``.grad`` given back, the same tensor with the
    same values, or None): measured on a state's model, its next update takes none of the measurement's.

    >>> import torch
    >>> with torch.device("meta"):
    ...     model = torch.nn.Linear(8, 4)
    ...     x = torch.randn(2, 8)
    >>> measure_flops(model, lambda: model(x))
    128
    >>> measure_flops(model, lambda: model(x), loss_fn=torch.Tensor.sum)  # forward and backward
    256
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    if loss_fn is None:
        with counter:
            forward_fn()
        return int(counter.get_total_flops())
    # the backward's gradients are the measurement's: each parameter's own .grad is set aside (not accumulated
    # into in place) and given back, whatever the backward raised
    found = [(p, p.grad) for p in model.parameters()]
    try:
        for p, _ in found:
            p.grad = None
        with counter:
            loss_fn(forward_fn()).backward()
    finally:
        for p, grad in found:
            p.grad = grad
    return int(counter.get_total_flops())


def _count(value: Any, what: str) -> int:
    """``value``, a non-negative whole number (a tensor's is read: ``batch_size_fn`` should not return one)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise TypeError(f"ThroughputMonitor: {what} must return a whole number >= 0, got {value!r}")
    return int(value)


class ThroughputMonitor(Callback):
    """Lightning's ``ThroughputMonitor`` for ``run_epochs``: samples, batches and FLOPs per second of training.

    ``batch_size_fn(batch)`` gives a batch's number of samples, ``length_fn(batch)`` (optional) its number of
    items (tokens); ``flops_per_batch`` (Lightning reads the module's attribute of that name: see
    :func:`measure_flops`) the FLOPs of one batch's training on one device; ``available_flops`` one device's
    peak FLOPs, for ``mfu`` (Lightning looks it up from the GPU's name; here it is given). The rates are
    rolling means over the latest ``window_size`` batches, as Lightning's ``Throughput``; names join parts with
    ``separator``.

    As Lightning's: the clock starts at training's start (after the sanity validation) and each validation's
    time is taken out of it; every batch is counted (micro-batches of ``with_grad_accum`` too) and the values
    go to the loggers after an update, at ``with_logging``'s ``every_n_steps``; only rank 0 measures; on a
    CUDA device each batch's end waits for the device (``torch.cuda.synchronize``), without which the clock
    would time the launches and not the work: a per-batch sync, which only this callback makes (the
    progress bar reads its metrics every 20th batch; float16 ``with_amp`` and ``with_nan_guard`` read a flag per
    update). ``latest`` holds the values last computed. Validation, test and predict throughput (Lightning's
    ``validate/...`` keys) are not measured: the driver has no per-batch validation hook.

    >>> monitor = ThroughputMonitor(lambda batch: len(batch[0]), window_size=50)
    >>> monitor.compute()  # (nothing measured yet)
    {}
    """

    reads_only = True
    #: it measures and never asks to stop: under DDP a batch makes no vote on ``should_stop`` for it
    never_stops = True

    def __init__(
        self,
        batch_size_fn: Callable[[Any], int],
        length_fn: Callable[[Any], int] | None = None,
        *,
        flops_per_batch: int | float | None = None,
        available_flops: int | float | None = None,
        window_size: int = 100,
        separator: str = "/",
    ) -> None:
        if not callable(batch_size_fn):
            raise TypeError(f"ThroughputMonitor: batch_size_fn must be callable, got {type(batch_size_fn).__qualname__}")
        if length_fn is not None and not callable(length_fn):
            raise TypeError(f"ThroughputMonitor: length_fn must be callable or None, got {type(length_fn).__qualname__}")
        check_call(batch_size_fn, "ThroughputMonitor: batch_size_fn must take (batch)", None)
        if length_fn is not None:
            check_call(length_fn, "ThroughputMonitor: length_fn must take (batch)", None)
        if isinstance(window_size, bool) or not isinstance(window_size, numbers.Integral) or window_size < 2:
            raise ValueError(f"ThroughputMonitor: window_size must be an int >= 2 (rates need two points), got {window_size!r}")
        for name, value in (("flops_per_batch", flops_per_batch), ("available_flops", available_flops)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0):
                raise ValueError(f"ThroughputMonitor: {name} must be a number > 0 or None, got {value!r}")
        self.batch_size_fn, self.length_fn = batch_size_fn, length_fn
        self.flops_per_batch, self.available_flops = flops_per_batch, available_flops
        self.window_size, self.separator = int(window_size), separator
        self.latest: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        self._t0: float | None = None  # training's start, moved on by each validation's time
        self._last: float | None = None  # the latest batch's end
        self._batches = self._samples = self._lengths = 0
        self._pending = (0, 0)  # the running batch's samples and items, counted at its start
        size = self.window_size
        self._window: dict[str, collections.deque] = {
            key: collections.deque(maxlen=size) for key in ("time", "batches", "samples", "lengths", "flops")
        }
        self._step_seen: int | None = None
        self._device: torch.device | None = None
        self._measures = True
        self._world = 1

    def on_fit_start(self, state: Any) -> None:
        """Start afresh (Lightning's ``on_train_start`` resets its counters for each fit)."""
        self._reset()
        self.latest = {}
        self._measures = _collective.is_rank_zero()
        self._world = _collective.rank_and_size()[1]
        self._step_seen = getattr(state, "step", None)
        model = getattr(state, "model", None)
        first = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        self._device = None if first is None else first.device

    def on_epoch_start(self, state: Any) -> None:
        """Start the clock at training's first epoch (after the sanity validation)."""
        if self._t0 is None:  # training starts (the sanity validation is over)
            self._t0 = self._last = time.perf_counter()

    def on_batch_start(self, state: Any, batch: Any) -> None:
        """Count the batch's samples (and items) with ``batch_size_fn`` (and ``length_fn``)."""
        if not self._measures:
            return
        samples = _count(self.batch_size_fn(batch), "batch_size_fn")
        items = 0 if self.length_fn is None else _count(self.length_fn(batch), "length_fn")
        self._pending = (samples, items)

    def _now(self) -> float:
        """The clock once the device's work is done (a CUDA device is waited for); the latest batch's end now."""
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        self._last = time.perf_counter()
        return self._last

    def on_batch_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> dict[str, float] | None:
        """Count the batch; after an update, the values for the loggers."""
        if not self._measures:
            return None
        now = self._now()
        if self._t0 is None:
            self._t0 = now
        samples, items = self._pending
        self._pending = (0, 0)
        self._batches += 1
        self._samples += samples
        self._lengths += items
        window = self._window
        window["time"].append(now - self._t0)
        window["batches"].append(self._batches)
        window["samples"].append(self._samples)
        if self.length_fn is not None:
            window["lengths"].append(self._lengths)
        if self.flops_per_batch is not None:
            window["flops"].append(self.flops_per_batch * self._world)
        if state.step == self._step_seen:  # a micro-batch of with_grad_accum: no update, nothing logged
            return None
        self._step_seen = state.step
        self.latest = self.compute()
        return dict(self.latest)

    def on_flush_end(self, state: Any, metrics: Mapping[str, torch.Tensor]) -> dict[str, float] | None:
        """After the update of an epoch's partial accumulation group (its batches already counted), the values
        for the loggers, as Lightning gives them after the epoch's last batch, whose update that is there: the
        update's time is the last batch's, as there."""
        if not self._measures or state.step == self._step_seen:
            return None
        times = self._window["time"]
        if self._t0 is not None and times:
            times[-1] = self._now() - self._t0
        self._step_seen = state.step
        self.latest = self.compute()
        return dict(self.latest)

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> None:
        """Take the validation's time out of training's clock, as Lightning does."""
        if self._t0 is not None and self._last is not None:
            now = time.perf_counter()
            self._t0 += now - self._last
            self._last = now

    def compute(self) -> dict[str, float]:
        """The values now: Lightning's ``Throughput.compute`` with the ``train`` prefix."""
        sep, window = self.separator, self._window
        times = window["time"]
        if not times:
            return {}
        world = self._world
        values: dict[str, float] = {"time": times[-1], "batches": self._batches, "samples": self._samples}
        if self.length_fn is not None:
            values["lengths"] = self._lengths
        if len(times) == times.maxlen:
            elapsed = times[-1] - times[0]
            if elapsed > 0:
                batches_per_sec = (window["batches"][-1] - window["batches"][0]) / elapsed
                samples_per_sec = (window["samples"][-1] - window["samples"][0]) / elapsed
                values[f"device{sep}batches_per_sec"] = batches_per_sec
                values[f"device{sep}samples_per_sec"] = samples_per_sec
                if world > 1:
                    values["batches_per_sec"] = batches_per_sec * world
                    values["samples_per_sec"] = samples_per_sec * world
                lengths = window["lengths"]
                if len(lengths) == lengths.maxlen:
                    items_per_sec = (lengths[-1] - lengths[0]) / elapsed
                    values[f"device{sep}items_per_sec"] = items_per_sec
                    if world > 1:
                        values["items_per_sec"] = items_per_sec * world
        flops = window["flops"]
        if len(flops) == flops.maxlen and len(times) == times.maxlen and times[-1] > times[0]:
            flops_per_sec = (sum(flops) - flops[0]) / (times[-1] - times[0])
            if world > 1:
                values["flops_per_sec"] = flops_per_sec
            values[f"device{sep}flops_per_sec"] = flops_per_sec / world
            if self.available_flops:
                values[f"device{sep}mfu"] = flops_per_sec / world / self.available_flops
        return {f"train{sep}{key}": value for key, value in values.items()}
