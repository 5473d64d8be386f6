"""Ensembles: K train states of one architecture, trained together by one vmapped step.

:func:`stack` takes K :class:`loopkit.TrainState` s (each with its own initial weights, seed,
optimizer and hyper-parameters, and scheduler) and stores their parameters stacked along a
new first dimension, ``[K, ...]``. Each member stays an ordinary train state whose parameters
are views into that storage, so its own optimizer updates them in place. :func:`train_step`
computes every member's loss and gradients in one call, ``torch.func.vmap`` over
``torch.func.grad`` of ``loss_fn`` through ``torch.func.functional_call``: one batched
forward and backward instead of K. Then each member's optimizer (and scheduler) steps. A
member's trajectory is its solo run's (the same arithmetic, batched; equal within float
rounding, tested against ``train_step`` runs of each member alone).

The batch is the same for every member. A ``loss_fn`` that draws random numbers (dropout, RReLU,
``torch.randn_like`` noise) is run one member at a time instead (the loss of each member's slice
differentiated by ``torch.autograd.grad``, as a solo backward, with that member's own RNG installed
around it, as :func:`loopkit.train_step` installs a solo state's): each member draws its solo run's
numbers (its own dropout masks, from its own seed, also of a non-contiguous activation's), its
``rng`` advances as its solo state's does, and its trajectory is its solo run's (bitwise, on the
CPU: the same arithmetic, not batched; the backward runs while the model holds the member's parameters, so
activation checkpointing recomputes with them). The step finds this out on its first call that draws (vmap
refuses the draw) and remembers it (:attr:`EnsembleStep.draws_random`); a loss that draws nothing
keeps the one vmapped call (one member at a time costs K forwards and backwards).
A ``loss_fn`` that vmap cannot run at all (``.item()`` in a metric, a branch on a tensor's value, ``nonzero``, an op
without a batching rule, activation checkpointing by ``torch.utils.checkpoint``, a custom ``autograd.Function``
without ``setup_context``) runs one member at a time too, from the first call vmap refuses on (it warns once, and
remembers it: :attr:`EnsembleStep.unbatchable`); the ``loss_fn``'s own errors (a shape error) propagate as they are.
A member made with ``global_rng=True`` draws from torch's global RNG, members in order. BatchNorm or InstanceNorm in
training mode with running statistics is refused (buffers updated in place; in eval mode it reads them); a forward
that changes any other buffer is refused by the step that finds it, before any member updates (a non-persistent
buffer, a cache outside the state dict such as a lazily grown position table, may change: one filled in place
reaches each member's own buffer, as its solo forward fills it; a donated step's refusal leaves the ensemble usable:
only the stacked copy of the other buffers changed, which it stacks again). The members'
modules must be in the same training mode and have the same settings (a convolution's stride, a norm's eps or groups,
any plain attribute such as a ``temperature`` the forward reads, a plain tensor attribute, a function kept as one,
``self.act = torch.relu``, or a method of a plain object made for each member, ``Scaler(0.5).apply``, alike by its
class and attributes: the step runs member 0's modules for all) and the same forward hooks and forward pre-hooks
(the same function, or one made alike for each member: a method of the member's own module, a ``functools.partial``
with equal arguments, a lambda or nested function closing over the member's own module or equal values, a callable
object of one class with equal attributes; torch's pruning and old-style weight_norm hooks are each member's own;
vmapped, a hook runs once a step for all the members, on their batched tensors: one counting its calls in an object
outside the members counts one a step, where K solo runs count K, and a tensor it keeps there (a dict of features a
``loss_fn`` reads) is the vmapped call's, alive within the call and dead once it returns; one member at a time it runs
for each member, as its solo run's does),
the same parameters must be frozen (``requires_grad``) in every member, and their optimizers must
not need a closure (LBFGS); a donated step refuses a member changed since stacking in any of these (changed alike in every member, as when
unfreezing a backbone, it trains on; a ``_private`` value is compared by :func:`stack`, and so by a non-donated
step, not between donated calls). A plain value the forward sets on a module (``self.seen = n``, a ``_private``
call counter), or a dict or list of them it sets or changes in place (``self.stats["calls"] += 1``), reaches every
member, each its own copy, as each member's solo forward sets it (one member at a time, each member's forward starts
from the values before the call, and members whose forwards set them otherwise are refused). A tensor attribute (no
buffer) the forward replaces (a counter, ``self.n = self.n + 1``) is refused and put back: keep such a count as a
Python number. Members pruned by ``torch.nn.utils.prune`` (each its own mask) train as
their solo runs. Gradient hooks on a member's parameters (``p.register_hook(lambda g: g.clamp(-c, c))``,
``register_post_accumulate_grad_hook``) are each member's own: the step runs them on its gradient as its solo
backward does (see :func:`_members_grads`), every member's (its post-accumulate-grad hooks too, see
:func:`_give_grads`) before any member updates. A parameter the loss does not reach in a call keeps its ``.grad`` None,
as in a solo run (no weight decay, momentum or optimizer state for it). A ``loss_fn`` that returns None skips the
batch for every member, as :func:`loopkit.train_step` skips it (see :func:`train_step`). :func:`unstack` copies the
members out as independent states (for checkpoints, ``evaluate``, export); ``ensemble.members`` are views, usable as
they are while the ensemble lives (a checkpoint or ``state_dict`` of ``members[k]`` holds that member's values alone,
copied out of the stacked storage when saved: see :meth:`loopkit.TrainState.state_dict`).

>>> import torch
>>> import loopkit
>>> from loopkit import ensemble
>>> def member(seed, lr):
...     torch.manual_seed(seed)
...     model = torch.nn.Linear(3, 1)
...     return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=lr), seed=seed)
>>> ens = ensemble.stack([member(0, 0.1), member(1, 0.01), member(2, 0.001)])
>>> step = ensemble.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
>>> ens, metrics = step(ens, (torch.randn(8, 3), torch.randn(8, 1)))
>>> ens.params["weight"].shape, metrics["loss"].shape, [m.step for m in ens.members]
(torch.Size([3, 1, 3]), torch.Size([3]), [1, 1, 1])
"""

from __future__ import annotations

import copy
import functools
import types
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any, ClassVar, NamedTuple

import attrs
import torch
from torch import nn
from torch.nn.utils import prune

from loopkit.errors import DonatedStateError
from loopkit.rng import RNGScope
from loopkit.state import (
    _MODULE_STANDARD, _SETTING_SCALARS, TrainState, _fork, _keep_tensor_hooks, fork, is_plain_setting, leave_intact,
    module_settings, persistent_buffers, replace, state_at_error,
)
from loopkit.steps import LossFn, _cuda_index, _split_loss, check_takes_model_and_batch, needs_closure

__all__ = ["Ensemble", "EnsembleStep", "stack", "train_step", "unstack"]


@attrs.frozen(eq=False)
class Ensemble:
    """K member states whose parameters live stacked in ``params`` (``[K, ...]``); see :func:`stack`.

    ``members[k]`` is a :class:`loopkit.TrainState` whose parameters are views of
    ``params[name][k]`` (tied parameters stay tied); ``buffers`` are copies of the members'
    buffers, stacked, which the step reads (a buffer a forward changes is not supported:
    BatchNorm in training mode is refused by :func:`stack`, any other such change by the step).
    ``skeleton`` is one member's module, which the step calls through ``functional_call``.

    >>> import torch, loopkit
    >>> models = [torch.nn.Linear(2, 1) for _ in range(2)]
    >>> ens = stack([loopkit.TrainState.create(m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in models])
    >>> len(ens), ens.members[1].model.weight.data_ptr() == ens.params["weight"][1].data_ptr()
    (2, True)
    """

    members: tuple[TrainState, ...]
    params: Mapping[str, torch.Tensor]
    buffers: Mapping[str, torch.Tensor]
    skeleton: nn.Module
    #: each member's parameters (the views), in the order of ``params``
    views: tuple[tuple[nn.Parameter, ...], ...] = attrs.field(default=(), repr=False)
    #: each member's values key (see :func:`_all_values`) when last checked (by :func:`stack` or a donated step),
    #: which a donated step compares cheaply (tensors by identity and version, hooks by identity), the values and hooks
    #: only when one changed
    _values: tuple[Any, ...] = attrs.field(default=(), repr=False)
    _consumed: bool = attrs.field(default=False, init=False, repr=False)
    #: what to do instead, said where one TrainState belongs (run_epochs, evaluate, predict, checkpoints, lr_find,
    #: summarize, a step of one state: see :func:`loopkit.state.state_hint`, which reads it without importing this)
    instead_of_a_state: ClassVar[str] = (
        "an Ensemble is K member TrainStates, trained by its ensemble step in a loop of your own: for batch in data: "
        "ens, metrics = step(ens, batch); where one TrainState belongs, give a member: ens.members[k] as it is, or "
        "loopkit.ensemble.unstack(ens) for independent copies, which loopkit.ensemble.stack puts together again"
    )

    def __len__(self) -> int:
        return len(self.members)

    def check_usable(self) -> None:
        """Raise :class:`loopkit.DonatedStateError` if this ensemble was given to a donated step, or one of its
        members was (``run_epochs(step, ens.members[k], ...)`` trains the member's views of the stacked storage in
        place, and its returned state holds them).

        >>> import torch, loopkit
        >>> models = [torch.nn.Linear(2, 1) for _ in range(2)]
        >>> ens = stack([loopkit.TrainState.create(m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in models])
        >>> ens.members[1].mark_consumed()
        >>> ens.check_usable()
        Traceback (most recent call last):
        ...
        loopkit.errors.DonatedStateError: member 1 of this Ensemble was given to a donated step ...
        """
        if self._consumed:
            raise DonatedStateError("this Ensemble was given to a donated ensemble step; use the one that step returned")
        for k, member in enumerate(self.members):
            if member._consumed:
                raise DonatedStateError(
                    f"member {k} of this Ensemble was given to a donated step (run_epochs, loopkit.donate), which "
                    "trained its parameters, views of the ensemble's stacked storage, in place: the state that step "
                    "returned holds them now. Stack the members again with that state in its place "
                    "(ensemble.stack([...members before it, trained, ...members after it]) copies them)"
                )

    def __deepcopy__(self, memo: dict[int, Any]) -> Ensemble:
        # stacked again: a copy's members must be views of the copy's own ``params`` (deepcopy copies a view apart)
        self.check_usable()
        return stack(self.members)

    def __reduce__(self) -> tuple[Any, ...]:
        self.check_usable()  # (pickled as its members, stacked again when loaded, for the same reason)
        return stack, (unstack(self),)  # (each with storage of its own: a view pickles all of its base, K members' worth)


