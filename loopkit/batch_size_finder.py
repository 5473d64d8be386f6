"""``loopkit.scale_batch_size``: the largest batch size that trains without running out of memory,
as Lightning's ``Tuner(trainer).scale_batch_size(model)`` searches for it.

Each trial trains a copy of the state for a few updates on ``make_data(batch_size)``; a trial that
runs out of memory (CUDA's, or the CPU allocator's) makes the next trial smaller. The given state
is left exactly as it was.

>>> import torch, loopkit
>>> model = torch.nn.Linear(2, 1)
>>> state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
>>> def loss_fn(m, b):  # a device with room for 40 samples
...     if len(b) > 40:
...         raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
...     return m(b).pow(2).mean()
>>> data = lambda size: [torch.ones(size, 2)] * 4
>>> loopkit.scale_batch_size(loopkit.train_step(loss_fn), state, data)  # 2, 4, ..., 32 fit; 64 does not
32
>>> loopkit.scale_batch_size(loopkit.train_step(loss_fn), state, data, mode="binsearch", margin=0.0)
40
"""

from __future__ import annotations

import gc
import math
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from loopkit._calls import check_call
from loopkit._epoch_data import factory_name, is_factory
from loopkit._numbers import as_int, as_real
from loopkit._search import search_step
from loopkit.driver import _check_data, _check_device, _num_batches, run_epochs
from loopkit.rng import global_rngs_kept
from loopkit.state import TrainState, leave_intact, model_device

__all__ = ["scale_batch_size"]

_MODES = ("power", "binsearch")
# what Lightning turns off during the search (its loggers and callbacks): transforms that write files of the trials
_REFUSED = ("with_checkpointing", "with_logging")


def is_oom_error(error: BaseException) -> bool:
    """Whether ``error`` is running out of memory: torch's ``OutOfMemoryError``, or one of the messages
    Lightning's ``is_oom_error`` knows (CUDA's, cuDNN's ``CUDNN_STATUS_NOT_SUPPORTED``, the CPU allocator's).

    >>> is_oom_error(torch.OutOfMemoryError("CUDA out of memory.")), is_oom_error(RuntimeError("shape mismatch"))
    (True, False)
    """
    if isinstance(error, torch.OutOfMemoryError):
        return True
    if not isinstance(error, RuntimeError) or len(error.args) != 1 or not isinstance(error.args[0], str):
        return False
    message = error.args[0]
    return (
        ("CUDA" in message and "out of memory" in message)
        or "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED." in message
        or "DefaultCPUAllocator: can't allocate memory" in message
    )


def _free_memory() -> None:
    """Lightning's ``garbage_collection_cuda``: what a failed trial held goes back to the allocator."""
    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except RuntimeError as error:  # (it can run out of memory itself)
            if not is_oom_error(error):
                raise


def _let_go(error: BaseException, outer: BaseException | None) -> BaseException:
    """``error`` (and the errors it was raised from, up to ``outer``, the one being handled when the trial began)
    without what the failed trial held: the locals of its traceback's frames (activations, the trial's copy of the
    state; the printed traceback keeps its lines) and the state a loopkit error carries (:func:`state_at_error`'s).
    Lightning lets go of the whole exception before freeing memory; loopkit keeps it as the cause of a batch of 1
    that runs out of memory.

    >>> def trial():
    ...     activations = torch.ones(3)
    ...     raise torch.OutOfMemoryError("CUDA out of memory.")
    >>> try:
    ...     trial()
    ... except torch.OutOfMemoryError as e:
    ...     error = _let_go(e, None)
    >>> error.__traceback__.tb_next.tb_frame.f_locals
    {}
    """
    seen, current = set(), error
    while current is not None and current is not outer and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)  # (a frame still running, the trial's caller's, stays)
        leave_intact(current, None)
        current = current.__cause__ or current.__context__
    return error


def _samples(data: Iterable) -> int | None:
    """The number of samples of a DataLoader's sized dataset (Lightning's ``_dataset_length``), else None."""
    dataset = getattr(data, "dataset", None)
    if isinstance(data, torch.utils.data.DataLoader) and dataset is not None:
        try:
            return len(dataset)
        except TypeError:  # an IterableDataset without len()
            return None
    return None


