"""``with_pruning``: pruning by torch.nn.utils.prune's methods on a schedule, the masks kept in the state.

>>> from loopkit.steps import train_step
>>> with_pruning(train_step(lambda m, b: None), amount=0.5, schedule=[10, 20]).applied
('train_step', 'with_pruning')
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from loopkit._agreement import named_callable
from loopkit._calls import check_call
from loopkit._numbers import as_int, as_real
from loopkit.rng import RNGScope
from loopkit.state import TrainState, core_module, leave_intact, plain_names, replace, replace_extras
from loopkit.steps import Metrics, Step, TrainStep, UpdateStep, WrapperStep, _cuda_index, needs_closure
from loopkit.transforms._compose import fitted_to, intact_as, refuse_wrapping, require_step
from loopkit.transforms.qat import is_prepared

__all__ = ["PruningMethod", "PruningStep", "default_prunable", "with_pruning"]

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


#: Lightning's ``ModelPruning`` names of torch.nn.utils.prune's methods
_METHODS: Mapping[str, type[prune.BasePruningMethod]] = types.MappingProxyType({
    "l1_unstructured": prune.L1Unstructured,
    "random_unstructured": prune.RandomUnstructured,
    "ln_structured": prune.LnStructured,
    "random_structured": prune.RandomStructured,
})


@attrs.frozen
class PruningMethod:
    """Which of torch.nn.utils.prune's methods computes the masks, and how it counts what it prunes.

    An unstructured method prunes entries, a structured one whole channels along ``dim``
    (the entries sharing an index there); ``norm`` is ``LnStructured``'s ``n``.

    >>> m = PruningMethod("ln_structured", dim=0, norm=2)
    >>> m.units(torch.ones(3, 4)), m.structured, m.random
    (3, True, False)
    """

    name: str = "l1_unstructured"
    dim: int | None = None
    norm: float | str | None = None

    @property
    def structured(self) -> bool:
        return self.name.endswith("_structured")

    @property
    def random(self) -> bool:
        return self.name.startswith("random")

    def units(self, weight: torch.Tensor) -> int:
        """How many units ``weight`` has: entries, or channels along ``dim``."""
        return weight.shape[self.dim] if self.structured else weight.numel()  # type: ignore[index]

    def pruned(self, mask: torch.Tensor) -> int:
        """How many units ``mask`` prunes: zero entries, or channels all of whose entries are zero (torch's rule)."""
        if not self.structured:
            return int((mask == 0).sum())
        dim = self.dim % mask.dim()  # type: ignore[operator]
        return int((mask.sum(dim=[d for d in range(mask.dim()) if d != dim]) == 0).sum())

    def mask(self, scores: torch.Tensor, mask: torch.Tensor, want: int) -> torch.Tensor:
        """A new mask pruning ``want`` units in all: ``mask``'s and more, chosen among the units it keeps.

        ``torch.nn.utils.prune``'s own computation of a repeated pruning (``PruningContainer``):
        the method, given the count still to prune, ranks (or draws) only the unpruned entries or
        channels of ``scores``, and ``mask`` is kept. ``mask`` itself is left as it is.
        """
        count = max(want - self.pruned(mask), 0)
        kwargs: dict[str, Any] = {"amount": count}
        if self.structured:
            kwargs["dim"] = self.dim
        if self.name == "ln_structured":
            kwargs["n"] = self.norm
        method = _METHODS[self.name](**kwargs)
        container = prune.PruningContainer()
        container._tensor_name = method._tensor_name = "weight"  # as global_unstructured names its flat tensor
        container.add_pruning_method(method)
        return container.compute_mask(scores, mask.clone(memory_format=torch.contiguous_format))


def _global_masks(
    method: PruningMethod, weights: list[torch.Tensor], masks: list[torch.Tensor], want: int
) -> list[torch.Tensor]:
    """New masks pruning ``want`` entries of all the weights together (``torch.nn.utils.prune.global_unstructured``:
    one ranking, or one draw, over the weights flattened and joined); entries already masked stay masked."""
    flat = torch.cat([w.reshape(-1) for w in weights])
    new = method.mask(flat, torch.cat([m.reshape(-1) for m in masks]), want)
    return [part.view_as(w) for part, w in zip(new.split([w.numel() for w in weights]), weights)]


@attrs.frozen(eq=False, kw_only=True)
class PruningStep(UpdateStep):
    """The step :func:`with_pruning` returns.

    >>> from loopkit.steps import as_step
    >>> PruningStep(inner=as_step(lambda s, b: (s, {})), amount=0.5, schedule=lambda s: 0.5).name
    'with_pruning'
    """

    #: the sparsity the schedule reaches: a fraction of the units (float), or a count of them (int)
    amount: float | int
    schedule: Callable[[int], float]
    parameters: tuple[str, ...] | None = None
    method: PruningMethod = PruningMethod()
    #: one count over all the tensors (unstructured methods only), or each tensor pruned by its own
    use_global_unstructured: bool = True
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
        :attr:`loopkit.steps.Step.rank_agreed`). A schedule function is compared by its module, name and (a lambda's)
        line: :func:`loopkit._agreement.named_callable`."""
        fraction = getattr(self.schedule, "fraction", self.schedule)
        when = fraction.points if isinstance(fraction, _CubicSchedule) else named_callable(fraction)
        return {
            "amount": self.amount, "schedule": when, "parameters": self.parameters, "pruning_fn": self.method.name,
            "use_global_unstructured": self.use_global_unstructured, "pruning_dim": self.method.dim,
            "pruning_norm": self.method.norm,
        }

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
                    self._check_prunable(*self._named_parameters(state))
            except (KeyError, ValueError) as error:
                raise leave_intact(error, state)
            return super().run_(state, batch)
        # the masks are checked against the model before the step changes anything (a state moved to another
        # model, a checkpoint of one): a mask of another shape fails here, naming it, not in the backward
        fitted, names, params = _fitted_state(state, masks)
        if target > state.extras.get(_SPARSITY, 0.0):  # the update prunes more: the options must fit the tensors
            try:
                self._check_prunable(names, params)
            except ValueError as error:
                raise leave_intact(error, state)
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
                new, rng = self._pruned(state, weights, old, target)
                masks = dict(zip(names, new))
                state = replace(state, extras={**state.extras, _MASKS: masks, _SPARSITY: float(target)}, rng=rng)
            torch._foreach_mul_(weights, [masks[n] for n in names])  # pruned weights stay zero, whatever the optimizer did
        return state

    def _pruned(
        self, state: TrainState, weights: list[torch.Tensor], old: list[torch.Tensor], target: float
    ) -> tuple[list[torch.Tensor], Any]:
        """The masks at sparsity ``target``, and the state's RNG after them (a random method draws from it)."""
        if not self.method.random:
            return self._masks(weights, old, target), state.rng
        # torch's random methods draw from the default generators: the state's, installed for the draw (the
        # global RNG itself for a state without one), as a raw loop's pruning draws from its global RNG
        device = weights[0].device
        scope = RNGScope(state.rng, _cuda_index(device) if device.type == "cuda" else None, state.seed)
        try:
            masks = self._masks(weights, old, target)
        except BaseException:
            scope.discard()
            raise
        return masks, scope.close()

    def _masks(self, weights: list[torch.Tensor], old: list[torch.Tensor], target: float) -> list[torch.Tensor]:
        """New masks pruning ``target`` of the units: of all the tensors together, or of each tensor."""
        if self.use_global_unstructured:
            return _global_masks(self.method, weights, old, self._count(target, sum(w.numel() for w in weights)))
        return [self.method.mask(w, m, self._count(target, self.method.units(w))) for w, m in zip(weights, old)]

    def _count(self, target: float, units: int) -> int:
        """The units to have pruned out of ``units`` at ``target``: a fraction of them, or (an int amount) a count."""
        return round(target) if isinstance(self.amount, int) else round(target * units)

    def _check_prunable(self, names: list[str], params: list[torch.Tensor]) -> None:
        """Refuse, naming the parameter, a tensor the method cannot prune: a count larger than its units, a
        structured method's ``dim`` it lacks (or a tensor of one dimension, which has no channels)."""
        method = self.method
        for name, param in zip(names, params):
            shape = tuple(param.shape)
            if method.structured and (param.dim() < 2 or not -param.dim() <= method.dim < param.dim()):  # type: ignore[operator]
                raise ValueError(
                    f"with_pruning: {method.name} prunes channels along pruning_dim={method.dim}, which parameter "
                    f"'{name}' of shape {shape} lacks (a structured method needs a tensor of 2 or more dimensions)"
                )
        if not isinstance(self.amount, int):
            return
        if self.use_global_unstructured:
            total = sum(p.numel() for p in params)
            if self.amount > total:
                raise ValueError(f"with_pruning: amount={self.amount} weights, but the tensors it prunes "
                                 f"({', '.join(names)}) hold {total}")
            return
        unit = f"channels along dim {method.dim}" if method.structured else "weights"
        for name, param in zip(names, params):
            if self.amount > method.units(param):
                raise ValueError(f"with_pruning: amount={self.amount} {unit} of each tensor, but parameter '{name}' "
                                 f"of shape {tuple(param.shape)} has {method.units(param)}")

    def _named_parameters(self, state: TrainState) -> tuple[list[str], list[torch.Tensor]]:
        """The parameters to prune (as :func:`_resolve`), looked up in the model as this call's inner steps make it:
        the names given name the model that a ``with_qat`` inside prepares at its first call (``prepare_qat`` renames
        a fused module's parameters: a fused Conv-BN-ReLU's ``1.0.weight`` is ``1.weight``), so before that call they
        are looked up in a copy prepared so (:meth:`loopkit.Step.prepare`), and a name only the model as given has is
        refused at once, not from the next call on."""
        core = core_module(state.model)
        if self.parameters is None or "with_qat" not in self.inner.applied or is_prepared(core):
            return _resolve(core, self._names(state))  # the default names are read off the model as it is
        prepared = core_module(self.inner.prepare(state).model)
        names = self._names(state)
        try:
            return _resolve(prepared, names)
        except KeyError as error:
            raise _renamed_by_qat(error, names, core, prepared) from None

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


def _renamed_by_qat(error: KeyError, names: list[str], model: nn.Module, prepared: nn.Module) -> KeyError:
    """``error`` (a name that ``prepared``, ``model`` prepared for QAT, lacks), or, for a name that ``model`` has,
    what ``prepare_qat`` made of it and the ways out."""
    known = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    now = {name for name, _ in prepared.named_parameters(remove_duplicate=False)}
    renamed = next((name for name in names if name in known and name not in now), None)
    if renamed is None:
        return error
    owner = renamed.rpartition(".")[0]
    while owner and not _has_submodule(prepared, owner):  # the deepest module over it that the prepared model has
        owner = owner.rpartition(".")[0]
    replaced = prepared.get_submodule(owner)
    held = ", ".join(f"'{owner + '.' if owner else ''}{name}'" for name, _ in replaced.named_parameters())
    return KeyError(
        f"with_pruning: parameter '{renamed}' is renamed when the with_qat inside prepares the model: prepare_qat "
        f"makes {f'module {owner!r}' if owner else 'the model'} a {type(replaced).__qualname__}, whose parameters "
        f"are {held}; name those "
        "(parameters=[...] names the prepared model's parameters), or apply with_qat outside: "
        "with_qat(with_pruning(step, ...)), which prepares the model before with_pruning looks up the names"
    )


def _has_submodule(model: nn.Module, name: str) -> bool:
    """Whether ``model`` has a module named ``name``.

    >>> _has_submodule(nn.Sequential(nn.Linear(1, 1)), "0"), _has_submodule(nn.Sequential(nn.Linear(1, 1)), "0.0")
    (True, False)
    """
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


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
    amount: float | int,
    schedule: Sequence[int] | Callable[[int], float],
    *,
    parameters: Sequence[str] | None = None,
    pruning_fn: str = "l1_unstructured",
    use_global_unstructured: bool = True,
    pruning_dim: int | None = None,
    pruning_norm: float | str | None = None,
) -> Step:
    """Prune weights step by step (by default the smallest by magnitude), up to ``amount`` of them.

    ``schedule`` says when: a sequence of update counts (``state.step`` values) after which the
    sparsity grows, reaching ``amount`` at the last one along Zhu & Gupta's cubic ramp
    (:func:`cubic_sparsity`); or a function ``schedule(state.step) -> fraction of amount``
    (0 to 1, never decreasing), e.g. ``lambda s: 1.0 if s >= 100 else 0.0`` to prune once.
    ``amount`` is a fraction in (0, 1) of the units pruned, or an int, a count of them: at
    a point where the schedule's value is ``f``, ``round(amount * f * units)`` units, or
    ``round(amount * f)``, are pruned in all (so far and now).
    ``parameters`` names the tensors to prune (default: the weights of every ``Linear`` and
    ``Conv`` layer); around ``with_qat`` (either order) it names the model as ``with_qat``
    prepares it, whose fused modules' parameters ``prepare_qat`` renames (a fused Conv-BN-ReLU's
    ``1.0.weight`` is ``1.weight``): a name that only the model as given has is refused at the
    first call, saying what it becomes. ``pruning_fn`` is the method, named as Lightning's ``ModelPruning`` names
    torch.nn.utils.prune's: ``"l1_unstructured"`` (the smallest magnitudes), ``"random_unstructured"``
    (entries drawn at random), ``"ln_structured"`` (the whole channels along ``pruning_dim``,
    the indices of that dimension, with the smallest L``pruning_norm`` norm, e.g. ``pruning_dim=0,
    pruning_norm=2``: a Linear's output rows) or ``"random_structured"`` (channels along
    ``pruning_dim`` drawn at random); its units are entries, or channels. With
    ``use_global_unstructured=True`` (the default; unstructured methods only) one count over
    all the tensors decides, their entries ranked (or drawn) together as
    ``torch.nn.utils.prune.global_unstructured`` does; with ``False`` each tensor is pruned by
    its own count, as ``torch.nn.utils.prune.l1_unstructured`` (and the others) prune one
    tensor (an int amount is then a count of each tensor's units). At each point only the units
    not pruned yet are ranked or drawn, by the count still to prune, as torch's repeated pruning
    (``PruningContainer``) does. The random methods draw from the state's RNG (``state.rng``,
    or torch's global RNG for a state made with ``global_rng=True``), which moves on with the
    draw, as a raw loop's pruning draws from its global RNG (under ``with_ddp``, seed the ranks
    alike, the default, or their masks differ). A count above a tensor's units, or a
    ``pruning_dim`` a tensor lacks, is refused before the update that would prune, naming the
    parameter. A weight that several modules share (a head
    tied to an embedding) is one tensor, pruned once under the first of its names, and every
    module that uses it sees it pruned. The masks live in ``state.extras``
    (``pruning/masks``, with ``pruning/sparsity``: the schedule's target reached, ``amount``
    times its fraction, a count for an int amount), so checkpoints carry them and the model's
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
    >>> rows = with_pruning(train_step(lambda m, b: m(b).pow(2).mean()), amount=3, schedule=[1],
    ...                     pruning_fn="ln_structured", pruning_dim=0, pruning_norm=2, use_global_unstructured=False)
    >>> state = TrainState.create(model := torch.nn.Linear(10, 10), torch.optim.SGD(model.parameters(), lr=0.1))
    >>> state, _ = rows(state, torch.ones(4, 10))
    >>> int((state.model.weight.abs().sum(dim=1) == 0).sum())  # 3 of the 10 output rows, whole
    3
    """
    amount = _checked_amount(amount)
    method = _checked_method(pruning_fn, use_global_unstructured, pruning_dim, pruning_norm)
    if callable(schedule):
        check_call(schedule, "with_pruning: schedule must take (step)", 0, hint="; it is called as "
                   "schedule(state.step) and returns the fraction of amount pruned by then")
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
    if parameters is not None:
        names = None if isinstance(parameters, str) or not hasattr(parameters, "__iter__") else tuple(parameters)
        if names is None or not all(isinstance(p, str) for p in names):
            raise TypeError(f"with_pruning: parameters must be a list of parameter names, got {parameters!r}")
        if not names:  # (its first prune failed inside torch, after the update, the state lost)
            raise ValueError("with_pruning: parameters is empty, naming no tensor to prune: name some "
                             "(parameters=['0.weight']), or leave it None for the weights of every Linear and Conv layer")
        parameters = names
    inner = require_step(step, "with_pruning", no_eval="an evaluation step updates no weights to prune")
    later = "apply with_pruning first, e.g. {}(with_pruning(step, ...), ...)"
    refuse_wrapping(inner, "with_pruning", {
        "with_pruning": "the state holds one set of masks",
        "with_ema": "the averages would take in weights about to be pruned; " + later.format("with_ema"),
        "with_checkpointing": "its checkpoints would hold weights about to be pruned; " + later.format("with_checkpointing"),
    })
    return PruningStep(
        inner=inner,
        amount=amount,
        schedule=_Scaled(fraction, amount),
        parameters=None if parameters is None else tuple(parameters),
        method=method,
        use_global_unstructured=use_global_unstructured,
        own_updates=not isinstance(_base(inner), TrainStep),
    )


