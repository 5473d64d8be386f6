"""Debugging aids: check that a step keeps loopkit's purity contract, naming what breaks it.

:func:`check_purity` calls a step twice on one state and batch, and checks what the contract
promises: the given state is unchanged (parameters, buffers, gradients, the tensors the modules
keep as attributes and of the modules they keep outside the model's tree, optimizer and scheduler state,
counters, RNG, extras), so is the given batch (its tensors, numpy arrays, lists, dicts and plain values),
torch's global RNG is as it was, and the two calls agree bit for bit (new states and metrics). It
is meant for steps written by hand (a plain function with two optimizers, a closed-form solve) and
for a pipeline of transforms before a long run; the first difference is named by its path in
``state.state_dict()`` (or in the batch: ``batch[0]``).

>>> import torch, loopkit
>>> model = torch.nn.Linear(2, 1)
>>> state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
>>> batch = torch.ones(4, 2)
>>> new, metrics = check_purity(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), state, batch)
>>> def sloppy(state, batch):  # updates the caller's parameters in place
...     with torch.no_grad():
...         state.model.weight.sub_(0.1)
...     return state.evolve(step=state.step + 1), {}
>>> check_purity(sloppy, state, batch)
Traceback (most recent call last):
...
loopkit.errors.ImpurityError: step sloppy changed the state it was given: model.weight differs (max abs difference 0.1)
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np
import torch

from loopkit.errors import ImpurityError
from loopkit.state import (
    TrainState, attribute_tensors, module_settings, not_a_state, refuse_copy_if_sharded, shared_modules,
)
from loopkit.steps import Metrics, as_step
from loopkit.tree import named_nodes, sequence_like

__all__ = ["check_purity"]


class _Uninitialized:
    """What a snapshot holds for a lazy module's parameter or buffer before its first forward: no values to compare."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Uninitialized)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "uninitialized (a lazy module's, before its first forward)"