class _Search:
    """The trials of one search: the state they copy, the data they make, Lightning's size adjustments."""

    def __init__(self, step: Any, state: TrainState, make_data: Callable[[int], Iterable], steps_per_trial: int,
                 max_val: int, device: Any) -> None:
        self.step, self.state, self.make_data = step, state, make_data
        self.steps_per_trial, self.max_val, self.device = steps_per_trial, max_val, device
        self.size = 0
        self.data: Iterable | None = None
        self.tried: list[tuple[int, bool]] = []  # (batch size, fitted)
        self.error: BaseException | None = None  # the last trial's running out of memory
        where = torch.device(device) if device is not None else model_device(state.model)
        self.on_cuda = where.type == "cuda"

    def set(self, size: int) -> None:
        self.size = size
        self.data = self.make_data(size)
        if is_factory(self.data):
            raise TypeError(
                f"scale_batch_size: make_data({size}) returned a function ({factory_name(self.data)}), a factory of "
                "the epoch's data as run_epochs takes? A trial trains steps_per_trial updates on one epoch's data at "
                "the size, and the search caps the size at that data set's length: return the data itself, e.g. "
                "lambda size: DataLoader(curriculum(0), batch_size=size)"
            )
        _check_data(self.data, f"scale_batch_size: make_data({size})")
        if _num_batches(self.data, None, "make_data") == 0:
            raise ValueError(f"scale_batch_size: make_data({size}) is empty (len() is 0): there is no batch to try")

    def adjust(self, *, factor: float = 1.0, value: int | None = None) -> bool:
        """Lightning's ``_adjust_batch_size``: the new size (``value``, or the size times ``factor``), capped at
        ``max_val``, but a size at or above the data set's length does not grow. Whether it changed. (Lightning
        keeps such a size from shrinking too, after it ran out of memory: its power mode then answers that size,
        and its binsearch tries it again without end.)"""
        new = value if value is not None else int(self.size * factor)
        samples = _samples(self.data) if self.data is not None else None
        if samples is not None and self.size >= samples and new >= self.size:
            return False
        new = min(new, self.max_val)
        changed = new != self.size
        self.set(new)
        return changed

    def fits(self) -> bool:
        """One trial: ``steps_per_trial`` updates of a copy of the state at this size; False when it ran out of memory
        (any other error is raised)."""
        if self.on_cuda:  # (what the last trial held goes back first; on the CPU only after running out)
            _free_memory()
        outer = sys.exc_info()[1]
        try:
            with global_rngs_kept(), warnings.catch_warnings():
                # (each size makes another number of batches: a state saved mid-epoch is not resumed here, only probed)
                warnings.filterwarnings("ignore", message=r"run_epochs: the state was saved in epoch \d+ of")
                run_epochs(self.step, self.state, self.data, max_steps=self.state.step + self.steps_per_trial,
                           sanity_val_batches=0, progress=False, device=self.device, donate=False)
        except RuntimeError as error:
            if not is_oom_error(error):
                raise
            self.error = _let_go(error, outer)  # (else its frames would hold the trial's memory through the next)
            self.tried.append((self.size, False))
            _free_memory()
            return False
        self.tried.append((self.size, True))
        return True


def _power(search: _Search, max_trials: int) -> int:
    """Lightning's ``_run_power_scaling``: double until a trial runs out of memory, then take the half of that."""
    any_success = False
    for i in range(max_trials):
        if search.size >= search.max_val:
            break
        if search.fits():
            last = search.size
            if i + 1 >= max_trials:
                return last
            if not search.adjust(factor=2.0):
                break
            any_success = True
        else:
            if search.size == 1:
                raise RuntimeError("scale_batch_size: even a batch of 1 runs out of memory (its error is above): a "
                                   "smaller model, or mixed precision, or another device") from search.error
            search.adjust(factor=0.5)
            if any_success:
                break
    return search.size


