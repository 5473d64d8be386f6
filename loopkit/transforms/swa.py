"""``with_swa``: Stochastic Weight Averaging, as Lightning's ``StochasticWeightAveraging`` callback does it.

>>> from loopkit.steps import train_step
>>> with_swa(train_step(lambda m, b: None), swa_lrs=0.05, swa_epoch_start=2).applied
('train_step', 'with_swa')
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import SWALR, update_bn

from loopkit._agreement import named_callable
from loopkit._calls import check_call
from loopkit._numbers import as_int, as_real
from loopkit.rng import RNGScope, cuda_index, global_rng_state
from loopkit.state import (
    TrainState, core_module, extras_copy, fork, leave_intact, model_device, replace, scheduler_held, state_at_error,
)
from loopkit.steps import Metrics, Step, WrapperStep, flush_of, run_of
from loopkit.transforms._compose import refuse_wrapping, require_step
from loopkit.transforms.ema import _fitted, _parameters
from loopkit.transforms.pruning import _MASKS as _PRUNING_MASKS
from loopkit.transforms.pruning import _masked_parameters

__all__ = ["SWAStep", "swa_start_inside", "swa_state", "with_swa"]

#: the state's extras: the averages (parameter name -> tensor), how many weights they average, the
#: last epoch averaged, and the epoch at which SWALR took over with the groups' learning rates then
_SWA, _N, _LATEST = "swa/params", "swa/n_averaged", "swa/latest_update_epoch"
_LR_EPOCH, _LR_START = "swa/lr_epoch", "swa/lr_start"
#: what to do about averages that do not fit the model (the end of each such error)
_FIX = (
    "the averages belong to another model: to average this one anew, drop the 'swa/' entries from the state's "
    "extras (state.evolve(extras={k: v for k, v in state.extras.items() if not k.startswith('swa/')})), or "
    "restore a checkpoint of this model"
)

AvgFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _swa_avg(averaged: torch.Tensor, param: torch.Tensor, n_averaged: torch.Tensor) -> torch.Tensor:
    """The equal-weight running mean: Lightning's ``StochasticWeightAveraging.avg_fn``, which is
    ``torch.optim.swa_utils.get_swa_avg_fn()`` (what ``AveragedModel`` uses on the CPU), the same arithmetic."""
    return averaged + (param - averaged) / (n_averaged + 1)


def _averaged(
    previous: Mapping[str, torch.Tensor] | None, names: list[str], params: list[torch.Tensor], n: int,
    avg_fn: AvgFn | None,
) -> dict[str, torch.Tensor]:
    """The averages with ``params`` added as the ``n + 1``-th weights, as new tensors (``previous`` is never
    changed in place: an earlier state keeps its own). The first (``n == 0``) copies the parameters, as
    Lightning's ``update_parameters`` does; ``n`` is a long tensor on each average's device, as there."""
    if previous is None or n == 0:
        return {name: p.clone() for name, p in zip(names, params)}
    counts: dict[torch.device, torch.Tensor] = {}
    out = {}
    for name, p in zip(names, params):
        a = previous[name]
        count = counts.get(a.device)
        if count is None:
            count = counts[a.device] = torch.tensor(n, dtype=torch.long, device=a.device)
        new = avg_fn(a.clone(), p.to(a.device), count) if avg_fn is not None else _swa_avg(a, p.to(a.device), count)
        out[name] = new if new.dtype == a.dtype else new.to(a.dtype)  # Lightning copies into the average: its dtype
    return out


def _swalr_lrs(start: tuple[float, ...], swa_lrs: tuple[float, ...], anneal_epochs: int, strategy: str,
               steps: int) -> tuple[float, ...]:
    """The groups' learning rates after ``steps`` epochs of ``torch.optim.swa_utils.SWALR`` begun at ``start``.

    A real SWALR drives a throwaway optimizer with one group per learning rate, so the values are
    torch's bitwise. (Lightning builds its SWALR with ``last_epoch=max_epochs`` for "cos" and with
    ``initial_lr`` set to the SWA rates: SWALR's rates depend on neither, only on its step count.)

    >>> _swalr_lrs((0.1,), (0.01,), 2, "linear", 0), _swalr_lrs((0.1,), (0.01,), 2, "linear", 2)
    ((0.1,), (0.01,))
    """
    optimizer = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": lr} for lr in start])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": nothing trains here
        scheduler = SWALR(optimizer, swa_lr=list(swa_lrs), anneal_epochs=anneal_epochs, anneal_strategy=strategy)
        for _ in range(steps):
            scheduler.step()
    return tuple(float(group["lr"]) for group in optimizer.param_groups)


def _set_lrs(optimizer: torch.optim.Optimizer, lrs: Sequence[float]) -> list[Any]:
    """Set each param group's learning rate (a tensor one in place); returns the ones it had."""
    before = []
    for group, lr in zip(optimizer.param_groups, lrs):
        old = group["lr"]
        if isinstance(old, torch.Tensor):
            before.append(old.clone())
            old.fill_(lr)
        else:
            before.append(old)
            group["lr"] = lr
    return before


