"""The driver: ``run_epochs`` runs a step over data; ``evaluate`` and ``predict`` run a model over data.

>>> import torch
>>> from loopkit.state import TrainState
>>> from loopkit.steps import train_step
>>> model = torch.nn.Linear(2, 1)
>>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
>>> data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(3)]
>>> step = train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
>>> state, history = run_epochs(step, state, data, epochs=2, progress=False)
>>> state.step, state.epoch, len(history)
(6, 2, 2)
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import itertools
import math
import numbers
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

import numpy as np
import torch

from loopkit import _collective
from loopkit._agreement import frozen_summary
from loopkit._calls import check_call, takes
from loopkit._epoch_data import TRAIN, call_seeded, check_factory, factory_name, is_factory, not_data, val_stream
from loopkit._numbers import as_int, as_real
from loopkit._sharded import fsdp_modules
from loopkit._window import EPOCH, OVER_RANKS, Window, guarded, left_metrics, own_buffers, own_rng, own_share
from loopkit.callbacks import (
    Callback, Timer, _batch_end_unused, _from_lightning, _loopkit_hook, _never_stops, may_change_state_early,
)
from loopkit.checkpoint import capture_global_rng, install_global_rng
from loopkit.progress import ProgressBar, progress_wanted, write_line
from loopkit.rng import epoch_order_seed as _order_seed
from loopkit.rng import seed_epoch_start
from loopkit.rng import RNGScope, RankWorkerSeeds, batch_rngs, cuda_index, global_rng_state, global_rngs_kept
from loopkit.state import (
    FAILED_FIT, TrainState, core_module, extras_copy, fork, leave_intact, mark_used_up_by_error, model_device,
    not_a_state, put_extras, refuse_copy_if_sharded, replace, replace_extras, state_at_error,
)
from loopkit.steps import (
    HOOKS_OWED, RECORDED, SAVE_DUE, VALIDATED, VALIDATES, VALIDATES_AT_EPOCH_ENDS, EpochRecord, FnStep, ModelFn, Step,
    TrainStep, WrapperStep, accumulated, as_step, check_takes_model_and_batch, evaluating, grads_as_found,
    in_accumulation_group, innermost, owed_hooks, undonated,
)
from loopkit.steps import donate as donated
from loopkit.tree import device_available, devices_here, tensors, to_device, to_plain

__all__ = ["evaluate", "predict", "run_epochs"]

Metrics = Mapping[str, torch.Tensor]
_CALLBACKS = "callbacks/"  # the extras keys of the callbacks' counters
# extras: the means of the running epoch's latest validation (a resumed run's record of the epoch holds them)
_EPOCH_VAL = "run_epochs/epoch_val"
#: the number of batches of the epoch under way (a resumed run with other data is told so)
_BATCHES = "run_epochs/epoch_batches"
# extras: the update at which an epoch that stopped short (max_steps, a callback) was recorded; a state saved at
# max_steps before that record (a crash, a stop during the last update) is recorded by the resumed run


def _check_limit(value: int | float | None, name: str) -> int | float | None:
    """``value`` as a Python int (batches) or float (a fraction), numpy's numbers included; 0.0 is 0 (off)."""
    if value is None:
        return None
    limit = as_real(value)
    if limit is None:
        raise TypeError(f"{name} must be an int (batches) or a float fraction in (0, 1], got {value!r}")
    if isinstance(limit, float) and limit == 0.0:
        return 0  # (off, as the int 0: Lightning takes 0.0 so too)
    if isinstance(limit, float) and not 0.0 < limit <= 1.0:
        raise ValueError(f"{name}={value}: a fraction must be in (0, 1] (0 turns it off); pass an int for a number "
                         "of batches")
    if isinstance(limit, int) and limit < 0:
        raise ValueError(f"{name}={value}: a number of batches must be >= 0")
    return limit


def _num_batches(
    data: Iterable, limit: int | float | None, name: str, *, shard: bool = False, of: str | None = None
) -> int | None:
    """How many batches to take from ``data`` (None: all of an iterable of unknown length).

    ``of``: the name of the validation set ``data`` is, where there are several (named in the error of a
    fraction that leaves it 0 batches).

    ``shard``: ``data`` is this rank's shard of a set evaluated over all ranks (a validation set): under a
    process group of more than one rank an empty shard is 0 batches whatever the fraction (the other ranks'
    shards hold the samples, ``shard(val_set, pad=False)`` of a set smaller than the world size)."""
    try:
        total: int | None = len(data)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):  # (an IterableDataset's loader; a __len__ left unimplemented)
        total = None
    if shard and total == 0 and _collective.active():
        return 0
    if limit is None or (isinstance(limit, float) and limit == 1.0):  # (all of it: no len() needed, as in Lightning)
        return total
    if isinstance(limit, int):
        return limit if total is None else min(limit, total)
    if total is None:
        raise ValueError(f"{name}={limit} is a fraction, but the data has no len(); pass an int")
    count = int(total * limit)
    if count == 0:
        where = "" if of is None else f" of the validation set {of!r}"
        raise ValueError(f"{name}={limit} of {total} batches{where} is 0 batches; raise it or pass an int")
    return count


def _with_counters(hooks: _Hooks, state: TrainState) -> TrainState:
    """``state`` holding the callbacks' counters as they are now (as it is, if one cannot give them)."""
    try:
        return hooks.keep(state)
    except Exception:  # the error being raised is the one to report
        return state


def _warn_of_a_state_past_the_end(state: TrainState, epochs: int | None, max_steps: int | None) -> None:
    """A state beyond ``epochs``/``max_steps`` (a resume from a longer run's checkpoint) trains nothing: say so.
    A state exactly at the end (a finished run started again) is not warned of: it has nothing left to do."""
    past_epochs = epochs is not None and (state.epoch > epochs or (state.epoch == epochs and state.batch_index > 0))
    past_steps = max_steps is not None and state.step > max_steps
    if past_epochs or past_steps:
        warnings.warn(
            f"run_epochs: the state is already past the end asked for (epoch {state.epoch}, batch "
            f"{state.batch_index}, step {state.step}; epochs={epochs}, max_steps={max_steps}): nothing is "
            "trained and the history is empty (epochs and max_steps count from the run's start, not from the "
            "restored state)",
            RuntimeWarning,
            stacklevel=3,
        )


def _log_interval(step: Any) -> int | None:
    """The ``every_n_steps`` of the step's ``with_logging``, looked for through the whole-step wrappers (None
    without one)."""
    while step is not None:
        if getattr(step, "name", None) == "with_logging":
            return as_int(getattr(step, "every_n_steps", None))
        step = getattr(step, "inner", None)
    return None


def _tell_log_interval(callbacks: Iterable[Any], step: Any) -> None:
    """Tell each callback with ``set_log_interval`` (``LearningRateMonitor``) the ``every_n_steps`` of the step's
    ``with_logging`` (None without one), before its ``on_fit_start``: it reads what it logs at those updates only."""
    interval = _log_interval(step)
    for callback in callbacks:
        tell = getattr(callback, "set_log_interval", None)
        if callable(tell):
            tell(interval)


def _accumulation_at(step: Any, epoch: int) -> int:
    """The step's ``with_grad_accum`` factor in ``epoch`` (1 without one), looked for through the whole-step
    wrappers."""
    while step is not None:
        every_at = getattr(step, "every_at", None)
        if callable(every_at):
            return max(as_int(every_at(epoch)) or 1, 1)
        step = getattr(step, "inner", None)
    return 1


def _bar_total(total: int | None, state: TrainState, max_steps: int | None, step: Any,
               epochs: int | None = None) -> int | None:
    """The total of the bar of an epoch of ``total`` batches that starts from ``state``: fewer where ``max_steps``
    ends the fit inside it, the batches its remaining updates take (``with_grad_accum``'s factor each, less the
    micro-batches of a group under way), so that the fit's last bar ends full; as Lightning's bar, which does so
    only without ``max_epochs``, and counts an update as a batch. Data of no length (``total`` None) gets the
    batches ``max_steps`` leaves when no ``epochs`` is set, as Lightning's ``min(inf, max_steps)``; none otherwise.

    >>> import torch
    >>> state = TrainState.create(torch.nn.Linear(1, 1))
    >>> _bar_total(10, state, 7, None), _bar_total(10, state, 13, None), _bar_total(10, state, None, None)
    (7, 10, 10)
    >>> _bar_total(None, state, 7, None), _bar_total(None, state, 7, None, epochs=2)
    (7, None)
    """
    if max_steps is None or (total is None and epochs is not None):
        return total
    needed = (max_steps - state.step) * _accumulation_at(step, state.epoch) - accumulated(state)
    left = state.batch_index + max(needed, 0)
    return left if total is None else min(total, left)


