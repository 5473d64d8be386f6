"""``TrainState``: everything a training step reads and writes, as one immutable value.

>>> import torch
>>> state = TrainState.create(torch.nn.Linear(2, 1), seed=0)
>>> state.step, state.epoch, state.batch_index
(0, 0, 0)
>>> state.evolve(epoch=1).epoch
1
"""

from __future__ import annotations

import copy
import functools
import numbers
import types
import warnings
import weakref
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn

from loopkit._sharded import full, holds_unreduced_grads, is_sharded
from loopkit.errors import DonatedStateError, StateMismatchError
from loopkit.rng import create_rng
from loopkit.tree import compact_views, decode_tree, encode_tree, from_plain, sequence_like, to_plain

__all__ = [
    "HeldScheduler", "TrainState", "copy_model", "drop_graph", "extras_copy", "fork", "held_scheduler", "keep_graph",
    "leave_intact", "make_state", "model_device", "put_extras", "replace", "replace_extras", "scheduler_for",
    "scheduler_held", "state_at_error", "with_held_scheduler",
]

_Scheduler = torch.optim.lr_scheduler.LRScheduler


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if value is None:
        return types.MappingProxyType({})
    if isinstance(value, types.MappingProxyType):
        return value
    return types.MappingProxyType(dict(value))


class _GraphSlot:
    """TrainState's one slot outside its attrs fields (so outside equality, ``evolve``, copies and pickles).

    It holds the autograd graph of the step call that made the state: see :func:`keep_graph`.
    """

    __slots__ = ("_graph",)


@attrs.frozen(eq=False, slots=True)
class TrainState(_GraphSlot):
    """The whole training state: model, optimizer, scheduler, counters, RNG and transform extras.

    Frozen: change it with :meth:`evolve`, which returns a new state. A step never changes
    the state it is given (unless it is :func:`loopkit.donate`-d), so an old state stays a
    valid snapshot. ``extras`` is a read-only mapping that transforms keep their own state in
    (loss scale, accumulation counter, EMA weights, ...). ``seed`` seeds the data order.

    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=1)
    >>> state.seed, sorted(state.rng)
    (1, ['cpu'])
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    scheduler: _Scheduler | None = None
    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    rng: Mapping[str, torch.Tensor] = attrs.field(factory=lambda: create_rng(0))
    extras: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    seed: int = 0
    _consumed: bool | str = attrs.field(default=False, init=False, repr=False)  # True: given to a donated step;
    # a string: to that call, which raised (:func:`mark_used_up_by_error`), for DonatedStateError's advice

    @classmethod
    def create(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: _Scheduler | None = None,
        *,
        seed: int = 0,
        global_rng: bool = False,
    ) -> TrainState:
        """Build a fresh state at step 0 whose RNG is seeded with ``seed``.

        With ``global_rng=True`` the state holds no RNG (``state.rng`` is empty): its steps
        draw dropout and any sampling from torch's global RNG, as a plain PyTorch loop does
        (seed it with :func:`loopkit.seed_everything`), and skip installing and reading back
        an RNG of their own, about 4 µs a step on the CPU. Checkpoints hold the global RNG,
        so a resumed run still draws what the uninterrupted one drew, as long as nothing but
        the steps draws from it (an evaluation puts it back as it found it). Two calls on
        the same state then draw different numbers; ``seed`` still seeds the data order.

        The state takes the model as it is, less any gradients its parameters hold (from a
        backward of your own): a fresh state has no accumulation in progress, so the first
        update sees only its own batches' gradients, as in a loop that calls ``zero_grad()``
        before ``backward()``.

        >>> import torch
        >>> TrainState.create(torch.nn.Linear(1, 1), seed=3).seed
        3
        """
        _check_parts(model, optimizer, scheduler)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"TrainState.create: seed must be a non-negative int, got {seed!r}")
        seed = int(seed)  # (a numpy integer, as evolve takes one)
        if not isinstance(global_rng, bool):
            raise TypeError(f"TrainState.create: global_rng must be True or False, got {global_rng!r}")
        model.zero_grad(set_to_none=True)
        return cls(model, optimizer, scheduler, rng={} if global_rng else create_rng(seed), seed=seed)

    def evolve(self, **changes: Any) -> TrainState:
        """Return a copy of this state with ``changes`` applied (tensors are shared, not copied).

        The changes are checked as :meth:`create` checks its arguments: a model the optimizer does
        not train, an optimizer over another model's parameters, a scheduler of another
        optimizer, a negative counter or an RNG that is not a generator state are refused.

        The two states share what was not changed: the model, the optimizer and their tensors. A
        donated step given one of them (``run_epochs`` donates its state) changes them in place,
        so the other then holds that step's weights under its own counters: to keep a snapshot to
        come back to, take ``copy.deepcopy(state)`` (or run with ``donate=False``). States that
        share a model on purpose (two optimizers over one model, trained in turn) work as they are.

        >>> import torch
        >>> TrainState.create(torch.nn.Linear(1, 1)).evolve(step=5).step
        5
        """
        self.check_usable()
        unknown = set(changes) - _FIELDS
        if unknown:
            raise TypeError(f"TrainState.evolve: no field {sorted(unknown)[0]!r}; the fields are {', '.join(_FIELD_ORDER)}")
        if {"model", "optimizer", "scheduler"} & set(changes):
            _check_parts(
                changes.get("model", self.model), changes.get("optimizer", self.optimizer),
                changes.get("scheduler", self.scheduler), "TrainState.evolve",
            )
        for name in ("step", "epoch", "batch_index", "seed"):
            if name in changes:
                value = changes[name]
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                    raise ValueError(f"TrainState.evolve: {name} must be a non-negative int, got {value!r}")
                changes[name] = int(value)
        if "rng" in changes:
            _check_rng(changes["rng"])
        if "extras" in changes and not isinstance(changes["extras"], Mapping):
            raise TypeError(f"TrainState.evolve: extras must be a mapping of names to values, got "
                            f"{type(changes['extras']).__qualname__}")
        return replace(self, **changes)

    def check_usable(self) -> None:
        """Raise :class:`loopkit.DonatedStateError` if this state was given to a donated step.

        >>> import torch
        >>> TrainState.create(torch.nn.Linear(1, 1)).check_usable()
        """
        if self._consumed:
            raise DonatedStateError(_used_up(self))

    def mark_consumed(self) -> None:
        """Mark this state as donated: any later use raises :class:`loopkit.DonatedStateError`."""
        object.__setattr__(self, "_consumed", True)

    def mark_usable(self) -> None:
        """Undo :meth:`mark_consumed` (a donated call that failed before it changed anything)."""
        object.__setattr__(self, "_consumed", False)

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy``, ``copy.copy`` and ``pickle`` take: each field, ``extras`` as a plain dict.

        A read-only proxy can be neither copied nor pickled, and a Parameter's own copy leaves
        its gradient behind (an accumulation group's, here); a donated state refuses, as any other
        use. ``copy.deepcopy(state)`` is an independent state (model, gradients, gradient hooks,
        optimizer, scheduler and extras copied together: the copy's optimizer updates the copy's
        parameters; a tensor a module keeps that autograd computed, as the hook-based ``spectral_norm`` and
        ``weight_norm`` keep ``weight``, copied detached, as a pickle copies it). A pickle keeps no gradient hooks (torch pickles none), and neither keeps hooks
        registered on the optimizer (torch's own copy of an optimizer keeps none).

        >>> import copy, torch
        >>> state = TrainState.create(torch.nn.Linear(1, 1)).evolve(extras={"a": 1})
        >>> twin = copy.deepcopy(state)
        >>> twin.model.weight is state.model.weight, dict(twin.extras)
        (False, {'a': 1})
        """
        self.check_usable()
        fields = {name: getattr(self, name) for name in _FIELD_ORDER}
        fields["extras"] = dict(self.extras)
        fields["grads"] = [p.grad for p in self.model.parameters()]  # a Parameter's own copy leaves its grad
        return fields

    def __setstate__(self, fields: Mapping[str, Any]) -> None:
        for name in _FIELD_ORDER:
            object.__setattr__(self, name, fields[name])
        object.__setattr__(self, "extras", _frozen_mapping(fields["extras"]))
        object.__setattr__(self, "_consumed", False)
        for param, grad in zip(self.model.parameters(), fields["grads"], strict=True):
            param.grad = grad
        optimizer = self.optimizer
        if isinstance(optimizer, torch.optim.LBFGS) and "_params" not in optimizer.__dict__:  # (torch's own copy
            optimizer._params = optimizer.param_groups[0]["params"]  # of an LBFGS leaves out what it keeps aside)
            optimizer._numel_cache = None
        if self.scheduler is not None and "step" not in optimizer.__dict__:  # type: ignore[union-attr]
            optimizer.step = _track_step_called(optimizer)  # type: ignore[method-assign, union-attr, arg-type]

    def __deepcopy__(self, memo: dict[int, Any]) -> TrainState:
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(_deepcopy_holding(self.model, self.__getstate__(), memo))
        return new

    def state_dict(self) -> dict[str, Any]:
        """The whole state as nested dicts of tensors, numbers and strings (tensors are shared).

        A tensor that is a view of part of a larger storage (a parameter of ``ensemble.members[k]``, a slice of the
        stacked ``[K, ...]`` storage) comes copied out compactly (see :func:`loopkit.tree.compact_views`), so that
        ``torch.save`` and checkpoints write this state's values alone, not the whole storage; tensors that share a
        storage (tied weights) still share one.

        ``"optimizer"`` holds all the optimizer's ``state_dict()`` does, as ``torch.load(weights_only=True)`` reads
        it back: each parameter's state under its index (as a string), an entry the optimizer keeps in its ``state``
        under a name (``self.state["global"]``) under that name, the param groups, and each other entry its
        ``state_dict()`` adds (an update counter); a wrapper's state dict laid out its own way (a Lookahead's
        ``{"fast": ..., "slow": ...}``) as it is. An entry no such file can hold (an object of one's own) is refused
        here (``TypeError``, naming the optimizer's class and the entry).

        A state whose model ``with_fsdp`` sharded gives the full (unsharded) state dict, the same
        as the unsharded state's: each sharded parameter, gradient and optimizer tensor is
        gathered whole (new tensors, on every rank: each rank gets a value it may use, and holds
        the whole state while it keeps it), a collective that every rank must make at the same
        point. loopkit's own writers (``with_checkpointing``, ``export_weights``) gather into rank
        0's CPU memory alone instead (:func:`full_state_dict_on_rank_zero`).
        Inside a ``with_grad_accum`` group such a state refuses (``RuntimeError``): its partial
        gradients are each rank's own, held unsharded by ``fully_shard``; flush the group first.

        >>> import torch
        >>> sorted(TrainState.create(torch.nn.Linear(1, 1)).state_dict())
        ['batch_index', 'epoch', 'extras', 'grads', 'model', 'rng', 'seed', 'step']
        """
        sd = self._state_dict(to_rank_zero=False)
        assert sd is not None
        return sd

    def _state_dict(self, *, to_rank_zero: bool) -> dict[str, Any] | None:
        """:meth:`state_dict`; a sharded state's gathered into rank 0's CPU memory alone with ``to_rank_zero``
        (None on the other ranks, which take part in each gather and drop what it gives at once)."""
        self.check_usable()
        model = core_module(self.model)
        sharded = is_sharded(model)  # under with_fsdp: each DTensor gathered whole (a collective on every rank)
        if sharded and holds_unreduced_grads(model):
            raise RuntimeError(
                f"TrainState.state_dict: this state's model is sharded (with_fsdp) and inside a with_grad_accum group "
                f"(step {self.step}, batch {self.batch_index}): the group's partial gradients are each rank's own, held "
                "unsharded by fully_shard until the group's last micro-batch reduces them, so no full state exists "
                "here (a checkpoint of it would resume without them). Flush the group first (state, metrics = "
                "step.flush(state)), or save at an update (with_checkpointing saves at updates and epoch ends)"
            )
        sd: dict[str, Any] = {
            "model": dict(model.state_dict()),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        }
        plain = self.optimizer.state_dict() if self.optimizer is not None else None
        if sharded:  # (the same gathers in the same order on every rank)
            sd["model"], sd["grads"] = full(sd["model"], to_rank_zero=to_rank_zero), full(sd["grads"], to_rank_zero=to_rank_zero)
            if plain is not None:  # (each entry: torch's, the optimizer's own, a wrapper's own layout)
                plain = full(plain, to_rank_zero=to_rank_zero)
            if sd["model"] is None:  # (not rank 0: nothing kept)
                return None
        if plain is not None:
            sd["optimizer"] = _encode_optimizer(plain, type(self.optimizer))
        if self.scheduler is not None:
            sd["scheduler"] = to_plain(self.scheduler.state_dict(), ("scheduler",))
        sd.update(
            step=self.step,
            epoch=self.epoch,
            batch_index=self.batch_index,
            seed=self.seed,
            rng=dict(self.rng),
            extras=encode_tree(self.extras, ("extras",)),  # its tuples, lists and None come back as they were
        )
        return compact_views(sd)  # (torch.save writes a view's whole storage: an ensemble member's, all K members')

    def load_state_dict(self, state_dict: Mapping[str, Any], *, copy: bool = True) -> TrainState:
        """Return a new state restored from ``state_dict``; this state is left unchanged.

        Everything is checked before anything is copied: the first missing, unexpected or
        mis-shaped key is named in a :class:`loopkit.StateMismatchError`. A module's extra state (what its
        ``get_extra_state()`` returns: a list, a tuple, a dict of them) goes to its ``set_extra_state`` as the state
        dict holds it (a copy), as torch's ``Module.load_state_dict`` hands it over. With
        ``copy=False`` the new state takes the parameter, buffer and gradient tensors of
        ``state_dict`` that already have the model's dtype, device, shape and layout (each
        the only tensor on its storage) instead of copying them, as
        ``Module.load_state_dict(assign=True)`` does: for a state dict nothing else uses,
        such as one just read from a file (training then changes those tensors in place).

        The optimizer's implementation options (``foreach``, ``fused``, ``capturable``,
        ``differentiable``) stay this state's, whatever ``state_dict`` holds: they say how this
        process runs the update (a run resumed with ``fused=True`` on a GPU), not where training
        stands (torch's own ``Optimizer.load_state_dict`` takes the saved ones). The optimizer's own entries (see
        :meth:`state_dict`) go to its ``load_state_dict`` as saved: an optimizer of one's own takes any, one of
        ``torch.optim`` only those its own state dict has (it would drop another silently); a state dict saved
        without them (by an earlier loopkit) loads as it is. A wrapper's own layout goes to its ``load_state_dict``
        whole, once its top-level keys are this state's.

        A state whose model ``with_fsdp`` has sharded refuses (``TypeError``): load into the
        unsharded state, which the ``with_fsdp`` step shards, optimizer state and all, at its first call.

        >>> import torch
        >>> a = TrainState.create(torch.nn.Linear(2, 1)).evolve(step=4)
        >>> b = TrainState.create(torch.nn.Linear(2, 1)).load_state_dict(a.state_dict())
        >>> b.step, bool(torch.equal(a.model.weight, b.model.weight))
        (4, True)
        """
        self.check_usable()
        if is_sharded(core_module(self.model)):
            raise TypeError(
                "TrainState.load_state_dict: this state's model is sharded (with_fsdp); load into an unsharded "
                "state instead: build it as usual (TrainState.create(model, optimizer, scheduler)), restore or load "
                "it, and give it to the with_fsdp step, which shards it at its first call"
            )
        if isinstance(state_dict, Mapping) and _uninitialized(self.model):  # a lazy module's, before its first forward
            return _shaped(self, state_dict).load_state_dict(state_dict, copy=copy)
        decoded = _decode(self, state_dict)
        memo, grads = ({}, {}) if copy else _adoptable(core_module(self.model), decoded)
        new = _fork(self, memo, optimizer_state=False)  # the optimizer state is replaced below: no copy of it
        if copy and "optimizer" in decoded:  # Optimizer.load_state_dict keeps tensors of the right dtype and device
            decoded["optimizer"] = _optimizer_copy(decoded["optimizer"])
        _apply(new, decoded, grads)
        return new.evolve(
            step=decoded["step"],
            epoch=decoded["epoch"],
            batch_index=decoded["batch_index"],
            seed=decoded["seed"],
            rng=decoded["rng"],
            extras=decoded["extras"],
        )