def _put_back_lrs(optimizer: torch.optim.Optimizer, lrs: list[Any]) -> None:
    for group, lr in zip(optimizer.param_groups, lrs):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].copy_(lr)
        else:
            group["lr"] = lr


def _has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers that keep running statistics (the ones update_bn recomputes)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


@attrs.frozen(eq=False)
class SWAStep(WrapperStep):
    """The step :func:`with_swa` returns: from epoch ``swa_start`` (0-based) on, SWALR's learning rate for
    the epoch, the state's own scheduler held still, and the weights the epoch starts from averaged in.

    >>> from loopkit.steps import as_step
    >>> SWAStep(as_step(lambda s, b: (s, {})), swa_lrs=(0.05,), swa_start=3).name
    'with_swa'
    """

    #: one rate for every param group (a 1-tuple) or one per group
    swa_lrs: tuple[float, ...] = (0.05,)
    #: the first epoch (0-based) of SWA, and the last one averaged (None: every epoch from the first on)
    swa_start: int = 0
    swa_end: int | None = None
    annealing_epochs: int = 10
    annealing_strategy: str = "cos"
    avg_fn: AvgFn | None = None
    #: the rates of each SWA epoch, by (start rates, epochs since): a real SWALR is driven once per epoch, not per call
    _lrs_of: dict[tuple[tuple[float, ...], int], tuple[float, ...]] = attrs.field(factory=dict, init=False, repr=False)

    @property
    def name(self) -> str:
        return "with_swa"

    @property
    def agreed_options(self) -> dict[str, Any]:
        """What sets the learning rates and the averaging: a rank with others would update its replica at other
        rates from another epoch on (see :attr:`loopkit.steps.Step.rank_agreed`)."""
        return {"swa_lrs": self.swa_lrs, "swa_start": self.swa_start, "swa_end": self.swa_end,
                "annealing_epochs": self.annealing_epochs, "annealing_strategy": self.annealing_strategy,
                "avg_fn": named_callable(self.avg_fn)}

    @property
    def changes_state(self) -> bool:  # type: ignore[override]
        return True  # it sets the optimizer's learning rates, whatever the inner step does

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if state.epoch < self.swa_start:
            self._check(state)  # a state SWA cannot run on fails at the run's first call, not at swa_start
            return run_of(self.inner)(state, batch)
        return self._swa_call(run_of(self.inner), state, batch, average=True)

    def flush_(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """The epoch's end (``run_epochs`` flushes there): in SWA, the next epoch's SWALR rates are set once its
        updates are done, as Lightning steps SWALR at an epoch's end, so what reads the optimizer between two epochs
        (``LearningRateMonitor``'s epoch records, its step record after an epoch's last update) sees the rates the next
        updates use (the next epoch's first call sets them anyway)."""
        if state.epoch + 1 < self.swa_start:
            self._check(state)
            return flush_of(self.inner)(state)
        if state.epoch < self.swa_start:  # (the first SWA epoch's rates are the ones the optimizer has now)
            new, metrics = flush_of(self.inner)(state)
            return new, metrics
        new, metrics = self._swa_call(flush_of(self.inner), state, average=False)
        extras = new.extras
        if new.optimizer is not None and _LR_START in extras:
            _set_lrs(new.optimizer, self._epoch_lrs(extras, self._rates(new)[1], state.epoch + 1))
        return new, metrics

    def _epoch_lrs(self, extras: Mapping[str, Any], swa_lrs: tuple[float, ...], epoch: int) -> tuple[float, ...]:
        """SWALR's rates for ``epoch`` (a real SWALR driven once per epoch, cached on the step)."""
        key = (tuple(extras[_LR_START]), epoch - extras[_LR_EPOCH])
        lrs = self._lrs_of.get(key)
        if lrs is None:
            if len(self._lrs_of) > 64:  # (a long run: the epochs behind it are not asked again)
                self._lrs_of.clear()
            lrs = self._lrs_of[key] = _swalr_lrs(key[0], swa_lrs, self.annealing_epochs, self.annealing_strategy, key[1])
        return lrs

    def _check(self, state: TrainState) -> None:
        try:
            self._rates(state)
        except ValueError as error:
            raise leave_intact(error, state)

    def _rates(self, state: TrainState) -> tuple[torch.optim.Optimizer, tuple[float, ...]]:
        """The state's optimizer and the SWA rate of each of its param groups, or a ValueError."""
        optimizer = state.optimizer
        if optimizer is None:
            raise ValueError(f"with_swa: the state has no optimizer, whose learning rates SWA sets from epoch "
                             f"{self.swa_start} on; create the state with one")
        groups = len(optimizer.param_groups)
        if len(self.swa_lrs) == 1:
            return optimizer, self.swa_lrs * groups
        if len(self.swa_lrs) != groups:
            raise ValueError(f"with_swa: swa_lrs has {len(self.swa_lrs)} rates, but the optimizer has {groups} param "
                             "groups: give one rate, or one per group")
        return optimizer, self.swa_lrs

    def _swa_call(self, call: Any, state: TrainState, *args: Any, average: bool) -> tuple[TrainState, Metrics]:
        """``call`` on ``state`` in an SWA epoch: first the epoch's start weights averaged in (``average``: once
        per epoch, at its first call, as Lightning's ``on_train_epoch_start``; under ``with_ddp`` rank 0's, the
        wrapper built first, as Lightning's DDP broadcasts them at setup: :meth:`Step.wrap_parallel`), then SWALR's
        rate set, the inner step run with the state's scheduler held still (SWALR replaces it: its ``step()`` does
        nothing, :func:`loopkit.state.scheduler_held`), and the scheduler given back unstepped."""
        extras = state.extras
        new_extras: dict[str, Any] | None = None
        built = False  # whether the data-parallel wrapper was built here (its broadcast changed the parameters)
        try:
            optimizer, swa_lrs = self._rates(state)
            if _LR_START not in extras:  # SWALR takes over from the rates the optimizer has now
                new_extras = extras_copy(extras)
                new_extras[_LR_EPOCH] = state.epoch
                new_extras[_LR_START] = tuple(float(group["lr"]) for group in optimizer.param_groups)
            elif len(extras[_LR_START]) != len(optimizer.param_groups):
                raise ValueError(
                    f"with_swa: SWA began (epoch {extras.get(_LR_EPOCH)}) with {len(extras[_LR_START])} param groups, "
                    f"and the optimizer has {len(optimizer.param_groups)} now: SWALR anneals the groups it began "
                    "with (torch's fails on a group added later too); add param groups (unfreeze) before "
                    "swa_epoch_start, or, for a state of another optimizer, drop the 'swa/' entries from its extras"
                )
            latest = extras.get(_LATEST, -1)
            if average and state.epoch > latest and (self.swa_end is None or state.epoch <= self.swa_end):
                averages = extras.get(_SWA)
                if averages is not None:
                    averages = _fitted(averages, core_module(state.model), "with_swa", _SWA, _FIX)
                n = int(extras.get(_N, 0))
                built = self.inner.wrap_parallel(state)  # every rank averages rank 0's (broadcast) parameters
                try:
                    with torch.no_grad():
                        averaged = _averaged(averages, *_parameters(state), n, self.avg_fn)
                except Exception as error:  # (a user avg_fn's own): the averages are new tensors, nothing changed
                    raise leave_intact(error, None if built else state)
                if new_extras is None:
                    new_extras = extras_copy(extras)
                new_extras.update({_SWA: averaged, _N: n + 1, _LATEST: state.epoch})
        except ValueError as error:
            raise leave_intact(error, None if built else state)
        now = extras if new_extras is None else new_extras
        lrs = self._epoch_lrs(now, swa_lrs, state.epoch)
        used = replace(state, extras=now)
        before = _set_lrs(optimizer, lrs)
        try:  # the scheduler held still (SWALR's rates train), a gradient hook's fn's included, and given back after
            new, metrics = call(used, *args) if used.scheduler is None else scheduler_held(call, used, *args, shown=False)
        except BaseException as error:
            if state_at_error(error) is used:  # nothing changed but the rates (and the parameters, where the wrapper's
                _put_back_lrs(optimizer, before)  # build here broadcast rank 0's, as the inner call's would): put back
                leave_intact(error, None if built else state)
            raise
        return new, metrics


def _swa_lrs(swa_lrs: Any) -> tuple[float, ...]:
    bad = ValueError(f"with_swa: swa_lrs must be a positive number, or a list of one per param group, got {swa_lrs!r}")
    if isinstance(swa_lrs, np.ndarray):
        swa_lrs = swa_lrs.tolist() if swa_lrs.ndim == 1 else swa_lrs.item() if swa_lrs.ndim == 0 else swa_lrs
    values = list(swa_lrs) if isinstance(swa_lrs, (list, tuple)) else [swa_lrs]
    if not values:
        raise bad
    out = []
    for value in values:
        real = as_real(value)
        if real is None or not real > 0 or real == float("inf"):
            raise bad
        out.append(float(real))
    return tuple(out)


def _swa_start(swa_epoch_start: Any, epochs: int | None) -> int:
    """The first epoch of SWA, 0-based, as Lightning reckons it: an int n >= 1 is the n-th epoch (n - 1); a
    float f in [0, 1] is ``int(epochs * f)``, taken as an int so (Lightning's ``swa_start = max(n - 1, 0)``)."""
    start = as_int(swa_epoch_start)
    if start is not None:
        if start < 1 or (epochs is not None and start > epochs):
            within = "" if epochs is None else f" and at most epochs={epochs}"
            raise ValueError(f"with_swa: an int swa_epoch_start counts epochs from 1 (Lightning's): it must be >= 1"
                             f"{within}, got {swa_epoch_start!r}")
        return start - 1
    fraction = as_real(swa_epoch_start)
    if fraction is None or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"with_swa: swa_epoch_start must be an int >= 1 (the epoch, counted from 1) or a float in "
                         f"[0, 1] (a fraction of epochs), got {swa_epoch_start!r}")
    if epochs is None:
        raise ValueError(f"with_swa: a float swa_epoch_start ({swa_epoch_start!r}) is a fraction of the run's epochs: "
                         "pass epochs= (run_epochs' epochs, Lightning's max_epochs), or an int swa_epoch_start")
    return max(int(epochs * fraction) - 1, 0)