def _binsearch(search: _Search, max_trials: int, margin: float) -> int:
    """Lightning's ``_run_binsearch_scaling``: double until a trial runs out of memory, then bisect between the
    last size that fitted and the one that did not; then ``margin`` off."""
    low, high, count = 1, None, 0
    while True:
        if search.size >= search.max_val:
            break
        if search.fits():
            last = search.size
            count += 1
            if count >= max_trials:
                search.set(last)
                break
            low = search.size
            if high:
                if high - low <= 1:
                    break
                changed = search.adjust(value=(high + low) // 2)
            else:
                changed = search.adjust(factor=2.0)
            if not changed:
                break
        else:
            high = search.size
            search.adjust(value=(high + low) // 2)
            if high - low <= 1:
                break
    size = search.size
    if margin > 0:
        size = max(1, int(size * (1 - margin)))
    return size


def scale_batch_size(
    step: Callable[[TrainState, Any], tuple[TrainState, Any]],
    state: TrainState,
    make_data: Callable[[int], Iterable],
    *,
    mode: str = "power",
    steps_per_trial: int = 3,
    init_val: int = 2,
    max_trials: int = 25,
    margin: float = 0.05,
    max_val: int = 8192,
    device: torch.device | str | None = None,
) -> int:
    """The largest batch size (of those tried) with which ``step`` trains ``state`` without running out of
    memory: Lightning's ``Tuner(trainer).scale_batch_size(model, mode, steps_per_trial, init_val, max_trials,
    margin, max_val)``.

    ``make_data(batch_size)`` gives the training data at that batch size (e.g.
    ``lambda size: DataLoader(train_set, batch_size=size, shuffle=True)``; Lightning sets the model's
    ``batch_size`` and rebuilds its dataloaders). Each trial trains a copy of ``state`` for
    ``steps_per_trial`` updates with :func:`loopkit.run_epochs` (no sanity validation, no progress
    bar; torch's CPU, numpy's and Python's global RNGs are put back); a trial that runs out of memory
    (:func:`is_oom_error`: torch's ``OutOfMemoryError``, or the CUDA, cuDNN and CPU-allocator messages
    Lightning knows) counts as too large (what it held, its error's frames too, is freed before the next
    trial, as in Lightning), any other error is raised. ``state`` is left as it was.

    As Lightning's search, from ``init_val``:

    - ``"power"``: double the size after each trial that fits, until one does not; the answer is half
      that size (the last that fitted). A first trial that does not fit halves the size and tries again.
    - ``"binsearch"``: double as in ``"power"``; after a trial that does not fit, bisect between the last
      size that fitted and that one; the answer is then reduced by ``margin`` (5% by default).
    - No size above ``max_val`` is made: a doubling that would pass it is capped there, and then taken as
      it is, untried, as Lightning's ``"binsearch"`` does (its ``"power"`` returns the doubled size, above
      ``max_val``; and Lightning caps its own steps at 8192 whatever ``max_val``, loopkit at ``max_val``).
      An ``init_val`` above ``max_val`` starts at ``max_val`` (Lightning answers ``init_val`` untried).
      A size that reaches the length of a DataLoader's data set is not doubled again; if it fits it is
      the answer, as in Lightning; if it runs out of memory the search goes down from it (Lightning's
      power mode answers that size, and its binsearch tries it again without end). ``max_trials`` bounds
      the trials. A batch of 1 that runs out of memory is a ``RuntimeError``.
    - Each trial trains a copy of the state while the given one stays where it is: on a GPU keep
      ``state`` on the CPU and pass ``device="cuda"``, so that only the trial's copy is on the GPU, as a
      fit's one model is (Lightning trains the model itself and restores it from a checkpoint).

    Lightning sets the result on the model (``batch_size``); here, build the loader with it:
    ``make_data(scale_batch_size(...))``. Lightning runs the trials under its own trainer with the user's
    callbacks and loggers off: a step with ``with_logging`` or ``with_checkpointing`` is refused.

    >>> import torch, loopkit
    >>> model = torch.nn.Linear(2, 1)
    >>> state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> loader = lambda size: torch.utils.data.DataLoader(torch.ones(100, 2), batch_size=size)
    >>> scale_batch_size(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), state, loader)  # no limit met: the data's
    128
    """
    if mode not in _MODES:
        raise ValueError(f"scale_batch_size: mode must be 'power' or 'binsearch', got {mode!r}")
    counts = {}
    for name, value, least in (("steps_per_trial", steps_per_trial, 1), ("init_val", init_val, 1),
                               ("max_trials", max_trials, 1), ("max_val", max_val, 1)):
        count = as_int(value)
        if count is None or count < least:
            raise ValueError(f"scale_batch_size: {name} must be a positive int, got {value!r}")
        counts[name] = count
    fraction = as_real(margin)
    if fraction is None or not (0.0 <= fraction < 1.0) or math.isnan(fraction):
        raise ValueError(f"scale_batch_size: margin must be a number in [0, 1), got {margin!r}")
    step = search_step(step, state, "scale_batch_size", _REFUSED, "write the trials' logs or checkpoints")
    device = _check_device(device, "scale_batch_size")
    if not callable(make_data):
        raise TypeError(f"scale_batch_size: make_data must be a function of the batch size that returns the "
                        f"training data (e.g. lambda size: DataLoader(train_set, batch_size=size)), got "
                        f"{type(make_data).__qualname__}")
    check_call(make_data, "scale_batch_size: make_data must take (batch_size)", 1,
               hint="; it is called with each batch size tried, e.g. lambda size: DataLoader(train_set, batch_size=size)")
    search = _Search(step, state, make_data, counts["steps_per_trial"], counts["max_val"], device)
    search.set(min(counts["init_val"], counts["max_val"]))
    if mode == "power":
        size = _power(search, counts["max_trials"])
    else:
        size = _binsearch(search, counts["max_trials"], float(fraction))
    if search.on_cuda:
        _free_memory()
    return size