#: the attribute an exception carries when it left the state it names as it was (see :func:`leave_intact`)
_INTACT = "_loopkit_left_intact"

#: the fields ``TrainState(...)`` and :func:`make_state` take, in their order
_FIELD_ORDER = tuple(field.name for field in attrs.fields(TrainState) if field.init)
_FIELDS = frozenset(_FIELD_ORDER)

# the slots' own setters: what attrs' __init__ reaches through one bound object.__setattr__ call per field
_SETTERS = tuple(TrainState.__dict__[name].__set__ for name in _FIELD_ORDER + ("_consumed",))
_set_extras = _SETTERS[_FIELD_ORDER.index("extras")]
_set_graph = _GraphSlot.__dict__["_graph"].__set__
_new_object = object.__new__
_MappingProxy = types.MappingProxyType


def extras_copy(extras: Mapping[str, Any]) -> dict[str, Any]:
    """A mutable copy of a state's ``extras``, to change and pass to :func:`make_state` or :func:`replace`.

    A state's extras are a read-only proxy of a dict: its ``copy()`` copies that dict in C,
    where ``dict(proxy)`` and ``{**proxy}`` go key by key (five times slower, on every step).

    >>> import torch
    >>> state = TrainState.create(torch.nn.Linear(1, 1)).evolve(extras={"a": 1})
    >>> new = extras_copy(state.extras); new["b"] = 2
    >>> sorted(new), sorted(state.extras)
    (['a', 'b'], ['a'])
    """
    if type(extras) is _MappingProxy:
        try:
            new = extras.copy()  # the copy() of the mapping underneath
        except AttributeError:  # a read-only view of a Mapping without copy()
            return dict(extras)
        if type(new) is dict:
            return new
    return dict(extras)


def put_extras(fresh: TrainState, extras: Mapping[str, Any]) -> None:
    """Set the ``extras`` of a state that nothing else holds yet, in place: no second new state.

    Only for the state a step with ``returns_fresh_state`` has just returned, before it is handed
    to anyone (a callback, a logger, the caller): a hot path adding its own entries (the driver's
    epoch means, ``with_logging``'s window) would otherwise make one more state per call.
    Everywhere else use :func:`replace_extras`, which leaves the given state as it was.

    >>> import torch
    >>> fresh = TrainState.create(torch.nn.Linear(1, 1))
    >>> put_extras(fresh, {"a": 1}); dict(fresh.extras)
    {'a': 1}
    """
    _set_extras(fresh, extras if type(extras) is _MappingProxy else _frozen_mapping(extras))


def keep_graph(state: TrainState, loss: torch.Tensor) -> TrainState:
    """Keep ``loss`` (and so its autograd graph) alive as long as ``state``, the state its step call made.

    A parameter's gradient accumulator (the autograd node that adds into ``.grad``) lives only
    while a graph holds it; a plain loop's ``loss`` variable keeps the last graph until the next
    forward has made its own, so each forward reuses the accumulators. A step's loss would die
    with the call, and every forward would make one new node per parameter again (a constant cost
    per parameter tensor, a few microseconds per step on a small model). The graph's saved
    tensors are already freed by ``backward()``; what stays is what a plain loop keeps too. Only
    a donated call's state keeps it: a pure call's next forward runs on new copies of the
    parameters, so :meth:`Step.__call__ <loopkit.steps.Step>` lets it go (:func:`drop_graph`).
    Equality, ``evolve``, ``state_dict``, copies and pickles never see it.

    >>> import torch
    >>> model = torch.nn.Linear(1, 1)
    >>> loss = model(torch.ones(1)).sum()
    >>> state = keep_graph(TrainState.create(model), loss)
    >>> state.evolve(step=1).step
    1
    """
    _set_graph(state, loss)
    return state


def drop_graph(state: TrainState) -> None:
    """Let go of the graph :func:`keep_graph` kept on ``state``, a state nothing else holds yet.

    A pure call's state gives no next forward the accumulators (its parameters are new copies
    each call), so it keeps no graph: each state a caller keeps would hold one.

    >>> import torch
    >>> model = torch.nn.Linear(1, 1)
    >>> state = keep_graph(TrainState.create(model), model(torch.ones(1)).sum())
    >>> drop_graph(state); state._graph is None
    True
    """
    _set_graph(state, None)


def leave_intact(error: BaseException, state: Any) -> BaseException:
    """Mark ``error`` as raised before anything of ``state`` (a :class:`TrainState`, or an ensemble of
    ``loopkit.ensemble``) changed in place; returns ``error``.

    ``state=None`` takes the mark back: a wrapper that changed the state in place before
    its inner step raised says so.

    A donated call uses up its state even when it raises, since a failure half-way
    through an update leaves the parameters and optimizer state changed in place. A step
    that fails before its first in-place change (the loss_fn's forward, loopkit's checks
    of the loss and metrics, or its backward, whose gradients ``train_step`` gives back as
    the call found them) marks its error so, and the state stays usable: fix the
    cause and call again. ``train_step`` and ``eval_step`` do this; a custom step may too.
    In-place updates made by the forward itself (BatchNorm's running statistics) stay,
    as they do in a plain loop.

    >>> import torch
    >>> from loopkit.steps import donate, eval_step
    >>> state = TrainState.create(torch.nn.Linear(2, 1))
    >>> step = donate(eval_step(lambda m, b: {"x": "not a number"}))
    >>> try:
    ...     step(state, torch.ones(1, 2))
    ... except TypeError:
    ...     pass
    >>> state.check_usable()  # no DonatedStateError: eval changes nothing in place
    """
    try:
        setattr(error, _INTACT, state)
    except AttributeError:  # an exception type without attributes: the state counts as used up
        pass
    return error


#: what a state that a donated call used up and then raised was given to (:func:`mark_used_up_by_error`)
FAILED_FIT = "run_epochs"
FAILED_STEP = "a donated step"


def mark_used_up_by_error(state: TrainState, call: str) -> None:
    """Mark ``state``, which ``call`` (:data:`FAILED_FIT`, :data:`FAILED_STEP`) used up and then raised, returning
    no state: a later use's :class:`loopkit.DonatedStateError` then names the ways back (:func:`state_at_error`, a
    fresh state or a checkpoint, ``donate=False``), not the returned state there is none of. Only on the error path:
    a donated call that returns marks its state used up as it does (``True``). Nothing for a state still usable.

    >>> import torch
    >>> state = TrainState.create(torch.nn.Linear(1, 1))
    >>> state.mark_consumed(); mark_used_up_by_error(state, FAILED_FIT)
    >>> state.check_usable()
    Traceback (most recent call last):
    ...
    loopkit.errors.DonatedStateError: this TrainState (step 0, epoch 0, batch 0) was given to run_epochs, which ...
    """
    if type(state) is TrainState and state._consumed:
        object.__setattr__(state, "_consumed", call)


def _used_up(state: TrainState) -> str:
    """The message of the :class:`loopkit.DonatedStateError` of a used-up ``state``: how to go on from there."""
    where = f"this TrainState (step {state.step}, epoch {state.epoch}, batch {state.batch_index})"
    if state._consumed == FAILED_FIT:
        return (f"{where} was given to run_epochs, which trained it in place (it donates its state) and then "
                "raised, so it returned no state: go on from the fit's newest whole state, "
                "loopkit.state_at_error(error) of that error (None when the failure came half-way through an "
                "update), or start from a fresh state, or from a checkpoint restored into one "
                "(loopkit.restore(<a new TrainState>, path)); run_epochs(..., donate=False) trains a copy and leaves "
                "the state you pass as it was")
    if state._consumed == FAILED_STEP:
        return (f"{where} was given to a donated step, which changed it in place and then raised, so it "
                "returned no state: go on from loopkit.state_at_error(error) of that error (the state it left "
                "whole; None when the failure came half-way through an update), or start from a fresh state, or "
                "from a checkpoint restored into one (loopkit.restore(<a new TrainState>, path)), or keep a copy to "
                "come back to (copy.deepcopy(state), or a step that is not donated)")
    return f"{where} was given to a donated step, which reused its storage; use the state that step returned"


def state_at_error(error: BaseException) -> Any:
    """The state that ``error`` left whole and usable, or None when the failure changed it half-way.

    (A :class:`TrainState`; after a ``loopkit.ensemble.train_step(..., donated=True)`` error, the
    ``Ensemble`` it was given, when nothing of it changed.)

    After an exception out of :func:`loopkit.run_epochs` (a loss the step refuses at batch 40, a
    callback that raised), this is the fit's newest whole state: the updates before the
    failure, with their counters, RNG and extras (the stateful callbacks' counters too), ready
    to save or to train on (a state the failing batch had not changed yet is at that batch:
    training it again retries it). A failure at an epoch's end (its validation, an
    ``on_epoch_end``) gives the state before the epoch's record, so that training on validates
    and records that epoch, also one a callback stopped short (then the fit ends). A ``with_checkpointing``
    step save due at an update whose hooks raised (or held for the epoch's end at ``max_steps``) is
    marked in its extras (:data:`loopkit.steps.SAVE_DUE`): the fit given the state makes it. After a
    donated step's own error, it is the state the step was given, when nothing of it changed.
    None when the failure came half-way through an update (the optimizer's own error): the
    model and optimizer objects then hold what the update did to them, as in a plain loop.
    The failed batch's forward may have changed buffers in place (BatchNorm's running
    statistics) and, for a state made with ``global_rng=True``, drawn from the global RNG:
    training that batch again counts them again, as running a batch again in a plain loop would
    (a raising ``with_nan_guard`` puts the buffers back). Reading the failed batch drew its
    random augmentation (a ``Dataset``'s, in this process) from the global RNGs, which do not go
    back: a fit retried from this state reads that batch again with other draws. For a retry that
    is the uninterrupted run bitwise, resume from a checkpoint: :func:`loopkit.restore` sets the
    global RNGs as the checkpoint saved them.

    >>> import torch, loopkit
    >>> state = loopkit.TrainState.create(torch.nn.Linear(2, 1))
    >>> step = loopkit.donate(loopkit.eval_step(lambda m, b: {"x": "not a number"}))
    >>> try:
    ...     step(state, torch.ones(1, 2))
    ... except TypeError as e:
    ...     state_at_error(e) is state
    True
    """
    found = getattr(error, _INTACT, None)
    return found if found is not None and not found._consumed else None