def with_swa(
    step: Any,
    swa_lrs: float | Sequence[float],
    *,
    swa_epoch_start: int | float = 0.8,
    epochs: int | None = None,
    annealing_epochs: int = 10,
    annealing_strategy: Literal["cos", "linear"] = "cos",
    avg_fn: AvgFn | None = None,
) -> Step:
    """Stochastic Weight Averaging: Lightning's ``StochasticWeightAveraging(swa_lrs, swa_epoch_start,
    annealing_epochs, annealing_strategy, avg_fn)`` callback as a transform; :func:`swa_state` gives the
    averaged model (Lightning's model at the end of ``fit``).

    ``swa_epoch_start`` is read as Lightning reads it: an int ``n >= 1`` starts SWA at the n-th epoch,
    counted from 1 (``state.epoch == n - 1``); a float ``f`` in [0, 1] at epoch
    ``max(int(epochs * f) - 1, 0)`` (0-based), which needs ``epochs`` (the run's, Lightning's
    ``max_epochs``). From that epoch on:

    - the weights each epoch starts from are averaged in (equal weights, ``avg + (w - avg) / (n + 1)``,
      Lightning's arithmetic; ``avg_fn(avg, w, n_averaged)`` instead if given: one that cannot take three
      arguments is refused when built, and one that raises leaves the state the epoch started from to
      ``loopkit.state_at_error``), at the epoch's first call,
      as Lightning does at ``on_train_epoch_start``: the first average holds the weights from before
      the SWA epochs, and the weights the last epoch trains are never averaged in (Lightning's too);
      with ``epochs`` given, no epoch past ``epochs - 1`` is averaged;
    - the learning rates are ``torch.optim.swa_utils.SWALR``'s (``swa_lrs``, ``annealing_epochs``,
      ``annealing_strategy``), begun from the rates the optimizer has at that epoch's first call and
      stepped once per epoch; the state's own scheduler is held still (not stepped) meanwhile, as
      Lightning swaps it for SWALR, and stays in the state (checkpoints and restore templates keep its keys):
      the inner step's state holds it as a :class:`loopkit.state.HeldScheduler`, whose ``step()`` does nothing
      (a step of one's own that calls ``state.scheduler.step()``, a gradient hook's fn, step nothing there).

    Before that epoch the inner step runs as it is, so the state's scheduler steps as it would without SWA:
    per update under a plain ``train_step``. Lightning's usual set-up, ``configure_optimizers`` returning
    ``[opt], [StepLR(opt, ...)]`` (stepped per epoch), is ``with_epoch_scheduler(with_swa(step, ...))``
    (``with_step_scheduler`` for ``"interval": "step"``): the scheduler steps at the ends of the epochs
    before ``swa_epoch_start`` (the last of them included), SWALR anneals from the rates it left, and the
    scheduler steps no more, as Lightning swaps it out. The scheduler transform goes around ``with_swa``;
    inside it, it is refused (with_swa holds the scheduler still in its inner step from ``swa_epoch_start`` on).

    What it keeps lives in ``state.extras`` (``swa/params``, ``swa/n_averaged``,
    ``swa/latest_update_epoch``, ``swa/lr_epoch``, ``swa/lr_start``): a step stays pure, and a
    checkpoint or ``state_dict`` resumes the run exactly, mid-SWA included. Averages of another model
    are refused before anything changes, naming the parameter.

    Apply it inside ``with_checkpointing`` (which must see the state's scheduler), inside a scheduler
    transform and outside the gradient transforms: ``with_checkpointing(with_epoch_scheduler(with_swa(
    with_grad_accum(train_step(f), every=2), 0.05, swa_epoch_start=3)), directory)``.

    >>> import torch
    >>> from loopkit.driver import run_epochs
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_swa(train_step(lambda m, b: m(b).pow(2).mean()), swa_lrs=0.01, swa_epoch_start=2,
    ...                 annealing_epochs=1)
    >>> state, _ = run_epochs(step, state, [torch.ones(4, 2)] * 3, epochs=4, progress=False)
    >>> state.extras["swa/n_averaged"], state.optimizer.param_groups[0]["lr"]
    (3, 0.01)
    >>> averaged = swa_state(state)  # the average of the weights epochs 1, 2 and 3 started from
    """
    inner = require_step(step, "with_swa", no_eval="an evaluation step trains no weights to average")
    lrs = _swa_lrs(swa_lrs)
    if epochs is not None:
        epochs_ = as_int(epochs)
        if epochs_ is None or epochs_ < 1:
            raise ValueError(f"with_swa: epochs must be an int >= 1 (the run's epochs, Lightning's max_epochs), "
                             f"got {epochs!r}")
        epochs = epochs_
    start = _swa_start(swa_epoch_start, epochs)
    anneal = as_int(annealing_epochs)
    if anneal is None or anneal < 0:
        raise ValueError(f"with_swa: annealing_epochs must be an int >= 0 (SWALR's anneal_epochs), "
                         f"got {annealing_epochs!r}")
    if annealing_strategy not in ("cos", "linear"):
        raise ValueError(f"with_swa: annealing_strategy must be 'cos' or 'linear', got {annealing_strategy!r}")
    if avg_fn is not None:
        _check_avg_fn(avg_fn)
    refuse_wrapping(inner, "with_swa", {
        "with_swa": "the state holds one set of averages and one learning-rate schedule",
        "with_epoch_scheduler": _order("with_epoch_scheduler"),
        "with_step_scheduler": _order("with_step_scheduler"),
        "with_checkpointing": "in SWA epochs with_swa hands its inner step the state with its scheduler held still "
        "(SWALR replaces it), so those checkpoints would not resume exactly; apply with_swa first, e.g. "
        "with_checkpointing(with_swa(step, swa_lrs), directory)",
    })
    return SWAStep(inner, swa_lrs=lrs, swa_start=start, swa_end=None if epochs is None else epochs - 1,
                   annealing_epochs=anneal, annealing_strategy=annealing_strategy, avg_fn=avg_fn)


