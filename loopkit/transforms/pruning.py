"""``with_pruning``: magnitude pruning on a schedule, the masks kept in the state.

>>> from loopkit.steps import train_step
>>> with_pruning(train_step(lambda m, b: None), amount=0.5, schedule=[10, 20]).applied
('train_step', 'with_pruning')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from loopkit._numbers import as_int, as_real
from loopkit.state import TrainState, core_module, leave_intact, plain_names, replace, replace_extras
from loopkit.steps import Metrics, TrainStep, UpdateStep, WrapperStep, needs_closure
from loopkit.transforms._compose import fitted_to, intact_as, named_callable, refuse_wrapping, require_step

__all__ = ["PruningStep", "default_prunable", "with_pruning"]

_MASKS, _SPARSITY = "pruning/masks", "pruning/sparsity"
_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: what to do about masks that do not fit the model (the end of each such error)
_FIX = (
    f"the masks belong to another model: to prune this one anew, drop '{_MASKS}' and '{_SPARSITY}' from the state's extras "
    f"(state.evolve(extras={{k: v for k, v in state.extras.items() if not k.startswith('pruning/')}})), "
    "or restore a checkpoint of this model"
)


def default_prunable(model: nn.Module) -> list[str]:
    """The names of the weights of every ``Linear`` and ``Conv`` layer (what Lightning's ``ModelPruning`` prunes),
    but for a parametrized weight (``weight_norm``, ``spectral_norm``, ``orthogonal``: computed, no parameter to mask).

    >>> default_prunable(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)))
    ['0.weight', '2.weight']
    """
    return [
        f"{name}.weight" if name else "weight"
        for name, m in model.named_modules()
        if isinstance(m, _PRUNABLE) and not parametrize.is_parametrized(m, "weight")
    ]


def cubic_sparsity(amount: float, points: Sequence[int], step: int) -> float:
    """The target sparsity after update ``step``: ``amount * (1 - (1 - i/n)**3)`` at the i-th of n points.

    Zhu & Gupta's gradual pruning: fast at first, gentle near the end; 0 before the first point.

    >>> [round(cubic_sparsity(0.8, [10, 20, 30, 40], s), 4) for s in (5, 10, 20, 40, 50)]
    [0.0, 0.4625, 0.7, 0.8, 0.8]
    """
    done = sum(1 for p in points if p <= step)
    return amount * (1.0 - (1.0 - done / len(points)) ** 3)


def _global_masks(weights: list[torch.Tensor], masks: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """New masks zeroing the ``sparsity`` fraction of all the weights with the smallest magnitude.

    One threshold over every pruned tensor (``torch.nn.utils.prune.global_unstructured``'s
    rule), computed by ``prune.L1Unstructured``; weights already masked stay masked.
    """
    flat = torch.cat([(w * m).reshape(-1) for w, m in zip(weights, masks)])
    flat_mask = torch.cat([m.reshape(-1) for m in masks])
    new = prune.L1Unstructured(amount=sparsity).compute_mask(flat, default_mask=flat_mask)
    return [part.view_as(w) for part, w in zip(new.split([w.numel() for w in weights]), weights)]


@attrs.frozen(eq=False, kw_only=True)
class PruningStep(UpdateStep):
    """The step :func:`with_pruning` returns.

    >>> from loopkit.steps import as_step
    >>> PruningStep(inner=as_step(lambda s, b: (s, {})), amount=0.5, schedule=lambda s: 0.5).name
    'with_pruning'
    """

    amount: float
    schedule: Callable[[int], float]
    parameters: tuple[str, ...] | None = None
    #: whether the step at the pipeline's base is one of one's own (not ``train_step``), which may update and then run
    #: a forward again in one call (set when built: a function of one's own may be named ``train_step`` too)
    own_updates: bool = False
    #: ``needs_closure`` by optimizer class (it reads a signature, more than a small step should pay a call)
    _closure: dict[type, bool] = attrs.field(factory=dict, repr=False)

    @property
    def name(self) -> str:
        return "with_pruning"

    @property
    def agreed_options(self) -> dict[str, Any]:
        """How much, when and what it prunes: a rank with others would zero other weights of its replica (see
        :attr:`loopkit.steps.Step.rank_agreed`). A schedule function is compared by name."""
        fraction = getattr(self.schedule, "fraction", self.schedule)
        when = fraction.points if isinstance(fraction, _CubicSchedule) else named_callable(fraction)
        return {"amount": self.amount, "schedule": when, "parameters": self.parameters}

    @property
    def changes_state(self) -> bool:  # type: ignore[override]
        return True  # it zeroes weights in place: a pure call works on a copy, whatever the inner step

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        try:  # the schedule's value after the next update, checked before the step changes anything
            target = self.schedule(state.step + 1)
        except BaseException as error:
            raise leave_intact(error, state)
        masks = state.extras.get(_MASKS)
        if masks is None:
            # the names are checked before the step changes anything, never after an update: the names given
            # at every call until the first prune (a resumed run's first call too), the default ones (read off
            # the model) at the first call and before the update that prunes
            try:
                if self.parameters is not None or state.step == 0 or target > state.extras.get(_SPARSITY, 0.0):
                    _resolve(core_module(state.model), self._names(state))
            except (KeyError, ValueError) as error:
                raise leave_intact(error, state)
            return super().run_(state, batch)
        # the masks are checked against the model before the step changes anything (a state moved to another
        # model, a checkpoint of one): a mask of another shape fails here, naming it, not in the backward
        fitted, names, params = _fitted_state(state, masks)
        try:
            return self._run_masked(fitted, batch, names, params, fitted.extras[_MASKS])
        except BaseException as error:
            intact_as(error, fitted, state)
            raise

    def flush_(self, state: TrainState) -> tuple[TrainState, Metrics]:
        masks = state.extras.get(_MASKS)
        if masks is None:
            return super().flush_(state)
        fitted = _fitted_state(state, masks)[0]  # the update a flush makes ends in after_update's masking
        try:
            return super().flush_(fitted)
        except BaseException as error:
            intact_as(error, fitted, state)
            raise

    def _run_masked(
        self, state: TrainState, batch: Any, names: list[str], params: list[torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> tuple[TrainState, Metrics]:
        # a pruned entry's gradient is zero, as torch.nn.utils.prune's weight_orig * mask gives it: the hooks
        # scale each backward's gradient by the mask before it reaches .grad, for every gradient transform
        # and the optimizer to see; they are this call's only, removed whatever happens
        handles = [p.register_hook(_MaskGrad(masks[n])) for n, p in zip(names, params) if p.requires_grad]
        optimizer = state.optimizer
        if self.own_updates or (optimizer is not None and self._takes_closure(optimizer)):
            # an optimizer that re-runs the forward inside its update (LBFGS), or a step of one's own that may
            # update and then run a forward again (a GAN's two updates), moves pruned entries between those
            # forwards (an optimizer's history predates the pruning): each forward must see them zero, as the
            # raw loop's weight_orig * mask does, not only the next call
            handles += _mask_before_forwards(state.model, params, [masks[n] for n in names])
        try:
            new, metrics = super().run_(state, batch)
        finally:
            for handle in handles:
                handle.remove()
        if new.model is not state.model:  # a step of one's own that copied the model: the copy holds the hooks too
            _drop_hooks(new.model, {handle.id for handle in handles})
        return new, metrics

    def _takes_closure(self, optimizer: torch.optim.Optimizer) -> bool:
        kind = type(optimizer)
        found = self._closure.get(kind)
        if found is None:
            found = self._closure[kind] = needs_closure(optimizer)
        return found

    def after_update(self, state: TrainState, metrics: Metrics) -> TrainState:
        masks = state.extras.get(_MASKS)
        target = self.schedule(state.step)
        grows = target > state.extras.get(_SPARSITY, 0.0)  # a pruning point
        if masks is None and not grows:
            return state
        # the masks name what is pruned; the parameters are looked up only before the first prune
        names, params = _resolve(core_module(state.model), list(masks) if masks is not None else self._names(state))
        weights = [p.detach() for p in params]
        with torch.no_grad():
            if grows:
                old = [torch.ones_like(w) for w in weights] if masks is None else [masks[n] for n in names]
                masks = dict(zip(names, _global_masks(weights, old, target)))
                state = replace(state, extras={**state.extras, _MASKS: masks, _SPARSITY: float(target)})
            torch._foreach_mul_(weights, [masks[n] for n in names])  # pruned weights stay zero, whatever the optimizer did
        return state

    def _names(self, state: TrainState) -> list[str]:
        core = core_module(state.model)
        if self.parameters is None:
            return default_prunable(core)
        if core is state.model:
            return list(self.parameters)
        # a compiled model's own names (_orig_mod.0.weight) name the plain model's tensors (0.weight)
        return [name.removeprefix("_orig_mod.") for name in self.parameters]


def _resolve(model: nn.Module, names: list[str]) -> tuple[list[str], list[torch.Tensor]]:
    """The parameters ``names`` name in ``model``, each tensor once, under the first of its names.

    A weight shared by two modules (a language model's head tied to its embedding) has one name
    per module, and ``named_parameters()`` lists only the first: each name is looked up in its
    own module, and a shared tensor is pruned once (one mask, which every module using it sees).
    """
    kept: list[str] = []
    params: list[torch.Tensor] = []
    seen: set[int] = set()
    for name in names:
        try:
            param = model.get_parameter(name)
        except AttributeError:
            owner, _, attr = name.rpartition(".")
            try:
                module: nn.Module | None = model.get_submodule(owner) if owner else model
            except AttributeError:
                module = None
            if module is not None and parametrize.is_parametrized(module, attr):
                raise KeyError(
                    f"with_pruning: '{name}' is parametrized (torch.nn.utils.parametrize computes it from the parameters "
                    f"under '{owner + '.' if owner else ''}parametrizations.{attr}'): it is no parameter to prune"
                ) from None
            raise KeyError(f"with_pruning: the model has no parameter '{name}'") from None
        if id(param) not in seen:
            seen.add(id(param))
            kept.append(name)
            params.append(param)
    return kept, params


def _fitted_state(state: TrainState, masks: Any) -> tuple[TrainState, list[str], list[torch.Tensor]]:
    """``state`` with its masks checked against its model, and the parameters they name (as :func:`_resolve`).

    A mask of another shape, or one naming a parameter the model lacks, is a ValueError that
    says which and what to do, raised with ``state`` intact. A mask whose dtype or device differs
    only (a checkpoint restored into a float64 template, a model moved to the GPU) is cast to its
    parameter's, as ``model.load_state_dict`` casts: then a new state holds the cast masks (the
    call returns it, so the cast is made once); else ``state`` itself comes back. Masks named as a
    compiled model names its tensors (``_orig_mod.0.weight``: an older checkpoint's), every one of
    them, that name none of the model's, are taken under the plain names (``0.weight``) if those fit
    (the new state holds them so); a mix of both kinds is refused as any other name the model lacks.
    """
    try:
        if not isinstance(masks, Mapping):
            raise ValueError(f"with_pruning: state.extras['{_MASKS}'] must map parameter names to masks, "
                             f"got {type(masks).__qualname__}; {_FIX}")
        given, model = masks, core_module(state.model)
        try:
            names, params = _resolve(model, list(masks))
        except KeyError:
            masks = plain_names(masks, model) or masks  # looked at only when a name fails: no cost to a run
            names, params = _masked_parameters(model, masks)
        cast: dict[str, torch.Tensor] = {}
        for name, param in zip(names, params):
            fitted = fitted_to(masks[name], param, f"with_pruning: the mask of parameter '{name}'", _FIX)
            if fitted is not None:
                cast[name] = fitted
    except ValueError as error:
        raise leave_intact(error, state)
    if cast or masks is not given:
        state = replace_extras(state, {**state.extras, _MASKS: {**masks, **cast}})
    return state, names, params


def _masked_parameters(model: nn.Module, masks: Mapping[str, Any]) -> tuple[list[str], list[torch.Tensor]]:
    """:func:`_resolve` for the names of ``masks``, a name the model lacks a ValueError that says what to do."""
    try:
        return _resolve(model, list(masks))
    except KeyError as error:
        raise ValueError(f"{error.args[0]}, which the masks in state.extras['{_MASKS}'] name; {_FIX}") from None


def _mask_before_forwards(model: nn.Module, params: list[torch.Tensor], masks: list[torch.Tensor]) -> list[Any]:
    """Forward pre-hooks (their handles) that zero the pruned entries of each module's own pruned parameters.

    Every module holding a pruned tensor as its parameter gets one (a tied weight: each of its
    modules); all share one record of each tensor's ``_version`` when last masked, which starts
    at the call's (the weights are masked after every update), so a tensor is masked only
    after something changed it in place (the optimizer), never between two uses in one forward
    (a tied weight, a layer applied twice), which autograd would refuse. A hook finds the
    parameter by its name in the module it runs for: in a copy of the model that a step of
    one's own makes (``fork``), the copy's, whose record starts at its first forward.
    """
    pruned = {id(p): m for p, m in zip(params, masks)}
    versions = {id(p): p._version for p in params}
    handles = []
    for module in model.modules():
        held = tuple((name, pruned[id(p)]) for name, p in module.named_parameters(recurse=False) if id(p) in pruned)
        if held:
            handles.append(module.register_forward_pre_hook(_MaskBeforeForward(held, versions)))
    return handles


def _drop_hooks(model: nn.Module, ids: set[int]) -> None:
    """Remove the hooks of ``ids`` (handles' ids) from the modules and parameters of a copy of the model
    they were registered on (a copy keeps the original's hooks under their ids)."""
    for module in model.modules():
        for key in ids & module._forward_pre_hooks.keys():
            del module._forward_pre_hooks[key]
        for param in module.parameters(recurse=False):
            hooks = param._backward_hooks
            if hooks:
                for key in ids & hooks.keys():
                    del hooks[key]


@attrs.frozen(eq=False)
class _MaskBeforeForward:
    """A forward pre-hook: the module's pruned parameters times their masks, in place, where changed since."""

    pruned: tuple[tuple[str, torch.Tensor], ...]  # (the module's own name of the parameter, mask)
    versions: dict[int, int]  # id(parameter) -> its _version when last masked; shared by the call's hooks

    def __call__(self, module: nn.Module, args: Any) -> None:
        versions, params = self.versions, module._parameters
        for name, mask in self.pruned:
            param = params[name]
            seen = versions.get(id(param))
            if seen is None:  # a copy the step made, before any update of it: masked as the call began
                versions[id(param)] = param._version
            elif param._version != seen:
                with torch.no_grad():
                    param.mul_(mask)  # weight_orig * mask, the raw loop's weight, bit for bit
                versions[id(param)] = param._version


@attrs.frozen(eq=False)
class _MaskGrad:
    """A gradient hook: the gradient times the mask (torch.nn.utils.prune's ``weight_orig`` gradient)."""

    mask: torch.Tensor

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.mask


def with_pruning(
    step: Any,
    amount: float,
    schedule: Sequence[int] | Callable[[int], float],
    *,
    parameters: Sequence[str] | None = None,
) -> PruningStep:
    """Prune the smallest weights by magnitude, step by step, up to a fraction ``amount`` of them.

    ``schedule`` says when: a sequence of update counts (``state.step`` values) after which the
    sparsity grows, reaching ``amount`` at the last one along Zhu & Gupta's cubic ramp
    (:func:`cubic_sparsity`); or a function ``schedule(state.step) -> fraction of amount``
    (0 to 1, never decreasing), e.g. ``lambda s: 1.0 if s >= 100 else 0.0`` to prune once.
    ``parameters`` names the tensors to prune (default: the weights of every ``Linear`` and
    ``Conv`` layer); one threshold over all of them decides (global unstructured L1, as
    ``torch.nn.utils.prune.global_unstructured``); a weight that several modules share (a head
    tied to an embedding) is one tensor, pruned once under the first of its names, and every
    module that uses it sees it pruned. The masks live in ``state.extras``
    (``pruning/masks``, with ``pruning/sparsity``), so checkpoints carry them and the model's
    own state dict keeps its keys; after every update the pruned weights are set back to
    zero, so the model itself holds the pruned weights (export it as it is). A pruned
    weight's gradient is its gradient times the mask, zero (the gradient of
    ``torch.nn.utils.prune``'s ``weight_orig``), before gradient clipping, the NaN guard, a
    loss scaler or the optimizer sees it: the model's weights follow the raw loop's
    ``weight_orig * weight_mask``. Only an optimizer that reads a parameter's values across its
    entries tells them apart: Adafactor's relative step size (the parameter's RMS) reads the
    pruned weight here, ``weight_orig`` with its stale pruned entries there. An optimizer
    whose update runs the forward again (``torch.optim.LBFGS``: ``train_step`` hands it a
    closure) moves pruned entries between those forwards (its history predates the pruning);
    for it, each module that holds a pruned weight gets, for the call only, a forward pre-hook
    that sets the pruned entries back to zero when the update changed the weight, so that
    every forward sees ``weight_orig * weight_mask`` as in the raw loop (bitwise). A step of
    one's own (a plain function, which may make several updates in one call, a GAN's
    discriminator then generator) gets the same hooks, so the generator's forward sees the
    discriminator's pruned entries zero after its update moved them (momentum). A ``train_step``
    with another optimizer gets no such hook. Masks that do not fit the model (a state given another model
    with ``evolve``) are refused before the update, naming the parameter and both shapes; a
    mask whose dtype or device differs only (a checkpoint restored into a float64 template) is
    cast to its parameter's once, and the state returned holds the cast masks. Masks named as a
    compiled model names its parameters (``_orig_mod.0.weight``: a compiled model's
    checkpoint from an older loopkit) are taken under the plain names (``0.weight``)
    when all are so named, as the model's own state dict is.

    Apply it inside ``with_ema``, ``with_logging`` and ``with_checkpointing``.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(10, 10)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_pruning(train_step(lambda m, b: m(b).pow(2).mean()), amount=0.6, schedule=[2, 4])
    >>> for _ in range(5):
    ...     state, _ = step(state, torch.ones(4, 10))
    >>> int((state.model.weight == 0).sum()), state.extras["pruning/sparsity"]
    (60, 0.6)
    """
    amount_ = as_real(amount)
    if amount_ is None or not 0.0 < amount_ < 1.0:
        raise ValueError(f"with_pruning: amount must be a fraction in (0, 1), e.g. 0.5, got {amount!r}")
    amount = amount_
    if callable(schedule):
        fraction = schedule
    elif isinstance(schedule, (Sequence, np.ndarray)) and not isinstance(schedule, str) and len(schedule):
        points = [as_int(p) for p in schedule]  # (np.arange's counts too)
        if any(p is None or p < 1 for p in points) or points != sorted(set(points)):
            raise ValueError(f"with_pruning: schedule must be increasing update counts >= 1, got {schedule!r}")
        fraction = _CubicSchedule(tuple(points))
    else:
        raise TypeError(
            f"with_pruning: schedule must be a non-empty list of update counts or a function of the step, got {schedule!r}"
        )
    if parameters is not None and (isinstance(parameters, str) or not all(isinstance(p, str) for p in parameters)):
        raise TypeError(f"with_pruning: parameters must be a list of parameter names, got {parameters!r}")
    inner = require_step(step, "with_pruning", no_eval="an evaluation step updates no weights to prune")
    later = "apply with_pruning first, e.g. {}(with_pruning(step, ...), ...)"
    refuse_wrapping(inner, "with_pruning", {
        "with_pruning": "the state holds one set of masks",
        "with_ema": "the averages would take in weights about to be pruned; " + later.format("with_ema"),
        "with_checkpointing": "its checkpoints would hold weights about to be pruned; " + later.format("with_checkpointing"),
    })
    amount = float(amount)
    return PruningStep(
        inner=inner,
        amount=amount,
        schedule=_Scaled(fraction, amount),
        parameters=None if parameters is None else tuple(parameters),
        own_updates=not isinstance(_base(inner), TrainStep),
    )


def _base(step: Any) -> Any:
    """The step at the base of a pipeline of whole-step transforms (``train_step`` carries its gradient transforms)."""
    while isinstance(step, WrapperStep):
        step = step.inner
    return step


@attrs.frozen
class _CubicSchedule:
    """The fraction of ``amount`` reached after update ``step`` on the cubic ramp over ``points``."""

    points: tuple[int, ...]

    def __call__(self, step: int) -> float:
        return cubic_sparsity(1.0, self.points, step)


@attrs.frozen
class _Scaled:
    """``amount * fraction(step)``, with the fraction checked to lie in [0, 1]."""

    fraction: Callable[[int], float]
    amount: float

    def __call__(self, step: int) -> float:
        value = self.fraction(step)
        fraction = as_real(value)
        if fraction is None or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"with_pruning: schedule({step}) must be a fraction in [0, 1], got {value!r}")
        return self.amount * fraction