def _check_members(states: Sequence[TrainState]) -> None:
    if isinstance(states, TrainState) or not isinstance(states, Sequence) or len(states) < 1:
        raise TypeError("ensemble.stack: give a sequence of loopkit.TrainState (one per member)")
    first = states[0]
    for k, state in enumerate(states):
        if not isinstance(state, TrainState):
            raise TypeError(f"ensemble.stack: member {k} is a {type(state).__qualname__}, not a loopkit.TrainState")
        state.check_usable()
        if state.optimizer is None:
            raise ValueError(f"ensemble.stack: member {k} has no optimizer; each member trains with its own")
        if needs_closure(state.optimizer):
            raise TypeError(
                f"ensemble.stack: member {k}'s optimizer {type(state.optimizer).__name__} needs a closure (its step "
                "re-runs the loss and its backward), which one vmapped step for all members cannot give it; train "
                "that member alone with loopkit.train_step, or use an optimizer whose step() needs no closure"
            )
        for module in state.model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats and module.training:
                raise TypeError(  # (BatchNorm, InstanceNorm(track_running_stats=True))
                    f"ensemble.stack: member {k} has {type(module).__name__} in training mode with running statistics, "
                    "which a vmapped step cannot update in place; freeze it (.eval(): it reads its statistics, as a "
                    "fine-tuned backbone's does), make it with track_running_stats=False, or use GroupNorm/LayerNorm"
                )
            if getattr(module, "sparse", False) is True and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                raise TypeError(
                    f"ensemble.stack: member {k} has {type(module).__name__}(sparse=True), whose sparse gradients a "
                    "vmapped step cannot stack; use sparse=False (and a dense optimizer for it)"
                )
        difference = _parameter_difference(state.model, first.model)
        if difference:
            raise ValueError(
                f"ensemble.stack: member {k}'s model differs from member 0's ({difference}); every member must have "
                "the same architecture, its parameters and buffers of the same shapes, dtypes and devices"
            )
        structure, expected_structure = _structure(state.model), _structure(first.model)
        if structure != expected_structure:  # the step runs member 0's modules for every member
            at = next((a, b) for a, b in zip(structure, expected_structure) if a != b) if len(structure) == len(
                expected_structure) else (f"{len(structure)} modules", f"{len(expected_structure)} modules")
            raise ValueError(
                f"ensemble.stack: member {k}'s model differs from member 0's ({at[0]} where member 0 has {at[1]}); "
                "the vmapped step runs member 0's modules for all: every member must have the same architecture"
            )
        _check_mode(state.model, first.model, k, "ensemble.stack")
        _check_settings(state.model, first.model, k, "ensemble.stack")
        _check_hooks(state.model, first.model, k, "ensemble.stack")
        _check_attributes(state.model, first.model, k, "ensemble.stack")
        frozen = dict(first.model.named_parameters())
        for n, p in state.model.named_parameters():  # one vmapped gradient: the same parameters train in every member
            if p.requires_grad != frozen[n].requires_grad:
                raise ValueError(
                    f"ensemble.stack: parameter '{n}' has requires_grad={p.requires_grad} in member {k} and "
                    f"{frozen[n].requires_grad} in member 0; every member must freeze the same parameters"
                )


def _parameter_difference(model: nn.Module, first: nn.Module) -> str:
    """How ``model``'s class, parameters or buffers (names, shapes, dtypes, devices) differ from member 0's ``first``,
    first difference only (parameters first); ``""`` when they do not."""
    if type(model) is not type(first):
        return f"a {type(model).__qualname__} where member 0's is a {type(first).__qualname__}"
    own, theirs = _described(model), _described(first)
    if own == theirs:
        return ""
    kind, name = next(key for key in sorted(own.keys() | theirs.keys()) if own.get(key) != theirs.get(key))
    what = f"{('parameter', 'buffer')[kind]} '{name}'"
    if (kind, name) not in theirs:
        return f"{what} has {own[kind, name]} where member 0 has no such {what.split()[0]}"
    if (kind, name) not in own:
        return f"no {what} where member 0's has {theirs[kind, name]}"
    return f"{what} has {own[kind, name]} where member 0's has {theirs[kind, name]}"


def _described(model: nn.Module) -> dict[tuple[int, str], str]:
    """Each of ``model``'s parameters' (kind 0) and buffers' (kind 1) shape, dtype and device, as text, by kind and
    name (compared as text: dtypes and devices have no order to sort the differences by)."""
    tensors = [(0, model.named_parameters()), (1, model.named_buffers())]
    return {(kind, n): f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}" for kind, named in tensors
            for n, t in named}


def _check_mode(model: nn.Module, first: nn.Module, k: int, where: str) -> None:
    """Refuse member ``k``'s ``model`` if a module's training mode differs from member 0's: the step runs
    member 0's modules (their ``.training``) for every member."""
    for (name, module), expected in zip(model.named_modules(), first.modules()):
        if module.training != expected.training:
            mode = {True: "train", False: "eval"}
            raise ValueError(
                f"{where}: member {k}'s module {name or '(model)'} ({type(module).__name__}) is in "
                f"{mode[module.training]} mode where member 0's is in {mode[expected.training]} mode; the vmapped step "
                "runs member 0's modules for all: put every member in the same mode (model.train() or model.eval())"
            )


class _Unset:
    """An attribute one member's module has and the other's lacks."""

    def __repr__(self) -> str:
        return "<not set>"


_UNSET = _Unset()


def _same(a: Any, b: Any) -> bool:
    """Equal settings, as the forward compares them (``0 == 0.0``), sequences item by item and dicts key by key (see
    :func:`_is_plain_tree`); NaN equals NaN. A value that is no setting (a tensor, or ``<not set>``) equals only
    itself."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys()
                and all(_same(a[key], b[key]) for key in a))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    if not (is_plain_setting(a) and is_plain_setting(b)):
        return a is b
    return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def _short(value: Any, limit: int = 80) -> str:
    text = _function_name(value) if isinstance(value, _FUNCTIONS) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _function_name(function: Any) -> str:
    """A function's (a bound method's: its function's) module and name, ``torch.relu``, for a message."""
    if isinstance(function, functools.partial):
        return f"functools.partial({_function_name(function.func)}, ...)"
    function = getattr(function, "__func__", function)
    name = function.__qualname__ if isinstance(function, types.FunctionType) else function.__name__
    module = getattr(function, "__module__", None)
    return f"{module}.{name}" if module else name


def _check_settings(model: nn.Module, first: nn.Module, k: int, where: str) -> None:
    """Refuse member ``k``'s ``model`` if a module's settings (see :func:`_settings`) differ from member 0's:
    the step runs member 0's modules, with their settings, for every member. (Modules aligned: same structure.)"""
    for name, module, expected, attrs_ in _differing_settings(model, first):
        attr = min(attrs_)
        raise ValueError(
            f"{where}: member {k}'s module {name or '(model)'} ({type(module).__name__}) has {attr}="
            f"{_short(_setting(module, attr))} where member 0's has {attr}={_short(_setting(expected, attr))}; the "
            "vmapped step runs member 0's modules for all: every member's layers must have the same settings"
        )


#: each hooked module's index in ``modules()`` and its forward hooks' keys (see :func:`_hooks`)
_Hooks = list[tuple[int, tuple[Any, ...]]]


def _hooks(model: nn.Module) -> _Hooks:
    """``model``'s forward pre-hooks and forward hooks, as the step runs them (member 0's for all): for each module
    that has any, its index in ``modules()`` and each hook's kind, flags and key (see :func:`_hook_key`), in order."""
    places = _Places(model)
    found = []
    for i, module in enumerate(model.modules()):
        if not (module._forward_hooks or module._forward_pre_hooks):
            continue
        kinds = [("forward pre-hook", h, module._forward_pre_hooks_with_kwargs.get(n, False), False)
                 for n, h in module._forward_pre_hooks.items()]
        kinds += [("forward hook", h, module._forward_hooks_with_kwargs.get(n, False),
                   module._forward_hooks_always_called.get(n, False)) for n, h in module._forward_hooks.items()]
        found.append((i, tuple((kind, _hook_key(hook, places), *flags) for kind, hook, *flags in kinds)))
    return found


def _hook_identity(module: nn.Module) -> tuple[Any, ...]:
    """``module``'s forward pre-hooks and forward hooks by identity: each one's handle id (never reused) and the hook
    itself (compared by identity, short of a hook's own ``==``): what a donated step compares cheaply between calls
    (see :func:`_scan`), their keys (see :func:`_hooks`) only when it changed."""
    return tuple(module._forward_pre_hooks.items()), tuple(module._forward_hooks.items())


def _hook_key(hook: Any, places: _Places) -> Any:
    """What makes two members' hooks alike: any of torch's pruning methods by the attribute it computes (from each
    member's own mask), an old-style ``weight_norm`` / ``spectral_norm`` hook by its class and settings (each member
    has its own object), a method of an object outside the member (a recorder) by its function and that object, any
    other function or callable object as :func:`_same_function` compares it (a method of the member's own module:
    by its place in the member, see :class:`_Places`)."""
    if isinstance(hook, prune.BasePruningMethod):
        return prune.BasePruningMethod, hook._tensor_name
    if isinstance(_computed_name(hook), str):
        return type(hook), tuple(sorted((a, v) for a, v in vars(hook).items() if is_plain_setting(v)))
    func, owner = getattr(hook, "__func__", None), getattr(hook, "__self__", None)
    if func is not None and owner is not None and places[owner] is None:
        return func, id(owner)  # (each member's own recorder: member 0's would count every member's calls)
    return _Function(hook, places)


class _Places:
    """A member's modules by their index in its ``model.modules()`` (found when first needed): a module of the
    member's own that a function holds (a hook that is a method of it, a lambda closing over ``self``) is alike to
    the other member's at the same place (each member has its own)."""

    __slots__ = ("model", "index")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.index: dict[int, int] | None = None

    def __getitem__(self, value: Any) -> int | None:
        """``value``'s index in ``model.modules()``; None if it is none of them."""
        if self.index is None:
            self.index = {id(m): i for i, m in enumerate(self.model.modules())}
        return self.index.get(id(value)) if isinstance(value, nn.Module) else None


class _Alike:
    """Two members' values being compared (see :func:`_same_value`): their places (see :class:`_Places`) and the
    pairs of functions being compared (a nested function that calls itself holds itself in its closure: alike
    meanwhile)."""

    __slots__ = ("places", "comparing")

    def __init__(self, a: _Places, b: _Places) -> None:
        self.places = (a, b)
        self.comparing: set[tuple[int, int]] = set()

    def same_module(self, a: nn.Module, b: nn.Module) -> bool:
        """Whether ``a`` and ``b`` are one module, or each member's own at the same place."""
        place = self.places[0][a]
        return a is b or (place is not None and place == self.places[1][b])