class HeldScheduler(_Scheduler):
    """A scheduler held still: ``step()`` does nothing, everything else is the scheduler it holds (``get_last_lr()``,
    ``last_epoch``, ``state_dict()``, ``optimizer``, ...). ``with_step_scheduler`` and ``with_epoch_scheduler`` put
    one in their inner step's state, so that the inner step (a ``train_step``'s update, a step of one's own that
    calls ``state.scheduler.step()``) does not step the scheduler, which they step themselves after, and give the
    state they return the scheduler it holds back. ``fork`` copies one as a held copy of the copied scheduler; a
    checkpoint never sees one (``with_checkpointing`` inside a scheduler transform is refused). Its ``__class__`` is the
    held scheduler's, as a ``unittest.mock`` spec's is, so that a step's own ``isinstance(state.scheduler, StepLR)``
    holds; ``type()`` tells it apart (``type(held) is HeldScheduler``), and it pickles and copies as a held one.

    >>> import torch
    >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    >>> held = HeldScheduler(scheduler)
    >>> held.step(); held.get_last_lr(), held.last_epoch, held.optimizer is opt
    ([1.0], 0, True)
    >>> isinstance(held, torch.optim.lr_scheduler.StepLR), type(held).__name__
    (True, 'HeldScheduler')

    ``shown``: whether a gradient hook's fn sees the scheduler it holds (:func:`with_held_scheduler`), as under a
    scheduler transform; ``with_swa`` holds it with ``shown=False`` in SWA epochs, where SWALR sets the rates.
    """

    def __init__(self, scheduler: _Scheduler, shown: bool = True) -> None:  # (not LRScheduler's: it is set up)
        object.__setattr__(self, "_held", scheduler)
        object.__setattr__(self, "_shown", shown)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # (as unittest.mock's: isinstance checks see the held scheduler's class)
        return self._held.__class__

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the scheduler is held still."""

    def get_last_lr(self) -> list[Any]:
        return self._held.get_last_lr()

    def get_lr(self) -> list[Any]:
        return self._held.get_lr()

    def state_dict(self) -> dict[str, Any]:
        return self._held.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._held.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:  # (what the class does not have: the held scheduler's attributes)
        if name in ("_held", "_shown") or name.startswith("__"):  # (a copy under construction; copy and pickle probes)
            raise AttributeError(name)
        return getattr(self._held, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._held, name, value)

    def __reduce__(self) -> tuple[Any, ...]:  # (pickle's default checks ``__class__``, which is the held one's)
        return HeldScheduler, (self._held, self._shown)

    def __repr__(self) -> str:
        return f"HeldScheduler({self._held!r})"


def held_scheduler(scheduler: Any) -> Any:
    """The scheduler that ``scheduler`` stands for: the one a :class:`HeldScheduler` holds, any other as it is.

    >>> import torch
    >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    >>> held_scheduler(HeldScheduler(scheduler)) is scheduler, held_scheduler(scheduler) is scheduler
    (True, True)
    """
    return scheduler._held if type(scheduler) is HeldScheduler else scheduler


def with_held_scheduler(state: TrainState) -> TrainState:
    """``state`` with the scheduler a transform around the step holds still (a :class:`HeldScheduler` in its
    ``scheduler``) as its scheduler, where it holds one (and shows it: ``with_swa``'s, held in SWA epochs, stays held);
    else ``state`` itself: what ``with_grad_hook``'s fn sees, as a raw loop's hook sees the loop's scheduler
    (Lightning's ``self.lr_schedulers()`` in ``on_before_optimizer_step``).

    >>> import torch
    >>> model = torch.nn.Linear(1, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    >>> state = TrainState.create(model, opt, scheduler)
    >>> inner = replace(state, scheduler=HeldScheduler(scheduler))  # a scheduler transform's inner state
    >>> with_held_scheduler(inner).scheduler is scheduler, with_held_scheduler(state) is state
    (True, True)
    """
    scheduler = state.scheduler
    if type(scheduler) is HeldScheduler and scheduler._shown:
        return replace(state, scheduler=scheduler._held)
    return state


def scheduler_held(call: Any, state: TrainState, *args: Any, shown: bool = True) -> tuple[TrainState, Any]:
    """``call(state, *args)`` (an inner step's ``run_`` or ``flush_``) on ``state`` with its scheduler held still (a
    :class:`HeldScheduler`: the inner step's ``scheduler.step()`` does nothing, where it would step it
    per update), the result given the scheduler back: ``with_epoch_scheduler``'s and ``with_step_scheduler``'s inner
    calls, and ``with_swa``'s in SWA epochs (``shown=False``: SWALR sets the rates there, and ``with_grad_hook``'s fn
    sees the scheduler held still too; else it sees the scheduler itself, :func:`with_held_scheduler`). An error that
    left the state it was given whole leaves ``state`` whole; one that left a state of the inner step's whole (an
    update done, a logger's write failed) leaves it whole with the scheduler given back. An inner step of one's own
    that forks the state (:func:`fork`: a new optimizer) gets a copy of the scheduler that steps its
    optimizer; one that sets a scheduler of its own keeps it.

    >>> import torch
    >>> model = torch.nn.Linear(1, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> state = TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(opt, 1))
    >>> new, seen = scheduler_held(lambda s: (s, {"seen": s.scheduler}), state)
    >>> type(seen["seen"]).__name__, new.scheduler is state.scheduler
    ('HeldScheduler', True)
    """
    held = HeldScheduler(state.scheduler, shown)
    used = replace(state, scheduler=held)
    try:
        new, metrics = call(used, *args)
    except BaseException as error:
        whole = state_at_error(error)
        if whole is used:  # nothing changed: the caller's state is whole
            leave_intact(error, state)
        elif whole is not None and isinstance(whole.scheduler, HeldScheduler):  # (an update done, a write failed)
            leave_intact(error, _given_back(whole, held))
        raise
    return _given_back(new, held), metrics


def _given_back(new: TrainState, held: HeldScheduler) -> TrainState:
    """``new`` (the inner step's state) with the scheduler that ``held`` held still, or the held copy a fork of the
    state made, given back; with a scheduler of its own, as it is."""
    found = new.scheduler
    if found is held or found is None:  # (None: a step of one's own that set none, as before the scheduler was held)
        scheduler = held_scheduler(held)
    elif isinstance(found, HeldScheduler):  # a step of one's own that forked the state: the copy's
        scheduler = held_scheduler(found)
    else:  # a step of one's own that set a scheduler of its own: that one is the state's
        return new
    optimizer = new.optimizer
    # (a new optimizer with the held scheduler: state.evolve(optimizer=new, scheduler=None), or attrs.evolve and
    # loopkit.state.replace, which check nothing; state.evolve(optimizer=new) alone is refused, naming scheduler_for)
    if optimizer is not scheduler.optimizer and optimizer is not None:
        if _forked(scheduler.optimizer, optimizer):  # a step of one's own that forked the optimizer alone
            scheduler = scheduler_for(scheduler, optimizer)
        else:
            warnings.warn(
                "the inner step replaced the state's optimizer with one of other parameter groups, so the scheduler "
                "held for it steps the old one; give the new state a scheduler of its own (state.evolve(scheduler=...))",
                RuntimeWarning, stacklevel=4,
            )
    return replace(new, scheduler=scheduler)


def _forked(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> bool:
    """Whether ``new`` is a copy of ``old`` (``fork``): as many groups, each with the same settings and as many
    parameters (a scheduler's own settings, OneCycleLR's ``max_lr``, among them)."""
    return len(old.param_groups) == len(new.param_groups) and all(
        a.keys() == b.keys() and len(a["params"]) == len(b["params"]) for a, b in zip(old.param_groups, new.param_groups)
    )


def make_state(
    model: nn.Module, optimizer: Any, scheduler: Any, step: int, epoch: int, batch_index: int,
    rng: Mapping[str, torch.Tensor], extras: Mapping[str, Any], seed: int,
) -> TrainState:
    """``TrainState(...)`` with every field given, for hot paths: the same value, made in a third less time.

    A step makes one or two new states per call; attrs' generated ``__init__`` sets each slot through a
    bound ``object.__setattr__``, this sets them through the slots' own descriptors. ``extras`` is
    made read-only as the class's converter makes it.

    >>> import torch
    >>> state = TrainState.create(torch.nn.Linear(1, 1))
    >>> make_state(state.model, None, None, 2, 0, 0, state.rng, {"a": 1}, 0).extras["a"]
    1
    """
    if type(extras) is not _MappingProxy:
        extras = _frozen_mapping(extras)
    new = _new_object(TrainState)
    set_model, set_optimizer, set_scheduler, set_step, set_epoch, set_batch, set_rng, set_extras, set_seed, set_consumed = (
        _SETTERS
    )
    set_model(new, model)
    set_optimizer(new, optimizer)
    set_scheduler(new, scheduler)
    set_step(new, step)
    set_epoch(new, epoch)
    set_batch(new, batch_index)
    set_rng(new, rng)
    set_extras(new, extras)
    set_seed(new, seed)
    set_consumed(new, False)
    return new


def replace(state: TrainState, **changes: Any) -> TrainState:
    """A new state with ``changes`` applied: ``attrs.evolve`` without its per-call introspection.

    For hot paths (a step makes a new state every call); it does not check whether ``state``
    was donated (:meth:`TrainState.evolve` does).

    >>> import torch
    >>> replace(TrainState.create(torch.nn.Linear(1, 1)), step=3).step
    3
    """
    if not _FIELDS.issuperset(changes):
        unknown = sorted(set(changes) - _FIELDS)
        raise TypeError(f"TrainState has no field(s) {', '.join(unknown)}; the fields are {', '.join(sorted(_FIELDS))}")
    get = changes.get
    return make_state(
        get("model", state.model),
        get("optimizer", state.optimizer),
        get("scheduler", state.scheduler),
        get("step", state.step),
        get("epoch", state.epoch),
        get("batch_index", state.batch_index),
        get("rng", state.rng),
        get("extras", state.extras),
        get("seed", state.seed),
    )


def _check_parts(model: Any, optimizer: Any, scheduler: Any, where: str = "TrainState") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__qualname__}")
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{where}: optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__qualname__}"
            )
        owned = {id(p) for p in model.parameters()}
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) not in owned:
                    raise ValueError(
                        f"{where}: optimizer param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) "
                        "is not a parameter of the model; build the optimizer from model.parameters()"
                    )
    if scheduler is not None:
        if optimizer is None:
            raise ValueError(f"{where}: a scheduler needs an optimizer")
        if not isinstance(scheduler, _Scheduler):
            raise TypeError(
                f"{where}: scheduler must be a torch.optim.lr_scheduler.LRScheduler, got {type(scheduler).__qualname__}"
            )
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise TypeError(
                f"{where}: ReduceLROnPlateau steps on a validation metric, not once per update; keep it "
                "outside the state and call scheduler.step(metric) from a callback: once an epoch, in "
                "on_epoch_end(state, record) with record[monitor] (the epoch's latest validation), as Lightning's "
                "default \"interval\": \"epoch\" does, however many validations an epoch has (the ReduceLROnPlateau "
                "callback of docs/from_lightning.md's Callbacks section); in on_validation_end(state, metrics) only "
                "to step after every validation, as Lightning's \"interval\": \"step\" with val_check_interval"
            )
        if scheduler.optimizer is not optimizer:
            raise ValueError(_other_optimizer(where, scheduler))


def _other_optimizer(where: str, scheduler: Any) -> str:
    """The refusal of a ``scheduler`` that steps another optimizer than the state's, saying what to pass: to
    :meth:`TrainState.evolve` given a new optimizer, a scheduler for it too (:func:`scheduler_for` copies the state's
    onto it); a :class:`HeldScheduler` (a scheduler transform's inner state, whose step of one's own gave it a new
    optimizer) named as one.

    >>> import torch
    >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    >>> print(_other_optimizer("TrainState.evolve", HeldScheduler(torch.optim.lr_scheduler.StepLR(opt, 1))))
    TrainState.evolve: the scheduler, held still by the with_step_scheduler or with_epoch_scheduler around this step (which steps it after the step), was built for a different optimizer than the state's; a new optimizer needs a scheduler of its own: state.evolve(optimizer=new, scheduler=loopkit.state.scheduler_for(state.scheduler, new)) gives the state a copy of it that steps new, held still as well (the transform steps that copy and gives it back)
    """
    held = type(scheduler) is HeldScheduler
    what = ("the scheduler, held still by the with_step_scheduler or with_epoch_scheduler around this step (which "
            "steps it after the step)," if held else "the scheduler")
    refused = f"{where}: {what} was built for a different optimizer than the state's; "
    if where != "TrainState.evolve":
        return refused + ("build it from the optimizer given, or copy it onto that optimizer: "
                          "loopkit.state.scheduler_for(scheduler, optimizer)")
    return refused + (
        "a new optimizer needs a scheduler of its own: state.evolve(optimizer=new, "
        "scheduler=loopkit.state.scheduler_for(state.scheduler, new)) gives the state a copy of it that steps new"
        + (", held still as well (the transform steps that copy and gives it back)" if held else ", or build one for it")
    )


_CPU_RNG_SHAPE = torch.Generator().get_state().shape  # (a constant of the torch build)


def _check_rng(rng: Any) -> None:
    if isinstance(rng, Mapping) and not rng:  # no RNG of its own: the steps draw from the global RNG
        return
    if not isinstance(rng, Mapping) or not isinstance(rng.get("cpu"), torch.Tensor):
        raise TypeError(
            "TrainState.evolve: rng must be a mapping with a 'cpu' generator state (as state.rng), or empty for "
            f"the global RNG, got {type(rng).__qualname__}"
        )
    for key, value in rng.items():
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
            raise TypeError(f"TrainState.evolve: rng[{key!r}] must be a uint8 generator-state tensor")
    if rng["cpu"].shape != _CPU_RNG_SHAPE:
        raise ValueError(f"TrainState.evolve: rng['cpu'] has shape {tuple(rng['cpu'].shape)}, a CPU generator's state "
                         f"has {tuple(_CPU_RNG_SHAPE)} (torch.Generator().get_state())")


def core_module(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its ``_orig_mod``), or ``model`` itself: what a state dict,
    a checkpoint and the transforms' per-parameter extras name tensors after (as Lightning strips the
    ``_orig_mod.`` prefix), so that a compiled model's checkpoint loads into a plain one and back.

    >>> core_module(torch.nn.Linear(1, 1)).__class__.__name__
    'Linear'
    """
    modules = model._modules  # (a TorchScript module's is no dict)
    inner = modules.get("_orig_mod") if isinstance(modules, dict) else None  # (torch._dynamo's OptimizedModule,
    return inner if inner is not None and type(model).__name__ == "OptimizedModule" else model  # not imported for this)


_COMPILED = "_orig_mod."  # the prefix of a compiled model's own state dict keys (checkpoints from before core_module)


def _without_compiled_prefix(tree: Any) -> Any:
    """A mapping of tensor names with ``_orig_mod.`` taken off the front of each (a checkpoint of a compiled model)."""
    if isinstance(tree, Mapping) and any(isinstance(k, str) and k.startswith(_COMPILED) for k in tree):
        return {(k[len(_COMPILED):] if isinstance(k, str) and k.startswith(_COMPILED) else k): v for k, v in tree.items()}
    return tree


def plain_names(tensors: Mapping[Any, Any], model: nn.Module) -> dict[str, Any] | None:
    """``tensors`` (a transform's tensors by parameter name: EMA averages, pruning masks) under the names
    ``model`` (a plain module, as :func:`core_module` gives) has, when every name carries the ``_orig_mod.``
    prefix of a compiled model's own names (the extras of a checkpoint from before :func:`core_module`) and
    ``model`` has no submodule of that name; None otherwise (plain names, a mix, none): they stay as they are.

    >>> plain_names({"_orig_mod.weight": 1, "_orig_mod.bias": 2}, torch.nn.Linear(1, 1))
    {'weight': 1, 'bias': 2}
    >>> print(plain_names({"_orig_mod.weight": 1, "bias": 2}, torch.nn.Linear(1, 1)))
    None
    """
    if not tensors or "_orig_mod" in model._modules:
        return None
    if not all(isinstance(name, str) and name.startswith(_COMPILED) for name in tensors):  # (stops at a plain one)
        return None
    return _without_compiled_prefix(tensors)


def persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers of ``model`` that its ``state_dict`` holds (not the non-persistent ones, caches), by name.

    >>> model = torch.nn.BatchNorm1d(2)
    >>> model.register_buffer("cache", torch.zeros(1), persistent=False)
    >>> [name for name, _ in persistent_buffers(model)]
    ['running_mean', 'running_var', 'num_batches_tracked']
    """
    found = []
    for prefix, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                found.append((f"{prefix}.{name}" if prefix else name, buffer))
    return found


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither.

    >>> import torch
    >>> model_device(torch.nn.Linear(1, 1)).type
    'cpu'
    """
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def replace_extras(state: TrainState, extras: Mapping[str, Any]) -> TrainState:
    """:func:`replace` of ``extras`` alone: what a whole-step transform does on every call.

    >>> import torch
    >>> dict(replace_extras(TrainState.create(torch.nn.Linear(1, 1)), {"a": 1}).extras)
    {'a': 1}
    """
    return make_state(
        state.model, state.optimizer, state.scheduler, state.step, state.epoch, state.batch_index, state.rng,
        extras, state.seed,
    )


# --- a module's settings ----------------------------------------------------------------------

#: the values a setting holds (numpy's scalars too: a ``np.float32`` temperature)
_SETTING_SCALARS = (bool, int, float, str, type(None), np.generic)


def is_plain_setting(value: Any) -> bool:
    """Whether ``value`` is a setting's: a bool, int, float, str, None or numpy scalar, or a tuple or list of them.

    >>> is_plain_setting((1, 2)), is_plain_setting(torch.zeros(1))
    (True, False)
    """
    if type(value) in _SETTING_SCALARS:  # (the common case, checked first)
        return True
    if isinstance(value, (tuple, list)):
        return all(is_plain_setting(v) for v in value)
    return isinstance(value, _SETTING_SCALARS)


def module_settings(module: nn.Module) -> dict[str, Any]:
    """``module``'s own settings: its public instance attributes of plain values (``stride``, ``eps``,
    ``num_groups``, ``training``, a ``temperature`` set on it); not tensors, submodules or ``_``-private
    bookkeeping (``_parameters``, hooks). What ``loopkit.ensemble`` compares between members and
    ``loopkit.check_purity`` between calls.

    >>> module_settings(torch.nn.Linear(2, 3))
    {'training': True, 'in_features': 2, 'out_features': 3}
    """
    return {name: value for name, value in vars(module).items()
            if name[:1] != "_" and (type(value) in _SETTING_SCALARS or is_plain_setting(value))}


# --- copying only what a step changes -------------------------------------------------------


def fork(state: TrainState, *, optimizer_state: bool = True) -> TrainState:
    """A new state whose parameters, gradients, buffers, optimizer and scheduler state are copies.

    Module classes and hyper-parameters are shared; RNG and extras are immutable values and
    are shared too. The model's tensors that share a storage (a Parameter built from another's transposed data, or
    from a slice of a flat buffer) share one in the copy too, each the same view of it, so that an update of one shows
    in the others as in the original. Each module of the copy has its own registries: hooks registered before
    the copy run on both, and a hook, buffer or child module added to one later (as
    ``prepare_qat`` adds observers) stays with it. A step mutates the fork in place, which
    keeps the given state unchanged. A module the model keeps outside its registered tree (in a plain list or dict
    attribute, as a frozen teacher: :func:`shared_modules`) is shared, not copied: a forward through it in train mode
    changes the original's running statistics; register it (``nn.ModuleList``, ``nn.ModuleDict``) to have it
    copied. ``optimizer_state=False`` leaves the copy's optimizer state empty (for a caller
    that replaces it, such as ``load_state_dict``).

    >>> import torch
    >>> state = TrainState.create(torch.nn.Linear(1, 1))
    >>> new = fork(state)
    >>> new.model.weight is state.model.weight, bool(torch.equal(new.model.weight, state.model.weight))
    (False, True)
    """
    state.check_usable()
    refuse_copy_if_sharded(state, "loopkit.state.fork", "copy the unsharded state before the with_fsdp step's first "
                           "call with it, or make a full, unsharded copy on every rank: TrainState.create(new_model, "
                           "new_optimizer).load_state_dict(state.state_dict())")
    return _fork(state, {}, optimizer_state=optimizer_state)


def full_state_dict_on_rank_zero(state: TrainState) -> dict[str, Any] | None:
    """``state.state_dict()`` for the rank that writes it: a state whose model ``with_fsdp`` sharded is gathered
    into rank 0's CPU memory alone (a collective every rank makes at the same point; each other rank takes
    part, holds one whole tensor at a time and gets None: :func:`loopkit._sharded.full`), in the format of
    an unsharded state's; any other state's ``state_dict()`` as it is, on every rank.

    >>> sorted(full_state_dict_on_rank_zero(TrainState.create(torch.nn.Linear(1, 1)))["model"])
    ['bias', 'weight']
    """
    return state._state_dict(to_rank_zero=True)


def not_a_state(where: str, value: Any) -> TypeError:
    """The error for ``value`` given to ``where`` in place of a :class:`TrainState`, saying what to do for what it is
    (see :func:`state_hint`).

    >>> str(not_a_state("evaluate", torch.nn.Linear(1, 1)))
    'evaluate: state must be a loopkit.TrainState, got Linear: wrap the model, loopkit.TrainState.create(model, optimizer)'
    """
    return TypeError(f"{where}: state must be a loopkit.TrainState, got {type(value).__qualname__}{state_hint(value)}")


def state_hint(value: Any) -> str:
    """What to do with ``value``, given where a :class:`TrainState` belongs, for the end of a message: for a model,
    wrap it; for a step, the order of the arguments; for an object whose class says what to do instead in its
    ``instead_of_a_state`` (``loopkit.ensemble.Ensemble``: found so, without this module knowing the higher ones),
    that; else nothing.

    >>> class Ensemble:
    ...     instead_of_a_state = "give one member"
    >>> state_hint(Ensemble()), state_hint(3)
    (' (give one member)', '')
    """
    instead = getattr(type(value), "instead_of_a_state", None)
    if isinstance(instead, str):
        return f" ({instead})"
    if isinstance(value, nn.Module):
        return ": wrap the model, loopkit.TrainState.create(model, optimizer)"
    if callable(value):
        return " (a step? the order is (step, state, data))"
    return ""


def refuse_copy_if_sharded(state: TrainState, where: str, instead: str) -> None:
    """Raise ``TypeError`` naming ``where`` (what copies ``state``) and ``instead`` (what to do) when ``with_fsdp``
    has sharded ``state``'s model: a copy of a sharded model would need ``fully_shard``'s state of its own (its
    all-gathers and reduce-scatters would work on the original's), so nothing copies one. Nothing without.

    >>> import torch
    >>> refuse_copy_if_sharded(TrainState.create(torch.nn.Linear(1, 1)), "lr_find", "")
    """
    if is_sharded(core_module(state.model)):
        raise TypeError(
            f"{where}: the state's model is sharded (with_fsdp), and {where} copies the state: a copy of a sharded "
            f"model would need fully_shard's state of its own, so it is not made (nothing changed). {instead}"
        )


def _fork(state: TrainState, memo: dict[int, Any], *, optimizer_state: bool) -> TrainState:
    """:func:`fork` with ``memo`` mapping ``id`` of original tensors to the ones the copy uses."""
    model = _clone_model(state.model, memo)
    optimizer = scheduler = None
    if state.optimizer is not None:
        optimizer = _clone_optimizer(state.optimizer, memo, optimizer_state)
        if state.scheduler is not None:
            scheduler = _clone_scheduler(state.scheduler, optimizer, memo)
    return replace(state, model=model, optimizer=optimizer, scheduler=scheduler)


_Parameter = nn.Parameter
_Uninitialized = nn.parameter.UninitializedTensorMixin
_make_subclass = torch.Tensor._make_subclass


def _clone_tensor(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    key = id(t)
    found = memo.get(key)
    if found is not None:
        return found
    if isinstance(t, _Uninitialized):  # a lazy module's, before its first forward: the copy is as empty
        new = type(t)(requires_grad=t.requires_grad, device=t.device, dtype=t.dtype)
    elif type(t) is _Parameter:
        new = _make_subclass(_Parameter, t.detach().clone(), t.requires_grad)
        grad = t.grad
        if grad is not None:
            new.grad = grad.clone()
        if t.__dict__:
            new.__dict__.update(t.__dict__)
        _keep_tensor_hooks(t, new)
        _share_storage(t, new, memo)
    elif isinstance(t, _Parameter):
        new = type(t)(t.detach().clone(), t.requires_grad)
        if t.grad is not None:
            new.grad = t.grad.clone()
        for name, value in t.__dict__.items():  # (the attributes set on it, a ``no_decay`` tag, as for a Parameter)
            new.__dict__.setdefault(name, value)
        _keep_tensor_hooks(t, new)
        _share_storage(t, new, memo)
    else:
        base = t._base
        if base is not None:
            new = _clone_view(t, base, memo)
        elif t.requires_grad:  # a plain tensor of a module's that requires grad: a leaf of the copy's (as deepcopy
            new = t.detach().clone().requires_grad_(True)  # makes it), its gradients never reaching the original
        else:
            new = t.clone()
        if new._base is None:  # (not a view of a copy made already: that view shares its storage)
            _share_storage(t, new, memo)
    memo[key] = new
    return new


def _share_storage(t: torch.Tensor, new: torch.Tensor, memo: dict[int, Any]) -> None:
    """Make ``new``, the copy of ``t``, share storage with the copies of the tensors sharing ``t``'s, as the originals
    do (a Parameter built from another's transposed data, ``nn.Parameter(enc.data.t())``, or from a slice of a flat
    buffer): an update of one then shows in the others. The first tensor seen on a storage keeps its clone (one
    look-up: the usual case, a tensor alone on its storage, costs no more); a second one on it takes the first's
    copied storage when that clone holds the whole storage laid out alike, else a copy of the whole storage, onto
    which the first's clone is moved; each, then, the same view of it (offset, size, stride) as in the original.
    ``memo`` keys a storage by :func:`_storage_key` (a tuple: never an ``id``, nor ``_PENDING``).

    >>> flat = torch.arange(4.0)
    >>> parts = [flat[:2], flat.view(2, 2).t()]
    >>> memo = {}
    >>> for part in parts:
    ...     memo[id(part)] = part.clone()
    ...     _share_storage(part, memo[id(part)], memo)
    >>> _ = memo[id(parts[0])].add_(10)
    >>> memo[id(parts[1])].tolist(), flat.tolist()
    ([[10.0, 2.0], [11.0, 3.0]], [0.0, 1.0, 2.0, 3.0])
    """
    key = _storage_key(t)
    if key is None:
        return
    first = memo.get(key)
    if first is None:
        memo[key] = (t, new)
        return
    if type(first) is tuple:
        memo[key] = first = _whole_copy(*first)
    with torch.no_grad():
        new.set_(first, t.storage_offset(), t.size(), t.stride())


def _storage_key(t: torch.Tensor) -> tuple[str, int, int] | None:
    """What tells the storage of ``t`` apart: its address and size (two storages over one numpy array's memory, of
    two sizes, are two); None for a tensor without one to share (sparse, mkldnn; an empty or meta tensor's storage,
    at no address).

    >>> flat = torch.zeros(4)
    >>> _storage_key(flat[:2]) == _storage_key(flat), _storage_key(flat.to_sparse()), _storage_key(torch.zeros(0))
    (True, None, None)
    """
    if t.layout is not torch.strided:
        return None
    storage = t.untyped_storage()
    address = storage.data_ptr()
    return ("storage", address, storage.nbytes()) if address else None


def _whole_copy(t: torch.Tensor, new: torch.Tensor) -> torch.UntypedStorage:
    """A copy of ``t``'s whole storage, ``new`` (``t``'s clone) on it as ``t`` is on the original: ``new``'s own when
    it is one (``t`` covered its storage: a clone keeps a dense tensor's layout)."""
    storage, whole = new.untyped_storage(), t.untyped_storage()
    if t.storage_offset() == 0 and new.stride() == t.stride() and storage.nbytes() == whole.nbytes():
        return storage
    storage = whole.clone()
    with torch.no_grad():
        new.set_(storage, t.storage_offset(), t.size(), t.stride())
    return storage


def _clone_view(t: torch.Tensor, base: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    """A copy of the view ``t``: the same view of the copy of its ``base`` when that base is a tensor of the
    state copied already (a buffer that is a slice of another buffer stays one: an update of either shows in
    both, as in the original); else ``t`` alone (a slice of a larger tensor the state does not hold)."""
    new_base = memo.get(id(base))
    if new_base is None or new_base.stride() != base.stride():  # (a base clone() could not lay out alike)
        return t.clone()
    offset = t.storage_offset() - base.storage_offset() + new_base.storage_offset()
    with torch.no_grad():  # still a view of new_base (its _base), as t is of base: a later copy finds it
        return new_base.as_strided(t.size(), t.stride(), offset)


def _functions_read_the_copy(model: nn.Module, memo: dict[int, Any]) -> None:
    """After ``copy.deepcopy`` of a model (``memo`` its memo): each function in its modules' attributes and hook
    registries, and in its parameters' gradient hooks, that closes over (or defaults to) one of the original's modules
    or tensors reads the copy's instead (``copy.deepcopy`` shares functions, so a hook ``lambda m, a: (a[0] * gain,)``
    of the copy would read the original's ``gain``, and train it)."""
    def remap(registry: dict[Any, Any]) -> None:
        for key, value in list(registry.items()):
            if type(value) is types.FunctionType:
                registry[key] = _copied_closure(value, memo)

    for module in model.modules():
        attributes = vars(module)
        remap(attributes)
        for value in list(attributes.values()):
            if isinstance(value, dict) and value:  # (the hook registries, and dicts of one's own)
                remap(value)
    for param in model.parameters():
        for registry in (param._backward_hooks, param._post_accumulate_grad_hooks):
            if registry:
                remap(registry)


def copy_model(model: nn.Module) -> nn.Module:
    """An independent deep copy of ``model``, as ``copy.deepcopy(state)`` copies a state's model: unlike
    ``copy.deepcopy(model)`` it takes a model that keeps a tensor autograd computed (the hook-based
    ``torch.nn.utils.weight_norm`` and ``spectral_norm``), keeps its parameters' gradient hooks, and its
    functions (hooks, closures) read the copy, not the original.

    >>> model = torch.nn.utils.weight_norm(torch.nn.Linear(2, 1))
    >>> twin = copy_model(model)
    >>> twin.weight_v is model.weight_v, bool(torch.equal(twin(torch.ones(1, 2)), model(torch.ones(1, 2))))
    (False, True)
    """
    return _deepcopy_holding(model, model, {})


def _deepcopy_holding(model: nn.Module, value: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(value, memo)`` of a ``value`` that holds ``model`` (or is it), the model copied as
    :func:`copy_model` says."""
    _memoize_derived_tensors(model, memo)
    copied = copy.deepcopy(value, memo)
    new = memo[id(model)]
    for param, new_param in zip(model.parameters(), new.parameters(), strict=True):
        _keep_tensor_hooks(param, new_param)  # a Parameter's own deep copy leaves its hooks
    _functions_read_the_copy(new, memo)
    return copied


def _memoize_derived_tensors(model: nn.Module, memo: dict[int, Any]) -> None:
    """Map, in the ``copy.deepcopy`` ``memo``, each tensor that autograd computed (a non-leaf, which torch's deep copy
    refuses) among the modules' own attributes (:func:`attribute_tensors`) to a detached copy that requires grad, as
    ``pickle`` copies it: the ``weight`` the hook-based ``torch.nn.utils.spectral_norm`` (after a
    forward) and ``torch.nn.utils.weight_norm`` keep on the module, recomputed before each forward, or an
    activation a forward keeps.

    >>> model = torch.nn.Linear(2, 1)
    >>> model.scaled = model.weight * 2  # (as the hook-based norms keep ``weight``)
    >>> memo = {}
    >>> _memoize_derived_tensors(model, memo)
    >>> copied = memo[id(model.scaled)]
    >>> copied.is_leaf, copied.requires_grad, bool(torch.equal(copied, model.scaled))
    (True, True, True)
    """
    trees = list(attribute_tensors(model).values())
    while trees:
        tree = trees.pop()
        if isinstance(tree, dict):
            trees.extend(tree.values())
        elif tree.grad_fn is not None:
            _memoize(memo, tree, tree.detach().clone().requires_grad_(True))


def _keep_tensor_hooks(t: torch.Tensor, new: torch.Tensor) -> None:
    """Give ``new`` the gradient hooks registered on the parameter ``t`` (``register_hook``,
    ``register_post_accumulate_grad_hook``), in registries of its own."""
    hooks = t._backward_hooks
    if hooks:
        new._backward_hooks = OrderedDict(hooks)
    hooks = t._post_accumulate_grad_hooks
    if hooks:
        new._post_accumulate_grad_hooks = OrderedDict(hooks)


#: the registries besides parameters, buffers and children that something run in a step may add to
#: (observers, activation hooks); a copy has its own. The id-keyed companions of the hook dicts
#: stay shared (a stray id there is inert), and so do the state-dict hooks, set when a model is built.
_MODULE_REGISTRIES = ("_non_persistent_buffers_set", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
#: the attributes every ``nn.Module`` has: what is not among them is the module's own (its configuration, or more)
_MODULE_STANDARD = frozenset(nn.Module().__dict__)
#: attribute values a copy shares as they are
_SHARED_VALUES = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size)
_SHARED_KINDS = frozenset(_SHARED_VALUES)
#: containers up to this size are the copy's own (one a forward appends to stays pure); larger ones are too when
#: their first item is no plain value (a list of blocks), else shared as they are (a vocabulary, class names)
_SMALL = 64
#: the memo's entry of what is remapped once the whole model is copied: ``(container, key, value)``
_PENDING = -1


def _clone_model(model: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """A copy of ``model`` (see :func:`fork`): its modules, then what their attributes and hooks reach of them."""
    copied = _clone_module(model, memo)
    for container, key, value in memo.pop(_PENDING, ()):
        if container.get(key) is value:  # (not set anew meanwhile: a compiled wrapper binds its forward itself)
            container[key] = _copied_attribute(value, memo)
    return copied


def _clone_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    key = id(module)
    found = memo.get(key)
    if found is not None:
        return found
    new = object.__new__(type(module))
    attributes = module.__dict__.copy()
    object.__setattr__(new, "__dict__", attributes)
    memo[key] = new
    # the copy's own registries: a hook or buffer added to the copy never reaches the original
    for name in _MODULE_REGISTRIES:
        registry = attributes.get(name)
        if registry is not None:
            attributes[name] = copied = registry.copy()
            if copied and type(copied) is not set:  # (a hook that is a method of the model's: bound to the copy)
                memo.setdefault(_PENDING, []).extend((copied, k, v) for k, v in copied.items())
    own = _own_attributes(attributes)  # what may reach the model: remapped once the whole model is copied
    if own:
        if ("_c" in own or "_actual_script_module" in own) and isinstance(module, torch.jit.ScriptModule):
            raise TypeError(
                f"loopkit cannot copy the TorchScript module {type(module).__qualname__} in the state's model "
                "(torch.jit.script or trace: its parameters live in C++, and a copy would train the original's), "
                "as a pure step, load_state_dict and restore do: train the plain model (a donated step trains it "
                "without a copy) and script it after training"
            )
        memo.setdefault(_PENDING, []).extend((attributes, name, attributes[name]) for name in own)
    params = attributes["_parameters"]
    attributes["_parameters"] = {n: None if p is None else _clone_tensor(p, memo) for n, p in params.items()} if params else {}
    buffers = attributes["_buffers"]
    attributes["_buffers"] = {n: None if b is None else _clone_tensor(b, memo) for n, b in buffers.items()} if buffers else {}
    children = attributes["_modules"]
    attributes["_modules"] = {n: None if m is None else _clone_module(m, memo) for n, m in children.items()} if children else {}
    if "_initialize_hook" in attributes:  # a lazy module before its first forward
        _own_lazy_hooks(new, module)
    if isinstance(module, nn.RNNBase):
        new._init_flat_weights()
    elif children and "_orig_mod" in children and callable(getattr(new, "_initialize", None)):
        new._initialize()  # torch.compile's wrapper: its forward, bound to the original's inner module, bound to the copy's
    return new


def _own_attributes(attributes: dict[str, Any]) -> list[str]:
    """The names, in the module's order (a view after its base), of the attributes in ``attributes`` (a module's
    ``__dict__``) that a copy makes its own by :func:`_copied_attribute`: the module's own ones (not those every
    ``nn.Module`` has) whose values are not shared as they are (a number, a string, a dtype).

    >>> model = torch.nn.Linear(1, 1)
    >>> model.seen, model.name = torch.zeros(()), "head"
    >>> _own_attributes(vars(model))
    ['seen']
    """
    extra = attributes.keys() - _MODULE_STANDARD  # the module's own attributes (in_features, a user's ...)
    if not extra or _SHARED_KINDS.issuperset(map(type, map(attributes.__getitem__, extra))):
        return []
    own = [name for name in extra if type(attributes[name]) not in _SHARED_KINDS]
    if len(own) > 1:
        order = {name: i for i, name in enumerate(attributes)}
        own.sort(key=order.__getitem__)
    return own


def _shared_container(value: Any) -> bool:
    """Whether the list, tuple, deque, set or dict ``value`` (a module's attribute) is shared by a copy as it is: a
    large one of plain values (a vocabulary, class names), not copied at every pure step."""
    if len(value) <= _SMALL:
        return False
    return type(next(iter(value.values() if isinstance(value, dict) else value))) in _SHARED_KINDS


def _state_fields(value: Any) -> dict[str, Any] | None:
    """The attributes of ``value`` when it is an object of one's own that holds a tensor or a module (a cache), which
    a copy copies (:func:`_copied_attribute`); None for any other value."""
    fields = getattr(value, "__dict__", None)
    if type(fields) is dict and not callable(value) and any(isinstance(v, (torch.Tensor, nn.Module)) for v in fields.values()):
        return fields
    return None


def attribute_tensors(model: nn.Module) -> dict[str, Any]:
    """The state :func:`fork` copies from the modules' own attributes, besides parameters and buffers: each plain
    tensor (a counter, a cache), each generator's state, in the lists, tuples (namedtuples too), deques, dicts and
    objects of one's own holding them (as dicts by key or index), by ``"<module name>.<attribute>"``; attributes
    holding none are left out. What ``loopkit.check_purity`` compares, found by the rules the copy follows
    (:func:`_own_attributes`).

    >>> model = torch.nn.Linear(1, 1)
    >>> model.seen, model.cache = torch.zeros(()), {"last": torch.ones(2), "label": "x"}
    >>> {name: sorted(tree) if isinstance(tree, dict) else tree.shape for name, tree in attribute_tensors(model).items()}
    {'seen': torch.Size([]), 'cache': ['last']}
    """
    found: dict[str, Any] = {}
    for prefix, module in model.named_modules():
        attributes = vars(module)
        for name in _own_attributes(attributes):
            tree = _attribute_tree(attributes[name])
            if tree is not None:
                found[f"{prefix}.{name}" if prefix else name] = tree
    return found


def shared_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules the model's modules keep in their own attributes outside the model's registered tree (not among
    ``model.modules()``: a frozen teacher kept in a plain list or dict, not an ``nn.ModuleList`` or ``nn.ModuleDict``),
    which :func:`fork` shares with its copy as they are, by ``"<module name>.<attribute>"`` and the key or index
    that reaches each (the first, for one reached twice). Found in the lists, tuples, deques, dicts and objects of
    one's own a copy looks into (:func:`_attribute_tree`'s rules). What ``loopkit.check_purity`` compares the
    parameters and buffers of: a pure step's forward through one (a BatchNorm's running statistics) changes the
    caller's.

    >>> model = torch.nn.Linear(1, 1)
    >>> model.norms, model.parts = [torch.nn.BatchNorm1d(1)], {"self": model}  # (the model itself: in the tree)
    >>> {name: type(module).__name__ for name, module in shared_modules(model).items()}
    {'norms.0': 'BatchNorm1d'}
    """
    inside = {id(module) for module in model.modules()}
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()  # (the containers and objects looked into already, and the modules found: once each)

    def visit(value: Any, name: str) -> None:
        if isinstance(value, nn.Module):
            if id(value) not in inside and id(value) not in seen:
                seen.add(id(value))
                found[name] = value
            return
        if isinstance(value, (torch.Tensor, *_SHARED_VALUES)) or id(value) in seen:
            return
        if isinstance(value, (list, tuple, deque, dict)):  # (a namedtuple, a deque, a subclass too)
            if _shared_container(value):
                return
            items = value.items() if isinstance(value, dict) else enumerate(value)
        else:
            fields = _state_fields(value)
            if fields is None:
                return
            items = fields.items()
        seen.add(id(value))
        for key, item in items:
            visit(item, f"{name}.{key}")

    for prefix, module in model.named_modules():
        attributes = vars(module)
        for name in _own_attributes(attributes):
            visit(attributes[name], f"{prefix}.{name}" if prefix else name)
    return found


def _attribute_tree(value: Any) -> Any:
    """What of an attribute's value a copy copies as state (:func:`_copied_attribute`): a tensor as it is, a
    generator as its state, and the containers and objects of one's own holding them as dicts; None when it holds
    none (plain values, functions, methods, modules: a module of the model is compared as a module)."""
    if isinstance(value, torch.Tensor):
        return value
    kind = type(value)
    if kind is torch.Generator:
        return value.get_state()
    if isinstance(value, (list, tuple, deque, dict)):  # (a namedtuple, a deque, a subclass too)
        if _shared_container(value):
            return None
        items = value.items() if isinstance(value, dict) else enumerate(value)
        fields = dict(items)
    else:
        fields = _state_fields(value)
        if fields is None:
            return None
    found = {key: tree for key, tree in ((key, _attribute_tree(v)) for key, v in fields.items()) if tree is not None}
    return found or None


def _own_lazy_hooks(new: nn.Module, module: nn.Module) -> None:
    """Give the copy ``new`` of a lazy module its own hooks: the original's are bound to it (the copy's first
    forward would shape the original, and a load into the copy would materialize the original's parameters),
    and their handles remove them from the original's registries. Shape inference runs first, as torch
    registers it (a pre-hook of one's own may read the weight's shape)."""
    attributes = new.__dict__
    initialize = module._initialize_hook.id
    attributes["_forward_pre_hooks"].pop(initialize, None)  # (the copy's own already: _MODULE_REGISTRIES)
    attributes["_forward_pre_hooks_with_kwargs"] = kwargs = attributes["_forward_pre_hooks_with_kwargs"].copy()
    kwargs.pop(initialize, None)
    attributes["_initialize_hook"] = new.register_forward_pre_hook(new._infer_parameters, with_kwargs=True, prepend=True)
    load = attributes.get("_load_hook")
    if load is not None:
        attributes["_load_state_dict_pre_hooks"] = hooks = attributes["_load_state_dict_pre_hooks"].copy()
        hooks.pop(load.id, None)
        attributes["_load_hook"] = new._register_load_state_dict_pre_hook(new._lazy_load_hook)


def _copied_closure(function: types.FunctionType, memo: dict[int, Any], depth: int = 0) -> types.FunctionType:
    """``function`` (a hook) reading the copy's modules and tensors where its closure or its defaults hold the
    original's (a lambda that reads ``model.gain``, or takes ``model=m``; or reaches it through a list, a dict, a
    function or an object of one's own: :func:`_remapped`): the same code over new cells and defaults; other values
    (a list it collects into) shared."""
    cells = function.__closure__ or ()
    new_cells = []
    for cell in cells:
        try:
            content = cell.cell_contents
        except ValueError:  # (a cell not filled yet)
            new_cells.append(cell)
            continue
        copied = _remapped(content, memo, depth)
        new_cells.append(cell if copied is content else types.CellType(copied))
    defaults = function.__defaults__ or ()
    new_defaults = tuple(_remapped(value, memo, depth) for value in defaults)
    kwdefaults = function.__kwdefaults__ or {}
    new_kwdefaults = {key: _remapped(value, memo, depth) for key, value in kwdefaults.items()}
    if (all(a is b for a, b in zip(new_cells, cells)) and all(a is b for a, b in zip(new_defaults, defaults))
            and all(new_kwdefaults[k] is v for k, v in kwdefaults.items())):
        return function
    copied_function = types.FunctionType(
        function.__code__, function.__globals__, function.__name__, new_defaults or function.__defaults__,
        tuple(new_cells) or function.__closure__,
    )
    copied_function.__kwdefaults__ = new_kwdefaults or function.__kwdefaults__
    copied_function.__qualname__ = function.__qualname__
    copied_function.__dict__.update(function.__dict__)
    return copied_function


#: how deep :func:`_remapped` looks (a recursive function's closure holds the function itself)
_REMAP_DEPTH = 4


def _remapped(value: Any, memo: dict[int, Any], depth: int = 0) -> Any:
    """``value`` (what a hook's closure or default holds, or a hook object) reading the copy's modules and tensors
    where it reaches the original's: a module or tensor of the model, and the lists, tuples, dicts, functions and
    objects of one's own holding them, a few levels deep (new ones, only where something in them changed).
    Anything else, and a container reaching none of them (a list the hook collects activations into, which the
    caller reads), is ``value`` itself: shared."""
    if isinstance(value, (nn.Module, torch.Tensor)):
        return memo.get(id(value), value)
    if depth >= _REMAP_DEPTH or isinstance(value, _SHARED_VALUES) or isinstance(value, type):
        return value
    kind = type(value)
    if kind is list or kind is tuple or kind is dict:
        if len(value) > _SMALL and type(next(iter(value.values() if kind is dict else value))) in _SHARED_KINDS:
            return value  # (a vocabulary: plain values, shared)
        if kind is dict:
            items = {k: _remapped(v, memo, depth + 1) for k, v in value.items()}
            return value if all(items[k] is v for k, v in value.items()) else items
        remapped = [_remapped(v, memo, depth + 1) for v in value]
        return value if all(a is b for a, b in zip(remapped, value)) else kind(remapped)
    if kind is types.FunctionType:
        if value.__closure__ or value.__defaults__ or value.__kwdefaults__:
            return _copied_closure(value, memo, depth + 1)
        return value
    fields = getattr(value, "__dict__", None)
    if type(fields) is dict and fields and kind.__module__ != "builtins":
        new_fields = {k: _remapped(v, memo, depth + 1) for k, v in fields.items()}
        if any(new_fields[k] is not v for k, v in fields.items()):
            try:
                copied = copy.copy(value)
            except Exception:  # noqa: BLE001 - (an object that cannot be copied: shared, as before)
                return value
            copied.__dict__.update(new_fields)
            return copied
    return value


def _copied_attribute(value: Any, memo: dict[int, Any]) -> Any:
    """A module's attribute (or hook) as its copy's own, once the whole model is copied (``memo`` holds it), as
    ``copy.deepcopy`` would make it where it reaches the model's tensors or modules: a module of the model (kept in a
    list, a dict, a back-reference), a method or ``functools.partial`` of one, a tensor, a generator, and the
    containers holding them (lists, tuples, dicts and sets; namedtuples, deques and subclasses of list or tuple where
    they hold such state: :func:`_copied_sequence`; each of its own type), and an object
    of one's own whose attributes hold a tensor or a module. Modules outside the model's registered tree (a frozen
    teacher kept in a plain list or dict, not an ``nn.ModuleList``: :func:`shared_modules`) and other objects (a
    configuration) are shared: a forward through such a module changes the original's buffers."""
    if isinstance(value, _SHARED_VALUES):
        return value
    kind = type(value)
    if kind is set or isinstance(value, (list, tuple, deque, dict)):  # (a namedtuple, a deque, a subclass too)
        if _shared_container(value):
            return value  # a large container of plain values (a vocabulary): shared, not copied at every pure step
        if kind is list or kind is tuple:
            return kind(_copied_attribute(v, memo) for v in value)
        if not isinstance(value, dict):  # (a namedtuple, a deque, a subclass of list or tuple)
            return _copied_sequence(value, memo)
        if kind is set:
            return set(value)
        copied = copy.copy(value)  # (an OrderedDict stays one)
        for k, v in value.items():
            copied[k] = _copied_attribute(v, memo)
        return copied
    if isinstance(value, nn.Module):
        return memo.get(id(value), value)
    if kind is types.MethodType:
        return types.MethodType(value.__func__, memo.get(id(value.__self__), value.__self__))
    if kind is types.FunctionType:
        return _copied_closure(value, memo) if value.__closure__ or value.__defaults__ or value.__kwdefaults__ else value
    if kind is functools.partial:
        return functools.partial(_copied_attribute(value.func, memo), *_copied_attribute(value.args, memo),
                                 **_copied_attribute(value.keywords, memo))
    if isinstance(value, torch.Tensor):
        return _clone_tensor(value, memo)
    if kind is torch.Generator:
        generator = torch.Generator(value.device)
        generator.set_state(value.get_state())
        return generator
    fields = _state_fields(value)  # an object of one's own holding a tensor or a module (a cache)
    if fields is not None:
        copied = copy.copy(value)
        copied.__dict__.update({k: _copied_attribute(v, memo) for k, v in fields.items()})
        return copied
    if callable(value):  # a hook object of one's own: the copy's where it reaches the model's tensors or modules
        return _remapped(value, memo)
    return value


def _copied_sequence(value: Any, memo: dict[int, Any]) -> Any:
    """:func:`_copied_attribute` of a namedtuple, a deque or a subclass of list or tuple: shared where none of its
    items' copies differs from the item (it holds no tensor, module or container the copy makes its own, at any
    depth); else a copy of its own type: a namedtuple by position, a list subclass or a deque by ``copy.copy`` (its
    instance attributes and maxlen kept, no ``__init__`` called) refilled in place, a tuple subclass without a
    ``__new__`` of its own from its items (its instance attributes kept); one with a ``__new__`` of its own, which
    may not take its items, is shared (``loopkit.check_purity`` compares its tensors).

    >>> class Names(list): pass
    >>> names = Names(["a", "b"]); names.source = "vocab.txt"
    >>> _copied_sequence(names, {}) is names
    True
    >>> names.append(torch.zeros(1)); copied = _copied_sequence(names, {})
    >>> copied is names, type(copied).__name__, copied.source, copied[2] is names[2]
    (False, 'Names', 'vocab.txt', False)
    """
    items = [_copied_attribute(v, memo) for v in value]
    if all(new is old for new, old in zip(items, value)):
        return value
    kind = type(value)
    if isinstance(value, tuple):
        if hasattr(value, "_fields"):
            return kind(*items)
        if kind.__new__ is not tuple.__new__:
            return value
        copied = tuple.__new__(kind, items)
        if getattr(value, "__dict__", None):
            copied.__dict__.update(value.__dict__)
        return copied
    copied = copy.copy(value)
    if isinstance(copied, deque):
        copied.clear()
        copied.extend(items)
    else:
        copied[:] = items
    return copied


def _clone_value(value: Any, memo: dict[int, Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return _clone_tensor(value, memo)
    if isinstance(value, (list, tuple)):
        return sequence_like(value, [_clone_value(v, memo) for v in value])
    if isinstance(value, dict):
        return {k: _clone_value(v, memo) for k, v in value.items()}
    return value


def _clone_entry(entry: dict[str, Any], memo: dict[int, Any]) -> dict[str, Any]:
    """One parameter's optimizer state: tensors cloned (the common case inlined for speed)."""
    return {
        k: v.clone() if type(v) is torch.Tensor else _clone_value(v, memo)
        for k, v in entry.items()
    }


def _clone_optimizer(
    optimizer: torch.optim.Optimizer, memo: dict[int, Any], with_state: bool = True
) -> torch.optim.Optimizer:
    found = memo.get(id(optimizer))
    if found is not None:
        return found
    new = object.__new__(type(optimizer))
    attributes = optimizer.__dict__.copy()
    object.__setattr__(new, "__dict__", attributes)
    memo[id(optimizer)] = new
    groups = memo.get(id(optimizer.param_groups))  # (a wrapper optimizer shares its inner one's groups)
    if groups is None:
        groups = memo[id(optimizer.param_groups)] = []
        for group in optimizer.param_groups:
            copied = {k: _clone_value(v, memo) if isinstance(v, torch.Tensor) else v for k, v in group.items()}
            copied["params"] = [_clone_tensor(p, memo) for p in group["params"]]
            groups.append(copied)
    attributes["param_groups"] = groups
    for name in optimizer.__dict__.keys() - _OPTIMIZER_STANDARD:
        value = attributes[name]
        lists = [copied["params"] for group, copied in zip(optimizer.param_groups, groups) if value is group["params"]]
        if lists:  # LBFGS keeps its group's parameter list as ``_params`` too
            attributes[name] = lists[0]
        elif isinstance(value, torch.optim.Optimizer):  # a wrapper's inner optimizer (Lookahead, SAM): the copy's own
            attributes[name] = _clone_optimizer(value, memo, with_state)
        else:  # an optimizer's own data outside ``state`` (a tensor counter, a history list): copied as a module's
            attributes[name] = _copied_attribute(value, memo)
    state: defaultdict = defaultdict(dict)
    for key, entry in optimizer.state.items() if with_state else ():
        if isinstance(key, torch.Tensor):
            state[_clone_tensor(key, memo)] = _clone_entry(entry, memo)
        else:  # the optimizer's own entry under a name (``self.state["global"]``), which torch's state dict keeps too
            state[key] = _clone_value(entry, memo)
    attributes["state"] = state
    if "step" in attributes:  # the LR scheduler's wrapper, bound to the original optimizer
        attributes["step"] = _track_step_called(new)
    return new


#: the attributes every optimizer has: what is not among them is the optimizer's own
_OPTIMIZER_STANDARD = frozenset(torch.optim.SGD([torch.zeros(1, requires_grad=True)]).__dict__) | {"step"}


def _track_step_called(optimizer: torch.optim.Optimizer) -> Any:
    """The wrapper LRScheduler puts on ``optimizer.step``, rebuilt for a copied optimizer."""
    ref = weakref.ref(optimizer)
    step = type(optimizer).step

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return step(opt, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    return wrapper


def scheduler_for(scheduler: Any, optimizer: torch.optim.Optimizer) -> Any:
    """``scheduler`` itself when it steps ``optimizer``, else a copy of it that steps ``optimizer`` (its state its own):
    a held scheduler given back to a state whose step of one's own forked the optimizer (``fork``), so that its steps
    change the rates the state trains with, or the scheduler to pass with a new optimizer,
    ``state.evolve(optimizer=new, scheduler=scheduler_for(state.scheduler, new))``. As a torch scheduler built for it
    would, it wraps ``optimizer.step`` (to tell a scheduler step before the optimizer's).

    >>> import torch
    >>> model = torch.nn.Linear(1, 1); opt = torch.optim.SGD(model.parameters(), lr=1.0)
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    >>> forked = fork(TrainState.create(model, opt))
    >>> scheduler_for(scheduler, opt) is scheduler, scheduler_for(scheduler, forked.optimizer).optimizer is forked.optimizer
    (True, True)
    """
    if scheduler.optimizer is optimizer:
        return scheduler
    if not hasattr(optimizer.step, "_wrapped_by_lr_sched"):  # (as torch's schedulers wrap the optimizer they are
        optimizer.step = _track_step_called(optimizer)  # built for: no warning that its step was overridden)
    return _clone_scheduler(scheduler, optimizer, {})


def _clone_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, memo: dict[int, Any]) -> Any:
    """A copy of ``scheduler`` stepping ``optimizer`` (the copy's), its state its own: its lists and dicts
    (``base_lrs``, a ``Counter`` of milestones, a list one appends to as a backbone unfreezes), a callable
    object's state, the schedulers it holds. ``memo`` is :func:`_fork`'s (``id`` of the original's optimizer,
    tensors and modules to the copy's); it is the one ``copy.deepcopy`` memo of the whole copy, so what an
    attribute of one's own reaches of the scheduler (a method picked at construction: ``self.f = self._linear``),
    of the optimizer or of an inner scheduler (kept in a list) is the copy's, not a stray copy of the original's."""
    found = memo.get(id(scheduler))
    if found is not None:  # (one held twice: by a SequentialLR and by a warm-up of one's own)
        return found
    if type(scheduler) is HeldScheduler:  # (a scheduler transform's inner state: the copy's held still too)
        held = HeldScheduler(_clone_scheduler(scheduler._held, optimizer, memo), scheduler._shown)
        _memoize(memo, scheduler, held)
        return held
    new = object.__new__(type(scheduler))
    attributes = scheduler.__dict__.copy()
    new.__dict__ = attributes
    _memoize(memo, scheduler, new)
    _memoize(memo, scheduler.optimizer, optimizer)  # (the state's: _fork's memo maps it already)
    attributes["optimizer"] = optimizer
    if "_schedulers" in attributes:
        attributes["_schedulers"] = [_clone_scheduler(s, optimizer, memo) for s in scheduler._schedulers]
    torchs = _torch_scheduler(scheduler)
    for name, value in attributes.items():
        kind = type(value)
        if kind in _SHARED_KINDS or name == "optimizer" or name == "_schedulers":
            continue
        if kind in _CONTAINERS and torchs and name not in _SCHEDULER_CALLABLES:
            attributes[name] = _own_container(value, memo)
        elif isinstance(value, weakref.WeakMethod) and getattr(value(), "__self__", None) is scheduler:
            attributes[name] = weakref.WeakMethod(getattr(new, value().__func__.__name__))  # type: ignore[union-attr]
        elif isinstance(value, _Scheduler):  # one held inside (a warm-up's next scheduler)
            attributes[name] = _clone_scheduler(value, optimizer, memo)
        elif not torchs or name in _SCHEDULER_CALLABLES or isinstance(value, torch.Tensor):
            for inner in _schedulers_in(value):  # (copied as schedulers are, before deepcopy meets them)
                _clone_scheduler(inner, optimizer, memo)
            attributes[name] = copy.deepcopy(value, memo)  # (a Counter stays one; functions are shared, objects copied)
    return new


_Scheduler = torch.optim.lr_scheduler.LRScheduler
#: the containers a copy of torch's own scheduler has its own of (``base_lrs``, ``milestones``, a Counter, ...)
_CONTAINERS = frozenset({list, dict, set, Counter, OrderedDict, defaultdict})


def _own_container(value: Any, memo: dict[int, Any]) -> Any:
    """A list, dict or set of torch's own scheduler as the copy's own: a shallow copy when its items are plain
    values (the common case, cheap on every pure step), a list of such dicts (OneCycleLR's phases) one level
    deeper, else a deep one."""
    items = value.values() if isinstance(value, dict) else value
    if _SHARED_KINDS.issuperset(map(type, items)):
        return value.copy()
    if type(value) is list and all(type(item) is dict and _SHARED_KINDS.issuperset(map(type, item.values())) for item in value):
        return [item.copy() for item in value]
    return copy.deepcopy(value, memo)


def _schedulers_in(value: Any) -> list[Any]:
    """The schedulers an attribute of a scheduler of one's own holds in a list, tuple or dict (or is)."""
    if isinstance(value, _Scheduler):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, _Scheduler)]
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, _Scheduler)]
    return []


def _memoize(memo: dict[int, Any], original: Any, copied: Any) -> None:
    """Map ``original`` to ``copied`` in the deepcopy ``memo``, keeping ``original`` alive as long as ``memo``
    (deepcopy's own convention): a dead object's ``id`` may be another's later."""
    key = id(original)
    if key not in memo:
        memo[key] = copied
        memo.setdefault(id(memo), []).append(original)


#: what torch's schedulers keep of a user's callables (whose ``__dict__`` their state dicts hold)
_SCHEDULER_CALLABLES = frozenset({"lr_lambdas", "_scale_fn_custom"})


def _torch_scheduler(scheduler: Any) -> bool:
    """Whether ``scheduler`` is one of torch's own (``torch.optim.lr_scheduler``), not a class of one's own."""
    return type(scheduler).__module__ == "torch.optim.lr_scheduler"


# --- an optimizer's state in a state dict -------------------------------------------------------

#: the entries of torch's own ``Optimizer.state_dict()``: each parameter's state (by index) and the param groups
_OPTIMIZER_KEYS = ("state", "param_groups")


def _torch_layout(plain: Any) -> bool:
    """Whether an optimizer's state dict is laid out as torch's own (``state`` by parameter index, ``param_groups``),
    not as a wrapper's own (a Lookahead's ``{"fast": ..., "slow": ...}``).

    >>> _torch_layout(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).state_dict())
    True
    >>> _torch_layout({"fast": {"state": {}, "param_groups": []}, "slow": {}})
    False
    """
    return (isinstance(plain, Mapping) and isinstance(plain.get("state"), Mapping)
            and isinstance(plain.get("param_groups"), (list, tuple)))


def _encode_optimizer(plain: Any, kind: type) -> Any:
    """The ``state_dict()`` of an optimizer of class ``kind`` as a state dict holds it (what
    ``torch.load(weights_only=True)`` reads back), so that loading gives the optimizer's ``load_state_dict`` what it
    gave.

    torch's layout stays torch's: each parameter's state under its index as a string (LBFGS's lists and None as
    they were), an entry the optimizer keeps under a name (``self.state["global"]``) under that name beside them,
    the param groups, and each other entry the optimizer's ``state_dict()`` adds (an update counter) under its key.
    A layout of the optimizer's own (a wrapper's) is kept whole, as it is. Raises ``TypeError`` naming ``kind`` and
    the entry a state dict cannot hold (an object of one's own, or a state key that is neither a parameter's index
    nor a name).

    >>> sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    >>> sd = _encode_optimizer({**sgd.state_dict(), "updates": 3}, type(sgd))
    >>> sorted(sd), sd["updates"]
    (['param_groups', 'state', 'updates'], 3)
    """
    try:
        if not _torch_layout(plain):
            return encode_tree(plain, ("optimizer",))
        state = {}
        for key, entry in plain["state"].items():
            if not (type(key) is int or type(key) is str and not key.isdigit()):
                raise TypeError(
                    f"its state holds an entry under {key!r}, which is neither a parameter's index nor a name: a state "
                    "dict keeps each parameter's state under its index and the optimizer's own entries under a name "
                    "(a string not all digits) beside them"
                )
            state[str(key)] = encode_tree(entry, ("optimizer", "state", str(key)))
        others = encode_tree({k: v for k, v in plain.items() if k not in _OPTIMIZER_KEYS}, ("optimizer",))
    except TypeError as e:
        raise TypeError(f"{kind.__qualname__}.state_dict(): {e}") from None
    return {"state": state, "param_groups": to_plain(plain["param_groups"], ("optimizer", "param_groups")), **others}


def _optimizer_copy(decoded: Any) -> Any:
    """A decoded optimizer state (:func:`_decode_optimizer`) with tensors of its own: torch's
    ``Optimizer.load_state_dict`` keeps a tensor that has the parameter's dtype and device."""
    if not _torch_layout(decoded):  # a wrapper's own layout
        return _clone_value(decoded, {})
    state = {key: _clone_entry(entry, {}) if type(key) is int else _clone_value(entry, {})
             for key, entry in decoded["state"].items()}
    return {key: state if key == "state" else value if key == "param_groups" else _clone_value(value, {})
            for key, value in decoded.items()}


# --- loading a state dict ------------------------------------------------------------------


def _decode(state: TrainState, sd: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(sd, Mapping):
        raise TypeError(f"load_state_dict expects a mapping, got {type(sd).__qualname__}")
    template = state.state_dict()
    optional = {"grads", "extras"}
    for key in template:
        if key not in sd and key not in optional:
            raise StateMismatchError(f"missing key '{key}'")
    for key in sd:
        if key not in template:
            raise StateMismatchError(f"unexpected key '{key}'")
    decoded: dict[str, Any] = {"model": _decode_model(_without_compiled_prefix(sd["model"]), template["model"], state.model)}
    params = dict(core_module(state.model).named_parameters())
    decoded["grads"] = _decode_grads(_without_compiled_prefix(sd.get("grads", {})), params)
    if "optimizer" in template:
        decoded["optimizer"] = _decode_optimizer(sd["optimizer"], template["optimizer"], state.optimizer)
    if "scheduler" in template:
        decoded["scheduler"] = _decode_scheduler(sd["scheduler"], state.scheduler)
    for key in ("step", "epoch", "batch_index", "seed"):
        value = sd[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StateMismatchError(f"key '{key}' must be a non-negative int, got {value!r}")
        decoded[key] = value
    decoded["rng"] = _decode_rng(sd["rng"], template["rng"])
    extras = decode_tree(sd.get("extras", {}), ("extras",))  # refuses anything but tensors, numbers and strings
    if not isinstance(extras, dict):
        raise StateMismatchError(f"key 'extras' holds a {type(extras).__qualname__}, expected a mapping")
    decoded["extras"] = extras
    return decoded


def _decode_model(plain: Any, template: Mapping[str, Any], model: nn.Module) -> Any:
    """The model's state dict in the structure of ``template``, except that the buffers of fake-quantization and
    observer modules may have other shapes (per-channel scales: they resize themselves as the model loads them)."""
    try:
        return _model_from_plain(plain, template)
    except StateMismatchError as error:
        resizable = _resizable_buffers(model)
        if not resizable and isinstance(plain, Mapping) and any(_is_qat_key(key) for key in plain):
            raise StateMismatchError(
                f"{error}: the state dict is of a model prepared for quantization-aware training (its keys hold "
                "fake-quantizers and observers), this state's model is not; load it into a template prepared as the "
                "step prepares it: loopkit.restore(step.prepare(template), directory) (step: the with_qat pipeline)"
            ) from None
        if resizable and isinstance(plain, Mapping) and not any(_is_qat_key(key) for key in plain):
            raise StateMismatchError(
                f"{error}: the state dict is of a model not prepared for quantization-aware training (its keys hold no "
                "fake-quantizer or observer: a run without with_qat, or one saved before with_qat's first call), this "
                "state's model is prepared; load it into the unprepared template: loopkit.restore(template, directory), "
                "whose model with_qat prepares at its first call (to start QAT afresh from those weights alone, give "
                "that restored model a new TrainState, before with_qat prepares it)"
            ) from None
        if not resizable or not isinstance(plain, Mapping):
            raise
        loose = {k: plain[k] if k in resizable and isinstance(plain.get(k), torch.Tensor) else v for k, v in template.items()}
        try:
            return _model_from_plain(plain, loose)
        except StateMismatchError:
            raise error from None


def _model_from_plain(plain: Any, template: Mapping[str, Any]) -> Any:
    """A model's state dict checked against ``template`` (both as ``Module.state_dict()`` gives them: not encoded)
    and decoded: its tensors by :func:`loopkit.tree.from_plain`; an entry that is not a tensor in ``template`` (what
    a module's ``get_extra_state()`` returns: a list, a tuple, a dict holding them) is the module's own, taken as it
    is (a deep copy: the new state shares nothing with ``plain``), as torch's ``load_state_dict`` hands it to
    ``set_extra_state``.

    >>> template = {"w": torch.zeros(2), "_extra_state": ["a", "b"]}
    >>> _model_from_plain({"w": torch.ones(2), "_extra_state": ("c",)}, template)
    {'w': tensor([1., 1.]), '_extra_state': ('c',)}
    >>> _model_from_plain({"w": torch.ones(2)}, template)
    Traceback (most recent call last):
    ...
    loopkit.errors.StateMismatchError: missing key 'model._extra_state'
    """
    own = {key for key, value in template.items() if not isinstance(value, torch.Tensor)}
    if not own or not isinstance(plain, Mapping):
        return from_plain(plain, template, ("model",))
    for key in template:  # (in the template's order, as from_plain names the first missing key)
        if key not in plain:
            raise StateMismatchError(f"missing key 'model.{key}'")
    tensors = from_plain({k: v for k, v in plain.items() if k not in own},
                         {k: v for k, v in template.items() if k not in own}, ("model",))
    return {key: copy.deepcopy(plain[key]) if key in own else tensors[key] for key in template}


#: what names the buffers of torch.ao.quantization's fake-quantizers and observers in a model's state dict
_QAT_KEY_PARTS = ("activation_post_process.", "weight_fake_quant.", "fake_quant_enabled", "observer_enabled")


def _is_qat_key(key: Any) -> bool:
    """Whether ``key`` of a model's state dict names a buffer that ``prepare_qat`` added (loopkit.transforms.qat's
    modules are not imported here: a lower layer).

    >>> _is_qat_key("0.activation_post_process.scale"), _is_qat_key("0.weight")
    (True, False)
    """
    return isinstance(key, str) and any(part in key for part in _QAT_KEY_PARTS)


def _resizable_buffers(model: nn.Module) -> set[str]:
    """The state-dict names of the buffers of ``model``'s fake-quantization and observer modules (``prepare_qat``'s)."""
    from torch.ao.quantization import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in core_module(model).named_modules()
        if isinstance(module, (FakeQuantizeBase, ObserverBase))
        for name, _ in module.named_buffers(recurse=False)
    }


def _shaped(state: TrainState, state_dict: Mapping[str, Any]) -> TrainState:
    """A copy of ``state`` whose lazy modules' parameters and buffers have the shapes ``state_dict`` holds for them
    (as ``Module.load_state_dict`` shapes them), to load ``state_dict`` into; those it lacks stay unmade (the load
    then names them missing)."""
    shaped = _fork(state, {}, optimizer_state=True)
    plain = state_dict.get("model")
    if isinstance(plain, Mapping):
        plain = _without_compiled_prefix(plain)
        made = core_module(shaped.model).state_dict(keep_vars=True)
        for name in _uninitialized(shaped.model):
            saved = plain.get(name)
            if isinstance(saved, torch.Tensor):
                made[name].materialize(saved.shape)
    if _uninitialized(shaped.model):
        missing = sorted(_uninitialized(shaped.model))[0]
        raise StateMismatchError(f"missing key 'model.{missing}' (a lazy module's, which the state dict would shape)")
    return shaped


def _uninitialized(model: nn.Module) -> set[str]:
    """The state-dict names of the parameters and buffers a lazy module has not made yet (before its first forward):
    ``Module.load_state_dict`` gives them the saved shapes."""
    model = core_module(model)
    if not any(isinstance(t, _Uninitialized) for t in (*model.parameters(), *model.buffers())):
        return set()  # (the common case, without building a state dict)
    return {name for name, tensor in model.state_dict(keep_vars=True).items() if isinstance(tensor, _Uninitialized)}


def _decode_scheduler(plain: Any, scheduler: Any) -> Any:
    """The scheduler's state dict, in the structure of ``scheduler``'s own (the state's), except that a list of a
    scheduler of one's own may have another length (one that keeps a growing history); torch's own are checked
    strictly (a SequentialLR of other schedulers, another number of milestones)."""
    template = _last_lr_per_group(plain, scheduler.state_dict(), len(scheduler.optimizer.param_groups))
    template = _callables_as_saved(plain, template, ("scheduler",))
    try:
        return from_plain(plain, template, ("scheduler",))
    except StateMismatchError as error:
        if any(map(_torch_scheduler, [scheduler, *getattr(scheduler, "_schedulers", ())])):
            raise
        try:
            return from_plain(plain, _resized(plain, template), ("scheduler",))
        except StateMismatchError:
            raise error from None


def _last_lr_per_group(plain: Any, template: Any, groups: int) -> Any:
    """``template`` (a scheduler's state dict) with its ``_last_lr`` (nested schedulers' too) as long as ``plain``'s
    when that is the optimizer's number of groups: a group added to the optimizer after the scheduler was made
    (unfreezing a backbone) is in the rates the scheduler last set, not in the template's made before it."""
    if not isinstance(template, Mapping) or not isinstance(plain, Mapping):
        return template
    out = dict(template)
    last, saved = template.get("_last_lr"), plain.get("_last_lr")
    if isinstance(last, list) and last and isinstance(saved, Mapping) and len(saved) == groups != len(last):
        out["_last_lr"] = [last[min(i, len(last) - 1)] for i in range(groups)]
    inner, saved_inner = template.get("_schedulers"), plain.get("_schedulers")
    if isinstance(inner, list) and isinstance(saved_inner, Mapping):
        out["_schedulers"] = [_last_lr_per_group(saved_inner.get(str(i)), s, groups) for i, s in enumerate(inner)]
    return out


def _callables_as_saved(plain: Any, template: Any, path: tuple[str, ...]) -> Any:
    """``template`` (torch's scheduler's state dict; nested schedulers' too) with the state of the user's callables
    it holds (the ``__dict__`` of an ``lr_lambda`` object, of CyclicLR's ``scale_fn``) as ``plain`` holds it: theirs
    may grow (a memo of the factors computed), so it is taken as saved, not checked against the template's."""
    if not isinstance(template, Mapping) or not isinstance(plain, Mapping):
        return template
    out = dict(template)
    lambdas, saved = template.get("lr_lambdas"), plain.get("lr_lambdas")
    if isinstance(lambdas, list) and isinstance(saved, Mapping):
        out["lr_lambdas"] = [  # (None for a plain function: nothing of it is saved)
            _as_saved(saved[str(i)], own, path + ("lr_lambdas", str(i)))
            if isinstance(own, dict) and str(i) in saved else own
            for i, own in enumerate(lambdas)
        ]
    own, saved = template.get("_scale_fn_custom"), plain.get("_scale_fn_custom")
    if isinstance(own, dict) and saved is not None:
        out["_scale_fn_custom"] = _as_saved(saved, own, path + ("_scale_fn_custom",))
    inner, saved_inner = template.get("_schedulers"), plain.get("_schedulers")
    if isinstance(inner, list) and isinstance(saved_inner, Mapping):
        out["_schedulers"] = [_callables_as_saved(saved_inner.get(str(i)), s, path + ("_schedulers", str(i)))
                              for i, s in enumerate(inner)]
    return out


def _as_saved(plain: Any, template: Any, path: tuple[str, ...]) -> Any:
    """``plain`` decoded as it is, whatever its keys and lengths, in the types ``template`` has where it has them
    (a list stays one, a dict keyed by ints gets its int keys back); a leaf that is no tensor, number or string
    is refused (:class:`loopkit.StateMismatchError`), and so are numbered entries where ``template`` has none to
    tell a list, a dict keyed by ints and one keyed by strings apart (a memo empty when the callable is made)."""
    if not isinstance(plain, Mapping):
        return decode_tree(plain, path)
    if plain and (template is None or template == {}) and all(key.lstrip("-").isdigit() for key in plain):
        raise StateMismatchError(
            f"key '{'.'.join(path)}' holds entries numbered {', '.join(list(plain)[:3])}{', ...' if len(plain) > 3 else ''}, "
            "which this state's, made empty, cannot tell to be a list's, or a dict's keyed by ints or by strings (a "
            "memo the scheduler's callable fills as it runs); give it an entry when it is made (its keys' type), "
            "or keep the memo out of the callable's attributes (functools.lru_cache)"
        )
    if isinstance(template, (list, tuple)) and set(plain) == {str(i) for i in range(len(plain))}:
        like = [template[min(i, len(template) - 1)] if template else None for i in range(len(plain))]
        items = [_as_saved(plain[str(i)], item, path + (str(i),)) for i, item in enumerate(like)]
        return items if isinstance(template, list) else tuple(items)
    if not isinstance(template, Mapping):
        return decode_tree(plain, path)
    keys = {str(k): k for k in template}
    ints = bool(template) and all(type(k) is int for k in template)
    out = {}
    for key, value in plain.items():
        own = keys.get(key, int(key) if ints and key.lstrip("-").isdigit() else key)
        out[own] = _as_saved(value, template.get(own), path + (key,))
    return out


def _resized(plain: Any, template: Any) -> Any:
    """``template`` with each list as long as the one ``plain`` holds there (new items shaped as its last, or as
    ``plain``'s own when the template's list is empty)."""
    if not isinstance(plain, Mapping):
        return template
    if isinstance(template, Mapping):
        return {k: _resized(plain.get(str(k)), v) for k, v in template.items()}
    if isinstance(template, (list, tuple)) and set(plain) == {str(i) for i in range(len(plain))}:
        items = [template[min(i, len(template) - 1)] if template else plain[str(i)] for i in range(len(plain))]
        return sequence_like(template, [_resized(plain.get(str(i)), item) for i, item in enumerate(items)])
    return template


def _decode_grads(grads: Mapping[str, Any], params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    for name, g in grads.items():
        if name not in params:
            raise StateMismatchError(f"unexpected key 'grads.{name}': the model has no such parameter")
        if not isinstance(g, torch.Tensor) or g.shape != params[name].shape:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__qualname__
            raise StateMismatchError(
                f"mis-shaped key 'grads.{name}': the state dict has {shape}, the parameter {tuple(params[name].shape)}"
            )
    return dict(grads)


#: the 0-dim tensors of torch's optimizers' states that their ``__setstate__`` makes of a number (as torch before
#: 1.12 saved them): a number there loads
_NUMBER_STATES = frozenset({"step", "eta", "mu", "mu_product"})

#: optimizer-state keys that torch's optimizers keep in each parameter's shape
_PARAM_SHAPED = frozenset({
    "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg", "grad_avg",
    "acc_delta", "sum", "prev", "step_size", "ax",
})


#: the options of a param group that say how this process runs the update (torch's implementation), not where the
#: training stands: the template's are kept, whatever the checkpoint holds (a run resumed with fused=True on a GPU)
_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def _without_implementation(groups: Any) -> Any:
    """Param groups (a list, or the plain mapping of a state dict) without :data:`_IMPLEMENTATION`'s options."""
    def bare(group: Any) -> Any:
        return {k: v for k, v in group.items() if k not in _IMPLEMENTATION} if isinstance(group, Mapping) else group

    if isinstance(groups, Mapping):
        return {key: bare(group) for key, group in groups.items()}
    return [bare(group) for group in groups]


def _decode_optimizer(plain: Any, template: dict[str, Any], optimizer: torch.optim.Optimizer) -> Any:
    """What ``optimizer.load_state_dict`` takes, from the encoded ``plain`` (:func:`_encode_optimizer`), checked
    against ``template`` (this state's own, encoded) and ``optimizer``.

    An entry the optimizer's ``state_dict()`` adds beside torch's (an update counter) and one its state keeps under
    a name beside the parameters' are given to it as saved, missing ones left out (a checkpoint saved before
    loopkit kept them): an optimizer of one's own takes any (its ``load_state_dict`` knows them), one of torch's
    those its own state dict has (torch's ``load_state_dict`` would drop another silently). A layout of the
    optimizer's own (a wrapper's) is given whole, its top-level keys checked against ``template``'s."""
    raw = optimizer.state_dict()
    if not _torch_layout(raw):
        return _decode_own_layout(plain, template)
    if not isinstance(plain, Mapping):
        raise StateMismatchError(f"key 'optimizer' holds a {type(plain).__qualname__}, expected a mapping")
    for key in _OPTIMIZER_KEYS:
        if key not in plain:
            raise StateMismatchError(f"missing key 'optimizer.{key}'")
    own = _of_ones_own(optimizer)
    for key in plain:
        if key not in _OPTIMIZER_KEYS and key not in template and not own:
            raise StateMismatchError(f"unexpected key 'optimizer.{key}'")
    others = decode_tree({k: v for k, v in plain.items() if k not in _OPTIMIZER_KEYS}, ("optimizer",))
    raw_groups = raw["param_groups"]
    groups = from_plain(
        _without_implementation(plain["param_groups"]), _without_implementation(raw_groups), ("optimizer", "param_groups")
    )
    groups = [{**group, **{k: raw[k] for k in _IMPLEMENTATION if k in raw}} for group, raw in zip(groups, raw_groups)]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch_own = not _of_ones_own(optimizer)
    current = template.get("state", {})
    state: dict[int, dict[str, Any]] = {}
    expected_keys = _state_keys(optimizer, groups) if plain["state"] else []  # (each key -> its probed shape)
    for index, entry in plain["state"].items():
        path = ("optimizer", "state", index)
        if not str(index).isdigit() and (own or index in current):  # the optimizer's own entry under a name
            state[index] = decode_tree(entry, path)
            continue
        if not str(index).isdigit() or int(index) >= len(params):
            raise StateMismatchError(
                f"unexpected key '{'.'.join(path)}': the optimizer has {len(params)} parameters"
            )
        if not isinstance(entry, Mapping):
            raise StateMismatchError(f"key '{'.'.join(path)}' holds a {type(entry).__qualname__}, expected a mapping")
        entry = {k: v for k, v in decode_tree(entry, path).items() if v is not None}  # (as torch keeps them)
        _check_keys(entry, expected_keys[int(index)] if expected_keys else None, path)
        param = params[int(index)]
        probed = expected_keys[int(index)] if expected_keys else None
        for name, value in entry.items():
            known = current.get(str(index), {}).get(name)
            # without the template's own entry (a fresh template), the shape the probe's step gave (Adam's
            # 0-dim step, Adafactor's row and column variances), else the keys torch's optimizers keep in the
            # parameter's shape are checked against it; others (LBFGS's flat directions) are not checked
            probed_shape = _shape_for(probed.get(name), param) if probed else None
            if isinstance(known, torch.Tensor):
                expected = known.shape
            elif probed_shape is not None:
                expected = probed_shape
            elif name in _PARAM_SHAPED:
                expected = param.shape
            else:
                expected = None
            if not isinstance(value, torch.Tensor):
                if _tensor_needed(name, value, probed, torch_own):  # (its step would fail on it: Adam's exp_avg.lerp_)
                    shape = "" if expected is None else f" of shape {tuple(expected)}"
                    raise StateMismatchError(f"key '{'.'.join(path + (name,))}' holds a {type(value).__qualname__}, "
                                             f"expected a tensor{shape}")
            elif expected is not None and value.shape != expected:
                raise StateMismatchError(
                    f"mis-shaped key '{'.'.join(path + (name,))}': the state dict has shape "
                    f"{tuple(value.shape)}, expected {tuple(expected)}"
                )
        state[int(index)] = dict(entry)
    return {"state": state, "param_groups": groups, **others}


def _decode_own_layout(plain: Any, template: Any) -> Any:
    """:func:`_decode_optimizer` of a wrapper's own layout: the saved structure as it was (for the optimizer's own
    ``load_state_dict``), once its top-level keys are ``template``'s."""
    decoded, expected = decode_tree(plain, ("optimizer",)), decode_tree(template, ("optimizer",))
    if isinstance(expected, Mapping):
        if not isinstance(decoded, Mapping):
            raise StateMismatchError(f"key 'optimizer' holds a {type(decoded).__qualname__}, expected a mapping")
        _check_keys(decoded, tuple(expected), ("optimizer",))
    return decoded


def _tensor_needed(name: str, value: Any, probed: Mapping[str, Any] | None, torch_own: bool) -> bool:
    """Whether ``value`` (not a tensor) stands where torch's optimizer reads a tensor: an entry the probe's step
    made one (``probed``: the entry's keys -> their shapes, None where not a tensor), or without a probe one of the
    names torch's optimizers keep in the parameter's shape; a number where torch takes one (:data:`_NUMBER_STATES`)
    stands. Not from the template's own state: LBFGS's (and an optimizer's of one's own) may change kinds as it goes
    (its ``t``: a float, then a tensor).

    >>> _tensor_needed("exp_avg", 0.5, {"exp_avg": (2, 3), "step": ()}, True)
    True
    >>> _tensor_needed("step", 3.0, {"exp_avg": (2, 3), "step": ()}, True), _tensor_needed("sum", 0.5, None, False)
    (False, False)
    """
    if name in _NUMBER_STATES and isinstance(value, (int, float)) and not isinstance(value, bool):
        return False
    if probed:
        return isinstance(probed.get(name), tuple)
    return torch_own and name in _PARAM_SHAPED


def _check_keys(entry: Mapping[str, Any], keys: tuple[str, ...] | None, path: tuple[str, ...]) -> None:
    """Name the first of ``keys`` missing from ``entry``, then the first key of ``entry`` not in ``keys``."""
    if keys is None:  # not known: the entry is taken as it is
        return
    for key in keys:
        if key not in entry:
            raise StateMismatchError(f"missing key '{'.'.join(path + (key,))}'")
    for key in entry:
        if key not in keys:
            raise StateMismatchError(f"unexpected key '{'.'.join(path + (key,))}'")


#: the sizes of the probe's stand-in dimensions (distinct primes): a probed state's dimension of size 3 is the
#: parameter's second dimension
_PROBE_DIMS = (2, 3, 5, 7, 11)  # (a parameter of more dimensions: its states are checked by the keys alone)


def _shape_for(probed: tuple[int, ...] | None, param: torch.Tensor) -> tuple[int, ...] | None:
    """The shape a state entry probed as ``probed`` (over the stand-in of ``param``) has for ``param``; None
    when not known (not probed, or a dimension the stand-in's do not explain, such as a flattened one)."""
    if probed is None or param.ndim > len(_PROBE_DIMS):
        return None
    dims = _PROBE_DIMS[: param.ndim]
    shape = []
    for size in probed:
        if size in dims:
            shape.append(param.shape[dims.index(size)])
        elif size == 1:
            shape.append(1)
        else:
            return None
    return tuple(shape)


def _of_ones_own(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is not one of ``torch.optim``'s (Adafactor's module is ``torch.optim`` too).

    >>> _of_ones_own(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    False
    """
    module = type(optimizer).__module__
    return module != "torch.optim" and not module.startswith("torch.optim.")


def _state_keys(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]
) -> list[dict[str, tuple[int, ...] | None] | None]:
    """The state keys a step of ``optimizer`` keeps for each of its parameters (by index) under the options of
    ``groups`` (those being loaded), each with the shape it had in the probe (None: not a tensor), learnt from
    one step of a new optimizer of its class over small stand-ins (the parameters' dimensions, each of a size
    of :data:`_PROBE_DIMS`, and dtypes). Only for torch's own optimizers, whose keys are set at their first
    step; ``[]`` (nothing checked) for others and where the probe cannot run (sparse gradients, options the
    CPU does not take)."""
    if _of_ones_own(optimizer) or type(optimizer) is torch.optim.LBFGS:
        return []  # an optimizer of one's own may add keys as it goes (LBFGS does): its keys are not checked
    stand_ins = [
        [nn.Parameter(torch.zeros(_PROBE_DIMS[: p.ndim] if p.ndim <= len(_PROBE_DIMS) else (1,) * p.ndim, dtype=p.dtype))
         for p in group["params"]]
        for group in optimizer.param_groups
    ]
    try:
        options = [{k: v for k, v in loaded.items() if k != "params"} for loaded in groups]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = type(optimizer)([{**o, "params": ps} for o, ps in zip(options, stand_ins, strict=True)])
            for p in (p for ps in stand_ins for p in ps):
                p.grad = torch.zeros_like(p)
            probe.step()
    except Exception:  # a custom optimizer's own ways: its state keys are not checked
        return []
    found = [probe.state.get(p) for ps in stand_ins for p in ps]
    return [
        None if entry is None
        else {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in entry.items() if v is not None}
        for entry in found
    ]


def _decode_rng(plain: Any, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not template:  # a state that draws from the global RNG takes only such a state's (empty) RNG
        if isinstance(plain, Mapping) and plain:
            raise StateMismatchError(
                f"unexpected key 'rng.{next(iter(plain))}': the state dict has an RNG of its own, and this state "
                "draws from the global RNG (TrainState.create(..., global_rng=True))"
            )
        if not isinstance(plain, Mapping):
            raise StateMismatchError(f"key 'rng' holds a {type(plain).__qualname__}, expected a mapping")
        return {}
    if isinstance(plain, Mapping) and not plain:
        raise StateMismatchError(
            "missing key 'rng.cpu': the state dict's steps drew from the global RNG "
            "(TrainState.create(..., global_rng=True)), and this state has an RNG of its own"
        )
    if not isinstance(plain, Mapping) or "cpu" not in plain:
        raise StateMismatchError("missing key 'rng.cpu'")
    for key, value in plain.items():
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
            raise StateMismatchError(f"key 'rng.{key}' must be a uint8 generator-state tensor")
    from_plain(plain["cpu"], template["cpu"], ("rng", "cpu"))
    return dict(plain)


def _adoptable(
    model: nn.Module, decoded: dict[str, Any]
) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
    """For ``load_state_dict(copy=False)``: what the new state takes from ``decoded`` without a copy.

    Returns ``id`` of each model tensor -> the loaded tensor that replaces it (a :func:`fork`
    memo), and parameter name -> the loaded gradient it takes. A loaded tensor qualifies when
    it matches exactly (dtype, device, shape, strides, plain type) and is the only tensor on
    its storage, so no two tensors of the new state alias. A model tensor under several names
    (tied weights) maps once; one that shares its storage with another tensor of the model (a Parameter made from
    another's transposed data, a slice of a flat buffer) is copied instead, keeping that sharing (:func:`fork`).
    """
    taken: dict[int, torch.Tensor] = {}
    taken_grads: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    loaded, grads = decoded["model"], decoded["grads"]
    named = (*model.named_parameters(), *model.named_buffers())
    on_storage = Counter(_storage_key(t) for t in {id(t): t for _, t in named}.values())
    for name, tensor in named:
        source = loaded.get(name)
        if (id(tensor) in taken or on_storage[_storage_key(tensor)] > 1
                or not _sole_owner(source, tensor, storages)):
            continue
        if type(tensor) is _Parameter:
            adopted = _make_subclass(_Parameter, source, tensor.requires_grad)
            if tensor.__dict__:
                adopted.__dict__.update(tensor.__dict__)
            _keep_tensor_hooks(tensor, adopted)
        elif type(tensor) is torch.Tensor:
            adopted = source
        else:  # a subclass: copied as usual
            continue
        taken[id(tensor)] = adopted
    for name, param in model.named_parameters():
        if _sole_owner(grads.get(name), param, storages):
            taken_grads[name] = grads[name]
    return taken, taken_grads


def _sole_owner(source: Any, like: torch.Tensor, storages: set[int]) -> bool:
    """Whether ``source`` can stand in for ``like`` (records its storage in ``storages`` when so)."""
    if not (
        type(source) is torch.Tensor
        and source.layout is torch.strided  # (a sparse tensor has no strides: copied)
        and not source.requires_grad
        and source.dtype == like.dtype
        and source.device == like.device
        and source.shape == like.shape
        and source.stride() == like.stride()
        and source.storage_offset() == 0
    ):
        return False
    storage = source.untyped_storage()
    if storage.nbytes() != source.numel() * source.element_size() or storage.data_ptr() in storages:
        return False
    storages.add(storage.data_ptr())
    return True


def _apply(state: TrainState, decoded: dict[str, Any], taken_grads: Mapping[str, torch.Tensor]) -> None:
    """Load ``decoded`` into ``state``'s model, gradients, optimizer and scheduler (``taken_grads``: used as they are)."""
    model = core_module(state.model)
    model.load_state_dict(decoded["model"])  # a tensor taken over is copied onto itself: torch skips that
    for name, p in model.named_parameters():
        g = decoded["grads"].get(name)
        if name in taken_grads:
            p.grad = taken_grads[name]
        else:
            p.grad = None if g is None else g.detach().to(p.device, p.dtype, copy=True)
    if state.optimizer is not None:
        state.optimizer.load_state_dict(decoded["optimizer"])
    if state.scheduler is not None:
        state.scheduler.load_state_dict(decoded["scheduler"])