def _warn_of_a_long_log_interval(step: Any, total: int | None, epoch: int) -> None:
    """Warn, as Lightning does of its ``log_every_n_steps``, when an epoch of ``total`` batches makes fewer
    updates than ``with_logging``'s ``every_n_steps``: no ``train/*`` row comes within an epoch (none at all in a
    fit of fewer updates). Updates, not batches, since the log points count updates: under ``with_grad_accum(every=k)``
    an epoch makes ``ceil(total / k)`` of them (Lightning compares the batches, and stays silent there). Nothing
    without a ``with_logging``, a known length, or on a rank other than 0."""
    interval = _log_interval(step)
    if interval is None or not total or not _collective.is_rank_zero():
        return
    every = _accumulation_at(step, epoch)
    updates = -(-total // every)
    if updates >= interval:
        return
    made = f"{total} training batches"
    if every > 1:
        made += f", {updates} updates under with_grad_accum(every={every})"
    warnings.warn(
        f"run_epochs: an epoch has {made}, fewer than the logging interval with_logging(every_n_steps={interval}): "
        f"a train/* row is logged every {interval} updates, across epochs, so none within an epoch (and none in a "
        "fit of fewer updates). Set a lower every_n_steps if you want to see logs for the training epoch",
        UserWarning,
        stacklevel=3,
    )


def _warn_of_eval_mode(model: torch.nn.Module) -> None:
    """Warn, as Lightning does, when modules start training in eval mode (dropout off, BatchNorm frozen)."""
    frozen = [name or "the model" for name, module in model.named_modules() if not module.training]
    if frozen:
        warnings.warn(
            f"run_epochs: {len(frozen)} module(s) of the model are in eval mode at the start of training "
            f"({', '.join(repr(n) for n in frozen[:3])}{', ...' if len(frozen) > 3 else ''}): they train that way "
            "(dropout off, BatchNorm statistics frozen); call model.train() first unless that is what you want",
            RuntimeWarning,
            stacklevel=3,
        )


def _rngs_after_first(data: Iterable) -> dict[str, Any] | None:
    """The global RNGs (torch's CPU one, numpy's, Python's) as the epoch's batches after its first are read under,
    for a resumed run to read the batches it skips under them (see :func:`_epoch_batches`): None where they are
    not read in this process (a DataLoader's workers) or under DDP (each rank's own; a checkpoint holds rank 0's)."""
    if isinstance(data, torch.utils.data.DataLoader) and data.num_workers > 0 or _collective.active():
        return None
    rngs = capture_global_rng()
    rngs.pop("cuda", None)  # (data read on the CPU; the caller's CUDA RNG is not put back after the skip)
    return rngs


#: the global RNGs an epoch's batches after the first are read under (:func:`_rngs_after_first`), while it runs
_EPOCH_RNGS = "run_epochs/epoch_rngs"

def _epoch_batches(
    data: Iterable, seed: int, epoch: int, skip: int, count: int | None, read_on: Mapping[str, Any] | None = None
) -> Iterator[Any] | None:
    """Iterate one epoch of ``data`` in an order fixed by ``(seed, epoch)``, skipping ``skip`` batches
    (None when ``data`` yields no batch at all).

    A ``DataLoader``'s shuffling draws from its own generator, its sampler's or, lacking
    one, from the global torch RNG when the iterator starts (a sampler of one's own may draw
    from numpy's or Python's): all are seeded here, and the caller's global RNGs are put back
    after the first batch, so the order is the same in a resumed run. The ``skip`` batches
    are read at once, and the global RNGs put back after them too; ``read_on`` (what
    :func:`_rngs_after_first` recorded when the epoch started) are the global RNGs they are read
    under, as the uninterrupted run read them: data that draws from them as it goes (an
    IterableDataset's shuffle buffer in this process) is where it was. An epoch with nothing left
    (a state saved after its last batch) is not read at all. Under a process group of several ranks a
    loader's workers mix the rank into their seeds (:func:`_workers_seeded_by_rank`); the order is untouched.
    """
    if count is not None and 0 < count <= skip:  # nothing to skip to: no batch read again, no worker started
        return iter(())
    order_seed = _order_seed(seed, epoch)
    batch_sampler = getattr(data, "batch_sampler", None)
    samplers = (getattr(data, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    for sampler in {id(s): s for s in samplers if hasattr(s, "set_epoch")}.values():  # (as Lightning sets them)
        sampler.set_epoch(epoch)
    named, kept = _data_generators(data)  # (a holder's own ``generator``: the epoch's order seed, as a DataLoader's;
    for generator in named:  # one kept under another name, or a dataset's: a seed of its own, so that two a sampler
        generator.manual_seed(order_seed)  # keeps, for its order and a subsample, draw other numbers)
    for k, generator in enumerate(kept, len(named)):
        generator.manual_seed(_order_seed(order_seed, k))
    cpu = torch.default_generator  # what samplers without a generator of their own draw from
    saved = cpu.get_state()
    # a resumed run reads the batches it skips without drawing from the global RNGs (torch's, numpy's,
    # Python's): a Dataset's augmentation in this process (num_workers=0) draws the next batch from the
    # RNGs the checkpoint holds, as the uninterrupted run did
    others = (np.random.get_state(), random.getstate())
    cpu.manual_seed(order_seed)
    seed_epoch_start(seed, epoch)
    try:
        if _reused_persistent_workers(data):  # a fresh iterator draws its workers' base seed before the sampler
            torch.empty((), dtype=torch.int64).random_(generator=data.generator)  # draws: a reused one does not
        with _workers_seeded_by_rank(data):
            iterator = iter(data)
        first = next(iterator, _END)
        if first is not _END and skip > 1:
            if read_on is not None:
                install_global_rng(read_on, "run_epochs: the epoch's global RNGs")
            next(itertools.islice(iterator, skip - 2, None), None)
    finally:
        cpu.set_state(saved)
        np.random.set_state(others[0])
        random.setstate(others[1])
    if first is _END:
        return None
    if skip:
        return iterator if count is None else itertools.islice(iterator, max(count - skip, 0))
    return itertools.islice(itertools.chain((first,), iterator), count)


_END = object()


@contextlib.contextmanager
def _workers_seeded_by_rank(data: Iterable) -> Iterator[None]:
    """While an epoch's iterator is made: under a process group of several ranks, the worker processes a
    ``DataLoader`` starts then get :class:`~loopkit.rng.RankWorkerSeeds` as their ``worker_init_fn`` (wrapping the
    loader's own), so that each rank's workers draw streams of their own (their base seed, drawn from the epoch's
    order seed, is the same on every rank); the loader's ``worker_init_fn`` is put back after. Nothing otherwise
    (one process, ``num_workers=0``, persistent workers already started): a one-process run's workers are seeded
    as torch seeds them.

    >>> loader = torch.utils.data.DataLoader(range(4), num_workers=2)
    >>> with _workers_seeded_by_rank(loader):
    ...     loader.worker_init_fn is None
    True
    """
    if not (isinstance(data, torch.utils.data.DataLoader) and data.num_workers > 0 and _collective.active()
            and not _reused_persistent_workers(data)):
        yield
        return
    own = data.worker_init_fn
    data.worker_init_fn = RankWorkerSeeds(_collective.rank_and_size()[0], own)
    try:
        yield
    finally:
        data.worker_init_fn = own


def _counted_by_len(data: Iterable) -> bool:
    """Whether ``data``'s epoch is counted by its ``len()`` (checked the same on every rank before it starts) rather
    than read to its end with a vote per batch (:func:`_while_every_rank_has_one`): data with a length, but under a
    process group of several ranks not an ``IterableDataset`` or a ``DataLoader`` over one, whose ``len()`` torch
    takes as an estimate (a rank's shard may yield fewer batches than it says). Its length still bounds the epoch
    and sizes the progress bar.

    >>> class Stream(torch.utils.data.IterableDataset):
    ...     def __len__(self): return 3
    ...     def __iter__(self): return iter(range(3))
    >>> _counted_by_len([1, 2]), _counted_by_len(torch.utils.data.DataLoader(Stream())), _counted_by_len(iter([1]))
    (True, True, False)
    """
    if _num_batches(data, None, "train_data") is None:
        return False
    streamed = isinstance(data, torch.utils.data.IterableDataset) or isinstance(
        getattr(data, "dataset", None), torch.utils.data.IterableDataset)
    return not (streamed and _collective.active())


def _one_step_per_batch(parallel: str | None) -> str:
    """Why every rank must train as many batches an epoch, naming the transform in use (``with_ddp``, ``with_fsdp``;
    None: a step of one's own under a process group).

    >>> _one_step_per_batch("with_fsdp")
    'with_fsdp needs one step per batch on every rank'
    >>> _one_step_per_batch(None)
    'data-parallel training needs one step per batch on every rank'
    """
    return f"{parallel or 'data-parallel training'} needs one step per batch on every rank"


def _train_data_dropped(epoch: int, parallel: str | None, count: int) -> str:
    """The warning of a rank whose ``train_data`` has more batches after ``count`` of epoch ``epoch``, where another
    rank's ended (:func:`_while_every_rank_has_one`); ``parallel`` as :func:`_one_step_per_batch` takes it.

    >>> _train_data_dropped(1, "with_ddp", 2)[:68]
    "run_epochs: epoch 1: another rank's train_data ended after 2 batches"
    """
    return (f"run_epochs: epoch {epoch}: another rank's train_data ended after {count} batches, this rank's has more; "
            f"the epoch ends here on every rank ({_one_step_per_batch(parallel)}), and this rank's further batches "
            "are not trained on: shard the data evenly")


def _while_every_rank_has_one(
    batches: Iterator[Any], done: int, dropped: Callable[[int], str], who: str = "run_epochs"
) -> Iterator[Any]:
    """``batches`` (data not counted by its length, under a process group: :func:`_counted_by_len`) while every rank
    has one: before each, the ranks agree (a collective) that none has run out, and the reading ends on all of them
    when one has, the others' further batches dropped with a warning, ``dropped(count)`` (``count``: the batches read
    before, ``done`` of them before this call, a resumed epoch's). Without it a rank whose data ended would go on to
    the end while the others wait in a collective of their next batch (until the process group's timeout, 30
    minutes by default): under DDP a training step's all-reduce, under ``with_fsdp`` any forward's all-gather, an
    evaluation's too (:func:`_read_together_under_fsdp`). ``who``: what a failed vote names."""
    for count, batch in enumerate(itertools.chain(batches, (_END,)), start=done):
        if _collective.any_rank(batch is _END, who=who):
            if batch is not _END:
                warnings.warn(dropped(count), RuntimeWarning, stacklevel=2)
            return
        yield batch


def _stream_ended(batches: Iterator[Any]) -> bool:
    """Whether an epoch of unknown length (an IterableDataset's loader) has no batch left after the one just
    trained: one more is read and dropped, as Lightning's data fetcher looks one batch ahead to know its
    ``is_last_batch``, with the global RNGs put back after it (a Dataset's augmentation in this process draws the
    next batch from them: the resumed run reads it as the uninterrupted one). Only where the epoch stops
    (``max_steps``, a callback's stop), not per batch. Under DDP a collective: the epoch ends on every rank
    only if it ended on all (every rank stops after the same batch, and asks here)."""
    with global_rngs_kept():
        ended = next(batches, _END) is _END
    return not _collective.any_rank(not ended)


def _epoch_over(state: TrainState, total: int | None, sized: bool, batches: Iterator[Any]) -> bool:
    """Whether the epoch, stopped after ``state.batch_index`` batches, has none left: counted when the data
    has a length, looked ahead for otherwise (``total`` is then only the ``limit_train_batches`` bound)."""
    if sized:
        return total is not None and state.batch_index >= total
    return _stream_ended(batches)


def _counted_batches(state: TrainState, total: int | None) -> TrainState:
    """``state`` with its epoch's number of batches recorded; a run resumed mid-epoch with data of another length is
    warned about (it skips the batches already trained of another order, some seen twice)."""
    saved = state.extras.get(_BATCHES)
    if saved == total:
        return state
    if saved is not None and total is not None and state.batch_index > 0:
        warnings.warn(
            f"run_epochs: the state was saved in epoch {state.epoch} of {saved} batches, after {state.batch_index} of "
            f"them, but train_data has {total} batches now: the resumed epoch skips {state.batch_index} batches of "
            "another order (some samples are seen twice in it, some never); resume with the same data, or from a "
            "checkpoint at an epoch's end",
            RuntimeWarning,
            stacklevel=3,
        )
    extras = extras_copy(state.extras)
    if total is None:
        extras.pop(_BATCHES, None)
    else:
        extras[_BATCHES] = total
    return replace_extras(state, extras)


def _data_holders(data: Iterable) -> tuple[Any, ...]:
    """What may hold ``data``'s generators: the DataLoader, its sampler, its batch sampler and that one's sampler."""
    batch_sampler = getattr(data, "batch_sampler", None)
    return tuple(h for h in (data, getattr(data, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
                 if h is not None)


def _data_generators(data: Iterable) -> tuple[list[torch.Generator], list[torch.Generator]]:
    """The generators ``data`` shuffles with, each once: the holders' ``generator`` (a DataLoader's own, its
    sampler's, ...), then those a holder keeps under other names (``self.rng``, a sampler of one's own's), then
    those its dataset holds (a shuffle buffer's, an augmentation's: its ``generator`` too, which thus draws other
    numbers than the loader's). Never torch's global generator (what samplers without one draw from).

    >>> class Noisy(torch.utils.data.Dataset):
    ...     def __init__(self): self.generator = torch.Generator()
    ...     def __len__(self): return 4
    ...     def __getitem__(self, i): return torch.rand((), generator=self.generator)
    >>> loader = torch.utils.data.DataLoader(Noisy(), generator=torch.Generator())
    >>> named, kept = _data_generators(loader)
    >>> named == [loader.generator] and kept == [loader.dataset.generator]
    True
    """
    holders = _data_holders(data)
    named = _new_generators([getattr(h, "generator", None) for h in holders], [])
    dataset = getattr(data, "dataset", None)  # (a loader's; data read as it is is a holder itself)
    own = [] if dataset is None else [getattr(dataset, "generator", None), *getattr(dataset, "__dict__", {}).values()]
    kept = _new_generators([v for h in holders for v in getattr(h, "__dict__", {}).values()] + own, named)
    return named, kept


@contextlib.contextmanager
def _generators_kept(data: Iterable) -> Iterator[None]:
    """Put the generators ``data`` shuffles and draws with (:func:`_data_generators`) back as they were when the
    block ends.

    >>> class Noisy(torch.utils.data.Dataset):
    ...     def __init__(self): self.generator = torch.Generator().manual_seed(0)
    ...     def __len__(self): return 2
    ...     def __getitem__(self, i): return torch.rand((), generator=self.generator)
    >>> data = Noisy()
    >>> with _generators_kept(torch.utils.data.DataLoader(data)):
    ...     _ = data.generator.manual_seed(5), data[0]
    >>> bool(data[0] == Noisy()[0])
    True
    """
    named, kept = _data_generators(data)
    saved = [(generator, generator.get_state()) for generator in (*named, *kept)]
    try:
        yield
    finally:
        for generator, held in saved:
            generator.set_state(held)


def _new_generators(candidates: list[Any], known: list[torch.Generator]) -> list[torch.Generator]:
    """The generators among ``candidates`` (each once) that are not in ``known``, nor torch's global one."""
    found: list[torch.Generator] = []
    for g in candidates:
        if isinstance(g, torch.Generator) and g is not torch.default_generator and all(g is not k for k in (*known, *found)):
            found.append(g)
    return found


def _batch_size(batch: Any) -> int:
    """The size that weights ``batch`` in the means: :func:`_sizes`' first, without a word."""
    return _sizes(batch)[0]


def _sizes(batch: Any) -> tuple[int, list[int]]:
    """The batch's size and, where its tensors disagree, their distinct first dimensions (else ``[]``).

    The size is the length of the batch's first tensor with a batch dimension, depth first through mappings,
    lists, tuples and dataclasses (a collated tuple of strings or a 0-dim tensor before it does not count), else
    as an object of one's own says (a ``collate_fn``'s batch class: :func:`_own_batch_size`); 1 when there is
    none. Disagreeing tensors are what Lightning's ``extract_batch_size`` warns of: the means may be weighted by a
    size that is not the batch's (a ``lengths`` tensor before the inputs); :class:`_SizeWarning` says so."""
    sizes = [int(t.shape[0]) for t in tensors(batch) if t.ndim > 0]
    found = sizes[0] if sizes else None
    differ = sorted(set(sizes)) if len(set(sizes)) > 1 else []
    if found is None and not isinstance(batch, (torch.Tensor, str, bytes)) and hasattr(batch, "__dict__"):
        found = _own_batch_size(batch)
    return (1 if found is None else found), differ


class _SizeWarning:
    """The warning that a batch's tensors differ in their first dimension, given once per owner (an
    ``evaluate``, or a ``run_epochs``' validations together), as Lightning warns once of an ambiguous batch: a
    set of varying shapes (token lengths, graph nodes) would otherwise warn once per distinct shape."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.given = False

    def __call__(self, sizes: list[int], taken: int) -> None:
        """Warn of ``sizes`` (the batch's distinct first dimensions; ``taken`` weighted it) unless warned before."""
        if self.given or not sizes:
            return
        self.given = True
        warnings.warn(
            f"{self.where}: the batch's tensors differ in their first dimension (first seen: {sizes}): its size, which "
            f"weights the means, is taken from its first tensor ({taken}), here and in every such batch (warned once); "
            "put a tensor of the batch's samples first, or collate into a batch class of one's own with a __len__, "
            "or the means are weighted wrongly",
            stacklevel=4,
        )


def _own_batch_size(batch: Any) -> int | None:
    """The size of a batch of one's own class: the first dimension its attributes' tensors agree on, else its
    ``len()`` where that is a positive int (a ``class_weights`` of 10 beside 4 samples: the batch's ``len``; a
    ``len`` is not always the size, PyG's ``Data`` counts its fields); None when neither says."""
    sizes = {int(t.shape[0]) for t in tensors(list(vars(batch).values())) if t.ndim > 0}
    if len(sizes) == 1:
        return sizes.pop()
    try:
        size = len(batch)
    except Exception:  # noqa: BLE001 - (no len, or one that fails: the size is not known)
        return None
    return size if isinstance(size, int) and size > 0 else None


def _check_device(device: Any, where: str) -> Any:
    """``device``, ``"auto"`` made the accelerator torch finds (``torch.accelerator``: CUDA, MPS, XPU, ...) or the
    CPU, as Lightning's ``accelerator="auto"``; refused, before anything moves, a device torch cannot parse, and
    ``meta`` (it holds no values).

    >>> _check_device(None, "run_epochs"), _check_device("cpu", "run_epochs")
    (None, 'cpu')
    """
    if device is None:
        return None
    if isinstance(device, str) and device == "auto":
        found = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return torch.device("cpu") if found is None else found
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{where}: device={device!r} is not a device torch knows ({error}); e.g. 'cpu', 'cuda', "
                         "'cuda:1', 'mps'") from None
    if parsed.type == "meta":
        raise ValueError(f"{where}: device='meta' holds no values: moving the model there would drop its weights")
    if parsed.type != "cpu" and not device_available(parsed):
        raise ValueError(f"{where}: device={device!r} is not available here ({devices_here(parsed)}); "
                         "e.g. device='cpu', or 'auto'")
    return device


def _mover(device: torch.device | str | None, state: TrainState) -> Callable[[Any], Any] | None:
    """The function that places batches, or None when batches stay where they are (the CPU)."""
    target = torch.device(device) if device is not None else model_device(state.model)
    if target.type in ("cpu", "meta"):  # (meta: a spare part of a model, whose forward runs elsewhere)
        return None
    return lambda batch: to_device(batch, target, non_blocking=True)


def _to_device_state(state: TrainState, device: torch.device | str | None) -> None:
    if device is None:
        return
    device = torch.device(device)
    if model_device(state.model) == device:
        return
    state.model.to(device)
    if state.optimizer is not None:
        for entry in state.optimizer.state.values():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    entry[key] = value.to(device)


def _refuse_model_elsewhere(state: TrainState, device: torch.device | str | None, where: str) -> None:
    """Refuse ``device`` for an evaluation whose model has nothing there: its ``device`` places the batches only
    (it leaves the state as it was: moving the model would change it), so they would meet the model on another
    device in its first forward (torch's 'Expected all tensors to be on the same device'). A model spread over
    several devices (a spare part on ``meta``, a pipeline over two GPUs) is taken when any part is there."""
    if device is None:
        return
    target = torch.device(device)
    found = [t.device for t in itertools.chain(state.model.parameters(), state.model.buffers())]
    if not found or any(_is_on(d, target) for d in found):
        return
    raise ValueError(
        f"{where}: device={str(device)!r} places the batches, but the model is on {str(found[0])!r}; {where} leaves "
        f"the state as it is, so move the model first (state.model.to({str(target)!r}), or train with "
        "run_epochs(..., device=...), which moves it), or pass the model's device"
    )


def _is_on(found: torch.device, target: torch.device) -> bool:
    """Whether ``found`` is ``target`` (``"cuda"`` without an index: any CUDA device)."""
    return found.type == target.type and None in (found.index, target.index) or found == target


def evaluate(
    eval_step: Callable[[TrainState, Any], tuple[TrainState, Metrics]],
    state: TrainState,
    data: Iterable | Mapping[str, Iterable],
    *,
    limit: int | float | None = None,
    device: torch.device | str | None = None,
    reduce: bool = True,
) -> dict[str, float]:
    """Run ``eval_step`` over ``data``; return each metric's mean weighted by batch size.

    The batch size is the length of the first tensor in the batch (a batch without a tensor,
    a list of strings, counts as one). Tensors of other lengths (token sequences, a graph's nodes) get a warning,
    once per ``evaluate`` (once per ``run_epochs`` for its validations), as Lightning warns once of an ambiguous
    batch; to give the size yourself (Lightning's ``self.log(..., batch_size=n)``) put a tensor of the samples
    first, or collate into a batch class of your own with a ``__len__``. The sums stay on the device until the
    end, where they are read once. No means (data that yields no batch, unless ``limit=0`` asked for none)
    gives ``{}`` with a warning.

    Under ``torch.distributed`` (a process group of more than one rank) each rank
    evaluates its own ``data`` (e.g. ``loopkit.distributed.shard(val_set, pad=False)``) and
    the sums and sample counts of all ranks are added in one collective, so every rank
    returns the same means, each sample counted once: every rank must call ``evaluate``
    then. Under ``with_fsdp`` (each forward gathers the parameters from every rank) every rank must read as many
    batches: data with a length of another number of batches on one rank is refused on every rank, and a stream (an
    ``IterableDataset``'s loader, whose ``len()`` is an estimate, or data without a length) is read while every rank
    has a batch (one small collective a batch), the means over those, other ranks' further batches left out with a
    warning. ``reduce=False`` returns this rank's own means (for an evaluation on one rank only). Each rank's model
    keeps its own buffers (BatchNorm's statistics); ``with train_step.validating(state): evaluate(...)`` evaluates
    with those ``run_epochs`` validates with (under ``with_ddp``: rank 0's).
    ``device`` places the batches (``"auto"``: the accelerator torch finds, else the CPU); the model must be there
    already (a model on another device is refused: ``evaluate`` leaves the state as it is, so it moves nothing).

    A stochastic ``metric_fn`` (MC dropout, random timesteps) draws fresh numbers in each batch, as a raw loop's
    batches do: the first what ``eval_step(state, batch)`` draws, the rest from states drawn from ``state.rng`` (a
    copy of the global RNG for a ``global_rng=True`` state). The same state draws alike; ``metric_fn``'s draws move
    nothing global. ``data`` is read as a raw loop reads it: a ``DataLoader(..., shuffle=True)`` without a
    ``generator`` of its own draws its order from torch's global RNG as its iterator starts, and a ``Dataset`` that
    augments from the global RNGs (``num_workers=0``) draws from them; give the loader a ``generator`` to leave the
    global RNG alone (``run_epochs``' validations read in an order seeded from the state, and leave it as it was).

    ``data`` may be a mapping of named data sets (``{"clean": loader, "noisy": loader}``): each is
    evaluated on its own, and its metrics are named ``<metric>/<name>`` (``loss/noisy``); a list
    of DataLoaders names them ``dataloader_idx_<i>``, as Lightning does.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import eval_step
    >>> state = TrainState.create(torch.nn.Identity())
    >>> step = eval_step(lambda m, b: {"mean": b.mean()})
    >>> evaluate(step, state, [torch.zeros(3), torch.ones(1)])
    {'mean': 0.25}
    """
    _check_state(state, "evaluate")
    device = _check_device(device, "evaluate")
    _refuse_model_elsewhere(state, device, "evaluate")
    _check_sets(data, "evaluate: data", "evaluate(eval_step, state, {'name': data})")
    sets = _val_sets(data)
    for name, one in sets:
        _check_data(one, "evaluate: data" if name is None else f"evaluate: data[{name!r}]")
    step = undonated(as_step(eval_step, "evaluate: eval_step"))  # one state for every batch: a donated call would use it up
    if "train_step" in step.applied:
        raise TypeError("evaluate: the step is a train_step, whose metrics are training-mode losses of updates "
                        "on copies; pass eval_step(metric_fn)")
    means: dict[str, float] = {}
    size_warning = _SizeWarning("evaluate")  # (once for every set: one evaluate, one warning)
    for name, one in sets:
        own, _ = _evaluate(step, state, one, limit, device, reduce, size_warning=size_warning)
        if not own and limit != 0 and name is not None:
            warnings.warn(f"evaluate: no means for data[{name!r}]: it yielded no batch (empty, or an iterator used "
                          "up), or the step returned no metric", RuntimeWarning, stacklevel=2)
        means.update({_named(k, name): v for k, v in own.items()})
    if not means and limit != 0 and sets[0][0] is None:  # (a named set without means was warned about)
        warnings.warn("evaluate: no means: data yielded no batch (empty, or an iterator used up), or the step "
                      "returned no metric", RuntimeWarning, stacklevel=2)
    step.notify("evaluate_end", state, means)  # a with_profiler around it writes its trace now
    return means


def _evaluate(
    step: Any, state: TrainState, data: Iterable, limit: int | float | None, device: torch.device | str | None,
    reduce: bool, *, seeded: bool = False, size_warning: _SizeWarning | None = None, bar: str | None = None,
    who: str = "evaluate", advice: str = " (call evaluate on every rank, or evaluate(..., reduce=False) for one rank's "
                                         "own means)",
    limit_name: str = "limit",
) -> tuple[dict[str, float], int]:
    """:func:`evaluate` without telling the step that it ended (``run_epochs``' validations: one profile spans them),
    and the number of batches it read (this rank's).

    ``seeded``: a shuffling loader's order comes from ``(state.seed, state.step)``, not from the global RNG
    (which is left as it was): a resumed run validates in the uninterrupted run's order, to the last bit. The
    generators the data holds (:func:`_data_generators`), seeded and drawn from here, are put back as they were
    when it ends: the train data's stream does not move when it shares them (the same dataset, or
    ``torch.Generator``, under both loaders).
    ``size_warning`` warns of batches whose tensors differ in their first dimension (a new one when not given).
    ``bar``: the description of a bar that counts the batches (no metric read) and is cleared when done, as
    Lightning's validation bar (``run_epochs``' validations on a terminal); None: no bar. ``who`` and ``advice``:
    what a failed reduction of the means names (:func:`loopkit._collective.means`); ``who`` and ``limit_name`` (the
    caller's option for ``limit``): what a refusal of uneven data under ``with_fsdp`` names."""
    size_warning = _SizeWarning("evaluate") if size_warning is None else size_warning
    limit = _check_limit(limit, "limit")
    count = _num_batches(data, limit, "limit", shard=reduce)  # (reduced: a rank's empty shard reads nothing)
    together = reduce and _read_together_under_fsdp(state, data, count, who, limit_name)
    move = _mover(device, state)
    sums: dict[str, torch.Tensor] = {}
    sizes: dict[str, int] = {}
    with _generators_kept(data) if seeded else contextlib.nullcontext():
        batches = _epoch_batches(data, state.seed, state.step, 0, count) if seeded else itertools.islice(data, count)
        if together:
            batches = _read_together(batches, who)
        read = 0
        rngs = _evaluation_rngs(state)
        progress = ProgressBar(enabled=bar is not None, total=count, desc=bar or "", leave=False)
        try:
            for read, batch in enumerate(batches or (), 1):
                if move is not None:
                    batch = move(batch)
                size, differ = _sizes(batch)
                size_warning(differ, size)
                _, metrics = step(state if read == 1 else replace(state, rng=next(rngs)), batch)
                for key, value in metrics.items():
                    weighted = value.to(_collective.sum_dtype(value)) * size
                    sums[key] = weighted if key not in sums else sums[key] + weighted
                    sizes[key] = sizes.get(key, 0) + size
                if progress.enabled:
                    progress.tick({})  # (batches only: the metrics stay on the device)
        finally:
            progress.close()
    return _collective.means(sums, sizes, who=who, advice=advice, reduce=reduce), read


def _evaluation_rngs(state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
    """The RNG states of an evaluation's batches after its first (which draws from ``state``'s own, as the step
    called on it does): fresh numbers for each, drawn from ``state.rng``, or from a copy of the global RNG for a
    state that draws from it (left where it was: an evaluation changes nothing), as Lightning's batches draw anew."""
    index = cuda_index(model_device(state.model))
    return batch_rngs(state.rng or global_rng_state(index), index)


def _count_under_fsdp(data: Iterable, count: int | None) -> int | None:
    """The number of batches of ``data`` (``count``: :func:`_num_batches`, after the limit) that every rank must read
    as many of under ``with_fsdp``, checked before the reading; None for data not counted by its length
    (:func:`_counted_by_len`: a stream, read while every rank has a batch instead).

    >>> _count_under_fsdp([1, 2, 3], 2), _count_under_fsdp(iter([1]), None)
    (2, None)
    """
    return count if _counted_by_len(data) else None


def _uneven_under_fsdp(who: str, counts: Any, limit_name: str) -> str:
    """The refusal of validation data (or evaluate's, predict's) whose ranks hold ``counts`` batches under
    ``with_fsdp``, where ``who`` reads it and ``limit_name`` is the option that takes fewer.

    >>> _uneven_under_fsdp("evaluate", [2, 1], "limit")[:69]
    'evaluate: under with_fsdp every rank must read as many batches (each '
    """
    return (f"{who}: under with_fsdp every rank must read as many batches (each forward gathers the parameters from "
            f"every rank), but the ranks' data hold {counts} batches: shard it with loopkit.distributed.shard(..., "
            f"pad=True) (as Lightning's sampler pads), or pass {limit_name}= no larger than the fewest")


def _read_together_under_fsdp(
    state: TrainState, data: Iterable, count: int | None, where: str, limit_name: str = "limit"
) -> bool:
    """Whether ``data`` (``count`` batches of it: :func:`_num_batches`) must be read through a vote per batch
    (:func:`_read_together`): under ``with_fsdp`` each forward gathers the parameters from every rank, so a rank
    with a batch more would wait for the others forever. Data counted by its length (:func:`_counted_by_len`) of as
    many batches on no two ranks is refused on every rank first, naming the counts (and ``limit_name``, the option
    that takes fewer); data not counted by its length (an ``IterableDataset``'s loader, whose ``len()`` is an
    estimate, or data without one) is read while every rank has a batch, whatever its ``len()`` says, on every rank
    where one rank's is (the votes are collectives: a rank whose data has a length votes too). A collective every
    rank calls, under a process group with a sharded model only (False without one: no work at all).
    ``run_epochs`` checks its validation sets' counts at the fit's start (:func:`_val_counts_under_fsdp`), before
    the model is sharded; a set a factory makes is checked here."""
    if not _collective.active() or not fsdp_modules(list(core_module(state.model).modules())):
        return False
    counts = _collective.gather(_count_under_fsdp(data, count), who=where,
                                what="the gather of every rank's number of batches")
    if None not in counts and len(set(counts)) > 1:  # type: ignore[operator, arg-type]
        raise ValueError(_uneven_under_fsdp(where, counts, limit_name))
    return None in counts


def _read_together(batches: Iterable[Any] | None, who: str) -> Iterator[Any]:
    """``batches`` (None: none) while every rank has one (:func:`_while_every_rank_has_one`), for an evaluation or a
    prediction under ``with_fsdp`` (:func:`_read_together_under_fsdp`); ``who``: what its warning and a failed vote
    name (``evaluate``, ``run_epochs' validation``, ``predict``)."""
    return _while_every_rank_has_one(iter(() if batches is None else batches), 0, lambda count: (
        f"{who}: another rank's data ended after {count} batches, this rank's has more; {who} ends here on every "
        "rank (under with_fsdp each forward gathers the parameters from every rank), and this rank's further batches "
        "are left out: shard the data evenly"), who)


@overload
def predict(  # (a Mapping is Iterable too: the named sets first)
    fn: ModelFn, state: TrainState, data: Mapping[str, Iterable[Any]], *, limit: int | float | None = ...,
    device: torch.device | str | None = ...,
) -> dict[str, list[Any]]: ...
@overload
def predict(
    fn: ModelFn, state: TrainState, data: Iterable[Any], *, limit: int | float | None = ...,
    device: torch.device | str | None = ...,
) -> list[Any]: ...
def predict(
    fn: ModelFn,
    state: TrainState,
    data: Iterable[Any],
    *,
    limit: int | float | None = None,
    device: torch.device | str | None = None,
) -> list[Any] | dict[str, list[Any]]:
    """Collect ``fn(model, batch)`` for every batch, in eval mode under ``torch.no_grad()``.

    Training mode is restored afterwards, module by module. ``device`` places the batches, as ``evaluate``'s
    does (the model must be there already). ``limit`` takes the first batches only,
    as ``evaluate``'s does (Lightning's ``limit_predict_batches``): a count, or a fraction of ``len(data)``.
    Several data sets, as ``evaluate`` takes them, give each set's outputs: a list of DataLoaders a list of
    lists (Lightning's ``trainer.predict(dataloaders=[a, b])``), a mapping of named sets a dict. Under ``with_fsdp``
    every rank must read as many batches, as ``evaluate``'s: data with a length of another number on one rank is
    refused, a stream is read while every rank has a batch (the outputs of those).

    A sampling ``fn`` (MC dropout, a generative model's noise, random timesteps) of a state with an RNG of its own
    draws as ``evaluate``'s ``metric_fn`` does: the first batch from ``state.rng``, each later batch fresh numbers
    from states drawn from it. The same state predicts alike, whatever the global seed, and ``fn``'s draws move
    nothing global; for another MC sample, predict with another RNG:
    ``predict(fn, state.evolve(rng=loopkit.rng.create_rng(k)), data)`` for ``k`` in ``range(n)``. A state made with
    ``global_rng=True`` draws from torch's global RNG and advances it, as a plain loop does (bit for bit a
    ``with torch.no_grad(): [fn(model.eval(), b) for b in data]`` after the same seed, and Lightning's
    ``trainer.predict``): each call draws anew, so calling again gives another MC sample. Either way ``data`` is
    read as a raw loop reads it, as ``evaluate``'s.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> state = TrainState.create(torch.nn.Linear(2, 1))
    >>> outputs = predict(lambda m, b: m(b), state, [torch.ones(3, 2), torch.ones(1, 2)])
    >>> [tuple(o.shape) for o in outputs]
    [(3, 1), (1, 1)]
    >>> len(predict(lambda m, b: m(b), state, [torch.ones(3, 2)] * 10, limit=0.5))
    5
    """
    if not callable(fn):
        raise TypeError(f"predict: fn must be callable as fn(model, batch), got {type(fn).__qualname__}")
    check_takes_model_and_batch(fn, "predict: fn")
    _check_state(state, "predict")
    device = _check_device(device, "predict")
    _refuse_model_elsewhere(state, device, "predict")
    _check_sets(data, "predict: data", "predict(fn, state, {'name': data})")
    sets = _val_sets(data)
    if sets[0][0] is not None:  # several sets: each one's outputs
        each = [(name, predict(fn, state, one, limit=limit, device=device)) for name, one in sets]
        return dict(each) if isinstance(data, Mapping) else [outputs for _, outputs in each]
    data = sets[0][1]  # (a list of one DataLoader is that set, as evaluate takes it)
    _check_data(data, "predict: data")
    limit = _check_limit(limit, "limit")
    count = _num_batches(data, limit, "limit")
    batches = data if limit is None else itertools.islice(data, count)
    if _read_together_under_fsdp(state, data, count, "predict"):
        batches = _read_together(batches, "predict")
    model = state.model
    move = _mover(device, state)
    outputs = []
    index = cuda_index(model_device(model))
    rngs = _evaluation_rngs(state) if state.rng else None  # (a global_rng state's fn draws on from the global RNG)
    with evaluating(model), torch.no_grad():
        for read, batch in enumerate(batches, 1):
            batch = move(batch) if move is not None else batch
            if rngs is None:
                outputs.append(fn(model, batch))
                continue
            # each batch's RNG is its evaluation's: the state's own, then rngs'
            scope = RNGScope(state.rng if read == 1 else next(rngs), index, state.seed)
            try:
                outputs.append(fn(model, batch))
            finally:
                scope.discard()
    return outputs


def _validate_options(
    epochs: int | None,
    max_steps: int | None,
    val: Any,
    val_every_n_epochs: int | None,
    val_every_n_steps: int | None,
    sanity_val_batches: int,
    limit_train_batches: Any,
    limit_val_batches: Any,
) -> tuple[Any, ...]:
    """The options checked, as Python numbers (numpy's too): ``epochs`` .. ``limit_val_batches`` but ``val``."""
    if epochs is None and max_steps is None:
        raise ValueError("run_epochs needs epochs=, max_steps=, or both")
    for name, value in (("epochs", epochs), ("max_steps", max_steps), ("val_every_n_steps", val_every_n_steps)):
        if value is not None and (as_int(value) or 0) < 1:
            raise ValueError(f"run_epochs: {name} must be a positive int or None, got {value!r}")
    if val_every_n_epochs is None:  # (Lightning's check_val_every_n_epoch=None: validations by updates only)
        if val is not None and val_every_n_steps is None:
            raise ValueError("run_epochs: val_every_n_epochs=None validates only every val_every_n_steps updates: "
                             "give val_every_n_steps too (as Lightning's check_val_every_n_epoch=None needs an int "
                             "val_check_interval)")
    elif (as_int(val_every_n_epochs) or 0) < 1:
        raise ValueError(f"run_epochs: val_every_n_epochs must be a positive int or None, got {val_every_n_epochs!r}")
    if as_int(sanity_val_batches) is None or as_int(sanity_val_batches) < -1:
        raise ValueError(f"run_epochs: sanity_val_batches must be an int >= 0, or -1 for every batch, got {sanity_val_batches!r}")
    counts = tuple(None if v is None else as_int(v) for v in (epochs, max_steps, val_every_n_epochs, val_every_n_steps))
    limits = _check_limit(limit_train_batches, "limit_train_batches"), _check_limit(limit_val_batches, "limit_val_batches")
    if val is not None:
        if not (isinstance(val, (tuple, list)) and len(val) == 2 and callable(val[0])):
            raise TypeError("run_epochs: val must be a pair (eval_step, val_data)")
    elif val_every_n_steps is not None:
        raise ValueError(f"run_epochs: val_every_n_steps={val_every_n_steps} without val: pass val=(eval_step, val_data), "
                         "or leave val_every_n_steps out")
    return (*counts, as_int(sanity_val_batches), *limits)


def _check_minimum(value: Any, maximum: int | None, name: str, max_name: str) -> int | None:
    """``min_epochs``/``min_steps`` as an int >= 0 (or None), no more than its maximum."""
    if value is None:
        return None
    count = as_int(value)
    if count is None or count < 0:
        raise ValueError(f"run_epochs: {name} must be an int >= 0 or None, got {value!r}")
    if maximum is not None and count > maximum:
        raise ValueError(f"run_epochs: {name}={count} is more than {max_name}={maximum}; the fit ends at {max_name}")
    return count


def _check_state(state: Any, where: str) -> None:
    if not isinstance(state, TrainState):
        raise not_a_state(where, state)  # (with what to do for what it is: a model, a step, an ensemble)
    state.check_usable()


def _check_data(data: Any, where: str, *, factories: bool = False) -> None:
    """Refuse what is not an iterable of batches, naming ``where``; ``factories``: the caller takes a function of
    the epoch too (``run_epochs``' data), which the message then offers. A class and a torch ``Module`` are
    refused too, iterable or not (a ``Dataset`` class has ``__getitem__``, an ``nn.Sequential`` ``__iter__``)."""
    not_data(data, where, factories=factories)
    if isinstance(data, (str, bytes)) or not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        if factories:
            wanted = "an iterable of batches (a list, a DataLoader) or a function of the epoch that returns one"
        else:
            wanted = "an iterable of batches (a list, a DataLoader)"
        hint = ""
        if callable(data) and not factories and not isinstance(data, type):
            hint = ("; a function of the epoch (a factory of the epoch's data) is taken by run_epochs' train_data and "
                    "val data, lr_find and tune.fit only: pass the data it makes, e.g. make(epoch)")
        raise TypeError(f"{where} must be {wanted}, got {type(data).__qualname__}{hint}")
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        warnings.warn(
            f"{where} is a torch Dataset: each of its items is taken as a batch (a sample, for most datasets); "
            "to batch samples pass DataLoader(dataset, batch_size=...)",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_source(source: Any, where: str) -> None:
    """``run_epochs``' data checked: an iterable of batches, or a factory ``fn(epoch)`` of the epoch's data (not
    several data sets, as validation takes: each key or loader would be taken as a batch)."""
    several = "a mapping of data sets" if isinstance(source, Mapping) else "a list of DataLoaders" if (
        isinstance(source, (list, tuple)) and any(_set_of_its_own(d) for d in source)) else None
    if several is not None and len(source) == 1 and not isinstance(source, Mapping):
        raise TypeError(f"{where} is a list holding one DataLoader (its items would be taken as batches): pass the "
                        "DataLoader itself")
    if several is not None:
        raise TypeError(f"{where} is {several}: training takes one data set (several, as Lightning's CombinedLoader, "
                        "are not supported); pass one DataLoader, e.g. over torch.utils.data.ConcatDataset of them")
    if is_factory(source):
        check_factory(source, where)
    else:
        _check_data(source, where, factories=True)


def _made_by(source: Any, what: str, epoch: int) -> str:
    """Names the data a factory made, for messages: ``what train_data, a factory (make), returned for epoch 3``."""
    return f"what {what}, a factory ({factory_name(source)}), returned for epoch {epoch},"


def _train_data(source: Any, state: TrainState) -> Iterable:
    """The data of ``state.epoch``: ``source`` itself, or what the factory makes for that epoch (its global RNG
    draws seeded from the state's seed and the epoch), checked."""
    if not is_factory(source):
        return source
    data = call_seeded(source, state.seed, state.epoch, TRAIN, "train_data")
    _check_data(data, f"run_epochs: {_made_by(source, 'train_data', state.epoch)}")
    return data


def _epoch_total(data: Iterable, limit: int | float | None, source: Any, epoch: int) -> int | None:
    """:func:`_num_batches` of an epoch's data (a factory's: a fraction of that epoch's own length)."""
    try:
        return _num_batches(data, limit, "limit_train_batches")
    except ValueError as error:
        if not is_factory(source):
            raise
        raise ValueError(f"run_epochs: {error} (in the data train_data, a factory ({factory_name(source)}), "
                         f"made for epoch {epoch})") from None


def _no_batches(source: Any, total: int | None, epoch: int, trained: bool) -> str:
    """The message for an epoch whose data yielded no batch: used up, where it is an iterator or ``trained`` (an
    epoch of this fit was); empty otherwise (a DataLoader over an IterableDataset that yields nothing).

    >>> class Stream:  # (no length; starts over on each iter())
    ...     def __iter__(self): return iter(())
    >>> _no_batches(Stream(), None, 0, False)
    'run_epochs: train_data yielded no batches in epoch 0: it is empty'
    >>> "used up" in _no_batches(Stream(), None, 1, True), "used up" in _no_batches(iter(()), None, 0, False)
    (True, True)
    """
    if is_factory(source):
        made = f"what train_data, a factory ({factory_name(source)}), made for epoch {epoch}"
        return f"run_epochs: {made} is empty (len() is 0)" if total == 0 else f"run_epochs: {made} yielded no batches"
    if total == 0:
        return f"run_epochs: train_data is empty (len() is 0; epoch {epoch})"
    if not isinstance(source, Iterator) and not trained:
        return f"run_epochs: train_data yielded no batches in epoch {epoch}: it is empty"
    return (f"run_epochs: train_data yielded no batches in epoch {epoch}; a generator or iterator is used up after one "
            "pass: pass a list, a DataLoader or another iterable that starts over on each iter()")


class _ValSets:
    """A fit's validation sets, each as given or made by its factory for an epoch: once an epoch (the sanity
    check's data serve its epoch's validations, the first validation of a later epoch makes that epoch's; as
    Lightning reloads its val dataloaders with ``reload_dataloaders_every_n_epochs=1``)."""

    def __init__(self, data: Any, limit: int | float | None) -> None:
        self.sets = _val_sets(data)
        self.limit = limit
        self._made: dict[str | None, tuple[int, Iterable]] = {}  # a factory's set: (epoch, its data)

    def names(self) -> list[str | None]:
        return [name for name, _ in self.sets]

    def described(self, name: str | None, epoch: int) -> str:
        """The set ``name`` in messages: ``val's data['a']``, or what its factory returned for ``epoch``."""
        what = "val's data" if name is None else f"val's data[{name!r}]"
        source = dict(self.sets)[name]
        return _made_by(source, what, epoch).removesuffix(",") if is_factory(source) else what

    def at(self, epoch: int, seed: int) -> list[tuple[str | None, Iterable]]:
        """``(name, data)`` of each set for a validation in ``epoch``."""
        out = []
        for name, source in self.sets:
            if is_factory(source):
                made = self._made.get(name)
                if made is None or made[0] != epoch:
                    made = epoch, self._make(name, source, epoch, seed)
                    self._made[name] = made
                source = made[1]
            out.append((name, source))
        return out

    def _make(self, name: str | None, source: Any, epoch: int, seed: int) -> Iterable:
        what = "val's data" if name is None else f"val's data[{name!r}]"
        # (each set draws from a stream of its own, by its name: two sets' random subsets are not the same indices)
        data = call_seeded(source, seed, epoch, val_stream(name), what)
        made = _made_by(source, what, epoch)
        _check_data(data, f"run_epochs: {made}")
        if isinstance(data, Mapping) or _dataloaders(data):
            raise TypeError(f"run_epochs: {made} is several data sets ({type(data).__qualname__}); a factory makes one "
                            "set: give several as val=(eval_step, {'name': factory, ...}) or a list of factories")
        if isinstance(data, Iterator):
            raise TypeError(f"run_epochs: {made} is an iterator ({type(data).__qualname__}), used up by its first "
                            "pass, and the epoch's validations (the sanity check's too) share what its factory made: "
                            "return a list or a DataLoader")
        # as for the same data given as it is (_check_one_val_set): under DDP a rank's shard may be empty (a set
        # smaller than the world size), not every rank's; every rank makes the epoch's set here, at one point
        empty = _num_batches(data, None, "val") == 0
        if _collective.active() and _collective.any_rank(not empty):
            empty = False
        if empty:
            raise ValueError(f"run_epochs: {made} is empty (len() is 0){_on_every_rank()}: no validation could give "
                             "a metric; return a set of one batch at least, or pass val=None to train without "
                             "validation")
        _num_batches(data, self.limit, "limit_val_batches", shard=True, of=name)  # (a fraction of 0 batches: named now)
        return data


def _dataloaders(data: Any) -> bool:
    """A non-empty list or tuple of DataLoaders (several sets, as Lightning's ``val_dataloaders=[a, b]``)."""
    return (isinstance(data, (list, tuple)) and bool(data)
            and all(isinstance(d, torch.utils.data.DataLoader) for d in data))


#: the hooks run_epochs calls, each with the arguments it calls it with
_HOOK_CALLS: dict[str, tuple[str, ...]] = {
    "on_fit_start": ("state",), "on_epoch_start": ("state",), "on_batch_start": ("state", "batch"),
    "on_batch_end": ("state", "metrics"), "on_flush_end": ("state", "metrics"), "on_validation_end": ("state", "metrics"),
    "on_epoch_end": ("state", "metrics"), "on_fit_end": ("state", "history"),
}
_HOOKS = tuple(_HOOK_CALLS)
_TEST = "loopkit.evaluate calls no callbacks: use what it returns"
_PREDICT = "loopkit.predict calls no callbacks: use what it returns"
_VAL_BATCH = "no hook per validation batch: compute it in the eval_step's metric_fn"
#: Lightning 2.6.6's Callback hooks that loopkit never calls (its on_fit_start, on_fit_end, on_validation_end,
#: state_dict and load_state_dict share loopkit's names): the loopkit hook a port renames each to, or None and what
#: to do instead
_LIGHTNING_HOOKS: dict[str, tuple[str | None, str]] = {
    "setup": ("on_fit_start", ""), "teardown": ("on_fit_end", ""),
    "on_train_start": ("on_fit_start", ""), "on_train_end": ("on_fit_end", ""),
    "on_train_epoch_start": ("on_epoch_start", ""), "on_train_epoch_end": ("on_epoch_end", ""),
    "on_train_batch_start": ("on_batch_start", ""), "on_train_batch_end": ("on_batch_end", ""),
    "on_validation_epoch_end": ("on_validation_end", ""),
    "on_sanity_check_start": (None, "the sanity validation calls no hook"),
    "on_sanity_check_end": (None, "the sanity validation calls no hook"),
    "on_validation_start": (None, "no hook runs before a validation; on_validation_end runs after it"),
    "on_validation_epoch_start": (None, "no hook runs before a validation; on_validation_end runs after it"),
    "on_validation_batch_start": (None, _VAL_BATCH), "on_validation_batch_end": (None, _VAL_BATCH),
    "on_test_start": (None, _TEST), "on_test_end": (None, _TEST),
    "on_test_epoch_start": (None, _TEST), "on_test_epoch_end": (None, _TEST),
    "on_test_batch_start": (None, _TEST), "on_test_batch_end": (None, _TEST),
    "on_predict_start": (None, _PREDICT), "on_predict_end": (None, _PREDICT),
    "on_predict_epoch_start": (None, _PREDICT), "on_predict_epoch_end": (None, _PREDICT),
    "on_predict_batch_start": (None, _PREDICT), "on_predict_batch_end": (None, _PREDICT),
    "on_exception": (None, "wrap run_epochs in try/except"),
    "on_save_checkpoint": (None, "give the callback state_dict() and load_state_dict(d): run_epochs keeps them in "
                                 "state.extras, which checkpoints hold"),
    "on_load_checkpoint": (None, "give the callback state_dict() and load_state_dict(d): run_epochs keeps them in "
                                 "state.extras, which checkpoints hold"),
    "on_before_backward": (None, "the loss is the loss_fn's return: do it there"),
    "on_after_backward": (None, "a step transform: loopkit.with_grad_hook(step, fn)"),
    "on_before_optimizer_step": (None, "a step transform: loopkit.with_grad_hook(step, fn) inside with_grad_clip"),
    "on_before_zero_grad": (None, "a step transform: loopkit.with_grad_hook(step, fn) sees the gradients before "
                                  "the update"),
}
#: loopkit's counterpart of each Lightning callback a fit refuses (by class name); any other: the porting guide
_LIGHTNING_COUNTERPARTS = {
    "EarlyStopping": "loopkit.EarlyStopping(monitor, ...)",
    "ModelCheckpoint": "loopkit.with_checkpointing(step, directory, ...) around the step",
    "LearningRateMonitor": "loopkit.LearningRateMonitor()",
    "Timer": "loopkit.Timer(duration, ...)",
    "ThroughputMonitor": "loopkit.ThroughputMonitor(batch_size_fn, ...)",
    "StochasticWeightAveraging": "loopkit.with_swa(step, swa_lrs, ...) around the step",
    "EMAWeightAveraging": "loopkit.with_ema(step, decay) around the step",
    "ModelPruning": "loopkit.with_pruning(step, amount, schedule, ...) around the step",
    "GradientAccumulationScheduler": "loopkit.with_grad_accum(step, every={epoch: n, ...}) around the step",
    "ModelSummary": "print(loopkit.summarize(state, max_depth=n)) before the fit (a loopkit.ModelSummary)",
    "LearningRateFinder": "loopkit.lr_find(step, state, train_data, ...) before the fit",
    "BatchSizeFinder": "loopkit.scale_batch_size(step, state, make_data, ...) before the fit",
}


def _check_callbacks(callbacks: Any, *, warn: bool = True) -> list[Any]:
    """``callbacks`` as a list (one callback alone is taken, and None as none, as Lightning takes them); a class, an
    object with none of the hooks, one of Lightning's own callbacks (:func:`_refuse_lightning_callback`), one with
    a loopkit hook taking Lightning's ``(trainer, pl_module)`` (:func:`_refuse_lightning_signatures`), one whose
    class defines hooks under Lightning's names (which loopkit never calls), or one with a hook that cannot take
    the call run_epochs makes (:func:`_check_hook_calls`) is refused by name; ``warn``: warn of an object written
    for both Lightning and loopkit (:func:`_check_ported`)."""
    if callbacks is None:  # (Lightning's Trainer default)
        return []
    if any(hasattr(callbacks, hook) for hook in _HOOKS) or isinstance(callbacks, type):
        callbacks = [callbacks]
    if isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise TypeError(f"run_epochs: callbacks must be a list of callbacks, got {type(callbacks).__qualname__}")
    checked = list(callbacks)
    for i, cb in enumerate(checked):
        if isinstance(cb, type):
            raise TypeError(f"run_epochs: callbacks[{i}] is the class {cb.__qualname__}; pass an instance, {cb.__qualname__}(...)")
        who = f"run_epochs: callbacks[{i}] ({type(cb).__qualname__})"
        _refuse_lightning_callback(cb, who)
        _refuse_lightning_signatures(cb, who)
        _check_ported(cb, who, warn)
        if not any(_loopkit_hook(cb, hook) is not None for hook in _HOOKS):
            raise TypeError(
                f"run_epochs: callbacks[{i}] ({type(cb).__qualname__}) has none of the hooks {', '.join(_HOOKS)}"
            )
        _check_hook_calls(cb, who)
    return checked


def _check_hook_calls(callback: Any, who: str) -> None:
    """Refuse a callback with a hook that is not callable, or cannot be called as run_epochs calls it
    (:data:`_HOOK_CALLS`; ``state_dict()`` and ``load_state_dict(sd)`` when it has both), before the fit's first
    step: it would fail when first called, after an epoch's training."""
    calls = dict(_HOOK_CALLS)
    if callable(_loopkit_hook(callback, "state_dict")) and callable(_loopkit_hook(callback, "load_state_dict")):
        calls.update(state_dict=(), load_state_dict=("sd",))
    for name, arguments in calls.items():
        hook = _loopkit_hook(callback, name)
        if hook is not None:
            check_call(hook, f"{who}: its {name} must take ({', '.join(arguments)}), as run_epochs calls it",
                       *(None,) * len(arguments))


def _refuse_lightning_callback(callback: Any, who: str) -> None:
    """Refuse a callback whose class is, or derives from, one of Lightning's (``lightning.pytorch``,
    ``pytorch_lightning``, ``lightning_fabric``): its hooks take ``(trainer, pl_module)``, which loopkit never
    gives; the message names loopkit's counterpart. Two kinds are taken: a :class:`Callback` subclass whose loopkit
    hooks are all loopkit's, none of them Lightning's (``class C(loopkit.Callback, L.Callback)``), and a callback
    written for both trainers (:func:`_written_for_both`), whose Lightning base's hooks, those under loopkit's names
    included, loopkit never calls (:func:`loopkit.callbacks._loopkit_hook`)."""
    lightning = [c for c in type(callback).__mro__ if _from_lightning(c)]
    if not lightning:
        return
    if isinstance(callback, Callback) and not any(_from_lightning(_hook_owner(callback, h)) for h in _HOOKS):
        return
    if _written_for_both(callback):
        return
    named = next((c for c in lightning if c.__name__ in _LIGHTNING_COUNTERPARTS), None)
    instead = (f"use {_LIGHTNING_COUNTERPARTS[named.__name__]}" if named is not None
               else "port it to loopkit's hooks (a hook receives the state, and the metrics): see docs/from_lightning.md")
    base = lightning[0]
    what = "is Lightning's" if base is type(callback) else "derives from Lightning's"
    raise TypeError(f"{who} {what} {base.__module__}.{base.__qualname__}, whose hooks take (trainer, pl_module): "
                    f"loopkit cannot run a Lightning callback; {instead}")


def _hook_owner(callback: Any, name: str) -> type | None:
    """The class of ``callback``'s MRO that defines the method ``name`` (None: none does, or the object itself)."""
    if name in getattr(callback, "__dict__", {}):
        return None
    return next((c for c in type(callback).__mro__ if name in c.__dict__), None)


def _check_ported(callback: Any, who: str, warn: bool) -> None:
    """Refuse a callback whose own class defines hooks under Lightning's names, which loopkit never calls (a
    Lightning callback ported by changing its base), naming each with its loopkit name. A callback that also
    defines, itself, the loopkit hook of each Lightning-named hook that has one (and of one at least) is taken
    as written for both trainers: a warning names what loopkit will not call."""
    ported = [name for name in _LIGHTNING_HOOKS if _own_hook(callback, name)]
    if not ported:
        return
    if _written_for_both(callback):
        if warn:
            renamed = [name for name in ported if _LIGHTNING_HOOKS[name][0] is not None]
            pairs = ", ".join(f"{name} beside {_LIGHTNING_HOOKS[name][0]}" for name in renamed)
            inherited = [name for name in (*_HOOKS, "state_dict", "load_state_dict")
                         if hasattr(callback, name) and _loopkit_hook(callback, name) is None]
            nor = f", nor its Lightning base's {', '.join(inherited)}" if inherited else ""
            warnings.warn(f"{who} defines Lightning's hooks as well as loopkit's ({pairs}): taken as written for both "
                          f"trainers, run_epochs never calls {', '.join(ported)}{nor}{_for_lightnings_trainer(callback)}",
                          UserWarning, stacklevel=4)
        return
    hints = [f"rename {name} -> {ours}" if ours else f"{name}: no loopkit hook ({advice})"
             for name, (ours, advice) in ((name, _LIGHTNING_HOOKS[name]) for name in ported)]
    raise TypeError(f"{who} defines hooks under Lightning's names, which loopkit never calls: {'; '.join(hints)} "
                    "(a hook receives the state, and the metrics, not (trainer, pl_module): see loopkit.Callback)")


def _written_for_both(callback: Any) -> bool:
    """Whether ``callback`` is written for both trainers: it defines, itself, hooks under Lightning's names, one with
    a loopkit counterpart at least, and beside each such hook its loopkit counterpart (``on_train_epoch_end`` and
    ``on_epoch_end``)."""
    renamed = [name for name, (ours, _) in _LIGHTNING_HOOKS.items() if ours is not None and _own_hook(callback, name)]
    return bool(renamed) and all(_own_hook(callback, _LIGHTNING_HOOKS[name][0]) for name in renamed)


def _for_lightnings_trainer(callback: Any) -> str:
    """What a callback written for both trainers lacks for Lightning's Trainer to run it (for the warning), or ""."""
    if not any(_from_lightning(c) for c in type(callback).__mro__):
        return ("; Lightning's Trainer calls every hook of its Callback, so subclass lightning.pytorch.Callback for it "
                "(run_epochs calls none of that base's hooks)")
    if _hook_owner(callback, "on_fit_start") is Callback:
        return ("; Lightning's Trainer would call loopkit.Callback's on_fit_start(state) with (trainer, pl_module) and "
                "fail: put Lightning's Callback ahead of loopkit.Callback, or leave loopkit.Callback out")
    return ""


#: the parameters that tell a hook written for Lightning's Trainer (its hooks take ``(trainer, pl_module, ...)``)
_LIGHTNING_PARAMETERS = ("trainer", "pl_module")


def _refuse_lightning_signatures(callback: Any, who: str) -> None:
    """Refuse a callback with a loopkit hook of its own that takes Lightning's ``(trainer, pl_module)`` (an
    ``on_fit_start`` written for Lightning's Trainer): loopkit would call it with the state, and it would fail, or
    take the state for the trainer, mid-fit."""
    for name in _HOOKS:
        hook = _loopkit_hook(callback, name)
        try:
            parameters = tuple(inspect.signature(hook).parameters)[:2] if callable(hook) else ()
        except (TypeError, ValueError):  # (a signature that cannot be read: taken as loopkit's)
            continue
        if parameters == _LIGHTNING_PARAMETERS:
            raise TypeError(f"{who}: its {name} takes Lightning's (trainer, pl_module), but run_epochs calls it with "
                            "the state (see loopkit.Callback); a callback for both trainers leaves the hooks of the "
                            "names they share (on_fit_start, on_fit_end, on_validation_end) to lightning.pytorch."
                            "Callback, or write one callback for each trainer")


def _own_hook(callback: Any, name: str) -> bool:
    """Whether ``callback`` or a class of its own defines the method ``name``: not inherited from loopkit's
    :class:`Callback` or from a Lightning base class. A ``setup``/``teardown`` counts only when it takes Lightning's
    ``(trainer, pl_module, stage)`` (the names are common: a helper of one's own is not a hook)."""
    if name not in getattr(callback, "__dict__", {}):  # (one set on the object itself is its own)
        owner = _hook_owner(callback, name)
        if owner is None or owner is Callback or _from_lightning(owner):
            return False
    hook = getattr(callback, name, None)
    if not callable(hook):
        return False
    return name not in ("setup", "teardown") or takes(hook, None, None, "fit")


def _val_sets(data: Any) -> list[tuple[str | None, Any]]:
    """``(name, data)`` for each validation set: a mapping's items (several named sets), a list of DataLoaders
    or factories of the epoch's data (``dataloader_idx_<i>``, Lightning's names; one alone is unnamed, as
    there), or ``(None, data)``."""
    if isinstance(data, Mapping):
        return list(data.items())
    if isinstance(data, (list, tuple)) and data and all(_set_of_its_own(d) for d in data):
        return [(None, data[0])] if len(data) == 1 else [(f"dataloader_idx_{i}", d) for i, d in enumerate(data)]
    return [(None, data)]


def _set_of_its_own(item: Any) -> bool:
    """An item of a list that makes the list several data sets: a DataLoader, or a factory of the epoch's data."""
    return isinstance(item, torch.utils.data.DataLoader) or is_factory(item)


def _named(key: str, name: str | None) -> str:
    """A metric's name for the set ``name``: ``loss/<name>`` (Lightning's ``val_loss/dataloader_idx_0`` likewise)."""
    return key if name is None else f"{key}/{name}"


def _check_sets(data: Any, what: str, fix: str) -> None:
    """Refuse several data sets that cannot be told apart: an empty mapping, a name that is not one, a list
    mixing DataLoaders (several sets, as Lightning's) with other items (batches)."""
    if isinstance(data, Mapping):
        if not data:
            raise ValueError(f"{what} is an empty mapping: name one data set at least, {fix}")
        for name in data:
            if not isinstance(name, str) or not name or name != name.strip() or "/" in name:
                raise ValueError(f"{what} names its sets {list(data)!r}; each name must be a non-empty string without "
                                 f"'/' or outer spaces (metrics are named '<metric>/<name>'), got {name!r}")
    elif isinstance(data, (list, tuple)) and data and any(_set_of_its_own(d) for d in data):
        if not all(_set_of_its_own(d) for d in data):
            kinds = ", ".join(type(d).__qualname__ for d in data[:4])
            raise TypeError(f"{what} is a list mixing DataLoaders with other items ({kinds}): a list of DataLoaders "
                            "(or of factories of the epoch's data) is several data sets (Lightning's val_dataloaders="
                            "[a, b]); give sets of other kinds by name, {'a': data_a, 'b': data_b}, or one set as a list "
                            "of batches")


def _check_val(val: Any) -> list[str | None]:
    """The names of the sets empty here (only under a process group of more than one rank: one process refuses
    an empty set at once; see :func:`_refuse_val_empty_on_every_rank`). (After ``_validate_options``, which checks
    it is a pair.)"""
    if "train_step" in as_step(val[0], "run_epochs: val's step").applied:
        raise TypeError("run_epochs: val's step is a train_step, which would train on the validation data; "
                        "pass eval_step(metric_fn)")
    _check_sets(val[1], "run_epochs: val's data", "val=(eval_step, {'name': val_data}), or pass val=None to train "
                "without validation")
    empty: list[str | None] = []
    for name, data in _val_sets(val[1]):
        what = "val's data" if name is None else f"val's data[{name!r}]"
        if is_factory(data):
            check_factory(data, f"run_epochs: {what}")
        elif _check_one_val_set(data, what):
            empty.append(name)
    return empty


def _check_one_val_set(data: Any, what: str) -> bool:
    """Whether the set is empty: refused in one process; under a process group of more than one rank this rank's
    shard may be empty (``shard(val_set, pad=False)`` of a set smaller than the world size), decided over the
    ranks once they agree on the validation (:func:`_refuse_val_empty_on_every_rank`)."""
    _check_data(data, f"run_epochs: {what}", factories=True)
    empty = not isinstance(data, Iterator) and _num_batches(data, None, "val") == 0  # (an IterableDataset: no len())
    if empty and not _collective.active():
        raise ValueError(_empty_val(what))
    if isinstance(data, Iterator):  # (not iter(): a DataLoader's iterator draws from the global RNG)
        raise TypeError(
            f"run_epochs: {what} is an iterator ({type(data).__qualname__}), used up by its first pass (the "
            "sanity check); pass a list or a DataLoader, which start over on each pass"
        )
    return empty


def _refuse_iterator_mid_epoch(data: Any, state: TrainState) -> None:
    """Refuse a one-shot iterator (a generator, ``iter(loader)``) as the train data of a state part-way through an
    epoch: the resumed epoch skips ``state.batch_index`` batches of what the iterator has left, not of the epoch's
    start (and the fit that stopped there read one batch past its stop, for data without a length)."""
    if isinstance(data, Iterator) and state.batch_index > 0:
        raise TypeError(
            f"run_epochs: train_data is an iterator ({type(data).__qualname__}), and the state is {state.batch_index} "
            f"batch(es) into epoch {state.epoch}: going on would skip that many batches of what the iterator has "
            "left, not of the epoch's start; pass data that starts over on each pass (a list, a DataLoader, or a "
            "function of the epoch returning its batches), as the fit that stopped had"
        )


def _empty_val(what: str) -> str:
    return (f"run_epochs: {what} is empty (len() is 0){_on_every_rank()}: no validation could give a metric; "
            "pass val=None to train without validation")


def _on_every_rank() -> str:
    return f" on every rank ({_collective.rank_and_size()[1]} ranks)" if _collective.active() else ""


_UNEVEN_VAL = (  # (run_epochs' refusal of validation sets of other counts under with_fsdp)
    ", of as many batches under with_fsdp, whose every forward gathers the parameters from every rank: shard it with "
    "loopkit.distributed.shard(..., pad=True), as Lightning's sampler pads, or pass limit_val_batches= no larger than "
    "the fewest; None: a stream there, which every rank's data must be then")


def _val_counts_under_fsdp(val_sets: _ValSets, limit: int | float | None) -> dict[str, int | None]:
    """The batches this rank reads of each validation set (after ``limit_val_batches``), by the set's name in
    messages, which under ``with_fsdp`` every rank must read as many of (each forward gathers the parameters from
    every rank): ``run_epochs`` checks them with its validation options, at the fit's start. None for a set not
    counted by its length (:func:`_count_under_fsdp`: a stream, read while every rank has a batch) and for one a
    factory makes (its data: checked at its validations, :func:`_read_together_under_fsdp`).

    >>> _val_counts_under_fsdp(_ValSets({"a": [1, 2, 3], "b": lambda epoch: [1]}, 2), 2)
    {"val's data['a']": 2, "val's data['b']": None}
    """
    return {"val's data" if name is None else f"val's data[{name!r}]": None if is_factory(data) else
            _count_under_fsdp(data, _num_batches(data, limit, "limit_val_batches", shard=True))
            for name, data in val_sets.sets}


def _refuse_val_empty_on_every_rank(names: Sequence[str | None], empty: Sequence[str | None]) -> None:
    """Under a process group of more than one rank, refuse (on every rank) a validation set given as it is that is
    empty on every rank; one rank's empty shard is fine, the means of all ranks' sums and counts hold every sample
    (as :func:`evaluate`'s). One collective per set, in the order of ``names``, which every rank agrees on (their
    validation options were found the same): every rank calls it at the same point."""
    if not _collective.active():
        return
    for name in names:  # (a factory's set counts as data here: what it makes is looked at when made)
        if not _collective.any_rank(name not in empty):
            raise ValueError(_empty_val("val's data" if name is None else f"val's data[{name!r}]"))


def _scalars(value: Any, metrics: Any, callback: Any, hook: str = "on_batch_end") -> bool:
    """Whether a callback's ``on_batch_end`` returned scalars to log: a non-empty dict of numbers or
    single-number tensors (read by the loggers at their log points only: no sync per batch). Anything
    but a dict (``True``, a tensor), and the step's metrics handed back, are ignored; a dict holding
    anything else is refused, naming the callback and the key."""
    if not isinstance(value, Mapping) or not value or value is metrics:
        return False
    for key, v in value.items():
        if not isinstance(key, str) or not _scalar(v):
            what = f"the name {key!r}" if not isinstance(key, str) else f"{key!r}: {_what(v)}"
            raise TypeError(f"run_epochs: {type(callback).__qualname__}.{hook} returned {what}; what it returns "
                            "for the loggers is a dict of names to numbers (or 1-element real tensors)")
    return True


def _scalar(value: Any) -> bool:
    """A number, or a tensor holding one real number."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype is not torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _what(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__qualname__


def _reused_persistent_workers(data: Any) -> bool:
    """A DataLoader whose persistent worker processes have started (its next iterator is the same one, reset)."""
    return (
        isinstance(data, torch.utils.data.DataLoader) and data.persistent_workers and data.num_workers > 0
        and getattr(data, "_iterator", None) is not None
    )


def _fresh_persistent_workers(data: Any) -> bool:
    """A DataLoader with persistent worker processes that has not started them yet."""
    return (
        isinstance(data, torch.utils.data.DataLoader) and data.persistent_workers and data.num_workers > 0
        and getattr(data, "_iterator", None) is None
    )


def _warn_of_persistent_workers(data: Any, source: Any, epoch: int, mid_epoch: bool) -> None:
    """Warn of a run resumed (at ``epoch``) with a DataLoader whose persistent workers have not started: the
    uninterrupted run's (a loader given as data, or one a factory keeps across epochs) kept their random streams
    from the epochs before; and of one going on ``mid_epoch`` with workers that have (they read ahead of the stop).
    ``source``: ``train_data`` as given (``data`` itself, or the factory that made it)."""
    if mid_epoch and _reused_persistent_workers(data):
        warnings.warn(
            "run_epochs: going on mid-epoch with a DataLoader of persistent_workers=True whose workers have started: "
            "they read (and augmented) batches past the stop, and the batches skipped to get back to "
            "state.batch_index are read again, advancing their random streams, so the rest of the epoch differs "
            "from an uninterrupted run's; for an exact resume use persistent_workers=False",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if not _fresh_persistent_workers(data):
        return
    if is_factory(source):
        warnings.warn(
            f"run_epochs: resuming with a DataLoader of persistent_workers=True, which train_data, a factory "
            f"({factory_name(source)}), returned for epoch {epoch}: where the factory keeps one loader across epochs "
            "(the reload_dataloaders_every_n_epochs=n recipe, lambda epoch: make(epoch // n * n)), the uninterrupted "
            "run's workers kept their random streams (augmentation) from the epochs before, these start new ones, so "
            "the batches differ from that run's; for an exact resume use persistent_workers=False (a loader made "
            "fresh each epoch resumes exactly too: persistent workers gain nothing there)",
            RuntimeWarning,
            stacklevel=3,
        )
    else:
        warnings.warn(
            "run_epochs: resuming with a DataLoader of persistent_workers=True: an uninterrupted run's workers keep "
            "their random streams (augmentation) from epoch to epoch, these start new ones, so the batches differ "
            "from that run's; for an exact resume use persistent_workers=False",
            RuntimeWarning,
            stacklevel=3,
        )


def _monitors(step: Any, callbacks: Sequence[Any], *, strict_only: bool = False) -> list[tuple[str, str]]:
    """``(who, metric)`` for each callback and transform of ``step`` that watches a metric (``strict_only``: leaving
    out those with ``strict=False``, whose metric may be absent)."""
    watchers = list(callbacks)
    wrapped = step
    while isinstance(wrapped, WrapperStep):
        watchers.append(wrapped)
        wrapped = wrapped.inner
    found = []
    for watcher in watchers:
        monitor = getattr(watcher, "monitor", None)
        if isinstance(monitor, str) and not (strict_only and getattr(watcher, "strict", True) is False):
            found.append((watcher.name if isinstance(watcher, WrapperStep) else type(watcher).__name__, monitor))
    return found


def _val_monitors(step: Any, callbacks: Sequence[Any]) -> list[tuple[str, str]]:
    """``(who, metric)`` for each callback and transform of ``step`` that watches a ``val/`` metric it needs
    (``strict=False`` ones may miss it)."""
    return [(who, monitor) for who, monitor in _monitors(step, callbacks, strict_only=True) if monitor.startswith("val/")]


def _warn_of_lightning_names(step: Any, callbacks: Sequence[Any]) -> None:
    """A monitor named the way a LightningModule logs (``val_loss``): loopkit's are ``val/loss`` and ``train/loss``,
    and the mistake would otherwise show only after an epoch of training (or, with ``strict=False``, never: the
    check is skipped for want of the metric)."""
    for who, monitor in _monitors(step, callbacks):
        prefix, _, rest = monitor.partition("_")
        if prefix in ("val", "train") and rest:
            warnings.warn(
                f"run_epochs: {who} monitors '{monitor}', a name in Lightning's style; loopkit reports a validation "
                f"metric as 'val/<name>' and a train one as 'train/<name>' (did you mean '{prefix}/{rest}'?)",
                RuntimeWarning,
                stacklevel=3,
            )


def _refuse_val_monitors(step: Any, callbacks: Sequence[Any]) -> None:
    """A fit without validation: a callback or transform watching a ``val/`` metric would never hear of it
    (an EarlyStopping that never stops, a best checkpoint never kept), so it is refused now, as
    Lightning's ``strict`` monitors refuse a metric that is not there."""
    for who, monitor in _val_monitors(step, callbacks):
        raise ValueError(
            f"run_epochs: {who} monitors '{monitor}', but this fit has no validation (val=None or "
            "limit_val_batches=0): pass val=(eval_step, val_data), or monitor a train/ metric"
        )


def _warn_of_unseen_monitors(step: Any, callbacks: Sequence[Any], sanity: Mapping[str, float]) -> None:
    """A watched ``val/`` metric the sanity validation did not report: most likely misspelt, and the first
    real validation would raise (after an epoch of training); said now. (A metric_fn may report a metric
    only on some batches, so this is a warning.)"""
    for who, monitor in _val_monitors(step, callbacks):
        if monitor not in sanity:
            warnings.warn(
                f"run_epochs: {who} monitors '{monitor}', which the sanity validation did not report (it reported "
                f"{', '.join(sorted(sanity)) or 'nothing'}); the first validation will raise if it is missing there too",
                RuntimeWarning,
                stacklevel=3,
            )


class _TellingAbort:
    """On an exception out of the fit, tells the step (``notify("abort")``) so that its
    transforms release what they hold (a running profiler, open log files, a save thread)."""

    def __init__(self, steps: Sequence[Any], state: TrainState) -> None:
        self.steps, self.state = steps, state

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if error is None:
            return
        for step in self.steps:
            try:
                step.notify("abort", self.state, {})
            except Exception as also:  # the fit's own error is the one to raise
                warnings.warn(f"run_epochs: after {type(error).__name__}, releasing the step failed too: {also!r}", stacklevel=2)


class _StopOnSignal:
    """While active, SIGTERM or SIGINT asks ``run_epochs`` to stop after the current step.

    A second signal stops at once (``KeyboardInterrupt``), unless it comes within a second of
    the first: torchrun's agent and SLURM deliver one stop to a worker twice, about at once.
    Handlers are installed only in the main thread, and the previous ones are put back on exit.

    Under DDP the ranks stop together: a signal reaches each rank at another step (or one rank
    alone), and a rank that stopped alone would leave the others waiting in the next all-reduce.
    So :meth:`poll`, called once a step on every rank, now and then sends this rank's flag in a
    non-blocking all-reduce (on a gloo group, host memory: no device sync) and reads the one sent
    before, long done by then: every rank reads the same vote after the same step, and
    :attr:`agreed` (the stop the loop obeys) turns on there. A vote costs a collective, which a
    step of a few milliseconds would feel: votes are ``vote_every_seconds`` apart (in steps, as
    each vote agrees for the next, from the ranks' step times), so a stop comes within two such
    intervals of the signal, or two steps when steps are slower (when steps slow down all at once,
    up to ``2 * max_vote_steps`` of the slow ones).
    """

    #: a repeat within this many seconds is the same stop delivered twice
    repeat_window = 1.0
    #: the least time between two votes under DDP (at most ``max_vote_steps`` steps apart)
    vote_every_seconds = 0.05
    max_vote_steps = 16  # (steps that slow down after a vote wait at most two intervals of this many)

    def __init__(self) -> None:
        self.requested: str | None = None  # the signal this process got
        self.agreed: str | None = None  # the stop every rank takes (in one process: ``requested``)
        self._at = 0.0
        self._previous: dict[int, Any] = {}
        self.voting = _collective.active()
        self._group: Any = None  # the gloo group of the votes (None: the default group, when it is gloo)
        self._own_group = False
        self._vote: tuple[torch.Tensor, Any] | None = None  # ([flag, steps to the next vote], its all-reduce) in flight
        self._steps = 0  # polls so far
        self._next = 1  # the poll that votes next (the same on every rank)
        self._sent: tuple[int, float] | None = None  # the poll and time of the vote in flight

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGTERM", "SIGINT"):
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        if self.voting and torch.distributed.get_backend() != "gloo":  # (NCCL: votes stay off the device)
            self._group, self._own_group = torch.distributed.new_group(backend="gloo"), True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            if time.monotonic() - self._at < self.repeat_window:
                return
            raise KeyboardInterrupt(f"run_epochs: {name} after {self.requested}: stopping at once")
        self.requested, self._at = name, time.monotonic()
        if not self.voting:
            self.agreed = name
        when = "with every rank, at the next vote" if self.voting else "after the current step"
        write_line(f"run_epochs: {name} received, stopping {when} (send it again to stop at once)", sys.stderr)

    def poll(self) -> None:
        """Under DDP, once a step on every rank: at a vote's step, read the vote in flight, send this one's."""
        self._steps += 1
        if self._steps < self._next:
            return
        dist = torch.distributed
        now, steps = time.monotonic(), 1
        if self._vote is not None:
            values, work = self._vote
            work.wait()
            flag, steps = values.tolist()  # (host memory)
            if flag and self.agreed is None:
                self.agreed = self.requested or "a stop signal on another rank"
        proposed = 1
        if self._sent is not None and now > self._sent[1]:  # this rank's steps since the last vote: how many make the time
            per_step = (now - self._sent[1]) / (self._steps - self._sent[0])
            proposed = min(self.max_vote_steps, max(1, math.ceil(self.vote_every_seconds / per_step)))
        values = torch.tensor([float(self.requested is not None), float(proposed)], dtype=torch.float64)
        self._vote = values, dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._next, self._sent = self._steps + int(steps), (self._steps, now)

    def __exit__(self, kind: Any, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        vote, self._vote = self._vote, None
        try:  # every rank has a vote in flight, sent after the same step: each ends it (after an error, if it can)
            if vote is not None:
                vote[1].wait() if kind is None else vote[1].wait(datetime.timedelta(seconds=10))
        except Exception:
            if kind is None:
                raise
            return  # a rank that failed mid-step sent no vote: the group is left to the process's end
        if self._own_group:
            torch.distributed.destroy_process_group(self._group)


def _signal_stop() -> str | None:
    """The stop the running ``run_epochs`` of this thread has agreed on after a signal (``"SIGTERM"``, or under DDP
    ``"a stop signal on another rank"``), or None: no signal came, no fit runs, or this is not the main thread
    (where alone a fit handles signals). Read from the fit's :class:`_StopOnSignal` handler, so a callback's hook
    (``on_fit_end``) tells a graceful stop from a fit that ended short of its budget otherwise
    (``limit_train_batches=0``, data that ran out).

    >>> _signal_stop() is None
    True
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    for name in ("SIGTERM", "SIGINT"):
        sig = getattr(signal, name, None)
        stop = getattr(signal.getsignal(sig), "__self__", None) if sig is not None else None
        if isinstance(stop, _StopOnSignal):
            return stop.agreed
    return None


def _defines(callback: Any, hook: str) -> bool:
    """Whether ``callback`` has ``hook``, other than :class:`Callback`'s own no-op and one of a Lightning class."""
    if hook in getattr(callback, "__dict__", {}):
        return True
    return _loopkit_hook(callback, hook) is not None and getattr(type(callback), hook, None) is not getattr(Callback, hook)


class _Hooks:
    """Calls the hooks that the callbacks define (any object; missing hooks are skipped)."""

    def __init__(self, callbacks: Sequence[Any], min_epochs: int | None = None, min_steps: int | None = None) -> None:
        self.callbacks = list(callbacks)
        self.min_epochs, self.min_steps = min_epochs, min_steps
        self.stop_asked = False  # a callback asked to stop at the last check, while the minimum was not met
        # under DDP: the callbacks (their keys) whose stop every rank's copy was told, with their stop record then
        self.shared: dict[str, Any] = {}
        # a callback whose stop the minimum does not hold off (a pruned trial's) could ask while one waits
        self.overriding = any(getattr(cb, "stops_before_minimum", False) for cb in self.callbacks)
        # Callback's own no-op on_batch_end is left out (and one that does nothing under its callback's current
        # settings: _batch_end_unused): a batch then calls no hook and reads no should_stop
        self.batch_end = [
            (cb, cb.on_batch_end) for cb in self.callbacks
            if _defines(cb, "on_batch_end") and not _batch_end_unused(cb)
        ]
        starting = [cb for cb in self.callbacks if _defines(cb, "on_batch_start")]
        self.own_batch_start = [cb.on_batch_start for cb in starting]
        # whether a batch's hooks may ask to stop: only then is should_stop checked after each batch (under DDP a
        # vote, a collective and a read); a callback that never_stops (a LearningRateMonitor per step) makes none
        self.batch_stops = any(not _never_stops(cb) for cb in (*starting, *(cb for cb, _ in self.batch_end)))
        # what the loop calls before each step: the callbacks' hooks, and now and then a driver's own last
        # (:class:`_Superseded`: marks used up the states it has replaced, once the next step trains in place)
        self.batch_start: list[Callable[[TrainState, Any], Any]] = self.own_batch_start
        self.stateful = _stateful(self.callbacks)

    def call(self, name: str, *args: Any) -> list[Any]:
        """Call each callback's hook ``name`` (not one it inherits from a Lightning class: :func:`_loopkit_hook`)."""
        return [hook(*args) for cb in self.callbacks if (hook := _loopkit_hook(cb, name)) is not None]

    def restore(self, state: TrainState) -> None:
        """Load each stateful callback's counters from ``state.extras`` (a resumed run continues them)."""
        restored = {id(cb) for key, cb in self.stateful if key in state.extras}
        for cb in self.callbacks:
            if getattr(cb, "should_stop", False) and id(cb) not in restored:
                when = "before its first batch" if self.may_stop(state) else "as soon as min_epochs/min_steps are met"
                warnings.warn(
                    f"run_epochs: {type(cb).__qualname__}.should_stop is already set when the fit starts (left from "
                    f"an earlier fit?), so this fit stops {when}; reset it in the callback's "
                    "on_fit_start, or make a new one for each fit",
                    RuntimeWarning,
                    stacklevel=3,
                )
        for key, cb in self.stateful:
            if key in state.extras:
                cb.load_state_dict(dict(state.extras[key]))
                if getattr(cb, "should_stop", False) and self.may_stop(state) and (
                        state.batch_index == 0 or state.extras.get(RECORDED) == state.step):
                    warnings.warn(  # (mid-epoch and not recorded: the stop's epoch gets its validation and record first)
                        f"run_epochs: {type(cb).__qualname__} restored from state.extras[{key!r}] asks to stop at once; "
                        f"to start it afresh, drop that key: state.evolve(extras={{k: v for k, v in "
                        f"state.extras.items() if not k.startswith({_CALLBACKS!r})}})",
                        stacklevel=3,
                    )
                elif isinstance(cb, Timer):
                    _warn_of_spent_timer(cb, key, self.may_stop(state))

    def keep(self, state: TrainState) -> TrainState:
        """``state`` with each stateful callback's ``state_dict()`` in its extras (checkpoints carry them)."""
        if not self.stateful:
            return state
        extras = dict(state.extras)
        for key, cb in self.stateful:
            extras[key] = _plain_state(key, cb)
        return replace_extras(state, extras)

    def check_plain(self) -> None:
        """Refuse, before training, a stateful callback whose ``state_dict()`` a checkpoint cannot hold."""
        for key, cb in self.stateful:
            _plain_state(key, cb)

    def may_stop(self, state: TrainState) -> bool:
        """Whether ``state`` has met ``min_epochs`` (epochs finished) and ``min_steps`` (updates)."""
        return (self.min_epochs is None or state.epoch >= self.min_epochs) and (
            self.min_steps is None or state.step >= self.min_steps)

    def stops(self, state: TrainState) -> bool:
        """Whether the fit stops at ``state``: a callback asks to, and the minimum is met. A collective under
        DDP (see :meth:`_vote`), but while a stop asked for waits for the minimum (``stop_asked``)."""
        if self.stop_asked and not self.may_stop(state) and not self.overriding:
            return False  # (the answer until the minimum is met, whatever the callbacks say meanwhile)
        asked, unshared = self._vote()
        if unshared:  # (agreed: every rank shares, at the same check)
            self._share_stop(state)
        if self.min_epochs is None and self.min_steps is None:
            return asked
        self.stop_asked = asked  # checked again after each batch: the minimum may be met mid-epoch
        if not asked or self.may_stop(state):
            return asked
        # (the same on every rank: a collective only where every rank asks it)
        return _collective.any_rank(any(getattr(cb, "should_stop", False) and getattr(cb, "stops_before_minimum", False)
                                        for cb in self.callbacks))

    def share_stops(self, state: TrainState) -> None:
        """Under DDP, tell every rank's copy of a callback the stop it asked for on some rank since the last check
        (:meth:`_share_stop`): at an epoch's end, before the counters go into the state that the epoch's checkpoint
        holds, as Lightning's ``EarlyStopping`` reduces its decision where it makes it. One collective on every rank
        (whatever callbacks each has); nothing in one process."""
        if _collective.active() and self._vote()[1]:
            self._share_stop(state)

    def _unshared(self) -> list[Any]:
        """The callbacks of this rank that ask to stop and whose stop the other ranks' copies were not told yet."""
        return [cb for cb in self.callbacks if getattr(cb, "should_stop", False)
                and self.shared.get(_stop_key(cb), _UNTOLD) != _stop_record(cb)]

    def _vote(self) -> tuple[bool, bool]:
        """Whether a callback asks to stop, on any rank, and whether one asks whose stop the other ranks' copies have
        not been told (:meth:`_share_stop` is due): the same on every rank, one collective under DDP, which
        ``run_epochs`` makes at the same points on every rank, whatever callbacks each rank has (per batch when
        any rank has a batch hook of a callback that may stop: :attr:`batch_stops`)."""
        if not _collective.active():
            return any(getattr(cb, "should_stop", False) for cb in self.callbacks), False
        vote = 2 if self._unshared() else int(any(getattr(cb, "should_stop", False) for cb in self.callbacks))
        agreed = _collective.max_over_ranks(vote, "the ranks' vote on the callbacks' should_stop")
        return agreed > 0, agreed == 2

    def _share_stop(self, state: TrainState) -> None:
        """Under DDP, at each check where a callback asks to stop on some rank and its copies were not told that ask
        yet (an ``EarlyStopping`` on a rank's own metric, a ``Timer``; one that asks later, or again, while
        ``min_epochs`` holds the stop, too): tell it its stop on every rank, as Lightning's ``EarlyStopping`` reduces
        its decision over the ranks at each check: rank 0's, which logs and saves, says why it stopped
        (``should_stop``, and what :meth:`stop_agreed` takes: ``stopped_epoch``, the latest over the ranks, the
        reason), so that a fit relaunched from its checkpoint stops as this one did. A copy that asked at that epoch
        itself keeps its own reason. A callback is matched on other ranks by its ``state_key`` (else its class); a
        collective, made on every rank at the same check (:meth:`_vote` says when), once for each new ask."""
        asked = [(_stop_key(cb), _stop_record(cb)) for cb in self._unshared()]
        gathered = _collective.gather(asked, who="run_epochs", what="the gather of every rank's callbacks' stops (should_stop)")
        told: dict[str, Any] = {}
        for found in gathered:  # (rank by rank: a later ask than the ranks' before wins)
            for key, record in found:  # type: ignore[union-attr]
                if key not in told or _stopped_at(record) > _stopped_at(told[key]):
                    told[key] = record
        for cb in self.callbacks:
            key = _stop_key(cb)
            if key not in told:
                continue
            if not (getattr(cb, "should_stop", False) and _stopped_at(_stop_record(cb)) >= _stopped_at(told[key])):
                agreed = getattr(cb, "stop_agreed", None)
                if agreed is not None:
                    agreed(state, told[key])
                elif not getattr(cb, "should_stop", False):
                    try:
                        cb.should_stop = True
                    except AttributeError:  # (a read-only should_stop of one's own: it says what it says; the fit stops)
                        pass
            self.shared[key] = _stop_record(cb)


#: a callback whose stop was never told (:attr:`_Hooks.shared`)
_UNTOLD = object()


def _stop_record(callback: Any) -> Any:
    """What a callback that asks to stop tells the other ranks' copies (its ``stop_record()``; None without one)."""
    record = getattr(callback, "stop_record", None)
    return None if record is None else record()


def _stopped_at(record: Any) -> float:
    """The epoch a stop record says the stop was asked at; -inf where it says none."""
    at = record[0] if isinstance(record, tuple) and record else None
    return -math.inf if at is None else float(at)


#: transforms that make no collective: a rank may apply one the others do not (profile rank 0 alone)
_RANK_LOCAL = frozenset({"with_profiler", "with_compile"})


def _loggers_of(step: Any) -> list[str]:
    """The classes of the loggers the step's ``with_logging`` writes to (outermost first)."""
    found: list[str] = []
    while step is not None:
        found += [type(logger).__qualname__ for logger in getattr(step, "loggers", ())]
        step = getattr(step, "inner", None)
    return found


def _agreed_options(step: Any) -> dict[str, Any]:
    """The step's :attr:`loopkit.steps.Step.rank_agreed` as a dict (an option a transform applied twice has, the
    second time, its count in its key: ``"with_nan_guard policy (2)"``)."""
    found: dict[str, Any] = {}
    for option, value in getattr(step, "rank_agreed", ()):
        key, n = option, 1
        while key in found:
            n += 1
            key = f"{option} ({n})"
        found[key] = value
    return found


def _stop_key(callback: Any) -> str:
    """What tells a callback apart from the others of its rank, and finds it on the other ranks."""
    key = getattr(callback, "state_key", None)
    return key if isinstance(key, str) else type(callback).__qualname__


class _Superseded:
    """The states the callbacks were handed that the driver has since replaced by a new one sharing their model
    and optimizer (other counters or extras: the epoch's end, a validation, the callbacks' counters kept): once
    the fit next runs its step in place (a batch's step, or an epoch's flush) their weights are no longer
    theirs, so they are marked used up then, as the state a donated step is given is (using one raises
    :class:`loopkit.DonatedStateError`); until then they stay usable. Kept off the per-batch path: only the
    driver's epoch-end, validation and save points add states, and the marking runs as the last
    ``on_batch_start`` hook of the next batch only while some wait (``hooks.batch_start``, swapped)."""

    def __init__(self, hooks: _Hooks, donated: bool) -> None:
        self.hooks = hooks
        self.donated = donated  # (a step not donated trains new states: the old ones keep their weights)
        self.states: list[TrainState] = []

    def add(self, *states: TrainState) -> None:
        """Wait with ``states`` (handed to hooks) for the fit's next in-place training."""
        if not self.donated:
            return
        if not self.states:
            self.hooks.batch_start = [*self.hooks.own_batch_start, self]
        self.states.extend(states)

    def retire(self, current: TrainState) -> None:
        """Mark the states waiting used up, but ``current`` (the one trained now, or the fit's newest)."""
        for old in self.states:
            if old is not current:
                old.mark_consumed()
        self.release()

    def release(self) -> None:
        """Let go of the states waiting, unmarked, and of the hook waiting with them: at a retirement, and where the
        fit ends (returned or raised: no update in place follows, they stay usable). The hook holds this object, which
        holds the hooks: left in place, that cycle would keep the fit's last states, and their model and optimizer,
        alive after the fit until Python's cyclic garbage collector next runs (a study's trials piling up on the
        device), where a plain loop's are freed once dropped.

        >>> import torch
        >>> hooks = _Hooks([])
        >>> superseded = _Superseded(hooks, donated=True)
        >>> superseded.add(TrainState.create(torch.nn.Linear(1, 1)))
        >>> hooks.batch_start == [superseded]
        True
        >>> superseded.release()
        >>> superseded.states, hooks.batch_start
        ([], [])
        """
        self.states.clear()
        self.hooks.batch_start = self.hooks.own_batch_start

    def __call__(self, state: TrainState, batch: Any) -> None:
        """As the next batch's last ``on_batch_start`` hook: its step is about to train ``state`` in place."""
        self.retire(state)


def _warn_of_spent_timer(timer: Timer, key: str, may_stop: bool) -> None:
    """Warn when ``timer``, restored from ``state.extras[key]``, has already spent its whole ``duration``: the fit
    stops at its first epoch's start (once ``may_stop``: min_epochs/min_steps met) with only the Timer's usual line.
    A fit continued from a fit's returned state counts on, as one resumed from a checkpoint does (Lightning's
    ``ckpt_path`` resume; its ``fit`` called again times itself afresh): "train 10 more epochs" with the same Timer
    would otherwise stop at once, unexplained. Not when time remains (that fit gets what is left)."""
    if timer.duration is None or timer.time_elapsed() < timer.duration:
        return
    when = "before its first batch" if may_stop else "as soon as min_epochs/min_steps are met"
    spent = datetime.timedelta(seconds=int(timer.time_elapsed()))
    warnings.warn(
        f"run_epochs: {type(timer).__qualname__} restored from state.extras[{key!r}] has already spent its duration "
        f"({spent} of {datetime.timedelta(seconds=int(timer.duration))}, counted over the fits this state went "
        f"through: a fit continued from a returned state or a checkpoint counts on), so this fit stops {when}; to "
        f"time this fit afresh, drop that key: state.evolve(extras={{k: v for k, v in state.extras.items() if k != "
        f"{key!r}}}), or give the Timer a longer duration (timer.duration = ...)",
        RuntimeWarning,
        stacklevel=4,
    )


def _batch_start_returned(hook: Callable[..., Any]) -> ValueError:
    """The error of an ``on_batch_start`` hook that returned something (Lightning's ``on_train_batch_start`` returns
    -1 to skip the rest of the epoch): loopkit takes no return there, and a fit that went on would train batches the
    ported callback meant to skip.

    >>> class Skip:
    ...     def on_batch_start(self, state, batch): return -1
    >>> print(_batch_start_returned(Skip().on_batch_start))  # doctest: +ELLIPSIS
    run_epochs: Skip.on_batch_start returned a value...
    """
    owner = getattr(hook, "__self__", hook)
    return ValueError(
        f"run_epochs: {type(owner).__qualname__}.on_batch_start returned a value, which loopkit does not take: "
        "it does not skip the rest of an epoch on -1 (Lightning's on_train_batch_start), and this batch was not "
        "trained on. Return None; to end the fit after this batch set the callback's should_stop = True; to train "
        "fewer batches an epoch pass run_epochs(..., limit_train_batches=n), or give train_data as a factory "
        "(lambda epoch: data) that makes each epoch's batches"
    )


def _add_epoch_extras(record: dict[str, float], callback: Any, extra: Any) -> None:
    """Add what a callback's ``on_epoch_end`` returned to the epoch's history record (names of its own)."""
    if isinstance(extra, Mapping) and extra:  # (numbers, as the record's own: a 1-element tensor is read once, here)
        who = f"run_epochs: {type(callback).__qualname__}.on_epoch_end"
        extra = {key: _validation_number(value, key, who) for key, value in extra.items()}
    _add_extras(record, callback, extra, "on_epoch_end", ("the epoch's history record", "the history record's", "the epoch's record"))


def _add_validation_extras(metrics: dict[str, float], callback: Any, extra: Any) -> None:
    """Add what a callback's ``on_validation_end`` returned (a metric over the whole validation set, AUROC) to the
    validation's metrics, as floats: the callbacks after it, the loggers, checkpoints and the history see them.
    Anything but a mapping (``True``, the metrics given back) is ignored, as before the hook could add any."""
    if not isinstance(extra, Mapping) or extra is metrics:
        return
    who = f"run_epochs: {type(callback).__qualname__}.on_validation_end"
    for key in extra:  # (the epoch's record takes a validation's metrics: other names would overwrite its own)
        if not (isinstance(key, str) and key.startswith("val/") and len(key) > 4):
            raise ValueError(f"{who} returned {key!r}; a validation's metrics are named 'val/<name>' "
                             "(the epoch's history record holds them beside its own train/ means, epoch and step)")
    extra = {key: _validation_number(value, key, who) for key, value in extra.items()}
    _add_extras(metrics, callback, extra, "on_validation_end", ("the validation's metrics", "the metrics'", "the validation's metrics"))


def _validation_number(value: Any, key: Any, who: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype is not torch.bool:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{who} returned {key!r}: {type(value).__qualname__}; a metric is a number (or a 1-element tensor)")


def _add_extras(record: dict[str, float], callback: Any, extra: Any, hook: str, what: tuple[str, str, str]) -> None:
    """Add what a callback's ``hook`` returned to ``record`` under names of its own; ``what`` names the record for
    the messages: what to add to, whose names, which has a name already."""
    if extra is None or (isinstance(extra, (bool, numbers.Number, str, list, tuple)) and not extra):
        return  # (a falsy plain value: ignored, as ever)
    who = f"run_epochs: {type(callback).__qualname__}.{hook}"
    target, names, holder = what
    if not isinstance(extra, Mapping):
        raise TypeError(f"{who} returned a {type(extra).__qualname__}; return None or a dict of numbers to add to {target}")
    for key in extra:
        if not isinstance(key, str):
            raise TypeError(f"{who} returned the name {key!r}; {names} names are strings")
        if key in record:
            raise ValueError(f"{who} returned {key!r}, which {holder} has already ({record[key]!r}); "
                             "give it a name of its own")
    record.update(extra)


def _warn_of_ranks_apart(step: Step) -> None:
    """Under a ``torch.distributed`` group of several ranks, on every rank, once a fit: warn that ``step`` (with neither
    ``with_ddp`` nor ``with_fsdp``) trains each rank's replica on its own, unless it says it keeps them alike itself
    (:attr:`loopkit.steps.Step.syncs_ranks`): a step of one's own may all-reduce the gradients, so it is not refused."""
    if step.syncs_ranks:
        return
    core = innermost(step)
    named = ", ".join(step.applied if core.applied else (type(core).__qualname__, *step.applied))
    fix = ("wrap it in with_ddp (loopkit.with_ddp(train_step(loss_fn)), inside the whole-step transforms) or with_fsdp"
           if isinstance(core, TrainStep) else
           "write it as loopkit.with_ddp(loopkit.train_step(loss_fn)), or average the gradients in the step before the "
           "optimizer's step (torch.distributed.all_reduce(p.grad) for each parameter, then p.grad /= world_size) and "
           f"say so, {_flag_of(core)}.syncs_ranks = True (read by run_epochs: no warning then)")
    warnings.warn(
        f"run_epochs: the step ({named}) has neither with_ddp nor with_fsdp, under a torch.distributed group of "
        f"{_collective.rank_and_size()[1]} ranks: each rank trains its own replica on its own data and they drift "
        "apart (the history averages the ranks' losses, checkpoints keep rank 0's weights); " + fix,
        RuntimeWarning,
        stacklevel=3,
    )


def _flag_of(core: Step) -> str:
    """Where a step of one's own at the core of a step sets ``syncs_ranks``: the function (the one under any
    ``functools.partial``), or the Step subclass.

    >>> import functools
    >>> def my_step(state, batch, scale=1.0): return state, {}
    >>> class MyStep(Step): ...
    >>> _flag_of(as_step(my_step)), _flag_of(MyStep()), _flag_of(as_step(functools.partial(my_step, scale=2.0)))
    ('my_step', 'MyStep', 'my_step')
    """
    if not isinstance(core, FnStep):
        return type(core).__qualname__
    fn = core.functions[-1]
    return getattr(fn, "__name__", type(fn).__qualname__)


def _warn_of_the_same_batch(batch: Any, transform: str) -> None:
    """Under ``transform`` (with_ddp, with_fsdp), at the fit's first batch (a collective): warn when every rank got the same one, as a
    DataLoader without a DistributedSampler gives them (training then sees 1/world_size of the data an epoch)."""
    found = list(tensors(batch))
    fingerprint = [(tuple(t.shape), float(t.detach().double().sum()), float(t.detach().double().abs().sum()))
                   for t in found]  # (a host read once a fit)
    seen = _collective.gather(fingerprint, who="run_epochs", what="the gather of every rank's first batch (whether they differ)")
    if found and all(other == seen[0] for other in seen):
        warnings.warn(
            f"run_epochs: every rank got the same first batch under {transform}, so each epoch trains on one rank's share "
            "of the data only; shard it (loopkit.distributed.shard(dataset, state, batch_size=...), or a DataLoader "
            "with a DistributedSampler)",
            RuntimeWarning,
            stacklevel=3,
        )


def _flushed(step: Any, state: TrainState, epoch_window: Window) -> tuple[TrainState, Metrics, bool]:
    """``state`` after the step's ``flush`` (a partial accumulation group's update at an epoch's end), its
    metrics in the epoch's means; those metrics; and whether that update is due a step checkpoint (the mark
    taken off). The callbacks hear of it after (:func:`_tell_flush_end`), once it is the fit's newest state:
    a hook that raises leaves it as :func:`loopkit.state_at_error`'s, as after a batch's update. ``epoch_window``:
    the fit's window of epoch means (:func:`loopkit._window.guarded`)."""
    state, metrics = step.flush(state)
    if metrics:
        state = replace_extras(state, epoch_window.add(state.extras, metrics))
    due = SAVE_DUE in state.extras
    if due:
        state = _unmarked(state)
    return state, metrics, due


def _tell_flush_end(step: Any, hooks: _Hooks, state: TrainState, metrics: Metrics) -> None:
    """Call the callbacks' ``on_flush_end`` for the flush's update; scalars one returns go to the loggers."""
    for callback in hooks.callbacks:
        hook = _loopkit_hook(callback, "on_flush_end")
        logged = None if hook is None else hook(state, metrics)
        if logged is not None and _scalars(logged, metrics, callback, "on_flush_end"):
            step.notify("batch_end", state, logged)


def _save_or_hold(step: Any, hooks: _Hooks, state: TrainState, max_steps: int | None) -> tuple[TrainState, bool]:
    """Make the step checkpoint due at this update, with the callbacks' counters after it in the state; or,
    at the fit's last update (``max_steps``), hold it (True) to be made once its epoch is recorded: a relaunch
    from it then finds that record made (or the epoch finished), not the epoch to record again."""
    state = hooks.keep(state)
    if max_steps is not None and state.step >= max_steps:
        return state, True
    step.notify("save_due", state, {})
    return state, False


def _unmarked(state: TrainState) -> TrainState:
    """``state`` without the mark of a step save due (:data:`loopkit.steps.SAVE_DUE`): what run_epochs
    shows the callbacks, keeps and, after the batch's hooks, hands the step with ``"save_due"``."""
    extras = extras_copy(state.extras)
    del extras[SAVE_DUE]
    return replace_extras(state, extras)


def _newest_whole(state: Any, error: BaseException) -> Any:
    """The fit's newest whole state once ``error`` left its batches: ``state`` (before the failing batch, or after it
    when a hook failed), unless ``error`` marks (:func:`loopkit.state_at_error`) another in its place: the new state
    a step marked whole after its update (a logger's failed write; ``state`` used up), or ``state`` as a failing
    write of a callback's row after that update left it, at its step (holding the row, which ``with_logging`` logs
    first when a fit goes on from it)."""
    left = state_at_error(error)
    if not isinstance(state, TrainState) or state._consumed:
        return left
    if isinstance(left, TrainState) and left is not state and not left._consumed and (
            left.step, left.epoch, left.batch_index) == (state.step, state.epoch, state.batch_index):
        return left
    return state


def _owing_hooks(whole: Any, before: TrainState, error: BaseException, flushing: bool) -> Any:
    """``whole``, the state ``error`` left, holding that update's metrics and hooks (:data:`HOOKS_OWED`) when the
    step call from ``before`` (a batch's, or the epoch's flush when ``flushing``) raised after its update
    (:func:`loopkit._window.leave_updated`: a logger's write at a log point): the driver called no hook of it, and a
    fit given ``whole`` calls them once. Any other ``whole`` as it is. Only on a failure."""
    metrics = left_metrics(error)
    if metrics is None or not isinstance(whole, TrainState) or whole is before or whole.step == before.step:
        return whole
    extras = extras_copy(whole.extras)
    extras[HOOKS_OWED] = {"step": whole.step, "epoch": whole.epoch, "batch_index": whole.batch_index,
                           "hook": "on_flush_end" if flushing else "on_batch_end", "metrics": dict(metrics)}
    return replace_extras(whole, extras)


def _owed_hooks_told(step: Any, hooks: _Hooks, state: TrainState, owed: Mapping[str, Any]) -> None:
    """Call the hooks ``owed`` (:func:`loopkit.steps.owed_hooks` of the state a failure left, ``state`` that state
    without the mark), with that update's metrics, and log their rows (``LearningRateMonitor("step")``'s rates): a
    fit given it then makes the calls and rows of the uninterrupted run."""
    metrics = owed["metrics"]
    if owed["hook"] == "on_flush_end":
        _tell_flush_end(step, hooks, state, metrics)
        return
    for callback, hook in hooks.batch_end:  # (as the batch loop calls them, inline there: the hot path)
        logged = hook(state, metrics)
        if logged is not None and _scalars(logged, metrics, callback):
            step.notify("batch_end", state, logged)


def _marked(state: TrainState) -> TrainState:
    """``state`` with the mark of a step save due (:data:`loopkit.steps.SAVE_DUE`): what an error leaves when the
    save due at its update was not made yet (a hook raised before it, or before the epoch's end it was held for);
    a fit given that state makes it (with_checkpointing takes it at ``"fit_begin"``)."""
    if SAVE_DUE in state.extras:
        return state
    return replace_extras(state, {**state.extras, SAVE_DUE: True})


def _stateful(callbacks: Sequence[Any]) -> list[tuple[str, Any]]:
    """``(extras key, callback)`` for each callback with ``state_dict`` and ``load_state_dict`` (of its own, not
    Lightning's ``Callback``'s: :func:`_loopkit_hook`).

    The key is ``callbacks/`` and the callback's ``state_key`` (or its class name), with
    ``#2``, ``#3``... for later callbacks of the same key, in the order given.
    """
    keyed: list[tuple[str, Any]] = []
    for cb in callbacks:
        if callable(_loopkit_hook(cb, "state_dict")) and callable(_loopkit_hook(cb, "load_state_dict")):
            base = f"{_CALLBACKS}{getattr(cb, 'state_key', None) or type(cb).__qualname__}"
            seen = sum(1 for key, _ in keyed if key == base or key.startswith(base + "#"))
            keyed.append((base if not seen else f"{base}#{seen + 1}", cb))
    return keyed


def _plain_state(key: str, callback: Any) -> Any:
    value = callback.state_dict()
    try:
        to_plain(value, ("extras", key))
    except TypeError as e:
        raise TypeError(
            f"run_epochs: {type(callback).__qualname__}.state_dict() must hold numbers, strings and tensors only: {e}"
        ) from None
    return value


def estimated_stepping_batches(
    train_data: Iterable,
    *,
    epochs: int | None = None,
    max_steps: int | None = None,
    limit_train_batches: int | float | None = None,
    accumulate_every: int = 1,
) -> int | float:
    """The number of updates (optimizer steps) a fit of ``run_epochs`` with these options makes from its start:
    Lightning's ``trainer.estimated_stepping_batches``, to size a schedule over the whole fit, as
    ``OneCycleLR(optimizer, max_lr, total_steps=...)``.

    Give what ``run_epochs`` gets: ``train_data`` (this rank's under DDP), ``epochs``, ``max_steps`` and
    ``limit_train_batches``, and ``with_grad_accum``'s ``every`` as ``accumulate_every``. As Lightning's:
    ``min(max_steps, epochs * ceil(b / accumulate_every))``, ``b`` an epoch's batches after
    ``limit_train_batches`` (``min(len, k)`` for an int ``k``, ``int(len * p)`` for a fraction ``p``, 0 with
    ``limit_train_batches=0``); an epoch's partial accumulation group makes an update at its end (``run_epochs``'
    flush). ``None`` or Lightning's ``-1`` leaves ``epochs`` or ``max_steps`` unbounded: without ``epochs``,
    ``max_steps``; without either, ``float("inf")`` (Lightning's answer for ``max_epochs=-1``; its default of 1000
    epochs has no counterpart: ``run_epochs`` needs ``epochs=`` or ``max_steps=``). Data without ``len()`` (an
    ``IterableDataset``'s loader) is counted by an int ``limit_train_batches``, else unbounded (Lightning answers
    ``max_steps`` there, -1 without one, and so too with ``limit_train_batches=0``, where this is 0). An estimate, as
    Lightning's: a fit that stops early (``EarlyStopping``) makes fewer updates, and a fit resumed from a checkpoint
    counts from the run's start, as ``epochs`` and ``max_steps`` do. ``train_data`` is data, not a factory of each
    epoch's (pass ``make(0)``, if every epoch has its length); ``accumulate_every`` an int (Lightning refuses
    a schedule here; for ``with_grad_accum(every={epoch: n})`` add each epoch's ``epochs=1`` count at its ``n``).

    >>> import torch
    >>> loader = torch.utils.data.DataLoader(torch.zeros(128, 4), batch_size=8)  # 16 batches
    >>> estimated_stepping_batches(loader, epochs=6, limit_train_batches=12, accumulate_every=2)
    36
    >>> estimated_stepping_batches(loader, epochs=6, max_steps=20, limit_train_batches=12, accumulate_every=2)
    20
    >>> model = torch.nn.Linear(4, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> total = estimated_stepping_batches(loader, epochs=3, accumulate_every=3)  # ceil(16 / 3) = 6 an epoch
    >>> scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=total)
    >>> total
    18
    """
    where = "estimated_stepping_batches"
    bounds = []
    for name, value in (("epochs", epochs), ("max_steps", max_steps)):
        count = None if value is None else as_int(value)
        if count is not None and count == -1:  # (Lightning's "no limit")
            count = None
        elif value is not None and (count is None or count < 1):
            raise ValueError(f"{where}: {name} must be a positive int, None or -1, got {value!r}")
        bounds.append(count)
    epochs, max_steps = bounds
    every = as_int(accumulate_every)
    if every is None or every < 1:
        raise ValueError(f"{where}: accumulate_every must be a positive int (with_grad_accum's every), got "
                         f"{accumulate_every!r}")
    _check_data(train_data, f"{where}: train_data")
    batches = _num_batches(train_data, _check_limit(limit_train_batches, "limit_train_batches"), "limit_train_batches")
    if epochs is None or batches is None:  # (unbounded epochs, or epochs of unknown length)
        return float("inf") if max_steps is None else max_steps
    updates = epochs * math.ceil(batches / every)
    return updates if max_steps is None else min(updates, max_steps)


def run_epochs(
    step: Callable[[TrainState, Any], tuple[TrainState, Metrics]],
    state: TrainState,
    train_data: Iterable,
    *,
    epochs: int | None = None,
    max_steps: int | None = None,
    min_epochs: int | None = None,
    min_steps: int | None = None,
    val: tuple[Callable[[TrainState, Any], tuple[TrainState, Metrics]], Iterable | Mapping[str, Iterable]] | None = None,
    val_every_n_epochs: int | None = 1,
    val_every_n_steps: int | None = None,
    sanity_val_batches: int = 2,
    limit_train_batches: int | float | None = None,
    limit_val_batches: int | float | None = None,
    callbacks: Sequence[Any] | None = (),
    progress: bool = True,
    device: torch.device | str | None = None,
    donate: bool = True,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Run ``step`` over ``train_data`` until ``epochs`` epochs or ``max_steps`` updates (both absolute).

    The step runs donated: no copy per call, and the given state is donated too, so
    training holds one copy of the model and optimizer state, as a hand-written loop does;
    the given state is consumed (using it again raises :class:`loopkit.DonatedStateError`)
    and the returned state is the one to keep. ``donate=False`` copies the given state once
    first, so it stays valid (at the cost of that copy; a ``loss_fn`` that closes over the given
    state's model, refused at the first step, has the gradients it wrote there given back).

    Each epoch iterates the data in an order fixed by the state's seed and the epoch
    number; a state restored mid-epoch continues at ``state.batch_index`` with the batches
    an uninterrupted run would have seen. At the end of each epoch the
    step's ``flush`` finishes a partial gradient-accumulation group (its update counts as any
    other: toward ``max_steps`` and ``val_every_n_steps``). Train data without ``len()`` (an
    ``IterableDataset``) is read one batch ahead where the fit stops (``max_steps``, a callback's
    stop), as Lightning's data fetcher looks ahead for ``is_last_batch``: an epoch whose last batch
    makes the last update ends there (validated, ``state.epoch`` advanced) as it would with a list.
    ``limit_train_batches`` above such data's length takes what there is, as Lightning does.

    ``train_data`` may be a factory of each epoch's data, ``fn(epoch) -> iterable of batches``
    (told from data by this rule: callable, not a class, and not iterable; a list, a tensor or a
    ``DataLoader`` is data; a class, a ``Dataset`` class where its instance was meant, and a torch
    ``Module`` are neither, and refused), called at each epoch's start with the 0-based epoch: Lightning's
    ``reload_dataloaders_every_n_epochs=1`` (a curriculum, data that changes per epoch), and ``=n``
    is ``lambda epoch: make(epoch // n * n)`` (with ``make`` under ``functools.lru_cache(maxsize=1)``
    a loader is built only when Lightning would build one). Each epoch is then that data's: its
    length (``limit_train_batches``' fraction is of it, as is the progress bar's total), its order
    (a ``DataLoader``'s shuffling seeded from the state's seed and the epoch, as above), and a run
    resumed mid-epoch ``k`` calls ``fn(k)`` and skips the batches trained, as the uninterrupted run
    did; but a loader the factory keeps across epochs (the ``=n`` recipe's) with ``persistent_workers=True``
    is not resumed exactly (the uninterrupted run's workers kept their random streams from the epochs
    before; the resumed run warns), as for such a loader given as data: a loader made fresh each epoch
    is, as is one with ``persistent_workers=False``. The factory itself runs with torch's (CPU), numpy's
    and Python's global RNGs seeded from the state's seed, the epoch and the set (the train data, each
    validation set by its name: two sets' random subsets differ), and put back after it: a random subset
    it draws is the same in a resumed run, and the caller's RNGs are untouched; an exception it raises
    comes out as it is, with a note naming the factory and the epoch. A validation set (``val``'s data, or each of
    several: ``{name: factory}``, or a list of factories named as a list of DataLoaders) may be a
    factory too, called with the epoch a validation belongs to (an epoch's end validates that
    epoch) at most once an epoch, at its first validation, the sanity check's for the fit's first
    epoch, as Lightning reloads its val dataloaders; it makes one non-empty set that starts over on
    each pass (not an iterator: the epoch's validations share it). Where training is off
    (``limit_train_batches=0``) the train factory is not called, a validation factory once, for the
    sanity check (as Lightning calls ``val_dataloader()`` for its sanity check then); no factory is
    called after a stop.

    ``min_epochs`` (epochs finished) and ``min_steps`` (updates) hold off a callback's stop
    (``EarlyStopping``, ``Timer``, any ``should_stop``) until both are met, as Lightning's do: the
    fit then stops at the first check past them (the next epoch's start, or the next batch when
    ``min_steps`` is met mid-epoch; that epoch is validated first, as for any stop) if a callback
    still asks then (``EarlyStopping``'s and ``Timer``'s stay asked, as Lightning's
    ``trainer.should_stop``). As in Lightning, ``min_steps`` alone also means one epoch at least.
    ``epochs``/``max_steps`` still end the fit first; a graceful stop (a signal) is no callback's
    and stops at once.

    ``val=(eval_step, val_data)`` validates every ``val_every_n_epochs`` epochs and/or every
    ``val_every_n_steps`` updates, never twice at one update (a step validation on an epoch's
    last update is that epoch's too). ``state.extras`` records the update of the last
    validation: a state saved between an update and its due step validation (a step
    checkpoint, a graceful stop) is validated first when a run resumes from it; ``val_every_n_epochs=None``
    validates by updates only (Lightning's ``check_val_every_n_epoch=None``). Before training,
    ``sanity_val_batches`` validation batches (-1: all of them) run once to catch errors early;
    their results go nowhere. ``limit_*_batches`` take an int
    (batches) or a fraction in (0, 1]; ``limit_train_batches=0`` turns training off, as in
    Lightning (the sanity validation still runs; the state comes back as given, with an empty
    history), ``limit_val_batches=0`` validation. Batches move to ``device`` (default: the model's; ``"auto"``: the accelerator torch finds, else the CPU, as Lightning's ``accelerator="auto"``)
    unless that is the CPU. ``progress`` shows a tqdm bar on a terminal (the step's latest metrics, the
    latest validation's means, the epoch's means when it closes).
    Each epoch's bar counts from where its epoch resumed, and ends at the batch where ``max_steps`` ends the fit.
    A validation (or the sanity check) shows its own bar of batches below it, cleared when done.

    Several validation sets: ``val=(eval_step, {"clean": loader, "noisy": loader})`` validates on
    each in turn (the sanity validation and the limits apply to each, as Lightning's do to each
    of its val dataloaders); their metrics are named ``val/<metric>/<name>`` (``val/loss/noisy``),
    and the callbacks, the loggers, a checkpoint's ``monitor`` and the history see them all, from
    one ``on_validation_end``. A list of DataLoaders, as Lightning's ``val_dataloaders=[a, b]``,
    names them as Lightning does: ``val/loss/dataloader_idx_0``, ``val/loss/dataloader_idx_1``.

    Returns the final state and the history: one dict per epoch with ``epoch``, ``step``,
    ``train/<metric>`` means over the epoch's steps, the latest validation's ``val/<metric>``
    means, and whatever the callbacks' ``on_epoch_end`` returned. Metrics stay on the device
    between epochs (and progress-bar refreshes): the loop itself never syncs the host. The
    running epoch's metrics are kept in ``state.extras`` (``run_epochs/epoch...``, removed at
    the epoch's end), so a checkpoint taken mid-epoch gives a resumed run the same means.

    An epoch cut short by ``max_steps`` (or a callback's stop) is recorded in the history and
    its ``on_epoch_end`` called, as Lightning calls ``on_train_epoch_end`` then; it is not
    finished (``state.epoch`` stays), and the state keeps the callbacks' counters as they were
    before that ``on_epoch_end``: a run resumed from it with a larger budget finishes the epoch
    and calls ``on_epoch_end`` for it once more, ending with the uninterrupted run's history
    records, parameters and callback counters.

    The validation step (``val[0]``) is notified of the fit's end too (``"stop"``,
    ``"fit_end"``, ``"abort"``; a ``with_profiler`` around it closes its trace).

    Graceful stop: on SIGTERM or SIGINT (in the main thread) the current step finishes, the
    step is notified with ``"stop"`` (``with_checkpointing`` saves then), and ``run_epochs``
    returns ``(state, history)`` as usual (the fit is not finished: a script tells by ``state.epoch`` short of
    ``epochs``, or ``state.step`` short of ``max_steps``, with no callback's stop, and exits non-zero so that a
    scheduler requeues it), without a record (nor ``on_epoch_end``) for the interrupted epoch: a run resumed from the state ends that epoch and records it, as an
    uninterrupted run would; a second signal raises ``KeyboardInterrupt`` at
    once, unless it comes within a second of the first (one stop delivered twice, as torchrun's
    agent and SLURM do). The previous signal handlers are restored on return. Under DDP every
    rank stops after the same step, about 0.1 s (or two steps, when steps are slower; up to 32
    when they slow down all at once) after the first signal on any rank (non-blocking votes on
    a gloo group, 0.05 s apart; a rank that stopped alone would leave the others waiting), at
    the end of the accumulation group then under way (each rank's partial gradients are its
    own, and a checkpoint holds rank 0's).

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step, eval_step
    >>> model = torch.nn.Linear(1, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> data = [(torch.ones(2, 1), torch.zeros(2, 1))] * 4
    >>> mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    >>> state, history = run_epochs(train_step(mse), state, data, epochs=1,
    ...     val=(eval_step(lambda m, b: {"mse": mse(m, b)}), data), progress=False)
    >>> sorted(history[0])
    ['epoch', 'step', 'train/loss', 'val/mse']

    A factory of each epoch's data (a curriculum of more batches, each larger, every epoch):

    >>> curriculum = lambda epoch: [(torch.ones(2 + epoch, 1), torch.zeros(2 + epoch, 1))] * (epoch + 1)
    >>> state, history = run_epochs(train_step(mse), state, curriculum, epochs=4, progress=False)
    >>> [(record["epoch"], record["step"]) for record in history]  # epoch 0 was trained above
    [(1, 6), (2, 9), (3, 13)]
    """
    epochs, max_steps, val_every_n_epochs, val_every_n_steps, sanity_val_batches, limit_train_batches, limit_val_batches = (
        _validate_options(
            epochs, max_steps, val, val_every_n_epochs, val_every_n_steps, sanity_val_batches,
            limit_train_batches, limit_val_batches,
        )
    )
    min_epochs, min_steps = _check_minimum(min_epochs, epochs, "min_epochs", "epochs"), _check_minimum(min_steps, max_steps, "min_steps", "max_steps")
    if min_steps is not None and min_epochs is None:  # Lightning's min_epochs default then: a stop asked in the
        min_epochs = 1  # first epoch waits for its end
    _check_state(state, "run_epochs")
    device = _check_device(device, "run_epochs")
    _check_source(train_data, "run_epochs: train_data")
    _refuse_iterator_mid_epoch(train_data, state)
    for name, value in (("donate", donate), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"run_epochs: {name} must be True or False, got {value!r}")
    callbacks = _check_callbacks(callbacks)
    empty_val = [] if val is None else _check_val(val)  # (sets empty on this rank: under DDP, looked at below)
    if not is_factory(train_data):  # (a factory's data: at each epoch's start)
        _num_batches(train_data, limit_train_batches, "limit_train_batches")  # a fraction of 0 batches fails now
    if val is not None and limit_val_batches != 0:
        for name, data in _val_sets(val[1]):
            if not is_factory(data):
                _num_batches(data, limit_val_batches, "limit_val_batches", shard=True, of=name)
    step = as_step(step, "run_epochs: step")
    epoch_window = guarded(EPOCH, step)  # (a guarded step's skipped groups left out of the epoch means, however long)
    if "eval_step" in step.applied:
        raise TypeError("run_epochs: the step is an eval_step, which updates nothing; pass train_step(loss_fn) "
                        "(and the eval_step as val=(eval_step, val_data))")
    # (a step that changes nothing in place, a pure function of one's own, runs as it is when the given state must
    # stay valid: donated, it would mark the state it is given, the caller's, used up)
    step = donated(step) if donate or step.changes_state else step
    val_step = None if val is None else undonated(as_step(val[0], "run_epochs: val's step"))  # (the training's state: never used up by it)
    if val_step is not None and "with_profiler" in step.applied and "with_profiler" in val_step.applied:
        raise ValueError(
            "run_epochs: both the train step and the validation step are under with_profiler; torch.profiler "
            "runs one session at a time (two that overlap crash the process): profile one of them"
        )
    if val is None or limit_val_batches == 0:
        _refuse_val_monitors(step, callbacks)
    _warn_of_lightning_names(step, callbacks)
    if "with_checkpointing" in step.applied:  # a state no checkpoint can hold fails now, not at the first save
        try:
            state.state_dict()
        except TypeError as e:
            raise TypeError(f"run_epochs: with_checkpointing could not save this state: {e}") from None
    # a factory's data is looked at once made, for the resumed epoch only (once a fit: the later epochs' loaders are
    # made, or kept, as in the uninterrupted run)
    resuming = bool(state.epoch or state.batch_index)
    if resuming and not is_factory(train_data):
        resuming = False
        _warn_of_persistent_workers(train_data, train_data, state.epoch, state.batch_index > 0)
    if (step.changes_state and (epochs is None or state.epoch < epochs) and (max_steps is None or state.step < max_steps)
            and limit_train_batches != 0):
        _warn_of_eval_mode(state.model)
    if limit_train_batches != 0:
        _warn_of_a_state_past_the_end(state, epochs, max_steps)
    callers = None  # the caller's state, where the fit trains a copy of it
    if not donate and step.changes_state:
        refuse_copy_if_sharded(state, "run_epochs(..., donate=False)", "A run on a sharded state donates it: leave "
                               "donate=True and go on with the state run_epochs returns")
        callers, state = state, fork(state)
    _to_device_state(state, device)
    move = _mover(device, state)
    hooks = _Hooks(callbacks, min_epochs, min_steps)
    show = progress_wanted(progress)

    shown: dict[str, float] = {}  # the latest validation's means, which the progress bars show

    val_sets = None if val is None else _ValSets(val[1], limit_val_batches)
    size_warning = _SizeWarning("run_epochs: a validation")  # (once a fit, the sanity check's included)

    def validate(current: TrainState, sanity: bool = False, epoch: int | None = None) -> dict[str, float]:
        """The validation of epoch ``epoch`` (``current.epoch`` by default; an epoch's end validates a state at the
        next one): a factory's set is the data it makes for that epoch."""
        metrics: dict[str, float] = {}
        epoch = current.epoch if epoch is None else epoch
        sets = val_sets.at(epoch, current.seed)  # type: ignore[union-attr]
        with step.validating(current):  # (under with_ddp: rank 0's buffers, as DDP's next forward, then its own back)
            for name, data in sets:
                limit = limit_val_batches
                if sanity:
                    limited = _num_batches(data, limit_val_batches, "limit_val_batches", shard=True)
                    if sanity_val_batches != -1:  # (-1: all of them, as Lightning's num_sanity_val_steps=-1)
                        limit = sanity_val_batches if limited is None else min(sanity_val_batches, limited)
                described = "Sanity Checking" if sanity else "Validation"
                means, read = _evaluate(val_step, current, data, limit, device, True, seeded=True,
                                        size_warning=size_warning,
                                        bar=(described if name is None else f"{described} {name}") if show else None,
                                        who="run_epochs' validation", advice="", limit_name="limit_val_batches")
                if not read and not means:  # (under DDP a rank's empty shard is fine: the others' give the means)
                    warnings.warn(f"run_epochs: a validation read no batch: {val_sets.described(name, epoch)} yielded "
                                  "none (an empty stream, or an iterator used up)", RuntimeWarning, stacklevel=3)
                metrics.update({f"val/{_named(k, name)}": v for k, v in means.items()})
        return metrics

    def validation_end(
        current: TrainState, *, notify: bool = True, epoch: int | None = None,
    ) -> tuple[dict[str, float], TrainState]:
        """A validation pass that counts: its means go to the callbacks, then (with their counters
        kept in the state) to the step, whose checkpoints then hold them. At the end of an
        epoch the caller notifies the step after the epoch's callbacks (``notify=False``) and names
        the epoch (``current`` is at the next one)."""
        if bar is not None:  # the epoch's count caught up first (Lightning's bar shows 10/10 while it validates)
            bar.refresh()
        metrics = validate(current, epoch=epoch)
        shown.clear()  # (the progress bars show the latest validation's means, as Lightning's shows val_loss)
        shown.update(metrics)
        if bar is not None:  # (at once, not at the next reading of the metrics)
            bar.refresh()
        kept = {VALIDATED: current.step}
        if notify:  # mid-epoch: the epoch's record, made later (perhaps by a resumed run), holds them
            kept[_EPOCH_VAL] = metrics
        handed = replace_extras(current, {**current.extras, **kept})
        superseded.add(current, handed)  # (the state given, and the one the hooks see: both replaced below)
        current = handed
        for callback in hooks.callbacks:  # (what one returns, the next ones see: the metrics dict is the record's)
            if (hook := _loopkit_hook(callback, "on_validation_end")) is not None:
                _add_validation_extras(metrics, callback, hook(current, metrics))
        current = hooks.keep(current)
        if notify:
            step.notify("validation_end", current, metrics)
        return metrics, current

    validates = val is not None and limit_val_batches != 0
    val_steps = val_every_n_steps if validates else None
    sharded_run = "with_fsdp" in step.applied
    # under with_fsdp each validation forward gathers the parameters from every rank: the sets' counts, checked with
    # the options below (before the first step shards the model, which evaluate's own check waits for)
    val_counts = (_val_counts_under_fsdp(val_sets, limit_val_batches)  # type: ignore[arg-type]
                  if validates and sharded_run and _collective.active() else None)

    # the validation step hears of the fit's end too (a profiler around it closes its trace)
    lifecycle = (step,) if val_step is None else (step, val_step)
    # every rank starts where the others do (a checkpoint folder that is not shared: each rank restored its own)
    _collective.check_same({"step": state.step, "epoch": state.epoch, "batch_index": state.batch_index},
                           "run_epochs: the ranks start from different states (a checkpoint directory must be shared by all ranks)")
    # validation's means are collectives: a rank without val (given on rank 0 only) would leave the others waiting,
    # and the sets' means are reduced in turn (the same sets, in the same order)
    _collective.check_same({"val": validates, "val_every_n_epochs": val_every_n_epochs, "val_every_n_steps": val_steps,
                            "sanity_val_batches": sanity_val_batches if validates else 0,
                            "val sets": val_sets.names() if validates else [],  # type: ignore[union-attr]
                            "val batches": val_counts, "min_epochs": min_epochs, "min_steps": min_steps},
                           "run_epochs: the ranks have other validation options (or min_epochs/min_steps), and every "
                           "rank must validate and stop at the same points (give val= on every rank, each its own shard "
                           "of the validation data, the same named sets" + ("" if val_counts is None else
                           _UNEVEN_VAL) + ")")
    # the transforms make collectives (a log point's means, a save's gather, the log folder's agreement): a rank
    # whose step is wrapped otherwise, or which trains for other epochs, would leave the others waiting in one
    _collective.check_same({"transforms": [t for t in getattr(step, "applied", ()) if t not in _RANK_LOCAL],
                            "loggers": _loggers_of(step), "epochs": epochs, "max_steps": max_steps},
                           "run_epochs: the ranks have other steps (transforms, loggers) or epochs/max_steps, and every "
                           "rank must make the same collectives at the same points (wrap the step alike on every rank, "
                           "with the same loggers: with_logging and with_checkpointing write on rank 0 alone by "
                           "themselves)")
    # ... at the same steps: what decides where a transform makes one (with_logging's every_n_steps, with_grad_accum's
    # every), what (with_fsdp's shard), or how a rank updates its replica (with_grad_clip's max_norm): each
    # transform's agreed_options
    _collective.check_same(_agreed_options(step),
                           "run_epochs: the ranks have other options of the transforms, which decide where and "
                           "what collectives they make, or how each rank updates its model, and every rank must do "
                           "alike (give each transform the same options on every rank)")
    if validates:  # (a shard empty on this rank: fine if another rank's holds data; decided by every rank alike)
        _refuse_val_empty_on_every_rank(val_sets.names(), empty_val)  # type: ignore[union-attr]
    parallel = next((t for t in ("with_ddp", "with_fsdp") if t in step.applied), None)
    if parallel is None and _collective.active():
        _warn_of_ranks_apart(step)
    flags_checked = _collective.active() and parallel is not None  # (requires_grad, at each epoch's start)
    check_sharding = flags_checked  # (at the fit's first batch)
    deferred_stop = False  # a callback's stop asked inside an accumulation group (several ranks, or with_fsdp): at its end
    given = state
    if OVER_RANKS in state.extras:  # restored from a checkpoint holding every rank's running means and RNG: each takes its own
        rank, size = _collective.rank_and_size()
        rng, buffers = own_rng(state.extras, rank, size), own_buffers(state.extras, rank, size)
        state = replace_extras(state, own_share(state.extras, rank, size, model_device(state.model)))
        if rng is not None:
            state = state.evolve(rng=rng)
        if buffers:  # (before a validation due at the resumed step, which reads this rank's BatchNorm statistics)
            with torch.no_grad():
                for name, value in buffers.items():
                    state.model.get_buffer(name).copy_(value)
    bar: ProgressBar | None = None  # the running epoch's (closed on an error too)
    start: TrainState | None = None  # the state the fit's first epoch trains from, before any step has run
    # while a validation or an epoch's end runs: the state from before it, the callbacks' counters in it (what a
    # failure there leaves whole: a relaunch from it validates, and records the epoch, as from a checkpoint)
    closing: TrainState | None = None
    restored = False  # the callbacks' counters are loaded from the state (after that, a failure keeps theirs)
    # states handed to hooks, replaced since: used up at the fit's next update in place (none by a step of one's own
    # that forks: it trains copies, and the states it was given keep their weights)
    superseded = _Superseded(hooks, step.donated and step.changes_state)
    early_changes = any(may_change_state_early(cb) for cb in callbacks)  # hooks that run before the first step
    # a step checkpoint due at an update and not made yet (its hooks, or the epoch's end it was held for, raised): the
    # state an error leaves keeps the mark, and a fit given it (or a checkpoint holding it) makes that save
    save_pending = False
    held_at_start = False  # the owed save is the fit's last update's, made once the finishing epoch is recorded
    flushing = False  # in an epoch's flush (a failure after its update owes on_flush_end, not on_batch_end)
    try:
        with _StopOnSignal() as stop, _TellingAbort(lifecycle, state):
            at_epoch_ends = validates and val_steps is None and val_every_n_epochs == 1  # (and nowhere else)
            # (the state a fit continues the run from: with_logging's loggers rewind)
            step.notify("fit_begin", state, {VALIDATES: float(validates), VALIDATES_AT_EPOCH_ENDS: float(at_epoch_ends)})
            if SAVE_DUE in state.extras:  # (with_checkpointing took it as due at "fit_begin"; the hooks never see it)
                state, save_pending = _unmarked(state), True
            _tell_log_interval(callbacks, step)
            hooks.call("on_fit_start", state)  # first: a callback may build in it what its load_state_dict fills
            superseded.add(state)
            hooks.restore(state)
            restored = True
            hooks.check_plain()
            if HOOKS_OWED in state.extras:  # (its update's step call failed after it): before the save due there
                owed = owed_hooks(state)
                # the mark off first: a hook of them that raises leaves the state as a batch's failing hook does
                state = replace_extras(state, {k: v for k, v in state.extras.items() if k != HOOKS_OWED})
                if owed is not None:
                    _owed_hooks_told(step, hooks, state, owed)
                superseded.add(state)
                state = hooks.keep(state)
            if save_pending:  # made as the run that left it would have: before that update's validation, or (the
                reached = max_steps is not None and state.step >= max_steps  # fit's last) once its epoch is recorded
                held_at_start = (reached and state.batch_index > 0 and limit_train_batches != 0  # (the finishing
                                 and (epochs is None or state.epoch < epochs)  # path below: an unrecorded epoch)
                                 and state.extras.get(RECORDED) != state.step)
                if not held_at_start:
                    step.notify("save_due", state, {})
                    save_pending = False
            if validates and sanity_val_batches != 0:
                with global_rngs_kept():  # a val DataLoader's iterator (and a Dataset's augmentation) draws from the
                    sanity = validate(state, sanity=True)  # global RNGs: a resumed run's extra sanity pass leaves them
                _warn_of_unseen_monitors(step, callbacks, sanity)

            history: list[dict[str, float]] = []
            # a state saved between an update and its due validation (a step checkpoint, a graceful stop)
            resumed_val: dict[str, float] = {}
            if val_steps and state.step and state.step % val_steps == 0 and state.extras.get(VALIDATED) != state.step:
                closing = state
                resumed_val, state = validation_end(state)
                closing = None

            def more(s: TrainState) -> bool:
                if limit_train_batches == 0:  # training is off, as in Lightning (each epoch would be empty)
                    return False
                return (epochs is None or s.epoch < epochs) and (max_steps is None or s.step < max_steps)

            batch_stops = _collective.any_rank(hooks.batch_stops)  # (one rank's hooks make every rank ask)
            if min_epochs is not None or min_steps is not None:
                hooks.overriding = _collective.any_rank(hooks.overriding)
            step.notify("fit_start", state, {})  # (with_checkpointing's step saves now wait for the batch's callbacks)
            fresh = step.returns_fresh_state
            # saved at max_steps, or when a callback had asked to stop, in the middle of an epoch before the epoch was
            # recorded (a crash, a failure in its validation or hooks): only that record is left to make
            unrecorded = (
                state.batch_index > 0 and limit_train_batches != 0 and (epochs is None or state.epoch < epochs)
                and state.extras.get(RECORDED) != state.step
            )
            finishing_stop = unrecorded and hooks.stops(state)  # (then the epoch's validation is still due)
            finishing = finishing_stop or (unrecorded and max_steps is not None and state.step >= max_steps)
            interval_checked = False  # whether the epoch's updates were checked against with_logging's every_n_steps
            # a stop asked for by the resumed validation still ends its epoch, as it did in the run that saved the state
            while ((more(state) or finishing) and (not hooks.stops(state) or resumed_val or finishing) and not stop.agreed
                   and not deferred_stop):
                hooks.call("on_epoch_start", state)
                kept = hooks.keep(state)  # what they know at the epoch's start: a checkpoint mid-epoch holds it
                if hooks.stops(kept) and not resumed_val and not finishing:  # asked in on_epoch_start: no batch of it;
                    break  # the state keeps the counters from before it, as a run resumed from it calls it again
                superseded.add(state)
                state = kept
                data = _train_data(train_data, state)  # (a factory's: made for the epoch, now)
                if resuming:
                    resuming = False
                    _warn_of_persistent_workers(data, train_data, state.epoch, state.batch_index > 0)
                total = _epoch_total(data, limit_train_batches, train_data, state.epoch)
                if not interval_checked:  # (once a fit, at its first epoch: a factory's data has its length then)
                    interval_checked = True
                    _warn_of_a_long_log_interval(step, total, state.epoch)
                # (not counted by a length, an epoch stopped at its last batch is found by a look ahead)
                sized = _counted_by_len(data)
                # (and, where the step is data-parallel, the parameters' requires_grad: a rank whose callback changed
                # it alone would build its wrapper alone at the epoch's first step, and wait until the timeout)
                _collective.check_same(
                    {"batches": total, **(frozen_summary(state.model) if flags_checked else {})},
                    {"batches": f"run_epochs: epoch {state.epoch} has another number of batches on each rank, and "
                                f"{_one_step_per_batch(parallel)} (shard the data evenly)",
                     "requires_grad off": f"run_epochs: the parameters' requires_grad differs between the ranks at "
                                          f"the start of epoch {state.epoch} (changed on some ranks only: in "
                                          f"on_epoch_start, or before the fit), and {parallel} reduces the gradients "
                                          "of the parameters that require one, the same on every rank (change "
                                          "requires_grad alike on every rank)"})
                batches = _epoch_batches(data, state.seed, state.epoch, state.batch_index, total,
                                         None if _collective.active() else state.extras.get(_EPOCH_RNGS))
                elsewhere = False  # (data without a length under DDP: another rank's yielding none ends it here too)
                if not sized and _collective.active() and _collective.any_rank(batches is None) and batches is not None:
                    batches, elsewhere = None, True
                if batches is None:  # training would go on without a step (with max_steps alone, forever)
                    empty = (f"run_epochs: another rank's train_data yielded no batches in epoch {state.epoch} "
                             f"({_one_step_per_batch(parallel)}: shard the data evenly)") if elsewhere else (
                        _no_batches(train_data, total, state.epoch, bool(history)))
                    if not history:  # nothing trained yet: the given state is intact
                        raise ValueError(empty)
                    warnings.warn(empty + "; stopping here", RuntimeWarning, stacklevel=2)
                    break
                if not sized and _collective.active():  # each rank's data may end after another number of batches
                    batches = _while_every_rank_has_one(batches, state.batch_index, functools.partial(
                        _train_data_dropped, state.epoch, parallel))
                if not EPOCH.holds(state.extras):  # kept from a checkpoint taken mid-epoch
                    state = replace_extras(state, EPOCH.start(state.extras))
                if state.batch_index == 0:  # (a resumed epoch keeps its own)
                    rngs = _rngs_after_first(data)
                    if rngs is not None or _EPOCH_RNGS in state.extras:
                        extras = extras_copy(state.extras)
                        extras[_EPOCH_RNGS] = rngs
                        state = replace_extras(state, {k: v for k, v in extras.items() if v is not None})
                state = _counted_batches(state, total)
                if donate and given is not state:  # trained in place from here on: the caller's handle is done
                    given.mark_consumed()
                if start is None:
                    start = state
                # the latest validation of this epoch (one before a crash mid-epoch included)
                last_val = resumed_val or ({k: float(v) for k, v in state.extras.get(_EPOCH_VAL, {}).items()} if validates else {})
                resumed_val = {}
                validated_at = state.extras.get(VALIDATED) if last_val else None  # the update it saw
                started_at = state.step
                bar = ProgressBar(enabled=show, total=_bar_total(total, state, max_steps, step, epochs),
                                  initial=state.batch_index, desc=f"epoch {state.epoch}", shown=shown)
                exhausted = True
                asked_stop = finishing_stop  # a callback asked to stop after one of this epoch's batches
                if (last_val and hooks.stops(state)) or finishing:
                    batches, exhausted = (), _epoch_over(state, total, sized, batches)
                finishing = finishing_stop = False
                held_save = held_at_start  # a step checkpoint of the fit's last update, made once the epoch is recorded
                held_at_start = False
                batch = _END  # (still it after the loop: the epoch had no batch to train, e.g. resumed at its end)
                for batch in batches:
                    if move is not None:
                        batch = move(batch)
                    if check_sharding:
                        check_sharding = False
                        _warn_of_the_same_batch(batch, parallel)
                    for hook in hooks.batch_start:
                        if hook(state, batch) is not None:  # (Lightning's -1: refused before the update)
                            raise _batch_start_returned(hook)
                    before, index = state.step, state.batch_index
                    state, metrics = step(state, batch)
                    if state.batch_index != index + 1:  # a step of one's own that leaves the count to the driver,
                        state = replace(state, batch_index=index + 1)  # which consumed the batch (resume finds its place by it)
                    if metrics:
                        extras = epoch_window.add(state.extras, metrics)
                        if fresh:  # the step's new state, not yet seen by anyone: no second new state per batch
                            put_extras(state, extras)
                        else:
                            state = replace_extras(state, extras)
                    if bar.enabled:
                        bar.tick(metrics)
                    due = SAVE_DUE in state.extras  # a step checkpoint, made once the hooks have run (they never see the mark)
                    if due:
                        state, save_pending = _unmarked(state), True
                    for callback, hook in hooks.batch_end:
                        logged = hook(state, metrics)  # scalars to log (LearningRateMonitor per step)
                        if logged is not None and _scalars(logged, metrics, callback) and state.step != before:
                            step.notify("batch_end", state, logged)
                    if due:
                        superseded.add(state)  # (the on_batch_end hooks' state: the counters are kept in a new one)
                        state, held_save = _save_or_hold(step, hooks, state, max_steps)
                        save_pending = held_save
                    if stop.voting:  # (every rank stops after the same step)
                        stop.poll()
                    # a graceful stop: no flush, no validation; resume continues here. Under DDP not inside an
                    # accumulation group: the other ranks' partial gradients (kept local) are in no checkpoint; under
                    # with_fsdp not on one rank either (fully_shard holds them unsharded: no state dict has them)
                    if stop.agreed and not ((stop.voting or sharded_run) and in_accumulation_group(state)):
                        exhausted = False
                        break
                    hooks_ran = batch_stops  # a callback can only ask to stop from one of its hooks
                    if val_steps and state.step != before and state.step % val_steps == 0:
                        superseded.add(state)  # (the on_batch_end hooks' state)
                        closing = state = hooks.keep(state)
                        last_val, state = validation_end(state)
                        closing = None
                        validated_at, hooks_ran = state.step, True
                    reached = max_steps is not None and state.step >= max_steps
                    # it still validates, as Lightning's should_stop does
                    asked_stop = ((hooks_ran or hooks.stop_asked) and hooks.stops(state)) or deferred_stop
                    if asked_stop and (stop.voting or sharded_run) and in_accumulation_group(state):
                        # at the group's end, as a graceful stop (and kept till then, whatever the flag says meanwhile):
                        # the other ranks' partial gradients (local under DDP) are in no checkpoint, under with_fsdp
                        # no state dict has any
                        asked_stop, deferred_stop = False, True
                    if reached or asked_stop:
                        exhausted = _epoch_over(state, total, sized, batches)
                        break
                asked_stop = asked_stop or deferred_stop  # (put off to the group's end: the epoch's flush ended it)
                if stop.agreed and not exhausted:  # a graceful stop: the resumed run ends this epoch (and counts it)
                    bar.close()
                    state = hooks.keep(state)
                    break
                epoch = state.epoch
                if exhausted:
                    before, flushing = state.step, True
                    state, flush_metrics, due = _flushed(step, state, epoch_window)
                    flushing = False
                    save_pending = save_pending or due
                    flush_updated = state.step != before
                    if flush_updated:  # (the update ran in place, as a batch's step; a flush without one changed nothing)
                        superseded.retire(state)
                        _tell_flush_end(step, hooks, state, flush_metrics)
                        superseded.add(state)
                    if due:  # as after a batch's update: saved before its step validation, or held at max_steps
                        state, held_save = _save_or_hold(step, hooks, state, max_steps)
                        save_pending = held_save
                    if val_steps and flush_updated and state.step % val_steps == 0:  # as after a batch's update
                        closing = state = hooks.keep(state)
                        last_val, state = validation_end(state)
                        closing = None
                        validated_at = state.step
                    if flush_updated:  # a stop asked in its hooks (or its validation's) is one at the epoch's last
                        asked_stop = asked_stop or hooks.stops(state)  # update: the epoch gets its validation
                record: dict[str, float] = {"epoch": epoch, "step": state.step}
                record.update({f"train/{k}": v for k, v in EPOCH.means(state.extras).items()})
                closing = state = hooks.keep(state)  # (the counters after the epoch's batches)
                if exhausted:  # the epoch is done: its means leave the state (a partial one's stay, to go on)
                    extras = {k: v for k, v in EPOCH.clear(state.extras).items()
                              if k not in (_EPOCH_VAL, RECORDED, _BATCHES, _EPOCH_RNGS)}
                    state = replace(replace_extras(state, extras), epoch=epoch + 1, batch_index=0)
                else:
                    extras = extras_copy(state.extras)
                    extras[RECORDED] = state.step
                    state = replace_extras(state, extras)
                # not twice at one update: a step validation on the epoch's last update stands for the epoch's;
                # an epoch a callback stopped short still gets its validation (Lightning validates on should_stop)
                # (val_every_n_epochs=None: no epoch-end validation, but a stop's, as Lightning's check_val_every_n_epoch=None)
                due_epoch = val_every_n_epochs is None or (epoch + 1) % val_every_n_epochs == 0
                validated = (
                    validates and due_epoch and validated_at != state.step
                    and (asked_stop or (exhausted and val_every_n_epochs is not None))
                )
                if validated:
                    last_val, state = validation_end(state, notify=False, epoch=epoch)
                record.update(last_val)
                bar.close({k: v for k, v in record.items() if k.startswith("train/")})  # (and the validation's)
                for cb in hooks.callbacks:
                    if (hook := _loopkit_hook(cb, "on_epoch_end")) is not None:
                        _add_epoch_extras(record, cb, hook(state, dict(record)))
                superseded.add(state)
                if exhausted:  # an epoch cut short keeps the counters from before its on_epoch_end: the run that
                    # finishes it calls on_epoch_end for it again, as the whole run does once; under DDP, a stop
                    hooks.share_stops(state)  # asked on one rank at the epoch's end: every copy (rank 0's) holds it
                    state = hooks.keep(state)
                if validated:  # after every callback of the epoch: a checkpoint taken now holds all their counters
                    step.notify("validation_end", state, last_val)
                step.notify("epoch_end", state, EpochRecord(record, validated=last_val))
                if held_save:  # a relaunch from it finds the epoch recorded (or, if whole, finished): saved once the
                    step.notify("save_due", state, {})  # loggers have written the epoch's rows, which it will not redo
                    save_pending = False
                history.append(record)
                closing = None
                if epochs is None and exhausted and batch is not _END and state.step == started_at:
                    warnings.warn(
                        f"run_epochs: epoch {epoch} went by without state.step advancing, so max_steps={max_steps} would "
                        "never be reached: stopping here (a step of your own advances state.step at each update, as "
                        "train_step does; or give epochs=)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    break
            for told in lifecycle:
                if stop.agreed:
                    told.notify("stop", state, {})
                told.notify("fit_end", state, history[-1] if history else {})
            hooks.call("on_fit_end", state, history)
            return state, history
    except BaseException as error:
        if bar is not None:
            bar.close()
        # an error before the first step changed anything (a batch to_device cannot move, a loss the step
        # refuses, the loss_fn's own exception): the given state is as it was, and stays usable (unless a
        # callback's hook ran before that step: it may have changed the model or optimizer in place)
        if callers is not None and start is not None and state is start and state_at_error(error) is start:
            # (donate=False, the first step left the copy as it found it): a loss_fn closing over the caller's model,
            # not the one it is given, wrote the caller's gradients; they are given back
            grads_as_found(callers, start)
        if start is not None and state is start and not start._consumed and given is not start and not early_changes:
            given.mark_usable()
            leave_intact(error, given)
        elif closing is not None and not closing._consumed:  # in a validation or at an epoch's end
            leave_intact(error, _marked(closing) if save_pending else closing)
        else:  # the newest whole state: before the failing batch, after it when a hook failed, or the new state
            # that a step marked whole after its update (a logger's failed write)
            whole = _owing_hooks(_newest_whole(state, error), state, error, flushing)
            if whole is not None:
                whole = _with_counters(hooks, whole) if restored else whole
                leave_intact(error, _marked(whole) if save_pending else whole)
            elif start is not None and not isinstance(error, (KeyboardInterrupt, SystemExit)):
                with contextlib.suppress(TypeError):  # (__notes__ set to something not a list: the error as it is)
                    error.add_note("(run_epochs: no state of the fit is known whole (loopkit.state_at_error is "
                                   "None): the failure may have come half-way through an update; the model and "
                                   "optimizer objects hold what the updates did to them, as in a plain loop)")
        mark_used_up_by_error(given, FAILED_FIT)  # (the state passed, trained in place: its later use's error
        raise  # names state_at_error, not a returned state)
    finally:  # (the hooks' cycle through it let go: the fit's states are freed once dropped, without a gc)
        superseded.release()