class _Function:
    """A function or callable object in a hooks key, compared as :func:`_same_function` compares it, with its
    member's places (see :class:`_Places`)."""

    __slots__ = ("value", "places")

    def __init__(self, value: Any, places: _Places) -> None:
        self.value = value
        self.places = places

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Function):
            return False
        return _same_function(self.value, other.value, _Alike(self.places, other.places))

    __hash__ = None  # type: ignore[assignment]


#: the functions a module's attribute may hold that :func:`_same_function` compares (``torch.relu``, ``F.gelu``,
#: ``functools.partial(F.leaky_relu, negative_slope=0.1)``)
_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)


def _same_function(a: Any, b: Any, alike: _Alike) -> bool:
    """Whether ``a`` and ``b``, functions of two members, compute alike: the same object; bound methods of one function
    (of each member's own module at the same place, or of alike objects, see :func:`_same_object`: each member's
    ``Scaler(0.5).apply``); ``functools.partial`` s of alike functions with alike arguments (positional and keyword);
    functions of one code whose defaults (keyword-only ones too) and closures hold alike values (see
    :func:`_same_value`: a lambda made for each member, closing over its own module or an equal number); callable
    objects of one class whose attributes are alike (a hook object made for each member, ``Scale(2.0)``). Any other
    functions differ (``torch.relu`` and ``torch.tanh``, a lambda closing over each member's own scale, methods of
    ``Scaler(1.0)`` and ``Scaler(3.0)``)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    pair = (id(a), id(b))
    if pair in alike.comparing:
        return True
    alike.comparing.add(pair)
    try:
        if isinstance(a, functools.partial):
            return (_same_function(a.func, b.func, alike) and _same_value(a.args, b.args, alike)
                    and _same_value(a.keywords, b.keywords, alike))
        if isinstance(a, types.MethodType):
            owner = a.__self__
            return a.__func__ is b.__func__ and (_same_value(owner, b.__self__, alike) if isinstance(owner, nn.Module)
                                                 else _same_object(owner, b.__self__, alike))
        if isinstance(a, types.FunctionType):
            return (a.__code__ is b.__code__ and a.__globals__ is b.__globals__
                    and _same_value(a.__defaults__ or (), b.__defaults__ or (), alike)
                    and _same_value(a.__kwdefaults__ or {}, b.__kwdefaults__ or {}, alike)
                    and _same_value(_cells(a), _cells(b), alike))
        if isinstance(a, nn.Module):  # (a module of the member's own as a hook)
            return alike.same_module(a, b)
        return callable(a) and _same_object(a, b, alike)
    finally:
        alike.comparing.discard(pair)


def _same_object(a: Any, b: Any, alike: _Alike) -> bool:
    """Whether ``a`` and ``b``, objects of two members that are no modules (a callable hook object, the object a
    method is bound to), are one object, or of one class (no class themselves) with alike attributes (see
    :func:`_same_value`): ``Scaler(0.5)`` made for each member, not ``Scaler(1.0)`` and ``Scaler(3.0)``.

    >>> class Scaler:
    ...     def __init__(self, s): self.s = s
    >>> alike = _Alike(_Places(nn.Identity()), _Places(nn.Identity()))
    >>> _same_object(Scaler(0.5), Scaler(0.5), alike), _same_object(Scaler(1.0), Scaler(3.0), alike)
    (True, False)
    """
    if a is b:
        return True
    fields = getattr(a, "__dict__", None)
    return (type(a) is type(b) and not isinstance(a, type) and type(fields) is dict
            and _same_value(fields, vars(b), alike))


def _cells(function: types.FunctionType) -> tuple[Any, ...]:
    """What ``function``'s closure holds, cell by cell (``_UNSET`` for a cell not filled yet)."""
    found = []
    for cell in function.__closure__ or ():
        try:
            found.append(cell.cell_contents)
        except ValueError:
            found.append(_UNSET)
    return tuple(found)


def _check_hooks(model: nn.Module, first: nn.Module, k: int, where: str) -> None:
    """Refuse member ``k``'s ``model`` if a module's forward pre-hooks or forward hooks differ from member 0's (see
    :func:`_hooks`): the step runs member 0's modules, and so their hooks, for every member."""
    own, theirs = dict(_hooks(model)), dict(_hooks(first))
    if own == theirs:
        return
    i = next(i for i in sorted(own.keys() | theirs.keys()) if own.get(i) != theirs.get(i))
    (name, module), expected = list(model.named_modules())[i], list(first.modules())[i]
    raise ValueError(
        f"{where}: member {k}'s module {name or '(model)'} ({type(module).__name__}) has other forward hooks than "
        f"member 0's ({_hook_names(module)} where member 0's has {_hook_names(expected)}); the vmapped step runs "
        "member 0's modules, with their hooks, for all: register the same hook function in every member (one "
        "function, not one made for each member; a method of the member's own module is its own), or train the "
        "members apart"
    )


def _hook_names(module: nn.Module) -> str:
    """``module``'s forward pre-hooks and forward hooks, named, for a message."""
    hooks = [("forward pre-hook", h) for h in module._forward_pre_hooks.values()]
    hooks += [("forward hook", h) for h in module._forward_hooks.values()]
    return ", ".join(f"{kind} {getattr(h, '__qualname__', type(h).__qualname__)}" for kind, h in hooks) or "none"


def _check_attributes(model: nn.Module, first: nn.Module, k: int, where: str, *, public: bool = False) -> None:
    """Refuse member ``k``'s ``model`` if a module's other values differ from member 0's: a tensor that is no
    parameter or buffer (a fixed random projection), a function (``self.act = torch.tanh``), a dict or list of such
    values, a ``_private`` number (but with ``public``: the donated step's check between calls, which leaves
    ``_private`` values to :func:`stack`). The step runs member 0's modules, and so their values, for every member;
    other objects (a tokenizer) are not compared."""
    alike = _Alike(_Places(model), _Places(first))
    for (name, module), other in zip(model.named_modules(), first.modules()):
        own, theirs = _other_values(module), _other_values(other)
        if public:
            own = {attr: v for attr, v in own.items() if attr[:1] != "_"}
            theirs = {attr: v for attr, v in theirs.items() if attr[:1] != "_"}
        for attr in sorted(own.keys() | theirs.keys()):
            if attr in own and attr in theirs and _same_value(own[attr], theirs[attr], alike):
                continue
            module_name = f"module {name or '(model)'} ({type(module).__name__})"
            raise ValueError(
                f"{where}: member {k}'s {module_name} has another {attr!r} than member 0's "
                f"({_short(own.get(attr, '<not set>'))} where member 0's is {_short(theirs.get(attr, '<not set>'))}); "
                "the vmapped step runs member 0's modules, with their values, for all: make it the same in every "
                "member, or register a tensor as a buffer (each member then has its own)"
            )


def _other_values(module: nn.Module, names: Set[str] | None = None) -> dict[str, Any]:
    """``module``'s attributes that :func:`module_settings` leaves out and :func:`_same_value` can compare (of
    ``names``, if given: its attributes that are neither standard nor settings)."""
    own = vars(module)
    if names is None:
        names = own.keys() - _MODULE_STANDARD - module_settings(module).keys()
    if not names:  # (the common case: a layer's attributes are its settings)
        return {}
    held = {id(t) for t in (*module._parameters.values(), *module._buffers.values()) if t is not None}
    computed = _computed(module)
    return {attr: own[attr] for attr in sorted(names) if attr not in computed and _comparable(own[attr], held)}


def _computed(module: nn.Module) -> set[str]:
    """The attributes an old-style ``spectral_norm`` / ``weight_norm`` hook, or a ``torch.nn.utils.prune`` pruning
    method, of ``module`` computes from its parameters (and mask buffers) before each forward (``weight``)."""
    return {name for hook in module._forward_pre_hooks.values() if isinstance(name := _computed_name(hook), str)}


def _computed_name(hook: Any) -> Any:
    """The attribute a forward pre-hook computes: old-style ``spectral_norm`` / ``weight_norm`` keep it as ``name``,
    ``torch.nn.utils.prune``'s pruning methods as ``_tensor_name`` (``weight`` from ``weight_orig * weight_mask``)."""
    name = getattr(hook, "name", None)
    if name is None and isinstance(hook, prune.BasePruningMethod):
        name = getattr(hook, "_tensor_name", None)
    return name


def _comparable(value: Any, held: set[int]) -> bool:
    """A value whose equality says whether two members compute alike: a tensor that is none of the module's own
    parameters and buffers, a plain value, a function (``self.act = torch.relu``, see :data:`_FUNCTIONS`), and dicts,
    lists and tuples of those (not empty)."""
    if isinstance(value, torch.Tensor):
        return id(value) not in held
    if isinstance(value, Mapping):
        return bool(value) and all(_comparable(v, held) for v in value.values())
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_comparable(v, held) for v in value)
    return is_plain_setting(value) or isinstance(value, _FUNCTIONS)