def _check_avg_fn(avg_fn: Any) -> None:
    """Refuse an ``avg_fn`` that cannot be called as ``avg_fn(averaged, param, n_averaged)`` (its signature, where
    Python can read one: :func:`loopkit._calls.check_call`), before the first SWA epoch's call would raise it.

    >>> _check_avg_fn(lambda avg, w: avg)
    Traceback (most recent call last):
    ...
    TypeError: with_swa: avg_fn must be callable as avg_fn(averaged, param, n_averaged); <lambda>(avg, w) cannot: too many positional arguments
    """
    check_call(avg_fn, "with_swa: avg_fn must be callable as avg_fn(averaged, param, n_averaged)", None, None, None)


def _order(scheduler: str) -> str:
    """Why ``with_swa`` cannot go around scheduler transform ``scheduler``, and the order that works."""
    return (f"from swa_epoch_start on with_swa holds the state's scheduler still in its inner step (SWALR takes "
            f"over), where {scheduler} would step it; apply {scheduler} around it, {scheduler}(with_swa(step, swa_lrs, ...)): "
            "it steps the state's scheduler until swa_epoch_start, and no more from there, as Lightning swaps it for "
            "SWALR")


def swa_start_inside(step: Step) -> int | None:
    """The first SWA epoch (0-based) of a :func:`with_swa` anywhere inside ``step``, or None without one: from that
    epoch on SWALR sets the learning rates, and a scheduler transform around it no longer steps the state's scheduler.

    >>> from loopkit.steps import train_step
    >>> inner = train_step(lambda m, b: None)
    >>> swa_start_inside(with_swa(inner, 0.05, swa_epoch_start=3)), swa_start_inside(inner)
    (2, None)
    """
    while isinstance(step, WrapperStep):
        if isinstance(step, SWAStep):
            return step.swa_start
        step = step.inner
    return None