def _checked_amount(amount: Any) -> float | int:
    """``amount`` as a Python float fraction in (0, 1) or int count >= 1, else a ValueError naming it."""
    count = as_int(amount)
    if count is not None and count >= 1:
        return count
    fraction = as_real(amount)
    if count is None and fraction is not None and 0.0 < fraction < 1.0:
        return float(fraction)
    raise ValueError(f"with_pruning: amount must be a fraction in (0, 1), e.g. 0.5, or a count >= 1 of the units "
                     f"to prune (an int), got {amount!r}")


def _checked_method(pruning_fn: Any, use_global: Any, dim: Any, norm: Any) -> PruningMethod:
    """The method ``pruning_fn`` names, with its options checked (Lightning's ``ModelPruning`` rules, and an option
    the method has no use for refused, where Lightning ignores it)."""
    if not isinstance(pruning_fn, str) or pruning_fn.lower() not in _METHODS:
        raise ValueError(f"with_pruning: pruning_fn must be one of {', '.join(map(repr, _METHODS))}, got {pruning_fn!r}")
    name = pruning_fn.lower()
    if not isinstance(use_global, bool):
        raise TypeError(f"with_pruning: use_global_unstructured must be True or False, got {use_global!r}")
    structured = name.endswith("_structured")
    if structured and use_global:
        raise ValueError(f"with_pruning: {name} prunes each tensor's channels by its own count: pass "
                         "use_global_unstructured=False (global pruning is unstructured only, as in Lightning)")
    if structured != (dim is not None):
        raise ValueError(f"with_pruning: {name} needs pruning_dim, the dimension whose indices are the channels to "
                         f"prune (e.g. 0: a Linear's output rows)" if structured else
                         f"with_pruning: pruning_dim is for the structured methods, not {name}, got {dim!r}")
    if structured and as_int(dim) is None:
        raise TypeError(f"with_pruning: pruning_dim must be an int, got {dim!r}")
    if (name == "ln_structured") != (norm is not None):
        raise ValueError("with_pruning: ln_structured needs pruning_norm, the norm ranking the channels (e.g. 1, 2)"
                         if name == "ln_structured" else f"with_pruning: pruning_norm is for ln_structured, not {name}, "
                         f"got {norm!r}")
    if norm is not None and norm != "fro" and (as_real(norm) is None or norm != norm):
        raise ValueError(f"with_pruning: pruning_norm must be a number (p of torch.norm: 1, 2, inf, ...) or 'fro', "
                         f"got {norm!r}")
    return PruningMethod(name, None if dim is None else as_int(dim), norm if norm in (None, "fro") else as_real(norm))


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