def _same_value(a: Any, b: Any, alike: _Alike) -> bool:
    """Equal values of two members (of :func:`_comparable`, or held by their functions): tensors of one shape, dtype
    and device with equal elements (NaN equal), functions as :func:`_same_function` compares them, containers item by
    item, a module of each member's own at the same place (see :class:`_Places`), other values as :func:`_same`
    compares them."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b) or (
                    a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))))
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (isinstance(a, Mapping) and isinstance(b, Mapping) and a.keys() == b.keys()
                and all(_same_value(a[key], b[key], alike) for key in a))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b)
                and all(_same_value(x, y, alike) for x, y in zip(a, b)))
    if isinstance(a, nn.Module) or isinstance(b, nn.Module):
        return isinstance(a, nn.Module) and isinstance(b, nn.Module) and alike.same_module(a, b)
    if isinstance(a, _FUNCTIONS) or isinstance(b, _FUNCTIONS):
        return _same_function(a, b, alike)
    return _same(a, b)


def _setting(module: nn.Module, attr: str) -> Any:
    """``module``'s setting ``attr``: its own, else its class's, else ``_UNSET``."""
    return getattr(module, attr, _UNSET)


def _is_plain_tree(value: Any) -> bool:
    """Whether ``value`` is a plain value (see :func:`is_plain_setting`) or a dict (any mapping, plain keys), list or
    tuple of such values, nested: what :func:`_check_attributes` compares as it is, and so what a forward that
    changes it (``self.stats["calls"] += 1``) must change in every member (see :func:`_copy_written`). (Per call, for
    each such value: the exact types looked up first, one pass over a flat container's items.)"""
    if type(value) in _SCALAR_TYPES:
        return True
    if isinstance(value, Mapping):
        return (all(type(key) in _SCALAR_TYPES or is_plain_setting(key) for key in value.keys())
                and all(type(v) in _SCALAR_TYPES or _is_plain_tree(v) for v in value.values()))
    if isinstance(value, (list, tuple)):
        return all(type(v) in _SCALAR_TYPES or _is_plain_tree(v) for v in value)
    return isinstance(value, _SETTING_SCALARS)


#: the exact types of :data:`_SETTING_SCALARS` (a numpy scalar's is a subclass: found by ``isinstance``)
_SCALAR_TYPES = frozenset(_SETTING_SCALARS)


def _plain_values(module: nn.Module) -> dict[str, Any]:
    """``module``'s plain values that a forward may set or change in place: its settings (see
    :func:`module_settings`), its ``_private`` plain values (a forward's own call counter) and dicts and lists of
    plain values (see :func:`_is_plain_tree`), not its bookkeeping (``_is_full_backward_hook``)."""
    own = vars(module)
    return {name: own[name] for name in own.keys() - _BOOKKEEPING
            if type(own[name]) in _SETTING_SCALARS or _is_plain_tree(own[name])}


class _Snapshot(NamedTuple):
    """A model's modules' values before a call (see :func:`_snapshot`), in ``modules()`` order."""

    #: each module's plain values (see :func:`_plain_values`), copies: an in-place change of the module's does not
    #: reach them
    values: list[dict[str, Any]]
    #: each module's own tensor attributes (no parameter or buffer), by (module index, name): the objects themselves
    tensors: dict[tuple[int, str], torch.Tensor]


def _snapshot(model: nn.Module) -> _Snapshot:
    """The plain values (see :func:`_plain_values`) and tensor attributes of each of ``model``'s modules as they are
    now, lists and dicts copied (a forward that appends to one, or counts in one, changes the module's, not the
    snapshot's). Per call: one walk, scalars and tuples of scalars (a stride) taken as they are (immutable), the type
    checks first."""
    snapshot, tensors = [], {}
    for i, module in enumerate(model.modules()):
        values = {}
        own = vars(module)
        for name in own.keys() - _BOOKKEEPING:  # (a layer's: its settings, a few)
            value = own[name]
            kind = type(value)
            if kind in _SETTING_SCALARS:
                values[name] = value
            elif kind is tuple:
                for item in value:
                    if type(item) not in _SETTING_SCALARS:  # (a tuple holding a list, or a numpy scalar)
                        if _is_plain_tree(value):
                            values[name] = copy.deepcopy(value)
                        break
                else:
                    values[name] = value
            elif isinstance(value, torch.Tensor):
                tensors[(i, name)] = value
            elif _is_plain_tree(value):
                values[name] = _copy_plain(value)
        snapshot.append(values)
    return _Snapshot(snapshot, tensors)


def _copy_plain(value: Any) -> Any:
    """A copy of ``value`` (see :func:`_is_plain_tree`) that no in-place change of ``value`` reaches: lists and dicts
    copied, nested ones too; scalars as they are. Other values (a tensor that replaced a plain one) deep-copied."""
    kind = type(value)
    if kind is list:
        copied = list(value)
        for i, v in enumerate(copied):
            if type(v) not in _SCALAR_TYPES:
                copied[i] = _copy_plain(v)
        return copied
    if kind is dict:
        copied = dict(value)
        for key, v in copied.items():
            if type(v) not in _SCALAR_TYPES:
                copied[key] = _copy_plain(v)
        return copied
    if kind in _SCALAR_TYPES:
        return value
    return copy.deepcopy(value)  # (a tuple holding a list, a list of a subclass, an OrderedDict, a numpy scalar)


def _check_unchanged(ensemble: Ensemble) -> None:
    """Refuse the members (as :func:`stack` would) if, since they were stacked, a module's training mode or settings,
    a parameter's ``requires_grad``, another value (see :func:`_other_values`) or a forward hook was changed in some
    members only (a donated step does not stack them again). Member 0's model is the skeleton itself. Cheap: plain
    values and flags compared, tensors and hooks by identity (tensors and version; no device sync)."""
    reference, key = _scan(ensemble.skeleton)  # (``training`` among the settings: one comparison, commonly)
    keys = [key]
    for k, member in enumerate(ensemble.members[1:], 1):
        settings, key = _scan(member.model)
        keys.append(key)
        if settings != reference:
            _check_mode(member.model, ensemble.skeleton, k, "ensemble.train_step")
            _check_settings(member.model, ensemble.skeleton, k, "ensemble.train_step")
    _check_frozen(ensemble)
    _check_values(ensemble, tuple(keys))


#: a member's values key (see :func:`_all_values`): each module's other values (see :func:`_key`), and each hooked
#: module's index and hooks by identity (see :func:`_hook_identity`)
_ValuesKey = tuple[list[tuple[tuple[str, Any], ...]], list[tuple[int, tuple[Any, ...]]]]


def _scan(model: nn.Module) -> tuple[list[dict[str, Any]], _ValuesKey]:
    """``model``'s settings (each module's :func:`module_settings`) and values key (see :func:`_all_values`), in one
    walk of its modules (each module's attributes sorted once: the step's checks cost per module and member)."""
    settings, keys, hooked = [], [], []
    for i, module in enumerate(model.modules()):
        if module._forward_hooks or module._forward_pre_hooks:
            hooked.append((i, _hook_identity(module)))
        own = vars(module)
        names = own.keys() - _BOOKKEEPING
        # (module_settings, from the attributes that are not bookkeeping)
        public = {attr for attr in names if attr[:1] != "_"}  # (a forward's own _private counter is its business)
        found = {attr: own[attr] for attr in public if type(own[attr]) in _SETTING_SCALARS or is_plain_setting(own[attr])}
        settings.append(found)
        others = _other_values(module, public - found.keys()) if len(public) > len(found) else None
        keys.append(tuple((attr, _key(value)) for attr, value in others.items()) if others else ())
    return settings, (keys, hooked)


#: a module's standard attributes but ``training`` (a setting): its bookkeeping, neither a setting nor another value
_BOOKKEEPING = _MODULE_STANDARD - {"training"}


def _check_frozen(ensemble: Ensemble) -> None:
    """Refuse the members if a parameter's ``requires_grad`` differs from member 0's: one vmapped gradient trains
    member 0's trainable parameters in every member (as :func:`stack` refuses it). The same change in every member
    (unfreezing a backbone to fine-tune it) is fine."""
    expected = tuple(p.requires_grad for p in ensemble.views[0])
    for k, views in enumerate(ensemble.views[1:], 1):
        flags = tuple(p.requires_grad for p in views)
        if flags != expected:
            i = next(i for i, (a, b) in enumerate(zip(flags, expected)) if a != b)
            raise ValueError(
                f"ensemble.train_step: parameter '{list(ensemble.params)[i]}' has requires_grad={flags[i]} in member "
                f"{k} and {expected[i]} in member 0 (changed since they were stacked); every member must freeze the "
                "same parameters: set requires_grad alike in every member, or train the members apart"
            )


def _check_values(ensemble: Ensemble, keys: tuple[_ValuesKey, ...]) -> None:
    """Refuse the members (see :func:`_check_attributes` and :func:`_check_hooks`) if one's other public values (a
    plain tensor attribute, a dict of numbers) or forward hooks were changed since they were last checked and now
    differ from member 0's (a ``_private`` value is :func:`stack`'s to compare, and so a non-donated step's, which
    stacks its members again; comparing every module's private values here would cost each call; a plain one the
    forward sets, a call counter, reaches every member, see :func:`_copy_written`). Unchanged keys (see
    :func:`_all_values`) are the common case: no values or hooks are compared then (a hook object changed in place,
    not replaced, is not compared again). Changed alike in every member, the new keys are kept. ``keys``: each
    member's, now."""
    if keys == ensemble._values:
        return
    for k, member in enumerate(ensemble.members[1:], 1):
        _check_attributes(member.model, ensemble.skeleton, k, "ensemble.train_step", public=True)
        _check_hooks(member.model, ensemble.skeleton, k, "ensemble.train_step")
    object.__setattr__(ensemble, "_values", keys)


def _all_values(members: Sequence[TrainState]) -> tuple[_ValuesKey, ...]:
    """Each member's values key: what of its modules' other values (see :func:`_other_values`) and forward hooks a
    donated step compares between calls, plain values as they are, tensors by identity and version (see
    :class:`_Seen`), in ``modules()`` order, and hooks by identity (see :func:`_hook_identity`; see :func:`_scan`)."""
    return tuple(_scan(member.model)[1] for member in members)


def _key(value: Any) -> Any:
    """``value`` (see :func:`_comparable`) as a values key (see :func:`_all_values`) holds it: containers as tuples
    (a copy: an in-place change of a list shows), tensors as :class:`_Seen`."""
    if isinstance(value, torch.Tensor):
        return _Seen(value)
    if isinstance(value, Mapping):
        return (dict, tuple((k, _key(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_key(v) for v in value))
    return value


class _Seen:
    """A tensor in a values key (see :func:`_all_values`): equal only to the same tensor, not changed in place since
    (its ``_version``). Compares no elements (no device sync); keeps the tensor alive (its ``id`` is not reused)."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.version = tensor._version

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Seen) and self.tensor is other.tensor and self.version == other.version

    __hash__ = None  # type: ignore[assignment]


def _differing_settings(model: nn.Module, reference: nn.Module) -> list[tuple[str, nn.Module, nn.Module, set[str]]]:
    """``(name, module, reference's module, the names of the settings that differ)`` for each of ``model``'s modules
    whose settings (see :func:`_settings`) differ from ``reference``'s (modules aligned: the same structure)."""
    differing = []
    for (name, module), other in zip(model.named_modules(), reference.modules()):
        own, theirs = module_settings(module), module_settings(other)
        if own == theirs:  # (the common case: plain values, compared by ==)
            continue
        attrs_ = {a for a in own.keys() | theirs.keys() if not _same(_setting(module, a), _setting(other, a))}
        if attrs_:
            differing.append((name, module, other, attrs_))
    return differing


def _copy_written(ensemble: Ensemble, before: _Snapshot) -> None:
    """Give every member the plain values the forward set, changed in place or removed on member 0's modules since
    ``before`` (their :func:`_snapshot` before the call): a setting (``self.seen_len = n``), a ``_private`` one (a
    call counter), a dict or list of them (``self.stats["calls"] += 1``), each member its own copy.

    The step runs member 0's modules for all, so only theirs changed; each member's own forward would have set the same
    values (a plain value cannot depend on a member's tensors under vmap; one member at a time, members that set it
    otherwise are refused) on its own modules. What the forward did not set stays each member's."""
    if len(ensemble.members) < 2:
        return
    sources = list(ensemble.skeleton.modules())
    after = [_plain_values(module) for module in sources]
    if after == before.values:
        return  # (the common case: the forward set none)
    written = []
    for i, (now, then) in enumerate(zip(after, before.values)):
        if now != then:
            attrs_ = {a for a in now.keys() | then.keys()
                      if a not in now or a not in then or not _same(now[a], then[a])}
            if attrs_:
                written.append((i, attrs_))
    for member in ensemble.members[1:]:
        modules = list(member.model.modules())
        for i, attrs_ in written:
            source, target = vars(sources[i]), modules[i]
            for attr in attrs_:
                if attr in source:  # (a value, or what replaced it: a cache's tensor where None was)
                    setattr(target, attr, _copy_plain(source[attr]))
                elif attr in vars(target):
                    delattr(target, attr)


#: a module's standard attributes that hold no tensors (hooks, submodules, flags): :func:`_refuse_escaped` skips them
#: (``_parameters`` and ``_buffers`` it searches: a forward may register a buffer)
_NO_TENSORS = _MODULE_STANDARD - {"_parameters", "_buffers"}


def _refuse_escaped(
    model: nn.Module, where: str, before: _Snapshot, of_call: Callable[[torch.Tensor], bool] | None = None,
) -> None:
    """Refuse a forward that kept a tensor on a module (``self.last_h = h.detach()``): under vmap it is a wrapper of
    the batched call, dead once the call returns, and a later copy, pickle or ``unstack`` of the members fails on
    it; one member at a time it is the last member's, kept on member 0's module. The attribute is set to None (its
    value is no member's), such tensors are taken out of a list or dict it holds, and no member has updated yet. A
    module's own tensor attribute (in ``before``, see :func:`_snapshot`) that the forward replaced so (a counter kept
    as a tensor, ``self.n = self.n + 1``), or with another tensor of no call (``self.t, self.u = self.u, self.t``:
    member 0's only, where each member's solo forward changes its own), is put back as it was. ``of_call``: whether
    a tensor is the call's (by default a functorch wrapper: the vmapped call's; see :func:`_made_by_call`)."""
    escaped, replaced, swapped = [], [], []
    is_wrapped = of_call or torch._C._functorch.is_functorch_wrapped_tensor
    for i, (name, module) in enumerate(model.named_modules()):
        computed = _computed(module)
        for attr, value in list(vars(module).items()):
            if attr in _NO_TENSORS:
                continue
            if isinstance(value, torch.Tensor) and is_wrapped(value):
                if attr in computed:  # (one torch's hook recomputes before each forward: no one's keeping)
                    object.__setattr__(module, attr, None)
                elif (i, attr) in before.tensors:
                    object.__setattr__(module, attr, before.tensors[(i, attr)])
                    replaced.append(f"{attr!r} of module {name or '(model)'}")
                else:
                    object.__setattr__(module, attr, None)
                    escaped.append(f"{name + '.' if name else ''}{attr}: set to None")
            elif (isinstance(value, torch.Tensor) and before.tensors.get((i, attr), value) is not value
                  and attr not in computed):
                object.__setattr__(module, attr, before.tensors[(i, attr)])
                swapped.append(f"{attr!r} of module {name or '(model)'}")
            elif isinstance(value, (list, dict)) and _drop_wrapped(value, is_wrapped):
                escaped.append(f"{name + '.' if name else ''}{attr}: taken out of it")
        if of_call is not None and (module._forward_hooks or module._forward_pre_hooks):
            _drop_kept_by_hooks(module)  # (one member at a time: the refused vmapped attempt's wrappers, not the members')
    if replaced or swapped or escaped:
        raise RuntimeError(_escaped_message(where, replaced, swapped, escaped))


def _drop_kept_by_hooks(module: nn.Module) -> None:
    """Take the tensors of a vmapped call (functorch wrappers, dead once it returned) out of what ``module``'s forward
    hooks and pre-hooks hold outside the members (see :func:`_held_outside`: a list they append to, a dict they fill,
    an object's attribute they set, set to None): after a vmapped attempt refused for one member at a time, whose
    hooks then keep each member's own, as its solo run's do."""
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
        for held in _held_outside(hook):
            if isinstance(held, (list, dict)):
                _drop_wrapped(held, is_wrapped)
                continue
            for attr, value in list(vars(held).items()):
                if isinstance(value, torch.Tensor) and is_wrapped(value):
                    setattr(held, attr, None)
                elif isinstance(value, (list, dict)):
                    _drop_wrapped(value, is_wrapped)


def _held_outside(hook: Any) -> list[Any]:
    """The objects outside the member a forward hook may keep tensors in: the lists, dicts and plain objects (no
    module, class or Python module) its function holds in its closure, defaults or ``functools.partial`` arguments,
    the globals it names, the object it is a method of, or the hook object itself; through the functions it holds
    (not the global ones it calls).

    >>> seen = []
    >>> _held_outside(lambda module, args, out: seen.append(out)) == [seen]
    True
    """
    found, todo, visited = [], [hook], set()
    while todo:
        fn = todo.pop()
        if id(fn) in visited:
            continue
        visited.add(id(fn))
        if isinstance(fn, functools.partial):
            todo.append(fn.func)
            values = [*fn.args, *fn.keywords.values()]
        elif isinstance(fn, types.MethodType):
            todo.append(fn.__func__)
            values = [fn.__self__]
        elif isinstance(fn, types.FunctionType):
            named = [fn.__globals__.get(n) for n in fn.__code__.co_names]
            values = [*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values(), *_cells(fn),
                      *(v for v in named if isinstance(v, (list, dict)))]
        else:
            values = [fn]
        for value in values:
            if isinstance(value, (functools.partial, types.MethodType, types.FunctionType)):
                todo.append(value)
            elif isinstance(value, (list, dict)) or (
                    type(getattr(value, "__dict__", None)) is dict
                    and not isinstance(value, (nn.Module, type, types.ModuleType))):
                if all(value is not other for other in found):
                    found.append(value)
    return found


def _made_by_call(model: nn.Module, before: _Snapshot) -> Callable[[torch.Tensor], bool]:
    """Whether a tensor is one the call about to run one member at a time makes (plain tensors there, not functorch
    wrappers): a wrapper (of a refused vmapped attempt), or a tensor that none of ``model``'s modules holds now as an
    attribute, in a list or dict (see :func:`_refuse_escaped`), a parameter or a buffer, and that ``before`` does
    not hold."""
    held = {id(t): t for t in before.tensors.values()}  # (the tensors kept alive with their ids: no id is reused)
    for module in model.modules():
        for attr, value in vars(module).items():
            if attr in _NO_TENSORS:
                continue
            if isinstance(value, torch.Tensor):
                held[id(value)] = value
            elif isinstance(value, (list, dict)) and len(value) <= _SCANNED:
                for item in value.values() if isinstance(value, dict) else value:
                    if isinstance(item, torch.Tensor):
                        held[id(item)] = item
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return lambda tensor: is_wrapped(tensor) or id(tensor) not in held


def _escaped_message(where: str, replaced: list[str], swapped: list[str], escaped: list[str]) -> str:
    """Why :func:`_refuse_escaped` refused the forward: the tensor attributes it ``replaced`` with a tensor of the
    transformed call, those it ``swapped`` for another tensor, the tensors of the call it kept (``escaped``)."""
    also = f"; it also kept tensors of the step's call ({'; '.join(escaped)})" if escaped else ""
    if replaced:
        return (
            f"ensemble.train_step: {where} replaced the tensor attribute(s) {', '.join(replaced)} in its forward (put "
            "back as they were): the vmapped step runs member 0's modules for every member and cannot keep a tensor "
            "the forward computes for any member (nor a buffer it changes); keep a count or flag alike for every "
            "member as a Python number, which reaches every member (self.n += 1 on an int), return a statistic of "
            "each member's own as a metric, or train the members apart"
            + (f"; it also replaced {', '.join(swapped)} with another tensor" if swapped else "") + also
        )
    if swapped:
        return (
            f"ensemble.train_step: {where} replaced the tensor attribute(s) {', '.join(swapped)} with another tensor "
            "in its forward (put back as they were): the step runs member 0's modules for every member, so only "
            "member 0's would change, where each member's solo forward changes its own; keep which tensor to use as "
            "a Python value (a flag or an index, which reaches every member) and pick the tensor in the forward "
            "without assigning it, or train the members apart" + also
        )
    return (
        f"ensemble.train_step: {where} kept tensors of the step's call (vmapped, or one member at a time) on the "
        f"model ({'; '.join(escaped)}), "
        "which belong to no member and break any later copy of the members; keep what you inspect "
        "out of the forward (return it as a metric), or train the members apart"
    )


def _refresh_rnn_weights(model: nn.Module) -> None:
    """Point each RNN's own list of its weights (``_flat_weights``, which ``functional_call`` filled with the vmapped
    call's tensors) back at its parameters, as torch's ``_init_flat_weights`` does, without its
    ``flatten_parameters`` (on CUDA that would move the weights off the members' stacked storage)."""
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module._flat_weights = [getattr(module, n) if hasattr(module, n) else None for n in module._flat_weights_names]
            module._flat_weight_refs = [weakref.ref(w) if w is not None else None for w in module._flat_weights]


#: containers larger than this are not searched for a forward's kept tensors (a vocabulary: a per-step scan of a
#: million entries cost 0.15 s); a forward appends to, or fills, small ones
_SCANNED = 1024


def _drop_wrapped(container: list | dict, is_wrapped: Callable[[torch.Tensor], bool]) -> bool:
    """Take the tensors of a vmapped call out of ``container`` (a list a forward appends to, a dict it fills), in
    place and one level deep; whether there were any. A large container is left unsearched."""
    if len(container) > _SCANNED:
        return False
    if isinstance(container, dict):
        found = [k for k, v in container.items() if isinstance(v, torch.Tensor) and is_wrapped(v)]
        for k in found:
            del container[k]
        return bool(found)
    kept = [v for v in container if not (isinstance(v, torch.Tensor) and is_wrapped(v))]
    if len(kept) == len(container):
        return False
    container[:] = kept
    return True


def _non_persistent(model: nn.Module) -> set[str]:
    """The names of ``model``'s non-persistent buffers (caches, outside its state dict)."""
    return {name for name, _ in model.named_buffers(remove_duplicate=False)} - {n for n, _ in persistent_buffers(model)}


def _structure(model: nn.Module) -> list[str]:
    """Each module's name and class, and the settings of those without tensors of their own (an activation's,
    a dropout's p: ``extra_repr``; a module with tensors may show their values there, which differ by member)."""
    return [
        f"{name or '(model)'}: {type(m).__qualname__}"
        + ("" if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)) else f"({m.extra_repr()})")
        for name, m in model.named_modules()
    ]


def stack(states: Sequence[TrainState]) -> Ensemble:
    """An :class:`Ensemble` of copies of ``states`` (which stay unchanged), parameters stacked.

    Every member needs the same architecture (its parameters and buffers of the same names,
    shapes, dtypes and devices), its modules in the same training modes and with the same settings
    (plain attributes: ``stride``, ``eps``, ...) and forward hooks as member 0's, and an optimizer
    (of any kind and settings, but not one whose step needs a closure).

    >>> import torch, loopkit
    >>> models = [torch.nn.Linear(2, 2) for _ in range(4)]
    >>> ens = stack([loopkit.TrainState.create(m, torch.optim.Adam(m.parameters())) for m in models])
    >>> len(ens), ens.params["bias"].shape
    (4, torch.Size([4, 2]))
    """
    _check_members(states)
    named = [dict(state.model.named_parameters()) for state in states]  # a tied weight appears once
    with torch.no_grad():
        params = {n: torch.stack([own[n].detach() for own in named]) for n in named[0]}
        buffers = {n: torch.stack([dict(s.model.named_buffers())[n] for s in states]) for n, _ in states[0].model.named_buffers()}
    members = []
    for k, (state, own) in enumerate(zip(states, named)):
        # the copy takes views of the stacked storage for its parameters (tied ones stay tied), and its
        # optimizer (groups and state, copied) follows them: one copy of the parameters in all
        memo = {}
        for n, p in own.items():
            memo[id(p)] = view = nn.Parameter(params[n][k], requires_grad=p.requires_grad)
            _keep_tensor_hooks(p, view)  # (its gradient hooks, which the step runs on the member's gradient)
        members.append(_fork(state, memo, optimizer_state=True))
    views = tuple(tuple(dict(m.model.named_parameters())[n] for n in params) for m in members)
    return Ensemble(tuple(members), params, buffers, members[0].model, views, _all_values(members))


def unstack(ensemble: Ensemble) -> tuple[TrainState, ...]:
    """Independent copies of the members (their own storage), e.g. to checkpoint or export one.

    >>> import torch, loopkit
    >>> models = [torch.nn.Linear(2, 1) for _ in range(2)]
    >>> ens = stack([loopkit.TrainState.create(m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in models])
    >>> solo = unstack(ens)[1]
    >>> bool(torch.equal(solo.model.weight, ens.params["weight"][1])), solo.model.weight.shape
    (True, torch.Size([1, 2]))
    """
    if not isinstance(ensemble, Ensemble):
        raise TypeError(f"ensemble.unstack: give the Ensemble that stack() made, got {type(ensemble).__qualname__}")
    ensemble.check_usable()
    return tuple(fork(member) for member in ensemble.members)


def _reached(loss: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> set[str]:
    """The names of the ``inputs`` (leaves) that ``loss``'s autograd graph reaches: those a ``loss.backward()``
    gives a gradient; it leaves the others' ``.grad`` None. Per call: a branch of the forward may use a parameter
    on some batches only. (Inside ``torch.func.grad`` the graph is that of the wrapped tensors it was given.)"""
    names = {id(tensor): name for name, tensor in inputs.items()}
    found: set[str] = set()
    seen: set[Any] = set()  # autograd nodes (one Python object per node: a shared one is walked once)
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node: the leaf a backward writes .grad of
        if leaf is not None and id(leaf) in names:
            found.add(names[id(leaf)])
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` swaps ``model``'s tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        #: the buffers its forwards replaced (``self.n = self.n + 1``), which functional_call would drop (each
        #: member's forward, when the members run one at a time)
        self.reassigned: list[str] = []

    def forward(self, batch: Any, then: Callable[[Any], Any]) -> Any:
        """``then`` of ``loss_fn(model, batch)``'s output, both inside ``functional_call`` (``model`` holds the tensors
        it swapped in)."""
        given = dict(self.model.named_buffers())  # the tensors functional_call swapped in
        out = self.loss_fn(self.model, batch)
        now = dict(self.model.named_buffers())
        self.reassigned = sorted({*self.reassigned, *(n for n in given.keys() | now.keys() if given.get(n) is not now.get(n))})
        return then(out)


@attrs.frozen(eq=False)
class EnsembleStep:
    """The step :func:`train_step` returns: ``step(ensemble, batch) -> (ensemble, metrics)``.

    Pure unless ``donated`` (the ensemble is copied first, as :func:`stack` copies); metrics
    are ``[K]`` tensors, one value per member.

    >>> import torch, loopkit
    >>> models = [torch.nn.Linear(2, 1) for _ in range(2)]
    >>> ens = stack([loopkit.TrainState.create(m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in models])
    >>> new, metrics = EnsembleStep(lambda m, b: m(b).pow(2).mean())(ens, torch.ones(3, 2))
    >>> [m.step for m in ens.members], [m.step for m in new.members]
    ([0, 0], [1, 1])
    """

    loss_fn: LossFn
    donated: bool = False
    #: whether a call of ``loss_fn`` drew random numbers (dropout, ``torch.randn_like``): vmap cannot draw from each
    #: member's own RNG, so from that call on the members' gradients are computed one member at a time, each with its
    #: own RNG installed (found on the first call that draws, when vmap refuses the draw; kept by this step object)
    draws_random: bool = attrs.field(default=False, init=False, repr=False)
    #: whether vmap could not run ``loss_fn`` (``.item()``, data-dependent control flow, an op without a batching
    #: rule): from that call on the members' gradients are computed one member at a time, as for :attr:`draws_random`
    #: (found on the first call that vmap refuses; warned once, kept by this step object)
    unbatchable: bool = attrs.field(default=False, init=False, repr=False)
    #: what the step takes instead of one loopkit.TrainState: transforms of a train step refuse it when built
    takes: ClassVar[str] = "a loopkit.ensemble.Ensemble"

    @property
    def name(self) -> str:
        return f"ensemble.train_step({getattr(self.loss_fn, '__qualname__', type(self.loss_fn).__qualname__)})"

    def __call__(self, ensemble: Ensemble, batch: Any) -> tuple[Ensemble, dict[str, torch.Tensor]]:
        if not isinstance(ensemble, Ensemble):
            raise TypeError(f"an ensemble step takes a loopkit.ensemble.Ensemble, got {type(ensemble).__qualname__}")
        ensemble.check_usable()
        if not self.donated:  # checks the members again (a mode set since; their _private values too, see stack)
            ensemble = stack(ensemble.members)
            before = _snapshot(ensemble.skeleton)
            return self._update(ensemble, before, *self._gradients(ensemble, batch, before))
        try:
            _check_unchanged(ensemble)
        except ValueError as error:
            leave_intact(error, ensemble)  # (refused before anything changed: fix the members and call again)
            raise
        versions = {n: t._version for n, t in ensemble.buffers.items()}
        before = _snapshot(ensemble.skeleton)  # (what the forward sets on member 0's modules reaches every member)
        try:  # nothing of the ensemble changes in place before its members' update, as with loopkit.donate
            grads, metrics, rngs = self._gradients(ensemble, batch, before)
        except BaseException as error:
            # the forward wrote stacked copies in place: the members' own are as they were (a cache's too)
            _settle_buffers(ensemble, [n for n, t in ensemble.buffers.items() if t._version != versions[n]])
            if state_at_error(leave_intact(error, ensemble)) is not ensemble:  # (an exception without attributes)
                _consume(ensemble)
            # else: the loss_fn's own exception, a loss, metric or buffer change refused: fix the cause and call again
            _copy_written(ensemble, before)  # what the forward set stays set, as in a solo run (and members agree)
            raise
        try:
            new = self._update(ensemble, before, grads, metrics, rngs)
        except BaseException as error:
            # the members' parameters and optimizer states change in place from their first update on (or a
            # post-accumulate-grad hook that moved one): used up; an error before that left it whole (see _give_grads)
            if state_at_error(error) is not ensemble:
                _consume(ensemble)
            raise
        _consume(ensemble)
        return new

    def _gradients(
        self, ensemble: Ensemble, batch: Any, before: _Snapshot,
    ) -> tuple[_Grads, dict[str, torch.Tensor], _RNGs]:
        """Every member's gradients and metrics, and the checks of the loss and buffers: nothing of the ensemble
        changes in place here (but for a stacked buffer that a forward changes, which is refused, a cache it fills,
        which reaches the members' own at the end, see :func:`_settle_buffers`, and a plain value the forward sets on
        member 0's modules, see :func:`_copy_written`). ``before``: member 0's modules' plain values
        before the call (see :func:`_snapshot`), from which each member's forward starts when they run one at a time.

        The gradients come as each member's list (see :func:`_members_grads`: its parameters' gradient hooks run),
        vmapped with the RNGs as None (nothing drew). A loss_fn that draws random numbers runs one member at a time
        (see :func:`_one_member_at_a_time`), and with the gradients come each member's advanced RNG. Every member's
        loss_fn returning None (skipping the batch): the gradients None."""
        where = f"loss_fn {getattr(self.loss_fn, '__qualname__', type(self.loss_fn).__qualname__)}"
        wrapper = _LossModule(ensemble.skeleton, self.loss_fn)

        def member_loss(
            trained: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor], differentiate: bool = False,
        ) -> Any:
            """The loss of ``trained`` and ``fixed`` (vmap's batched tensors, or one member's) and the metrics; with
            ``differentiate`` (one member at a time: ``trained`` are leaves) its gradients of ``trained`` instead of
            the loss (see :func:`_member_gradients`), computed inside the ``functional_call``: the model's code that
            the backward runs (activation checkpointing's recompute) reads the member's tensors, not member 0's."""
            tensors = {f"model.{n}": t for n, t in trained.items()} | {f"model.{n}": t for n, t in fixed.items()}
            then = functools.partial(finish, trained=trained, differentiate=differentiate)
            return torch.func.functional_call(wrapper, tensors, (batch, then))

        def finish(out: Any, trained: dict[str, torch.Tensor], differentiate: bool) -> Any:
            if out is None:  # the loss_fn skipped the batch: vmapped, for every member (it ran once for all)
                if differentiate:
                    return None, None  # (one member at a time: each member's own, see _one_member_at_a_time)
                raise _Skipped
            loss, aux = _split_loss(out, self.loss_fn)
            metrics = {"loss": loss.detach(), **{k: v.detach() for k, v in aux.items()}}
            if differentiate:  # (allow_unused: a parameter the loss does not reach gets None, as in a solo backward)
                grads = torch.autograd.grad(loss, list(trained.values()), allow_unused=True)
                return {n: g for n, g in zip(trained, grads) if g is not None}, metrics
            reached.append(_reached(loss, trained))
            return loss, metrics

        trainable = [p.requires_grad for p in ensemble.views[0]]
        names = list(ensemble.params)
        trained = {n: ensemble.params[n] for n, t in zip(names, trainable) if t}
        fixed = {n: ensemble.params[n] for n, t in zip(names, trainable) if not t} | dict(ensemble.buffers)
        reached: list[set[str]] = []  # the parameters each call's loss reaches (vmap traces member_loss once)
        versions = {n: t._version for n, t in ensemble.buffers.items()}  # a buffer changed in place bumps its own
        rngs = of_call = None
        try:
            if not (self.draws_random or self.unbatchable):
                vmapped = torch.func.vmap(torch.func.grad(member_loss, has_aux=True), randomness="error")
                try:
                    grads, metrics = vmapped(trained, fixed)
                except _Skipped:
                    grads, metrics = None, {}
                except RuntimeError as e:
                    # (vmap refused the op before running it: no RNG advanced, and no member changed; a stacked
                    # buffer the forward wrote before is found below, as after any call)
                    if _drew_random(e):
                        object.__setattr__(self, "draws_random", True)
                    elif _cannot_batch(e):
                        object.__setattr__(self, "unbatchable", True)
                        _warn_unbatchable(where, e, len(ensemble))
                    else:
                        raise
            if self.draws_random or self.unbatchable:
                of_call = _made_by_call(ensemble.skeleton, before)
                grads, metrics, rngs = _one_member_at_a_time(
                    ensemble, member_loss, trained, fixed, where, before)
        finally:  # (a loss_fn that raised left them too: the ensemble stays usable)
            _refresh_rnn_weights(ensemble.skeleton)
        _refuse_escaped(ensemble.skeleton, where, before, of_call)
        # a buffer the forward changed (a counter's add_, a running statistic) changed the stacked copy only, or was
        # replaced inside functional_call: the members' buffers would silently keep their old values
        # (a non-persistent buffer is a cache the forward may fill or grow: not state, so not checked)
        caches = _non_persistent(ensemble.skeleton)
        in_place = [n for n, t in ensemble.buffers.items() if t._version != versions[n]]
        written = sorted({*in_place, *wrapper.reassigned} - caches)
        if written:
            raise RuntimeError(
                f"ensemble.train_step: {where} changed the buffer(s) {', '.join(repr(n) for n in written)} in its "
                "forward, which a vmapped ensemble step cannot keep for each member (the change would be lost); "
                "leave buffers unchanged in the forward, or train the members apart"
            )
        _settle_buffers(ensemble, in_place)  # (caches filled in place: to the members' own)
        if grads is None:  # every member's loss_fn skipped the batch
            return None, metrics, rngs
        # torch.func.grad gives a parameter the loss does not reach a zero gradient, where a solo backward leaves
        # its .grad None (the optimizer skips it: no weight decay, momentum or Adam state): drop those
        if rngs is None:
            grads = {n: g for n, g in grads.items() if n in reached[-1]}
        # (one member at a time: each member's own, those its loss reached)
        return _members_grads(ensemble, grads, rngs), metrics, rngs

    def _update(
        self, ensemble: Ensemble, before: _Snapshot, grads: _Grads, metrics: dict[str, torch.Tensor],
        rngs: _RNGs = None,
    ) -> tuple[Ensemble, dict[str, torch.Tensor]]:
        """Each member's optimizer (and scheduler) step, in place (and the plain values the forward set since
        ``before``, see :func:`_copy_written`); ``grads`` and ``rngs`` as :meth:`_gradients` gives them. ``grads``
        None: every member's ``loss_fn`` skipped the batch, and each member is as :func:`loopkit.train_step` leaves a
        skipping state: no update, ``step`` as it was, ``batch_index`` one on, its RNG as its draws left it; no
        metrics."""
        _copy_written(ensemble, before)
        if grads is None:
            skipped = tuple(
                replace(member, batch_index=member.batch_index + 1, rng=member.rng if rngs is None else rngs[k])
                for k, member in enumerate(ensemble.members))
            return Ensemble(skipped, ensemble.params, ensemble.buffers, ensemble.skeleton, ensemble.views,
                            ensemble._values), {}
        _give_grads(ensemble, grads)  # every member's, before any member updates
        members = []
        for k, member in enumerate(ensemble.members):
            member.optimizer.step()  # type: ignore[union-attr]
            if member.scheduler is not None:
                member.scheduler.step()
            member.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            if rngs is None:
                members.append(replace(member, step=member.step + 1, batch_index=member.batch_index + 1))
            else:  # (its RNG advanced by its own draws, as its solo step's state's does)
                members.append(replace(member, step=member.step + 1, batch_index=member.batch_index + 1, rng=rngs[k]))
        new = Ensemble(tuple(members), ensemble.params, ensemble.buffers, ensemble.skeleton, ensemble.views,
                       ensemble._values)  # (the members' values are the same objects: their keys hold)
        return new, metrics


def _members_grads(ensemble: Ensemble, grads: Any, rngs: _RNGs) -> list[list[torch.Tensor | None]]:
    """Each member's gradients, in the order of its ``views`` (None: a frozen parameter, or one its loss did not
    reach), from the stacked ``grads`` (vmapped: ``rngs`` None) or each member's own dict, with its parameters'
    gradient hooks run on them (see :func:`_hooked`): before any member updates, so that a hook's error (a check
    that the gradients are finite) leaves the ensemble as it was, as a solo step's backward leaves its state."""
    names = list(ensemble.params)
    if rngs is None:
        stacked = [grads.get(name) for name in names]
        return [[None if grad is None else _hooked(view, grad[k]) for view, grad in zip(views, stacked)]
                for k, views in enumerate(ensemble.views)]
    return [[_hooked(view, own[name]) if name in own else None for view, name in zip(views, names)]
            for own, views in zip(grads, ensemble.views)]


def _hooked(view: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
    """``grad``, a member's gradient of its parameter ``view``, after the parameter's gradient hooks
    (``register_hook``), as a solo backward runs them before it accumulates the gradient: in order, one that returns a
    tensor replacing it (clipping by value: ``lambda g: g.clamp(-c, c)``), without grad mode. (The step's gradients
    come from ``torch.func`` or ``torch.autograd.grad`` of stacked tensors or fresh leaves, which run no hook of the
    member's parameters.) Without hooks: one read.

    >>> p = nn.Parameter(torch.zeros(2))
    >>> _ = p.register_hook(lambda g: g.clamp(-1.0, 1.0))
    >>> _hooked(p, torch.tensor([-3.0, 0.5]))
    tensor([-1.0000,  0.5000])
    """
    hooks = view._backward_hooks
    if hooks:
        with torch.no_grad():
            for hook in tuple(hooks.values()):
                replaced = hook(grad)
                if replaced is not None:
                    grad = replaced
    return grad


def _give_grads(ensemble: Ensemble, grads: list[list[torch.Tensor | None]]) -> None:
    """Give every member's parameters their gradients ``grads`` (as :func:`_members_grads` gives them, hooked) and
    run their post-accumulate-grad hooks (see :func:`_accumulate`), member by member, before any member's optimizer
    steps: a hook's error (a check that the gradients are finite) finds no member updated. It gives the gradients
    back as the call found them and leaves ``ensemble`` whole (:func:`loopkit.state_at_error` returns it), unless a
    hook that ran changed a parameter in place (an optimizer stepping in the backward): the error then names no
    state, and the donated step uses the ensemble up, as a solo step's backward error under such a hook uses its
    state up. (A solo step uses its state up at any post-accumulate-grad hook's error, since it cannot tell whether
    a hook moved a parameter; here the stacked parameters' version counters tell, which every member's in-place
    change bumps.)

    >>> import loopkit
    >>> def member(seed):
    ...     torch.manual_seed(seed); m = nn.Linear(2, 1)
    ...     return loopkit.TrainState.create(m, torch.optim.SGD(m.parameters(), lr=0.1))
    >>> ens = stack([member(0), member(1)])
    >>> def refuse(p):
    ...     raise FloatingPointError("not finite")
    >>> _ = ens.members[1].model.weight.register_post_accumulate_grad_hook(refuse)
    >>> try:
    ...     _give_grads(ens, [[torch.ones(1, 2), torch.ones(1)]] * 2)
    ... except FloatingPointError as error:
    ...     print(loopkit.state_at_error(error) is ens, ens.members[0].model.weight.grad)
    True None
    """
    held = [[view.grad for view in views] for views in ensemble.views]
    versions = [t._version for t in ensemble.params.values()]
    try:
        for views, own in zip(ensemble.views, grads):
            for view, grad in zip(views, own):
                if grad is not None:
                    _accumulate(view, grad)
    except BaseException as error:
        if any(t._version != v for t, v in zip(ensemble.params.values(), versions)):
            leave_intact(error, None)  # a hook moved a parameter: giving the gradients back would not undo it
            raise
        for views, was in zip(ensemble.views, held):
            for view, grad in zip(views, was):
                view.grad = grad
        leave_intact(error, ensemble)
        raise


def _accumulate(view: nn.Parameter, grad: torch.Tensor) -> None:
    """Set ``view.grad`` (None) to ``grad`` (hooked already, see :func:`_hooked`) and run the parameter's
    post-accumulate-grad hooks (``register_post_accumulate_grad_hook``) on it, as a solo backward does after it
    accumulates the gradient, without grad mode. Without hooks: a write and a read."""
    view.grad = grad
    hooks = view._post_accumulate_grad_hooks
    if hooks:
        with torch.no_grad():
            for hook in tuple(hooks.values()):
                hook(view)


class _Skipped(Exception):
    """The vmapped ``loss_fn`` returned None: it skipped the batch, for every member (one call for all)."""


#: the gradients of :meth:`EnsembleStep._gradients`: each member's, a list in the order of its views (see
#: :func:`_members_grads`); None when every member's ``loss_fn`` skipped the batch
_Grads = Any
#: each member's advanced RNG (one member at a time), or None (vmapped: nothing drew)
_RNGs = Any


def _drew_random(error: RuntimeError) -> bool:
    """Whether vmap refused ``error``'s call for drawing random numbers (``randomness="error"``; RReLU's noise has no
    vmap rule at all)."""
    text = str(error)
    return "randomness" in text or "rrelu" in text


#: the beginnings of vmap's refusals of what runs unbatched (one member at a time) as it does solo: ``.item()`` and
#: data-dependent control flow ("vmap: It looks like you're ..."), ops whose output shape depends on the data
#: (``nonzero``, boolean-mask indexing), ops without a batching rule (an ``out=`` op: ``spectral_norm``'s power method),
#: saved tensor hooks, which ``torch.func.grad`` does not support (activation checkpointing,
#: ``torch.utils.checkpoint`` with ``use_reentrant=False``), a custom ``torch.autograd.Function`` without
#: ``setup_context`` (its ``forward`` takes ``ctx``), which torch.func transforms refuse
_UNBATCHABLE = (
    "vmap: It looks like you're", "vmap: We do not support batching operators", "Batching rule not implemented",
    "torch.func.{grad, vjp, jacrev, hessian} don't yet support saved tensor hooks",
    "In order to use an autograd.Function with functorch transforms",
)


def _cannot_batch(error: RuntimeError) -> bool:
    """Whether vmap refused ``error``'s call for what it cannot batch (see :data:`_UNBATCHABLE`), not the loss_fn's
    own error (a shape error, which runs one member at a time no better)."""
    return str(error).startswith(_UNBATCHABLE)


def _warn_unbatchable(where: str, error: RuntimeError, k: int) -> None:
    """Say once (per step object: it remembers) that the step now runs one member at a time, and why."""
    warnings.warn(
        f"loopkit.ensemble.train_step: {where} cannot run under vmap ({_short(str(error).split('. ')[0], 240)}); "
        "the members' gradients are computed one member at a time from now on, as each member's solo step computes "
        f"them ({k} forwards and backwards a step instead of one batched one)",
        RuntimeWarning, stacklevel=4,
    )


def _one_member_at_a_time(
    ensemble: Ensemble, member_loss: Callable[..., Any], trained: Mapping[str, torch.Tensor],
    fixed: Mapping[str, torch.Tensor], where: str, before: _Snapshot,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor], list[Mapping[str, torch.Tensor]]]:
    """Each member's gradients (those its loss reached), the metrics stacked (``[K]``), and each member's advanced RNG
    (the gradients None and no metrics when every member's ``loss_fn`` returned None, skipping the batch; a skip by
    some members only is refused):
    the gradients of ``member_loss`` on member ``k``'s slice of ``trained`` and ``fixed`` (see
    :func:`_member_gradients`), with member ``k``'s RNG installed as torch's default generators around it, as a solo
    :func:`loopkit.train_step` installs its state's (so its dropout draws its solo run's masks). A member whose state
    draws from the global RNG (``rng`` empty) draws from it, members in order. Nothing of the ensemble changes here
    (but for the stacked caches a forward fills, each member's slice, see :func:`_settle_buffers`, and when member
    ``k``'s call raises, see :func:`_spread_caches`): the RNGs come back, the caller's global RNG is put back, also
    when ``loss_fn`` raises.

    Each member's forward starts from ``before``, member 0's modules' plain values (dicts of them too) and tensor
    attributes before this call (see :func:`_snapshot`), as its solo forward would, not from what a failed vmapped
    attempt or the member before set (a call counter, a list a forward appends to, a dict it counts in); a plain value
    the members' forwards set otherwise (a ``_private`` one too, a dict) is refused (see :func:`_settings_diverged`),
    the modules' values put back first."""
    first = next(iter(ensemble.params.values()))
    cuda_index = _cuda_index(first.device) if first.is_cuda else None
    grads, rows, rngs, skipped = [], [], [], []
    written: list[dict[str, Any]] | None = None  # the settings member 0's forward left (each member's must match)
    caches = [ensemble.buffers[n] for n in _non_persistent(ensemble.skeleton)]
    for k, member in enumerate(ensemble.members):
        _restore_settings(ensemble.skeleton, before)
        scope = RNGScope(member.rng, cuda_index, member.seed)
        versions = [t._version for t in caches]
        try:
            own, row = _member_gradients(
                member_loss, {n: t[k] for n, t in trained.items()}, {n: t[k] for n, t in fixed.items()})
        except BaseException:
            scope.discard()
            _spread_caches(caches, versions, k)
            raise
        rngs.append(scope.close())
        after = _snapshot(ensemble.skeleton).values
        if written is None:
            written = after
        elif not _same_settings(after, written):
            _restore_settings(ensemble.skeleton, before)
            raise ValueError(_settings_diverged(ensemble.skeleton, where, k, written, after))
        if row is None:  # its loss_fn skipped the batch
            skipped.append(k)
            continue
        grads.append(own)
        if rows and row.keys() != rows[0].keys():
            raise ValueError(
                f"ensemble.train_step: {where} returned the metrics {sorted(row)} for member {k} and {sorted(rows[0])} "
                "for member 0; every member's call must return the same metrics (they are stacked, one value each)"
            )
        rows.append(row)
    if skipped:
        if rows:  # (each member has one step and one batch_index: the members update together, or skip together)
            trains = [k for k in range(len(ensemble.members)) if k not in skipped]
            raise ValueError(
                f"ensemble.train_step: {where} returned None (skip the batch) for member(s) {skipped} and a loss for "
                f"member(s) {trains}; an ensemble step updates every member or none: skip a batch for every member "
                "(decide from the batch alone, not from a member's outputs), or train the members apart"
            )
        return None, {}, rngs  # every member skipped the batch
    metrics = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    return grads, metrics, rngs


def _spread_caches(caches: Sequence[torch.Tensor], versions: Sequence[int], k: int) -> None:
    """Give the members after member ``k``, whose forwards did not run, member ``k``'s slice of each stacked cache
    (a non-persistent buffer) that its forward filled in place (``versions``: the caches' before it) before its call
    raised, as they take the plain values it set, a flag saying the cache is filled (see :func:`_copy_written`)."""
    with torch.no_grad():
        for cache, version in zip(caches, versions):
            if cache._version != version:
                cache[k + 1:] = cache[k]


def _member_gradients(
    member_loss: Callable[..., Any], trained: Mapping[str, torch.Tensor], fixed: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One member's gradients (of the ``trained`` tensors its loss reaches) and metrics: ``member_loss`` on leaves
    that share ``trained``'s storage, differentiated by ``torch.autograd.grad``, the solo step's autograd. Not
    ``torch.func.grad``: under it torch decomposes dropout into other ops, which fill a non-contiguous input's mask
    (a transposed activation, attention's) in another order than the solo run's dropout draws it. The backward runs
    while the model holds the member's tensors (inside ``member_loss``'s ``functional_call``): activation
    checkpointing recomputes its forward in the backward, with the member's weights. No walk of the graph for the
    parameters the loss reaches (see :func:`_reached`): those it does not reach get no gradient (``allow_unused``)."""
    leaves = {n: t.detach().requires_grad_() for n, t in trained.items()}
    with torch.enable_grad():
        return member_loss(leaves, fixed, differentiate=True)


def _same_settings(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Whether two :func:`_snapshot` lists are alike, value by value as :func:`_same` compares (NaN alike)."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def _settings_diverged(model: nn.Module, where: str, k: int, first: list[dict[str, Any]], own: list[dict[str, Any]]) -> str:
    """Why members cannot run one at a time: member ``k``'s forward set a module's setting otherwise than member 0's
    (a value read from its own outputs, ``.item()``), which every member shares (the step runs member 0's modules)."""
    for (name, _), a, b in zip(model.named_modules(), first, own):
        for attr in sorted(a.keys() | b.keys()):
            if attr not in a or attr not in b or not _same(a[attr], b[attr]):
                return (f"ensemble.train_step: {where} set {attr!r} of module {name or '(model)'} to "
                        f"{_short(b.get(attr, '<not set>'))} for member {k} and {_short(a.get(attr, '<not set>'))} for "
                        "member 0; the step runs member 0's modules for every member, which cannot keep a value of "
                        "each member's own (nor can a buffer the forward changes): return such a value as a metric (each member's "
                        "own), or train the members apart")
    return f"ensemble.train_step: {where} set the modules' settings otherwise for member {k} than for member 0"


def _restore_settings(model: nn.Module, before: _Snapshot) -> None:
    """Give ``model``'s modules the plain values of ``before`` (see :func:`_snapshot`; copies of them) and their
    tensor attributes, and remove the plain values they lack: undo what a forward set (modules aligned: the same
    structure)."""
    modules = list(model.modules())
    for module, own in zip(modules, before.values):
        now = _plain_values(module)
        if now == own:  # (the common case)
            continue
        for attr in now.keys() - own.keys():
            delattr(module, attr)
        for attr, value in own.items():
            if attr not in now or not _same(now[attr], value):
                setattr(module, attr, _copy_plain(value))
    for (i, attr), tensor in before.tensors.items():
        if vars(modules[i]).get(attr) is not tensor:
            object.__setattr__(modules[i], attr, tensor)


def _settle_buffers(ensemble: Ensemble, names: Sequence[str]) -> None:
    """After a call whose forward wrote the stacked buffers ``names`` (``ensemble.buffers``) in place: the step runs
    member 0's modules on the stacked copies, so the members' own buffers are as they were. A cache (a non-persistent
    buffer, see :func:`_non_persistent`) reaches each member's own buffer, as each member's solo forward fills its own
    (a plain flag set beside it reaches every member, see :func:`_copy_written`); any other buffer (a change refused)
    is stacked again from the members' own."""
    if not names:
        return
    caches = _non_persistent(ensemble.skeleton)
    owns = [dict(member.model.named_buffers()) for member in ensemble.members]
    with torch.no_grad():
        for name in names:
            if name in caches:
                for k, own in enumerate(owns):
                    own[name].copy_(ensemble.buffers[name][k])
            else:
                ensemble.buffers[name].copy_(torch.stack([own[name] for own in owns]))


def _consume(ensemble: Ensemble) -> None:
    object.__setattr__(ensemble, "_consumed", True)
    for member in ensemble.members:
        member.mark_consumed()


def train_step(loss_fn: LossFn, *, donated: bool = False) -> EnsembleStep:
    """One vmapped training step for every member: ``loss_fn(model, batch)`` as in :func:`loopkit.train_step`.

    A ``loss_fn`` that returns None skips the batch for every member, as :func:`loopkit.train_step` skips it (no
    update, ``step`` as it was, ``batch_index`` one on, no metrics); one that skips for some members only (one member
    at a time, deciding from a member's own outputs) is refused before any member updates.

    ``donated=True`` updates the given ensemble in place (using it again raises
    :class:`loopkit.DonatedStateError`), as :func:`loopkit.donate` does for one state: an error
    raised before the members' update (the ``loss_fn``'s own exception, a loss or metric the step
    refuses, a forward's buffer change refused: only the stacked copy of the buffers changed, which
    is stacked again from the members'; a cache the forward filled stays filled, in each member's own
    buffer, as after a solo step's error; a gradient hook's error, every member's hooks running before any member
    updates, see :func:`_give_grads`) leaves the given ensemble and its members usable
    (:func:`loopkit.state_at_error` returns it); past the first in-place change of the members (their
    update, or a post-accumulate-grad hook that changed a parameter in place) they are used up.

    >>> import torch, loopkit
    >>> models = [torch.nn.Linear(2, 1) for _ in range(3)]
    >>> ens = stack([loopkit.TrainState.create(m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in models])
    >>> ens, metrics = train_step(lambda m, b: m(b).pow(2).mean(), donated=True)(ens, torch.ones(4, 2))
    >>> metrics["loss"].shape
    torch.Size([3])
    """
    if not callable(loss_fn):
        raise TypeError(f"ensemble.train_step: loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__qualname__}")
    check_takes_model_and_batch(loss_fn, "ensemble.train_step: loss_fn")
    if not isinstance(donated, bool):
        raise TypeError(f"ensemble.train_step: donated must be True or False, got {donated!r}")
    return EnsembleStep(loss_fn, donated=donated)