def swa_state(state: TrainState, train_data: Any = None, *, device: torch.device | str | None = None) -> TrainState:
    """A new state whose model holds the SWA averages of :func:`with_swa`, BatchNorm statistics recomputed.

    What Lightning's model is after a ``fit`` with ``StochasticWeightAveraging``: the averaged weights
    (as they stand: the weights the last epoch trained are not averaged in, as there), and, where the
    model has BatchNorm layers, their running statistics recomputed for them by one pass over
    ``train_data`` in training mode without gradients, as a cumulative average (momentum None):
    ``torch.optim.swa_utils.update_bn(train_data, model, device)``, whose batches are a tensor or a
    list or tuple whose first element the model takes (Lightning's extra epoch runs your
    ``training_step`` instead); ``device`` (default: the model's) is where the inputs go. A forward
    that draws randomness (dropout) draws from a copy of the state's RNG. A model with BatchNorm and
    no ``train_data`` is a ValueError. The new state has no optimizer nor scheduler; ``state`` is
    unchanged. On a state mid-run it gives the averages so far, to validate them:
    ``loopkit.evaluate(eval_step(metric_fn), swa_state(state, train_data), val_data)``.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_swa(train_step(lambda m, b: m(b).pow(2).mean()), swa_lrs=0.01, swa_epoch_start=1)
    >>> state, _ = step(state, torch.randn(4, 2))
    >>> averaged = swa_state(state, [torch.randn(4, 2)])
    >>> averaged.optimizer is None, int(averaged.model[1].num_batches_tracked)
    (True, 1)
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"swa_state: expected a loopkit.TrainState, got {type(state).__qualname__}")
    state.check_usable()
    averages = state.extras.get(_SWA)
    if averages is None:
        raise ValueError(f"swa_state: the state (epoch {state.epoch}) holds no SWA averages yet: with_swa averages "
                         "the weights at the first call of each epoch from swa_epoch_start on")
    copy = fork(replace(state, optimizer=None, scheduler=None))
    model = core_module(copy.model)
    averages = _fitted(averages, model, "swa_state", _SWA, _FIX)
    names, params = _parameters(copy)
    with torch.no_grad():
        torch._foreach_copy_(params, [averages[name] for name in names])
        masks = state.extras.get(_PRUNING_MASKS)
        if masks:  # pruned weights stay pruned (Lightning's averages are of weight_orig, under the mask)
            pruned_names, pruned = _masked_parameters(model, masks)
            torch._foreach_mul_(pruned, [masks[n].to(p.dtype) for n, p in zip(pruned_names, pruned)])
    if _has_batch_norm(model):
        if train_data is None:
            raise ValueError("swa_state: the model has BatchNorm layers, whose running statistics must be recomputed "
                             "for the averaged weights (Lightning's extra epoch): pass the training data, "
                             "swa_state(state, train_data)")
        where = model_device(copy.model) if device is None else torch.device(device)
        index = cuda_index(where)
        scope = RNGScope(copy.rng or global_rng_state(index), index, copy.seed)
        read = [0]
        try:
            update_bn(_inputs(train_data, read), copy.model, where)
        finally:
            scope.discard()
        if not read[0]:
            raise ValueError("swa_state: train_data yielded no batch, so no BatchNorm statistics could be computed "
                             "for the averaged weights (an empty list, or an iterator used up)")
    return copy


def _inputs(data: Any, read: list[int]) -> Any:
    """``data``'s batches for ``update_bn``, each checked to be what it takes; ``read[0]`` counts them."""
    for batch in data:
        if not isinstance(batch, (torch.Tensor, list, tuple)) or (not isinstance(batch, torch.Tensor) and not batch):
            raise TypeError(
                f"swa_state: a batch of train_data is a {type(batch).__qualname__}; torch's update_bn takes a tensor, "
                "or a tuple or list whose first item is the model's input: pass e.g. [(b['x'],) for b in data]"
            )
        read[0] += 1
        yield batch
