"""Steps: ``(state, batch) -> (new_state, metrics)``, pure unless donated.

``train_step(loss_fn)`` builds the training step, ``eval_step(metric_fn)`` the evaluation
step, and ``donate(step)`` lets a step reuse its input state's storage. Gradient-level
transforms (``with_amp``, ``with_grad_accum``, ``with_grad_clip``, ``with_nan_guard``) are
options of a :class:`TrainStep`; whole-step transforms (logging, checkpointing) wrap any
step as a :class:`WrapperStep`.

>>> import torch
>>> from loopkit.state import TrainState
>>> model = torch.nn.Linear(2, 1)
>>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
>>> step = train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
>>> new_state, metrics = step(state, (torch.ones(4, 2), torch.zeros(4, 1)))
>>> new_state.step, state.step, sorted(metrics)
(1, 0, ['loss'])
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import numbers
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, Protocol

import attrs
import numpy as np
import torch

from loopkit._calls import check_call
from loopkit._calls import fn_name as _fn_name
from loopkit._sharded import fsdp_modules, local
from loopkit._window import left_metrics
from loopkit.rng import RNGScope, global_rng_state
from loopkit.rng import cuda_index as _cuda_index
from loopkit.state import (
    _INTACT, FAILED_STEP, TrainState, drop_graph, extras_copy, fork, keep_graph, leave_intact, make_state, model_device,
    refuse_copy_if_sharded, replace, state_at_error, state_hint,
)

__all__ = [
    "EpochRecord",
    "EvalStep",
    "FnStep",
    "GradContext",
    "GradTransform",
    "Precision",
    "SAVE_DUE",
    "Step",
    "SyncRefusal",
    "TrainStep",
    "UpdateStep",
    "WrapperStep",
    "accumulated",
    "as_step",
    "changing_nothing",
    "check_metric",
    "check_takes_model_and_batch",
    "donate",
    "eval_step",
    "evaluating",
    "in_accumulation_group",
    "innermost",
    "kept_observers",
    "leave_intact",
    "leaving_intact",
    "needs_closure",
    "sync_unchanged",
    "train_step",
    "undonated",
]

Metrics = dict[str, torch.Tensor]
_Tensor = torch.Tensor
_default_generator = torch.default_generator
_LBFGS = torch.optim.LBFGS
_set_consumed = TrainState.__dict__["_consumed"].__set__  # TrainState.mark_consumed without its frame
#: ``fn(model, batch)`` as train_step, eval_step and predict take it. ``model`` is typed ``Any``, not ``nn.Module``: a
#: Callable's parameters are contravariant, so ``Callable[[nn.Module, Any], Any]`` would refuse the usual
#: ``def loss_fn(model: Net, batch)`` (``Net`` one's own subclass of ``nn.Module``) under a type checker
ModelFn = Callable[[Any, Any], Any]
LossFn = ModelFn
MetricFn = Callable[[Any, Any], Mapping[str, Any]]

_ACCUM_COUNT = "accum/count"
_Uninitialized = torch.nn.parameter.UninitializedTensorMixin
#: extras: a whole-step transform (with_checkpointing) has a save due at this update, which it makes when
#: the driver sends ``"save_due"`` (after the batch's callbacks); set by it between ``"fit_start"`` and the fit's end.
#: A state an error left before that save was made (``state_at_error``, or a checkpoint taken while the save of the
#: fit's last update waits for its epoch's record) keeps the mark: the fit given it makes the save
SAVE_DUE = "run_epochs/save_due"
#: extras: in the state a step call left whole after its update (a logger's failed write at a log point), that
#: update's hooks ``run_epochs`` did not call: ``{"step", "epoch", "batch_index"}`` (where it was left), ``"hook"``
#: (``"on_batch_end"``, or ``"on_flush_end"`` for an epoch's flush) and ``"metrics"`` (the call's). A fit given that
#: state calls them first (:func:`owed_hooks`), as the uninterrupted run did, before the save due there. Only set on a
#: failure
HOOKS_OWED = "run_epochs/hooks_owed"
#: extras: the update at which ``run_epochs`` recorded the running epoch (one ``max_steps`` or a stop cut short,
#: which a resumed fit that goes on in it finishes and records again at its end; a logger drops the cut record then)
RECORDED = "run_epochs/recorded_step"
#: extras: the update the last validation of ``run_epochs`` that counted saw (an epoch's own validation included; a
#: step checkpoint is written before its step's validation: a run resumed from one runs that validation first)
VALIDATED = "run_epochs/validated_step"
#: the metrics of ``"fit_begin"``: 1.0 when the fit validates (``val`` given, ``limit_val_batches`` not 0), else 0.0
#: (with_checkpointing's default then saves after each validation, else after each epoch, as ModelCheckpoint(); after
#: each epoch too where the fit validates only at every epoch's end: :data:`VALIDATES_AT_EPOCH_ENDS`)
VALIDATES = "run_epochs/validates"
#: the metrics of ``"fit_begin"`` too: 1.0 when the fit validates at every epoch's end and nowhere else
#: (``val_every_n_epochs=1`` without ``val_every_n_steps``; a callback's stop validates too), else 0.0: Lightning's
#: ``val_check_interval=1.0, check_val_every_n_epoch=1``, under which ``ModelCheckpoint()`` saves at every epoch's end,
#: one ``max_steps`` cuts short included, not after each validation (``_should_save_on_train_epoch_end``)
VALIDATES_AT_EPOCH_ENDS = "run_epochs/validates_at_epoch_ends"
#: the driver events a whole-step transform is told even after one inside it raised on them (:meth:`WrapperStep.notify`):
#: those that end the fit, or an evaluation, and release what a transform holds; not those it acts on as done
#: (``"validation_end"``, ``"epoch_end"``, ``"save_due"``, ``"batch_end"``: a save there counts the rows written)
RELEASING_EVENTS = frozenset({"stop", "fit_end", "abort", "evaluate_end"})
_FOUND_INF = "amp/found_inf"
_NONFINITE = "nan_guard/nonfinite"
_BUFFERS = "nan_guard/buffers"  # the model's buffers before the group's first micro-batch (a skip puts them back)


def owed_hooks(state: TrainState) -> Mapping[str, Any] | None:
    """The hooks ``state`` owes (:data:`HOOKS_OWED`) when it is where the failure left them, else None (none owed,
    or a state that went on since): what a fit given ``state`` calls first.

    >>> import torch
    >>> state = TrainState.create(torch.nn.Linear(1, 1)).evolve(step=4, batch_index=4)
    >>> owed = {"step": 4, "epoch": 0, "batch_index": 4, "hook": "on_batch_end", "metrics": {}}
    >>> owed_hooks(state.evolve(extras={HOOKS_OWED: owed}))["hook"], owed_hooks(state)
    ('on_batch_end', None)
    """
    owed = state.extras.get(HOOKS_OWED)
    if owed is None or (owed["step"], owed["epoch"], owed["batch_index"]) != (state.step, state.epoch, state.batch_index):
        return None
    return owed


class EpochRecord(dict):
    """An epoch's history record as ``run_epochs`` tells the step of it (``"epoch_end"``); ``validated`` names the
    metrics that came from a validation, which the step was told of at its ``"validation_end"`` (not those a
    callback's ``on_epoch_end`` added, ``val/auroc`` among them).

    >>> record = EpochRecord({"epoch": 0, "val/loss": 0.5, "val/auroc": 0.9}, validated=["val/loss"])
    >>> record["val/auroc"], sorted(record.validated)
    (0.9, ['val/loss'])
    """

    __slots__ = ("validated",)

    def __init__(self, record: Mapping[str, Any], validated: Iterable[str]) -> None:
        super().__init__(record)
        self.validated = frozenset(validated)


# --- the step protocol -----------------------------------------------------------------------


class Step:
    """Base class of loopkit's steps: callable as ``step(state, batch) -> (state, metrics)``.

    Subclasses implement ``run_``, which may change the given state's tensors in place;
    ``__call__`` hands ``run_`` a copy (:func:`loopkit.state.fork`) unless the step is
    donated, which is how every loopkit step is pure. ``flush`` finishes any partial work
    (a partial gradient-accumulation group) at the end of an epoch. What the ``run_`` and
    ``flush_`` of a subclass of one's own (one defined outside loopkit) return is checked as a
    plain function's is: ``(new_state, metrics)``, each metric a number or a real 0-dim tensor.

    :func:`train_step`, :func:`eval_step` and the transforms are annotated to return ``Step`` (``with_checkpointing``
    its ``CheckpointStep``, for its ``save``): a name re-bound through a pipeline, ``step = with_logging(step, ...)``,
    then type-checks, whichever call binds it first.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> isinstance(eval_step(lambda m, b: {}), Step)
    True
    """

    donated: bool = False
    #: whether ``run_`` changes the state it is given (and so needs a copy when not donated)
    changes_state: bool = True
    #: why the step cannot run on a copy of the state (``with_fsdp``), or None when it can
    requires_donation: str | None = None
    #: a call (``run_``, ``flush_``, ``__call__``) that returns metrics returns a state made by that call, held by
    #: nothing else: the caller may add extras to it in place (:func:`loopkit.state.put_extras`)
    returns_fresh_state: bool = False
    #: whether the step keeps the replicas of a ``torch.distributed`` group's ranks alike itself (its own all-reduce
    #: of the gradients): ``run_epochs`` then does not warn that it trains each rank on its own without ``with_ddp``
    #: or ``with_fsdp``. A subclass of one's own sets it True; a plain function says so with an attribute,
    #: ``my_step.syncs_ranks = True``; a whole-step transform has its inner step's.
    syncs_ranks: bool = False
    #: a class of one's own (defined outside loopkit): what its ``run_`` and ``flush_`` return is checked where
    #: loopkit calls them (:func:`run_of`, :func:`flush_of`); loopkit's own steps make checked results
    _checks_results: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._checks_results = cls.__module__.partition(".")[0] != "loopkit"

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        raise NotImplementedError

    def flush_(self, state: TrainState) -> tuple[TrainState, Metrics]:
        return state, {}

    @property
    def applied(self) -> tuple[str, ...]:
        """Names of the transforms applied to this step, innermost first."""
        return ()

    @property
    def rank_agreed(self) -> tuple[tuple[str, Any], ...]:
        """The options of the applied transforms that decide when (and what) the step makes a collective, or how
        each rank's replica (or shard) is updated, as ``("<transform> <option>", value)`` pairs, innermost first
        (``("with_logging every_n_steps", 50)``), each described as it acts (two spellings that act alike, alike):
        under ``torch.distributed`` every rank must hold the same, or one rank reaches a collective the others do
        not, or trains otherwise (``run_epochs`` compares them when a fit starts). Each transform declares its own,
        as its ``agreed_options`` (a mapping of option to value).

        >>> train_step(lambda m, b: None).rank_agreed
        ()
        """
        return ()

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if self.donated and type(state) is TrainState and not state._consumed:  # _invoke's donated path, inline
            try:
                out = self.run_(state, batch)
                new, metrics = _checked_result(out, self) if self._checks_results else out
            except BaseException as error:
                _consume_unless_intact(state, error)
                raise
            _set_consumed(state, True)
            return (replace(state) if new is state else new), metrics
        return self._invoke(run_of(self), state, batch)

    def flush(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """Finish partial work at the end of an epoch; a no-op for most steps."""
        return self._invoke(flush_of(self), state)

    def prepare(self, state: TrainState) -> TrainState:
        """``state`` shaped as this step's calls shape it, for a template to restore a checkpoint into.

        Most steps keep a state's structure and return ``state`` itself; a step that changes
        the model's modules on its first call (:func:`loopkit.with_qat`) returns a prepared copy,
        at any depth of the pipeline: ``loopkit.restore(step.prepare(template), directory)``.

        >>> import torch
        >>> from loopkit.state import TrainState
        >>> state = TrainState.create(torch.nn.Linear(1, 1))
        >>> train_step(lambda m, b: m(b).sum()).prepare(state) is state
        True
        """
        return state

    def wrap_parallel(self, state: TrainState) -> bool:
        """Give ``state``'s model the data-parallel wrapper this step's next call would give it, now, and whether this
        call built it: under ``with_ddp`` its build broadcasts rank 0's parameters (and buffers) to every rank, which
        the state then holds (changed in place). A whole-step transform that reads the parameters before its inner
        call (``with_swa``'s average at an SWA epoch's start) calls it first, so that every rank reads rank 0's, as
        Lightning's DDP broadcasts them at setup, before any hook. Nothing for most steps (False); under
        ``torch.distributed`` every rank must call it at the same point (a collective when it builds).

        >>> import torch
        >>> from loopkit.state import TrainState
        >>> train_step(lambda m, b: m(b).sum()).wrap_parallel(TrainState.create(torch.nn.Linear(1, 1)))
        False
        """
        return False

    def validating(self, state: TrainState) -> contextlib.AbstractContextManager[None]:
        """The context to evaluate ``state`` in as this step's training sees its model (``run_epochs`` runs its
        validations in it): nothing for most steps; under ``with_ddp`` (``broadcast_buffers``, its default) every
        rank's model holds rank 0's buffers inside, the BatchNorm statistics DDP's next forward would broadcast, as
        Lightning validates through the DDP wrapper, and its own again after. Under ``torch.distributed`` every rank
        must enter it at the same point.

        >>> import torch
        >>> from loopkit.state import TrainState
        >>> with train_step(lambda m, b: m(b).sum()).validating(TrainState.create(torch.nn.Linear(1, 1))):
        ...     pass
        """
        return contextlib.nullcontext()

    def notify(self, event: str, state: TrainState, metrics: Mapping[str, float]) -> None:
        """Tell the step about a driver event; whole-step transforms (logging, checkpoints) act on it.

        ``event`` is ``"fit_begin"`` (``run_epochs`` begins, before its sanity validation and
        callbacks, from ``state``, which holds :data:`SAVE_DUE` where the run that left it owes that
        update's step save: ``"save_due"`` follows for it; metrics: :data:`VALIDATES`, :data:`VALIDATES_AT_EPOCH_ENDS`), ``"fit_start"`` (before the
        first step of ``run_epochs``, after a validation a resumed run owes; metrics empty),
        ``"save_due"`` (after a call that returned a state with :data:`SAVE_DUE` in its extras, once
        the batch's callbacks have run and the call's metrics are in the epoch's means; ``state``
        without that key: a checkpoint due at that update saves it), ``"validation_end"`` (metrics: ``val/...`` means), ``"epoch_end"``
        (metrics: the epoch's history record, ``state`` already at the next epoch),
        ``"stop"`` (a graceful stop on SIGTERM/SIGINT: the current step has finished and
        ``run_epochs`` is about to return; metrics empty; ``state`` may be mid-epoch, where a
        resumed run continues), ``"fit_end"`` (metrics: the last history record; after
        ``"stop"`` too), ``"batch_end"`` (metrics: scalars a callback's ``on_batch_end`` returned after
        an update, such as ``LearningRateMonitor("step")``'s rates) or ``"abort"`` (an exception is leaving ``run_epochs``: release what is
        held and flush what is written; ``state`` is the one the fit started from and may have
        been donated: do not read it; metrics empty). :func:`loopkit.evaluate` sends
        ``"evaluate_end"`` (metrics: its means) to the step it ran, after its last batch; the
        validations of ``run_epochs`` do not. Sanity validation is never notified.

        A step ignores the events it has no use for (more may come). A step of your own that
        wraps another (a callable forwarding ``notify``) hands on the extras of the state the
        inner step returns, as :meth:`TrainState.evolve` does: :data:`SAVE_DUE` travels there. A transform is told
        after the ones inside it; where one of those raised, it is told only :data:`RELEASING_EVENTS`.
        """

    def _invoke(self, run: Callable[..., tuple[TrainState, Metrics]], state: TrainState, *args: Any):
        if type(state) is not TrainState and not isinstance(state, TrainState):
            raise TypeError(f"a step takes a loopkit.TrainState, got {type(state).__qualname__}{state_hint(state)}")
        if state._consumed:
            state.check_usable()
        if not self.donated:
            if self.requires_donation is not None:
                raise TypeError(self.requires_donation)
            if not self.changes_state:
                return run(state, *args)
            refuse_copy_if_sharded(state, f"a step that is not donated ({', '.join(self.applied)})", "Such a step "
                                   "works on a copy of the state at every call: donate it (loopkit.donate(step))")
            copy = fork(state)
            try:
                new, metrics = run(copy, *args)
            except BaseException as error:
                if state_at_error(error) is copy:
                    grads_as_found(state, copy)
                raise
            drop_graph(new)  # the next call forks new parameters: the graph would only hold memory
            return new, metrics
        try:
            new, metrics = run(state, *args)
        except BaseException as error:
            _consume_unless_intact(state, error)
            raise
        state.mark_consumed()
        if new is state:
            new = replace(state)
        return new, metrics


_GROUP_MADE_SINCE = (
    "with_ddp(step) was built before a torch.distributed process group of several ranks existed, so it became the "
    "plain step of one process; now there is one, and this step would train each rank on its own: build the step "
    "after loopkit.distributed.init() (in a torch.multiprocessing.spawn worker, inside the worker, after init)"
)


def _group_made() -> bool:
    """Whether a ``torch.distributed`` process group of more than one rank exists now."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def grads_as_found(state: TrainState, copy: TrainState) -> None:
    """After an error that left ``copy`` (a fork of ``state``: a pure call's, or ``run_epochs(..., donate=False)``'s at
    its first step) as the call found it: ``state``'s gradients as the copy's, which are as ``state``'s were when the
    call began (a ``loss_fn`` that closes over the given state's model, not the one it is given, wrote them). Where a
    parameter's name is the copy's alone (a transform changed the copy's modules), nothing.

    >>> from loopkit.state import TrainState, fork
    >>> state = TrainState.create(torch.nn.Linear(1, 1))
    >>> copy = fork(state)
    >>> state.model(torch.ones(1, 1)).sum().backward()  # (the slip: the given model's backward)
    >>> grads_as_found(state, copy)
    >>> state.model.weight.grad is None
    True
    """
    found = dict(copy.model.named_parameters())
    for name, p in state.model.named_parameters():
        q = found.get(name)
        if q is None or q.shape != p.shape:
            continue
        if q.grad is None:
            p.grad = None
        elif p.grad is not None and p.grad is not q.grad:
            p.grad.copy_(q.grad)


def _consume_unless_intact(state: TrainState, error: BaseException) -> None:
    """After ``error`` left a donated call: ``state`` is used up unless nothing of it changed."""
    if getattr(error, _INTACT, None) is not state:
        _set_consumed(state, FAILED_STEP)  # (its DonatedStateError names no returned state: there is none)


@contextlib.contextmanager
def leaving_intact(state: Any) -> Iterator[None]:
    """The context of a step of one's own's work that changes nothing of ``state``, the state the step was given, in
    place: all of the step, for one that works on a copy (``fork(state)``), else its part before the first in-place
    change. An error raised inside is marked with :func:`leave_intact`: ``state`` stays usable after it, a donated
    one too, and ``run_epochs`` (which donates the state it trains) keeps the fit's updates before the failure
    (``loopkit.state_at_error(error)``), where an unmarked error of a plain function uses the state up.

    >>> from loopkit.state import TrainState, fork, state_at_error
    >>> def step(state, batch):
    ...     with leaving_intact(state):  # only the copy changes below
    ...         new = fork(state)
    ...         loss = new.model(batch).sum()
    ...         return new.evolve(step=new.step + 1), {"loss": loss.detach()}
    >>> state = TrainState.create(torch.nn.Linear(2, 1))
    >>> try:
    ...     donate(step)(state, torch.ones(1, 3))  # a batch of the wrong width
    ... except RuntimeError as error:
    ...     state_at_error(error) is state
    True
    """
    try:
        yield
    except BaseException as error:
        leave_intact(error, state)
        raise


def run_of(step: Step) -> Callable[[TrainState, Any], tuple[TrainState, Metrics]]:
    """``step.run_``, what loopkit calls (``Step.__call__``, a whole-step transform around ``step``): for a
    :class:`Step` class of one's own, with its result checked (:func:`_checked_result`, as a plain function's results
    are), at one class attribute's read for loopkit's own steps. The method itself is left as it is (a zero-argument
    ``super()`` inside it keeps working in an attrs class).

    >>> class Halves(Step):
    ...     def run_(self, state, batch):
    ...         return state, {"half": 0.5}
    >>> Halves._checks_results = True  # (as a class of one's own is made; this one is made in loopkit's doctest)
    >>> from loopkit.state import TrainState
    >>> run_of(Halves())(TrainState.create(torch.nn.Linear(1, 1)), None)[1]
    {'half': tensor(0.5000)}
    >>> run_of(eval_step(lambda m, b: {})).__name__
    'run_'
    """
    return functools.partial(_checked_run, step) if step._checks_results else step.run_


def flush_of(step: Step) -> Callable[[TrainState], tuple[TrainState, Metrics]]:
    """``step.flush_``, with its result checked for a :class:`Step` class of one's own, as :func:`run_of`."""
    return functools.partial(_checked_flush, step) if step._checks_results else step.flush_


def _checked_run(step: Step, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
    return _checked_result(step.run_(state, batch), step)


def _checked_flush(step: Step, state: TrainState) -> tuple[TrainState, Metrics]:
    return _checked_result(step.flush_(state), step, flush=True)


def as_step(step: Any, where: str = "a step") -> Step:
    """Return ``step`` as a :class:`Step`: loopkit steps as they are, plain callables wrapped, refused now (a
    ``TypeError`` naming ``where``, the parameter it was given as) if they cannot be called as ``step(state, batch)``.

    >>> as_step(lambda state, batch: (state, {})).applied
    ('<lambda>',)
    >>> as_step(lambda state: (state, {}), "run_epochs: step")
    Traceback (most recent call last):
    ...
    TypeError: run_epochs: step must take (state, batch); <lambda>(state) cannot: too many positional arguments; a function used as a step is called as step(state, batch) and returns (new_state, metrics)
    """
    if isinstance(step, Step):
        return step
    if callable(step):
        check_call(step, f"{where} must take (state, batch)", None, None,
                   hint="; a function used as a step is called as step(state, batch) and returns (new_state, metrics)")
        return FnStep(step)
    raise TypeError(f"{where} must be callable as step(state, batch), got {type(step).__qualname__}")


def donate(step: Callable[[TrainState, Any], tuple[TrainState, Metrics]]) -> Step:
    """The same step, allowed to reuse its input state's storage in place (no copies).

    The input state is marked as consumed: passing it to a step again, or calling
    ``evolve`` / ``state_dict`` on it, raises :class:`loopkit.DonatedStateError`.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.errors import DonatedStateError
    >>> model = torch.nn.Linear(1, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = donate(train_step(lambda m, b: m(b).sum()))
    >>> new, _ = step(state, torch.ones(2, 1))
    >>> try:
    ...     step(state, torch.ones(2, 1))
    ... except DonatedStateError:
    ...     print("refused")
    refused
    """
    if isinstance(getattr(step, "takes", None), str):  # a step of other states than one TrainState (an ensemble's)
        raise TypeError(
            f"donate cannot wrap {getattr(step, 'name', type(step).__qualname__)}: it takes {step.takes}, not one "
            "loopkit.TrainState; pass donated=True to loopkit.ensemble.train_step, which trains the ensemble in place"
        )
    return _donated_as(as_step(step, "donate: step"), True)


def undonated(step: Step) -> Step:
    """``step`` with its calls not donated: the state given to it stays usable (``evaluate`` and ``run_epochs``'
    validations call one state for every batch). A step that changes nothing in place (an ``eval_step``) then
    runs on the state as it is, with no copy; one that cannot run on a copy (``with_fsdp``'s) is left donated.

    >>> from loopkit.state import TrainState
    >>> state = TrainState.create(torch.nn.Linear(1, 1))
    >>> step = undonated(donate(eval_step(lambda m, b: {"out": m(b).sum()})))
    >>> _ = step(state, torch.ones(2, 1)); _ = step(state, torch.ones(2, 1))  # the state stays usable
    >>> step.donated
    False
    """
    if not step.donated or step.requires_donation is not None:
        return step
    return _donated_as(step, False)


def _donated_as(step: Step, flag: bool) -> Step:
    if attrs.has(type(step)):
        return attrs.evolve(step, donated=flag)
    changed = copy.copy(step)  # a Step subclass of one's own, not an attrs class
    object.__setattr__(changed, "donated", flag)
    return changed


@attrs.frozen(eq=False)
class FnStep(Step):
    """A plain function used as a step; it keeps its own purity contract (no copy is made).

    >>> FnStep(lambda s, b: (s, {})).changes_state
    False
    """

    fn: Callable[[TrainState, Any], tuple[TrainState, Metrics]]
    donated: bool = False
    changes_state = False

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        try:
            out = self.fn(state, batch)
        except TypeError as error:
            if "'TrainState' object is not callable" not in str(error):
                raise
            raise leave_intact(TypeError(  # a loss_fn given as a step calls its "model" first: nothing changed yet
                f"{_fn_name(self.fn)} called the TrainState as a model: a function used as a step gets (state, batch); "
                "a loss_fn(model, batch) goes in train_step(loss_fn), a metric_fn(model, batch) in eval_step(metric_fn)"
            ), state) from error
        return _checked_result(out, self.fn)

    def flush_(self, state: TrainState) -> tuple[TrainState, Metrics]:
        flush = getattr(self.fn, "flush", None)
        return _checked_result(flush(state), self.fn, flush=True) if flush is not None else (state, {})

    def notify(self, event: str, state: TrainState, metrics: Mapping[str, float]) -> None:
        notify = getattr(self.fn, "notify", None)
        if notify is not None:
            notify(event, state, metrics)

    @property
    def functions(self) -> tuple[Callable[..., Any], ...]:
        """``fn``, then each function under it through ``functools.partial`` layers (``.func``), the last one's own.

        >>> import functools
        >>> def my_step(state, batch, scale): return state, {}
        >>> [getattr(f, "__name__", "partial") for f in FnStep(functools.partial(my_step, scale=1)).functions]
        ['partial', 'my_step']
        """
        layers = [self.fn]
        while isinstance(layers[-1], functools.partial):
            layers.append(layers[-1].func)
        return tuple(layers)

    @property
    def syncs_ranks(self) -> bool:  # type: ignore[override]
        """The function's own ``syncs_ranks`` attribute (see :attr:`Step.syncs_ranks`), read through
        ``functools.partial`` layers (:attr:`functions`: a partial's, or its function's), False without one."""
        return any(getattr(fn, "syncs_ranks", False) is True for fn in self.functions)

    @property
    def applied(self) -> tuple[str, ...]:
        """The function's name: the one under any ``functools.partial`` layers (:attr:`functions`).

        >>> import functools
        >>> def my_step(state, batch, scale): return state, {}
        >>> FnStep(functools.partial(my_step, scale=1)).applied
        ('my_step',)
        """
        return (_fn_name(self.functions[-1]),)


def _agreed(transform: str, options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """``transform``'s ``options`` as :attr:`Step.rank_agreed`'s pairs.

    >>> _agreed("with_logging", {"every_n_steps": 5})
    (('with_logging every_n_steps', 5),)
    """
    return tuple((f"{transform} {option}", value) for option, value in options.items())


def _accumulation_as_it_acts(every: int, schedule: tuple[tuple[int, int], ...]) -> int | dict[int, int]:
    """``with_grad_accum``'s factor as the epochs see it, one description for every spelling of it: the factor where
    every epoch has the same (``every=2``, ``{0: 2}``, ``{0: 2, 3: 2}``), else the schedule without its entries that
    repeat the factor before them (``{0: 2, 2: 2, 4: 4}`` is ``{0: 2, 4: 4}``).

    >>> _accumulation_as_it_acts(2, ()), _accumulation_as_it_acts(2, ((0, 2), (2, 2)))
    (2, 2)
    >>> _accumulation_as_it_acts(4, ((0, 2), (2, 2), (4, 4), (6, 4)))
    {0: 2, 4: 4}
    """
    changes: dict[int, int] = {}
    for first, factor in schedule or ((0, every),):
        if not changes or factor != list(changes.values())[-1]:
            changes[first] = factor
    return changes[0] if len(changes) == 1 else changes


@attrs.frozen(eq=False)
class WrapperStep(Step):
    """Base of whole-step transforms: runs ``inner`` in place, then does its own work.

    Subclasses override ``after`` (and optionally ``before``); ``name`` is the transform's
    public name, used in composition errors.

    >>> WrapperStep(as_step(lambda s, b: (s, {}))).applied
    ('<lambda>', 'WrapperStep')
    """

    inner: Step
    donated: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def changes_state(self) -> bool:  # type: ignore[override]
        return self.inner.changes_state

    @property
    def requires_donation(self) -> str | None:  # type: ignore[override]
        return self.inner.requires_donation

    @property
    def syncs_ranks(self) -> bool:  # type: ignore[override]
        return self.inner.syncs_ranks

    @property
    def applied(self) -> tuple[str, ...]:
        return self.inner.applied + (self.name,)

    @property
    def agreed_options(self) -> Mapping[str, Any]:
        """This transform's options that decide when it makes a collective (see :attr:`Step.rank_agreed`): none."""
        return {}

    @property
    def rank_agreed(self) -> tuple[tuple[str, Any], ...]:
        return self.inner.rank_agreed + _agreed(self.name, self.agreed_options)

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        new, metrics = run_of(self.inner)(state, batch)
        return self.after(new, metrics, end_of_epoch=False)

    def flush_(self, state: TrainState) -> tuple[TrainState, Metrics]:
        new, metrics = flush_of(self.inner)(state)
        return self.after(new, metrics, end_of_epoch=True)

    def after(self, state: TrainState, metrics: Metrics, *, end_of_epoch: bool) -> tuple[TrainState, Metrics]:
        return state, metrics

    def prepare(self, state: TrainState) -> TrainState:
        return self.inner.prepare(state)

    def wrap_parallel(self, state: TrainState) -> bool:
        return self.inner.wrap_parallel(state)

    def validating(self, state: TrainState) -> contextlib.AbstractContextManager[None]:
        return self.inner.validating(state)

    def notify(self, event: str, state: TrainState, metrics: Mapping[str, float]) -> None:
        """Tell ``inner``, then this transform (:meth:`on_event`). Where ``inner`` raised, this transform is told only
        an event that ends or releases (:data:`RELEASING_EVENTS`: a logger's disk full at ``"fit_end"`` leaves no
        checkpointer outside it deferring its saves), never one it would act on as done (a save at ``"epoch_end"``
        would count an epoch recorded whose row a logger inside failed to write: a relaunch from it would lose it).

        >>> class Told(WrapperStep):
        ...     def on_event(self, event, state, metrics):
        ...         print("told", event)
        >>> class Fails:
        ...     def __call__(self, state, batch):
        ...         return state, {}
        ...     def notify(self, event, state, metrics):
        ...         raise OSError("disk full")
        >>> step = Told(as_step(Fails()))
        >>> for event in ("epoch_end", "fit_end"):
        ...     try:
        ...         step.notify(event, None, {})
        ...     except OSError:
        ...         pass
        told fit_end
        """
        try:
            self.inner.notify(event, state, metrics)
        except BaseException:
            if event in RELEASING_EVENTS:
                self.on_event(event, state, metrics)
            raise
        self.on_event(event, state, metrics)

    def on_event(self, event: str, state: TrainState, metrics: Mapping[str, float]) -> None:
        """This transform's own reaction to a driver event (see :meth:`Step.notify`)."""


def innermost(step: Step) -> Step:
    """The step at the core of ``step``, whatever whole-step transforms wrap it.

    >>> core = as_step(lambda s, b: (s, {}))
    >>> innermost(WrapperStep(WrapperStep(core))) is core
    True
    """
    while isinstance(step, WrapperStep):
        step = step.inner
    return step


@attrs.frozen(eq=False)
class UpdateStep(WrapperStep):
    """Base of whole-step transforms that act once per optimizer update: when a call (or an
    end-of-epoch flush) moved ``state.step``, :meth:`after_update` gets the new state and the
    call's metrics.

    Not after a micro-batch of an accumulation group, a skipped update or a skipped batch.

    >>> UpdateStep(as_step(lambda s, b: (s, {}))).applied
    ('<lambda>', 'UpdateStep')
    """

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        before = state.step
        try:
            new, metrics = run_of(self.inner)(state, batch)
        except BaseException as error:
            self._after_left_update(error, before)
            raise
        return (new if new.step == before else self.after_update(new, metrics)), metrics

    def flush_(self, state: TrainState) -> tuple[TrainState, Metrics]:
        before = state.step
        try:
            new, metrics = flush_of(self.inner)(state)
        except BaseException as error:
            self._after_left_update(error, before)
            raise
        return (new if new.step == before else self.after_update(new, metrics)), metrics

    def after_update(self, state: TrainState, metrics: Metrics) -> TrainState:
        """The state after an update, with this transform's work done (may be ``state`` itself)."""
        return state

    def after_left_update(self, state: TrainState, metrics: Metrics) -> TrainState:
        """:meth:`after_update` for an update whose call raised after it (a ``with_logging`` inside whose write failed
        at a log point): by default the same, so that the fit given the state the error left goes on as the
        uninterrupted run (an average moved, a pruning point pruned). Only on a failure, on the failing rank alone:
        a transform whose ``after_update`` makes a collective overrides it."""
        return self.after_update(state, metrics)

    def _after_left_update(self, error: BaseException, before: int) -> None:
        """When ``error`` left an inner call's updated state whole (:func:`loopkit._window.leave_updated`), that
        state with :meth:`after_left_update` done, left whole in its place; else nothing."""
        metrics = left_metrics(error)
        whole = state_at_error(error)
        if metrics is None or whole is None or whole.step == before:
            return
        try:
            done = self.after_left_update(whole, metrics)
        except Exception as second:
            error.add_note(f"{self.name}'s work after that update failed too ({type(second).__name__}: {second}); "
                           "the state left is the update's without it")
            return
        leave_intact(error, done)


# --- protocols the gradient-level transforms implement ------------------------------------------


_NO_METRICS: Mapping[str, str] = types.MappingProxyType({})


class GradContext:
    """What a gradient transform sees: the parameters with gradients, and the step's flags.

    ``found_inf`` is set by a float16 loss scaler after unscaling; ``nonfinite`` by guards.
    Both are on-device tensors (1.0 = the update must be skipped). ``agree`` is None in one
    process; under ``with_ddp`` it all-reduces a flag tensor with MAX, so that a transform
    that decides on the host (a guard that raises) decides the same on every rank.

    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> model(torch.ones(3, 2)).sum().backward()
    >>> ctx = GradContext(state, {}, found_inf=None, nonfinite=None)
    >>> [tuple(g.shape) for g in ctx.grads], float(ctx.unscale_and_check())  # all finite: 0.0
    ([(1, 2), (1,)], 0.0)
    """

    __slots__ = ("state", "params", "metrics", "found_inf", "nonfinite", "agree", "taken", "checked", "updating",
                 "agreed_refusal")

    def __init__(
        self, state: TrainState, metrics: Metrics, found_inf: Any, nonfinite: Any, agree: Any = None,
        taken: Mapping[str, str] = _NO_METRICS,
    ) -> None:
        self.state = state
        self.params = _params_with_grads(state.optimizer)
        self.metrics = metrics
        self.found_inf = found_inf
        self.nonfinite = nonfinite
        self.agree = agree
        self.taken = taken  # the metric names the step's transforms report -> the transform (see _taken_by)
        #: a guard checked these gradients already (from inside a value clipping, before it clamped them)
        self.checked = False
        #: the optimizer's update began: an error from now on comes half-way through it
        self.updating = False
        #: the error being raised refuses the gradients on every rank alike (a raising guard's, its flag agreed)
        self.agreed_refusal = False

    def refresh_params(self) -> None:
        """Take the parameters with gradients anew (after code of the user's gave or took some)."""
        self.params = _params_with_grads(self.state.optimizer)

    def taken_by(self, key: str) -> str | None:
        """The transform of the step that reports a metric named ``key``, or None."""
        return _taken_by(key, self.taken)

    @property
    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params]  # type: ignore[misc]

    def unscale_and_check(self, inv_scale: torch.Tensor | None = None, *, scaler: bool = False) -> torch.Tensor | None:
        """Multiply each floating or complex gradient by ``inv_scale`` in place (None: leave them) and
        return a 1-element float flag on the first gradient's device, 1.0 where any holds inf/NaN (None
        where no gradient is floating or complex).

        One ``torch._amp_foreach_non_finite_check_and_unscale_`` per device and dtype, as
        ``torch.amp.GradScaler`` does; a sparse gradient counts by its values (coalesced first
        when float16: duplicates summed in float16 may overflow), a complex one by its real view
        (its real and imaginary parts). ``scaler``: the float16 loss scaler's unscaling, which refuses a float16
        gradient (``ValueError``), as ``torch.amp.GradScaler`` does: its scaled values overflow where float32's would not.
        """
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in self.params:
            g: torch.Tensor = local(p.grad)  # type: ignore[arg-type]  (under with_fsdp: this rank's shard)
            if not (g.is_floating_point() or g.is_complex()):
                continue
            if g.is_sparse:
                if g.dtype is torch.float16:
                    p.grad = g = g.coalesce()
                g = g._values()
            if g.is_complex():
                g = torch.view_as_real(g)  # (a view: unscaling it unscales the gradient)
            groups.setdefault((g.device, g.dtype), []).append(g)
        if scaler and any(dtype is torch.float16 for _, dtype in groups):
            raise _half_parameters_refused(self.state)
        found: torch.Tensor | None = None
        for (device, _), grads in groups.items():
            f = torch.zeros(1, dtype=torch.float32, device=device)  # (whatever the caller's default dtype)
            scale = torch.ones(1, dtype=torch.float32, device=device) if inv_scale is None else inv_scale.to(device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, f, scale)
            found = f if found is None else found.add_(f.to(found.device))
        return None if found is None else found.clamp_(max=1.0)

    def flag_nonfinite(self, flag: torch.Tensor) -> None:
        """OR ``flag`` (a 0-dim or 1-element float tensor) into the skip flag."""
        flag = flag.reshape(())
        self.nonfinite = flag if self.nonfinite is None else torch.maximum(self.nonfinite, flag)


def _trains_half(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer trains a float16 parameter (one that requires grad: a frozen one gets no gradient)."""
    return any(p.dtype is torch.float16 and p.requires_grad for group in optimizer.param_groups for p in group["params"])


def _half_parameters_refused(state: TrainState) -> ValueError:
    """The error of float16 ``with_amp`` given float16 parameters to train (``model.half()``), naming the first."""
    trained = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    name = next((n for n, p in state.model.named_parameters()
                 if id(p) in trained and p.dtype is torch.float16 and p.requires_grad), "?")
    return ValueError(
        f"with_amp(torch.float16): parameter {name!r} is float16, and the loss scaler unscales float32 gradients (torch's "
        "GradScaler, and so Lightning's precision='16-mixed', refuses float16 ones: scaled, they overflow); keep the "
        "model in float32 (autocast runs its forward in float16), or train it in float16 without with_amp"
    )


def _params_with_grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters that hold a gradient, in the optimizer's order."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


class GradTransform(Protocol):
    """A transform that acts on gradients before the optimizer update.

    :meth:`TrainStep.add_grad_transform` puts one in a step (the ``with_grad_*`` transforms do): ``on_loss``
    sees each call's loss, ``on_grads`` the gradients before the update (``ctx.metrics`` takes what it reports).

    >>> import torch
    >>> class HalfTheGradients:
    ...     name = "half"
    ...     def on_loss(self, loss, state, ctx): pass
    ...     def on_grads(self, ctx):
    ...         torch._foreach_mul_(ctx.grads, 0.5)
    >>> step = train_step(lambda m, b: m(b).sum()).add_grad_transform(HalfTheGradients())
    >>> model = torch.nn.Linear(1, 1, bias=False); _ = model.weight.data.fill_(1.0)
    >>> state, _ = step(TrainState.create(model, torch.optim.SGD(model.parameters(), lr=1.0)), torch.ones(2, 1))
    >>> float(state.model.weight.detach())  # 1 - 0.5 * 2
    0.0
    >>> step.applied
    ('train_step', 'half')
    """

    name: str  # optional too: ``keeps_buffers`` (True: a skip it flags also puts the model's buffers back), and
    # ``hides_nonfinite`` (True: it may make a non-finite gradient finite; a guard around it then sets its ``check``
    # field, a function of the GradContext it calls before it acts)

    def on_loss(self, loss: torch.Tensor, state: TrainState, ctx: GradContext) -> None: ...

    def on_grads(self, ctx: GradContext) -> None: ...


class Precision(Protocol):
    """Mixed precision: an autocast context and, for float16, a loss scaler. ``with_amp`` gives a
    ``TrainStep`` one (``loopkit.transforms.amp.AmpPrecision``).

    >>> import torch
    >>> from loopkit.transforms.amp import with_amp
    >>> precision = with_amp(train_step(lambda m, b: m(b).sum()), dtype=torch.bfloat16).precision
    >>> precision.name, precision.scales_loss
    ('with_amp', False)
    """

    name: str
    scales_loss: bool

    def autocast(self, device_type: str) -> Any: ...

    def scale(self, loss: torch.Tensor, extras: dict[str, Any], device: torch.device) -> torch.Tensor: ...

    # ``share``: what the loss was divided by before ``scale`` (a micro-batch's gradient unscaled on its own under
    # with_grad_accum); the unscaling multiplies it back, so the gradient is of the micro-batch's whole loss
    def unscale(self, ctx: GradContext, extras: dict[str, Any], *, share: int = 1) -> None: ...

    def after_update(self, ctx: GradContext, extras: dict[str, Any]) -> None: ...


# --- metrics and losses ------------------------------------------------------------------------


def check_metric(value: Any, key: Any, where: str) -> torch.Tensor:
    """Return ``value`` as a detached 0-dim tensor, or raise naming the metric and its source.

    A tensor that may share its storage with the state's comes copied, so that the metric keeps the value it had
    when reported, whatever the update then changes in place: a leaf that requires grad (a parameter), a view, or
    one changed in place since it was made (``value._version``, which a tensor detached from it shares: every
    parameter after an ``nn.init`` or an update, every buffer forward updates). A freshly computed one (a loss, its
    ``.detach()``, an accuracy under ``no_grad``) is taken as it is, detached: no copy on a step's path. An inference
    tensor (one made under ``torch.inference_mode()``: an ``eval_step`` called inside it, an accuracy a ``loss_fn``
    computes there) keeps no version counter and says of no view what it views: it is copied, a normal tensor when
    the copy is made outside inference mode (what in-place use outside it then allows). The gap:
    a parameter reported detached (``p.detach()``, not ``p``) while it has never been changed in place (made from a
    literal, ``nn.Parameter(torch.tensor(1.0))``, before its first update; or the fresh copy in a state forked by a
    step that is not donated) reads as the update leaves it: report ``p`` itself, or ``p.detach().clone()``.

    >>> check_metric(0.5, "acc", "metric_fn f")
    tensor(0.5000)
    >>> import numpy as np
    >>> check_metric(np.float32(0.25), "acc", "metric_fn f")
    tensor(0.2500)
    >>> scale = torch.nn.Parameter(torch.tensor(1.0))
    >>> metric = check_metric(scale, "scale", "loss_fn f")
    >>> with torch.no_grad():
    ...     _ = scale.add_(1.0)  # (as an optimizer's update)
    >>> metric
    tensor(1.)
    >>> fresh = torch.tensor([1.0, 3.0]).mean()
    >>> check_metric(fresh, "acc", "metric_fn f").data_ptr() == fresh.data_ptr()  # (not copied)
    True
    >>> with torch.inference_mode():
    ...     acc = torch.tensor([1.0, 0.0]).mean()
    >>> check_metric(acc, "acc", "loss_fn f").is_inference()
    False
    >>> check_metric("high", "acc", "metric_fn f")
    Traceback (most recent call last):
    ...
    TypeError: metric 'acc' from metric_fn f is a str; a metric must be a number or a 0-dim tensor
    """
    if not isinstance(key, str):
        raise TypeError(f"metric names from {where} must be strings, got {key!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"metric '{key}' from {where} is a tensor of shape {tuple(value.shape)} and dtype "
                f"{value.dtype}; a metric must be a real 0-dim tensor (reduce it, e.g. .mean())"
            )
        metric = value.detach().reshape(())
        if value.is_inference():  # no version counter, no _base even for a view: copied (outside inference_mode, normal)
            return metric.clone()
        return metric.clone() if (value.requires_grad and value.is_leaf) or value._base is not None or value._version else metric
    try:
        if isinstance(value, (bool, np.bool_)):
            pass
        elif isinstance(value, numbers.Integral):  # a count: int64, summed exactly (float32 rounds past 2**24)
            return torch.tensor(int(value))
        elif isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iu":
            return torch.tensor(int(value.reshape(())))
        elif isinstance(value, (np.floating, np.ndarray)) and value.size == 1 and value.dtype.kind == "f":
            return torch.tensor(np.asarray(value).reshape(()))  # numpy's own precision kept (float64 stays float64)
        elif isinstance(value, numbers.Real):
            return torch.tensor(float(value))
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:  # past int64, a longdouble: torch has no such
        raise TypeError(f"metric '{key}' from {where} is {value!r}, which torch cannot hold: {e}") from None
    raise TypeError(f"metric '{key}' from {where} is a {type(value).__qualname__}; a metric must be a number or a 0-dim tensor")


def check_takes_model_and_batch(fn: Callable[..., Any], where: str) -> None:
    """Raise ``TypeError`` now if ``fn`` cannot be called as ``fn(model, batch)`` (judged by its signature), or is
    a ``torch.nn.Module`` whose ``forward`` is torch's own (a criterion such as ``nn.MSELoss()`` takes
    ``(prediction, target)``, a model its inputs: its ``*args`` call would take any two arguments and fail at the
    first batch). A Module of one's own whose ``forward`` takes ``(model, batch)`` (a loss holding buffers) is a
    function as any: its ``forward``'s signature is judged.

    >>> check_takes_model_and_batch(lambda batch: batch, "train_step: loss_fn")
    Traceback (most recent call last):
    ...
    TypeError: train_step: loss_fn must take (model, batch); <lambda>(batch) cannot: too many positional arguments
    >>> check_takes_model_and_batch(torch.nn.MSELoss(), "train_step: loss_fn")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: train_step: loss_fn must take (model, batch), and it is a torch.nn.Module (MSELoss), ... wrap it in a function, e.g. lambda model, batch: criterion(model(batch[0]), batch[1])
    """
    hint = ": wrap it in a function, e.g. lambda model, batch: criterion(model(batch[0]), batch[1])"
    if isinstance(fn, torch.nn.Module):
        if type(fn).forward.__module__.split(".")[0] == "torch":
            raise TypeError(
                f"{where} must take (model, batch), and it is a torch.nn.Module ({type(fn).__qualname__}), called with "
                f"its own inputs (a loss module takes (prediction, target), a model its input){hint}"
            )
        check_call(fn.forward, f"{where} must take (model, batch), and it is a torch.nn.Module: its forward must take them",
                   None, None, hint=f" (a model's forward takes its inputs){hint}")
        return
    check_call(fn, f"{where} must take (model, batch)", None, None)


def _checked_result(out: Any, step: Any, *, flush: bool = False) -> tuple[TrainState, Metrics]:
    """``out``, what a call of a step of one's own returned (``flush``: what its end-of-epoch flush returned), as
    ``(new_state, metrics)`` with each metric checked by :func:`check_metric`, or a ``TypeError`` naming ``step``.
    A plain function's results and a :class:`Step` subclass's (one defined outside loopkit) are checked so; loopkit's
    own steps make checked metrics (no host sync; a tensor that may be the state's own comes copied).

    >>> from loopkit.state import TrainState
    >>> state = TrainState.create(torch.nn.Linear(1, 1))
    >>> def solve(state): pass
    >>> _, metrics = _checked_result((state, {"fit": 0.5}), solve, flush=True); metrics
    {'fit': tensor(0.5000)}
    >>> _checked_result((state, {"fit": torch.ones(3)}), solve, flush=True)
    Traceback (most recent call last):
    ...
    TypeError: metric 'fit' from step solve's flush is a tensor of shape (3,) and dtype torch.float32; a metric must be a real 0-dim tensor (reduce it, e.g. .mean())
    """
    if type(out) is not tuple or len(out) != 2 or not isinstance(out[0], TrainState) or not isinstance(out[1], Mapping):
        raise TypeError(_bad_result(step, out, flush))
    if out[1]:  # each checked, and a tensor that may be the state's own copied (check_metric)
        where = f"step {_fn_name(step)}'s flush" if flush else f"step {_fn_name(step)}"
        return out[0], {key: check_metric(value, key, where) for key, value in out[1].items()}
    return out


def _bad_result(fn: Any, out: Any, flush: bool = False) -> str:
    """What is wrong with ``out``, returned by a step of one's own (``flush``: by its flush), and what was probably
    meant."""
    if type(out) is tuple and len(out) == 2:
        got = f"a ({type(out[0]).__qualname__}, {type(out[1]).__qualname__}) pair"
    else:
        got = f"a {type(out).__qualname__}"
    if flush:
        return (f"step {_fn_name(fn)}'s flush returned {got}; a flush returns (new_state, metrics): a TrainState and "
                "a dict of metrics (an empty one when it has none)")
    message = f"step {_fn_name(fn)} returned {got}; a step returns (new_state, metrics): a TrainState and a dict of metrics"
    if isinstance(out, Mapping):
        message += "; for a metric_fn(model, batch), pass eval_step(metric_fn)"
    elif isinstance(out, torch.Tensor):
        message += "; for a loss_fn(model, batch), pass train_step(loss_fn)"
    return message


def _taken_by(key: str, taken: Mapping[str, str]) -> str | None:
    """The transform that reports a metric named ``key`` (a name of ``taken``, or one starting with a name of it
    that ends in ``*``, as ``with_grad_norm``'s ``grad_2.0_norm*``), or None."""
    if key in taken:
        return taken[key]
    for name, owner in taken.items():
        if name.endswith("*") and key.startswith(name[:-1]):
            return owner
    return None


def _split_loss(out: Any, loss_fn: Any, taken: Mapping[str, str] = _NO_METRICS) -> tuple[torch.Tensor, Metrics]:
    """``(loss, aux metrics)`` of a loss_fn's return, checked; ``taken``: metric names transforms report -> the transform."""
    if type(out) is torch.Tensor and out.ndim == 0 and out.requires_grad and not out.is_leaf and out.is_floating_point():
        return out, {}  # (the common case, checked first)
    aux: Metrics = {}
    where = f"loss_fn {_fn_name(loss_fn)}"
    pair = isinstance(out, tuple)
    if pair:
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError(f"{where} returned a tuple; expected (loss, metrics_dict)")
        out, extra = out
        for key, value in extra.items():
            if key == "loss":
                raise ValueError(f"{where} returned an aux metric named 'loss', which would hide the loss")
            owner = _taken_by(key, taken)
            if owner is not None:
                raise ValueError(f"{where} returned an aux metric named {key!r}, which {owner} reports too; rename it")
            aux[key] = check_metric(value, key, where)
    if not isinstance(out, torch.Tensor):
        if pair:  # (a skip is None alone: its metrics would not be reported)
            got = "None" if out is None else f"a {type(out).__qualname__}"
            raise TypeError(
                f"{where} returned (loss, metrics_dict) whose loss is {got}; the loss must be a scalar loss tensor "
                "(to skip the batch, return None alone, not (None, metrics_dict))"
            )
        raise TypeError(
            f"{where} returned a {type(out).__qualname__}; expected a scalar loss tensor, "
            "(loss, metrics_dict), or None to skip the batch"
        )
    if out.ndim != 0:
        raise ValueError(
            f"{where} returned a loss of shape {tuple(out.shape)}; the loss must be a scalar (0-dim) "
            "tensor: reduce it, e.g. with .mean()"
        )
    if out.is_complex():
        raise ValueError(f"{where} returned a complex loss ({out.dtype}); the loss must be real: take .real, .abs() "
                         "or a norm of it")
    if not out.requires_grad:
        raise ValueError(
            f"{where} returned a loss without a gradient (requires_grad=False): was it computed under "
            "torch.no_grad(), detached, or from parameters that do not require grad?"
        )
    if out.is_leaf and not isinstance(out, torch.nn.Parameter):  # (a scalar parameter itself is a loss, if odd)
        raise ValueError(
            f"{where} returned a loss that is a leaf tensor: made with requires_grad=True (e.g. "
            "torch.tensor(loss.item(), requires_grad=True)), not computed from the model, so its backward "
            "reaches no parameter and the update would change nothing"
        )
    if out.is_leaf:  # a parameter: its copy is the loss (the metric must not change with the update)
        out = out.clone()
    return out, aux


# --- the training step -------------------------------------------------------------------------


class SyncRefusal(ValueError):
    """A data-parallel hook's refusal in ``module(...)`` raised before it changed anything (no wrapper built, nothing
    broadcast): the step leaves the state it was given usable (:func:`loopkit.state_at_error`). An error of another
    type raised there before anything changed (torch's wrapper refusing the model before its first collective) is
    marked so with :func:`sync_unchanged`.

    >>> isinstance(SyncRefusal("with_ddp: ..."), ValueError)
    True
    """


#: the mark :func:`sync_unchanged` sets on an error
_SYNC_UNCHANGED = "_loopkit_sync_unchanged"


def sync_unchanged(error: BaseException) -> BaseException:
    """Mark ``error``, raised by a data-parallel hook's ``module(...)`` before it changed anything, as a
    :class:`SyncRefusal` is (the step leaves the state it was given usable), its type kept; returns ``error``.

    >>> _refused_unchanged(sync_unchanged(RuntimeError("no process group"))), _refused_unchanged(RuntimeError())
    (True, False)
    """
    try:
        setattr(error, _SYNC_UNCHANGED, True)
    except AttributeError:  # an exception type without attributes: the state counts as used up
        pass
    return error


@contextlib.contextmanager
def changing_nothing() -> Iterator[None]:
    """The context of a data-parallel hook's ``module(...)`` work that comes before anything changes (its checks and
    their collectives, before a wrapper's broadcast of rank 0's weights or ``fully_shard``): an error raised inside is
    marked with :func:`sync_unchanged` (the step leaves the state usable), a failed collective's too (a peer that
    died or left, the process group's timeout: this rank's state is as it was).

    >>> try:
    ...     with changing_nothing():
    ...         raise RuntimeError("Connection closed by peer")
    ... except RuntimeError as error:
    ...     print(_refused_unchanged(error))
    True
    """
    try:
        yield
    except Exception as error:
        sync_unchanged(error)
        raise


def _refused_unchanged(error: BaseException) -> bool:
    """Whether a data-parallel hook's ``module(...)`` raised ``error`` before it changed anything."""
    return isinstance(error, SyncRefusal) or getattr(error, _SYNC_UNCHANGED, False)


@attrs.frozen(eq=False)
class TrainStep(Step):
    """The step ``train_step(loss_fn)`` returns; transforms return modified copies of it.

    ``micro`` holds gradient transforms that act on each micro-batch's gradient (applied
    before gradient accumulation), ``update`` those that act on the accumulated gradient
    (applied after it). Without accumulation the two are the same thing. ``sync`` is the
    data-parallel hook that ``with_ddp`` or ``with_fsdp`` sets (None in one process): ``module(model, optimizer)``
    gives the module the loss_fn runs (a DistributedDataParallel wrapper; the model, sharded) and whether that call
    built it (an error later in the call then finds the state changed), ``wraps(model)`` whether it is built (a
    question: it changes nothing), ``no_sync(module)`` the
    context for micro-steps whose gradients stay local (``module(model, optimizer, extras)`` reads the state's extras,
    where ``after_forward(module, extras)`` recorded whether the last forward ran in it: a new wrapper then acts as
    the one a run that was not interrupted keeps), ``agree(flags)`` all-reduces skip
    flags with MAX, ``reduce_grads(optimizer)`` averages gradients a partial group left local,
    ``requires_donation`` says why the step cannot run on copies of the state, ``failure(collective,
    error, where)`` makes the error of a failed collective (``backward_collective`` names the
    backward's), ``refuses`` maps the transforms that cannot go with it to why, and
    ``before_forward(model)`` runs before the forward of a call that starts a group (``with_fsdp``
    broadcasts rank 0's buffers there); ``validating(model, extras)``, where the hook has it, is the context of
    :meth:`validating` (``with_ddp``: rank 0's buffers inside, each rank's own after).

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> step = train_step(lambda m, b: m(b).pow(2).mean())
    >>> isinstance(step, TrainStep), step.applied
    (True, ('train_step',))
    >>> model = torch.nn.Linear(2, 1)
    >>> new, metrics = step(TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1)), torch.ones(3, 2))
    >>> new.step, sorted(metrics)
    (1, ['loss'])
    """

    loss_fn: LossFn
    precision: Precision | None = None
    #: the accumulation factor; under a schedule, the largest it takes (``accum_every > 1``: accumulation happens)
    accum_every: int = 1
    #: ``with_grad_accum(every={epoch: n})``: ``(first epoch, factor)`` pairs, ascending from epoch 0 (empty: none)
    accum_schedule: tuple[tuple[int, int], ...] = ()
    micro: tuple[GradTransform, ...] = ()
    update: tuple[GradTransform, ...] = ()
    transforms: tuple[str, ...] = ()
    donated: bool = False
    sync: Any = None
    #: ``with_ddp`` built without a process group (one process: the plain step); each call checks that none has
    #: been made since (a spawned worker that built the step before ``distributed.init``), which is refused
    one_process: bool = False
    #: no precision, accumulation or gradient transform: the update follows the backward at once
    plain: bool = attrs.field(init=False, repr=False)
    #: per-micro-batch gradient transforms under accumulation: each micro-batch's gradient is set apart
    per_micro: bool = attrs.field(init=False, repr=False)
    #: a transform skips non-finite updates and wants the buffers of a skipped group put back
    keeps_buffers: bool = attrs.field(init=False, repr=False)
    #: the transforms' checks of the loss before the backward (a raising NaN guard's), in one process
    loss_checks: tuple[Callable[[torch.Tensor, TrainState], None], ...] = attrs.field(init=False, repr=False)
    #: a transform may refuse the gradients before the update (``refuses_grads``: a raising NaN guard, a
    #: gradient hook's fn), in one process: each call keeps the gradients it began with, to give them back then
    holds_grads: bool = attrs.field(init=False, repr=False)
    #: under data parallelism, a transform refuses the gradients on every rank alike (``refuses_on_every_rank``: a
    #: raising NaN guard, whose flag is agreed): a call outside an accumulation group, which found no gradients, gives
    #: them back (None) then, and leaves the state whole
    refuses_alike: bool = attrs.field(init=False, repr=False)
    #: the update's transforms' checks of a kind of gradient they refuse (``refuse_early``), run at an accumulation
    #: group's first call, whose gradients can still be given back (the group's last call's are summed into them)
    early_refusals: tuple[Callable[[GradContext], None], ...] = attrs.field(init=False, repr=False)
    #: a raising guard: each call copies the model's buffers before its forward, to put them back when it refuses
    #: (a NaN batch's forward leaves BatchNorm's statistics NaN), in one process
    keeps_call_buffers: bool = attrs.field(init=False, repr=False)
    #: the metrics the transforms report (name -> transform): a loss_fn's aux metric may not take their names
    transform_metrics: Mapping[str, str] = attrs.field(init=False, repr=False)

    # every path ends in make_state/replace (flush_ returns its input only without metrics); a subclass
    # whose run_ may return a state held elsewhere must set it False
    returns_fresh_state = True
    #: donated, plain, in one process and ``run_`` not overridden by a subclass: ``__call__`` may take the one-frame
    #: CPU path
    donated_plain: bool = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        plain = self.precision is None and self.accum_every == 1 and not self.micro and not self.update
        object.__setattr__(self, "plain", plain)
        object.__setattr__(self, "donated_plain", plain and self.donated and self.sync is None and not self.one_process
                           and type(self).run_ is TrainStep.run_)  # (a subclass's own run_ is called as it is)
        object.__setattr__(self, "per_micro", self.accum_every > 1 and bool(self.micro))
        keeps = any(getattr(t, "keeps_buffers", False) for t in self.micro + self.update)
        object.__setattr__(self, "keeps_buffers", keeps)
        checks = () if self.sync is not None else tuple(
            t.check_loss for t in self.micro + self.update if getattr(t, "check_loss", None) is not None
        )
        object.__setattr__(self, "loss_checks", checks)
        refusing = any(getattr(t, "refuses_grads", False) for t in self.micro + self.update)
        object.__setattr__(self, "holds_grads", self.sync is None and refusing)
        alike = any(getattr(t, "refuses_on_every_rank", False) for t in self.micro + self.update)
        object.__setattr__(self, "refuses_alike", self.sync is not None and alike)
        keeps = any(getattr(t, "restores_buffers_on_raise", False) for t in self.micro + self.update)
        object.__setattr__(self, "keeps_call_buffers", (self.sync is None or alike) and keeps)
        early = []  # (the leading ones only, and none after per-micro transforms: what acts before may change the kind)
        for t in () if self.micro else self.update:
            if getattr(t, "refuse_early", None) is None:
                break
            early.append(t.refuse_early)
        object.__setattr__(self, "early_refusals", tuple(early) if self.sync is None else ())
        reported = {
            name: t.name for t in (self.precision, *self.micro, *self.update) for name in getattr(t, "metric_names", ())
        }
        object.__setattr__(self, "transform_metrics", reported)

    @property
    def applied(self) -> tuple[str, ...]:
        return ("train_step",) + self.transforms

    @property
    def rank_agreed(self) -> tuple[tuple[str, Any], ...]:
        """See :attr:`Step.rank_agreed`: the accumulation's factor (or schedule, as the epochs see it: ``every=2`` and
        ``every={0: 2}`` are one), and the ``agreed_options`` of the precision, the gradient transforms and the
        data-parallel hook.

        >>> train_step(lambda m, b: None).with_transform("with_grad_accum", accum_every=4).rank_agreed
        (('with_grad_accum every', 4),)
        """
        found: tuple[tuple[str, Any], ...] = ()
        if "with_grad_accum" in self.transforms:
            found = (("with_grad_accum every", _accumulation_as_it_acts(self.accum_every, self.accum_schedule)),)
        for part in (self.precision, *self.micro, *self.update, self.sync):
            if part is not None:
                found += _agreed(part.name, getattr(part, "agreed_options", {}))
        return found

    def every_at(self, epoch: int) -> int:
        """The accumulation factor in epoch ``epoch`` (``with_grad_accum``'s ``every``, or its schedule's).

        >>> train_step(lambda m, b: None).every_at(3)
        1
        """
        every = self.accum_every
        for first, factor in self.accum_schedule:  # (from epoch 0: its first factor replaces accum_every)
            if epoch < first:
                break
            every = factor
        return every

    @property
    def requires_donation(self) -> str | None:  # type: ignore[override]
        return None if self.sync is None else self.sync.requires_donation

    def wrap_parallel(self, state: TrainState) -> bool:
        """See :meth:`Step.wrap_parallel`: the data-parallel hook's ``module(...)``, whose refusal (before anything
        changed) leaves ``state`` intact; False without one."""
        if self.sync is None:
            return False
        try:
            return self.sync.module(state.model, state.optimizer, state.extras)[1]
        except Exception as error:
            if _refused_unchanged(error):
                leave_intact(error, state)
            raise

    def validating(self, state: TrainState) -> contextlib.AbstractContextManager[None]:
        """See :meth:`Step.validating`: the data-parallel hook's (``sync.validating(model, extras)``), if it has one."""
        hook = getattr(self.sync, "validating", None)
        return contextlib.nullcontext() if hook is None else hook(state.model, state.extras)

    def with_transform(self, name: str, **changes: Any) -> TrainStep:
        """A copy with ``changes`` applied and ``name`` recorded (used by the ``with_*`` transforms)."""
        return attrs.evolve(self, transforms=self.transforms + (name,), **changes)

    def add_grad_transform(self, transform: GradTransform) -> TrainStep:
        """Add a gradient transform inside (per micro-batch) or outside (per update) accumulation.

        One that reports a metric of a name a transform on its side of the accumulation reports already
        (``with_grad_norm`` twice, with nothing or a clipping between) is refused, naming both: its value would
        replace the other's at every call. Across ``with_grad_accum`` (a value clip per micro-batch, a norm clip
        per update) both are seen: the inner one's on the micro-batches, the outer one's on the calls that update.
        """
        side = self.update if self.accum_every > 1 else self.micro
        if not getattr(transform, "shares_metrics", False):
            mine = {name: t.name for t in side for name in getattr(t, "metric_names", ())}
            for name in getattr(transform, "metric_names", ()):
                owner = _taken_by(name.rstrip("*"), mine)
                if owner is not None:
                    raise TypeError(f"{transform.name} cannot wrap {owner}: both report the metric "
                                    f"{name.rstrip('*')!r} at every call, and the outer one's value would replace the "
                                    "inner one's (with_grad_hook can report what the outer one sees, by a name of its own)")
        if self.accum_every > 1:
            return self.with_transform(transform.name, update=self.update + (transform,))
        return self.with_transform(transform.name, micro=self.micro + (transform,))

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        # the common donated step on the CPU: straight to its one-frame path (what _invoke and run_ check, checked here)
        if self.donated_plain and type(state) is TrainState and not state._consumed and len(state.rng) <= 1:
            try:  # returned or raised here: the state is used up (unless left intact), as _invoke would leave it
                optimizer = state.optimizer
                params = () if optimizer is None else optimizer.param_groups[0]["params"]
                if params and not params[0].is_cuda:
                    result = self._run_plain_cpu(state, batch, state.model, optimizer, params[0])
                    _set_consumed(state, True)
                    return result
            except BaseException as error:
                _consume_unless_intact(state, error)
                raise
        return self._invoke(run_of(self), state, batch)  # not this path's case: _invoke takes the state

    # The in-place core --------------------------------------------------------------------

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if self.one_process and _group_made():
            raise leave_intact(RuntimeError(_GROUP_MADE_SINCE), state)
        model, optimizer = state.model, state.optimizer
        if optimizer is None:
            raise leave_intact(
                ValueError("train_step needs a state with an optimizer (TrainState.create(model, optimizer))"), state
            )
        params = optimizer.param_groups[0]["params"]
        first = params[0] if params else _first_param(optimizer, state)
        if self.plain and self.sync is None and not first.is_cuda and len(state.rng) <= 1:
            return self._run_plain_cpu(state, batch, model, optimizer, first)
        if self.accum_every == 1 and _ACCUM_COUNT in state.extras:
            raise leave_intact(_held_group(state, self), state)
        if self.precision is not None and self.precision.scales_loss and _trains_half(optimizer):
            raise leave_intact(_half_parameters_refused(state), state)
        if isinstance(optimizer, _LBFGS):
            if not self.plain or self.sync is not None:
                raise leave_intact(_closure_refused(optimizer, ", ".join(self.transforms) or "with_ddp"), state)
            return _closure_update(self, state, batch, optimizer)
        sync = self.sync
        extras = None if self.plain else extras_copy(state.extras)
        if self.keeps_buffers and _BUFFERS not in extras:  # type: ignore[operator]
            _save_buffers(model, extras)  # type: ignore[arg-type]
        per_micro = self.per_micro
        # is_cuda first: no device object is made per call on the CPU
        scope = RNGScope(state.rng, _cuda_index(first.device) if first.is_cuda else None, state.seed)
        net, built = model, False
        if sync is not None:
            try:
                net, built = sync.module(model, optimizer, state.extras)
            except Exception as error:  # (with_fsdp's stale group, with_ddp's freeze inside a group: nothing ran)
                if _refused_unchanged(error):
                    leave_intact(error, state)
                raise
        # building the DDP wrapper broadcasts rank 0's parameters: an error of that call's loss_fn finds them changed
        intact_on_error = not built
        # under DDP a micro-step that does not finish its group keeps its gradient local (no all-reduce);
        # per-micro transforms need each micro-batch's whole gradient, so then every micro-step syncs
        every = self.every_at(state.epoch)
        local = sync is not None and not per_micro and state.extras.get(_ACCUM_COUNT, 0) + 1 < every
        # with_fsdp's buffers: rank 0's on every rank before a forward that follows a synced backward, as DDP does
        if sync is not None and (per_micro or not state.extras.get(_ACCUM_COUNT, 0)):
            sync.before_forward(model)
        # what the parameters hold now is given back after an error in the backward, or a raising guard's or a hook's
        # refusal of this call's gradients (in one process: under data parallelism the other ranks went on)
        held = None if sync is not None else [p.grad for group in optimizer.param_groups for p in group["params"]]
        # under data parallelism only a refusal every rank makes (a raising guard's agreed flag), of a call that found
        # no gradients (outside a group; the wrapper not built by it), gives them back: None, after the synced backward
        back = held if sync is None else _no_grads(optimizer) if (
            self.refuses_alike and intact_on_error and not state.extras.get(_ACCUM_COUNT, 0)) else None
        # a raising guard's refusal (or any error that leaves the state whole) puts back what the forward wrote in place
        buffers = _buffers_copy(model) if self.keeps_call_buffers and back is not None else None
        try:
            if local:
                with sync.no_sync(net):
                    loss, metrics, stash = self._loss_and_backward(
                        state, batch, net, first, extras, local, intact_on_error, every, held)
            else:
                loss, metrics, stash = self._loss_and_backward(
                    state, batch, net, first, extras, local, intact_on_error, every, held)
        except BaseException as error:
            scope.discard()
            if buffers is not None and state_at_error(error) is state:
                _restore_buffers(model, buffers)
            raise
        rng = scope.close()
        if sync is not None and extras is not None:  # whether this forward was under no_sync (a new wrapper takes it)
            sync.after_forward(net, extras)
        if loss is None:  # the loss_fn skipped the batch
            kept = state.extras
            if sync is not None and extras is not None:  # what the wrapper's flag says of a forward it ran, recorded
                kept = extras_copy(state.extras)
                sync.after_forward(net, kept)
            return replace(state, batch_index=state.batch_index + 1, rng=rng, extras=kept), {}
        metrics = {"loss": loss.detach(), **metrics} if metrics else {"loss": loss.detach()}
        if extras is None:  # the plain step: update at once, nothing else to do
            return keep_graph(_plain_update(state, optimizer, rng, self, batch, held), loss), metrics
        new = _advance(state, state.step, rng, state.extras)
        ctx = GradContext(
            new, metrics, extras.pop(_FOUND_INF, None), extras.pop(_NONFINITE, None), None if sync is None else sync.agree,
            self.transform_metrics,
        )
        try:
            for t in self.micro + self.update:
                t.on_loss(loss, new, ctx)
            if self.early_refusals and not state.extras.get(_ACCUM_COUNT, 0):
                for refuse in self.early_refusals:
                    refuse(ctx)
            if per_micro:
                if self.precision is not None and self.precision.scales_loss:
                    # the backward ran on the share (loss / every): unscaled, it becomes the micro-batch's own gradient
                    self.precision.unscale(ctx, extras, share=every)
                for t in self.micro:
                    t.on_grads(ctx)
                if ctx.params and every > 1:
                    torch._foreach_div_(ctx.grads, every)
                _unstash_grads(stash)
                stash = None
            count = extras.get(_ACCUM_COUNT, 0) + 1
            if count < every:
                extras[_ACCUM_COUNT] = count
                _keep_flags(extras, ctx)
                return keep_graph(replace(new, extras=extras), loss), metrics
            extras.pop(_ACCUM_COUNT, None)
            return keep_graph(self._apply_update(new, extras, metrics, ctx), loss), metrics
        except BaseException as error:  # a raising guard or a hook refused the gradients, before the update
            refusable = back is not None and not ctx.updating and (self.holds_grads or ctx.agreed_refusal)
            if refusable and _gradients_back(state, optimizer, back):  # type: ignore[arg-type]
                if buffers is not None:
                    _restore_buffers(model, buffers)
                leave_intact(error, state)
            raise

    def _run_plain_cpu(
        self, state: TrainState, batch: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
        first: torch.Tensor,
    ) -> tuple[TrainState, Metrics]:
        """:meth:`run_` without precision, accumulation, gradient transforms or DDP, on the CPU.

        The same work as the general path (:func:`_plain_update` included), in one frame: the
        hot path of the common step, where each call and attribute read shows in the step's time.
        ``first``: the optimizer's first parameter.
        """
        if _ACCUM_COUNT in state.extras:
            raise leave_intact(_held_group(state, self), state)
        if isinstance(optimizer, _LBFGS):  # its step runs the loss_fn itself, through a closure
            return _closure_update(self, state, batch, optimizer)
        generator = _default_generator
        rng = state.rng  # empty: the state draws from the global RNG, which is left as the step leaves it
        saved = generator.get_state() if rng else None  # the caller's global RNG, put back below
        if saved is not None:
            generator.set_state(rng["cpu"])
        intact = True  # nothing of the state changed in place yet (the backward changes the gradients only)
        # the gradients as the call found them (before the loss_fn, which may run a backward of its own): an error in
        # the backward gives them back
        held = [p.grad for group in optimizer.param_groups for p in group["params"]]
        try:
            out = self.loss_fn(model, batch)
            if type(out) is _Tensor and out.ndim == 0 and out.requires_grad and not out.is_leaf and out.is_floating_point():
                loss, metrics = out, {"loss": out.detach()}
            elif out is None:  # the loss_fn skipped the batch
                if saved is not None:
                    rng = {"cpu": generator.get_state()}
                return _advance(state, state.step, rng, state.extras), {}
            else:
                loss, aux = _split_loss(out, self.loss_fn)
                metrics = {"loss": loss.detach(), **aux}
            intact = False
            if held.count(None) != len(held):  # (found gradients, rare: one C-level count otherwise)
                _drop_grads(optimizer)
            loss.backward()
            if first.grad is None and first.requires_grad:  # (a trainable first parameter the backward missed)
                _refuse_unreached(optimizer, model, self.loss_fn)
            if saved is not None:
                rng = {"cpu": generator.get_state()}
        except BaseException as error:
            told = _backward_in_loss_fn(error, self.loss_fn)
            if intact or _gradients_back(state, optimizer, held):
                leave_intact(told or error, state)
            if told is not None:
                raise told from error
            raise
        finally:
            if saved is not None:
                generator.set_state(saved)
        try:
            optimizer.step()
        except TypeError:  # another optimizer that needs a closure: found out only now, after a forward of its own
            if not needs_closure(optimizer):
                raise
            return _closure_update(self, state, batch, optimizer, held)
        scheduler = state.scheduler
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        new = make_state(
            model, optimizer, scheduler, state.step + 1, state.epoch, state.batch_index + 1, rng, state.extras,
            state.seed,
        )
        return keep_graph(new, loss), metrics

    def _loss_and_backward(
        self, state: TrainState, batch: Any, net: torch.nn.Module, first: torch.Tensor,
        extras: dict[str, Any] | None, local: bool, intact_on_error: bool, every: int, held: list[Any] | None,
    ) -> tuple[Any, Metrics, Any]:
        """The loss_fn and backward of one micro-batch: ``(loss, aux metrics, stashed grads)``; loss None: skipped.

        ``first`` is the optimizer's first parameter: its device is the step's device.
        ``intact_on_error``: an error before the backward leaves the state whole (not so in the call
        that built the DDP wrapper, which broadcast rank 0's parameters). ``held``: the gradients of the
        optimizer's parameters as the call found them (None under data parallelism), dropped before an update's first
        backward (outside a group: :func:`_drop_grads`); an error in the backward gives them back and leaves the state
        whole, as does a backward that started from no gradients (outside a group, or a group's set apart for a
        per-micro transform) and gave none of the optimizer's parameters one, nor any of the model's
        (:func:`_refuse_unreached`).
        """
        precision = self.precision
        try:  # nothing of the state changes in place before the backward
            if precision is not None:
                device = first.device
                with precision.autocast(device.type):
                    out = self.loss_fn(net, batch)
            else:
                out = self.loss_fn(net, batch)
            if out is None:
                return None, {}, None
            loss, metrics = _split_loss(out, self.loss_fn, self.transform_metrics)
            for check in self.loss_checks:
                check(loss, state)
        except BaseException as error:
            if intact_on_error:
                leave_intact(error, state)
            raise
        per_micro = self.per_micro
        # per-micro transforms see the micro-batch's own gradient; its share (1/every) is taken after them. Under a
        # loss scaler the backward still runs on (loss / every) * scale, as torch's GradScaler loop does (loss * scale
        # overflows float16 at 1/every of its threshold): the unscaling then multiplies the `every` back (run_)
        scaled = precision is not None and precision.scales_loss
        divided = every > 1 and (scaled or not per_micro)
        to_backward = loss
        if divided or scaled:  # under grad: a loss_fn that enables it itself, called in the caller's torch.no_grad()
            with torch.enable_grad():
                if divided:
                    to_backward = loss / every
                if scaled:
                    to_backward = precision.scale(to_backward, extras, device)  # type: ignore[union-attr, arg-type]
        # an update's first backward in one process: on no gradients but its own (under data parallelism a flush leaves
        # zeros where DDP's reducer expects gradients defined at the next synced backward: kept)
        if held is not None and held.count(None) != len(held) and not state.extras.get(_ACCUM_COUNT, 0):
            _drop_grads(state.optimizer)  # type: ignore[arg-type]  # (found gradients, rare: one C-level count)
        stash = _stash_grads(state.optimizer, getattr(self.sync, "grads_are_views", False)) if per_micro else None
        if held is None:  # under data parallelism: an error in the backward uses the state up
            _backward_synced(to_backward, self.sync, state, local)
            return loss, metrics, stash
        # a group's sum so far is not set apart (that would hold a second set of gradients at the backward's peak,
        # which a raw accumulation loop does not): a backward failing half-way may have added into it, and
        # _gradients_back then leaves the state used up
        try:
            to_backward.backward()
            if first.grad is None and first.requires_grad:  # (found none, or set apart, on a trainable first one)
                _refuse_unreached(state.optimizer, state.model, self.loss_fn)  # type: ignore[arg-type]
        except BaseException as error:
            told = _backward_in_loss_fn(error, self.loss_fn)
            if _gradients_back(state, state.optimizer, held):  # type: ignore[arg-type]
                leave_intact(told or error, state)
            if told is not None:
                raise told from error
            raise
        return loss, metrics, stash

    def flush_(self, state: TrainState) -> tuple[TrainState, Metrics]:
        count = state.extras.get(_ACCUM_COUNT, 0)
        if self.accum_every == 1 or count == 0:
            return state, {}
        every = self.every_at(state.epoch)
        extras = extras_copy(state.extras)
        extras.pop(_ACCUM_COUNT)
        marked: list[torch.Tensor] = []
        if self.sync is not None and not self.micro:  # the partial group's gradients never left this rank
            if not self.sync.wraps(state.model):  # a flush that is not donated: the copy it works on gets its wrapper
                self.sync.module(state.model, state.optimizer, state.extras)
            marked = self.sync.marked_used(state.optimizer)
            self.sync.reduce_grads(state.optimizer)
        # a transform that may refuse the update (a hook's or a raising guard's error) finds the mean in new tensors:
        # the group's sums, as the flush found them, are given back then, and the state stays whole
        held = [p.grad for group in state.optimizer.param_groups for p in group["params"]] if self.holds_grads else None
        params = _params_with_grads(state.optimizer)
        if params:  # each micro-batch loss was divided by `every`: make it the mean over `count`
            grads = [p.grad for p in params]
            if held is None:
                torch._foreach_mul_(grads, every / count)
            else:
                for p, mean in zip(params, torch._foreach_mul(grads, every / count)):
                    p.grad = mean
        metrics: Metrics = {}
        agree = None if self.sync is None else self.sync.agree
        ctx = GradContext(
            state, metrics, extras.pop(_FOUND_INF, None), extras.pop(_NONFINITE, None), agree, self.transform_metrics
        )
        try:
            new = self._apply_update(state, extras, metrics, ctx, held)
        except BaseException as error:  # refused before the update: the sums back, the state as the flush found it
            if held and not ctx.updating and _gradients_back(state, state.optimizer, held):
                leave_intact(error, state)
            raise
        for p in marked:  # DDP's reducer still counts them used: its next synced backward reduces their (zero) grads
            p.grad = torch.zeros_like(p)
        return new, metrics

    def _apply_update(
        self, state: TrainState, extras: dict[str, Any], metrics: Metrics, ctx: GradContext,
        held: list[Any] | None = None,
    ) -> TrainState:
        """The update on the gradients ``ctx`` holds: the gradient transforms, the optimizer and scheduler steps.
        ``held``: gradients a flush keeps to give back on a refusal, let go once the update begins."""
        optimizer, scheduler = state.optimizer, state.scheduler
        if self.accum_every > 1:  # micro-batches since the context was made may have added gradients
            ctx.params = _params_with_grads(optimizer)
        scaler = self.precision if (self.precision is not None and self.precision.scales_loss) else None
        if not self.per_micro:
            if scaler is not None:
                scaler.unscale(ctx, extras)  # type: ignore[arg-type]
            for t in self.micro:
                t.on_grads(ctx)
        for t in self.update:
            t.on_grads(ctx)
        if ctx.agree is not None:
            _agree_flags(ctx)
        skip = _skip_flag(ctx)
        skipped = skip is not None and bool(skip)  # one read per update, only with a scaler or a guard
        ctx.updating = True
        if held:  # (no second set of gradients through the optimizer's step)
            held.clear()
        if not skipped:
            try:
                optimizer.step()
            except TypeError as error:
                if needs_closure(optimizer):
                    raise _closure_refused(optimizer, ", ".join(self.transforms)) from error
                raise
            if scheduler is not None:
                scheduler.step()
        if scaler is not None:
            scaler.after_update(ctx, extras)  # type: ignore[arg-type]
        optimizer.zero_grad(set_to_none=True)
        saved = extras.pop(_BUFFERS, None)
        if ctx.nonfinite is not None:
            metrics["nan_guard/skipped"] = ctx.nonfinite
            if skipped and bool(ctx.nonfinite):  # skipped for the guard's reason (a read only on a skip)
                extras["nan_guard/skipped_total"] = extras.get("nan_guard/skipped_total", 0) + 1  # type: ignore[index]
                if saved is not None:
                    _restore_buffers(state.model, saved)
        return replace(state, step=state.step + (0 if skipped else 1), extras=extras)


def _backward_synced(loss: torch.Tensor, sync: Any, state: TrainState, local: bool) -> None:
    """Backward under data parallelism: a failed gradient all-reduce is named, with the rank and step."""
    try:
        loss.backward()
    except RuntimeError as e:
        if local:  # no collective ran: an ordinary error
            raise
        where = f" at step {state.step} (epoch {state.epoch}, batch {state.batch_index})"
        raise sync.failure(sync.backward_collective, e, where) from e


def _plain_update(
    state: TrainState, optimizer: torch.optim.Optimizer, rng: Any, step: TrainStep, batch: Any, held: list[Any] | None,
) -> TrainState:
    """The update of a step with no gradient transform: optimizer, scheduler, zeroed gradients, counters
    (``held``: the gradients as the call found them, for an optimizer found to need a closure)."""
    try:
        optimizer.step()
    except TypeError as error:  # one that needs a closure (LBFGS)
        if not needs_closure(optimizer):
            raise
        if step.sync is not None:
            raise _closure_refused(optimizer, "with_ddp") from error
        return _closure_update(step, state, batch, optimizer, held)[0]
    return _after_step(state, optimizer, rng)


def _after_step(state: TrainState, optimizer: torch.optim.Optimizer, rng: Any) -> TrainState:
    """What follows ``optimizer.step()`` in a plain update: the scheduler, zeroed gradients, the new state."""
    scheduler = state.scheduler
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return _advance(state, state.step + 1, rng, state.extras)


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` must be given a closure that re-evaluates the loss (``torch.optim.LBFGS``).

    ``train_step`` gives it one that runs the loss_fn (forward and backward, drawing from the
    state's RNG) as often as the optimizer asks; the step's metrics are those of the first run,
    before the update. ``torch.optim.LBFGS`` is known before the step runs; another optimizer
    that needs a closure is found out when its ``step()`` refuses to run without one, after the
    step's own forward and backward, which its closure then runs again (a forward's in-place
    updates, BatchNorm statistics, happen twice in that step).

    >>> import torch
    >>> params = [torch.nn.Parameter(torch.zeros(1))]
    >>> needs_closure(torch.optim.LBFGS(params)), needs_closure(torch.optim.SGD(params, lr=0.1))
    (True, False)
    """
    try:
        closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _closure_refused(optimizer: torch.optim.Optimizer, transforms: str) -> TypeError:
    return TypeError(
        f"train_step: {type(optimizer).__name__}.step() needs a closure, which re-runs the loss_fn and its backward; "
        f"{transforms} act between backward and step (or all-reduce the gradients), which a closure would "
        "bypass: use such an optimizer in a plain train_step"
    )


def _closure_update(
    step: TrainStep, state: TrainState, batch: Any, optimizer: torch.optim.Optimizer, held: list[Any] | None = None,
) -> tuple[TrainState, Metrics]:
    """The update of an optimizer whose step needs a closure (LBFGS), as a loop that hands it one: the
    closure (zeroed gradients, the loss_fn, backward) runs as often as the optimizer asks, drawing from
    the state's RNG as the call began with it; the metrics are those of its first run (before the update).
    ``held``: the gradients as the call found them, where the call ran a backward of its own before
    (an optimizer found to need a closure only then); None: those the parameters hold now."""
    model, loss_fn = state.model, step.loss_fn
    first_param = _first_param(optimizer, state)
    scope = RNGScope(state.rng, _cuda_index(first_param.device) if first_param.is_cuda else None, state.seed)
    runs: list[Metrics] = []
    finished: list[None] = []  # one per backward that ran to its end

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        with torch.enable_grad():
            out = loss_fn(model, batch)
            if out is None:
                raise ValueError(
                    f"loss_fn {_fn_name(loss_fn)} returned None (skip the batch) under {type(optimizer).__name__}, "
                    "whose step needs a loss each time it asks"
                )
            loss, aux = _split_loss(out, loss_fn)
            runs.append({"loss": loss.detach(), **aux})
            loss.backward()
            finished.append(None)
        return loss

    params = [p for group in optimizer.param_groups for p in group["params"]]
    versions = [p._version for p in params]
    found = [p.grad for p in params] if held is None else held
    known = set(optimizer.state)  # (LBFGS makes its state's entry, counters at 0, before it asks for the loss)
    try:
        optimizer.step(closure)
    except BaseException as error:
        scope.discard()
        # failed in the first run (its forward, its checks or its backward): nothing changed in place but the
        # gradients, given back as the call found them, unless the optimizer moved the parameters before it asked
        # for the loss (SAM's ascent step)
        if not finished and all(p._version == v for p, v in zip(params, versions)):
            if not runs:  # before the backward: the closure's zero_grad set the gradients aside, none was written
                for p, g in zip(params, found):
                    p.grad = g
            if not runs or _gradients_back(state, optimizer, found):
                for key in [key for key in optimizer.state if key not in known]:
                    del optimizer.state[key]
                leave_intact(error, state)
        raise
    rng = scope.close()
    if not runs:
        raise RuntimeError(f"{type(optimizer).__name__}.step(closure) never called the closure: no loss to report")
    return _after_step(state, optimizer, rng), runs[0]


def _advance(state: TrainState, step: int, rng: Any, extras: Any) -> TrainState:
    """``state`` after one more batch (a faster ``attrs.evolve`` for the hot path)."""
    return make_state(
        state.model, state.optimizer, state.scheduler, step, state.epoch, state.batch_index + 1, rng, extras, state.seed
    )


def in_accumulation_group(state: TrainState) -> bool:
    """Whether ``state`` is inside a ``with_grad_accum`` group: micro-batches' gradients held, no update yet.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> in_accumulation_group(TrainState.create(torch.nn.Linear(1, 1)))
    False
    """
    return _ACCUM_COUNT in state.extras


def accumulated(state: TrainState) -> int:
    """The micro-batches of the ``with_grad_accum`` group under way in ``state`` (0 outside one).

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> accumulated(TrainState.create(torch.nn.Linear(1, 1)))
    0
    """
    return int(state.extras.get(_ACCUM_COUNT, 0))


def _held_group(state: TrainState, step: TrainStep) -> ValueError:
    """The error for a state half-way through a ``with_grad_accum`` group given to a step that does not accumulate
    (a checkpoint restored into another pipeline): its update would add the held gradients to its own."""
    return ValueError(
        f"{', '.join(step.applied)}: the state is half-way through a with_grad_accum group (accum/count="
        f"{state.extras[_ACCUM_COUNT]}: the parameters hold the summed gradients of its micro-batches), and this step "
        "does not accumulate, so its update would add them to its own; train it on with the with_grad_accum step that "
        "made it, or end the group first with that step's flush (state, _ = accum_step.flush(state))"
    )


def _stash_grads(optimizer: torch.optim.Optimizer, copy: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Take the accumulated gradients off the parameters, so backward writes one micro-batch's
    (``copy``: copies of them, for gradients that are views of memory the next backward writes)."""
    stash = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                stash.append((p, p.grad.clone() if copy else p.grad))
                p.grad = None
    return stash


def _no_grads(optimizer: torch.optim.Optimizer) -> list[None] | None:
    """A None for each of the optimizer's parameters where none holds a gradient (what :func:`_gradients_back` gives
    back then), else None: one attribute read a parameter, no device sync.

    >>> model = torch.nn.Linear(1, 1)
    >>> _no_grads(torch.optim.SGD(model.parameters(), lr=0.1))
    [None, None]
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return None if any(p.grad is not None for p in params) else [None] * len(params)


def _gradients_back(state: TrainState, optimizer: torch.optim.Optimizer, held: list[Any]) -> bool:
    """Give the optimizer's parameters ``held``, the gradients they had when the call began, back after a
    backward that failed or whose gradients are refused before the update; False where that backward may have added
    into one of them in place (a parameter still holding its found gradient: an accumulation group's sum, not set
    apart; one dropped before the backward (:func:`_drop_grads`), set apart (:func:`_stash_grads`) or replaced by a
    flush's mean was not written), into a parameter the optimizer does not hold, or may have moved a parameter (a
    post-accumulate-grad hook: an optimizer stepping in the backward)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(g is not None and p.grad is g for p, g in zip(params, held)):
        return False
    if any(getattr(p, "_post_accumulate_grad_hooks", None) for p in state.model.parameters()):
        return False
    owned = {id(p) for p in params}
    if any(p.grad is not None and id(p) not in owned for p in state.model.parameters()):
        return False
    for p, g in zip(params, held):
        p.grad = g
    return True


def _drop_grads(optimizer: torch.optim.Optimizer) -> None:
    """Before an update's first backward: the optimizer's parameters hold no gradient, as after a loop's
    ``optimizer.zero_grad()`` (Lightning's, right before its backward). What they held (the backward of another
    state's optimizer over a shared model, a saliency map's ``loss.backward()`` of your own between steps) is not
    added into the update; the call's ``held`` keeps it, to give back after an error. Each is set to None, never
    zeroed in place: the held tensors keep their values.

    >>> model = torch.nn.Linear(1, 1)
    >>> model.weight.grad = found = torch.ones(1, 1)
    >>> _drop_grads(torch.optim.SGD(model.parameters(), lr=0.1))
    >>> model.weight.grad is None, found
    (True, tensor([[1.]]))
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def _backward_in_loss_fn(error: BaseException, loss_fn: Callable[..., Any]) -> RuntimeError | None:
    """The error to raise for ``error`` of a step's backward where torch found the loss's graph freed by an earlier
    backward (a ``loss_fn`` calling ``loss.backward()`` itself, a Lightning manual-optimization habit; or reusing a
    tensor whose graph an earlier call's backward freed), naming ``loss_fn``; None for any other error. torch's own
    advice there, ``retain_graph=True``, would add the loss's gradient twice.

    >>> freed = RuntimeError("Trying to backward through the graph a second time (or directly access saved ...")
    >>> str(_backward_in_loss_fn(freed, lambda m, b: None)).split(":")[0]
    'loss_fn <lambda>'
    >>> _backward_in_loss_fn(ValueError("other"), lambda m, b: None) is None
    True
    """
    if not isinstance(error, RuntimeError) or "backward through the graph a second time" not in str(error):
        return None
    return RuntimeError(
        f"loss_fn {_fn_name(loss_fn)}: the step's backward found the loss's graph already freed by a backward: does "
        "the loss_fn call loss.backward() itself? It must return the loss (or (loss, metrics)), and train_step runs "
        "the backward (retain_graph=True would add its gradient twice); nor may it reuse a tensor whose graph an "
        f"earlier step's backward freed. Nothing was updated. (torch: {error})"
    )


def _refuse_unreached(optimizer: torch.optim.Optimizer, model: torch.nn.Module, loss_fn: Callable[..., Any]) -> None:
    """After a backward that left the optimizer's first parameter without a gradient: raise a ``ValueError``, naming
    ``loss_fn``, where none of the optimizer's parameters has one, nor any of ``model``'s (its loss reached none: a
    ``loss_fn`` that uses the model it closes over, not the one it is given, trains nothing, and a pure call's would
    write the given state's gradients); nothing where one has (a frozen first parameter; a batch routed to a part of
    the model that the optimizer does not train), or where a post-accumulate-grad hook may have taken them (an
    optimizer stepping in the backward). Its callers run it only where the first parameter requires a gradient: a
    frozen first parameter (a frozen backbone first in ``model.parameters()``, as fine-tuning has it) skips the check,
    so that no step scans the frozen parameters.

    >>> model = torch.nn.Linear(1, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> _refuse_unreached(optimizer, model, lambda m, b: torch.nn.Linear(1, 1)(b).sum())
    Traceback (most recent call last):
    ...
    ValueError: loss_fn <lambda>: its backward reached none of the optimizer's parameters, nor any of the model's: does it use the model it is given (loss_fn(model, batch)), not one it closes over? Nothing was updated
    >>> model.bias.grad = torch.ones(1)
    >>> _refuse_unreached(optimizer, model, lambda m, b: m(b).sum())  # (the first parameter frozen: another has one)
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None or getattr(p, "_post_accumulate_grad_hooks", None):
                return
    if any(p.grad is not None for p in model.parameters()):
        return
    raise ValueError(
        f"loss_fn {_fn_name(loss_fn)}: its backward reached none of the optimizer's parameters, nor any of the "
        "model's: does it use the model it is given (loss_fn(model, batch)), not one it closes over? Nothing was "
        "updated"
    )


def _unstash_grads(stash: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    for p, acc in stash or ():
        if p.grad is None:
            p.grad = acc
        else:
            p.grad.add_(acc)


def _first_param(optimizer: torch.optim.Optimizer, state: TrainState) -> torch.Tensor:
    """The optimizer's first parameter, its first group being empty (its device is the step's);
    an optimizer without any refused before ``state`` changed."""
    for group in optimizer.param_groups:
        if group["params"]:
            return group["params"][0]
    raise leave_intact(ValueError("train_step: the state's optimizer has no parameters to train"), state)


def _buffers_copy(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Copies of ``model``'s buffers (None for a model without any): what a call's forward may write in place. A lazy
    module's buffer before its first forward has no value to copy (put back, it keeps what that forward made it)."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers() if not isinstance(b, _Uninitialized)}
    return saved or None


def _save_buffers(model: torch.nn.Module, extras: dict[str, Any]) -> None:
    """Copies of ``model``'s buffers into ``extras`` (none kept for a model without buffers)."""
    saved = _buffers_copy(model)
    if saved:
        extras[_BUFFERS] = saved


def _restore_buffers(model: torch.nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Put the buffers saved by :func:`_save_buffers` back, in place (a module holding one keeps it)."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            old = saved.get(name)
            if old is None:
                continue
            if buffer.shape != old.shape:  # an observer sizes its statistics at its first batch
                buffer.resize_(old.shape)
            buffer.copy_(old)


def _keep_flags(extras: dict[str, Any], ctx: GradContext) -> None:
    if ctx.found_inf is not None:
        extras[_FOUND_INF] = ctx.found_inf
    if ctx.nonfinite is not None:
        extras[_NONFINITE] = ctx.nonfinite


def _agree_flags(ctx: GradContext) -> None:
    """All ranks take the same skip decision: the flags become their maximum over ranks (one collective)."""
    flags = [f.reshape(()) for f in (ctx.found_inf, ctx.nonfinite) if f is not None]
    if not flags:
        return
    agreed = ctx.agree(torch.stack(flags).float())
    if ctx.found_inf is not None:
        ctx.found_inf, agreed = agreed[0].to(ctx.found_inf.dtype).reshape(ctx.found_inf.shape), agreed[1:]
    if ctx.nonfinite is not None:
        ctx.nonfinite = agreed[0].to(ctx.nonfinite.dtype).reshape(ctx.nonfinite.shape)


def _skip_flag(ctx: GradContext) -> torch.Tensor | None:
    if ctx.found_inf is None:
        return ctx.nonfinite
    if ctx.nonfinite is None:
        return ctx.found_inf
    return torch.maximum(ctx.found_inf.reshape(()), ctx.nonfinite)


def train_step(loss_fn: LossFn) -> Step:
    """A training step: forward, backward, optimizer update, scheduler step.

    ``loss_fn(model, batch)`` returns a scalar loss tensor, ``(loss, metrics_dict)``, or
    ``None`` to skip the batch; it is a function (a ``torch.nn.Module`` of torch's, ``nn.MSELoss()``, is refused:
    wrap it, ``lambda model, batch: criterion(model(batch[0]), batch[1])``; a Module of one's own whose ``forward``
    takes ``(model, batch)`` is taken); it does not call ``loss.backward()`` (the step does: one that does is told so,
    naming it, by a ``RuntimeError`` that leaves the state as it was). The step reports ``loss`` and the aux
    metrics as 0-dim tensors on the device (it never reads them on the host). The state's RNG drives dropout.
    Each update's backward (a ``with_grad_accum`` group's first) starts from no gradients on the optimizer's
    parameters, as a loop's ``optimizer.zero_grad()`` before it: gradients left there between updates (a
    ``loss.backward()`` of one's own, another state's optimizer over part of the same model) are dropped, not added
    in, and given back after an error that leaves the state as it was (in one process: under ``with_ddp`` or
    ``with_fsdp`` they are added in).
    ``loss_fn`` must compute the loss with the ``model`` it is given: a backward that reaches none of the optimizer's
    parameters, nor any of the model's (a ``loss_fn`` that closes over a model of its own, ``self(x)`` ported as is),
    raises a ``ValueError`` (at an update's first micro-batch, or one whose group's sum a transform sets apart),
    leaving the state as it was.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> model = torch.nn.Linear(3, 1)
    >>> state = TrainState.create(model, torch.optim.Adam(model.parameters()))
    >>> def loss_fn(model, batch):
    ...     x, y = batch
    ...     err = model(x) - y
    ...     return (err ** 2).mean(), {"mae": err.abs().mean()}
    >>> state, metrics = train_step(loss_fn)(state, (torch.randn(8, 3), torch.randn(8, 1)))
    >>> sorted(metrics), state.step
    (['loss', 'mae'], 1)
    """
    if not callable(loss_fn):
        raise TypeError(f"train_step: loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__qualname__}")
    check_takes_model_and_batch(loss_fn, "train_step: loss_fn")
    return TrainStep(loss_fn)


# --- the evaluation step -----------------------------------------------------------------------


@attrs.frozen(eq=False)
class EvalStep(Step):
    """The step ``eval_step(metric_fn)`` returns: eval mode, no gradients, the state unchanged.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> step = eval_step(lambda m, b: {"mean": m(b).mean()})
    >>> state = TrainState.create(torch.nn.Linear(2, 1))
    >>> same, metrics = step(state, torch.ones(3, 2))
    >>> isinstance(step, EvalStep), same is state, sorted(metrics)
    (True, True, ['mean'])
    """

    metric_fn: MetricFn
    precision: Precision | None = None
    transforms: tuple[str, ...] = ()
    donated: bool = False
    changes_state = False

    @property
    def applied(self) -> tuple[str, ...]:
        return ("eval_step",) + self.transforms

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        try:
            return state, self._metrics(state, batch)
        except BaseException as error:  # an evaluation changes nothing: the state is as it was
            leave_intact(error, state)
            raise

    def _metrics(self, state: TrainState, batch: Any) -> Metrics:
        model = state.model
        cuda_index = _cuda_index(model_device(model))
        # a state that draws from the global RNG: the evaluation draws from a copy of it, put back after
        scope = RNGScope(state.rng or global_rng_state(cuda_index), cuda_index, state.seed)
        try:
            with evaluating(model), torch.no_grad():
                if self.precision is not None:
                    with self.precision.autocast(model_device(model).type):
                        out = self.metric_fn(model, batch)
                else:
                    out = self.metric_fn(model, batch)
        finally:
            scope.discard()
        where = f"metric_fn {_fn_name(self.metric_fn)}"
        if not isinstance(out, Mapping):
            raise TypeError(f"{where} returned a {type(out).__qualname__}; expected a dict of metrics")
        return {k: check_metric(v, k, where) for k, v in out.items()}


def _plain_observers(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """The ``torch.ao.quantization`` observers among ``modules`` that no fake-quantizer switches on and off: those an
    observer-only qconfig (``get_default_qconfig``) puts in, which observe at every forward, training or not."""
    from torch.ao.quantization import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    modules = list(modules)
    switched = {id(sub) for m in modules if isinstance(m, FakeQuantizeBase) for sub in m.modules()}
    return [m for m in modules if isinstance(m, ObserverBase) and id(m) not in switched]


class kept_observers:  # noqa: N801  (a context manager, named as torch.no_grad is)
    """Until exit the plain quantization observers among ``modules`` observe as usual; on exit their buffers are put
    back as they were (a frozen observer). torch has no switch for them (``disable_observer`` acts on fake-quantizers
    only): each is copied on entry and copied back in place on exit, even after an error (no host sync).

    >>> import torch
    >>> observer = torch.ao.quantization.MinMaxObserver()
    >>> with kept_observers([observer]):
    ...     _ = observer(torch.tensor([1.0, 5.0]))
    ...     float(observer.max_val)
    5.0
    >>> float(observer.max_val)  # as it was: -inf, nothing observed
    -inf
    """

    __slots__ = ("_modules", "_saved")

    def __init__(self, modules: Iterable[torch.nn.Module]) -> None:
        self._modules = _plain_observers(modules)
        self._saved: list[tuple[torch.nn.Module, str, torch.Tensor]] = []

    def __enter__(self) -> None:
        self._saved = [(m, name, buf.detach().clone()) for m in self._modules
                       for name, buf in m._buffers.items() if buf is not None]

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for m, name, saved in self._saved:
                buf = m._buffers[name]
                if buf.shape != saved.shape:  # (an observer that saw its first input resizes its ranges)
                    buf.resize_(saved.shape)
                buf.copy_(saved)
        self._saved = []


class evaluating:  # noqa: N801  (a context manager, named as torch.no_grad is)
    """Eval mode for ``model`` until exit, each module's own mode put back after; quantization
    observers (``torch.ao.quantization`` fake-quantize modules, and the plain observers of an observer-only
    qconfig, whose buffers are put back on exit) are paused meanwhile, as Lightning's QAT callback pauses
    them outside training, so an evaluation changes no buffer of a QAT model.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    >>> model[1].eval()
    Dropout(p=0.5, inplace=False)
    >>> with evaluating(model):
    ...     model.training
    False
    >>> model.training, model[1].training
    (True, False)
    """

    __slots__ = ("_kept", "_model", "_modes", "_observers", "_sharded")

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._modes: list[tuple[torch.nn.Module, bool]] = []
        self._observers: list[tuple[torch.nn.Module, torch.Tensor]] = []
        self._kept: kept_observers | None = None
        self._sharded: list[Any] = []

    def __enter__(self) -> torch.nn.Module:
        self._modes = [(m, m.training) for m in self._model.modules()]
        # under with_fsdp(reshard_after_forward=False) a forward without backward leaves the parameters whole (plain
        # tensors, not the sharded ones): put back on exit, so the state reads as sharded (checkpoints gather)
        self._sharded = fsdp_modules([m for m, _ in self._modes])
        # a FakeQuantize's observer_enabled flag (a buffer): copied and put back, never read (no host sync)
        self._observers = [(m, m._buffers["observer_enabled"].clone()) for m, _ in self._modes
                           if "observer_enabled" in m._buffers and hasattr(m, "disable_observer")]
        for m, _ in self._observers:
            m.disable_observer()
        # a plain observer (observer-only qconfig) has no such flag: its buffers are copied and put back on exit
        self._kept = kept_observers(m for m, _ in self._modes)
        self._kept.__enter__()
        self._model.eval()
        return self._model

    def __exit__(self, *exc: Any) -> None:
        for m, mode in self._modes:
            m.training = mode
        with torch.no_grad():
            for m, flag in self._observers:
                m.observer_enabled.copy_(flag)
        if self._kept is not None:
            self._kept.__exit__(*exc)
            self._kept = None
        for m in self._sharded:  # (local: frees the gathered parameters, no collective)
            m.reshard()


def eval_step(metric_fn: MetricFn) -> Step:
    """An evaluation step: ``metric_fn(model, batch)`` in eval mode under ``torch.no_grad()``.

    Returns the state unchanged (training mode restored module by module) and the metrics.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> state = TrainState.create(torch.nn.Linear(2, 1))
    >>> step = eval_step(lambda m, b: {"mse": ((m(b[0]) - b[1]) ** 2).mean()})
    >>> same, metrics = step(state, (torch.ones(4, 2), torch.zeros(4, 1)))
    >>> same is state, state.model.training, sorted(metrics)
    (True, True, ['mse'])
    """
    if not callable(metric_fn):
        raise TypeError(f"eval_step: metric_fn must be callable as metric_fn(model, batch), got {type(metric_fn).__qualname__}")
    check_takes_model_and_batch(metric_fn, "eval_step: metric_fn")
    return EvalStep(metric_fn)