def _copy(tree: Any) -> Any:
    """``tree`` with every tensor copied (detached), mappings as dicts, a lazy module's uninitialized parameter or
    buffer as an :class:`_Uninitialized` (it has no values to copy)."""
    if isinstance(tree, torch.Tensor):
        if isinstance(tree, torch.nn.parameter.UninitializedTensorMixin):
            return _Uninitialized()
        return tree.detach().clone()
    if isinstance(tree, Mapping):
        return {k: _copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return sequence_like(tree, [_copy(v) for v in tree])
    return tree


def _describe(value: Any) -> str:
    """A snapshot's leaf as an error names it: a tensor or numpy array by dtype and shape, anything else by its repr."""
    if isinstance(value, torch.Tensor):
        return f"a tensor {value.dtype}{list(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"a numpy array {value.dtype}{list(value.shape)}"
    return repr(value)


def _difference(a: Any, b: Any, path: str) -> str | None:
    """The first difference between two snapshots, as ``"<path> <what>"``, or None when equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path} changed from {_describe(a)} to {_describe(b)}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path} changed from {a.dtype}{list(a.shape)} to {b.dtype}{list(b.shape)}"
        if a.layout != b.layout:
            return f"{path} changed layout from {a.layout} to {b.layout}"
        if a.layout != torch.strided:  # a sparse gradient (nn.Embedding(sparse=True)): compare the values it stands for
            a, b = a.to_dense(), b.to_dense()
        if a.is_floating_point() or a.is_complex():
            same = torch.equal(a, b) or bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))
            if not same:
                wide = torch.complex128 if a.is_complex() else torch.float64  # (a complex one's imaginary part too)
                gap = (a.to(wide) - b.to(wide)).abs().nan_to_num(nan=float("inf")).max().item()
                return f"{path} differs (max abs difference {gap:.3g})"
        elif not torch.equal(a, b):
            return f"{path} differs"
        return None
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return _array_difference(a, b, path)
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{path + '.' if path else ''}{key} is {'new' if key not in a else 'gone'}"
            found = _difference(a[key], b[key], f"{path + '.' if path else ''}{key}")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path} changed length from {len(a)} to {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _difference(x, y, f"{path}.{i}")
            if found:
                return found
        return None
    if a != b and not (a != a and b != b):  # NaN equals NaN here
        return f"{path} changed from {a!r} to {b!r}"
    return None


def _array_difference(a: Any, b: Any, path: str) -> str | None:
    """:func:`_difference` of two numpy arrays (a batch's): dtype, shape, then values. An array of objects is compared
    element by element as :func:`_difference` compares values (NaN equals NaN; a ragged one's arrays as arrays); any
    other by its bytes (NaN equals NaN, NaT equals NaT, as bits).

    >>> _array_difference(np.array(["2020-01-01", "NaT"], dtype="datetime64[D]"), np.array(["2020-01-01", "NaT"],
    ...                   dtype="datetime64[D]"), "meta")
    >>> _array_difference(np.array([np.zeros(1), "a.jpg", np.nan], dtype=object),
    ...                   np.array([np.zeros(1), "a.jpg", np.nan], dtype=object), "meta")
    >>> _array_difference(np.array(["a", np.nan], dtype=object), np.array(["b", np.nan], dtype=object), "meta")
    "meta[0] changed from 'a' to 'b'"
    """
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return f"{path} changed from {_describe(a)} to {_describe(b)}"
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{path} changed from {a.dtype}{list(a.shape)} to {b.dtype}{list(b.shape)}"
    if a.dtype.hasobject:
        for index in np.ndindex(a.shape):
            found = _difference(a[index], b[index], f"{path}[{', '.join(map(str, index))}]")
            if found:
                return found
        return None
    if a.tobytes() == b.tobytes():
        return None
    if a.dtype.kind not in "biufc":  # (strings, dates, records: no distance)
        return f"{path} differs"
    wide = np.complex128 if a.dtype.kind == "c" else np.float64
    gap = np.nan_to_num(np.abs(a.astype(wide) - b.astype(wide)), nan=np.inf).max()
    return f"{path} differs (max abs difference {gap:.3g})"


#: the hooks a module and a parameter hold (torch's attributes): a step that adds one changes the state
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")
#: and an optimizer's
_OPTIMIZER_HOOKS = (
    "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
)


def _module_facts(model: torch.nn.Module) -> dict[str, Any]:
    """What the state dict does not hold about the modules: class, training mode, plain settings, hooks
    (the modules' and the parameters' own gradient hooks), which parameters take gradients (each by the
    module's name; the root is ``model``)."""
    facts: dict[str, Any] = {}
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        facts[name or "<root>"] = {
            "class": type(module).__qualname__,
            "training": module.training,
            "settings": _copy(module_settings(module)),  # (a list setting changed in place is seen too)
            "hooks": [len(getattr(module, h, None) or ()) for h in _MODULE_HOOKS],
            "gradient hooks": {n: [len(getattr(p, h, None) or ()) for h in _TENSOR_HOOKS] for n, p in own.items()},
            "requires_grad": {n: p.requires_grad for n, p in own.items()},
        }
    return facts


def _trained_parameters(state: TrainState) -> list[list[str | None]]:
    """For each of the optimizer's groups, the model's name of each parameter it updates (None: a tensor
    the model does not hold, such as one a step put in the model's place, which the optimizer no longer trains)."""
    if state.optimizer is None:
        return []
    names = {id(p): n for n, p in state.model.named_parameters(remove_duplicate=False)}
    return [[names.get(id(p)) for p in group["params"]] for group in state.optimizer.param_groups]


def _optimizer_facts(optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """What the optimizer's state dict does not hold: its defaults (which a group added later takes) and hooks."""
    if optimizer is None:
        return {}
    return {"defaults": _copy(dict(optimizer.defaults)),
            "hooks": [len(getattr(optimizer, h, None) or ()) for h in _OPTIMIZER_HOOKS]}


def _module_tensors(module: torch.nn.Module) -> dict[str, Any]:
    """A copy of a module's parameters, buffers and gradients (``<parameter>.grad``), by name."""
    parameters = dict(module.named_parameters())
    grads = {f"{name}.grad": p.grad for name, p in parameters.items() if p.grad is not None}
    return _copy({**parameters, **dict(module.named_buffers()), **grads})


def _full_snapshot(state: TrainState) -> dict[str, Any]:
    """A copy of all the state a step may change: the state dict, every buffer (non-persistent ones too, which a
    state dict leaves out), the tensors the modules' own attributes hold (which ``fork`` copies too), the
    parameters, buffers and gradients of the modules they keep outside the model's tree (which ``fork`` shares:
    a step that changes them changes the caller's), the modules' and optimizer's facts."""
    buffers = _copy(dict(state.model.named_buffers()))
    return {
        **_copy(state.state_dict()), "buffers": buffers, "attributes": _copy(attribute_tensors(state.model)),
        "shared modules": {name: _module_tensors(module) for name, module in shared_modules(state.model).items()},
        "modules": _module_facts(state.model), "optimizer parameters": _trained_parameters(state),
        "optimizer facts": _optimizer_facts(state.optimizer),
    }


#: what a change found under ``shared modules`` means, for the end of the error
_SHARED_HINT = (
    " (a module the model keeps outside its registered tree, in a plain list or dict attribute: a pure step's copy "
    "shares it, so a forward through it in train mode changes the caller's; register it with nn.ModuleList or "
    "nn.ModuleDict to have it copied, or keep it in eval mode and frozen)"
)


class _Layout:
    """What a batch snapshot holds for a container: its type and size, and a mapping's keys (a list the step appends
    to, a key it adds, is seen)."""

    __slots__ = ("kind", "keys", "size")

    def __init__(self, container: Any) -> None:
        self.kind = type(container)
        self.keys = list(container) if isinstance(container, Mapping) else None
        self.size = len(container) if isinstance(container, (Mapping, list, tuple)) else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Layout) and (self.kind, self.size, self.keys) == (other.kind, other.size, other.keys)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if self.keys is not None:
            return f"a {self.kind.__qualname__} with keys {self.keys!r}"
        if self.size is not None:
            return f"a {self.kind.__qualname__} of {self.size} item{'' if self.size == 1 else 's'}"
        return f"a {self.kind.__qualname__}"


class _Same:
    """What a batch snapshot holds for an object it does not copy (one of one's own, an image): the object itself,
    equal only to itself (a step that puts another in its place is seen)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"a {type(self.value).__qualname__} (id {id(self.value):#x})"


#: a batch's leaves that cannot change in place: kept as they are, compared by value
_PLAIN = (str, bytes, numbers.Number, np.generic, type(None))


def _batch_entry(node: Any) -> Any:
    """A batch snapshot's copy of ``node``: a tensor or numpy array copied, a container by its :class:`_Layout`, a
    plain value or a set (copied) by value, anything else as :class:`_Same`."""
    if isinstance(node, torch.Tensor):
        return _copy(node)
    if isinstance(node, np.ndarray):
        return node.copy()
    if isinstance(node, (Mapping, list, tuple)) or (dataclasses.is_dataclass(node) and not isinstance(node, type)):
        return _Layout(node)
    if isinstance(node, _PLAIN):
        return node
    if isinstance(node, (set, frozenset)):
        return set(node)
    return _Same(node)


def _batch_snapshot(batch: Any) -> dict[str, Any]:
    """A copy of what ``batch`` holds, by where it sits (``batch[0]``, ``batch['x']``: through mappings, lists, tuples
    and dataclasses, as :func:`loopkit.tree.named_nodes` names it): each tensor and numpy array, each container's
    type, size and keys, each plain value.

    >>> snapshot = _batch_snapshot({"x": np.zeros(2), "seen": []})
    >>> {name: type(entry).__name__ for name, entry in snapshot.items()}
    {'batch': '_Layout', "batch['x']": 'ndarray', "batch['seen']": '_Layout'}
    """
    return {name: _batch_entry(node) for name, node in named_nodes(batch)}


def _name(step: Any) -> str:
    applied = getattr(step, "applied", None)
    if applied:
        return "(" + ", ".join(applied) + ")"
    return getattr(step, "__qualname__", None) or type(step).__qualname__


#: the whole-step transforms whose calls act outside the state (write the run's files, use up a schedule the
#: run's own calls are counted against): left out of check_purity's calls
_WRITERS = ("with_checkpointing", "with_logging", "with_profiler")


def _without_writers(step: Any) -> Any:
    """``step`` without its :data:`_WRITERS` layers, at any depth of its wrappers (each of which has an ``inner``)."""
    inner = getattr(step, "inner", None)
    # (only a wrapper attrs made, with an inner field, can be rebuilt: one of another kind is called as it is)
    if inner is None or "__attrs_attrs__" not in type(step).__dict__ or "inner" not in attrs.fields_dict(type(step)):
        return step
    kept = _without_writers(inner)
    if getattr(step, "name", None) in _WRITERS:
        return kept
    return step if kept is inner else attrs.evolve(step, inner=kept)


def check_purity(
    step: Callable[[TrainState, Any], tuple[TrainState, Metrics]],
    state: TrainState,
    batch: Any,
    *,
    deterministic: bool = True,
) -> tuple[TrainState, Metrics]:
    """Call ``step(state, batch)`` twice and raise :class:`loopkit.ImpurityError` on a broken promise.

    Checks, in order: the first call leaves ``state`` as it was (every entry of
    ``state.state_dict()``, gradients included, every buffer, non-persistent ones too, the tensors the modules
    hold as plain attributes, a counter or a dict of cached tensors, which a pure step's copy copies too
    (named ``attributes.seen``, ``attributes.<module>.<attribute>``), the parameters, buffers and gradients of
    each module they keep outside the model's registered tree (in a plain list or dict, not an ``nn.ModuleList``),
    which a pure step's copy shares, so its forward in train mode changes the caller's (named ``shared
    modules.norms.0.running_mean``), and each module's class, training mode,
    plain settings (``in_features``, a list a forward appends to), hook count and which parameters take gradients; a lazy module's parameter before its first forward is compared as uninitialized:
    a step that initializes the caller's is named, not the pure step's copy), leaves ``batch`` as it was, each
    tensor and numpy array (dtype, shape and values: an array's bytes, so NaN and NaT equal themselves; an object
    array's elements one by one, a ragged one's arrays as arrays), each list, tuple, dict and dataclass (type, length and keys)
    and each plain value (named as ``batch[0]``, ``batch['x']``: an in-place change of the caller's data,
    ``inputs.clamp_``, ``np.clip(x, out=x)``, an ``append``, which another epoch over the same batches would see;
    another object is compared by identity only; checked before the two calls are compared, so such a
    change is not blamed on the RNG) and torch's global CPU RNG too (unless the state
    draws from the global RNG, ``TrainState.create(..., global_rng=True)``: then the second call
    starts from the global RNG the first call started from); with
    ``deterministic`` (the default), a second call on the same state and batch gives the same
    new state and metrics, bit for bit (pass ``deterministic=False`` for kernels that are not).
    Returns the first call's result. A function's result is checked as :func:`loopkit.run_epochs` checks it
    (a wrong shape, ``state`` alone or ``(state, None)``, is named; its metrics come back as 0-dim tensors).
    A donated step is refused: it may reuse ``state``. The caller's global RNG is put back as it was, whatever
    the step did. The ``with_checkpointing``, ``with_logging`` and ``with_profiler`` layers of a pipeline are
    left out of the calls, the steps inside
    them checked: they would write the probe's checkpoint into the run's folder (which the run then takes
    for its own, or restores), its rows into the run's logs, and its profile into the profiler's folder,
    using up the profile's schedule so that the run's own calls would go unprofiled (under a wrapper of
    one's own that attrs did not make, which cannot be rebuilt, they stay).

    >>> import torch, loopkit
    >>> state = loopkit.TrainState.create(torch.nn.Linear(2, 1))
    >>> same, metrics = check_purity(lambda s, b: (s, {"n": torch.tensor(1.0)}), state, None)
    >>> same is state, float(metrics["n"])
    (True, 1.0)
    """
    if not callable(step):
        raise TypeError(f"check_purity: step must be callable as step(state, batch), got {type(step).__qualname__}")
    if getattr(step, "donated", False):
        raise TypeError(f"check_purity: step {_name(step)} is donated, so it may change the state it is given by design")
    if not isinstance(state, TrainState):
        raise not_a_state("check_purity", state)
    refuse_copy_if_sharded(state, "check_purity", "It calls the step twice on copies of the state: check the step "
                           "on an unsharded state, in one process, without with_fsdp")
    name = _name(step)
    step = as_step(_without_writers(step), "check_purity: step")  # (as run_epochs calls it: a function's wrong result is named)
    before = _full_snapshot(state)
    batch_before = _batch_snapshot(batch)
    global_rng = torch.get_rng_state()
    # a state that draws from the global RNG draws from CUDA's too: each call starts from the same
    cuda_rng = torch.cuda.get_rng_state_all() if not state.rng and torch.cuda.is_initialized() else None
    try:
        first, metrics = step(state, batch)
        changed = _difference(before, _full_snapshot(state), "")
        if changed:
            hint = _SHARED_HINT if changed.startswith("shared modules.") else ""
            raise ImpurityError(f"step {name} changed the state it was given: {changed}{hint}")
        changed = _difference(batch_before, _batch_snapshot(batch), "")
        if changed:
            raise ImpurityError(
                f"step {name} changed the batch it was given in place: {changed} (the caller's data: another epoch "
                "over the same batches would see other values; change a copy, inputs.clamp(-1, 1), not inputs.clamp_)"
            )
        own_rng = bool(state.rng)  # else the step draws from the global RNG, as a plain loop does
        if own_rng and not torch.equal(torch.get_rng_state(), global_rng):
            raise ImpurityError(
                f"step {name} left torch's global RNG advanced: draw from the state's RNG (loopkit.rng.RNGScope) "
                "and put the caller's back"
            )
        if deterministic:
            result = _full_snapshot(first), _copy(dict(metrics))
            if not own_rng:
                torch.set_rng_state(global_rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
            second, again = step(state, batch)
            disagree = _difference(result[0], _full_snapshot(second), "") or _difference(
                result[1], _copy(dict(again)), "metrics"
            )
            if disagree:
                raise ImpurityError(
                    f"step {name} gave two different results for the same state and batch: {disagree} (does it draw "
                    "random numbers outside the state's RNG, or read something besides the state and the batch?)"
                )
    finally:  # the check itself leaves the caller's RNG as it found it, whatever the step did
        torch.set_rng_state(global_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return first, metrics
